//! Writing an output directory so that a failure never leaves a half-written one.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Refuses an existing `out_dir` unless `force`; runs `write` on a temporary sibling
/// directory, removes it if `write` fails, and otherwise renames it into place
/// (replacing the old directory when forced).
pub fn write_dir_atomically(out_dir: &Path, force: bool, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if out_dir.exists() && !force {
        bail!("{}: already exists (use --force to replace it)", out_dir.display());
    }
    let parent = out_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    let tmp = parent.join(format!(
        ".{}.slmc-tmp-{}",
        out_dir.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out_dir.exists() {
        std::fs::remove_dir_all(out_dir).with_context(|| format!("{}: cannot replace", out_dir.display()))?;
    }
    std::fs::rename(&tmp, out_dir).with_context(|| format!("{}: cannot move the result into place", out_dir.display()))
}

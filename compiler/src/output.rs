//! Writing user-visible directories crash-safely: everything is written beside its final
//! place, synced to disk, and only then renamed in, so a crash or a kill at any point leaves
//! either the old directory or the new one, never a half-written one. Temporaries left by a
//! killed run are removed by the next run that writes the same place.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Stops the process on the spot, as a kill would, when `$SLMC_CRASH_AT` names this point:
/// the crash-safety test stops commands between every two steps of a commit sequence
/// (random SIGKILLs rarely land in windows this short).
pub fn crash_point(name: &str) {
    if std::env::var_os("SLMC_CRASH_AT").is_some_and(|v| v == name) {
        std::process::abort();
    }
}

/// Flushes a file or a directory (its entries) to disk.
pub fn sync_path(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("{}: cannot sync", path.display()))
}

/// Writes `files` (relative path, bytes) under `dir`, each synced, then every directory.
pub fn write_files<'a>(dir: &Path, files: impl Iterator<Item = (&'a str, &'a [u8])>) -> Result<()> {
    use std::io::Write;
    let mut dirs = std::collections::BTreeSet::from([dir.to_path_buf()]);
    for (rel, bytes) in files {
        if !slmc_targets::files::is_relative_inside(rel) {
            bail!("{}: refusing to write outside {}", dir.join(rel).display(), dir.display());
        }
        let path = dir.join(rel);
        let parent = path.parent().expect("a file under dir");
        std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
        for d in parent.ancestors().take_while(|d| d.starts_with(dir)) {
            dirs.insert(d.to_path_buf());
        }
        let mut f = std::fs::File::create(&path).with_context(|| format!("{}: cannot write", path.display()))?;
        f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("{}: cannot write", path.display()))?;
    }
    dirs.iter().try_for_each(|d| sync_path(d))
}

/// Syncs every file and directory under `dir` (output written by code that does not sync).
pub fn sync_tree(dir: &Path) -> Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("{}: cannot list", d.display()))? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                sync_path(&entry.path())?;
            }
        }
        sync_path(&d)?;
    }
    Ok(())
}

/// Copies every regular file under `from` to the same place under `to`, synced.
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let mut files = Vec::new();
    for path in slmc_runtime::bundle::walk(from).with_context(|| format!("{}: cannot list", from.display()))? {
        let rel = path.strip_prefix(from).expect("walk stays inside").to_string_lossy().to_string();
        let bytes = slmc_targets::files::read_regular(from, &rel, None)
            .map_err(|(p, m)| anyhow::anyhow!("{}: {m}", p.display()))?;
        files.push((rel, bytes));
    }
    std::fs::create_dir_all(to).with_context(|| format!("{}: cannot create", to.display()))?;
    write_files(to, files.iter().map(|(r, b)| (r.as_str(), b.as_slice())))
}

/// The temporary names used beside `out_dir`: `.<name>.slmc-<what>-<pid>`.
fn temp_name(out_dir: &Path, what: &str) -> PathBuf {
    let parent = out_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = out_dir.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    parent.join(format!(".{name}.slmc-{what}-{}", std::process::id()))
}

/// Whether process `pid` is alive (a temporary it owns may still be in use).
pub fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: signal 0 only asks whether the process exists.
        unsafe {
            libc::kill(pid as libc::pid_t, 0) == 0
                || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
        }
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes `.<name>.slmc-*-<pid>` temporaries beside `out_dir` whose process is gone.
pub fn remove_stale_temps(out_dir: &Path) {
    let parent = out_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Some(name) = out_dir.file_name().and_then(|n| n.to_str()) else { return };
    let prefix = format!(".{name}.slmc-");
    remove_dead_temps(parent, |file| file.strip_prefix(&prefix)?.rsplit('-').next()?.parse().ok());
}

/// Removes every entry of `dir` that `owner` names a temporary of (returning the process
/// that wrote it) when that process is gone: what a killed command left behind.
pub fn remove_dead_temps(dir: &Path, owner: impl Fn(&str) -> Option<u32>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let pid = owner(&entry.file_name().to_string_lossy());
        if pid.is_some_and(|pid| !process_alive(pid)) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Puts directory `new` in the place of `old` in one step where the system can (Linux's
/// renameat2 RENAME_EXCHANGE: `old` is never missing); `new`'s path then holds the old
/// directory, which is removed.
pub fn replace_dir(new: &Path, old: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).expect("paths have no NUL");
        let (a, b) = (c(new), c(old));
        // SAFETY: two NUL-terminated paths relative to the working directory.
        let r =
            unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
        if r == 0 {
            crash_point("dir-exchanged");
            let _ = std::fs::remove_dir_all(new);
            return Ok(());
        }
    }
    // Elsewhere: move the old one aside first (a moment with neither, never a mix).
    let aside = temp_name(old, "old");
    std::fs::rename(old, &aside).with_context(|| format!("{}: cannot replace", old.display()))?;
    std::fs::rename(new, old).with_context(|| format!("{}: cannot move the result into place", old.display()))?;
    let _ = std::fs::remove_dir_all(&aside);
    Ok(())
}

/// Refuses an existing `out_dir` unless `force`; runs `write` on a temporary sibling
/// directory, removes it if `write` fails, and otherwise syncs it and puts it in place
/// (replacing the old directory only once the new one is complete, when forced).
pub fn write_dir_atomically(out_dir: &Path, force: bool, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if out_dir.exists() && !force {
        bail!("{}: already exists (use --force to replace it)", out_dir.display());
    }
    let parent = out_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    remove_stale_temps(out_dir);
    let tmp = temp_name(out_dir, "tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    if let Err(e) = write(&tmp).and_then(|_| sync_tree(&tmp)) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    crash_point("output-written");
    if out_dir.exists() {
        replace_dir(&tmp, out_dir)?;
    } else {
        std::fs::rename(&tmp, out_dir)
            .with_context(|| format!("{}: cannot move the result into place", out_dir.display()))?;
    }
    sync_path(parent)
}

/// Writes one file crash-safely: a synced temporary sibling renamed over `path` (a report
/// is either the old one or the new one, never half written).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if path.is_dir() {
        bail!("{}: is a directory", path.display());
    }
    let tmp = temp_name(path, "tmp");
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .with_context(|| format!("{}: cannot write", tmp.display()))
        .and_then(|_| {
            std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot move into place", path.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.and_then(|_| sync_path(parent))
}

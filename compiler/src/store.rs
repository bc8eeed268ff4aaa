//! The on-device store: verified bundles under `STORE/versions/<id>/`, the active one
//! behind the `STORE/current` symlink, and `STORE/state.json` (current, then up to two
//! previous versions, newest first). Every change is prepared beside its final place and
//! switched in with a rename, so a failed install leaves the store exactly as it was.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use slmc_targets::bundle::MANIFEST_FILE;

/// How many versions before the current one the store keeps.
pub const KEPT_PREVIOUS: usize = 2;

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoreState {
    pub current: Option<String>,
    /// Newest first.
    pub previous: Vec<String>,
}

pub fn read_state(store: &Path) -> Result<StoreState> {
    let path = store.join("state.json");
    if !path.exists() {
        return Ok(StoreState::default());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a store state", path.display()))
}

fn write_state(store: &Path, state: &StoreState) -> Result<()> {
    let tmp = store.join(".state.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(state)? + "\n")
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, store.join("state.json")).with_context(|| format!("{}: cannot update", store.display()))
}

/// Points `STORE/current` at `versions/<id>` with an atomic rename of a fresh symlink.
fn switch_current(store: &Path, id: &str) -> Result<()> {
    let tmp = store.join(".current.tmp");
    let _ = std::fs::remove_file(&tmp);
    #[cfg(unix)]
    std::os::unix::fs::symlink(Path::new("versions").join(id), &tmp)
        .with_context(|| format!("{}: cannot create", tmp.display()))?;
    #[cfg(not(unix))]
    bail!("the store needs symlinks (Unix)");
    std::fs::rename(&tmp, store.join("current")).with_context(|| format!("{}: cannot switch", store.display()))
}

/// Copies every file under `from` to the same place under `to`.
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("{}: cannot create", to.display()))?;
    for path in slmc_runtime::bundle::walk(from).with_context(|| format!("{}: cannot list", from.display()))? {
        let rel = path.strip_prefix(from).expect("walk stays inside");
        let dest = to.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&path, &dest).with_context(|| format!("{}: cannot copy", path.display()))?;
    }
    Ok(())
}

/// The id a bundle gets in the store: its target and the start of its manifest's sha256.
pub fn bundle_id(bundle: &Path, target: &str) -> Result<String> {
    // The id names a directory inside the store: a target name from a (possibly unsigned)
    // manifest must not climb out of it.
    if target.is_empty() || !target.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
        bail!(
            "{}: target name {target:?} is not lowercase letters, digits and dashes; refusing to use it in the store",
            bundle.join(MANIFEST_FILE).display()
        );
    }
    let manifest = std::fs::read(bundle.join(MANIFEST_FILE))
        .with_context(|| format!("{}: cannot read", bundle.join(MANIFEST_FILE).display()))?;
    Ok(format!("{target}-{}", &slmc_targets::artifact::sha256_hex(&manifest)[..16]))
}

/// Copies a bundle that has already been verified and smoke-tested into the store and
/// makes it current. Returns its id.
pub fn install(bundle: &Path, store: &Path, target: &str, trust: &slmc_runtime::bundle::Trust) -> Result<String> {
    std::fs::create_dir_all(store.join("versions")).with_context(|| format!("{}: cannot create", store.display()))?;
    let mut state = read_state(store)?;
    let id = bundle_id(bundle, target)?;
    let dest = store.join("versions").join(&id);
    if !dest.exists() {
        let tmp = store.join("versions").join(format!(".{id}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let copied = copy_dir(bundle, &tmp).and_then(|_| {
            // The copy must verify like the original before it can become current.
            slmc_runtime::bundle::verify(&tmp, trust).map(|_| ()).map_err(anyhow::Error::from)
        });
        if let Err(e) = copied {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(
                e.context(format!("{}: copying into the store failed; the store is unchanged", store.display()))
            );
        }
        std::fs::rename(&tmp, &dest).with_context(|| format!("{}: cannot move into place", dest.display()))?;
    }
    if state.current.as_deref() != Some(id.as_str()) {
        if let Some(old) = state.current.take() {
            state.previous.retain(|p| *p != old && *p != id);
            state.previous.insert(0, old);
        }
        state.previous.retain(|p| *p != id);
        state.previous.truncate(KEPT_PREVIOUS);
        state.current = Some(id.clone());
    }
    switch_current(store, &id)?;
    write_state(store, &state)?;
    prune(store, &state)?;
    Ok(id)
}

/// Makes the newest previous version current again; the version rolled back from is
/// removed. Returns (from, to).
pub fn rollback(store: &Path) -> Result<(String, String)> {
    let mut state = read_state(store)?;
    let Some(from) = state.current.clone() else {
        bail!("{}: nothing is installed", store.display());
    };
    if state.previous.is_empty() {
        bail!("{}: no previous version to roll back to (current: {from})", store.display());
    }
    let to = state.previous.remove(0);
    if !store.join("versions").join(&to).is_dir() {
        bail!("{}: previous version {to} is missing from versions/", store.display());
    }
    state.current = Some(to.clone());
    switch_current(store, &to)?;
    write_state(store, &state)?;
    prune(store, &state)?;
    Ok((from, to))
}

/// Removes versions the state no longer names.
fn prune(store: &Path, state: &StoreState) -> Result<()> {
    let keep: Vec<&String> = state.current.iter().chain(&state.previous).collect();
    for entry in std::fs::read_dir(store.join("versions"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.starts_with('.') && !keep.iter().any(|k| **k == name) {
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("{}: cannot remove", entry.path().display()))?;
        }
    }
    Ok(())
}

pub fn current_dir(store: &Path) -> PathBuf {
    store.join("current")
}

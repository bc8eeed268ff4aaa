//! The on-device store: verified bundles under `STORE/versions/<id>/` and the active one
//! behind the `STORE/current` symlink. Switching that symlink (an atomic rename of a fresh
//! one) is the single commit point of every change: `STORE/states/<id>.json` (the versions
//! kept while `<id>` is current, newest first) is written and synced before `current`
//! points at `<id>`, and a new version directory is complete, verified and synced before
//! either. Every command holds an exclusive lock on `STORE/.lock`, so two installs never
//! race and `prune` never removes what another process just made; temporaries left by a
//! killed command are removed by the next one. A failed or killed install leaves the store
//! as it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use slmc_runtime::bundle::{Trust, Verified};
use slmc_targets::bundle::MANIFEST_FILE;

use crate::output::{sync_path, write_files};

/// How many versions before the current one the store keeps.
pub const KEPT_PREVIOUS: usize = 2;

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoreState {
    pub current: Option<String>,
    /// Newest first.
    pub previous: Vec<String>,
}

fn states_dir(store: &Path) -> PathBuf {
    store.join("states")
}

/// What the store holds: the version `current` points at and the state recorded for it.
pub fn read_state(store: &Path) -> Result<StoreState> {
    let link = store.join("current");
    let target = match std::fs::read_link(&link) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StoreState::default()),
        Err(e) => return Err(e).with_context(|| format!("{}: not a symlink", link.display())),
    };
    let id = target
        .strip_prefix("versions")
        .ok()
        .and_then(|p| p.to_str())
        .filter(|id| !id.is_empty() && !id.contains('/'))
        .with_context(|| format!("{}: points at {}, not into versions/", link.display(), target.display()))?
        .to_string();
    let path = states_dir(store).join(format!("{id}.json"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let state: StoreState =
        serde_json::from_str(&text).with_context(|| format!("{}: not a store state", path.display()))?;
    if state.current.as_deref() != Some(id.as_str()) {
        bail!("{}: records {:?} as current, but `current` points at {id}", path.display(), state.current);
    }
    Ok(state)
}

/// Holds the store's lock until dropped.
pub struct StoreLock(#[allow(dead_code)] std::fs::File);

/// Takes the store's exclusive lock (waiting for another command to finish), then removes
/// what a killed command left: temporaries, and versions or states nothing refers to.
pub fn lock(store: &Path) -> Result<StoreLock> {
    std::fs::create_dir_all(store.join("versions")).with_context(|| format!("{}: cannot create", store.display()))?;
    std::fs::create_dir_all(states_dir(store)).with_context(|| format!("{}: cannot create", store.display()))?;
    let path = store.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    file.lock().with_context(|| format!("{}: cannot lock", path.display()))?;
    let lock = StoreLock(file);
    // Under the lock no other command is writing: every temporary is a leftover.
    for dir in [store.to_path_buf(), store.join("versions"), states_dir(store)] {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("{}: cannot list", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') && name != ".lock" {
                let p = entry.path();
                let _ =
                    if entry.file_type()?.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            }
        }
    }
    // Stores written by slmc 0.2 kept one `state.json`.
    let legacy = store.join("state.json");
    if legacy.is_file() {
        let text = std::fs::read_to_string(&legacy).with_context(|| format!("{}: cannot read", legacy.display()))?;
        let state: StoreState =
            serde_json::from_str(&text).with_context(|| format!("{}: not a store state", legacy.display()))?;
        if state.current.is_some() {
            write_state(store, &state)?;
        }
        std::fs::remove_file(&legacy).with_context(|| format!("{}: cannot remove", legacy.display()))?;
    }
    prune(store, &read_state(store)?)?;
    Ok(lock)
}

/// Writes `STORE/states/<current>.json`, synced, before `current` may point at it.
fn write_state(store: &Path, state: &StoreState) -> Result<()> {
    let id = state.current.as_deref().expect("a recorded state has a current version");
    let dir = states_dir(store);
    let tmp = format!(".{id}.json.tmp");
    let text = serde_json::to_string_pretty(state)? + "\n";
    write_files(&dir, [(tmp.as_str(), text.as_bytes())].into_iter())?;
    std::fs::rename(dir.join(&tmp), dir.join(format!("{id}.json")))
        .with_context(|| format!("{}: cannot update", dir.display()))?;
    sync_path(&dir)
}

/// The commit point: points `STORE/current` at `versions/<id>` with an atomic rename of a
/// fresh symlink, then syncs the store directory.
fn switch_current(store: &Path, id: &str) -> Result<()> {
    let tmp = store.join(".current.tmp");
    let _ = std::fs::remove_file(&tmp);
    #[cfg(unix)]
    std::os::unix::fs::symlink(Path::new("versions").join(id), &tmp)
        .with_context(|| format!("{}: cannot create", tmp.display()))?;
    #[cfg(not(unix))]
    bail!("the store needs symlinks (Unix)");
    std::fs::rename(&tmp, store.join("current")).with_context(|| format!("{}: cannot switch", store.display()))?;
    sync_path(store)
}

/// The id a bundle gets in the store: its target and the start of its manifest's sha256.
pub fn bundle_id(verified: &Verified) -> Result<String> {
    let target = &verified.manifest.target.name;
    let manifest_path = verified.files.path(MANIFEST_FILE);
    // The id names a directory inside the store: a target name from a (possibly unsigned)
    // manifest must not climb out of it.
    if target.is_empty() || !target.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
        bail!(
            "{}: target name {target:?} is not lowercase letters, digits and dashes; refusing to use it in the store",
            manifest_path.display()
        );
    }
    let manifest = verified.files.bytes(MANIFEST_FILE).map_err(|(p, m)| anyhow::anyhow!("{}: {m}", p.display()))?;
    Ok(format!("{target}-{}", &slmc_targets::artifact::sha256_hex(manifest)[..16]))
}

/// Each version's eval-set results on this device (`STORE/eval/<id>.json`: item id ->
/// passed), kept so the next install can be compared with the version it replaces.
fn eval_results_path(store: &Path, id: &str) -> PathBuf {
    store.join("eval").join(format!("{id}.json"))
}

/// Item ids that passed with the store's current version and fail in `results`.
fn eval_regressions(store: &Path, current: &str, results: &BTreeMap<String, bool>) -> Result<Vec<String>> {
    let path = eval_results_path(store, current);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    let before: BTreeMap<String, bool> =
        serde_json::from_str(&text).with_context(|| format!("{}: not eval results", path.display()))?;
    Ok(before
        .iter()
        .filter(|(id, passed)| **passed && results.get(*id) == Some(&false))
        .map(|(id, _)| id.clone())
        .collect())
}

/// Writes the bytes of a bundle that was verified and smoke-tested into the store (the same
/// bytes, not a second read of its files) and makes it current. Returns its id. With eval
/// results (item id -> passed on this device), a bundle failing an item the current
/// version passed is refused before anything is written, and the results are kept.
pub fn install(
    verified: &Verified,
    store: &Path,
    trust: &Trust,
    eval: Option<&BTreeMap<String, bool>>,
) -> Result<String> {
    let id = bundle_id(verified)?;
    let _lock = lock(store)?;
    let mut state = read_state(store)?;
    if let (Some(results), Some(current)) = (eval, state.current.as_deref()) {
        let regressed = eval_regressions(store, current, results)?;
        if !regressed.is_empty() {
            bail!(
                "{}: the eval set regresses against the installed version {current}: {} passed there and fail now; the store is unchanged",
                store.display(),
                regressed.join(", ")
            );
        }
    }
    let dest = store.join("versions").join(&id);
    // A version already present is used only if it still verifies.
    let reusable = dest.is_dir() && slmc_runtime::bundle::verify(&dest, trust).is_ok();
    if !reusable {
        let tmp = store.join("versions").join(format!(".{id}.tmp"));
        let written = write_files(&tmp, verified.files.iter()).and_then(|_| {
            // The copy must verify like the original before it can become current.
            slmc_runtime::bundle::verify(&tmp, trust).map(|_| ()).map_err(anyhow::Error::from)
        });
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(
                e.context(format!("{}: copying into the store failed; the store is unchanged", store.display()))
            );
        }
        if dest.exists() {
            crate::output::replace_dir(&tmp, &dest)?;
        } else {
            std::fs::rename(&tmp, &dest).with_context(|| format!("{}: cannot move into place", dest.display()))?;
        }
        sync_path(&store.join("versions"))?;
        crate::output::crash_point("store-version-written");
    }
    if let Some(results) = eval {
        let path = eval_results_path(store, &id);
        std::fs::create_dir_all(store.join("eval")).with_context(|| format!("{}: cannot create", store.display()))?;
        crate::output::write_file_atomically(&path, (serde_json::to_string_pretty(results)? + "\n").as_bytes())?;
    }
    if state.current.as_deref() != Some(id.as_str()) {
        if let Some(old) = state.current.take() {
            state.previous.retain(|p| *p != old);
            state.previous.insert(0, old);
        }
        state.previous.retain(|p| *p != id);
        state.previous.truncate(KEPT_PREVIOUS);
        state.current = Some(id.clone());
        write_state(store, &state)?;
        crate::output::crash_point("store-state-written");
        switch_current(store, &id)?;
        crate::output::crash_point("store-switched");
        prune(store, &state)?;
    }
    Ok(id)
}

/// Makes the newest previous version current again; the version rolled back from is
/// removed. Returns (from, to).
pub fn rollback(store: &Path) -> Result<(String, String)> {
    let _lock = lock(store)?;
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
    write_state(store, &state)?;
    switch_current(store, &to)?;
    prune(store, &state)?;
    Ok((from, to))
}

/// Removes versions and states the current state does not name (after the commit, so a
/// kill here leaves only garbage the next command removes).
fn prune(store: &Path, state: &StoreState) -> Result<()> {
    let keep: Vec<&String> = state.current.iter().chain(&state.previous).collect();
    for (dir, suffix) in [(store.join("versions"), ""), (states_dir(store), ".json")] {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("{}: cannot list", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            let id = name.strip_suffix(suffix).unwrap_or(&name);
            if !name.starts_with('.') && !keep.iter().any(|k| k.as_str() == id) {
                let p = entry.path();
                let removed =
                    if entry.file_type()?.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                removed.with_context(|| format!("{}: cannot remove", p.display()))?;
            }
        }
    }
    Ok(())
}

pub fn current_dir(store: &Path) -> PathBuf {
    store.join("current")
}

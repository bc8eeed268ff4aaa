//! Bundle checks before anything runs: the manifest's signature (ed25519 over
//! `manifest.json`), the minimum runtime version, and the size and sha256 of every file,
//! with no file outside the manifest. Each refusal names the file and the problem.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use slmc_targets::files::read_regular;

use crate::files::ArtifactFiles;
use slmc_targets::bundle::{version_at_least, BundleManifest, BUNDLE_SCHEMA, MANIFEST_FILE, SIGNATURE_FILE};

/// This runtime's version, compared with a bundle's `min_runtime_version`.
pub const RUNTIME_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{dir}: unsigned bundle refused (sign it with `slmc sign`, or pass --allow-unsigned)")]
    Unsigned { dir: PathBuf },
    #[error("{dir}: a public key is configured but the bundle has no signature (manifest.sig): refused whatever --allow-unsigned says")]
    SignatureMissing { dir: PathBuf },
    #[error("{dir}: signed bundle, but no public key to check it with (--pubkey FILE or $SLMC_PUBKEY), or pass --allow-unsigned")]
    NoKey { dir: PathBuf },
    #[error("{path}: the bundle needs slmc runtime {need} or newer; this runtime is {have}")]
    RuntimeTooOld { path: PathBuf, need: String, have: String },
}

fn file_err(path: &Path, message: impl Into<String>) -> BundleError {
    BundleError::File { path: path.to_path_buf(), message: message.into() }
}

/// How to treat signatures.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    /// The public key signatures must match.
    pub public_key: Option<VerifyingKey>,
    /// Accept a bundle without a signature, or one whose signature cannot be checked for
    /// want of a key (file hashes are still checked).
    pub allow_unsigned: bool,
}

pub fn is_bundle(dir: &Path) -> bool {
    dir.join(MANIFEST_FILE).is_file()
}

/// Reads a public key file: 64 hex digits (an optional `ed25519:` prefix), as `slmc keygen` writes.
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, BundleError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let bytes = parse_hex32(text.trim().trim_start_matches("ed25519:"))
        .ok_or_else(|| file_err(path, "not a public key (64 hex digits expected)"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| file_err(path, format!("not a valid ed25519 public key: {e}")))
}

pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let v = parse_hex(s)?;
    v.try_into().ok()
}

pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What verification found, and the bytes it checked.
#[derive(Debug)]
pub struct Verified {
    pub manifest: BundleManifest,
    /// Whether a signature was present and checked against the key.
    pub signature_checked: bool,
    /// Every file of the bundle as verified (the manifest and its signature included):
    /// executors, the tokenizer and the store take these bytes, never the paths.
    pub files: ArtifactFiles,
}

/// Checks a bundle directory; see the module doc for the order of checks.
pub fn verify(dir: &Path, trust: &Trust) -> Result<Verified, BundleError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let read = |name: &str| read_regular(dir, name, None).map_err(|(path, message)| file_err(&path, message));
    let manifest_bytes = read(MANIFEST_FILE)?;
    let sig_path = dir.join(SIGNATURE_FILE);
    let mut signature_checked = false;
    // Present means present in any form: a symlinked or special signature file is refused
    // by the read below, not taken for a missing one.
    let signature = match std::fs::symlink_metadata(&sig_path) {
        Ok(_) => Some(read(SIGNATURE_FILE)?),
        Err(_) => None,
    };
    if let Some(sig_bytes) = &signature {
        match &trust.public_key {
            Some(key) => {
                let text = std::str::from_utf8(sig_bytes).unwrap_or("");
                let bytes = parse_hex(text.trim())
                    .filter(|b| b.len() == 64)
                    .ok_or_else(|| file_err(&sig_path, "not a signature (128 hex digits expected)"))?;
                let signature = Signature::from_slice(&bytes).map_err(|e| file_err(&sig_path, e.to_string()))?;
                key.verify(&manifest_bytes, &signature).map_err(|_| {
                    file_err(
                        &manifest_path,
                        "the signature does not match: the manifest was altered or signed with another key",
                    )
                })?;
                signature_checked = true;
            }
            None if trust.allow_unsigned => {}
            None => return Err(BundleError::NoKey { dir: dir.to_path_buf() }),
        }
    } else if trust.public_key.is_some() {
        // A configured key always wins: allowing unsigned bundles must not let a signed
        // bundle through with its signature deleted.
        return Err(BundleError::SignatureMissing { dir: dir.to_path_buf() });
    } else if !trust.allow_unsigned {
        return Err(BundleError::Unsigned { dir: dir.to_path_buf() });
    }
    let manifest = parse_manifest(&manifest_path, &manifest_bytes)?;
    if !version_at_least(RUNTIME_VERSION, &manifest.min_runtime_version) {
        return Err(BundleError::RuntimeTooOld {
            path: manifest_path,
            need: manifest.min_runtime_version.clone(),
            have: RUNTIME_VERSION.into(),
        });
    }
    let mut files = check_files(dir, &manifest)?;
    files.insert_checked(MANIFEST_FILE, manifest_bytes);
    if let Some(sig) = signature {
        files.insert_checked(SIGNATURE_FILE, sig);
    }
    Ok(Verified { manifest, signature_checked, files })
}

pub fn parse_manifest(path: &Path, bytes: &[u8]) -> Result<BundleManifest, BundleError> {
    let manifest: BundleManifest =
        serde_json::from_slice(bytes).map_err(|e| file_err(path, format!("invalid manifest: {e}")))?;
    if manifest.schema != BUNDLE_SCHEMA {
        return Err(file_err(path, format!("schema `{}` is not {BUNDLE_SCHEMA}", manifest.schema)));
    }
    Ok(manifest)
}

/// Every listed file has its size and sha256, and no other file is in the bundle; the
/// bytes read.
pub fn check_files(dir: &Path, manifest: &BundleManifest) -> Result<ArtifactFiles, BundleError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let mut listed = std::collections::BTreeSet::new();
    for f in &manifest.files {
        if !f.is_inside() {
            return Err(file_err(&manifest_path, format!("file `{}` is outside the bundle", f.path)));
        }
        listed.insert(dir.join(&f.path));
    }
    for path in walk(dir).map_err(|e| file_err(dir, format!("cannot list: {e}")))? {
        let name = path.strip_prefix(dir).map(|p| p.to_string_lossy().to_string()).unwrap_or_default();
        if name != MANIFEST_FILE && name != SIGNATURE_FILE && !listed.contains(&path) {
            return Err(file_err(&path, "is not in the manifest"));
        }
    }
    ArtifactFiles::read_listed(dir, &manifest.files).map_err(|(path, message)| file_err(&path, message))
}

/// Every regular file under `dir`, sorted.
pub fn walk(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

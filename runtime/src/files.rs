//! An artifact's files, read once: verification hashes these bytes and the executors, the
//! tokenizer and the store use the same bytes, never the paths again (a file swapped after
//! the check cannot run unverified).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use slmc_targets::artifact::{sha256_hex, ArtifactFormat, FileDigest};
use slmc_targets::files::{read_regular, FileError};
use slmc_targets::ArtifactKind;

/// The manifest every artifact kind has.
pub const ARTIFACT_FILE: &str = "artifact.json";
/// Text files an artifact may carry beside its executor's files.
pub const TEXT_FILES: &[&str] = &["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"];

#[derive(Debug, Clone)]
struct Held {
    bytes: Arc<[u8]>,
    sha256: String,
}

/// Files of one directory, read (and, where a manifest gave digests, checked) once.
#[derive(Debug, Clone)]
pub struct ArtifactFiles {
    dir: PathBuf,
    files: BTreeMap<String, Held>,
}

impl ArtifactFiles {
    /// Reads every listed file, checking its size and sha256.
    pub fn read_listed(dir: &Path, listed: &[FileDigest]) -> Result<ArtifactFiles, FileError> {
        let mut files = BTreeMap::new();
        for f in listed {
            let bytes = f.read_checked(dir)?;
            files.insert(f.path.clone(), Held { bytes: bytes.into(), sha256: f.sha256.clone() });
        }
        Ok(ArtifactFiles { dir: dir.to_path_buf(), files })
    }

    /// A bare artifact (no bundle manifest, run with --allow-unsigned): `artifact.json`, the
    /// files it lists with digests (an empty list is refused), and the text files present.
    pub fn read_bare(dir: &Path) -> Result<ArtifactFiles, FileError> {
        let mut out = ArtifactFiles { dir: dir.to_path_buf(), files: BTreeMap::new() };
        out.add_unlisted(ARTIFACT_FILE)?;
        let manifest = out.text(ARTIFACT_FILE)?;
        let bad = |e: serde_json::Error| (dir.join(ARTIFACT_FILE), format!("invalid manifest: {e}"));
        if ArtifactKind::from_format(&out.declared_format()?).is_some() {
            // Every kind lists its files with digests; an empty list checks nothing.
            #[derive(serde::Deserialize)]
            struct Listed {
                #[serde(default)]
                files: Vec<FileDigest>,
            }
            let listed: Listed = serde_json::from_str(manifest).map_err(bad)?;
            if listed.files.is_empty() {
                return Err((dir.join(ARTIFACT_FILE), "lists no files: nothing could be checked".into()));
            }
            let checked = ArtifactFiles::read_listed(dir, &listed.files)?;
            out.files.extend(checked.files);
        }
        for name in TEXT_FILES {
            if !out.files.contains_key(*name) && std::fs::symlink_metadata(dir.join(name)).is_ok() {
                out.add_unlisted(name)?;
            }
        }
        Ok(out)
    }

    fn add_unlisted(&mut self, rel: &str) -> Result<(), FileError> {
        if !self.files.contains_key(rel) {
            let bytes = read_regular(&self.dir, rel, None)?;
            let sha256 = sha256_hex(&bytes);
            self.files.insert(rel.to_string(), Held { bytes: bytes.into(), sha256 });
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path a file was read from (for messages; never to read it again).
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn get(&self, rel: &str) -> Option<&Arc<[u8]>> {
        self.files.get(rel).map(|h| &h.bytes)
    }

    /// The `format` its `artifact.json` declares (which executor reads it).
    pub fn declared_format(&self) -> Result<String, FileError> {
        let text = self.text(ARTIFACT_FILE)?;
        let format: ArtifactFormat =
            serde_json::from_str(text).map_err(|e| (self.path(ARTIFACT_FILE), format!("invalid manifest: {e}")))?;
        Ok(format.format)
    }

    /// A file the artifact needs; the error names it.
    pub fn bytes(&self, rel: &str) -> Result<&Arc<[u8]>, FileError> {
        self.get(rel).ok_or_else(|| (self.path(rel), "missing (not among the artifact's checked files)".into()))
    }

    pub fn text(&self, rel: &str) -> Result<&str, FileError> {
        std::str::from_utf8(self.bytes(rel)?).map_err(|_| (self.path(rel), "is not UTF-8 text".into()))
    }

    /// Every file listed here is held with this size and sha256 (an artifact's own list
    /// checked against the bytes the bundle's manifest verified; nothing is re-read).
    pub fn check_listed(&self, listed: &[FileDigest]) -> Result<(), FileError> {
        if listed.is_empty() {
            return Err((self.path(ARTIFACT_FILE), "lists no files: nothing could be checked".into()));
        }
        for f in listed {
            let held = self.bytes(&f.path)?;
            let sha = &self.files[&f.path].sha256;
            if held.len() as u64 != f.bytes || *sha != f.sha256 {
                return Err((self.path(&f.path), format!("differs from {}'s record (tampered?)", ARTIFACT_FILE)));
            }
        }
        Ok(())
    }

    /// (relative path, bytes), sorted by path.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.files.iter().map(|(k, h)| (k.as_str(), &h.bytes[..]))
    }

    /// Adds bytes read and checked elsewhere (the bundle's manifest and signature).
    pub fn insert_checked(&mut self, rel: &str, bytes: Vec<u8>) {
        let sha256 = sha256_hex(&bytes);
        self.files.insert(rel.to_string(), Held { bytes: bytes.into(), sha256 });
    }
}

/// A GPU kernel's WGSL file inside its artifact.
pub fn kernel_file(name: &str) -> String {
    format!("kernels/{name}.wgsl")
}

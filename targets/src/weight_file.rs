//! An artifact's weight file as an emitter writes it: in memory, or straight into the
//! artifact's directory. Compiling a multi-gigabyte model then never holds its weight file
//! beside the memory-mapped checkpoint (issue 18: the 4B class); the bytes are the same
//! either way.

use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

enum Sink {
    Memory(Vec<u8>),
    Disk { file: BufWriter<std::fs::File>, path: PathBuf },
}

/// Appends bytes (and patches a header written earlier). I/O errors are kept and
/// returned by `finish`, so emitters append without threading them through every call.
pub struct WeightFile {
    sink: Sink,
    len: u64,
    error: Option<std::io::Error>,
}

/// What a finished weight file is.
pub enum WeightContents {
    /// The bytes, for the caller to write (an in-memory file).
    Bytes(Vec<u8>),
    /// Already in place at this path.
    Written(PathBuf),
}

impl WeightFile {
    /// An in-memory file that may grow to `capacity` bytes without copying itself
    /// (reserved, not touched: only what is written becomes resident).
    pub fn in_memory(capacity: usize) -> WeightFile {
        WeightFile { sink: Sink::Memory(Vec::with_capacity(capacity)), len: 0, error: None }
    }

    /// A file created at `path` (its parent directories too).
    pub fn create(path: &Path) -> std::io::Result<WeightFile> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
        Ok(WeightFile { sink: Sink::Disk { file, path: path.to_path_buf() }, len: 0, error: None })
    }

    /// In `dir` at `rel` when a directory is given, else in memory.
    pub fn at(dir: Option<&Path>, rel: &str, capacity: usize) -> std::io::Result<WeightFile> {
        match dir {
            Some(dir) => WeightFile::create(&dir.join(rel)),
            None => Ok(WeightFile::in_memory(capacity)),
        }
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        match &mut self.sink {
            Sink::Memory(v) => v.extend_from_slice(bytes),
            Sink::Disk { file, .. } => {
                if self.error.is_none() {
                    if let Err(e) = file.write_all(bytes) {
                        self.error = Some(e);
                    }
                }
            }
        }
        self.len += bytes.len() as u64;
    }

    /// Zero bytes up to the next multiple of `align`.
    pub fn pad_to(&mut self, align: usize) {
        let pad = (align - self.len() % align) % align;
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut left = pad;
        while left > 0 {
            let n = left.min(ZEROS.len());
            self.extend_from_slice(&ZEROS[..n]);
            left -= n;
        }
    }

    /// Overwrites `bytes` at `at` (inside what was written: a header).
    pub fn patch(&mut self, at: u64, bytes: &[u8]) {
        assert!(at + bytes.len() as u64 <= self.len, "patching past the end of a weight file");
        match &mut self.sink {
            Sink::Memory(v) => v[at as usize..at as usize + bytes.len()].copy_from_slice(bytes),
            Sink::Disk { file, .. } => {
                let result = (|| {
                    file.seek(SeekFrom::Start(at))?;
                    file.write_all(bytes)?;
                    file.seek(SeekFrom::End(0)).map(|_| ())
                })();
                if let (Err(e), None) = (result, &self.error) {
                    self.error = Some(e);
                }
            }
        }
    }

    pub fn finish(self) -> std::io::Result<WeightContents> {
        if let Some(e) = self.error {
            return Err(e);
        }
        match self.sink {
            Sink::Memory(v) => Ok(WeightContents::Bytes(v)),
            Sink::Disk { file, path } => {
                file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                Ok(WeightContents::Written(path))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(w: &mut WeightFile) {
        w.extend_from_slice(&[0; 8]);
        w.extend_from_slice(b"abc");
        w.pad_to(16);
        w.extend_from_slice(b"tail");
        w.patch(0, &[7, 7]);
    }

    #[test]
    fn memory_and_disk_files_hold_the_same_bytes() {
        let mut m = WeightFile::in_memory(0);
        fill(&mut m);
        let Ok(WeightContents::Bytes(bytes)) = m.finish() else { panic!("in memory") };
        let dir = std::env::temp_dir().join(format!("slmc-weight-file-{}", std::process::id()));
        let mut d = WeightFile::create(&dir.join("sub/w.bin")).unwrap();
        fill(&mut d);
        assert_eq!(d.len(), 20);
        let Ok(WeightContents::Written(path)) = d.finish() else { panic!("on disk") };
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert_eq!(&bytes[..2], &[7, 7]);
        let _ = std::fs::remove_dir_all(dir);
    }
}

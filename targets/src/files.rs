//! Reading the files a manifest names, as untrusted input: the path stays inside its
//! directory, no component may be a symlink, and only a regular file is read (a FIFO or a
//! device is refused without blocking). The caller gets the bytes it checks and uses, so
//! nothing is read twice by path.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A refusal: the file and what is wrong with it.
pub type FileError = (PathBuf, String);

/// Whether a path named by a manifest stays inside its directory: relative, no `..`, no
/// empty component (so no leading or doubled `/`).
pub fn is_relative_inside(path: &str) -> bool {
    !Path::new(path).is_absolute() && !path.split('/').any(|c| c == ".." || c.is_empty())
}

/// Opens `dir/rel` without following a symlink at any component of `rel`; the last one is
/// opened non-blocking, so a FIFO does not hang. `dir` itself is the caller's choice.
#[cfg(unix)]
fn open_inside(dir: &Path, rel: &str) -> std::io::Result<File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut at = File::open(dir)?;
    let parts: Vec<&str> = rel.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let name = std::ffi::CString::new(*part).map_err(|_| std::io::Error::other("a NUL byte in the name"))?;
        let mode = if last { libc::O_NONBLOCK } else { libc::O_DIRECTORY };
        let flags = libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW | mode;
        // SAFETY: `at` is an open directory and `name` a NUL-terminated string; the new
        // descriptor is owned by the File made from it.
        let fd = unsafe { libc::openat(at.as_raw_fd(), name.as_ptr(), flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        at = unsafe { File::from_raw_fd(fd) };
    }
    Ok(at)
}

#[cfg(not(unix))]
fn open_inside(dir: &Path, rel: &str) -> std::io::Result<File> {
    for (i, _) in rel.match_indices('/').chain([(rel.len(), "")]) {
        if std::fs::symlink_metadata(dir.join(&rel[..i]))?.file_type().is_symlink() {
            return Err(std::io::Error::other("a symlink"));
        }
    }
    File::open(dir.join(rel))
}

/// Reads the regular file `dir/rel` once. `expected_len`: the size a manifest records; a
/// file of another size is refused before anything is read (so no allocation is sized by
/// the manifest, and none by a file that disagrees with it).
pub fn read_regular(dir: &Path, rel: &str, expected_len: Option<u64>) -> Result<Vec<u8>, FileError> {
    let path = dir.join(rel);
    if !is_relative_inside(rel) {
        return Err((path, "lies outside the artifact directory (refused)".into()));
    }
    let mut file = open_inside(dir, rel).map_err(|e| {
        // ELOOP is what O_NOFOLLOW answers for a symlink; ENOTDIR for one in the middle.
        let message = match e.raw_os_error() {
            #[cfg(unix)]
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
                "is (or lies under) a symlink or not a regular file: refused".to_string()
            }
            _ => format!("cannot read: {e}"),
        };
        (path.clone(), message)
    })?;
    let meta = file.metadata().map_err(|e| (path.clone(), format!("cannot read: {e}")))?;
    if !meta.file_type().is_file() {
        return Err((path, "is not a regular file (symlinks and special files are refused)".into()));
    }
    let len = meta.len();
    if let Some(want) = expected_len.filter(|want| *want != len) {
        return Err((path, format!("{len} bytes, the manifest says {want} (truncated or replaced)")));
    }
    let size = usize::try_from(len).map_err(|_| (path.clone(), format!("{len} bytes do not fit in memory")))?;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(size).map_err(|_| (path.clone(), format!("cannot hold {len} bytes in memory")))?;
    // One byte more than stated, to notice a file that grew since it was measured.
    file.by_ref().take(len + 1).read_to_end(&mut bytes).map_err(|e| (path.clone(), format!("cannot read: {e}")))?;
    if bytes.len() as u64 != len {
        return Err((path, format!("changed while being read ({len} bytes, then {})", bytes.len())));
    }
    Ok(bytes)
}

/// Reads `dir/rel` as UTF-8 text, like [`read_regular`].
pub fn read_regular_text(dir: &Path, rel: &str) -> Result<String, FileError> {
    let bytes = read_regular(dir, rel, None)?;
    String::from_utf8(bytes).map_err(|_| (dir.join(rel), "is not UTF-8 text".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_symlinks_fifos_and_escapes() {
        let dir = std::env::temp_dir().join(format!("slmc-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/a"), b"abc").unwrap();
        assert_eq!(read_regular(&dir, "sub/a", Some(3)).unwrap(), b"abc");
        let e = read_regular(&dir, "sub/a", Some(4)).unwrap_err();
        assert!(e.1.contains("the manifest says 4"), "{e:?}");
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("a", dir.join("sub/link")).unwrap();
            std::os::unix::fs::symlink("sub", dir.join("dirlink")).unwrap();
            for rel in ["sub/link", "dirlink/a"] {
                let e = read_regular(&dir, rel, None).unwrap_err();
                assert!(e.1.contains("symlink"), "{rel}: {e:?}");
            }
            let fifo = std::ffi::CString::new(dir.join("fifo").to_str().unwrap()).unwrap();
            assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
            let e = read_regular(&dir, "fifo", None).unwrap_err();
            assert!(e.1.contains("not a regular file"), "{e:?}");
        }
        for rel in ["../x", "/etc/passwd", "sub//a"] {
            assert!(read_regular(&dir, rel, None).unwrap_err().1.contains("outside the artifact"), "{rel}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

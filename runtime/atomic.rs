//! Atomic file writes: everything the program writes goes to a temporary file beside the target
//! and is renamed over it only once complete, so a crash or a full disk never leaves half a file.
//! The temporary files being written are registered, so that an interrupted process (Ctrl-C,
//! SIGTERM) can remove them before it exits ([`remove_pending`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// Temporary files being written now.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes every temporary file still being written, for a process about to exit on a
/// signal; returns how many it removed. Their writers then fail to rename them, so no target
/// is touched.
pub fn remove_pending() -> usize {
    let pending = std::mem::take(&mut *PENDING.lock().unwrap_or_else(PoisonError::into_inner));
    pending
        .iter()
        .filter(|p| std::fs::remove_file(p).is_ok())
        .count()
}

/// Keeps a temporary file's path among those [`remove_pending`] removes, while it lives.
pub struct Pending(PathBuf);

/// A new temporary file beside `target`, registered for [`remove_pending`] under the same lock
/// that removal takes, so that no signal can find it created but not yet registered.
pub fn pending_tempfile(target: &Path) -> std::io::Result<(tempfile::NamedTempFile, Pending)> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut pending = PENDING.lock().unwrap_or_else(PoisonError::into_inner);
    let tmp = tempfile::Builder::new()
        .prefix(".wae-edge-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    pending.push(tmp.path().to_path_buf());
    let guard = Pending(tmp.path().to_path_buf());
    Ok((tmp, guard))
}

impl Drop for Pending {
    fn drop(&mut self) {
        PENDING
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|p| *p != self.0);
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_with(path, |w| w.write_all(bytes))
}

/// Encodes `img` as PNG and writes it atomically.
pub fn write_png(path: &Path, img: &image::DynamicImage) -> std::io::Result<()> {
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(std::io::Error::other)?;
    write(path, &png)
}

/// Lets `fill` write into a temporary file, then flushes, syncs and renames it to `path`.
/// On any error the temporary file is removed and `path` is untouched.
pub fn write_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let (mut tmp, _pending) = pending_tempfile(path)?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        fill(&mut w)?;
        w.flush()?;
    }
    // tempfile creates 0600; a model or a picture is an ordinary readable file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        std::fs::write(&target, b"old").unwrap();
        let err = write_with(&target, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("injected"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        write(&target, b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
    }
}

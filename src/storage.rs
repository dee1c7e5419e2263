//! Backup destinations on the local file system, written atomically.
//!
//! An archive is written to a hidden temporary name in its final directory
//! (`.<name>.<pid>.tmp`), fsynced, renamed into place and the directory fsynced; its
//! manifest follows the same way, last. So a crash leaves either nothing, a temporary
//! file, or an archive without a manifest — and [`Destination::cleanup`] removes both
//! of the latter. A partial file is deleted as soon as a write fails, so a full disk
//! gets its space back.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Suffixes of the files a backup consists of.
pub const ARCHIVE_SUFFIX: &str = ".dbk";
pub const MANIFEST_SUFFIX: &str = ".manifest.json";
const TMP_SUFFIX: &str = ".tmp";

/// `<destination>/<database>/`.
#[derive(Debug, Clone)]
pub struct Destination {
    dir: PathBuf,
}

/// A file being written; removed on drop unless committed.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl TempFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Write for TempFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(io::Error::other("temporary file already committed")),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Destination {
    pub fn new(destination: &Path, database: &str) -> Self {
        Destination {
            dir: destination.join(database),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory (mode 0700) if needed.
    pub fn ensure(&self) -> io::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Opens a new temporary file that will become `name`.
    pub fn create_temp(&self, name: &str) -> io::Result<TempFile> {
        let path = self
            .dir
            .join(format!(".{name}.{}{TMP_SUFFIX}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(TempFile {
            path,
            file: Some(file),
        })
    }

    /// Makes the temporary file durable under its final `name`. Never replaces an
    /// existing file.
    pub fn commit(&self, mut tmp: TempFile, name: &str) -> io::Result<PathBuf> {
        let target = self.dir.join(name);
        let file = tmp
            .file
            .take()
            .ok_or_else(|| io::Error::other("already committed"))?;
        let result = (|| {
            file.sync_all()?;
            drop(file);
            if target.exists() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} already exists", target.display()),
                ));
            }
            fs::rename(&tmp.path, &target)?;
            sync_dir(&self.dir)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp.path);
        }
        result.map(|()| target)
    }

    /// Writes `bytes` to `name` atomically (replacing it if present).
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let mut tmp = self.create_temp(name)?;
        tmp.write_all(bytes)?;
        let file = tmp
            .file
            .take()
            .ok_or_else(|| io::Error::other("already committed"))?;
        let result = file
            .sync_all()
            .and_then(|()| fs::rename(&tmp.path, self.dir.join(name)))
            .and_then(|()| sync_dir(&self.dir));
        if result.is_err() {
            let _ = fs::remove_file(&tmp.path);
        }
        result
    }

    /// Deletes a backup: the manifest first, so that a crash in between leaves an
    /// archive without a manifest, which cleanup removes.
    /// `id` must be a bare name: anything that could leave the folder is refused.
    pub fn remove_backup(&self, id: &str) -> io::Result<()> {
        if id.is_empty() || id.starts_with('.') || id.contains(['/', '\\', '\0']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("refusing to delete \"{id}\": not a backup id"),
            ));
        }
        remove_if_exists(&self.dir.join(format!("{id}{MANIFEST_SUFFIX}")))?;
        remove_if_exists(&self.dir.join(format!("{id}{ARCHIVE_SUFFIX}")))?;
        sync_dir(&self.dir)
    }

    /// Removes what interrupted writes left behind: temporary files of processes that
    /// are gone, and archives without a manifest. Returns the removed file names.
    pub fn cleanup(&self) -> io::Result<Vec<String>> {
        let mut removed = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let stale = if let Some(rest) = name.strip_suffix(TMP_SUFFIX) {
                // `.<final name>.<pid>.tmp`: only a dead writer's file is stale.
                let pid = rest
                    .rsplit_once('.')
                    .and_then(|(_, p)| p.parse::<u32>().ok());
                pid.is_none_or(|p| !Path::new(&format!("/proc/{p}")).exists())
            } else if let Some(id) = name.strip_suffix(ARCHIVE_SUFFIX) {
                !self.dir.join(format!("{id}{MANIFEST_SUFFIX}")).exists()
            } else {
                false
            };
            if stale {
                remove_if_exists(&self.dir.join(&name))?;
                removed.push(name);
            }
        }
        if !removed.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes a rename in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_is_atomic_and_never_overwrites() {
        let root = tempfile::tempdir().unwrap();
        let dest = Destination::new(root.path(), "app");
        dest.ensure().unwrap();
        let mut tmp = dest.create_temp("a.dbk").unwrap();
        tmp.write_all(b"data").unwrap();
        assert!(!dest.path("a.dbk").exists());
        dest.commit(tmp, "a.dbk").unwrap();
        assert_eq!(fs::read(dest.path("a.dbk")).unwrap(), b"data");
        let mut again = dest.create_temp("a.dbk").unwrap();
        again.write_all(b"other").unwrap();
        let tmp_path = again.path().to_owned();
        assert!(dest.commit(again, "a.dbk").is_err());
        assert_eq!(fs::read(dest.path("a.dbk")).unwrap(), b"data");
        assert!(
            !tmp_path.exists(),
            "failed commit removes its temporary file"
        );
    }

    #[test]
    fn dropped_temp_files_disappear() {
        let root = tempfile::tempdir().unwrap();
        let dest = Destination::new(root.path(), "app");
        dest.ensure().unwrap();
        let path = {
            let mut tmp = dest.create_temp("b.dbk").unwrap();
            tmp.write_all(b"partial").unwrap();
            tmp.path().to_owned()
        };
        assert!(!path.exists());
    }

    #[test]
    fn cleanup_removes_leftovers_only() {
        let root = tempfile::tempdir().unwrap();
        let dest = Destination::new(root.path(), "app");
        dest.ensure().unwrap();
        for name in [
            "good.dbk",
            "good.manifest.json",
            "orphan.dbk",
            ".dead.dbk.999999999.tmp",
            ".odd.tmp",
            "notes.txt",
        ] {
            fs::write(dest.path(name), b"x").unwrap();
        }
        let live = dest.create_temp("live.dbk").unwrap();
        let mut removed = dest.cleanup().unwrap();
        removed.sort();
        assert_eq!(
            removed,
            vec![".dead.dbk.999999999.tmp", ".odd.tmp", "orphan.dbk"]
        );
        assert!(live.path().exists(), "a running writer's file stays");
        assert!(dest.path("good.dbk").exists() && dest.path("notes.txt").exists());
    }
}

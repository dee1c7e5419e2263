//! The local directory as a [`Storage`]: backup destinations on the local file
//! system, written atomically.
//!
//! An archive is written to a hidden temporary name in its final directory
//! (`.<name>.<random>.tmp`, mode 0600), fsynced, renamed into place and the directory
//! fsynced; its manifest follows the same way, last. So a crash leaves either
//! nothing, a temporary file, or an archive without a manifest — and
//! [`Storage::clean_uploads`] removes the former, the catalog's clean-up
//! (`catalog::clean`) the latter. A partial file is deleted as soon as a write fails,
//! so a full disk gets its space back. Reads go through one open file handle
//! ([`LocalObject`]), read by position, so a check and the use after it read the
//! same file even if the name is replaced meanwhile.
//!
//! Whether a temporary file's writer is still alive is told by an advisory lock
//! (`flock`) the writer holds on it, never by a PID: PIDs repeat across containers
//! and restarts (they are always 1 in a container). The scratch folder
//! (`<state-dir>/tmp`, plaintext SQLite copies) works the same way with one lock file
//! per process: see [`scratch_file`] and [`clean_scratch`]. Those scratch helpers are
//! here because they are the same file-system craft, not because they are storage:
//! the state directory is always local, whatever backend holds the backups.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Object, Publishing, Reader, Storage, Upload, Version};

/// Suffixes of the files a backup consists of.
pub const ARCHIVE_SUFFIX: &str = ".dbk";
pub const MANIFEST_SUFFIX: &str = ".manifest.json";
const TMP_SUFFIX: &str = ".tmp";

/// Opens `path` for reading only if it is a regular file, without following a
/// symbolic link and without blocking: a FIFO or device planted in a backup folder
/// would otherwise hang or feed endless data to whoever reads it.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(io::ErrorKind::InvalidInput, "it is a symbolic link")
            } else {
                e
            }
        })?;
    if !file.metadata()?.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is not a regular file",
        ));
    }
    Ok(file)
}

/// `<destination>/<database>/` (or a retention rule's folder below it).
#[derive(Debug, Clone)]
pub struct Destination {
    dir: PathBuf,
}

/// A file being written to a hidden temporary name in its final folder, locked for
/// as long as it is being written; removed on drop unless published.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    /// The name it is published under, in `dir`.
    target: PathBuf,
    dir: PathBuf,
    file: Option<File>,
    /// Made by [`Storage::put_replacing`]: published over an existing file.
    replacing: bool,
}

impl TempFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs the file and hands it over (still locked); afterwards the temporary
    /// file is the caller's to rename or remove.
    fn finish(&mut self) -> io::Result<File> {
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("temporary file already committed"))?;
        file.sync_all()?;
        Ok(file)
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

impl Upload for TempFile {
    /// The temporary file itself, opened again for reading: it is this process's
    /// (mode 0600, locked), and the handle stays valid across the rename.
    fn written(&mut self) -> io::Result<Box<dyn Object>> {
        self.flush()?;
        // As an object store, which completes the upload under its name here.
        if !self.replacing && fs::symlink_metadata(&self.target).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists", self.target.display()),
            ));
        }
        let file = open_regular(&self.path)?;
        Ok(Box::new(LocalObject::from_file(file, self.target.clone())?))
    }

    /// The guard is the file itself, still locked: the lock moves with the rename.
    fn publish(mut self: Box<Self>) -> io::Result<Publishing> {
        let result = self.finish().and_then(|file| {
            if self.replacing {
                fs::rename(&self.path, &self.target)?;
            } else {
                rename_new(&self.path, &self.target)?;
            }
            sync_dir(&self.dir)?;
            Ok(Box::new(file) as Publishing)
        });
        if result.is_err() {
            let _ = fs::remove_file(&self.path);
        }
        result
    }
}

/// Renames `from` to `to` only if `to` does not exist, in one step: two writers
/// publishing the same name at once (two runs reserving one backup id) cannot both
/// succeed, which a check followed by a rename would allow. Where the file system
/// has no `RENAME_NOREPLACE`, a hard link (which never replaces either) and the
/// removal of `from` do the same; where it has neither, the check and rename.
fn rename_new(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    use rustix::io::Errno;
    let exists = || {
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} already exists", to.display()),
        )
    };
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => return Ok(()),
        Err(Errno::EXIST) => return Err(exists()),
        Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {}
        Err(e) => return Err(e.into()),
    }
    match fs::hard_link(from, to) {
        Ok(()) => return fs::remove_file(from),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(exists()),
        Err(e) if e.raw_os_error() == Some(Errno::PERM.raw_os_error()) => {}
        Err(e) if e.raw_os_error() == Some(Errno::OPNOTSUPP.raw_os_error()) => {}
        Err(e) => return Err(e),
    }
    if fs::symlink_metadata(to).is_ok() {
        return Err(exists());
    }
    fs::rename(from, to)
}

/// A regular file open for reading, read by position so that every reader of one
/// handle is independent of the others (a shared file offset would not be).
#[derive(Debug)]
pub struct LocalObject {
    file: Arc<File>,
    location: PathBuf,
    version: Version,
    size: u64,
}

impl LocalObject {
    /// Wraps a file already open (by [`open_regular`], or a file the operator named,
    /// as `decrypt` takes); `location` is for messages.
    pub fn from_file(file: File, location: PathBuf) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        let version = Version(format!(
            "{}:{}:{}:{}:{}",
            m.dev(),
            m.ino(),
            m.size(),
            ns(m.mtime(), m.mtime_nsec()),
            ns(m.ctime(), m.ctime_nsec())
        ));
        Ok(LocalObject {
            file: Arc::new(file),
            location,
            version,
            size: m.size(),
        })
    }
}

impl Object for LocalObject {
    fn location(&self) -> &Path {
        &self.location
    }

    fn version(&self) -> &Version {
        &self.version
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, range: Option<Range<u64>>) -> io::Result<Reader> {
        let range = range.unwrap_or(0..u64::MAX);
        Ok(Box::new(PositionalReader {
            file: self.file.clone(),
            at: range.start,
            end: range.end.max(range.start),
        }))
    }
}

/// Reads `at..end` of a shared file with `pread`, leaving its offset alone.
struct PositionalReader {
    file: Arc<File>,
    at: u64,
    end: u64,
}

impl Read for PositionalReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let left = usize::try_from(self.end - self.at).unwrap_or(usize::MAX);
        let want = buf.len().min(left);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.at)?;
        self.at += n as u64;
        Ok(n)
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

    /// Refuses a database folder that is a symbolic link (or anything but a
    /// directory): whoever can write to the destination could otherwise point
    /// `<destination>/<database>` at another folder and have dbkeeper clean up, write
    /// and rotate there. A folder that does not exist yet is fine.
    pub fn real_dir(&self) -> io::Result<()> {
        match fs::symlink_metadata(&self.dir) {
            Ok(m) if m.file_type().is_dir() => Ok(()),
            Ok(m) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is {}, not a directory; dbkeeper never follows it (remove it, or make it a real folder)",
                    self.dir.display(),
                    if m.file_type().is_symlink() { "a symbolic link" } else { "not a folder" }
                ),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Opens a new temporary file that will become `name`, locked for as long as it
    /// is being written.
    fn create_temp(&self, name: &str) -> io::Result<TempFile> {
        use std::os::unix::fs::MetadataExt;
        self.real_dir()?;
        // Between creating the file and locking it, another process's
        // `clean_uploads` can take it for a dead upload and remove it (or hold its
        // lock for a moment while it looks): then the write would go to an unlinked
        // file and its publish fail. So the file is ours only once it is locked and
        // still the one at its path; otherwise another name is tried.
        let mut last = None;
        for _ in 0..8 {
            let path = self.dir.join(format!(
                ".{name}.{:016x}{TMP_SUFFIX}",
                rand::random::<u64>()
            ));
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            if let Err(e) = lock(&file) {
                let _ = fs::remove_file(&path);
                last = Some(e);
                continue;
            }
            let (ours, there) = (file.metadata()?, fs::symlink_metadata(&path));
            match there {
                Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => {
                    return Ok(TempFile {
                        path,
                        target: self.dir.join(name),
                        dir: self.dir.clone(),
                        file: Some(file),
                        replacing: false,
                    })
                }
                _ => {
                    last = Some(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{} was removed as it was created", path.display()),
                    ))
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("cannot create a temporary file")))
    }

    /// The names in the folder, or none when it does not exist yet.
    fn entries(&self) -> io::Result<Vec<String>> {
        self.real_dir()?;
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for entry in entries {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }
}

/// A name that stays inside the folder: no separator, not hidden (temporary files
/// and leases are), not empty.
pub fn bare(name: &str) -> io::Result<&str> {
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("\"{name}\" is not an object name"),
        ));
    }
    Ok(name)
}

impl Storage for Destination {
    fn location(&self) -> PathBuf {
        self.dir.clone()
    }

    /// Creates the folder (mode 0700) if needed.
    fn prepare(&self) -> io::Result<()> {
        self.real_dir()?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        self.real_dir()
    }

    fn free_bytes(&self) -> io::Result<Option<u64>> {
        let st = rustix::fs::statvfs(&self.dir)?;
        Ok(Some(st.f_bavail.saturating_mul(st.f_frsize)))
    }

    fn put(&self, name: &str) -> io::Result<Box<dyn Upload>> {
        Ok(Box::new(self.create_temp(bare(name)?)?))
    }

    fn put_replacing(&self, name: &str) -> io::Result<Box<dyn Upload>> {
        let mut tmp = self.create_temp(bare(name)?)?;
        tmp.replacing = true;
        Ok(Box::new(tmp))
    }

    fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let mut tmp = self.create_temp(bare(name)?)?;
        tmp.write_all(bytes)?;
        let result = tmp
            .finish()
            .and_then(|_| fs::rename(&tmp.path, &tmp.target))
            .and_then(|()| sync_dir(&self.dir));
        if result.is_err() {
            let _ = fs::remove_file(&tmp.path);
        }
        result
    }

    /// A regular file only, opened without following links or blocking (see
    /// [`open_regular`]).
    fn open(&self, name: &str) -> io::Result<Box<dyn Object>> {
        let path = self.path(bare(name)?);
        self.real_dir()?;
        let file = open_regular(&path)?;
        Ok(Box::new(LocalObject::from_file(file, path)?))
    }

    /// Every entry but the hidden ones (temporary files): links, FIFOs and folders
    /// planted in the folder are listed, and refused by [`Storage::open`].
    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|name| name.starts_with(prefix) && !name.starts_with('.'))
            .collect())
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        let path = self.path(bare(name)?);
        self.real_dir()?;
        remove_if_exists(&path)?;
        sync_dir(&self.dir)
    }

    /// Locally, the writer's lock on the file (see [`Upload::publish`]).
    fn in_use(&self, name: &str) -> io::Result<bool> {
        held(&self.path(bare(name)?))
    }

    /// Temporary files no live writer holds locked: whether a writer is alive is
    /// told by its lock, never by a PID.
    fn clean_uploads(&self) -> io::Result<Vec<String>> {
        let mut removed = Vec::new();
        for name in self.entries()? {
            // Only a file nobody holds locked is stale.
            if name.ends_with(TMP_SUFFIX) && !held(&self.dir.join(&name))? {
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

/// Takes the exclusive advisory lock on `file`, or fails if someone holds it.
fn lock(file: &File) -> io::Result<()> {
    file.try_lock().map_err(|e| match e {
        fs::TryLockError::WouldBlock => io::Error::new(
            io::ErrorKind::WouldBlock,
            "the file is locked by another process",
        ),
        fs::TryLockError::Error(e) => e,
    })
}

/// True when a live process holds the lock on `path`. A gone file is not held, nor
/// is anything but a regular file (a link or FIFO planted under one of our names is
/// never followed or waited on: see [`open_regular`]).
pub fn held(path: &Path) -> io::Result<bool> {
    let file = match open_regular(path) {
        Ok(f) => f,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::InvalidInput
            ) =>
        {
            return Ok(false)
        }
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        // Released when `file` is dropped.
        Ok(()) => Ok(false),
        Err(fs::TryLockError::WouldBlock) => Ok(true),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Creates `dir` (and missing parents) with mode 0700; an existing one is left as
/// it is (systemd's `StateDirectory=` sets its own).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Plaintext goes only into a scratch folder nobody else can enter or rearrange: it
/// must be a real folder owned by this process's user, and so must its parent (the
/// state directory), neither writable by others. A folder of ours with a looser mode
/// (made by hand, or by an older version) is tightened to 0700; one that belongs to
/// someone else, or sits in a folder others can write, is refused, since its owner
/// could swap a scratch copy for their own file between two steps of a backup.
fn check_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // /proc/self belongs to the process's effective user.
    let me = fs::metadata("/proc/self").map(|m| m.uid()).ok();
    let refuse = |what: &Path, why: &str| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} {why}; plaintext scratch copies need a folder only dbkeeper's user can write \
                 (remove it, or fix its owner and mode: chown to this user, chmod 0700)",
                what.display()
            ),
        )
    };
    let meta = fs::symlink_metadata(dir)?;
    if !meta.file_type().is_dir() {
        return Err(refuse(dir, "is not a folder (a symbolic link?)"));
    }
    if me.is_some_and(|me| meta.uid() != me) {
        return Err(refuse(dir, "belongs to another user"));
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), "scratch folder had mode {:o}; setting 0700", meta.mode() & 0o7777);
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        let meta = fs::metadata(parent)?;
        if me.is_some_and(|me| meta.uid() != me && meta.uid() != 0) {
            return Err(refuse(parent, "belongs to another user"));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(refuse(parent, "can be written by other users"));
        }
    }
    Ok(())
}

const OWNER_PREFIX: &str = ".owner-";
const OWNER_SUFFIX: &str = ".lock";

/// This process's scratch token and the locked owner files it holds (one per scratch
/// folder), kept for the life of the process.
static SCRATCH_OWNER: std::sync::OnceLock<(String, std::sync::Mutex<Vec<OwnerFile>>)> =
    std::sync::OnceLock::new();
/// A scratch folder and this process's locked owner file in it.
type OwnerFile = (PathBuf, File);
static SCRATCH_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A new, empty file `<dir>/<prefix>-<token>-<n><ext>` (mode 0600, `dir` created 0700)
/// that [`clean_scratch`] leaves alone while this process lives. The caller removes it.
pub fn scratch_file(dir: &Path, prefix: &str, ext: &str) -> io::Result<PathBuf> {
    let path = scratch_name(dir, prefix, ext)?;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    Ok(path)
}

/// A new, empty directory `<dir>/<prefix>-<token>-<n>` (mode 0700), owned like
/// [`scratch_file`]'s files: [`clean_scratch`] removes it with its contents once no
/// live process owns it. The caller removes it.
pub fn scratch_dir(dir: &Path, prefix: &str) -> io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let path = scratch_name(dir, prefix, "")?;
    fs::DirBuilder::new().mode(0o700).create(&path)?;
    Ok(path)
}

/// A fresh name in the scratch folder `dir` under this process's token, after making
/// sure this process holds its owner file there.
fn scratch_name(dir: &Path, prefix: &str, ext: &str) -> io::Result<PathBuf> {
    let (token, held) = SCRATCH_OWNER.get_or_init(|| {
        (
            format!("{:016x}", rand::random::<u64>()),
            std::sync::Mutex::new(Vec::new()),
        )
    });
    {
        let mut held = held
            .lock()
            .map_err(|_| io::Error::other("scratch owner lock poisoned"))?;
        if !held.iter().any(|(d, _)| d == dir) {
            create_private_dir(dir)?;
            check_private_dir(dir)?;
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(dir.join(format!("{OWNER_PREFIX}{token}{OWNER_SUFFIX}")))?;
            lock(&file)?;
            held.push((dir.to_owned(), file));
        }
    }
    let n = SCRATCH_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(dir.join(format!("{prefix}-{token}-{n}{ext}")))
}

/// Removes every file and folder in the scratch folder `dir` that no live process owns (its
/// token's owner file is not locked), whatever its name or age: the plaintext copies
/// of a crashed run never survive the next start. Returns the removed names, except
/// for the empty owner files every exited process leaves.
pub fn clean_scratch(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                let kind = entry.file_type()?;
                if kind.is_file() || kind.is_dir() {
                    names.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(names),
        Err(e) => return Err(e),
    }
    let mut live = Vec::new();
    for name in &names {
        if let Some(token) = name
            .strip_prefix(OWNER_PREFIX)
            .and_then(|n| n.strip_suffix(OWNER_SUFFIX))
        {
            if held(&dir.join(name))? {
                live.push(token.to_owned());
            }
        }
    }
    let mut removed = Vec::new();
    for name in names {
        if live.iter().any(|token| name.contains(token.as_str())) {
            continue;
        }
        remove_if_exists(&dir.join(&name))?;
        // Every process that used the folder leaves its (empty) owner file when it
        // exits: nothing a crash left behind, so not worth a warning.
        if !name.starts_with(OWNER_PREFIX) {
            removed.push(name);
        }
    }
    Ok(removed)
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    let removed = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match removed {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes a rename in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes a scratch file when dropped.
pub struct Scratch(pub PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A prepared, empty `<temporary folder>/app` (the folder goes with the guard).
#[cfg(test)]
pub(crate) fn in_temp_dir() -> (tempfile::TempDir, Destination) {
    let root = tempfile::tempdir().expect("temporary folder");
    let dest = Destination::new(root.path(), "app");
    dest.prepare().expect("prepare");
    (root, dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_is_atomic_and_never_overwrites() {
        let (_root, dest) = in_temp_dir();
        let mut tmp = dest.create_temp("a.dbk").unwrap();
        tmp.write_all(b"data").unwrap();
        assert!(!dest.path("a.dbk").exists());
        Box::new(tmp).publish().unwrap();
        assert_eq!(fs::read(dest.path("a.dbk")).unwrap(), b"data");
        let mut again = dest.create_temp("a.dbk").unwrap();
        again.write_all(b"other").unwrap();
        let tmp_path = again.path().to_owned();
        assert!(Box::new(again).publish().is_err());
        assert_eq!(fs::read(dest.path("a.dbk")).unwrap(), b"data");
        assert!(
            !tmp_path.exists(),
            "failed commit removes its temporary file"
        );
    }

    #[test]
    fn put_replacing_replaces_only_when_published() {
        let (_root, dest) = in_temp_dir();
        dest.replace("a.dbk", b"old").unwrap();
        {
            let mut up = dest.put_replacing("a.dbk").unwrap();
            up.write_all(b"abandoned").unwrap();
            let written = up.written().unwrap();
            assert_eq!(written.size(), 9);
        }
        assert_eq!(fs::read(dest.path("a.dbk")).unwrap(), b"old");
        assert!(dest.clean_uploads().unwrap().is_empty(), "no leftovers");
        let mut up = dest.put_replacing("a.dbk").unwrap();
        up.write_all(b"new bytes").unwrap();
        let written = up.written().unwrap();
        assert_eq!(fs::read(dest.path("a.dbk")).unwrap(), b"old");
        let _guard = up.publish().unwrap();
        assert_eq!(fs::read(dest.path("a.dbk")).unwrap(), b"new bytes");
        let mut back = Vec::new();
        written.read(None).unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(
            back, b"new bytes",
            "the written handle reads what was published"
        );
        let mut fresh = dest.put_replacing("b.dbk").unwrap();
        fresh.write_all(b"b").unwrap();
        fresh.publish().unwrap();
        assert_eq!(fs::read(dest.path("b.dbk")).unwrap(), b"b");
    }

    #[test]
    fn dropped_temp_files_disappear() {
        let (_root, dest) = in_temp_dir();
        let path = {
            let mut tmp = dest.create_temp("b.dbk").unwrap();
            tmp.write_all(b"partial").unwrap();
            tmp.path().to_owned()
        };
        assert!(!path.exists());
    }

    #[test]
    fn clean_uploads_removes_leftovers_only() {
        let (_root, dest) = in_temp_dir();
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
        // PID 1 always exists: a PID says nothing about a writer being alive.
        fs::write(dest.path(".pid-one.dbk.1.tmp"), b"x").unwrap();
        let live = dest.create_temp("live.dbk").unwrap();
        let mut removed = dest.clean_uploads().unwrap();
        removed.sort();
        assert_eq!(
            removed,
            vec![".dead.dbk.999999999.tmp", ".odd.tmp", ".pid-one.dbk.1.tmp"]
        );
        assert!(live.path().exists(), "a running writer's file stays");
        assert!(dest.path("good.dbk").exists() && dest.path("notes.txt").exists());
        // Archives without a manifest are the catalog's to judge (`catalog::clean`).
        assert!(dest.path("orphan.dbk").exists());
    }

    #[test]
    fn scratch_files_are_private_and_cleaned_unless_their_owner_lives() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state/tmp");
        let mine = scratch_file(&dir, "verify", ".sqlite").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&mine), 0o600);
        for stale in ["backup-app-1.sqlite", "verify-1.sqlite", ".owner-dead.lock"] {
            fs::write(dir.join(stale), b"x").unwrap();
        }
        let mut removed = clean_scratch(&dir).unwrap();
        removed.sort();
        assert_eq!(removed, ["backup-app-1.sqlite", "verify-1.sqlite"]);
        assert!(!dir.join(".owner-dead.lock").exists());
        assert!(mine.exists(), "a live process's scratch file stays");
    }

    #[test]
    fn the_local_directory_is_a_storage() {
        use std::io::Read;
        let (_root, dest) = in_temp_dir();
        let mut up = dest.put("a.dbk").unwrap();
        up.write_all(b"0123456789").unwrap();
        assert!(
            dest.list("").unwrap().is_empty(),
            "unpublished uploads are not listed"
        );
        let written = up.written().unwrap();
        up.publish().unwrap();
        let again = dest.put("a.dbk").unwrap();
        assert!(again.publish().is_err(), "never replaces");
        dest.replace("a.manifest.json", b"{}").unwrap();
        let mut names = dest.list("a.").unwrap();
        names.sort();
        assert_eq!(names, ["a.dbk", "a.manifest.json"]);
        let mut part = String::new();
        dest.get("a.dbk", Some(2..5))
            .unwrap()
            .read_to_string(&mut part)
            .unwrap();
        assert_eq!(part, "234");
        assert!(dest.get("../app/a.dbk", None).is_err());
        let opened = dest.open("a.dbk").unwrap();
        assert_eq!(opened.size(), 10);
        let read = |o: &dyn Object| {
            let mut all = Vec::new();
            o.read(None).unwrap().read_to_end(&mut all).unwrap();
            all
        };
        assert_eq!(read(&*written), read(&*opened), "the upload, published");
        dest.delete("a.dbk").unwrap();
        dest.delete("a.dbk").unwrap();
        assert_eq!(dest.list("").unwrap(), ["a.manifest.json"]);
        // One handle reads the version it opened, whatever happens to the name.
        let mut all = String::new();
        opened.read(None).unwrap().read_to_string(&mut all).unwrap();
        assert_eq!(all, "0123456789");
    }

    #[test]
    fn planted_links_and_fifos_are_listed_but_never_opened() {
        let (root, dest) = in_temp_dir();
        fs::write(root.path().join("elsewhere"), b"x").unwrap();
        std::os::unix::fs::symlink(root.path().join("elsewhere"), dest.path("l.dbk")).unwrap();
        assert!(std::process::Command::new("mkfifo")
            .arg(dest.path("f.dbk"))
            .status()
            .expect("mkfifo")
            .success());
        let mut names = dest.list("").unwrap();
        names.sort();
        assert_eq!(names, ["f.dbk", "l.dbk"]);
        for name in names {
            let refused = dest.open(&name).err().map(|e| e.kind());
            assert_eq!(refused, Some(io::ErrorKind::InvalidInput), "{name}");
        }
    }
}

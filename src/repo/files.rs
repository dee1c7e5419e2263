//! Files-set backups (`[[files]]`) on the reading side: checking and extracting the
//! tar an archive holds, and `restore --to DIR`.
//!
//! The tar is parsed as it is decrypted (a worker thread reads it from a bounded
//! pipe fed by the archive reader, so memory stays bounded). Every entry is checked
//! whether it is extracted or only read (`verify`): only regular files, directories
//! and symbolic links are accepted, and a path must stay inside the target: an
//! absolute path, a `..` component, or a path through a symbolic link extracted
//! earlier is refused, which fails the whole read (a verification failure: exit 3).
//!
//! `restore --to DIR` never writes into DIR itself: the tree is extracted into a
//! fresh directory beside it (same file system) and swapped in only once the whole
//! archive has authenticated and matched its manifest. A failure (tampered archive,
//! full disk, kill) leaves DIR exactly as it was. Into a missing or empty DIR the tree
//! is renamed with rename(2), which fails if anything appeared in DIR meanwhile; with
//! `--force` the old contents are exchanged atomically with the new tree, their
//! sibling renamed `.DIR.dbkeeper-replaced-*`, and only then removed (never with a
//! file system mounted below DIR). An empty DIR that is a mount point (a fresh
//! volume, which rename(2) cannot replace) gets the tree assembled inside it, in
//! `DIR/.dbkeeper-restore-*`, and moved into place entry by entry, never replacing
//! anything. DIR may not be, hold or lie in a destination folder, the state dir, a
//! key, credentials or configuration file, or a configured SQLite database.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::archive::{channel, ChannelWriter, KeyRing};
use super::storage::Object;
use super::verify::{self, Expect, ReadReport, TrustGate};
use super::{blocking, BackupError};
use crate::config::Protected;

/// The header's `image` for a files set: a tar stream.
pub const IMAGE: &str = "tar";
/// The header's and manifest's `backend` for a files set.
pub const BACKEND: &str = crate::config::FILES_BACKEND;

/// What the backup of a files set met besides ordinary entries (kept in its
/// manifest as `files`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct FilesReport {
    /// Regular files, directories and symbolic links stored.
    pub entries: u64,
    /// Files that changed while they were read (grew, shrank, or a new mtime): stored
    /// cut or padded to the size their header gives.
    pub changed: u64,
    /// Entries left out: vanished or unreadable during the walk, sockets, fifos and
    /// devices.
    pub skipped: u64,
    /// The first few of those, `path: what happened`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// What reading a tar found.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeCount {
    pub entries: u64,
}

/// Chunks in flight between the archive reader and the tar parser.
const PIPE_CHUNKS: usize = 4;

/// A sink for the plaintext of a files archive that parses (and, with `into`,
/// extracts) the tar as it arrives. Drop the writer, then [`TreeSink::finish`].
struct TreeSink {
    worker: JoinHandle<Result<TreeCount, BackupError>>,
}

impl TreeSink {
    /// `into`: an empty directory to extract into, or `None` to check only.
    fn start(into: Option<PathBuf>) -> Result<(ChannelWriter, TreeSink), BackupError> {
        let (out, input) = channel(PIPE_CHUNKS);
        let worker = std::thread::Builder::new()
            .name("files-untar".to_owned())
            .spawn(move || unpack(input, into.as_deref()))
            .map_err(|e| BackupError::Internal(format!("cannot start the tar thread: {e}")))?;
        Ok((out, TreeSink { worker }))
    }

    /// The parser's verdict; call once the writer is dropped.
    fn finish(self) -> Result<TreeCount, BackupError> {
        self.worker
            .join()
            .map_err(|_| BackupError::Internal("the tar thread panicked".to_owned()))?
    }
}

fn refused(path: &Path, why: &str) -> BackupError {
    BackupError::Verification(format!(
        "the archive's tar holds {}, which {why}: refused, nothing was restored",
        path.display()
    ))
}

/// The entry path made relative and checked: no root, no `..`.
fn confined(path: &Path) -> Result<PathBuf, BackupError> {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(refused(path, "is an absolute path"))
            }
            Component::ParentDir => return Err(refused(path, "climbs out of the target with ..")),
        }
    }
    Ok(out)
}

/// Creates the missing parents of `rel` under `root`; an existing one must be a real
/// directory, never a symbolic link (one extracted earlier could point anywhere).
fn parents(root: &Path, rel: &Path) -> Result<(), BackupError> {
    let mut at = root.to_owned();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for part in parent.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(refused(rel, "would be written through a symbolic link"))
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(refused(rel, "lies below a file")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir(&at).map_err(write_err(&at))?;
            }
            Err(e) => return Err(write_err(&at)(e)),
        }
    }
    Ok(())
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> BackupError + use<> {
    super::io_err("cannot write", path.to_owned())
}

fn tar_err(e: io::Error) -> BackupError {
    BackupError::Verification(format!("the archive's tar cannot be read: {e}"))
}

/// Reads the whole tar from `input`; with `root`, extracts it there. Directories get
/// their mode and mtime last (deepest first), so writing into them cannot change
/// either, and a read-only one does not stop its contents.
fn unpack(input: impl Read, root: Option<&Path>) -> Result<TreeCount, BackupError> {
    let mut tar = tar::Archive::new(Counting {
        inner: input,
        read: 0,
    });
    // Where the last entry's data ends: the end-of-archive blocks come next.
    let mut end = 0;
    let mut count = TreeCount::default();
    let mut dirs = Vec::new();
    // Checking only: the links seen so far (extracting asks the file system).
    let mut links = std::collections::HashSet::new();
    for entry in tar.entries().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        let raw = entry.path().map_err(tar_err)?.into_owned();
        let rel = confined(&raw)?;
        end = entry.raw_file_position() + entry.size().div_ceil(512) * 512;
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().map_err(tar_err)? & 0o7777;
        let mtime = header.mtime().map_err(tar_err)?;
        // `tar` reads a base-256 field's last 8 bytes unsigned; a negative one (GNU,
        // before 1970) is their two's complement, so the bits are the i64.
        let mtime = filetime::FileTime::from_unix_time(i64::from_ne_bytes(mtime.to_ne_bytes()), 0);
        if rel.as_os_str().is_empty() {
            return Err(refused(&raw, "names the target itself"));
        }
        count.entries += 1;
        let Some(root) = root else {
            if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
                return Err(refused(&raw, "is neither a file, a directory nor a link"));
            }
            // What an extraction would refuse: a path below a link stored earlier.
            if rel.ancestors().skip(1).any(|a| links.contains(a)) {
                return Err(refused(&raw, "would be written through a symbolic link"));
            }
            if kind.is_symlink() {
                links.insert(rel);
            }
            io::copy(&mut entry, &mut io::sink()).map_err(tar_err)?;
            continue;
        };
        parents(root, &rel)?;
        let path = root.join(&rel);
        if kind.is_dir() {
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(refused(&raw, "is a directory where a file was")),
                Err(_) => std::fs::create_dir(&path).map_err(write_err(&path))?,
            }
            dirs.push((path, mode, mtime));
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(tar_err)?
                .ok_or_else(|| refused(&raw, "is a link without a target"))?;
            std::os::unix::fs::symlink(&target, &path).map_err(write_err(&path))?;
            filetime::set_symlink_file_times(&path, mtime, mtime).map_err(write_err(&path))?;
        } else if kind.is_file() {
            // Never over anything: an earlier entry of the same name (a link) must
            // not be followed.
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(write_err(&path))?;
            io::copy(&mut entry, &mut file).map_err(|e| match e.kind() {
                io::ErrorKind::Other
                | io::ErrorKind::InvalidData
                | io::ErrorKind::UnexpectedEof => tar_err(e),
                _ => write_err(&path)(e),
            })?;
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(write_err(&path))?;
            filetime::set_file_handle_times(&file, Some(mtime), Some(mtime))
                .map_err(write_err(&path))?;
        } else {
            return Err(refused(&raw, "is neither a file, a directory nor a link"));
        }
    }
    // What follows the end marker must still be read (the archive's last segment
    // authenticates the whole), and be nothing but zeros: the two end-of-archive
    // blocks and padding. A tar cut at an entry boundary has no end marker.
    let mut rest = tar.into_inner();
    let mut zeros = Zeros(true);
    io::copy(&mut rest, &mut zeros).map_err(tar_err)?;
    if !zeros.0 {
        return Err(BackupError::Verification(
            "the archive's tar has data after its end-of-archive marker: refused, nothing was restored".to_owned(),
        ));
    }
    if rest.read < end + 1024 {
        return Err(BackupError::Verification(
            "the archive's tar ends without its end-of-archive marker (cut short): refused, nothing was restored".to_owned(),
        ));
    }
    dirs.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.components().count()));
    for (path, mode, mtime) in dirs {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(write_err(&path))?;
        filetime::set_file_mtime(&path, mtime).map_err(write_err(&path))?;
    }
    Ok(count)
}

/// A reader that counts the bytes read through it.
struct Counting<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// A sink that notes whether everything written to it was zero.
struct Zeros(bool);

impl io::Write for Zeros {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 &= buf.iter().all(|b| *b == 0);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads the archive open as `archive` whole into a tar parser (extracting into
/// `into`, if given), hashing it; with `expect`, checks it against its manifest.
pub async fn read_tree(
    archive: &dyn Object,
    keys: &KeyRing,
    expect: Option<Expect<'_>>,
    into: Option<PathBuf>,
    cancel: &CancellationToken,
) -> Result<ReadReport, BackupError> {
    let input = verify::read_all(archive)?;
    let keys = keys.clone();
    let gate = TrustGate::of(expect.as_ref());
    let claimed_entries = expect
        .as_ref()
        .and_then(|e| e.trust)
        .and_then(|(m, _)| m.files.as_ref())
        .map(|f| f.entries);
    let report = blocking(cancel, move |stop| {
        let (sink, tree) = TreeSink::start(into)?;
        let read = verify::read_hashed_gated(input, &keys, sink, stop, Some(&gate));
        let read = read.map(|(sink, report)| {
            drop(sink);
            report
        });
        // The parser's refusal explains a read that stopped because the parser quit.
        let parsed = tree.finish();
        let report = match (read, parsed) {
            (Ok(report), Ok(count)) => {
                let claimed = claimed_entries.filter(|n| *n != count.entries);
                if let Some(claimed) = claimed {
                    return Err(BackupError::Verification(format!(
                        "the archive's tar holds {} entries, not the {claimed} its manifest lists: refused, nothing was restored",
                        count.entries
                    )));
                }
                report
            }
            (Err(e), Ok(_)) => return Err(e),
            (Ok(_), Err(e)) => return Err(e),
            (Err(e), Err(p)) => return Err(if e.is_verification() { e } else { p }),
        };
        if report.header.image != IMAGE {
            return Err(BackupError::Verification(format!(
                "the archive holds a {} image, not a files set's tar",
                report.header.image
            )));
        }
        Ok(report)
    })
    .await?;
    verify::check_expected(&report, expect)?;
    Ok(report)
}

/// `read` verification of a files archive: the whole tar parsed and its entries
/// checked; `restore` also extracts it into a scratch directory under `scratch_dir`,
/// removed afterwards.
pub async fn verify_tree(
    archive: &dyn Object,
    keys: &KeyRing,
    extract: bool,
    expect: Option<Expect<'_>>,
    scratch_dir: &Path,
    cancel: &CancellationToken,
) -> Result<(), BackupError> {
    if !extract {
        return read_tree(archive, keys, expect, None, cancel)
            .await
            .map(drop);
    }
    let dir = verify::PrivateDir::new(scratch_dir)?;
    let into = dir.path().join("tree");
    std::fs::create_dir(&into).map_err(write_err(&into))?;
    let read = read_tree(archive, keys, expect, Some(into), cancel).await;
    let _ = make_writable(dir.path());
    read.map(drop)
}

/// `restore NAME --to DIR`: see the module documentation. `kept`: what the target
/// may neither be, hold nor lie in (see
/// [`crate::config::Config::restore_dir_protected`]). Returns what to print.
pub async fn restore_dir(
    archive: &dyn Object,
    keys: &KeyRing,
    expect: Expect<'_>,
    target: &Path,
    force: bool,
    kept: &[Protected],
    cancel: &CancellationToken,
) -> Result<String, BackupError> {
    check_target(target, kept)?;
    let existing = match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => true,
        Ok(_) => {
            return Err(BackupError::Refused(format!(
                "{} exists and is not a directory; restore a files set into a directory",
                target.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(super::io_err("cannot read", target)(e)),
    };
    let mount_point = existing && is_mount_point(target)?;
    if mount_point && is_empty_volume(target)? {
        return restore_into_mount(archive, keys, expect, target, cancel).await;
    }
    if mount_point {
        // Not empty: --force would have to swap the mount point itself.
        return Err(BackupError::Refused(format!(
            "{} is a mount point and not empty: --force swaps the restored tree in with rename(2), which cannot replace a mount point; restore into an empty {} (the tree is then assembled inside it) or a directory inside it",
            target.display(),
            target.display()
        )));
    }
    if existing && !force && !is_empty(target)? {
        return Err(BackupError::Refused(format!(
            "{} is not empty; add --force to replace its contents (they are kept until the restored tree is complete)",
            target.display()
        )));
    }
    if existing && force {
        refuse_mounts_below(target)?;
    }
    let name = target
        .file_name()
        .ok_or_else(|| BackupError::Refused(format!("{} names no directory", target.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    // Beside the target, so the swap is a rename on one file system.
    let fresh = Beside::new(&parent, &name, "restore")?;
    read_tree(archive, keys, Some(expect), Some(fresh.0.clone()), cancel).await?;
    if let Ok(m) = std::fs::metadata(target) {
        // The restored tree takes the mode the target had.
        let _ = std::fs::set_permissions(&fresh.0, m.permissions());
    } else {
        let _ = std::fs::set_permissions(&fresh.0, std::fs::Permissions::from_mode(0o755));
    }
    if !(existing && force) {
        // rename(2) replaces only an empty directory: whatever appeared in the target
        // meanwhile fails it (ENOTEMPTY) and stays.
        return match std::fs::rename(&fresh.0, target) {
            Ok(()) => {
                fresh.keep();
                Ok(format!("restored to {}", target.display()))
            }
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
                Err(BackupError::Refused(format!(
                    "{} is no longer empty (something was written into it during the restore), so it was left as it is; stop what writes there, then restore again (or add --force)",
                    target.display()
                )))
            }
            Err(e) => Err(super::io_err("cannot rename into", target)(e)),
        };
    }
    // Atomic: the target is the old tree or the new one, never neither.
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        &fresh.0,
        rustix::fs::CWD,
        target,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .map_err(|e| super::io_err("cannot swap the restored tree into", target)(e.into()))?;
    // `fresh` now holds the previous contents: named so before they are removed, so
    // a kill now leaves a sibling that says what it holds.
    let old = fresh.0.clone();
    fresh.keep();
    let replaced = Beside::name(&parent, &name, "replaced")?;
    let left = match std::fs::rename(&old, &replaced) {
        Ok(()) => replaced,
        Err(_) => old,
    };
    let _ = make_writable(&left);
    match std::fs::remove_dir_all(&left) {
        Ok(()) => Ok(format!("restored to {}", target.display())),
        Err(e) => Ok(format!(
            "restored to {}; the previous contents could not be removed ({e}) and are left in {}: remove it once they are no longer needed",
            target.display(),
            left.display()
        )),
    }
}

/// Refuses a target that is, holds or lies in one of the paths a restore must leave
/// alone (`Config::protected_paths`: dbkeeper's folders, configuration, key and
/// credentials files; for a files restore also the configured SQLite databases):
/// restoring there would delete backups, the state, a key or a live database.
/// Compared twice: as paths with symbolic links resolved, and by device and inode up
/// the directory chain, which also sees through bind mounts. Also asked of a SQLite
/// restore's target file.
/// A SQLite restore's target that is the `-wal`, `-shm` or `-journal` file of a
/// database beside it (configured or not): replacing it would drop the transactions
/// it holds, or leave the database inconsistent. Refused.
pub fn not_a_companion(target: &Path) -> Result<(), BackupError> {
    let Some(name) = target.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(());
    };
    for suffix in crate::config::SQLITE_SIBLINGS {
        let Some(base) = name.strip_suffix(suffix).filter(|b| !b.is_empty()) else {
            continue;
        };
        let database = target.with_file_name(base);
        if database.is_file() {
            return Err(BackupError::Refused(format!(
                "{} is the {} file of the SQLite database {}, not a database: restoring over it would lose what it holds; restore to {} (with --force) or to a new file",
                target.display(),
                suffix.trim_start_matches('-'),
                database.display(),
                database.display()
            )));
        }
    }
    Ok(())
}

pub fn check_target(target: &Path, kept: &[Protected]) -> Result<(), BackupError> {
    let real = crate::config::resolve_path(target);
    let target_chain = inode_chain(&real);
    let target_id = file_id(&real);
    for p in kept {
        let kept_real = crate::config::resolve_path(&p.path);
        let by_path = crate::config::paths_overlap(&real, &kept_real);
        let kept_id = file_id(&kept_real);
        let inside = kept_id.is_some_and(|id| target_chain.contains(&id));
        let holds = target_id.is_some_and(|id| inode_chain(&kept_real).contains(&id));
        if !(by_path || inside || holds) {
            continue;
        }
        return Err(BackupError::Refused(match &p.database {
            Some(db) => format!(
                "{} holds {} {}: restoring there would delete database \"{db}\" (and what was written to it since the backup), with or without --force; restore into another directory and copy the files over, or move the database out of {} (and keep it out of the set with exclude)",
                target.display(),
                p.what,
                p.path.display(),
                target.display()
            ),
            None => format!(
                "{} and {} {} lie inside one another: restoring there would delete dbkeeper's own files; restore into another directory",
                target.display(),
                p.what,
                p.path.display()
            ),
        }));
    }
    Ok(())
}

/// Device and inode of `path` (following links), if it exists.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The device and inode of `path` (or its nearest existing ancestor) and of every
/// directory above it.
fn inode_chain(path: &Path) -> Vec<(u64, u64)> {
    path.ancestors().filter_map(file_id).collect()
}

/// Every mount point `/proc/self/mountinfo` lists.
fn mount_points() -> Result<Vec<PathBuf>, BackupError> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").map_err(super::io_err(
        "cannot read",
        Path::new("/proc/self/mountinfo"),
    ))?;
    Ok(table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount)
        .collect())
}

/// `--force` removes the old tree: never with a file system mounted below it, whose
/// files would go with it.
fn refuse_mounts_below(target: &Path) -> Result<(), BackupError> {
    let real = crate::config::resolve_path(target);
    let below = mount_points()?
        .into_iter()
        .find(|m| m != &real && m.starts_with(&real));
    match below {
        Some(m) => Err(BackupError::Refused(format!(
            "a file system is mounted at {}, inside {}: --force would delete its files with the old contents; unmount it first, or restore into another directory",
            m.display(),
            target.display()
        ))),
        None => Ok(()),
    }
}

/// Whether the directory `target` is a mount point (rename(2) cannot replace it:
/// EBUSY): another device than its parent's, or listed as one (a bind mount of the
/// same file system keeps the device).
fn is_mount_point(target: &Path) -> Result<bool, BackupError> {
    let real = crate::config::resolve_path(target);
    let other_device = match (file_id(&real), real.parent().and_then(file_id)) {
        (Some((dev, _)), Some((parent_dev, _))) => dev != parent_dev,
        _ => false,
    };
    Ok(other_device || mount_points()?.contains(&real))
}

/// `restore --to DIR` where DIR is an empty mount point: a tree extracted beside DIR
/// would fill the parent file system and could not be renamed over the mount point
/// (EBUSY). So it is extracted into `DIR/.dbkeeper-restore-*` (on the mounted file
/// system), then each top-level entry is moved into DIR with a rename that never
/// replaces (RENAME_NOREPLACE), and the hidden folder is removed. DIR keeps its own
/// mode. If something appeared in DIR meanwhile, the entries already moved go back
/// and DIR is left with only what appeared. A kill leaves the hidden folder (and
/// part of the tree already in DIR).
async fn restore_into_mount(
    archive: &dyn Object,
    keys: &KeyRing,
    expect: Expect<'_>,
    target: &Path,
    cancel: &CancellationToken,
) -> Result<String, BackupError> {
    let staged = Beside::inside(target, "restore")?;
    read_tree(archive, keys, Some(expect), Some(staged.0.clone()), cancel).await?;
    // A read-only root from the archive would stop the moves out of it.
    std::fs::set_permissions(&staged.0, std::fs::Permissions::from_mode(0o700))
        .map_err(write_err(&staged.0))?;
    let listing = std::fs::read_dir(&staged.0).map_err(super::io_err("cannot read", &staged.0))?;
    let mut names = Vec::new();
    for entry in listing {
        names.push(
            entry
                .map_err(super::io_err("cannot read", &staged.0))?
                .file_name(),
        );
    }
    let mut moved = Vec::new();
    for name in &names {
        let (from, to) = (staged.0.join(name), target.join(name));
        // A backup of a volume's root holds its empty lost+found; the fresh volume
        // has its own (the file system's, with its preallocated blocks): keep that.
        if name == "lost+found" && empty_dir(&from) && empty_dir(&to) {
            continue;
        }
        let renamed = rustix::fs::renameat_with(
            rustix::fs::CWD,
            &from,
            rustix::fs::CWD,
            &to,
            rustix::fs::RenameFlags::NOREPLACE,
        );
        match renamed {
            Ok(()) => moved.push(name),
            Err(e) => {
                // Back out: DIR holds only what it held (or what appeared) again.
                for back in &moved {
                    let _ = rustix::fs::renameat_with(
                        rustix::fs::CWD,
                        target.join(back),
                        rustix::fs::CWD,
                        staged.0.join(back),
                        rustix::fs::RenameFlags::NOREPLACE,
                    );
                }
                return Err(if e == rustix::io::Errno::EXIST && name == "lost+found" {
                    BackupError::Refused(format!(
                        "{} has its own lost+found and the backup holds a lost+found with something in it, so the volume was left as it was; restore into another directory and move what you need, or back the set up with exclude = [\"lost+found/**\"]",
                        target.display()
                    ))
                } else if e == rustix::io::Errno::EXIST {
                    BackupError::Refused(format!(
                        "{} is no longer empty ({} appeared during the restore), so it was left as it was; stop what writes there, then restore again",
                        target.display(),
                        to.display()
                    ))
                } else {
                    super::io_err("cannot move the restored tree into", target)(e.into())
                });
            }
        }
    }
    drop(staged);
    Ok(format!("restored to {}", target.display()))
}

/// A mount point as `/proc/self/mountinfo` writes it: space, tab, newline and
/// backslash as `\NNN` (octal).
fn unescape_mount(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (bytes[i], code) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// A freshly made file system: empty but for ext4's empty `lost+found` (which
/// stays where it is).
fn is_empty_volume(dir: &Path) -> Result<bool, BackupError> {
    let listing = std::fs::read_dir(dir).map_err(super::io_err("cannot read", dir))?;
    for entry in listing {
        let entry = entry.map_err(super::io_err("cannot read", dir))?;
        let path = entry.path();
        let lost_found = entry.file_name() == "lost+found"
            && entry.file_type().is_ok_and(|t| t.is_dir())
            && is_empty(&path)?;
        if !lost_found {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A directory (not a link to one) with nothing in it; anything else, or an
/// error, is not.
fn empty_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
        && std::fs::read_dir(path).is_ok_and(|mut l| l.next().is_none())
}

fn is_empty(dir: &Path) -> Result<bool, BackupError> {
    let mut listing = std::fs::read_dir(dir).map_err(super::io_err("cannot read", dir))?;
    Ok(listing.next().is_none())
}

/// A fresh directory beside the target (or hidden inside it, for a mount point),
/// removed with its contents unless kept.
struct Beside(PathBuf);

impl Beside {
    /// A fresh sibling name: `.NAME.dbkeeper-<what>-<random>`.
    fn name(parent: &Path, name: &str, what: &str) -> Result<PathBuf, BackupError> {
        let suffix: [u8; 8] = super::archive::crypto::random_bytes()
            .map_err(|e| BackupError::Archive(super::archive::ArchiveError::from(e)))?;
        Ok(parent.join(format!(".{name}.dbkeeper-{what}-{}", hex::encode(suffix))))
    }

    fn new(parent: &Path, name: &str, what: &str) -> Result<Self, BackupError> {
        let path = Self::name(parent, name, what)?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(super::io_err(
                "cannot create a directory beside the target:",
                &path,
            ))?;
        Ok(Beside(path))
    }

    /// A fresh hidden directory inside `dir`: `DIR/.dbkeeper-<what>-<random>`.
    fn inside(dir: &Path, what: &str) -> Result<Self, BackupError> {
        let suffix: [u8; 8] = super::archive::crypto::random_bytes()
            .map_err(|e| BackupError::Archive(super::archive::ArchiveError::from(e)))?;
        let path = dir.join(format!(".dbkeeper-{what}-{}", hex::encode(suffix)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(super::io_err(
                "cannot create a directory inside the target:",
                &path,
            ))?;
        Ok(Beside(path))
    }

    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Beside {
    fn drop(&mut self) {
        let _ = make_writable(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Directories restored read-only must become writable again to be removed.
fn make_writable(dir: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Ok(());
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for entry in std::fs::read_dir(dir)? {
        make_writable(&entry?.path())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_unescaped_as_mountinfo_writes_them() {
        assert_eq!(
            unescape_mount("/mnt/my\\040disk\\134x"),
            PathBuf::from("/mnt/my disk\\x")
        );
        // A backslash not followed by three octal digits stays as it is.
        assert_eq!(unescape_mount("/a\\9b"), PathBuf::from("/a\\9b"));
    }
}

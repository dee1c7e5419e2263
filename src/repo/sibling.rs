//! Plaintext written beside the file it will become (a restored SQLite database, a
//! `decrypt -o` output), and the target's side files (`-wal`, `-shm`, `-journal`)
//! parked while the restored file takes its place.
//!
//! Names: `.<name>.dbkeeper-restore.<tag>.tmp` for the new file and
//! `.<name><side>.dbkeeper-restore.<tag>.<state>.parked` for an old side file, with
//! one random tag per writer (never a PID: PIDs repeat, and are 1 in every
//! container). The writer holds an advisory lock (`flock`) on its `.tmp` for as long
//! as it lives, so a leftover is told from a file in use by the lock alone.
//!
//! A writer killed mid-way (kill -9, power loss) leaves plaintext and perhaps parked
//! side files behind. The next writer into the same folder ([`recover`]) removes
//! every stale `.tmp` there, and settles the parked side files of its own target by
//! the state of the target recorded in their name (inode, size, modification time):
//! - the same inode, unchanged: the rename (the commit point) never happened and
//!   nothing wrote the database since, so they are its own and go back (committed
//!   transactions in a WAL are never lost);
//! - another inode: the restored file replaced the target, so they belonged to the
//!   old database and are removed;
//! - the same inode but changed since (an application opened the database without
//!   its WAL and wrote to it): putting the old WAL back would replay stale pages over
//!   newer ones, and removing it would lose what it holds, so nothing is touched and
//!   the restore is refused, naming the file for the operator to decide.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::BackupError;

const MARK: &str = ".dbkeeper-restore.";
const TMP: &str = ".tmp";
const PARKED: &str = ".parked";

/// The files SQLite keeps beside a database, which belong to that database.
pub const SIDE_FILES: [&str; 3] = ["-wal", "-shm", "-journal"];

fn folder_of(target: &Path) -> PathBuf {
    match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn name_of(target: &Path) -> String {
    target
        .file_name()
        .map_or_else(|| "restore".into(), |n| n.to_string_lossy().into_owned())
}

fn io_error(what: &'static str, path: &Path, source: io::Error) -> BackupError {
    BackupError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A new private (0600) file beside `target`, locked for as long as this value lives
/// and removed when it is dropped (a no-op once it has been renamed into place).
pub struct SiblingTemp {
    path: PathBuf,
    tag: String,
    // Holds the lock; the writer gets a clone of the same open file.
    file: File,
    remove_on_drop: bool,
}

impl SiblingTemp {
    pub fn create(target: &Path) -> Result<Self, BackupError> {
        let tag = format!("{:016x}", rand::random::<u64>());
        let path = folder_of(target).join(format!(".{}{MARK}{tag}{TMP}", name_of(target)));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| io_error("cannot create", &path, e))?;
        let temp = SiblingTemp {
            path,
            tag,
            file,
            remove_on_drop: true,
        };
        temp.file
            .try_lock()
            .map_err(|e| io_error("cannot lock", &temp.path, io::Error::from(e)))?;
        Ok(temp)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What a killed writer leaves: the file, unlocked.
    #[cfg(test)]
    pub fn abandon(mut self) {
        self.remove_on_drop = false;
    }

    /// The open file to write the plaintext into (it shares the lock).
    pub fn writer(&self) -> Result<File, BackupError> {
        self.file
            .try_clone()
            .map_err(|e| io_error("cannot write", &self.path, e))
    }

    /// Moves `target`'s side files aside, named after this writer and the target's
    /// state, until [`Parked::discard`]; dropped before that, they are put back.
    pub fn park_side_files(&self, target: &Path) -> Result<Parked, BackupError> {
        let state = state_of(target).map_err(|e| io_error("cannot look at", target, e))?;
        let mut parked = Parked { moved: Vec::new() };
        for side in SIDE_FILES {
            let from = with_suffix(target, side);
            let to = folder_of(target).join(format!(
                ".{}{side}{MARK}{}.{state}{PARKED}",
                name_of(target),
                self.tag
            ));
            match fs::rename(&from, &to) {
                Ok(()) => parked.moved.push((from, to)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // `parked` goes out of scope here and puts back what it moved.
                Err(e) => return Err(io_error("cannot move aside", &from, e)),
            }
        }
        Ok(parked)
    }
}

impl Drop for SiblingTemp {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Side files moved aside (renamed, never deleted) until the new file is in place.
pub struct Parked {
    moved: Vec<(PathBuf, PathBuf)>,
}

impl Parked {
    /// The new database is in place: the old side files are of no use any more.
    pub fn discard(mut self) {
        for (_, parked) in self.moved.drain(..) {
            let _ = fs::remove_file(parked);
        }
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        for (side, parked) in self.moved.drain(..) {
            if let Err(e) = put_back(&parked, &side) {
                tracing::error!(
                    "cannot put {} back from {}: {e}; move it back by hand before opening the database",
                    side.display(),
                    parked.display()
                );
            }
        }
    }
}

/// Moves a parked side file back, never over a side file that exists now (a hard
/// link fails with `EEXIST`, where a rename would replace it).
fn put_back(parked: &Path, side: &Path) -> io::Result<()> {
    fs::hard_link(parked, side)?;
    fs::remove_file(parked)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// What is at `path`, without following a link: `<inode>-<size>-<mtime in ns>`
/// (`0-0-0` when nothing is there).
fn state_of(path: &Path) -> io::Result<String> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(format!(
            "{}-{}-{}",
            m.ino(),
            m.size(),
            i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok("0-0-0".to_owned()),
        Err(e) => Err(e),
    }
}

fn inode_of(state: &str) -> &str {
    state.split('-').next().unwrap_or_default()
}

/// A file name of ours, split up.
enum Leftover<'a> {
    /// `.<name>.dbkeeper-restore.<tag>.tmp`
    Temp,
    /// `.<target><side>.dbkeeper-restore.<tag>.<state>.parked`
    Parked {
        target: &'a str,
        side: &'static str,
        tag: &'a str,
        state: &'a str,
    },
}

fn parse(file_name: &str) -> Option<Leftover<'_>> {
    let rest = file_name.strip_prefix('.')?;
    let (before, after) = rest.rsplit_once(MARK)?;
    if let Some(tag) = after.strip_suffix(TMP) {
        return is_tag(tag).then_some(Leftover::Temp);
    }
    let (tag, state) = after.strip_suffix(PARKED)?.split_once('.')?;
    let parts: Vec<&str> = state.split('-').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.parse::<i128>().is_err()) {
        return None;
    }
    let side = SIDE_FILES.into_iter().find(|s| before.ends_with(s))?;
    let target = before.strip_suffix(side)?;
    (is_tag(tag) && !target.is_empty()).then_some(Leftover::Parked {
        target,
        side,
        tag,
        state,
    })
}

fn is_tag(tag: &str) -> bool {
    tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit())
}

/// True when a live writer holds the lock on `path`. Only our own regular files are
/// looked at (opened without following links or waiting on a FIFO).
fn held(path: &Path) -> io::Result<bool> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    match file.try_lock() {
        // Released when `file` is dropped.
        Ok(()) => Ok(false),
        Err(fs::TryLockError::WouldBlock) => Ok(true),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Cleans up after writers into `target`'s folder that were killed: removes every
/// `.tmp` nobody holds, and puts `target`'s own parked side files back (or removes
/// them, see the module docs). Returns what it did, one line each, for the log.
pub fn recover(target: &Path) -> Result<Vec<String>, BackupError> {
    let dir = folder_of(target);
    let name = name_of(target);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        // The folder is checked (and reported) by whoever writes into it.
        Err(_) => return Ok(Vec::new()),
    };
    let mut done = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let path = dir.join(file_name);
        match parse(file_name) {
            Some(Leftover::Temp) => match held(&path) {
                Ok(false) => {
                    fs::remove_file(&path)
                        .map_err(|e| io_error("cannot remove the leftover", &path, e))?;
                    done.push(format!(
                        "removed {}, left by an interrupted restore or decrypt",
                        path.display()
                    ));
                }
                Ok(true) => {}
                Err(e) => tracing::warn!("leaving {} alone: {e}", path.display()),
            },
            Some(Leftover::Parked {
                target: of,
                side,
                tag,
                state: was,
            }) if of == name => {
                let live = dir.join(format!(".{name}{MARK}{tag}{TMP}"));
                if held(&live).unwrap_or(true) {
                    continue;
                }
                let now = state_of(target).map_err(|e| io_error("cannot look at", target, e))?;
                let side_path = with_suffix(target, side);
                if now != was && inode_of(&now) == inode_of(was) {
                    return Err(BackupError::Refused(format!(
                        "{} was moved aside by an interrupted restore, and {} has been written \
                         since: putting it back would replay old pages over newer ones, removing it \
                         would lose the transactions it holds; with the application stopped, \
                         decide (keep a copy of both), remove {} and try again",
                        path.display(),
                        target.display(),
                        path.display()
                    )));
                }
                if now == was {
                    match put_back(&path, &side_path) {
                        Ok(()) => done.push(format!(
                            "put {} back: an interrupted restore had moved it aside",
                            side_path.display()
                        )),
                        Err(e) => {
                            return Err(BackupError::Refused(format!(
                            "{} was moved aside by an interrupted restore and cannot be put back \
                                 ({e}); with the application stopped, move it back to {} by hand \
                                 (or remove the newer {} if that one is empty) and try again",
                            path.display(),
                            side_path.display(),
                            side_path.display()
                        )))
                        }
                    }
                } else {
                    fs::remove_file(&path)
                        .map_err(|e| io_error("cannot remove the leftover", &path, e))?;
                    done.push(format!(
                        "removed {}: it belonged to the database an interrupted restore replaced",
                        path.display()
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_strangers_are_ignored() {
        assert!(matches!(
            parse(".app.db.dbkeeper-restore.0123456789abcdef.tmp"),
            Some(Leftover::Temp)
        ));
        match parse(".app.db-wal.dbkeeper-restore.0123456789abcdef.42-7-99.parked") {
            Some(Leftover::Parked {
                target,
                side,
                tag,
                state,
            }) => {
                assert_eq!(
                    (target, side, tag, state),
                    ("app.db", "-wal", "0123456789abcdef", "42-7-99")
                );
            }
            _ => panic!("a parked name must parse"),
        }
        for stranger in [
            "app.db",
            ".app.db.dbkeeper-restore.123.tmp",
            ".app.db.dbkeeper-restore.0123456789abcdef.tmpx",
            ".app.db-x.dbkeeper-restore.0123456789abcdef.1-1-1.parked",
            ".-wal.dbkeeper-restore.0123456789abcdef.1-1-1.parked",
            ".app.db-wal.dbkeeper-restore.0123456789abcdef.x-1-1.parked",
            ".app.db-wal.dbkeeper-restore.0123456789abcdef.1-1.parked",
        ] {
            assert!(parse(stranger).is_none(), "{stranger}");
        }
    }

    #[test]
    fn a_held_temp_survives_recovery_and_a_dead_ones_goes() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("app.db");
        let live = SiblingTemp::create(&target).unwrap();
        let dead = dir
            .path()
            .join(".other.db.dbkeeper-restore.00000000000000aa.tmp");
        fs::write(&dead, b"plaintext").unwrap();
        let done = recover(&target).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        assert!(live.path().exists());
        assert!(!dead.exists());
        let path = live.path().to_owned();
        drop(live);
        assert!(!path.exists());
    }

    #[test]
    fn parked_side_files_go_back_unless_the_target_was_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("app.db");
        fs::write(&target, b"old").unwrap();
        fs::write(with_suffix(&target, "-wal"), b"committed").unwrap();
        let temp = SiblingTemp::create(&target).unwrap();
        let parked = temp.park_side_files(&target).unwrap();
        assert!(!with_suffix(&target, "-wal").exists());
        // Killed here: nothing runs the destructors.
        std::mem::forget(parked);
        temp.abandon();
        recover(&target).unwrap();
        assert_eq!(
            fs::read(with_suffix(&target, "-wal")).unwrap(),
            b"committed"
        );
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 2, "only the database and its WAL: {left:?}");

        // Killed after the rename: the parked WAL is the old database's.
        let temp = SiblingTemp::create(&target).unwrap();
        fs::write(temp.path(), b"new").unwrap();
        let parked = temp.park_side_files(&target).unwrap();
        fs::rename(temp.path(), &target).unwrap();
        std::mem::forget(parked);
        drop(temp);
        recover(&target).unwrap();
        assert!(!with_suffix(&target, "-wal").exists());
        assert_eq!(fs::read(&target).unwrap(), b"new");
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[test]
    fn a_database_written_since_its_wal_was_parked_is_left_for_the_operator() {
        // Adversary round 3, case 01: the application wrote (and checkpointed) the
        // database after the crash; the old WAL must neither go back nor go away.
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("app.db");
        fs::write(&target, b"old").unwrap();
        fs::write(with_suffix(&target, "-wal"), b"committed").unwrap();
        let temp = SiblingTemp::create(&target).unwrap();
        std::mem::forget(temp.park_side_files(&target).unwrap());
        temp.abandon();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut f = fs::OpenOptions::new().append(true).open(&target).unwrap();
        std::io::Write::write_all(&mut f, b" and newer").unwrap();
        drop(f);
        assert!(matches!(recover(&target), Err(BackupError::Refused(_))));
        assert!(!with_suffix(&target, "-wal").exists(), "nothing put back");
        let parked = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(PARKED))
            .count();
        assert_eq!(parked, 1, "the parked WAL is kept");
    }

    #[test]
    fn a_side_file_made_since_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("app.db");
        fs::write(&target, b"old").unwrap();
        fs::write(with_suffix(&target, "-wal"), b"committed").unwrap();
        let temp = SiblingTemp::create(&target).unwrap();
        std::mem::forget(temp.park_side_files(&target).unwrap());
        temp.abandon();
        fs::write(with_suffix(&target, "-wal"), b"newer").unwrap();
        assert!(matches!(recover(&target), Err(BackupError::Refused(_))));
        assert_eq!(fs::read(with_suffix(&target, "-wal")).unwrap(), b"newer");
    }
}

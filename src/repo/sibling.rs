//! Plaintext written beside the file it will become (a restored SQLite database, a
//! `decrypt -o` output), and the target's side files (`-wal`, `-shm`, `-journal`)
//! parked while the restored file takes its place.
//!
//! Names: `.<name>.dbkeeper-restore.<tag>.tmp` for the new file and
//! `.<name><side>.dbkeeper-restore.<tag>.<state>.parked` for an old side file, with
//! one random tag per writer (never a PID: PIDs repeat, and are 1 in every
//! container) and `<state>` the target's state when it was parked (inode, size,
//! modification time). The writer holds an advisory lock (`flock`) on its `.tmp` for as long as it lives, so a
//! leftover is told from a file in use by the lock alone.
//!
//! A restore makes the target self-contained before it parks anything (see
//! [`super::settle`]: committed WAL frames checkpointed, a hot journal rolled back),
//! so its parked side files normally hold nothing. A writer killed mid-way (kill -9,
//! power loss) leaves plaintext and perhaps parked side files behind. The next writer
//! into the same folder removes every stale `.tmp` there ([`remove_dead_temps`]); the
//! next restore of the same target also settles its parked side files ([`recover`]):
//! - one that holds nothing SQLite would read (empty, a `-shm`, which SQLite rebuilds,
//!   a WAL without a valid commit frame, a journal without a journal header) is
//!   removed: whatever the target is now, it needs nothing from it;
//! - one that still holds data (the target was not a database SQLite could settle, or
//!   an older dbkeeper parked it) is never removed, since an inode number proves
//!   nothing once the file system may have reused it: it is put back only onto the
//!   target exactly as it was parked (same inode, size and modification time: nothing
//!   wrote it since), and in every other case (the rename happened, the target was
//!   written since or replaced by a copy) left where it is, and the restore refused,
//!   naming the file for the operator to decide.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::storage::local::held;
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

pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
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

/// The first bytes of a rollback journal that SQLite would play back (a journal
/// without them, zeroed by `journal_mode=PERSIST` or truncated, is not hot).
const JOURNAL_MAGIC: [u8; 8] = [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7];

/// Whether the parked side file at `path` holds anything SQLite would read into the
/// database: a `-wal` with a valid commit frame, a `-journal` with a journal header.
/// A `-shm` never does (SQLite rebuilds it from the WAL when the first connection
/// opens). Anything but a regular file counts as holding data: it is not ours to
/// judge.
fn holds_data(path: &Path, side: &str) -> io::Result<bool> {
    // A link is never followed (opening it with O_NOFOLLOW would only fail).
    if !fs::symlink_metadata(path)?.is_file() {
        return Ok(true);
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(true);
    }
    if meta.len() == 0 {
        return Ok(false);
    }
    let mut reader = io::BufReader::new(file);
    match side {
        "-wal" => wal_has_commit(&mut reader),
        "-journal" => {
            let mut head = [0u8; 8];
            match reader.read_exact(&mut head) {
                Ok(()) => Ok(head == JOURNAL_MAGIC),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
                Err(e) => Err(e),
            }
        }
        _ => Ok(false),
    }
}

/// SQLite's WAL checksum: pairs of 32-bit words, big- or little-endian as the WAL
/// header's magic says, summed into `sum`.
fn wal_checksum(sum: &mut (u32, u32), data: &[u8], big_endian: bool) {
    for pair in data.chunks_exact(8) {
        let word = |b: &[u8]| {
            let b = [b[0], b[1], b[2], b[3]];
            if big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        };
        sum.0 = sum.0.wrapping_add(word(&pair[..4])).wrapping_add(sum.1);
        sum.1 = sum.1.wrapping_add(word(&pair[4..])).wrapping_add(sum.0);
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Whether a WAL holds at least one transaction SQLite would replay: read as SQLite
/// recovers a WAL (header checksum, then frames in order, each with the header's salts
/// and a running checksum, stopping at the first bad one), true at the first valid
/// commit frame. A header SQLite would not accept means it ignores the whole file;
/// a WAL version it does not know is left alone (counted as holding data).
fn wal_has_commit(wal: &mut impl Read) -> io::Result<bool> {
    const MAGIC: u32 = 0x377f_0682;
    const VERSION: u32 = 3_007_000;
    let mut header = [0u8; 32];
    match wal.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    let magic = be32(&header[0..4]);
    if magic & !1 != MAGIC {
        return Ok(false);
    }
    if be32(&header[4..8]) != VERSION {
        return Ok(true);
    }
    let page_size = be32(&header[8..12]) as usize;
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return Ok(false);
    }
    let big_endian = magic & 1 == 1;
    let mut sum = (0, 0);
    wal_checksum(&mut sum, &header[..24], big_endian);
    if sum != (be32(&header[24..28]), be32(&header[28..32])) {
        return Ok(false);
    }
    let mut frame = vec![0u8; 24 + page_size];
    loop {
        match wal.read_exact(&mut frame) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e),
        }
        if be32(&frame[0..4]) == 0 || frame[8..16] != header[16..24] {
            return Ok(false);
        }
        wal_checksum(&mut sum, &frame[..8], big_endian);
        wal_checksum(&mut sum, &frame[24..], big_endian);
        if sum != (be32(&frame[16..20]), be32(&frame[20..24])) {
            return Ok(false);
        }
        if be32(&frame[4..8]) != 0 {
            return Ok(true);
        }
    }
}

/// A file name of ours, split up.
enum Leftover<'a> {
    /// `.<name>.dbkeeper-restore.<tag>.tmp`
    Temp,
    /// `.<name>.dbkeeper-restore.<tag>.tmp-journal` (or `-wal`, `-shm`): SQLite's side
    /// file of a restored copy.
    TempSide(&'static str),
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
    // SQLite's own side files of the restored copy (a journal while its journal mode
    // is set), left when a restore was killed (adversary round 4, case 04).
    for side in SIDE_FILES {
        if let Some(tag) = after.strip_suffix(side).and_then(|a| a.strip_suffix(TMP)) {
            return is_tag(tag).then_some(Leftover::TempSide(side));
        }
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

/// The files in `target`'s folder, by name (the folder itself is checked, and
/// reported, by whoever writes into it).
fn entries_of(target: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(folder_of(target)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect()
}

/// Removes every `.tmp` in `target`'s folder that no live writer holds: the plaintext
/// a killed restore or `decrypt -o` left. Parked side files are not looked at (only
/// [`recover`], at the start of a restore of their target, settles them). Returns what
/// it did, one line each, for the log.
pub fn remove_dead_temps(target: &Path) -> Result<Vec<String>, BackupError> {
    let dir = folder_of(target);
    let mut done = Vec::new();
    for file_name in entries_of(target) {
        let path = dir.join(&file_name);
        // The writer's lock is on the copy itself, also for the copy's side files.
        let owner = match parse(&file_name) {
            Some(Leftover::Temp) => path.clone(),
            Some(Leftover::TempSide(side)) => dir.join(&file_name[..file_name.len() - side.len()]),
            _ => continue,
        };
        match held(&owner) {
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
        }
    }
    Ok(done)
}

/// Cleans up after writers into `target`'s folder that were killed: removes every
/// `.tmp` nobody holds, then settles `target`'s own parked side files as the module
/// docs say (removed, put back, or left for the operator with the restore refused).
/// Returns what it did, one line each, for the log.
pub fn recover(target: &Path) -> Result<Vec<String>, BackupError> {
    let mut done = remove_dead_temps(target)?;
    // Every parked file is looked at before any refusal: one left for the operator
    // does not keep the others (empty ones, say) from being settled.
    let mut refusals = Vec::new();
    let dir = folder_of(target);
    let name = name_of(target);
    for file_name in entries_of(target) {
        let Some(Leftover::Parked {
            target: of,
            side,
            tag,
            state: was,
        }) = parse(&file_name)
        else {
            continue;
        };
        if of != name {
            continue;
        }
        let path = dir.join(&file_name);
        let live = dir.join(format!(".{name}{MARK}{tag}{TMP}"));
        if held(&live).unwrap_or(true) {
            continue;
        }
        let side_path = with_suffix(target, side);
        let has_data = match holds_data(&path, side) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("cannot read", &path, e)),
        };
        if !has_data {
            fs::remove_file(&path).map_err(|e| io_error("cannot remove the leftover", &path, e))?;
            done.push(format!(
                "removed {}, moved aside by an interrupted restore: it holds nothing SQLite \
                 would read",
                path.display()
            ));
            continue;
        }
        // A parked file that holds transactions is never removed: an inode number says
        // nothing once the file system has handed it to another file (adversary round
        // 4, case 05). It goes back onto the very target it came from, or stays for the
        // operator; a settled target (see `settle`) leaves none such.
        let now = state_of(target).map_err(|e| io_error("cannot look at", target, e))?;
        if now == was {
            if let Err(e) = put_back(&path, &side_path) {
                refusals.push(format!(
                    "{} was moved aside by an interrupted restore and cannot be put back \
                     ({e}); with the application stopped, move it back to {} by hand \
                     (or remove the newer {} if that one is empty) and try again",
                    path.display(),
                    side_path.display(),
                    side_path.display()
                ));
                continue;
            }
            done.push(format!(
                "put {} back: an interrupted restore had moved it aside",
                side_path.display()
            ));
        } else {
            refusals.push(format!(
                "{} was moved aside by an interrupted restore and still holds transactions, \
                 and {} has changed since (written, or replaced by another file): putting it \
                 back could replay old pages over newer ones, removing it could lose what it \
                 holds; with the application stopped, decide (keep a copy of both), remove {} \
                 and try again",
                path.display(),
                target.display(),
                path.display()
            ));
        }
    }
    if !refusals.is_empty() {
        // The caller logs what was done only on success: said here, it is not lost.
        for line in &done {
            tracing::warn!("{line}");
        }
        return Err(BackupError::Refused(refusals.join("; and ")));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_copys_sqlite_side_files_go_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("app.db");
        let dead = dir
            .path()
            .join(".app.db.dbkeeper-restore.00000000000000aa.tmp-journal");
        fs::write(&dead, b"plaintext").unwrap();
        let live = SiblingTemp::create(&target).unwrap();
        let live_side = with_suffix(live.path(), "-journal");
        fs::write(&live_side, b"in use").unwrap();
        remove_dead_temps(&target).unwrap();
        assert!(!dead.exists());
        assert!(live_side.exists(), "a live copy's journal stays");
    }

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
            }) => assert_eq!(
                (target, side, tag, state),
                ("app.db", "-wal", "0123456789abcdef", "42-7-99")
            ),
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
            ".app.db-wal.dbkeeper-restore.0123456789abcdef.1-1-1.x.parked",
            ".app.db-wal.dbkeeper-restore.0123456789abcdef.1-1-1.2.3.parked",
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

    /// The bytes of a WAL holding one committed transaction, as SQLite wrote them.
    async fn committed_wal() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("source.db");
        crate::repo::settle::fixtures::wal_target(&db).await;
        fs::read(with_suffix(&db, "-wal")).unwrap()
    }

    /// `app.db` (not a database SQLite would settle) with a WAL holding a commit, its
    /// side files parked by a restore then killed; returns the parked WAL's path and
    /// what it holds.
    async fn parked_with_data(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
        let target = dir.join("app.db");
        let bytes = committed_wal().await;
        fs::write(&target, b"old").unwrap();
        fs::write(with_suffix(&target, "-wal"), &bytes).unwrap();
        fs::write(with_suffix(&target, "-shm"), b"index").unwrap();
        let temp = SiblingTemp::create(&target).unwrap();
        std::mem::forget(temp.park_side_files(&target).unwrap());
        temp.abandon();
        assert!(!with_suffix(&target, "-wal").exists());
        let wal = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().contains("-wal.dbkeeper-restore."))
            .unwrap();
        (target, wal, bytes)
    }

    fn parked_count(dir: &Path) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(PARKED))
            .count()
    }

    #[tokio::test]
    async fn what_a_side_file_holds_is_read_as_sqlite_would() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            fs::write(&path, bytes).unwrap();
            path
        };
        let wal = committed_wal().await;
        assert!(holds_data(&at("a", &wal), "-wal").unwrap());
        assert!(
            !holds_data(&at("b", &wal[..32]), "-wal").unwrap(),
            "header only"
        );
        assert!(!holds_data(&at("c", b""), "-wal").unwrap());
        let mut torn = wal.clone();
        torn[32 + 24 + 100] ^= 0xff;
        assert!(
            !holds_data(&at("d", &torn), "-wal").unwrap(),
            "bad checksum"
        );
        let mut other_salt = wal.clone();
        other_salt[32 + 8] ^= 0xff;
        assert!(!holds_data(&at("e", &other_salt), "-wal").unwrap());
        let mut journal = JOURNAL_MAGIC.to_vec();
        journal.extend_from_slice(&[7; 600]);
        assert!(holds_data(&at("f", &journal), "-journal").unwrap());
        assert!(
            !holds_data(&at("g", &[0; 608]), "-journal").unwrap(),
            "persisted, zeroed"
        );
        assert!(!holds_data(&at("h", &wal), "-shm").unwrap());
        std::os::unix::fs::symlink(dir.path().join("a"), dir.path().join("link")).unwrap();
        assert!(
            holds_data(&dir.path().join("link"), "-wal").unwrap(),
            "not ours to judge"
        );
    }

    #[tokio::test]
    async fn parked_side_files_holding_nothing_are_removed_whatever_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("app.db");
        fs::write(&target, b"old").unwrap();
        fs::write(with_suffix(&target, "-wal"), b"").unwrap();
        fs::write(with_suffix(&target, "-shm"), b"index").unwrap();
        let temp = SiblingTemp::create(&target).unwrap();
        std::mem::forget(temp.park_side_files(&target).unwrap());
        temp.abandon();
        fs::write(&target, b"written since").unwrap();
        let done = recover(&target).unwrap();
        assert_eq!(done.len(), 3, "the .tmp and two side files: {done:?}");
        assert!(!with_suffix(&target, "-wal").exists());
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[tokio::test]
    async fn parked_side_files_go_back_unless_the_target_was_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (target, _, bytes) = parked_with_data(dir.path()).await;
        recover(&target).unwrap();
        assert!(fs::read(with_suffix(&target, "-wal")).unwrap() == bytes);
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(
            left.len(),
            2,
            "the database and its WAL (the -shm went): {left:?}"
        );

        // Killed after the rename: the parked WAL is the old database's, but an inode
        // number proves nothing once it can have been reused (adversary round 4, case
        // 05), so a WAL holding transactions stays for the operator.
        let temp = SiblingTemp::create(&target).unwrap();
        fs::write(temp.path(), b"new").unwrap();
        let parked = temp.park_side_files(&target).unwrap();
        fs::rename(temp.path(), &target).unwrap();
        std::mem::forget(parked);
        drop(temp);
        assert!(matches!(recover(&target), Err(BackupError::Refused(_))));
        assert!(!with_suffix(&target, "-wal").exists(), "nothing put back");
        assert_eq!(fs::read(&target).unwrap(), b"new");
        let kept = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(PARKED))
            .count();
        assert_eq!(
            kept, 1,
            "the parked WAL holding transactions is never deleted"
        );
    }

    #[tokio::test]
    async fn a_database_written_since_its_wal_was_parked_is_left_for_the_operator() {
        // Adversary round 3, case 01: the application wrote (and checkpointed) the
        // database after the crash; the old WAL must neither go back nor go away.
        let dir = tempfile::tempdir().unwrap();
        let (target, wal, _) = parked_with_data(dir.path()).await;
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut f = fs::OpenOptions::new().append(true).open(&target).unwrap();
        std::io::Write::write_all(&mut f, b" and newer").unwrap();
        drop(f);
        assert!(
            matches!(recover(&target), Err(BackupError::Refused(m)) if m.contains(&*wal.to_string_lossy()))
        );
        assert!(!with_suffix(&target, "-wal").exists(), "nothing put back");
        assert!(wal.exists(), "the parked WAL is kept");
    }

    #[tokio::test]
    async fn a_parked_wal_holding_data_survives_a_target_with_a_new_inode() {
        // Adversary round 3, case 01 (variant): `cp` + `mv` gave the target a new
        // inode, which was taken for the restore's rename, and the WAL was deleted.
        let dir = tempfile::tempdir().unwrap();
        let (target, wal, bytes) = parked_with_data(dir.path()).await;
        let copy = dir.path().join("copy");
        fs::copy(&target, &copy).unwrap();
        fs::rename(&copy, &target).unwrap();
        assert!(matches!(recover(&target), Err(BackupError::Refused(_))));
        assert!(
            fs::read(&wal).unwrap() == bytes,
            "the parked WAL is kept whole"
        );
        assert!(!with_suffix(&target, "-wal").exists());

        assert_eq!(parked_count(dir.path()), 1);
    }

    #[tokio::test]
    async fn a_side_file_made_since_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let (target, _, _) = parked_with_data(dir.path()).await;
        fs::write(with_suffix(&target, "-wal"), b"newer").unwrap();
        assert!(matches!(recover(&target), Err(BackupError::Refused(_))));
        assert_eq!(fs::read(with_suffix(&target, "-wal")).unwrap(), b"newer");
    }
}

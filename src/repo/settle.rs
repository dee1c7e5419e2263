//! Making a SQLite restore target self-contained before its side files are moved.
//!
//! A forced restore renames the restored file over the target, and first moves the
//! target's `-wal`, `-shm` and `-journal` aside (see [`super::sibling`]) so that none
//! of them is replayed into the new file. But a WAL holds committed transactions the
//! main file does not have yet, and a hot journal holds the pages that undo a
//! half-written transaction already in the main file: while they are moved aside, the
//! target alone is missing commits or shows uncommitted rows, and a restore killed in
//! that window (kill -9, power cut) would leave it so, with the only copy of that data
//! in a parked file that recovery would have to guess about.
//!
//! So before anything is moved, SQLite itself is asked to settle the target: opened
//! read-write (never created), a hot journal is rolled back by the first lock taken,
//! and `PRAGMA wal_checkpoint(TRUNCATE)` copies every committed WAL frame into the
//! main file and empties the WAL. Afterwards every committed transaction is in the
//! main file and the side files hold nothing of value, whatever happens next. If
//! another connection is in a transaction (SQLite says busy), nothing can be settled
//! safely and the restore is refused: the application must be stopped first.
//!
//! Only a regular, singly linked file that starts with SQLite's header is opened, and
//! only when its side files are regular, singly linked files too: SQLite follows
//! symbolic links and writes into its side files (it truncates the WAL, maps the
//! `-shm`, plays a journal back into the database), so a link planted there must never
//! steer it into another file. The target is checked again afterwards, and a target
//! that was swapped meanwhile is refused. A target SQLite cannot read as a database
//! (not one at all, damaged, encrypted) is left as it is: its side files are parked
//! unread and recovery keeps any that hold data (see [`super::sibling`]).

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

use super::sibling::{with_suffix, Parked, SiblingTemp, SIDE_FILES};
use super::BackupError;

/// How long SQLite may wait for another connection's lock before the target counts as
/// in use: long enough for a short transaction to end, short enough not to hang.
const BUSY_GRACE: Duration = Duration::from_secs(1);

/// SQLite's result codes that mean another connection holds the database.
const SQLITE_BUSY: i64 = 5;
const SQLITE_LOCKED: i64 = 6;

/// The last step before the commit point of a forced restore: makes `target`
/// self-contained ([`settle`]), then parks its side files for `tmp` to replace it.
pub async fn settle_and_park(tmp: &SiblingTemp, target: &Path) -> Result<Parked, BackupError> {
    if let Some(why) = settle(target).await? {
        tracing::warn!(
            "{} was not settled by SQLite before the restore ({why}); its side files are \
             moved aside as they are",
            target.display()
        );
    }
    tmp.park_side_files(target)
}

/// Puts every committed transaction of the SQLite database `target` into its main
/// file (a hot journal rolled back, the WAL checkpointed and emptied). Returns why it
/// was left as it is when SQLite cannot read it as a database (or nothing is there).
pub async fn settle(target: &Path) -> Result<Option<String>, BackupError> {
    let before = match opened_database(target)? {
        Ok(meta) => meta,
        Err(why) => return Ok(Some(why)),
    };
    for side in SIDE_FILES {
        let path = with_suffix(target, side);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() && m.nlink() == 1 => {}
            Ok(_) => {
                return Err(BackupError::Refused(format!(
                    "{} is not a regular file of its own (a symbolic link, a hard link or \
                     something else), and SQLite would write through it; with the application \
                     stopped, move it away and try again (nothing was changed)",
                    path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(BackupError::Io {
                    what: "cannot look at",
                    path,
                    source,
                })
            }
        }
    }
    let outcome = checkpoint(target).await;
    // SQLite opened the target by its name: make sure that name was the file looked
    // at above all along.
    let after = std::fs::symlink_metadata(target).ok();
    if after.is_none_or(|m| (m.dev(), m.ino()) != (before.dev(), before.ino())) {
        return Err(BackupError::Refused(format!(
            "{} was replaced while it was being settled; stop whatever is writing to that \
             folder and try again",
            target.display()
        )));
    }
    match outcome {
        Ok(()) => Ok(None),
        Err(Unsettled::InUse(detail)) => Err(BackupError::Refused(format!(
            "{} is in use ({detail}): stop the application first; nothing was changed",
            target.display()
        ))),
        Err(Unsettled::Failed(e)) => Ok(Some(e.to_string())),
        Err(Unsettled::Cannot(e)) => Err(BackupError::Refused(format!(
            "cannot settle {} with SQLite ({e}): its WAL or journal may hold committed \
             transactions that moving them aside would put at risk; fix that (permissions, \
             disk space) and try again; the target keeps everything it held",
            target.display()
        ))),
    }
}

/// Why SQLite did not settle the target.
enum Unsettled {
    /// Another connection holds it (busy or locked): refused.
    InUse(String),
    /// SQLite cannot read it as a database (damaged, encrypted…): left as it is.
    Failed(sqlx::Error),
    /// A database SQLite could not settle for want of something (write permission,
    /// disk space, memory): refused, since its side files may hold committed data
    /// (adversary round 4, cases 11 and 12).
    Cannot(sqlx::Error),
}

/// SQLite's result codes that mean the file is not a (readable) database.
const SQLITE_CORRUPT: i64 = 11;
const SQLITE_NOTADB: i64 = 26;

impl From<sqlx::Error> for Unsettled {
    fn from(e: sqlx::Error) -> Self {
        let code = e
            .as_database_error()
            .and_then(|d| d.code())
            .and_then(|c| c.parse::<i64>().ok());
        match code.map(|c| c & 0xff) {
            Some(SQLITE_BUSY | SQLITE_LOCKED) => Unsettled::InUse(e.to_string()),
            Some(SQLITE_CORRUPT | SQLITE_NOTADB) => Unsettled::Failed(e),
            _ => Unsettled::Cannot(e),
        }
    }
}

/// The target's metadata if it is a regular file of its own starting with SQLite's
/// header; otherwise why it is not settled. Opened without following a link or
/// waiting on a FIFO, and judged by what was actually opened.
fn opened_database(target: &Path) -> Result<Result<std::fs::Metadata, String>, BackupError> {
    let read_err = |source| BackupError::Io {
        what: "cannot read",
        path: target.to_owned(),
        source,
    };
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(target)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Err("nothing is there".to_owned()))
        }
        Err(e) => return Err(read_err(e)),
    };
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(BackupError::Refused(format!(
            "{} is not a regular file any more; restore to a regular file",
            target.display()
        )));
    }
    if meta.nlink() != 1 {
        return Err(BackupError::Refused(format!(
            "{} has other hard links, and SQLite would write through them; restore to a \
             file of its own (nothing was changed)",
            target.display()
        )));
    }
    let mut header = [0u8; 16];
    match file.read_exact(&mut header) {
        Ok(()) if &header == b"SQLite format 3\0" => Ok(Ok(meta)),
        Ok(()) => Ok(Err("it is not a SQLite database".to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Ok(Err("it is shorter than a SQLite header".to_owned()))
        }
        Err(e) => Err(read_err(e)),
    }
}

/// Opens `target` read-write and lets SQLite settle it: the first lock rolls back a
/// hot journal, an exclusive transaction proves that no other connection is reading
/// or writing in rollback mode, and the checkpoint empties the WAL in WAL mode (busy
/// there means a reader still uses the WAL).
async fn checkpoint(target: &Path) -> Result<(), Unsettled> {
    let mut conn = SqliteConnectOptions::new()
        .filename(target)
        .create_if_missing(false)
        .read_only(false)
        .foreign_keys(false)
        .busy_timeout(BUSY_GRACE)
        .connect()
        .await?;
    let settled = async {
        sqlx::raw_sql("BEGIN EXCLUSIVE; COMMIT")
            .execute(&mut conn)
            .await?;
        // (busy, frames in the WAL, frames checkpointed); (0, -1, -1) outside WAL mode.
        let (busy, log, done): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&mut conn)
            .await?;
        if busy != 0 || log != done {
            return Err(Unsettled::InUse(format!(
                "another connection is reading it: the WAL checkpoint could not complete, \
                 {done} of {log} frames copied"
            )));
        }
        Ok(())
    }
    .await;
    let closed = conn.close().await;
    settled?;
    Ok(closed?)
}

/// SQLite files as a crashed application leaves them, for the tests here and in
/// [`super::sibling`].
#[cfg(test)]
pub(super) mod fixtures {
    use std::path::Path;

    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
    use sqlx::{ConnectOptions, Connection, SqliteConnection};

    use super::with_suffix;

    async fn open(path: &Path) -> SqliteConnection {
        SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .connect()
            .await
            .unwrap()
    }

    /// A WAL-mode database at `path` holding `old` in its main file and the committed
    /// row `only-in-wal` only in its `-wal` (copied while the writer, which never
    /// checkpoints, still had it open: as after a crash).
    pub async fn wal_target(path: &Path) {
        let work = path.with_extension("writer");
        let mut conn = SqliteConnectOptions::new()
            .filename(&work)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .pragma("wal_autocheckpoint", "0")
            .connect()
            .await
            .unwrap();
        sqlx::raw_sql(
            "CREATE TABLE t (i INTEGER PRIMARY KEY, s TEXT); INSERT INTO t (s) VALUES ('old');
             PRAGMA wal_checkpoint(TRUNCATE); INSERT INTO t (s) VALUES ('only-in-wal');",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        std::fs::copy(&work, path).unwrap();
        std::fs::copy(with_suffix(&work, "-wal"), with_suffix(path, "-wal")).unwrap();
        conn.close().await.unwrap();
        std::fs::remove_file(&work).unwrap();
    }

    /// A rollback-journal database at `path` whose writer died mid-transaction: the
    /// main file holds pages of an uncommitted `UPDATE` (every row `UNCOMMITTED`), its
    /// hot `-journal` what undoes them (every row `COMMITTED`).
    pub async fn hot_journal_target(path: &Path) {
        let work = path.with_extension("writer");
        let mut conn = SqliteConnectOptions::new()
            .filename(&work)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Delete)
            .pragma("cache_size", "1")
            .connect()
            .await
            .unwrap();
        sqlx::raw_sql(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, x TEXT);
             WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < 3000)
             INSERT INTO t (x) SELECT 'COMMITTED' FROM r;",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        let mut tx = conn.begin().await.unwrap();
        // The cache holds one page: the changed ones spill into the main file.
        sqlx::raw_sql("UPDATE t SET x = 'UNCOMMITTED'")
            .execute(&mut *tx)
            .await
            .unwrap();
        std::fs::copy(&work, path).unwrap();
        std::fs::copy(
            with_suffix(&work, "-journal"),
            with_suffix(path, "-journal"),
        )
        .unwrap();
        tx.rollback().await.unwrap();
        conn.close().await.unwrap();
        std::fs::remove_file(&work).unwrap();
    }

    /// What an application opening `path` sees (and would write over).
    pub async fn rows(path: &Path, sql: &'static str) -> Vec<String> {
        let mut conn = open(path).await;
        let rows = sqlx::query_scalar(sql).fetch_all(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        rows
    }

    /// What is in the folder of `path` that dbkeeper named.
    pub fn ours(path: &Path) -> Vec<String> {
        std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".dbkeeper-restore."))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{hot_journal_target, ours, rows, wal_target};
    use super::*;
    use crate::repo::sibling;

    /// A restore killed after parking, before the rename (nothing of it runs again).
    async fn killed_after_parking(target: &Path) {
        let tmp = SiblingTemp::create(target).unwrap();
        std::fs::write(tmp.path(), b"the restored image").unwrap();
        std::mem::forget(settle_and_park(&tmp, target).await.unwrap());
        tmp.abandon();
    }

    #[tokio::test]
    async fn a_killed_restore_never_hides_committed_wal_rows() {
        // Adversary round 3, case 01: the WAL, parked with the only copy of committed
        // rows, left the application a database without them.
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("app.db");
        wal_target(&target).await;
        killed_after_parking(&target).await;
        assert!(!with_suffix(&target, "-wal").exists());
        // The application opens the database without its WAL, and writes.
        let all = "SELECT group_concat(s) FROM t";
        assert_eq!(rows(&target, all).await, ["old,only-in-wal"]);
        rows(&target, "INSERT INTO t (s) VALUES ('after') RETURNING s").await;
        let done = sibling::recover(&target).unwrap();
        assert!(done.iter().all(|d| d.starts_with("removed")), "{done:?}");
        assert_eq!(rows(&target, all).await, ["old,only-in-wal,after"]);
        assert!(ours(&target).is_empty(), "{:?}", ours(&target));
    }

    #[tokio::test]
    async fn a_killed_restore_never_leaves_uncommitted_rows() {
        // Adversary round 3, case 08: the hot journal, parked, left the half-written
        // transaction in the database.
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("app.db");
        hot_journal_target(&target).await;
        killed_after_parking(&target).await;
        assert!(!with_suffix(&target, "-journal").exists());
        let seen = "SELECT x || ':' || count(*) FROM t GROUP BY x";
        assert_eq!(rows(&target, seen).await, ["COMMITTED:3000"]);
        assert_eq!(rows(&target, "PRAGMA integrity_check").await, ["ok"]);
        sibling::recover(&target).unwrap();
        assert_eq!(rows(&target, seen).await, ["COMMITTED:3000"]);
        assert!(ours(&target).is_empty(), "{:?}", ours(&target));
    }

    #[tokio::test]
    async fn a_target_copied_to_a_new_inode_after_a_kill_loses_nothing() {
        // Adversary round 3, case 01 (variant): `cp` + `mv` gave the target a new
        // inode, which recovery took for "the restore's rename happened", deleting the
        // parked WAL and the committed rows in it.
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("app.db");
        wal_target(&target).await;
        killed_after_parking(&target).await;
        let copy = dir.path().join("app.db.copy");
        std::fs::copy(&target, &copy).unwrap();
        std::fs::rename(&copy, &target).unwrap();
        let recovered = sibling::recover(&target);
        let all = "SELECT group_concat(s) FROM t";
        let kept_in_target = rows(&target, all).await == ["old,only-in-wal"];
        let kept_aside = ours(&target)
            .iter()
            .any(|n| n.contains("-wal.") && n.ends_with(".parked"));
        assert!(
            kept_in_target || (kept_aside && recovered.is_err()),
            "the committed row is gone: {recovered:?}"
        );
    }

    #[tokio::test]
    async fn what_sqlite_cannot_read_as_a_database_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("app.db");
        std::fs::write(&target, b"not a database at all, just some text").unwrap();
        std::fs::write(with_suffix(&target, "-wal"), b"not a WAL either").unwrap();
        assert!(settle(&target).await.unwrap().is_some());
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"not a database at all, just some text"
        );
        assert!(with_suffix(&target, "-wal").exists());
        assert!(settle(&dir.path().join("absent.db"))
            .await
            .unwrap()
            .is_some());
    }

    #[tokio::test]
    async fn side_files_sqlite_would_write_through_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("app.db");
        wal_target(&target).await;
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, b"precious").unwrap();
        std::os::unix::fs::symlink(&elsewhere, with_suffix(&target, "-shm")).unwrap();
        assert!(matches!(
            settle(&target).await,
            Err(BackupError::Refused(m)) if m.contains("-shm")
        ));
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"precious");
        std::fs::remove_file(with_suffix(&target, "-shm")).unwrap();
        std::fs::hard_link(&target, elsewhere.with_extension("link")).unwrap();
        assert!(matches!(
            settle(&target).await,
            Err(BackupError::Refused(m)) if m.contains("hard links")
        ));
        assert!(with_suffix(&target, "-wal").exists(), "nothing settled");
    }

    #[tokio::test]
    async fn a_database_another_connection_reads_or_writes_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        // Rollback journal: a reader holds a shared lock for its whole transaction.
        let target = dir.path().join("app.db");
        hot_journal_target(&target).await;
        let mut app = SqliteConnectOptions::new()
            .filename(&target)
            .connect()
            .await
            .unwrap();
        let mut tx = app.begin().await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, 3000);
        assert!(matches!(
            settle(&target).await,
            Err(BackupError::Refused(m)) if m.contains("in use") && m.contains("stop the application first")
        ));
        tx.commit().await.unwrap();
        app.close().await.unwrap();
        assert_eq!(settle(&target).await.unwrap(), None);

        // WAL: a writer in the middle of a transaction.
        let target = dir.path().join("wal.db");
        wal_target(&target).await;
        let mut app = SqliteConnectOptions::new()
            .filename(&target)
            .connect()
            .await
            .unwrap();
        let mut tx = app.begin().await.unwrap();
        sqlx::query("INSERT INTO t (s) VALUES ('pending')")
            .execute(&mut *tx)
            .await
            .unwrap();
        assert!(matches!(
            settle(&target).await,
            Err(BackupError::Refused(m)) if m.contains("in use")
        ));
        assert!(with_suffix(&target, "-wal").exists());
        tx.commit().await.unwrap();
        app.close().await.unwrap();
        assert_eq!(settle(&target).await.unwrap(), None);
        assert!(!with_suffix(&target, "-wal").exists(), "checkpointed");
        let all = "SELECT group_concat(s) FROM t";
        assert_eq!(rows(&target, all).await, ["old,only-in-wal,pending"]);
    }
}

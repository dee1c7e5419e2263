//! Migrations on SQLite ([`MigrationBackend`] for [`Sqlite`]). The database file is
//! its own lock, so the apply loop's session holds nothing: each migration runs in a
//! `BEGIN IMMEDIATE` transaction that first re-checks the history, so two migrators
//! never apply one version twice. `-- no-transaction` files run outside it. Foreign
//! keys are off while a migration runs, and checked before it commits when the
//! database enforces them (`foreign-keys = true`).

use std::time::Duration;

use sqlx::migrate::Migration;
use sqlx::pool::PoolConnection;
use tokio_util::sync::CancellationToken;

use super::{Applied, AppliedRow, MigrateError, MigrateJob, MigrationBackend};
use crate::db::Sqlite;

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    success BOOLEAN NOT NULL,
    checksum BLOB NOT NULL,
    execution_time BIGINT NOT NULL
)";

fn db_err(lite: &Sqlite) -> impl Fn(sqlx::Error) -> MigrateError + '_ {
    move |e| MigrateError::Db(lite.query_error(e))
}

impl MigrationBackend for Sqlite {
    type Session = ();

    async fn applied(&self) -> Result<Vec<Applied>, MigrateError> {
        if !self.has_migration_history().await? {
            return Ok(Vec::new());
        }
        let rows: Vec<AppliedRow> = sqlx::query_as(
            "SELECT version, description, success, checksum, CAST(installed_on AS TEXT) FROM _sqlx_migrations ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_err(self))?;
        Ok(rows.into_iter().map(Applied::from).collect())
    }

    async fn open(
        &self,
        _job: &MigrateJob,
        _cancel: &CancellationToken,
    ) -> Result<(), MigrateError> {
        sqlx::raw_sql(CREATE_TABLE)
            .execute(&self.pool)
            .await
            .map_err(db_err(self))?;
        Ok(())
    }

    async fn close(&self, _session: ()) {}

    /// SQLite statements cannot be interrupted (without `unsafe`): `_cancel` is
    /// looked at between migrations only.
    async fn apply(
        &self,
        _session: &mut (),
        job: &MigrateJob,
        m: &Migration,
        file: &str,
        _cancel: &CancellationToken,
    ) -> Result<bool, MigrateError> {
        run_one(self, m, job.cfg.lock_timeout, file).await
    }

    async fn record_time(&self, _session: &mut (), m: &Migration, nanos: i64) {
        let _ = sqlx::query(super::EXECUTION_TIME)
            .bind(nanos)
            .bind(m.version)
            .execute(&self.pool)
            .await;
    }
}

impl Sqlite {
    /// Holds the command-migration lock: an exclusive `flock` on
    /// [`super::command::sqlite_lock_path`], waiting up to `lock-wait`. Released when
    /// the returned file is closed (also when the process dies).
    pub(super) async fn command_lock(
        &self,
        job: &MigrateJob,
        cancel: &CancellationToken,
    ) -> Result<super::command::Locked<std::fs::File>, MigrateError> {
        use rustix::fs::{flock, FlockOperation};
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let database = self.path();
        // A lock file beside the database is shared by every path that reaches it
        // through symbolic links or bind mounts (the same directory), not by a hard
        // link elsewhere: SQLite itself cannot work through several links (its journal
        // is named after the path), so neither do migrations.
        if let Ok(meta) = std::fs::metadata(&database) {
            if meta.nlink() > 1 {
                return Err(MigrateError::HardLinks {
                    path: database,
                    links: meta.nlink(),
                });
            }
        }
        let path = super::command::sqlite_lock_path(&database);
        let lock_err = |source: std::io::Error| MigrateError::LockFile {
            path: path.clone(),
            source,
        };
        let dir = path.parent().unwrap_or(std::path::Path::new("/"));
        let dir_meta = std::fs::metadata(dir).map_err(lock_err)?;
        let place = format!(
            "sqlite:{}:{}:{}",
            dir_meta.dev(),
            dir_meta.ino(),
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(lock_err)?;
        let mut waiting = super::LockWait::new(&self.name, job.cfg.lock_wait);
        loop {
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(super::command::Locked::new(file, &place)),
                Err(e) if e == rustix::io::Errno::WOULDBLOCK => waiting.pause(cancel).await?,
                Err(e) => return Err(lock_err(e.into())),
            }
        }
    }
}

/// Applies one migration unless it is applied already; `Ok(false)` if it was.
///
/// Foreign keys are off while it runs, as SQLite's ALTER TABLE page prescribes for
/// schema changes: with them on, the documented table rebuild (create the new table,
/// copy, drop the old one, rename) deletes every ON DELETE CASCADE child row when the
/// old table is dropped. The setting cannot change inside a transaction, so it is made
/// on a connection of our own before `BEGIN`, and that connection is closed afterwards.
/// With `foreign-keys = true` the application relies on them, so
/// `PRAGMA foreign_key_check` must find nothing before the migration commits.
async fn run_one(
    lite: &Sqlite,
    m: &Migration,
    busy: Duration,
    file: &str,
) -> Result<bool, MigrateError> {
    let mut conn = lite.own_connection(busy, false).await?;
    lite.begin_immediate_on(&mut conn).await?;
    let steps = async {
        let seen: i64 =
            sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE version = ?1")
                .bind(m.version)
                .fetch_one(&mut *conn)
                .await
                .map_err(db_err(lite))?;
        if seen > 0 {
            return Ok(false);
        }
        if m.no_tx {
            // Written as failed before it runs (see postgres.rs for why), in the
            // transaction that re-checked the history: the version is claimed, and a
            // second migrator cannot run it too.
            super::history_row(m, false)
                .execute(&mut *conn)
                .await
                .map_err(db_err(lite))?;
            return Ok(true);
        }
        let applied = async {
            run_checked(lite, &mut conn, m, file).await?;
            super::history_row(m, true)
                .execute(&mut *conn)
                .await
                .map_err(db_err(lite))
        }
        .await;
        applied.map_err(|e| super::failed_in_transaction(m, file, e))?;
        Ok::<bool, MigrateError>(true)
    }
    .await;
    let claimed = match lite.end_transaction(&mut conn, steps).await {
        // What ran before its COMMIT stays: recorded as failed, exactly like a
        // `-- no-transaction` migration that failed part-way.
        Err(e @ MigrateError::EndsOwnTransaction { .. }) => {
            super::history_row(m, false)
                .execute(&mut *conn)
                .await
                .map_err(db_err(lite))?;
            return Err(e);
        }
        claimed => claimed?,
    };
    if !claimed || !m.no_tx {
        return Ok(claimed);
    }
    let ran = async {
        run_checked(lite, &mut conn, m, file).await?;
        sqlx::query(super::MARK_APPLIED)
            .bind(m.version)
            .execute(&mut *conn)
            .await
            .map_err(db_err(lite))
    }
    .await;
    let marked = ran.map_err(|e| super::failed(m, file, true, e))?;
    if marked.rows_affected() == 0 {
        // Written back as failed: it ran, but nothing may run it again unseen.
        let _ = super::history_row::<sqlx::Sqlite>(m, false)
            .execute(&mut *conn)
            .await;
    }
    super::marked(m, file, marked.rows_affected())?;
    Ok(true)
}

/// Runs the migration's SQL, fails if it ended the transaction it ran in, then (with
/// `foreign-keys = true`) fails if it left a row whose foreign key points at no row
/// that was not there before.
async fn run_checked(
    lite: &Sqlite,
    conn: &mut PoolConnection<sqlx::Sqlite>,
    m: &Migration,
    file: &str,
) -> Result<(), MigrateError> {
    // Only violations the migration adds are its fault: those already there are
    // counted first (inside its transaction, when it has one).
    let before = if lite.foreign_keys {
        Some(violations(lite, conn).await?)
    } else {
        None
    };
    let ran = sqlx::raw_sql(m.sql.clone()).execute(&mut **conn).await;
    // SQLite has no transaction-scoped setting to look at, but `BEGIN` fails inside a
    // transaction: if it succeeds, the file's COMMIT or ROLLBACK ended ours (asked
    // even after an error: statements after its COMMIT fail on their own).
    if !m.no_tx && sqlx::raw_sql("BEGIN").execute(&mut **conn).await.is_ok() {
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut **conn)
            .await
            .map_err(db_err(lite))?;
        return Err(MigrateError::EndsOwnTransaction {
            version: m.version,
            file: file.to_owned(),
            failed: ran.err().map(|e| Box::new(lite.query_error(e))),
        });
    }
    ran.map_err(db_err(lite))?;
    let Some(before) = before else {
        return Ok(());
    };
    let after = violations(lite, conn).await?;
    let new: Vec<&Violation> = after.iter().filter(|v| !before.contains(v)).collect();
    match new.first() {
        None => Ok(()),
        Some((table, _, parent, _)) => Err(MigrateError::ForeignKeys {
            new: new.len(),
            before: before.len(),
            table: table.clone(),
            parent: parent.clone(),
            in_transaction: !m.no_tx,
        }),
    }
}

/// A row of `PRAGMA foreign_key_check`: table, rowid, parent, foreign key id.
type Violation = (String, Option<i64>, String, i64);

async fn violations(
    lite: &Sqlite,
    conn: &mut PoolConnection<sqlx::Sqlite>,
) -> Result<Vec<Violation>, MigrateError> {
    sqlx::query_as("SELECT \"table\", rowid, parent, fkid FROM pragma_foreign_key_check")
        .fetch_all(&mut **conn)
        .await
        .map_err(db_err(lite))
}

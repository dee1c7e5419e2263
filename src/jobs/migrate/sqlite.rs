//! Migrations on SQLite. The database file is its own lock: each migration runs in a
//! `BEGIN IMMEDIATE` transaction that first re-checks the history, so two migrators
//! never apply one version twice. `-- no-transaction` files run outside it. Foreign
//! keys are off while a migration runs, and checked before it commits when the
//! database enforces them (`foreign-keys = true`).

use std::time::{Duration, Instant};

use sqlx::migrate::Migration;
use sqlx::pool::PoolConnection;
use tokio_util::sync::CancellationToken;

use super::{file_name, Applied, AppliedRow, MigrateError, MigrateJob};
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

pub async fn applied(lite: &Sqlite) -> Result<Vec<Applied>, MigrateError> {
    if !lite.has_migration_history().await? {
        return Ok(Vec::new());
    }
    let rows: Vec<AppliedRow> = sqlx::query_as(
        "SELECT version, description, success, checksum, CAST(installed_on AS TEXT) FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(&lite.pool)
    .await
    .map_err(db_err(lite))?;
    Ok(rows.into_iter().map(Applied::from).collect())
}

pub async fn apply(
    lite: &Sqlite,
    job: &MigrateJob,
    cancel: &CancellationToken,
) -> Result<(Vec<i64>, Option<String>), MigrateError> {
    let files = super::read_dir(&job.cfg.dir).await?;
    sqlx::raw_sql(CREATE_TABLE)
        .execute(&lite.pool)
        .await
        .map_err(db_err(lite))?;
    let history = applied(lite).await?;
    let database = crate::db::Database::Sqlite(lite.clone());
    let (pending, backup_id) = job.prepare(&database, &files, &history, cancel).await?;
    let mut done = Vec::new();
    for m in &pending {
        if cancel.is_cancelled() {
            return Err(MigrateError::Cancelled);
        }
        let file = file_name(&job.cfg.dir, m.version);
        tracing::info!(database = %lite.name, version = m.version, file, "applying migration");
        let started = Instant::now();
        let applied = run_one(lite, m, job.cfg.lock_timeout, &file).await;
        // Not when another migrator applied it meanwhile: its row is not ours.
        if !matches!(applied, Ok(false)) {
            let _ = sqlx::query(super::EXECUTION_TIME)
                .bind(started.elapsed().as_nanos() as i64)
                .bind(m.version)
                .execute(&lite.pool)
                .await;
        }
        if applied? {
            done.push(m.version);
        }
    }
    Ok((done, backup_id))
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

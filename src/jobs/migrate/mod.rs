//! `migrate` jobs (`<database>.migrate`): apply pending migrations from a directory,
//! compatible with sqlx.
//!
//! Files are read at run time with sqlx's own reader (same versions, descriptions,
//! SHA-384 checksums and `-- no-transaction` handling as `sqlx::migrate!()`), and the
//! history lives in sqlx's `_sqlx_migrations` with its exact columns, so a database
//! migrated by an application's embedded sqlx migrator and by dbkeeper agree on what
//! is applied. Before anything is applied: checksum drift, applied migrations missing
//! from disk, dirty entries and out-of-order versions are reported, and a verified
//! pre-migration backup is taken. Each migration runs with its history row in one
//! transaction; a `-- no-transaction` file's row is written as failed before it runs
//! and marked applied after, so one that fails part-way blocks dbkeeper and sqlx alike
//! until an operator acts.
//!
//! What applying needs from a database is the [`MigrationBackend`] contract, one
//! implementation per backend (`postgres.rs`: sqlx's advisory lock, server-side
//! cancel, INVALID indexes; `sqlite.rs`: the file lock, foreign-key checks). Reading
//! files, comparing them with the history, the pre-migration backup, the apply loop
//! and the history rows are written once here.
//!
//! Another tool's migrations (`command`) are run by `command.rs`, with the same job,
//! pre-migration backup and metrics around them. `dry-run-on-copy` (both kinds)
//! first applies to a scratch copy restored from the pre-migration backup
//! ([`verify::restore_scratch`], as the restore test makes one).

pub mod command;
mod postgres;
mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::migrate::{Migration, Migrator};
use tokio_util::sync::CancellationToken;

use super::backup::BackupJob;
use super::Outcome;
use crate::config::{MigrateConfig, OutOfOrder};
use crate::db::{with_backend, Database, DbError};
use crate::metrics;
use crate::repo::catalog::{self, BackupKind, VerifyMode};
use crate::repo::storage::ARCHIVE_SUFFIX;
use crate::repo::verify::{self, ScratchCopy};

/// A migration run failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot read migrations from {dir}: {source}; check [database.migrate] dir")]
    Read {
        dir: PathBuf,
        #[source]
        source: ReadFailure,
    },
    /// What blocks applying, one sentence each (as in [`Assessment::problems`]).
    #[error("nothing applied: {}", .0.join("; "))]
    Blocked(Vec<String>),
    #[error("migration {version} ({file}) failed, nothing after it was applied: {source}")]
    Failed {
        version: i64,
        file: String,
        #[source]
        source: Box<MigrateError>,
    },
    #[error("migration {version} ({file}) ran outside a transaction and failed part-way, so it is marked failed in _sqlx_migrations and nothing after it is applied until you act: {source}; {}", repair_hint(*.version))]
    FailedDirty {
        version: i64,
        file: String,
        #[source]
        source: Box<MigrateError>,
    },
    /// A `-- no-transaction` migration failed and left INVALID indexes behind.
    #[error("{source}; the database now has INVALID indexes {} — drop them (or set drop-invalid-indexes = true for those named in the migration)", .indexes.join(", "))]
    LeftInvalid {
        #[source]
        source: Box<DbError>,
        indexes: Vec<String>,
    },
    #[error("migration {version} ({file}) ran outside a transaction to the end, but its row in _sqlx_migrations was removed while it ran; dbkeeper wrote the row back marked failed, so nothing runs it again unseen: check what it did, then `UPDATE _sqlx_migrations SET success = TRUE WHERE version = {version}` if it is complete (or undo it by hand and delete the row to run it again)")]
    RowRemoved { version: i64, file: String },
    #[error("migration {version} ({file}) ends its own transaction (COMMIT or ROLLBACK in the file){}, so part of it may be committed; it is marked failed in _sqlx_migrations and nothing after it is applied until you act: remove COMMIT and ROLLBACK from the file (or make it `-- no-transaction`), then {}", .failed.as_ref().map_or(String::new(), |e| format!(" and then failed: {e}")), repair_hint(*.version))]
    EndsOwnTransaction {
        version: i64,
        file: String,
        /// The error its SQL ended with after that, if any.
        failed: Option<Box<DbError>>,
    },
    #[error(
        "another migrator held the migration lock for {0:?}; try again later or raise lock-wait"
    )]
    LockTimeout(std::time::Duration),
    #[error("pre-migration backup failed, nothing was applied: {0}")]
    Backup(#[source] BackupFailure),
    #[error("it left {new} new rows whose foreign key points at no row (the first in table \"{table}\", referencing \"{parent}\"){}; {}", existed_before(*.before), fk_outcome(*.in_transaction))]
    ForeignKeys {
        /// Violations the migration added (those that existed before are not its own).
        new: usize,
        before: usize,
        table: String,
        parent: String,
        in_transaction: bool,
    },
    #[error("migrations {first} and {second} in {dir} have the same version {version}, so only one of them could ever be applied; give the one that is not applied yet a new, higher version")]
    Duplicate {
        dir: PathBuf,
        version: i64,
        first: String,
        second: String,
    },
    #[error("INVALID index {} named in it is still there (PostgreSQL skips CREATE INDEX … IF NOT EXISTS when an index of that name exists, even an INVALID one); drop it with DROP INDEX CONCURRENTLY, or set drop-invalid-indexes = true, and apply again", .0.join(", "))]
    InvalidIndexes(Vec<String>),
    #[error("cannot start the {which} `{program}` in {}: {source}; check [database.migrate] {which} and working-dir", .dir.display())]
    CommandStart {
        which: &'static str,
        program: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `output`: the tail of what it printed, the password masked.
    #[error("the {which} `{argv}` failed on {target} ({status}); its output: {output}")]
    CommandFailed {
        which: &'static str,
        argv: String,
        target: &'static str,
        status: String,
        output: String,
    },
    #[error("the dry run on a scratch copy restored from pre-migration backup {backup} failed, so the database was not touched: {source}")]
    DryRun {
        backup: String,
        #[source]
        source: Box<MigrateError>,
    },
    #[error("{source}; pre-migration backup {backup} was taken before it ran: check the database, and `dbkeeper restore` that backup if the command left it half-migrated")]
    AfterBackup {
        backup: String,
        #[source]
        source: Box<MigrateError>,
    },
    #[error("cannot make the scratch copy for the dry run, so the database was not touched: {0}")]
    Copy(#[source] BackupFailure),
    #[error("cannot lock {} for the migration command: {source}; check that dbkeeper may create files beside the database", .path.display())]
    LockFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} has {links} hard links: SQLite cannot keep a database reached through several names consistent (its journal is named after the path), and the migration lock could not cover them; remove the other links (find them with `find / -samefile`) and apply again", .path.display())]
    HardLinks { path: PathBuf, links: u64 },
    #[error("cannot pin pre-migration backup {backup} in {destination} against rotation ({source}); the migration was not run: a retry after a failure could rotate an unpinned backup away. Make the destination writable and apply again")]
    Pin {
        backup: String,
        destination: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cancelled")]
    Cancelled,
    /// A migration command cancelled (timeout, shutdown) once it had started.
    #[error("the migration command was stopped; a statement it had sent to a PostgreSQL server may still run (and commit) there (see pg_stat_activity)")]
    Stopped,
    #[error("the session holding the migration lock on database \"{database}\" was lost while the command ran ({reason}), so another migrator could have started: the command was stopped; check the database before applying again")]
    LockLost { database: String, reason: String },
    #[error("a migration command started earlier for database \"{database}\" is still running (pid {pids}): the dbkeeper that started it died without stopping it; wait for it to end (or kill it), check the database, then apply again")]
    StillRunning { database: String, pids: String },
}

/// The dry run on the copy of pre-migration backup `backup` failed with `e`
/// (cancelling is no failure of the dry run).
fn dry_run_failed(backup: &str, e: MigrateError) -> MigrateError {
    match e {
        MigrateError::Cancelled => MigrateError::Cancelled,
        e => MigrateError::DryRun {
            backup: backup.to_owned(),
            source: Box::new(e),
        },
    }
}

/// Why the migrations directory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadFailure {
    #[error("not a directory")]
    NotADirectory,
    #[error(transparent)]
    Sqlx(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Why the pre-migration backup was not taken.
#[derive(Debug, thiserror::Error)]
pub enum BackupFailure {
    #[error("no [database.backup] is configured")]
    NotConfigured,
    #[error("backup-first = false, so there is no pre-migration backup to copy")]
    NoBackup,
    #[error("pre-migration backup {0} is in none of the destinations")]
    NotFound(String),
    #[error(transparent)]
    Failed(Box<super::backup::BackupError>),
}

impl MigrateError {
    /// True when the configuration (here: the migrations directory, or a file in it
    /// sqlx cannot read) is wrong, not the database: the command line exits 2, as
    /// `check` does, and retrying cannot help.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            MigrateError::Duplicate { .. }
                | MigrateError::Read { .. }
                | MigrateError::CommandStart { .. }
        )
    }

    /// Whether another attempt may succeed (the runner retries). Not for what stays
    /// until an operator acts: a blocked history, unreadable or duplicate files, and a
    /// `-- no-transaction` migration whose row vanished (a retry would run it twice).
    pub fn is_transient(&self) -> bool {
        use MigrateError as E;
        match self {
            // A command that failed may have done part of its work: not again unseen.
            E::Blocked(_)
            | E::Read { .. }
            | E::Duplicate { .. }
            | E::RowRemoved { .. }
            | E::CommandStart { .. }
            | E::CommandFailed { .. }
            | E::AfterBackup { .. }
            | E::LockLost { .. }
            | E::Stopped
            | E::StillRunning { .. }
            | E::HardLinks { .. }
            | E::Pin { .. }
            | E::DryRun { .. } => false,
            E::Db(_)
            | E::Failed { .. }
            | E::FailedDirty { .. }
            | E::LeftInvalid { .. }
            | E::EndsOwnTransaction { .. }
            | E::LockTimeout(_)
            | E::Backup(_)
            | E::ForeignKeys { .. }
            | E::InvalidIndexes(_)
            | E::Copy(_)
            | E::LockFile { .. }
            | E::Cancelled => true,
        }
    }
}

fn existed_before(before: usize) -> String {
    if before == 0 {
        String::new()
    } else {
        format!(" ({before} such rows existed before it ran and are not counted)")
    }
}

/// What became of a migration that left foreign-key violations, and what to do.
fn fk_outcome(in_transaction: bool) -> &'static str {
    if in_transaction {
        "so it was rolled back; make the migration keep or re-point every referenced row"
    } else {
        "it ran outside a transaction, so its changes stay (nothing was rolled back) and it is marked failed; fix or delete those rows in that table by hand"
    }
}

/// What an operator does about a migration marked failed (dirty); the same words in
/// the error, `migrate status` and `docs/RUNBOOK.md`.
fn repair_hint(version: i64) -> String {
    format!(
        "inspect what it did and finish or undo it by hand, then run `DELETE FROM _sqlx_migrations WHERE version = {version}` and apply again, or, if it did complete, `UPDATE _sqlx_migrations SET success = TRUE WHERE version = {version}` (docs/RUNBOOK.md, \"A migration marked failed\")"
    )
}

/// Migration `m` from `file` failed with `e`; `dirty`: it ran outside a transaction
/// after its history row was written as failed, so that row stays.
fn failed(m: &Migration, file: &str, dirty: bool, e: impl Into<MigrateError>) -> MigrateError {
    let (version, file, source) = (m.version, file.to_owned(), Box::new(e.into()));
    if dirty {
        MigrateError::FailedDirty {
            version,
            file,
            source,
        }
    } else {
        MigrateError::Failed {
            version,
            file,
            source,
        }
    }
}

/// A migration in a transaction failed with `e`. One that ended dbkeeper's transaction
/// itself is reported as such; anything else was rolled back as a whole.
fn failed_in_transaction(m: &Migration, file: &str, e: MigrateError) -> MigrateError {
    match e {
        e @ MigrateError::EndsOwnTransaction { .. } => e,
        e => failed(m, file, false, e),
    }
}

/// sqlx's history row for `m`, exactly as sqlx writes it (`execution_time` -1 until
/// measured), with `success` as given. `$n` parameters work on both backends.
fn history_row<'q, DB: sqlx::Database>(
    m: &Migration,
    success: bool,
) -> sqlx::query::Query<'q, DB, DB::Arguments>
where
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    bool: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Vec<u8>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES ($1, $2, $3, $4, -1)",
    )
    .bind(m.version)
    .bind(m.description.to_string())
    .bind(success)
    .bind(m.checksum.to_vec())
}

/// A `-- no-transaction` migration that ran through: its row becomes what sqlx writes
/// for an applied migration (`installed_on` is when it completed, as with sqlx).
const MARK_APPLIED: &str =
    "UPDATE _sqlx_migrations SET success = TRUE, installed_on = CURRENT_TIMESTAMP WHERE version = $1";

/// A `-- no-transaction` migration ran through and [`MARK_APPLIED`] changed `rows`
/// rows. None: its row is gone (an operator deleted it while the migration ran), and
/// reporting success would leave an applied migration that nothing records.
fn marked(m: &Migration, file: &str, rows: u64) -> Result<(), MigrateError> {
    if rows == 1 {
        Ok(())
    } else {
        Err(MigrateError::RowRemoved {
            version: m.version,
            file: file.to_owned(),
        })
    }
}

/// sqlx measures each migration and stores the nanoseconds afterwards.
const EXECUTION_TIME: &str = "UPDATE _sqlx_migrations SET execution_time = $1 WHERE version = $2";

/// A row of `_sqlx_migrations`.
#[derive(Debug, Clone)]
pub struct Applied {
    pub version: i64,
    pub description: String,
    pub success: bool,
    pub checksum: Vec<u8>,
    pub installed_on: String,
}

/// `_sqlx_migrations` as read: version, description, success, checksum, installed_on.
pub(crate) type AppliedRow = (i64, String, bool, Vec<u8>, String);

impl From<AppliedRow> for Applied {
    fn from((version, description, success, checksum, installed_on): AppliedRow) -> Self {
        Applied {
            version,
            description,
            success,
            checksum,
            installed_on,
        }
    }
}

/// One version's state, for `migrate status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Applied,
    Pending,
    /// Applied, but the file's checksum differs now.
    Drift,
    /// Applied, but no file has this version.
    Missing,
    /// Marked as failed in the history: a `-- no-transaction` migration that failed
    /// part-way (or whose migrator died).
    Dirty,
    /// Marked as failed in the history while another session holds the migration lock:
    /// a `-- no-transaction` migration still running, not (yet) a failure.
    Running,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Applied => "applied",
            State::Pending => "pending",
            State::Drift => "CHECKSUM DRIFT",
            State::Missing => "FILE MISSING",
            State::Dirty => "FAILED (dirty)",
            State::Running => "RUNNING",
        }
    }
}

/// Files and history compared.
#[derive(Debug, Clone)]
pub struct Assessment {
    /// Every version seen, ascending: (version, description, state, installed_on).
    pub rows: Vec<(i64, String, State, Option<String>)>,
    /// Up migrations to apply, ascending.
    pub pending: Vec<Migration>,
    /// What blocks applying, one sentence each.
    pub problems: Vec<String>,
    pub drift: usize,
    pub applied_version: Option<i64>,
    /// Another session holding the migration lock (PostgreSQL): its process id.
    pub running: Option<i32>,
}

/// A file sqlx reads as a migration: `<version>_<description>.sql` (or `.up.sql`,
/// `.down.sql`).
struct MigrationFile {
    version: i64,
    down: bool,
    name: String,
}

/// The migration files in `dir`, by name, chosen as sqlx's reader chooses them:
/// regular files (links followed) whose name splits at the first `_` into an integer
/// and a rest ending in `.sql`. sqlx reports a bad version itself; it is skipped here.
fn scan(dir: &Path) -> std::io::Result<Vec<MigrationFile>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((version, rest)) = name.split_once('_') else {
            continue;
        };
        let Ok(version) = version.parse::<i64>() else {
            continue;
        };
        if rest.ends_with(".sql") {
            files.push(MigrationFile {
                version,
                down: rest.ends_with(".down.sql"),
                name,
            });
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Two up files (or two down files) with one version: sqlx would read both, and which
/// one a history row belongs to would be a guess. An up file and its `.down.sql` are a
/// pair, not a duplicate.
fn refuse_duplicates(dir: &Path, files: &[MigrationFile]) -> Result<(), MigrateError> {
    let mut seen: std::collections::HashMap<(i64, bool), &str> = Default::default();
    for f in files {
        if let Some(first) = seen.insert((f.version, f.down), &f.name) {
            return Err(MigrateError::Duplicate {
                dir: dir.to_owned(),
                version: f.version,
                first: first.to_owned(),
                second: f.name.clone(),
            });
        }
    }
    Ok(())
}

/// The migrations in `dir`, up migrations only, ascending; refuses two files with one
/// version.
pub async fn read_dir(dir: &Path) -> Result<Vec<Migration>, MigrateError> {
    let read_error = |source: ReadFailure| MigrateError::Read {
        dir: dir.to_owned(),
        source,
    };
    if !dir.is_dir() {
        return Err(read_error(ReadFailure::NotADirectory));
    }
    let migrator = Migrator::new(dir).await.map_err(|e| read_error(e.into()))?;
    let names = scan(dir).map_err(|e| read_error(e.into()))?;
    refuse_duplicates(dir, &names)?;
    let mut up: Vec<Migration> = migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .cloned()
        .collect();
    up.sort_by_key(|m| m.version);
    Ok(up)
}

/// The file a version comes from, for messages.
pub fn file_name(dir: &Path, version: i64) -> String {
    scan(dir)
        .ok()
        .and_then(|files| {
            files
                .into_iter()
                .find(|f| f.version == version && !f.down)
                .map(|f| f.name)
        })
        .unwrap_or_else(|| format!("{version}_*.sql"))
}

/// Compares the files with the history. `running`: the process id of another session
/// holding the migration lock, whose failed-looking rows are migrations in progress.
pub fn assess(
    dir: &Path,
    files: &[Migration],
    applied: &[Applied],
    out_of_order: OutOfOrder,
    running: Option<i32>,
) -> Assessment {
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    let mut pending = Vec::new();
    let mut drift = 0;
    let newest_applied = applied
        .iter()
        .filter(|a| a.success)
        .map(|a| a.version)
        .max();
    for a in applied {
        let file = files.iter().find(|f| f.version == a.version);
        let state = if !a.success && running.is_some() {
            // The row a `-- no-transaction` migration writes before it runs; the lock
            // holder marks it applied (or leaves it failed) when it ends. Repairing it
            // now would race the running migration.
            State::Running
        } else if !a.success {
            problems.push(format!(
                "migration {} ({}) is marked failed (dirty) in _sqlx_migrations, so nothing is applied until you act: {}",
                a.version,
                file.map_or_else(|| a.description.clone(), |_| file_name(dir, a.version)),
                repair_hint(a.version)
            ));
            State::Dirty
        } else if let Some(f) = file {
            if *f.checksum != *a.checksum {
                drift += 1;
                problems.push(format!(
                    "migration {} ({}) was changed after it was applied (checksum differs); restore the file as it was applied and put changes in a new migration",
                    a.version,
                    file_name(dir, a.version)
                ));
                State::Drift
            } else {
                State::Applied
            }
        } else {
            problems.push(format!(
                "migration {} ({}) is applied but its file is missing from {}; restore the file",
                a.version,
                a.description,
                dir.display()
            ));
            State::Missing
        };
        rows.push((
            a.version,
            a.description.clone(),
            state,
            Some(a.installed_on.clone()),
        ));
    }
    for f in files {
        if applied.iter().any(|a| a.version == f.version) {
            continue;
        }
        if newest_applied.is_some_and(|newest| f.version < newest)
            && out_of_order == OutOfOrder::Error
        {
            problems.push(format!(
                "migration {} ({}) is pending but newer migration {} is already applied; set out-of-order = \"apply\" to apply it anyway",
                f.version,
                file_name(dir, f.version),
                newest_applied.unwrap_or_default()
            ));
        }
        rows.push((f.version, f.description.to_string(), State::Pending, None));
        pending.push(f.clone());
    }
    rows.sort_by_key(|r| r.0);
    Assessment {
        rows,
        pending,
        problems,
        drift,
        applied_version: newest_applied,
        running,
    }
}

/// What applying migrations needs from a database, implemented once per backend;
/// the apply loop ([`MigrateJob::run`]) is written once against it. Native `async
/// fn`, reached statically through [`with_backend!`].
pub(crate) trait MigrationBackend {
    /// Where the loop runs. PostgreSQL: a session of its own holding sqlx's migration
    /// lock. SQLite: nothing (each migration takes the file's write lock itself).
    type Session;

    /// `_sqlx_migrations` ascending by version, or nothing if it does not exist yet.
    async fn applied(&self) -> Result<Vec<Applied>, MigrateError>;

    /// The process id of another session holding the migration lock (a migrator at
    /// work, whose `-- no-transaction` migration's row says failed until it ends).
    async fn lock_holder(&self) -> Result<Option<i32>, MigrateError> {
        Ok(None)
    }

    /// Opens the session (waiting for the lock) and creates `_sqlx_migrations` if it
    /// is missing. On an error nothing is held.
    async fn open(
        &self,
        job: &MigrateJob,
        cancel: &CancellationToken,
    ) -> Result<Self::Session, MigrateError>;

    /// Ends the session, releasing what it holds.
    async fn close(&self, session: Self::Session);

    /// What to do before `m` is applied (PostgreSQL: drop INVALID indexes it names,
    /// with `drop-invalid-indexes`).
    async fn prepare(
        &self,
        _session: &mut Self::Session,
        _job: &MigrateJob,
        _m: &Migration,
    ) -> Result<(), MigrateError> {
        Ok(())
    }

    /// Applies `m` from `file` with its history row (in one transaction, or for a
    /// `-- no-transaction` file marked failed first and applied once it ran through).
    /// `Ok(false)`: another migrator applied it meanwhile. On `cancel` it returns
    /// [`MigrateError::Cancelled`] once the statement has stopped.
    async fn apply(
        &self,
        session: &mut Self::Session,
        job: &MigrateJob,
        m: &Migration,
        file: &str,
        cancel: &CancellationToken,
    ) -> Result<bool, MigrateError>;

    /// Stores how long `m` took, as sqlx does ([`EXECUTION_TIME`]); best effort.
    async fn record_time(&self, session: &mut Self::Session, m: &Migration, nanos: i64);
}

/// A configured migrate job.
#[derive(Debug)]
pub struct MigrateJob {
    pub cfg: MigrateConfig,
    /// The database's backup job, for `backup-first` (the same one its
    /// `<database>.backup` job runs; `None` without `[database.backup]`).
    pub backup: Option<Arc<BackupJob>>,
    /// Where migration commands run: `working-dir`, taken from the directory of the
    /// config file that declares the database (which is the default).
    pub workdir: PathBuf,
}

/// Waiting for a migration lock by polling, never a blocking wait (see
/// `postgres.rs`): after each failed try, [`LockWait::pause`].
pub(crate) struct LockWait<'a> {
    database: &'a str,
    wait: Duration,
    started: Instant,
    told: bool,
}

impl<'a> LockWait<'a> {
    pub(crate) fn new(database: &'a str, wait: Duration) -> Self {
        LockWait {
            database,
            wait,
            started: Instant::now(),
            told: false,
        }
    }

    /// The lock was not free: [`MigrateError::LockTimeout`] once `wait` is over,
    /// [`MigrateError::Cancelled`] on `cancel`, else a pause before the next try.
    pub(crate) async fn pause(&mut self, cancel: &CancellationToken) -> Result<(), MigrateError> {
        const POLL: Duration = Duration::from_millis(250);
        if self.started.elapsed() >= self.wait {
            return Err(MigrateError::LockTimeout(self.wait));
        }
        if !self.told {
            tracing::info!(
                database = self.database,
                "another migrator holds the migration lock; waiting"
            );
            self.told = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => Ok(()),
            _ = cancel.cancelled() => Err(MigrateError::Cancelled),
        }
    }
}

impl MigrateJob {
    /// The sqlx migrations directory (validation makes sure a job without
    /// `command` has one).
    pub fn dir(&self) -> &Path {
        self.cfg.dir.as_deref().unwrap_or(Path::new(""))
    }

    /// Whether the migrations are another tool's, run by `command`.
    pub fn is_command(&self) -> bool {
        self.cfg.command.is_some()
    }

    /// Looks at what is pending and publishes the metrics, whichever kind of
    /// migrations these are.
    pub async fn publish_status(&self, db: &Database) -> Result<(), MigrateError> {
        if self.is_command() {
            self.command_status(db).await.map(drop)
        } else {
            self.status(db).await.map(drop)
        }
    }

    /// Reads the files and the history (creating nothing) and publishes the metrics.
    pub async fn status(&self, db: &Database) -> Result<Assessment, MigrateError> {
        let files = read_dir(self.dir()).await.inspect_err(|e| {
            // Two files with one version block applying like any other problem.
            if matches!(e, MigrateError::Duplicate { .. }) {
                metrics::migrations_blocked(db.name(), 1);
            }
        })?;
        // A SQLite `-- no-transaction` migration holds no lock while it runs.
        let (applied, running) =
            with_backend!(db, b => (b.applied().await?, b.lock_holder().await?));
        let a = assess(self.dir(), &files, &applied, self.cfg.out_of_order, running);
        metrics::migrations(
            db.name(),
            a.pending.len(),
            a.applied_version,
            a.drift,
            a.problems.len(),
        );
        Ok(a)
    }

    /// One migration run. Its pre-migration backup is pinned (see
    /// `repo::catalog::pins`) as soon as it exists; a run that applied successfully
    /// releases every pin of the database and of the files sets taken with it. A run
    /// that found nothing to apply releases nothing: a pending-command may say "up to
    /// date" of a database a failed command left half-migrated (round 3, case 04).
    pub async fn run(
        &self,
        db: &Database,
        cancel: &CancellationToken,
    ) -> Result<Outcome, MigrateError> {
        let outcome = if self.is_command() {
            self.run_commands(db, cancel).await
        } else {
            self.run_directory(db, cancel).await
        }?;
        let applied = !self.is_command() || outcome.details["applied"] == true;
        if applied {
            self.unpin(db);
        }
        Ok(outcome)
    }

    /// Releases `db`'s pins in every destination of its backups and files sets (and
    /// in the state directory's record of the first version). One that cannot be
    /// removed stays (it only keeps a backup longer) and is logged.
    fn unpin(&self, db: &Database) {
        let Some(b) = &self.backup else {
            return;
        };
        let mut names = vec![db.name().to_owned()];
        for (name, place) in b.places_with_files(db.name()) {
            if let Err(e) = catalog::pins::unpin_all(&*place.store, db.name()) {
                tracing::warn!(
                    database = db.name(),
                    destination = %place.label(),
                    "cannot release the pinned pre-migration backups: {e}"
                );
            }
            names.push(name);
        }
        if let Some(dir) = b.state_dir() {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            if let Err(e) = catalog::pins::legacy_unpin_all(dir, db.name(), &names) {
                tracing::warn!(
                    database = db.name(),
                    "cannot release the pinned pre-migration backups: {e}"
                );
            }
        }
    }

    /// Pins pre-migration backup `id` in every destination of the database and its
    /// files sets. Any that cannot be written fails the run before the migration:
    /// an unpinned backup could be rotated away by the retry of a failed one.
    fn pin(&self, db: &Database, id: &str) -> Result<(), MigrateError> {
        let Some(b) = &self.backup else {
            return Ok(());
        };
        for (_, place) in b.places_with_files(db.name()) {
            catalog::pins::pin(&*place.store, db.name(), id).map_err(|source| {
                MigrateError::Pin {
                    backup: id.to_owned(),
                    destination: place.label(),
                    source,
                }
            })?;
        }
        Ok(())
    }

    async fn run_directory(
        &self,
        db: &Database,
        cancel: &CancellationToken,
    ) -> Result<Outcome, MigrateError> {
        let result = with_backend!(db, b => self.apply_on(db, b, cancel).await);
        // Whatever happened, the metrics show the state now.
        if let Err(e) = self.status(db).await {
            tracing::warn!(database = db.name(), "cannot read migration status: {e}");
        }
        let (applied, backup_id) = result?;
        let summary = if applied.is_empty() {
            "up to date, nothing to apply".to_owned()
        } else {
            format!(
                "applied {} migrations ({}){}",
                applied.len(),
                applied
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                backup_id
                    .as_ref()
                    .map_or(String::new(), |id| format!(" after backup {id}"))
            )
        };
        Ok(Outcome {
            summary,
            details: serde_json::json!({ "applied": applied, "pre_migration_backup": backup_id }),
        })
    }

    /// Applies what is pending on `b`, the backend of `db`; returns the applied
    /// versions and the pre-migration backup's id.
    async fn apply_on<B: MigrationBackend>(
        &self,
        db: &Database,
        b: &B,
        cancel: &CancellationToken,
    ) -> Result<(Vec<i64>, Option<String>), MigrateError> {
        let files = read_dir(self.dir()).await?;
        let mut session = b.open(self, cancel).await?;
        let result = self
            .apply_pending(db, b, &mut session, &files, cancel)
            .await;
        b.close(session).await;
        result
    }

    /// The apply loop, inside the backend's session.
    async fn apply_pending<B: MigrationBackend>(
        &self,
        db: &Database,
        b: &B,
        session: &mut B::Session,
        files: &[Migration],
        cancel: &CancellationToken,
    ) -> Result<(Vec<i64>, Option<String>), MigrateError> {
        let history = b.applied().await?;
        let (pending, backup_id) = self.prepare(db, files, &history, cancel).await?;
        if self.cfg.dry_run_on_copy && !pending.is_empty() {
            self.dry_run_files(db, backup_id.as_deref(), files, cancel)
                .await?;
        }
        let done = self.apply_each(db, b, session, &pending, cancel).await?;
        Ok((done, backup_id))
    }

    /// Applies `pending` in order in the backend's session; returns the versions
    /// this run applied.
    async fn apply_each<B: MigrationBackend>(
        &self,
        db: &Database,
        b: &B,
        session: &mut B::Session,
        pending: &[Migration],
        cancel: &CancellationToken,
    ) -> Result<Vec<i64>, MigrateError> {
        let mut done = Vec::new();
        for m in pending {
            if cancel.is_cancelled() {
                return Err(MigrateError::Cancelled);
            }
            let file = file_name(self.dir(), m.version);
            b.prepare(session, self, m).await?;
            tracing::info!(
                database = db.name(),
                version = m.version,
                file,
                "applying migration"
            );
            let started = Instant::now();
            let applied = b.apply(session, self, m, &file, cancel).await;
            // Not when another migrator applied it meanwhile (its row is not ours), nor
            // when cancelled (nothing ran to the end).
            if !matches!(applied, Ok(false) | Err(MigrateError::Cancelled)) {
                b.record_time(session, m, started.elapsed().as_nanos() as i64)
                    .await;
            }
            if applied? {
                done.push(m.version);
            }
        }
        Ok(done)
    }

    /// `dry-run-on-copy` for migration files: the same assessment and apply loop on
    /// a scratch copy restored from pre-migration backup `backup_id`, then removed.
    async fn dry_run_files(
        &self,
        db: &Database,
        backup_id: Option<&str>,
        files: &[Migration],
        cancel: &CancellationToken,
    ) -> Result<(), MigrateError> {
        let id = backup_id.ok_or(MigrateError::Copy(BackupFailure::NoBackup))?;
        let copy = self.scratch_copy(db, id, cancel).await?;
        tracing::info!(
            database = db.name(),
            backup = id,
            "applying the migrations to a scratch copy first"
        );
        let copy_db = copy.database();
        let result =
            with_backend!(&copy_db, b => self.apply_on_copy(&copy_db, b, files, cancel).await);
        copy_db.close().await;
        copy.remove().await;
        result.map_err(|e| dry_run_failed(id, e))
    }

    /// The apply loop on a scratch copy `db` (no backup: it is one).
    async fn apply_on_copy<B: MigrationBackend>(
        &self,
        db: &Database,
        b: &B,
        files: &[Migration],
        cancel: &CancellationToken,
    ) -> Result<(), MigrateError> {
        let mut session = b.open(self, cancel).await?;
        let result = async {
            let history = b.applied().await?;
            let a = assess(self.dir(), files, &history, self.cfg.out_of_order, None);
            if !a.problems.is_empty() {
                return Err(MigrateError::Blocked(a.problems));
            }
            self.apply_each(db, b, &mut session, &a.pending, cancel)
                .await
                .map(drop)
        }
        .await;
        b.close(session).await;
        result
    }

    /// Compares files and history; when something is pending and nothing blocks, takes
    /// the pre-migration backup. Returns the migrations to apply (none: up to date) and
    /// the backup's id.
    async fn prepare(
        &self,
        db: &Database,
        files: &[Migration],
        history: &[Applied],
        cancel: &CancellationToken,
    ) -> Result<(Vec<Migration>, Option<String>), MigrateError> {
        // Called under the migration lock (or SQLite): nobody else is running one.
        let a = assess(self.dir(), files, history, self.cfg.out_of_order, None);
        if !a.problems.is_empty() {
            return Err(MigrateError::Blocked(a.problems));
        }
        if a.pending.is_empty() {
            return Ok((Vec::new(), None));
        }
        let backup_id = self.backup_first(db, cancel).await?;
        Ok((a.pending, backup_id))
    }

    /// A scratch copy of `db` restored from pre-migration backup `id` (from the first
    /// destination that has it), for a dry run.
    async fn scratch_copy<'a>(
        &'a self,
        db: &'a Database,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<ScratchCopy<'a>, MigrateError> {
        let copy_err = MigrateError::Copy;
        let b = self
            .backup
            .as_ref()
            .ok_or(copy_err(BackupFailure::NotConfigured))?;
        // A dry run a crash interrupted left its copy: remove it (and any other
        // scratch database no live process owns) before making another.
        if let Database::Postgres(pg) = db {
            pg.tidy_scratch_databases().await;
        }
        let name = format!("{id}{ARCHIVE_SUFFIX}");
        let archive = b
            .places(db.name())
            .iter()
            .find_map(|p| p.store.open(&name).ok())
            .ok_or_else(|| copy_err(BackupFailure::NotFound(id.to_owned())))?;
        verify::restore_scratch(&*archive, &b.keys, &b.scratch_target(db), "dryrun", cancel)
            .await
            .map_err(|e| copy_err(BackupFailure::Failed(Box::new(e))))
    }

    /// Takes and verifies the pre-migration backup (when configured); returns its id.
    async fn backup_first(
        &self,
        db: &Database,
        cancel: &CancellationToken,
    ) -> Result<Option<String>, MigrateError> {
        if !self.cfg.backup_first {
            return Ok(None);
        }
        let Some(b) = &self.backup else {
            return Err(MigrateError::Backup(BackupFailure::NotConfigured));
        };
        let started = Utc::now();
        let outcome = b
            .run_verified(Some(db), BackupKind::PreMigration, VerifyMode::Read, cancel)
            .await
            .map_err(|e| MigrateError::Backup(BackupFailure::Failed(Box::new(e))))?;
        let id = outcome.details["backup_id"].as_str().map(str::to_owned);
        if let Some(id) = &id {
            self.pin(db, id)?;
        }
        tracing::info!(
            database = db.name(),
            backup = id.as_deref().unwrap_or("?"),
            took_s = (Utc::now() - started).num_milliseconds() as f64 / 1000.0,
            "pre-migration backup taken and verified"
        );
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn file(version: i64, sql: &'static str) -> Migration {
        Migration::new(
            version,
            Cow::Owned(format!("m{version}")),
            sqlx::migrate::MigrationType::Simple,
            sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(sql)),
            false,
        )
    }

    fn applied(m: &Migration) -> Applied {
        Applied {
            version: m.version,
            description: m.description.to_string(),
            success: true,
            checksum: m.checksum.to_vec(),
            installed_on: "2026-01-01".into(),
        }
    }

    #[test]
    fn pending_drift_missing_dirty_and_out_of_order() {
        let dir = Path::new("/nonexistent");
        let files = vec![file(1, "a"), file(2, "b"), file(3, "c"), file(5, "e")];
        let mut history = vec![applied(&files[0]), applied(&files[2])];
        let a = assess(dir, &files, &history, OutOfOrder::Error, None);
        assert_eq!(
            a.pending.iter().map(|m| m.version).collect::<Vec<_>>(),
            [2, 5]
        );
        assert_eq!(a.problems.len(), 1, "2 is out of order: {:?}", a.problems);
        assert!(a.problems[0].contains("out-of-order"));
        assert!(assess(dir, &files, &history, OutOfOrder::Apply, None)
            .problems
            .is_empty());

        history[0].checksum[0] ^= 1;
        history.push(Applied {
            version: 4,
            description: "gone".into(),
            ..applied(&files[0])
        });
        history.push(Applied {
            version: 9,
            success: false,
            ..applied(&files[3])
        });
        let a = assess(dir, &files, &history, OutOfOrder::Apply, None);
        let states: Vec<(i64, State)> = a.rows.iter().map(|r| (r.0, r.2)).collect();
        assert_eq!(
            states,
            [
                (1, State::Drift),
                (2, State::Pending),
                (3, State::Applied),
                (4, State::Missing),
                (5, State::Pending),
                (9, State::Dirty)
            ]
        );
        assert_eq!(a.drift, 1);
        assert_eq!(a.problems.len(), 3);
        assert_eq!(a.applied_version, Some(4));

        let a = assess(dir, &files, &history, OutOfOrder::Apply, Some(42));
        assert_eq!(a.rows.last().map(|r| r.2), Some(State::Running));
        assert_eq!(a.problems.len(), 2, "a running migration is no problem");
    }

    #[test]
    fn what_stays_until_an_operator_acts_is_not_retried() {
        assert!(!MigrateError::Blocked(vec!["dirty".into()]).is_transient());
        assert!(!MigrateError::RowRemoved {
            version: 1,
            file: "1_a.sql".into()
        }
        .is_transient());
        assert!(MigrateError::LockTimeout(std::time::Duration::from_secs(1)).is_transient());
        let e = failed(&file(1, "a"), "1_a.sql", false, MigrateError::Cancelled);
        assert!(e.is_transient());
        assert!(
            e.to_string()
                .ends_with("nothing after it was applied: cancelled"),
            "{e}"
        );
    }

    #[test]
    fn two_files_with_one_version_are_refused_but_an_up_down_pair_is_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str| std::fs::write(dir.path().join(name), "SELECT 1;").expect("write");
        for name in [
            "1_a.up.sql",
            "1_a.down.sql",
            "2_b.sql",
            "2_b.down.sql",
            "README.md",
            "3_notes.txt",
        ] {
            write(name);
        }
        std::fs::create_dir(dir.path().join("4_dir.sql")).expect("mkdir");
        let files = scan(dir.path()).expect("scan");
        assert_eq!(files.len(), 4, "only migration files");
        assert!(refuse_duplicates(dir.path(), &files).is_ok());
        assert_eq!(file_name(dir.path(), 2), "2_b.sql");

        write("02_c.sql");
        let e =
            refuse_duplicates(dir.path(), &scan(dir.path()).expect("scan")).expect_err("2 twice");
        let text = e.to_string();
        assert!(
            text.contains("02_c.sql") && text.contains("2_b.sql") && text.contains("version 2"),
            "{text}"
        );
        assert!(e.is_config());
    }
}

//! `retention` jobs (`<database>.retention.<name>`): delete expired rows in small
//! committed batches, never one long lock.
//!
//! The rule: a row is deleted only when the database itself, in the DELETE statement
//! that removes it, reads the row's time as an instant before the cutoff
//! (`now - older-than`) and `where` holds. Picking candidates (by `ctid`, rowid or
//! primary key) is only an optimisation: the DELETE repeats the whole predicate, and on
//! PostgreSQL hierarchies each table is addressed on its own (`ONLY`), so a batch can
//! never touch a row it did not select. Values the backend cannot read as a time are
//! never deleted: they are counted (`retention plan`, the
//! `dbkeeper_retention_unreadable_rows` gauge) and warned about once per run. What a
//! value means is [`Reading`]'s business (`reading.rs`).
//!
//! What a rule needs from a database is the [`RetentionBackend`] contract, implemented
//! once per backend (`sqlite.rs`, `postgres.rs`): catalog look-up, the SQL of the
//! predicates, counting, one batch's DELETE, partitions. The rest (check, preview,
//! the batch loop and its sizing, the census and the outcome) is written once here
//! against it.
//!
//! Each batch is its own short transaction with a lock timeout, sized to take about
//! `batch-time`, so concurrent writers wait at most for one batch. With
//! `archive = true` every batch is written to an encrypted archive, durably, before
//! its transaction commits. PostgreSQL partitioned tables can instead drop or detach
//! whole expired partitions.

mod postgres;
mod reading;
mod sqlite;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

pub use reading::{Cutoff, Reading};

use super::Outcome;
use crate::config::{RetentionConfig, RetentionMode, ScanMode};
use crate::db::{with_backend, Database, DbError, NameError, QualifiedName};
use crate::metrics;
use crate::repo::archive::{self, ArchiveError, Compression, Header, Key, KeyRing, Settings};
use crate::repo::storage::{FanOut, Place};

/// A retention run failed.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("table {table} does not exist in database \"{database}\"; fix `table` in [[database.retention]]")]
    NoTable { database: String, table: String },
    #[error("column \"{column}\" does not exist in table {table}; fix `column` in [[database.retention]]")]
    NoColumn { table: String, column: String },
    #[error("column \"{column}\" of {table} has type {kind}; retention needs a timestamptz, timestamp or date column, or a number of epoch-unit since 1970")]
    ColumnType {
        table: String,
        column: String,
        kind: String,
    },
    #[error("{table} is referenced by {referencing} with ON DELETE CASCADE, SET NULL or SET DEFAULT, so deleting its rows would change rows no rule names; add retention rules for those tables, or set cascade = true to accept it")]
    Cascade { table: String, referencing: String },
    #[error("{table} has columns named rowid, _rowid_ and oid and no NOT NULL primary key, so its rows cannot be addressed one by one; rename one of those columns or declare the key NOT NULL")]
    Unaddressable { table: String },
    #[error("{table} has the foreign table {child} below it, whose rows dbkeeper cannot address one by one; point the rule at the local tables instead")]
    ForeignTable { table: String, child: String },
    #[error("PostgreSQL does not know column-timezone \"{zone}\" ({source}); use a zone from pg_timezone_names")]
    UnknownZone {
        zone: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot tell the database's default TimeZone, which timestamp/date values of \"{column}\" are read in ({source}); set column-timezone in the rule, or GRANT pg_read_all_settings to dbkeeper's role")]
    DefaultZone {
        column: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("{table} is not a partitioned table; use mode = \"delete\"")]
    NotPartitioned { table: String },
    #[error("{table} is partitioned by {keydef}, not by RANGE on the retention column alone; use mode = \"delete\"")]
    PartitionKey { table: String, keydef: String },
    #[error("partition modes need PostgreSQL; use mode = \"delete\"")]
    PartitionsNeedPostgres,
    /// A target resolved by one backend handed to another: a bug.
    #[error("ctid is PostgreSQL's; SQLite tables are addressed by row id")]
    CtidOnSqlite,
    #[error("`where` does not fit the table ({0}); fix `where` in [[database.retention]]")]
    Where(#[source] DbError),
    #[error("cannot archive the batch before deleting it (nothing was deleted): {0}")]
    Archive(#[source] ArchiveFailure),
    #[error("older-than reaches before year 1; use a shorter older-than")]
    Cutoff,
    #[error("cancelled after deleting {deleted} rows")]
    Cancelled { deleted: u64 },
}

impl RetentionError {
    /// Refuses a rule on `table` if any table in `referencing` would cascade into.
    fn refuse_cascades(table: &QualifiedName, referencing: Vec<String>) -> Result<(), Self> {
        if referencing.is_empty() {
            return Ok(());
        }
        Err(RetentionError::Cascade {
            table: table.to_string(),
            referencing: referencing.join(", "),
        })
    }

    /// Errors that mean the configuration does not fit the database: `check` reports
    /// them as config errors and the runner does not retry them.
    pub fn is_config_error(&self) -> bool {
        use RetentionError as E;
        match self {
            E::NoTable { .. }
            | E::NoColumn { .. }
            | E::ColumnType { .. }
            | E::Cascade { .. }
            | E::Unaddressable { .. }
            | E::ForeignTable { .. }
            | E::UnknownZone { .. }
            | E::DefaultZone { .. }
            | E::NotPartitioned { .. }
            | E::PartitionKey { .. }
            | E::PartitionsNeedPostgres
            | E::CtidOnSqlite
            | E::Where(_)
            | E::Cutoff => true,
            E::Db(_) | E::Archive(_) | E::Cancelled { .. } => false,
        }
    }

    /// Whether another attempt may succeed (the runner retries), as opposed to a
    /// refusal that stays until the configuration or the database changes: every
    /// error but [`RetentionError::is_config_error`]'s.
    pub fn is_transient(&self) -> bool {
        !self.is_config_error()
    }
}

/// Why a batch could not be archived (so it was not deleted).
#[derive(Debug, thiserror::Error)]
pub enum ArchiveFailure {
    #[error("{}: {source}", .dir.display())]
    Directory {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] std::io::Error),
    #[error(transparent)]
    Write(#[from] ArchiveError),
    #[error("the archive does not read back: {0}")]
    ReadBack(#[source] ArchiveError),
}

/// How one batch names the rows it picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowKey {
    /// PostgreSQL: `ctid`, unique within one table (each table is addressed with ONLY).
    Ctid,
    /// SQLite: the real row id under a name no column shadows (`rowid`, `_rowid_` or
    /// `oid`).
    Rowid(&'static str),
    /// SQLite WITHOUT ROWID tables (or every rowid alias shadowed): the quoted
    /// primary-key columns.
    PrimaryKey(Vec<String>),
}

/// The table and column, checked against the catalog and quoted.
#[derive(Debug, Clone)]
pub struct Target {
    /// The table as configured, for messages and metric labels.
    pub table: String,
    /// Quoted, schema-qualified: counts through it include inheritance children.
    pub table_sql: String,
    /// The configured table's own name, quoted: every statement names the table (or
    /// the child it deletes from) by it, so `where` may say `events.kind`.
    pub alias: String,
    pub column_sql: String,
    pub reading: Reading,
    /// Quoted tables that hold the rows, each deleted from on its own: PostgreSQL's
    /// table and every inheritance child or leaf partition, SQLite's one table.
    pub relations: Vec<String>,
    pub row_key: RowKey,
    /// PostgreSQL: the relation's oid, for partition look-ups.
    pub oid: Option<u32>,
    pub partitioned: bool,
    /// The rule's `where` (the operator's SQL), which limits the rows it covers.
    pub where_clause: Option<String>,
}

/// What `retention plan` shows for one rule.
#[derive(Debug, Clone)]
pub struct Preview {
    pub cutoff: DateTime<Utc>,
    pub expired_rows: u64,
    /// Rows (matching `where`) whose time cannot be read: never deleted.
    pub unreadable_rows: u64,
    pub oldest: Option<DateTime<Utc>>,
    /// How the column is read, e.g. `timestamp in America/New_York`.
    pub reading: String,
    /// Partition modes: the partitions that would go.
    pub partitions: Vec<String>,
}

/// Where archived batches go: `<destination>/<database>/retention/<job>/` in every
/// destination of the database's backups.
#[derive(Debug, Clone)]
pub struct ArchiveTo {
    pub places: Vec<Place>,
    pub key: Option<Key>,
    /// The backups' age recipients: the export's data key is wrapped for them too
    /// (format version 3), as for a backup.
    pub recipients: Vec<crate::keys::Recipient>,
    /// The configured key file: with one, a missing key is an error, never a
    /// plaintext archive.
    pub key_file: Option<PathBuf>,
    pub compression: Compression,
    pub level: i32,
}

/// A configured retention job.
#[derive(Debug)]
pub struct RetentionJob {
    pub cfg: RetentionConfig,
    /// The job name, the `rule` label of the retention metrics.
    pub rule: String,
    pub table: QualifiedName,
    pub archive: Option<ArchiveTo>,
}

/// What retention needs from a database, implemented once per backend. SQL fragments
/// (`expired`, `unreadable`, `condition`) are the backend's own; `where` is the
/// operator's SQL, spliced as `(predicate) AND (where)` by [`with_where`].
///
/// Native `async fn`: the kind's code is generic over the backend and reached through
/// [`with_backend!`], so every call is static and no future is boxed.
pub(crate) trait RetentionBackend {
    /// The table and column as the catalog knows them; errors name what is missing or
    /// what the rule may not do (cascading foreign keys, unknown zones).
    async fn resolve(
        &self,
        table: &QualifiedName,
        cfg: &RetentionConfig,
    ) -> Result<Target, RetentionError>;

    /// SQL true exactly for values read as an instant before the cutoff.
    fn expired(&self, target: &Target, cutoff: Cutoff) -> String;

    /// The database server's clock where it has its own (PostgreSQL); `None` where
    /// it is this host's (SQLite).
    async fn clock(&self) -> Result<Option<DateTime<Utc>>, RetentionError> {
        Ok(None)
    }

    /// SQL true for non-null values that are not a time.
    fn unreadable(&self, target: &Target) -> String;

    /// Compiles or plans (without running) what every batch would run, so a `where`
    /// that does not fit the table fails `check`, not the first run.
    async fn validate(&self, target: &Target, condition: &str) -> Result<(), RetentionError>;

    /// Rows (children included) matching `condition` (a predicate [`with_where`]).
    async fn count(&self, target: &Target, condition: &str) -> Result<u64, RetentionError>;

    /// The oldest readable time among the rows the rule covers (`where` included).
    /// `from`: a run just went through every table, so the backend may look only from
    /// the cutoff on.
    async fn oldest(
        &self,
        target: &Target,
        from: Option<Cutoff>,
    ) -> Result<Option<DateTime<Utc>>, RetentionError>;

    /// How to walk one relation batch by batch; by rows unless the backend can do
    /// better.
    async fn scan_for(
        &self,
        _target: &Target,
        _relation: &str,
        _condition: &str,
        _mode: ScanMode,
    ) -> Result<Scan, RetentionError> {
        Ok(Scan::Rows { after: None })
    }

    /// Deletes one batch in its own transaction; the DELETE repeats the condition.
    /// With [`Batch::archive`], the rows are archived durably before the commit.
    async fn delete_batch(
        &self,
        target: &Target,
        batch: &Batch<'_>,
    ) -> Result<BatchDone, RetentionError>;

    /// Partition modes: the table must be partitioned by RANGE on the column alone.
    /// (The config allows partition modes on PostgreSQL only.)
    async fn check_partition_key(&self, _target: &Target) -> Result<(), RetentionError> {
        Ok(())
    }

    /// Partition modes: the partitions that would go now, oldest first.
    async fn expired_partitions(
        &self,
        _target: &Target,
        _cutoff: Cutoff,
    ) -> Result<Vec<String>, RetentionError> {
        Ok(Vec::new())
    }

    /// Partition modes: drops (or detaches) every expired partition; returns them and
    /// the rows they held.
    async fn remove_partitions(
        &self,
        _target: &Target,
        _cutoff: Cutoff,
        _detach: bool,
        _lock_timeout: Duration,
    ) -> Result<(Vec<String>, u64), RetentionError> {
        Err(RetentionError::PartitionsNeedPostgres)
    }
}

/// What the backends report about the rows a rule covers, besides deleting them.
struct Census {
    expired: u64,
    unreadable: u64,
    oldest: Option<DateTime<Utc>>,
}

impl RetentionJob {
    pub fn new(cfg: RetentionConfig, archive: Option<ArchiveTo>) -> Result<Self, NameError> {
        let table = QualifiedName::parse(&cfg.table)?;
        Ok(RetentionJob {
            rule: cfg.job_name(),
            cfg,
            table,
            archive,
        })
    }

    /// The table and column as the catalog knows them; errors name what is missing
    /// or what the rule may not do (cascading foreign keys, unknown zones).
    pub async fn resolve(&self, db: &Database) -> Result<Target, RetentionError> {
        with_backend!(db, b => b.resolve(&self.table, &self.cfg).await)
    }

    /// What `check` asks: the rule fits the database (table, column, zone, foreign
    /// keys, partition key, and a `where` that plans on every table). Reads nothing
    /// but the catalog.
    pub async fn check(&self, db: &Database) -> Result<Target, RetentionError> {
        with_backend!(db, b => self.check_on(b).await)
    }

    async fn check_on(&self, b: &impl RetentionBackend) -> Result<Target, RetentionError> {
        let target = b.resolve(&self.table, &self.cfg).await?;
        let cutoff = self.cutoff(Utc::now())?;
        if self.cfg.mode != RetentionMode::Delete {
            b.check_partition_key(&target).await?;
        }
        let condition = with_where(
            &b.expired(&target, cutoff),
            self.cfg.where_clause.as_deref(),
        );
        b.validate(&target, &condition).await?;
        Ok(target)
    }

    fn cutoff(&self, now: DateTime<Utc>) -> Result<Cutoff, RetentionError> {
        Cutoff::before(now, self.cfg.older_than).ok_or(RetentionError::Cutoff)
    }

    /// Counts what the rule covers now. `after_full_run`: a run just went through every
    /// table, so the oldest row is looked for from the cutoff on (see
    /// [`RetentionBackend::oldest`]).
    async fn census(
        &self,
        b: &impl RetentionBackend,
        target: &Target,
        cutoff: Cutoff,
        count_expired: bool,
        after_full_run: bool,
    ) -> Result<Census, RetentionError> {
        let w = self.cfg.where_clause.as_deref();
        let expired = if count_expired {
            b.count(target, &with_where(&b.expired(target, cutoff), w))
                .await?
        } else {
            0
        };
        let unreadable = b
            .count(target, &with_where(&b.unreadable(target), w))
            .await?;
        let oldest = b.oldest(target, after_full_run.then_some(cutoff)).await?;
        Ok(Census {
            expired,
            unreadable,
            oldest,
        })
    }

    /// What a run would do now; deletes nothing.
    pub async fn preview(&self, db: &Database) -> Result<Preview, RetentionError> {
        let now = self.now(db, Utc::now()).await?;
        self.preview_at(db, now).await
    }

    /// "Now" for a rule: the earlier of this host's clock (`local`) and the database
    /// server's. Rows are written with the server's clock; dbkeeper's running ahead
    /// of it (a bad clock, a paused VM) must not make fresh rows look old, and the
    /// earlier clock can only delete less.
    pub async fn now(
        &self,
        db: &Database,
        local: DateTime<Utc>,
    ) -> Result<DateTime<Utc>, RetentionError> {
        let server = with_backend!(db, b => b.clock().await)?;
        Ok(match server {
            Some(server) if server < local => {
                if local - server > chrono::Duration::minutes(1) {
                    tracing::warn!(
                        database = db.name(),
                        rule = %self.rule,
                        %local,
                        %server,
                        "this host's clock is ahead of the database server's: retention uses the server's"
                    );
                }
                server
            }
            _ => local,
        })
    }

    /// [`RetentionJob::preview`] with the clock given.
    pub async fn preview_at(
        &self,
        db: &Database,
        now: DateTime<Utc>,
    ) -> Result<Preview, RetentionError> {
        with_backend!(db, b => self.preview_on(b, now).await)
    }

    async fn preview_on(
        &self,
        b: &impl RetentionBackend,
        now: DateTime<Utc>,
    ) -> Result<Preview, RetentionError> {
        let target = b.resolve(&self.table, &self.cfg).await?;
        let cutoff = self.cutoff(now)?;
        let partitions = if self.cfg.mode != RetentionMode::Delete {
            b.expired_partitions(&target, cutoff).await?
        } else {
            Vec::new()
        };
        let census = self.census(b, &target, cutoff, true, false).await?;
        Ok(Preview {
            cutoff: cutoff.instant(),
            expired_rows: census.expired,
            unreadable_rows: census.unreadable,
            oldest: census.oldest,
            reading: target.reading.to_string(),
            partitions,
        })
    }

    pub async fn run(
        &self,
        db: &Database,
        cancel: &CancellationToken,
    ) -> Result<Outcome, RetentionError> {
        self.run_with_clock(db, Utc::now(), cancel).await
    }

    /// [`RetentionJob::run`] with this host's clock given (`local`); the run uses
    /// [`RetentionJob::now`].
    pub async fn run_with_clock(
        &self,
        db: &Database,
        local: DateTime<Utc>,
        cancel: &CancellationToken,
    ) -> Result<Outcome, RetentionError> {
        let now = self.now(db, local).await?;
        self.run_at(db, now, cancel).await
    }

    /// [`RetentionJob::run`] with the clock given: the cutoff is `now - older-than`.
    pub async fn run_at(
        &self,
        db: &Database,
        now: DateTime<Utc>,
        cancel: &CancellationToken,
    ) -> Result<Outcome, RetentionError> {
        with_backend!(db, b => self.run_on(db, b, now, cancel).await)
    }

    /// [`RetentionJob::run_at`] on `b`, the backend of `db`.
    async fn run_on(
        &self,
        db: &Database,
        b: &impl RetentionBackend,
        now: DateTime<Utc>,
        cancel: &CancellationToken,
    ) -> Result<Outcome, RetentionError> {
        let target = b.resolve(&self.table, &self.cfg).await?;
        let cutoff = self.cutoff(now)?;
        metrics::retention_max_age(db.name(), &target.table, &self.rule, self.cfg.older_than);
        let mut outcome = match self.cfg.mode {
            RetentionMode::Delete => self.delete_batches(db, b, &target, cutoff, cancel).await?,
            mode => {
                let detach = mode == RetentionMode::DetachPartitions;
                let (gone, rows) = b
                    .remove_partitions(&target, cutoff, detach, self.cfg.lock_timeout)
                    .await?;
                metrics::retention_deleted(db.name(), &target.table, &self.rule, rows);
                Outcome {
                    summary: format!(
                        "{} {} partitions of {} ({}), {rows} rows",
                        if detach { "detached" } else { "dropped" },
                        gone.len(),
                        target.table,
                        gone.join(", ")
                    ),
                    details: serde_json::json!({
                        "partitions": gone, "rows": rows, "cutoff": cutoff.instant(),
                    }),
                }
            }
        };
        let full_run = self.cfg.mode == RetentionMode::Delete
            && outcome.details["stopped_early"] == serde_json::Value::Bool(false);
        let census = self.census(b, &target, cutoff, false, full_run).await?;
        metrics::retention_oldest_row(db.name(), &target.table, &self.rule, census.oldest);
        metrics::retention_unreadable(db.name(), &target.table, &self.rule, census.unreadable);
        if census.unreadable > 0 {
            tracing::warn!(
                database = db.name(),
                table = %target.table,
                rows = census.unreadable,
                reading = %target.reading,
                "rows whose {} cannot be read as a time were left alone; fix them, or set epoch-unit/column-timezone if the rule reads them wrongly",
                self.cfg.column
            );
            outcome.summary.push_str(&format!(
                "; {} rows with an unreadable {} left alone",
                census.unreadable, self.cfg.column
            ));
        }
        outcome.details["unreadable"] = census.unreadable.into();
        outcome.details["reading"] = target.reading.to_string().into();
        Ok(outcome)
    }

    async fn delete_batches(
        &self,
        db: &Database,
        b: &impl RetentionBackend,
        target: &Target,
        cutoff: Cutoff,
        cancel: &CancellationToken,
    ) -> Result<Outcome, RetentionError> {
        let cfg = &self.cfg;
        let started = Instant::now();
        let mut deleted = 0u64;
        let mut batches = 0u64;
        let mut stopped_early = false;
        // Milliseconds: two runs within one second must not collide.
        let run_stamp = Utc::now().format("%Y%m%dT%H%M%S%3fZ").to_string();
        let condition = with_where(&b.expired(target, cutoff), cfg.where_clause.as_deref());
        let mut last_size = 0;
        // Whether counting what is left is cheap (no page-range pass just left a mass
        // of dead index entries to step over).
        let mut picked_rows_only = true;
        'relations: for relation in &target.relations {
            let mut scan = b.scan_for(target, relation, &condition, cfg.scan).await?;
            picked_rows_only &= matches!(scan, Scan::Rows { .. });
            let mut size = BatchSize::new(
                scan.units(cfg.batch_size),
                scan.units(cfg.max_batch_size),
                cfg.batch_time,
            );
            loop {
                if cancel.is_cancelled() {
                    return Err(RetentionError::Cancelled { deleted });
                }
                if cfg.max_duration.is_some_and(|max| started.elapsed() >= max) {
                    stopped_early = true;
                    break 'relations;
                }
                let archive = self.archive.as_ref().map(|a| BatchArchive {
                    to: a,
                    database: db.name(),
                    backend: db.backend().as_str(),
                    name: format!("{run_stamp}-{:06}.jsonl.dbk", batches + 1),
                });
                let batch = Batch {
                    relation,
                    condition: &condition,
                    limit: size.current(),
                    lock_timeout: cfg.lock_timeout,
                    scan: &scan,
                    archive: archive.as_ref(),
                };
                let began = Instant::now();
                let done = b.delete_batch(target, &batch).await?;
                let took = began.elapsed();
                if done.rows > 0 {
                    deleted += done.rows;
                    batches += 1;
                    metrics::retention_deleted(db.name(), &target.table, &self.rule, done.rows);
                }
                let (more, units, full) = scan.advance(&done, size.current());
                if !more {
                    break;
                }
                size.observe(units, full, took);
                last_size = size.current();
                if let Some(pause) = cfg.pause.filter(|p| !p.is_zero()) {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = cancel.cancelled() => return Err(RetentionError::Cancelled { deleted }),
                    }
                }
            }
        }
        let remaining = if stopped_early || picked_rows_only {
            Some(self.census(b, target, cutoff, true, false).await?.expired)
        } else {
            None
        };
        let mut summary = format!(
            "deleted {deleted} rows older than {} from {} in {batches} batches",
            cutoff.instant().format("%Y-%m-%d %H:%M:%S%.3f UTC"),
            target.table
        );
        match remaining {
            Some(left) if stopped_early => summary.push_str(&format!(
                "; stopped after max-duration {} with {left} expired rows left",
                humantime::format_duration(cfg.max_duration.unwrap_or_default())
            )),
            Some(left) if left > 0 => {
                tracing::warn!(
                    database = db.name(),
                    table = %target.table,
                    rows = left,
                    "expired rows remain after the run (held by another transaction or kept by a trigger); the next run tries again"
                );
                summary.push_str(&format!(
                    "; {left} expired rows remain (held by another transaction or kept by a trigger)"
                ));
            }
            _ => {}
        }
        Ok(Outcome {
            summary,
            details: serde_json::json!({
                "deleted": deleted,
                "batches": batches,
                "cutoff": cutoff.instant(),
                "stopped_early": stopped_early,
                "remaining": remaining,
                "last_batch_size": last_size,
                "took_seconds": started.elapsed().as_secs_f64(),
            }),
        })
    }
}

/// Batch sizes that follow the observed speed so a batch takes about `target`.
#[derive(Debug, Clone)]
struct BatchSize {
    current: u32,
    min: u32,
    max: u32,
    target: Duration,
}

/// Smallest adapted batch: below this the per-transaction cost dominates.
const MIN_ADAPTED_BATCH: u32 = 100;

impl BatchSize {
    fn new(first: u32, max: u32, target: Duration) -> Self {
        let max = max.max(1);
        let current = first.clamp(1, max);
        BatchSize {
            current,
            min: MIN_ADAPTED_BATCH.min(current),
            max,
            target,
        }
    }

    fn current(&self) -> u32 {
        self.current
    }

    /// After a batch of `units` (rows or pages) that took `took`: aim the next one at
    /// `target`, changing by at most 4x per step. A short batch (`full` false: fewer
    /// rows than asked for) says nothing about speed at full size and only ever shrinks
    /// the next one.
    fn observe(&mut self, units: u64, full: bool, took: Duration) {
        if self.target.is_zero() || took.is_zero() {
            return;
        }
        let rate = units as f64 / took.as_secs_f64();
        let ideal = rate * self.target.as_secs_f64();
        let lo = f64::from(self.current) / 4.0;
        let hi = if !full {
            f64::from(self.current)
        } else {
            f64::from(self.current) * 4.0
        };
        let next = ideal
            .clamp(lo, hi)
            .clamp(f64::from(self.min), f64::from(self.max));
        self.current = next as u32;
    }
}

/// How a relation is walked through, batch by batch.
#[derive(Debug, Clone)]
pub enum Scan {
    /// Each batch picks up to `limit` matching rows (SQLite: after row id `after`;
    /// PostgreSQL: by index or scan, when few rows are expired). Done when a batch finds
    /// none.
    Rows { after: Option<i64> },
    /// PostgreSQL, when many rows are expired: each batch deletes the matching rows of
    /// `limit` heap pages from `next` on, so the whole table is read once, in order,
    /// like a plain DELETE. Done at `end`, the table's size when the run began (rows
    /// added later are the next run's).
    Pages {
        next: i64,
        end: i64,
        rows_per_page: f64,
    },
}

impl Scan {
    /// A row count from the config in this scan's units (rows or pages).
    fn units(&self, rows: u32) -> u32 {
        match self {
            Scan::Rows { .. } => rows,
            Scan::Pages { rows_per_page, .. } => {
                (f64::from(rows) / rows_per_page.max(1.0)).ceil().max(1.0) as u32
            }
        }
    }

    /// Moves past a batch of `limit` units; returns whether to go on, and the units
    /// done and whether the batch was full, for sizing the next one.
    fn advance(&mut self, done: &BatchDone, limit: u32) -> (bool, u64, bool) {
        match self {
            Scan::Rows { after } => {
                *after = done.last_id.or(*after);
                (done.rows > 0, done.rows, done.rows >= u64::from(limit))
            }
            Scan::Pages { next, end, .. } => {
                *next += i64::from(limit);
                (*next < *end, u64::from(limit), true)
            }
        }
    }
}

/// What one batch deletes: the rows of `relation` matching `condition` (the expiry
/// predicate and `where`), `limit` rows or pages of them as `scan` says, waiting at
/// most `lock_timeout` for locks.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub relation: &'a str,
    /// `(expired) AND (where)`, repeated by the DELETE itself.
    pub condition: &'a str,
    pub limit: u32,
    pub lock_timeout: Duration,
    pub scan: &'a Scan,
    /// Where the batch's rows are archived before it commits (`archive = true`).
    pub archive: Option<&'a BatchArchive<'a>>,
}

/// `(predicate) AND (where)`: the operator's `where` is their own SQL, run as
/// written; the predicate is ours.
fn with_where(predicate: &str, where_clause: Option<&str>) -> String {
    match where_clause {
        Some(w) => format!("({predicate}) AND ({w})"),
        None => format!("({predicate})"),
    }
}

/// What one batch did.
pub struct BatchDone {
    pub rows: u64,
    /// SQLite rowid tables: the largest row id deleted.
    pub last_id: Option<i64>,
}

/// One batch's archive: written completely and durably before the batch commits.
#[derive(Debug, Clone)]
pub struct BatchArchive<'a> {
    to: &'a ArchiveTo,
    database: &'a str,
    backend: &'a str,
    name: String,
}

impl BatchArchive<'_> {
    /// Writes the rows (one JSON object per line) and makes the file durable.
    fn write(&self, rows: &[String]) -> Result<(), RetentionError> {
        let fail = |e: ArchiveFailure| RetentionError::Archive(e);
        if let (Some(path), None) = (&self.to.key_file, &self.to.key) {
            let missing = crate::keys::KeyError::NotGenerated { path: path.clone() };
            return Err(fail(ArchiveFailure::Write(missing.into())));
        }
        // Every destination must hold the export before the batch commits: rows are
        // deleted only once each configured copy of them is durable.
        for place in &self.to.places {
            place.store.prepare().map_err(|source| {
                fail(ArchiveFailure::Directory {
                    dir: place.store.location(),
                    source,
                })
            })?;
        }
        let mut lines = Vec::with_capacity(rows.iter().map(|r| r.len() + 1).sum());
        for r in rows {
            lines.extend_from_slice(r.as_bytes());
            lines.push(b'\n');
        }
        let uploads = FanOut::start(&self.to.places, &self.name);
        let settings = Settings {
            header: Header {
                database: self.database.to_owned(),
                backend: self.backend.to_owned(),
                image: "jsonl".to_owned(),
                created: Utc::now(),
                compression: self.to.compression,
                segment_size: archive::format::SEGMENT_SIZE,
                encryption: None,
                globals: None,
                sealed: None,
            },
            key: self.to.key.as_ref(),
            compression: self.to.compression,
            level: self.to.level,
            threads: 1,
            check_with: Some(KeyRing::new(self.to.key.iter().cloned().collect())),
            globals: None,
        };
        let (uploads, stats) = tokio::task::block_in_place(|| {
            archive::write_archive_for(
                &lines[..],
                uploads,
                settings,
                &self.to.recipients,
                &std::sync::atomic::AtomicBool::new(false),
            )
        })
        .map_err(|e| fail(e.into()))?;
        if let Some(Err(e)) = stats.checked {
            return Err(fail(ArchiveFailure::ReadBack(e)));
        }
        let uploads = uploads.finish();
        // Nothing is published unless every destination took its copy.
        let mut ready = Vec::with_capacity(uploads.len());
        for (place, upload) in uploads {
            ready.push(upload.map_err(|source| {
                fail(ArchiveFailure::Directory {
                    dir: place.store.location(),
                    source,
                })
            })?);
        }
        for upload in ready {
            // Nothing completes an export after it is published: the guard can go.
            upload.publish().map_err(|e| fail(e.into()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_config_errors_and_final() {
        for e in [
            RetentionError::PartitionsNeedPostgres,
            RetentionError::NotPartitioned { table: "t".into() },
            RetentionError::Cutoff,
        ] {
            assert!(e.is_config_error() && !e.is_transient(), "{e}");
        }
        let e = RetentionError::Cancelled { deleted: 3 };
        assert!(!e.is_config_error() && e.is_transient());
    }

    #[test]
    fn batch_size_follows_speed_within_bounds() {
        let mut b = BatchSize::new(5000, 100_000, Duration::from_millis(50));
        // 5000 rows in 10 ms: 25000 would take 50 ms, but one step grows at most 4x.
        b.observe(5000, true, Duration::from_millis(10));
        assert_eq!(b.current(), 20_000);
        b.observe(20_000, true, Duration::from_millis(40));
        assert_eq!(b.current(), 25_000);
        // Slow batches shrink it, never below the floor.
        for _ in 0..20 {
            b.observe(u64::from(b.current()), true, Duration::from_secs(5));
        }
        assert_eq!(b.current(), MIN_ADAPTED_BATCH);
        // Never above the cap.
        for _ in 0..20 {
            b.observe(u64::from(b.current()), true, Duration::from_micros(1));
        }
        assert_eq!(b.current(), 100_000);
        // A short batch never grows the next one.
        let mut b = BatchSize::new(5000, 100_000, Duration::from_millis(50));
        b.observe(10, false, Duration::from_micros(10));
        assert_eq!(b.current(), 5000);
        // batch-time = 0s: fixed size.
        let mut b = BatchSize::new(700, 100_000, Duration::ZERO);
        b.observe(700, true, Duration::from_micros(1));
        assert_eq!(b.current(), 700);
        // A first batch smaller than the floor is the floor.
        let mut b = BatchSize::new(10, 100_000, Duration::from_millis(50));
        b.observe(10, true, Duration::from_secs(1));
        assert_eq!(b.current(), 10);
    }
}

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
//! value means is [`Reading`]'s business (`reading.rs`); the SQL is per backend.
//!
//! Each batch is its own short transaction with a lock timeout, sized to take about
//! `batch-time`, so concurrent writers wait at most for one batch. With
//! `archive = true` every batch is written to an encrypted archive, durably, before
//! its transaction commits. PostgreSQL partitioned tables can instead drop or detach
//! whole expired partitions.

mod postgres;
mod reading;
mod sqlite;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

pub use reading::{Cutoff, Reading};

use super::Outcome;
use crate::archive::{self, Compression, Header, Key, KeyRing, Settings};
use crate::config::{RetentionConfig, RetentionMode};
use crate::db::{Database, DbError, QualifiedName};
use crate::metrics;
use crate::storage::Destination;

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
    #[error("{0}")]
    Unsupported(String),
    #[error("`where` does not fit the table ({0}); fix `where` in [[database.retention]]")]
    Where(#[source] DbError),
    #[error("cannot archive the batch before deleting it (nothing was deleted): {0}")]
    Archive(String),
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
        matches!(
            self,
            RetentionError::NoTable { .. }
                | RetentionError::NoColumn { .. }
                | RetentionError::ColumnType { .. }
                | RetentionError::Cascade { .. }
                | RetentionError::Unsupported(_)
                | RetentionError::Where(_)
                | RetentionError::Cutoff
        )
    }
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

/// Where archived batches go: `<destination>/<database>/retention/<job>/`.
#[derive(Debug, Clone)]
pub struct ArchiveTo {
    pub dest: Destination,
    pub key: Option<Key>,
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

/// What the backends report about the rows a rule covers, besides deleting them.
struct Census {
    expired: u64,
    unreadable: u64,
    oldest: Option<DateTime<Utc>>,
}

impl RetentionJob {
    pub fn new(cfg: RetentionConfig, archive: Option<ArchiveTo>) -> Result<Self, String> {
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
        match db {
            Database::Sqlite(lite) => sqlite::resolve(lite, &self.table, &self.cfg).await,
            Database::Postgres(pg) => postgres::resolve(pg, &self.table, &self.cfg).await,
        }
    }

    /// What `check` asks: the rule fits the database (table, column, zone, foreign
    /// keys, partition key, and a `where` that plans on every table). Reads nothing
    /// but the catalog.
    pub async fn check(&self, db: &Database) -> Result<Target, RetentionError> {
        let target = self.resolve(db).await?;
        let cutoff = self.cutoff(Utc::now())?;
        match db {
            Database::Sqlite(lite) => {
                let condition = with_where(
                    &sqlite::expired(&target, cutoff),
                    self.cfg.where_clause.as_deref(),
                );
                sqlite::validate(lite, &target, &condition).await?;
            }
            Database::Postgres(pg) => {
                if self.cfg.mode != RetentionMode::Delete {
                    postgres::check_partition_key(pg, &target).await?;
                }
                let condition = with_where(
                    &postgres::expired(&target, cutoff),
                    self.cfg.where_clause.as_deref(),
                );
                postgres::validate(pg, &target, &condition).await?;
            }
        }
        Ok(target)
    }

    fn cutoff(&self, now: DateTime<Utc>) -> Result<Cutoff, RetentionError> {
        Cutoff::before(now, self.cfg.older_than).ok_or(RetentionError::Cutoff)
    }

    /// Counts what the rule covers now. `after_full_run`: a run just went through every
    /// table, so the oldest row is looked for from the cutoff on (see
    /// `postgres::oldest`).
    async fn census(
        &self,
        db: &Database,
        target: &Target,
        cutoff: Cutoff,
        count_expired: bool,
        after_full_run: bool,
    ) -> Result<Census, RetentionError> {
        let w = self.cfg.where_clause.as_deref();
        let (expired, unreadable, oldest) = match db {
            Database::Sqlite(lite) => (
                if count_expired {
                    sqlite::count(lite, target, &sqlite::expired(target, cutoff), w).await?
                } else {
                    0
                },
                sqlite::count(lite, target, &sqlite::unreadable(target), w).await?,
                sqlite::oldest(lite, target, w).await?,
            ),
            Database::Postgres(pg) => (
                if count_expired {
                    postgres::count(pg, target, &postgres::expired(target, cutoff), w).await?
                } else {
                    0
                },
                postgres::count(pg, target, &postgres::unreadable(target), w).await?,
                postgres::oldest(pg, target, w, after_full_run.then_some(cutoff)).await?,
            ),
        };
        Ok(Census {
            expired,
            unreadable,
            oldest,
        })
    }

    /// What a run would do now; deletes nothing.
    pub async fn preview(&self, db: &Database) -> Result<Preview, RetentionError> {
        self.preview_at(db, Utc::now()).await
    }

    /// [`RetentionJob::preview`] with the clock given.
    pub async fn preview_at(
        &self,
        db: &Database,
        now: DateTime<Utc>,
    ) -> Result<Preview, RetentionError> {
        let target = self.resolve(db).await?;
        let cutoff = self.cutoff(now)?;
        let partitions = match db {
            Database::Postgres(pg) if self.cfg.mode != RetentionMode::Delete => {
                postgres::expired_partitions(pg, &target, cutoff).await?
            }
            _ => Vec::new(),
        };
        let census = self.census(db, &target, cutoff, true, false).await?;
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
        self.run_at(db, Utc::now(), cancel).await
    }

    /// [`RetentionJob::run`] with the clock given: the cutoff is `now - older-than`.
    pub async fn run_at(
        &self,
        db: &Database,
        now: DateTime<Utc>,
        cancel: &CancellationToken,
    ) -> Result<Outcome, RetentionError> {
        let target = self.resolve(db).await?;
        let cutoff = self.cutoff(now)?;
        metrics::retention_max_age(db.name(), &target.table, &self.rule, self.cfg.older_than);
        let mut outcome = match (self.cfg.mode, db) {
            (RetentionMode::Delete, _) => self.delete_batches(db, &target, cutoff, cancel).await?,
            (mode, Database::Postgres(pg)) => {
                let detach = mode == RetentionMode::DetachPartitions;
                let (gone, rows) =
                    postgres::remove_partitions(pg, &target, cutoff, detach, self.cfg.lock_timeout)
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
            (_, Database::Sqlite(_)) => {
                return Err(RetentionError::Unsupported(
                    "partition modes need PostgreSQL; use mode = \"delete\"".to_owned(),
                ))
            }
        };
        let full_run = self.cfg.mode == RetentionMode::Delete
            && outcome.details["stopped_early"] == serde_json::Value::Bool(false);
        let census = self.census(db, &target, cutoff, false, full_run).await?;
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
        let predicate = match db {
            Database::Sqlite(_) => sqlite::expired(target, cutoff),
            Database::Postgres(_) => postgres::expired(target, cutoff),
        };
        let condition = with_where(&predicate, cfg.where_clause.as_deref());
        let mut last_size = 0;
        // Whether counting what is left is cheap (no page-range pass just left a mass
        // of dead index entries to step over).
        let mut picked_rows_only = true;
        'relations: for relation in &target.relations {
            let mut scan = match db {
                Database::Sqlite(_) => Scan::Rows { after: None },
                Database::Postgres(pg) => {
                    postgres::scan_for(pg, target, relation, &condition, cfg.scan).await?
                }
            };
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
                };
                let began = Instant::now();
                let done = match db {
                    Database::Sqlite(lite) => {
                        sqlite::delete_batch(lite, target, &batch, archive).await?
                    }
                    Database::Postgres(pg) => {
                        postgres::delete_batch(pg, target, &batch, archive).await?
                    }
                };
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
            Some(self.census(db, target, cutoff, true, false).await?.expired)
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
#[derive(Clone)]
pub struct BatchArchive<'a> {
    to: &'a ArchiveTo,
    database: &'a str,
    backend: &'a str,
    name: String,
}

impl BatchArchive<'_> {
    /// Writes the rows (one JSON object per line) and makes the file durable.
    fn write(&self, rows: &[String]) -> Result<(), RetentionError> {
        let fail = |e: String| RetentionError::Archive(e);
        let dest = &self.to.dest;
        dest.ensure()
            .map_err(|e| fail(format!("{}: {e}", dest.dir().display())))?;
        let mut lines = Vec::with_capacity(rows.iter().map(|r| r.len() + 1).sum());
        for r in rows {
            lines.extend_from_slice(r.as_bytes());
            lines.push(b'\n');
        }
        let tmp = dest
            .create_temp(&self.name)
            .map_err(|e| fail(e.to_string()))?;
        let settings = Settings {
            header: Header {
                database: self.database.to_owned(),
                backend: self.backend.to_owned(),
                image: "jsonl".to_owned(),
                created: Utc::now(),
                compression: self.to.compression,
                segment_size: archive::format::SEGMENT_SIZE,
                encryption: None,
            },
            key: self.to.key.as_ref(),
            compression: self.to.compression,
            level: self.to.level,
            threads: 1,
            check_with: Some(KeyRing::new(self.to.key.iter().cloned().collect())),
        };
        let (tmp, stats) = tokio::task::block_in_place(|| {
            archive::write_archive(
                &lines[..],
                tmp,
                settings,
                &std::sync::atomic::AtomicBool::new(false),
            )
        })
        .map_err(|e| fail(e.to_string()))?;
        if let Some(Err(e)) = stats.checked {
            return Err(fail(format!("the archive does not read back: {e}")));
        }
        dest.commit(tmp, &self.name)
            .map_err(|e| fail(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

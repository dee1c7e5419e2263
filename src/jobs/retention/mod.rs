//! `retention` jobs (`<database>.retention.<name>`): delete expired rows in small
//! committed batches, never one long lock.
//!
//! Each batch is its own short transaction with a lock timeout (PostgreSQL: rows
//! picked by `ctid` or primary key with `FOR UPDATE SKIP LOCKED`; SQLite: by `rowid`),
//! so concurrent writers wait at most for one batch. With `archive = true` every batch
//! is written to an encrypted archive, durably, before its transaction commits.
//! PostgreSQL partitioned tables can instead drop or detach whole expired partitions.

mod postgres;
mod sqlite;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

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
    #[error("column \"{column}\" of {table} has type {kind}; retention needs a timestamp, timestamptz or date column, or an integer column of unix seconds")]
    ColumnType {
        table: String,
        column: String,
        kind: String,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("cannot archive the batch before deleting it (nothing was deleted): {0}")]
    Archive(String),
    #[error("cancelled after deleting {deleted} rows")]
    Cancelled { deleted: u64 },
}

impl RetentionError {
    /// Errors that mean the configuration names something that is not there.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            RetentionError::NoTable { .. }
                | RetentionError::NoColumn { .. }
                | RetentionError::ColumnType { .. }
        )
    }
}

/// How the expiry column stores time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// timestamp, timestamptz, date (PostgreSQL); text date-times (SQLite).
    Timestamp,
    /// An integer or numeric column of unix seconds.
    UnixSeconds,
}

/// The table and column, checked against the catalog and quoted.
#[derive(Debug, Clone)]
pub struct Target {
    /// Quoted, schema-qualified where the catalog says so.
    pub table_sql: String,
    /// For messages and metric labels: the table as configured.
    pub table: String,
    pub column_sql: String,
    pub kind: ColumnKind,
    /// How one batch names its rows: `ctid`, `rowid`, or quoted primary-key columns.
    pub row_key: Vec<String>,
    /// SQLite: every column, quoted, for the JSON form of archived rows.
    pub columns: Vec<String>,
    /// PostgreSQL: the relation's oid, for partition look-ups.
    pub oid: Option<u32>,
    pub partitioned: bool,
}

/// What `retention plan` shows for one rule.
#[derive(Debug, Clone)]
pub struct Preview {
    pub cutoff: DateTime<Utc>,
    pub expired_rows: u64,
    pub oldest: Option<DateTime<Utc>>,
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
    pub table: QualifiedName,
    pub archive: Option<ArchiveTo>,
}

impl RetentionJob {
    pub fn new(cfg: RetentionConfig, archive: Option<ArchiveTo>) -> Result<Self, String> {
        let table = QualifiedName::parse(&cfg.table)?;
        Ok(RetentionJob {
            cfg,
            table,
            archive,
        })
    }

    /// The table and column as the catalog knows them; errors name what is missing.
    pub async fn resolve(&self, db: &Database) -> Result<Target, RetentionError> {
        match db {
            Database::Sqlite(lite) => sqlite::resolve(lite, &self.table, &self.cfg.column).await,
            Database::Postgres(pg) => postgres::resolve(pg, &self.table, &self.cfg.column).await,
        }
    }

    fn cutoff(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now - chrono::Duration::from_std(self.cfg.older_than).unwrap_or(chrono::Duration::MAX)
    }

    /// What a run would do now; deletes nothing.
    pub async fn preview(&self, db: &Database) -> Result<Preview, RetentionError> {
        let target = self.resolve(db).await?;
        let cutoff = self.cutoff(Utc::now());
        let where_clause = self.cfg.where_clause.as_deref();
        let (expired_rows, oldest, partitions) = match db {
            Database::Sqlite(lite) => (
                sqlite::count_expired(lite, &target, cutoff, where_clause).await?,
                sqlite::oldest(lite, &target).await?,
                Vec::new(),
            ),
            Database::Postgres(pg) => {
                let partitions = if self.cfg.mode == RetentionMode::Delete {
                    Vec::new()
                } else {
                    postgres::expired_partitions(pg, &target, cutoff).await?
                };
                (
                    postgres::count_expired(pg, &target, cutoff, where_clause).await?,
                    postgres::oldest(pg, &target).await?,
                    partitions,
                )
            }
        };
        Ok(Preview {
            cutoff,
            expired_rows,
            oldest,
            partitions,
        })
    }

    pub async fn run(
        &self,
        db: &Database,
        cancel: &CancellationToken,
    ) -> Result<Outcome, RetentionError> {
        let target = self.resolve(db).await?;
        let cutoff = self.cutoff(Utc::now());
        metrics::retention_max_age(db.name(), &target.table, self.cfg.older_than);
        let outcome = match (self.cfg.mode, db) {
            (RetentionMode::Delete, _) => self.delete_batches(db, &target, cutoff, cancel).await?,
            (mode, Database::Postgres(pg)) => {
                let detach = mode == RetentionMode::DetachPartitions;
                let (gone, rows) =
                    postgres::remove_partitions(pg, &target, cutoff, detach, self.cfg.lock_timeout)
                        .await?;
                metrics::retention_deleted(db.name(), &target.table, rows);
                Outcome {
                    summary: format!(
                        "{} {} partitions of {} ({}), {rows} rows",
                        if detach { "detached" } else { "dropped" },
                        gone.len(),
                        target.table,
                        gone.join(", ")
                    ),
                    details: serde_json::json!({ "partitions": gone, "rows": rows, "cutoff": cutoff }),
                }
            }
            (_, Database::Sqlite(_)) => {
                return Err(RetentionError::Unsupported(
                    "partition modes need PostgreSQL; use mode = \"delete\"".to_owned(),
                ))
            }
        };
        let oldest = match db {
            Database::Sqlite(lite) => sqlite::oldest(lite, &target).await?,
            Database::Postgres(pg) => postgres::oldest(pg, &target).await?,
        };
        metrics::retention_oldest_row(db.name(), &target.table, oldest);
        Ok(outcome)
    }

    async fn delete_batches(
        &self,
        db: &Database,
        target: &Target,
        cutoff: DateTime<Utc>,
        cancel: &CancellationToken,
    ) -> Result<Outcome, RetentionError> {
        let cfg = &self.cfg;
        let started = Instant::now();
        let mut deleted = 0u64;
        let mut batches = 0u64;
        let mut stopped_early = false;
        let run_stamp = Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
        let batch = Batch {
            cutoff,
            where_clause: cfg.where_clause.as_deref(),
            limit: cfg.batch_size,
            lock_timeout: cfg.lock_timeout,
        };
        loop {
            if cancel.is_cancelled() {
                return Err(RetentionError::Cancelled { deleted });
            }
            if cfg.max_duration.is_some_and(|max| started.elapsed() >= max) {
                stopped_early = true;
                break;
            }
            let archive = self.archive.as_ref().map(|a| BatchArchive {
                to: a,
                database: db.name(),
                backend: db.backend().as_str(),
                name: format!("{run_stamp}-{:06}.jsonl.dbk", batches + 1),
            });
            let n = match db {
                Database::Sqlite(lite) => {
                    sqlite::delete_batch(lite, target, &batch, archive).await?
                }
                Database::Postgres(pg) => {
                    postgres::delete_batch(pg, target, &batch, archive).await?
                }
            };
            if n == 0 {
                break;
            }
            deleted += n;
            batches += 1;
            metrics::retention_deleted(db.name(), &target.table, n);
            if let Some(pause) = cfg.pause.filter(|p| !p.is_zero()) {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = cancel.cancelled() => return Err(RetentionError::Cancelled { deleted }),
                }
            }
        }
        let remaining = if stopped_early {
            Some(match db {
                Database::Sqlite(lite) => {
                    sqlite::count_expired(lite, target, cutoff, cfg.where_clause.as_deref()).await?
                }
                Database::Postgres(pg) => {
                    postgres::count_expired(pg, target, cutoff, cfg.where_clause.as_deref()).await?
                }
            })
        } else {
            None
        };
        let mut summary = format!(
            "deleted {deleted} rows older than {} from {} in {batches} batches",
            cutoff.format("%Y-%m-%d %H:%M:%S UTC"),
            target.table
        );
        if let Some(left) = remaining {
            summary.push_str(&format!(
                "; stopped after max-duration {} with {left} expired rows left",
                humantime::format_duration(cfg.max_duration.unwrap_or_default())
            ));
        }
        Ok(Outcome {
            summary,
            details: serde_json::json!({
                "deleted": deleted,
                "batches": batches,
                "cutoff": cutoff,
                "stopped_early": stopped_early,
                "remaining": remaining,
                "took_seconds": started.elapsed().as_secs_f64(),
            }),
        })
    }
}

/// What one batch deletes: rows older than `cutoff` matching `where_clause`, at most
/// `limit`, waiting at most `lock_timeout` for locks.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub cutoff: DateTime<Utc>,
    pub where_clause: Option<&'a str>,
    pub limit: u32,
    pub lock_timeout: Duration,
}

/// One batch's archive: written completely and durably before the batch commits.
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

/// `column < <cutoff> AND (where)`; `cutoff` is the backend's first placeholder. The
/// column is a quoted identifier; `where` is the operator's own SQL, run as written.
fn expired_predicate(target: &Target, cutoff: &str, where_clause: Option<&str>) -> String {
    let mut p = format!("{} < {cutoff}", target.column_sql);
    if let Some(w) = where_clause {
        p.push_str(&format!(" AND ({w})"));
    }
    p
}

/// Time to wait for a lock, in whole milliseconds (at least 1).
fn millis(d: Duration) -> u128 {
    d.as_millis().max(1)
}

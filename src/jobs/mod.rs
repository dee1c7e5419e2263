//! The maintenance jobs: what each kind does once it is its turn to run.
//!
//! The runner decides *when* and *whether* (overlap, concurrency, timeout, retries);
//! a [`Job`] only knows how to do its work once. Job ids are
//! `<database>.<kind>[.<name>]`.

pub mod backup;
pub mod migrate;
pub mod refresh;
pub mod retention;
mod sql;

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::catalog::BackupKind;
use crate::config::{Config, JobOptions};
use crate::db::{Database, DbError};
use crate::runner::Trigger;

pub use sql::SqlJob;

/// One configured job, ready to run.
#[derive(Debug)]
pub struct Job {
    /// `<database>.<kind>[.<name>]`, e.g. `app.sql.vacuum`.
    pub id: String,
    pub work: Work,
    pub database: Database,
    pub options: JobOptions,
}

/// What a job does; one variant per job kind.
#[derive(Debug)]
pub enum Work {
    Backup(Box<backup::BackupJob>),
    Retention(Box<retention::RetentionJob>),
    Refresh(Box<refresh::RefreshJob>),
    Migrate(Box<migrate::MigrateJob>),
    Sql(SqlJob),
}

impl Work {
    /// The kind label used in job ids and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Work::Backup(_) => "backup",
            Work::Retention(_) => "retention",
            Work::Refresh(_) => "refresh",
            Work::Migrate(_) => "migrate",
            Work::Sql(_) => "sql",
        }
    }

    /// True for jobs that must not run beside any other job on the same database.
    pub fn exclusive(&self) -> bool {
        match self {
            Work::Migrate(_) => true,
            Work::Backup(_) | Work::Retention(_) | Work::Refresh(_) | Work::Sql(_) => false,
        }
    }
}

impl Job {
    pub fn kind(&self) -> &'static str {
        self.work.kind()
    }

    pub fn database_name(&self) -> &str {
        self.database.name()
    }

    /// Does the work once. The runner decides about timeouts and retries and fires
    /// `cancel` when the attempt must stop; the job then cleans up and returns.
    pub async fn execute(
        &self,
        trigger: Trigger,
        cancel: CancellationToken,
    ) -> Result<Outcome, JobError> {
        match &self.work {
            Work::Backup(b) => {
                let kind = match trigger {
                    Trigger::Manual => BackupKind::Manual,
                    _ => BackupKind::Scheduled,
                };
                Ok(b.run(&self.database, kind, &cancel).await?)
            }
            Work::Retention(r) => Ok(r.run(&self.database, &cancel).await?),
            Work::Refresh(r) => Ok(r.run(&self.database, &cancel).await?),
            Work::Migrate(m) => Ok(m.run(&self.database, &cancel).await?),
            Work::Sql(sql) => sql.run(&self.database, self.options.timeout, &cancel).await,
        }
    }
}

/// What a successful run reports: a one-line summary for logs and a JSON object for
/// the run history.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub summary: String,
    pub details: serde_json::Value,
}

/// A run of a job failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Backup(#[from] backup::BackupError),
    #[error(transparent)]
    Retention(#[from] retention::RetentionError),
    #[error(transparent)]
    Refresh(#[from] refresh::RefreshError),
    #[error(transparent)]
    Migrate(#[from] migrate::MigrateError),
}

impl JobError {
    /// False for failures a retry cannot fix: the configuration names something that
    /// is not there, or the job refused on purpose.
    pub fn retryable(&self) -> bool {
        use refresh::RefreshError as F;
        if let JobError::Retention(e) = self {
            return !e.is_config_error();
        }
        !matches!(
            self,
            JobError::Refresh(
                F::Refused(_)
                    | F::NoView { .. }
                    | F::NotOwned { .. }
                    | F::Referenced { .. }
                    // The same rows would violate the index again.
                    | F::IndexFails { .. }
            ) | JobError::Backup(backup::BackupError::Refused(_))
                | JobError::Migrate(
                    migrate::MigrateError::Blocked(_)
                        | migrate::MigrateError::Read { .. }
                        | migrate::MigrateError::Duplicate { .. }
                        // A retry would run the migration a second time.
                        | migrate::MigrateError::RowRemoved { .. }
                )
        )
    }

    /// True when the configuration is wrong rather than the database or the run:
    /// `run-job` and `migrate apply` then exit 2, like `check`.
    pub fn is_config(&self) -> bool {
        matches!(self, JobError::Migrate(e) if e.is_config())
    }

    /// True when the failure means the database could not be reached.
    pub fn database_unreachable(&self) -> bool {
        match self {
            JobError::Db(e) => e.is_unreachable(),
            JobError::Backup(e) => e.database_unreachable(),
            JobError::Retention(retention::RetentionError::Db(e))
            | JobError::Refresh(refresh::RefreshError::Db(e)) => e.is_unreachable(),
            JobError::Migrate(migrate::MigrateError::Db(e)) => e.is_unreachable(),
            JobError::Retention(_) | JobError::Refresh(_) | JobError::Migrate(_) => false,
        }
    }
}

/// Opens every configured database (lazily; nothing is connected yet).
pub fn open_databases(config: &Config) -> Result<HashMap<String, Database>, DbError> {
    config
        .databases
        .iter()
        .map(|cfg| Ok((cfg.name.clone(), Database::open(cfg)?)))
        .collect()
}

/// A job could not be set up from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("database \"{database}\": {source}")]
    Key {
        database: String,
        source: crate::archive::KeyError,
    },
    #[error("database \"{database}\": {message}")]
    Name { database: String, message: String },
}

/// All jobs of the configuration, in config order. Loads the backup keys.
pub fn build(
    config: &Config,
    databases: &HashMap<String, Database>,
) -> Result<Vec<Arc<Job>>, BuildError> {
    let mut jobs = Vec::new();
    for cfg in &config.databases {
        // open_databases has an entry for every configured database.
        let Some(database) = databases.get(&cfg.name) else {
            continue;
        };
        if let Some(b) = &cfg.backup {
            let (key, keys) = b.load_keys().map_err(|source| BuildError::Key {
                database: cfg.name.clone(),
                source,
            })?;
            jobs.push(Arc::new(Job {
                id: format!("{}.backup", cfg.name),
                work: Work::Backup(Box::new(backup::BackupJob {
                    cfg: b.clone(),
                    key,
                    keys,
                    scratch_dir: config.daemon.state_dir.join("tmp"),
                })),
                database: database.clone(),
                options: b.options(),
            }));
        }
        let name_err = |message| BuildError::Name {
            database: cfg.name.clone(),
            message: String::from(message),
        };
        for r in &cfg.retention {
            let archive = match (&cfg.backup, r.archive) {
                (Some(b), true) => {
                    let (key, _) = b.load_keys().map_err(|source| BuildError::Key {
                        database: cfg.name.clone(),
                        source,
                    })?;
                    Some(retention::ArchiveTo {
                        dest: crate::storage::Destination::new(
                            &b.destination.join(&cfg.name).join("retention"),
                            &r.job_name(),
                        ),
                        key,
                        compression: b.compression,
                        level: b.level(),
                    })
                }
                _ => None,
            };
            jobs.push(Arc::new(Job {
                id: format!("{}.retention.{}", cfg.name, r.job_name()),
                work: Work::Retention(Box::new(
                    retention::RetentionJob::new(r.clone(), archive).map_err(name_err)?,
                )),
                database: database.clone(),
                options: r.options(),
            }));
        }
        for r in &cfg.refresh {
            jobs.push(Arc::new(Job {
                id: format!("{}.refresh.{}", cfg.name, r.job_name()),
                work: Work::Refresh(Box::new(
                    refresh::RefreshJob::new(r.clone()).map_err(name_err)?,
                )),
                database: database.clone(),
                options: r.options(),
            }));
        }
        if let Some(m) = &cfg.migrate {
            let backup = jobs
                .iter()
                .find(|j: &&Arc<Job>| {
                    j.database_name() == cfg.name && matches!(j.work, Work::Backup(_))
                })
                .cloned();
            jobs.push(Arc::new(Job {
                id: format!("{}.migrate", cfg.name),
                work: Work::Migrate(Box::new(migrate::MigrateJob {
                    cfg: m.clone(),
                    backup,
                })),
                database: database.clone(),
                options: m.options(),
            }));
        }
        for sql in &cfg.sql {
            jobs.push(Arc::new(Job {
                id: format!("{}.sql.{}", cfg.name, sql.name),
                work: Work::Sql(SqlJob {
                    statement: sql.statement.clone(),
                }),
                database: database.clone(),
                options: sql.options(),
            }));
        }
    }
    Ok(jobs)
}

//! The maintenance jobs: what each kind does once it is its turn to run.
//!
//! The runner decides *when* and *whether* (overlap, concurrency, timeout, retries);
//! a [`Job`] only knows how to do its work once. Job ids are
//! `<database>.<kind>[.<name>]`.

mod sql;

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, JobOptions};
use crate::db::{Database, DbError};

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
    Sql(SqlJob),
}

impl Work {
    /// The kind label used in job ids and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Work::Sql(_) => "sql",
        }
    }

    /// True for jobs that must not run beside any other job on the same database.
    pub fn exclusive(&self) -> bool {
        match self {
            Work::Sql(_) => false,
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
    pub async fn execute(&self, cancel: CancellationToken) -> Result<Outcome, JobError> {
        match &self.work {
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
}

impl JobError {
    /// True when the failure means the database could not be reached.
    pub fn database_unreachable(&self) -> bool {
        match self {
            JobError::Db(e) => e.is_unreachable(),
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

/// All jobs of the configuration, in config order.
pub fn build(config: &Config, databases: &HashMap<String, Database>) -> Vec<Arc<Job>> {
    let mut jobs = Vec::new();
    for cfg in &config.databases {
        // open_databases has an entry for every configured database.
        let Some(database) = databases.get(&cfg.name) else {
            continue;
        };
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
    jobs
}

//! The daemon's live view of itself: jobs, databases, configuration.
//!
//! Every change goes through [`Status`], which updates both the in-memory board
//! behind `/status` and `/readyz` and the Prometheus series, so the two never
//! disagree.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::jobs::Job;
use crate::metrics::{self, SkipReason};
use crate::state::{JobLast, RunResult};

/// One job as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub job: String,
    pub kind: String,
    pub database: String,
    pub schedule: String,
    pub timezone: String,
    pub running: bool,
    pub last_result: Option<String>,
    pub last_run: Option<DateTime<Utc>>,
    pub last_success: Option<DateTime<Utc>>,
    pub last_failure: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub next_run: Option<DateTime<Utc>>,
}

/// One database as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseStatus {
    pub name: String,
    pub backend: String,
    pub url: String,
    /// `None` until the first probe has answered.
    pub up: Option<bool>,
    pub error: Option<String>,
}

/// What `/status` returns.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub version: &'static str,
    pub config_file: String,
    pub config_loaded_at: Option<DateTime<Utc>>,
    pub last_reload_successful: bool,
    pub last_reload_error: Option<String>,
    pub databases: Vec<DatabaseStatus>,
    pub jobs: Vec<JobStatus>,
}

#[derive(Default)]
struct Board {
    notifier: Option<crate::notify::Notifier>,
    /// Where each database's backups are, for the status page.
    backup_destinations: Vec<(crate::storage::Destination, crate::catalog::TrustPolicy)>,
    config_file: String,
    config_loaded_at: Option<DateTime<Utc>>,
    reload_error: Option<String>,
    databases: BTreeMap<String, DatabaseStatus>,
    jobs: BTreeMap<String, JobStatus>,
    order: Vec<String>,
}

/// Shared handle to the board.
#[derive(Clone, Default)]
pub struct Status {
    board: Arc<Mutex<Board>>,
}

impl Status {
    fn board(&self) -> MutexGuard<'_, Board> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the job and database lists after a (re)load of the configuration.
    pub fn configure(
        &self,
        config_file: &str,
        databases: Vec<DatabaseStatus>,
        jobs: &[(Arc<Job>, JobLast, Option<Duration>)],
        at: DateTime<Utc>,
    ) {
        let mut board = self.board();
        board.config_file = config_file.to_owned();
        board.config_loaded_at = Some(at);
        board.reload_error = None;
        let old_dbs = std::mem::take(&mut board.databases);
        for mut db in databases {
            // Keep what the last probe said until the next one answers.
            if let Some(old) = old_dbs.get(&db.name) {
                db.up = old.up;
                db.error = old.error.clone();
            }
            board.databases.insert(db.name.clone(), db);
        }
        board.backup_destinations = jobs
            .iter()
            .filter_map(|(job, _, _)| match &job.work {
                crate::jobs::Work::Backup(b) => Some((
                    b.destination(job.database_name()),
                    b.trust_policy(job.database_name(), false),
                )),
                _ => None,
            })
            .collect();
        let old_jobs = std::mem::take(&mut board.jobs);
        board.order.clear();
        for (job, last, interval) in jobs {
            metrics::register_job(job, last, *interval);
            let running = old_jobs.get(&job.id).is_some_and(|j| j.running);
            board.order.push(job.id.clone());
            board.jobs.insert(
                job.id.clone(),
                JobStatus {
                    job: job.id.clone(),
                    kind: job.kind().to_owned(),
                    database: job.database_name().to_owned(),
                    schedule: job.options.schedule.to_string(),
                    timezone: job.options.timezone.to_string(),
                    running,
                    last_result: last.last_result.map(|r| r.as_str().to_owned()),
                    last_run: last.last_run,
                    last_success: last.last_success,
                    last_failure: last.last_failure,
                    last_error: last.last_error.clone(),
                    next_run: None,
                },
            );
            if running {
                metrics::job_started(job, last.last_run.unwrap_or(at));
            }
        }
        metrics::config_loaded(true, at);
    }

    /// Records a failed reload; the running configuration stays in force.
    pub fn reload_failed(&self, error: String) {
        self.board().reload_error = Some(error);
        metrics::config_loaded(false, Utc::now());
    }

    pub fn database_probed(&self, name: &str, result: Result<(), String>) {
        metrics::database_up(name, result.is_ok());
        if let Some(db) = self.board().databases.get_mut(name) {
            db.up = Some(result.is_ok());
            db.error = result.err();
        }
    }

    /// Sets (or, with `None`, removes) where failure and recovery events go.
    pub fn set_notifier(&self, notifier: Option<crate::notify::Notifier>) {
        self.board().notifier = notifier;
    }

    pub fn job_started(&self, job: &Job, at: DateTime<Utc>) {
        metrics::job_started(job, at);
        if let Some(j) = self.board().jobs.get_mut(&job.id) {
            j.running = true;
            j.last_run = Some(at);
        }
    }

    pub fn job_finished(
        &self,
        job: &Job,
        started: DateTime<Utc>,
        took: Duration,
        error: Option<&str>,
    ) {
        metrics::job_finished(job, started, error.is_none(), took);
        let mut board = self.board();
        let notifier = board.notifier.clone();
        if let Some(j) = board.jobs.get_mut(&job.id) {
            let failed_before = j.last_result.as_deref().is_some_and(|r| r != "success");
            // Changes only: the first failure, and the first success after failures.
            let event = match error {
                Some(_) if !failed_before => Some(crate::notify::EventKind::Failure),
                None if failed_before => Some(crate::notify::EventKind::Recovery),
                _ => None,
            };
            if let (Some(event), Some(n)) = (event, &notifier) {
                n.send(crate::notify::Event {
                    event,
                    job: job.id.clone(),
                    kind: job.kind().to_owned(),
                    database: job.database_name().to_owned(),
                    result: if error.is_none() {
                        "success"
                    } else {
                        "failure"
                    },
                    error: error.map(str::to_owned),
                    time: Utc::now(),
                });
            }
            j.running = false;
            let result = if error.is_none() {
                j.last_success = Some(started);
                RunResult::Success
            } else {
                j.last_failure = Some(started);
                RunResult::Failure
            };
            j.last_result = Some(result.as_str().to_owned());
            j.last_error = error.map(str::to_owned);
        }
    }

    pub fn job_skipped(&self, job: &Job, reason: SkipReason) {
        metrics::job_skipped(job, reason);
    }

    pub fn job_next_run(&self, job: &Job, next: Option<DateTime<Utc>>) {
        metrics::job_next_run(job, next);
        if let Some(j) = self.board().jobs.get_mut(&job.id) {
            j.next_run = next;
        }
    }

    /// Ready when a configuration is loaded and every database answered its last probe;
    /// otherwise the reasons.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let board = self.board();
        let mut problems = Vec::new();
        if board.config_loaded_at.is_none() {
            problems.push("configuration not loaded yet".to_owned());
        }
        for db in board.databases.values() {
            match db.up {
                Some(true) => {}
                Some(false) => problems.push(format!(
                    "database \"{}\" is down: {}",
                    db.name,
                    db.error.as_deref().unwrap_or("no answer")
                )),
                None => problems.push(format!("database \"{}\" not probed yet", db.name)),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The newest `n` backups across all databases, newest first (read from the
    /// manifests, so they are current even after `run-job` or another process).
    pub fn recent_backups(&self, n: usize) -> Vec<crate::catalog::Manifest> {
        let destinations = self.board().backup_destinations.clone();
        let mut all: Vec<crate::catalog::Manifest> = destinations
            .iter()
            .filter_map(|(dest, policy)| crate::catalog::list(dest, policy).ok())
            .flat_map(|listing| listing.backups)
            .collect();
        all.sort_by_key(|m| std::cmp::Reverse(m.started_at));
        all.truncate(n);
        all
    }

    pub fn snapshot(&self) -> Snapshot {
        let board = self.board();
        Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            config_file: board.config_file.clone(),
            config_loaded_at: board.config_loaded_at,
            last_reload_successful: board.reload_error.is_none(),
            last_reload_error: board.reload_error.clone(),
            databases: board.databases.values().cloned().collect(),
            jobs: board
                .order
                .iter()
                .filter_map(|id| board.jobs.get(id).cloned())
                .collect(),
        }
    }
}

//! The daemon's live view of itself: jobs, databases, configuration — the board
//! behind `/status`, `/readyz` and the status page.
//!
//! Only the board: the Prometheus series are [`crate::metrics`]', notifications
//! [`crate::notify`]'s, and the list of stored backups the backup library's. Every
//! event reaches all three through [`crate::reporter::Reporter`], so they never
//! disagree. The board knows jobs by id only.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::state::RunResult;

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
    /// Replicas: the replica that ran the job last, cluster-wide.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_replica: Option<String>,
}

/// Replicas: this replica and the members the coordination database shows alive.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub replica: String,
    pub coordination_up: bool,
    pub members: Vec<MemberStatus>,
}

/// Replicas: a job's newest runs across the cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterLast {
    pub last_run: Option<DateTime<Utc>>,
    pub last_success: Option<DateTime<Utc>>,
    pub last_failure: Option<DateTime<Utc>>,
    pub last_result: Option<String>,
    pub last_replica: Option<String>,
}

/// One alive replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberStatus {
    pub replica: String,
    pub host: String,
    pub pid: i32,
    pub started_at: DateTime<Utc>,
    pub seen_at: DateTime<Utc>,
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
    /// Replicas only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

#[derive(Default)]
struct Board {
    config_file: String,
    config_loaded_at: Option<DateTime<Utc>>,
    reload_error: Option<String>,
    databases: BTreeMap<String, DatabaseStatus>,
    jobs: BTreeMap<String, JobStatus>,
    order: Vec<String>,
    cluster: Option<ClusterStatus>,
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
    /// `jobs` come with `running: false`; a job still running from before the reload
    /// keeps its flag. Returns the ids of those still-running jobs.
    pub fn configure(
        &self,
        config_file: &str,
        databases: Vec<DatabaseStatus>,
        jobs: Vec<JobStatus>,
        at: DateTime<Utc>,
    ) -> Vec<String> {
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
        let old_jobs = std::mem::take(&mut board.jobs);
        board.order.clear();
        let mut still_running = Vec::new();
        for mut job in jobs {
            job.running = old_jobs.get(&job.job).is_some_and(|j| j.running);
            if job.last_replica.is_none() {
                job.last_replica = old_jobs.get(&job.job).and_then(|j| j.last_replica.clone());
            }
            if job.running {
                still_running.push(job.job.clone());
            }
            board.order.push(job.job.clone());
            board.jobs.insert(job.job.clone(), job);
        }
        still_running
    }

    /// Records a failed reload; the running configuration stays in force.
    pub fn reload_failed(&self, error: String) {
        self.board().reload_error = Some(error);
    }

    pub fn database_probed(&self, name: &str, result: Result<(), String>) {
        if let Some(db) = self.board().databases.get_mut(name) {
            db.up = Some(result.is_ok());
            db.error = result.err();
        }
    }

    pub fn job_started(&self, job: &str, at: DateTime<Utc>) {
        if let Some(j) = self.board().jobs.get_mut(job) {
            j.running = true;
            j.last_run = Some(at);
        }
    }

    /// Records the end of a run (`error` if it failed). Returns whether the job's
    /// previous run had failed (`None` for a job not on the board), which decides
    /// the notifications.
    pub fn job_finished(
        &self,
        job: &str,
        started: DateTime<Utc>,
        error: Option<&str>,
    ) -> Option<bool> {
        let mut board = self.board();
        let j = board.jobs.get_mut(job)?;
        let failed_before = j.last_result.as_deref().is_some_and(|r| r != "success");
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
        Some(failed_before)
    }

    pub fn job_next_run(&self, job: &str, next: Option<DateTime<Utc>>) {
        if let Some(j) = self.board().jobs.get_mut(job) {
            j.next_run = next;
        }
    }

    /// Replicas: the coordination database answered (or not).
    pub fn coordination_seen(&self, name: &str, replica: &str, up: bool) {
        let mut board = self.board();
        let cluster = board.cluster.get_or_insert_with(|| ClusterStatus {
            name: name.to_owned(),
            replica: replica.to_owned(),
            coordination_up: up,
            members: Vec::new(),
        });
        cluster.coordination_up = up;
    }

    /// Replicas: the members seen alive.
    pub fn cluster_seen(&self, name: &str, replica: &str, members: Vec<MemberStatus>) {
        self.board().cluster = Some(ClusterStatus {
            name: name.to_owned(),
            replica: replica.to_owned(),
            coordination_up: true,
            members,
        });
    }

    /// Replicas: merges a job's newest runs across the cluster into the board (a time
    /// only moves forward). Returns the merged last run, success and failure.
    pub fn job_cluster_last(&self, job: &str, last: &ClusterLast) -> Option<ClusterLast> {
        let mut board = self.board();
        let j = board.jobs.get_mut(job)?;
        if last.last_run > j.last_run && !j.running {
            j.last_run = last.last_run;
            j.last_result.clone_from(&last.last_result);
            j.last_replica.clone_from(&last.last_replica);
        } else if j.last_replica.is_none() {
            j.last_replica.clone_from(&last.last_replica);
        }
        j.last_success = j.last_success.max(last.last_success);
        j.last_failure = j.last_failure.max(last.last_failure);
        Some(ClusterLast {
            last_run: j.last_run,
            last_success: j.last_success,
            last_failure: j.last_failure,
            last_result: j.last_result.clone(),
            last_replica: j.last_replica.clone(),
        })
    }

    /// Replicas: this replica ran the job.
    pub fn job_ran_here(&self, job: &str, replica: &str) {
        if let Some(j) = self.board().jobs.get_mut(job) {
            j.last_replica = Some(replica.to_owned());
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
            cluster: board.cluster.clone(),
        }
    }
}

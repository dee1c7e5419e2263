//! Where what happens to jobs and databases is told: the status board
//! ([`crate::status`]), the Prometheus series ([`crate::metrics`]), the
//! notifications and the dead-man pings ([`crate::notify`]).
//!
//! Each has its own home and knows nothing of the others; the runner
//! and the daemon tell a [`Reporter`] once, and it tells each of them.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::jobs::Job;
use crate::metrics::{self, SkipReason};
use crate::notify::{Notifier, PingEvent, Pinger};
use crate::state::JobLast;
use crate::status::{ClusterLast, DatabaseStatus, JobStatus, MemberStatus, Status};

/// Shared handle; cheap to clone.
#[derive(Clone, Default)]
pub struct Reporter {
    status: Status,
    notifier: Arc<Mutex<Option<Notifier>>>,
    /// One for the whole process (not per configuration), so that the pings of a
    /// run that spans a reload stay in order.
    pinger: Option<Pinger>,
    /// Replicas: the series of claims exist for every job.
    clustered: bool,
}

impl Reporter {
    pub fn new(status: Status) -> Self {
        Reporter {
            status,
            notifier: Arc::default(),
            pinger: None,
            clustered: false,
        }
    }

    /// This daemon is a replica: claim series are created for every job.
    pub fn clustered(mut self) -> Self {
        self.clustered = true;
        self
    }

    /// Pings each job's `ping-url` (if it has one) through `pinger`.
    pub fn with_pinger(mut self, pinger: Pinger) -> Self {
        self.pinger = Some(pinger);
        self
    }

    /// Queues a dead-man ping if the job has a ping URL.
    fn ping(&self, job: &Job, event: PingEvent, message: &str) {
        if let (Some(pinger), Some(target)) = (&self.pinger, &job.options.ping) {
            pinger.ping(&job.id, target, event, message);
        }
    }

    fn notifier(&self) -> MutexGuard<'_, Option<Notifier>> {
        self.notifier.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A configuration was (re)loaded: its databases and jobs (each with its last
    /// runs and expected interval) replace the old ones, and `notifier` (or none)
    /// takes over the notifications.
    pub fn configure(
        &self,
        config_file: &str,
        databases: Vec<DatabaseStatus>,
        jobs: &[(Arc<Job>, JobLast, Option<Duration>)],
        notifier: Option<Notifier>,
        at: DateTime<Utc>,
    ) {
        let rows = jobs
            .iter()
            .map(|(job, last, interval)| {
                metrics::register_job(job.labels(), last, *interval, job.options.timeout);
                if job.options.ping.is_some() {
                    metrics::register_ping(&job.id);
                }
                if self.clustered {
                    metrics::register_claims(job.labels());
                }
                JobStatus {
                    job: job.id.clone(),
                    kind: job.kind().to_owned(),
                    database: job.database_name().to_owned(),
                    schedule: job.options.schedule.to_string(),
                    timezone: job.options.timezone.to_string(),
                    running: false,
                    last_result: last.last_result.map(|r| r.as_str().to_owned()),
                    last_run: last.last_run,
                    last_success: last.last_success,
                    last_failure: last.last_failure,
                    last_error: last.last_error.clone(),
                    next_run: None,
                    last_replica: None,
                }
            })
            .collect();
        let running = self.status.configure(config_file, databases, rows, at);
        for (job, last, _) in jobs.iter().filter(|(j, _, _)| running.contains(&j.id)) {
            metrics::job_started(job.labels(), last.last_run.unwrap_or(at));
        }
        metrics::config_loaded(true, at);
        *self.notifier() = notifier;
    }

    /// A reload failed; the running configuration stays in force.
    pub fn reload_failed(&self, error: String) {
        self.status.reload_failed(error);
        metrics::config_loaded(false, Utc::now());
    }

    /// A reload removed the job.
    pub fn job_removed(&self, job: &Job) {
        metrics::job_removed(job.labels());
    }

    pub fn database_probed(&self, name: &str, result: Result<(), String>) {
        metrics::database_up(name, result.is_ok());
        self.status.database_probed(name, result);
    }

    pub fn job_started(&self, job: &Job, at: DateTime<Utc>) {
        self.ping(job, PingEvent::Start, "");
        metrics::job_started(job.labels(), at);
        self.status.job_started(&job.id, at);
    }

    /// A run ended: `result` is its summary on success, its error on failure.
    pub fn job_finished(
        &self,
        job: &Job,
        started: DateTime<Utc>,
        took: Duration,
        result: Result<&str, &str>,
    ) {
        match result {
            Ok(summary) => self.ping(job, PingEvent::Success, summary),
            Err(error) => self.ping(job, PingEvent::Failure, error),
        }
        let error = result.err();
        metrics::job_finished(job.labels(), started, error.is_none(), took);
        let Some(failed_before) = self.status.job_finished(&job.id, started, error) else {
            return;
        };
        if let Some(n) = self.notifier().as_ref() {
            n.run_finished(
                &job.id,
                job.kind(),
                job.database_name(),
                failed_before,
                error,
            );
        }
    }

    /// Replicas: whether the coordination database answered.
    pub fn coordination_seen(&self, cluster: &str, replica: &str, up: bool) {
        metrics::coordination_up(cluster, up);
        if !up {
            // Nobody can be seen alive: the "no replica alive" alert counts on it.
            metrics::cluster_members(cluster, 0);
        }
        self.status.coordination_seen(cluster, replica, up);
    }

    /// Replicas: the members seen alive.
    pub fn cluster_seen(&self, cluster: &str, replica: &str, members: Vec<MemberStatus>) {
        metrics::cluster_members(cluster, members.len());
        self.status.cluster_seen(cluster, replica, members);
    }

    /// Replicas: a replica stopped sending heartbeats.
    pub fn replica_gone(&self, cluster: &str) {
        metrics::replica_gone(cluster);
    }

    /// Replicas: this replica won (and runs) or lost a claim of the job.
    pub fn job_claimed(&self, job: &Job, won: Option<&str>) {
        metrics::job_claimed(job.labels(), won.is_some());
        if let Some(replica) = won {
            self.status.job_ran_here(&job.id, replica);
        }
    }

    /// Replicas: the job's newest runs across the cluster; the board and the
    /// last-run gauges keep the newer of theirs and these.
    pub fn job_cluster_last(&self, job: &Job, last: &ClusterLast) {
        if let Some(merged) = self.status.job_cluster_last(&job.id, last) {
            metrics::job_last_times(
                job.labels(),
                merged.last_run,
                merged.last_success,
                merged.last_failure,
            );
        }
    }

    pub fn job_skipped(&self, job: &Job, reason: SkipReason) {
        metrics::job_skipped(&job.id, reason);
    }

    pub fn job_next_run(&self, job: &Job, next: Option<DateTime<Utc>>) {
        metrics::job_next_run(job.labels(), next);
        self.status.job_next_run(&job.id, next);
    }
}

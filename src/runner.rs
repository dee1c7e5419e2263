//! Runs jobs under supervision: overlap guard, per-database exclusion, the global
//! concurrency limit, timeout, retries with backoff, and the run history.
//!
//! The daemon and `dbkeeper run-job` go through the same [`Runner::run`], so a job
//! run by hand behaves exactly like a scheduled one. Every run is spawned as its own
//! task so that a panicking job is reported as a failed run instead of taking the
//! daemon down.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cluster::{Claimed, Cluster, Lease};
use crate::jobs::{Job, Outcome, Transient, Trigger};
use crate::metrics::SkipReason;
use crate::reporter::Reporter;
use crate::state::{RunResult, StateDb};

/// Longest wait between two retries, however many there are.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// After the grace period, how long cancelled jobs get to unwind.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// Name of the span around each run (and each refused start) of a job. Its fields
/// `job_id`, `database` and `kind` reach every event of the run, the job's own
/// included: journald gets them as `JOB_ID`, `DATABASE`, `KIND` (see `cli::logging`).
pub const JOB_SPAN: &str = "job";

fn job_span(job: &Job) -> tracing::Span {
    tracing::info_span!(
        JOB_SPAN,
        job_id = %job.id,
        database = job.database_name(),
        kind = job.kind()
    )
}

/// How a call to [`Runner::run`] ended.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    Success(Outcome),
    Failure {
        message: String,
        /// The configuration is wrong (see [`crate::jobs::JobError::is_config`]).
        config: bool,
    },
    Skipped(SkipReason),
}

/// Shared handle; cheap to clone.
#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
}

struct Inner {
    state: StateDb,
    report: Reporter,
    tracker: TaskTracker,
    /// Cancelled when shutdown begins: nothing new starts.
    stopping: CancellationToken,
    /// Cancelled when the grace period is over: running jobs are abandoned.
    abort: CancellationToken,
    running: Mutex<HashSet<String>>,
    db_locks: Mutex<HashMap<String, Arc<RwLock<()>>>>,
    slots: Mutex<Arc<Semaphore>>,
    /// Replicas: every run but a manual one is claimed here first.
    cluster: Option<Cluster>,
}

/// Removes the job from the running set when the run ends, however it ends.
struct Claim {
    inner: Arc<Inner>,
    job: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.inner.running).remove(&self.job);
    }
}

enum DbGuard {
    Shared(#[allow(dead_code)] OwnedRwLockReadGuard<()>),
    Exclusive(#[allow(dead_code)] OwnedRwLockWriteGuard<()>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Runner {
    pub fn new(state: StateDb, report: Reporter, max_concurrent: usize) -> Self {
        Self::with_cluster(state, report, max_concurrent, None)
    }

    /// [`Runner::new`] for a replica of `cluster` (or a single daemon with `None`).
    pub fn with_cluster(
        state: StateDb,
        report: Reporter,
        max_concurrent: usize,
        cluster: Option<Cluster>,
    ) -> Self {
        Runner {
            inner: Arc::new(Inner {
                state,
                report,
                tracker: TaskTracker::new(),
                stopping: CancellationToken::new(),
                abort: CancellationToken::new(),
                running: Mutex::new(HashSet::new()),
                db_locks: Mutex::new(HashMap::new()),
                slots: Mutex::new(Arc::new(Semaphore::new(max_concurrent))),
                cluster,
            }),
        }
    }

    /// Applies a new `max-concurrent-jobs`; runs already holding a slot keep it.
    pub fn set_max_concurrent(&self, n: usize) {
        *lock(&self.inner.slots) = Arc::new(Semaphore::new(n));
    }

    pub fn is_running(&self, job: &str) -> bool {
        lock(&self.inner.running).contains(job)
    }

    /// Starts a scheduled run in the background, at `at` plus the job's jitter. `at` is
    /// also the fire time a replica claims (for `Trigger::Missed`, the missed slot's).
    pub fn spawn(&self, job: Arc<Job>, trigger: Trigger, at: DateTime<Utc>) {
        // Claim now, so an overlap is counted at the scheduled time, not after jitter.
        let Some(claim) = self.claim(&job) else {
            return;
        };
        let runner = self.clone();
        self.inner.tracker.spawn(async move {
            let jitter = job.options.jitter;
            let delay = if jitter.is_zero() {
                Duration::ZERO
            } else {
                rand::rng().random_range(Duration::ZERO..jitter)
            };
            let wait = (at - Utc::now()).to_std().unwrap_or_default() + delay;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = runner.inner.stopping.cancelled() => {
                    runner.inner.report.job_skipped(&job, SkipReason::Shutdown);
                    return;
                }
            }
            runner.run_claimed(claim, job, trigger, at).await;
        });
    }

    /// Runs the job now and waits for the result.
    pub async fn run(&self, job: Arc<Job>, trigger: Trigger) -> RunOutcome {
        match self.claim(&job) {
            Some(claim) => self.run_claimed(claim, job, trigger, Utc::now()).await,
            None => RunOutcome::Skipped(SkipReason::Overlap),
        }
    }

    fn claim(&self, job: &Job) -> Option<Claim> {
        if !lock(&self.inner.running).insert(job.id.clone()) {
            let _span = job_span(job).entered();
            tracing::warn!(job = %job.id, "previous run still going; this run is skipped");
            self.inner.report.job_skipped(job, SkipReason::Overlap);
            return None;
        }
        Some(Claim {
            inner: self.inner.clone(),
            job: job.id.clone(),
        })
    }

    async fn run_claimed(
        &self,
        claim: Claim,
        job: Arc<Job>,
        trigger: Trigger,
        fire_at: DateTime<Utc>,
    ) -> RunOutcome {
        let span = job_span(&job);
        self.supervise(claim, job, trigger, fire_at)
            .instrument(span)
            .await
    }

    /// Replicas: claims the run's fire time in the cluster. `Ok(None)` when there is
    /// nothing to claim (a single daemon, a manual run, a per-replica exporter);
    /// `Err` with the skip when another replica runs it or nobody may.
    async fn claim_in_cluster(
        &self,
        job: &Job,
        trigger: Trigger,
        fire_at: DateTime<Utc>,
    ) -> Result<Option<Lease>, RunOutcome> {
        let Some(cluster) = &self.inner.cluster else {
            return Ok(None);
        };
        // An operator asked for a manual run; gauges and table stats feed this
        // replica's own /metrics.
        if trigger == Trigger::Manual || !job.coordinated() {
            return Ok(None);
        }
        let report = &self.inner.report;
        let reason = match cluster.claim(&job.id, fire_at, trigger).await {
            Claimed::Won(lease) => {
                report.job_claimed(job, Some(cluster.replica()));
                return Ok(Some(lease));
            }
            Claimed::Lost { by } => {
                tracing::debug!(job = %job.id, %fire_at, replica = %by, "claimed by another replica; skipped here");
                report.job_claimed(job, None);
                SkipReason::ClaimedElsewhere
            }
            Claimed::Busy { by } => {
                tracing::info!(job = %job.id, replica = %by, "previous run still going on another replica; this run is skipped");
                report.job_claimed(job, None);
                SkipReason::Overlap
            }
            Claimed::Unavailable => SkipReason::CoordinationUnavailable,
        };
        report.job_skipped(job, reason);
        Err(RunOutcome::Skipped(reason))
    }

    async fn supervise(
        &self,
        _claim: Claim,
        job: Arc<Job>,
        trigger: Trigger,
        fire_at: DateTime<Utc>,
    ) -> RunOutcome {
        let inner = &self.inner;
        let db_lock = lock(&inner.db_locks)
            .entry(job.database_name().to_owned())
            .or_default()
            .clone();
        let slots = lock(&inner.slots).clone();
        // Database exclusion first, so a job waiting for its database holds no slot.
        let waited = async {
            let guard = if job.exclusive() {
                DbGuard::Exclusive(db_lock.write_owned().await)
            } else {
                DbGuard::Shared(db_lock.read_owned().await)
            };
            let permit = slots.acquire_owned().await;
            (guard, permit)
        };
        let (_db_guard, _permit) = tokio::select! {
            got = waited => got,
            _ = inner.stopping.cancelled() => {
                inner.report.job_skipped(&job, SkipReason::Shutdown);
                return RunOutcome::Skipped(SkipReason::Shutdown);
            }
        };

        let lease = match self.claim_in_cluster(&job, trigger, fire_at).await {
            Ok(lease) => lease,
            Err(skipped) => return skipped,
        };
        // Cancelled when a replica cannot renew its lease (self-fencing); never for a
        // single daemon.
        let fence = lease
            .as_ref()
            .map_or_else(CancellationToken::new, Lease::fence);

        let started = Utc::now();
        let clock = Instant::now();
        let run_id = inner
            .state
            .begin_run(
                &job.id,
                job.kind(),
                job.database_name(),
                trigger.as_str(),
                started,
            )
            .await
            .map_err(|e| tracing::error!(job = %job.id, "cannot record run start: {e}"))
            .ok();
        inner.report.job_started(&job, started);
        tracing::info!(job = %job.id, trigger = trigger.as_str(), "job started");

        let (result, attempts) = self.attempts(&job, trigger, &fence).await;

        let took = clock.elapsed();
        let error = result.as_ref().err().map(|e| e.message.clone());
        if let Some(lease) = lease {
            lease.finish(result.is_ok(), error.clone());
        }
        if let Some(id) = run_id {
            let (res, details) = match &result {
                Ok(outcome) => (RunResult::Success, outcome.details.clone()),
                Err(_) => (RunResult::Failure, serde_json::json!({})),
            };
            if let Err(e) = inner
                .state
                .finish_run(id, Utc::now(), res, attempts, error.as_deref(), &details)
                .await
            {
                tracing::error!(job = %job.id, "cannot record run result: {e}");
            }
        }
        let told = match &result {
            Ok(outcome) => Ok(outcome.summary.as_str()),
            Err(failure) => Err(failure.message.as_str()),
        };
        inner.report.job_finished(&job, started, took, told);
        match result {
            Ok(outcome) => {
                inner.report.database_probed(job.database_name(), Ok(()));
                tracing::info!(job = %job.id, took_s = took.as_secs_f64(), attempts, "job succeeded: {}", outcome.summary);
                RunOutcome::Success(outcome)
            }
            Err(failure) => {
                if failure.unreachable {
                    inner
                        .report
                        .database_probed(job.database_name(), Err(failure.message.clone()));
                }
                tracing::error!(job = %job.id, took_s = took.as_secs_f64(), attempts, "job failed: {}", failure.message);
                RunOutcome::Failure {
                    message: failure.message,
                    config: failure.config,
                }
            }
        }
    }

    /// Runs attempts until one succeeds, retries are used up, or shutdown stops us.
    async fn attempts(
        &self,
        job: &Arc<Job>,
        trigger: Trigger,
        fence: &CancellationToken,
    ) -> (Result<Outcome, Failure>, u32) {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self.attempt(job, trigger, fence).await;
            let Err(failure) = &result else {
                return (result, attempt);
            };
            if attempt > job.options.retries || failure.final_ {
                return (result, attempt);
            }
            let backoff = job
                .options
                .retry_backoff
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(MAX_BACKOFF);
            tracing::warn!(
                job = %job.id, attempt, "attempt failed: {}; retrying in {}",
                failure.message, humantime::format_duration(backoff)
            );
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.inner.stopping.cancelled() => return (result, attempt),
                _ = fence.cancelled() => return (result, attempt),
            }
        }
    }

    /// One attempt, in its own task (a panic becomes a failure), under the timeout.
    /// On timeout or shutdown the job is asked to stop and given [`CANCEL_WAIT`] to
    /// clean up (e.g. cancel its statement on the server) before it is dropped.
    async fn attempt(
        &self,
        job: &Arc<Job>,
        trigger: Trigger,
        fence: &CancellationToken,
    ) -> Result<Outcome, Failure> {
        let stop = self.inner.abort.child_token();
        let work = job.clone();
        let token = stop.clone();
        // The job's own events belong to the run's span too.
        let mut handle =
            tokio::spawn(async move { work.execute(trigger, token).await }.in_current_span());
        let timeout = job.options.timeout;
        let cut_short = tokio::select! {
            joined = &mut handle => return joined_result(joined),
            _ = tokio::time::sleep(timeout) => Failure {
                message: format!(
                    "timed out after {}; raise `timeout` for this job if it needs longer",
                    humantime::format_duration(timeout)
                ),
                unreachable: false,
                final_: false,
                config: false,
            },
            _ = stop.cancelled() => Failure {
                message: "cancelled: the daemon shut down and the grace period ran out".to_owned(),
                unreachable: false,
                final_: true,
                config: false,
            },
            _ = fence.cancelled() => Failure {
                message: "cancelled: this replica could not renew its claim in the coordination database, \
                          so the run was stopped before another replica may take it over".to_owned(),
                unreachable: false,
                final_: true,
                config: false,
            },
        };
        stop.cancel();
        let mut cut_short = cut_short;
        match tokio::time::timeout(CANCEL_WAIT, &mut handle).await {
            // What the job said when it stopped, unless only that it was cancelled
            // (e.g. a migration naming its pre-migration backup).
            Ok(joined) => {
                if let Err(said) = joined_result(joined) {
                    if !said.message.contains("cancel") {
                        cut_short.message = format!("{}; {}", cut_short.message, said.message);
                    }
                }
            }
            Err(_) => handle.abort(),
        }
        Err(cut_short)
    }

    /// Cancels everything at once (`run-job` interrupted with Ctrl-C).
    pub fn cancel_all(&self) {
        self.inner.stopping.cancel();
        self.inner.abort.cancel();
    }

    /// Stops starting jobs, waits up to `grace` for running ones, then cancels the
    /// rest. Returns false if some did not finish in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        let inner = &self.inner;
        inner.stopping.cancel();
        inner.tracker.close();
        if tokio::time::timeout(grace, inner.tracker.wait())
            .await
            .is_ok()
        {
            return true;
        }
        let running: Vec<String> = lock(&inner.running).iter().cloned().collect();
        tracing::warn!(?running, "grace period over; cancelling running jobs");
        inner.abort.cancel();
        let _ = tokio::time::timeout(CANCEL_WAIT, inner.tracker.wait()).await;
        false
    }
}

fn joined_result(
    joined: Result<Result<Outcome, crate::jobs::JobError>, tokio::task::JoinError>,
) -> Result<Outcome, Failure> {
    match joined {
        Ok(Ok(outcome)) => Ok(outcome),
        Ok(Err(e)) => Err(Failure {
            unreachable: e.database_unreachable(),
            message: e.to_string(),
            final_: !e.is_transient(),
            config: e.is_config(),
        }),
        Err(e) => Err(Failure {
            message: format!("the job panicked ({e}); this is a bug in dbkeeper, please report it"),
            unreachable: false,
            final_: false,
            config: false,
        }),
    }
}

struct Failure {
    message: String,
    unreachable: bool,
    /// No point retrying (e.g. cancelled by shutdown).
    final_: bool,
    /// The configuration is wrong.
    config: bool,
}

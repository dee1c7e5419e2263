//! The daemon's main loop (`dbkeeper run`).
//!
//! Start-up: open the run history, serve HTTP, open and probe the databases, publish
//! every metric series, arm each job's first run, then tell systemd we are ready.
//! The loop then starts jobs as the timer fires, feeds the watchdog, probes databases,
//! prunes the history and reloads the configuration on SIGHUP. On shutdown it stops
//! scheduling, gives running jobs `shutdown-grace` to finish, then cancels them.
//!
//! It knows no job kind: it builds the registry ([`crate::jobs::Jobs`]) and calls
//! each job's hooks (`activate`, `runs_before_ready`, `last_success_on_disk`);
//! what happened goes to the [`Reporter`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, ClusterError, Interrupted};
use crate::config::{Config, Missed};
use crate::db::Database;
use crate::http::BackupShelf;
use crate::jobs::{self, Job, Jobs, Trigger};
use crate::metrics::SkipReason;
use crate::notify::{ping, Notifier, NotifyError, Pinger};
use crate::redact::url_has_password;
use crate::reporter::Reporter;
use crate::runner::Runner;
use crate::scheduler::{Fire, Timer, TimerError};
use crate::state::{JobLast, StateDb, StateError};
use crate::status::{DatabaseStatus, Status};
use crate::{http, metrics, systemd};

/// Drops, in the background, the scratch databases that crashed restores and restore
/// tests left on the servers of the configured PostgreSQL databases (each server once
/// per login); ones still owned by a live process are left alone.
fn clean_scratch_databases(active: &Active) {
    let mut servers = std::collections::HashSet::new();
    for db in active.jobs.databases() {
        if let Database::Postgres(pg) = db {
            if servers.insert(pg.server_identity()) {
                let pg = pg.clone();
                // A server that is down must not hold up start-up.
                tokio::spawn(async move { pg.tidy_scratch_databases().await });
            }
        }
    }
}

/// How often finished runs older than `history-keep` are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot listen on {addr}: {source}; free the port or change daemon.listen")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Timer(#[from] TimerError),
    #[error(transparent)]
    Jobs(#[from] jobs::BuildError),
    #[error(transparent)]
    Notify(#[from] NotifyError),
    #[error("cannot install the signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// The live objects of one loaded configuration.
struct Active {
    config: Config,
    notifier: Option<Notifier>,
    jobs: Jobs,
}

impl Active {
    fn build(config: Config) -> Result<Self, DaemonError> {
        let jobs = Jobs::build(&config)?;
        if config
            .daemon
            .coordination
            .as_deref()
            .is_some_and(url_has_password)
        {
            tracing::warn!(
                "daemon.coordination contains a password; move it to coordination-password-file"
            );
        }
        for db in &config.databases {
            if url_has_password(&db.url) {
                tracing::warn!(
                    database = %db.name,
                    "the url contains a password; move it to password-file so it stays out of config backups"
                );
            }
        }
        let notifier = match &config.notify {
            Some(n) => Some(Notifier::new(n.clone())?),
            None => None,
        };
        Ok(Active {
            notifier,
            config,
            jobs,
        })
    }

    fn summary(&self) -> String {
        format!(
            "databases: {}, jobs: {}",
            self.jobs.databases().len(),
            self.jobs.len()
        )
    }
}

/// Everything the loop works with, besides the active configuration.
struct Daemon {
    state: StateDb,
    report: Reporter,
    /// Where the status page finds the backups.
    shelf: BackupShelf,
    runner: Runner,
    timer: Timer,
    /// Replicas only.
    cluster: Option<Cluster>,
}

/// Runs the daemon until `shutdown` is cancelled. Returns `Ok` after a clean stop.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let metrics_handle = metrics::install();
    let state = StateDb::open(&config.daemon.state_dir).await?;
    let interrupted = state.mark_interrupted().await?;
    if interrupted > 0 {
        tracing::warn!(
            runs = interrupted,
            "runs were cut short by the previous process's end; marked interrupted"
        );
    }
    prune(&state, &config).await;

    let status = Status::default();
    let shelf = BackupShelf::default();
    let listen = config.daemon.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| DaemonError::Bind {
            addr: listen,
            source,
        })?;
    if !listen.ip().is_loopback() {
        tracing::warn!(%listen, "HTTP listener is reachable from other hosts; /metrics and /status are not authenticated");
    }
    // The listener outlives the loop so that /metrics keeps answering during the grace period.
    let http_stop = CancellationToken::new();
    let http_task = tokio::spawn(http::serve(
        listener,
        http::router(metrics_handle, status.clone(), shelf.clone()),
        http_stop.clone(),
    ));

    let (tx, mut fires) = mpsc::unbounded_channel();
    let pinger = Pinger::new()?;
    let mut report = Reporter::new(status).with_pinger(pinger.clone());
    let (gone_tx, mut interrupted) = mpsc::unbounded_channel();
    let cluster = match config.daemon.coordination {
        Some(_) => {
            report = report.clustered();
            Some(Cluster::start(&config.daemon, report.clone(), gone_tx)?)
        }
        None => None,
    };
    let mut daemon = Daemon {
        runner: Runner::with_cluster(
            state.clone(),
            report.clone(),
            config.daemon.max_concurrent_jobs,
            cluster.clone(),
        ),
        timer: Timer::start(tx).await?,
        state,
        report,
        shelf,
        cluster,
    };
    let mut active = Active::build(config)?;
    probe(&active, &daemon.report).await;
    if let Some(period) = systemd::watchdog_period() {
        daemon.timer.heartbeat(period).await?;
    }
    daemon.activate(&active, true).await;
    let grace = active.config.daemon.shutdown_grace;
    let deferred = daemon
        .startup_migrations(&active, &mut fires, &shutdown, grace)
        .await;
    if !shutdown.is_cancelled() {
        for fire in deferred {
            daemon.on_fire(&active, fire).await;
        }
        tracing::info!(%listen, "dbkeeper {} started: {}", env!("CARGO_PKG_VERSION"), active.summary());
        systemd::ready(&active.summary());
    }

    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;
    let mut probe_tick = tokio::time::interval(active.config.daemon.probe_interval);
    probe_tick.reset();
    let probing = Arc::new(AtomicBool::new(false));
    let mut prune_tick = tokio::time::interval(PRUNE_EVERY);
    prune_tick.reset();
    loop {
        tokio::select! {
            // First: a shutdown during start-up must not start anything.
            biased;
            _ = shutdown.cancelled() => break,
            Some(fire) = fires.recv() => daemon.on_fire(&active, fire).await,
            Some(gone) = interrupted.recv() => daemon.on_interrupted(&active, gone),
            _ = hup.recv() => {
                if let Some(new) = daemon.reload(&active).await {
                    active = new;
                    probe_tick = tokio::time::interval(active.config.daemon.probe_interval);
                }
            }
            _ = probe_tick.tick() => {
                // A slow probe (connect-timeout > probe-interval) is not stacked on.
                if !probing.swap(true, Ordering::AcqRel) {
                    let (a, s, flag) = (active.jobs.databases().to_vec(), daemon.report.clone(), probing.clone());
                    tokio::spawn(async move {
                        probe_databases(a, s).await;
                        flag.store(false, Ordering::Release);
                    });
                }
            }
            _ = prune_tick.tick() => prune(&daemon.state, &active.config).await,
        }
    }

    tracing::info!(
        "shutting down: no new jobs start; running jobs get {}",
        humantime::format_duration(active.config.daemon.shutdown_grace)
    );
    systemd::stopping();
    daemon.timer.stop().await;
    if !daemon
        .runner
        .shutdown(active.config.daemon.shutdown_grace)
        .await
    {
        tracing::warn!("some jobs were cancelled at the end of the grace period");
    }
    if let Some(cluster) = &daemon.cluster {
        cluster.stop().await;
    }
    // The last runs' pings, if their monitor is slow; never longer than a moment.
    pinger.shutdown(ping::GRACE).await;
    http_stop.cancel();
    let _ = http_task.await;
    active.jobs.close().await;
    daemon.state.close().await;
    tracing::info!("stopped");
    Ok(())
}

impl Daemon {
    /// Runs `@startup` migrations before the daemon reports ready, feeding the
    /// watchdog from the timer's heartbeats meanwhile; a failure is reported like any
    /// failed job and the daemon carries on. A shutdown meanwhile gives the running
    /// migration the grace period of any job, then cancels it (a migration command's
    /// process group is killed), and starts no other.
    async fn startup_migrations(
        &mut self,
        active: &Active,
        fires: &mut mpsc::UnboundedReceiver<Fire>,
        shutdown: &CancellationToken,
        grace: Duration,
    ) -> Vec<Fire> {
        let mut deferred = Vec::new();
        for job in active.jobs.iter() {
            if !job.runs_before_ready() {
                continue;
            }
            systemd::status(&format!("applying migrations: {}", job.id));
            let run = self.runner.run(job.clone(), Trigger::Startup);
            tokio::pin!(run);
            loop {
                tokio::select! {
                    _ = &mut run => break,
                    _ = shutdown.cancelled() => {
                        // `run` is awaited here, not tracked by the runner: its
                        // shutdown would not wait for it.
                        if tokio::time::timeout(grace, &mut run).await.is_err() {
                            tracing::warn!(job = %job.id, "grace period over; cancelling the start-up migration");
                            self.runner.cancel_all();
                            (&mut run).await;
                        }
                        return deferred;
                    }
                    Some(fire) = fires.recv() => {
                        // Scheduled jobs wait until start-up is over.
                        if fire == Fire::Heartbeat {
                            systemd::watchdog();
                        } else {
                            deferred.push(fire);
                        }
                    }
                }
            }
        }
        deferred
    }

    /// Handles one message from the timer.
    async fn on_fire(&mut self, active: &Active, fire: Fire) {
        match fire {
            Fire::Heartbeat => systemd::watchdog(),
            Fire::Due {
                job,
                at,
                generation,
            } if generation == self.timer.generation() => {
                if let Some(job) = active.jobs.get(&job).cloned() {
                    self.runner.spawn(job.clone(), Trigger::Schedule, at);
                    let next = self
                        .slots(&job)
                        .next_fire(at, Utc::now(), &job.options.timezone);
                    self.arm_at(&job, next).await;
                }
            }
            Fire::Due { .. } => {} // armed before a reload
        }
    }

    /// The job's schedule as this daemon arms it: a replica's `every` slots lie on the
    /// grid every replica computes alike (see [`crate::schedule::Schedule::on_grid`]).
    fn slots<'j>(&self, job: &'j Job) -> std::borrow::Cow<'j, crate::schedule::Schedule> {
        let schedule = &job.options.schedule;
        if self.cluster.is_some() && schedule.is_every() {
            std::borrow::Cow::Owned(schedule.on_grid())
        } else {
            std::borrow::Cow::Borrowed(schedule)
        }
    }

    /// Replicas: another replica died while running `gone`. An interrupted backup
    /// with `missed = "run-once"` is run again here at once, claimed as the missed run
    /// of the same slot (a takeover only one replica wins); any other job simply runs
    /// at its next slot.
    fn on_interrupted(&mut self, active: &Active, gone: Interrupted) {
        let Some(job) = active.jobs.get(&gone.job) else {
            return;
        };
        let jobs::Work::Backup(backup) = &job.work else {
            return;
        };
        if job.options.missed != Missed::RunOnce {
            return;
        }
        // A replica that stored the backup but could not record it before its lease ran
        // out (a coordination outage at the end) did not cut it short.
        let (backup, job, runner) = (backup.clone(), job.clone(), self.runner.clone());
        tokio::spawn(async move {
            let (database, fire_at) = (job.database_name().to_owned(), gone.fire_at);
            let stored =
                tokio::task::spawn_blocking(move || backup.stored_since(&database, fire_at))
                    .await
                    .ok()
                    .flatten();
            match stored {
                Some(id) => {
                    tracing::info!(job = %job.id, replica = %gone.replica, backup = %id, "the interrupted backup was stored before its replica lost its lease; not taken over")
                }
                None => {
                    tracing::info!(job = %job.id, replica = %gone.replica, "taking over the interrupted backup (missed = run-once)");
                    runner.spawn(job, Trigger::Missed, fire_at);
                }
            }
        });
    }

    /// Publishes the configuration's jobs and databases and arms every job.
    async fn activate(&mut self, active: &Active, startup: bool) {
        let history = self.state.last_runs().await.unwrap_or_else(|e| {
            tracing::error!("cannot read the run history, last-run metrics start at 0: {e}");
            HashMap::new()
        });
        let now = Utc::now();
        let jobs: Vec<(Arc<Job>, JobLast, Option<Duration>)> = active
            .jobs
            .iter()
            .map(|job| {
                let mut last = history.get(&job.id).cloned().unwrap_or_default();
                backfill_last_success(job, &mut last);
                let interval = job
                    .options
                    .schedule
                    .expected_interval(now, &job.options.timezone);
                (job.clone(), last, interval)
            })
            .collect();
        let databases = active
            .jobs
            .databases()
            .iter()
            .map(|db| DatabaseStatus {
                name: db.name().to_owned(),
                backend: db.backend().as_str().to_owned(),
                url: db.url().to_owned(),
                up: None,
                error: None,
            })
            .collect();
        self.report.configure(
            &active.config.path.display().to_string(),
            databases,
            &jobs,
            active.notifier.clone(),
            now,
        );
        self.shelf.set(active.jobs.backup_sources());
        if let Some(cluster) = &self.cluster {
            cluster.set_jobs(active.jobs.iter().cloned().collect());
        }
        if startup {
            clean_scratch_databases(active);
        }
        for job in active.jobs.iter() {
            job.activate(startup);
        }
        for (job, last, interval) in &jobs {
            self.schedule_first(job, last, *interval, startup).await;
        }
    }

    /// Arms a job's first run after a (re)load, running it now if it is a start-up
    /// job or (at start-up) a missed one with `missed = "run-once"`.
    async fn schedule_first(
        &mut self,
        job: &Arc<Job>,
        last: &JobLast,
        interval: Option<Duration>,
        startup: bool,
    ) {
        let now = Utc::now();
        let schedule = &job.options.schedule;
        // Start-up migrations run before READY=1 (see `startup_migrations`).
        if schedule.is_startup() && startup && !job.runs_before_ready() {
            self.runner.spawn(job.clone(), Trigger::Startup, now);
        }
        let Some(interval) = interval.and_then(|i| chrono::Duration::from_std(i).ok()) else {
            self.report.job_next_run(job, None);
            return;
        };
        if startup {
            let missed = last.last_success.is_none_or(|t| t + interval < now);
            match job.options.missed {
                Missed::RunOnce if missed => {
                    tracing::info!(job = %job.id, "last success is older than one interval; running it now");
                    // A replica claims the missed slot itself: if another replica ran
                    // it, the claim is lost and nothing runs twice.
                    let slot = match &self.cluster {
                        Some(_) => self.slots(job).last_slot_until(now, &job.options.timezone),
                        None => None,
                    };
                    self.runner
                        .spawn(job.clone(), Trigger::Missed, slot.unwrap_or(now));
                }
                _ if job.runs_at_start() => self.runner.spawn(job.clone(), Trigger::Startup, now),
                Missed::Skip if missed && last.last_run.is_some() => {
                    tracing::info!(job = %job.id, "missed a run while down; waiting for the next slot (missed = skip)");
                    self.report.job_skipped(job, SkipReason::Missed);
                }
                _ => {}
            }
        }
        // `every` slots follow the previous run, so restarts do not postpone them.
        let base = match last.last_run {
            Some(t) if schedule.is_every() && t + interval > now => t,
            _ => now,
        };
        self.arm_next(job, base).await;
    }

    async fn arm_next(&mut self, job: &Arc<Job>, after: chrono::DateTime<Utc>) {
        let next = self.slots(job).next_after(after, &job.options.timezone);
        self.arm_at(job, next).await;
    }

    async fn arm_at(&mut self, job: &Arc<Job>, next: Option<chrono::DateTime<Utc>>) {
        self.report.job_next_run(job, next);
        if let Some(at) = next {
            if let Err(e) = self.timer.arm(&job.id, at).await {
                tracing::error!(job = %job.id, "cannot schedule the next run: {e}");
            }
        }
    }

    /// Reloads the configuration file; on any error the running one stays.
    async fn reload(&mut self, active: &Active) -> Option<Active> {
        let path = &active.config.path;
        tracing::info!(file = %path.display(), "SIGHUP: reloading configuration");
        systemd::reloading();
        let loaded = Config::load(path)
            .map_err(|e| e.to_string())
            .and_then(|c| Active::build(c).map_err(|e| e.to_string()));
        let new = match loaded {
            Ok(new) => new,
            Err(e) => {
                tracing::error!("reload failed, keeping the running configuration: {e}");
                self.report.reload_failed(e);
                systemd::ready(&format!("{}; last reload FAILED", active.summary()));
                return None;
            }
        };
        let (old_d, new_d) = (&active.config.daemon, &new.config.daemon);
        if old_d.listen != new_d.listen || old_d.state_dir != new_d.state_dir {
            tracing::warn!("daemon.listen and daemon.state-dir only change on restart");
        }
        if old_d.coordination != new_d.coordination
            || old_d.cluster != new_d.cluster
            || old_d.lease_timeout != new_d.lease_timeout
        {
            tracing::warn!("daemon.cluster, coordination and lease-timeout only change on restart");
        }
        if old_d.max_concurrent_jobs != new_d.max_concurrent_jobs {
            self.runner.set_max_concurrent(new_d.max_concurrent_jobs);
        }
        for gone in active.jobs.iter().filter(|j| !new.jobs.contains(&j.id)) {
            tracing::info!(job = %gone.id, "job removed from the configuration");
            self.report.job_removed(gone);
        }
        self.timer.disarm_all().await;
        self.activate(&new, false).await;
        probe(&new, &self.report).await;
        tracing::info!("configuration reloaded: {}", new.summary());
        systemd::ready(&new.summary());
        Some(new)
    }
}

/// A job's last success may also be on disk (a backup's manifests): use it when the
/// run history lost it (deleted or corrupted state), so "backup too old" alerts stay
/// right.
fn backfill_last_success(job: &Job, last: &mut JobLast) {
    let newest = job.last_success_on_disk();
    if newest > last.last_success {
        last.last_success = newest;
        if last.last_run < newest {
            last.last_run = newest;
        }
    }
}

async fn probe(active: &Active, report: &Reporter) {
    probe_databases(active.jobs.databases().to_vec(), report.clone()).await;
}

/// Pings every database concurrently and records who answered.
async fn probe_databases(databases: Vec<Database>, report: Reporter) {
    let mut pings = JoinSet::new();
    for db in databases {
        pings.spawn(async move { (db.name().to_owned(), db.ping().await) });
    }
    while let Some(Ok((name, result))) = pings.join_next().await {
        if let Err(e) = &result {
            tracing::warn!(database = %name, "database probe failed: {e}");
        }
        report.database_probed(&name, result.map_err(|e| e.to_string()));
    }
}

async fn prune(state: &StateDb, config: &Config) {
    match state.prune(config.daemon.history_keep, Utc::now()).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(runs = n, "pruned old run history"),
        Err(e) => tracing::warn!("cannot prune the run history: {e}"),
    }
}

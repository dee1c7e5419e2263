//! Replicas: several daemons with one configuration share its schedule through a
//! PostgreSQL database (`[daemon] coordination`), so that each scheduled fire time of a
//! job runs on at most one replica.
//!
//! - **Claim before run.** Before a run starts, its replica inserts the row
//!   `(cluster, job, fire time)` into `dbkeeper.claims`; the primary key lets one
//!   insert win. Fire times come from the schedule (`every` slots on a grid from the
//!   Unix epoch, see [`crate::schedule::Schedule::on_grid`]), so every replica names
//!   the same slot the same way whatever its clock says. A claim is also refused while
//!   another run of the job holds a live lease (the cluster-wide overlap guard). Claims
//!   are made under a per-job advisory transaction lock, which also decides `@startup`
//!   claims ([`lease::startup_claim_wins`]).
//! - **Lease.** A claim carries `lease_until`, in the database's clock; the
//!   [`keeper`] renews the leases of the replica's running claims and its membership
//!   row every third of `lease-timeout`, and cancels a run whose lease it could not
//!   renew in time (self-fencing), so that it is stopped before another replica can
//!   see the claim expired.
//! - **Failover.** Any replica marks claims whose lease ran out unfinished as
//!   `interrupted` (one `UPDATE`: one replica gets each row) and tells the daemon,
//!   which re-runs an interrupted backup at once when its `missed = "run-once"` (a
//!   takeover `UPDATE` only one replica wins). Other jobs run again at their next slot.
//! - **Coordination database unreachable:** claims fail, so nothing runs (skipped with
//!   reason `coordination-unavailable`, logged once per outage, `coordination_up 0`).
//!
//! Manual runs (`dbkeeper run-job`, `migrate apply`) are never claimed: an operator
//! asked for them. Per-replica exporters (query gauges, table stats) are not claimed
//! either: each replica serves its own `/metrics`.

mod keeper;
pub mod lease;
mod schema;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::DaemonConfig;
use crate::db::{Database, DbError};
use crate::jobs::{Job, Trigger};
use crate::reporter::Reporter;
use lease::StartupClaim;

/// Something went wrong talking to the coordination database.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Open(#[from] DbError),
    #[error("coordination database: {0}")]
    Query(#[from] sqlx::Error),
    #[error("coordination database did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("coordination database: schema dbkeeper is at version {found}, newer than this dbkeeper knows ({known}); upgrade this replica")]
    SchemaTooNew { found: usize, known: usize },
    #[error("daemon.coordination is not set: this daemon is not a replica")]
    NotConfigured,
}

/// How a claim ended.
pub enum Claimed {
    /// This replica runs it; keep the lease until the run ends.
    Won(Lease),
    /// Another replica claimed this fire time (`by`).
    Lost { by: String },
    /// Another run of the job still holds a live lease (on replica `by`).
    Busy { by: String },
    /// The coordination database did not answer: nobody can know, nothing runs.
    Unavailable,
}

/// A claim of an interrupted run, as the keeper found it.
#[derive(Debug, Clone)]
pub struct Interrupted {
    pub job: String,
    pub fire_at: DateTime<Utc>,
    pub replica: String,
}

pub use crate::status::{ClusterLast, MemberStatus as Member};

/// Shared handle to this replica's membership; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    replica: String,
    host: String,
    lease: Duration,
    pool: PgPool,
    /// The schema is migrated.
    ready: AtomicBool,
    /// The last query answered (false from the first failure until the next answer).
    up: AtomicBool,
    /// This replica's running claims.
    live: Mutex<HashMap<(String, DateTime<Utc>), Live>>,
    /// The configured jobs, for the cluster-wide last-run gauges.
    jobs: Mutex<Vec<Arc<Job>>>,
    stop: CancellationToken,
    report: Reporter,
    /// Results being recorded: waited for at shutdown, so that a clean stop leaves no
    /// claim to be found interrupted (and a finished backup run again elsewhere).
    finishing: TaskTracker,
}

struct Live {
    /// When the claim or its latest confirmed renewal was sent: its lease lasts at
    /// least `lease` from here.
    renewed: Instant,
    fence: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// This host's name, for replica ids and the members table.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

/// Opens the coordination database's pool (lazily: a database that is down does not
/// stop the daemon from starting).
fn open_pool(daemon: &DaemonConfig) -> Result<PgPool, ClusterError> {
    let timeout = lease::query_timeout(daemon.lease_timeout);
    let cfg = daemon
        .coordination_database(timeout)
        .ok_or(ClusterError::NotConfigured)?;
    match Database::open(&cfg)? {
        Database::Postgres(pg) => Ok(pg.pool),
        // Validation accepts only postgres:// URLs.
        Database::Sqlite(_) => Err(ClusterError::NotConfigured),
    }
}

impl Cluster {
    /// Joins the cluster of `daemon` (which must have `coordination`): starts the keeper
    /// that migrates the schema, renews leases and memberships and finds interrupted
    /// runs (sent to `interrupted`).
    pub fn start(
        daemon: &DaemonConfig,
        report: Reporter,
        interrupted: UnboundedSender<Interrupted>,
    ) -> Result<Cluster, ClusterError> {
        let name = daemon
            .cluster_name()
            .ok_or(ClusterError::NotConfigured)?
            .to_owned();
        let pool = open_pool(daemon)?;
        let host = host_name();
        let replica = format!(
            "{host}-{}-{:04x}",
            std::process::id(),
            rand::random::<u16>()
        );
        let cluster = Cluster {
            inner: Arc::new(Inner {
                name,
                replica,
                host,
                lease: daemon.lease_timeout,
                pool,
                ready: AtomicBool::new(false),
                up: AtomicBool::new(true),
                live: Mutex::new(HashMap::new()),
                jobs: Mutex::new(Vec::new()),
                stop: CancellationToken::new(),
                report,
                finishing: TaskTracker::new(),
            }),
        };
        cluster
            .inner
            .report
            .coordination_seen(&cluster.inner.name, &cluster.inner.replica, false);
        tracing::info!(
            cluster = %cluster.inner.name,
            replica = %cluster.inner.replica,
            lease = %humantime::format_duration(cluster.inner.lease),
            "joining the cluster through the coordination database"
        );
        tokio::spawn(keeper::run(cluster.clone(), interrupted));
        Ok(cluster)
    }

    /// This replica's id: host, process id and a random suffix (a restarted process
    /// is a new replica).
    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The jobs of the configuration in force (for the cluster-wide gauges).
    pub fn set_jobs(&self, jobs: Vec<Arc<Job>>) {
        *lock(&self.inner.jobs) = jobs;
    }

    /// Runs one coordination query under [`lease::query_timeout`], and keeps
    /// `coordination_up` (and the once-per-outage log line) in step with its answer.
    async fn query<T, E>(&self, work: impl Future<Output = Result<T, E>>) -> Result<T, ClusterError>
    where
        ClusterError: From<E>,
    {
        let timeout = lease::query_timeout(self.inner.lease);
        let result = match tokio::time::timeout(timeout, work).await {
            Ok(r) => r.map_err(ClusterError::from),
            Err(_) => Err(ClusterError::Timeout(timeout)),
        };
        self.seen(result.as_ref().err());
        result
    }

    fn seen(&self, error: Option<&ClusterError>) {
        let inner = &self.inner;
        match error {
            None => {
                if !inner.up.swap(true, Ordering::AcqRel) {
                    tracing::info!(cluster = %inner.name, "the coordination database answers again; claiming jobs again");
                }
                inner
                    .report
                    .coordination_seen(&inner.name, &inner.replica, true);
            }
            Some(e) => {
                if inner.up.swap(false, Ordering::AcqRel) {
                    tracing::error!(cluster = %inner.name, "coordination database unavailable, no job runs on this replica until it answers: {e}");
                }
                inner
                    .report
                    .coordination_seen(&inner.name, &inner.replica, false);
            }
        }
    }

    /// Creates or migrates the schema unless done already (by the keeper's first round
    /// or an earlier claim: a start-up migration may claim before the keeper ran).
    async fn ensure_schema(&self) -> Result<(), ClusterError> {
        let inner = &self.inner;
        if !inner.ready.load(Ordering::Acquire) {
            self.query(schema::migrate(&inner.pool)).await?;
            inner.ready.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Claims `(job, fire_at)` for this replica. `trigger` decides the rule: a
    /// `Startup` claim has no fire time of its own ([`lease::startup_claim_wins`]);
    /// a `Missed` claim may take over a run of that slot that was interrupted.
    pub async fn claim(&self, job: &str, fire_at: DateTime<Utc>, trigger: Trigger) -> Claimed {
        if self.ensure_schema().await.is_err() {
            return Claimed::Unavailable;
        }
        let sent = Instant::now();
        match self.query(self.try_claim(job, fire_at, trigger)).await {
            Ok(Answer::Won(fire_at)) => Claimed::Won(self.hold(job, fire_at, sent)),
            Ok(Answer::Lost(by)) => Claimed::Lost { by },
            Ok(Answer::Busy(by)) => Claimed::Busy { by },
            Err(_) => Claimed::Unavailable,
        }
    }

    /// The claim transaction, under the job's advisory lock: the existing claim of the
    /// slot, the cluster-wide overlap guard, then the insert (or the takeover).
    async fn try_claim(
        &self,
        job: &str,
        fire_at: DateTime<Utc>,
        trigger: Trigger,
    ) -> Result<Answer, ClusterError> {
        let inner = &self.inner;
        let lease = inner.lease.as_secs_f64();
        let mut tx = inner.pool.begin().await?;
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtext('dbkeeper.claims'), hashtext($1 || '/' || $2))",
        )
        .bind(&inner.name)
        .bind(job)
        .execute(&mut *tx)
        .await?;
        // The slot: `None` for a start-up claim, whose key is the database's now().
        let mut slot = Some(fire_at);
        if trigger == Trigger::Startup {
            slot = None;
            let rows = sqlx::query(
                "SELECT now(), claimed_at, finished_at IS NOT NULL, lease_until, replica \
                 FROM dbkeeper.claims WHERE cluster = $1 AND job = $2 AND trigger = 'startup' \
                 AND (claimed_at > now() - make_interval(secs => $3) \
                      OR (finished_at IS NULL AND lease_until > now())) \
                 ORDER BY claimed_at",
            )
            .bind(&inner.name)
            .bind(job)
            .bind(lease)
            .fetch_all(&mut *tx)
            .await?;
            let mut recent = Vec::new();
            let mut now = Utc::now();
            for row in &rows {
                now = row.try_get(0)?;
                recent.push(StartupClaim {
                    claimed_at: row.try_get(1)?,
                    finished: row.try_get(2)?,
                    lease_until: row.try_get(3)?,
                });
            }
            if !lease::startup_claim_wins(now, inner.lease, &recent) {
                let by = match rows.first() {
                    Some(row) => row.try_get(4)?,
                    None => "another replica".to_owned(),
                };
                return Ok(Answer::Lost(by));
            }
        } else {
            let existing = sqlx::query(
                "SELECT replica, coalesce(result, '') FROM dbkeeper.claims \
                 WHERE cluster = $1 AND job = $2 AND fire_at = $3",
            )
            .bind(&inner.name)
            .bind(job)
            .bind(fire_at)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = existing {
                let by: String = row.try_get(0)?;
                let result: String = row.try_get(1)?;
                if !(trigger == Trigger::Missed && result == "interrupted") {
                    return Ok(Answer::Lost(by));
                }
            }
        }
        // The overlap guard: only renewed claims count (see `lease::renew_after_age`).
        let busy = sqlx::query(
            "SELECT replica FROM dbkeeper.claims WHERE cluster = $1 AND job = $2 \
             AND finished_at IS NULL AND lease_until > now() AND renewals > 0 LIMIT 1",
        )
        .bind(&inner.name)
        .bind(job)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = busy {
            return Ok(Answer::Busy(row.try_get(0)?));
        }
        // Insert the claim, or take over the interrupted one (an UPDATE only one wins:
        // it needs the row to be still interrupted). Takeovers are bounded: a backup
        // that kills every replica running it is not passed round for ever.
        let won = sqlx::query(
            "WITH taken AS ( \
                 UPDATE dbkeeper.claims SET replica = $4, trigger = $5, claimed_at = now(), \
                     lease_until = now() + make_interval(secs => $6), attempt = attempt + 1, renewals = 0, \
                     finished_at = NULL, result = NULL, message = NULL \
                 WHERE cluster = $1 AND job = $2 AND fire_at = $3 AND result = 'interrupted' \
                     AND attempt < 3 AND $5 = 'missed' \
                 RETURNING fire_at), \
             inserted AS ( \
                 INSERT INTO dbkeeper.claims (cluster, job, fire_at, trigger, replica, lease_until) \
                 SELECT $1, $2, coalesce($3, now()), $5, $4, now() + make_interval(secs => $6) \
                 WHERE NOT EXISTS (SELECT 1 FROM dbkeeper.claims \
                     WHERE cluster = $1 AND job = $2 AND fire_at = coalesce($3, now())) \
                 ON CONFLICT DO NOTHING RETURNING fire_at) \
             SELECT fire_at FROM taken UNION ALL SELECT fire_at FROM inserted",
        )
        .bind(&inner.name)
        .bind(job)
        .bind(slot)
        .bind(&inner.replica)
        .bind(trigger.as_str())
        .bind(lease)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = won else {
            return Ok(Answer::Lost("another replica".to_owned()));
        };
        let fire_at: DateTime<Utc> = row.try_get(0)?;
        tx.commit().await?;
        Ok(Answer::Won(fire_at))
    }

    /// Registers a won claim with the keeper, which renews and fences it.
    fn hold(&self, job: &str, fire_at: DateTime<Utc>, sent: Instant) -> Lease {
        let fence = CancellationToken::new();
        lock(&self.inner.live).insert(
            (job.to_owned(), fire_at),
            Live {
                renewed: sent,
                fence: fence.clone(),
            },
        );
        Lease {
            cluster: self.clone(),
            job: job.to_owned(),
            fire_at,
            fence,
            finished: false,
        }
    }

    /// Records the end of a claimed run (in the background, retried while its lease
    /// lasts; a result that never arrives leaves the claim to expire as interrupted).
    fn finish(
        &self,
        job: String,
        fire_at: DateTime<Utc>,
        result: &'static str,
        message: Option<String>,
    ) {
        let cluster = self.clone();
        self.inner.finishing.spawn(async move {
            let deadline = Instant::now() + cluster.inner.lease;
            loop {
                let done = cluster
                    .query(cluster.record_result(&job, fire_at, result, message.as_deref()))
                    .await;
                match done {
                    Ok(()) => break,
                    Err(e) if Instant::now() >= deadline => {
                        tracing::warn!(job = %job, "cannot record the run's result in the coordination database; its claim will expire as interrupted: {e}");
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
            lock(&cluster.inner.live).remove(&(job, fire_at));
        });
    }

    async fn record_result(
        &self,
        job: &str,
        fire_at: DateTime<Utc>,
        result: &str,
        message: Option<&str>,
    ) -> Result<(), ClusterError> {
        let inner = &self.inner;
        sqlx::query(
            "WITH done AS ( \
                 UPDATE dbkeeper.claims SET finished_at = now(), result = $5, message = $6 \
                 WHERE cluster = $1 AND job = $2 AND fire_at = $3 AND replica = $4 \
                     AND finished_at IS NULL \
                 RETURNING job, claimed_at, result, replica) \
             INSERT INTO dbkeeper.jobs_last AS l \
                 (cluster, job, last_run, last_success, last_failure, last_result, last_replica) \
             SELECT $1, job, claimed_at, \
                 CASE WHEN result = 'success' THEN claimed_at END, \
                 CASE WHEN result <> 'success' THEN claimed_at END, result, replica FROM done \
             ON CONFLICT (cluster, job) DO UPDATE SET \
                 last_success = greatest(l.last_success, excluded.last_success), \
                 last_failure = greatest(l.last_failure, excluded.last_failure), \
                 last_result = CASE WHEN l.last_run > excluded.last_run THEN l.last_result \
                     ELSE excluded.last_result END, \
                 last_replica = CASE WHEN l.last_run > excluded.last_run THEN l.last_replica \
                     ELSE excluded.last_replica END, \
                 last_run = greatest(l.last_run, excluded.last_run)",
        )
        .bind(&inner.name)
        .bind(job)
        .bind(fire_at)
        .bind(&inner.replica)
        .bind(result)
        .bind(message)
        .execute(&inner.pool)
        .await?;
        Ok(())
    }

    /// Leaves the cluster: stops the keeper and removes this replica's membership row
    /// (best effort; a row left behind simply ages out).
    pub async fn stop(&self) {
        let inner = &self.inner;
        inner.finishing.close();
        let _ = tokio::time::timeout(inner.lease, inner.finishing.wait()).await;
        inner.stop.cancel();
        let _ = self
            .query(
                sqlx::query("DELETE FROM dbkeeper.members WHERE cluster = $1 AND replica = $2")
                    .bind(&inner.name)
                    .bind(&inner.replica)
                    .execute(&inner.pool),
            )
            .await;
        inner.pool.close().await;
    }
}

/// What the claim transaction decided.
enum Answer {
    Won(DateTime<Utc>),
    Lost(String),
    Busy(String),
}

/// A won claim: held while the run goes on. Dropping it without [`Lease::finish`]
/// leaves the claim to expire as interrupted.
pub struct Lease {
    cluster: Cluster,
    job: String,
    fire_at: DateTime<Utc>,
    fence: CancellationToken,
    finished: bool,
}

impl Lease {
    /// Cancelled when this replica could not renew the lease in time: the run must stop.
    pub fn fence(&self) -> CancellationToken {
        self.fence.clone()
    }

    /// The run ended: `message` is its error if it failed.
    pub fn finish(mut self, success: bool, message: Option<String>) {
        self.finished = true;
        let result = if success { "success" } else { "failure" };
        self.cluster
            .finish(self.job.clone(), self.fire_at, result, message);
    }
}

/// A lease dropped without a result (its run was abandoned) is recorded as
/// interrupted at once: the keeper would otherwise renew it for as long as this
/// replica lives, and keep the job's next fire times from running anywhere.
impl Drop for Lease {
    fn drop(&mut self) {
        if !self.finished && tokio::runtime::Handle::try_current().is_ok() {
            self.cluster.finish(
                self.job.clone(),
                self.fire_at,
                "interrupted",
                Some("the run was abandoned".to_owned()),
            );
        }
    }
}

/// What `dbkeeper jobs` shows of the cluster: the alive members and each job's newest
/// run across the cluster.
pub struct View {
    pub name: String,
    pub members: Vec<Member>,
    pub jobs: HashMap<String, ClusterLast>,
}

/// Reads the cluster's members and last runs once (for the CLI).
pub async fn read_view(daemon: &DaemonConfig) -> Result<View, ClusterError> {
    let name = daemon
        .cluster_name()
        .ok_or(ClusterError::NotConfigured)?
        .to_owned();
    let pool = open_pool(daemon)?;
    // Before any replica ran, the schema is not there: no members, no runs.
    let created: bool = sqlx::query("SELECT to_regclass('dbkeeper.jobs_last') IS NOT NULL")
        .fetch_one(&pool)
        .await?
        .try_get(0)?;
    let (members, jobs) = if created {
        (
            alive_members(&pool, &name, daemon.lease_timeout).await?,
            last_runs(&pool, &name).await?,
        )
    } else {
        (Vec::new(), HashMap::new())
    };
    pool.close().await;
    Ok(View {
        name,
        members,
        jobs,
    })
}

/// Members seen within one lease, oldest first.
async fn alive_members(
    pool: &PgPool,
    cluster: &str,
    lease: Duration,
) -> Result<Vec<Member>, ClusterError> {
    let rows = sqlx::query(
        "SELECT replica, host, pid, started_at, seen_at FROM dbkeeper.members \
         WHERE cluster = $1 AND seen_at > now() - make_interval(secs => $2) \
         ORDER BY started_at, replica",
    )
    .bind(cluster)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Member {
                replica: r.try_get(0)?,
                host: r.try_get(1)?,
                pid: r.try_get(2)?,
                started_at: r.try_get(3)?,
                seen_at: r.try_get(4)?,
            })
        })
        .collect()
}

/// Each job's newest run, success and failure across the cluster.
async fn last_runs(
    pool: &PgPool,
    cluster: &str,
) -> Result<HashMap<String, ClusterLast>, ClusterError> {
    let rows = sqlx::query(
        "SELECT job, last_run, last_success, last_failure, last_result, last_replica \
         FROM dbkeeper.jobs_last WHERE cluster = $1",
    )
    .bind(cluster)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get(0)?,
                ClusterLast {
                    last_run: r.try_get(1)?,
                    last_success: r.try_get(2)?,
                    last_failure: r.try_get(3)?,
                    last_result: r.try_get(4)?,
                    last_replica: r.try_get(5)?,
                },
            ))
        })
        .collect()
}

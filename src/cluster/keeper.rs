//! The replica's background task: migrates the schema, renews leases and the
//! membership row, fences runs whose lease could not be renewed, marks other
//! replicas' expired claims interrupted, and refreshes the cluster view (members, each
//! job's newest run) on the status board and in the metrics.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::Row;
use tokio::sync::mpsc::UnboundedSender;

use super::{alive_members, last_runs, lease, lock, Cluster, ClusterError, Interrupted};

/// How often finished claims older than a day and members gone for a day are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

pub(super) async fn run(cluster: Cluster, interrupted: UnboundedSender<Interrupted>) {
    let lease_time = cluster.inner.lease;
    // Fencing has its own task: a round stuck on a slow coordination database must not
    // delay it.
    let fencer = cluster.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(lease::tick_every(lease_time));
        loop {
            tokio::select! {
                _ = fencer.inner.stop.cancelled() => return,
                _ = tick.tick() => fencer.fence_overdue(),
            }
        }
    });
    let mut rounds = tokio::time::interval(lease::renew_every(lease_time));
    rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune = Instant::now();
    let mut alive = BTreeSet::new();
    loop {
        tokio::select! {
            _ = cluster.inner.stop.cancelled() => return,
            _ = rounds.tick() => {}
        }
        if cluster.round(&interrupted, &mut alive).await.is_ok()
            && last_prune.elapsed() >= PRUNE_EVERY
        {
            last_prune = Instant::now();
            let _ = cluster.query(cluster.prune()).await;
        }
    }
}

impl Cluster {
    /// One renewal round; stops at the first query that fails.
    async fn round(
        &self,
        interrupted: &UnboundedSender<Interrupted>,
        alive: &mut BTreeSet<String>,
    ) -> Result<(), ClusterError> {
        let inner = &self.inner;
        self.ensure_schema().await?;
        self.renew().await?;
        self.query(self.heartbeat()).await?;
        let members = self
            .query(alive_members(&inner.pool, &inner.name, inner.lease))
            .await?;
        let now: BTreeSet<String> = members.iter().map(|m| m.replica.clone()).collect();
        for gone in alive.difference(&now) {
            tracing::warn!(cluster = %inner.name, replica = %gone, "replica gone: no heartbeat within the lease timeout");
            inner.report.replica_gone(&inner.name);
        }
        for joined in now.difference(alive) {
            tracing::info!(cluster = %inner.name, replica = %joined, "replica alive");
        }
        *alive = now;
        inner
            .report
            .cluster_seen(&inner.name, &inner.replica, members);
        for claim in self.query(self.sweep()).await? {
            tracing::warn!(
                cluster = %inner.name, replica = %claim.replica, job = %claim.job, fire_at = %claim.fire_at,
                "replica {} stopped renewing its lease: its run of {} is marked interrupted", claim.replica, claim.job
            );
            let _ = interrupted.send(claim);
        }
        let last = self.query(last_runs(&inner.pool, &inner.name)).await?;
        let jobs = lock(&inner.jobs).clone();
        for job in jobs {
            if let Some(l) = last.get(&job.id) {
                inner.report.job_cluster_last(&job, l);
            }
        }
        Ok(())
    }

    /// Extends the leases of this replica's running claims that are older than
    /// [`lease::renew_after_age`], and counts the renewal (the overlap guard's sign
    /// that the run is long and its replica alive).
    async fn renew(&self) -> Result<(), ClusterError> {
        let inner = &self.inner;
        // Only the runs going on here: a claim whose run ended while its result could
        // not be recorded must expire, not be kept alive (and block the job) for ever.
        let (jobs, fire_times): (Vec<String>, Vec<DateTime<Utc>>) = lock(&inner.live)
            .iter()
            .filter(|(_, live)| !live.fence.is_cancelled())
            .map(|(key, _)| key.clone())
            .unzip();
        if jobs.is_empty() {
            return Ok(());
        }
        let sent = Instant::now();
        let rows = self
            .query(
                sqlx::query(
                    "UPDATE dbkeeper.claims SET lease_until = now() + make_interval(secs => $3), \
                         renewals = renewals + 1 \
                     WHERE cluster = $1 AND replica = $2 AND finished_at IS NULL \
                         AND claimed_at < now() - make_interval(secs => $4) \
                         AND (job, fire_at) IN (SELECT * FROM unnest($5::text[], $6::timestamptz[])) \
                     RETURNING job, fire_at",
                )
                .bind(&inner.name)
                .bind(&inner.replica)
                .bind(inner.lease.as_secs_f64())
                .bind(lease::renew_after_age(inner.lease).as_secs_f64())
                .bind(jobs)
                .bind(fire_times)
                .fetch_all(&inner.pool),
            )
            .await?;
        let mut live = lock(&inner.live);
        for row in &rows {
            let key = (row.try_get::<String, _>(0)?, row.try_get(1)?);
            if let Some(claim) = live.get_mut(&key) {
                claim.renewed = sent;
            }
        }
        Ok(())
    }

    /// Cancels the runs whose lease could not be renewed in time (self-fencing). Once
    /// this replica cannot renew, another one may soon see the claim expired: the run
    /// must be stopped before that.
    fn fence_overdue(&self) {
        let inner = &self.inner;
        let now = Instant::now();
        for (key, live) in lock(&inner.live).iter() {
            if now >= lease::fence_at(live.renewed, inner.lease) && !live.fence.is_cancelled() {
                tracing::error!(
                    job = %key.0,
                    "cannot renew the lease of this run in the coordination database for {}: cancelling it, so that no other replica can run it at the same time",
                    humantime::format_duration(Duration::from_secs(now.duration_since(live.renewed).as_secs()))
                );
                live.fence.cancel();
            }
        }
    }

    async fn heartbeat(&self) -> Result<(), sqlx::Error> {
        let inner = &self.inner;
        sqlx::query(
            "INSERT INTO dbkeeper.members (cluster, replica, host, pid) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (cluster, replica) DO UPDATE SET seen_at = now()",
        )
        .bind(&inner.name)
        .bind(&inner.replica)
        .bind(&inner.host)
        .bind(i32::try_from(std::process::id()).unwrap_or(i32::MAX))
        .execute(&inner.pool)
        .await?;
        Ok(())
    }

    /// Marks every claim whose lease ran out unfinished as interrupted. One UPDATE:
    /// each row goes to exactly one replica's answer, whichever sweeps first.
    async fn sweep(&self) -> Result<Vec<Interrupted>, ClusterError> {
        let inner = &self.inner;
        let rows = sqlx::query(
            "WITH gone AS ( \
                 UPDATE dbkeeper.claims SET finished_at = now(), result = 'interrupted', \
                     message = 'replica ' || replica || ' stopped renewing its lease' \
                 WHERE cluster = $1 AND finished_at IS NULL AND lease_until < now() \
                 RETURNING job, fire_at, replica, claimed_at), \
             newest AS ( \
                 INSERT INTO dbkeeper.jobs_last AS l (cluster, job, last_run, last_failure, last_result, last_replica) \
                 SELECT DISTINCT ON (job) $1, job, claimed_at, claimed_at, 'interrupted', replica \
                 FROM gone ORDER BY job, claimed_at DESC \
                 ON CONFLICT (cluster, job) DO UPDATE SET \
                     last_failure = greatest(l.last_failure, excluded.last_failure), \
                     last_result = CASE WHEN l.last_run > excluded.last_run THEN l.last_result \
                         ELSE excluded.last_result END, \
                     last_replica = CASE WHEN l.last_run > excluded.last_run THEN l.last_replica \
                         ELSE excluded.last_replica END, \
                     last_run = greatest(l.last_run, excluded.last_run)) \
             SELECT job, fire_at, replica FROM gone",
        )
        .bind(&inner.name)
        .fetch_all(&inner.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Interrupted {
                    job: r.try_get(0)?,
                    fire_at: r.try_get(1)?,
                    replica: r.try_get(2)?,
                })
            })
            .collect()
    }

    async fn prune(&self) -> Result<(), sqlx::Error> {
        let inner = &self.inner;
        sqlx::query(
            "DELETE FROM dbkeeper.claims WHERE cluster = $1 AND finished_at < now() - interval '1 day'",
        )
        .bind(&inner.name)
        .execute(&inner.pool)
        .await?;
        sqlx::query(
            "DELETE FROM dbkeeper.members WHERE cluster = $1 AND seen_at < now() - interval '1 day'",
        )
        .bind(&inner.name)
        .execute(&inner.pool)
        .await?;
        Ok(())
    }
}

//! The timer that wakes jobs up, built on tokio-cron-scheduler.
//!
//! tokio-cron-scheduler's own cron-with-time-zone jobs freeze the UTC offset when the
//! job is created, so a job would drift by an hour at each daylight-saving change.
//! Instead, [`crate::schedule`] computes each next run time from the IANA zone, and
//! the timer arms a one-shot job for exactly that instant. When it fires, a [`Fire`]
//! goes to the daemon loop, which starts the run and arms the next one. A repeated
//! heartbeat job proves that the timer is still ticking; the daemon only feeds the
//! systemd watchdog when heartbeats arrive.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc::UnboundedSender;
use tokio_cron_scheduler::{Job as TimerJob, JobScheduler, JobSchedulerError};
use uuid::Uuid;

/// A message from the timer to the daemon loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fire {
    /// `job` is due at `at`. Stale when `generation` is not the current one (the
    /// configuration was reloaded since it was armed).
    Due {
        job: String,
        at: DateTime<Utc>,
        generation: u64,
    },
    /// The timer is alive.
    Heartbeat,
}

/// The timer could not be started or armed.
#[derive(Debug, thiserror::Error)]
#[error("scheduler: {0}")]
pub struct TimerError(#[from] JobSchedulerError);

pub struct Timer {
    scheduler: JobScheduler,
    tx: UnboundedSender<Fire>,
    armed: HashMap<String, Uuid>,
    generation: u64,
}

impl Timer {
    pub async fn start(tx: UnboundedSender<Fire>) -> Result<Self, TimerError> {
        let scheduler = JobScheduler::new().await?;
        scheduler.start().await?;
        Ok(Timer {
            scheduler,
            tx,
            armed: HashMap::new(),
            generation: 0,
        })
    }

    /// The generation fires must carry to be acted upon.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Arms `job` to fire at `at` (replacing any earlier arming of it).
    pub async fn arm(&mut self, job: &str, at: DateTime<Utc>) -> Result<(), TimerError> {
        if let Some(old) = self.armed.remove(job) {
            // Already fired and removed by the scheduler: nothing to undo.
            let _ = self.scheduler.remove(&old).await;
        }
        let fire = Fire::Due {
            job: job.to_owned(),
            at,
            generation: self.generation,
        };
        // The scheduler works in whole seconds and may fire up to a second early;
        // the runner waits for the exact instant, and the next slot is computed
        // from `at`, not from the time the fire arrived.
        let wait = (at - Utc::now()).to_std().unwrap_or_default();
        let tx = self.tx.clone();
        let timer_job =
            TimerJob::new_one_shot_at_instant_async(Instant::now() + wait, move |_, _| {
                let _ = tx.send(fire.clone());
                Box::pin(async {})
            })?;
        let id = self.scheduler.add(timer_job).await?;
        self.armed.insert(job.to_owned(), id);
        Ok(())
    }

    /// Forgets every armed job; fires already on their way become stale.
    pub async fn disarm_all(&mut self) {
        for (_, id) in self.armed.drain() {
            let _ = self.scheduler.remove(&id).await;
        }
        self.generation += 1;
    }

    /// Sends [`Fire::Heartbeat`] every `period` (at least one second).
    pub async fn heartbeat(&mut self, period: Duration) -> Result<(), TimerError> {
        let tx = self.tx.clone();
        let job = TimerJob::new_repeated_async(period.max(Duration::from_secs(1)), move |_, _| {
            let _ = tx.send(Fire::Heartbeat);
            Box::pin(async {})
        })?;
        self.scheduler.add(job).await?;
        Ok(())
    }

    pub async fn stop(mut self) {
        self.disarm_all().await;
        if let Err(e) = self.scheduler.shutdown().await {
            tracing::warn!("scheduler did not shut down cleanly: {e}");
        }
    }
}

//! The run history: a SQLite file (`<state-dir>/state.db`) with one row per job run.
//!
//! It is what `dbkeeper history` and `dbkeeper jobs` show, and where the daemon reads
//! each job's last success and failure back at start-up so the `job_last_*` gauges
//! survive restarts. Its schema lives in `migrations/` and is applied with
//! `sqlx::migrate!`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The run history could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}: {source}; create it or set daemon.state-dir to a writable directory")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot open run history {path}: {source}; check daemon.state-dir and its permissions"
    )]
    Open { path: PathBuf, source: sqlx::Error },
    #[error("cannot update the schema of run history {path}: {source}")]
    Migrate {
        path: PathBuf,
        source: sqlx::migrate::MigrateError,
    },
    #[error("cannot lock the state directory {path} to open the run history: {source}; check daemon.state-dir and its permissions")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("run history: {0}")]
    Query(#[from] sqlx::Error),
}

impl StateError {
    /// SQLite says the file is not a database, or is damaged (codes 26 and 11).
    fn is_corruption(&self) -> bool {
        let db_code = |e: &sqlx::Error| {
            e.as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c == "26" || c == "11")
        };
        match self {
            StateError::Open { source, .. } => db_code(source),
            StateError::Migrate {
                source: sqlx::migrate::MigrateError::Execute(e),
                ..
            } => db_code(e),
            _ => false,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunResult {
    Running,
    Success,
    Failure,
    /// The process died while the run was in progress.
    Interrupted,
}

impl RunResult {
    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Running => "running",
            RunResult::Success => "success",
            RunResult::Failure => "failure",
            RunResult::Interrupted => "interrupted",
        }
    }

    /// The result as stored (`success`, `failure`, …); anything else is a failure.
    pub fn parse(s: &str) -> Self {
        match s {
            "running" => RunResult::Running,
            "success" => RunResult::Success,
            "interrupted" => RunResult::Interrupted,
            _ => RunResult::Failure,
        }
    }
}

/// One row of the history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRecord {
    pub id: i64,
    pub job: String,
    pub kind: String,
    pub database: String,
    pub trigger: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "serialize_result")]
    pub result: RunResult,
    pub attempts: i64,
    pub error: Option<String>,
    pub details: Option<serde_json::Value>,
}

fn serialize_result<S: serde::Serializer>(r: &RunResult, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

/// What the history knows about one job's latest runs.
#[derive(Debug, Clone, Default)]
pub struct JobLast {
    pub last_run: Option<DateTime<Utc>>,
    pub last_result: Option<RunResult>,
    pub last_error: Option<String>,
    pub last_success: Option<DateTime<Utc>>,
    pub last_failure: Option<DateTime<Utc>>,
}

/// Handle to the run history.
#[derive(Clone)]
pub struct StateDb {
    pool: SqlitePool,
}

fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn base_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .busy_timeout(Duration::from_secs(10))
}

async fn pool(
    path: &Path,
    options: SqliteConnectOptions,
    connections: u32,
) -> Result<SqlitePool, StateError> {
    SqlitePoolOptions::new()
        .max_connections(connections)
        .connect_with(options)
        .await
        .map_err(|source| StateError::Open {
            path: path.to_owned(),
            source,
        })
}

impl StateDb {
    /// Opens (creating if needed) `<dir>/state.db` and brings its schema up to date.
    pub async fn open(dir: &Path) -> Result<Self, StateError> {
        crate::repo::storage::create_private_dir(dir).map_err(|source| StateError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        // Two processes starting at once (two `run-job`s from cron) would both create
        // the schema and one would fail: creating and migrating are one at a time.
        let _lock = Self::lock(dir).await?;
        let path = dir.join("state.db");
        if !path.exists() {
            tracing::info!(file = %path.display(), "no run history yet; starting a new one");
        }
        match Self::connect(&path).await {
            Err(e) if e.is_corruption() => {
                // History is useful, not essential: keep the damaged file for
                // inspection and carry on with a fresh one rather than refuse to start.
                let aside = path.with_file_name(format!(
                    "state.db.corrupt-{}",
                    Utc::now().format("%Y%m%dT%H%M%SZ")
                ));
                tracing::warn!(
                    file = %path.display(),
                    moved_to = %aside.display(),
                    "the run history is unreadable ({e}); moved it aside and started a new one \
                     (backups are still listed from their manifests)"
                );
                std::fs::rename(&path, &aside).map_err(|source| StateError::Dir {
                    path: path.clone(),
                    source,
                })?;
                for side in ["-wal", "-shm"] {
                    let mut p = path.as_os_str().to_owned();
                    p.push(side);
                    let _ = std::fs::remove_file(p);
                }
                Self::connect(&path).await
            }
            other => other,
        }
    }

    /// Takes the exclusive lock (`flock`) on the state directory itself, so that no
    /// side file is needed (released when the handle is dropped, also when the
    /// process dies), waiting for another process that is opening the history. Held
    /// for milliseconds, so waiting is without limit but told after a while.
    async fn lock(dir: &Path) -> Result<std::fs::File, StateError> {
        let path = dir.to_owned();
        let lock_err = |source| StateError::Lock {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(dir).map_err(lock_err)?;
        let since = std::time::Instant::now();
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(std::fs::TryLockError::WouldBlock) => {
                    if !told && since.elapsed() > Duration::from_secs(10) {
                        told = true;
                        tracing::warn!(file = %path.display(), "waiting for another dbkeeper process to finish opening the run history");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(lock_err(e)),
            }
        }
    }

    /// Opens an existing `<dir>/state.db` to read it, creating and changing nothing
    /// (see [`crate::db::read_only_options`]); `None` when there is no history yet.
    /// Its schema is whatever the daemon that wrote it left.
    pub async fn open_read_only(dir: &Path) -> Result<Option<Self>, StateError> {
        let path = dir.join("state.db");
        if !path.is_file() {
            return Ok(None);
        }
        let options = crate::db::read_only_options(base_options(&path));
        Ok(Some(StateDb {
            pool: pool(&path, options, 1).await?,
        }))
    }

    async fn connect(path: &Path) -> Result<Self, StateError> {
        let options = base_options(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = pool(path, options, 2).await?;
        let migrated = MIGRATOR.run(&pool).await;
        if let Err(source) = migrated {
            pool.close().await;
            return Err(StateError::Migrate {
                path: path.to_owned(),
                source,
            });
        }
        Ok(StateDb { pool })
    }

    /// Records the start of a run and returns its id.
    pub async fn begin_run(
        &self,
        job: &str,
        kind: &str,
        database: &str,
        trigger: &str,
        started_at: DateTime<Utc>,
    ) -> Result<i64, StateError> {
        let row = sqlx::query(
            "INSERT INTO job_runs (job, kind, database, trigger, started_at, result)
             VALUES (?, ?, ?, ?, ?, 'running') RETURNING id",
        )
        .bind(job)
        .bind(kind)
        .bind(database)
        .bind(trigger)
        .bind(millis(started_at))
        .fetch_one(&self.pool)
        .await?;
        Ok(row.get(0))
    }

    /// Records how a run ended.
    pub async fn finish_run(
        &self,
        id: i64,
        finished_at: DateTime<Utc>,
        result: RunResult,
        attempts: u32,
        error: Option<&str>,
        details: &serde_json::Value,
    ) -> Result<(), StateError> {
        sqlx::query(
            "UPDATE job_runs SET finished_at = ?, result = ?, attempts = ?, error = ?, details = ?
             WHERE id = ?",
        )
        .bind(millis(finished_at))
        .bind(result.as_str())
        .bind(attempts)
        .bind(error)
        .bind(details.to_string())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks runs left 'running' by a process that died as 'interrupted'. Only the
    /// daemon calls this, at start-up, before it starts any job.
    pub async fn mark_interrupted(&self) -> Result<u64, StateError> {
        let done = sqlx::query(
            "UPDATE job_runs SET result = 'interrupted',
                 error = 'the process stopped while this run was in progress'
             WHERE result = 'running'",
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Latest run, success and failure of every job in the history.
    pub async fn last_runs(&self) -> Result<HashMap<String, JobLast>, StateError> {
        let rows = sqlx::query(
            "SELECT r.job, r.started_at, r.result, r.error,
                    (SELECT max(started_at) FROM job_runs s WHERE s.job = r.job AND s.result = 'success'),
                    (SELECT max(started_at) FROM job_runs f WHERE f.job = r.job
                         AND f.result IN ('failure', 'interrupted'))
             FROM job_runs r
             WHERE r.id = (SELECT max(id) FROM job_runs l WHERE l.job = r.job)",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let job: String = row.get(0);
                let last = JobLast {
                    last_run: Some(from_millis(row.get(1))),
                    last_result: Some(RunResult::parse(row.get(2))),
                    last_error: row.get(3),
                    last_success: row.get::<Option<i64>, _>(4).map(from_millis),
                    last_failure: row.get::<Option<i64>, _>(5).map(from_millis),
                };
                (job, last)
            })
            .collect())
    }

    /// The newest `limit` runs, of one job or of all.
    pub async fn history(
        &self,
        job: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RunRecord>, StateError> {
        let rows = sqlx::query(
            "SELECT id, job, kind, database, trigger, started_at, finished_at, result, attempts,
                    error, details
             FROM job_runs WHERE (?1 IS NULL OR job = ?1)
             ORDER BY id DESC LIMIT ?2",
        )
        .bind(job)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| RunRecord {
                id: row.get(0),
                job: row.get(1),
                kind: row.get(2),
                database: row.get(3),
                trigger: row.get(4),
                started_at: from_millis(row.get(5)),
                finished_at: row.get::<Option<i64>, _>(6).map(from_millis),
                result: RunResult::parse(row.get(7)),
                attempts: row.get(8),
                error: row.get(9),
                details: row
                    .get::<Option<String>, _>(10)
                    .and_then(|d| serde_json::from_str(&d).ok()),
            })
            .collect())
    }

    /// Deletes finished runs older than `keep`, except each job's newest success and
    /// newest failure, which the metrics and `dbkeeper jobs` still need.
    ///
    /// A run's age is measured twice, and both must exceed `keep`: by the wall clock
    /// (`now` minus its start), and along the history's own timeline, newest first:
    /// the gaps between successive runs (in the order they were recorded) and the gap
    /// to `now`, where a gap that is negative (a clock that went back) or longer than
    /// `keep / 10` (a clock that jumped ahead, or a stopped daemon) counts nothing.
    /// A jump of the clock, ahead or behind, at any number of starts, then adds no
    /// age: only steps shorter than `keep / 10` can (an NTP correction of seconds).
    /// A daemon that was stopped for long keeps its history that much longer.
    pub async fn prune(&self, keep: Duration, now: DateTime<Utc>) -> Result<u64, StateError> {
        use futures_util::TryStreamExt;
        let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        let cap = keep_ms / 10;
        let cutoff = millis(now).saturating_sub(keep_ms);
        let mut newest_first =
            sqlx::query_as::<_, (i64, i64)>("SELECT id, started_at FROM job_runs ORDER BY id DESC")
                .fetch(&self.pool);
        let (mut later, mut elapsed) = (millis(now), 0i64);
        let mut oldest_kept_by_timeline = None;
        while let Some((id, at)) = newest_first.try_next().await? {
            let gap = later.saturating_sub(at);
            if (0..=cap).contains(&gap) {
                elapsed = elapsed.saturating_add(gap);
            }
            if elapsed > keep_ms {
                oldest_kept_by_timeline = Some(id);
                break;
            }
            later = at;
        }
        drop(newest_first);
        let Some(last) = oldest_kept_by_timeline else {
            return Ok(0);
        };
        let done = sqlx::query(
            "DELETE FROM job_runs
             WHERE id <= ?1 AND started_at < ?2 AND result <> 'running'
               AND id NOT IN (SELECT max(id) FROM job_runs GROUP BY job, result)",
        )
        .bind(last)
        .bind(cutoff)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, h, 0, 0).unwrap()
    }

    async fn run(db: &StateDb, job: &str, at: DateTime<Utc>, result: RunResult) -> i64 {
        let id = db
            .begin_run(job, "sql", "app", "schedule", at)
            .await
            .unwrap();
        let error = (result == RunResult::Failure).then_some("boom");
        db.finish_run(id, at, result, 1, error, &serde_json::json!({"rows": 1}))
            .await
            .unwrap();
        id
    }

    /// Read-only opens create no `-wal`/`-shm` when nobody writes, and read what a
    /// running writer committed when one does, leaving its files to it.
    #[tokio::test]
    async fn read_only_open_creates_nothing_and_sees_a_writers_commits() {
        let dir = tempfile::tempdir().unwrap();
        assert!(StateDb::open_read_only(dir.path()).await.unwrap().is_none());
        let files = || {
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let writer = StateDb::open(dir.path()).await.unwrap();
        run(&writer, "app.sql.a", t(1), RunResult::Success).await;
        let reader = StateDb::open_read_only(dir.path()).await.unwrap().unwrap();
        assert_eq!(reader.last_runs().await.unwrap().len(), 1);
        run(&writer, "app.sql.b", t(2), RunResult::Success).await;
        assert_eq!(reader.last_runs().await.unwrap().len(), 2);
        reader.close().await;
        writer.close().await;
        assert_eq!(files(), ["state.db"]);
        let reader = StateDb::open_read_only(dir.path()).await.unwrap().unwrap();
        assert_eq!(reader.last_runs().await.unwrap().len(), 2);
        assert_eq!(files(), ["state.db"], "no side files while reading");
        reader.close().await;
        assert_eq!(files(), ["state.db"]);

        // What a killed daemon leaves: a -wal without its -shm (adversary round 5,
        // case 11). Reading creates no -shm.
        let writer = StateDb::open(dir.path()).await.unwrap();
        run(&writer, "app.sql.c", t(3), RunResult::Success).await;
        let crashed = tempfile::tempdir().unwrap();
        for name in ["state.db", "state.db-wal"] {
            std::fs::copy(dir.path().join(name), crashed.path().join(name)).unwrap();
        }
        writer.close().await;
        let reader = StateDb::open_read_only(crashed.path())
            .await
            .unwrap()
            .unwrap();
        assert!(reader.last_runs().await.unwrap().len() >= 2);
        reader.close().await;
        let mut left: Vec<String> = std::fs::read_dir(crashed.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["state.db", "state.db-wal"]);
    }

    #[tokio::test]
    async fn last_runs_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).await.unwrap();
        run(&db, "app.sql.a", t(1), RunResult::Success).await;
        run(&db, "app.sql.a", t(2), RunResult::Failure).await;
        run(&db, "app.sql.b", t(3), RunResult::Success).await;
        let last = db.last_runs().await.unwrap();
        let a = &last["app.sql.a"];
        assert_eq!(a.last_success, Some(t(1)));
        assert_eq!(a.last_failure, Some(t(2)));
        assert_eq!(a.last_result, Some(RunResult::Failure));
        assert_eq!(a.last_error.as_deref(), Some("boom"));
        assert_eq!(last["app.sql.b"].last_failure, None);

        let hist = db.history(Some("app.sql.a"), 10).await.unwrap();
        assert_eq!(hist.len(), 2);
        assert_eq!(hist[0].started_at, t(2));
        assert_eq!(hist[0].details, Some(serde_json::json!({"rows": 1})));
        assert_eq!(db.history(None, 2).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn survives_reopen_and_marks_interrupted_runs() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).await.unwrap();
        db.begin_run("app.sql.a", "sql", "app", "schedule", t(1))
            .await
            .unwrap();
        db.close().await;
        let db = StateDb::open(dir.path()).await.unwrap();
        assert_eq!(db.mark_interrupted().await.unwrap(), 1);
        let last = db.last_runs().await.unwrap();
        assert_eq!(last["app.sql.a"].last_result, Some(RunResult::Interrupted));
        assert_eq!(last["app.sql.a"].last_failure, Some(t(1)));
    }

    #[tokio::test]
    async fn a_corrupted_history_is_moved_aside_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("state.db"),
            b"this is not a SQLite database, just junk".repeat(200),
        )
        .unwrap();
        let db = StateDb::open(dir.path()).await.unwrap();
        run(&db, "app.sql.a", t(1), RunResult::Success).await;
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().any(|n| n.starts_with("state.db.corrupt-")),
            "{names:?}"
        );
    }

    #[tokio::test]
    async fn prune_keeps_the_newest_success_and_failure() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).await.unwrap();
        let min = |m: i64| t(0) + chrono::Duration::minutes(m);
        run(&db, "app.sql.b", min(0), RunResult::Failure).await;
        run(&db, "app.sql.b", min(1), RunResult::Failure).await;
        for m in (0..180).step_by(5) {
            run(&db, "app.sql.a", min(m), RunResult::Success).await;
        }
        let pruned = db.prune(Duration::from_secs(3600), min(180)).await.unwrap();
        // Runs every 5 minutes: those from more than an hour ago go (a's 0..115 =
        // 24 runs), and b's older failure; b's newest failure stays.
        assert_eq!(pruned, 25);
        let left = db.history(None, 1000).await.unwrap();
        assert!(
            left.iter().any(|r| r.job == "app.sql.b"),
            "newest failure kept"
        );
        assert!(left
            .iter()
            .all(|r| r.job == "app.sql.b" || r.started_at >= min(120)));
    }

    /// Adversary rounds 6 and 7 (cases 19, 09, 11): a clock a year ahead at one or
    /// several starts, or a year behind while runs were recorded, deleted runs
    /// seconds old (round 8, case 05: ten boots a year ahead). Property, for any
    /// history whose recorded clock jumps ahead or behind: no run is deleted before
    /// it is `keep` old by the true clock, less the small steps ahead (shorter than
    /// `keep / 10`) after it; with a right clock and runs at least every
    /// `keep / 10`, every run older than `keep` but the newest per job and result
    /// is deleted.
    #[test]
    fn clock_jumps_never_make_fresh_runs_look_old() {
        use proptest::prelude::*;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let keep = Duration::from_secs(3600);
        // Each step: minutes since the previous run (true time), and how far the
        // recorded clock is off (minutes; mostly right, sometimes a year either way).
        let steps = proptest::collection::vec(
            (
                1i64..7,
                prop_oneof![
                    6 => Just(0i64),
                    1 => Just(525_600i64),
                    1 => Just(-525_600i64),
                    1 => -120i64..120,
                ],
            ),
            1..60,
        );
        let config = proptest::test_runner::Config {
            cases: 48,
            ..Default::default()
        };
        proptest!(config, |(steps in steps, now_off in prop_oneof![3 => Just(0i64), 1 => Just(525_600i64), 1 => Just(-525_600i64)])| {
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let db = StateDb::open(dir.path()).await.unwrap();
                let mut truth = 0i64;
                let mut true_times = Vec::new();
                for (i, (gap, off)) in steps.iter().enumerate() {
                    truth += gap;
                    let recorded = t(0) + chrono::Duration::minutes(truth + off);
                    let job = if i % 3 == 0 { "app.sql.a" } else { "app.sql.b" };
                    let id = run(&db, job, recorded, RunResult::Success).await;
                    true_times.push((id, truth));
                }
                let true_now = truth + 1;
                let now = t(0) + chrono::Duration::minutes(true_now + now_off);
                db.prune(keep, now).await.unwrap();
                let left: std::collections::HashSet<i64> = sqlx::query_scalar("SELECT id FROM job_runs")
                    .fetch_all(&db.pool)
                    .await
                    .unwrap()
                    .into_iter()
                    .collect();
                // Small steps ahead after run i (the step to `now` included): the
                // only clock errors that can add age.
                let offsets: Vec<i64> = steps.iter().map(|s| s.1).chain([now_off]).collect();
                for (i, (id, at)) in true_times.iter().enumerate() {
                    let ahead: i64 = offsets[i..]
                        .windows(2)
                        .map(|w| w[1] - w[0])
                        .filter(|d| (1..6).contains(d))
                        .sum();
                    if true_now - at < 60 - ahead {
                        prop_assert!(left.contains(id), "run {id} is {} min old by the true clock ({ahead} jumps ahead after it) and was deleted", true_now - at);
                    }
                }
                let right_clock = steps.iter().all(|s| s.1 == 0) && now_off == 0;
                if right_clock {
                    let newest: Vec<i64> = sqlx::query_scalar("SELECT max(id) FROM job_runs GROUP BY job, result")
                        .fetch_all(&db.pool)
                        .await
                        .unwrap();
                    for (id, at) in &true_times {
                        if true_now - at > 60 && !newest.contains(id) {
                            prop_assert!(!left.contains(id), "run {id}, {} min old, was kept", true_now - at);
                        }
                    }
                }
                Ok(())
            })?;
        });
    }
}

//! Every Prometheus metric dbkeeper exports is defined here (names, help, buckets).
//!
//! Series are created at start-up (and on reload) for every configured job and
//! database, at 0 or at the value read back from the run history, so alert rules see
//! them before anything has happened and keep seeing them after a restart.

use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::state::JobLast;

pub const BUILD_INFO: &str = "dbkeeper_build_info";
pub const CONFIG_RELOAD_OK: &str = "dbkeeper_config_last_reload_successful";
pub const CONFIG_RELOAD_TS: &str = "dbkeeper_config_last_reload_success_timestamp_seconds";
pub const DATABASE_UP: &str = "dbkeeper_database_up";
pub const JOB_RUNS: &str = "dbkeeper_job_runs_total";
pub const JOB_SKIPPED: &str = "dbkeeper_job_skipped_total";
pub const JOB_DURATION: &str = "dbkeeper_job_duration_seconds";
pub const JOB_LAST_RUN: &str = "dbkeeper_job_last_run_timestamp_seconds";
pub const JOB_LAST_SUCCESS: &str = "dbkeeper_job_last_success_timestamp_seconds";
pub const JOB_LAST_FAILURE: &str = "dbkeeper_job_last_failure_timestamp_seconds";
pub const JOB_NEXT_RUN: &str = "dbkeeper_job_next_run_timestamp_seconds";
pub const JOB_EXPECTED_INTERVAL: &str = "dbkeeper_job_expected_interval_seconds";
pub const JOB_TIMEOUT: &str = "dbkeeper_job_timeout_seconds";
pub const JOB_RUNNING: &str = "dbkeeper_job_running";
pub const BACKUP_LAST_SIZE: &str = "dbkeeper_backup_last_size_bytes";
pub const BACKUP_LAST_RAW_SIZE: &str = "dbkeeper_backup_last_raw_size_bytes";
pub const BACKUP_LAST_VERIFIED: &str = "dbkeeper_backup_last_verified_timestamp_seconds";
pub const BACKUPS_STORED: &str = "dbkeeper_backups_stored";
pub const BACKUP_OLDEST: &str = "dbkeeper_backup_oldest_timestamp_seconds";
pub const BACKUP_STORED_BYTES: &str = "dbkeeper_backup_stored_bytes";
pub const BACKUP_PRUNED: &str = "dbkeeper_backup_pruned_total";
pub const BACKUP_FUTURE_DATED: &str = "dbkeeper_backup_future_dated";
pub const BACKUP_LAST_SUCCESS: &str = "dbkeeper_backup_last_success_timestamp_seconds";
pub const BACKUP_UPLOAD_FAILURES: &str = "dbkeeper_backup_upload_failures_total";
pub const DESTINATION_FREE: &str = "dbkeeper_destination_free_bytes";
pub const RETENTION_DELETED: &str = "dbkeeper_retention_rows_deleted_total";
pub const RETENTION_OLDEST: &str = "dbkeeper_retention_oldest_row_timestamp_seconds";
pub const RETENTION_MAX_AGE: &str = "dbkeeper_retention_max_age_seconds";
pub const RETENTION_UNREADABLE: &str = "dbkeeper_retention_unreadable_rows";
pub const REFRESH_ROWS: &str = "dbkeeper_refresh_last_rows";
pub const MIGRATIONS_PENDING: &str = "dbkeeper_migrations_pending";
pub const MIGRATIONS_APPLIED_VERSION: &str = "dbkeeper_migrations_applied_version";
pub const MIGRATIONS_CHECKSUM_MISMATCH: &str = "dbkeeper_migrations_checksum_mismatch";
pub const MIGRATIONS_BLOCKED: &str = "dbkeeper_migrations_blocked";
pub const PING_FAILURES: &str = "dbkeeper_ping_failures_total";
pub const QUERY_VALUE: &str = "dbkeeper_query_value";
pub const QUERY_LAST_SUCCESS: &str = "dbkeeper_query_last_success_timestamp_seconds";
pub const QUERY_SKIPPED_ROWS: &str = "dbkeeper_query_skipped_rows";
pub const QUERY_INFO: &str = "dbkeeper_query_info";
pub const TABLE_ROWS: &str = "dbkeeper_table_rows";
pub const TABLE_BYTES: &str = "dbkeeper_table_bytes";
pub const TABLE_SEQ_SCANS: &str = "dbkeeper_table_seq_scans_total";
pub const TABLE_INDEX_SCANS: &str = "dbkeeper_table_index_scans_total";
pub const CLUSTER_MEMBERS: &str = "dbkeeper_cluster_members";
pub const COORDINATION_UP: &str = "dbkeeper_coordination_up";
pub const JOB_CLAIMS: &str = "dbkeeper_job_claims_total";
pub const CLUSTER_REPLICAS_GONE: &str = "dbkeeper_cluster_replicas_gone_total";

/// Buckets of `job_duration_seconds`: from a fast `ANALYZE` to a multi-hour dump.
const DURATION_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0,
    86400.0,
];

/// Why a scheduled run did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The previous run of the same job was still going.
    Overlap,
    /// The daemon was down when the job was due and `missed = "skip"`.
    Missed,
    /// The daemon was shutting down.
    Shutdown,
    /// Replicas: another replica claimed this fire time (it runs it).
    ClaimedElsewhere,
    /// Replicas: the coordination database did not answer, so no replica may run it.
    CoordinationUnavailable,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Overlap => "overlap",
            SkipReason::Missed => "missed",
            SkipReason::Shutdown => "shutdown",
            SkipReason::ClaimedElsewhere => "claimed-elsewhere",
            SkipReason::CoordinationUnavailable => "coordination-unavailable",
        }
    }
    /// Reasons only replicas have: their series exist only with `coordination`, so a
    /// single daemon's output does not change.
    const CLUSTER: [SkipReason; 2] = [
        SkipReason::ClaimedElsewhere,
        SkipReason::CoordinationUnavailable,
    ];
    const ALL: [SkipReason; 3] = [
        SkipReason::Overlap,
        SkipReason::Missed,
        SkipReason::Shutdown,
    ];
}

/// Installs the global Prometheus recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(JOB_DURATION.to_owned()), DURATION_BUCKETS)
                .map(|b| b.build_recorder())
                // The bucket list is a non-empty constant, so this branch is not taken.
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Fails only if another recorder is installed (e.g. in a test binary), in
            // which case rendering from this handle still works for its own series.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            gauge!(CONFIG_RELOAD_OK).set(1.0);
            handle
        })
        .clone()
}

fn describe() {
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which dbkeeper runs."
    );
    describe_gauge!(
        CONFIG_RELOAD_OK,
        "1 if the last configuration load or reload succeeded."
    );
    describe_gauge!(
        CONFIG_RELOAD_TS,
        Unit::Seconds,
        "Time of the last successful configuration load."
    );
    describe_gauge!(
        DATABASE_UP,
        "1 if the database answered the last probe or job."
    );
    describe_counter!(JOB_RUNS, "Finished job runs by result (after retries).");
    describe_counter!(JOB_SKIPPED, "Scheduled runs that did not start, by reason.");
    describe_histogram!(
        JOB_DURATION,
        Unit::Seconds,
        "Duration of finished job runs."
    );
    describe_gauge!(
        JOB_LAST_RUN,
        Unit::Seconds,
        "Start time of the job's latest run."
    );
    describe_gauge!(
        JOB_LAST_SUCCESS,
        Unit::Seconds,
        "Start time of the job's latest successful run."
    );
    describe_gauge!(
        JOB_LAST_FAILURE,
        Unit::Seconds,
        "Start time of the job's latest failed run."
    );
    describe_gauge!(
        JOB_NEXT_RUN,
        Unit::Seconds,
        "Time of the job's next scheduled run (0: none)."
    );
    describe_gauge!(
        JOB_EXPECTED_INTERVAL,
        Unit::Seconds,
        "Usual time between two runs of the job (0: not periodic)."
    );
    describe_gauge!(
        JOB_TIMEOUT,
        Unit::Seconds,
        "Longest time one attempt of the job may run."
    );
    describe_gauge!(JOB_RUNNING, "1 while the job runs.");
    describe_gauge!(
        BACKUP_LAST_SIZE,
        Unit::Bytes,
        "Archive size of the newest good backup."
    );
    describe_gauge!(
        BACKUP_LAST_RAW_SIZE,
        Unit::Bytes,
        "Database image size of the newest good backup."
    );
    describe_gauge!(
        BACKUP_LAST_VERIFIED,
        Unit::Seconds,
        "Time of the latest passed verification of any stored backup."
    );
    describe_gauge!(
        BACKUPS_STORED,
        "Backups in the destination (with a manifest)."
    );
    describe_gauge!(
        BACKUP_OLDEST,
        Unit::Seconds,
        "Start time of the oldest stored backup."
    );
    describe_gauge!(
        BACKUP_STORED_BYTES,
        Unit::Bytes,
        "Total size of the stored archives."
    );
    describe_counter!(BACKUP_PRUNED, "Backups deleted by rotation.");
    describe_gauge!(
        BACKUP_LAST_SUCCESS,
        Unit::Seconds,
        "Finish time of the newest good backup in the destination (0: none)."
    );
    describe_counter!(
        BACKUP_UPLOAD_FAILURES,
        "Backups a destination did not get (it could not be prepared, written, published or given its manifest)."
    );
    describe_gauge!(
        DESTINATION_FREE,
        Unit::Bytes,
        "Free space at a folder destination (what an unprivileged writer may still add), read before each backup and with each catalog update."
    );
    describe_gauge!(
        BACKUP_FUTURE_DATED,
        "Trusted backups dated in the future (made while a clock was wrong): kept, and not counted by the keep policy."
    );
    describe_counter!(RETENTION_DELETED, "Rows deleted by retention jobs.");
    describe_gauge!(
        RETENTION_OLDEST,
        Unit::Seconds,
        "Time in the retention column of the oldest row left (0: unknown or empty)."
    );
    describe_gauge!(
        RETENTION_MAX_AGE,
        Unit::Seconds,
        "The retention policy's older-than."
    );
    describe_gauge!(
        RETENTION_UNREADABLE,
        "Rows whose retention column holds a value that is not a time (never deleted), at the latest run."
    );
    describe_gauge!(REFRESH_ROWS, "Rows in the view after its latest refresh.");
    describe_gauge!(
        MIGRATIONS_PENDING,
        "Migrations in the directory not applied yet."
    );
    describe_gauge!(
        MIGRATIONS_APPLIED_VERSION,
        "Newest applied migration version (0: none)."
    );
    describe_gauge!(
        MIGRATIONS_CHECKSUM_MISMATCH,
        "Applied migrations whose file changed since."
    );
    describe_counter!(
        PING_FAILURES,
        "Dead-man pings (ping-url) that did not reach the monitor after their retries."
    );
    describe_gauge!(
        QUERY_LAST_SUCCESS,
        Unit::Seconds,
        "Start time of the query gauge's latest successful run (0: none since start-up)."
    );
    describe_gauge!(
        QUERY_SKIPPED_ROWS,
        "Rows of the gauge's latest successful run whose value was NULL (not exported)."
    );
    describe_gauge!(
        QUERY_INFO,
        "Always 1; the help label says what the query gauge measures."
    );
    describe_gauge!(
        CLUSTER_MEMBERS,
        "Replicas of the cluster whose heartbeat the coordination database saw within the lease timeout."
    );
    describe_gauge!(
        COORDINATION_UP,
        "1 if the coordination database answered this replica's latest query."
    );
    describe_counter!(
        JOB_CLAIMS,
        "Claims of a job's fire times by this replica: won (it ran them) or lost (another replica did, or still ran the previous one)."
    );
    describe_counter!(
        CLUSTER_REPLICAS_GONE,
        "Replicas this replica saw stop sending heartbeats."
    );
    describe_gauge!(
        MIGRATIONS_BLOCKED,
        "Problems that block applying migrations (dirty, drift, missing, out-of-order, duplicate versions)."
    );
}

fn ts(t: Option<DateTime<Utc>>) -> f64 {
    t.map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0)
}

/// The label that names a job on its series. Not `job`: Prometheus sets `job` (and
/// `instance`) on every series it scrapes, so with default scrape settings an exported
/// `job` would arrive renamed to `exported_job` and the shipped rules would match nothing.
pub const JOB_LABEL: &str = "job_id";

/// The `job_id`, `kind`, `database` labels of a job's series: plain text, so that this
/// module knows nothing of the jobs themselves.
#[derive(Debug, Clone, Copy)]
pub struct JobLabels<'a> {
    pub job: &'a str,
    pub kind: &'a str,
    pub database: &'a str,
}

impl JobLabels<'_> {
    fn pairs(&self) -> [(&'static str, String); 3] {
        [
            (JOB_LABEL, self.job.to_owned()),
            ("kind", self.kind.to_owned()),
            ("database", self.database.to_owned()),
        ]
    }
}

/// Creates every series of a job, with last-run values from the history.
pub fn register_job(
    job: JobLabels<'_>,
    last: &JobLast,
    interval: Option<Duration>,
    timeout: Duration,
) {
    let l = job.pairs();
    for result in ["success", "failure"] {
        let mut with_result = l.to_vec();
        with_result.push(("result", result.to_owned()));
        counter!(JOB_RUNS, &with_result).increment(0);
    }
    for reason in SkipReason::ALL {
        counter!(JOB_SKIPPED, JOB_LABEL => job.job.to_owned(), "reason" => reason.as_str())
            .increment(0);
    }
    // Registering the histogram makes its (empty) buckets appear in the output.
    let _ = histogram!(JOB_DURATION, &l);
    gauge!(JOB_LAST_RUN, &l).set(ts(last.last_run));
    gauge!(JOB_LAST_SUCCESS, &l).set(ts(last.last_success));
    gauge!(JOB_LAST_FAILURE, &l).set(ts(last.last_failure));
    gauge!(JOB_EXPECTED_INTERVAL, &l).set(interval.map_or(0.0, |d| d.as_secs_f64()));
    gauge!(JOB_TIMEOUT, &l).set(timeout.as_secs_f64());
    gauge!(JOB_RUNNING, &l).set(0.0);
    gauge!(JOB_NEXT_RUN, &l).set(0.0);
}

/// Replicas: creates a job's claim counters and its cluster-only skip reasons (at 0).
pub fn register_claims(job: JobLabels<'_>) {
    for result in ["won", "lost"] {
        let mut with_result = job.pairs().to_vec();
        with_result.push(("result", result.to_owned()));
        counter!(JOB_CLAIMS, &with_result).increment(0);
    }
    for reason in SkipReason::CLUSTER {
        counter!(JOB_SKIPPED, JOB_LABEL => job.job.to_owned(), "reason" => reason.as_str())
            .increment(0);
    }
}

/// Replicas: this replica won or lost a claim of the job.
pub fn job_claimed(job: JobLabels<'_>, won: bool) {
    let mut with_result = job.pairs().to_vec();
    with_result.push(("result", if won { "won" } else { "lost" }.to_owned()));
    counter!(JOB_CLAIMS, &with_result).increment(1);
}

/// Replicas: the alive members the coordination database shows.
pub fn cluster_members(cluster: &str, alive: usize) {
    gauge!(CLUSTER_MEMBERS, "cluster" => cluster.to_owned()).set(alive as f64);
    counter!(CLUSTER_REPLICAS_GONE, "cluster" => cluster.to_owned()).increment(0);
}

/// Replicas: whether the coordination database answered.
pub fn coordination_up(cluster: &str, up: bool) {
    gauge!(COORDINATION_UP, "cluster" => cluster.to_owned()).set(if up { 1.0 } else { 0.0 });
}

/// Replicas: a replica stopped sending heartbeats.
pub fn replica_gone(cluster: &str) {
    counter!(CLUSTER_REPLICAS_GONE, "cluster" => cluster.to_owned()).increment(1);
}

/// Replicas: the job's newest runs across the cluster (already merged with this
/// replica's own), so the schedule alerts hold whichever replica is scraped.
pub fn job_last_times(
    job: JobLabels<'_>,
    last_run: Option<DateTime<Utc>>,
    last_success: Option<DateTime<Utc>>,
    last_failure: Option<DateTime<Utc>>,
) {
    let l = job.pairs();
    gauge!(JOB_LAST_RUN, &l).set(ts(last_run));
    gauge!(JOB_LAST_SUCCESS, &l).set(ts(last_success));
    gauge!(JOB_LAST_FAILURE, &l).set(ts(last_failure));
}

/// A reload removed the job. Its series cannot be deleted from the recorder, so
/// they are set so that no schedule-based alert fires for it until the next restart.
pub fn job_removed(job: JobLabels<'_>) {
    data_series().forget(job.job);
    let l = job.pairs();
    gauge!(JOB_EXPECTED_INTERVAL, &l).set(0.0);
    gauge!(JOB_NEXT_RUN, &l).set(0.0);
    gauge!(JOB_RUNNING, &l).set(0.0);
}

pub fn job_started(job: JobLabels<'_>, at: DateTime<Utc>) {
    let l = job.pairs();
    gauge!(JOB_RUNNING, &l).set(1.0);
    gauge!(JOB_LAST_RUN, &l).set(ts(Some(at)));
}

pub fn job_finished(job: JobLabels<'_>, started: DateTime<Utc>, success: bool, took: Duration) {
    let l = job.pairs();
    gauge!(JOB_RUNNING, &l).set(0.0);
    histogram!(JOB_DURATION, &l).record(took.as_secs_f64());
    let (result, last) = if success {
        ("success", JOB_LAST_SUCCESS)
    } else {
        ("failure", JOB_LAST_FAILURE)
    };
    gauge!(last, &l).set(ts(Some(started)));
    let mut with_result = l.to_vec();
    with_result.push(("result", result.to_owned()));
    counter!(JOB_RUNS, &with_result).increment(1);
}

/// Creates the ping failure counter of a job that pings a monitor. Its label is
/// `job_id`, never `job` (Prometheus's own target label).
pub fn register_ping(job: &str) {
    counter!(PING_FAILURES, "job_id" => job.to_owned()).increment(0);
}

/// A dead-man ping of the job was not delivered.
pub fn ping_failed(job: &str) {
    counter!(PING_FAILURES, "job_id" => job.to_owned()).increment(1);
}

pub fn job_skipped(job: &str, reason: SkipReason) {
    counter!(JOB_SKIPPED, JOB_LABEL => job.to_owned(), "reason" => reason.as_str()).increment(1);
}

pub fn job_next_run(job: JobLabels<'_>, next: Option<DateTime<Utc>>) {
    gauge!(JOB_NEXT_RUN, &job.pairs()).set(ts(next));
}

/// Sets the `backup_*` gauges of one destination from its backups (oldest first).
/// `backups` are the trusted ones; `future_dated` of them are dated in the future.
pub fn backup_catalog(
    database: &str,
    destination: &str,
    backups: &[crate::repo::catalog::Manifest],
    future_dated: usize,
) {
    let db = || backup_labels(database, destination);
    backup_destination(database, destination);
    gauge!(BACKUP_FUTURE_DATED, &db()).set(future_dated as f64);
    let newest_good = crate::repo::catalog::select(backups, "latest", chrono::Utc::now());
    gauge!(BACKUP_LAST_SIZE, &db()).set(newest_good.map_or(0.0, |m| m.stored_bytes as f64));
    gauge!(BACKUP_LAST_RAW_SIZE, &db()).set(newest_good.map_or(0.0, |m| m.raw_bytes as f64));
    gauge!(BACKUP_LAST_SUCCESS, &db()).set(ts(newest_good.map(|m| m.finished_at)));
    let verified = backups
        .iter()
        .filter(|m| m.verification.result == crate::repo::catalog::VerifyResult::Passed)
        .map(|m| m.verification.at)
        .max();
    gauge!(BACKUP_LAST_VERIFIED, &db()).set(ts(verified));
    gauge!(BACKUPS_STORED, &db()).set(backups.len() as f64);
    gauge!(BACKUP_OLDEST, &db()).set(ts(backups.first().map(|m| m.started_at)));
    gauge!(BACKUP_STORED_BYTES, &db())
        .set(backups.iter().map(|m| m.stored_bytes as f64).sum::<f64>());
}

fn backup_labels(database: &str, destination: &str) -> [(&'static str, String); 2] {
    [
        ("database", database.to_owned()),
        ("destination", destination.to_owned()),
    ]
}

/// Creates a destination's counters (at 0) without a catalog to read.
pub fn backup_destination(database: &str, destination: &str) {
    counter!(BACKUP_PRUNED, &backup_labels(database, destination)).increment(0);
    counter!(
        BACKUP_UPLOAD_FAILURES,
        &backup_labels(database, destination)
    )
    .increment(0);
}

/// The free space read at a folder destination.
pub fn destination_free(database: &str, destination: &str, bytes: u64) {
    gauge!(DESTINATION_FREE, &backup_labels(database, destination)).set(bytes as f64);
}

pub fn backup_pruned(database: &str, destination: &str) {
    counter!(BACKUP_PRUNED, &backup_labels(database, destination)).increment(1);
}

/// A destination did not get a backup.
pub fn backup_upload_failed(database: &str, destination: &str) {
    counter!(
        BACKUP_UPLOAD_FAILURES,
        &backup_labels(database, destination)
    )
    .increment(1);
}

/// Creates the retention series of a rule (the oldest-row gauge stays 0 until the
/// first run has looked). `rule` is the job name: two rules on one table (say,
/// different `where` and `older-than`) keep series of their own.
pub fn register_retention(database: &str, table: &str, rule: &str, max_age: Duration) {
    counter!(RETENTION_DELETED, &retention_labels(database, table, rule)).increment(0);
    retention_max_age(database, table, rule, max_age);
    retention_unreadable(database, table, rule, 0);
}

fn retention_labels(database: &str, table: &str, rule: &str) -> [(&'static str, String); 3] {
    [
        ("database", database.to_owned()),
        ("table", table.to_owned()),
        ("rule", rule.to_owned()),
    ]
}

pub fn retention_unreadable(database: &str, table: &str, rule: &str, rows: u64) {
    gauge!(
        RETENTION_UNREADABLE,
        &retention_labels(database, table, rule)
    )
    .set(rows as f64);
}

pub fn retention_max_age(database: &str, table: &str, rule: &str, max_age: Duration) {
    gauge!(RETENTION_MAX_AGE, &retention_labels(database, table, rule)).set(max_age.as_secs_f64());
}

pub fn retention_deleted(database: &str, table: &str, rule: &str, rows: u64) {
    counter!(RETENTION_DELETED, &retention_labels(database, table, rule)).increment(rows);
}

pub fn retention_oldest_row(
    database: &str,
    table: &str,
    rule: &str,
    oldest: Option<DateTime<Utc>>,
) {
    gauge!(RETENTION_OLDEST, &retention_labels(database, table, rule)).set(ts(oldest));
}

pub fn register_refresh(database: &str, view: &str) {
    gauge!(REFRESH_ROWS, "database" => database.to_owned(), "view" => view.to_owned()).set(0.0);
}

pub fn refresh_rows(database: &str, view: &str, rows: u64) {
    gauge!(REFRESH_ROWS, "database" => database.to_owned(), "view" => view.to_owned())
        .set(rows as f64);
}

pub fn migrations(
    database: &str,
    pending: usize,
    applied_version: Option<i64>,
    drift: usize,
    blocked: usize,
) {
    let db = || [("database", database.to_owned())];
    gauge!(MIGRATIONS_PENDING, &db()).set(pending as f64);
    gauge!(MIGRATIONS_APPLIED_VERSION, &db()).set(applied_version.unwrap_or(0) as f64);
    gauge!(MIGRATIONS_CHECKSUM_MISMATCH, &db()).set(drift as f64);
    migrations_blocked(database, blocked);
}

/// Problems that block applying (see [`crate::jobs::migrate::Assessment::problems`]).
pub fn migrations_blocked(database: &str, blocked: usize) {
    gauge!(MIGRATIONS_BLOCKED, "database" => database.to_owned()).set(blocked as f64);
}

pub fn database_up(database: &str, up: bool) {
    gauge!(DATABASE_UP, "database" => database.to_owned()).set(if up { 1.0 } else { 0.0 });
}

/// Records the outcome of loading or reloading the configuration.
pub fn config_loaded(success: bool, at: DateTime<Utc>) {
    gauge!(CONFIG_RELOAD_OK).set(if success { 1.0 } else { 0.0 });
    if success {
        gauge!(CONFIG_RELOAD_TS).set(ts(Some(at)));
    }
}

/// Creates the series of a query gauge that exist before its first run. Called at
/// every (re)load: a series that exists keeps its value (adding 0), so a reload does
/// not make the gauge look stale.
pub fn register_query_gauge(database: &str, gauge: &str, help: Option<&str>) {
    let l = query_labels(database, gauge);
    gauge!(QUERY_LAST_SUCCESS, &l).increment(0.0);
    gauge!(QUERY_SKIPPED_ROWS, &l).increment(0.0);
    if let Some(help) = help {
        let mut with_help = l.to_vec();
        with_help.push(("help", help.to_owned()));
        gauge!(QUERY_INFO, &with_help).set(1.0);
    }
}

fn query_labels(database: &str, gauge: &str) -> [(&'static str, String); 2] {
    [
        ("database", database.to_owned()),
        ("gauge", gauge.to_owned()),
    ]
}

/// A successful run of a query gauge: its rows replace every `query_value` series
/// the job `job` exported before (rows that are gone lose their series).
pub fn query_gauge(
    job: &str,
    database: &str,
    gauge: &str,
    started: DateTime<Utc>,
    rows: &[(Vec<(String, String)>, f64)],
    skipped: usize,
) {
    let series = rows
        .iter()
        .map(|(labels, value)| {
            let mut all = vec![
                ("database".to_owned(), database.to_owned()),
                ("gauge".to_owned(), gauge.to_owned()),
            ];
            all.extend(labels.iter().cloned());
            (all, *value)
        })
        .collect();
    data_series().replace(job, &[QUERY_VALUE], vec![(QUERY_VALUE, series)]);
    let l = query_labels(database, gauge);
    gauge!(QUERY_LAST_SUCCESS, &l).set(ts(Some(started)));
    gauge!(QUERY_SKIPPED_ROWS, &l).set(skipped as f64);
}

/// One table's figures from a `table-stats` run. The scan counters are PostgreSQL's.
#[derive(Debug, Clone, PartialEq)]
pub struct TableStat {
    pub table: String,
    pub rows: f64,
    pub bytes: f64,
    pub seq_scans: Option<f64>,
    pub index_scans: Option<f64>,
}

/// A successful `table-stats` run: its tables replace those the job `job` exported
/// before (a dropped table loses its series).
pub fn table_stats(job: &str, database: &str, tables: &[TableStat]) {
    let families = [TABLE_ROWS, TABLE_BYTES, TABLE_SEQ_SCANS, TABLE_INDEX_SCANS];
    let mut series: Vec<(&'static str, Vec<Series>)> =
        families.iter().map(|f| (*f, Vec::new())).collect();
    for t in tables {
        let labels = vec![
            ("database".to_owned(), database.to_owned()),
            ("table".to_owned(), t.table.clone()),
        ];
        let values = [Some(t.rows), Some(t.bytes), t.seq_scans, t.index_scans];
        for ((_, list), value) in series.iter_mut().zip(values) {
            if let Some(v) = value {
                list.push((labels.clone(), v));
            }
        }
    }
    data_series().replace(job, &families, series);
}

/// Renders the recorder's series followed by the data-defined ones.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    data_series().render_into(&mut text);
    text
}

/// One series: its labels (in order) and value.
type Series = (Vec<(String, String)>, f64);

/// Series whose label sets come from the data (the rows of a query gauge, the
/// tables of a database) and so must be able to disappear. The `metrics` recorder
/// cannot delete a series, so these are kept here, per job and family, and
/// appended to the recorder's output on every scrape.
#[derive(Default)]
struct DataSeries {
    /// `(family, job)` → the series that job exported in that family at its last
    /// successful run.
    series: std::sync::Mutex<std::collections::BTreeMap<(&'static str, String), Vec<Series>>>,
}

/// The families [`DataSeries`] holds: name, type and help.
const DATA_FAMILIES: [(&str, &str, &str); 5] = [
    (
        QUERY_VALUE,
        "gauge",
        "Value of a query gauge's row; the other columns are labels.",
    ),
    (
        TABLE_ROWS,
        "gauge",
        "Rows in the table (PostgreSQL: the planner's estimate; SQLite: count(*)).",
    ),
    (
        TABLE_BYTES,
        "gauge",
        "Bytes the table takes with its indexes (and TOAST on PostgreSQL).",
    ),
    (
        TABLE_SEQ_SCANS,
        "counter",
        "Sequential scans of the table since statistics were reset (PostgreSQL).",
    ),
    (
        TABLE_INDEX_SCANS,
        "counter",
        "Index scans on the table since statistics were reset (PostgreSQL).",
    ),
];

fn data_series() -> &'static DataSeries {
    static SERIES: OnceLock<DataSeries> = OnceLock::new();
    SERIES.get_or_init(DataSeries::default)
}

impl DataSeries {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<(&'static str, String), Vec<Series>>>
    {
        self.series.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces what `job` exported in `families` by `series`, at once: a scrape
    /// sees the old run's series or the new one's, never a mix.
    fn replace(
        &self,
        job: &str,
        families: &[&'static str],
        series: Vec<(&'static str, Vec<Series>)>,
    ) {
        let mut all = self.lock();
        for family in families {
            all.remove(&(*family, job.to_owned()));
        }
        for (family, list) in series {
            if !list.is_empty() {
                all.insert((family, job.to_owned()), list);
            }
        }
    }

    /// Drops every series of `job` (a reload removed it).
    fn forget(&self, job: &str) {
        self.lock().retain(|(_, owner), _| owner != job);
    }

    /// Appends the families in the text format, each under one HELP and TYPE.
    fn render_into(&self, out: &mut String) {
        use std::fmt::Write;
        let all = self.lock();
        for (family, kind, help) in DATA_FAMILIES {
            let mut lines = all
                .range((family, String::new())..)
                .take_while(|((f, _), _)| *f == family)
                .flat_map(|(_, list)| list)
                .peekable();
            if lines.peek().is_none() {
                continue;
            }
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} {kind}");
            for (labels, value) in lines {
                let labels: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                    .collect();
                let _ = writeln!(out, "{family}{{{}}} {}", labels.join(","), number(*value));
            }
            out.push('\n');
        }
    }
}

/// A label value in the text format: backslash, double quote and newline escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A sample value in the text format.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(pairs: &[(&str, &str)], v: f64) -> Series {
        let labels = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        (labels, v)
    }

    #[test]
    fn data_series_are_replaced_per_job_and_rendered_once_per_family() {
        let data = DataSeries::default();
        let a = series(&[("database", "d"), ("status", "open")], 3.0);
        let b = series(&[("database", "d"), ("status", "a\"b\\c\nd")], 1.5);
        data.replace("d.gauge.x", &[QUERY_VALUE], vec![(QUERY_VALUE, vec![a, b])]);
        let c = series(&[("database", "e")], f64::INFINITY);
        data.replace("e.gauge.y", &[QUERY_VALUE], vec![(QUERY_VALUE, vec![c])]);
        let mut text = String::new();
        data.render_into(&mut text);
        assert_eq!(text.matches("# TYPE dbkeeper_query_value gauge").count(), 1);
        assert!(text.contains("dbkeeper_query_value{database=\"d\",status=\"open\"} 3\n"));
        assert!(text.contains("status=\"a\\\"b\\\\c\\nd\"} 1.5\n"), "{text}");
        assert!(text.contains("dbkeeper_query_value{database=\"e\"} +Inf\n"));
        // A run with no rows removes the job's series; the other job keeps its own.
        data.replace("d.gauge.x", &[QUERY_VALUE], vec![(QUERY_VALUE, vec![])]);
        let mut text = String::new();
        data.render_into(&mut text);
        assert!(!text.contains("database=\"d\""), "{text}");
        assert!(text.contains("database=\"e\""));
        data.forget("e.gauge.y");
        let mut text = String::new();
        data.render_into(&mut text);
        assert!(text.is_empty(), "{text}");
    }
}

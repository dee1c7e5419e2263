//! The real `dbkeeper run` process against real SQLite files and real PostgreSQL:
//! metrics, overlap, reload, shutdown, restart, unreachable databases.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{database, metric_value, PgDb, Workdir};

const RUNS: &str = "dbkeeper_job_runs_total";

fn sql_job(name: &str, statement: &str, schedule: &str, extra: &str) -> String {
    format!(
        "[[database.sql]]\nname = \"{name}\"\nstatement = \"{statement}\"\nschedule = \"{schedule}\"\n{extra}\n"
    )
}

#[test]
fn metrics_pass_promtool_and_show_success_and_failure() {
    let w = Workdir::new();
    w.write_config(
        "",
        &format!(
            "{}{}{}{}{}",
            database(
                "lite",
                &w.sqlite_url("lite.db"),
                "table-stats = true\ntable-stats-schedule = \"every 1s\""
            ),
            sql_job(
                "ok",
                "CREATE TABLE IF NOT EXISTS t(x); INSERT INTO t VALUES (1)",
                "every 1s",
                ""
            ),
            sql_job("bad", "SELECT * FROM no_such_table", "every 1s", ""),
            sql_job("by-hand", "SELECT 1", "manual", ""),
            // The data-defined series (issue 15) are in the scrape promtool checks.
            "[[database.gauge]]\nname = \"rows\"\nschedule = \"every 1s\"\n\
             query = \"SELECT 'x\\\"y' AS k, count(*) AS n FROM t\"\n",
        ),
    );
    let d = w.start();
    let ok = ["job_id=\"lite.sql.ok\"", "result=\"success\""];
    let bad = ["job_id=\"lite.sql.bad\"", "result=\"failure\""];
    d.wait_for("a success and a failure", Duration::from_secs(20), || {
        let m = d.metrics();
        metric_value(&m, RUNS, &ok).unwrap_or(0.0) >= 1.0
            && metric_value(&m, RUNS, &bad).unwrap_or(0.0) >= 1.0
            && metric_value(&m, "dbkeeper_query_value", &["gauge=\"rows\""]).is_some()
            && metric_value(&m, "dbkeeper_table_bytes", &["table=\"t\""]).is_some()
    });
    let m = d.metrics();

    common::promtool_check_metrics(&m);

    let now = chrono::Utc::now().timestamp() as f64;
    let gauge = |name: &str, job: &str| {
        metric_value(&m, name, &[&format!("job_id=\"{job}\"")]).unwrap_or(-1.0)
    };
    assert!(
        (now - gauge("dbkeeper_job_last_success_timestamp_seconds", "lite.sql.ok")).abs() < 60.0
    );
    assert!(
        (now - gauge(
            "dbkeeper_job_last_failure_timestamp_seconds",
            "lite.sql.bad"
        ))
        .abs()
            < 60.0
    );
    assert_eq!(
        gauge(
            "dbkeeper_job_last_success_timestamp_seconds",
            "lite.sql.bad"
        ),
        0.0
    );
    assert_eq!(
        gauge("dbkeeper_job_expected_interval_seconds", "lite.sql.ok"),
        1.0
    );
    assert_eq!(gauge("dbkeeper_job_timeout_seconds", "lite.sql.ok"), 3600.0);
    // Every series of the design table exists from start-up, also for a job that never ran.
    for (name, labels) in [
        ("dbkeeper_build_info", "version=\""),
        ("dbkeeper_config_last_reload_successful", ""),
        ("dbkeeper_config_last_reload_success_timestamp_seconds", ""),
        ("dbkeeper_database_up", "database=\"lite\""),
        (RUNS, "job_id=\"lite.sql.by-hand\""),
        ("dbkeeper_job_skipped_total", "reason=\"overlap\""),
        ("dbkeeper_job_skipped_total", "reason=\"missed\""),
        ("dbkeeper_job_skipped_total", "reason=\"shutdown\""),
        (
            "dbkeeper_job_duration_seconds_count",
            "job_id=\"lite.sql.by-hand\"",
        ),
        ("dbkeeper_job_duration_seconds_bucket", "le=\"86400\""),
        (
            "dbkeeper_job_last_run_timestamp_seconds",
            "job_id=\"lite.sql.by-hand\"",
        ),
        (
            "dbkeeper_job_last_success_timestamp_seconds",
            "job_id=\"lite.sql.by-hand\"",
        ),
        (
            "dbkeeper_job_last_failure_timestamp_seconds",
            "job_id=\"lite.sql.by-hand\"",
        ),
        (
            "dbkeeper_job_next_run_timestamp_seconds",
            "job_id=\"lite.sql.by-hand\"",
        ),
        (
            "dbkeeper_job_expected_interval_seconds",
            "job_id=\"lite.sql.by-hand\"",
        ),
        (
            "dbkeeper_job_timeout_seconds",
            "job_id=\"lite.sql.by-hand\"",
        ),
        ("dbkeeper_job_running", "job_id=\"lite.sql.by-hand\""),
    ] {
        assert!(
            metric_value(&m, name, &[labels]).is_some(),
            "missing {name}{{{labels}}} in\n{m}"
        );
    }
    assert_eq!(
        metric_value(&m, "dbkeeper_database_up", &["database=\"lite\""]),
        Some(1.0)
    );

    // /status carries the failing job's database error.
    let (code, status) = d.get("/status");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).expect("status is JSON");
    let bad = status["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["job"] == "lite.sql.bad"))
        .expect("bad job in /status");
    assert_eq!(bad["last_result"], "failure");
    assert!(
        bad["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("no_such_table"),
        "{bad}"
    );
    assert_eq!(d.get("/readyz").0, 200);

    // The status page shows the same, as HTML.
    let (code, page) = d.get("/");
    assert_eq!(code, 200);
    assert!(page.starts_with("<!doctype html>"), "{page}");
    for needle in [
        "lite.sql.ok",
        "lite.sql.bad",
        "no such table: no_such_table",
        "never ran",
        "no backups yet",
    ] {
        assert!(
            page.contains(needle),
            "status page lacks {needle:?}:\n{page}"
        );
    }
}

#[test]
fn slow_job_is_never_started_twice() {
    let pg = PgDb::new("overlap");
    let w = Workdir::new();
    w.write_config(
        "",
        &format!(
            "{}{}",
            database("pg", &pg.url, ""),
            sql_job("slow", "SELECT pg_sleep(2.5)", "every 1s", ""),
        ),
    );
    let d = w.start();
    let skipped = ["job_id=\"pg.sql.slow\"", "reason=\"overlap\""];
    d.wait_for("two overlap skips", Duration::from_secs(30), || {
        d.metric("dbkeeper_job_skipped_total", &skipped)
            .unwrap_or(0.0)
            >= 2.0
    });
    // At most one dbkeeper session runs the statement at any moment.
    for _ in 0..20 {
        let sessions = pg.sleeping_sessions();
        assert!(sessions <= 1, "{sessions} concurrent runs");
        std::thread::sleep(Duration::from_millis(150));
    }
    // Skipped runs leave no trace in the history: every recorded run is a full one.
    let history = w.stdout(&["history", "pg.sql.slow", "-n", "50"]);
    let runs: Vec<&str> = history.lines().skip(1).collect();
    assert!(
        !runs.is_empty()
            && runs
                .iter()
                .all(|r| r.contains("success") || r.contains("running")),
        "{history}"
    );
}

#[test]
fn sighup_with_a_broken_file_keeps_the_old_config_and_a_good_one_applies() {
    let w = Workdir::new();
    let lite = database("lite", &w.sqlite_url("lite.db"), "");
    w.write_config(
        "",
        &format!("{lite}{}", sql_job("tick", "SELECT 1", "every 1s", "")),
    );
    let d = w.start();
    let tick = ["job_id=\"lite.sql.tick\"", "result=\"success\""];
    d.wait_for("first tick", Duration::from_secs(15), || {
        d.metric(RUNS, &tick).unwrap_or(0.0) >= 1.0
    });

    std::fs::write(w.config_path(), "[daemon\nthis is not toml").expect("write");
    d.signal("HUP");
    d.wait_for("reload failure reported", Duration::from_secs(10), || {
        d.metric("dbkeeper_config_last_reload_successful", &[]) == Some(0.0)
    });
    let before = d.metric(RUNS, &tick).unwrap_or(0.0);
    d.wait_for("old config keeps running", Duration::from_secs(15), || {
        d.metric(RUNS, &tick).unwrap_or(0.0) >= before + 2.0
    });
    assert!(d.log_text().contains("reload failed"), "{}", d.log_text());

    w.write_config(
        "",
        &format!("{lite}{}", sql_job("tock", "SELECT 2", "every 1s", "")),
    );
    d.signal("HUP");
    d.wait_for(
        "new job runs after a good reload",
        Duration::from_secs(15),
        || {
            let m = d.metrics();
            metric_value(&m, "dbkeeper_config_last_reload_successful", &[]) == Some(1.0)
                && metric_value(
                    &m,
                    RUNS,
                    &["job_id=\"lite.sql.tock\"", "result=\"success\""],
                )
                .unwrap_or(0.0)
                    >= 1.0
        },
    );
    // The removed job stops looking due, so schedule-based alerts leave it alone.
    let gone = ["job_id=\"lite.sql.tick\""];
    assert_eq!(
        d.metric("dbkeeper_job_expected_interval_seconds", &gone),
        Some(0.0)
    );
    assert_eq!(
        d.metric("dbkeeper_job_next_run_timestamp_seconds", &gone),
        Some(0.0)
    );
}

#[test]
fn sigterm_lets_a_running_job_finish_within_the_grace_period() {
    let pg = PgDb::new("grace");
    let w = Workdir::new();
    w.write_config(
        "shutdown-grace = \"20s\"",
        &format!(
            "{}{}",
            database("pg", &pg.url, ""),
            sql_job("nap", "SELECT pg_sleep(2)", "every 1s", "")
        ),
    );
    let mut d = w.start();
    d.wait_for("job running", Duration::from_secs(15), || {
        d.metric("dbkeeper_job_running", &["job_id=\"pg.sql.nap\""]) == Some(1.0)
    });
    d.signal("TERM");
    let (status, took) = d.wait_exit(Duration::from_secs(25));
    assert!(status.success(), "exit {status:?}\n{}", d.log_text());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let text = w.stdout(&["history", "pg.sql.nap"]);
    let newest = text.lines().nth(1).unwrap_or_default();
    assert!(
        newest.contains("success"),
        "newest run should have finished:\n{text}"
    );
}

#[test]
fn sigterm_cancels_a_job_that_outlasts_the_grace_period() {
    let pg = PgDb::new("cancel");
    let w = Workdir::new();
    w.write_config(
        "shutdown-grace = \"1s\"",
        &format!(
            "{}{}",
            database("pg", &pg.url, ""),
            sql_job("long", "SELECT pg_sleep(60)", "every 1s", "")
        ),
    );
    let mut d = w.start();
    d.wait_for("job running", Duration::from_secs(15), || {
        d.metric("dbkeeper_job_running", &["job_id=\"pg.sql.long\""]) == Some(1.0)
    });
    d.signal("TERM");
    let (status, took) = d.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit {status:?}\n{}", d.log_text());
    assert!(took < Duration::from_secs(8), "took {took:?}");
    let text = w.stdout(&["history", "pg.sql.long"]);
    assert!(
        text.contains("failure") && text.contains("cancelled"),
        "{text}"
    );
    // The statement does not linger on the server.
    let mut lingering = u32::MAX;
    for _ in 0..50 {
        lingering = pg.sleeping_sessions();
        if lingering == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        lingering, 0,
        "the cancelled statement still runs on the server"
    );
}

#[test]
fn last_success_survives_a_restart() {
    let w = Workdir::new();
    w.write_config(
        "",
        &format!(
            "{}{}",
            database("lite", &w.sqlite_url("lite.db"), ""),
            // Once a year: only the run by hand below runs it.
            sql_job("yearly", "SELECT 1", "0 0 0 1 1 *", ""),
        ),
    );
    w.cmd(&["run-job", "lite.sql.yearly"]).assert().success();
    let labels = ["job_id=\"lite.sql.yearly\""];
    // /healthz answers before the jobs are published: wait for the series.
    let published = |d: &common::Daemon| {
        d.wait_for("the job's series", Duration::from_secs(30), || {
            d.metric("dbkeeper_job_last_run_timestamp_seconds", &labels)
                .is_some()
        })
    };
    let first = {
        let d = w.start();
        published(&d);
        let v = d
            .metric("dbkeeper_job_last_success_timestamp_seconds", &labels)
            .expect("gauge");
        assert!(v > 0.0, "restored from the run-job run");
        v
    };
    let d = w.start();
    published(&d);
    assert_eq!(
        d.metric("dbkeeper_job_last_success_timestamp_seconds", &labels),
        Some(first)
    );
    assert_eq!(
        d.metric("dbkeeper_job_last_run_timestamp_seconds", &labels),
        Some(first)
    );
}

#[test]
fn unreachable_databases_are_reported_and_the_daemon_keeps_serving() {
    let w = Workdir::new();
    w.write_config(
        "probe-interval = \"1s\"",
        &format!(
            "{}{}{}{}{}",
            database(
                "pgdown",
                "postgres://postgres@127.0.0.1:1/nothing",
                "connect-timeout = \"1s\""
            ),
            sql_job("ping", "SELECT 1", "every 1s", ""),
            database(
                "litedown",
                "sqlite:///nonexistent-dir/x.db",
                "connect-timeout = \"1s\""
            ),
            sql_job("ping", "SELECT 1", "every 1s", ""),
            database("fine", &w.sqlite_url("fine.db"), ""),
        ),
    );
    let d = w.start();
    d.wait_for("both failures counted", Duration::from_secs(30), || {
        let m = d.metrics();
        ["pgdown", "litedown"].iter().all(|db| {
            metric_value(
                &m,
                RUNS,
                &[&format!("job_id=\"{db}.sql.ping\""), "result=\"failure\""],
            )
            .unwrap_or(0.0)
                >= 1.0
                && metric_value(&m, "dbkeeper_database_up", &[&format!("database=\"{db}\"")])
                    == Some(0.0)
        })
    });
    assert_eq!(
        d.metric("dbkeeper_database_up", &["database=\"fine\""]),
        Some(1.0)
    );
    assert_eq!(d.get("/healthz").0, 200);
    let (code, body) = d.get("/readyz");
    assert_eq!(code, 503);
    assert!(
        body.contains("pgdown") && body.contains("litedown"),
        "{body}"
    );
    let status: serde_json::Value = serde_json::from_str(&d.get("/status").1).expect("json");
    let err = status["jobs"][0]["last_error"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        err.contains("cannot connect to database \"pgdown\""),
        "{err}"
    );
}

/// Makes the job's recorded runs look `hours` older, as if the daemon had been down.
fn age_history(w: &Workdir, hours: i64) {
    let db = w.path().join("state/state.db");
    let out = Command::new("sqlite3")
        .arg(&db)
        .arg(format!(
            "UPDATE job_runs SET started_at = started_at - {ms}, finished_at = finished_at - {ms}",
            ms = hours * 3_600_000
        ))
        .output()
        .expect("sqlite3 must be installed (see .ci/run)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn missed_run_once_runs_at_start_up_and_skip_waits() {
    let w = Workdir::new();
    let lite = database("lite", &w.sqlite_url("lite.db"), "");
    let config = |missed: &str| {
        format!(
            "{lite}{}{}",
            sql_job(
                "hourly",
                "SELECT 1",
                "@hourly",
                &format!("missed = \"{missed}\"")
            ),
            sql_job(
                "fresh",
                "SELECT 1",
                "@hourly",
                &format!("missed = \"{missed}\"")
            ),
        )
    };
    w.write_config("", &config("run-once"));
    w.cmd(&["run-job", "lite.sql.hourly"]).assert().success();
    w.cmd(&["run-job", "lite.sql.fresh"]).assert().success();
    age_history(&w, 3);
    w.cmd(&["run-job", "lite.sql.fresh"]).assert().success(); // a recent success: not missed

    {
        let d = w.start();
        d.wait_for("missed run done", Duration::from_secs(15), || {
            d.metric(RUNS, &["job_id=\"lite.sql.hourly\"", "result=\"success\""]) == Some(1.0)
        });
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            d.metric(RUNS, &["job_id=\"lite.sql.fresh\"", "result=\"success\""]),
            Some(0.0)
        );
    }
    let newest = w
        .stdout(&["history", "lite.sql.hourly"])
        .lines()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    assert!(
        newest.contains("missed") && newest.contains("success"),
        "{newest}"
    );

    age_history(&w, 3);
    w.write_config("", &config("skip"));
    let d = w.start();
    d.wait_for("missed skip counted", Duration::from_secs(10), || {
        d.metric(
            "dbkeeper_job_skipped_total",
            &["job_id=\"lite.sql.hourly\"", "reason=\"missed\""],
        ) == Some(1.0)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        d.metric(RUNS, &["job_id=\"lite.sql.hourly\"", "result=\"success\""]),
        Some(0.0)
    );
}

#[test]
fn max_concurrent_jobs_limits_parallel_runs() {
    let pg = PgDb::new("slots");
    let w = Workdir::new();
    let jobs: String = ["a", "b", "c"]
        .iter()
        .map(|n| sql_job(n, "SELECT pg_sleep(0.7)", "every 1s", ""))
        .collect();
    w.write_config(
        "max-concurrent-jobs = 1",
        &format!("{}{jobs}", database("pg", &pg.url, "")),
    );
    let d = w.start();
    let mut max_seen = 0;
    let mut finished = 0.0;
    for _ in 0..40 {
        let active = pg.sleeping_sessions();
        max_seen = max_seen.max(active);
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = d.metrics();
    for job in ["a", "b", "c"] {
        finished += metric_value(
            &m,
            RUNS,
            &[&format!("job_id=\"pg.sql.{job}\""), "result=\"success\""],
        )
        .unwrap_or(0.0);
    }
    assert_eq!(max_seen, 1, "more than one job ran at once");
    assert!(
        finished >= 3.0,
        "jobs should still make progress, {finished} finished"
    );
}

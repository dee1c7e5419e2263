//! Query gauges (`[[database.gauge]]`) and `table-stats`, through the real binary
//! against real SQLite files and a real PostgreSQL: labels from columns, failures
//! that keep the last values, the series cap, read-only queries, bad config.

mod common;

use std::time::Duration;

use common::{database, metric_value, sqlite, PgDb, Workdir};

const VALUE: &str = "dbkeeper_query_value";
const LAST_SUCCESS: &str = "dbkeeper_query_last_success_timestamp_seconds";

fn gauge(name: &str, query: &str, schedule: &str, extra: &str) -> String {
    format!(
        "[[database.gauge]]\nname = \"{name}\"\nquery = \"{query}\"\nschedule = \"{schedule}\"\n{extra}\n"
    )
}

/// The `dbkeeper_query_value` lines of gauge `g` in `text`, sorted.
fn series_of(text: &str, g: &str) -> Vec<String> {
    let want = format!("gauge=\"{g}\"");
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{VALUE}{{")) && l.contains(&want))
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

fn run_job(w: &Workdir, job: &str) -> (i32, String) {
    let out = w.cmd(&["run-job", job]).output().expect("run-job");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Several rows and several label columns on PostgreSQL, values as the same query
/// gives them directly; a failing query keeps them and does not advance the
/// staleness timestamp; rows that disappear lose their series.
#[test]
fn postgres_gauge_labels_values_failure_and_vanishing_rows() {
    let pg = PgDb::new("gauge");
    pg.sql(
        "CREATE TABLE tickets(status text, region text, cost numeric, open bool);
         INSERT INTO tickets VALUES ('open','eu',1.5,true),('open','eu',2.25,true),
           ('open','us',10,true),('closed','eu',4,false),('closed',NULL,0.125,false);
         CREATE TABLE flag(on_ boolean); INSERT INTO flag VALUES (true)",
    );
    let query = "SELECT status, region, sum(cost) AS cost, count(*) AS n FROM tickets \
                 GROUP BY status, region";
    let w = Workdir::new();
    w.write_config(
        "",
        &format!(
            "{}{}",
            database("pg", &pg.url, ""),
            gauge("tickets", query, "every 1s", ""),
        ),
    );
    // run-job prints the series; the numbers are those of the query run directly.
    let (code, out) = run_job(&w, "pg.gauge.tickets");
    assert_eq!(code, 0, "{out}");
    let direct = pg.sql(&format!("{query} ORDER BY 1, 2"));
    for line in direct.lines() {
        let f: Vec<&str> = line.split('|').collect();
        let shown = format!(
            "{{status=\"{}\",region=\"{}\",n=\"{}\"}} {}",
            f[0],
            f[1],
            f[3],
            f[2].parse::<f64>().unwrap()
        );
        assert!(out.contains(&shown), "{shown} not in {out}");
    }

    let d = w.start();
    d.wait_for("the gauge's series", Duration::from_secs(20), || {
        series_of(&d.metrics(), "tickets").len() == 4
    });
    let m = d.metrics();
    let value = |m: &str, status: &str, region: &str| {
        metric_value(
            m,
            VALUE,
            &[
                "database=\"pg\"",
                "gauge=\"tickets\"",
                &format!("status=\"{status}\",region=\"{region}\","),
            ],
        )
    };
    assert_eq!(value(&m, "open", "eu"), Some(3.75));
    assert_eq!(value(&m, "open", "us"), Some(10.0));
    assert_eq!(value(&m, "closed", "eu"), Some(4.0));
    // A NULL label is an empty string.
    assert_eq!(value(&m, "closed", ""), Some(0.125));

    // A row disappears: its series goes with it; another changes.
    pg.sql("DELETE FROM tickets WHERE region = 'us'; UPDATE tickets SET cost = 7 WHERE status = 'closed' AND region = 'eu'");
    d.wait_for("the new values", Duration::from_secs(20), || {
        let m = d.metrics();
        value(&m, "closed", "eu") == Some(7.0) && value(&m, "open", "us").is_none()
    });
    assert_eq!(series_of(&d.metrics(), "tickets").len(), 3);

    // The query fails: failed runs, values kept, staleness timestamp stands still.
    pg.sql("ALTER TABLE tickets RENAME TO tickets_old");
    let failures = || {
        d.metric(
            "dbkeeper_job_runs_total",
            &["job_id=\"pg.gauge.tickets\"", "result=\"failure\""],
        )
        .unwrap_or(0.0)
    };
    d.wait_for("a failed run", Duration::from_secs(20), || {
        failures() >= 1.0
    });
    let stamp = d.metric(LAST_SUCCESS, &["gauge=\"tickets\""]).unwrap();
    d.wait_for("two more failed runs", Duration::from_secs(20), || {
        failures() >= 3.0
    });
    let m = d.metrics();
    assert_eq!(
        metric_value(&m, LAST_SUCCESS, &["gauge=\"tickets\""]),
        Some(stamp)
    );
    assert!(stamp > 0.0 && chrono::Utc::now().timestamp() as f64 - stamp >= 2.0);
    assert_eq!(
        value(&m, "closed", "eu"),
        Some(7.0),
        "the last value is kept"
    );
    assert_eq!(series_of(&m, "tickets").len(), 3);
    let (code, out) = run_job(&w, "pg.gauge.tickets");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("tickets"), "{out}");
}

/// SQLite: labels from TEXT and INTEGER columns, a NULL value skips its row (and
/// is counted), zero rows mean no series, promtool accepts the scrape.
#[test]
fn sqlite_gauges_and_table_stats_on_a_running_daemon() {
    let w = Workdir::new();
    let file = w.path().join("app.db");
    sqlite(
        &file,
        "CREATE TABLE jobs(queue TEXT, prio INTEGER, runtime REAL);
         INSERT INTO jobs VALUES ('mail',1,0.5),('mail',1,1.5),('mail',2,NULL),('sms',1,2.0);
         CREATE TABLE cache(k TEXT PRIMARY KEY, v BLOB);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 500)
           INSERT INTO cache SELECT 'key' || i, randomblob(200) FROM n;",
    );
    w.write_config(
        "",
        &format!(
            "{}{}{}",
            database(
                "lite",
                &format!("sqlite://{}", file.display()),
                "table-stats = true\ntable-stats-schedule = \"every 1s\""
            ),
            gauge(
                "runtime",
                "SELECT queue, CAST(prio AS TEXT) AS prio, sum(runtime) AS seconds FROM jobs GROUP BY 1, 2",
                "every 1s",
                "help = \"Seconds of work per queue and priority\"",
            ),
            gauge(
                "empty",
                "SELECT queue, count(*) FROM jobs WHERE prio > 5 GROUP BY queue",
                "every 1s",
                "",
            ),
        ),
    );
    let d = w.start();
    d.wait_for("gauges and table stats", Duration::from_secs(20), || {
        let m = d.metrics();
        metric_value(&m, LAST_SUCCESS, &["gauge=\"empty\""]).unwrap_or(0.0) > 0.0
            && metric_value(&m, LAST_SUCCESS, &["gauge=\"runtime\""]).unwrap_or(0.0) > 0.0
            && metric_value(&m, "dbkeeper_table_rows", &["table=\"cache\""]).is_some()
    });
    let m = d.metrics();
    assert_eq!(
        series_of(&m, "runtime"),
        [
            "dbkeeper_query_value{database=\"lite\",gauge=\"runtime\",queue=\"mail\",prio=\"1\"} 2",
            "dbkeeper_query_value{database=\"lite\",gauge=\"runtime\",queue=\"sms\",prio=\"1\"} 2",
        ]
    );
    assert_eq!(
        metric_value(&m, "dbkeeper_query_skipped_rows", &["gauge=\"runtime\""]),
        Some(1.0),
        "the NULL sum of mail/2 is skipped and counted"
    );
    assert!(series_of(&m, "empty").is_empty(), "zero rows, no series");
    assert_eq!(
        metric_value(
            &m,
            "dbkeeper_query_info",
            &["help=\"Seconds of work per queue and priority\""]
        ),
        Some(1.0)
    );
    // Table stats: exact rows, bytes from dbstat (the blobs alone are 100 kB).
    assert_eq!(
        metric_value(
            &m,
            "dbkeeper_table_rows",
            &["database=\"lite\"", "table=\"cache\""]
        ),
        Some(500.0)
    );
    assert_eq!(
        metric_value(&m, "dbkeeper_table_rows", &["table=\"jobs\""]),
        Some(4.0)
    );
    let bytes = metric_value(&m, "dbkeeper_table_bytes", &["table=\"cache\""]).unwrap();
    assert!(bytes > 100_000.0, "{bytes}");
    assert!(m.contains("# TYPE dbkeeper_table_bytes gauge"));
    assert!(
        metric_value(&m, "dbkeeper_table_seq_scans_total", &["table=\"cache\""]).is_none(),
        "no scan counters on SQLite"
    );
    common::promtool_check_metrics(&m);

    // A dropped table loses its series.
    sqlite(&file, "DROP TABLE cache");
    d.wait_for(
        "the dropped table's series gone",
        Duration::from_secs(20),
        || {
            let m = d.metrics();
            metric_value(&m, "dbkeeper_table_rows", &["table=\"cache\""]).is_none()
                && metric_value(&m, "dbkeeper_table_rows", &["table=\"jobs\""]).is_some()
        },
    );
}

/// More rows than `max-series` fail the run and export nothing from it; a label
/// column named like a reserved label is refused when the query runs.
#[test]
fn the_series_cap_and_reserved_labels_fail_the_run() {
    let w = Workdir::new();
    let file = w.path().join("app.db");
    sqlite(
        &file,
        "CREATE TABLE t(k TEXT, v INTEGER); INSERT INTO t VALUES ('a',1),('b',2),('c',3);",
    );
    let url = format!("sqlite://{}", file.display());
    w.write_config(
        "",
        &format!(
            "{}{}{}{}",
            database("lite", &url, ""),
            gauge("capped", "SELECT k, v FROM t", "manual", "max-series = 2"),
            gauge("fits", "SELECT k, v FROM t", "manual", "max-series = 3"),
            gauge("reserved", "SELECT k AS job, v FROM t", "manual", ""),
        ),
    );
    let (code, out) = run_job(&w, "lite.gauge.capped");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("gauge \"capped\" returned more than 2 rows (max-series)"),
        "{out}"
    );
    assert!(!out.contains("success"), "{out}");
    let (code, out) = run_job(&w, "lite.gauge.fits");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("3 series"), "{out}");
    let (code, out) = run_job(&w, "lite.gauge.reserved");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("column \"job\" is a reserved label name"),
        "{out}"
    );

    // `check` only plans the queries (EXPLAIN): it never runs one, so it cannot
    // know a run's rows, but refuses a query that does not compile — and a query
    // that would act outside its transaction does nothing.
    let copy = w.path().join("copy.db");
    w.write_config(
        "",
        &format!(
            "{}{}{}{}",
            database("lite", &url, ""),
            gauge("fits", "SELECT k, v FROM t", "manual", "max-series = 3"),
            gauge("typo", "SELEC k FROM t", "manual", ""),
            gauge(
                "vacuum",
                &format!("VACUUM INTO '{}'", copy.display()),
                "manual",
                ""
            ),
        ),
    );
    let out = w.cmd(&["check"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("job lite.gauge.fits: query compiles (check plans it and does not run it)"),
        "{text}"
    );
    assert!(text.contains("job lite.gauge.typo: CONFIG ERROR"), "{text}");
    assert!(!copy.exists(), "check ran a gauge query: {text}");

    // On the daemon: the capped gauge exports nothing and counts a failure.
    w.write_config(
        "",
        &format!(
            "{}{}",
            database("lite", &url, ""),
            gauge("capped", "SELECT k, v FROM t", "every 1s", "max-series = 2"),
        ),
    );
    let d = w.start();
    d.wait_for("a failed run", Duration::from_secs(20), || {
        d.metric(
            "dbkeeper_job_runs_total",
            &["job_id=\"lite.gauge.capped\"", "result=\"failure\""],
        )
        .unwrap_or(0.0)
            >= 1.0
    });
    let m = d.metrics();
    assert!(series_of(&m, "capped").is_empty(), "nothing exported");
    assert_eq!(
        metric_value(&m, LAST_SUCCESS, &["gauge=\"capped\""]),
        Some(0.0)
    );
}

/// A write in a gauge query fails and changes nothing, on both backends, also when
/// the query tries to lift the read-only setting first.
#[test]
fn writes_in_gauge_queries_fail_and_change_nothing() {
    let pg = PgDb::new("gauge_ro");
    pg.sql("CREATE TABLE t(v int); INSERT INTO t VALUES (1),(2),(3)");
    let w = Workdir::new();
    let file = w.path().join("app.db");
    sqlite(
        &file,
        "CREATE TABLE t(v INTEGER); INSERT INTO t VALUES (1),(2),(3);",
    );
    let pg_writes = [
        "DELETE FROM t RETURNING v",
        "INSERT INTO t VALUES (9) RETURNING v",
        "WITH d AS (DELETE FROM t RETURNING v) SELECT count(*) FROM d",
        "COMMIT; DELETE FROM t",
        "SELECT set_config('transaction_read_only', 'off', false), (SELECT count(*) FROM t)",
    ];
    let lite_writes = [
        "DELETE FROM t RETURNING v",
        "SELECT 1; DELETE FROM t",
        "PRAGMA query_only = OFF; DELETE FROM t",
    ];
    let mut config = database("pg", &pg.url, "");
    for (i, q) in pg_writes.iter().enumerate() {
        config.push_str(&gauge(&format!("w{i}"), q, "manual", ""));
    }
    config.push_str(&database(
        "lite",
        &format!("sqlite://{}", file.display()),
        "",
    ));
    for (i, q) in lite_writes.iter().enumerate() {
        config.push_str(&gauge(&format!("w{i}"), q, "manual", ""));
    }
    w.write_config("", &config);
    for (db, n) in [("pg", pg_writes.len()), ("lite", lite_writes.len())] {
        for i in 0..n {
            let (code, out) = run_job(&w, &format!("{db}.gauge.w{i}"));
            assert_eq!(code, 1, "{db}.gauge.w{i} must fail: {out}");
        }
    }
    assert_eq!(
        pg.sql("SELECT string_agg(v::text, ',' ORDER BY v) FROM t"),
        "1,2,3"
    );
    assert_eq!(
        sqlite(&file, "SELECT group_concat(v) FROM t").trim(),
        "1,2,3"
    );

    // PostgreSQL stops reading at the cap (the rest of a huge result is never
    // fetched), and the job's timeout is the statement's.
    w.write_config(
        "",
        &format!(
            "{}{}{}",
            database("pg", &pg.url, ""),
            gauge(
                "huge",
                "SELECT g::text AS k, 1 AS v FROM generate_series(1, 5000000) g",
                "manual",
                "max-series = 5"
            ),
            gauge(
                "slow",
                "SELECT 1 AS v FROM pg_sleep(30)",
                "manual",
                "timeout = \"1s\""
            ),
        ),
    );
    let started = std::time::Instant::now();
    let (code, out) = run_job(&w, "pg.gauge.huge");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("more than 5 rows (max-series)"), "{out}");
    let (code, out) = run_job(&w, "pg.gauge.slow");
    assert_eq!(code, 1, "{out}");
    assert!(started.elapsed() < Duration::from_secs(20), "{out}");
    assert_eq!(pg.sleeping_sessions(), 0, "the slow query was stopped");
}

/// PostgreSQL table stats: rows after ANALYZE, total bytes, scan counters; only the
/// largest tables up to table-stats-max-tables.
#[test]
fn postgres_table_stats() {
    let pg = PgDb::new("tstats");
    pg.sql(
        "CREATE TABLE big(id int PRIMARY KEY, pad text);
         INSERT INTO big SELECT i, repeat('x', 200) FROM generate_series(1, 2000) i;
         CREATE SCHEMA app; CREATE TABLE app.small(id int);
         INSERT INTO app.small SELECT generate_series(1, 37);
         CREATE TABLE tiny(id int);
         ANALYZE;
         SELECT count(*) FROM big; SELECT * FROM big WHERE id = 5;",
    );
    let w = Workdir::new();
    w.write_config(
        "",
        &database(
            "pg",
            &pg.url,
            "table-stats = true\ntable-stats-schedule = \"every 1s\"\ntable-stats-max-tables = 2",
        ),
    );
    let (code, out) = run_job(&w, "pg.table-stats");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("2 tables") && out.contains("1 smaller tables left out"),
        "{out}"
    );
    let d = w.start();
    d.wait_for("table stats", Duration::from_secs(20), || {
        d.metric("dbkeeper_table_rows", &["table=\"big\""])
            .is_some()
    });
    let m = d.metrics();
    let get = |name: &str, table: &str| {
        metric_value(
            &m,
            name,
            &["database=\"pg\"", &format!("table=\"{table}\"")],
        )
    };
    assert_eq!(get("dbkeeper_table_rows", "big"), Some(2000.0));
    assert_eq!(get("dbkeeper_table_rows", "app.small"), Some(37.0));
    assert_eq!(get("dbkeeper_table_rows", "tiny"), None, "beyond the cap");
    let bytes: f64 = pg
        .sql("SELECT pg_total_relation_size('big')")
        .parse()
        .unwrap();
    assert_eq!(get("dbkeeper_table_bytes", "big"), Some(bytes));
    assert!(get("dbkeeper_table_seq_scans_total", "big").unwrap() >= 1.0);
    assert!(get("dbkeeper_table_index_scans_total", "big").unwrap() >= 1.0);
    assert!(m.contains("# TYPE dbkeeper_table_index_scans_total counter"));
    common::promtool_check_metrics(&m);
}

/// Duplicate gauge names, an empty query, max-series = 0 and table-stats keys
/// without table-stats are configuration errors (exit 2), named in the message.
/// Table names holding `.` or `"` are quoted in the label, with their schema, so no
/// two tables share one (adversary case: `"sales.2024"` in public is
/// `public."sales.2024"`, `sales."2024"` is `sales.2024`).
#[test]
fn table_labels_are_unambiguous() {
    let pg = PgDb::new("tlabels");
    pg.sql(
        "CREATE TABLE \"sales.2024\"(id int); INSERT INTO \"sales.2024\" VALUES (1);
         CREATE SCHEMA sales; CREATE TABLE sales.\"2024\"(id int);
         INSERT INTO sales.\"2024\" VALUES (1), (2);
         CREATE TABLE \"say \"\"hi\"\"\"(id int);
         ANALYZE;",
    );
    let w = Workdir::new();
    w.write_config("", &database("pg", &pg.url, "table-stats = true"));
    let d = w.start();
    d.wait_for("table stats at start", Duration::from_secs(20), || {
        d.metrics().matches("dbkeeper_table_rows{").count() == 3
    });
    let m = d.metrics();
    let rows = |label: &str| metric_value(&m, "dbkeeper_table_rows", &[label]);
    assert_eq!(
        rows("table=\"public.\\\"sales.2024\\\"\""),
        Some(1.0),
        "{m}"
    );
    assert_eq!(rows("table=\"sales.2024\""), Some(2.0), "{m}");
    assert_eq!(
        rows("table=\"public.\\\"say \\\"\\\"hi\\\"\\\"\\\"\""),
        Some(0.0),
        "{m}"
    );
    common::promtool_check_metrics(&m);
}

#[test]
fn bad_gauge_config_exits_2() {
    let w = Workdir::new();
    let url = w.sqlite_url("app.db");
    let cases = [
        (
            format!(
                "{}{}",
                gauge("g", "SELECT 1", "@hourly", ""),
                gauge("g", "SELECT 2", "@hourly", "")
            ),
            "job name \"g\" is used twice",
        ),
        (gauge("g", "  ", "@hourly", ""), "query: is empty"),
        (
            gauge("g", "SELECT 1", "@hourly", "max-series = 0"),
            "max-series: 0 is out of range",
        ),
        (gauge("g", "SELECT 1", "@hourly", "colour = 1"), "colour"),
    ];
    for (jobs, want) in cases {
        w.write_config("", &format!("{}{jobs}", database("lite", &url, "")));
        let out = w.cmd(&["check"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{want}: {err}");
        assert!(err.contains(want), "want {want:?} in {err}");
    }
    w.write_config(
        "",
        &database("lite", &url, "table-stats-schedule = \"@hourly\""),
    );
    let out = w.cmd(&["run-job", "lite.table-stats"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without table-stats = true"));
}

/// A reload keeps a gauge's values and staleness timestamp; a reload that removes
/// the gauge removes its series.
#[test]
fn reloads_keep_gauge_values_and_removal_drops_them() {
    let w = Workdir::new();
    let file = w.path().join("app.db");
    sqlite(
        &file,
        "CREATE TABLE t(k TEXT, v INTEGER); INSERT INTO t VALUES ('a',1),('b',2);",
    );
    let url = format!("sqlite://{}", file.display());
    let config = |gauges: &str| format!("{}{gauges}", database("lite", &url, ""));
    let kept = gauge("kept", "SELECT k, v FROM t", "@startup", "");
    let gone = gauge("gone", "SELECT k, v * 10 FROM t", "@startup", "");
    w.write_config("", &config(&format!("{kept}{gone}")));
    let d = w.start();
    d.wait_for("both gauges", Duration::from_secs(20), || {
        let m = d.metrics();
        series_of(&m, "kept").len() == 2 && series_of(&m, "gone").len() == 2
    });
    let stamp = d.metric(LAST_SUCCESS, &["gauge=\"kept\""]).unwrap();
    assert!(stamp > 0.0);
    w.write_config("", &config(&kept));
    d.signal("HUP");
    d.wait_for(
        "the removed gauge's series gone",
        Duration::from_secs(20),
        || series_of(&d.metrics(), "gone").is_empty(),
    );
    let m = d.metrics();
    assert_eq!(
        metric_value(&m, LAST_SUCCESS, &["gauge=\"kept\""]),
        Some(stamp)
    );
    assert_eq!(
        series_of(&m, "kept"),
        [
            "dbkeeper_query_value{database=\"lite\",gauge=\"kept\",k=\"a\"} 1",
            "dbkeeper_query_value{database=\"lite\",gauge=\"kept\",k=\"b\"} 2",
        ]
    );
}

//! Retention and refresh against real PostgreSQL and SQLite, run by the real binary,
//! with concurrent writers and readers in this process.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{psql, sqlite, PgDb, Workdir};
use predicates::prelude::*;
use sqlx::Connection;

fn pg_config(url: &str, tables: &str) -> String {
    format!("[[database]]\nname = \"pg\"\nurl = \"{url}\"\n{tables}")
}

fn rule(table: &str, name: &str, extra: &str) -> String {
    format!(
        "[[database.retention]]\ntable = '{table}'\nname = \"{name}\"\ncolumn = \"created_at\"\nolder-than = \"30d\"\nschedule = \"manual\"\n{extra}\n"
    )
}

/// 1,000,000 rows, 60 % expired, while a writer inserts and updates throughout.
#[test]
fn million_rows_deleted_in_batches_without_blocking_a_writer() {
    let pg = PgDb::new("ret_million");
    pg.sql(
        "CREATE TABLE events (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL, payload text);
         INSERT INTO events (created_at, payload)
           SELECT now() - CASE WHEN g % 10 < 6 THEN interval '31 days' ELSE interval '0 days' END - (g % 29) * interval '1 day',
                  'row ' || g
           FROM generate_series(1, 1000000) g;
         CREATE INDEX events_created ON events (created_at);
         ANALYZE events;",
    );
    // g % 10 < 6 is older than 31 days: 60 % expire.
    let expected_left = psql(
        &pg.url,
        "SELECT count(*) FROM events WHERE created_at >= now() - interval '30 days'",
    );
    let w = Workdir::new();
    w.write_config(
        "",
        &pg_config(
            &pg.url,
            &rule(
                "events",
                "events",
                "batch-size = 10000\nlock-timeout = \"2s\"",
            ),
        ),
    );
    let planned: u64 = {
        let plan = w.stdout(&["retention", "plan", "pg"]);
        let line = plan.lines().nth(1).expect("plan row");
        line.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .find(|p| p[1] == "rows")
            .and_then(|p| p[0].parse().ok())
            .expect("row count in plan")
    };
    assert_eq!(planned, 600_000);

    let stop = Arc::new(AtomicBool::new(false));
    let rt = common::runtime();
    let url = pg.url.clone();
    let stop_writer = stop.clone();
    let writer = rt.spawn(async move {
        let mut conn = sqlx::PgConnection::connect(&url)
            .await
            .expect("writer connects");
        let (mut max, mut ops, mut n) = (Duration::ZERO, 0u64, 0i64);
        while !stop_writer.load(Ordering::Relaxed) {
            n += 1;
            let t = Instant::now();
            sqlx::query("INSERT INTO events (created_at, payload) VALUES (now(), 'live')")
                .execute(&mut conn)
                .await
                .expect("insert");
            // Updates hit old (expired) rows too, the ones being deleted.
            sqlx::query("UPDATE events SET payload = payload || '+' WHERE id = $1")
                .bind((n * 7919) % 1_000_000 + 1)
                .execute(&mut conn)
                .await
                .expect("update");
            max = max.max(t.elapsed());
            ops += 2;
        }
        (max, ops)
    });
    let started = Instant::now();
    w.cmd(&["run-job", "pg.retention.events"])
        .assert()
        .success()
        .stdout(predicate::str::contains("deleted 600000 rows"));
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (max_latency, ops) = rt.block_on(writer).expect("writer");
    eprintln!("retention of 600000 rows took {took:?}; writer: {ops} statements, max latency {max_latency:?}");
    assert!(
        max_latency < Duration::from_millis(1500),
        "writer blocked for {max_latency:?}"
    );
    let left_old = psql(&pg.url, "SELECT count(*) FROM events WHERE created_at < now() - interval '30 days' - interval '1 minute'");
    assert_eq!(left_old, "0");
    let left = psql(
        &pg.url,
        "SELECT count(*) FROM events WHERE payload NOT LIKE 'live%'",
    );
    assert_eq!(left, expected_left, "exactly the non-expired rows stay");
    let history = w.stdout(&["history", "pg.retention.events"]);
    assert!(history.contains("success"), "{history}");
}

#[test]
fn odd_names_work_and_a_bad_where_deletes_nothing() {
    let pg = PgDb::new("ret_names");
    pg.sql(
        "CREATE SCHEMA \"Audit Log\";
         CREATE TABLE \"Audit Log\".\"Weird \"\"Name\"\"; --\" (id int PRIMARY KEY, created_at timestamp NOT NULL, kind text);
         INSERT INTO \"Audit Log\".\"Weird \"\"Name\"\"; --\" SELECT g, now() - (g || ' days 12 hours')::interval, CASE WHEN g % 2 = 0 THEN 'keep' ELSE 'x' END FROM generate_series(1, 100) g;
         CREATE TABLE unix_events (id int PRIMARY KEY, created_at bigint NOT NULL);
         INSERT INTO unix_events SELECT g, extract(epoch FROM now() - (g || ' days 12 hours')::interval)::bigint FROM generate_series(1, 100) g;",
    );
    let odd = r#""Audit Log"."Weird ""Name""; --""#;
    let w = Workdir::new();
    w.write_config(
        "",
        &pg_config(
            &pg.url,
            &format!(
                "{}{}{}",
                rule(odd, "weird", "where = \"kind <> 'keep'\""),
                rule("unix_events", "unix", ""),
                // Balanced, so it passes the load-time bracket check; the server
                // rejects it. (An unbalanced one is refused at load:
                // tests/retention_adversary.rs.)
                rule(odd, "broken", "where = \"kind <> 'keep' AND AND true\""),
            ),
        ),
    );
    // The broken rule is reported; the others are still planned.
    let plan = w.cmd(&["retention", "plan", "pg"]).output().expect("plan");
    assert_eq!(plan.status.code(), Some(1));
    let plan = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.contains("35 rows") && plan.contains("71 rows") && plan.contains("ERROR"),
        "{plan}"
    );
    w.cmd(&["run-job", "pg.retention.broken"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("syntax error"));
    let table = r#""Audit Log"."Weird ""Name""; --""#;
    assert_eq!(
        pg.sql(&format!("SELECT count(*) FROM {table}")),
        "100",
        "nothing deleted"
    );
    w.cmd(&["run-job", "pg.retention.weird"]).assert().success();
    assert_eq!(pg.sql(&format!("SELECT count(*) FROM {table}")), "65");
    assert_eq!(
        pg.sql(&format!("SELECT count(*) FROM {table} WHERE kind = 'keep'")),
        "50"
    );
    w.cmd(&["run-job", "pg.retention.unix"]).assert().success();
    assert_eq!(
        pg.sql("SELECT count(*) FROM unix_events"),
        "29",
        "integer unix-seconds column"
    );

    // Names that are not in the catalog: `check` exits 2 naming them.
    w.write_config(
        "",
        &pg_config(
            &pg.url,
            &format!(
                "{}{}",
                rule("no_such_table", "a", ""),
                rule("unix_events", "b", "").replace("created_at", "no_such_column")
            ),
        ),
    );
    w.cmd(&["check"]).assert().code(2).stdout(
        predicate::str::contains("no_such_table").and(predicate::str::contains("no_such_column")),
    );
}

#[test]
fn archive_max_duration_and_sqlite() {
    let w = Workdir::new();
    let db = w.path().join("app.db");
    sqlite(
        &db,
        "PRAGMA journal_mode=WAL;
         CREATE TABLE \"Log Lines\" (id INTEGER PRIMARY KEY, created_at TEXT NOT NULL, msg TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
           INSERT INTO \"Log Lines\" (created_at, msg) SELECT datetime('now', '-' || (i % 60) || ' days', '-12 hours'), 'msg ' || i FROM n;",
    );
    let expired = sqlite(
        &db,
        "SELECT count(*) FROM \"Log Lines\" WHERE created_at < datetime('now', '-30 days')",
    );
    let key = w.key("k");
    let dest = w.path().join("backups");
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"lite\"\nurl = \"sqlite://{}\"\n\
             [database.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nencryption-key-file = \"{}\"\n{}",
            db.display(),
            dest.display(),
            key.display(),
            rule("Log Lines", "log", "batch-size = 300\narchive = true"),
        ),
    );
    let plan = w.stdout(&["retention", "plan", "lite"]);
    assert!(plan.contains(&format!("{} rows", expired.trim())), "{plan}");
    w.cmd(&["run-job", "lite.retention.log"]).assert().success();
    assert_eq!(
        sqlite(
            &db,
            "SELECT count(*) FROM \"Log Lines\" WHERE created_at < datetime('now', '-30 days')"
        )
        .trim(),
        "0"
    );
    // Every deleted row is in an archive, readable with the backup key.
    let dir = dest.join("lite/retention/log");
    let mut archived = 0;
    for entry in std::fs::read_dir(&dir).expect("archive dir") {
        let path = entry.expect("entry").path();
        let out = w
            .cmd(&["decrypt", path.to_str().expect("utf-8")])
            .output()
            .expect("decrypt");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let row: serde_json::Value = serde_json::from_str(line).expect("JSON line");
            assert!(
                row["msg"].as_str().is_some_and(|m| m.starts_with("msg ")),
                "{row}"
            );
            archived += 1;
        }
    }
    assert_eq!(archived.to_string(), expired.trim());
    // Archives do not show up as backups.
    assert_eq!(w.stdout(&["backup", "list", "lite"]).lines().count(), 1);

    // max-duration stops cleanly and says what is left.
    sqlite(
        &db,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000)
           INSERT INTO \"Log Lines\" (created_at, msg) SELECT datetime('now', '-90 days'), 'old' FROM n;",
    );
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"lite\"\nurl = \"sqlite://{}\"\n{}",
            db.display(),
            rule(
                "Log Lines",
                "log",
                "batch-size = 10\nbatch-time = \"0s\"\npause = \"20ms\"\nmax-duration = \"300ms\""
            )
        ),
    );
    w.cmd(&["run-job", "lite.retention.log"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("stopped after max-duration")
                .and(predicate::str::contains("expired rows left")),
        );
    let left: u32 = sqlite(&db, "SELECT count(*) FROM \"Log Lines\" WHERE msg = 'old'")
        .trim()
        .parse()
        .expect("count");
    assert!(left > 0 && left < 3000, "some, not all, deleted: {left}");
}

#[test]
fn expired_partitions_are_dropped() {
    let pg = PgDb::new("ret_parts");
    pg.sql(
        "CREATE TABLE metrics (id bigint, created_at timestamptz NOT NULL, v float8, PRIMARY KEY (id, created_at))
           PARTITION BY RANGE (created_at);
         CREATE TABLE metrics_old1 PARTITION OF metrics FOR VALUES FROM ('2020-01-01') TO ('2020-02-01');
         CREATE TABLE metrics_old2 PARTITION OF metrics FOR VALUES FROM ('2020-02-01') TO ('2020-03-01');
         CREATE TABLE metrics_now PARTITION OF metrics FOR VALUES FROM ('2020-03-01') TO (MAXVALUE);
         INSERT INTO metrics SELECT g, timestamptz '2020-01-15' + (g || ' days')::interval, g FROM generate_series(1, 100) g;
         INSERT INTO metrics SELECT 1000 + g, now(), g FROM generate_series(1, 10) g;",
    );
    let w = Workdir::new();
    w.write_config(
        "",
        &pg_config(
            &pg.url,
            &rule("metrics", "metrics", "mode = \"drop-partitions\""),
        ),
    );
    let plan = w.stdout(&["retention", "plan", "pg"]);
    assert!(
        plan.contains("public.metrics_old1, public.metrics_old2"),
        "{plan}"
    );
    w.cmd(&["run-job", "pg.retention.metrics"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("dropped 2 partitions")
                .and(predicate::str::contains(", 45 rows")),
        );
    assert_eq!(
        pg.sql("SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class WHERE relname LIKE 'metrics_%' AND relkind = 'r'"),
        "metrics_now"
    );
    // Batched deletes on the partitioned parent go by primary key.
    w.write_config(
        "",
        &pg_config(&pg.url, &rule("metrics", "metrics", "batch-size = 7")),
    );
    w.cmd(&["run-job", "pg.retention.metrics"])
        .assert()
        .success();
    assert_eq!(
        pg.sql("SELECT count(*) FROM metrics WHERE created_at < now() - interval '30 days'"),
        "0"
    );
    assert_eq!(pg.sql("SELECT count(*) FROM metrics WHERE id > 1000"), "10");
}

#[test]
fn concurrent_refresh_never_disturbs_readers_and_a_blocked_refresh_retries() {
    let pg = PgDb::new("refresh");
    pg.sql(
        "CREATE TABLE sales (id int PRIMARY KEY, region text, amount numeric);
         INSERT INTO sales SELECT g, 'r' || (g % 50), g FROM generate_series(1, 200000) g;
         CREATE MATERIALIZED VIEW totals AS SELECT region, sum(amount) AS total, count(*) AS n FROM sales GROUP BY region;
         CREATE UNIQUE INDEX totals_region ON totals (region);
         CREATE MATERIALIZED VIEW plain_totals AS SELECT region, sum(amount) AS total FROM sales GROUP BY region;",
    );
    let w = Workdir::new();
    w.write_config(
        "",
        &pg_config(
            &pg.url,
            "[[database.refresh]]\nview = \"totals\"\nschedule = \"manual\"\nlock-timeout = \"500ms\"\nretries = 3\nretry-backoff = \"1s\"\n\
             [[database.refresh]]\nview = \"plain_totals\"\nschedule = \"manual\"\nrequire-concurrently = true\n",
        ),
    );
    let rt = common::runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let (url, stop_reader) = (pg.url.clone(), stop.clone());
    let reader = rt.spawn(async move {
        let mut conn = sqlx::PgConnection::connect(&url)
            .await
            .expect("reader connects");
        let mut reads = 0u64;
        while !stop_reader.load(Ordering::Relaxed) {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM totals")
                .fetch_one(&mut conn)
                .await
                .expect("a reader never gets an error");
            assert_eq!(n, 50, "a reader never sees a partial view");
            reads += 1;
        }
        reads
    });
    for _ in 0..3 {
        pg.sql("UPDATE sales SET amount = amount + 1 WHERE id % 1000 = 0");
        w.cmd(&["run-job", "pg.refresh.totals"])
            .assert()
            .success()
            .stdout(predicate::str::contains("refreshed concurrently: 50 rows"));
    }
    stop.store(true, Ordering::Relaxed);
    let reads = rt.block_on(reader).expect("reader");
    assert!(reads > 10, "the reader kept reading ({reads})");

    // Without a unique index and require-concurrently: refused, not silently blocking.
    w.cmd(&["run-job", "pg.refresh.plain_totals"])
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("CONCURRENTLY").and(predicate::str::contains("unique index")),
        );

    // Another session holds the view locked for ~2.5 s: the first attempts fail on
    // lock_timeout, a retry succeeds.
    let url = pg.url.clone();
    let locker = rt.spawn(async move {
        let mut conn = sqlx::PgConnection::connect(&url)
            .await
            .expect("locker connects");
        let mut tx = conn.begin().await.expect("begin");
        // A plain refresh holds ACCESS EXCLUSIVE on the view until commit.
        sqlx::query("REFRESH MATERIALIZED VIEW totals")
            .execute(&mut *tx)
            .await
            .expect("lock");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        tx.commit().await.expect("commit");
    });
    std::thread::sleep(Duration::from_millis(300));
    w.cmd(&["run-job", "pg.refresh.totals"]).assert().success();
    rt.block_on(locker).expect("locker");
    let history = w.stdout(&["history", "pg.refresh.totals", "-n", "1"]);
    let row = history.lines().nth(1).unwrap_or_default();
    let attempts: u32 = row
        .split_whitespace()
        .rev()
        .find_map(|c| c.parse().ok())
        .unwrap_or(0);
    assert!(
        row.contains("success") && attempts >= 2,
        "retried after lock timeouts: {history}"
    );
}

#[test]
fn sqlite_rebuild_is_atomic_for_readers_in_another_process() {
    let w = Workdir::new();
    let db = w.path().join("app.db");
    sqlite(
        &db,
        "PRAGMA journal_mode=WAL;
         CREATE TABLE sales (id INTEGER PRIMARY KEY, region TEXT, amount REAL);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)
           INSERT INTO sales (region, amount) SELECT 'r' || (i % 40), i FROM n;",
    );
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"lite\"\nurl = \"sqlite://{}\"\n\
             [[database.refresh]]\nview = \"region totals\"\nname = \"totals\"\nschedule = \"manual\"\n\
             query = \"SELECT region, sum(amount) AS total, count(*) AS n FROM sales GROUP BY region\"\n",
            db.display()
        ),
    );
    w.cmd(&["run-job", "lite.refresh.totals"])
        .assert()
        .success()
        .stdout(predicate::str::contains("40 rows"));
    sqlite(
        &db,
        "CREATE INDEX region_totals_region ON \"region totals\" (region)",
    );
    let rt = common::runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let (path, stop_reader) = (db.clone(), stop.clone());
    let reader = rt.spawn(async move {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .read_only(true);
        let mut conn = sqlx::SqliteConnection::connect_with(&options)
            .await
            .expect("reader connects");
        let mut reads = 0u64;
        while !stop_reader.load(Ordering::Relaxed) {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM \"region totals\"")
                .fetch_one(&mut conn)
                .await
                .expect("read");
            assert_eq!(n, 40, "a reader saw {n} rows during a rebuild");
            reads += 1;
        }
        reads
    });
    for _ in 0..5 {
        w.cmd(&["run-job", "lite.refresh.totals"])
            .assert()
            .success();
    }
    stop.store(true, Ordering::Relaxed);
    let reads = rt.block_on(reader).expect("reader");
    assert!(reads > 10, "{reads} reads");
    assert_eq!(
        sqlite(
            &db,
            "SELECT count(*) FROM sqlite_master WHERE name = 'region_totals_region'"
        )
        .trim(),
        "1",
        "indexes survive rebuilds"
    );
}

#[test]
fn retention_and_refresh_series_exist_from_start_up_and_follow_runs() {
    let w = Workdir::new();
    let db = w.path().join("app.db");
    sqlite(
        &db,
        "CREATE TABLE events (id INTEGER PRIMARY KEY, created_at INTEGER NOT NULL);
         INSERT INTO events (created_at) VALUES (unixepoch('now', '-40 days')), (unixepoch('now', '-50 days')), (unixepoch('now'));",
    );
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"lite\"\nurl = \"sqlite://{}\"\n{}\
             [[database.refresh]]\nview = \"counts\"\nschedule = \"every 1s\"\nquery = \"SELECT count(*) AS n FROM events\"\n",
            db.display(),
            rule("events", "events", "").replace("schedule = \"manual\"", "schedule = \"every 1s\"")
        ),
    );
    let d = w.start();
    let labels = ["database=\"lite\"", "table=\"events\""];
    // /healthz answers before the jobs are published: wait for the series.
    d.wait_for("the retention series", Duration::from_secs(30), || {
        d.metric("dbkeeper_retention_max_age_seconds", &labels)
            .is_some()
    });
    assert_eq!(
        d.metric("dbkeeper_retention_max_age_seconds", &labels),
        Some(30.0 * 86400.0)
    );
    d.wait_for("retention and refresh ran", Duration::from_secs(15), || {
        let m = d.metrics();
        common::metric_value(&m, "dbkeeper_retention_rows_deleted_total", &labels) == Some(2.0)
            && common::metric_value(&m, "dbkeeper_refresh_last_rows", &["view=\"counts\""])
                == Some(1.0)
    });
    // The gauge is set when the run ends, after the last batch's counter update.
    d.wait_for(
        "the oldest row left is the recent one",
        Duration::from_secs(10),
        || {
            let oldest = d
                .metric("dbkeeper_retention_oldest_row_timestamp_seconds", &labels)
                .unwrap_or(0.0);
            (chrono::Utc::now().timestamp() as f64 - oldest).abs() < 120.0
        },
    );
}

#[test]
fn view_names_with_quotes_semicolons_and_comments_are_quoted_not_executed() {
    let pg = PgDb::new("refresh_names");
    pg.sql(
        r#"CREATE SCHEMA "Sales Data";
           CREATE TABLE victim (id int);
           CREATE MATERIALIZED VIEW "Sales Data"."Odd ""view""; DROP TABLE victim; --" AS SELECT 1 AS n;"#,
    );
    let w = Workdir::new();
    w.write_config(
        "",
        &pg_config(
            &pg.url,
            "[[database.refresh]]\nview = '\"Sales Data\".\"Odd \"\"view\"\"; DROP TABLE victim; --\"'\nname = \"odd\"\nschedule = \"manual\"\n",
        ),
    );
    w.cmd(&["run-job", "pg.refresh.odd"])
        .assert()
        .success()
        .stdout(predicate::str::contains("1 rows"));
    assert_eq!(
        psql(&pg.url, "SELECT to_regclass('victim') IS NOT NULL"),
        "t",
        "nothing was executed"
    );
    // A name that does not exist is a clear error, not SQL.
    w.write_config(
        "",
        &pg_config(
            &pg.url,
            "[[database.refresh]]\nview = \"nope; DROP TABLE victim\"\nschedule = \"manual\"\n",
        ),
    );
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stdout(predicate::str::contains(
            "materialized view nope; DROP TABLE victim does not exist",
        ));
    assert_eq!(
        psql(&pg.url, "SELECT to_regclass('victim') IS NOT NULL"),
        "t"
    );
}

//! Cases found by an adversarial review of retention (given only the README and the
//! binary, asked to make it lose data), kept as tests against the real binary.

mod common;

use common::{sqlite, PgDb, Workdir};
use predicates::prelude::*;

fn pg_config(w: &Workdir, db: &PgDb, rules: &str) {
    w.write_config(
        "",
        &format!("[[database]]\nname = \"pg\"\nurl = \"{}\"\n{rules}", db.url),
    );
}

fn rule(table: &str, column: &str, older: &str, extra: &str) -> String {
    format!(
        "[[database.retention]]\ntable = \"{table}\"\nname = \"r\"\ncolumn = \"{column}\"\n\
         older-than = \"{older}\"\nschedule = \"manual\"\n{extra}\n"
    )
}

/// Seconds from a fixed instant to now, for an `older-than` that puts the cutoff there.
fn seconds_since(rfc3339: &str) -> i64 {
    let at = chrono::DateTime::parse_from_rfc3339(rfc3339).expect("time");
    (chrono::Utc::now() - at.with_timezone(&chrono::Utc)).num_seconds()
}

/// A database TimeZone written as a number (`SET timezone = -7`: 7 hours west, the
/// SQL sign) must not be read with the POSIX sign, which would make every wall clock
/// 14 hours older — in `delete` and in `drop-partitions` mode.
#[test]
fn numeric_database_time_zones_keep_their_sign() {
    let pg = PgDb::new("numtz");
    pg.sql(&format!("ALTER DATABASE {} SET timezone = -7", pg.name));
    pg.sql(
        "CREATE TABLE ev (id int, ts timestamp);
         INSERT INTO ev VALUES (1, localtimestamp - interval '10 minutes'), (2, localtimestamp - interval '2 hours');
         CREATE TABLE m (id int, ts timestamp NOT NULL) PARTITION BY RANGE (ts);
         CREATE TABLE m_old PARTITION OF m FOR VALUES FROM ('2000-01-01') TO (localtimestamp - interval '90 minutes');
         CREATE TABLE m_new PARTITION OF m FOR VALUES FROM (localtimestamp - interval '90 minutes') TO (localtimestamp + interval '3 hours');
         INSERT INTO m VALUES (1, localtimestamp - interval '10 minutes'), (2, localtimestamp - interval '2 hours');",
    );
    let w = Workdir::new();
    pg_config(&w, &pg, &rule("ev", "ts", "1h", ""));
    w.stdout(&["run-job", "pg.retention.r"]);
    assert_eq!(pg.sql("SELECT string_agg(id::text, ',') FROM ev"), "1");

    pg_config(
        &w,
        &pg,
        &rule("m", "ts", "1h", "mode = \"drop-partitions\""),
    );
    w.stdout(&["run-job", "pg.retention.r"]);
    assert_eq!(pg.sql("SELECT string_agg(id::text, ',') FROM m"), "1");
}

/// A partition whose upper bound is before the cutoff may still hold a row the rule
/// keeps: a wall clock in the spring-forward gap reads later than the bound.
#[test]
fn a_partition_goes_only_if_every_row_in_it_is_expired() {
    let pg = PgDb::new("gap");
    pg.sql(
        "CREATE TABLE m (id int, ts timestamp NOT NULL) PARTITION BY RANGE (ts);
         CREATE TABLE m_a PARTITION OF m FOR VALUES FROM ('2026-03-01') TO ('2026-03-08 03:15');
         CREATE TABLE m_b PARTITION OF m FOR VALUES FROM ('2026-03-08 03:15') TO ('2027-01-01');
         INSERT INTO m VALUES (1, '2026-03-07 12:00'), (2, '2026-03-08 02:30'), (3, '2026-03-08 03:10'), (4, '2026-03-09');",
    );
    // Cutoff at 07:20Z: 02:30 New York (in the gap) reads as 07:30Z, after it.
    let older = format!("{}s", seconds_since("2026-03-08T07:20:00Z"));
    let w = Workdir::new();
    let extra = "column-timezone = \"America/New_York\"\nmode = \"drop-partitions\"";
    pg_config(&w, &pg, &rule("m", "ts", &older, extra));
    let plan = w.stdout(&["retention", "plan", "pg"]);
    assert!(plan.contains("no partitions"), "{plan}");
    w.stdout(&["run-job", "pg.retention.r"]);
    assert_eq!(pg.sql("SELECT count(*) FROM m"), "4");
    // Row by row, the two expired rows go and the gap row stays.
    pg_config(
        &w,
        &pg,
        &rule("m", "ts", &older, "column-timezone = \"America/New_York\""),
    );
    w.stdout(&["run-job", "pg.retention.r"]);
    assert_eq!(
        pg.sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM m"),
        "2,4"
    );
}

/// `where` cannot close the bracket dbkeeper puts around it and OR the expiry away.
#[test]
fn a_where_that_escapes_its_brackets_is_a_config_error() {
    let w = Workdir::new();
    let db = w.path().join("app.db");
    sqlite(
        &db,
        "CREATE TABLE ev (id INTEGER PRIMARY KEY, k TEXT, ts TEXT);
         INSERT INTO ev VALUES (1, 'a', datetime('now')), (2, 'b', datetime('now')), (3, 'a', datetime('now', '-40 days'));",
    );
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"lite\"\nurl = \"sqlite://{}\"\n{}",
            db.display(),
            rule("ev", "ts", "30d", "where = \"k = 'a') OR (k = 'b'\"")
        ),
    );
    for cmd in [
        &["check"][..],
        &["run-job", "lite.retention.r"],
        &["retention", "plan", "lite"],
    ] {
        w.cmd(cmd)
            .assert()
            .code(2)
            .stderr(predicate::str::contains("where").and(predicate::str::contains("parenthesis")));
    }
    assert_eq!(sqlite(&db, "SELECT count(*) FROM ev").trim(), "3");
}

/// Every deleted row is in the archive, infinite reals included.
#[test]
fn infinite_reals_are_archived_as_infinity_not_null() {
    let w = Workdir::new();
    let db = w.path().join("app.db");
    sqlite(
        &db,
        "CREATE TABLE ev (id INTEGER PRIMARY KEY, ts TEXT, v REAL);
         INSERT INTO ev VALUES (1, datetime('now', '-40 days'), 9e999), (2, datetime('now', '-40 days'), -9e999), (3, datetime('now', '-40 days'), NULL);",
    );
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"lite\"\nurl = \"sqlite://{}\"\n[database.backup]\nschedule = \"manual\"\n\
             destination = \"{}\"\nencryption = \"none\"\n{}",
            db.display(),
            w.path().join("backups").display(),
            rule("ev", "ts", "30d", "archive = true")
        ),
    );
    w.stdout(&["run-job", "lite.retention.r"]);
    let rows = w.archived_rows("backups/lite/retention/r");
    let v = |id: i64| rows.iter().find(|r| r["id"] == id).expect("archived")["v"].clone();
    assert_eq!(v(1), serde_json::json!({ "real": "Infinity" }));
    assert_eq!(v(2), serde_json::json!({ "real": "-Infinity" }));
    assert_eq!(v(3), serde_json::Value::Null);
}

/// Every row id alias shadowed and a primary key that may hold NULLs: the rows cannot
/// all be addressed, so the rule is refused instead of deleting some and saying
/// nothing of the rest.
#[test]
fn rows_that_cannot_be_addressed_are_refused_up_front() {
    let w = Workdir::new();
    let db = w.path().join("app.db");
    sqlite(
        &db,
        "CREATE TABLE ev (rowid INT, _rowid_ INT, oid INT, k TEXT PRIMARY KEY, ts TEXT);
         INSERT INTO ev VALUES (1, 1, 1, NULL, datetime('now', '-40 days')), (1, 1, 1, NULL, datetime('now', '-40 days')), (1, 1, 1, 'x', datetime('now', '-40 days'));",
    );
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"lite\"\nurl = \"sqlite://{}\"\n{}",
            db.display(),
            rule("ev", "ts", "30d", "")
        ),
    );
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stdout(predicate::str::contains("NOT NULL"));
    w.cmd(&["run-job", "lite.retention.r"]).assert().code(1);
    assert_eq!(sqlite(&db, "SELECT count(*) FROM ev").trim(), "3");
}

/// Two rules on one table keep metric series of their own.
#[test]
fn two_rules_on_one_table_have_their_own_series() {
    let w = Workdir::new();
    let db = w.path().join("app.db");
    sqlite(
        &db,
        "CREATE TABLE ev (id INTEGER PRIMARY KEY, k TEXT, ts TEXT);",
    );
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"lite\"\nurl = \"sqlite://{}\"\n\
             [[database.retention]]\ntable = \"ev\"\nname = \"debug\"\ncolumn = \"ts\"\nolder-than = \"7d\"\nwhere = \"k = 'debug'\"\nschedule = \"manual\"\n\
             [[database.retention]]\ntable = \"ev\"\nname = \"info\"\ncolumn = \"ts\"\nolder-than = \"30d\"\nwhere = \"k = 'info'\"\nschedule = \"manual\"\n",
            db.display()
        ),
    );
    let d = w.start();
    // `/healthz` answers before the jobs are published: wait for the series.
    d.wait_for(
        "the retention series",
        std::time::Duration::from_secs(20),
        || {
            d.metric(
                "dbkeeper_retention_max_age_seconds",
                &["table=\"ev\"", "rule=\"info\""],
            )
            .is_some()
        },
    );
    for (rule, days) in [("debug", 7.0), ("info", 30.0)] {
        let label = format!("rule=\"{rule}\"");
        assert_eq!(
            d.metric(
                "dbkeeper_retention_max_age_seconds",
                &["table=\"ev\"", label.as_str()]
            ),
            Some(days * 86_400.0)
        );
    }
}

/// `where` may name the table; on an inheritance hierarchy the children answer to the
/// same name, so plan, check and run agree.
#[test]
fn a_where_that_names_the_table_works_on_every_child() {
    let pg = PgDb::new("wname");
    pg.sql(
        "CREATE TABLE w2 (id int, k text, ts timestamptz);
         CREATE TABLE w2_c () INHERITS (w2);
         INSERT INTO w2 VALUES (1, 'a', now() - interval '40 days'), (2, 'b', now() - interval '40 days');
         INSERT INTO w2_c VALUES (3, 'a', now() - interval '40 days'), (4, 'a', now());",
    );
    let w = Workdir::new();
    pg_config(&w, &pg, &rule("w2", "ts", "30d", "where = \"w2.k = 'a'\""));
    w.stdout(&["check"]);
    let plan = w.stdout(&["retention", "plan", "pg"]);
    assert!(plan.contains("2 rows"), "{plan}");
    w.stdout(&["run-job", "pg.retention.r"]);
    assert_eq!(
        pg.sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM w2"),
        "2,4"
    );

    // A where naming something else fails check, before any run.
    pg_config(
        &w,
        &pg,
        &rule("w2", "ts", "30d", "where = \"nosuch.k = 'a'\""),
    );
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stdout(predicate::str::contains("where"));
}

/// `check` refuses a partition-mode rule on a table partitioned by another column.
#[test]
fn check_refuses_a_partition_rule_it_could_not_run() {
    let pg = PgDb::new("pkey");
    pg.sql(
        "CREATE TABLE m (id int, k int, ts timestamptz) PARTITION BY RANGE (k);
         CREATE TABLE m_1 PARTITION OF m FOR VALUES FROM (0) TO (10);",
    );
    let w = Workdir::new();
    pg_config(
        &w,
        &pg,
        &rule("m", "ts", "30d", "mode = \"drop-partitions\""),
    );
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stdout(predicate::str::contains("RANGE on the retention column"));
}

/// The last second of year 9999 is still a time; `older-than` stops at 1000 years.
#[test]
fn range_edges() {
    let pg = PgDb::new("edges");
    pg.sql("CREATE TABLE ev (id int, ts numeric); INSERT INTO ev VALUES (1, 253402300799.5), (2, 253402300800);");
    let w = Workdir::new();
    pg_config(&w, &pg, &rule("ev", "ts", "30d", ""));
    let plan = w.stdout(&["retention", "plan", "pg"]);
    let row = plan
        .lines()
        .find(|l| l.contains("pg.retention.r"))
        .expect("row");
    assert!(
        row.contains("0 rows") && row.contains(" 1 "),
        "one unreadable: {row}"
    );

    pg_config(&w, &pg, &rule("ev", "ts", "1001y", ""));
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("older-than").and(predicate::str::contains("1s")));
    pg_config(&w, &pg, &rule("ev", "ts", "1000y", ""));
    w.cmd(&["check"]).assert().success();
}

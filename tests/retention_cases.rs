//! The reproductions of issue 10, one test each, run by the real binary against real
//! SQLite files and PostgreSQL: ordinary schemas on which retention used to delete rows
//! it had to keep.

mod common;

use common::{sqlite, PgDb, Workdir};
use predicates::prelude::*;

fn lite_rule(w: &Workdir, db: &std::path::Path, table: &str, extra: &str, db_extra: &str) {
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"lite\"\nurl = \"sqlite://{}\"\n{db_extra}\n\
             [[database.retention]]\ntable = \"{table}\"\nname = \"r\"\ncolumn = \"created_at\"\n\
             older-than = \"30d\"\nschedule = \"manual\"\n{extra}\n",
            db.display()
        ),
    );
}

fn pg_rule(w: &Workdir, db: &PgDb, table: &str, extra: &str) {
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"pg\"\nurl = \"{}\"\n\
             [[database.retention]]\ntable = \"{table}\"\nname = \"r\"\ncolumn = \"created_at\"\n\
             older-than = \"30d\"\nschedule = \"manual\"\n{extra}\n",
            db.url
        ),
    );
}

fn count(db: &std::path::Path, sql: &str) -> u64 {
    sqlite(db, sql).trim().parse().expect("a count")
}

/// Case 1: `DATETIME DEFAULT (unixepoch())` and julian-day reals: fresh rows stay.
#[test]
fn sqlite_unix_seconds_and_julian_days_in_a_datetime_column() {
    let w = Workdir::new();
    let db = w.path().join("app.db");
    sqlite(
        &db,
        "CREATE TABLE events (id INTEGER PRIMARY KEY, created_at DATETIME DEFAULT (strftime('%s','now')));
         INSERT INTO events (id) VALUES (1);
         INSERT INTO events (id, created_at) VALUES (2, CAST(strftime('%s','now','-40 days') AS INTEGER));
         INSERT INTO events (id, created_at) VALUES (3, julianday('now'));
         INSERT INTO events (id, created_at) VALUES (4, julianday('now', '-40 days'));",
    );
    assert_eq!(
        sqlite(&db, "SELECT typeof(created_at) FROM events WHERE id = 1").trim(),
        "integer"
    );
    lite_rule(&w, &db, "events", "", "");
    w.cmd(&["retention", "plan", "lite"])
        .assert()
        .success()
        .stdout(predicate::str::contains("2 rows"));
    w.stdout(&["run-job", "lite.retention.r"]);
    assert_eq!(
        sqlite(&db, "SELECT group_concat(id) FROM events").trim(),
        "1,3"
    );
}

/// Case 2: ISO-8601 text with T, Z, fractions and offsets is read as SQLite reads it; an
/// unparseable value is kept, counted and shown by the plan.
#[test]
fn sqlite_text_timestamps_in_every_iso_form_and_garbage() {
    let w = Workdir::new();
    let db = w.path().join("app.db");
    // Near the cutoff, on both sides, written so that comparing text would be wrong:
    // a fresh row with offset -05:00 sorts below the cutoff, an expired one with
    // +05:00 sorts above it.
    sqlite(
        &db,
        "CREATE TABLE events (id INTEGER PRIMARY KEY, created_at TEXT);
         INSERT INTO events VALUES
           (1, strftime('%Y-%m-%dT%H:%M:%S-05:00', 'now', '-30 days', '+2 hours', '-5 hours')),
           (2, strftime('%Y-%m-%dT%H:%M:%S+05:00', 'now', '-30 days', '-2 hours', '+5 hours')),
           (3, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-29 days')),
           (4, strftime('%Y-%m-%d %H:%M:%f', 'now', '-31 days') || '123'),
           (5, '11/22/2026 02:28'),
           (6, strftime('%Y-%m-%d', 'now', '-400 days')),
           (7, NULL);",
    );
    lite_rule(&w, &db, "events", "", "");
    let plan = w.stdout(&["retention", "plan", "lite"]);
    assert!(plan.contains("3 rows"), "{plan}");
    // One unreadable value, and the oldest row is 400 days old, not "0m".
    assert!(plan.contains(" 1 "), "{plan}");
    assert!(plan.contains("400d"), "{plan}");
    let out = w.stdout(&["run-job", "lite.retention.r"]);
    assert!(
        out.contains("1 rows with an unreadable created_at left alone"),
        "{out}"
    );
    assert_eq!(
        sqlite(&db, "SELECT group_concat(id) FROM events").trim(),
        "1,3,5,7"
    );
}

/// Case 3: `timestamp without time zone` in a database whose TimeZone is New York: local
/// wall-clock values are not hours older than they are.
#[test]
fn postgres_timestamp_in_a_non_utc_database() {
    let pg = PgDb::new("tz");
    pg.sql(&format!(
        "ALTER DATABASE {} SET timezone TO 'America/New_York'",
        pg.name
    ));
    pg.sql(
        "CREATE TABLE events (id int, created_at timestamp DEFAULT now());
         INSERT INTO events (id) VALUES (1);
         INSERT INTO events (id, created_at) VALUES (2, now() - interval '4 hours');",
    );
    let w = Workdir::new();
    pg_rule(&w, &pg, "events", "");
    let cfg = std::fs::read_to_string(w.config_path()).expect("config");
    std::fs::write(
        w.config_path(),
        cfg.replace("older-than = \"30d\"", "older-than = \"3h\""),
    )
    .expect("write");
    w.cmd(&["check"])
        .assert()
        .stdout(predicate::str::contains("timestamp in America/New_York"));
    w.stdout(&["run-job", "pg.retention.r"]);
    assert_eq!(pg.sql("SELECT string_agg(id::text, ',') FROM events"), "1");

    // The application writes India's wall clock into a UTC database: column-timezone.
    let pg = PgDb::new("coltz");
    pg.sql(
        "CREATE TABLE events (id int, created_at timestamp);
         INSERT INTO events VALUES (1, now() AT TIME ZONE 'Asia/Kolkata'),
                                   (2, (now() - interval '4 hours') AT TIME ZONE 'Asia/Kolkata');",
    );
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"pg\"\nurl = \"{}\"\n[[database.retention]]\ntable = \"events\"\n\
             name = \"r\"\ncolumn = \"created_at\"\nolder-than = \"3h\"\ncolumn-timezone = \"Asia/Kolkata\"\nschedule = \"manual\"\n",
            pg.url
        ),
    );
    w.stdout(&["run-job", "pg.retention.r"]);
    assert_eq!(pg.sql("SELECT string_agg(id::text, ',') FROM events"), "1");
}

/// Case 4: Inheritance children share ctids with their parent: each table is addressed on
/// its own, so an unexpired child row at the same ctid as an expired parent row stays.
#[test]
fn postgres_inheritance_children_are_deleted_per_table() {
    let pg = PgDb::new("inherit");
    pg.sql(
        "CREATE TABLE events (id int, created_at timestamptz);
         CREATE TABLE events_2026 () INHERITS (events);
         INSERT INTO events VALUES (1, now() - interval '40 days'), (2, now());
         INSERT INTO events_2026 VALUES (3, now()), (4, now() - interval '40 days');",
    );
    assert_eq!(
        pg.sql("SELECT count(DISTINCT ctid) FROM events"),
        "2",
        "parent and child rows share ctids"
    );
    let w = Workdir::new();
    pg_rule(&w, &pg, "events", "");
    w.cmd(&["retention", "plan", "pg"])
        .assert()
        .success()
        .stdout(predicate::str::contains("2 rows"));
    w.stdout(&["run-job", "pg.retention.r"]);
    assert_eq!(
        pg.sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM events"),
        "2,3"
    );
}

/// Case 5: Foreign keys: SQLite connections keep the application's setting (off), and a
/// rule whose deletes would cascade is refused unless it says cascade = true.
#[test]
fn foreign_key_cascades_are_never_silent() {
    let w = Workdir::new();
    let db = w.path().join("app.db");
    sqlite(
        &db,
        "CREATE TABLE users (id INTEGER PRIMARY KEY, created_at TEXT);
         CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users(id) ON DELETE CASCADE);
         INSERT INTO users VALUES (1, datetime('now', '-40 days')), (2, datetime('now'));
         INSERT INTO orders VALUES (10, 1), (11, 1), (12, 2);",
    );
    // The application never turns foreign keys on: neither does dbkeeper.
    lite_rule(&w, &db, "users", "", "");
    w.stdout(&["run-job", "lite.retention.r"]);
    assert_eq!(count(&db, "SELECT count(*) FROM orders"), 3, "no cascade");
    assert_eq!(count(&db, "SELECT count(*) FROM users"), 1);

    // An application that enforces them: the rule is refused, naming the child.
    sqlite(&db, "INSERT INTO users VALUES (3, datetime('now', '-40 days')); INSERT INTO orders VALUES (13, 3);");
    lite_rule(&w, &db, "users", "", "foreign-keys = true");
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stdout(predicate::str::contains("orders").and(predicate::str::contains("cascade = true")));
    w.cmd(&["run-job", "lite.retention.r"]).assert().code(1);
    assert_eq!(count(&db, "SELECT count(*) FROM orders"), 4);
    // Said on purpose: the cascade happens.
    lite_rule(&w, &db, "users", "cascade = true", "foreign-keys = true");
    w.stdout(&["run-job", "lite.retention.r"]);
    assert_eq!(
        count(&db, "SELECT group_concat(id) FROM orders WHERE id >= 12"),
        12
    );
    // cascade with archive is refused at load: cascaded rows would not be archived.
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"lite\"\nurl = \"sqlite://{}\"\n[database.backup]\nschedule = \"manual\"\n\
             destination = \"{}\"\nencryption = \"none\"\n\
             [[database.retention]]\ntable = \"users\"\ncolumn = \"created_at\"\nolder-than = \"30d\"\n\
             cascade = true\narchive = true\nschedule = \"manual\"\n",
            db.display(),
            w.path().join("backups").display()
        ),
    );
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("cascade"));

    // PostgreSQL: the same refusal.
    let pg = PgDb::new("fk");
    pg.sql(
        "CREATE TABLE users (id int PRIMARY KEY, created_at timestamptz);
         CREATE TABLE orders (id int, user_id int REFERENCES users(id) ON DELETE SET NULL);
         INSERT INTO users VALUES (1, now() - interval '40 days');
         INSERT INTO orders VALUES (10, 1);",
    );
    pg_rule(&w, &pg, "users", "");
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stdout(predicate::str::contains("orders"));
    w.cmd(&["run-job", "pg.retention.r"]).assert().code(1);
    assert_eq!(pg.sql("SELECT count(*) FROM orders WHERE user_id = 1"), "1");
}

/// Case 6: A user column named `rowid` does not redirect the deletes.
#[test]
fn a_column_named_rowid_does_not_shadow_the_row_id() {
    let w = Workdir::new();
    let db = w.path().join("app.db");
    sqlite(
        &db,
        "CREATE TABLE events (rowid INTEGER, created_at TEXT);
         INSERT INTO events VALUES (7, datetime('now', '-40 days'));
         INSERT INTO events VALUES (7, datetime('now'));
         INSERT INTO events VALUES (7, datetime('now'));",
    );
    lite_rule(&w, &db, "events", "", "");
    w.cmd(&["retention", "plan", "lite"])
        .assert()
        .success()
        .stdout(predicate::str::contains("1 rows"));
    let out = w.stdout(&["run-job", "lite.retention.r"]);
    assert!(out.contains("deleted 1 rows"), "{out}");
    assert_eq!(count(&db, "SELECT count(*) FROM events"), 2);
}

/// Case 9: Bounds, epoch milliseconds, and BLOBs in archives.
#[test]
fn bounds_epoch_milliseconds_and_blob_archives() {
    let w = Workdir::new();
    let db = w.path().join("app.db");
    sqlite(
        &db,
        "CREATE TABLE events (id INTEGER PRIMARY KEY, created_at TEXT, payload BLOB);",
    );
    lite_rule(&w, &db, "events", "", "");
    let cfg = std::fs::read_to_string(w.config_path()).expect("config");
    // A huge older-than is a config error, not a panic.
    std::fs::write(
        w.config_path(),
        cfg.replace("older-than = \"30d\"", "older-than = \"300000000y\""),
    )
    .expect("write");
    w.cmd(&["retention", "plan", "lite"])
        .assert()
        .code(2)
        .stderr(
            predicate::str::contains("older-than").and(predicate::str::contains("out of range")),
        );
    // A keep count that would overflow is refused, not wrapped to "keeps nothing".
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"lite\"\nurl = \"sqlite://{}\"\n[database.backup]\nschedule = \"manual\"\n\
             destination = \"/tmp\"\nencryption = \"none\"\nkeep = {{ last = 4294967295, daily = 1 }}\n",
            db.display()
        ),
    );
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("keep.last"));

    // BIGINT epoch milliseconds: cleaned with epoch-unit = "ms"; without it, counted
    // as unreadable (not a date in seconds) and never deleted.
    let pg = PgDb::new("epochms");
    pg.sql(
        "CREATE TABLE events (id int, created_at bigint);
         INSERT INTO events VALUES (1, (extract(epoch FROM now()) * 1000)::bigint),
                                   (2, (extract(epoch FROM now() - interval '40 days') * 1000)::bigint);",
    );
    pg_rule(&w, &pg, "events", "");
    let plan = w.stdout(&["retention", "plan", "pg"]);
    assert!(plan.contains("0 rows") && plan.contains(" 2 "), "{plan}");
    w.stdout(&["run-job", "pg.retention.r"]);
    assert_eq!(pg.sql("SELECT count(*) FROM events"), "2");
    pg_rule(&w, &pg, "events", "epoch-unit = \"ms\"");
    let plan = w.stdout(&["retention", "plan", "pg"]);
    assert!(plan.contains("1 rows") && plan.contains("40d"), "{plan}");
    w.stdout(&["run-job", "pg.retention.r"]);
    assert_eq!(pg.sql("SELECT string_agg(id::text, ',') FROM events"), "1");

    // BLOB columns archive as base64.
    sqlite(
        &db,
        "INSERT INTO events VALUES (1, datetime('now', '-40 days'), x'00ff10'), (2, datetime('now'), x'01');",
    );
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"lite\"\nurl = \"sqlite://{}\"\n[database.backup]\nschedule = \"manual\"\n\
             destination = \"{}\"\nencryption = \"none\"\n\
             [[database.retention]]\ntable = \"events\"\nname = \"r\"\ncolumn = \"created_at\"\nolder-than = \"30d\"\n\
             archive = true\nschedule = \"manual\"\n",
            db.display(),
            w.path().join("backups").display()
        ),
    );
    w.stdout(&["run-job", "lite.retention.r"]);
    let rows = w.archived_rows("backups/lite/retention/r");
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row["id"], 1);
    assert_eq!(row["payload"]["base64"], "AP8Q");
}

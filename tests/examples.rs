//! The runbook examples in `config/examples/`, run end to end with the real binary:
//! each file is used as shipped, with only its machine paths, port and URL pointed at
//! a temporary directory (and, for PostgreSQL, a fresh database). Every job it
//! defines runs once, by hand, and does what the file's comments say it replaces.

mod common;

use std::path::{Path, PathBuf};

use common::{archives, backup_ids, psql, sqlite, write_file, write_script, PgDb, Workdir};
use predicates::prelude::*;

const FAKE_ALEMBIC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/fake_alembic.py"
);

/// The example `name`, with its machine paths and port replaced.
fn example(w: &Workdir, name: &str, replace: &[(&str, String)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/examples")
        .join(name);
    let mut text = std::fs::read_to_string(&path).expect("example config");
    let root = w.path().display().to_string();
    let mut all = vec![
        ("/var/lib/dbkeeper", format!("{root}/state")),
        ("/var/backups", format!("{root}/backups")),
        ("127.0.0.1:9736", format!("127.0.0.1:{}", w.port)),
    ];
    all.extend(replace.iter().cloned());
    for (from, to) in all {
        assert!(text.contains(from), "{name} mentions {from}");
        text = text.replace(from, &to);
    }
    std::fs::write(w.config_path(), &text).expect("write config");
    text
}

/// `$CREDENTIALS_DIRECTORY` with a fresh backup key (and `extra` credentials).
fn credentials(w: &Workdir, extra: &[(&str, &str)]) -> PathBuf {
    let dir = w.path().join("credentials");
    std::fs::create_dir_all(&dir).expect("mkdir");
    assert_cmd::Command::new(common::BIN)
        .args(["key", "generate", "-o"])
        .arg(dir.join("backup-key"))
        .assert()
        .success();
    for (name, text) in extra {
        let file = write_file(&dir, name, text);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    dir
}

/// `dbkeeper <args>` with the example's environment; asserts success, returns stdout.
fn ok(w: &Workdir, env: &[(&str, String)], args: &[&str]) -> String {
    let mut cmd = w.cmd(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.assert().success().get_output().stdout.clone();
    String::from_utf8_lossy(&out).into_owned()
}

/// The SQLite app: nightly backup keeping ten, the app's own Python migration script
/// behind a verified backup, session retention, a cache-growth gauge, table stats.
#[test]
fn sqlite_app_example_end_to_end() {
    let w = Workdir::new();
    let app = w.path().join("app");
    let db = app.join("data/app.db");
    std::fs::create_dir_all(db.parent().expect("parent")).expect("mkdir");
    sqlite(
        &db,
        "PRAGMA journal_mode=WAL;
         CREATE TABLE cache (key TEXT PRIMARY KEY, kind TEXT NOT NULL, value BLOB);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30)
           INSERT INTO cache SELECT 'k' || i, CASE WHEN i % 3 = 0 THEN 'page' ELSE 'query' END, randomblob(100) FROM n;
         CREATE TABLE sessions (id INTEGER PRIMARY KEY, last_seen TEXT NOT NULL);
         INSERT INTO sessions (last_seen) VALUES (datetime('now', '-40 days')), (datetime('now', '-31 days')), (datetime('now', '-29 days')), (datetime('now'));",
    );
    // The application's migration script: PRAGMA user_version is its history.
    write_file(
        &app.join("scripts"),
        "migrate.py",
        r#"import os, sqlite3, sys
MIGRATIONS = [
    "ALTER TABLE cache ADD COLUMN hits INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX cache_kind ON cache (kind)",
]
conn = sqlite3.connect(os.environ["DBKEEPER_DATABASE_PATH"], isolation_level=None)
version = conn.execute("PRAGMA user_version").fetchone()[0]
if sys.argv[1:] == ["--check"]:
    print("schema version %d of %d" % (version, len(MIGRATIONS)))
    sys.exit(0 if version >= len(MIGRATIONS) else 1)
for i in range(version, len(MIGRATIONS)):
    conn.execute("BEGIN")
    conn.execute(MIGRATIONS[i])
    conn.execute("PRAGMA user_version = %d" % (i + 1))
    conn.execute("COMMIT")
    print("applied migration %d" % (i + 1))
"#,
    );
    example(
        &w,
        "sqlite-app.toml",
        &[("/srv/app", app.display().to_string())],
    );
    let creds = credentials(&w, &[]);
    let env = [("CREDENTIALS_DIRECTORY", creds.display().to_string())];

    ok(&w, &env, &["check"]);
    let status = ok(&w, &env, &["migrate", "status", "app"]);
    assert!(
        status.contains("schema version 0 of 2") && status.contains("pending"),
        "{status}"
    );
    ok(&w, &env, &["migrate", "apply", "app"]);
    assert_eq!(sqlite(&db, "PRAGMA user_version").trim(), "2");
    let status = ok(&w, &env, &["migrate", "status", "app"]);
    assert!(status.contains("up to date"), "{status}");
    let backups = w.path().join("backups/app");
    let pre: Vec<_> = archives(&backups, "app");
    assert_eq!(pre.len(), 1, "the verified pre-migration backup: {pre:?}");

    // Sessions last seen more than 30 days ago go; the others stay.
    ok(&w, &env, &["run-job", "app.retention.sessions"]);
    assert_eq!(sqlite(&db, "SELECT count(*) FROM sessions").trim(), "2");

    ok(&w, &env, &["run-job", "app.backup"]);
    assert_eq!(archives(&backups, "app").len(), 2);
    let restored = w.path().join("restored.db");
    ok(
        &w,
        &env,
        &["restore", "app", "--to", restored.to_str().expect("utf-8")],
    );
    assert_eq!(sqlite(&restored, "SELECT count(*) FROM cache").trim(), "30");
    assert_eq!(sqlite(&restored, "PRAGMA user_version").trim(), "2");

    // The gauge and the table stats, by hand and on a running daemon (which runs
    // them at start: their values live in its memory only).
    ok(&w, &env, &["run-job", "app.gauge.cache-entries"]);
    ok(&w, &env, &["run-job", "app.table-stats"]);
    let d = w.start_with_env(&[("CREDENTIALS_DIRECTORY", creds.to_str().expect("utf-8"))]);
    let labels = ["gauge=\"cache-entries\"", "kind=\"page\""];
    d.wait_for(
        "the gauge's first run",
        std::time::Duration::from_secs(30),
        || d.metric("dbkeeper_query_value", &labels).is_some(),
    );
    assert_eq!(d.metric("dbkeeper_query_value", &labels), Some(10.0));
    assert_eq!(
        d.metric(
            "dbkeeper_query_value",
            &["gauge=\"cache-entries\"", "kind=\"query\""]
        ),
        Some(20.0)
    );
    d.wait_for("table stats", std::time::Duration::from_secs(30), || {
        d.metric("dbkeeper_table_rows", &["table=\"sessions\""]) == Some(2.0)
    });
}

/// The PostgreSQL app: daily encrypted backup with the storage folder under the same
/// id, weekly audit retention, the hourly analytics function, a materialized view,
/// Alembic migrations tried on a copy first, an admissions gauge, table stats.
#[test]
fn postgres_app_example_end_to_end() {
    let w = Workdir::new();
    let pg = PgDb::new("wards");
    pg.sql(
        "CREATE TABLE wards (id int PRIMARY KEY, name text NOT NULL);
         INSERT INTO wards VALUES (1, 'North'), (2, 'South');
         CREATE TABLE admissions (id serial PRIMARY KEY, ward int REFERENCES wards, status text NOT NULL);
         INSERT INTO admissions (ward, status) SELECT 1 + i % 2, CASE WHEN i % 4 = 0 THEN 'discharged' ELSE 'admitted' END FROM generate_series(1, 40) i;
         CREATE TABLE audit_log (id serial PRIMARY KEY, created_at timestamptz NOT NULL, what text);
         INSERT INTO audit_log (created_at, what) VALUES (now() - interval '120 days', 'old'), (now() - interval '91 days', 'old'), (now() - interval '89 days', 'kept'), (now(), 'kept');
         CREATE TABLE ward_analytics (at timestamptz NOT NULL, admitted bigint NOT NULL);
         CREATE FUNCTION refresh_ward_analytics() RETURNS void LANGUAGE sql AS
           $$ INSERT INTO ward_analytics SELECT now(), count(*) FROM admissions WHERE status = 'admitted' $$;
         CREATE MATERIALIZED VIEW ward_occupancy AS
           SELECT ward, count(*) AS patients FROM admissions WHERE status = 'admitted' GROUP BY ward;
         CREATE UNIQUE INDEX ON ward_occupancy (ward);",
    );
    let wards = w.path().join("wards");
    write_file(
        &wards.join("versions"),
        "0001.sql",
        "CREATE TABLE beds (id serial PRIMARY KEY, ward int REFERENCES wards)",
    );
    write_file(
        &wards.join("versions"),
        "0002.sql",
        "ALTER TABLE admissions ADD COLUMN bed int",
    );
    let storage = wards.join("storage");
    write_file(&storage.join("uploads/2026"), "scan-1.pdf", "%PDF scan one");
    write_file(&storage.join("cache"), "thumb.png", "cached");
    write_file(&storage, "upload.tmp", "partial");
    // `alembic` on the service's PATH: the fake one.
    let bin = w.path().join("bin");
    write_script(
        &bin,
        "alembic",
        &format!("#!/bin/sh\nexec python3 {FAKE_ALEMBIC} \"$@\"\n"),
    );
    let record = w.path().join("alembic-runs.jsonl");
    example(
        &w,
        "postgres-app.toml",
        &[
            ("/opt/wards", wards.display().to_string()),
            ("postgres://wards@127.0.0.1:5432/wards", pg.url.clone()),
        ],
    );
    let creds = credentials(&w, &[("wards-db", "unused-with-trust-auth\n")]);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let env = [
        ("CREDENTIALS_DIRECTORY", creds.display().to_string()),
        ("PATH", path.clone()),
        ("FAKE_RECORD", record.display().to_string()),
    ];

    ok(&w, &env, &["check"]);
    let status = ok(&w, &env, &["migrate", "status", "wards"]);
    assert!(status.contains("pending"), "{status}");
    let plan = ok(&w, &env, &["migrate", "plan", "wards"]);
    assert!(
        plan.contains("CREATE TABLE beds") && plan.contains("ADD COLUMN bed"),
        "{plan}"
    );
    ok(&w, &env, &["migrate", "apply", "wards"]);
    assert_eq!(
        pg.sql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'admissions' AND column_name = 'bed'"),
        "1"
    );
    // dry-run-on-copy: the upgrade ran on a scratch copy first, then on the database.
    let runs = std::fs::read_to_string(&record).expect("alembic runs");
    let upgrades: Vec<&str> = runs
        .lines()
        .filter(|l| l.contains("\"upgrade\"") && !l.contains("--sql"))
        .collect();
    assert_eq!(upgrades.len(), 2, "{runs}");
    assert!(!upgrades[0].contains(&format!("/{}\"", pg.name)), "{runs}");
    assert!(upgrades[1].contains(&format!("/{}\"", pg.name)), "{runs}");
    let status = ok(&w, &env, &["migrate", "status", "wards"]);
    assert!(status.contains("up to date"), "{status}");

    // The pre-migration backup took the storage folder under the same id.
    let backups = w.path().join("backups/wards");
    let db_ids = backup_ids(&backups, "wards");
    let files_ids = backup_ids(&backups, "storage");
    assert_eq!(db_ids.len(), 1, "{db_ids:?}");
    assert_eq!(db_ids, files_ids);

    ok(&w, &env, &["run-job", "wards.retention.audit_log"]);
    assert_eq!(
        pg.sql("SELECT string_agg(what, ',' ORDER BY id) FROM audit_log"),
        "kept,kept"
    );
    ok(&w, &env, &["run-job", "wards.sql.ward-analytics"]);
    assert_eq!(pg.sql("SELECT admitted FROM ward_analytics"), "30");
    pg.sql("UPDATE admissions SET status = 'discharged' WHERE id <= 10");
    ok(&w, &env, &["run-job", "wards.refresh.ward_occupancy"]);
    assert_eq!(pg.sql("SELECT sum(patients) FROM ward_occupancy"), "22");
    ok(&w, &env, &["run-job", "wards.gauge.admissions"]);
    ok(&w, &env, &["run-job", "wards.table-stats"]);

    ok(&w, &env, &["run-job", "wards.backup"]);
    let list = ok(&w, &env, &["backup", "list"]);
    assert!(list.contains("WITH FILES"), "{list}");
    let db_ids = backup_ids(&backups, "wards");
    assert_eq!(db_ids.len(), 2);
    assert_eq!(db_ids, backup_ids(&backups, "storage"));

    // A rollback restores the matching pre-migration pair: the database into a new
    // one, the folder into an empty directory (cache and temporary files were never
    // taken).
    let target = PgDb::unused("wards_restored");
    ok(
        &w,
        &env,
        &[
            "restore",
            "wards",
            "--backup",
            &db_ids[0],
            "--to",
            &target.url,
            "--create",
        ],
    );
    // The pre-migration state: no `beds`, every admission.
    assert_eq!(
        psql(
            &target.url,
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'beds'"
        ),
        "0"
    );
    assert_eq!(psql(&target.url, "SELECT count(*) FROM admissions"), "40");
    let folder = w.path().join("storage-restored");
    ok(
        &w,
        &env,
        &[
            "restore",
            "storage",
            "--backup",
            &db_ids[0],
            "--to",
            folder.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(folder.join("uploads/2026/scan-1.pdf")).expect("restored"),
        "%PDF scan one"
    );
    assert!(!folder.join("cache/thumb.png").exists());
    assert!(!folder.join("upload.tmp").exists());

    // Unknown keys in a copy of the example are refused as in any config.
    let text = std::fs::read_to_string(w.config_path()).expect("config");
    std::fs::write(
        w.config_path(),
        text.replace("dry-run-on-copy = true", "dry-run-on-a-copy = true"),
    )
    .expect("write");
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("dry-run-on-a-copy"));
}

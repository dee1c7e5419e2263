//! Migrations with the real binary against real PostgreSQL and SQLite, checked against
//! sqlx's own `Migrator`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{psql, PgDb, Workdir, BIN};
use predicates::prelude::*;

fn write(dir: &Path, name: &str, sql: &str) {
    common::write_file(dir, name, sql);
}

fn migrate_config(url: &str, dir: &Path, extra: &str) -> String {
    format!(
        "[[database]]\nname = \"db\"\nurl = \"{url}\"\n[database.migrate]\ndir = \"{}\"\nschedule = \"manual\"\n{extra}\n",
        dir.display()
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// sqlx's own migrator, as an application embedding it would run it (PostgreSQL, or
/// SQLite for a `sqlite:` URL).
fn sqlx_migrate(url: &str, dir: &Path) -> Result<(), sqlx::migrate::MigrateError> {
    use sqlx::Connection;
    runtime().block_on(async {
        let migrator = sqlx::migrate::Migrator::new(dir).await?;
        if url.starts_with("sqlite:") {
            let mut conn = sqlx::SqliteConnection::connect(url).await.expect("connect");
            migrator.run(&mut conn).await
        } else {
            let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
            migrator.run(&mut conn).await
        }
    })
}

/// Runs `CREATE … INDEX CONCURRENTLY` that must fail on duplicate rows, leaving an
/// INVALID index behind as a failed attempt does.
fn leave_invalid_index(pg: &PgDb, create: &str) {
    let out = Command::new("psql")
        .args([&pg.url, "-qAtc", create])
        .output()
        .expect("psql");
    assert!(!out.status.success(), "{create} must fail on duplicates");
}

/// sqlx's own migrator refuses `version` as dirty.
fn assert_sqlx_refuses_dirty(url: &str, dir: &Path, version: i64) {
    match sqlx_migrate(url, dir) {
        Err(sqlx::migrate::MigrateError::Dirty(v)) if v == version => {}
        other => panic!("{url}: sqlx's migrator must refuse version {version} as dirty: {other:?}"),
    }
}

#[test]
fn sqlx_and_dbkeeper_agree_on_what_is_applied() {
    let pg = PgDb::new("mig_sqlx");
    let w = Workdir::new();
    let dir = w.path().join("migrations");
    write(
        &dir,
        "20260101000001_create_users.sql",
        "CREATE TABLE users (id bigserial PRIMARY KEY, email text NOT NULL);",
    );
    write(
        &dir,
        "20260101000002_add_name.up.sql",
        "ALTER TABLE users ADD COLUMN name text;",
    );
    write(
        &dir,
        "20260101000002_add_name.down.sql",
        "ALTER TABLE users DROP COLUMN name;",
    );
    write(
        &dir,
        "20260101000003_seed.sql",
        "INSERT INTO users (email) VALUES ('a@example.com'), ('b@example.com');",
    );
    sqlx_migrate(&pg.url, &dir).expect("sqlx applies the first three");

    w.write_config("", &migrate_config(&pg.url, &dir, "backup-first = false"));
    let status = w.stdout(&["migrate", "status", "db"]);
    assert_eq!(
        status.matches("applied").count(),
        3,
        "sqlx's history is recognised: {status}"
    );
    w.stdout(&["migrate", "apply", "db"])
        .contains("up to date")
        .then_some(())
        .expect("nothing to do");

    write(
        &dir,
        "20260201000004_add_index.sql",
        "-- no-transaction\nCREATE INDEX CONCURRENTLY users_email ON users (email);",
    );
    write(
        &dir,
        "20260201000005_orders.sql",
        "CREATE TABLE orders (id bigserial PRIMARY KEY, user_id bigint REFERENCES users (id));",
    );
    let plan = w.stdout(&["migrate", "plan", "db"]);
    assert!(
        plan.contains(
            "-- migration 20260201000004 (20260201000004_add_index.sql), outside a transaction"
        ),
        "{plan}"
    );
    assert!(plan.contains("CREATE TABLE orders"), "{plan}");
    assert_eq!(
        psql(&pg.url, "SELECT count(*) FROM _sqlx_migrations"),
        "3",
        "plan applies nothing"
    );
    w.cmd(&["migrate", "apply", "db"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "applied 2 migrations (20260201000004, 20260201000005)",
        ));
    // sqlx's migrator afterwards: same checksums, nothing pending, nothing applied twice.
    sqlx_migrate(&pg.url, &dir).expect("sqlx sees no drift and nothing pending");
    assert_eq!(
        psql(
            &pg.url,
            "SELECT count(*) FROM _sqlx_migrations WHERE success"
        ),
        "5"
    );
    assert_eq!(psql(&pg.url, "SELECT count(*) FROM users"), "2");
    assert_eq!(
        psql(
            &pg.url,
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'users_email'::regclass"
        ),
        "t"
    );

    // Drift and a missing file: reported by status and the metric, and block apply.
    write(
        &dir,
        "20260101000003_seed.sql",
        "INSERT INTO users (email) VALUES ('changed@example.com');",
    );
    write(
        &dir,
        "20260301000006_more.sql",
        "CREATE TABLE more (id int);",
    );
    let out = w
        .cmd(&["migrate", "status", "db"])
        .output()
        .expect("status");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("CHECKSUM DRIFT"));
    w.cmd(&["migrate", "apply", "db"]).assert().code(1).stderr(
        predicate::str::contains("20260101000003_seed.sql")
            .and(predicate::str::contains("changed after it was applied")),
    );
    assert_eq!(
        psql(&pg.url, "SELECT to_regclass('more') IS NULL"),
        "t",
        "nothing applied"
    );
    {
        let d = w.start();
        d.wait_for("drift metric", Duration::from_secs(10), || {
            d.metric(
                "dbkeeper_migrations_checksum_mismatch",
                &["database=\"db\""],
            ) == Some(1.0)
                && d.metric("dbkeeper_migrations_pending", &["database=\"db\""]) == Some(1.0)
        });
        assert_eq!(
            d.metric("dbkeeper_migrations_blocked", &["database=\"db\""]),
            Some(1.0),
            "the drift blocks applying"
        );
        assert_eq!(
            d.metric("dbkeeper_migrations_applied_version", &["database=\"db\""]),
            Some(20260201000005.0)
        );
    }
    std::fs::remove_file(dir.join("20260201000005_orders.sql")).expect("rm");
    let out = w
        .cmd(&["migrate", "status", "db"])
        .output()
        .expect("status");
    assert!(String::from_utf8_lossy(&out.stdout).contains("FILE MISSING"));
}

#[test]
fn failing_migration_rolls_back_and_the_pre_migration_backup_restores() {
    let pg = PgDb::new("mig_fail");
    let w = Workdir::new();
    let dir = w.path().join("migrations");
    write(&dir, "1_base.sql", "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL); INSERT INTO accounts VALUES (1, 100), (2, 50);");
    let key = w.key("k");
    let config = migrate_config(&pg.url, &dir, "")
        + &format!(
            "[database.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nencryption-key-file = \"{}\"\n",
            w.path().join("backups").display(),
            key.display()
        );
    w.write_config("", &config);
    w.cmd(&["migrate", "apply", "db"]).assert().success();
    write(&dir, "2_audit.sql", "CREATE TABLE audit (id int); UPDATE accounts SET balance = balance - 60; ALTER TABLE accounts ADD CONSTRAINT positive CHECK (balance >= 0);");
    write(&dir, "3_later.sql", "CREATE TABLE later (id int);");
    w.cmd(&["migrate", "apply", "db"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("2_audit.sql").and(predicate::str::contains("positive")));
    assert_eq!(
        psql(
            &pg.url,
            "SELECT to_regclass('audit') IS NULL AND to_regclass('later') IS NULL"
        ),
        "t"
    );
    assert_eq!(
        psql(
            &pg.url,
            "SELECT string_agg(balance::text, ',' ORDER BY id) FROM accounts"
        ),
        "100,50"
    );
    assert_eq!(
        psql(&pg.url, "SELECT max(version) FROM _sqlx_migrations"),
        "1"
    );
    let history = w.stdout(&["history", "db.migrate", "-n", "1"]);
    assert!(
        history.contains("failure") && history.contains("2_audit.sql"),
        "{history}"
    );
    // The pre-migration backup exists, and restores the pre-migration state.
    let list = w.stdout(&["backup", "list", "db"]);
    let id = list
        .lines()
        .rfind(|l| l.contains("-pre-migration"))
        .and_then(|l| l.split_whitespace().next())
        .expect("a pre-migration backup")
        .to_owned();
    let target = PgDb::unused("mig_restored");
    w.cmd(&[
        "restore",
        "db",
        "--backup",
        &id,
        "--to",
        &target.url,
        "--create",
    ])
    .assert()
    .success();
    assert_eq!(
        psql(
            &target.url,
            "SELECT string_agg(balance::text, ',' ORDER BY id) FROM accounts"
        ),
        "100,50"
    );
    assert_eq!(
        psql(&target.url, "SELECT max(version) FROM _sqlx_migrations"),
        "1"
    );
    // The manifest records the schema version at backup time.
    let manifest = std::fs::read_to_string(w.path().join(format!("backups/db/{id}.manifest.json")))
        .expect("manifest");
    assert!(
        manifest.contains("\"schema_version\": 1")
            && manifest.contains("\"kind\": \"pre-migration\""),
        "{manifest}"
    );
}

#[test]
fn two_processes_at_once_apply_each_migration_exactly_once_even_with_create_index_concurrently() {
    let pg = PgDb::new("mig_race");
    let w = Workdir::new();
    let dir = w.path().join("migrations");
    write(&dir, "1_tables.sql", "CREATE TABLE log (what text); CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 50000);");
    write(
        &dir,
        "2_slow.sql",
        "SELECT pg_sleep(1.5); INSERT INTO log VALUES ('2');",
    );
    write(
        &dir,
        "3_index.sql",
        "-- no-transaction\nCREATE INDEX CONCURRENTLY t_x ON t (x);",
    );
    write(&dir, "4_after.sql", "INSERT INTO log VALUES ('4');");
    w.write_config(
        "",
        &migrate_config(&pg.url, &dir, "backup-first = false\nlock-wait = \"60s\""),
    );
    let spawn = || {
        Command::new(BIN)
            .args(["migrate", "apply", "db", "-c"])
            .arg(w.config_path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let a = spawn();
    std::thread::sleep(Duration::from_millis(300));
    let b = spawn();
    let (a, b) = (
        a.wait_with_output().expect("a"),
        b.wait_with_output().expect("b"),
    );
    for (name, out) in [("a", &a), ("b", &b)] {
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let outputs = format!(
        "{}{}",
        String::from_utf8_lossy(&a.stdout),
        String::from_utf8_lossy(&b.stdout)
    );
    assert!(
        outputs.contains("applied 4 migrations") && outputs.contains("up to date"),
        "{outputs}"
    );
    assert_eq!(
        psql(
            &pg.url,
            "SELECT string_agg(what, ',' ORDER BY what) FROM log"
        ),
        "2,4"
    );
    assert_eq!(psql(&pg.url, "SELECT count(*) FROM _sqlx_migrations"), "4");
    assert_eq!(
        psql(
            &pg.url,
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 't_x'::regclass"
        ),
        "t"
    );
}

#[test]
fn a_failed_concurrent_index_is_reported_and_optionally_dropped_before_retrying() {
    let pg = PgDb::new("mig_invalid");
    let w = Workdir::new();
    let dir = w.path().join("migrations");
    write(
        &dir,
        "1_t.sql",
        "CREATE TABLE t (x int); INSERT INTO t VALUES (1), (1);",
    );
    write(
        &dir,
        "2_unique.sql",
        "-- no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY t_x_unique ON t (x);",
    );
    w.write_config("", &migrate_config(&pg.url, &dir, "backup-first = false"));
    w.cmd(&["migrate", "apply", "db"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "INVALID indexes public.t_x_unique",
        ));
    pg.sql("DELETE FROM t WHERE ctid = (SELECT min(ctid) FROM t)");
    w.write_config(
        "",
        &migrate_config(
            &pg.url,
            &dir,
            "backup-first = false\ndrop-invalid-indexes = true",
        ),
    );
    // The failed no-transaction migration is marked failed: the operator says it may
    // run again by deleting its row.
    w.cmd(&["migrate", "apply", "db"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "DELETE FROM _sqlx_migrations WHERE version = 2",
        ));
    pg.sql("DELETE FROM _sqlx_migrations WHERE version = 2");
    w.cmd(&["migrate", "apply", "db"]).assert().success();
    assert_eq!(
        psql(
            &pg.url,
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 't_x_unique'::regclass"
        ),
        "t"
    );
}

#[test]
fn sqlite_migrations_and_startup_before_ready() {
    let w = Workdir::new();
    let dir = w.path().join("migrations");
    write(
        &dir,
        "1_notes.sql",
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);",
    );
    write(&dir, "2_slow.sql", "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300000) INSERT INTO notes (body) SELECT 'n' FROM n;");
    let db = w.path().join("app.db");
    let url = format!("sqlite://{}?mode=rwc", db.display());
    w.write_config(
        "",
        &migrate_config(&url, &dir, "backup-first = false")
            .replace("schedule = \"manual\"", "schedule = \"@startup\""),
    );
    let sock_path = w.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let d = w.start_with_env(&[("NOTIFY_SOCKET", sock_path.to_str().expect("utf-8"))]);
    let mut buf = [0u8; 4096];
    loop {
        let n = sock.recv(&mut buf).expect("notification");
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "READY=1")
        {
            break;
        }
    }
    // By READY=1 the migrations are in.
    assert_eq!(
        common::sqlite(&db, "SELECT count(*) FROM _sqlx_migrations").trim(),
        "2"
    );
    assert_eq!(
        common::sqlite(&db, "SELECT count(*) FROM notes").trim(),
        "300000"
    );
    assert_eq!(
        d.metric("dbkeeper_migrations_pending", &["database=\"db\""]),
        Some(0.0)
    );
    drop(d);
    // sqlx's migrator agrees on SQLite too.
    runtime().block_on(async {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .connect(&url)
            .await
            .expect("connect");
        sqlx::migrate::Migrator::new(dir.as_path())
            .await
            .expect("read")
            .run(&pool)
            .await
            .expect("nothing pending");
    });
    assert_eq!(
        common::sqlite(&db, "SELECT count(*) FROM notes").trim(),
        "300000"
    );
}

/// SQLite's documented table rebuild (create the new table, copy, drop the old one,
/// rename) keeps every ON DELETE CASCADE child row, whether the database enforces
/// foreign keys or not; when it does, a migration that leaves rows pointing at nothing
/// is rolled back and names the table.
#[test]
fn sqlite_table_rebuild_keeps_cascade_children_and_dangling_references_roll_back() {
    for foreign_keys in ["", "foreign-keys = true\n"] {
        let w = Workdir::new();
        let dir = w.path().join("migrations");
        write(
            &dir,
            "1_schema.sql",
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
             CREATE TABLE orders (id INTEGER PRIMARY KEY,
                                  user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE);
             INSERT INTO users VALUES (1, 'a'), (2, 'b');
             INSERT INTO orders (user_id) VALUES (1), (1), (2);",
        );
        write(
            &dir,
            "2_rebuild_users.sql",
            "CREATE TABLE users_new (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT);
             INSERT INTO users_new (id, name) SELECT id, name FROM users;
             DROP TABLE users;
             ALTER TABLE users_new RENAME TO users;",
        );
        let db = w.path().join("app.db");
        w.write_config(
            "",
            &migrate_config(&w.sqlite_url("app.db"), &dir, "backup-first = false").replace(
                "[database.migrate]",
                &format!("{foreign_keys}[database.migrate]"),
            ),
        );
        w.cmd(&["migrate", "apply", "db"]).assert().success();
        let sql = |q: &str| common::sqlite(&db, q).trim().to_owned();
        assert_eq!(
            sql("SELECT count(*) FROM orders"),
            "3",
            "every child row is kept ({foreign_keys:?})"
        );
        assert_eq!(sql("SELECT count(*) FROM pragma_foreign_key_check"), "0");
        assert_eq!(
            sql("SELECT count(*) FROM pragma_table_info('users') WHERE name = 'email'"),
            "1"
        );
        if foreign_keys.is_empty() {
            continue;
        }
        write(&dir, "3_drop_user.sql", "DELETE FROM users WHERE id = 1;");
        w.cmd(&["migrate", "apply", "db"]).assert().code(1).stderr(
            predicate::str::contains("3_drop_user.sql")
                .and(predicate::str::contains("table \"orders\""))
                .and(predicate::str::contains("rolled back")),
        );
        assert_eq!(sql("SELECT count(*) FROM users"), "2", "rolled back");
        assert_eq!(sql("SELECT count(*) FROM orders"), "3");
        assert_eq!(sql("SELECT max(version) FROM _sqlx_migrations"), "2");
    }
}

/// Two files with one version are a configuration error for every command that reads
/// the directory, on both backends: exit 2, both names, nothing applied. An up file and
/// its `.down.sql` are a pair, not a duplicate.
#[test]
fn two_migrations_with_one_version_are_a_config_error_and_nothing_is_applied() {
    let pg = PgDb::new("mig_dup");
    let w = Workdir::new();
    let lite = w.path().join("app.db");
    for url in [pg.url.clone(), w.sqlite_url("app.db")] {
        let dir = w.path().join("migrations");
        write(&dir, "1_a.sql", "CREATE TABLE a (x int);");
        write(&dir, "1_b.sql", "CREATE TABLE b (x int);");
        write(&dir, "2_c.up.sql", "CREATE TABLE c (x int);");
        write(&dir, "2_c.down.sql", "DROP TABLE c;");
        w.write_config("", &migrate_config(&url, &dir, "backup-first = false"));
        let commands: [&[&str]; 5] = [
            &["check"],
            &["migrate", "status", "db"],
            &["migrate", "plan", "db"],
            &["migrate", "apply", "db"],
            &["run-job", "db.migrate"],
        ];
        for args in commands {
            w.cmd(args).assert().code(2).stderr(
                predicate::str::contains("1_a.sql")
                    .and(predicate::str::contains("1_b.sql"))
                    .and(predicate::str::contains("same version 1")),
            );
        }
        let tables = if url.starts_with("sqlite") {
            common::sqlite(
                &lite,
                "SELECT count(*) FROM sqlite_schema WHERE name IN ('a', 'b', 'c')",
            )
            .trim()
            .to_owned()
        } else {
            pg.sql("SELECT count(*) FROM pg_class WHERE relname IN ('a', 'b', 'c')")
        };
        assert_eq!(tables, "0", "nothing applied on {url}");
        // Renumbered, both apply.
        std::fs::rename(dir.join("1_b.sql"), dir.join("3_b.sql")).expect("rename");
        w.cmd(&["migrate", "apply", "db"])
            .assert()
            .success()
            .stdout(predicate::str::contains("applied 3 migrations (1, 2, 3)"));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}

/// A `-- no-transaction` migration that fails part-way is marked failed in the history,
/// where sqlx's own migrator looks: sqlx and dbkeeper both refuse to go past it until an
/// operator deletes the row (to run it again) or marks it applied (it was completed by
/// hand), on both backends.
#[test]
fn a_failed_no_transaction_migration_blocks_dbkeeper_and_sqlx_until_an_operator_acts() {
    let pg = PgDb::new("mig_dirty");
    let w = Workdir::new();
    let lite = w.path().join("app.db");
    for (n, url) in [pg.url.clone(), w.sqlite_url("app.db")].iter().enumerate() {
        let is_sqlite = url.starts_with("sqlite:");
        let sql = |q: &str| {
            if is_sqlite {
                common::sqlite(&lite, q).trim().to_owned()
            } else {
                pg.sql(q)
            }
        };
        let dir = w.path().join(format!("migrations-{n}"));
        write(&dir, "1_t.sql", "CREATE TABLE t (x int);");
        write(
            &dir,
            "2_half.sql",
            "-- no-transaction\nCREATE TABLE half (x int);\nINSERT INTO missing VALUES (1);",
        );
        write(&dir, "3_after.sql", "CREATE TABLE after_it (x int);");
        w.write_config("", &migrate_config(url, &dir, "backup-first = false"));
        w.cmd(&["migrate", "apply", "db"]).assert().code(1).stderr(
            predicate::str::contains("2_half.sql")
                .and(predicate::str::contains("marked failed"))
                .and(predicate::str::contains("missing"))
                .and(predicate::str::contains(
                    "DELETE FROM _sqlx_migrations WHERE version = 2",
                )),
        );
        assert_eq!(
            sql("SELECT count(*) FROM _sqlx_migrations WHERE version = 2 AND NOT success AND execution_time > 0"),
            "1",
            "{url}: the failed migration is recorded as failed"
        );
        assert_sqlx_refuses_dirty(url, &dir, 2);
        // dbkeeper refuses too, and says so in status.
        w.cmd(&["migrate", "apply", "db"])
            .assert()
            .code(1)
            .stderr(predicate::str::contains("marked failed (dirty)"));
        let status = w.cmd(&["migrate", "status", "db"]).assert().code(1);
        let out = status.get_output();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("2 ") && l.contains("FAILED (dirty)")),
            "{stdout}"
        );
        assert!(
            stderr.contains("UPDATE _sqlx_migrations SET success = TRUE WHERE version = 2"),
            "{stderr}"
        );
        assert_eq!(
            sql("SELECT count(*) FROM _sqlx_migrations WHERE version = 3"),
            "0",
            "{url}: nothing after it"
        );
        if is_sqlite {
            // Completed by hand, then marked applied.
            sql("CREATE TABLE missing (x int); INSERT INTO missing VALUES (1); UPDATE _sqlx_migrations SET success = TRUE WHERE version = 2;");
            w.cmd(&["migrate", "apply", "db"])
                .assert()
                .success()
                .stdout(predicate::str::contains("applied 1 migrations (3)"));
        } else {
            // Undone by hand, the cause fixed, then run again.
            sql("DROP TABLE IF EXISTS half; CREATE TABLE missing (x int); DELETE FROM _sqlx_migrations WHERE version = 2;");
            w.cmd(&["migrate", "apply", "db"])
                .assert()
                .success()
                .stdout(predicate::str::contains("applied 2 migrations (2, 3)"));
        }
        sqlx_migrate(url, &dir)
            .expect("sqlx agrees: nothing dirty, nothing changed, nothing pending");
        assert_eq!(
            sql("SELECT count(*) FROM _sqlx_migrations WHERE success"),
            "3"
        );
    }
}

/// `CREATE INDEX … IF NOT EXISTS` is skipped by PostgreSQL when an INVALID index of
/// that name exists: the migration fails instead of being recorded as applied —
/// rolled back when it ran in a transaction, marked failed when it did not.
#[test]
fn an_invalid_index_named_in_a_migration_fails_it_even_after_if_not_exists() {
    let pg = PgDb::new("mig_if_not_exists");
    let w = Workdir::new();
    let dir = w.path().join("migrations");
    // Two INVALID indexes, as failed CREATE INDEX CONCURRENTLY attempts leave them.
    pg.sql("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (1);");
    for index in [
        "CREATE UNIQUE INDEX CONCURRENTLY t_x ON t (x)",
        "CREATE UNIQUE INDEX CONCURRENTLY t_y ON t (x) WHERE x > 0",
    ] {
        leave_invalid_index(&pg, index);
    }
    pg.sql("DELETE FROM t WHERE ctid = (SELECT min(ctid) FROM t)");
    let invalid = || {
        pg.sql("SELECT string_agg(indexrelid::regclass::text, ',' ORDER BY 1) FROM pg_index WHERE NOT indisvalid")
    };
    assert_eq!(invalid(), "t_x,t_y");
    let config = |extra: &str| {
        w.write_config(
            "",
            &migrate_config(&pg.url, &dir, &format!("backup-first = false\n{extra}")),
        )
    };

    // In a transaction: rolled back, nothing recorded.
    write(
        &dir,
        "1_plain.sql",
        "CREATE TABLE marker (x int);\nCREATE UNIQUE INDEX IF NOT EXISTS t_y ON t (x) WHERE x > 0;",
    );
    config("");
    w.cmd(&["migrate", "apply", "db"]).assert().code(1).stderr(
        predicate::str::contains("1_plain.sql")
            .and(predicate::str::contains("INVALID index public.t_y"))
            .and(predicate::str::contains("drop-invalid-indexes = true"))
            .and(predicate::str::contains("DROP INDEX")),
    );
    assert_eq!(pg.sql("SELECT to_regclass('marker') IS NULL"), "t");
    assert_eq!(pg.sql("SELECT count(*) FROM _sqlx_migrations"), "0");
    config("drop-invalid-indexes = true");
    w.cmd(&["migrate", "apply", "db"]).assert().success();
    assert_eq!(invalid(), "t_x", "t_y was dropped and built again");

    // Outside a transaction: marked failed.
    write(
        &dir,
        "2_concurrently.sql",
        "-- no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS t_x ON t (x);",
    );
    config("");
    w.cmd(&["migrate", "apply", "db"]).assert().code(1).stderr(
        predicate::str::contains("2_concurrently.sql")
            .and(predicate::str::contains("INVALID index public.t_x"))
            .and(predicate::str::contains("drop-invalid-indexes = true"))
            .and(predicate::str::contains(
                "DELETE FROM _sqlx_migrations WHERE version = 2",
            )),
    );
    assert_eq!(
        pg.sql("SELECT success FROM _sqlx_migrations WHERE version = 2"),
        "f"
    );
    pg.sql("DELETE FROM _sqlx_migrations WHERE version = 2");
    config("drop-invalid-indexes = true");
    w.cmd(&["migrate", "apply", "db"]).assert().success();
    assert_eq!(invalid(), "", "every index is valid now");
}

/// A `-- no-transaction` migration still running (its migrator holds the lock) is shown
/// as RUNNING with no repair advice; if its row is deleted meanwhile anyway, the
/// migrator fails instead of reporting it applied.
#[test]
fn a_running_no_transaction_migration_is_not_dirty_and_a_row_deleted_meanwhile_fails_the_run() {
    let pg = PgDb::new("mig_running");
    let w = Workdir::new();
    let dir = w.path().join("migrations");
    write(&dir, "1_a.sql", "CREATE TABLE a (x int);");
    write(
        &dir,
        "2_slow.sql",
        "-- no-transaction\nINSERT INTO a VALUES (2); SELECT pg_sleep(4);",
    );
    write(&dir, "3_c.sql", "INSERT INTO a VALUES (3);");
    w.write_config("", &migrate_config(&pg.url, &dir, "backup-first = false"));
    let apply = Command::new(BIN)
        .args(["migrate", "apply", "db", "-c"])
        .arg(w.config_path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = std::time::Instant::now();
    while pg.sleeping_sessions() == 0 {
        assert!(started.elapsed() < Duration::from_secs(20), "never ran 2");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = w.cmd(&["migrate", "status", "db"]).assert().success();
    let out = status.get_output();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("2 ") && l.contains("RUNNING")),
        "{stdout}"
    );
    assert!(stdout.contains("held by pid"), "{stdout}");
    assert!(
        !stdout.contains("FAILED") && !stderr.contains("DELETE FROM"),
        "{stdout}{stderr}"
    );

    pg.sql("DELETE FROM _sqlx_migrations WHERE version = 2");
    let out = apply.wait_with_output().expect("apply");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("2_slow.sql") && stderr.contains("was removed while it ran"),
        "{stderr}"
    );
    assert_eq!(
        pg.sql("SELECT string_agg(version || ':' || success, ',' ORDER BY version) FROM _sqlx_migrations"),
        "1:true,2:false",
        "nothing after it, and 2 written back as failed so it never runs again unseen"
    );
    w.cmd(&["migrate", "apply", "db"]).assert().code(1);
    assert_eq!(
        pg.sql("SELECT count(*) FROM _sqlx_migrations WHERE version = 3"),
        "0"
    );
}

/// An INVALID index of the same name in a schema the migration does not mean (not on
/// its search path, or another schema than the one it qualifies) is neither blamed nor
/// dropped.
#[test]
fn an_invalid_index_in_another_schema_is_neither_blamed_nor_dropped() {
    let pg = PgDb::new("mig_other_schema");
    let w = Workdir::new();
    let dir = w.path().join("migrations");
    pg.sql("CREATE SCHEMA reporting; CREATE TABLE reporting.t (k text); INSERT INTO reporting.t VALUES ('a'), ('a');");
    leave_invalid_index(
        &pg,
        "CREATE UNIQUE INDEX CONCURRENTLY t_k_key ON reporting.t (k)",
    );
    write(
        &dir,
        "1_t.sql",
        "CREATE TABLE t (k text); INSERT INTO t VALUES ('x'), ('y');",
    );
    write(
        &dir,
        "2_idx.sql",
        "-- no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS t_k_key ON t (k);",
    );
    write(
        &dir,
        "3_qualified.sql",
        "COMMENT ON INDEX \"public\".t_k_key IS 'k';",
    );
    w.write_config(
        "",
        &migrate_config(
            &pg.url,
            &dir,
            "backup-first = false\ndrop-invalid-indexes = true",
        ),
    );
    w.cmd(&["migrate", "apply", "db"])
        .assert()
        .success()
        .stdout(predicate::str::contains("applied 3 migrations (1, 2, 3)"));
    assert_eq!(
        pg.sql("SELECT string_agg(indexrelid::regclass::text || ':' || indisvalid, ',' ORDER BY indexrelid::regclass::text) FROM pg_index WHERE indexrelid::regclass::text LIKE '%t_k_key'"),
        "reporting.t_k_key:false,t_k_key:true",
        "the other schema's INVALID index is left alone"
    );
}

/// A migration file that ends dbkeeper's transaction itself (COMMIT or ROLLBACK) is
/// never recorded as applied: it is marked failed, like a `-- no-transaction` migration
/// that failed part-way, so neither dbkeeper nor sqlx applies anything after it.
#[test]
fn a_migration_that_ends_its_own_transaction_is_marked_failed_on_both_backends() {
    for (file, then) in [
        (
            "INSERT INTO t VALUES (1);\nCOMMIT;\nINSERT INTO t VALUES (2);",
            "",
        ),
        (
            "INSERT INTO t VALUES (1);\nCOMMIT;\nINSERT INTO missing VALUES (2);",
            "and then failed",
        ),
        (
            "INSERT INTO t VALUES (1);\nROLLBACK;\nINSERT INTO t VALUES (2);",
            "",
        ),
    ] {
        ends_its_own_transaction(file, then);
    }
}

/// Migration 2 is `file`; the error must say `then` too.
fn ends_its_own_transaction(file: &str, then: &str) {
    let pg = PgDb::new("mig_commit");
    let w = Workdir::new();
    let lite = w.path().join("app.db");
    for (n, url) in [pg.url.clone(), w.sqlite_url("app.db")].iter().enumerate() {
        let sql = |q: &str| {
            if url.starts_with("sqlite:") {
                common::sqlite(&lite, q).trim().to_owned()
            } else {
                pg.sql(q)
            }
        };
        let dir = w.path().join(format!("migrations-{n}"));
        write(&dir, "1_t.sql", "CREATE TABLE t (x int);");
        write(&dir, "2_commits.sql", file);
        write(&dir, "3_after.sql", "INSERT INTO t VALUES (3);");
        w.write_config("", &migrate_config(url, &dir, "backup-first = false"));
        w.cmd(&["migrate", "apply", "db"]).assert().code(1).stderr(
            predicate::str::contains("2_commits.sql")
                .and(predicate::str::contains("ends its own transaction"))
                .and(predicate::str::contains("may be committed"))
                .and(predicate::str::contains(then))
                .and(predicate::str::contains(
                    "DELETE FROM _sqlx_migrations WHERE version = 2",
                )),
        );
        assert_eq!(
            sql("SELECT version || ':' || success FROM _sqlx_migrations WHERE version > 1"),
            if url.starts_with("sqlite:") {
                "2:0"
            } else {
                "2:false"
            },
            "{url}: marked failed, nothing after it"
        );
        assert_eq!(sql("SELECT count(*) FROM t WHERE x = 3"), "0");
        assert_sqlx_refuses_dirty(url, &dir, 2);
    }
}

/// With `foreign-keys = true`, only foreign-key violations a migration adds fail it (one
/// that was there before is not its fault), and a `-- no-transaction` migration that
/// adds one is marked failed with its changes left in place, not "rolled back".
#[test]
fn sqlite_foreign_key_check_blames_only_new_violations_and_never_claims_a_rollback_it_did_not_do() {
    let w = Workdir::new();
    let dir = w.path().join("migrations");
    let db = w.path().join("app.db");
    write(
        &dir,
        "1_init.sql",
        "CREATE TABLE users (id INTEGER PRIMARY KEY);
         CREATE TABLE posts (id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users (id));
         INSERT INTO users VALUES (1), (2); INSERT INTO posts (user_id) VALUES (1), (2);",
    );
    w.write_config(
        "",
        &migrate_config(&w.sqlite_url("app.db"), &dir, "backup-first = false").replace(
            "[database.migrate]",
            "foreign-keys = true\n[database.migrate]",
        ),
    );
    w.cmd(&["migrate", "apply", "db"]).assert().success();
    // An orphan the application left, long before the next migration.
    common::sqlite(&db, "INSERT INTO posts (user_id) VALUES (9)");
    write(&dir, "2_unrelated.sql", "CREATE TABLE other (x int);");
    w.cmd(&["migrate", "apply", "db"])
        .assert()
        .success()
        .stdout(predicate::str::contains("applied 1 migrations (2)"));

    write(
        &dir,
        "3_del.sql",
        "-- no-transaction\nDELETE FROM users WHERE id = 2;",
    );
    let out = w.cmd(&["migrate", "apply", "db"]).assert().code(1);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    for part in [
        "3_del.sql",
        "left 1 new rows",
        "1 such rows existed before",
        "table \"posts\"",
        "changes stay",
        "marked failed",
    ] {
        assert!(stderr.contains(part), "{part:?} in {stderr}");
    }
    assert!(
        !stderr.contains("rolled back,") && !stderr.contains("so it was rolled back"),
        "{stderr}"
    );
    assert_eq!(
        common::sqlite(&db, "SELECT count(*) FROM users").trim(),
        "1"
    );
    assert_eq!(
        common::sqlite(
            &db,
            "SELECT success FROM _sqlx_migrations WHERE version = 3"
        )
        .trim(),
        "0"
    );
}

/// A file name sqlx cannot read as a migration is a configuration error for every
/// command that reads the directory: exit 2, as `check` exits.
#[test]
fn a_migration_file_name_sqlx_cannot_read_is_a_config_error_everywhere() {
    let w = Workdir::new();
    let dir = w.path().join("migrations");
    write(&dir, "1x_a.sql", "SELECT 1;");
    w.write_config(
        "",
        &migrate_config(&w.sqlite_url("app.db"), &dir, "backup-first = false"),
    );
    for args in [
        &["check"][..],
        &["migrate", "status", "db"],
        &["migrate", "plan", "db"],
        &["migrate", "apply", "db"],
        &["run-job", "db.migrate"],
    ] {
        w.cmd(args)
            .assert()
            .code(2)
            .stderr(predicate::str::contains("1x_a.sql"));
    }
}

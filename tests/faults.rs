//! Faults and bad input: secrets never leak, a lost or damaged run history is
//! survived, kill -9 and SIGTERM in the middle of every job kind leave a consistent
//! state, and restore targets that cannot work are refused clearly.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{metric_value, psql, sqlite, PgDb, Workdir, BIN};
use predicates::prelude::*;

#[test]
fn secrets_never_reach_logs_errors_status_metrics_or_output() {
    const INLINE: &str = "Inline-Secret-123";
    const IN_FILE: &str = "File-Secret-456";
    const HOOK: &str = "hook-token-789";
    let pg = PgDb::new("secrets");
    pg.sql("CREATE TABLE t (created_at timestamptz); INSERT INTO t VALUES (now() - interval '100 days')");
    let w = Workdir::new();
    let key = w.key("k");
    let key_hex = std::fs::read_to_string(&key)
        .expect("key")
        .trim()
        .to_owned();
    let pw_file = w.path().join("pw");
    std::fs::write(&pw_file, format!("{IN_FILE}\n")).expect("pw");
    let url = pg.url.replace("postgres@", &format!("postgres:{INLINE}@"));
    w.write_config(
        "",
        &format!(
            "[notify]\nwebhook = \"http://127.0.0.1:1/{HOOK}\"\nping-url = \"http://127.0.0.1:1/{HOOK}\"\nretries = 0\ntimeout = \"1s\"\n\
             [[database]]\nname = \"pg\"\nurl = \"{url}\"\n\
             [database.backup]\nschedule = \"every 2s\"\ndestination = \"{}\"\nencryption-key-file = \"{}\"\n\
             [[database.retention]]\ntable = \"t\"\ncolumn = \"created_at\"\nolder-than = \"30d\"\nschedule = \"every 2s\"\n\
             [[database.sql]]\nname = \"bad\"\nstatement = \"SELECT broken(\"\nschedule = \"every 1s\"\n\
             [[database]]\nname = \"down\"\nurl = \"postgres://app@127.0.0.1:1/x\"\npassword-file = \"{}\"\nconnect-timeout = \"1s\"\n\
             [[database.sql]]\nname = \"ping\"\nstatement = \"SELECT 1\"\nschedule = \"every 1s\"\n",
            w.path().join("backups").display(),
            key.display(),
            pw_file.display()
        ),
    );
    let mut seen = String::new();
    for args in [
        vec!["check"],
        vec!["jobs"],
        vec!["run-job", "pg.backup"],
        vec!["run-job", "pg.sql.bad"],
        vec!["run-job", "down.sql.ping"],
        vec!["backup", "list"],
        vec!["history"],
    ] {
        let out = w.cmd(&args).env("RUST_LOG", "debug").output().expect("run");
        seen.push_str(&String::from_utf8_lossy(&out.stdout));
        seen.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    let d = w.start_with_env(&[("RUST_LOG", "debug")]);
    d.wait_for(
        "failures and successes reported",
        Duration::from_secs(20),
        || {
            let m = d.metrics();
            metric_value(
                &m,
                "dbkeeper_job_runs_total",
                &["job_id=\"down.sql.ping\"", "result=\"failure\""],
            )
            .unwrap_or(0.0)
                >= 1.0
                && metric_value(
                    &m,
                    "dbkeeper_job_runs_total",
                    &["job_id=\"pg.backup\"", "result=\"success\""],
                )
                .unwrap_or(0.0)
                    >= 2.0
        },
    );
    for path in ["/status", "/metrics", "/", "/readyz"] {
        seen.push_str(&d.get(path).1);
    }
    seen.push_str(&d.log_text());
    assert!(
        seen.contains("pg.sql.bad") && seen.contains("down.sql.ping"),
        "the outputs were collected"
    );
    assert!(
        seen.contains("dead-man ping not delivered"),
        "the pings (to the same secret URL) were tried"
    );
    for secret in [INLINE, IN_FILE, HOOK, key_hex.as_str()] {
        assert!(!seen.contains(secret), "secret {secret:?} leaked");
    }
    // What is left on disk: manifests and archives carry no secret either.
    for entry in std::fs::read_dir(w.path().join("backups/pg")).expect("backups") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("read");
        for secret in [INLINE, key_hex.as_str()] {
            assert!(!bytes
                .windows(secret.len())
                .any(|win| win == secret.as_bytes()));
        }
    }
}

#[test]
fn a_lost_or_damaged_run_history_is_survived_and_backups_stay_listed() {
    let w = Workdir::new();
    sqlite(
        &w.path().join("app.db"),
        "CREATE TABLE t (x); INSERT INTO t VALUES (1);",
    );
    let key = w.key("k");
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"app\"\nurl = \"{}\"\n[database.backup]\nschedule = \"@daily\"\nmissed = \"skip\"\n\
             destination = \"{}\"\nencryption-key-file = \"{}\"\n",
            w.sqlite_url("app.db"),
            w.path().join("backups").display(),
            key.display()
        ),
    );
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let state = w.path().join("state/state.db");
    let success = |d: &common::Daemon| {
        d.metric(
            "dbkeeper_job_last_success_timestamp_seconds",
            &["job_id=\"app.backup\""],
        )
        .unwrap_or(0.0)
    };
    // Damaged while stopped.
    std::fs::write(&state, b"garbage, not a database ".repeat(100)).expect("corrupt");
    for side in ["state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(w.path().join("state").join(side));
    }
    {
        let d = w.start();
        assert!(
            d.log_text().contains("run history is unreadable"),
            "{}",
            d.log_text()
        );
        // /healthz answers before the jobs are published; wait for them.
        d.wait_for(
            "last success restored from the manifests",
            Duration::from_secs(15),
            || success(&d) > 0.0,
        );
    }
    assert_eq!(w.stdout(&["backup", "list", "app"]).lines().count(), 2);
    // Deleted while stopped.
    std::fs::remove_file(&state).expect("rm");
    let d = w.start();
    assert!(
        d.log_text().contains("no run history yet"),
        "{}",
        d.log_text()
    );
    d.wait_for(
        "last success restored from the manifests",
        Duration::from_secs(15),
        || success(&d) > 0.0,
    );
}

#[test]
fn kill_9_mid_retention_and_mid_migration_leaves_consistent_state() {
    let pg = PgDb::new("kill9");
    pg.sql(
        "CREATE TABLE events (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL);
         INSERT INTO events (created_at) SELECT now() - interval '100 days' FROM generate_series(1, 20000);
         INSERT INTO events (created_at) SELECT now() FROM generate_series(1, 100);",
    );
    let w = Workdir::new();
    let dir = w.path().join("migrations");
    common::write_file(&dir, "1_t.sql", "CREATE TABLE t (x int);");
    common::write_file(
        &dir,
        "2_slow.sql",
        "INSERT INTO t VALUES (2); SELECT pg_sleep(3); INSERT INTO t VALUES (3);",
    );
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"pg\"\nurl = \"{}\"\n\
             [[database.retention]]\ntable = \"events\"\ncolumn = \"created_at\"\nolder-than = \"30d\"\n\
             batch-size = 500\npause = \"100ms\"\nschedule = \"every 1h\"\nmissed = \"run-once\"\n\
             [database.migrate]\ndir = \"{}\"\nschedule = \"manual\"\nbackup-first = false\n",
            pg.url,
            dir.display()
        ),
    );
    // Retention, killed between batches; the next start resumes and finishes.
    let mut d = w.start();
    d.wait_for("some batches deleted", Duration::from_secs(20), || {
        d.metric(
            "dbkeeper_retention_rows_deleted_total",
            &["table=\"events\""],
        )
        .unwrap_or(0.0)
            >= 1000.0
    });
    d.signal("KILL");
    let _ = d.wait_exit(Duration::from_secs(5));
    let left: u32 = psql(
        &pg.url,
        "SELECT count(*) FROM events WHERE created_at < now() - interval '30 days'",
    )
    .parse()
    .expect("n");
    assert!(
        left > 0 && left < 20000,
        "killed in the middle: {left} expired rows left"
    );
    let history = w.stdout(&["history", "pg.retention.events"]);
    assert!(history.contains("running"), "{history}");
    drop(d);
    let d = w.start();
    assert!(w
        .stdout(&["history", "pg.retention.events"])
        .contains("interrupted"));
    d.wait_for(
        "retention resumed and finished",
        Duration::from_secs(30),
        || {
            psql(
                &pg.url,
                "SELECT count(*) FROM events WHERE created_at < now() - interval '30 days'",
            ) == "0"
        },
    );
    assert_eq!(psql(&pg.url, "SELECT count(*) FROM events"), "100");
    drop(d);

    // A migration, killed inside its transaction: rolled back, applied once later.
    let mut child = Command::new(BIN)
        .args(["migrate", "apply", "pg", "-c"])
        .arg(w.config_path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("migrate");
    let started = Instant::now();
    while pg.sleeping_sessions() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "migration never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    let started = Instant::now();
    while pg.sleeping_sessions() > 0 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        psql(&pg.url, "SELECT count(*) FROM t"),
        "0",
        "the killed migration rolled back"
    );
    assert_eq!(
        psql(&pg.url, "SELECT max(version) FROM _sqlx_migrations"),
        "1"
    );
    w.cmd(&["migrate", "apply", "pg"]).assert().success();
    assert_eq!(
        psql(&pg.url, "SELECT string_agg(x::text, ',' ORDER BY x) FROM t"),
        "2,3"
    );
}

#[test]
fn sigterm_during_every_job_kind_stops_cleanly_within_the_grace_period() {
    let pg = PgDb::new("sigterm");
    pg.sql(
        "CREATE TABLE events (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL);
         INSERT INTO events (created_at) SELECT now() - interval '100 days' FROM generate_series(1, 5000);
         CREATE MATERIALIZED VIEW slow AS SELECT 1 AS x FROM pg_sleep(60) WITH NO DATA;",
    );
    let migrations_db = PgDb::new("sigterm_mig");
    let w = Workdir::new();
    let dir = w.path().join("migrations");
    common::write_file(
        &dir,
        "1_slow.sql",
        "CREATE TABLE t (x int); SELECT pg_sleep(60);",
    );
    // Part of a real dump, then a stall (bytes that are not a dump would fail the
    // backup at once).
    let slow_dump = common::write_script(
        w.path(),
        "slow_pg_dump.sh",
        "#!/bin/sh\npg_dump \"$@\" | head -c 100000\nexec sleep 60\n",
    );
    // The refresh takes a minute: the view's query sleeps.
    w.write_config(
        "shutdown-grace = \"2s\"\nmax-concurrent-jobs = 4",
        &format!(
            "[[database]]\nname = \"pg\"\nurl = \"{}\"\n\
             [database.backup]\nschedule = \"every 1h\"\nmissed = \"run-once\"\ndestination = \"{}\"\nencryption = \"none\"\npg-dump = \"{}\"\n\
             [[database.retention]]\ntable = \"events\"\ncolumn = \"created_at\"\nolder-than = \"30d\"\nbatch-size = 10\n\
             pause = \"30s\"\nschedule = \"every 1h\"\nmissed = \"run-once\"\n\
             [[database.refresh]]\nview = \"slow\"\nschedule = \"every 1h\"\nmissed = \"run-once\"\nretries = 0\n\
             [[database]]\nname = \"mig\"\nurl = \"{}\"\n\
             [database.migrate]\ndir = \"{}\"\nschedule = \"every 1h\"\nmissed = \"run-once\"\nbackup-first = false\n",
            pg.url,
            w.path().join("backups").display(),
            slow_dump.display(),
            migrations_db.url,
            dir.display()
        ),
    );
    let mut d = w.start();
    d.wait_for("all four kinds running", Duration::from_secs(20), || {
        let m = d.metrics();
        [
            "pg.backup",
            "pg.retention.events",
            "pg.refresh.slow",
            "mig.migrate",
        ]
        .iter()
        .all(|job| {
            metric_value(&m, "dbkeeper_job_running", &[&format!("job_id=\"{job}\"")]) == Some(1.0)
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    d.signal("TERM");
    let (status, took) = d.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit {status:?}\n{}", d.log_text());
    assert!(
        took < Duration::from_secs(6),
        "took {took:?} with a 2 s grace period\n{}",
        d.log_text()
    );
    // Nothing half-done is left: no temporary backup, no partial migration, no
    // statement still running.
    let leftovers: Vec<String> = std::fs::read_dir(w.path().join("backups/pg"))
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(
        psql(&migrations_db.url, "SELECT to_regclass('t') IS NULL"),
        "t",
        "the migration rolled back"
    );
    let started = Instant::now();
    while (pg.sleeping_sessions() > 0 || migrations_db.sleeping_sessions() > 0)
        && started.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        pg.sleeping_sessions() + migrations_db.sleeping_sessions(),
        0
    );
    assert!(
        Command::new("pgrep")
            .args(["-f", &slow_dump.display().to_string()])
            .output()
            .expect("pgrep")
            .stdout
            .is_empty(),
        "pg_dump was stopped"
    );
    let history = w.stdout(&["history", "-n", "10"]);
    assert!(history.matches("cancelled").count() >= 4, "{history}");
}

#[test]
fn restore_targets_that_cannot_work_are_refused_clearly() {
    let w = Workdir::new();
    sqlite(
        &w.path().join("app.db"),
        "CREATE TABLE t (x); INSERT INTO t VALUES (1);",
    );
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"app\"\nurl = \"{}\"\n[database.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nencryption = \"none\"\n",
            w.sqlite_url("app.db"),
            w.path().join("backups").display()
        ),
    );
    w.cmd(&["run-job", "app.backup"]).assert().success();
    // A read-only directory (as root, a read-only bind would be needed; use a path
    // under a file instead, which no user can create).
    let file = w.path().join("plain-file");
    std::fs::write(&file, b"x").expect("file");
    let inside_file = file.join("restored.db");
    w.cmd(&[
        "restore",
        "app",
        "--to",
        inside_file.to_str().expect("utf-8"),
    ])
    .assert()
    .code(1)
    .stderr(predicate::str::contains("restored.db"));
    // A directory as target (one that holds none of dbkeeper's own folders).
    let dir = w.path().join("a-directory");
    std::fs::create_dir(&dir).expect("mkdir");
    w.cmd(&[
        "restore",
        "app",
        "--to",
        dir.to_str().expect("utf-8"),
        "--force",
    ])
    .assert()
    .code(1)
    .stderr(predicate::str::contains("is a directory"));
    // Another file system (tmpfs): restored via a temporary file on that file system.
    let mnt = w.path().join("mnt");
    let mounted = common::Mount::tmpfs(&mnt, "8m");
    let target = mnt.join("app.db");
    let restored = w
        .cmd(&["restore", "app", "--to", target.to_str().expect("utf-8")])
        .output()
        .expect("restore");
    drop(mounted);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    // A backup of one kind cannot go to the other.
    w.cmd(&["restore", "app", "--to", "postgres://postgres@127.0.0.1/x"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("SQLite backup"));
}

/// A PostgreSQL server of this test's own (initdb in a temporary directory, run as the
/// postgres user), so that restarting it disturbs no other test.
struct PrivatePg {
    dir: tempfile::TempDir,
    port: u16,
    bin: std::path::PathBuf,
}

impl PrivatePg {
    fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries in /usr/lib/postgresql")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|p| p.join("initdb").exists())
            .expect("initdb");
        let dir = tempfile::tempdir().expect("tmp");
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status()
            .expect("chown");
        let data = dir.path().join("data");
        let ok = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .status()
            .expect("initdb")
            .success();
        assert!(ok, "initdb failed");
        let pg = PrivatePg {
            dir,
            port: common::free_port(),
            bin,
        };
        pg.ctl(&["start"]);
        pg
    }

    fn ctl(&self, action: &[&str]) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let ok = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-o", &opts, "-w", "-m", "fast", "-l"])
            .arg(self.dir.path().join("log"))
            .args(action)
            .stdout(Stdio::null())
            .status()
            .expect("pg_ctl")
            .success();
        assert!(ok, "pg_ctl {action:?} failed");
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn postgres_restarting_mid_job_fails_clearly_and_the_next_runs_succeed() {
    let server = PrivatePg::start();
    psql(&server.url("postgres"), "CREATE DATABASE app");
    psql(&server.url("postgres"), "CREATE DATABASE mig");
    let app = server.url("app");
    psql(
        &app,
        "CREATE TABLE events (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL, body text);
         INSERT INTO events (created_at, body) SELECT now() - interval '100 days', repeat('x', 200) FROM generate_series(1, 4000);
         CREATE MATERIALIZED VIEW slow AS SELECT count(*) AS n FROM events, pg_sleep(2);",
    );
    let w = Workdir::new();
    let dir = w.path().join("migrations");
    common::write_file(
        &dir,
        "1_slow.sql",
        "CREATE TABLE t (x int); SELECT pg_sleep(2);",
    );
    // pg_dump waits a little before dumping, so the restart can land in the backup.
    let slow_dump = common::write_script(
        w.path(),
        "pg_dump_after_pause.sh",
        "#!/bin/sh\nsleep 1\nexec pg_dump \"$@\"\n",
    );
    w.write_config(
        "max-concurrent-jobs = 4\nprobe-interval = \"1s\"",
        &format!(
            "[[database]]\nname = \"app\"\nurl = \"{app}\"\nconnect-timeout = \"2s\"\n\
             [database.backup]\nschedule = \"every 3s\"\ndestination = \"{}\"\nencryption = \"none\"\npg-dump = \"{}\"\nkeep = {{ last = 2 }}\n\
             [[database.retention]]\ntable = \"events\"\ncolumn = \"created_at\"\nolder-than = \"30d\"\nbatch-size = 200\n\
             pause = \"300ms\"\nschedule = \"every 3s\"\n\
             [[database.refresh]]\nview = \"slow\"\nschedule = \"every 3s\"\nretries = 3\nretry-backoff = \"1s\"\n\
             [[database]]\nname = \"mig\"\nurl = \"{}\"\nconnect-timeout = \"2s\"\n\
             [database.migrate]\ndir = \"{}\"\nschedule = \"every 3s\"\nbackup-first = false\n",
            w.path().join("backups").display(),
            slow_dump.display(),
            server.url("mig"),
            dir.display()
        ),
    );
    let d = w.start();
    let jobs = [
        "app.backup",
        "app.retention.events",
        "app.refresh.slow",
        "mig.migrate",
    ];
    d.wait_for("all four kinds running", Duration::from_secs(30), || {
        let m = d.metrics();
        jobs.iter().all(|job| {
            metric_value(&m, "dbkeeper_job_running", &[&format!("job_id=\"{job}\"")]) == Some(1.0)
        })
    });
    let restarted_at = chrono::Utc::now().timestamp() as f64;
    server.ctl(&["restart"]);
    // Every kind succeeds again after the restart; the daemon never went away.
    d.wait_for(
        "every job succeeded after the restart",
        Duration::from_secs(60),
        || {
            let m = d.metrics();
            jobs.iter().all(|job| {
                metric_value(
                    &m,
                    "dbkeeper_job_last_success_timestamp_seconds",
                    &[&format!("job_id=\"{job}\"")],
                )
                .unwrap_or(0.0)
                    > restarted_at
            })
        },
    );
    assert_eq!(d.get("/healthz").0, 200);
    // The restart hit running jobs, and what failed said why, in a sentence.
    let history = w.stdout(&["history", "-n", "100"]);
    assert!(
        history.contains("failure"),
        "no run was cut by the restart:\n{history}"
    );
    for line in history.lines().filter(|l| l.contains("failure")) {
        assert!(
            [
                "connection",
                "terminat",
                "shut",
                "closed",
                "connect",
                "pg_dump failed",
                "administrator"
            ]
            .iter()
            .any(|w| line.to_lowercase().contains(w)),
            "unclear failure: {line}"
        );
    }
    assert_eq!(
        psql(&server.url("mig"), "SELECT count(*) FROM _sqlx_migrations"),
        "1",
        "the migration applied once"
    );
    assert_eq!(psql(&app, "SELECT count(*) FROM events"), "0");
}

#[test]
fn kill_9_mid_refresh_and_mid_sql_then_restart_runs_them_again() {
    let pg = PgDb::new("kill9_refresh");
    pg.sql("CREATE MATERIALIZED VIEW slow AS SELECT 1 AS n FROM pg_sleep(3);");
    let w = Workdir::new();
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"pg\"\nurl = \"{}\"\n\
             [[database.refresh]]\nview = \"slow\"\nschedule = \"every 1h\"\nmissed = \"run-once\"\n\
             [[database.sql]]\nname = \"nap\"\nstatement = \"SELECT pg_sleep(3)\"\nschedule = \"every 1h\"\nmissed = \"run-once\"\n",
            pg.url
        ),
    );
    let mut d = w.start();
    let jobs = ["pg.refresh.slow", "pg.sql.nap"];
    d.wait_for("both running", Duration::from_secs(15), || {
        let m = d.metrics();
        jobs.iter().all(|j| {
            metric_value(&m, "dbkeeper_job_running", &[&format!("job_id=\"{j}\"")]) == Some(1.0)
        })
    });
    d.signal("KILL");
    let _ = d.wait_exit(Duration::from_secs(5));
    drop(d);
    // Never succeeded, so both run again at start-up (missed = "run-once").
    let d = w.start();
    d.wait_for(
        "both succeeded after the restart",
        Duration::from_secs(30),
        || {
            let m = d.metrics();
            jobs.iter().all(|j| {
                metric_value(
                    &m,
                    "dbkeeper_job_runs_total",
                    &[&format!("job_id=\"{j}\""), "result=\"success\""],
                )
                .unwrap_or(0.0)
                    >= 1.0
            })
        },
    );
    let history = w.stdout(&["history", "-n", "10"]);
    assert_eq!(history.matches("interrupted").count(), 2, "{history}");
}

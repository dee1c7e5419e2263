//! Command migrations (`[database.migrate] command`) with the real binary against real
//! PostgreSQL and SQLite, driven through a fake Alembic (`tests/fixtures/fake_alembic.py`):
//! pending check, plan, the verified pre-migration backup, the dry run on a scratch
//! copy, failures, the process group killed on SIGTERM and timeout, the password kept
//! to the environment.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{archives, psql, sqlite, write_file, PgDb, Workdir, BIN};
use predicates::prelude::*;

const FAKE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/fake_alembic.py"
);

/// The app directory (working-dir) with two Alembic-style revisions.
fn app(w: &Workdir) -> PathBuf {
    let dir = w.path().join("app");
    write_file(
        &dir.join("versions"),
        "0001.sql",
        "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL)",
    );
    write_file(
        &dir.join("versions"),
        "0002.sql",
        "ALTER TABLE users ADD COLUMN name TEXT",
    );
    dir
}

/// A database `db` at `url` with an encrypted backup and command migrations through
/// the fake Alembic; `db_extra` goes in `[[database]]`, `extra` in `[database.migrate]`.
fn config(w: &Workdir, url: &str, db_extra: &str, extra: &str) -> String {
    let dir = app(w);
    let key = w.path().join("backup.key");
    if !key.exists() {
        w.key("backup.key");
    }
    format!(
        "[[database]]\nname = \"db\"\nurl = \"{url}\"\n{db_extra}\n{}\
         [database.migrate]\nschedule = \"manual\"\n\
         command = [\"python3\", \"{FAKE}\", \"upgrade\", \"head\"]\n\
         pending-command = [\"python3\", \"{FAKE}\", \"check\"]\n\
         plan-command = [\"python3\", \"{FAKE}\", \"upgrade\", \"head\", \"--sql\"]\n\
         working-dir = \"{}\"\n{extra}\n",
        common::backup_table(&w.path().join("backups"), Some(&key), ""),
        dir.display()
    )
}

fn sqlite_url(w: &Workdir) -> String {
    format!("sqlite://{}", w.path().join("app.db").display())
}

/// The version the fake recorded, or "" if none.
fn version_sqlite(w: &Workdir) -> String {
    sqlite(
        &w.path().join("app.db"),
        "CREATE TABLE IF NOT EXISTS alembic_version (version_num TEXT); SELECT version_num FROM alembic_version;",
    )
    .trim()
    .to_owned()
}

fn tables_sqlite(w: &Workdir) -> String {
    sqlite(
        &w.path().join("app.db"),
        "SELECT group_concat(name) FROM sqlite_master WHERE type = 'table' AND name = 'users';",
    )
}

/// The last run of `db.migrate` in the state DB: (result, error, details).
fn last_run(w: &Workdir) -> (String, String, String) {
    let row = sqlite(
        &w.path().join("state/state.db"),
        "SELECT result || char(31) || coalesce(error, '') || char(31) || coalesce(details, '') FROM job_runs WHERE job = 'db.migrate' ORDER BY id DESC LIMIT 1;",
    );
    let mut parts = row.trim_end().split('\u{1f}').map(str::to_owned);
    (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    )
}

/// The id of the backup whose archive is `archive`.
fn backup_id(archive: &Path) -> String {
    archive
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".dbk"))
        .expect("id")
        .to_owned()
}

fn pre_migration_archives(w: &Workdir) -> Vec<PathBuf> {
    archives(&w.path().join("backups"), "db")
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("-pre-migration"))
        .collect()
}

/// The pending → plan → apply → up to date round, on either backend; `version` and
/// `has_users` read the database.
fn round_trip(w: &Workdir, version: impl Fn() -> String, has_users: impl Fn() -> bool) {
    let status = w.stdout(&["migrate", "status", "db"]);
    assert!(status.contains("db: pending"), "{status}");
    assert!(version().is_empty(), "nothing applied yet");

    let plan = w.stdout(&["migrate", "plan", "db"]);
    assert!(
        plan.contains("Running upgrade None -> 0001")
            && plan.contains("CREATE TABLE users")
            && plan.contains("ADD COLUMN name"),
        "{plan}"
    );
    assert!(!has_users(), "plan changes nothing");

    let out = w.cmd(&["migrate", "apply", "db"]).assert().success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(stdout.contains("ran `python3"), "{stdout}");
    assert_eq!(version(), "0002");
    assert!(has_users());

    // Backup first: one pre-migration backup, read back (verified) before the command.
    let pre = pre_migration_archives(w);
    assert_eq!(pre.len(), 1, "{pre:?}");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(pre[0].to_string_lossy().replace(".dbk", ".manifest.json"))
            .expect("manifest"),
    )
    .expect("manifest JSON");
    assert_eq!(manifest["kind"], "pre-migration", "{manifest}");
    assert_eq!(manifest["verification"]["mode"], "read", "{manifest}");
    assert_eq!(manifest["verification"]["result"], "passed", "{manifest}");
    let id = backup_id(&pre[0]);
    let (result, _, details) = last_run(w);
    assert_eq!(result, "success");
    assert!(
        details.contains(&id) && details.contains("Running upgrade 0001 -> 0002"),
        "the output and the backup are in the history: {details}"
    );

    let status = w.stdout(&["migrate", "status", "db"]);
    assert!(
        status.contains("db: up to date") && status.contains("0002"),
        "{status}"
    );
    // Up to date: no second backup.
    assert!(w.stdout(&["migrate", "apply", "db"]).contains("up to date"));
    assert_eq!(pre_migration_archives(w).len(), 1);

    let daemon = w.start();
    daemon.wait_for("migration metrics", Duration::from_secs(20), || {
        daemon.metric("dbkeeper_migrations_applied_version", &["database=\"db\""]) == Some(2.0)
    });
    assert_eq!(
        daemon.metric("dbkeeper_migrations_pending", &["database=\"db\""]),
        Some(0.0)
    );
}

#[test]
fn alembic_round_trip_on_sqlite() {
    let w = Workdir::new();
    w.write_config("", &config(&w, &sqlite_url(&w), "", ""));
    round_trip(
        &w,
        || version_sqlite(&w),
        || tables_sqlite(&w).contains("users"),
    );
}

#[test]
fn alembic_round_trip_on_postgres() {
    let pg = PgDb::new("mig_cmd");
    let w = Workdir::new();
    w.write_config("", &config(&w, &pg.url, "", ""));
    let version = || {
        pg.sql("CREATE TABLE IF NOT EXISTS alembic_version (version_num varchar(32)); SELECT coalesce(max(version_num), '') FROM alembic_version")
            .trim()
            .to_owned()
    };
    let has_users = || pg.sql("SELECT to_regclass('users') IS NOT NULL").trim() == "t";
    round_trip(&w, version, has_users);
}

#[test]
fn a_failing_command_keeps_the_backup_and_fails_the_job() {
    let w = Workdir::new();
    w.write_config(
        "",
        &config(&w, &sqlite_url(&w), "", "env = { FAKE_FAIL = \"1\" }"),
    );
    w.cmd(&["migrate", "apply", "db"]).assert().code(1).stderr(
        predicate::str::contains("boom in revision")
            .and(predicate::str::contains("exit status 1"))
            .and(predicate::str::contains("pre-migration backup")),
    );
    assert_eq!(pre_migration_archives(&w).len(), 1, "the backup is kept");
    assert_eq!(version_sqlite(&w), "", "nothing applied");
    assert!(!tables_sqlite(&w).contains("users"));
    let (result, error, _) = last_run(&w);
    assert_eq!(result, "failure");
    assert!(
        error.contains("boom in revision") && error.contains("Will assume transactional DDL"),
        "stdout and stderr tails in the history: {error}"
    );
    w.cmd(&["migrate", "status", "db"])
        .assert()
        .success()
        .stdout(predicate::str::contains("db: pending"));
}

/// Waits until `pid` is gone (or a zombie, which its parent has yet to reap).
fn assert_gone(pid: u32, what: &str) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|s| s.trim_start().starts_with('Z')) =>
            {
                return
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    panic!("{what} (pid {pid}) is still running");
}

fn wait_for_pid(file: &Path) -> u32 {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if let Ok(text) = std::fs::read_to_string(file) {
            return text.trim().parse().expect("pid");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the fake never started its grandchild");
}

/// Starts `dbkeeper ARGS -c CONFIG` whose command starts a sleeping grandchild;
/// returns it once the grandchild's pid is in `pidfile`.
fn start_sleeping(w: &Workdir, args: &[&str], pidfile: &Path) -> (std::process::Child, u32) {
    let child = Command::new(BIN)
        .args(args)
        .arg("-c")
        .arg(w.config_path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dbkeeper");
    let grandchild = wait_for_pid(pidfile);
    (child, grandchild)
}

fn sigterm(child: &std::process::Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -TERM");
}

fn sleeper_config(w: &Workdir, extra: &str) -> (PathBuf, String) {
    sleeper_config_for(w, &sqlite_url(w), extra)
}

/// [`sleeper_config`] for the database at `url`.
fn sleeper_config_for(w: &Workdir, url: &str, extra: &str) -> (PathBuf, String) {
    let pidfile = w.path().join("sleep.pid");
    let cfg = config(
        w,
        url,
        "",
        &format!(
            "env = {{ FAKE_SLEEP_PIDFILE = \"{}\" }}\n{extra}",
            pidfile.display()
        ),
    );
    (pidfile, cfg)
}

#[test]
fn sigterm_to_run_job_kills_the_commands_process_group() {
    let w = Workdir::new();
    let (pidfile, cfg) = sleeper_config(&w, "");
    w.write_config("", &cfg);
    let (child, grandchild) = start_sleeping(&w, &["run-job", "db.migrate"], &pidfile);
    sigterm(&child);
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_gone(grandchild, "the command's grandchild `sleep`");
    assert_eq!(version_sqlite(&w), "", "nothing applied");
    assert_eq!(pre_migration_archives(&w).len(), 1);
}

/// A daemon config whose migration command sleeps, run on `schedule`, with a
/// one-second shutdown grace; returns the sleeper's pid file.
fn daemon_sleeper(w: &Workdir, schedule: &str) -> PathBuf {
    let (pidfile, cfg) = sleeper_config(w, "");
    w.write_config(
        "shutdown-grace = \"1s\"",
        &cfg.replace(
            "schedule = \"manual\"\ncommand",
            &format!("schedule = \"{schedule}\"\ncommand"),
        ),
    );
    pidfile
}

#[test]
fn daemon_shutdown_kills_the_commands_process_group() {
    let w = Workdir::new();
    // A scheduled run (every second; runs never overlap).
    let pidfile = daemon_sleeper(&w, "* * * * * *");
    let mut daemon = w.start();
    let grandchild = wait_for_pid(&pidfile);
    daemon.signal("TERM");
    daemon.wait_exit(Duration::from_secs(30));
    assert_gone(grandchild, "the command's grandchild `sleep`");
    assert!(
        daemon.log_text().contains("SIGTERM to its process group"),
        "{}",
        daemon.log_text()
    );
}

/// SIGTERM while an `@startup` migration runs, before READY=1: the migration gets the
/// grace period, then its process group is killed and the daemon exits.
#[test]
fn daemon_shutdown_during_a_startup_migration_kills_the_group() {
    let w = Workdir::new();
    let pidfile = daemon_sleeper(&w, "@startup");
    let (child, grandchild) = start_sleeping(&w, &["run"], &pidfile);
    let stopping = Instant::now();
    sigterm(&child);
    let out = child.wait_with_output().expect("wait");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stopping.elapsed() < Duration::from_secs(20),
        "exited after {:?}: {log}",
        stopping.elapsed()
    );
    assert_gone(grandchild, "the command's grandchild `sleep`");
    assert!(!log.contains("started:"), "never reported started: {log}");
    assert_eq!(version_sqlite(&w), "", "nothing applied");
}

#[test]
fn timeout_kills_the_group_and_the_password_stays_out_of_argv_and_logs() {
    let pg = PgDb::new("mig_cmd_pw");
    let w = Workdir::new();
    let password = "s3cr3t-Pw/with@odd";
    let pw_file = write_file(w.path(), "db-password", &format!("{password}\n"));
    let record = w.path().join("record.jsonl");
    let pidfile = w.path().join("sleep.pid");
    let db_extra = format!("password-file = \"{}\"", pw_file.display());
    let base = |env: &str| {
        config(
            &w,
            &pg.url,
            &db_extra,
            &format!(
                "timeout = \"3s\"\nenv = {{ FAKE_RECORD = \"{}\", FAKE_ECHO_URL = \"1\"{env} }}",
                record.display()
            ),
        )
    };
    w.write_config(
        "",
        &base(&format!(", FAKE_SLEEP_PIDFILE = \"{}\"", pidfile.display())),
    );
    let started = Instant::now();
    let out = w.cmd(&["run-job", "db.migrate"]).assert().code(1);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(stderr.contains("timed out after 3s"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_gone(wait_for_pid(&pidfile), "the command's grandchild `sleep`");

    // A failing run prints DATABASE_URL on stderr: the job's error masks it.
    w.write_config("", &base(", FAKE_FAIL = \"1\""));
    let out = w.cmd(&["migrate", "apply", "db"]).assert().code(1);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        stderr.contains("connecting to postgres://") && stderr.contains("***"),
        "{stderr}"
    );

    // The password reached the command's environment only.
    let runs = std::fs::read_to_string(&record).expect("record");
    let runs: Vec<serde_json::Value> = runs
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert!(
        runs.len() >= 4,
        "pending check and command, twice: {runs:?}"
    );
    for run in &runs {
        assert_eq!(run["env"]["PGPASSWORD"], password, "{run}");
        let url = run["env"]["DATABASE_URL"].as_str().expect("DATABASE_URL");
        let parsed = url::Url::parse(url).expect("url");
        assert_eq!(
            percent_decode(parsed.password().expect("a password in DATABASE_URL")),
            password
        );
        assert!(url.ends_with(&format!("/{}", pg.name)), "{url}");
        assert_eq!(run["env"]["DBKEEPER_DATABASE"], "db");
        assert!(!run["argv"].to_string().contains("s3cr3t"), "{run}");
    }
    let mut seen = stderr;
    seen += &w.stdout(&["history", "db.migrate"]);
    seen += &sqlite(&w.path().join("state/state.db"), "SELECT * FROM job_runs;");
    assert!(!seen.contains("s3cr3t"), "the password leaked: {seen}");
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .expect("utf-8")
        .into_owned()
}

#[test]
fn dry_run_on_copy_on_sqlite() {
    let w = Workdir::new();
    let record = w.path().join("record.jsonl");
    let cfg = |env: &str| {
        config(
            &w,
            &sqlite_url(&w),
            "",
            &format!("env = {{ FAKE_RECORD = \"{}\"{env} }}", record.display()),
        )
    };
    // Fails on the copy (its path names the dry run): the database is not touched.
    w.write_config("", &cfg(", FAKE_FAIL_IF = \"dryrun\""));
    w.cmd(&["migrate", "apply", "db", "--dry-run-on-copy"])
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("dry run on a scratch copy")
                .and(predicate::str::contains("the database was not touched"))
                .and(predicate::str::contains("boom in revision")),
        );
    assert_eq!(version_sqlite(&w), "");
    assert!(!tables_sqlite(&w).contains("users"));
    let upgrades = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains("\"upgrade\", \"head\"]"))
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("json");
                v["env"]["DATABASE_URL"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    let runs = upgrades(&std::fs::read_to_string(&record).expect("record"));
    assert_eq!(runs.len(), 1, "only on the copy: {runs:?}");
    assert!(runs[0].contains("dryrun") && !runs[0].contains("app.db"));

    // Succeeds on the copy, then runs on the database.
    std::fs::remove_file(&record).expect("rm");
    w.write_config("", &cfg(""));
    w.cmd(&["migrate", "apply", "db", "--dry-run-on-copy"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "after it succeeded on a scratch copy",
        ));
    let runs = upgrades(&std::fs::read_to_string(&record).expect("record"));
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(runs[0].contains("dryrun"));
    assert_eq!(runs[1], sqlite_url(&w));
    assert_eq!(version_sqlite(&w), "0002");
    // No scratch copy left behind.
    let leftovers: Vec<_> = walk(&w.path().join("state"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("dryrun"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn dry_run_on_copy_on_postgres() {
    let pg = PgDb::new("mig_cmd_copy");
    let w = Workdir::new();
    pg.sql("CREATE TABLE keep (id int); INSERT INTO keep VALUES (1), (2)");
    let has_users = || pg.sql("SELECT to_regclass('users') IS NOT NULL").trim() == "t";
    let scratch_left = || dry_run_databases(&pg);
    // The config switch; a command failing on the copy (its database name says so).
    w.write_config(
        "",
        &config(
            &w,
            &pg.url,
            "",
            "dry-run-on-copy = true\nenv = { FAKE_FAIL_IF = \"_dbk_dryrun_\" }",
        ),
    );
    w.cmd(&["migrate", "apply", "db"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("the database was not touched"));
    assert!(!has_users());
    assert_eq!(scratch_left(), "0", "the scratch database is dropped");

    w.write_config("", &config(&w, &pg.url, "", "dry-run-on-copy = true"));
    w.cmd(&["migrate", "apply", "db"]).assert().success();
    assert!(has_users());
    assert_eq!(pg.sql("SELECT count(*) FROM keep").trim(), "2");
    assert_eq!(scratch_left(), "0");
}

#[test]
fn config_mistakes_exit_2_with_a_clear_message() {
    let w = Workdir::new();
    let db = format!(
        "[[database]]\nname = \"db\"\nurl = \"{}\"\n",
        sqlite_url(&w)
    );
    let cases = [
        (
            "dir = \"/tmp\"\ncommand = [\"alembic\", \"upgrade\", \"head\"]",
            "cannot be combined with dir",
        ),
        ("command = []", "migrate.command: is empty"),
        ("command = [\"\"]", "migrate.command: is empty"),
        (
            "dir = \"/tmp\"\npending-command = [\"alembic\", \"check\"]",
            "migrate.pending-command: only applies to command migrations",
        ),
        ("schedule = \"@daily\"", "needs dir"),
        (
            "command = [\"x\"]\nenv = { DATABASE_URL = \"postgres://elsewhere\" }",
            "env.DATABASE_URL: is set by dbkeeper itself",
        ),
        // Adversary 15b, case 14: PGDATABASE in `env` reached the dry run.
        (
            "command = [\"x\"]\nenv = { PGDATABASE = \"prod\" }",
            "env.PGDATABASE: is set by dbkeeper itself",
        ),
        (
            "command = [\"x\"]\ndry-run-on-copy = true",
            "dry-run-on-copy: copies the pre-migration backup",
        ),
    ];
    for (migrate, message) in cases {
        let schedule = if migrate.contains("schedule") {
            ""
        } else {
            "schedule = \"manual\"\n"
        };
        w.write_config(
            "",
            &format!("{db}[database.migrate]\nbackup-first = false\n{schedule}{migrate}\n"),
        );
        w.cmd(&["check"])
            .assert()
            .code(2)
            .stderr(predicate::str::contains(message));
    }
    // --dry-run-on-copy without a pre-migration backup to copy.
    w.write_config(
        "",
        &format!("{db}[database.migrate]\nbackup-first = false\nschedule = \"manual\"\ncommand = [\"true\"]\n"),
    );
    w.cmd(&["migrate", "apply", "db", "--dry-run-on-copy"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("backup-first = true"));
    // `migrate plan` without a plan-command says what to add.
    w.cmd(&["migrate", "plan", "db"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("has no plan-command"));
    // `check` lists a command migration and says it runs none of its commands.
    sqlite(&w.path().join("app.db"), "CREATE TABLE t (i INTEGER);");
    w.cmd(&["check"])
        .assert()
        .success()
        .stdout(predicate::str::contains("check does not run commands"));
}

/// While one dbkeeper runs the command (holding the lock), another one waits for it
/// and gives up after `lock-wait`, running nothing.
fn second_migrator_waits(w: &Workdir, url: &str) {
    let pidfile = w.path().join("sleep.pid");
    let record = w.path().join("record.jsonl");
    w.write_config(
        "",
        &config(
            w,
            url,
            "",
            &format!(
                "lock-wait = \"1s\"\nenv = {{ FAKE_SLEEP_PIDFILE = \"{}\", FAKE_RECORD = \"{}\" }}",
                pidfile.display(),
                record.display()
            ),
        ),
    );
    let (first, grandchild) = start_sleeping(w, &["migrate", "apply", "db"], &pidfile);
    let runs_before = std::fs::read_to_string(&record)
        .expect("record")
        .lines()
        .count();
    w.cmd(&["migrate", "apply", "db"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "another migrator held the migration lock",
        ));
    let runs_after = std::fs::read_to_string(&record)
        .expect("record")
        .lines()
        .count();
    assert_eq!(runs_before, runs_after, "the second migrator ran nothing");
    sigterm(&first);
    let _ = first.wait_with_output();
    assert_gone(grandchild, "the first migrator's command");
}

#[test]
fn the_lock_keeps_a_second_migrator_out_on_sqlite_and_postgres() {
    let w = Workdir::new();
    second_migrator_waits(&w, &sqlite_url(&w));
    let pg = PgDb::new("mig_cmd_lock");
    let w = Workdir::new();
    second_migrator_waits(&w, &pg.url);
}

/// `--dry-run-on-copy` with a migrations directory: a failure on the copy leaves the
/// database without even the migrations before the failing one; once they all work on
/// the copy, they are applied to the database.
fn sqlx_dry_run(w: &Workdir, url: &str, applied: impl Fn() -> String) {
    let dir = w.path().join("migrations");
    write_file(
        &dir,
        "1_create.sql",
        "CREATE TABLE t (id INTEGER PRIMARY KEY);",
    );
    write_file(
        &dir,
        "2_broken.sql",
        "INSERT INTO no_such_table VALUES (1);",
    );
    let key = w.key("backup.key");
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"db\"\nurl = \"{url}\"\n{}[database.migrate]\nschedule = \"manual\"\ndir = \"{}\"\n",
            common::backup_table(&w.path().join("backups"), Some(&key), ""),
            dir.display()
        ),
    );
    w.cmd(&["migrate", "apply", "db", "--dry-run-on-copy"])
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("the database was not touched")
                .and(predicate::str::contains("2_broken.sql")),
        );
    assert_eq!(applied(), "", "not even migration 1 reached the database");
    write_file(&dir, "2_broken.sql", "INSERT INTO t VALUES (1);");
    w.cmd(&["migrate", "apply", "db", "--dry-run-on-copy"])
        .assert()
        .success()
        .stdout(predicate::str::contains("applied 2 migrations (1, 2)"));
    assert_eq!(applied(), "1,2");
}

#[test]
fn dry_run_on_copy_with_a_migrations_directory_on_sqlite_and_postgres() {
    let w = Workdir::new();
    let file = w.path().join("app.db");
    sqlite(&file, "CREATE TABLE keep (id INTEGER);");
    sqlx_dry_run(&w, &sqlite_url(&w), || {
        sqlite(
            &file,
            "CREATE TABLE IF NOT EXISTS _sqlx_migrations (version INTEGER, success BOOLEAN); SELECT coalesce(group_concat(version), '') FROM (SELECT version FROM _sqlx_migrations WHERE success ORDER BY version);",
        )
        .trim()
        .to_owned()
    });
    assert!(walk(&w.path().join("state"))
        .iter()
        .all(|p| !p.to_string_lossy().contains("dryrun")));

    let pg = PgDb::new("mig_dir_copy");
    let w = Workdir::new();
    sqlx_dry_run(&w, &pg.url, || {
        pg.sql("SELECT coalesce(string_agg(version::text, ',' ORDER BY version), '') FROM _sqlx_migrations WHERE success")
            .trim()
            .to_owned()
    });
    assert_eq!(dry_run_databases(&pg), "0");
}

/// How many scratch databases of dry runs of `pg` exist.
fn dry_run_databases(pg: &PgDb) -> String {
    psql(
        &format!("{}/postgres", common::pg_server()),
        &format!(
            "SELECT count(*) FROM pg_database WHERE datname LIKE '{}_dbk_dryrun_%'",
            pg.name
        ),
    )
    .trim()
    .to_owned()
}

// Adversary round 15b: how other tools are pointed at the database.

/// The JSON lines the fake recorded (`FAKE_RECORD`) for `upgrade head` runs.
fn upgrades(record: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
        .filter(|e| {
            let argv = e["argv"].to_string();
            argv.contains("upgrade") && !argv.contains("--sql")
        })
        .collect()
}

/// `pg_server()` with `user` instead of its user.
fn server_as(user: &str) -> String {
    let mut url = url::Url::parse(&common::pg_server()).expect("server URL");
    url.set_username(user).expect("user");
    url.to_string().trim_end_matches('/').to_owned()
}

#[test]
fn adversary_dbname_parameter_query_and_password_reach_every_tool_as_libpq_reads_them() {
    // Cases 01 (dbname= sent the dry run to the real database), 09 (a % in the
    // password), 14 (libpq variables from dbkeeper's environment), 17 (query values
    // re-encoded with +).
    let pg = PgDb::new("adv_dbname");
    let w = Workdir::new();
    let record = w.path().join("record.jsonl");
    let password = "pa%41ss/@word";
    let pwfile = write_file(w.path(), "pw", &format!("{password}\n"));
    let url = format!(
        "{}/not_this_one?dbname={}&application_name=my%20app",
        common::pg_server(),
        pg.name
    );
    // service= could name another database for libpq tools: refused (exit 2).
    let with_service = format!("{}/{}?service=prod", common::pg_server(), pg.name);
    w.write_config("", &config(&w, &with_service, "", ""));
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("url: has service="));
    w.write_config(
        "",
        &config(
            &w,
            &url,
            &format!("password-file = \"{}\"", pwfile.display()),
            &format!(
                "dry-run-on-copy = true\nenv = {{ FAKE_RECORD = \"{}\" }}",
                record.display()
            ),
        ),
    );
    w.cmd(&["migrate", "apply", "db"])
        .env("PGDATABASE", &pg.name)
        .env("PGSERVICE", "no_such_service")
        .assert()
        .success();
    let runs = upgrades(&record);
    assert_eq!(runs.len(), 2, "{runs:?}");
    let (copy, real) = (&runs[0], &runs[1]);
    let scratch = copy["connected_to"].as_str().expect("connected_to");
    assert!(
        scratch.starts_with(&format!("{}_dbk_dryrun_", pg.name)),
        "the dry run ran on {scratch}"
    );
    assert_eq!(copy["env"]["PGDATABASE"], scratch);
    assert_eq!(real["connected_to"], pg.name.as_str());
    assert_eq!(real["env"]["PGDATABASE"], pg.name.as_str());
    for run in &runs {
        let env_url = run["env"]["DATABASE_URL"].as_str().expect("DATABASE_URL");
        assert!(!env_url.contains("dbname="), "{env_url}");
        assert!(env_url.contains("application_name=my%20app"), "{env_url}");
        let parsed = url::Url::parse(env_url).expect("a URL");
        assert_eq!(
            percent_decode(parsed.password().expect("password")),
            password
        );
    }
    assert_eq!(dry_run_databases(&pg), "0");
}

#[test]
fn adversary_socket_urls_without_a_host_reach_the_database_for_every_tool() {
    // Round 2, case 08: libpq's `postgres://user@/db?host=/socket/dir` and
    // `postgresql:///db?host=…` were refused as "unparseable", a URL without a user
    // meant "anonymous" to sqlx, and a failover list failed with a confusing message.
    let pg = PgDb::new("adv_socket");
    let w = Workdir::new();
    let record = w.path().join("record.jsonl");
    let socket_dir = "/var/run/postgresql";
    assert!(
        Path::new(socket_dir).join(".s.PGSQL.5432").exists(),
        "the test server's socket"
    );
    let url = format!("postgres://postgres@/{}?host={socket_dir}", pg.name);
    w.write_config(
        "",
        &config(
            &w,
            &url,
            "",
            &format!(
                "dry-run-on-copy = true\nenv = {{ FAKE_RECORD = \"{}\" }}",
                record.display()
            ),
        ),
    );
    w.cmd(&["migrate", "apply", "db"]).assert().success();
    let runs = upgrades(&record);
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(runs[0]["connected_to"]
        .as_str()
        .is_some_and(|db| db.starts_with(&format!("{}_dbk_dryrun_", pg.name))));
    assert_eq!(runs[1]["connected_to"], pg.name.as_str());
    for run in &runs {
        assert_eq!(run["env"]["PGHOST"], socket_dir);
        assert_eq!(run["env"]["PGUSER"], "postgres");
    }
    assert_eq!(
        pg.sql("SELECT to_regclass('users') IS NOT NULL").trim(),
        "t"
    );
    assert_eq!(pre_migration_archives(&w).len(), 1);
    // No user: the operating-system user (a role of the test server), as libpq and
    // pg_dump take it; sqlx alone took "anonymous", which no server knows.
    let url = format!("postgresql:///{}?host=%2Fvar%2Frun%2Fpostgresql", pg.name);
    w.write_config(
        "",
        &config(&w, &url, "", "env = { FAKE_RECORD = \"/dev/null\" }"),
    );
    w.cmd(&["check"])
        .assert()
        .success()
        .stdout(predicate::str::contains("reachable"));
    w.cmd(&["run-job", "db.backup"]).assert().success();
    for several in [
        format!("postgres://127.0.0.1,localhost/{}", pg.name),
        format!("postgres://postgres@127.0.0.1:5432,[::1]:5432/{}", pg.name),
        format!("postgres:///{}?host=/var/run/postgresql,/tmp", pg.name),
    ] {
        w.write_config("", &config(&w, &several, "", ""));
        w.cmd(&["check"])
            .assert()
            .code(2)
            .stderr(predicate::str::contains("\"db\".url: several hosts"));
    }
}

/// A login role for a test, dropped (with the database named like it) at the end.
struct Role(PgDb);

impl Drop for Role {
    fn drop(&mut self) {
        let server = format!("{}/postgres", common::pg_server());
        let _ = Command::new("psql")
            .args([&server, "-qAtc"])
            .arg(format!(
                "DROP DATABASE IF EXISTS \"{0}\" WITH (FORCE); DROP ROLE IF EXISTS \"{0}\"",
                self.0.name
            ))
            .output();
    }
}

#[test]
fn adversary_a_url_without_a_database_means_the_user_name_for_every_tool() {
    // Case 11: sqlx used the user name, pg_dump and the command `postgres`.
    let role = Role(PgDb::new("adv_nodb"));
    let name = role.0.name.clone();
    psql(
        &format!("{}/postgres", common::pg_server()),
        &format!("CREATE ROLE {name} LOGIN SUPERUSER"),
    );
    let w = Workdir::new();
    let record = w.path().join("record.jsonl");
    w.write_config(
        "",
        &config(
            &w,
            &server_as(&name),
            "",
            &format!("env = {{ FAKE_RECORD = \"{}\" }}", record.display()),
        ),
    );
    w.cmd(&["migrate", "apply", "db"]).assert().success();
    let runs = upgrades(&record);
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["connected_to"], name.as_str());
    assert_eq!(
        role.0.sql("SELECT to_regclass('users') IS NOT NULL").trim(),
        "t"
    );
    assert_eq!(pre_migration_archives(&w).len(), 1);
}

#[test]
fn adversary_sqlite_paths_reach_the_command_percent_encoded() {
    // Case 05: `app?v2.db` reached a URL-aware tool as `…/app`.
    let w = Workdir::new();
    let file = w.path().join("app?v2.db");
    sqlite(&file, "CREATE TABLE keep (x); INSERT INTO keep VALUES (1);");
    let url = format!("sqlite://{}/app%3Fv2.db", w.path().display());
    w.write_config("", &config(&w, &url, "", "dry-run-on-copy = true"));
    w.cmd(&["migrate", "apply", "db"]).assert().success();
    assert_eq!(
        sqlite(&file, "SELECT version_num FROM alembic_version;").trim(),
        "0002"
    );
    assert!(!w.path().join("app").is_file(), "another file was migrated");
}

#[test]
fn adversary_a_crashed_dry_runs_scratch_database_is_dropped_before_the_next() {
    // Case 13: `<db>_dbk_dryrun_<hex>` outlived a kill -9 for good.
    let pg = PgDb::new("adv_leftover");
    let leftover = PgDb {
        name: format!("{}_dbk_dryrun_0a1b2c3d", pg.name),
        url: format!("{}/{}_dbk_dryrun_0a1b2c3d", common::pg_server(), pg.name),
    };
    psql(
        &format!("{}/postgres", common::pg_server()),
        &format!("CREATE DATABASE {}", leftover.name),
    );
    common::mark_scratch(&leftover.name);
    let w = Workdir::new();
    w.write_config("", &config(&w, &pg.url, "", "dry-run-on-copy = true"));
    w.cmd(&["migrate", "apply", "db"]).assert().success();
    assert!(
        !leftover.exists(),
        "the crashed dry run's copy is still there"
    );
    assert_eq!(dry_run_databases(&pg), "0");
}

#[test]
fn adversary_the_sqlite_lock_is_shared_by_every_path_to_the_file() {
    // Case 03: a symbolic link got a lock file of its own.
    let w = Workdir::new();
    let real_dir = w.path().join("a");
    let link_dir = w.path().join("b");
    std::fs::create_dir_all(&real_dir).expect("dir");
    std::fs::create_dir_all(&link_dir).expect("dir");
    sqlite(&real_dir.join("app.db"), "CREATE TABLE keep (x);");
    std::os::unix::fs::symlink(real_dir.join("app.db"), link_dir.join("app.db")).expect("link");
    // Another migrator holds the lock of the real path.
    let lock = real_dir.join("app.db.dbkeeper-migrate.lock");
    let mut holder = Command::new("python3")
        .args([
            "-c",
            "import fcntl, sys, time\nf = open(sys.argv[1], 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)",
        ])
        .arg(&lock)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read");
    assert_eq!(line.trim(), "locked");
    let url = format!("sqlite://{}", link_dir.join("app.db").display());
    w.write_config(
        "",
        &config(&w, &url, "", "backup-first = false\nlock-wait = \"1s\""),
    );
    let out = w.cmd(&["migrate", "apply", "db"]).assert().code(1);
    let _ = holder.kill();
    let _ = holder.wait();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(stderr.contains("lock"), "{stderr}");
    assert_eq!(
        sqlite(
            &real_dir.join("app.db"),
            "SELECT count(*) FROM sqlite_master WHERE name = 'users';"
        )
        .trim(),
        "0",
        "ran while another migrator held the lock"
    );
}

#[test]
fn adversary_a_sqlite_database_with_hard_links_is_not_migrated() {
    // Round 2, case 07: a hard link to the database took a lock file of its own, so two
    // configs migrated the same file at once.
    let w = Workdir::new();
    std::fs::create_dir_all(w.path().join("a")).expect("dir");
    std::fs::create_dir_all(w.path().join("b")).expect("dir");
    let real = w.path().join("a/app.db");
    sqlite(&real, "CREATE TABLE keep (x);");
    std::fs::hard_link(&real, w.path().join("b/app.db")).expect("hard link");
    for path in [real.clone(), w.path().join("b/app.db")] {
        let url = format!("sqlite://{}", path.display());
        w.write_config("", &config(&w, &url, "", "backup-first = false"));
        let out = w.cmd(&["migrate", "apply", "db"]).assert().code(1);
        let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
        assert!(stderr.contains("has 2 hard links"), "{stderr}");
    }
    assert_eq!(
        sqlite(
            &real,
            "SELECT count(*) FROM sqlite_master WHERE name = 'users';"
        )
        .trim(),
        "0",
        "a database with hard links was migrated"
    );
    // With the other link gone, it is.
    std::fs::remove_file(w.path().join("b/app.db")).expect("unlink");
    let url = format!("sqlite://{}", real.display());
    w.write_config("", &config(&w, &url, "", "backup-first = false"));
    w.cmd(&["migrate", "apply", "db"]).assert().success();
}

/// A PostgreSQL database `db` with `password` in a password-file, whose migration
/// command is `python3 -c SCRIPT` (no backup); `extra` goes in `[database.migrate]`.
fn script_config(w: &Workdir, pg: &PgDb, password: &str, script: &str, extra: &str) -> String {
    let pwfile = write_file(w.path(), "pw", password);
    format!(
        "[[database]]\nname = \"db\"\nurl = \"{}\"\npassword-file = \"{}\"\n\
         [database.migrate]\nschedule = \"manual\"\nbackup-first = false\n\
         command = [\"python3\", \"-c\", {script:?}]\n{extra}\n",
        pg.url,
        pwfile.display()
    )
}

#[test]
fn adversary_the_password_is_masked_before_the_output_is_cut() {
    // Case 15: the kept tail began inside the password.
    let pg = PgDb::new("adv_cut");
    let w = Workdir::new();
    let password = "Zq8-secret-Password-777x";
    let script = "import os, sys\npw = os.environ['PGPASSWORD']\n\
                  sys.stderr.write('x' * 100000 + pw + 'y' * (32768 - 10))\nsys.exit(1)";
    w.write_config("", &script_config(&w, &pg, password, script, ""));
    let out = w.cmd(&["migrate", "apply", "db"]).assert().code(1);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        stderr.contains("earlier bytes not kept"),
        "{}",
        &stderr[..200]
    );
    for n in 4..=password.len() {
        assert!(
            !stderr.contains(&password[password.len() - n..]),
            "{n} bytes of the password leaked"
        );
    }
}

#[test]
fn adversary_migrate_plan_masks_the_password_and_shows_a_failed_plans_output() {
    // Case 08.
    let pg = PgDb::new("adv_plan");
    let w = Workdir::new();
    let password = "Zq8-plan-s3cr3t";
    let with_plan = |script: &str| {
        let plan = format!("plan-command = [\"python3\", \"-c\", {script:?}]");
        w.write_config("", &script_config(&w, &pg, password, "pass", &plan));
    };
    with_plan("import os\nprint(os.environ['DATABASE_URL'])");
    let plan = w.stdout(&["migrate", "plan", "db"]);
    assert!(plan.contains(":***@"), "{plan}");
    assert!(!plan.contains(password), "{plan}");
    with_plan("print('the plan says no')\nraise SystemExit(3)");
    w.cmd(&["migrate", "plan", "db"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("the plan says no"));
}

/// A new PostgreSQL database and `migrate apply` running on it, its command
/// sleeping: (database, workdir, dbkeeper, the command's sleeping child).
fn pg_apply_sleeping(tag: &str, extra: &str) -> (PgDb, Workdir, std::process::Child, u32) {
    let pg = PgDb::new(tag);
    let w = Workdir::new();
    let (pidfile, cfg) = sleeper_config_for(&w, &pg.url, extra);
    w.write_config("", &cfg);
    let (child, grandchild) = start_sleeping(&w, &["migrate", "apply", "db"], &pidfile);
    (pg, w, child, grandchild)
}

#[test]
fn adversary_losing_the_lock_session_stops_the_command() {
    // Case 18: the lock's session ended while the command ran, and nobody noticed.
    let (pg, _w, child, grandchild) = pg_apply_sleeping("adv_lost", "");
    // The session holding the command lock ("dbkmigcd") on this database.
    let ended = pg.sql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' \
         AND classid = 1684171629 AND objid = 1768383332 AND objsubid = 1 \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    );
    assert_eq!(ended.trim(), "1", "the lock session");
    let out = child.wait_with_output().expect("dbkeeper");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("migration lock") && stderr.contains("was lost"),
        "{stderr}"
    );
    assert!(stderr.contains("pre-migration backup"), "{stderr}");
    assert_gone(grandchild, "the command's child");
}

#[test]
fn adversary_a_timed_out_migration_names_its_pre_migration_backup() {
    // Case 16.
    let w = Workdir::new();
    let (pidfile, cfg) = sleeper_config(&w, "timeout = \"3s\"");
    w.write_config("", &cfg);
    let (child, grandchild) = start_sleeping(&w, &["migrate", "apply", "db"], &pidfile);
    let out = child.wait_with_output().expect("dbkeeper");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let pre = pre_migration_archives(&w);
    assert_eq!(pre.len(), 1);
    let id = backup_id(&pre[0]);
    assert!(
        stderr.contains("timed out")
            && stderr.contains("may still run")
            && stderr.contains(&format!("pre-migration backup {id}")),
        "{stderr}"
    );
    assert_gone(grandchild, "the command's child");
}

#[test]
fn adversary_rotation_keeps_the_pre_migration_backup_a_failure_names() {
    // Case 07: keep = { last = 1 } pruned it with the next ordinary backup.
    let w = Workdir::new();
    let cfg = config(&w, &sqlite_url(&w), "", "env = { FAKE_FAIL = \"1\" }").replace(
        "[database.backup]\n",
        "[database.backup]\nkeep = { last = 1 }\n",
    );
    w.write_config("", &cfg);
    w.cmd(&["migrate", "apply", "db"]).assert().code(1);
    let pre = pre_migration_archives(&w);
    assert_eq!(pre.len(), 1);
    w.cmd(&["run-job", "db.backup"]).assert().success();
    w.cmd(&["run-job", "db.backup"]).assert().success();
    assert!(pre[0].exists(), "the pre-migration backup was rotated away");
    assert_eq!(archives(&w.path().join("backups"), "db").len(), 2);

    // Round 2, case 04: a second failing attempt takes a new pre-migration backup (of
    // the half-migrated database), the newest one; the first stays pinned through it
    // and through ordinary backups, until a migration succeeds.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    w.cmd(&["migrate", "apply", "db"]).assert().code(1);
    assert_eq!(pre_migration_archives(&w).len(), 2);
    w.cmd(&["run-job", "db.backup"]).assert().success();
    assert!(
        pre[0].exists(),
        "the first failure's backup was rotated away"
    );
    let dry = w.stdout(&["backup", "prune", "db", "--dry-run"]);
    assert!(dry.contains("pinned: a failed migration named it"), "{dry}");
    w.write_config(
        "",
        &config(&w, &sqlite_url(&w), "", "").replace(
            "[database.backup]\n",
            "[database.backup]\nkeep = { last = 1 }\n",
        ),
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    w.cmd(&["migrate", "apply", "db"]).assert().success();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    w.cmd(&["run-job", "db.backup"]).assert().success();
    assert!(!pre[0].exists(), "released once a migration succeeded");
    assert_eq!(archives(&w.path().join("backups"), "db").len(), 2);
}

/// A SQLite database `app` whose migration command changes the database, then fails
/// (`keep = { last = 1 }`, manual schedules); with `state`, a whole configuration
/// with that state directory, else the part after `[daemon]` for `write_config`.
fn half_migrating(w: &Workdir, state: Option<&str>, pending: &str) -> String {
    let db = w.path().join("app.db");
    if !db.exists() {
        sqlite(&db, "CREATE TABLE t (x); INSERT INTO t VALUES ('clean');");
        w.key("key");
    }
    let script = "import sqlite3, os, sys\n\
                  c = sqlite3.connect(os.environ['DBKEEPER_DATABASE_PATH'])\n\
                  c.execute(\"UPDATE t SET x = x || '+half'\"); c.commit(); sys.exit(1)";
    let daemon = state.map_or(String::new(), |state| {
        format!("[daemon]\nstate-dir = \"{}/{state}\"\n", w.path().display())
    });
    format!(
        "{daemon}[[database]]\nname = \"app\"\nurl = \"sqlite://{dir}/app.db\"\n\
         [database.backup]\nschedule = \"manual\"\ndestination = \"{dir}/bk\"\n\
         encryption-key-file = \"{dir}/key\"\nkeep = {{ last = 1 }}\n\
         [database.migrate]\nschedule = \"manual\"\n\
         command = [\"python3\", \"-c\", {script:?}]\n{pending}\n",
        dir = w.path().display()
    )
}

fn first_pre_migration(w: &Workdir) -> PathBuf {
    let mut pre: Vec<PathBuf> = archives(&w.path().join("bk"), "app")
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("pre-migration"))
        .collect();
    pre.sort();
    pre.into_iter().next().expect("a pre-migration backup")
}

#[test]
fn adversary3_case02_a_second_configuration_never_rotates_a_pinned_backup_away() {
    // Round 3, case 02: the pins lived in the migrating configuration's state
    // directory; a daemon with another state directory, same destination, pruned the
    // only clean backup.
    let w = Workdir::new();
    let deploy = w.path().join("deploy.toml");
    let daemon = w.path().join("daemon.toml");
    std::fs::write(&deploy, half_migrating(&w, Some("state-deploy"), "")).expect("config");
    std::fs::write(&daemon, half_migrating(&w, Some("state-daemon"), "")).expect("config");
    let run = |cfg: &Path, args: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args).arg("-c").arg(cfg);
        let status = cmd.status().expect("dbkeeper");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        status.code()
    };
    assert_eq!(run(&deploy, &["migrate", "apply", "app"]), Some(1));
    let first = first_pre_migration(&w);
    assert_eq!(run(&deploy, &["migrate", "apply", "app"]), Some(1));
    assert_eq!(run(&daemon, &["run-job", "app.backup"]), Some(0));
    assert_eq!(run(&daemon, &["run-job", "app.backup"]), Some(0));
    assert!(
        first.exists(),
        "another configuration rotated the pinned backup away"
    );
}

#[test]
fn adversary3_case03_a_damaged_pin_record_stops_rotation() {
    // Round 3, case 03: a damaged pinned-backups.json (the first version's record) was
    // read as "no pins" and the retry pruned the pinned backup.
    let w = Workdir::new();
    w.write_config("", &half_migrating(&w, None, ""));
    w.cmd(&["migrate", "apply", "app"]).assert().code(1);
    let first = first_pre_migration(&w);
    std::fs::write(
        w.path().join("state/pinned-backups.json"),
        "{\"app\": {\"2026",
    )
    .expect("damage");
    // Pins are markers beside the backups now: the damaged record must not release
    // them, and it stops rotation rather than being read as empty.
    let marker = std::fs::read_dir(w.path().join("bk/app"))
        .expect("folder")
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains(".pin.app"));
    assert!(marker, "the pin marker beside the backup");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let out = w.cmd(&["run-job", "app.backup"]).assert().code(1);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        stderr.contains("pinned-backups.json is damaged"),
        "{stderr}"
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    w.cmd(&["migrate", "apply", "app"]).assert().code(1);
    assert!(first.exists(), "the pinned backup was rotated away");
    std::fs::remove_file(w.path().join("state/pinned-backups.json")).expect("remove");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    w.cmd(&["run-job", "app.backup"]).assert().success();
    assert!(first.exists(), "the pinned backup was rotated away");
}

#[test]
fn adversary3_case04_an_up_to_date_verdict_releases_no_pin() {
    // Round 3, case 04: a pending-command that said "up to date" of a half-migrated
    // database released the pins, and the next backup pruned the only clean one.
    let w = Workdir::new();
    w.write_config("", &half_migrating(&w, None, ""));
    w.cmd(&["migrate", "apply", "app"]).assert().code(1);
    let first = first_pre_migration(&w);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    w.write_config(
        "",
        &half_migrating(&w, None, "pending-command = [\"true\"]"),
    );
    w.cmd(&["migrate", "apply", "app"])
        .assert()
        .success()
        .stdout(predicate::str::contains("up to date"));
    w.cmd(&["run-job", "app.backup"]).assert().success();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    w.cmd(&["run-job", "app.backup"]).assert().success();
    assert!(first.exists(), "an up-to-date verdict released the pin");
}

#[test]
fn adversary4_case02_a_pinned_archive_whose_manifest_went_missing_is_kept() {
    // Round 4, case 02: the clean-up of interrupted writes deleted a pinned
    // pre-migration archive once its manifest was gone.
    let w = Workdir::new();
    w.write_config("", &half_migrating(&w, None, ""));
    w.cmd(&["migrate", "apply", "app"]).assert().code(1);
    let first = first_pre_migration(&w);
    let manifest = first.with_extension("manifest.json");
    std::fs::remove_file(&manifest).expect("manifest");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    w.cmd(&["run-job", "app.backup"]).assert().success();
    assert!(first.exists(), "the pinned archive was cleaned away");
}

/// A command that starts `sleep 300` in a session of its own (out of its process
/// group, as a daemonising helper does), writes its pid to `pidfile`, then sleeps
/// `secs` (0: exits at once).
fn escaping_command(pidfile: &Path, secs: u32) -> String {
    let script = format!(
        "import subprocess, sys, time\n\
         p = subprocess.Popen(['sleep', '300'], start_new_session=True)\n\
         open(sys.argv[1] + '.tmp', 'w').write(str(p.pid))\n\
         import os; os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n\
         time.sleep({secs})"
    );
    format!(
        "command = [\"python3\", \"-c\", {script:?}, \"{}\"]",
        pidfile.display()
    )
}

#[test]
fn adversary_a_child_that_left_the_process_group_is_killed_too() {
    // Cases 02 (timeout) and 02b (normal exit): a `setsid` child outlived the command.
    let w = Workdir::new();
    let pidfile = w.path().join("escaped.pid");
    for (secs, extra, code) in [(600, "timeout = \"3s\"", 1), (0, "", 0)] {
        let _ = std::fs::remove_file(&pidfile);
        let cfg = config(&w, &sqlite_url(&w), "", extra);
        let cfg = cfg
            .lines()
            .filter(|l| !l.starts_with("command =") && !l.starts_with("pending-command ="))
            .collect::<Vec<_>>()
            .join("\n");
        w.write_config(
            "",
            &format!(
                "{cfg}\nbackup-first = false\n{}\n",
                escaping_command(&pidfile, secs)
            ),
        );
        w.cmd(&["migrate", "apply", "db"]).assert().code(code);
        let escaped = wait_for_pid(&pidfile);
        assert_gone(escaped, "the command's child in a session of its own");
    }
}

#[test]
fn adversary_a_command_whose_dbkeeper_died_keeps_the_next_run_out() {
    // Case 06: after kill -9 of dbkeeper the command ran on, and a second apply
    // started at once.
    // Round 2, case 07: the second config spelled the same database another way (the
    // socket rather than 127.0.0.1, no user name) and did not see the orphan.
    let (pg, w, mut child, grandchild) = pg_apply_sleeping("adv_orphan", "backup-first = false");
    child.kill().expect("SIGKILL dbkeeper");
    let _ = child.wait();
    let by_socket = format!(
        "postgresql:///{}?host=/var/run/postgresql&user=postgres",
        pg.name
    );
    w.write_config("", &config(&w, &by_socket, "", "backup-first = false"));
    let out = w.cmd(&["migrate", "apply", "db"]).assert().code(1);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert_eq!(
        pg.sql("SELECT to_regclass('users') IS NOT NULL").trim(),
        "f",
        "the second run applied while the first command ran"
    );
    // "(pid 123, 124)": the fake and its sleeping child.
    let pids: Vec<u32> = stderr
        .split("(pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .map(|list| list.split(", ").filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default();
    for pid in &pids {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    assert!(
        stderr.contains("still running") && pids.contains(&grandchild),
        "{stderr}"
    );
    for pid in pids {
        assert_gone(pid, "the orphaned command");
    }
    // Once it is gone, the next run applies.
    w.cmd(&["migrate", "apply", "db"]).assert().success();
}

#[test]
fn adversary_a_restore_test_on_a_dbname_url_restores_into_its_scratch_database() {
    // Case 01, second half: verify = "restore" restored into the real database.
    let pg = PgDb::new("adv_verify");
    pg.sql("CREATE TABLE keep (id int PRIMARY KEY); INSERT INTO keep VALUES (1), (2)");
    let w = Workdir::new();
    let key = w.key("backup.key");
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"db\"\nurl = \"{}/elsewhere?dbname={}\"\n{}",
            common::pg_server(),
            pg.name,
            common::backup_table(
                &w.path().join("backups"),
                Some(&key),
                "verify = \"restore\""
            )
        ),
    );
    w.cmd(&["run-job", "db.backup"]).assert().success();
    assert_eq!(pg.sql("SELECT count(*) FROM keep").trim(), "2");
    assert_eq!(
        psql(
            &format!("{}/postgres", common::pg_server()),
            &format!(
                "SELECT count(*) FROM pg_database WHERE datname LIKE '{}_dbk_%'",
                pg.name
            ),
        )
        .trim(),
        "0"
    );
}

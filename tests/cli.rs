//! The one-shot commands, run as the real binary: `check`, `run-job`, `history`,
//! `jobs`, and how bad input is answered.

mod common;

use std::path::Path;

use common::{PgDb, Workdir, BIN};
use predicates::prelude::*;

fn repo_file(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(rel)
        .display()
        .to_string()
}

/// The demo config copied to `<root>/config/demo.toml`, so that its `../var`
/// (relative paths are read from the config file's directory) is `<root>/var`.
fn demo_copy(root: &Path) -> String {
    let dir = root.join("config");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let file = dir.join("demo.toml");
    std::fs::copy(repo_file("config/demo.toml"), &file).expect("copy demo.toml");
    file.display().to_string()
}

#[test]
fn check_on_the_demo_config_prints_three_run_times_per_job() {
    let root = tempfile::tempdir().expect("tmp");
    let config = demo_copy(root.path());
    // Run from elsewhere: paths are the config's, not the working directory's.
    let cwd = tempfile::tempdir().expect("tmp");
    let out = assert_cmd::Command::new(BIN)
        .args(["check", "-c", &config])
        .current_dir(cwd.path())
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let text = String::from_utf8_lossy(&out);
    let jobs: Vec<&str> = text.lines().filter(|l| l.starts_with("job ")).collect();
    assert_eq!(jobs.len(), 3, "{text}");
    for line in jobs {
        assert_eq!(line.matches(", ").count() + 1, 3, "three run times: {line}");
    }
    assert!(
        text.contains("demo.sql.heartbeat")
            && text.contains(&format!(
                "{} does not exist yet",
                root.path().join("var/demo.db").display()
            )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "key file {} does not exist yet",
            root.path().join("var/demo.key").display()
        )),
        "{text}"
    );
    assert!(
        !root.path().join("var").exists() && std::fs::read_dir(cwd.path()).unwrap().count() == 0,
        "check only looks: no database, key or directory is created"
    );
}

/// Every file under `root` with its size, mode, modification time and contents.
fn snapshot(root: &Path) -> Vec<(String, u64, u32, std::time::SystemTime, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            let name = path
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            let modified = meta.modified().expect("mtime");
            if meta.is_dir() {
                stack.push(path);
                out.push((name, 0, meta.mode(), modified, Vec::new()));
            } else {
                let bytes = std::fs::read(&path).expect("read");
                out.push((name, meta.len(), meta.mode(), modified, bytes));
            }
        }
    }
    out.sort();
    out
}

/// `check`, `jobs`, `history` and `backup list` only look: on a fresh tree they
/// create nothing, and after the daemon's jobs have run they change no file (no
/// key, no database, no `-wal`/`-shm` beside the run history, no directory).
#[test]
fn read_only_commands_create_and_change_nothing() {
    let cwd = tempfile::tempdir().expect("tmp");
    let config = demo_copy(cwd.path());
    let read_only: [&[&str]; 5] = [
        &["check"],
        &["jobs"],
        &["history"],
        &["backup", "list"],
        &["backup", "list", "demo"],
    ];
    let run = |args: &[&str]| {
        assert_cmd::Command::new(BIN)
            .args(args)
            .args(["-c", &config])
            .current_dir(cwd.path())
            .output()
            .expect("run")
    };
    for args in read_only {
        let out = run(args);
        assert!(
            !cwd.path().join("var").exists(),
            "{args:?} created files: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for job in ["demo.sql.heartbeat", "demo.backup"] {
        let out = run(&["run-job", job]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let before = snapshot(cwd.path());
    assert!(
        before.iter().any(|(n, ..)| n == "var/demo.key"),
        "{before:?}"
    );
    // mtimes are compared, so give a write something to show.
    std::thread::sleep(std::time::Duration::from_millis(20));
    for args in read_only {
        let out = run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let after = snapshot(cwd.path());
        let names = |s: &[(String, u64, u32, std::time::SystemTime, Vec<u8>)]| {
            s.iter().map(|f| f.0.clone()).collect::<Vec<_>>()
        };
        assert_eq!(
            names(&after),
            names(&before),
            "{args:?} created or removed files"
        );
        assert!(after == before, "{args:?} changed a file");
    }
}

#[test]
fn config_errors_exit_2_with_file_and_position() {
    let w = Workdir::new();
    let lite = format!(
        "[[database]]\nname = \"lite\"\nurl = \"{}\"\n",
        w.sqlite_url("l.db")
    );
    let cases = [
        (format!("{lite}colour = \"blue\"\n"), "dbkeeper.toml:8:1: unknown field `colour`"),
        ("[daemon]\nmax-concurrent-jobs = \"many\"\n".to_owned(), "dbkeeper.toml:6:23:"),
        (
            format!("{lite}[[database.sql]]\nname = \"x\"\nstatement = \"SELECT 1\"\nschedule = \"0 0 99 * * *\"\n"),
            "invalid schedule",
        ),
        (format!("{lite}{lite}"), "database \"lite\".name: is used by two databases"),
        ("[daemon]\nshutdown-grace = \"soon\"\n".to_owned(), "dbkeeper.toml:6:18:"),
    ];
    for (body, expected) in cases {
        std::fs::write(w.config_path(), format!("# 1\n# 2\n# 3\n# 4\n{body}")).expect("write");
        w.cmd(&["check"])
            .assert()
            .code(2)
            .stderr(predicate::str::contains(expected))
            .stderr(predicate::function(|s: &str| {
                s.trim_end().lines().count() == 1
            }));
    }
    assert_cmd::Command::new(BIN)
        .args(["check", "-c", "/nonexistent/dbkeeper.toml"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "cannot read config file /nonexistent/dbkeeper.toml",
        ));
    // $DBKEEPER_CONFIG is used when -c is absent.
    assert_cmd::Command::new(BIN)
        .arg("jobs")
        .env("DBKEEPER_CONFIG", "/nonexistent/from-env.toml")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("/nonexistent/from-env.toml"));
}

#[test]
fn check_exits_1_when_a_database_is_unreachable_and_redacts_the_url() {
    let w = Workdir::new();
    w.write_config(
        "",
        "[[database]]\nname = \"down\"\nurl = \"postgres://app:hunter2@127.0.0.1:1/x\"\nconnect-timeout = \"1s\"\n",
    );
    w.cmd(&["check"])
        .assert()
        .code(1)
        .stdout(predicate::str::contains("UNREACHABLE"))
        .stdout(predicate::str::contains("hunter2").not())
        .stderr(predicate::str::contains("hunter2").not());
}

#[test]
fn run_job_exit_codes_and_history() {
    let w = Workdir::new();
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"lite\"\nurl = \"{}\"\n\
             [[database.sql]]\nname = \"good\"\nstatement = \"CREATE TABLE IF NOT EXISTS t(x); INSERT INTO t VALUES (1)\"\nschedule = \"manual\"\n\
             [[database.sql]]\nname = \"bad\"\nstatement = \"INSERT INTO missing VALUES (1)\"\nschedule = \"@daily\"\n",
            w.sqlite_url("lite.db")
        ),
    );
    w.cmd(&["run-job", "lite.sql.good"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "lite.sql.good: success: 1 rows affected",
        ));
    w.cmd(&["run-job", "lite.sql.bad"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no such table: missing"));
    w.cmd(&["run-job", "lite.sql.nope"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no job \"lite.sql.nope\""))
        .stderr(predicate::str::contains("lite.sql.good, lite.sql.bad"));

    let history = w.stdout(&["history"]);
    let rows: Vec<&str> = history.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{history}");
    assert!(
        rows[0].contains("lite.sql.bad")
            && rows[0].contains("failure")
            && rows[0].contains("manual")
    );
    assert!(rows[1].contains("lite.sql.good") && rows[1].contains("success"));
    let one = w.stdout(&["history", "lite.sql.good", "-n", "5"]);
    assert_eq!(one.lines().count(), 2);

    let jobs = w.stdout(&["jobs"]);
    let good = jobs
        .lines()
        .find(|l| l.starts_with("lite.sql.good"))
        .expect("good row");
    assert!(
        good.contains("manual") && good.contains("success"),
        "{jobs}"
    );
    let bad = jobs
        .lines()
        .find(|l| l.starts_with("lite.sql.bad"))
        .expect("bad row");
    assert!(
        bad.contains("failure") && bad.contains("00:00:00 UTC"),
        "{jobs}"
    );
}

#[test]
fn timeout_and_retries_are_enforced() {
    let pg = PgDb::new("retry");
    let w = Workdir::new();
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"pg\"\nurl = \"{}\"\n\
             [[database.sql]]\nname = \"slow\"\nstatement = \"SELECT pg_sleep(30)\"\nschedule = \"manual\"\n\
             timeout = \"1s\"\nretries = 1\nretry-backoff = \"1s\"\n",
            pg.url
        ),
    );
    let started = std::time::Instant::now();
    w.cmd(&["run-job", "pg.sql.slow"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("timed out after 1s"));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let history = w.stdout(&["history"]);
    let row = history.lines().nth(1).unwrap_or_default().to_owned();
    // TOOK, then ATTEMPTS = 2 (one retry)
    assert!(
        row.contains("failure") && row.split_whitespace().any(|c| c == "2"),
        "{row}"
    );
    assert_eq!(
        pg.sleeping_sessions(),
        0,
        "timed-out statements are stopped on the server"
    );
}

#[test]
fn help_lists_the_commands() {
    assert_cmd::Command::new(BIN)
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("run-job").and(predicate::str::contains("Exit codes")));
}

//! Log output of the real binary: plain text by default, JSON lines with
//! `--log-format json`, and under journald (stderr is `JOURNAL_STREAM`) structured
//! entries with priorities and the job's fields — or, without the journal's socket,
//! text lines carrying a `<N>` priority prefix.
//!
//! There is no systemd in the test machines, so `systemd-run --user` cannot be used.
//! journald is faked instead: tracing-journald always writes to
//! `/run/systemd/journal/socket`, so the binary runs in a private mount namespace
//! (`unshare --mount`, root only) whose `/run` is an empty tmpfs, with a datagram socket
//! of the test's bind-mounted at that path. Where namespaces are not allowed the
//! journald tests say so and return.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Workdir, BIN};

/// A SQLite database `lite` whose job `lite.sql.bad` fails at once, and an unreachable
/// PostgreSQL database `pg` whose `pg.sql.ping` fails after one retry.
fn workdir() -> Workdir {
    let w = Workdir::new();
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"lite\"\nurl = \"{}\"\n\
             [[database.sql]]\nname = \"bad\"\nstatement = \"INSERT INTO missing VALUES (1)\"\nschedule = \"manual\"\n\
             [[database]]\nname = \"pg\"\nurl = \"postgres://postgres@127.0.0.1:1/app\"\nconnect-timeout = \"1s\"\n\
             [[database.sql]]\nname = \"ping\"\nstatement = \"SELECT 1\"\nschedule = \"manual\"\n\
             retries = 1\nretry-backoff = \"100ms\"\n",
            w.sqlite_url("lite.db")
        ),
    );
    w
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn text_logs_outside_the_journal_are_plain_lines() {
    let w = workdir();
    // A JOURNAL_STREAM that is not stderr (inherited by a child whose stderr was
    // redirected) changes nothing.
    for stream in [None, Some("1:1")] {
        let mut cmd = w.cmd(&["run-job", "lite.sql.bad"]);
        if let Some(s) = stream {
            cmd.env("JOURNAL_STREAM", s);
        } else {
            cmd.env_remove("JOURNAL_STREAM");
        }
        let out = cmd.output().expect("run");
        assert_eq!(out.status.code(), Some(1));
        let log = text(&out);
        let failed = log
            .lines()
            .find(|l| l.contains("job failed"))
            .unwrap_or_else(|| panic!("no failure line:\n{log}"));
        // Time first, then the level; the job named once, no span prefix.
        assert!(failed.starts_with("20"), "{failed}");
        assert!(failed.contains(" ERROR "), "{failed}");
        assert!(failed.contains("job=lite.sql.bad"), "{failed}");
        assert!(!failed.contains("job{"), "{failed}");
        assert!(!log.lines().any(|l| l.starts_with('<')), "{log}");
        assert!(
            log.lines()
                .any(|l| l.starts_with("lite.sql.bad: failed: ") && l.contains("no such table")),
            "{log}"
        );
    }
}

#[test]
fn json_logs_are_one_object_per_line_with_the_job_fields() {
    let w = workdir();
    let by_flag = w
        .cmd(&["--log-format", "json", "run-job", "lite.sql.bad"])
        .env_remove("JOURNAL_STREAM")
        .output()
        .expect("run");
    let by_env = w
        .cmd(&["run-job", "lite.sql.bad"])
        .env("DBKEEPER_LOG_FORMAT", "json")
        .env_remove("JOURNAL_STREAM")
        .output()
        .expect("run");
    for out in [by_flag, by_env] {
        assert_eq!(out.status.code(), Some(1));
        let log = text(&out);
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let failed = lines
            .iter()
            .find(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("job failed"))
            })
            .unwrap_or_else(|| panic!("no failure object:\n{log}"));
        assert_eq!(failed["level"], "ERROR", "{failed}");
        assert_eq!(failed["span"]["job_id"], "lite.sql.bad", "{failed}");
        assert_eq!(failed["span"]["database"], "lite", "{failed}");
        assert_eq!(failed["span"]["kind"], "sql", "{failed}");
        assert!(failed["timestamp"].is_string(), "{failed}");
        // The command's final error is an object too.
        assert!(
            lines.iter().any(|v| v["level"] == "ERROR"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("no such table") && !m.starts_with("job failed"))),
            "{log}"
        );
    }
}

/// The binary, run with stderr on a file that `JOURNAL_STREAM` names, inside a mount
/// namespace whose `/run` is empty — plus, with `socket`, that socket at journald's
/// path. None if this machine does not allow the namespace.
fn run_as_under_journald(w: &Workdir, args: &[&str], socket: Option<&Path>) -> Option<Output> {
    let probe = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipped: `unshare --mount` is not allowed here (needs root)");
        return None;
    }
    let stderr_path = w.path().join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let meta = stderr.metadata().expect("stat");
    let mut script = String::from("mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && ");
    if socket.is_some() {
        script.push_str(
            "touch /run/systemd/journal/socket && mount --bind \"$SOCKET\" /run/systemd/journal/socket && ",
        );
    }
    script.push_str("exec \"$@\"");
    let status = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .arg(BIN)
        .args(args)
        .arg("-c")
        .arg(w.config_path())
        .env("SOCKET", socket.unwrap_or(Path::new("")))
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .output()
        .expect("unshare");
    Some(Output {
        status: status.status,
        stdout: status.stdout,
        stderr: std::fs::read(&stderr_path).expect("stderr"),
    })
}

#[test]
fn without_the_journal_socket_lines_carry_priority_prefixes() {
    let w = workdir();
    let Some(out) = run_as_under_journald(&w, &["run-job", "pg.sql.ping"], None) else {
        return;
    };
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let log = text(&out);
    let line = |prefix: &str, what: &str| {
        log.lines()
            .find(|l| l.starts_with(prefix) && l.contains(what))
            .unwrap_or_else(|| panic!("no {prefix} line with {what:?}:\n{log}"))
            .to_owned()
    };
    // journald stamps the lines itself: no time of ours.
    let started = line("<6>", "job started");
    assert!(started.starts_with("<6> INFO "), "{started}");
    line("<4>", "retrying");
    line("<3>", "job failed");
    line("<3>pg.sql.ping: failed: ", "cannot connect");
    assert!(
        log.lines().all(|l| l.starts_with('<')),
        "a line without priority:\n{log}"
    );
}

/// One journal entry: its fields in order (a field may repeat).
type Entry = Vec<(String, String)>;

/// Parses journald's native protocol: `NAME=value\n`, or `NAME\n`, a little-endian
/// u64 length, the value, `\n`.
fn parse_entry(mut data: &[u8]) -> Entry {
    let mut fields = Vec::new();
    while !data.is_empty() {
        let end = data.iter().position(|&b| b == b'\n').expect("newline");
        let line = &data[..end];
        data = &data[end + 1..];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            fields.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
        } else {
            let len = u64::from_le_bytes(data[..8].try_into().expect("length")) as usize;
            let value = &data[8..8 + len];
            assert_eq!(data[8 + len], b'\n', "value not followed by a newline");
            fields.push((
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            ));
            data = &data[8 + len + 1..];
        }
    }
    fields
}

fn field<'a>(entry: &'a Entry, name: &str) -> Option<&'a str> {
    entry
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn journald_gets_entries_with_priorities_and_the_job_fields() {
    let w = workdir();
    let socket_path = w.path().join("journal.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind");
    let Some(out) = run_as_under_journald(&w, &["run-job", "pg.sql.ping"], Some(&socket_path))
    else {
        return;
    };
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    socket.set_nonblocking(true).expect("nonblocking");
    let mut entries = Vec::new();
    let mut buf = vec![0; 1 << 20];
    while let Ok(n) = socket.recv(&mut buf) {
        if n > 0 {
            entries.push(parse_entry(&buf[..n]));
        }
    }
    let find = |what: &str| {
        entries
            .iter()
            .find(|e| field(e, "MESSAGE").is_some_and(|m| m.contains(what)))
            .unwrap_or_else(|| panic!("no entry with {what:?} in {entries:#?}"))
    };
    for (what, priority) in [("job started", "6"), ("retrying", "4"), ("job failed", "3")] {
        let e = find(what);
        assert_eq!(field(e, "PRIORITY"), Some(priority), "{e:?}");
        assert_eq!(field(e, "JOB_ID"), Some("pg.sql.ping"), "{e:?}");
        assert_eq!(field(e, "DATABASE"), Some("pg"), "{e:?}");
        assert_eq!(field(e, "KIND"), Some("sql"), "{e:?}");
        assert_eq!(field(e, "SYSLOG_IDENTIFIER"), Some("dbkeeper"), "{e:?}");
    }
    // Entries went to the journal, not to stderr; only the command's final error is
    // on stderr, with its priority.
    let log = text(&out);
    assert!(!log.contains("job started"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.starts_with("<3>pg.sql.ping: failed: ")),
        "{log}"
    );
}

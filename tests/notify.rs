//! Dead-man pings and chat webhooks against a local HTTP receiver, with the real
//! binary: pings arrive in order (start, then success or failure) with the run's
//! summary or error; a monitor that is down or hangs neither fails nor slows a job;
//! Slack and Teams messages name the job, the database and the error, and link to
//! the status page. No URL token ever reaches the logs.

mod common;

use std::time::{Duration, Instant};

use common::{free_port, receiver, Answer, Received, Workdir};

/// The secret part of every URL handed to dbkeeper here.
const SECRET: &str = "s3cret-uuid";

fn config(w: &Workdir, notify: &str, jobs: &str) {
    w.write_config(
        "",
        &format!(
            "{notify}\n[[database]]\nname = \"app\"\nurl = \"{}\"\n{jobs}",
            w.sqlite_url("app.db")
        ),
    );
}

fn sql_job(name: &str, statement: &str, schedule: &str, extra: &str) -> String {
    format!(
        "[[database.sql]]\nname = \"{name}\"\nstatement = \"{statement}\"\nschedule = \"{schedule}\"\n{extra}\n"
    )
}

/// `run-job JOB`: its exit code, stdout+stderr, and wall time.
fn run_job(w: &Workdir, job: &str) -> (i32, String, Duration) {
    let start = Instant::now();
    let out = w.cmd(&["run-job", job]).output().expect("run-job");
    let took = start.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains(SECRET), "a ping URL leaked:\n{text}");
    (out.status.code().unwrap_or(-1), text, took)
}

fn requests(seen: &common::Requests, prefix: &str) -> Vec<Received> {
    seen.lock()
        .expect("lock")
        .iter()
        .filter(|r| r.target.starts_with(prefix))
        .cloned()
        .collect()
}

#[test]
fn run_job_pings_start_then_success_or_failure_with_summary_or_error() {
    let (port, seen) = receiver(Answer::Ok);
    let w = Workdir::new();
    let base = format!("http://127.0.0.1:{port}");
    config(
        &w,
        // The [notify] default, which `bad` takes and `quiet` turns off.
        &format!("[notify]\nping-url = \"{base}/default/{SECRET}\"\n"),
        &format!(
            "{}{}{}",
            sql_job(
                "ok",
                "CREATE TABLE t(x); INSERT INTO t VALUES (1), (2)",
                "manual",
                &format!("ping-url = \"{base}/ok/{SECRET}\"")
            ),
            sql_job("bad", "SELECT * FROM no_such_table", "manual", ""),
            sql_job("quiet", "SELECT 1", "manual", "ping-url = false"),
        ),
    );

    let (code, out, _) = run_job(&w, "app.sql.ok");
    assert_eq!(code, 0, "{out}");
    let summary = out
        .lines()
        .find_map(|l| l.strip_prefix("app.sql.ok: success: "))
        .expect("summary line");
    let ok = requests(&seen, "/ok/");
    let got: Vec<(&str, &str, &str)> = ok
        .iter()
        .map(|r| (r.method.as_str(), r.target.as_str(), r.body.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("POST", &*format!("/ok/{SECRET}/start"), ""),
            ("POST", &*format!("/ok/{SECRET}"), summary),
        ],
        "{out}"
    );

    let (code, out, _) = run_job(&w, "app.sql.bad");
    assert_eq!(code, 1, "{out}");
    let bad = requests(&seen, "/default/");
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert_eq!(bad[0].target, format!("/default/{SECRET}/start"));
    assert_eq!(bad[1].target, format!("/default/{SECRET}/fail"));
    assert!(bad[1].body.contains("no such table"), "{bad:?}");

    let before = seen.lock().expect("lock").len();
    let (code, out, _) = run_job(&w, "app.sql.quiet");
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        seen.lock().expect("lock").len(),
        before,
        "ping-url = false pinged"
    );
}

#[test]
fn a_monitor_that_is_down_or_hangs_neither_fails_nor_slows_the_job() {
    let (hang_port, hung) = receiver(Answer::Hang);
    let down_port = free_port();
    let w = Workdir::new();
    config(
        &w,
        "",
        &format!(
            "{}{}",
            sql_job(
                "down",
                "SELECT 1",
                "manual",
                &format!("ping-url = \"http://127.0.0.1:{down_port}/{SECRET}\"")
            ),
            sql_job(
                "hang",
                "SELECT 1",
                "manual",
                &format!("ping-url = \"http://127.0.0.1:{hang_port}/{SECRET}\"")
            ),
        ),
    );
    // Creates the state directory, so the timed runs below only run the job.
    run_job(&w, "app.sql.down");
    for job in ["app.sql.down", "app.sql.hang"] {
        let (code, out, took) = run_job(&w, job);
        assert_eq!(code, 0, "{job}: {out}");
        // One ping attempt may take 5 s and there are retries: a run that waited for
        // them would take far longer. `run-job` gives pings 1 s at exit.
        assert!(
            took < Duration::from_secs(4),
            "{job} took {took:?}, the monitor slowed it:\n{out}"
        );
        assert!(out.contains("dead-man ping not delivered"), "{job}: {out}");
    }
    assert!(
        !hung.lock().expect("lock").is_empty(),
        "the hanging monitor got no request at all"
    );
}

#[test]
fn daemon_pings_every_run_in_order_and_counts_failures() {
    // The first ping (the first run's start) gets a 500 and is retried a second
    // later, long after that run ended: its end must still come after it.
    let (port, seen) = receiver(Answer::FailFirst);
    let w = Workdir::new();
    config(
        &w,
        &format!("[notify]\nping-url = \"http://127.0.0.1:{port}/hc/{SECRET}\"\n"),
        &format!(
            "{}{}",
            sql_job("tick", "SELECT 1", "every 1s", ""),
            sql_job(
                "lost",
                "SELECT 1",
                "every 1s",
                &format!("ping-url = \"http://127.0.0.1:{}/{SECRET}\"", free_port())
            )
        ),
    );
    let d = w.start();
    d.wait_for("three runs pinged", Duration::from_secs(30), || {
        requests(&seen, "/hc/").len() >= 7
    });
    let mut got = requests(&seen, "/hc/");
    assert!(got[0].target.ends_with("/start"), "{got:?}");
    got.remove(0); // the attempt that got the 500
                   // Start, end, start, end…: a run's end never overtakes its start.
    for (i, r) in got.iter().enumerate() {
        let start = r.target.ends_with("/start");
        assert_eq!(start, i % 2 == 0, "out of order at {i}: {got:?}");
        assert_eq!(r.method, "POST");
        if !start {
            assert!(r.body.contains("rows affected"), "{got:?}");
        }
    }
    d.wait_for("ping failures counted", Duration::from_secs(30), || {
        d.metric("dbkeeper_ping_failures_total", &["job_id=\"app.sql.lost\""])
            .unwrap_or(0.0)
            >= 1.0
    });
    assert_eq!(
        d.metric("dbkeeper_ping_failures_total", &["job_id=\"app.sql.tick\""]),
        Some(0.0)
    );
    // The monitor that is down does not hold its job up: it keeps running.
    d.wait_for("the job keeps running", Duration::from_secs(30), || {
        d.metric(
            "dbkeeper_job_runs_total",
            &["app.sql.lost", "result=\"success\""],
        )
        .unwrap_or(0.0)
            >= 3.0
    });
    let log = d.log_text();
    assert!(!log.contains(SECRET), "a ping URL leaked:\n{log}");
    assert!(log.contains("dead-man ping not delivered"), "{log}");
}

#[test]
fn slack_and_teams_messages_name_job_database_error_and_link() {
    let (port, seen) = receiver(Answer::Ok);
    let w = Workdir::new();
    config(
        &w,
        &format!(
            "[notify]\npublic-url = \"https://ops.example.com/dbkeeper/\"\nretry-backoff = \"200ms\"\n\
             [[notify.webhook]]\nurl = \"http://127.0.0.1:{port}/slack/{SECRET}\"\nformat = \"slack\"\n\
             [[notify.webhook]]\nurl = \"http://127.0.0.1:{port}/teams/{SECRET}\"\nformat = \"teams\"\n\
             [[notify.webhook]]\nurl = \"http://127.0.0.1:{port}/json/{SECRET}\"\n"
        ),
        &sql_job("count", "SELECT count(*) FROM missing_table", "every 1s", ""),
    );
    let d = w.start();
    d.wait_for("all three webhooks called", Duration::from_secs(30), || {
        ["/slack/", "/teams/", "/json/"]
            .iter()
            .all(|p| !requests(&seen, p).is_empty())
    });
    let link = "https://ops.example.com/dbkeeper/#job-app.sql.count";

    let slack: serde_json::Value =
        serde_json::from_str(&requests(&seen, "/slack/")[0].body).expect("JSON");
    let text = slack["text"].as_str().expect("a text field");
    for want in ["app.sql.count", "database app", "missing_table", link] {
        assert!(text.contains(want), "{want:?} not in {text}");
    }

    let teams: serde_json::Value =
        serde_json::from_str(&requests(&seen, "/teams/")[0].body).expect("JSON");
    let card = &teams["attachments"][0]["content"];
    assert_eq!(card["type"], "AdaptiveCard", "{teams}");
    let shown = card["body"].to_string();
    for want in ["app.sql.count", "\"app\"", "missing_table"] {
        assert!(shown.contains(want), "{want:?} not in {shown}");
    }
    assert_eq!(card["actions"][0]["url"], link);

    // The JSON format is as before: no text, no link.
    let json: serde_json::Value =
        serde_json::from_str(&requests(&seen, "/json/")[0].body).expect("JSON");
    assert_eq!(json["job"], "app.sql.count");
    assert!(json.get("text").is_none(), "{json}");

    // The status page has the row the link points at.
    let (_, page) = d.get("/");
    assert!(page.contains("id=\"job-app.sql.count\""), "{page}");
    let log = d.log_text();
    assert!(!log.contains(SECRET), "a webhook URL leaked:\n{log}");
}

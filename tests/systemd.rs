//! systemd integration: the shipped unit passes `systemd-analyze verify`, and the
//! daemon speaks the notify protocol (READY, WATCHDOG, RELOADING, STOPPING) on a real
//! notification socket.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Workdir, BIN};

fn shipped_unit() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/dbkeeper.service"))
        .expect("unit file")
}

/// The shipped unit with ExecStart pointing at the binary just built (systemd-analyze
/// checks that it exists), in a temporary directory kept alive by the first value.
fn unit_copy(unit: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tmp");
    let path = common::write_file(
        dir.path(),
        "dbkeeper.service",
        &unit.replace("/usr/local/bin/dbkeeper", BIN),
    );
    (dir, path)
}

#[test]
fn shipped_unit_passes_systemd_analyze_verify() {
    let unit = shipped_unit();
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "StateDirectory=dbkeeper",
        "LoadCredential=",
    ] {
        assert!(unit.contains(key), "unit lacks {key}");
    }
    let (_dir, path) = unit_copy(&unit);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze must be installed (see .ci/run)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("dbkeeper.service:"),
        "verify: {stderr}"
    );
}

/// Collects datagrams until `want` arrives or the deadline passes.
fn wait_message(
    sock: &UnixDatagram,
    seen: &mut Vec<String>,
    want: &str,
    timeout: Duration,
) -> bool {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < timeout {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = msg.lines().any(|l| l == want);
            seen.push(msg);
            if hit {
                return true;
            }
        }
    }
    false
}

#[test]
fn notify_protocol_ready_watchdog_reload_stop() {
    let w = Workdir::new();
    let lite = format!(
        "[[database]]\nname = \"lite\"\nurl = \"{}\"\n",
        w.sqlite_url("l.db")
    );
    w.write_config("", &lite);
    let sock_path = w.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut d = w.start_with_env(&[
        ("NOTIFY_SOCKET", sock_path.to_str().expect("utf-8 path")),
        ("WATCHDOG_USEC", "3000000"),
    ]);
    let mut seen = Vec::new();
    let wait = Duration::from_secs(10);
    assert!(
        wait_message(&sock, &mut seen, "READY=1", wait),
        "no READY=1: {seen:?}"
    );
    assert!(
        seen.iter().any(|m| m.contains("STATUS=databases: 1")),
        "{seen:?}"
    );
    assert!(
        wait_message(&sock, &mut seen, "WATCHDOG=1", wait),
        "no WATCHDOG=1: {seen:?}"
    );
    assert!(
        wait_message(&sock, &mut seen, "WATCHDOG=1", wait),
        "watchdog not repeated: {seen:?}"
    );
    d.signal("HUP");
    assert!(
        wait_message(&sock, &mut seen, "RELOADING=1", wait),
        "no RELOADING=1: {seen:?}"
    );
    assert!(
        wait_message(&sock, &mut seen, "READY=1", wait),
        "no READY=1 after reload: {seen:?}"
    );
    d.signal("TERM");
    assert!(
        wait_message(&sock, &mut seen, "STOPPING=1", wait),
        "no STOPPING=1: {seen:?}"
    );
    let (status, _) = d.wait_exit(Duration::from_secs(10));
    assert!(status.success());
}

#[test]
fn unit_exposure_score_stays_below_2() {
    let (_dir, path) = unit_copy(&shipped_unit());
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for dbkeeper.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(score < 2.0, "systemd-analyze security exposure {score}");
}

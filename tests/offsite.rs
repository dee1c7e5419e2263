//! Off-site destinations: backups to a real S3-compatible server (moto, started per
//! test by tests/common/s3.rs) next to a local folder, through the real binary.
//! What an operator counts on: every copy is written, a restore after the local disk
//! is gone needs no flag, a destination that fails costs only its own copy and
//! names itself, nothing half-written is ever visible, leftovers are cleaned.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::s3::S3Server;
use common::*;

/// `[[database]]` for a SQLite file `app.db` in `w` backed up to `destination` (TOML).
fn sqlite_config(w: &Workdir, destination: &str, extra: &str) -> String {
    let key = w.key("backup.key");
    format!(
        "[[database]]\nname = \"app\"\nurl = \"sqlite://{}\"\n[database.backup]\nschedule = \"manual\"\ndestination = {destination}\nencryption-key-file = \"{}\"\n{extra}\n",
        w.path().join("app.db").display(),
        key.display()
    )
}

fn run(w: &Workdir, s3: &S3Server, args: &[&str]) -> std::process::Output {
    let mut cmd = w.cmd(args);
    cmd.envs(s3.env());
    cmd.output().expect("run dbkeeper")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(w: &Workdir, s3: &S3Server, args: &[&str]) -> String {
    let out = run(w, s3, args);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    text(&out)
}

/// The backup ids (`.dbk` keys) under `prefix` in the bucket.
fn archive_keys(s3: &S3Server, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = s3
        .keys(prefix)
        .into_iter()
        .filter(|k| k.ends_with(".dbk"))
        .collect();
    keys.sort();
    keys
}

/// Starts `run-job app.backup` (output captured) and returns once its multipart
/// upload is under way.
fn backup_mid_upload(w: &Workdir, s3: &S3Server) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_dbkeeper"))
        .args(["run-job", "app.backup", "-c"])
        .arg(w.config_path())
        .envs(s3.env())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while s3.multipart_uploads().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no multipart upload started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// `destination = [<w>/backups, <s3>/<prefix>]` as TOML, with the folder and the URL.
fn local_and_s3(w: &Workdir, s3: &S3Server, prefix: &str) -> (std::path::PathBuf, String, String) {
    let local = w.path().join("backups");
    let url = s3.url(prefix);
    let toml = format!("[\"{}\", \"{url}\"]", local.display());
    (local, url, toml)
}

fn make_sqlite(path: &Path, rows: u32) {
    sqlite(
        path,
        &format!(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows}) \
             INSERT INTO t(v) SELECT 'row ' || i FROM n;"
        ),
    );
}

/// A SQLite database of `mb` MiB of random (incompressible) bytes: an archive of
/// several multipart parts that takes a moment to upload.
fn make_big_sqlite(path: &Path, mb: u32) {
    sqlite(
        path,
        &format!(
            "CREATE TABLE big(b BLOB); \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {}) \
             INSERT INTO big SELECT randomblob(65536) FROM n;",
            mb * 16
        ),
    );
}

#[test]
fn sqlite_round_trip_with_a_local_and_an_s3_copy_and_restore_after_the_disk_is_gone() {
    let s3 = S3Server::start();
    let w = Workdir::new();
    make_sqlite(&w.path().join("app.db"), 500);
    let (local, url, both) = local_and_s3(&w, &s3, "db");
    w.write_config("", &sqlite_config(&w, &both, "verify = \"restore\""));
    let out = ok(&w, &s3, &["run-job", "app.backup"]);
    assert!(out.contains("2 copies"), "{out}");
    assert_eq!(archives(&local, "app").len(), 1);
    let keys = s3.keys("db/app/");
    assert_eq!(
        keys.len(),
        2,
        "archive and manifest only, no lease left: {keys:?}"
    );
    assert!(s3.multipart_uploads().is_empty());

    let list = ok(&w, &s3, &["backup", "list"]);
    assert!(list.contains("DESTINATION"), "{list}");
    assert!(
        list.contains(&url) && list.contains(&local.display().to_string()),
        "{list}"
    );
    assert_eq!(
        list.matches("restore 20").count(),
        2,
        "both copies verified: {list}"
    );

    // The local disk is lost: restore latest needs no flag.
    std::fs::remove_dir_all(&local).unwrap();
    let target = w.path().join("restored.db");
    let out = ok(
        &w,
        &s3,
        &["restore", "app", "--to", target.to_str().unwrap()],
    );
    assert!(out.contains(&format!("from {url}")), "{out}");
    assert_eq!(sqlite(&target, "SELECT count(*) FROM t").trim(), "500");

    // verify and decrypt straight from the bucket.
    let out = ok(&w, &s3, &["backup", "verify", "app", "--from", &url]);
    assert!(out.contains("verification passed"), "{out}");
    let key = &archive_keys(&s3, "db/app/")[0];
    let plain = w.path().join("plain.db");
    ok(
        &w,
        &s3,
        &["decrypt", &s3.url(key), "-o", plain.to_str().unwrap()],
    );
    assert_eq!(sqlite(&plain, "SELECT count(*) FROM t").trim(), "500");
    let name = key.strip_prefix("db/").unwrap();
    let plain2 = w.path().join("plain2.db");
    ok(
        &w,
        &s3,
        &[
            "decrypt",
            "--from",
            &url,
            name,
            "-o",
            plain2.to_str().unwrap(),
        ],
    );

    // --from that names no destination is a usage error.
    let out = run(
        &w,
        &s3,
        &["backup", "verify", "app", "--from", "s3://elsewhere/x"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("is not a destination"),
        "{}",
        text(&out)
    );
}

#[test]
fn postgres_round_trip_through_s3_only() {
    let s3 = S3Server::start();
    let w = Workdir::new();
    let db = PgDb::new("offsite");
    db.sql("CREATE TABLE items(id serial PRIMARY KEY, name text); INSERT INTO items(name) SELECT 'item ' || g FROM generate_series(1, 2000) g;");
    let key = w.key("backup.key");
    let url = s3.url("pg");
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"pg\"\nurl = \"{}\"\n[database.backup]\nschedule = \"manual\"\ndestination = \"{url}\"\nencryption-key-file = \"{}\"\nverify = \"restore\"\n",
            db.url,
            key.display()
        ),
    );
    ok(&w, &s3, &["run-job", "pg.backup"]);
    assert_eq!(archive_keys(&s3, "pg/pg/").len(), 1);
    let target = PgDb::unused("offsite_restored");
    ok(&w, &s3, &["restore", "pg", "--to", &target.url, "--create"]);
    assert_eq!(target.sql("SELECT count(*) FROM items").trim(), "2000");
}

#[test]
fn each_destination_rotates_with_its_own_keep() {
    let s3 = S3Server::start();
    let w = Workdir::new();
    make_sqlite(&w.path().join("app.db"), 10);
    let local = w.path().join("backups");
    let url = s3.url("keep");
    w.write_config(
        "",
        &sqlite_config(
            &w,
            &format!(
                "[\"{}\", {{ url = \"{url}\", keep = {{ last = 3 }} }}]",
                local.display()
            ),
            "keep = { last = 1 }",
        ),
    );
    for _ in 0..4 {
        ok(&w, &s3, &["run-job", "app.backup"]);
        // Ids are to the second.
        std::thread::sleep(Duration::from_millis(1100));
    }
    assert_eq!(archives(&local, "app").len(), 1);
    assert_eq!(archive_keys(&s3, "keep/app/").len(), 3);
    let out = ok(
        &w,
        &s3,
        &["backup", "prune", "app", "--from", &url, "--dry-run"],
    );
    assert_eq!(out.matches("keep ").count(), 3, "{out}");
}

#[test]
fn s3_stopped_mid_upload_fails_the_job_keeps_the_local_copy_and_the_next_run_succeeds() {
    let mut s3 = S3Server::start();
    if !s3.is_local() {
        println!("skipped: needs the local moto server");
        return;
    }
    let w = Workdir::new();
    make_big_sqlite(&w.path().join("app.db"), 48);
    let local = w.path().join("backups");
    let url = s3.url("mid");
    w.write_config(
        "",
        &sqlite_config(
            &w,
            &format!(
                "[\"{}\", {{ url = \"{url}\", retry-timeout = \"2s\" }}]",
                local.display()
            ),
            "verify = \"read\"",
        ),
    );
    // Stop the server once a multipart upload is under way.
    let child = backup_mid_upload(&w, &s3);
    s3.stop();
    let out = child.wait_with_output().unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&url),
        "the error names the destination: {said}"
    );
    assert!(said.contains("stored in"), "{said}");
    // The local copy is whole and verified.
    assert_eq!(archives(&local, "app").len(), 1);
    s3.restart();
    let target = w.path().join("from-local.db");
    ok(
        &w,
        &s3,
        &[
            "restore",
            "app",
            "--from",
            local.to_str().unwrap(),
            "--to",
            target.to_str().unwrap(),
        ],
    );
    // The server is back (empty: moto keeps nothing): the next run succeeds.
    std::thread::sleep(Duration::from_millis(1100));
    ok(&w, &s3, &["run-job", "app.backup"]);
    assert_eq!(archive_keys(&s3, "mid/app/").len(), 1);
    assert_eq!(s3.keys("mid/app/").len(), 2, "{:?}", s3.keys("mid/app/"));
}

#[test]
fn a_killed_upload_leaves_nothing_visible_and_its_leftovers_are_cleaned() {
    let s3 = S3Server::start();
    let w = Workdir::new();
    make_big_sqlite(&w.path().join("app.db"), 32);
    let url = s3.url("kill");
    w.write_config(
        "",
        &sqlite_config(
            &w,
            &format!("{{ url = \"{url}\", stale-upload-after = \"3s\" }}"),
            "verify = \"none\"",
        ),
    );
    let mut child = backup_mid_upload(&w, &s3);
    child.kill().unwrap();
    child.wait().unwrap();
    // Nothing under a backup's name: only the leases, the unfinished upload and the
    // dead run's id reservation.
    assert!(archive_keys(&s3, "kill/").is_empty(), "{:?}", s3.keys(""));
    assert!(
        s3.keys("kill/app/")
            .iter()
            .all(|k| k.ends_with(".upload") || k.ends_with(".reserved")),
        "{:?}",
        s3.keys("")
    );
    assert_eq!(s3.multipart_uploads().len(), 1);
    let list = ok(&w, &s3, &["backup", "list"]);
    assert!(!list.contains("kill/app"), "{list}");
    // Once the lease is stale, the next run aborts the upload and deletes the lease.
    std::thread::sleep(Duration::from_secs(4));
    let out = ok(&w, &s3, &["run-job", "app.backup"]);
    assert!(out.contains("success"), "{out}");
    assert!(
        s3.multipart_uploads().is_empty(),
        "{:?}",
        s3.multipart_uploads()
    );
    let keys = s3.keys("kill/app/");
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(
        keys.iter()
            .all(|k| !k.ends_with(".upload") && !k.ends_with(".reserved")),
        "{keys:?}"
    );
}

#[test]
fn a_planted_object_without_manifest_is_ignored_and_cleaned() {
    let s3 = S3Server::start();
    let w = Workdir::new();
    make_sqlite(&w.path().join("app.db"), 10);
    let url = s3.url("plant");
    w.write_config("", &sqlite_config(&w, &format!("\"{url}\""), ""));
    s3.put("plant/app/20200101T000000Z-manual.dbk", b"not an archive");
    let list = ok(&w, &s3, &["backup", "list"]);
    assert!(!list.contains("20200101T000000Z"), "{list}");
    let out = run(&w, &s3, &["restore", "app", "--to", "/nonexistent/x.db"]);
    assert!(text(&out).contains("no good backup"), "{}", text(&out));
    ok(&w, &s3, &["run-job", "app.backup"]);
    let keys = s3.keys("plant/app/");
    assert!(
        !keys.iter().any(|k| k.contains("20200101T000000Z")),
        "{keys:?}"
    );
    assert_eq!(keys.len(), 2, "{keys:?}");
}

/// A moto server that checks signatures: the test's credentials are unknown to it.
fn strict_s3() -> (std::process::Child, u16) {
    let port = free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 with moto (see .ci/run)");
    let start = Instant::now();
    while http_get(port, "/").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "moto did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, port)
}

#[test]
fn wrong_credentials_fail_clearly_naming_the_destination_and_print_no_secret() {
    let (mut moto, port) = strict_s3();
    let w = Workdir::new();
    make_sqlite(&w.path().join("app.db"), 10);
    let local = w.path().join("backups");
    let secret = "wJalrXUtnFEMI-the-secret-part-K7MDENG";
    let creds = write_file(
        w.path(),
        "s3.env",
        &format!("AWS_ACCESS_KEY_ID=AKIAWRONG\nAWS_SECRET_ACCESS_KEY={secret}\n"),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let url = "s3://strict-bucket/db";
    w.write_config(
        "",
        &sqlite_config(
            &w,
            &format!(
                "[\"{}\", {{ url = \"{url}\", endpoint = \"http://127.0.0.1:{port}\", allow-http = true, region = \"us-east-1\", credentials-file = \"{}\", retry-timeout = \"1s\" }}]",
                local.display(),
                creds.display()
            ),
            "",
        ),
    );
    let out = w.cmd(&["run-job", "app.backup"]).output().unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains(url), "{said}");
    assert!(said.contains("credentials"), "says what to check: {said}");
    assert!(!said.contains(secret), "{said}");
    assert_eq!(archives(&local, "app").len(), 1, "the local copy was made");
    let out = w.cmd(&["backup", "list"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(!text(&out).contains(secret));

    // A credentials file others can read is refused at load, without its content.
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = w.cmd(&["check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("chmod 0600") && !text(&out).contains(secret));
    let _ = moto.kill();
    let _ = moto.wait();
}

#[test]
fn the_daemon_reports_each_destination() {
    let s3 = S3Server::start();
    let w = Workdir::new();
    make_sqlite(&w.path().join("app.db"), 10);
    let (local, url, both) = local_and_s3(&w, &s3, "metrics");
    w.write_config("", &sqlite_config(&w, &both, ""));
    ok(&w, &s3, &["run-job", "app.backup"]);
    let daemon = w.start_with_envs(&s3.env());
    let dest_local = format!("destination=\"{}\"", local.display());
    let dest_s3 = format!("destination=\"{url}\"");
    daemon.wait_for("catalog series", Duration::from_secs(20), || {
        let m = daemon.metrics();
        m.contains(&dest_local) && m.contains(&dest_s3)
    });
    for dest in [&dest_local, &dest_s3] {
        let stored = daemon
            .metric("dbkeeper_backups_stored", &["database=\"app\"", dest])
            .unwrap();
        assert_eq!(stored, 1.0, "{dest}");
        let last = daemon
            .metric(
                "dbkeeper_backup_last_success_timestamp_seconds",
                &["database=\"app\"", dest],
            )
            .unwrap();
        assert!(last > 1.7e9, "{dest}: {last}");
        assert_eq!(
            daemon.metric(
                "dbkeeper_backup_upload_failures_total",
                &["database=\"app\"", dest]
            ),
            Some(0.0)
        );
    }
}

#[test]
fn retention_archives_go_to_every_destination_and_rows_stay_while_one_is_down() {
    let mut s3 = S3Server::start();
    let w = Workdir::new();
    let db = w.path().join("app.db");
    sqlite(
        &db,
        "CREATE TABLE ev(id INTEGER PRIMARY KEY, ts TEXT, msg TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 400)
           INSERT INTO ev(ts, msg) SELECT datetime('now', '-' || (i % 60) || ' days', '-12 hours'), 'msg ' || i FROM n;",
    );
    let old = "SELECT count(*) FROM ev WHERE ts < datetime('now', '-30 days')";
    let expired: usize = sqlite(&db, old).trim().parse().unwrap();
    assert!(expired > 0);
    let local = w.path().join("backups");
    let url = s3.url("ret");
    let retention = "[[database.retention]]\nname = \"ev\"\ntable = \"ev\"\ncolumn = \"ts\"\nolder-than = \"30d\"\nschedule = \"manual\"\nbatch-size = 50\narchive = true\n";
    let config = sqlite_config(
        &w,
        &format!(
            "[\"{}\", {{ url = \"{url}\", retry-timeout = \"1s\" }}]",
            local.display()
        ),
        "",
    ) + retention;
    w.write_config("", &config);

    // The S3 destination is down: no batch may commit, whatever the local copy.
    s3.stop();
    let out = run(&w, &s3, &["run-job", "app.retention.ev"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains(&url), "{}", text(&out));
    assert_eq!(
        sqlite(&db, old).trim(),
        expired.to_string(),
        "no row deleted"
    );

    s3.restart();
    ok(&w, &s3, &["run-job", "app.retention.ev"]);
    assert_eq!(sqlite(&db, old).trim(), "0");
    // Every deleted row is in an export in each destination.
    let count_rows = |archive: &str| -> usize {
        let out = ok(&w, &s3, &["decrypt", archive]);
        out.lines().filter(|l| l.starts_with('{')).count()
    };
    let local_dir = local.join("app/retention/ev");
    let in_local: usize = std::fs::read_dir(&local_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".dbk"))
        .map(|p| count_rows(p.to_str().unwrap()))
        .sum();
    let in_s3: usize = archive_keys(&s3, "ret/app/retention/ev/")
        .iter()
        .map(|k| count_rows(&s3.url(k)))
        .sum();
    assert!(in_local >= expired, "{in_local} < {expired}");
    assert_eq!(in_s3, expired);
}

#[test]
fn a_damaged_local_copy_is_restored_from_the_next_destination() {
    let s3 = S3Server::start();
    let w = Workdir::new();
    make_big_sqlite(&w.path().join("app.db"), 3);
    let (local, url, both) = local_and_s3(&w, &s3, "damaged");
    w.write_config("", &sqlite_config(&w, &both, ""));
    ok(&w, &s3, &["run-job", "app.backup"]);
    // A byte flipped in place after the first segment: the copy still lists as good.
    let archive = &archives(&local, "app")[0];
    let mut bytes = std::fs::read(archive).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x40;
    std::fs::write(archive, &bytes).unwrap();
    let target = w.path().join("restored.db");
    let out = ok(
        &w,
        &s3,
        &["restore", "app", "--to", target.to_str().unwrap()],
    );
    assert!(out.contains("trying the copy in"), "{out}");
    assert!(out.contains(&format!("from {url}")), "{out}");
    assert_eq!(sqlite(&target, "SELECT count(*) FROM big").trim(), "48");
    // With --from, the damaged copy is what was asked for: exit 3, nothing written.
    let other = w.path().join("other.db");
    let out = run(
        &w,
        &s3,
        &[
            "restore",
            "app",
            "--from",
            local.to_str().unwrap(),
            "--to",
            other.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(!other.exists());
}

/// Adversary round 6, case 09: whoever holds a retired key and can write to the
/// bucket forges a newer backup with it there and deletes the current-key backups
/// from the bucket only. The retired-key boundary is the database's, not the
/// bucket's: the forgery is untrusted everywhere, never restored or decrypted.
#[test]
fn a_retired_key_forgery_in_one_destination_is_never_believed() {
    let s3 = S3Server::start();
    let w = Workdir::new();
    let app = w.path().join("app.db");
    sqlite(&app, "CREATE TABLE t(x); INSERT INTO t VALUES ('genuine');");
    let evil = w.path().join("evil.db");
    sqlite(&evil, "CREATE TABLE t(x); INSERT INTO t VALUES ('FORGED');");
    let (key1, key2) = (w.key("key1"), w.key("key2"));
    let local = w.path().join("local");
    let url = s3.url("p");
    let config = |db: &Path, dest: &str, key: &Path, extra: &str| {
        format!(
            "[[database]]\nname = \"app\"\nurl = \"sqlite://{}\"\n[database.backup]\nschedule = \"manual\"\ndestination = {dest}\nencryption-key-file = \"{}\"\n{extra}\n",
            db.display(),
            key.display()
        )
    };
    let both = format!("[\"{}\", \"{url}\"]", local.display());
    w.write_config("", &config(&app, &both, &key1, ""));
    ok(&w, &s3, &["run-job", "app.backup"]);
    std::thread::sleep(Duration::from_millis(1100));
    let rotated = config(
        &app,
        &both,
        &key2,
        &format!("decryption-key-files = [\"{}\"]", key1.display()),
    );
    w.write_config("", &rotated);
    ok(&w, &s3, &["run-job", "app.backup"]);
    std::thread::sleep(Duration::from_millis(1100));
    // The forger's own backup of "app" with key1, made in a folder of theirs.
    let forger = Workdir::new();
    let theirs = forger.path().join("theirs");
    forger.write_config(
        "",
        &config(&evil, &format!("\"{}\"", theirs.display()), &key1, ""),
    );
    forger.cmd(&["run-job", "app.backup"]).assert().success();
    // In the bucket: the current-key backup deleted, the forgery put in its place.
    let newest = archive_keys(&s3, "p/app/").pop().unwrap();
    let id = newest.strip_suffix(".dbk").unwrap().to_owned();
    s3.delete(&newest);
    s3.delete(&format!("{id}.manifest.json"));
    for entry in std::fs::read_dir(theirs.join("app")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        s3.put(&format!("p/app/{name}"), &std::fs::read(&path).unwrap());
    }
    let list = ok(&w, &s3, &["backup", "list"]);
    assert!(list.contains("a retired key"), "{list}");
    let target = w.path().join("out.db");
    let out = ok(
        &w,
        &s3,
        &["restore", "app", "--to", target.to_str().unwrap()],
    );
    assert!(!out.contains(&format!("from {url}")), "{out}");
    assert_eq!(sqlite(&target, "SELECT x FROM t").trim(), "genuine");
    let out = run(
        &w,
        &s3,
        &[
            "restore",
            "app",
            "--from",
            &url,
            "--to",
            w.path().join("o2.db").to_str().unwrap(),
        ],
    );
    // From the bucket alone: its older genuine backup, never the forgery.
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        sqlite(&w.path().join("o2.db"), "SELECT x FROM t").trim(),
        "genuine"
    );
    let forged = archive_keys(&s3, "p/app/").pop().unwrap();
    let out = run(
        &w,
        &s3,
        &[
            "decrypt",
            &s3.url(&forged),
            "-o",
            w.path().join("o3.db").to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(!w.path().join("o3.db").exists());
    let out = run(
        &w,
        &s3,
        &[
            "decrypt",
            "--from",
            &url,
            forged.strip_prefix("p/").unwrap(),
            "-o",
            w.path().join("o4.db").to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(!w.path().join("o4.db").exists());

    // Round 7, cases 21 and 27: the current-key backups lost everywhere (the local disk
    // gone, rotation) — the host remembers when the current key's first backup was
    // made, so the retired key still vouches for nothing newer.
    std::fs::remove_dir_all(&local).unwrap();
    let list = run(&w, &s3, &["backup", "list"]);
    assert!(text(&list).contains("a retired key"), "{}", text(&list));
    let target = w.path().join("o5.db");
    let out = ok(
        &w,
        &s3,
        &["restore", "app", "--to", target.to_str().unwrap()],
    );
    assert!(out.contains(&format!("from {url}")), "{out}");
    assert_eq!(sqlite(&target, "SELECT x FROM t").trim(), "genuine");
    let out = run(
        &w,
        &s3,
        &[
            "decrypt",
            &s3.url(&forged),
            "-o",
            w.path().join("o6.db").to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
}

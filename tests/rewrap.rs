//! `dbkeeper key rewrap` (issue 16, part 2): rotating the key of stored backups
//! without re-encrypting them. Real binary, real SQLite: key A to key B, key A to an
//! age recipient, kill -9 at random moments (every archive always opens with A or
//! B), and the time it takes for 100 small archives.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{archives, backup_table, plant_backup, sqlite, sqlite_db, Planted, Workdir, BIN};
use dbkeeper::keys::Identity;
use dbkeeper::repo::catalog::BackupKind;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

fn make_db(w: &Workdir) {
    sqlite(
        &w.path().join("app.db"),
        "CREATE TABLE IF NOT EXISTS t (x TEXT); INSERT INTO t VALUES ('one'), ('two'), ('three');",
    );
}

/// The config: backups of `app` to `<w>/backups` with `key` (and `extra` lines).
fn config(w: &Workdir, key: &Path, extra: &str) {
    let dest = w.path().join("backups");
    w.write_config(
        "",
        &sqlite_db(w, "app", &backup_table(&dest, Some(key), extra)),
    );
}

fn decryption(keys: &[&Path]) -> String {
    let list: Vec<String> = keys
        .iter()
        .map(|k| format!("\"{}\"", k.display()))
        .collect();
    format!("decryption-key-files = [{}]", list.join(", "))
}

/// Whether `decrypt FILE --key-file key` opens the archive (exit 0; 3 otherwise).
fn opens(archive: &Path, key: &Path) -> bool {
    let out = assert_cmd::Command::new(BIN)
        .args(["decrypt", s(archive), "--key-file", s(key)])
        .output()
        .expect("decrypt");
    out.status.success()
}

/// Every byte under `dir`, by path.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut all = Vec::new();
    for entry in walk(dir) {
        let bytes = std::fs::read(&entry).expect("read");
        all.push((entry, bytes));
    }
    all.sort();
    all
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `n` genuine backups of `app` made with `key`, one second apart.
fn plant(w: &Workdir, key: &Path, n: usize) {
    let image = std::fs::read(w.path().join("app.db")).expect("db");
    let start = chrono::Utc::now() - chrono::Duration::days(1);
    for i in 0..n {
        plant_backup(
            &w.path().join("backups"),
            key,
            Planted {
                name: "app",
                backend: "sqlite",
                image: "app.db",
                created: start + chrono::Duration::seconds(i as i64),
                kind: BackupKind::Manual,
            },
            image.as_slice(),
        );
    }
}

/// Whoever holds `key` (a leaked one) and can write to `w`'s destination plants a
/// backup of `app` holding 'EVIL', made with a dbkeeper and a state of their own.
fn plant_forgery(w: &Workdir, key: &Path) {
    let attacker = Workdir::new();
    sqlite(
        &attacker.path().join("app.db"),
        "CREATE TABLE t (x TEXT); INSERT INTO t VALUES ('EVIL');",
    );
    attacker.write_config(
        "",
        &sqlite_db(
            &attacker,
            "app",
            &backup_table(&w.path().join("backups"), Some(key), "keep = { last = -1 }"),
        ),
    );
    attacker.cmd(&["run-job", "app.backup"]).assert().success();
}

#[test]
fn key_a_to_key_b_in_place() {
    let w = Workdir::new();
    make_db(&w);
    let a = w.key("a.key");
    let b = w.key("b.key");
    config(&w, &a, "");
    for _ in 0..3 {
        w.cmd(&["run-job", "app.backup"]).assert().success();
        std::thread::sleep(Duration::from_millis(1100));
    }
    config(&w, &b, &decryption(&[&a]));
    let before = snapshot(&w.path().join("backups"));
    let dry = w.stdout(&["key", "rewrap", "--dry-run"]);
    assert!(dry.contains("3 would rewrap"), "{dry}");
    assert_eq!(before, snapshot(&w.path().join("backups")), "dry run wrote");

    let out = w.stdout(&["key", "rewrap"]);
    assert!(
        out.contains("3 rewrapped, 0 already current, 0 repaired, 0 skipped"),
        "{out}"
    );

    // B alone reads everything.
    config(&w, &b, "");
    let list = w.stdout(&["backup", "list", "app"]);
    assert_eq!(
        list.lines().filter(|l| l.contains("app")).count(),
        3,
        "{list}"
    );
    assert!(!list.contains("UNTRUSTED"), "{list}");
    w.cmd(&["backup", "verify", "app"]).assert().success();
    let restored = w.path().join("out.db");
    w.cmd(&["restore", "app", "--to", s(&restored)])
        .assert()
        .success();
    assert_eq!(sqlite(&restored, "SELECT count(*) FROM t;").trim(), "3");
    for archive in archives(&w.path().join("backups"), "app") {
        assert!(!opens(&archive, &a), "A still opens {}", archive.display());
        assert!(opens(&archive, &b));
        let code = assert_cmd::Command::new(BIN)
            .args(["decrypt", s(&archive), "--key-file", s(&a)])
            .output()
            .expect("decrypt")
            .status
            .code();
        assert_eq!(code, Some(3));
    }
    let again = w.stdout(&["key", "rewrap"]);
    assert!(again.contains("0 rewrapped, 3 already current"), "{again}");
}

#[test]
fn key_a_to_an_age_recipient() {
    let w = Workdir::new();
    make_db(&w);
    let a = w.key("a.key");
    config(&w, &a, "");
    for _ in 0..2 {
        w.cmd(&["run-job", "app.backup"]).assert().success();
        std::thread::sleep(Duration::from_millis(1100));
    }
    let id = Identity::generate();
    let id_file = w.path().join("id.txt");
    id.save(&id_file).expect("save identity");
    let recipient_config = format!(
        "[[database]]\nname = \"app\"\nurl = \"sqlite://{}\"\n[database.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nrecipients = [\"{}\"]\n{}\n",
        w.path().join("app.db").display(),
        w.path().join("backups").display(),
        id.recipient(),
        decryption(&[&a]),
    );
    w.write_config("", &recipient_config);
    let out = w.stdout(&["key", "rewrap", "app"]);
    assert!(out.contains("2 rewrapped, 0 already current"), "{out}");
    // Trusted on this host's writer tag, read with the identity, no longer with A.
    let list = w.stdout(&["backup", "list", "app"]);
    assert_eq!(
        list.lines().filter(|l| l.contains("app")).count(),
        2,
        "{list}"
    );
    assert!(!list.contains("UNTRUSTED"), "{list}");
    let restored = w.path().join("out.db");
    w.cmd(&[
        "restore",
        "app",
        "--to",
        s(&restored),
        "--identity",
        s(&id_file),
    ])
    .assert()
    .success();
    assert_eq!(sqlite(&restored, "SELECT count(*) FROM t;").trim(), "3");
    for archive in archives(&w.path().join("backups"), "app") {
        assert!(!opens(&archive, &a));
    }
    let again = w.stdout(&["key", "rewrap", "app"]);
    assert!(again.contains("0 rewrapped, 2 already current"), "{again}");
}

#[test]
fn kill_9_never_leaves_an_archive_unreadable() {
    let w = Workdir::new();
    make_db(&w);
    let a = w.key("a.key");
    let b = w.key("b.key");
    plant(&w, &a, 20);
    config(&w, &b, &decryption(&[&a]));
    let dest = w.path().join("backups");
    for round in 0..5u64 {
        let mut child = Command::new(BIN)
            .args(["key", "rewrap", "-c", s(&w.config_path())])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        // A pseudo-random delay from the clock: 5 to 60 ms (a run of 20 takes a few hundred).
        let nanos = u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .subsec_nanos(),
        );
        std::thread::sleep(Duration::from_millis(5 + (nanos / 7 + round * 31) % 56));
        let _ = child.kill();
        let _ = child.wait();
        let all = archives(&dest, "app");
        assert_eq!(all.len(), 20);
        for archive in all {
            assert!(
                opens(&archive, &a) || opens(&archive, &b),
                "round {round}: {} opens with neither key",
                archive.display()
            );
        }
    }
    let out = w.stdout(&["key", "rewrap"]);
    println!("after 5 kills: {}", out.lines().last().unwrap_or(""));
    let summary = out.lines().last().expect("summary");
    let counts: Vec<usize> = summary
        .split(", ")
        .filter_map(|part| part.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(counts.len(), 4, "{summary}");
    assert_eq!(counts[0] + counts[1] + counts[2], 20, "{out}");
    assert_eq!(counts[3], 0, "{out}");
    config(&w, &b, "");
    let list = w.stdout(&["backup", "list", "app"]);
    assert!(!list.contains("UNTRUSTED"), "{list}");
    for id in common::backup_ids(&dest, "app") {
        w.cmd(&["backup", "verify", "app", "--backup", &id])
            .assert()
            .success();
    }
}

#[test]
fn rewrap_of_100_small_archives_is_timed() {
    let w = Workdir::new();
    make_db(&w);
    let a = w.key("a.key");
    let b = w.key("b.key");
    plant(&w, &a, 100);
    config(&w, &b, &decryption(&[&a]));
    let started = Instant::now();
    let out = w.stdout(&["key", "rewrap"]);
    let took = started.elapsed();
    assert!(out.contains("100 rewrapped"), "{out}");
    println!(
        "key rewrap of 100 small archives: {:.2} s",
        took.as_secs_f64()
    );
    eprintln!(
        "key rewrap of 100 small archives: {:.2} s",
        took.as_secs_f64()
    );
}

#[test]
fn a_rewrap_killed_before_its_manifests_is_repaired() {
    let w = Workdir::new();
    make_db(&w);
    let a = w.key("a.key");
    let b = w.key("b.key");
    plant(&w, &a, 3);
    config(&w, &b, &decryption(&[&a]));
    let folder = w.path().join("backups/app");
    let manifests: Vec<(PathBuf, Vec<u8>)> = snapshot(&folder)
        .into_iter()
        .filter(|(p, _)| s(p).ends_with(".manifest.json"))
        .collect();
    assert_eq!(manifests.len(), 3);
    w.stdout(&["key", "rewrap"]);
    // As if killed after every archive was replaced and before any manifest was.
    for (path, bytes) in &manifests {
        std::fs::write(path, bytes).expect("old manifest");
    }
    let dry = w.stdout(&["key", "rewrap", "--dry-run"]);
    assert!(dry.contains("3 would repair"), "{dry}");
    let out = w.stdout(&["key", "rewrap"]);
    assert!(
        out.contains("0 rewrapped, 0 already current, 3 repaired, 0 skipped"),
        "{out}"
    );
    config(&w, &b, "");
    let list = w.stdout(&["backup", "list", "app"]);
    assert_eq!(
        list.lines().filter(|l| l.contains("app")).count(),
        3,
        "{list}"
    );
    assert!(!list.contains("UNTRUSTED"), "{list}");
    let again = w.stdout(&["key", "rewrap"]);
    assert!(again.contains("3 already current"), "{again}");
    // An archive edited meanwhile is never repaired: it does not read whole.
    let victim = archives(&w.path().join("backups"), "app").remove(0);
    let mut bytes = std::fs::read(&victim).expect("archive");
    let at = bytes.len() - 10;
    bytes[at] ^= 1;
    std::fs::write(&victim, &bytes).expect("edit");
    config(&w, &b, &decryption(&[&a]));
    w.cmd(&["key", "rewrap"]).assert().code(1);
}

#[test]
fn retention_exports_are_rewrapped_too() {
    let w = Workdir::new();
    let db = w.path().join("app.db");
    sqlite(
        &db,
        "CREATE TABLE t (x TEXT);
         CREATE TABLE logs (id INTEGER PRIMARY KEY, created_at TEXT NOT NULL, msg TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500)
           INSERT INTO logs (created_at, msg) SELECT datetime('now', '-40 days'), 'msg ' || i FROM n;",
    );
    let a = w.key("a.key");
    let b = w.key("b.key");
    let rule = "[[database.retention]]\ntable = 'logs'\nname = \"log\"\ncolumn = \"created_at\"\nolder-than = \"30d\"\nschedule = \"manual\"\nbatch-size = 200\narchive = true\n";
    config(&w, &a, rule);
    w.cmd(&["run-job", "app.retention.log"]).assert().success();
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let exports_dir = w.path().join("backups/app/retention/log");
    let exports: Vec<PathBuf> = walk(&exports_dir)
        .into_iter()
        .filter(|p| s(p).ends_with(".jsonl.dbk"))
        .collect();
    assert!(!exports.is_empty());
    config(&w, &b, &format!("{}\n{rule}", decryption(&[&a])));
    let dry = w.stdout(&["key", "rewrap", "--dry-run"]);
    assert!(
        dry.contains(&format!("{} would rewrap", exports.len() + 1)),
        "{dry}"
    );
    let out = w.stdout(&["key", "rewrap"]);
    assert!(out.contains("retention/log/"), "{out}");
    assert!(
        out.contains(&format!(
            "{} rewrapped, 0 already current",
            exports.len() + 1
        )),
        "{out}"
    );
    for export in &exports {
        assert!(opens(export, &b), "{}", export.display());
        assert!(!opens(export, &a), "{}", export.display());
    }
    let again = w.stdout(&["key", "rewrap"]);
    assert!(
        again.contains(&format!(
            "0 rewrapped, {} already current",
            exports.len() + 1
        )),
        "{again}"
    );
}

/// The same through an object store (moto): the replacing upload overwrites the
/// object, and the backups read back with the new key alone.
#[test]
fn key_a_to_key_b_in_an_s3_bucket() {
    let s3 = common::s3::S3Server::start();
    let w = Workdir::new();
    make_db(&w);
    let a = w.key("a.key");
    let b = w.key("b.key");
    let url = s3.url("bk");
    let write = |key: &Path, extra: &str| {
        w.write_config(
            "",
            &format!(
                "[[database]]\nname = \"app\"\nurl = \"sqlite://{}\"\n[database.backup]\nschedule = \"manual\"\ndestination = \"{url}\"\nencryption-key-file = \"{}\"\n{extra}\n",
                w.path().join("app.db").display(),
                key.display()
            ),
        )
    };
    let run = |args: &[&str]| {
        let out = w.cmd(args).envs(s3.env()).output().expect("run");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    write(&a, "");
    for _ in 0..2 {
        run(&["run-job", "app.backup"]);
        std::thread::sleep(Duration::from_millis(1100));
    }
    write(&b, &decryption(&[&a]));
    let out = run(&["key", "rewrap"]);
    assert!(out.contains("2 rewrapped, 0 already current"), "{out}");
    write(&b, "");
    let list = run(&["backup", "list", "app"]);
    assert!(!list.contains("UNTRUSTED"), "{list}");
    run(&["backup", "verify", "app"]);
    let restored = w.path().join("out.db");
    run(&["restore", "app", "--to", s(&restored)]);
    assert_eq!(sqlite(&restored, "SELECT count(*) FROM t;").trim(), "3");
    let again = run(&["key", "rewrap"]);
    assert!(again.contains("0 rewrapped, 2 already current"), "{again}");
}

/// Adversary round of issue 16, cases 02 and 03: with `identity-files` configured
/// (a recipients-only rewrap needs it to read), a forgery made for the public
/// recipient was rewrapped — or "repaired" when planted over a real backup's archive
/// — and so got this host's writer tag: trusted, and restored as `latest`. A rewrap
/// now vouches only for what a key file opens or this host's writer tag covers.
#[test]
fn a_rewrap_never_vouches_for_a_planted_archive() {
    let w = Workdir::new();
    make_db(&w);
    let (id, id2) = (Identity::generate(), Identity::generate());
    let id_file = w.path().join("id.txt");
    id.save(&id_file).expect("save identity");
    let for_recipients = |w: &Workdir, recipients: &[String], extra: &str| {
        let list: Vec<String> = recipients.iter().map(|r| format!("\"{r}\"")).collect();
        format!(
            "[[database]]\nname = \"app\"\nurl = \"sqlite://{}\"\n[database.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nrecipients = [{}]\n{extra}\n",
            w.path().join("app.db").display(),
            w.path().join("backups").display(),
            list.join(", "),
        )
    };
    let r1 = id.recipient().to_string();
    w.write_config("", &for_recipients(&w, std::slice::from_ref(&r1), ""));
    w.cmd(&["run-job", "app.backup"]).assert().success();
    // The forger knows only the public recipient.
    let forger = Workdir::new();
    sqlite(
        &forger.path().join("app.db"),
        "CREATE TABLE t (x TEXT); INSERT INTO t VALUES ('FORGED');",
    );
    forger.write_config("", &for_recipients(&forger, std::slice::from_ref(&r1), ""));
    std::thread::sleep(Duration::from_millis(1100));
    forger.cmd(&["run-job", "app.backup"]).assert().success();
    for f in std::fs::read_dir(forger.path().join("backups/app")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(
            &f,
            w.path().join("backups/app").join(f.file_name().unwrap()),
        )
        .unwrap();
    }
    // Case 02: a new recipient, and the identity to read with.
    let identities = format!("identity-files = [\"{}\"]", id_file.display());
    w.write_config(
        "",
        &for_recipients(&w, &[r1.clone(), id2.recipient().to_string()], &identities),
    );
    let out = w.cmd(&["key", "rewrap", "app"]).assert().code(1);
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(text.contains("1 rewrapped"), "{text}");
    // Refused by the rewrap, or already untrusted in the listing (an identity on
    // the writing host does not vouch for a backup dated after its writer key).
    assert!(
        text.contains("nothing proves this host wrote it")
            || text.contains("this host did not write it"),
        "{text}"
    );
    // Without the identity (the writing host's view), the forgery is still
    // untrusted, and the real backup, rewrapped, reads with the new identity.
    w.write_config(
        "",
        &for_recipients(&w, &[r1.clone(), id2.recipient().to_string()], ""),
    );
    let list = w.stdout(&["backup", "list", "app"]);
    assert_eq!(list.matches("UNTRUSTED").count(), 1, "{list}");
    let id2_file = w.path().join("id2.txt");
    id2.save(&id2_file).expect("save identity");
    let out_db = w.path().join("out.db");
    w.cmd(&[
        "restore",
        "app",
        "--to",
        s(&out_db),
        "--identity",
        s(&id2_file),
    ])
    .assert()
    .success();
    assert_eq!(sqlite(&out_db, "SELECT count(*) FROM t;").trim(), "3");

    // Case 03: a forgery copied over the real (rewrapped) backup's archive, as if a
    // rewrap had been killed before the manifest: never "repaired".
    let real = archives(&w.path().join("backups"), "app")
        .into_iter()
        .find(|a| !a.to_string_lossy().contains(&*forged_id(&forger)))
        .expect("the real archive");
    let planted = archives(&forger.path().join("backups"), "app").remove(0);
    std::fs::copy(&planted, &real).unwrap();
    w.write_config(
        "",
        &for_recipients(&w, &[r1, id2.recipient().to_string()], &identities),
    );
    let out = w.cmd(&["key", "rewrap", "app"]).assert().code(1);
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(!text.contains("1 repaired"), "{text}");
    std::fs::remove_file(&id_file).unwrap();
}

/// The id of the forger's one backup.
fn forged_id(forger: &Workdir) -> String {
    let a = archives(&forger.path().join("backups"), "app").remove(0);
    a.file_name()
        .unwrap()
        .to_string_lossy()
        .trim_end_matches(".dbk")
        .to_owned()
}

/// A daemon still running with the old key while `key rewrap` runs (the operator
/// forgot to reload it) writes backups the rewrap never saw. The rewrap must not
/// end with "done" (exit 0) then: the operator would destroy the old key those
/// backups need. Every backup that finished before the rewrap's last archive line
/// was printed (so before its closing re-list) is named, and the run exits 1.
#[test]
fn a_backup_written_with_the_old_key_during_a_rewrap_is_reported() {
    use std::io::{BufRead, BufReader};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let w = Workdir::new();
    make_db(&w);
    let a = w.key("a.key");
    let b = w.key("b.key");
    let n = 150;
    plant(&w, &a, n);
    // The daemon's config, never reloaded: still key A, keeping everything.
    config(&w, &a, "keep = { last = -1 }");
    let old = w.path().join("old.toml");
    std::fs::copy(w.config_path(), &old).expect("old config");
    config(&w, &b, &decryption(&[&a]));

    let mut rewrap = Command::new(BIN)
        .args(["key", "rewrap", "-c", s(&w.config_path())])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("rewrap");
    let stdout = rewrap.stdout.take().expect("stdout");
    let lines = Arc::new(AtomicUsize::new(0));
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines() {
                let line = line.expect("line");
                if line.ends_with(": rewrapped") {
                    lines.fetch_add(1, Ordering::SeqCst);
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        })
    };
    // Old-key backups, one after another, until the rewrap has printed its last
    // archive line; only those that finished before it count.
    let mut surely_seen_late = 0;
    while lines.load(Ordering::SeqCst) < n {
        let before = lines.load(Ordering::SeqCst);
        let out = Command::new(BIN)
            .args(["run-job", "app.backup", "-c", s(&old)])
            .output()
            .expect("run-job");
        assert!(out.status.success(), "{out:?}");
        if before > 0 && lines.load(Ordering::SeqCst) < n {
            surely_seen_late += 1;
        }
    }
    let status = rewrap.wait().expect("wait");
    let out = reader.join().expect("reader");
    assert!(
        surely_seen_late > 0,
        "no backup finished during the rewrap; the test proved nothing:\n{out}"
    );
    let named = out
        .lines()
        .filter(|l| l.contains("written during the rewrap"))
        .count();
    assert!(named >= surely_seen_late, "{surely_seen_late} late:\n{out}");
    assert_eq!(status.code(), Some(1), "{out}");
    // Once the daemon is reloaded, a new backup is made with key B: the newest
    // trusted backup needs no old key, and `backup list` says which key it has.
    w.stdout(&["run-job", "app.backup"]);
    let list = w.stdout(&["backup", "list", "app"]);
    let b_id = dbkeeper::keys::Key::load(&b)
        .expect("key b")
        .id()
        .to_owned();
    let newest = list
        .lines()
        .rfind(|l| l.contains(" app ") && !l.contains("UNTRUSTED"))
        .expect("a trusted backup");
    assert!(newest.contains(&format!("key {b_id}")), "{list}");
    assert!(list.contains("KEY"), "{list}");
}

/// Adversary round 2, case 02: a destination folder that is not there (an unmounted
/// disk) lists as empty; the rewrap says so and exits 1 rather than "done", since
/// its backups would need the old key the operator is about to destroy.
#[test]
fn a_missing_destination_is_never_taken_for_an_empty_one() {
    let w = Workdir::new();
    make_db(&w);
    let (a, b) = (w.key("a.key"), w.key("b.key"));
    let (bk, offsite) = (w.path().join("bk"), w.path().join("offsite"));
    let cfg = |key: &Path, extra: &str| {
        w.write_config(
            "",
            &sqlite_db(
                &w,
                "app",
                &format!(
                    "[database.backup]\nschedule = \"manual\"\ndestination = [\"{}\", \"{}\"]\nencryption-key-file = \"{}\"\n{extra}\n",
                    bk.display(),
                    offsite.display(),
                    key.display()
                ),
            ),
        )
    };
    cfg(&a, "");
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let unmounted = w.path().join("offsite.unmounted");
    std::fs::rename(&offsite, &unmounted).expect("unmount");
    cfg(&b, &decryption(&[&a]));
    let out = w.cmd(&["key", "rewrap"]).assert().code(1);
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(text.contains("does not exist (not mounted?)"), "{text}");
    assert!(text.contains("1 rewrapped"), "{text}");
    // Mounted again, the next run finishes the job.
    std::fs::rename(&unmounted, &offsite).expect("mount");
    let again = w.stdout(&["key", "rewrap"]);
    assert!(again.contains("1 rewrapped, 1 already current"), "{again}");
}

/// Adversary round 2, case 05: rotating back to a key that was current before
/// (K1, K2, then K1 again) leaves every backup trusted and restorable: the switch
/// back starts the key's boundary afresh.
#[test]
fn rotating_back_to_an_earlier_key_keeps_every_backup() {
    let w = Workdir::new();
    make_db(&w);
    let (k1, k2) = (w.key("k1.key"), w.key("k2.key"));
    config(&w, &k1, "");
    w.cmd(&["run-job", "app.backup"]).assert().success();
    std::thread::sleep(Duration::from_millis(1100));
    config(&w, &k2, &decryption(&[&k1]));
    w.stdout(&["key", "rewrap"]);
    w.cmd(&["run-job", "app.backup"]).assert().success();
    std::thread::sleep(Duration::from_millis(1100));
    config(&w, &k1, &decryption(&[&k2]));
    let out = w.stdout(&["key", "rewrap"]);
    assert!(out.contains("2 rewrapped"), "{out}");
    let list = w.stdout(&["backup", "list", "app"]);
    assert!(!list.contains("UNTRUSTED"), "{list}");
    let to = w.path().join("out.db");
    w.cmd(&["restore", "app", "--to", s(&to)])
        .assert()
        .success();
}

/// Adversary round 2, case 06: rotating from a key file to recipients only retires
/// the key file like any rotation: a backup made afterwards with the leaked old key
/// is untrusted, never rewrapped, never restored.
#[test]
fn rotating_to_recipients_only_retires_the_old_key() {
    let w = Workdir::new();
    make_db(&w);
    let old = w.key("old.key");
    config(&w, &old, "");
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let id = Identity::generate();
    let id_file = w.path().join("id.txt");
    id.save(&id_file).expect("save identity");
    let recipients_only = |extra: &str| {
        w.write_config(
            "",
            &sqlite_db(
                &w,
                "app",
                &format!(
                    "[database.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nrecipients = [\"{}\"]\n{extra}\n",
                    w.path().join("backups").display(),
                    id.recipient()
                ),
            ),
        )
    };
    recipients_only(&decryption(&[&old]));
    let out = w.stdout(&["key", "rewrap"]);
    assert!(out.contains("1 rewrapped"), "{out}");
    // Whoever holds the leaked key plants a newer backup, with a state of its own.
    std::thread::sleep(Duration::from_millis(1100));
    plant_forgery(&w, &old);
    let list = w.stdout(&["backup", "list", "app"]);
    assert_eq!(list.matches("UNTRUSTED").count(), 1, "{list}");
    assert!(list.contains("a retired key"), "{list}");
    let again = w.cmd(&["key", "rewrap"]).assert().code(1);
    let text = String::from_utf8_lossy(&again.get_output().stdout).into_owned();
    assert!(text.contains("0 rewrapped, 1 already current"), "{text}");
    let to = w.path().join("out.db");
    w.cmd(&["restore", "app", "--to", s(&to), "--identity", s(&id_file)])
        .assert()
        .success();
    assert_eq!(sqlite(&to, "SELECT count(*) FROM t;").trim(), "3");
}

/// `[database.backup]` for recipient `recipient` only, to `<w>/backups`.
fn recipients_only(w: &Workdir, recipient: &str, extra: &str) {
    w.write_config(
        "",
        &sqlite_db(
            w,
            "app",
            &format!(
                "[database.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nrecipients = [\"{recipient}\"]\n{extra}\n",
                w.path().join("backups").display(),
            ),
        ),
    )
}

/// Adversary round 3, case 01: two destinations with their own `keep` (the second
/// holds backups the first does not), rewrapped one destination at a time. The
/// rewrapped copies keep their old dates and never mark when the new key took
/// over, so the second destination's backups stay trusted and are rewrapped too.
#[test]
fn destinations_rewrapped_one_at_a_time_keep_every_backup() {
    let w = Workdir::new();
    make_db(&w);
    let (a, b) = (w.key("a.key"), w.key("b.key"));
    let (d1, d2) = (w.path().join("d1"), w.path().join("d2"));
    let cfg = |key: &Path, extra: &str| {
        w.write_config(
            "",
            &sqlite_db(
                &w,
                "app",
                &format!(
                    "[database.backup]\nschedule = \"manual\"\ndestination = [{{ url = \"{}\", keep = {{ last = 1 }} }}, {{ url = \"{}\", keep = {{ last = -1 }} }}]\nencryption-key-file = \"{}\"\n{extra}\n",
                    d1.display(),
                    d2.display(),
                    key.display()
                ),
            ),
        )
    };
    cfg(&a, "");
    for _ in 0..3 {
        w.cmd(&["run-job", "app.backup"]).assert().success();
        std::thread::sleep(Duration::from_millis(1100));
    }
    assert_eq!(archives(&d1, "app").len(), 1);
    assert_eq!(archives(&d2, "app").len(), 3);
    cfg(&b, &decryption(&[&a]));
    let first = w.stdout(&["key", "rewrap", "--from", s(&d1)]);
    assert!(first.contains("1 rewrapped"), "{first}");
    let second = w.stdout(&["key", "rewrap", "--from", s(&d2)]);
    assert!(second.contains("3 rewrapped"), "{second}");
    cfg(&b, "");
    let list = w.stdout(&["backup", "list", "app"]);
    assert!(!list.contains("UNTRUSTED"), "{list}");
    for archive in archives(&d1, "app").iter().chain(&archives(&d2, "app")) {
        assert!(
            opens(archive, &b) && !opens(archive, &a),
            "{}",
            archive.display()
        );
    }
}

/// Adversary round 3, case 02: K1, then K2 (a backup made with it), then K1 again
/// with K2 in `decryption-key-files`: the K2 backup stays trusted, though K1 has
/// backups from before K2 existed.
#[test]
fn a_backup_of_the_key_before_a_switch_back_stays_trusted() {
    let w = Workdir::new();
    make_db(&w);
    let (k1, k2) = (w.key("k1.key"), w.key("k2.key"));
    config(&w, &k1, "");
    w.cmd(&["run-job", "app.backup"]).assert().success();
    std::thread::sleep(Duration::from_millis(1100));
    config(&w, &k2, &decryption(&[&k1]));
    w.cmd(&["run-job", "app.backup"]).assert().success();
    std::thread::sleep(Duration::from_millis(1100));
    // The switch back is taken up by `key rewrap` (or a daemon's reload), never by
    // a backup run, which a daemon not yet reloaded could make with the old key.
    config(&w, &k1, &decryption(&[&k2]));
    let out = w.stdout(&["key", "rewrap"]);
    assert!(out.contains("1 rewrapped, 1 already current"), "{out}");
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let list = w.stdout(&["backup", "list", "app"]);
    assert!(!list.contains("UNTRUSTED"), "{list}");
}

/// Adversary round 3, case 05: an archive whose manifest is gone (a pinned
/// pre-migration archive) is not rewrapped, and the run says so and exits 1: it
/// still needs the old key.
#[test]
fn an_archive_without_a_manifest_is_reported() {
    let w = Workdir::new();
    make_db(&w);
    let (a, b) = (w.key("a.key"), w.key("b.key"));
    plant(&w, &a, 2);
    let manifest = std::fs::read_dir(w.path().join("backups/app"))
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| s(p).ends_with(".manifest.json"))
        .expect("a manifest");
    std::fs::remove_file(&manifest).expect("remove");
    config(&w, &b, &decryption(&[&a]));
    let out = w.cmd(&["key", "rewrap"]).assert().code(1);
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(text.contains("an archive without a manifest"), "{text}");
    assert!(text.contains("1 rewrapped"), "{text}");
}

/// Adversary round 3, case 07: with recipients only, retention exports are made for
/// them (format version 3), never written in plain; the identity reads them.
#[test]
fn retention_exports_are_made_for_the_recipients() {
    let w = Workdir::new();
    sqlite(
        &w.path().join("app.db"),
        "CREATE TABLE logs (id INTEGER PRIMARY KEY, created_at TEXT NOT NULL, msg TEXT);
         INSERT INTO logs (created_at, msg) VALUES (datetime('now', '-40 days'), 'SECRET ROW');",
    );
    let id = Identity::generate();
    let id_file = w.path().join("id.txt");
    id.save(&id_file).expect("save identity");
    let rule = "[[database.retention]]\ntable = 'logs'\nname = \"log\"\ncolumn = \"created_at\"\nolder-than = \"30d\"\nschedule = \"manual\"\narchive = true\n";
    recipients_only(&w, &id.recipient().to_string(), rule);
    w.cmd(&["run-job", "app.retention.log"]).assert().success();
    let exports: Vec<PathBuf> = walk(&w.path().join("backups/app/retention/log"))
        .into_iter()
        .filter(|p| s(p).ends_with(".jsonl.dbk"))
        .collect();
    assert_eq!(exports.len(), 1);
    let bytes = std::fs::read(&exports[0]).expect("export");
    assert_eq!(&bytes[..8], b"DBKEEPER");
    assert_eq!(bytes[8], 3, "format version");
    assert!(!String::from_utf8_lossy(&bytes).contains("SECRET ROW"));
    let out = assert_cmd::Command::new(BIN)
        .args(["decrypt", s(&exports[0]), "--identity", s(&id_file)])
        .assert()
        .success();
    assert!(String::from_utf8_lossy(&out.get_output().stdout).contains("SECRET ROW"));
}

/// Adversary round 3, case 08: `decrypt --identity` refuses a plain archive (anyone
/// who can write to the destination can put one there) unless
/// `--allow-unencrypted` says it is expected, as `--key-file` does.
#[test]
fn decrypt_with_an_identity_refuses_a_plain_archive() {
    let w = Workdir::new();
    make_db(&w);
    w.write_config(
        "",
        &sqlite_db(
            &w,
            "app",
            &backup_table(&w.path().join("backups"), None, ""),
        ),
    );
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let plain = archives(&w.path().join("backups"), "app").remove(0);
    let id = Identity::generate();
    let id_file = w.path().join("id.txt");
    id.save(&id_file).expect("save identity");
    assert_cmd::Command::new(BIN)
        .args(["decrypt", s(&plain), "--identity", s(&id_file)])
        .assert()
        .code(3);
    assert_cmd::Command::new(BIN)
        .args([
            "decrypt",
            s(&plain),
            "--identity",
            s(&id_file),
            "--allow-unencrypted",
        ])
        .assert()
        .success();
}

/// Adversary round 4, case 01: with the state directory lost, the first backups made
/// with the new key mark the key change in the destination; an attacker who adds
/// `rewrapped` to their manifests (version 1 archives, which no rewrap ever wrote)
/// does not take them out of that, so a backup made with the leaked old key stays
/// untrusted. A state record that cannot be read is warned about.
#[test]
fn an_edited_rewrapped_mark_never_brings_a_retired_key_back() {
    let w = Workdir::new();
    make_db(&w);
    let (k1, k2) = (w.key("k1.key"), w.key("k2.key"));
    config(&w, &k1, "");
    w.cmd(&["run-job", "app.backup"]).assert().success();
    std::thread::sleep(Duration::from_millis(1100));
    config(&w, &k2, &decryption(&[&k1]));
    w.cmd(&["run-job", "app.backup"]).assert().success();
    std::thread::sleep(Duration::from_millis(1100));
    plant_forgery(&w, &k1);
    // The state record is damaged, and every K2 manifest claims a rewrap.
    std::fs::write(w.path().join("state/key-boundaries.json"), "{ damaged").expect("damage");
    for entry in std::fs::read_dir(w.path().join("backups/app"))
        .expect("dir")
        .flatten()
    {
        let path = entry.path();
        if !s(&path).ends_with(".manifest.json") {
            continue;
        }
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("manifest")).expect("json");
        m["rewrapped"] = serde_json::Value::String("2020-01-01T00:00:00Z".to_owned());
        std::fs::write(&path, m.to_string()).expect("edit");
    }
    let out = w.cmd(&["backup", "list", "app"]).output().expect("list");
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{list}");
    assert_eq!(list.matches("UNTRUSTED").count(), 1, "{list}");
    assert!(list.contains("a retired key"), "{list}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read key-boundaries.json"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let to = w.path().join("out.db");
    w.cmd(&["restore", "app", "--to", s(&to)])
        .assert()
        .success();
    assert_eq!(sqlite(&to, "SELECT count(*) FROM t;").trim(), "3");
}

/// Adversary round 4, case 07: a daemon not yet reloaded (still on K1) makes one
/// backup after `key rewrap` took up K2; that run must not turn the key-change record
/// back, so a later rewrap does not take K2 for "made current again" and rewrap a
/// forgery made with the leaked K1 after the change.
#[test]
fn a_backup_run_on_the_old_key_never_resets_the_key_change() {
    let w = Workdir::new();
    make_db(&w);
    let (k1, k2) = (w.key("k1.key"), w.key("k2.key"));
    config(&w, &k1, "keep = { last = -1 }");
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let stale = w.path().join("stale.toml");
    std::fs::copy(w.config_path(), &stale).expect("stale config");
    std::thread::sleep(Duration::from_millis(1100));
    config(&w, &k2, &decryption(&[&k1]));
    w.stdout(&["key", "rewrap"]);
    std::thread::sleep(Duration::from_millis(1100));
    Command::new(BIN)
        .args(["run-job", "app.backup", "-c", s(&stale)])
        .output()
        .expect("stale run");
    std::thread::sleep(Duration::from_millis(1100));
    plant_forgery(&w, &k1);
    let out = w.cmd(&["key", "rewrap"]).assert().code(1);
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(!text.contains(": rewrapped"), "{text}");
    assert!(text.contains("a retired key"), "{text}");
}

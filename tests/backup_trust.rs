//! Backups an operator can trust, against an attacker who can write to the backup
//! folder (and a clock that was wrong once): forged plain archives, manifest ids used
//! as paths, duplicate ids, future-dated backups, and the plaintext scratch files and
//! modes on the dbkeeper host.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use chrono::Utc;
use common::{archives, backup_table, metric_value, sqlite, sqlite_db, Workdir};
use dbkeeper::archive::{self, format, Compression, Header, Key, Settings};
use dbkeeper::catalog::{BackupKind, Manifest, Verification, VerifyMode, VerifyResult};
use dbkeeper::storage::Destination;

/// `<workdir>/<name>.db` holding one table `t` with one row `value`.
fn marked_db(w: &Workdir, name: &str, value: &str) -> PathBuf {
    let path = w.path().join(format!("{name}.db"));
    let _ = std::fs::remove_file(&path);
    sqlite(
        &path,
        &format!("CREATE TABLE t (v TEXT); INSERT INTO t VALUES ('{value}');"),
    );
    path
}

fn marker(path: &Path) -> String {
    sqlite(path, "SELECT group_concat(v) FROM t")
        .trim()
        .to_owned()
}

fn id_of(archive: &Path) -> String {
    archive
        .file_name()
        .expect("name")
        .to_string_lossy()
        .trim_end_matches(".dbk")
        .to_owned()
}

fn ids(dest: &Path, db: &str) -> Vec<String> {
    archives(dest, db).iter().map(|p| id_of(p)).collect()
}

fn manifest_path(dest: &Path, db: &str, id: &str) -> PathBuf {
    dest.join(db).join(format!("{id}.manifest.json"))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// Runs a backup job and returns the id it made (the newest archive).
fn backup(w: &Workdir, db: &str, dest: &Path) -> String {
    let before = ids(dest, db);
    w.cmd(&["run-job", &format!("{db}.backup")])
        .assert()
        .success();
    let made: Vec<String> = ids(dest, db)
        .into_iter()
        .filter(|i| !before.contains(i))
        .collect();
    assert_eq!(made.len(), 1, "one new backup: {made:?}");
    made[0].clone()
}

/// A workdir with the SQLite database `app` (one row, `x`) backed up, encrypted, to
/// `<workdir>/backups` with `extra` in its backup table; returns it and the destination.
fn app_with_backups(extra: &str) -> (Workdir, PathBuf) {
    let w = Workdir::new();
    let key = w.key("k");
    let dest = w.path().join("backups");
    marked_db(&w, "app", "x");
    w.write_config(
        "",
        &sqlite_db(&w, "app", &backup_table(&dest, Some(&key), extra)),
    );
    (w, dest)
}

/// Waits until the next backup gets another id (ids have one-second resolution).
fn next_second() {
    std::thread::sleep(Duration::from_millis(1100));
}

#[test]
fn forged_plain_archive_is_listed_untrusted_and_refused_everywhere() {
    let w = Workdir::new();
    let key = w.key("k");
    let dest = w.path().join("backups");
    let keyed = sqlite_db(&w, "app", &backup_table(&dest, Some(&key), ""));
    marked_db(&w, "app", "genuine");
    w.write_config("", &keyed);
    let genuine = backup(&w, "app", &dest);
    next_second();

    // The attacker's archive: plain, for the right database, with a manifest whose
    // SHA-256 is right, newer than the genuine backup.
    let forge = w.path().join("forge");
    marked_db(&w, "app", "forged");
    w.write_config("", &sqlite_db(&w, "app", &backup_table(&forge, None, "")));
    let forged = backup(&w, "app", &forge);
    for suffix in [".dbk", ".manifest.json"] {
        std::fs::copy(
            forge.join("app").join(format!("{forged}{suffix}")),
            dest.join("app").join(format!("{forged}{suffix}")),
        )
        .expect("plant");
    }
    w.write_config("", &keyed);
    let forged_manifest = std::fs::read(manifest_path(&dest, "app", &forged)).expect("read");

    let list = w.stdout(&["backup", "list", "app"]);
    let line = |id: &str| {
        list.lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id} not listed:\n{list}"))
            .to_owned()
    };
    assert!(line(&forged).contains("UNTRUSTED"), "{list}");
    assert!(line(&forged).contains("not encrypted"), "{list}");
    assert!(!line(&genuine).contains("UNTRUSTED"), "{list}");

    w.cmd(&["backup", "verify", "app", "--backup", &forged])
        .assert()
        .code(3);
    assert_eq!(
        std::fs::read(manifest_path(&dest, "app", &forged)).expect("read"),
        forged_manifest,
        "verify wrote into an untrusted manifest"
    );
    let out = w.path().join("out.db");
    let out_s = out.to_str().expect("utf-8");
    w.cmd(&["restore", "app", "--backup", &forged, "--to", out_s])
        .assert()
        .code(3);
    assert!(!out.exists(), "restore wrote the forged data");
    let archive = dest.join("app").join(format!("{forged}.dbk"));
    let archive_s = archive.to_str().expect("utf-8");
    w.cmd(&["decrypt", archive_s, "-o", out_s]).assert().code(3);
    assert!(!out.exists(), "decrypt wrote the forged data");

    // `latest` is the newest trusted backup: the genuine one.
    w.cmd(&["restore", "app", "--to", out_s]).assert().success();
    assert_eq!(marker(&out), "genuine");

    // Made on purpose? The operator can say so, for one command.
    let plain = w.path().join("plain.db");
    w.cmd(&[
        "decrypt",
        archive_s,
        "-o",
        plain.to_str().expect("utf-8"),
        "--allow-unencrypted",
    ])
    .assert()
    .success();
    assert_eq!(marker(&plain), "forged");
}

/// Plants `20200101T000000Z-manual.manifest.json` in `<dest>/<db>/`: a copy of the
/// manifest of `id` (so claiming that id), dated 2020.
fn plant_duplicate(dest: &Path, db: &str, id: &str) {
    let text = std::fs::read_to_string(manifest_path(dest, db, id)).expect("read");
    let started = text
        .lines()
        .find(|l| l.contains("\"started_at\""))
        .expect("started_at")
        .to_owned();
    std::fs::write(
        manifest_path(dest, db, "20200101T000000Z-manual"),
        text.replace(&started, "  \"started_at\": \"2020-01-01T00:00:00Z\","),
    )
    .expect("plant");
}

#[test]
fn manifest_ids_are_never_paths() {
    let w = Workdir::new();
    let key = w.key("k");
    let dest = w.path().join("backups");
    let table = backup_table(&dest, Some(&key), "keep = { last = 1 }");
    marked_db(&w, "a", "a");
    marked_db(&w, "b", "b");
    w.write_config(
        "",
        &format!(
            "{}\n{}",
            sqlite_db(&w, "a", &table),
            sqlite_db(&w, "b", &table)
        ),
    );
    let b_id = backup(&w, "b", &dest);
    let a_first = backup(&w, "a", &dest);

    // In a's folder: b's manifest with the id "../b/<id>", and a second manifest
    // claiming a's genuine id, dated long ago.
    let b_manifest = std::fs::read_to_string(manifest_path(&dest, "b", &b_id)).expect("read");
    std::fs::write(
        dest.join("a").join("zz.manifest.json"),
        b_manifest.replace(&format!("\"{b_id}\""), &format!("\"../b/{b_id}\"")),
    )
    .expect("plant");
    plant_duplicate(&dest, "a", &a_first);

    next_second();
    let a_second = backup(&w, "a", &dest);
    assert!(
        dest.join("b").join(format!("{b_id}.dbk")).exists()
            && manifest_path(&dest, "b", &b_id).exists(),
        "a's rotation deleted b's only backup"
    );
    assert_eq!(ids(&dest, "b"), [b_id.as_str()]);
    assert_eq!(
        ids(&dest, "a"),
        [a_second.as_str()],
        "a's own rotation still works"
    );
    for planted in ["zz.manifest.json", "20200101T000000Z-manual.manifest.json"] {
        assert!(
            dest.join("a").join(planted).exists(),
            "untrusted manifests are never used to delete anything, themselves included"
        );
    }
    let list = w.stdout(&["backup", "list", "a"]);
    assert_eq!(list.matches("UNTRUSTED").count(), 2, "{list}");
}

#[test]
fn a_duplicate_id_never_makes_rotation_delete_the_genuine_backup() {
    // keep = 2, the genuine backup and a manifest copying its id dated long ago: the
    // next run must not delete the genuine one.
    let (w, dest) = app_with_backups("keep = { last = 2 }");
    let genuine = backup(&w, "app", &dest);
    plant_duplicate(&dest, "app", &genuine);
    next_second();
    let newer = backup(&w, "app", &dest);
    assert_eq!(ids(&dest, "app"), [genuine.clone(), newer]);
    w.cmd(&["backup", "verify", "app", "--backup", &genuine])
        .assert()
        .success();
}

#[test]
fn a_duplicate_id_is_warned_about_once_per_run_and_listed_as_such() {
    let (w, dest) = app_with_backups("keep = { last = 2 }");
    let genuine = backup(&w, "app", &dest);
    plant_duplicate(&dest, "app", &genuine);
    let copy = "20200101T000000Z-manual.manifest.json";
    // Sorted: the copy is dated 2020.
    let files = format!("{copy}, {genuine}.manifest.json");

    // `backup list` marks both claims, genuine and copy, naming the files.
    let list = w.stdout(&["backup", "list", "app"]);
    let marked: Vec<&str> = list
        .lines()
        .filter(|l| l.contains(&format!("DUPLICATE ID {genuine} ({files})")))
        .collect();
    assert_eq!(marked.len(), 2, "{list}");
    assert!(
        marked
            .iter()
            .any(|l| l.starts_with(&genuine) && !l.contains("UNTRUSTED")),
        "{list}"
    );
    assert!(
        marked
            .iter()
            .any(|l| l.starts_with("20200101T000000Z-manual") && l.contains("UNTRUSTED")),
        "{list}"
    );

    // A backup run (rotation, then the catalog metrics) warns once, naming the files.
    next_second();
    let out = w
        .cmd(&["run-job", "app.backup"])
        .env("RUST_LOG", "warn")
        .assert()
        .success();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("claimed by more than one manifest"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains(&genuine) && warnings[0].contains(copy),
        "{stderr}"
    );
    // So does `backup prune`, and it deletes neither claim.
    let out = w
        .cmd(&["backup", "prune", "app"])
        .env("RUST_LOG", "warn")
        .assert()
        .success();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert_eq!(
        stderr.matches("claimed by more than one manifest").count(),
        1,
        "{stderr}"
    );
    assert!(manifest_path(&dest, "app", &genuine).exists());
    assert!(dest.join("app").join(copy).exists());
}

/// Writes a genuine, encrypted backup of `app` (the image `image`) dated `ahead`
/// into the future, as a run with a wrong clock would have; returns its id.
fn plant_future_backup(dest: &Path, key: &Path, image: &Path, ahead: chrono::Duration) -> String {
    let key = Key::load(key).expect("key");
    let created = Utc::now() + ahead;
    let id = format!("{}-scheduled", created.format("%Y%m%dT%H%M%SZ"));
    let dest = Destination::new(dest, "app");
    dest.ensure().expect("dest");
    let out = std::fs::File::create(dest.path(&format!("{id}.dbk"))).expect("archive");
    let settings = Settings {
        header: Header {
            database: "app".into(),
            backend: "sqlite".into(),
            image: "sqlite".into(),
            created,
            compression: Compression::Gzip,
            segment_size: format::SEGMENT_SIZE,
            encryption: None,
        },
        key: Some(&key),
        compression: Compression::Gzip,
        level: 6,
        threads: 1,
        check_with: None,
    };
    let source = std::fs::File::open(image).expect("image");
    let (_, stats) = archive::write_archive(source, out, settings, &AtomicBool::new(false))
        .expect("write archive");
    Manifest {
        id: id.clone(),
        database: "app".into(),
        backend: "sqlite".into(),
        server_version: None,
        kind: BackupKind::Scheduled,
        started_at: created,
        finished_at: created,
        raw_bytes: stats.raw_bytes,
        stored_bytes: stats.stored_bytes,
        sha256: stats.sha256,
        key_id: Some(key.id().to_owned()),
        compression: Compression::Gzip,
        format_version: format::VERSION,
        dbkeeper_version: "test".into(),
        schema_version: None,
        verification: Verification {
            mode: VerifyMode::Read,
            result: VerifyResult::Passed,
            at: created,
            error: None,
        },
    }
    .save(&dest)
    .expect("manifest");
    id
}

#[test]
fn a_future_dated_backup_keeps_no_slot_and_never_costs_the_fresh_one() {
    for last in [1, 2] {
        let w = Workdir::new();
        let key = w.key("k");
        let dest = w.path().join("backups");
        let stale = marked_db(&w, "stale", "stale");
        let future = plant_future_backup(&dest, &key, &stale, chrono::Duration::days(1));
        marked_db(&w, "app", "fresh");
        w.write_config(
            "",
            &sqlite_db(
                &w,
                "app",
                &backup_table(&dest, Some(&key), &format!("keep = {{ last = {last} }}")),
            ),
        );
        let mut made = Vec::new();
        for n in 0..last {
            if n > 0 {
                next_second();
            }
            made.push(backup(&w, "app", &dest));
        }
        let mut expected = made.clone();
        expected.push(future.clone());
        assert_eq!(
            ids(&dest, "app"),
            expected,
            "last = {last}: the fresh backups take the slots, the future one is kept aside"
        );
        let out = w.path().join("restored.db");
        w.cmd(&["restore", "app", "--to", out.to_str().expect("utf-8")])
            .assert()
            .success();
        assert_eq!(
            marker(&out),
            "fresh",
            "last = {last}: latest is the fresh one"
        );
        let list = w.stdout(&["backup", "list", "app"]);
        let line = list
            .lines()
            .find(|l| l.contains(&future))
            .unwrap_or_else(|| panic!("{list}"));
        assert!(line.contains("FUTURE"), "{list}");
        let dry = w.stdout(&["backup", "prune", "app", "--dry-run"]);
        assert!(!dry.contains("would delete"), "{dry}");
        assert!(dry.contains("dated in the future"), "{dry}");

        if last == 1 {
            let d = w.start();
            d.wait_for("the future-dated gauge", Duration::from_secs(15), || {
                metric_value(
                    &d.metrics(),
                    "dbkeeper_backup_future_dated",
                    &["database=\"app\""],
                ) == Some(1.0)
            });
            assert!(
                d.log_text().contains("dated in the future"),
                "{}",
                d.log_text()
            );
        }
    }
}

#[test]
fn scratch_files_of_any_pid_are_cleaned_and_private_files_stay_private() {
    let (w, dest) = app_with_backups("verify = \"restore\"");
    let id = backup(&w, "app", &dest);
    let state = w.path().join("state");
    assert_eq!(mode(&state), 0o700, "state directory");
    assert_eq!(mode(&state.join("tmp")), 0o700, "scratch directory");
    assert_eq!(mode(&dest.join("app")), 0o700, "backup folder");

    // What a crashed run in a container leaves: PID 1 is always alive there.
    let plant = || {
        for name in [
            "backup-app-1.sqlite",
            "verify-1.sqlite",
            "backup-app-4242.sqlite",
        ] {
            std::fs::write(state.join("tmp").join(name), b"plaintext").expect("plant");
        }
        std::fs::write(dest.join("app").join(".x.dbk.1.tmp"), b"partial").expect("plant");
    };
    let leftovers = || {
        let mut v: Vec<String> = std::fs::read_dir(state.join("tmp"))
            .expect("tmp")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sqlite"))
            .collect();
        if dest.join("app").join(".x.dbk.1.tmp").exists() {
            v.push(".x.dbk.1.tmp".to_owned());
        }
        v
    };
    plant();
    next_second();
    backup(&w, "app", &dest);
    assert_eq!(leftovers(), Vec::<String>::new(), "run-job cleans up");
    plant();
    let d = w.start();
    d.wait_for("start-up cleanup", Duration::from_secs(15), || {
        leftovers().is_empty()
    });
    drop(d);

    let out = w.path().join("plain.db");
    let archive = dest.join("app").join(format!("{id}.dbk"));
    w.cmd(&[
        "decrypt",
        archive.to_str().expect("utf-8"),
        "-o",
        out.to_str().expect("utf-8"),
    ])
    .assert()
    .success();
    assert_eq!(mode(&out), 0o600, "decrypted plaintext is private");
}

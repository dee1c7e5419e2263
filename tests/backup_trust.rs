//! Backups an operator can trust, against an attacker who can write to the backup
//! folder (and a clock that was wrong once): forged plain archives, manifest ids used
//! as paths, duplicate ids, future-dated backups, and the plaintext scratch files and
//! modes on the dbkeeper host.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use common::{
    archives, backup_table, metric_value, plant_backup, sqlite, sqlite_db, Planted, Workdir,
};
use dbkeeper::repo::catalog::BackupKind;

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

/// The line of `backup list` output for backup `id` (empty if none).
fn listed(list: &str, id: &str) -> String {
    list.lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_default()
        .to_owned()
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
    // keep = 1 would prune a's first backup, but another manifest claims its id
    // (adversary round 3, case 09): which claim is right cannot be told, so it stays.
    assert_eq!(ids(&dest, "a"), [a_first.as_str(), a_second.as_str()]);
    // Once the planted claim is gone, a's own rotation prunes it as the policy says.
    std::fs::remove_file(manifest_path(&dest, "a", "20200101T000000Z-manual")).expect("rm");
    next_second();
    let a_third = backup(&w, "a", &dest);
    assert_eq!(
        ids(&dest, "a"),
        [a_third.as_str()],
        "a's own rotation still works"
    );
    plant_duplicate(&dest, "a", &a_third);
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
    let what = Planted {
        name: "app",
        backend: "sqlite",
        image: "sqlite",
        created: Utc::now() + ahead,
        kind: BackupKind::Scheduled,
    };
    plant_backup(dest, key, what, std::fs::File::open(image).expect("image"))
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

/// Writes `<id>` in `<dest>/<db>/` as a copy of backup `from`: the archive bytes as
/// given, and `from`'s manifest with the id, time and SHA-256 changed to match: what
/// an attacker without the key can make.
fn plant_copy(dest: &Path, db: &str, from: &str, id: &str, archive: &[u8], time: &str) {
    let folder = dest.join(db);
    std::fs::write(folder.join(format!("{id}.dbk")), archive).expect("plant archive");
    let mut m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(manifest_path(dest, db, from)).expect("read"),
    )
    .expect("json");
    m["id"] = id.into();
    m["started_at"] = time.into();
    m["sha256"] = sha256_hex(archive).into();
    m["stored_bytes"] = archive.len().into();
    std::fs::write(
        manifest_path(dest, db, id),
        serde_json::to_vec_pretty(&m).expect("json"),
    )
    .expect("plant manifest");
}

/// The SHA-256 (hex) of `bytes`, with the `sha256sum` tool (the tests keep no hash crate).
fn sha256_hex(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("write");
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)[..64].to_owned()
}

/// An id and RFC 3339 time `secs` seconds after the id `id`.
fn later_id(id: &str, secs: i64) -> (String, String) {
    let at = chrono::NaiveDateTime::parse_from_str(&id[..16], "%Y%m%dT%H%M%SZ")
        .expect("id time")
        .and_utc()
        + chrono::Duration::seconds(secs);
    (
        at.format("%Y%m%dT%H%M%SZ-manual").to_string(),
        at.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string(),
    )
}

#[test]
fn an_edited_header_time_never_authenticates_so_it_never_takes_a_slot() {
    // The header is plain JSON: without the key, an attacker can still edit its time
    // and write a matching manifest. Two such "newer" backups with keep = 2 must not
    // push the real ones out.
    let (w, dest) = app_with_backups("keep = { last = 2 }");
    let first = backup(&w, "app", &dest);
    next_second();
    let newest = backup(&w, "app", &dest);
    let bytes = std::fs::read(dest.join("app").join(format!("{newest}.dbk"))).expect("read");
    let len = u32::from_be_bytes(bytes[9..13].try_into().expect("4 bytes")) as usize;
    let mut header: serde_json::Value =
        serde_json::from_slice(&bytes[13..13 + len]).expect("header");
    let mut forged_ids = Vec::new();
    for ahead in [1, 2] {
        let (id, time) = later_id(&newest, ahead);
        header["created"] = time.clone().into();
        let edited = serde_json::to_vec(&header).expect("json");
        let mut forged = bytes[..9].to_vec();
        forged.extend_from_slice(&(edited.len() as u32).to_be_bytes());
        forged.extend_from_slice(&edited);
        forged.extend_from_slice(&bytes[13 + len..]);
        plant_copy(&dest, "app", &newest, &id, &forged, &time);
        forged_ids.push(id);
    }
    let list = w.stdout(&["backup", "list", "app"]);
    for id in &forged_ids {
        let line = list
            .lines()
            .find(|l| l.contains(id.as_str()))
            .expect("listed");
        assert!(line.contains("UNTRUSTED"), "{list}");
        assert!(line.contains("does not authenticate"), "{list}");
    }
    w.cmd(&["backup", "prune", "app"]).assert().success();
    for id in [&first, &newest] {
        assert!(
            manifest_path(&dest, "app", id).exists(),
            "real backup {id} pruned"
        );
    }
    let out = w.path().join("restored.db");
    w.cmd(&["restore", "app", "--to", out.to_str().expect("utf-8")])
        .assert()
        .success();
    assert_eq!(marker(&out), "x");
}

#[test]
fn copies_and_links_of_an_archive_never_count_and_never_cost_the_original() {
    // keep = 2: a byte-for-byte copy of the newest archive under `<id>.2`, a symbolic
    // link under `<id>.3` and a hard link under `<id>.4` (manifests adjusted). None may
    // take a slot, and nothing real may be deleted.
    let (w, dest) = app_with_backups("keep = { last = 2 }");
    let first = backup(&w, "app", &dest);
    next_second();
    let newest = backup(&w, "app", &dest);
    let folder = dest.join("app");
    let real = folder.join(format!("{newest}.dbk"));
    let bytes = std::fs::read(&real).expect("read");
    let time = {
        let m: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(manifest_path(&dest, "app", &newest)).expect("read"),
        )
        .expect("json");
        m["started_at"].as_str().expect("time").to_owned()
    };
    plant_copy(&dest, "app", &newest, &format!("{newest}.2"), &bytes, &time);
    for (n, link) in [(3, true), (4, false)] {
        let id = format!("{newest}.{n}");
        plant_copy(&dest, "app", &newest, &id, &bytes, &time);
        let path = folder.join(format!("{id}.dbk"));
        std::fs::remove_file(&path).expect("rm");
        if link {
            std::os::unix::fs::symlink(&real, &path).expect("symlink");
        } else {
            std::fs::hard_link(&real, &path).expect("hard link");
        }
    }
    let list = w.stdout(&["backup", "list", "app"]);
    assert!(list.contains(&format!("copy of backup {newest}")), "{list}");
    assert!(list.contains("not a regular file"), "{list}");
    w.cmd(&["backup", "prune", "app"]).assert().success();
    next_second();
    let third = backup(&w, "app", &dest);
    // keep = 2 over the real ones: newest and third; the copies and links are left.
    assert!(real.exists(), "the real newest archive was deleted");
    assert!(manifest_path(&dest, "app", &third).exists());
    assert!(
        !manifest_path(&dest, "app", &first).exists(),
        "rotation still works"
    );
    for n in 2..=4 {
        assert!(manifest_path(&dest, "app", &format!("{newest}.{n}")).exists());
    }
}

#[test]
fn planted_fifos_and_huge_manifests_are_untrusted_and_nothing_hangs() {
    let (w, dest) = app_with_backups("keep = { last = 5 }");
    let genuine = backup(&w, "app", &dest);
    let folder = dest.join("app");
    // A FIFO as an archive (with a copied manifest), a FIFO as a manifest, and a
    // sparse 1 GiB manifest.
    let (fifo_id, time) = later_id(&genuine, 1);
    plant_copy(&dest, "app", &genuine, &fifo_id, b"", &time);
    let fifo = folder.join(format!("{fifo_id}.dbk"));
    std::fs::remove_file(&fifo).expect("rm");
    let mk = |p: &Path| {
        assert!(std::process::Command::new("mkfifo")
            .arg(p)
            .status()
            .expect("mkfifo")
            .success())
    };
    mk(&fifo);
    let (pipe_id, _) = later_id(&genuine, 2);
    mk(&manifest_path(&dest, "app", &pipe_id));
    let (big_id, _) = later_id(&genuine, 3);
    std::fs::File::create(manifest_path(&dest, "app", &big_id))
        .expect("create")
        .set_len(1 << 30)
        .expect("sparse");

    let list = w
        .cmd(&["backup", "list", "app"])
        .timeout(Duration::from_secs(60))
        .output()
        .expect("list runs");
    assert!(list.status.success(), "{list:?}");
    let list = String::from_utf8_lossy(&list.stdout);
    assert_eq!(list.matches("UNTRUSTED").count(), 3, "{list}");
    assert!(list.contains("larger than"), "{list}");
    // Backups and restores go on.
    next_second();
    w.cmd(&["run-job", "app.backup"])
        .timeout(Duration::from_secs(60))
        .assert()
        .success();
    let out = w.path().join("restored.db");
    w.cmd(&["restore", "app", "--to", out.to_str().expect("utf-8")])
        .timeout(Duration::from_secs(60))
        .assert()
        .success();
    assert_eq!(marker(&out), "x");
}

#[test]
fn a_database_folder_replaced_by_a_link_is_never_followed() {
    // An attacker replaces `<destination>/app` with a link to another folder of app's
    // backups: dbkeeper must neither write, clean up nor rotate there.
    let (w, dest) = app_with_backups("keep = { last = 1 }");
    backup(&w, "app", &dest);
    next_second();
    backup(&w, "app", &dest);
    let elsewhere = w.path().join("elsewhere");
    std::fs::rename(dest.join("app"), &elsewhere).expect("move");
    std::fs::write(elsewhere.join("20200101T000000Z-manual.dbk"), b"orphan").expect("plant");
    std::os::unix::fs::symlink(&elsewhere, dest.join("app")).expect("link");
    let before: Vec<_> = std::fs::read_dir(&elsewhere)
        .expect("read")
        .map(|e| e.expect("entry").file_name())
        .collect();
    next_second();
    w.cmd(&["run-job", "app.backup"])
        .assert()
        .failure()
        .stderr(predicates::str::contains("symbolic link"));
    w.cmd(&["backup", "list", "app"])
        .assert()
        .failure()
        .stderr(predicates::str::contains("symbolic link"));
    let mut after: Vec<_> = std::fs::read_dir(&elsewhere)
        .expect("read")
        .map(|e| e.expect("entry").file_name())
        .collect();
    let mut before = before;
    before.sort();
    after.sort();
    assert_eq!(before, after, "files changed in the linked folder");
}

#[test]
fn a_loose_scratch_folder_is_tightened_and_a_foreign_one_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (w, dest) = app_with_backups("");
    let tmp = w.path().join("state").join("tmp");
    std::fs::create_dir_all(&tmp).expect("mkdir");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    backup(&w, "app", &dest);
    assert_eq!(mode(&tmp), 0o700, "the scratch folder was left open");
    // Owned by another user (as root here: nobody), it is refused.
    if std::os::unix::fs::chown(&tmp, Some(65534), Some(65534)).is_ok() {
        next_second();
        w.cmd(&["run-job", "app.backup"])
            .assert()
            .failure()
            .stderr(predicates::str::contains("belongs to another user"));
    }
}

#[test]
fn a_retired_key_vouches_only_for_backups_older_than_the_current_keys_first() {
    // Adversary round 3, case 05: after a key rotation, whoever holds the old key
    // (the usual reason to rotate) minted backups that became `latest` and took the
    // genuine ones' rotation slots.
    let w = Workdir::new();
    let (old, new) = (w.key("old.key"), w.key("new.key"));
    let dest = w.path().join("backups");
    let app = marked_db(&w, "app", "GENUINE");
    let config = |key: &Path, extra: &str, db: &Path| {
        format!(
            "[[database]]\nname = \"app\"\nurl = \"sqlite://{}\"\n{}",
            db.display(),
            backup_table(&dest, Some(key), &format!("keep = {{ last = 2 }}\n{extra}"))
        )
    };
    // Made before the rotation, with the old key.
    w.write_config("", &config(&old, "", &app));
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let before_rotation = ids(&dest, "app");
    std::thread::sleep(Duration::from_millis(1100));
    let rotated = config(
        &new,
        &format!("decryption-key-files = [\"{}\"]", old.display()),
        &app,
    );
    w.write_config("", &rotated);
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let genuine = ids(&dest, "app");
    assert_eq!(genuine.len(), 2);
    std::thread::sleep(Duration::from_millis(1100));

    // The attacker: the old key, and write access to the destination (not this
    // host's state directory, which remembers when the key changed).
    let attacker = Workdir::new();
    let evil = marked_db(&attacker, "evil", "FORGED");
    attacker.write_config("", &config(&old, "", &evil));
    attacker.cmd(&["run-job", "app.backup"]).assert().success();
    let forged: Vec<String> = ids(&dest, "app")
        .into_iter()
        .filter(|id| !genuine.contains(id))
        .collect();
    assert_eq!(forged.len(), 1);

    w.write_config("", &rotated);
    let list = w.stdout(&["backup", "list", "app"]);
    let line = |id: &str| listed(&list, id);
    assert!(line(&forged[0]).contains("UNTRUSTED"), "{list}");
    assert!(line(&forged[0]).contains("retired key"), "{list}");
    assert!(!line(&before_rotation[0]).contains("UNTRUSTED"), "{list}");
    let out = w.path().join("out.db");
    w.cmd(&["restore", "app", "--to", out.to_str().expect("utf-8")])
        .assert()
        .success();
    assert_eq!(marker(&out), "GENUINE");
    std::thread::sleep(Duration::from_millis(1100));
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let left = ids(&dest, "app");
    assert!(left.contains(&genuine[1]), "{left:?}");
    assert!(
        left.contains(&forged[0]),
        "an untrusted backup is never deleted"
    );
}

#[test]
fn an_archive_cut_short_never_counts_as_good_nor_costs_an_intact_backup() {
    // Adversary round 3, case 10: a truncated archive kept its slot (the listing only
    // authenticates the first segment) and the older intact backup was pruned.
    let (w, dest) = app_with_backups("keep = { last = 2 }");
    let older = backup(&w, "app", &dest);
    next_second();
    let cut = backup(&w, "app", &dest);
    let archive = dest.join("app").join(format!("{cut}.dbk"));
    let len = std::fs::metadata(&archive).expect("archive").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&archive)
        .expect("open");
    file.set_len(len - 1).expect("truncate");
    drop(file);
    let list = w.stdout(&["backup", "list", "app"]);
    let line = listed(&list, &cut);
    assert!(
        line.contains("UNTRUSTED") && line.contains("cut short"),
        "{list}"
    );
    next_second();
    let newer = backup(&w, "app", &dest);
    let left = ids(&dest, "app");
    assert!(
        left.contains(&older),
        "the intact backup was pruned: {left:?}"
    );
    assert!(left.contains(&cut) && left.contains(&newer), "{left:?}");
}

#[test]
fn an_edited_manifest_never_makes_rotation_delete_a_backup_that_reads_whole() {
    // Adversary round 3, case 07: the manifest is not authenticated, yet (a) a
    // "failed" typed into it, or (b) a wrong SHA-256 turned into "failed" by a routine
    // `backup verify`, made the next rotation delete backups whose every byte
    // authenticates.
    let (w, dest) = app_with_backups("keep = { last = 10 }");
    let a = backup(&w, "app", &dest);
    next_second();
    let b = backup(&w, "app", &dest);
    next_second();
    let _c = backup(&w, "app", &dest);
    let edit = |id: &str, from: &str, to: &str| {
        let path = manifest_path(&dest, "app", id);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains(from), "{text}");
        std::fs::write(&path, text.replacen(from, to, 1)).expect("write");
    };
    edit(&a, "\"result\": \"passed\"", "\"result\": \"failed\"");
    let text = std::fs::read_to_string(manifest_path(&dest, "app", &b)).expect("read");
    let sha = text
        .lines()
        .find(|l| l.contains("\"sha256\""))
        .expect("sha256")
        .to_owned();
    std::fs::write(
        manifest_path(&dest, "app", &b),
        text.replace(&sha, &format!("  \"sha256\": \"{}\",", "0".repeat(64))),
    )
    .expect("write");
    let out = w
        .cmd(&["backup", "verify", "app", "--backup", &b])
        .assert()
        .code(3);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(stderr.contains("manifest was edited"), "{stderr}");
    let after = std::fs::read_to_string(manifest_path(&dest, "app", &b)).expect("read");
    assert!(
        !after.contains("\"result\": \"failed\""),
        "an edited manifest is not a failed backup: {after}"
    );
    next_second();
    backup(&w, "app", &dest);
    let left = ids(&dest, "app");
    assert!(
        left.contains(&a),
        "a backup recorded as failed by an edit went: {left:?}"
    );
    assert!(left.contains(&b), "{left:?}");
    let dry = w.stdout(&["backup", "prune", "app", "--dry-run"]);
    assert!(dry.contains("reads whole"), "{dry}");
}

#[test]
fn a_backup_found_damaged_is_still_pruned_once_a_newer_good_one_exists() {
    // The other side of the re-check above: a recorded failure that reading confirms
    // (a damaged segment) still costs the backup, as the rotation rule says.
    let (w, dest) = app_with_backups("keep = { last = 10 }");
    sqlite(
        &w.path().join("app.db"),
        "CREATE TABLE big (v TEXT);
         WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 40000)
         INSERT INTO big SELECT hex(randomblob(60)) FROM c;",
    );
    let damaged = backup(&w, "app", &dest);
    let archive = dest.join("app").join(format!("{damaged}.dbk"));
    let mut bytes = std::fs::read(&archive).expect("read");
    assert!(bytes.len() > 2 << 20, "needs several segments");
    let last = bytes.len() - 100;
    bytes[last] ^= 0x01;
    std::fs::write(&archive, &bytes).expect("write");
    w.cmd(&["backup", "verify", "app", "--backup", &damaged])
        .assert()
        .code(3);
    next_second();
    let newer = backup(&w, "app", &dest);
    assert_eq!(ids(&dest, "app"), [newer]);
}

#[test]
fn decrypt_never_writes_through_or_over_a_dangling_link() {
    // Adversary round 3 (noted): `-o` onto a dangling symbolic link replaced it with
    // the plaintext, where an existing file is refused.
    let (w, dest) = app_with_backups("");
    let id = backup(&w, "app", &dest);
    let archive = dest.join("app").join(format!("{id}.dbk"));
    let link = w.path().join("out.db");
    let elsewhere = w.path().join("elsewhere.db");
    std::os::unix::fs::symlink(&elsewhere, &link).expect("symlink");
    let out = w
        .cmd(&[
            "decrypt",
            archive.to_str().expect("utf-8"),
            "-o",
            link.to_str().expect("utf-8"),
        ])
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(stderr.contains("exists"), "{stderr}");
    assert!(std::fs::symlink_metadata(&link)
        .expect("link")
        .file_type()
        .is_symlink());
    assert!(!elsewhere.exists());
}

#[test]
fn decrypt_refuses_a_name_with_sqlite_side_files_beside_it() {
    // Adversary round 4, case 14: a stale `-wal` beside the output was replayed into
    // the decrypted database by SQLite on first open.
    let (w, dest) = app_with_backups("");
    let id = backup(&w, "app", &dest);
    let archive = dest.join("app").join(format!("{id}.dbk"));
    let out = w.path().join("copy.db");
    std::fs::write(w.path().join("copy.db-wal"), b"stale").expect("wal");
    w.cmd(&[
        "decrypt",
        archive.to_str().expect("utf-8"),
        "-o",
        out.to_str().expect("utf-8"),
    ])
    .assert()
    .failure()
    .stderr(predicates::str::contains("copy.db-wal exists"));
    assert!(!out.exists());
}

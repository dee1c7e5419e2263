//! Directory backups (`[[files]]`) end to end with the real binary: round trip
//! (nested folders, links, modes, mtimes, excludes), `decrypt` into a tar that
//! `tar -t` reads, a tampered archive, `restore --to DIR` with and without
//! `--force`, path escapes in hand-forged (properly encrypted) archives, files that
//! change while they are read, and the config errors.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use chrono::Utc;
use common::{archives, backup_ids as ids, plant_backup, sqlite, Planted, Workdir};
use dbkeeper::repo::catalog::BackupKind;
use predicates::prelude::*;

/// A `[[files]]` set `name` of `tree`, backed up to `dest` with `key`.
fn files_set(name: &str, tree: &Path, dest: &Path, key: &Path, extra: &str) -> String {
    format!(
        "[[files]]\nname = \"{name}\"\npath = \"{}\"\n{extra}\n[files.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nencryption-key-file = \"{}\"\nverify = \"restore\"\n",
        tree.display(),
        dest.display(),
        key.display()
    )
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

fn set_mtime(path: &Path, unix: i64) {
    let t = filetime::FileTime::from_unix_time(unix, 0);
    filetime::set_symlink_file_times(path, t, t).expect("mtime");
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).expect("stat").mode() & 0o7777
}

fn mtime(path: &Path) -> i64 {
    std::fs::symlink_metadata(path).expect("stat").mtime()
}

/// Every path below `root` (relative, sorted), links not followed.
fn listing(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).expect("read_dir") {
            let p = e.expect("entry").path();
            out.push(p.strip_prefix(root).expect("below").display().to_string());
            if std::fs::symlink_metadata(&p).expect("stat").is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// A tree with nested folders, a relative and an absolute link, modes and old
/// mtimes, and entries the excludes leave out.
fn sample_tree(root: &Path) {
    write(&root.join("top.txt"), "top");
    write(&root.join("a/b/c/deep.txt"), "deep");
    write(&root.join("a/secret.key"), "s3cret");
    write(&root.join("cache/x/blob"), "cached");
    write(&root.join("a/b/scratch.tmp"), "tmp");
    write(&root.join("a/b/keep.tmpl"), "kept");
    std::os::unix::fs::symlink("../top.txt", root.join("a/to-top")).expect("link");
    std::os::unix::fs::symlink("/nonexistent/elsewhere", root.join("dangling")).expect("link");
    std::fs::set_permissions(root.join("a/secret.key"), PermissionsExt::from_mode(0o600))
        .expect("chmod");
    std::fs::set_permissions(root.join("top.txt"), PermissionsExt::from_mode(0o754))
        .expect("chmod");
    set_mtime(&root.join("a/b/c/deep.txt"), 1_500_000_000);
    set_mtime(&root.join("a/to-top"), 1_400_000_000);
    std::fs::set_permissions(root.join("a/b/c"), PermissionsExt::from_mode(0o750)).expect("chmod");
    set_mtime(&root.join("a/b/c"), 1_300_000_000);
}

/// A work directory, a key `k`, and the paths of a tree (`tree`, not created) and
/// of a backup folder (`backups`).
fn setup() -> (Workdir, PathBuf, PathBuf, PathBuf) {
    let w = Workdir::new();
    let key = w.key("k");
    let (tree, dest) = (w.path().join("tree"), w.path().join("backups"));
    (w, key, tree, dest)
}

#[test]
fn round_trip_keeps_folders_links_modes_and_mtimes_and_leaves_out_excludes() {
    let (w, key, tree, dest) = setup();
    sample_tree(&tree);
    w.write_config(
        "",
        &files_set(
            "storage",
            &tree,
            &dest,
            &key,
            "exclude = [\"cache/**\", \"**/*.tmp\"]",
        ),
    );
    let out = w.stdout(&["run-job", "storage.backup"]);
    assert!(out.contains("0 changed while read, 0 skipped"), "{out}");
    let list = w.stdout(&["backup", "list", "storage"]);
    assert!(
        list.contains("storage") && list.contains("restore "),
        "{list}"
    );

    let target = w.path().join("restored");
    restore(&w, "storage", &target, &[]).success();
    let mut expected = listing(&tree);
    expected.retain(|p| !p.starts_with("cache") && !p.ends_with(".tmp"));
    assert_eq!(listing(&target), expected);
    assert!(!target.join("cache").exists() && !target.join("a/b/scratch.tmp").exists());
    assert_eq!(
        std::fs::read_to_string(target.join("a/b/c/deep.txt")).unwrap(),
        "deep"
    );
    // Links are stored as links, never followed.
    assert_eq!(
        std::fs::read_link(target.join("a/to-top")).unwrap(),
        Path::new("../top.txt")
    );
    assert_eq!(
        std::fs::read_link(target.join("dangling")).unwrap(),
        Path::new("/nonexistent/elsewhere")
    );
    for (path, m) in [
        ("a/secret.key", 0o600),
        ("top.txt", 0o754),
        ("a/b/c", 0o750),
    ] {
        assert_eq!(mode(&target.join(path)), m, "{path}");
    }
    for (path, t) in [
        ("a/b/c/deep.txt", 1_500_000_000),
        ("a/to-top", 1_400_000_000),
        ("a/b/c", 1_300_000_000),
    ] {
        assert_eq!(mtime(&target.join(path)), t, "{path}");
    }

    // `decrypt` gives the tar, which tar itself reads.
    let archive = archives(&dest, "storage").pop().expect("an archive");
    let tar = w.path().join("storage.tar");
    w.cmd(&[
        "decrypt",
        archive.to_str().expect("utf-8"),
        "-o",
        tar.to_str().expect("utf-8"),
    ])
    .assert()
    .success();
    let listed = Command::new("tar")
        .arg("-tf")
        .arg(&tar)
        .output()
        .expect("tar");
    assert!(listed.status.success());
    let names = String::from_utf8_lossy(&listed.stdout);
    for name in ["top.txt", "a/b/c/deep.txt", "a/to-top", "dangling"] {
        assert!(
            names.lines().any(|l| l.trim_end_matches('/') == name),
            "{name}: {names}"
        );
    }
    assert!(
        !names
            .lines()
            .any(|l| l.starts_with("cache") || l.ends_with(".tmp")),
        "{names}"
    );

    // verify reads and parses it; prune keeps it (the default keep).
    w.cmd(&["backup", "verify", "storage", "--restore-test"])
        .assert()
        .success();
    w.cmd(&["backup", "prune", "storage"])
        .assert()
        .success()
        .stdout(predicate::str::contains("keep"));
}

#[test]
fn a_tampered_archive_exits_3_and_leaves_the_target_as_it_was() {
    let (w, key, tree, dest) = setup();
    write(&tree.join("f"), &"data ".repeat(100_000));
    w.write_config("", &files_set("tree", &tree, &dest, &key, ""));
    w.stdout(&["run-job", "tree.backup"]);
    let archive = archives(&dest, "tree").pop().expect("archive");
    let mut bytes = std::fs::read(&archive).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&archive, bytes).unwrap();

    let target = w.path().join("live");
    write(&target.join("old.txt"), "old");
    restore(&w, "tree", &target, &["--force"]).code(3);
    assert_eq!(listing(&target), ["old.txt"]);
    assert_eq!(
        std::fs::read_to_string(target.join("old.txt")).unwrap(),
        "old"
    );
    // Nothing left beside it either.
    assert_eq!(leftovers(&w), Vec::<String>::new());
    w.cmd(&["backup", "verify", "tree"]).assert().code(3);
}

#[test]
fn a_non_empty_target_needs_force_and_force_swaps_in_the_complete_tree() {
    let (w, key, tree, dest) = setup();
    write(&tree.join("new/inside.txt"), "new");
    w.write_config("", &files_set("tree", &tree, &dest, &key, ""));
    w.stdout(&["run-job", "tree.backup"]);

    let target = w.path().join("live");
    write(&target.join("old.txt"), "old");
    restore(&w, "tree", &target, &[])
        .code(1)
        .stderr(predicate::str::contains("is not empty").and(predicate::str::contains("--force")));
    assert_eq!(listing(&target), ["old.txt"]);

    // An empty folder needs no --force.
    let empty = w.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    restore(&w, "tree", &empty, &[]).success();
    assert_eq!(listing(&empty), ["new", "new/inside.txt"]);

    restore(&w, "tree", &target, &["--force"]).success();
    assert_eq!(listing(&target), ["new", "new/inside.txt"]);
    assert_eq!(leftovers(&w), Vec::<String>::new());
}

/// `restore NAME --to TARGET` (and `extra`).
fn restore(w: &Workdir, name: &str, target: &Path, extra: &[&str]) -> assert_cmd::assert::Assert {
    let mut args = vec!["restore", name, "--to", target.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    w.cmd(&args).assert()
}

/// The restore directories left beside targets in the work directory.
fn leftovers(w: &Workdir) -> Vec<String> {
    listing(w.path())
        .into_iter()
        .filter(|p| p.contains(".dbkeeper-"))
        .collect()
}

/// A tar entry whose name is written as given (the `tar` crate refuses to write
/// `..` and absolute names, which is the point here).
fn raw_entry(out: &mut Vec<u8>, name: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) {
    let mut h = tar::Header::new_old();
    let bytes = name.as_bytes();
    h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_mtime(1_600_000_000);
    h.set_size(data.len() as u64);
    if let Some(link) = link {
        let l = link.as_bytes();
        h.as_old_mut().linkname[..l.len()].copy_from_slice(l);
    }
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// Writes `tar` as a genuine encrypted backup of the files set `name`, as a holder
/// of the key could.
fn plant(dest: &Path, key: &Path, name: &str, tar: &[u8]) -> String {
    let what = Planted {
        name,
        backend: "files",
        image: "tar",
        created: Utc::now(),
        kind: BackupKind::Manual,
    };
    plant_backup(dest, key, what, tar)
}

#[test]
fn path_escapes_in_a_genuine_archive_are_refused_and_nothing_is_written() {
    use tar::EntryType::{Directory, Regular, Symlink};
    let (w, key, tree, _) = setup();
    std::fs::create_dir(&tree).unwrap();
    let outside = w.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let evil = outside.join("evil");
    type Entry<'a> = (&'a str, tar::EntryType, Option<&'a str>, &'a [u8]);
    let cases: Vec<(&str, Vec<Entry<'_>>, &str)> = vec![
        (
            "absolute",
            vec![
                ("ok.txt", Regular, None, b"fine"),
                (evil.to_str().unwrap(), Regular, None, b"x"),
            ],
            "absolute path",
        ),
        (
            "dotdot",
            vec![
                ("d", Directory, None, b""),
                ("d/../../outside/evil", Regular, None, b"x"),
            ],
            "climbs out",
        ),
        (
            "through-a-link",
            vec![
                ("l", Symlink, Some(outside.to_str().unwrap()), b""),
                ("l/evil", Regular, None, b"x"),
            ],
            "through a symbolic link",
        ),
        (
            "over-a-link",
            vec![
                ("l", Symlink, Some(evil.to_str().unwrap()), b""),
                ("l", Regular, None, b"x"),
            ],
            "cannot write",
        ),
    ];
    for (i, (case, entries, why)) in cases.into_iter().enumerate() {
        let name = format!("set{i}");
        let dest = w.path().join(format!("backups-{i}"));
        w.write_config("", &files_set(&name, &tree, &dest, &key, ""));
        let mut tar = Vec::new();
        for (path, kind, link, data) in entries {
            raw_entry(&mut tar, path, kind, link, data);
        }
        tar.extend_from_slice(&[0u8; 1024]);
        plant(&dest, &key, &name, &tar);
        let target = w.path().join(format!("restored-{i}"));
        let out = restore(&w, &name, &target, &[]).failure();
        let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
        assert!(stderr.contains(why), "{case}: {stderr}");
        assert!(!evil.exists(), "{case}: wrote outside the target");
        assert!(!target.exists(), "{case}: the target was created");
        // `verify` parses the tar too, and refuses the same escapes (all but a file
        // over a link, which is harmless to read).
        if case != "over-a-link" {
            w.cmd(&["backup", "verify", &name]).assert().code(3);
        }
    }
}

#[test]
fn a_file_growing_while_it_is_read_is_reported_and_the_backup_succeeds() {
    let (w, key, tree, dest) = setup();
    let log = tree.join("app.log");
    write(&log, &"line\n".repeat(4_000_000));
    // Appends for as long as the backup runs.
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while :; do echo more >> '{}'; done",
            log.display()
        ))
        .spawn()
        .expect("writer");
    while std::fs::metadata(&log).unwrap().len() <= 20_000_000 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    w.write_config("", &files_set("tree", &tree, &dest, &key, ""));
    let run = w.cmd(&["run-job", "tree.backup"]).output().expect("run");
    let _ = writer.kill();
    let _ = writer.wait();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("1 changed while read"), "{stdout}");
    assert!(
        stderr.contains("app.log") && stderr.contains("while it was read"),
        "{stderr}"
    );
    let manifest = archives(&dest, "tree")
        .pop()
        .expect("archive")
        .with_extension("manifest.json");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    assert_eq!(m["backend"], "files");
    assert_eq!(m["files"]["changed"], 1);
    assert!(m["files"]["notes"][0].as_str().unwrap().contains("app.log"));
    // What was stored restores: the size its header gave.
    let target = w.path().join("restored");
    restore(&w, "tree", &target, &[]).success();
    assert!(std::fs::metadata(target.join("app.log")).unwrap().len() >= 20_000_000);
}

#[test]
fn files_sets_share_the_database_names_and_read_relative_paths_beside_the_config() {
    let (w, key, tree, dest) = setup();
    let db = format!(
        "[[database]]\nname = \"app\"\nurl = \"sqlite://{}\"\n",
        w.path().join("app.db").display()
    );
    sqlite(&w.path().join("app.db"), "CREATE TABLE t (x)");
    let cases = [
        (
            format!("{db}\n{}", files_set("app", &tree, &dest, &key, "")),
            "files \"app\".name",
        ),
        // A relative path is the config file's directory's (`w`), wherever `check`
        // runs: here it names the destination folder itself.
        (
            files_set(
                "rel",
                Path::new(dest.strip_prefix(w.path()).unwrap()),
                &dest,
                &key,
                "",
            ),
            "lie inside one another",
        ),
        (
            files_set("bad", &tree, &dest, &key, "exclude = [\"a[\"]"),
            "not a glob pattern",
        ),
        // A destination inside the tree would back up its own backups.
        (
            files_set("loop", &tree, &tree.join("b"), &key, ""),
            "lie inside one another",
        ),
    ];
    // A directory that is not there: `check` fails (exit 1), as for a database down.
    w.write_config("", &files_set("gone", &tree, &dest, &key, ""));
    w.cmd(&["check"])
        .assert()
        .code(1)
        .stdout(predicate::str::contains("UNREADABLE").and(predicate::str::contains("fix path")));
    write(&tree.join("x"), "x");
    w.cmd(&["check"])
        .assert()
        .success()
        .stdout(predicate::str::contains("backs up"));
    for (config, error) in cases {
        w.write_config("", &config);
        w.cmd(&["check"])
            .assert()
            .code(2)
            .stderr(predicate::str::contains(error));
    }
}

#[test]
fn with_files_takes_the_set_under_the_database_backups_id_pre_migration_too() {
    let (w, key, tree, dest) = setup();
    write(&tree.join("uploads/one.png"), "png");
    let files_dest = w.path().join("files-backups");
    let migrations = w.path().join("migrations");
    write(
        &migrations.join("1_init.sql"),
        "CREATE TABLE t (x INTEGER);",
    );
    sqlite(&w.path().join("app.db"), "CREATE TABLE seed (x)");
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"app\"\nurl = \"sqlite://{}\"\n[database.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nencryption-key-file = \"{}\"\nwith-files = [\"storage\"]\n[database.migrate]\ndir = \"{}\"\nschedule = \"manual\"\n\n{}",
            w.path().join("app.db").display(),
            dest.display(),
            key.display(),
            migrations.display(),
            files_set("storage", &tree, &files_dest, &key, "")
        ),
    );
    w.stdout(&["run-job", "app.backup"]);
    let db_ids = ids(&dest, "app");
    assert_eq!(db_ids.len(), 1);
    assert_eq!(ids(&files_dest, "storage"), db_ids, "one id for the pair");
    let list = w.stdout(&["backup", "list", "app"]);
    assert!(
        list.contains("WITH FILES") && list.contains("storage (same id)"),
        "{list}"
    );
    let manifest = dest
        .join("app")
        .join(format!("{}.manifest.json", db_ids[0]));
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    assert_eq!(m["with_files"], serde_json::json!(["storage"]));

    // The pre-migration backup takes the files too.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    w.stdout(&["migrate", "apply", "app"]);
    let db_ids = ids(&dest, "app");
    let pre: Vec<&String> = db_ids
        .iter()
        .filter(|i| i.ends_with("pre-migration"))
        .collect();
    assert_eq!(pre.len(), 1, "{db_ids:?}");
    assert!(ids(&files_dest, "storage").contains(pre[0]));

    // The rollback restores the matching pair.
    let target = w.path().join("rolled-back");
    restore(&w, "storage", &target, &["--backup", pre[0]]).success();
    assert_eq!(
        std::fs::read_to_string(target.join("uploads/one.png")).unwrap(),
        "png"
    );

    // A set that cannot be read fails the database's backup before it is taken.
    std::fs::remove_dir_all(&tree).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    w.cmd(&["run-job", "app.backup"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("with-files"));
    assert_eq!(
        ids(&dest, "app"),
        db_ids,
        "no database backup without its files"
    );
}

#[test]
fn the_daemon_runs_a_files_set_on_schedule_and_meters_it_like_a_database() {
    let (w, key, tree, dest) = setup();
    write(&tree.join("a.txt"), "a");
    // Only a files set: no database is needed.
    let config = files_set("storage", &tree, &dest, &key, "")
        .replace("schedule = \"manual\"", "schedule = \"* * * * * *\"");
    w.write_config("", &config);
    let d = w.start();
    let ok = [
        "job_id=\"storage.backup\"",
        "kind=\"backup\"",
        "database=\"storage\"",
        "result=\"success\"",
    ];
    d.wait_for(
        "a scheduled files backup",
        std::time::Duration::from_secs(30),
        || {
            d.metric("dbkeeper_job_runs_total", &ok).unwrap_or(0.0) >= 1.0
                && d.metric("dbkeeper_backups_stored", &["database=\"storage\""])
                    .unwrap_or(0.0)
                    >= 1.0
        },
    );
    assert!(!archives(&dest, "storage").is_empty());
    let (code, _) = d.get("/readyz");
    assert_eq!(code, 200, "ready without any database");
}

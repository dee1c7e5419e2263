//! Cases found by an adversarial review of directory backups (given only the README
//! and the binary, asked to make it lose data), kept as tests against the real
//! binary. The case numbers are the review's.

mod common;

use std::path::{Path, PathBuf};

use common::{archives, backup_ids as ids, dir_names as names, sqlite, Workdir};
use predicates::prelude::*;

/// A `[[files]]` set `name` of `tree`, backed up unencrypted to `dest`.
fn files_set(name: &str, tree: &Path, dest: &Path, extra: &str) -> String {
    format!(
        "[[files]]\nname = \"{name}\"\npath = \"{}\"\n{extra}\n[files.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nencryption = \"none\"\nkeep = {{ last = 5 }}\n",
        tree.display(),
        dest.display(),
    )
}

/// A work directory and the paths of a tree (`src`) and a backup folder (`dest`),
/// neither created.
fn setup() -> (Workdir, PathBuf, PathBuf) {
    let w = Workdir::new();
    let (tree, dest) = (w.path().join("src"), w.path().join("dest"));
    (w, tree, dest)
}

/// Configures the set `storage` of `tree` and takes one backup of it.
fn backed_up(w: &Workdir, tree: &Path, dest: &Path) {
    w.write_config("", &files_set("storage", tree, dest, ""));
    w.stdout(&["run-job", "storage.backup"]);
}

/// A SQLite database `name` with a backup to `dest` (and `extra` in its table).
fn database(w: &Workdir, name: &str, dest: &Path, extra: &str) -> String {
    let file = w.path().join(format!("{name}.db"));
    sqlite(&file, "CREATE TABLE IF NOT EXISTS t (x)");
    format!(
        "[[database]]\nname = \"{name}\"\nurl = \"sqlite://{}\"\n[database.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nencryption = \"none\"\nkeep = {{ last = 5 }}\n{extra}\n",
        file.display(),
        dest.display()
    )
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

fn restore(w: &Workdir, name: &str, target: &Path, extra: &[&str]) -> assert_cmd::assert::Assert {
    let mut args = vec!["restore", name, "--to", target.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    w.cmd(&args).assert()
}

/// `restore storage --to TARGET` (and `extra`) started in the background.
fn spawn_restore(
    w: &Workdir,
    target: &Path,
    extra: &[&str],
    stderr: std::process::Stdio,
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_dbkeeper"))
        .args(["restore", "storage", "--to"])
        .arg(target)
        .args(extra)
        .arg("-c")
        .arg(w.config_path())
        .stderr(stderr)
        .spawn()
        .expect("spawn restore")
}

/// Case 01: `restore --force` into a destination folder, a folder holding one, one
/// inside one, or the state dir is refused (exit 1) and every backup is still there.
#[test]
fn case01_restore_never_targets_a_destination_or_the_state_dir() {
    let (w, tree, dest) = setup();
    let db_dest = w.path().join("dbdest");
    write(&tree.join("a.txt"), "hello");
    w.write_config(
        "",
        &format!(
            "{}\n{}",
            files_set("storage", &tree, &dest, ""),
            database(&w, "app", &db_dest, "")
        ),
    );
    w.stdout(&["run-job", "storage.backup"]);
    w.stdout(&["run-job", "app.backup"]);
    std::fs::create_dir_all(w.path().join("state")).unwrap();
    let link = w.path().join("via-link");
    std::os::unix::fs::symlink(&dest, &link).unwrap();
    let before = (archives(&dest, "storage"), archives(&db_dest, "app"));
    assert_eq!((before.0.len(), before.1.len()), (1, 1));
    for target in [
        dest.clone(),
        dest.join("storage"),
        dest.join("new-inside"),
        db_dest.clone(),
        w.path().join("state"),
        w.path().to_owned(),
        link,
    ] {
        restore(&w, "storage", &target, &["--force"])
            .code(1)
            .stderr(predicate::str::contains("lie inside one another"));
        assert_eq!(
            (archives(&dest, "storage"), archives(&db_dest, "app")),
            before,
            "{}",
            target.display()
        );
    }
    assert!(!dest.join("new-inside").exists());
}

/// Cases 03 and 04: a database's or another set's destination, or the state dir,
/// inside a set's path (or holding it), also through a symbolic link, is a config
/// error (exit 2).
#[test]
fn case03_04_no_destination_or_state_dir_inside_a_files_path() {
    let w = Workdir::new();
    let tree = w.path().join("src");
    std::fs::create_dir_all(tree.join("bk")).unwrap();
    let link = w.path().join("dlink");
    std::os::unix::fs::symlink(tree.join("bk"), &link).unwrap();
    let out = w.path().join("out");
    let cases = [
        // A database's destination inside the set.
        format!(
            "{}\n{}",
            files_set("storage", &tree, &out, ""),
            database(&w, "app", &tree.join("dbbk"), "with-files = [\"storage\"]")
        ),
        // Another set's destination inside the set.
        format!(
            "{}\n{}",
            files_set("storage", &tree, &out, ""),
            files_set("other", &w.path().join("other"), &tree.join("x"), "")
        ),
        // Its own destination, reached through a symbolic link.
        files_set("storage", &tree, &link, ""),
        // The set holds the whole work directory, state dir included.
        files_set(
            "storage",
            w.path(),
            &Path::new("/nonexistent-dbk").join("d"),
            "",
        ),
    ];
    for config in cases {
        w.write_config("", &config);
        w.cmd(&["check"])
            .assert()
            .code(2)
            .stderr(predicate::str::contains("lie inside one another"));
    }
    // The state dir inside the set.
    w.write_config("", &files_set("storage", &w.path().join("state"), &out, ""));
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("the state dir"));
}

/// Case 10: without `--force`, a file written into the empty target while the
/// restore runs is never deleted: the restore fails and the file stays.
#[test]
fn case10_restore_without_force_never_deletes_what_appeared_in_the_target() {
    let (w, tree, dest) = setup();
    for i in 0..2000 {
        write(&tree.join(format!("many/f{i}")), &i.to_string());
    }
    let noise: Vec<u8> = (0..30_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(tree.join("big"), noise).unwrap();
    backed_up(&w, &tree, &dest);
    let target = w.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let child = spawn_restore(&w, &target, &[], std::process::Stdio::piped());
    // Once the restore extracts beside the target, the application writes into it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !names(w.path())
        .iter()
        .any(|n| n.contains("dbkeeper-restore"))
    {
        assert!(std::time::Instant::now() < deadline, "no extraction seen");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    write(&target.join("new-upload"), "a user's upload");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no longer empty"), "{stderr}");
    assert_eq!(names(&target), ["new-upload"]);
    assert!(
        !names(w.path()).iter().any(|n| n.contains("dbkeeper-")),
        "{:?}",
        names(w.path())
    );
}

/// Case 06: `restore --force` over a directory with a file system mounted inside
/// it is refused, and the mounted files stay (needs root for the mount).
#[test]
fn case06_force_refuses_a_target_with_a_mount_inside() {
    let (w, tree, dest) = setup();
    write(&tree.join("a.txt"), "new");
    backed_up(&w, &tree, &dest);
    let target = w.path().join("target");
    write(&target.join("old.txt"), "old");
    let mount = target.join("mnt");
    let _fs = common::Mount::tmpfs(&mount, "1m");
    write(&mount.join("precious"), "on another file system");
    restore(&w, "storage", &target, &["--force"])
        .code(1)
        .stderr(predicate::str::contains("mounted at"));
    assert_eq!(
        std::fs::read_to_string(mount.join("precious")).unwrap(),
        "on another file system"
    );
    assert_eq!(names(&target), ["mnt", "old.txt"]);
}

/// Case 11: after the swap the previous contents are renamed
/// `.DIR.dbkeeper-replaced-*` before they are removed, so a kill during the
/// removal leaves a sibling whose name says it holds the old tree.
#[test]
fn case11_the_old_tree_is_named_replaced_before_it_is_removed() {
    let (w, tree, dest) = setup();
    write(&tree.join("a.txt"), "new");
    backed_up(&w, &tree, &dest);
    let target = w.path().join("target");
    for i in 0..40_000 {
        write(&target.join(format!("d{}/old{i}", i % 100)), "old");
    }
    let mut child = spawn_restore(&w, &target, &["--force"], std::process::Stdio::null());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let replaced: PathBuf = loop {
        if let Some(n) = names(w.path())
            .into_iter()
            .find(|n| n.starts_with(".target.dbkeeper-replaced-"))
        {
            break w.path().join(n);
        }
        assert!(
            std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "no replaced sibling seen: {:?}",
            names(w.path())
        );
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(names(&target), ["a.txt"]);
    // What is left of the old tree is under the replaced name, never a restore one.
    assert!(!names(w.path())
        .iter()
        .any(|n| n.contains("dbkeeper-restore")));
    let _ = std::fs::remove_dir_all(replaced);
}

/// Case 07: with `with-files`, a database backup that fails discards the files
/// backups its run made and rotates nothing, so the good database backups keep
/// their files; `backup list` shows a pairing only where the files backup exists.
#[test]
fn case07_a_failed_database_backup_keeps_the_pairs_and_drops_its_files() {
    let (w, tree, fd) = setup();
    let dbd = w.path().join("dbd");
    write(&tree.join("f"), "v1");
    let set = files_set("storage", &tree, &fd, "").replace("last = 5", "last = 2");
    let db =
        database(&w, "app", &dbd, "with-files = [\"storage\"]").replace("last = 5", "last = 2");
    w.write_config("", &format!("{set}\n{db}"));
    for _ in 0..2 {
        w.stdout(&["run-job", "app.backup"]);
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let good = ids(&dbd, "app");
    assert_eq!(good.len(), 2);
    assert_eq!(ids(&fd, "storage"), good);
    // The database dump now fails.
    std::fs::write(w.path().join("app.db"), vec![0x5a; 8192]).unwrap();
    for _ in 0..2 {
        w.cmd(&["run-job", "app.backup"]).assert().code(1);
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    assert_eq!(ids(&dbd, "app"), good);
    assert_eq!(ids(&fd, "storage"), good, "the pairs keep their files");
    let list = w.stdout(&["backup", "list", "app"]);
    assert_eq!(list.matches("storage (same id)").count(), 2, "{list}");
    // A files backup deleted by hand: its pairing is no longer shown.
    std::fs::remove_file(archives(&fd, "storage").remove(0)).unwrap();
    let list = w.stdout(&["backup", "list", "app"]);
    assert_eq!(list.matches("storage (same id)").count(), 1, "{list}");
}

/// Case 02: a SQLite database and a files set of one name in two configs sharing a
/// destination and key: neither rotation deletes the other's backup, and the
/// database never lists, verifies or restores the files archive as its own.
#[test]
fn case02_a_database_and_a_files_set_of_one_name_never_take_each_others_backups() {
    let (w, tree, dest) = setup();
    write(&tree.join("f"), "hi");
    let key = w.key("k");
    let keyed = |text: String| {
        text.replace(
            "encryption = \"none\"",
            &format!("encryption-key-file = \"{}\"", key.display()),
        )
        .replace("last = 5", "last = 1")
    };
    let db_config = keyed(database(&w, "storage", &dest, ""));
    let files_config = keyed(files_set("storage", &tree, &dest, ""));
    w.write_config("", &db_config);
    w.stdout(&["run-job", "storage.backup"]);
    let db_backup = ids(&dest, "storage");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    w.write_config("", &files_config);
    let out = w.stdout(&["run-job", "storage.backup"]);
    assert!(out.contains("0 pruned"), "{out}");
    let both = ids(&dest, "storage");
    assert_eq!(both.len(), 2);
    let files_backup: Vec<String> = both
        .iter()
        .filter(|i| !db_backup.contains(i))
        .cloned()
        .collect();
    // The files set's view: its backup is trusted, the database's is not.
    let list = w.stdout(&["backup", "list", "storage"]);
    assert!(list.contains("not a files one"), "{list}");
    // The database's view.
    w.write_config("", &db_config);
    let out = w.stdout(&["run-job", "storage.backup"]);
    assert!(out.contains("1 pruned"), "its own older backup only: {out}");
    assert!(ids(&dest, "storage").contains(&files_backup[0]));
    let list = w.stdout(&["backup", "list", "storage"]);
    assert!(
        list.contains("it is a files backup, not a sqlite one"),
        "{list}"
    );
    let restored = w.path().join("restored.sqlite");
    w.cmd(&[
        "restore",
        "storage",
        "--backup",
        &files_backup[0],
        "--to",
        restored.to_str().expect("utf-8"),
    ])
    .assert()
    .code(3)
    .stderr(predicate::str::contains("files backup"));
    assert!(!w.path().join("restored.sqlite").exists());
}

/// A tar of `n` small files `f1`…, with its end-of-archive blocks.
fn small_tar(n: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for i in 1..=n {
        let mut h = tar::Header::new_gnu();
        h.set_size(3000);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, format!("f{i}"), &[b'x'; 3000][..])
            .unwrap();
    }
    b.into_inner().unwrap()
}

/// Case 09: a genuine archive whose tar lacks its end-of-archive blocks, has data
/// after them, or holds fewer entries than its manifest's `files.entries` fails
/// `verify` and `restore` (exit 3), and the live tree is left as it was.
#[test]
fn case09_a_cut_or_padded_tar_or_a_wrong_entry_count_is_refused() {
    use common::{plant_backup, Planted};
    let (w, tree, dest) = setup();
    std::fs::create_dir_all(&tree).unwrap();
    let key = w.key("k");
    w.write_config(
        "",
        &files_set("storage", &tree, &dest, "").replace(
            "encryption = \"none\"",
            &format!("encryption-key-file = \"{}\"", key.display()),
        ),
    );
    let full = small_tar(5);
    let cut = full[..2 * (512 + 3072)].to_vec();
    let mut garbage = full.clone();
    garbage.extend_from_slice(&small_tar(1));
    let cases: [(&[u8], Option<u64>, &str); 4] = [
        (&cut, None, "without its end-of-archive marker"),
        (&garbage, None, "data after its end-of-archive marker"),
        (&full, Some(7), "holds 5 entries, not the 7"),
        (&full, Some(5), ""),
    ];
    let live = w.path().join("live");
    write(&live.join("old.txt"), "old");
    for (n, (tar, entries, error)) in cases.into_iter().enumerate() {
        let created = chrono::Utc::now() - chrono::Duration::hours(10 - n as i64);
        let what = Planted {
            name: "storage",
            backend: "files",
            image: "tar",
            created,
            kind: dbkeeper::repo::catalog::BackupKind::Manual,
        };
        let id = plant_backup(&dest, &key, what, tar);
        if let Some(entries) = entries {
            let path = dest.join("storage").join(format!("{id}.manifest.json"));
            let mut m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            m["files"] = serde_json::json!({ "entries": entries, "changed": 0, "skipped": 0 });
            std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        }
        let verify = w
            .cmd(&["backup", "verify", "storage", "--backup", &id])
            .assert();
        let restored = restore(&w, "storage", &live, &["--backup", &id, "--force"]);
        if error.is_empty() {
            verify.success();
            restored.success();
            assert_eq!(names(&live), ["f1", "f2", "f3", "f4", "f5"]);
        } else {
            verify.code(3).stderr(predicate::str::contains(error));
            restored.code(3).stderr(predicate::str::contains(error));
            assert_eq!(names(&live), ["old.txt"], "case {n}");
        }
    }
}

/// Case 05: an empty (unmounted) source directory fails the backup (exit 1, no
/// archive), so rotation never replaces the backups that hold data.
#[test]
fn case05_an_empty_source_directory_fails_and_keeps_the_backups() {
    let (w, tree, dest) = setup();
    write(&tree.join("data"), "precious");
    let set = files_set("storage", &tree, &dest, "").replace("last = 5", "last = 2");
    w.write_config("", &set);
    for _ in 0..2 {
        w.stdout(&["run-job", "storage.backup"]);
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let before = ids(&dest, "storage");
    std::fs::remove_file(tree.join("data")).unwrap();
    for _ in 0..2 {
        w.cmd(&["run-job", "storage.backup"])
            .assert()
            .code(1)
            .stderr(predicate::str::contains("is empty").and(predicate::str::contains("mounted")));
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    assert_eq!(ids(&dest, "storage"), before);
    // Round 2, case 06: an unmounted file system often leaves an empty lost+found
    // (and folders only): no file at all fails just the same.
    std::fs::create_dir_all(tree.join("lost+found")).unwrap();
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", tree.join("a/link")).unwrap();
    w.cmd(&["run-job", "storage.backup"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no file").and(predicate::str::contains("lost+found")));
    assert_eq!(ids(&dest, "storage"), before);
}

/// Case 08: a restore that runs out of space says to free space there, not to move
/// the backup destination, and leaves the (empty) target as it was.
#[test]
fn case08_a_full_disk_during_a_restore_gets_a_restore_hint() {
    let (w, tree, dest) = setup();
    let noise: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("big"), noise).unwrap();
    backed_up(&w, &tree, &dest);
    let small = w.path().join("small");
    let _fs = common::Mount::tmpfs(&small, "1m");
    let target = small.join("t");
    std::fs::create_dir(&target).unwrap();
    restore(&w, "storage", &target, &[]).code(1).stderr(
        predicate::str::contains("free space there and try again")
            .and(predicate::str::contains("backup.destination").not()),
    );
    assert_eq!(names(&small), ["t"]);
    assert!(names(&target).is_empty());
}

/// Round 3, case 05: a files set's directory that holds a configured SQLite
/// database (left out of the set with `exclude`) is refused as a restore target,
/// with or without `--force`, also by another path (or where a link to it points);
/// the database, its `-wal` and the rows written since the backup stay. Another
/// directory is still fine.
#[test]
fn adversary3_case05_restore_never_deletes_a_configured_sqlite_database() {
    let w = Workdir::new();
    let data = w.path().join("data");
    let (bk, dbk) = (w.path().join("bk"), w.path().join("dbk"));
    write(&data.join("uploads/a.jpg"), "pic");
    let db = data.join("app.db");
    sqlite(
        &db,
        "CREATE TABLE t (x); INSERT INTO t VALUES ('in backup')",
    );
    w.write_config(
        "",
        &format!(
            "{}\n[[database]]\nname = \"app\"\nurl = \"sqlite://{}\"\n[database.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nencryption = \"none\"\nwith-files = [\"storage\"]\n",
            files_set("storage", &data, &bk, "exclude = [\"app.db*\"]"),
            db.display(),
            dbk.display()
        ),
    );
    w.stdout(&["run-job", "app.backup"]);
    sqlite(&db, "INSERT INTO t VALUES ('written after the backup')");
    write(&data.join("app.db-wal"), "");
    let link = w.path().join("via-link");
    std::os::unix::fs::symlink(&data, &link).unwrap();
    for (target, extra) in [
        (&data, &["--force"][..]),
        (&data, &[][..]),
        (&link, &["--force"][..]),
    ] {
        restore(&w, "storage", target, extra)
            .code(1)
            .stderr(predicate::str::contains("database \"app\""))
            .stderr(predicate::str::contains("restore into another directory"));
        assert_eq!(sqlite(&db, "SELECT count(*) FROM t").trim(), "2");
        assert_eq!(names(&data), ["app.db", "app.db-wal", "uploads"]);
    }
    // A database file that is a symbolic link: the folder of the real file is its
    // database's too.
    let real = w.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::rename(&db, real.join("app.db")).unwrap();
    std::os::unix::fs::symlink(real.join("app.db"), &db).unwrap();
    restore(&w, "storage", &real, &["--force"])
        .code(1)
        .stderr(predicate::str::contains("database \"app\""));
    assert_eq!(sqlite(&db, "SELECT count(*) FROM t").trim(), "2");
    // Restoring elsewhere (then copying) works.
    let elsewhere = w.path().join("elsewhere");
    restore(&w, "storage", &elsewhere, &[]).success();
    assert_eq!(names(&elsewhere), ["uploads"]);
}

/// Round 3, case 06: a destination's `credentials-file` and the files a PostgreSQL
/// URL names (`sslrootcert`, `sslcert`, `sslkey`, `sslcrl`, `passfile`, also
/// percent-encoded) are refused as restore targets like the key files.
#[test]
fn adversary3_case06_restore_never_deletes_credentials_or_tls_files() {
    let w = Workdir::new();
    let (data, bk) = (w.path().join("data"), w.path().join("bk"));
    write(&data.join("a.txt"), "v1");
    let local = files_set("storage", &data, &bk, "");
    w.write_config("", &local);
    w.stdout(&["run-job", "storage.backup"]);
    let id = ids(&bk, "storage").pop().expect("one backup");
    let secrets = w.path().join("secrets");
    let s3env = secrets.join("s3.env");
    write(
        &s3env,
        "AWS_ACCESS_KEY_ID=AKIAEXAMPLE\nAWS_SECRET_ACCESS_KEY=secretsecret\n",
    );
    std::fs::set_permissions(&s3env, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut dirs = vec![secrets.clone()];
    let mut params = String::new();
    for p in ["sslrootcert", "sslcert", "sslkey", "sslcrl", "passfile"] {
        // A space in the folder name, percent-encoded in the URL.
        let dir = w.path().join(format!("tls {p}"));
        write(&dir.join("f"), p);
        let encoded = dir.join("f").display().to_string().replace(' ', "%20");
        params.push_str(&format!("&{p}={encoded}"));
        dirs.push(dir);
    }
    w.write_config(
        "",
        &format!(
            "{}\n[[database]]\nname = \"pg\"\nurl = \"postgres://postgres@127.0.0.1:5432/postgres?sslmode=prefer{params}\"\n",
            local.replace(
                &format!("destination = \"{}\"", bk.display()),
                &format!(
                    "destination = [\"{}\", {{ url = \"s3://bucket/prefix\", endpoint = \"http://127.0.0.1:9\", allow-http = true, region = \"us-east-1\", credentials-file = \"{}\" }}]",
                    bk.display(),
                    s3env.display()
                )
            )
        ),
    );
    for dir in &dirs {
        restore(
            &w,
            "storage",
            dir,
            &["--backup", &id, "--from", bk.to_str().unwrap(), "--force"],
        )
        .code(1)
        .stderr(predicate::str::contains("lie inside one another"));
    }
    assert!(s3env.exists());
    for dir in &dirs[1..] {
        assert_eq!(names(dir), ["f"]);
    }
}

/// Round 3, case 07: into an empty mount point (a freshly mounted volume) the tree
/// is assembled inside it, not on the parent file system, and moved into place;
/// the mount point keeps its mode and nothing is left behind. `--force` onto a
/// mount point that is not empty is refused, saying why (needs root for the mount).
#[test]
fn adversary3_case07_restore_into_an_empty_mount_point() {
    use std::os::unix::fs::PermissionsExt;
    let (w, tree, dest) = setup();
    write(&tree.join("a.txt"), "new");
    write(&tree.join("sub/b.txt"), "deep");
    backed_up(&w, &tree, &dest);
    let target = w.path().join("volume");
    let _fs = common::Mount::tmpfs(&target, "4m");
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o751)).unwrap();
    restore(&w, "storage", &target, &[]).success();
    assert_eq!(names(&target), ["a.txt", "sub"]);
    assert_eq!(
        std::fs::read_to_string(target.join("sub/b.txt")).unwrap(),
        "deep"
    );
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
        0o751
    );
    assert!(!names(w.path()).iter().any(|n| n.contains("dbkeeper-")));
    // Not empty now: --force cannot swap a mount point, and says so (also without
    // --force, rather than asking for it).
    for extra in [&["--force"][..], &[][..]] {
        restore(&w, "storage", &target, extra)
            .code(1)
            .stderr(predicate::str::contains("is a mount point and not empty"));
    }
    assert_eq!(names(&target), ["a.txt", "sub"]);
    assert!(!names(w.path()).iter().any(|n| n.contains("dbkeeper-")));
    // A fresh ext4 volume holds an empty lost+found: still a new, empty volume.
    let fresh = w.path().join("fresh");
    let _fresh = common::Mount::tmpfs(&fresh, "4m");
    std::fs::create_dir(fresh.join("lost+found")).unwrap();
    restore(&w, "storage", &fresh, &[]).success();
    assert_eq!(names(&fresh), ["a.txt", "lost+found", "sub"]);
    // A lost+found with something in it is not.
    let used = w.path().join("used");
    let _used = common::Mount::tmpfs(&used, "4m");
    write(&used.join("lost+found/#1234"), "recovered");
    restore(&w, "storage", &used, &[])
        .code(1)
        .stderr(predicate::str::contains("is a mount point and not empty"));
}

/// The id a `run-job` summary names (`backup <id>: …`).
fn reported_id(stdout: &str) -> String {
    stdout
        .split("backup ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_default()
        .to_owned()
}

/// Waits until 100 ms past the start of the next second, so that processes started
/// now pick their backup ids in one and the same second.
fn at_the_start_of_a_second() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    let into = now.subsec_millis() as u64;
    std::thread::sleep(std::time::Duration::from_millis(1100 - into));
}

/// Starts `dbkeeper run-job JOB` in the background, its output piped.
fn spawn_job(w: &Workdir, job: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_dbkeeper"))
        .args(["run-job", job, "-c"])
        .arg(w.config_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn run-job")
}

/// The names ending in `.reserved` in `dir`.
fn markers(dir: &Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| n.ends_with(".reserved"))
        .collect()
}

/// Adversary round 3, case 01: a files set's own run and a database's run taking it
/// `with-files`, started in the same second, used to pick the same id; the loser's
/// clean-up then deleted the winner's files backup. Now each run reserves its id in
/// every store it writes to: both succeed under distinct ids, every reported backup
/// keeps its archive and manifest, and no reservation is left behind.
#[test]
fn adversary3_case01_concurrent_runs_take_distinct_ids_and_keep_their_backups() {
    let (w, tree, fd) = setup();
    let dbd = w.path().join("dbd");
    write(&tree.join("f"), "v1");
    let set = files_set("storage", &tree, &fd, "").replace("last = 5", "last = -1");
    let db =
        database(&w, "app", &dbd, "with-files = [\"storage\"]").replace("last = 5", "last = -1");
    w.write_config("", &format!("{set}\n{db}"));
    // The run history exists first (concurrent first runs: case 08 below).
    w.stdout(&["run-job", "storage.backup"]);
    for round in 0..5 {
        at_the_start_of_a_second();
        let jobs = [spawn_job(&w, "app.backup"), spawn_job(&w, "storage.backup")];
        let outs: Vec<_> = jobs
            .into_iter()
            .map(|c| c.wait_with_output().expect("wait"))
            .collect();
        let mut reported = Vec::new();
        for out in &outs {
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            reported.push(reported_id(&String::from_utf8_lossy(&out.stdout)));
        }
        let (app, storage) = (&reported[0], &reported[1]);
        assert_ne!(app, storage, "round {round}: one id for two runs");
        let files = names(&fd.join("storage"));
        for id in [app, storage] {
            assert!(
                files.contains(&format!("{id}.dbk")),
                "round {round}: {id} lost its files archive: {files:?}"
            );
            assert!(
                files.contains(&format!("{id}.manifest.json")),
                "round {round}: {files:?}"
            );
        }
        assert!(names(&dbd.join("app")).contains(&format!("{app}.dbk")));
    }
    assert_eq!(markers(&fd.join("storage")), Vec::<String>::new());
    assert_eq!(markers(&dbd.join("app")), Vec::<String>::new());
    let list = w.stdout(&["backup", "list", "storage"]);
    assert!(!list.contains("UNTRUSTED"), "{list}");
}

/// Case 01, deterministic: an id reserved by a live run (a marker whose lock is
/// held, as a run holds its own) is taken, in the files set's folder too, so the
/// database's run takes the next `.n` everywhere and leaves the marker alone; a
/// marker nobody holds (a run that died) is removed by the next run.
#[test]
fn adversary3_case01_a_reserved_id_is_taken_and_only_dead_reservations_are_removed() {
    let (w, tree, fd) = setup();
    let dbd = w.path().join("dbd");
    write(&tree.join("f"), "v1");
    let set = files_set("storage", &tree, &fd, "");
    let db = database(&w, "app", &dbd, "with-files = [\"storage\"]");
    w.write_config("", &format!("{set}\n{db}"));
    let folder = fd.join("storage");
    std::fs::create_dir_all(&folder).unwrap();
    // Reserved by a live run: every second the run below may start in.
    let now = chrono::Utc::now();
    let mut held = Vec::new();
    for s in -1..30 {
        let at = now + chrono::Duration::seconds(s);
        let path = folder.join(format!("{}-manual.reserved", at.format("%Y%m%dT%H%M%SZ")));
        let file = std::fs::File::create(&path).unwrap();
        file.try_lock().unwrap();
        held.push((path, file));
    }
    let out = w.stdout(&["run-job", "app.backup"]);
    let id = reported_id(&out);
    assert!(id.ends_with("-manual.2"), "{out}");
    assert_eq!(ids(&dbd, "app"), vec![id.clone()]);
    assert_eq!(ids(&fd, "storage"), vec![id.clone()]);
    assert!(
        held.iter().all(|(p, _)| p.exists()),
        "a live reservation was removed"
    );
    assert_eq!(markers(&dbd.join("app")), Vec::<String>::new());
    // The holder dies: its markers go with the next run there.
    let planted: Vec<PathBuf> = held.into_iter().map(|(p, _)| p).collect();
    w.stdout(&["run-job", "storage.backup"]);
    assert!(
        planted.iter().all(|p| !p.exists()),
        "{:?}",
        markers(&folder)
    );
    assert_eq!(markers(&folder), Vec::<String>::new());
}

/// Adversary round 3, case 08: one-shot commands started together on a state
/// directory that does not exist yet all succeed (creating the run history's schema
/// is one process at a time).
#[test]
fn adversary3_case08_concurrent_first_runs_all_succeed() {
    let (w, tree, fd) = setup();
    write(&tree.join("f"), "v1");
    w.write_config(
        "",
        &files_set("storage", &tree, &fd, "").replace("last = 5", "last = -1"),
    );
    for round in 0..3 {
        let _ = std::fs::remove_dir_all(w.path().join("state"));
        let jobs: Vec<_> = (0..8).map(|_| spawn_job(&w, "storage.backup")).collect();
        for job in jobs {
            let out = job.wait_with_output().expect("wait");
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A config in `w` whose every path is relative (read from the config file's
/// directory): SQLite `app` at `data/app.db` (backed up with `keep = { last = 1 }`),
/// the files set `storage` at `storage`, both to `backups`, state in `state`. The
/// live database holds `live`; the tree one file.
fn relative_config(w: &Workdir) {
    write(&w.path().join("storage/a.txt"), "a");
    std::fs::create_dir_all(w.path().join("data")).unwrap();
    sqlite(
        &w.path().join("data/app.db"),
        "CREATE TABLE t (x); INSERT INTO t VALUES ('live');",
    );
    let backup = "schedule = \"manual\"\ndestination = \"backups\"\nencryption = \"none\"\nkeep = { last = 1 }\n";
    std::fs::write(
        w.config_path(),
        format!(
            "[daemon]\nstate-dir = \"state\"\nlisten = \"127.0.0.1:{}\"\n\n[[database]]\nname = \"app\"\nurl = \"sqlite://data/app.db\"\n[database.backup]\n{backup}\n[[files]]\nname = \"storage\"\npath = \"storage\"\n[files.backup]\n{backup}",
            w.port
        ),
    )
    .unwrap();
}

/// A directory other than the config's, holding a decoy `data/app.db` (`decoy`).
fn elsewhere_with_decoy() -> tempfile::TempDir {
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(other.path().join("data")).unwrap();
    sqlite(
        &other.path().join("data/app.db"),
        "CREATE TABLE t (x); INSERT INTO t VALUES ('decoy');",
    );
    other
}

#[test]
fn adversary4_case03_a_relative_sqlite_path_is_read_beside_the_config_from_anywhere() {
    // Round 4, case 03: `url = "sqlite://data/app.db"`; a restore run from `/`
    // protected `/data/app.db` and deleted the live database. Relative paths are
    // now read from the config file's directory, whoever runs the command where.
    let w = Workdir::new();
    relative_config(&w);
    w.cmd(&["run-job", "storage.backup"])
        .current_dir("/")
        .assert()
        .success();
    let data = w.path().join("data");
    for cwd in [w.path(), Path::new("/")] {
        w.cmd(&[
            "restore",
            "storage",
            "--to",
            data.to_str().unwrap(),
            "--force",
        ])
        .current_dir(cwd)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("database \"app\""));
    }
    assert_eq!(
        sqlite(&data.join("app.db"), "SELECT x FROM t;").trim(),
        "live"
    );
}

#[test]
fn adversary5_case01_a_restore_from_a_directory_with_its_own_data_protects_the_configured_one() {
    // Round 5, case 01: run from a directory holding its own `data/app.db`, the
    // restore protected that one and replaced the live `<app>/data` wholesale.
    let w = Workdir::new();
    relative_config(&w);
    let other = elsewhere_with_decoy();
    w.cmd(&["run-job", "storage.backup"])
        .current_dir(other.path())
        .assert()
        .success();
    let data = w.path().join("data");
    w.cmd(&[
        "restore",
        "storage",
        "--to",
        data.to_str().unwrap(),
        "--force",
    ])
    .current_dir(other.path())
    .assert()
    .code(1)
    .stderr(predicate::str::contains("database \"app\""));
    assert_eq!(
        sqlite(&data.join("app.db"), "SELECT x FROM t;").trim(),
        "live"
    );
    assert_eq!(
        sqlite(&other.path().join("data/app.db"), "SELECT x FROM t;").trim(),
        "decoy"
    );
}

#[test]
fn adversary5_case02_relative_destinations_and_state_dir_are_protected_from_anywhere() {
    // Round 5, case 02: `destination = "backups"` and `state-dir = "state"` were
    // looked for below `/` by a restore run from there, so `--to <app>/backups
    // --force` replaced the backups folder with the restored tree.
    let w = Workdir::new();
    relative_config(&w);
    w.cmd(&["run-job", "storage.backup"])
        .current_dir("/")
        .assert()
        .success();
    w.cmd(&["run-job", "app.backup"])
        .current_dir("/")
        .assert()
        .success();
    let before = archives(&w.path().join("backups"), "storage");
    assert_eq!(before.len(), 1, "{before:?}");
    for target in ["backups", "state"] {
        let target = w.path().join(target);
        w.cmd(&[
            "restore",
            "storage",
            "--to",
            target.to_str().unwrap(),
            "--force",
        ])
        .current_dir("/")
        .assert()
        .code(1)
        .stderr(predicate::str::contains("dbkeeper's own files"));
    }
    assert_eq!(archives(&w.path().join("backups"), "storage"), before);
    assert_eq!(archives(&w.path().join("backups"), "app").len(), 1);
    assert!(w.path().join("state/state.db").exists());
}

#[test]
fn adversary5_case05_run_job_from_elsewhere_backs_up_the_configured_database() {
    // Round 5, case 05: `run-job app.backup` from a directory with another
    // `data/app.db` backed that one up and, with `keep = { last = 1 }`, rotated the
    // only good backup of the real database away.
    let w = Workdir::new();
    relative_config(&w);
    let other = elsewhere_with_decoy();
    for cwd in [w.path(), other.path()] {
        w.cmd(&["run-job", "app.backup"])
            .current_dir(cwd)
            .assert()
            .success();
    }
    let out = w.path().join("restored.db");
    w.cmd(&["restore", "app", "--to", out.to_str().unwrap()])
        .current_dir(other.path())
        .assert()
        .success();
    assert_eq!(sqlite(&out, "SELECT x FROM t;").trim(), "live");
    assert!(!other.path().join("backups").exists() && !other.path().join("state").exists());
    assert_eq!(
        sqlite(&other.path().join("data/app.db"), "SELECT x FROM t;").trim(),
        "decoy"
    );
}

#[test]
fn adversary6_case10_a_config_named_through_a_link_or_its_real_path_is_one_config() {
    // Round 6, case 10: `etc/dbkeeper.toml` linked to `opt/cfg/dbkeeper.toml`. Named
    // through the link, relative paths and conf.d were the link's; through the real
    // path, the target's: that config knew no database, and `restore --force`
    // deleted the live `app.db` and the run history. A file is now read where it
    // really is, and a conf.d beside the link (which that would ignore) is refused.
    let w = Workdir::new();
    let (etc, cfg) = (w.path().join("etc"), w.path().join("opt/cfg"));
    write(
        &cfg.join("dbkeeper.toml"),
        &format!(
            "[daemon]\nstate-dir = \"state\"\nlisten = \"127.0.0.1:{}\"\n\n{}",
            w.port,
            "[[files]]\nname = \"storage\"\npath = \"storage\"\n[files.backup]\nschedule = \"manual\"\ndestination = \"backups\"\nencryption = \"none\"\n"
        ),
    );
    write(&cfg.join("storage/a.txt"), "a");
    // The drop-in's relative paths are its own directory's (conf.d).
    write(
        &cfg.join("conf.d/10-app.toml"),
        "[[database]]\nname = \"app\"\nurl = \"sqlite://../data/app.db\"\n",
    );
    std::fs::create_dir_all(cfg.join("data")).unwrap();
    sqlite(
        &cfg.join("data/app.db"),
        "CREATE TABLE t (x); INSERT INTO t VALUES ('live');",
    );
    std::fs::create_dir_all(&etc).unwrap();
    std::os::unix::fs::symlink("../opt/cfg/dbkeeper.toml", etc.join("dbkeeper.toml")).unwrap();
    let run = |config: &Path, args: &[&str]| {
        let mut cmd = assert_cmd::Command::new(env!("CARGO_BIN_EXE_dbkeeper"));
        cmd.args(args).arg("-c").arg(config).current_dir("/");
        cmd.assert()
    };
    let (link, real) = (etc.join("dbkeeper.toml"), cfg.join("dbkeeper.toml"));
    run(&link, &["run-job", "storage.backup"]).success();
    for config in [&link, &real] {
        run(config, &["check"])
            .success()
            .stdout(predicate::str::contains("databases: 1"));
        for target in [cfg.join("data"), cfg.join("state")] {
            run(
                config,
                &[
                    "restore",
                    "storage",
                    "--to",
                    target.to_str().unwrap(),
                    "--force",
                ],
            )
            .code(1);
        }
        // One run history, whichever name: the run made through the link is seen.
        run(config, &["history"])
            .success()
            .stdout(predicate::str::contains("storage.backup"));
    }
    assert_eq!(
        sqlite(&cfg.join("data/app.db"), "SELECT x FROM t;").trim(),
        "live"
    );
    assert!(cfg.join("state/state.db").exists() && !etc.join("state").exists());
    // A conf.d beside the link would be ignored: refused, saying where to move it.
    write(&etc.join("conf.d/20-more.toml"), "");
    run(&link, &["check"]).code(2).stderr(
        predicate::str::contains("symbolic link").and(predicate::str::contains("would be ignored")),
    );
    run(&real, &["check"]).success();
}

#[test]
fn adversary6_case24_a_volume_roots_backup_restores_onto_a_fresh_volume() {
    // Round 6, case 24: the set's path is a mount point with an empty lost+found;
    // restoring it onto a fresh volume (with its own empty lost+found) failed with
    // "lost+found appeared during the restore". The volume's own is kept.
    let (w, _, dest) = setup();
    let source = w.path().join("data-volume");
    let _src = common::Mount::tmpfs(&source, "4m");
    std::fs::create_dir(source.join("lost+found")).unwrap();
    write(&source.join("a.txt"), "a");
    write(&source.join("sub/b.txt"), "b");
    backed_up(&w, &source, &dest);
    let fresh = w.path().join("fresh");
    let _fresh = common::Mount::tmpfs(&fresh, "4m");
    std::fs::create_dir(fresh.join("lost+found")).unwrap();
    let marker = std::fs::metadata(fresh.join("lost+found")).unwrap();
    restore(&w, "storage", &fresh, &[]).success();
    assert_eq!(names(&fresh), ["a.txt", "lost+found", "sub"]);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(fresh.join("lost+found")).unwrap().ino(),
        marker.ino(),
        "the volume's own lost+found stays"
    );
    assert_eq!(
        std::fs::read_to_string(fresh.join("sub/b.txt")).unwrap(),
        "b"
    );
}

/// A set `storage` (keep `last = 1`) and databases `a` and `b` taking it
/// (`with-files`, keep `last = 2`), all to `dest`.
fn shared_set(w: &Workdir, tree: &Path, dest: &Path) {
    write(&tree.join("f.txt"), "v1");
    let dbs = ["a", "b"]
        .iter()
        .map(|n| database(w, n, dest, "with-files = [\"storage\"]").replace("last = 5", "last = 2"))
        .collect::<String>();
    w.write_config(
        "",
        &format!(
            "{}{dbs}",
            files_set("storage", tree, dest, "").replace("last = 5", "last = 1")
        ),
    );
}

#[test]
fn adversary7_case12_a_set_shared_by_two_databases_keeps_each_pairs_files() {
    // Round 7, case 12: `a` and `b` both take `storage`; b's two runs rotated the
    // set and deleted the files half of a's only backup.
    let (w, tree, dest) = setup();
    shared_set(&w, &tree, &dest);
    let a_id = reported_id(&w.stdout(&["run-job", "a.backup"]));
    for _ in 0..2 {
        std::thread::sleep(std::time::Duration::from_millis(1100));
        w.stdout(&["run-job", "b.backup"]);
    }
    assert!(
        ids(&dest, "storage").contains(&a_id),
        "{:?}",
        ids(&dest, "storage")
    );
    let out = w.path().join("rolled-back");
    restore(&w, "storage", &out, &["--backup", &a_id]).success();
    assert_eq!(std::fs::read_to_string(out.join("f.txt")).unwrap(), "v1");
}

#[test]
fn adversary7_case18_an_unpaired_files_backup_never_pushes_out_a_pairs_files() {
    // Round 7, case 18: a run killed after its files backup left an unpaired one;
    // with `keep = { last = 1 }` the set's next rotation kept it and deleted the
    // files half of the database's newest backup. A set run of its own makes the
    // same unpaired backup.
    let (w, tree, dest) = setup();
    shared_set(&w, &tree, &dest);
    let pair = reported_id(&w.stdout(&["run-job", "a.backup"]));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write(&tree.join("f.txt"), "v2");
    let lone = reported_id(&w.stdout(&["run-job", "storage.backup"]));
    w.stdout(&["backup", "prune", "storage"]);
    let left = ids(&dest, "storage");
    assert!(left.contains(&pair) && left.contains(&lone), "{left:?}");
    // Once the database backup is gone (and its destination shows that: it holds
    // another backup of the database), its files half rotates like any other.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let pair2 = reported_id(&w.stdout(&["run-job", "a.backup"]));
    assert!(ids(&dest, "storage").contains(&pair), "still paired");
    std::fs::remove_file(dest.join("a").join(format!("{pair}.manifest.json"))).unwrap();
    w.stdout(&["backup", "prune", "storage"]);
    assert_eq!(ids(&dest, "storage"), [pair2]);
}

/// `storage` (keep `last = 1`) to `<w>/setdest`, taken by `app` (keep `db_keep`) to
/// `<w>/dbdest`; with `with_db` false, a files-only config of the same set.
fn paired_config(w: &Workdir, tree: &Path, with_db: bool, db_keep: u32) {
    let set =
        files_set("storage", tree, &w.path().join("setdest"), "").replace("last = 5", "last = 1");
    let db = if with_db {
        database(
            w,
            "app",
            &w.path().join("dbdest"),
            "with-files = [\"storage\"]",
        )
        .replace("last = 5", &format!("last = {db_keep}"))
    } else {
        String::new()
    };
    w.write_config("", &format!("{set}{db}"));
}

#[test]
fn adversary8_files_halves_stay_while_their_database_backups_may_exist() {
    let (w, tree, _) = setup();
    write(&tree.join("f.txt"), "v1");
    paired_config(&w, &tree, true, 5);
    let mut pairs = Vec::new();
    for _ in 0..3 {
        pairs.push(reported_id(&w.stdout(&["run-job", "app.backup"])));
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let setdest = w.path().join("setdest");
    assert_eq!(ids(&setdest, "storage"), pairs);
    // Case 01: a files-only config (the database left out of it) prunes the set:
    // the pairs' files halves stay.
    paired_config(&w, &tree, false, 5);
    w.stdout(&["backup", "prune", "storage"]);
    assert_eq!(ids(&setdest, "storage"), pairs, "case 01");
    // Cases 03 and 04: the database's destination missing, or an empty folder (an
    // unmounted file system): nothing proves the pairs gone; they stay.
    paired_config(&w, &tree, true, 5);
    let (dbdest, aside) = (w.path().join("dbdest"), w.path().join("dbdest.aside"));
    std::fs::rename(&dbdest, &aside).unwrap();
    w.stdout(&["backup", "prune", "storage"]);
    assert_eq!(ids(&setdest, "storage"), pairs, "case 04");
    std::fs::create_dir_all(dbdest.join("app")).unwrap();
    w.stdout(&["backup", "prune", "storage"]);
    assert_eq!(ids(&setdest, "storage"), pairs, "case 03");
    std::fs::remove_dir_all(&dbdest).unwrap();
    std::fs::rename(&aside, &dbdest).unwrap();
    // Round 8, case 11: the reason shown is the pairing, not a migration.
    let dry = w.stdout(&["backup", "prune", "storage", "--dry-run"]);
    assert!(dry.contains("files half of database \"app\""), "{dry}");
    assert!(!dry.contains("migration"), "{dry}");
    // Once the database's own rotation lets its backups go, their files halves go
    // with the set's rotation.
    paired_config(&w, &tree, true, 1);
    let last = reported_id(&w.stdout(&["run-job", "app.backup"]));
    assert_eq!(ids(&dbdest, "app"), std::slice::from_ref(&last));
    assert_eq!(ids(&setdest, "storage"), [last]);
}

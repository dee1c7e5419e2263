//! Backups end to end with the real binary, real SQLite files and real PostgreSQL:
//! round trips, damaged archives, wrong keys, interrupted and failing backups, a full
//! disk, rotation and metrics.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    archives, backup_table, dir_names, metric_value, pg_server, psql, sqlite, sqlite_db,
    write_script, Mount, PgDb, Workdir,
};
use predicates::prelude::*;

/// A SQLite database with a few tables and ~`mib` MiB of incompressible rows.
fn fill_sqlite(path: &Path, mib: u32) {
    sqlite(
        path,
        &format!(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, born TEXT, score REAL);
             CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB);
             CREATE INDEX people_name ON people (name);
             CREATE VIEW high AS SELECT * FROM people WHERE score > 50;
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
               INSERT INTO people (name, born, score) SELECT 'Person ' || i || ' é', date('2000-01-01', '+' || i || ' days'), i % 97 FROM n;
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {})
               INSERT INTO blobs (data) SELECT randomblob(65536) FROM n;",
            mib * 16
        ),
    );
}

#[test]
fn sqlite_round_trip_gives_identical_data_for_every_codec() {
    let w = Workdir::new();
    let key = w.key("backup.key");
    let db = w.path().join("app.db");
    fill_sqlite(&db, 1);
    for compression in ["gzip", "zstd", "none"] {
        let dest = w.path().join(format!("backups-{compression}"));
        w.write_config(
            "",
            &sqlite_db(
                &w,
                "app",
                &backup_table(
                    &dest,
                    Some(&key),
                    &format!("compression = \"{compression}\"\nverify = \"restore\""),
                ),
            ),
        );
        w.cmd(&["run-job", "app.backup"]).assert().success();
        let target = w.path().join(format!("restored-{compression}.db"));
        w.cmd(&["restore", "app", "--to", target.to_str().expect("utf-8")])
            .assert()
            .success();
        assert_eq!(
            sqlite(&db, ".dump"),
            sqlite(&target, ".dump"),
            "{compression}"
        );
        // Never over an existing file without --force; with it, atomically replaced.
        w.cmd(&["restore", "app", "--to", target.to_str().expect("utf-8")])
            .assert()
            .code(1)
            .stderr(predicate::str::contains("--force"));
        w.cmd(&[
            "restore",
            "app",
            "--to",
            target.to_str().expect("utf-8"),
            "--force",
        ])
        .assert()
        .success();
    }
    // The archive holds no plaintext; `decrypt` gives back a valid SQLite file.
    let dest = w.path().join("backups-none");
    let archive = &archives(&dest, "app")[0];
    let bytes = std::fs::read(archive).expect("archive");
    assert!(!bytes.windows(8).any(|x| x == b"Person 1"));
    let plain = w.path().join("plain.db");
    w.cmd(&[
        "decrypt",
        archive.to_str().expect("utf-8"),
        "-o",
        plain.to_str().expect("utf-8"),
    ])
    .assert()
    .success();
    assert_eq!(sqlite(&plain, "SELECT count(*) FROM people").trim(), "5000");
    let list = w.stdout(&["backup", "list", "app"]);
    assert!(
        list.contains("-manual") && list.contains("restore "),
        "{list}"
    );
}

/// Normalised `pg_dump --schema-only`: without comments and psql meta-commands
/// (`\restrict` carries a random key).
fn schema(url: &str) -> String {
    let out = Command::new("pg_dump")
        .args(["--schema-only", "--no-owner", "--no-privileges", url])
        .output()
        .expect("pg_dump");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("--") && !l.starts_with('\\') && !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Row count and checksum of every table and materialized view, plus sequence values.
fn contents(url: &str) -> String {
    let relations = psql(
        url,
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
         ORDER BY 1",
    );
    let mut out = String::new();
    for rel in relations.lines() {
        out.push_str(&psql(
            url,
            &format!("SELECT '{rel}', count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {rel} t"),
        ));
        out.push('\n');
    }
    out.push_str(&psql(
        url,
        "SELECT last_value, is_called FROM sales.invoice_seq",
    ));
    out.push_str(&psql(url, "SELECT last_value FROM sales.customers_id_seq"));
    out
}

#[test]
fn postgres_round_trip_keeps_schema_and_data() {
    let src = PgDb::new("rt_src");
    let fixture = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rich_schema.sql"),
    )
    .expect("fixture");
    src.sql(&fixture);
    let w = Workdir::new();
    let key = w.key("k");
    let dest = w.path().join("backups");
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"pg\"\nurl = \"{}\"\n{}",
            src.url,
            backup_table(&dest, Some(&key), "verify = \"restore\"")
        ),
    );
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    assert_eq!(
        psql(
            &format!("{}/postgres", pg_server()),
            &format!(
                "SELECT count(*) FROM pg_database WHERE datname LIKE '{}\\_dbk\\_verify\\_%'",
                src.name
            )
        ),
        "0",
        "the restore test drops its scratch database"
    );
    let target = PgDb::unused("rt_dst");
    // Without --create a missing database is an error, and nothing is created.
    w.cmd(&["restore", "pg", "--to", &target.url])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("--create"));
    assert!(!target.exists());
    w.cmd(&["restore", "pg", "--to", &target.url, "--create"])
        .assert()
        .success();
    assert_eq!(schema(&src.url), schema(&target.url));
    assert_eq!(contents(&src.url), contents(&target.url));
    // A target that now has tables is refused without --force, restored over with it.
    w.cmd(&["restore", "pg", "--to", &target.url])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("--force"));
    target.sql("UPDATE sales.customers SET name = 'changed'");
    w.cmd(&["restore", "pg", "--to", &target.url, "--force"])
        .assert()
        .success();
    assert_eq!(contents(&src.url), contents(&target.url));

    // `decrypt | pg_restore -l` works.
    let archive = &archives(&dest, "pg")[0];
    let mut child = Command::new(common::BIN)
        .args(["decrypt", "--key-file"])
        .arg(&key)
        .arg(archive)
        .stdout(Stdio::piped())
        .spawn()
        .expect("decrypt");
    let listing = Command::new("pg_restore")
        .arg("-l")
        .stdin(child.stdout.take().expect("stdout"))
        .output()
        .expect("pg_restore -l");
    assert!(child.wait().expect("wait").success());
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("MATERIALIZED VIEW sales totals")
            && listing.contains("TRIGGER sales orders orders_touch"),
        "{listing}"
    );
}

#[test]
fn damaged_archives_and_wrong_keys_exit_3_and_write_nothing() {
    let w = Workdir::new();
    let key = w.key("k");
    let db = w.path().join("app.db");
    fill_sqlite(&db, 3); // incompressible: the archive has several 1 MiB segments
    let dest = w.path().join("backups");
    w.write_config(
        "",
        &sqlite_db(
            &w,
            "app",
            &backup_table(&dest, Some(&key), "compression = \"none\""),
        ),
    );
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let archive = archives(&dest, "app")[0].clone();
    let good = std::fs::read(&archive).expect("archive");
    let header_end = 13 + u32::from_be_bytes(good[9..13].try_into().expect("4 bytes")) as usize;
    let segment = (1 << 20) + 16;
    assert!(
        good.len() > header_end + 3 * segment,
        "needs several segments"
    );

    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for pos in [
        0,
        9,
        20,
        header_end - 2,
        header_end + 5,
        header_end + segment + 7,
        good.len() - 1,
    ] {
        let mut bad = good.clone();
        bad[pos] ^= 0x01;
        cases.push((format!("byte {pos} flipped"), bad));
    }
    for n in 1..=3 {
        cases.push((
            format!("cut after segment {n}"),
            good[..header_end + n * segment].to_vec(),
        ));
    }
    cases.push((
        "cut inside a segment".into(),
        good[..header_end + segment + 1000].to_vec(),
    ));
    let mut longer = good.clone();
    longer.extend_from_slice(b"trailing garbage");
    cases.push(("garbage appended".into(), longer));

    let copy = w.path().join("copy.dbk");
    let target = w.path().join("restored.db");
    // After the first failed verify the manifest says "failed", so `latest` finds no
    // good backup: name it.
    let id = archive
        .file_stem()
        .expect("stem")
        .to_string_lossy()
        .into_owned();
    for (what, bytes) in cases {
        std::fs::write(&archive, &bytes).expect("write");
        std::fs::write(&copy, &bytes).expect("write");
        // Through the manifest (checksum first) and directly through the crypto.
        w.cmd(&["backup", "verify", "app", "--backup", &id])
            .assert()
            .code(3)
            .stderr(predicate::function(|s: &str| {
                s.trim_end().lines().count() == 1
            }));
        let restore = [
            "restore",
            "app",
            "--backup",
            &id,
            "--to",
            target.to_str().expect("utf-8"),
        ];
        assert_exit_3(&w, &restore, &what);
        assert!(!target.exists(), "{what}: restore wrote a target");
        let out = w.path().join("plain.out");
        let to_file = [
            "decrypt",
            copy.to_str().expect("utf-8"),
            "-o",
            out.to_str().expect("utf-8"),
        ];
        assert_exit_3(&w, &to_file, &what);
        assert!(!out.exists(), "{what}: decrypt left output");
        let stdout = assert_exit_3(&w, &["decrypt", copy.to_str().expect("utf-8")], &what);
        assert!(stdout.is_empty(), "{what}: plaintext reached stdout");
    }
    std::fs::write(&archive, &good).expect("restore good archive");
    // The truncation message says so.
    std::fs::write(&copy, &good[..header_end + 2 * segment]).expect("write");
    let out = w.path().join("cut.out");
    w.cmd(&[
        "decrypt",
        copy.to_str().expect("utf-8"),
        "-o",
        out.to_str().expect("utf-8"),
    ])
    .assert()
    .code(3)
    .stderr(predicate::str::contains("cut short"));

    // Wrong key: names both key ids.
    let other = w.key("other");
    let out = Command::new(common::BIN)
        .args(["decrypt", "--key-file"])
        .arg(&other)
        .arg(&archive)
        .output()
        .expect("decrypt");
    assert_eq!(out.status.code(), Some(3));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("was made for key ") && msg.contains("; you have key "),
        "{msg}"
    );
    // The good archive still verifies; with the old key configured as a decryption
    // key after a rotation, it still restores.
    w.cmd(&["backup", "verify", "app", "--backup", &id])
        .assert()
        .success();
    w.write_config(
        "",
        &sqlite_db(
            &w,
            "app",
            &backup_table(
                &dest,
                Some(&other),
                &format!("decryption-key-files = [\"{}\"]", key.display()),
            ),
        ),
    );
    w.cmd(&["restore", "app", "--to", target.to_str().expect("utf-8")])
        .assert()
        .success();
}

/// Runs the command, expects exit code 3 and returns its stdout.
fn assert_exit_3(w: &Workdir, args: &[&str], what: &str) -> Vec<u8> {
    let out = w.cmd(args).output().expect("run dbkeeper");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{what}: {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn failing_or_killed_backups_leave_no_backup_and_older_ones_intact() {
    let src = PgDb::new("fail");
    src.sql("CREATE TABLE t AS SELECT i, md5(i::text) AS h FROM generate_series(1, 50000) i");
    let w = Workdir::new();
    let key = w.key("k");
    let dest = w.path().join("backups");
    let config = |extra: &str| {
        format!(
            "[[database]]\nname = \"pg\"\nurl = \"{}\"\n{}",
            src.url,
            backup_table(&dest, Some(&key), extra)
        )
    };
    w.write_config("", &config(""));
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    let before = dir_names(&dest.join("pg"));
    assert_eq!(before.len(), 2, "{before:?}");

    // pg_dump that writes its whole dump and then fails: a failed backup, not a short one.
    let late_fail = common::write_script(
        w.path(),
        "pg_dump_then_fail.sh",
        "#!/bin/sh\npg_dump \"$@\"\necho 'pg_dump: error: simulated failure' >&2\nexit 1\n",
    );
    // Part of a real dump, then a stall: bytes that are not a dump would be refused
    // at once by the dump check, before there is anything to kill.
    let slow = common::write_script(
        w.path(),
        "pg_dump_slow.sh",
        "#!/bin/sh\npg_dump \"$@\" | head -c 1000000\nexec sleep 60\n",
    );
    w.write_config(
        "",
        &config(&format!("pg-dump = \"{}\"", late_fail.display())),
    );
    w.cmd(&["run-job", "pg.backup"]).assert().code(1).stderr(
        predicate::str::contains("pg_dump failed")
            .and(predicate::str::contains("simulated failure")),
    );
    assert_eq!(dir_names(&dest.join("pg")), before);

    // A missing database: pg_dump's own message comes through.
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"pg\"\nurl = \"{}/dbk_no_such_db\"\nconnect-timeout = \"2s\"\n{}",
            pg_server(),
            backup_table(&dest, Some(&key), "")
        ),
    );
    w.cmd(&["run-job", "pg.backup"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("dbk_no_such_db"));
    assert_eq!(dir_names(&dest.join("pg")), before);

    // kill -9 in the middle of writing: nothing listed; the leftover is removed on the next start.
    w.write_config("", &config(&format!("pg-dump = \"{}\"", slow.display())));
    let mut child = Command::new(common::BIN)
        .args(["run-job", "-c"])
        .arg(w.config_path())
        .arg("pg.backup")
        .stderr(Stdio::null())
        .spawn()
        .expect("run-job");
    let start = std::time::Instant::now();
    while !dir_names(&dest.join("pg"))
        .iter()
        .any(|n| n.ends_with(".tmp"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no temporary file appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    let _ = Command::new("pkill")
        .args(["-f", &slow.display().to_string()])
        .status();
    assert!(
        dir_names(&dest.join("pg"))
            .iter()
            .any(|n| n.ends_with(".tmp")),
        "leftover present before restart"
    );
    let list = w.stdout(&["backup", "list", "pg"]);
    assert_eq!(
        list.lines().count(),
        2,
        "only the good backup is listed:\n{list}"
    );
    w.write_config("", &config(""));
    let d = w.start();
    d.wait_for("leftover cleaned", Duration::from_secs(10), || {
        dir_names(&dest.join("pg")) == before
    });
    drop(d);
    w.cmd(&["backup", "verify", "pg", "--restore-test"])
        .assert()
        .success();
}

#[test]
fn full_destination_disk_fails_cleanly_and_frees_the_space() {
    let w = Workdir::new();
    let key = w.key("k");
    let db = w.path().join("app.db");
    fill_sqlite(&db, 1);
    let dest = w.path().join("small");
    let _tmpfs = Mount::tmpfs(&dest, "3m");
    w.write_config(
        "",
        &sqlite_db(
            &w,
            "app",
            // The pre-flight check off: this is about a disk filling up mid-write.
            &backup_table(
                &dest,
                Some(&key),
                "compression = \"none\"\nfree-space-margin = 0",
            ),
        ),
    );
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let before = dir_names(&dest.join("app"));
    sqlite(&db, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 32) INSERT INTO blobs (data) SELECT randomblob(65536) FROM n;"); // now the next archive cannot fit
    w.cmd(&["run-job", "app.backup"]).assert().code(1).stderr(
        predicate::str::contains("No space left on device")
            .and(predicate::str::contains("free space")),
    );
    assert_eq!(
        dir_names(&dest.join("app")),
        before,
        "older backup intact, partial file gone"
    );
    let df = Command::new("df")
        .arg("--output=used")
        .arg(&dest)
        .output()
        .expect("df");
    let used_kib: u64 = String::from_utf8_lossy(&df.stdout)
        .lines()
        .nth(1)
        .unwrap_or("0")
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        used_kib < 1500,
        "space of the partial file was freed ({used_kib} KiB used)"
    );
    w.cmd(&["backup", "verify", "app"]).assert().success();
    let history = w.stdout(&["history", "app.backup"]);
    assert!(history.contains("No space left on device"), "{history}");
}

/// The pre-flight check: a folder without room for another backup as large as the
/// newest one (× `free-space-margin`) gets none, and `pg_dump` does not even start
/// when no destination qualifies; the older backups stay, other destinations still
/// get theirs, and the free space is exported.
#[test]
fn preflight_refuses_a_small_destination_before_the_dump_starts() {
    let w = Workdir::new();
    let key = w.key("k");
    let pg = PgDb::new("preflight");
    pg.sql("CREATE TABLE blobs (data bytea); INSERT INTO blobs SELECT decode(string_agg(md5(random()::text), ''), 'hex') FROM generate_series(1, 80000);");
    let small = w.path().join("small");
    let _tmpfs = Mount::tmpfs(&small, "6m");
    let big = w.path().join("big");
    let marker = w.path().join("pg_dump-ran");
    let wrapper = write_script(
        w.path(),
        "pg_dump",
        &format!(
            "#!/bin/sh
touch '{}'
exec pg_dump \"$@\"
",
            marker.display()
        ),
    );
    let config = |dest: &str| {
        w.write_config(
            "",
            &format!(
                "[[database]]\nname = \"pg\"\nurl = \"{}\"\n[database.backup]\nschedule = \"manual\"\ndestination = {dest}\nencryption-key-file = \"{}\"\ncompression = \"none\"\nglobals = false\npg-dump = \"{}\"\n",
                pg.url,
                key.display(),
                wrapper.display()
            ),
        )
    };
    config(&format!("\"{}\"", small.display()));
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    let first = dir_names(&small.join("pg"));
    assert_eq!(first.len(), 2, "{first:?}");
    let stored = archives(&small, "pg")[0].metadata().expect("stat").len();
    // bytea is dumped as hex text.
    assert!(
        stored > 2_500_000 && stored < 2_700_000,
        "a ~2.5 MiB archive: {stored}"
    );

    // ~3.5 MiB free < 2 × the newest backup: refused before pg_dump runs.
    std::fs::remove_file(&marker).expect("marker");
    w.cmd(&["run-job", "pg.backup"]).assert().code(1).stderr(
        predicate::str::contains("pre-flight check")
            .and(predicate::str::contains("free-space-margin"))
            .and(predicate::str::contains(small.to_str().expect("utf-8"))),
    );
    assert!(!marker.exists(), "pg_dump never started");
    assert_eq!(
        dir_names(&small.join("pg")),
        first,
        "the older backup intact"
    );

    // With a second destination the backup goes there; the job still fails naming
    // the small one, which keeps its older backup.
    config(&format!("[\"{}\", \"{}\"]", small.display(), big.display()));
    w.cmd(&["run-job", "pg.backup"]).assert().code(1).stderr(
        predicate::str::contains("pre-flight check")
            .and(predicate::str::contains("not in every destination")),
    );
    assert!(marker.exists(), "dumped for the other destination");
    assert_eq!(archives(&big, "pg").len(), 1);
    assert_eq!(dir_names(&small.join("pg")), first);

    // A smaller margin lets it through; the daemon exports the free space.
    config(&format!("\"{}\"\nfree-space-margin = 1.1", small.display()));
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    assert_eq!(archives(&small, "pg").len(), 2);
    let d = w.start();
    let label = format!("destination=\"{}\"", small.display());
    let labels = ["database=\"pg\"", label.as_str()];
    d.wait_for("free space exported", Duration::from_secs(10), || {
        d.metric("dbkeeper_destination_free_bytes", &labels)
            .is_some()
    });
    let free = d
        .metric("dbkeeper_destination_free_bytes", &labels)
        .unwrap_or(0.0);
    assert!(free > 0.0 && free < 2.0 * 1024.0 * 1024.0, "{free}");
    w.cmd(&["backup", "verify", "pg"]).assert().success();
}

/// `keep` counts of `-1`/`"all"` and `within`, through the real binary: what
/// `backup prune --dry-run` says and what a prune deletes.
#[test]
fn keep_all_and_within_on_disk() {
    let w = Workdir::new();
    let key = w.key("k");
    fill_sqlite(&w.path().join("app.db"), 0);
    let dest = w.path().join("backups");
    let config = |keep: &str| {
        w.write_config(
            "",
            &sqlite_db(&w, "app", &backup_table(&dest, Some(&key), keep)),
        )
    };
    config("keep = { last = -1 }");
    for _ in 0..3 {
        w.cmd(&["run-job", "app.backup"]).assert().success();
        std::thread::sleep(Duration::from_millis(1100)); // distinct ids
    }
    let ids: Vec<String> = archives(&dest, "app")
        .iter()
        .map(|p| {
            p.file_name()
                .expect("name")
                .to_string_lossy()
                .replace(".dbk", "")
        })
        .collect();
    assert_eq!(ids.len(), 3, "last = -1 keeps every backup: {ids:?}");

    config("keep = { within = \"1h\" }");
    let dry = w.stdout(&["backup", "prune", "app", "--dry-run"]);
    assert_eq!(
        dry.lines().filter(|l| l.contains("(within 1h)")).count(),
        3,
        "{dry}"
    );

    // daily = "all": the newest of each day, and the oldest backup (restic >= 0.16).
    config("keep = { daily = \"all\" }");
    let dry = w.stdout(&["backup", "prune", "app", "--dry-run"]);
    assert!(
        dry.contains(&format!(
            "keep    {}  (daily (oldest; periods left))",
            ids[0]
        )),
        "{dry}"
    );
    w.stdout(&["backup", "prune", "app"]);
    let one_day = ids.iter().all(|id| id[..8] == ids[0][..8]);
    if one_day {
        let left: Vec<PathBuf> = archives(&dest, "app");
        assert_eq!(left.len(), 2, "the middle backup goes: {left:?}");
        assert!(!dry.contains(&format!("keep    {}", ids[1])), "{dry}");
    }

    // A value it cannot read is refused, naming the rule.
    config("keep = { daily = -2 }");
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("keep.daily: -2 is not a count"));
    config("keep = { within = \"a week\" }");
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("keep.within"));
}

#[test]
fn rotation_on_disk_and_backup_metrics() {
    let w = Workdir::new();
    let key = w.key("k");
    fill_sqlite(&w.path().join("app.db"), 0);
    let dest = w.path().join("backups");
    let table = backup_table(&dest, Some(&key), "keep = { last = 2 }");
    w.write_config("", &sqlite_db(&w, "app", &table));
    for _ in 0..4 {
        w.cmd(&["run-job", "app.backup"]).assert().success();
        std::thread::sleep(Duration::from_millis(1100)); // distinct ids
    }
    let ids: Vec<String> = archives(&dest, "app")
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    let dry = w.stdout(&["backup", "prune", "app", "--dry-run"]);
    assert_eq!(
        dry.lines().filter(|l| l.starts_with("keep")).count(),
        2,
        "{dry}"
    );

    // A policy that keeps nothing is refused; so is a key file others can read.
    w.write_config(
        "",
        &sqlite_db(
            &w,
            "app",
            &backup_table(&dest, Some(&key), "keep = { daily = 0 }"),
        ),
    );
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("keeps no backup"));
    let open_key = w.path().join("open.key");
    std::fs::copy(&key, &open_key).expect("copy");
    Command::new("chmod")
        .args(["644"])
        .arg(&open_key)
        .status()
        .expect("chmod");
    w.write_config(
        "",
        &sqlite_db(&w, "app", &backup_table(&dest, Some(&open_key), "")),
    );
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("chmod 600"));
    w.write_config(
        "",
        &sqlite_db(
            &w,
            "app",
            "[database.backup]\nschedule = \"@daily\"\ndestination = \"/tmp/x\"\n",
        ),
    );
    w.cmd(&["check"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("encryption-key-file: is required"));

    // The daemon publishes the catalog at start-up and after each backup.
    w.write_config(
        "",
        &sqlite_db(
            &w,
            "app",
            &table.replace("schedule = \"manual\"", "schedule = \"every 2s\""),
        ),
    );
    let d = w.start();
    d.wait_for(
        "a scheduled backup and a prune",
        Duration::from_secs(20),
        || {
            // The catalog gauges are published right after pruning.
            let m = d.metrics();
            metric_value(&m, "dbkeeper_backup_pruned_total", &["database=\"app\""]).unwrap_or(0.0)
                >= 1.0
                && metric_value(&m, "dbkeeper_backups_stored", &["database=\"app\""]) == Some(2.0)
        },
    );
    let m = d.metrics();
    let get = |name: &str| metric_value(&m, name, &["database=\"app\""]).unwrap_or(-1.0);
    assert_eq!(get("dbkeeper_backups_stored"), 2.0);
    assert!(get("dbkeeper_backup_last_size_bytes") > 0.0);
    assert!(get("dbkeeper_backup_last_raw_size_bytes") > get("dbkeeper_backup_last_size_bytes"));
    assert!(get("dbkeeper_backup_stored_bytes") > get("dbkeeper_backup_last_size_bytes"));
    let now = chrono::Utc::now().timestamp() as f64;
    assert!((now - get("dbkeeper_backup_last_verified_timestamp_seconds")).abs() < 60.0);
    assert!(get("dbkeeper_backup_oldest_timestamp_seconds") > 0.0);
    let (_, page) = d.get("/");
    assert!(
        page.contains("Recent backups") && page.contains("passed</span> (read)"),
        "{page}"
    );
}

#[test]
fn unencrypted_backups_are_allowed_when_asked_for() {
    let w = Workdir::new();
    fill_sqlite(&w.path().join("app.db"), 0);
    let dest = w.path().join("backups");
    w.write_config("", &sqlite_db(&w, "app", &backup_table(&dest, None, "")));
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let archive = &archives(&dest, "app")[0];
    let manifest =
        std::fs::read_to_string(archive.to_string_lossy().replace(".dbk", ".manifest.json"))
            .expect("manifest");
    assert!(manifest.contains("\"key_id\": null"), "{manifest}");
    // No key needed to read it back.
    let out = w.path().join("plain.db");
    assert_cmd::Command::new(common::BIN)
        .args(["decrypt", "-c"])
        .arg(w.config_path())
        .arg(archive)
        .arg("-o")
        .arg(&out)
        .assert()
        .success();
    assert_eq!(sqlite(&out, "SELECT count(*) FROM people").trim(), "5000");
}

#[test]
fn a_pg_dump_that_succeeds_without_a_dump_makes_no_backup_and_keeps_the_real_ones() {
    let src = PgDb::new("nodump");
    src.sql("CREATE TABLE t (x int); INSERT INTO t VALUES (1)");
    let w = Workdir::new();
    let key = w.key("k");
    let dest = w.path().join("backups");
    let config = |extra: &str| {
        format!(
            "[[database]]\nname = \"pg\"\nurl = \"{}\"\n{}",
            src.url,
            backup_table(
                &dest,
                Some(&key),
                &format!("keep = {{ last = 1 }}\n{extra}")
            )
        )
    };
    w.write_config("", &config(""));
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    let before = dir_names(&dest.join("pg"));
    // A wrapper (ssh, docker exec) that loses pg_dump's output and exit status.
    let silent = common::write_script(w.path(), "pg_dump_silent.sh", "#!/bin/sh\nexit 0\n");
    let chatty = common::write_script(
        w.path(),
        "pg_dump_chatty.sh",
        "#!/bin/sh\necho 'Error: No such container: db'\nexit 0\n",
    );
    let failing = common::write_script(
        w.path(),
        "pg_dump_failing.sh",
        "#!/bin/sh\necho 'pg_dump: error: connection refused' >&2\nexit 1\n",
    );
    for (script, says) in [
        (&silent, "it is empty"),
        (&chatty, "it starts with \"Error: No such"),
    ] {
        std::thread::sleep(Duration::from_millis(1100));
        w.write_config("", &config(&format!("pg-dump = \"{}\"", script.display())));
        w.cmd(&["run-job", "pg.backup"]).assert().code(1).stderr(
            predicate::str::contains("pg_dump's output is not a custom-format dump")
                .and(predicate::str::contains(says)),
        );
        assert_eq!(
            dir_names(&dest.join("pg")),
            before,
            "a backup was published or rotated"
        );
    }
    // pg_dump failing with no output: its own message, not the missing dump.
    w.write_config("", &config(&format!("pg-dump = \"{}\"", failing.display())));
    w.cmd(&["run-job", "pg.backup"]).assert().code(1).stderr(
        predicate::str::contains("pg_dump failed")
            .and(predicate::str::contains("connection refused")),
    );
    assert_eq!(dir_names(&dest.join("pg")), before);
}

/// The adversary's `pg-dump`: a wrapper that passes on only the first 200 kB of
/// pg_dump's output and exits 0. The output starts with `PGDMP` and holds the whole
/// table of contents, but the dump is cut short: the backup fails and publishes
/// nothing, so the complete backup before it survives rotation with `last = 1`. And an
/// archive an older dbkeeper published from such output is a verification failure
/// (exit 3, manifest marked failed, never counted as good) — with `--restore-test`
/// too, where pg_restore would otherwise fail on it as if the server were at fault.
#[test]
fn a_dump_cut_short_is_never_published_and_an_archived_one_fails_verification() {
    use dbkeeper::repo::archive::{self, Header, Key, KeyRing, Settings};
    use dbkeeper::repo::catalog::{Manifest, VerifyResult};
    use dbkeeper::repo::storage::Destination;
    use std::sync::atomic::AtomicBool;

    const CUT: usize = 200_000;
    let src = PgDb::new("cutdump");
    src.sql(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 20000) i;
         CREATE TABLE z (x int); INSERT INTO z VALUES (1);",
    );
    let w = Workdir::new();
    let key = w.key("k");
    let dest = w.path().join("backups");
    let config = |extra: &str| {
        format!(
            "[[database]]\nname = \"pg\"\nurl = \"{}\"\n{}",
            src.url,
            backup_table(
                &dest,
                Some(&key),
                &format!("keep = {{ last = 1 }}\n{extra}")
            )
        )
    };
    w.write_config("", &config(""));
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    let before = dir_names(&dest.join("pg"));
    let genuine = archives(&dest, "pg")[0].clone();

    let cut = common::write_script(
        w.path(),
        "pg_dump_cut.sh",
        &format!("#!/bin/sh\npg_dump \"$@\" | head -c {CUT}\nexit 0\n"),
    );
    std::thread::sleep(Duration::from_millis(1100));
    w.write_config("", &config(&format!("pg-dump = \"{}\"", cut.display())));
    w.cmd(&["run-job", "pg.backup"]).assert().code(1).stderr(
        predicate::str::contains(format!("ends after {CUT} bytes, inside the data of entry"))
            .and(predicate::str::contains("the dump is incomplete"))
            .and(predicate::str::contains("nothing was published")),
    );
    assert_eq!(
        dir_names(&dest.join("pg")),
        before,
        "a cut dump was published, or the complete backup rotated away"
    );

    // What an older dbkeeper published from the same wrapper: the genuine backup's
    // image cut at 200 kB, archived with the same key, a second later.
    let the_key = Key::load(&key).expect("key");
    let keys = KeyRing::new(vec![the_key.clone()]);
    let (image, header, _) = archive::read_archive(
        std::fs::File::open(&genuine).expect("open"),
        &keys,
        Vec::new(),
        &AtomicBool::new(false),
    )
    .expect("the genuine backup reads");
    assert!(
        image.len() > 2 * CUT,
        "the dump must be longer than the cut"
    );
    let id_of = |p: &Path| {
        p.file_name()
            .expect("name")
            .to_string_lossy()
            .trim_end_matches(".dbk")
            .to_owned()
    };
    let genuine_id = id_of(&genuine);
    let created = header.created + chrono::Duration::seconds(1);
    let id = format!("{}-manual", created.format("%Y%m%dT%H%M%SZ"));
    let folder = Destination::new(&dest, "pg");
    let settings = Settings {
        header: Header {
            created,
            encryption: None,
            globals: None,
            sealed: None,
            ..header.clone()
        },
        key: Some(&the_key),
        compression: header.compression,
        level: 3,
        threads: 1,
        check_with: None,
        globals: None,
    };
    let out = std::fs::File::create(folder.path(&format!("{id}.dbk"))).expect("create");
    let (_, stats) = archive::write_archive(&image[..CUT], out, settings, &AtomicBool::new(false))
        .expect("an archive of the cut dump");
    let mut manifest: Manifest = serde_json::from_slice(
        &std::fs::read(dest.join("pg").join(format!("{genuine_id}.manifest.json")))
            .expect("manifest"),
    )
    .expect("parse");
    manifest.id = id.clone();
    manifest.started_at = created;
    manifest.finished_at = created;
    manifest.raw_bytes = stats.raw_bytes;
    manifest.stored_bytes = stats.stored_bytes;
    manifest.sha256 = stats.sha256;
    manifest.save(&folder).expect("save");
    let listed = w.stdout(&["backup", "list", "pg"]);
    assert!(
        listed.contains(&id) && !listed.contains("UNTRUSTED") && !listed.contains("FAILED"),
        "{listed}"
    );

    for restore_test in [true, false] {
        let mut args = vec!["backup", "verify", "pg", "--backup", &id];
        if restore_test {
            args.push("--restore-test");
        }
        w.cmd(&args).assert().code(3).stderr(
            predicate::str::contains("the dump is incomplete")
                .and(predicate::str::contains("pg_restore").not()),
        );
        let saved: Manifest = serde_json::from_slice(
            &std::fs::read(dest.join("pg").join(format!("{id}.manifest.json"))).expect("manifest"),
        )
        .expect("parse");
        assert_eq!(saved.verification.result, VerifyResult::Failed);
    }
    let target = PgDb::unused("cutdump_dst");
    w.cmd(&[
        "restore",
        "pg",
        "--backup",
        &id,
        "--to",
        &target.url,
        "--create",
    ])
    .assert()
    .code(3)
    .stderr(predicate::str::contains("the dump is incomplete"));
    assert!(!target.exists());
    // Failed, it is no rotation slot: the complete backup stays, and is `latest`.
    w.cmd(&["backup", "prune", "pg"]).assert().success();
    assert!(genuine.exists(), "rotation deleted the complete backup");
    w.cmd(&["restore", "pg", "--to", &target.url, "--create"])
        .assert()
        .success()
        .stdout(predicate::str::contains(&genuine_id));
    assert_eq!(
        psql(&target.url, "SELECT count(*) FROM t"),
        "20000",
        "restored from the complete backup"
    );
}

//! Restores that cannot half-destroy their target, with the real binary, real SQLite
//! files and real PostgreSQL: a PostgreSQL restore either replaces the target whole or
//! leaves it exactly as it was; a SQLite restore keeps what the target's WAL held when
//! it cannot replace the file, keeps its owner, mode and journal mode when it can, and
//! refuses a database another process is reading; a restore test that cannot start, or whose pg_restore fails, does not condemn the backup; the
//! scratch databases a crash leaves are dropped once their owner is gone, and nothing
//! else is; URL secrets stay out of argv and logs; database names with spaces mean the
//! same thing everywhere.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{pg_server, psql, sqlite, PgDb, Workdir};
use predicates::prelude::*;

fn backup_table(dest: &Path, key: &Path, extra: &str) -> String {
    format!(
        "[database.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nencryption-key-file = \"{}\"\n{extra}\n",
        dest.display(),
        key.display()
    )
}

/// A workdir whose config backs up the PostgreSQL database at `url` as `pg`.
fn pg_workdir(url: &str, extra: &str) -> Workdir {
    let w = Workdir::new();
    w.key("k");
    write_pg_config(&w, url, extra);
    w
}

/// (Re)writes `w`'s config as [`pg_workdir`] does.
fn write_pg_config(w: &Workdir, url: &str, extra: &str) {
    let dest = w.path().join("backups");
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"pg\"\nurl = \"{url}\"\n{}",
            backup_table(&dest, &w.path().join("k"), extra)
        ),
    );
}

/// A fresh source database `tag` filled by `sql`, and a workdir that has backed it up
/// once as `pg`.
fn backed_up(tag: &str, sql: &str) -> (PgDb, Workdir) {
    let src = PgDb::new(tag);
    src.sql(sql);
    let w = pg_workdir(&src.url, "");
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    (src, w)
}

fn server_sql(sql: &str) -> String {
    psql(&format!("{}/postgres", pg_server()), sql)
}

/// Databases left behind by restores (scratch or swapped-out ones) whose name starts
/// with `prefix`.
fn leftovers(prefix: &str) -> String {
    server_sql(&format!(
        "SELECT count(*) FROM pg_database WHERE datname LIKE '{prefix}%\\_dbk\\_%'"
    ))
}

/// A login role for one test, dropped (with what it owns) at the end.
struct Role(String);

impl Role {
    fn new(tag: &str, attrs: &str) -> Self {
        let name = format!("dbk_{tag}_{}", std::process::id());
        server_sql(&format!("DROP ROLE IF EXISTS {name}"));
        server_sql(&format!("CREATE ROLE {name} LOGIN {attrs}"));
        Role(name)
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .arg(format!("{}/postgres", pg_server()))
            .arg("-qAtc")
            .arg(format!("DROP ROLE IF EXISTS {}", self.0))
            .output();
    }
}

#[test]
fn forced_postgres_restore_replaces_a_target_with_a_dependent_view_whole() {
    let src = PgDb::new("dep_src");
    src.sql(
        "CREATE TABLE t (i int PRIMARY KEY, s text);
         INSERT INTO t SELECT i, 'backup' FROM generate_series(1, 20) i;
         CREATE TABLE z (i int);
         INSERT INTO z SELECT generate_series(1, 10);",
    );
    let w = pg_workdir(&src.url, "");
    w.cmd(&["run-job", "pg.backup"]).assert().success();

    // The target has the same tables, 500 rows in z, and a view that depends on t:
    // `pg_restore --clean` would drop z, then fail on t and stop half-way.
    let target = PgDb::new("dep_dst");
    target.sql(
        "CREATE TABLE t (i int PRIMARY KEY, s text);
         INSERT INTO t SELECT i, 'target' FROM generate_series(1, 5) i;
         CREATE TABLE z (i int);
         INSERT INTO z SELECT generate_series(1, 500);
         CREATE VIEW v AS SELECT * FROM t;",
    );
    w.cmd(&["restore", "pg", "--to", &target.url, "--force"])
        .assert()
        .success();
    // Fully restored: exactly the backup's contents, nothing of the old target.
    assert_eq!(target.sql("SELECT count(*) FROM z"), "10");
    assert_eq!(
        target.sql("SELECT count(*), min(s), max(s) FROM t"),
        "20|backup|backup"
    );
    assert_eq!(
        target.sql("SELECT count(*) FROM pg_views WHERE viewname = 'v'"),
        "0"
    );
    assert_eq!(leftovers(&target.name), "0", "scratch or old database left");
}

#[test]
fn failing_postgres_restore_leaves_the_target_as_it_was_and_no_database_behind() {
    // The backup needs a role the target server does not have any more.
    let owner = Role::new("gone_owner", "");
    let src = PgDb::new("role_src");
    src.sql(&format!(
        "CREATE TABLE z (i int); INSERT INTO z SELECT generate_series(1, 10);
         ALTER TABLE z OWNER TO {}",
        owner.0
    ));
    let w = pg_workdir(&src.url, "");
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    src.sql(&format!("DROP OWNED BY {}", owner.0));
    drop(owner);

    let target = PgDb::new("role_dst");
    target.sql("CREATE TABLE z (i int); INSERT INTO z SELECT generate_series(1, 500)");
    w.cmd(&["restore", "pg", "--to", &target.url, "--force"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("pg_restore"));
    assert_eq!(
        target.sql("SELECT count(*) FROM z"),
        "500",
        "target damaged"
    );
    assert_eq!(leftovers(&target.name), "0", "scratch database left");

    // Onto a new database: a failed restore leaves no half database.
    let fresh = PgDb::unused("role_new");
    w.cmd(&["restore", "pg", "--to", &fresh.url, "--create"])
        .assert()
        .code(1);
    assert!(!fresh.exists(), "a half-restored database was left");
    assert_eq!(leftovers(&fresh.name), "0", "scratch database left");
}

#[test]
fn restore_test_without_createdb_is_a_job_error_and_keeps_the_backup_good() {
    let role = Role::new("nocreatedb", "NOCREATEDB");
    let src = PgDb::new("nocdb");
    server_sql(&format!("ALTER DATABASE {} OWNER TO {}", src.name, role.0));
    src.sql(&format!(
        "SET ROLE {}; CREATE TABLE t AS SELECT generate_series(1, 100) i",
        role.0
    ));
    let url = format!(
        "{}/{}",
        pg_server().replace("://postgres@", &format!("://{}@", role.0)),
        src.name
    );
    let w = pg_workdir(&url, "verify = \"read\"");
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    w.cmd(&["backup", "verify", "pg", "--restore-test"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("CREATEDB"));
    assert_single_backup_passed(&w);
    // The scheduled job with verify = "restore" fails, but does not mark its backup failed.
    let w2 = pg_workdir(&url, "verify = \"restore\"");
    w2.cmd(&["run-job", "pg.backup"]).assert().code(1);
    let manifest = manifests(&w2.path().join("backups/pg"));
    assert_eq!(manifest.len(), 1);
    assert_ne!(manifest[0]["verification"]["result"], "failed");
    drop(src);
}

/// The workdir's one PostgreSQL backup still has the verdict "passed".
fn assert_single_backup_passed(w: &Workdir) {
    let manifest = manifests(&w.path().join("backups/pg"));
    assert_eq!(manifest.len(), 1);
    assert_eq!(
        manifest[0]["verification"]["result"], "passed",
        "{:#}",
        manifest[0]
    );
}

fn manifests(dir: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("backup dir").flatten() {
        if e.file_name().to_string_lossy().ends_with(".manifest.json") {
            let text = std::fs::read_to_string(e.path()).expect("manifest");
            out.push(serde_json::from_str(&text).expect("json"));
        }
    }
    out
}

#[test]
fn ssl_password_never_reaches_argv_or_logs() {
    let src = PgDb::new("sslpw");
    src.sql("CREATE TABLE t AS SELECT generate_series(1, 10) i");
    let secret = "s3cr3t-ssl-pass";
    let w = Workdir::new();
    let record = w.path().join("record");
    // Stands in for pg_dump/pg_restore: records what it was given, then runs the real one.
    let wrap = |tool: &str| {
        common::write_script(
            w.path(),
            &format!("{tool}.sh"),
            &format!(
                "#!/bin/sh\n{{ echo \"argv: $*\"; env | grep -v '^PGSERVICEFILE'; \
                 echo \"service: $(tr '\\n' ' ' < \"$PGSERVICEFILE\")\"; stat -c 'mode: %a' \"$PGSERVICEFILE\"; \
                 echo \"file: $PGSERVICEFILE\"; }} >> {}\nexec {tool} \"$@\"\n",
                record.display()
            ),
        )
    };
    let (dump, restore) = (wrap("pg_dump"), wrap("pg_restore"));
    let key = w.key("k");
    let dest = w.path().join("backups");
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"pg\"\nurl = \"{}?sslpassword={secret}\"\n{}",
            src.url,
            backup_table(
                &dest,
                &key,
                &format!(
                    "verify = \"restore\"\npg-dump = \"{}\"\npg-restore = \"{}\"",
                    dump.display(),
                    restore.display()
                )
            )
        ),
    );
    let out = w.cmd(&["run-job", "pg.backup"]).assert().success();
    let logs = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(!logs.contains(secret), "secret in the log: {logs}");
    let target = PgDb::unused("sslpw_dst");
    let restored_url = format!("{}?sslpassword={secret}", target.url);
    let out = w
        .cmd(&["restore", "pg", "--to", &restored_url, "--create"])
        .assert()
        .success();
    let logs = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(!logs.contains(secret), "secret in the log: {logs}");
    assert_eq!(target.sql("SELECT count(*) FROM t"), "10");

    let seen = std::fs::read_to_string(&record).expect("the tools ran");
    let argv: Vec<&str> = seen.lines().filter(|l| l.starts_with("argv:")).collect();
    assert!(argv.len() >= 3, "pg_dump, restore test, restore: {seen}");
    for line in seen.lines().filter(|l| !l.starts_with("service:")) {
        assert!(
            !line.contains(secret),
            "secret outside the service file: {line}"
        );
    }
    let services: Vec<&str> = seen.lines().filter(|l| l.starts_with("service:")).collect();
    assert_eq!(services.len(), argv.len());
    assert!(services
        .iter()
        .all(|l| l.contains(&format!("sslpassword={secret}"))));
    assert!(seen
        .lines()
        .filter(|l| l.starts_with("mode:"))
        .all(|l| l == "mode: 600"));
    for file in seen.lines().filter_map(|l| l.strip_prefix("file: ")) {
        assert!(!Path::new(file).exists(), "{file} was left behind");
    }
}

#[test]
fn database_names_with_spaces_mean_one_database() {
    let (_src, w) = backed_up(
        "space_src",
        "CREATE TABLE t AS SELECT generate_series(1, 7) i",
    );
    let name = format!("dbk_adv sp_{}", std::process::id());
    let drop_it = || {
        let _ = Command::new("psql")
            .arg(format!("{}/postgres", pg_server()))
            .arg("-qAtc")
            .arg(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .output();
    };
    drop_it();
    let url = format!("{}/{}", pg_server(), name.replace(' ', "%20"));
    let result = w.cmd(&["restore", "pg", "--to", &url, "--create"]).assert();
    let rows = psql(&url, "SELECT count(*) FROM t");
    let plus = server_sql(&format!(
        "SELECT count(*) FROM pg_database WHERE datname = '{}'",
        name.replace(' ', "+")
    ));
    drop_it();
    result.success();
    assert_eq!(rows, "7");
    assert_eq!(plus, "0");
}

// ---------- SQLite ----------

/// A workdir backing up the SQLite file `src.db` (rollback journal, 3 rows) as `app`.
fn sqlite_workdir() -> Workdir {
    let w = Workdir::new();
    let key = w.key("k");
    let dest = w.path().join("backups");
    let src = w.path().join("src.db");
    sqlite(
        &src,
        "CREATE TABLE t (i INTEGER PRIMARY KEY, s TEXT); INSERT INTO t (s) VALUES ('a'), ('b'), ('c');",
    );
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"app\"\nurl = \"sqlite://{}\"\n{}",
            src.display(),
            backup_table(&dest, &key, "")
        ),
    );
    w.cmd(&["run-job", "app.backup"]).assert().success();
    w
}

/// A WAL-mode database at `path` whose last transaction is committed but still only in
/// its `-wal` file (the writer died before any checkpoint, as a crashed app does).
fn wal_target(path: &Path) {
    sqlite(
        path,
        "PRAGMA journal_mode=WAL; CREATE TABLE t (i INTEGER PRIMARY KEY, s TEXT); INSERT INTO t (s) VALUES ('old');",
    );
    let status = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3, os\nc = sqlite3.connect({path:?})\nc.execute(\"PRAGMA wal_autocheckpoint=0\")\n\
             c.execute(\"INSERT INTO t (s) VALUES ('only-in-wal')\")\nc.commit()\nos._exit(0)\n",
            path = path.display().to_string()
        ))
        .status()
        .expect("python3");
    assert!(status.success());
    let wal = with_suffix(path, "-wal");
    assert!(
        std::fs::metadata(&wal)
            .map(|m| m.len() > 0)
            .unwrap_or(false),
        "the committed row should be in {}",
        wal.display()
    );
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[test]
fn sqlite_target_that_cannot_be_replaced_keeps_its_wal() {
    let w = sqlite_workdir();
    let target = w.path().join("live.db");
    wal_target(&target);
    // A bind-mounted file (as in containers): renaming onto it fails with EBUSY.
    let script =
        "mount --bind \"$1\" \"$1\" && exec \"$2\" restore app --to \"$1\" --force -c \"$3\"";
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", script, "sh"])
        .arg(&target)
        .arg(common::BIN)
        .arg(w.config_path())
        .output()
        .expect("unshare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("mount point"), "{stderr}");
    assert_eq!(
        sqlite(&target, "SELECT group_concat(s) FROM t").trim(),
        "old,only-in-wal",
        "committed data lost"
    );
    let left: Vec<String> = std::fs::read_dir(w.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("dbkeeper-restore"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn forced_sqlite_restore_keeps_owner_mode_and_journal_mode() {
    use std::os::unix::fs::PermissionsExt;
    let w = sqlite_workdir();
    let target = w.path().join("live.db");
    wal_target(&target);
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    std::os::unix::fs::chown(&target, Some(4321), Some(4322)).expect("chown (tests run as root)");
    w.cmd(&[
        "restore",
        "app",
        "--to",
        target.to_str().expect("utf-8"),
        "--force",
    ])
    .assert()
    .success();
    let meta = std::fs::metadata(&target).expect("target");
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!((meta.uid(), meta.gid()), (4321, 4322));
    assert_eq!(sqlite(&target, "PRAGMA journal_mode").trim(), "wal");
    assert_eq!(
        sqlite(&target, "SELECT group_concat(s) FROM t").trim(),
        "a,b,c"
    );

    // A new target is private to its owner, whatever the umask.
    let fresh = w.path().join("fresh.db");
    w.cmd(&["restore", "app", "--to", fresh.to_str().expect("utf-8")])
        .assert()
        .success();
    assert_eq!(
        std::fs::metadata(&fresh).expect("fresh").mode() & 0o777,
        0o600
    );
}

/// A database created on the test server under an exact name, dropped at the end.
fn named_database(name: &str) -> PgDb {
    server_sql(&format!("CREATE DATABASE \"{name}\""));
    PgDb {
        name: name.to_owned(),
        url: format!("{}/{name}", pg_server()),
    }
}

/// What a crashed dbkeeper leaves: a database of that name carrying its mark.
fn leftover_database(name: &str) -> PgDb {
    let db = named_database(name);
    common::mark_scratch(name);
    db
}

/// The library's handle on the test server's `postgres` database, to hold a scratch
/// claim the way a live restore does.
fn server_handle() -> dbkeeper::db::Postgres {
    let cfg = dbkeeper::repo::restore::target_config(&format!("{}/postgres", pg_server()));
    match dbkeeper::db::Database::open(&cfg).expect("open") {
        dbkeeper::db::Database::Postgres(pg) => pg,
        dbkeeper::db::Database::Sqlite(_) => unreachable!("a postgres:// URL"),
    }
}

#[test]
fn crash_leftover_scratch_databases_are_dropped_unless_their_owner_lives() {
    let tag = format!("lo{}", std::process::id());
    let hex = |n: u32| {
        format!(
            "{:08x}",
            std::process::id().wrapping_mul(2654435761).wrapping_add(n)
        )
    };
    let (_src, w) = backed_up(
        &format!("{tag}_src"),
        "CREATE TABLE t AS SELECT generate_series(1, 10) i",
    );

    // What a kill -9 leaves: a scratch restore database, a swapped-out old one, a
    // restore test's database; none has a live owner.
    let orphans = [
        leftover_database(&format!("{tag}_dbk_restore_{}", hex(1))),
        leftover_database(&format!("{tag}_dbk_old_{}", hex(2))),
        leftover_database(&format!("{tag}_dbk_verify_{}", hex(3))),
    ];
    // One whose owner is alive (it holds the claim), and names that only look alike.
    let owned_name = format!("{tag}_dbk_restore_{}", hex(4));
    let rt = common::runtime();
    // The pool sqlx builds beside the handle needs a runtime around it.
    let _in_runtime = rt.enter();
    let owner = server_handle();
    let claim = rt
        .block_on(owner.claim_scratch(&owned_name))
        .expect("claim");
    let owned = leftover_database(&owned_name);
    let lookalikes = [
        // Adversary round 2 (issue 15), case 01: a database with a scratch name that
        // dbkeeper did not make (a configured one, a person's) is never dropped.
        named_database(&format!("{tag}_dbk_verify_{}", hex(8))),
        named_database(&format!("{tag}_dbk_old_{}", hex(9))),
        named_database(&format!("{tag}_dbk_restore_ZZZZ")),
        named_database(&format!("{tag}_dbk_restore_abc")),
        named_database(&format!("{tag}_dbk_restore_ABCDEF12")),
        named_database(&format!("{tag}_dbk_restore_{}0", hex(6))),
    ];

    // A restore first clears its server of orphans, then restores as usual.
    let target = PgDb::new(&format!("{tag}_dst"));
    w.cmd(&["restore", "pg", "--to", &target.url])
        .assert()
        .success();
    assert_eq!(target.sql("SELECT count(*) FROM t"), "10");
    for db in &orphans {
        assert!(!db.exists(), "{} survived the restore", db.name);
    }
    assert!(owned.exists(), "a database with a live owner was dropped");
    for db in &lookalikes {
        assert!(db.exists(), "{} is not a scratch database", db.name);
    }

    // The daemon does the same at start-up, and says what it dropped.
    let orphan = leftover_database(&format!("{tag}_dbk_verify_{}", hex(7)));
    let d = w.start();
    d.wait_for(
        "the orphan is dropped",
        std::time::Duration::from_secs(20),
        || !orphan.exists(),
    );
    // Daemons of tests running in parallel clean the same server, so another one may
    // have dropped it first; when this one did, its log names it.
    let logged = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        d.log_text().contains(&orphan.name)
    });
    if !logged {
        eprintln!("the orphan was dropped by another test's daemon");
    }
    drop(d);
    assert!(owned.exists(), "a database with a live owner was dropped");
    for db in &lookalikes {
        assert!(db.exists(), "{} is not a scratch database", db.name);
    }

    // Once its owner is gone, the next clean-up takes it.
    drop(claim);
    drop(owner);
    std::thread::sleep(std::time::Duration::from_millis(200));
    w.cmd(&["restore", "pg", "--to", &target.url, "--force"])
        .assert()
        .success();
    assert!(!owned.exists(), "an orphan was left");
}

#[test]
fn restore_test_that_pg_restore_fails_is_a_job_error_and_keeps_the_verdict() {
    // The dump has a policy for a role the server no longer has (`--no-owner` and
    // `--no-privileges` do not skip policies), so pg_restore fails on a good archive.
    let role = Role::new("policy_role", "");
    let src = PgDb::new("rt_policy");
    src.sql(&format!(
        "CREATE TABLE t AS SELECT generate_series(1, 10) i;
         ALTER TABLE t ENABLE ROW LEVEL SECURITY;
         CREATE POLICY p ON t TO {} USING (true)",
        role.0
    ));
    let w = pg_workdir(&src.url, "verify = \"read\"");
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    src.sql("DROP POLICY p ON t");
    let name = role.0.clone();
    drop(role);
    assert_eq!(
        server_sql(&format!(
            "SELECT count(*) FROM pg_roles WHERE rolname = '{name}'"
        )),
        "0"
    );
    w.cmd(&["backup", "verify", "pg", "--restore-test"])
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("pg_restore")
                .and(predicate::str::contains(&name))
                .and(predicate::str::contains("the backup was not judged")),
        );
    assert_single_backup_passed(&w);
    // A plain read still passes: the archive is fine.
    w.cmd(&["backup", "verify", "pg"]).assert().success();
}

// ---------- Without --force, nothing in the target is ever lost ----------

#[test]
fn restore_without_force_refuses_a_target_holding_only_large_objects_functions_or_types() {
    let (_src, w) = backed_up("lo_src", "CREATE TABLE t (i int); INSERT INTO t VALUES (1)");

    let target = PgDb::new("lo_dst");
    target.sql(
        "SELECT lo_from_bytea(0, 'precious large object data');
         CREATE FUNCTION keepme() RETURNS int LANGUAGE sql AS 'SELECT 7';
         CREATE TYPE mood AS ENUM ('ok', 'not ok');",
    );
    w.cmd(&["restore", "pg", "--to", &target.url])
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("1 large object")
                .and(predicate::str::contains("1 function"))
                .and(predicate::str::contains("1 type"))
                .and(predicate::str::contains("--force")),
        );
    assert_eq!(
        target.sql("SELECT count(*) FROM pg_largeobject_metadata"),
        "1"
    );
    assert_eq!(target.sql("SELECT keepme()"), "7");
    assert_eq!(target.sql("SELECT to_regclass('t') IS NULL"), "t");
    assert_eq!(leftovers(&target.name), "0", "scratch database left");

    // A large object whose OID the client chose, below initdb's range, counts too.
    let low = PgDb::new("lo_low");
    low.sql("SELECT lo_from_bytea(1234, 'precious')");
    w.cmd(&["restore", "pg", "--to", &low.url])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("1 large object"));
    assert_eq!(low.sql("SELECT count(*) FROM pg_largeobject_metadata"), "1");

    // An empty database (a fresh CREATE DATABASE) is still replaced without --force.
    let empty = PgDb::new("lo_empty");
    w.cmd(&["restore", "pg", "--to", &empty.url])
        .assert()
        .success();
    assert_eq!(empty.sql("SELECT count(*) FROM t"), "1");
    assert_eq!(leftovers(&empty.name), "0", "old database left");
}

/// A `pg_restore` that first runs `sql` with psql on `url` (as another client of the
/// target would, while the restore runs), then does its job.
fn meddling_pg_restore(w: &Workdir, url: &str, sql: &str) -> PathBuf {
    common::write_script(
        w.path(),
        "meddling_pg_restore",
        &format!("#!/bin/sh\npsql -qAt '{url}' -c \"{sql}\" >/dev/null || exit 99\nexec pg_restore \"$@\"\n"),
    )
}

#[test]
fn restore_without_force_keeps_what_was_written_to_the_target_during_the_restore() {
    let src = PgDb::new("race_src");
    src.sql("CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 10)");
    let target = PgDb::new("race_dst");
    let w = pg_workdir(&src.url, "");
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    // The target is empty when the restore starts; an application writes into it
    // while pg_restore runs.
    let script = meddling_pg_restore(
        &w,
        &target.url,
        "CREATE TABLE IF NOT EXISTS precious (x text); INSERT INTO precious VALUES ('APPDATA')",
    );
    write_pg_config(
        &w,
        &src.url,
        &format!("pg-restore = \"{}\"", script.display()),
    );
    w.cmd(&["restore", "pg", "--to", &target.url])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "the target changed during the restore; nothing was replaced",
        ));
    assert!(
        target
            .sql("SELECT string_agg(x, ',') FROM precious")
            .starts_with("APPDATA"),
        "data written during the restore was lost"
    );
    assert_eq!(target.sql("SELECT to_regclass('t') IS NULL"), "t");
    assert_eq!(leftovers(&target.name), "0", "scratch or old database left");
}

#[test]
fn restore_with_create_refuses_a_database_created_under_that_name_during_the_restore() {
    let (src, w) = backed_up(
        "crt_src",
        "CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 10)",
    );
    let fresh = PgDb::unused("crt_new");
    // While pg_restore runs, someone creates the database and writes into it.
    let create = common::write_script(
        w.path(),
        "creating_pg_restore",
        &format!(
            "#!/bin/sh\nif [ \"$(psql -qAt '{server}/postgres' -c \"SELECT count(*) FROM pg_database WHERE datname = '{name}'\")\" = 0 ]; then\n  psql -q '{server}/postgres' -c 'CREATE DATABASE {name}' || exit 99\n  psql -q '{url}' -c \"CREATE TABLE precious (x text); INSERT INTO precious VALUES ('APPDATA')\" || exit 99\nfi\nexec pg_restore \"$@\"\n",
            server = pg_server(),
            name = fresh.name,
            url = fresh.url
        ),
    );
    write_pg_config(
        &w,
        &src.url,
        &format!("pg-restore = \"{}\"", create.display()),
    );
    w.cmd(&["restore", "pg", "--to", &fresh.url, "--create"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("was created while restoring"));
    assert_eq!(fresh.sql("SELECT x FROM precious"), "APPDATA");
    assert_eq!(leftovers(&fresh.name), "0", "scratch or old database left");
}

/// A workdir with one backup of `big` (20 MB of SQLite): big enough that decoding
/// and checking it take a while.
fn big_sqlite_backup() -> Workdir {
    let w = Workdir::new();
    let key = w.key("k");
    let src = w.path().join("big.db");
    sqlite(
        &src,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);
         WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 200000)
         INSERT INTO t (v) SELECT hex(randomblob(100)) FROM c;",
    );
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"big\"\nurl = \"sqlite://{}\"\n{}",
            src.display(),
            backup_table(&w.path().join("backups"), &key, "")
        ),
    );
    w.cmd(&["run-job", "big.backup"]).assert().success();
    w
}

#[test]
fn sqlite_restore_without_force_never_replaces_a_file_created_during_the_restore() {
    let w = big_sqlite_backup();
    let target = w.path().join("new.db");
    let mut raced = false;
    for _ in 0..5 {
        let _ = std::fs::remove_file(&target);
        let mut child = Command::new(common::BIN)
            .args(["restore", "big", "--to"])
            .arg(&target)
            .arg("-c")
            .arg(w.config_path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("restore");
        // As soon as the restore is decoding, an application creates the target.
        let start = std::time::Instant::now();
        while !has_restore_temp(w.path()) && start.elapsed().as_secs() < 20 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        sqlite(
            &target,
            "CREATE TABLE precious (x); INSERT INTO precious VALUES ('APPDATA')",
        );
        let running = child.try_wait().expect("try_wait").is_none();
        let out = child.wait_with_output().expect("wait");
        if !running {
            continue; // finished before the file appeared: try again
        }
        raced = true;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("appeared while restoring"), "{stderr}");
        assert_eq!(
            sqlite(&target, "SELECT x FROM precious").trim(),
            "APPDATA",
            "the file created during the restore was replaced"
        );
        assert!(!has_restore_temp(w.path()), "restore temp file left");
        break;
    }
    assert!(
        raced,
        "the restore always finished before the file appeared"
    );
}

fn has_restore_temp(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains("dbkeeper-restore"))
}

#[test]
fn sqlite_restore_refuses_fifos_devices_sockets_and_links_without_opening_them() {
    let w = sqlite_workdir();
    let fifo = w.path().join("target.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo")
        .success());
    let socket = w.path().join("target.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("socket");
    let real = w.path().join("real.db");
    sqlite(&real, "CREATE TABLE keep (x); INSERT INTO keep VALUES (1)");
    let link = w.path().join("link.db");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let device = w.path().join("null.dev");
    // Tests run as root here; elsewhere there is no device to try.
    let have_device = Command::new("mknod")
        .arg(&device)
        .args(["c", "1", "3"])
        .status()
        .is_ok_and(|s| s.success());

    let mut cases = vec![
        (fifo.clone(), "a FIFO".to_owned()),
        (socket.clone(), "a socket".to_owned()),
        (
            link.clone(),
            format!(
                "is a symbolic link; restore to the file it points to, {}",
                real.display()
            ),
        ),
        (w.path().join("a-directory"), "is a directory".to_owned()),
    ];
    std::fs::create_dir(w.path().join("a-directory")).expect("mkdir");
    if have_device {
        cases.push((device.clone(), "a device".to_owned()));
    }
    for (target, says) in &cases {
        for force in [false, true] {
            let mut cmd = Command::new(common::BIN);
            cmd.args(["restore", "app", "--to"])
                .arg(target)
                .arg("-c")
                .arg(w.config_path());
            if force {
                cmd.arg("--force");
            }
            let out = output_within(cmd, std::time::Duration::from_secs(20));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{}: {stderr}", target.display());
            assert!(
                stderr.contains(says.as_str()),
                "{}: {stderr}",
                target.display()
            );
        }
    }
    use std::os::unix::fs::FileTypeExt;
    let kind = |p: &Path| {
        std::fs::symlink_metadata(p)
            .expect("still there")
            .file_type()
    };
    assert!(kind(&fifo).is_fifo());
    assert!(kind(&socket).is_socket());
    assert!(kind(&link).is_symlink());
    if have_device {
        assert!(kind(&device).is_char_device(), "device node replaced");
    }
    assert_eq!(sqlite(&real, "SELECT x FROM keep").trim(), "1");
    assert!(!has_restore_temp(w.path()), "restore temp file left");
}

/// Runs `cmd`, killing it (and failing the test) if it has not finished in `limit`.
fn output_within(mut cmd: Command, limit: std::time::Duration) -> std::process::Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = std::time::Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn restore_test_whose_pg_restore_is_killed_keeps_the_backup_good() {
    // The OOM killer (or an admin) ends pg_restore: nothing to do with the archive.
    let src = PgDb::new("rt_killed");
    src.sql("CREATE TABLE t AS SELECT generate_series(1, 100) i");
    let w = pg_workdir(&src.url, "verify = \"read\"\nkeep = { last = 5 }");
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    let killed = common::write_script(w.path(), "killed_pg_restore", "#!/bin/sh\nkill -9 $$\n");
    write_pg_config(
        &w,
        &src.url,
        &format!(
            "verify = \"read\"\nkeep = {{ last = 5 }}\npg-restore = \"{}\"",
            killed.display()
        ),
    );
    w.cmd(&["backup", "verify", "pg", "--restore-test"])
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("signal: 9")
                .and(predicate::str::contains("the backup was not judged")),
        );
    let manifest = manifests(&w.path().join("backups/pg"));
    assert_eq!(manifest.len(), 1);
    assert_eq!(
        manifest[0]["verification"]["result"], "passed",
        "{:#}",
        manifest[0]
    );
}

#[test]
fn a_target_named_like_a_scratch_database_is_refused() {
    // The crash clean-up drops `…_dbk_old_<8 hex>` databases whose restore is gone; a
    // user's database restored under such a name would be dropped by the next restore.
    let (_src, w) = backed_up(
        "scratchname_src",
        "CREATE TABLE t (i int); INSERT INTO t VALUES (1)",
    );
    let name = format!("dbk_sn{}_dbk_old_0000beef", std::process::id());
    let url = format!("{}/{name}", pg_server());
    w.cmd(&["restore", "pg", "--to", &url, "--create"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("scratch database"));
    assert_eq!(
        server_sql(&format!(
            "SELECT count(*) FROM pg_database WHERE datname = '{name}'"
        )),
        "0"
    );
}

#[test]
fn a_killed_sqlite_restore_leaves_no_plaintext_after_the_next_restore() {
    // Adversary round 2, case 06: after kill -9, the decoded copy stayed beside the
    // target for ever.
    let w = big_sqlite_backup();
    let target = w.path().join("live.db");
    wal_target(&target);
    let mut killed = false;
    for _ in 0..5 {
        let mut child = Command::new(common::BIN)
            .args(["restore", "big", "--force", "--to"])
            .arg(&target)
            .arg("-c")
            .arg(w.config_path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("restore");
        let start = std::time::Instant::now();
        while !has_restore_temp(w.path()) && start.elapsed().as_secs() < 20 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        child.kill().expect("kill -9");
        child.wait().expect("wait");
        if has_restore_temp(w.path()) {
            killed = true;
            break;
        }
    }
    assert!(killed, "the restore always finished before it was killed");
    assert_eq!(
        sqlite(&target, "SELECT group_concat(s) FROM t").trim(),
        "old,only-in-wal",
        "a killed restore changed the target"
    );
    // The next restore into that folder (of another file) removes the leftover.
    let other = w.path().join("other.db");
    w.cmd(&["restore", "big", "--to", other.to_str().expect("utf-8")])
        .assert()
        .success()
        .stderr(predicate::str::contains("interrupted restore"));
    assert!(!has_restore_temp(w.path()), "plaintext leftover survived");
    assert_eq!(
        sqlite(&target, "SELECT group_concat(s) FROM t").trim(),
        "old,only-in-wal"
    );
}

// ---------- pg_restore's exit 0 is not proof: the restored database is checked ----------

/// A target holding the application's data: 1000 rows in `precious`.
fn precious_target(tag: &str) -> PgDb {
    let target = PgDb::new(tag);
    target
        .sql("CREATE TABLE precious (x int); INSERT INTO precious SELECT generate_series(1, 1000)");
    target
}

/// The restore failed before the swap: the target is as it was, nothing left behind.
fn assert_target_kept(target: &PgDb) {
    assert_eq!(
        target.sql("SELECT count(*) FROM precious"),
        "1000",
        "the target was replaced"
    );
    assert_eq!(leftovers(&target.name), "0", "scratch or old database left");
}

/// A `pg-restore` that reads its input and exits 0 having restored nothing.
fn noop_pg_restore(w: &Workdir) -> PathBuf {
    common::write_script(
        w.path(),
        "noop_pg_restore",
        "#!/bin/sh\ncat >/dev/null\nexit 0\n",
    )
}

#[test]
fn a_pg_restore_that_exits_0_having_restored_nothing_never_replaces_the_target() {
    let (src, w) = backed_up(
        "noop_src",
        "CREATE TABLE t (i int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10);
         CREATE TABLE empty_one (x int)",
    );
    let noop = noop_pg_restore(&w);
    write_pg_config(
        &w,
        &src.url,
        &format!("pg-restore = \"{}\"", noop.display()),
    );
    let target = precious_target("noop_dst");
    w.cmd(&["restore", "pg", "--to", &target.url, "--force"])
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("pg_restore reported success")
                .and(predicate::str::contains(
                    "missing table public.empty_one, table public.t",
                ))
                .and(predicate::str::contains("pg-restore program"))
                .and(predicate::str::contains("the target was not touched")),
        );
    assert_target_kept(&target);
}

#[test]
fn a_pg_restore_wrapper_that_hides_a_failure_never_replaces_the_target() {
    // The dump gives table `a` to a role the restoring role cannot give it to, so
    // pg_restore stops in the pre-data section; the logging wrapper's exit status is
    // cat's, 0.
    let owner = Role::new("hidden_owner", "");
    let restorer = Role::new("hidden_restorer", "CREATEDB");
    let src = PgDb::new("hidden_src");
    src.sql(&format!(
        "CREATE TABLE a (x int); INSERT INTO a VALUES (1);
         CREATE TABLE b (y int); INSERT INTO b VALUES (2);
         ALTER TABLE a OWNER TO {}",
        owner.0
    ));
    let w = pg_workdir(&src.url, "");
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    let hiding = common::write_script(
        w.path(),
        "logging_pg_restore",
        "#!/bin/sh\npg_restore \"$@\" 2>&1 | cat >&2\n",
    );
    write_pg_config(
        &w,
        &src.url,
        &format!("pg-restore = \"{}\"", hiding.display()),
    );
    let target = precious_target("hidden_dst");
    server_sql(&format!(
        "ALTER DATABASE {} OWNER TO {}",
        target.name, restorer.0
    ));
    target.sql(&format!("ALTER TABLE precious OWNER TO {}", restorer.0));
    let as_restorer = target
        .url
        .replacen("postgres@", &format!("{}@", restorer.0), 1);
    assert_ne!(as_restorer, target.url);
    w.cmd(&["restore", "pg", "--to", &as_restorer, "--force"])
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("pg_restore reported success")
                .and(predicate::str::contains("public.b")),
        );
    assert_target_kept(&target);
    // The roles go once nothing of theirs is left.
    drop(target);
    drop(src);
    drop(restorer);
    drop(owner);
}

#[test]
fn a_pg_restore_that_skips_the_data_or_the_post_data_never_replaces_the_target() {
    let (src, w) = backed_up(
        "skip_src",
        r#"CREATE TABLE t (i int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10);
           CREATE TABLE "Odd ""Name""" (x int); INSERT INTO "Odd ""Name""" VALUES (1);
           CREATE TABLE empty_one (x int REFERENCES t)"#,
    );
    // Leaves out one section, runs pg_restore with the rest, exits 0.
    let skipping = |section: &str| {
        common::write_script(
            w.path(),
            &format!("skip_{section}"),
            &format!(
                "#!/bin/bash\nargs=()\nfor a in \"$@\"; do [ \"$a\" = --section={section} ] || args+=(\"$a\"); done\n\
                 case \" ${{args[*]}} \" in *' --section='*) pg_restore \"${{args[@]}}\" ;; *) cat >/dev/null ;; esac\nexit 0\n"
            ),
        )
    };
    let target = precious_target("skip_dst");
    for (section, says) in [
        (
            "data",
            "without the rows the dump holds: table public.\"Odd \"\"Name\"\"\", table public.t",
        ),
        (
            "post-data",
            "0 of the dump's 2 key, unique and foreign key constraints",
        ),
    ] {
        let script = skipping(section);
        write_pg_config(
            &w,
            &src.url,
            &format!("pg-restore = \"{}\"", script.display()),
        );
        w.cmd(&["restore", "pg", "--to", &target.url, "--force"])
            .assert()
            .code(1)
            .stderr(predicate::str::contains(says));
        assert_target_kept(&target);
    }
}

#[test]
fn restore_test_whose_pg_restore_exits_0_having_restored_nothing_is_a_job_error() {
    let src = PgDb::new("rt_noop");
    src.sql("CREATE TABLE t AS SELECT generate_series(1, 100) i");
    let w = pg_workdir(&src.url, "verify = \"read\"");
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    let noop = noop_pg_restore(&w);
    write_pg_config(
        &w,
        &src.url,
        &format!("verify = \"read\"\npg-restore = \"{}\"", noop.display()),
    );
    w.cmd(&["backup", "verify", "pg", "--restore-test"])
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("pg_restore reported success")
                .and(predicate::str::contains("missing table public.t"))
                .and(predicate::str::contains("the backup was not judged")),
        );
    assert_single_backup_passed(&w);
    assert_eq!(leftovers(&src.name), "0", "scratch database left");
}

#[test]
fn forced_sqlite_restore_over_a_database_in_use_is_refused() {
    // Settling the target (checkpointing its WAL into it) cannot complete while
    // another process reads it: the restore must stop there, with nothing moved.
    let w = sqlite_workdir();
    let target = w.path().join("live.db");
    wal_target(&target);
    let mut reader = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
             c.execute('BEGIN')\nprint(c.execute('SELECT group_concat(s) FROM t').fetchone()[0], flush=True)\n\
             sys.stdin.read()\n",
        )
        .arg(&target)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(reader.stdout.as_mut().expect("stdout")),
        &mut line,
    )
    .expect("the reader's first row");
    assert_eq!(line.trim(), "old,only-in-wal");
    let restore = || {
        w.cmd(&[
            "restore",
            "app",
            "--to",
            target.to_str().expect("utf-8"),
            "--force",
        ])
        .assert()
    };
    restore().code(1).stderr(
        predicate::str::contains("in use")
            .and(predicate::str::contains("stop the application first")),
    );
    // Looked at while the reader still holds it (its close checkpoints the WAL).
    assert!(with_suffix(&target, "-wal").exists(), "the WAL was moved");
    assert!(!has_restore_temp(w.path()), "restore files left");
    drop(reader.stdin.take());
    reader.wait().expect("reader");
    assert_eq!(
        sqlite(&target, "SELECT group_concat(s) FROM t").trim(),
        "old,only-in-wal",
        "the target changed"
    );
    // With the application gone, the same restore goes through.
    restore().success();
    assert_eq!(
        sqlite(&target, "SELECT group_concat(s) FROM t").trim(),
        "a,b,c"
    );
    assert!(!has_restore_temp(w.path()), "restore files left");
}

#[test]
fn a_sqlite_target_sqlite_cannot_settle_is_refused_with_its_wal_in_place() {
    // Adversary round 4, cases 11 and 12: a healthy database SQLite could not settle
    // (read-only, disk full) had its WAL moved aside anyway, and a kill before the
    // rename lost the committed rows in it. Here the file is mounted read-only.
    let w = sqlite_workdir();
    let target = w.path().join("live.db");
    wal_target(&target);
    let script = "mount --bind \"$1\" \"$1\" && mount -o remount,ro,bind \"$1\" \"$1\" && \
                  exec \"$2\" restore app --to \"$1\" --force -c \"$3\"";
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", script, "sh"])
        .arg(&target)
        .arg(common::BIN)
        .arg(w.config_path())
        .output()
        .expect("unshare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot settle"), "{stderr}");
    assert!(with_suffix(&target, "-wal").exists(), "the WAL was moved");
    assert_eq!(
        sqlite(&target, "SELECT group_concat(s) FROM t").trim(),
        "old,only-in-wal"
    );
}

/// `restore pg --to <url> --create <extra>`, asserted on.
fn restore_new(w: &Workdir, url: &str, extra: &[&str]) -> assert_cmd::assert::Assert {
    let mut args = vec!["restore", "pg", "--to", url, "--create"];
    args.extend_from_slice(extra);
    w.cmd(&args).assert()
}

/// Roles for one test with names unique to it (roles are cluster-wide and tests run
/// in parallel), dropped at the end: declare it before the databases, so that they
/// (whose objects the roles own) are dropped first.
struct Roles(Vec<String>);

impl Roles {
    fn new(tag: &str, names: &[&str]) -> Self {
        let roles = Roles(
            names
                .iter()
                .map(|n| format!("dbk_{tag}_{n}_{}", std::process::id()))
                .collect(),
        );
        roles.drop_all();
        roles
    }

    fn name(&self, i: usize) -> &str {
        &self.0[i]
    }

    fn drop_all(&self) {
        for name in self.0.iter().rev() {
            let _ = Command::new("psql")
                .arg(format!("{}/postgres", pg_server()))
                .arg("-qAtc")
                .arg(format!("DROP ROLE IF EXISTS \"{name}\""))
                .output();
        }
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        self.drop_all();
    }
}

#[test]
fn with_roles_recreates_missing_roles_grants_and_memberships_and_never_alters_existing_ones() {
    let roles = Roles::new(
        "wr",
        &["owner", "tables", "reader", "group", "existing", "egroup"],
    );
    let (owner, tables, reader, group, existing, egroup) = (
        roles.name(0),
        roles.name(1),
        roles.name(2),
        roles.name(3),
        roles.name(4),
        roles.name(5),
    );
    server_sql(&format!(
        "CREATE ROLE \"{owner}\" LOGIN CREATEDB PASSWORD 'owner-secret-pw';
         CREATE ROLE \"{tables}\" NOLOGIN;
         CREATE ROLE \"{group}\" NOLOGIN;
         CREATE ROLE \"{reader}\" LOGIN CONNECTION LIMIT 3;
         ALTER ROLE \"{reader}\" SET work_mem = '3MB';
         GRANT \"{group}\" TO \"{reader}\" WITH ADMIN OPTION;
         CREATE ROLE \"{existing}\" LOGIN CONNECTION LIMIT 7;
         CREATE ROLE \"{egroup}\" NOLOGIN;
         GRANT \"{egroup}\" TO \"{existing}\";"
    ));
    let hash = server_sql(&format!(
        "SELECT rolpassword FROM pg_authid WHERE rolname = '{owner}'"
    ));
    assert!(hash.starts_with("SCRAM-SHA-256$"), "{hash}");
    let src = PgDb::new("wr_src");
    src.sql(&format!(
        "ALTER DATABASE \"{db}\" OWNER TO \"{owner}\";
         CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 10);
         ALTER TABLE t OWNER TO \"{tables}\";
         GRANT SELECT ON t TO \"{reader}\";
         GRANT INSERT ON t TO \"{existing}\";
         GRANT UPDATE ON t TO \"{egroup}\";",
        db = src.name
    ));
    let w = pg_workdir(&src.url, "");
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    // `backup list` and the manifest say the archive carries them.
    let list = w.stdout(&["backup", "list", "pg"]);
    assert!(list.contains("ROLES"), "{list}");
    let line = list.lines().nth(1).expect("a backup line");
    assert!(line.contains("yes(6)"), "{line}");
    let manifest = manifests(&w.path().join("backups").join("pg"))
        .pop()
        .expect("a manifest");
    assert_eq!(manifest["globals"]["roles"], 6, "{manifest}");
    assert_eq!(manifest["globals"]["memberships"], 2, "{manifest}");
    assert_eq!(manifest["globals"]["passwords"], true, "{manifest}");
    assert!(
        !manifest.to_string().contains("SCRAM"),
        "hash in the manifest"
    );

    // The cluster loses the database and its roles; the existing one comes back
    // different, and must stay so.
    server_sql(&format!("DROP DATABASE \"{}\" WITH (FORCE)", src.name));
    server_sql(&format!(
        "DROP ROLE \"{reader}\"; DROP ROLE \"{group}\"; DROP ROLE \"{tables}\";
         DROP ROLE \"{owner}\"; DROP ROLE \"{existing}\";
         CREATE ROLE \"{existing}\" NOLOGIN CONNECTION LIMIT 2;"
    ));

    // Without --with-roles: fails, says what would help, leaves nothing.
    let fresh = PgDb::unused("wr_new");
    restore_new(&w, &fresh.url, &[])
        .code(1)
        .stderr(predicate::str::contains("--with-roles"));
    assert!(!fresh.exists(), "a half-restored database was left");
    assert_eq!(leftovers(&fresh.name), "0", "scratch database left");
    assert_eq!(
        server_sql(&format!(
            "SELECT count(*) FROM pg_roles WHERE rolname IN ('{owner}', '{tables}', '{reader}', '{group}')"
        )),
        "0",
        "a role was created without --with-roles"
    );

    // At debug level too (adversary round 5, case 09: sqlx logs statements there).
    let out = w
        .cmd(&[
            "restore",
            "pg",
            "--to",
            &fresh.url,
            "--create",
            "--with-roles",
        ])
        .env("RUST_LOG", "trace")
        .assert()
        .success()
        .get_output()
        .clone();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stderr.contains("DEBUG"), "debug logging was on: {stderr}");
    assert!(stdout.contains("roles created"), "{stdout}");
    assert!(
        !stdout.contains("SCRAM") && !stderr.contains("SCRAM"),
        "a password hash was printed"
    );
    // Owners, grants and memberships are back.
    assert_eq!(
        fresh.sql("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 't'"),
        *tables
    );
    let acl = fresh.sql("SELECT relacl::text FROM pg_class WHERE relname = 't'");
    assert!(acl.contains(&format!("{reader}=r/")), "{acl}");
    assert!(acl.contains(&format!("{existing}=a/")), "{acl}");
    assert_eq!(
        server_sql(&format!(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{}'",
            fresh.name
        )),
        *owner
    );
    assert_eq!(
        server_sql(&format!(
            "SELECT admin_option FROM pg_auth_members
              WHERE roleid = '\"{group}\"'::regrole AND member = '\"{reader}\"'::regrole"
        )),
        "t"
    );
    // Attributes, settings and the password hash of the created roles.
    assert_eq!(
        server_sql(&format!(
            "SELECT rolcanlogin, rolcreatedb, rolpassword = '{hash}' FROM pg_authid WHERE rolname = '{owner}'"
        )),
        "t|t|t"
    );
    assert_eq!(
        server_sql(&format!(
            "SELECT r.rolconnlimit, s.setconfig::text FROM pg_roles r
               JOIN pg_db_role_setting s ON s.setrole = r.oid AND s.setdatabase = 0
              WHERE r.rolname = '{reader}'"
        )),
        "3|{work_mem=3MB}"
    );
    // A membership between two roles that both existed is not granted: it would
    // change what an existing role may do.
    assert!(
        stdout.contains(&format!(
            "NOT granted: {egroup} → {existing} (both roles existed"
        )),
        "{stdout}"
    );
    assert_eq!(
        server_sql(&format!(
            "SELECT count(*) FROM pg_auth_members
              WHERE roleid = '\"{egroup}\"'::regrole AND member = '\"{existing}\"'::regrole"
        )),
        "0"
    );
    // The role that existed is exactly as it was.
    assert_eq!(
        server_sql(&format!(
            "SELECT rolcanlogin, rolconnlimit FROM pg_roles WHERE rolname = '{existing}'"
        )),
        "f|2"
    );
    assert_eq!(fresh.sql("SELECT count(*) FROM t"), "10");
    assert_eq!(leftovers(&fresh.name), "0", "scratch database left");
    // Dropped before the roles that own it.
    drop(fresh);
}

#[test]
fn archives_without_globals_restore_as_before_and_refuse_with_roles() {
    let roles = Roles::new("ng", &["owner"]);
    let owner = roles.name(0);
    server_sql(&format!("CREATE ROLE \"{owner}\" NOLOGIN"));
    let src = PgDb::new("ng_src");
    src.sql(&format!(
        "CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 4);
         ALTER TABLE t OWNER TO \"{owner}\";"
    ));
    // `globals = false` writes exactly the archives dbkeeper wrote before globals
    // existed: format version 1, no globals member.
    let w = pg_workdir(&src.url, "globals = false");
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    let archive = common::archives(&w.path().join("backups"), "pg")
        .pop()
        .expect("an archive");
    let bytes = std::fs::read(&archive).expect("archive");
    assert_eq!(bytes[8], 1, "format version");
    assert!(!String::from_utf8_lossy(&bytes[..600]).contains("globals"));
    let manifest = manifests(&w.path().join("backups").join("pg"))
        .pop()
        .expect("a manifest");
    assert!(manifest.get("globals").is_none(), "{manifest}");
    let list = w.stdout(&["backup", "list", "pg"]);
    let line = list.lines().nth(1).expect("a backup line");
    assert!(line.split_whitespace().any(|c| c == "no"), "{line}");
    w.cmd(&["backup", "verify", "pg"]).assert().success();

    let fresh = PgDb::unused("ng_new");
    restore_new(&w, &fresh.url, &["--with-roles"])
        .code(1)
        .stderr(predicate::str::contains("carries no roles"));
    assert!(!fresh.exists(), "a database was left");
    assert_eq!(leftovers(&fresh.name), "0", "scratch database left");
    restore_new(&w, &fresh.url, &[]).success();
    assert_eq!(fresh.sql("SELECT count(*) FROM t"), "4");
    assert_eq!(
        fresh.sql("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 't'"),
        *owner
    );
    drop(fresh);
    drop(src);
}

#[test]
fn with_roles_on_a_sqlite_backup_is_a_usage_error() {
    let w = sqlite_workdir();
    let to = w.path().join("restored.db");
    w.cmd(&[
        "restore",
        "app",
        "--to",
        to.to_str().expect("utf-8"),
        "--with-roles",
    ])
    .assert()
    .code(2)
    .stderr(predicate::str::contains("--with-roles is for PostgreSQL"));
    assert!(!to.exists());
    let list = w.stdout(&["backup", "list", "app"]);
    let line = list.lines().nth(1).expect("a backup line");
    assert!(line.split_whitespace().any(|c| c == "-"), "{line}");
}

#[test]
fn with_roles_from_an_unencrypted_archive_after_it_matched_its_manifest() {
    let roles = Roles::new("wu", &["owner", "member", "restorer"]);
    let (owner, member, restorer) = (roles.name(0), roles.name(1), roles.name(2));
    server_sql(&format!(
        "CREATE ROLE \"{owner}\" NOLOGIN; CREATE ROLE \"{member}\" LOGIN IN ROLE \"{owner}\"
         PASSWORD 'member-secret-pw'"
    ));
    let src = PgDb::new("wu_src");
    src.sql(&format!(
        "CREATE TABLE t (i int); ALTER TABLE t OWNER TO \"{owner}\";
         GRANT SELECT ON t TO \"{member}\";"
    ));
    let w = Workdir::new();
    let dest = w.path().join("backups");
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"pg\"\nurl = \"{}\"\n{}",
            src.url,
            common::backup_table(&dest, None, "")
        ),
    );
    w.cmd(&["run-job", "pg.backup"]).assert().success();
    let archives = common::archives(&dest, "pg");
    assert_eq!(archives.len(), 1);
    // Adversary round 5, case 23: password hashes only ever inside an encrypted
    // archive; a plain one carries the roles without them.
    let bytes = std::fs::read(&archives[0]).expect("archive");
    assert!(
        !bytes.windows(6).any(|w| w == b"SCRAM-"),
        "a password hash in a plain archive"
    );
    let manifest = manifests(&dest.join("pg")).pop().expect("a manifest");
    assert_eq!(manifest["globals"]["passwords"], false, "{manifest}");
    server_sql(&format!("DROP DATABASE \"{}\" WITH (FORCE)", src.name));
    server_sql(&format!("DROP ROLE \"{member}\"; DROP ROLE \"{owner}\""));

    let fresh = PgDb::unused("wu_new");
    // A restorer that may create databases but not roles: refused before any role
    // is created, and nothing is left.
    server_sql(&format!("CREATE ROLE \"{restorer}\" LOGIN CREATEDB"));
    let as_restorer = fresh.url.replacen(
        "postgres://postgres@",
        &format!("postgres://{restorer}@"),
        1,
    );
    if as_restorer != fresh.url {
        restore_new(&w, &as_restorer, &["--with-roles"])
            .code(1)
            .stderr(predicate::str::contains("neither SUPERUSER nor CREATEROLE"));
        assert!(!fresh.exists(), "a database was left");
        assert_eq!(leftovers(&fresh.name), "0", "scratch database left");
        assert_eq!(
            server_sql(&format!(
                "SELECT count(*) FROM pg_roles WHERE rolname IN ('{owner}', '{member}')"
            )),
            "0"
        );
    }
    restore_new(&w, &fresh.url, &["--with-roles"]).success();
    assert_eq!(
        fresh.sql("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 't'"),
        *owner
    );
    assert_eq!(
        server_sql(&format!(
            "SELECT count(*) FROM pg_auth_members
              WHERE roleid = '\"{owner}\"'::regrole AND member = '\"{member}\"'::regrole"
        )),
        "1"
    );
    drop(fresh);
}

/// A SQLite restore never writes into a backup destination or the state directory:
/// `--force` over an archive or the run history would replace it (the directory
/// restores' rule, adversary round on issue 15, case 01, for files).
#[test]
fn a_sqlite_restore_never_targets_a_destination_or_the_state_dir() {
    let w = Workdir::new();
    let key = w.key("k");
    sqlite(
        &w.path().join("app.db"),
        "CREATE TABLE t (x); INSERT INTO t VALUES (1);",
    );
    let dest = w.path().join("backups");
    w.write_config(
        "",
        &common::sqlite_db(&w, "app", &common::backup_table(&dest, Some(&key), "")),
    );
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let archive = common::archives(&dest, "app").remove(0);
    let before = std::fs::read(&archive).expect("archive");
    let state = w.path().join("state/state.db");
    for target in [
        archive.clone(),
        dest.join("app/other.db"),
        state.clone(),
        w.path().join("backups-link/app/x.db"),
    ] {
        if target.starts_with(w.path().join("backups-link")) {
            let _ = std::os::unix::fs::symlink(&dest, w.path().join("backups-link"));
        }
        w.cmd(&[
            "restore",
            "app",
            "--to",
            target.to_str().expect("utf-8"),
            "--force",
        ])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("lie inside one another"));
    }
    // Adversary round 2 (issue 15), cases 02 and 03: the same folders through a bind
    // mount, and the key and configuration files themselves.
    let bind = w.path().join("bind");
    let mounted = common::Mount::bind(&dest, &bind);
    let key_before = std::fs::read(&key).expect("key");
    for target in [
        bind.join("app/other.db"),
        bind.join("app"),
        key.clone(),
        w.config_path(),
    ] {
        let out = w
            .cmd(&[
                "restore",
                "app",
                "--to",
                target.to_str().expect("utf-8"),
                "--force",
            ])
            .output()
            .expect("restore");
        assert_eq!(out.status.code(), Some(1), "{}", target.display());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("lie inside one another"),
            "{}: {}",
            target.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(mounted);
    assert_eq!(std::fs::read(&key).expect("key"), key_before);
    assert_eq!(std::fs::read(&archive).expect("archive"), before);
    assert!(!dest.join("app/other.db").exists());
    w.cmd(&["backup", "verify", "app"]).assert().success();
    w.cmd(&["history"]).assert().success();
}

#[test]
fn adversary4_case01_a_restore_onto_a_databases_wal_or_journal_is_refused() {
    // Round 4, case 01: `restore app --to app.db-wal --force` (a tab-completion slip)
    // replaced the write-ahead log holding committed rows; onto `-journal` it made a
    // crashed transaction permanent.
    let w = Workdir::new();
    let db = w.path().join("app.db");
    sqlite(
        &db,
        "PRAGMA journal_mode=WAL; CREATE TABLE t (x); INSERT INTO t VALUES ('kept');",
    );
    let dest = w.path().join("bk");
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"app\"\nurl = \"sqlite://{}\"\n{}",
            db.display(),
            common::backup_table(&dest, None, "")
        ),
    );
    w.cmd(&["run-job", "app.backup"]).assert().success();
    for suffix in ["-wal", "-shm", "-journal"] {
        let side = w.path().join(format!("app.db{suffix}"));
        std::fs::write(&side, b"side file").unwrap();
        w.cmd(&["restore", "app", "--to", side.to_str().unwrap(), "--force"])
            .assert()
            .code(1)
            .stderr(predicate::str::contains("not a database"));
        assert_eq!(std::fs::read(&side).unwrap(), b"side file", "{suffix}");
        std::fs::remove_file(&side).unwrap();
    }
    // An unconfigured database's side file too.
    let other = w.path().join("other.db");
    sqlite(&other, "CREATE TABLE t (x);");
    let journal = w.path().join("other.db-journal");
    std::fs::write(&journal, b"hot").unwrap();
    w.cmd(&[
        "restore",
        "app",
        "--to",
        journal.to_str().unwrap(),
        "--force",
    ])
    .assert()
    .code(1);
    assert_eq!(std::fs::read(&journal).unwrap(), b"hot");
}

#[test]
fn adversary5_a_wal_without_its_database_is_never_deleted_by_a_restore() {
    // Round 5, case 06: after a crash the operator moved app.db aside and restored to
    // the free name; the orphan app.db-wal, holding the only copy of committed rows,
    // was parked and deleted.
    let w = Workdir::new();
    let db = w.path().join("app.db");
    sqlite(&db, "CREATE TABLE t (x); INSERT INTO t VALUES ('kept');");
    let dest = w.path().join("bk");
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"app\"\nurl = \"sqlite://{}\"\n{}",
            db.display(),
            common::backup_table(&dest, None, "")
        ),
    );
    w.cmd(&["run-job", "app.backup"]).assert().success();
    std::fs::rename(&db, w.path().join("app.db.broken")).unwrap();
    for side in ["-wal", "-journal"] {
        let orphan = w.path().join(format!("app.db{side}"));
        std::fs::write(&orphan, b"committed pages").unwrap();
        for force in [&[][..], &["--force"][..]] {
            let mut args = vec!["restore", "app", "--to", db.to_str().unwrap()];
            args.extend_from_slice(force);
            w.cmd(&args)
                .assert()
                .code(1)
                .stderr(predicate::str::contains("exists without its database"));
            assert_eq!(std::fs::read(&orphan).unwrap(), b"committed pages");
            assert!(!db.exists());
        }
        std::fs::remove_file(&orphan).unwrap();
    }
    w.cmd(&["restore", "app", "--to", db.to_str().unwrap()])
        .assert()
        .success();
}

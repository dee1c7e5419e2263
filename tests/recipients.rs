//! Backups made for age recipients only (issue 16): the config holds no secret, the
//! daemon writes and verifies what it cannot read later, proves that it wrote it
//! with its writer key, and an identity reads it back. Real binary, real SQLite and
//! PostgreSQL.

mod common;

use std::path::{Path, PathBuf};

use common::{archives, sqlite, PgDb, Workdir};
use dbkeeper::keys::Identity;
use predicates::prelude::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

/// An identity saved (0600) at `<w>/<name>.txt`, and its recipient.
fn identity(w: &Workdir, name: &str) -> (PathBuf, String) {
    let id = Identity::generate();
    let path = w.path().join(format!("{name}.txt"));
    id.save(&path).expect("save identity");
    (path, id.recipient().to_string())
}

/// `[database.backup]` to `<w>/backups` for `recipient` only (no key file).
fn backup_for(w: &Workdir, recipient: &str, extra: &str) -> String {
    format!(
        "[database.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nrecipients = [\"{recipient}\"]\nverify = \"restore\"\n{extra}\n",
        w.path().join("backups").display()
    )
}

fn sqlite_config(w: &Workdir, recipient: &str) {
    sqlite(
        &w.path().join("app.db"),
        "CREATE TABLE IF NOT EXISTS t (x TEXT); INSERT INTO t VALUES ('one'), ('two');",
    );
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"app\"\nurl = \"sqlite://{}\"\n{}",
            w.path().join("app.db").display(),
            backup_for(w, recipient, "")
        ),
    );
}

#[test]
fn sqlite_round_trip_for_a_recipient_with_no_secret_in_the_config() {
    let w = Workdir::new();
    let (id_file, recipient) = identity(&w, "id");
    let (wrong, _) = identity(&w, "wrong");
    sqlite_config(&w, &recipient);
    for _ in 0..2 {
        w.cmd(&["run-job", "app.backup"]).assert().success();
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    // Written for the recipient, proven by this host's writer key.
    assert!(w.path().join("state/writer.key").exists());
    let list = w.stdout(&["backup", "list", "app"]);
    assert_eq!(
        list.lines().filter(|l| l.contains("app")).count(),
        2,
        "{list}"
    );
    assert!(!list.contains("UNTRUSTED"), "{list}");
    // The KEY column: the recipient's fingerprint (its first 12 and last 4
    // characters), no key id.
    let chars: Vec<char> = recipient.chars().collect();
    let fingerprint = format!(
        "{}…{}",
        chars[..12].iter().collect::<String>(),
        chars[chars.len() - 4..].iter().collect::<String>()
    );
    assert!(
        list.lines()
            .filter(|l| l.contains("app"))
            .all(|l| l.contains(&fingerprint) && !l.contains("key ")),
        "{list}"
    );
    // Read back with the identity only.
    let out = w.path().join("out.db");
    w.cmd(&["restore", "app", "--to", s(&out), "--identity", s(&id_file)])
        .assert()
        .success();
    assert_eq!(sqlite(&out, "SELECT count(*) FROM t;").trim(), "2");
    w.cmd(&["backup", "verify", "app", "--identity", s(&id_file)])
        .assert()
        .success();
    // Without an identity, verify checks what it can and says what it did not.
    w.cmd(&["backup", "verify", "app"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("NOT authenticated")
                .and(predicate::str::contains(recipient.as_str())),
        );
    // A changed byte in the data is caught by the SHA-256 even so (exit 3).
    let archive = archives(&w.path().join("backups"), "app").pop().unwrap();
    let mut bytes = std::fs::read(&archive).unwrap();
    let last = bytes.len() - 20;
    bytes[last] ^= 1;
    std::fs::write(&archive, &bytes).unwrap();
    w.cmd(&["backup", "verify", "app"]).assert().code(3);
    // A wrong identity: exit 3, names what the archive was made for, writes nothing.
    let nothing = w.path().join("nothing.db");
    w.cmd(&[
        "restore",
        "app",
        "--to",
        s(&nothing),
        "--identity",
        s(&wrong),
    ])
    .assert()
    .code(3)
    .stderr(predicate::str::contains(recipient.as_str()));
    assert!(!nothing.exists());
    // No identity at all: the archive cannot be read.
    w.cmd(&["restore", "app", "--to", s(&nothing)])
        .assert()
        .code(3);
    assert!(!nothing.exists());
}

#[test]
fn an_edited_recipient_list_or_a_forged_archive_is_never_trusted() {
    let w = Workdir::new();
    let (id_file, recipient) = identity(&w, "id");
    sqlite_config(&w, &recipient);
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let archive = archives(&w.path().join("backups"), "app").remove(0);
    // Edit one character of the recipient in the envelope.
    let mut bytes = std::fs::read(&archive).unwrap();
    let at = bytes
        .windows(recipient.len())
        .position(|win| win == recipient.as_bytes())
        .expect("recipient in the envelope");
    bytes[at + 10] = if bytes[at + 10] == b'q' { b'p' } else { b'q' };
    std::fs::write(&archive, &bytes).unwrap();
    w.cmd(&["backup", "list", "app"])
        .assert()
        .stdout(predicate::str::contains("UNTRUSTED"));
    let out = w.path().join("out.db");
    w.cmd(&["restore", "app", "--to", s(&out), "--identity", s(&id_file)])
        .assert()
        .code(3);
    assert!(!out.exists());

    // A forgery: anyone with the public recipient makes an archive of another
    // database file for it, and a manifest; the writing host never counts it.
    let w = Workdir::new();
    let (_, recipient) = identity(&w, "id");
    sqlite_config(&w, &recipient);
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let forger = Workdir::new();
    sqlite(
        &forger.path().join("app.db"),
        "CREATE TABLE t (x TEXT); INSERT INTO t VALUES ('forged');",
    );
    sqlite_config(&forger, &recipient);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    forger.cmd(&["run-job", "app.backup"]).assert().success();
    for f in std::fs::read_dir(forger.path().join("backups/app")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(
            &f,
            w.path().join("backups/app").join(f.file_name().unwrap()),
        )
        .unwrap();
    }
    w.cmd(&["backup", "list", "app"])
        .assert()
        .stdout(predicate::str::contains("UNTRUSTED").and(predicate::str::contains("writer key")));
}

#[test]
fn postgres_round_trip_for_a_recipient() {
    let w = Workdir::new();
    let (id_file, recipient) = identity(&w, "id");
    let db = PgDb::new("recipients");
    db.sql("CREATE TABLE t (x text); INSERT INTO t VALUES ('pg-one'), ('pg-two');");
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"app\"\nurl = \"{}\"\n{}",
            db.url,
            backup_for(&w, &recipient, "")
        ),
    );
    w.cmd(&["run-job", "app.backup"]).assert().success();
    let target = PgDb::unused("recipients_out");
    w.cmd(&[
        "restore",
        "app",
        "--to",
        &target.url,
        "--identity",
        s(&id_file),
        "--create",
    ])
    .assert()
    .success();
    assert_eq!(
        common::psql(&target.url, "SELECT string_agg(x, ',' ORDER BY x) FROM t"),
        "pg-one,pg-two"
    );
}

/// Adversary round 2, case 03: `backup verify` with an identity that does not open
/// the backup, or asked for a restore test with none, never looks like a pass.
#[test]
fn verify_with_a_wrong_identity_or_none_for_a_restore_test_fails() {
    let w = Workdir::new();
    let (_, recipient) = identity(&w, "id");
    let (wrong, _) = identity(&w, "wrong");
    sqlite_config(&w, &recipient);
    w.cmd(&["run-job", "app.backup"]).assert().success();
    w.cmd(&["backup", "verify", "app", "--identity", s(&wrong)])
        .assert()
        .code(3)
        .stderr(predicate::str::contains(&recipient));
    w.cmd(&["backup", "verify", "app", "--restore-test"])
        .assert()
        .code(3);
    // With no identity and no restore test, the partial check still passes and
    // says what it did not do.
    w.cmd(&["backup", "verify", "app"])
        .assert()
        .success()
        .stdout(predicate::str::contains("NOT authenticated"));
}

/// Adversary round 2, case 04: on the writing host (it has a writer key), an
/// identity opening a backup proves only that it was made for the recipient: a
/// forgery planted by someone who knows the public recipient stays untrusted, and
/// `restore --identity` restores the genuine latest backup, not the forgery.
#[test]
fn an_identity_on_the_writing_host_never_vouches_for_a_forgery() {
    let w = Workdir::new();
    let (id_file, recipient) = identity(&w, "id");
    sqlite_config(&w, &recipient);
    w.cmd(&["run-job", "app.backup"]).assert().success();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let forger = Workdir::new();
    sqlite(
        &forger.path().join("app.db"),
        "CREATE TABLE t (x TEXT); INSERT INTO t VALUES ('EVIL');",
    );
    forger.write_config(
        "",
        &format!(
            "[[database]]\nname = \"app\"\nurl = \"sqlite://{}\"\n{}",
            forger.path().join("app.db").display(),
            backup_for(&w, &recipient, "")
        ),
    );
    forger.cmd(&["run-job", "app.backup"]).assert().success();
    // The writing host also restores: its identity is in the config.
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"app\"\nurl = \"sqlite://{}\"\n{}",
            w.path().join("app.db").display(),
            backup_for(
                &w,
                &recipient,
                &format!("identity-files = [\"{}\"]", id_file.display())
            )
        ),
    );
    // Round 3, case 03: the writer key's file times count for nothing (a copy to a
    // replica, configuration management): a forgery stays untrusted.
    let later = std::process::Command::new("touch")
        .args(["-d", "+1 day"])
        .arg(w.path().join("state/writer.key"))
        .status()
        .expect("touch");
    assert!(later.success());
    let list = w.stdout(&["backup", "list", "app"]);
    assert_eq!(list.matches("UNTRUSTED").count(), 1, "{list}");
    assert!(list.contains("this host did not write it"), "{list}");
    let out = w.path().join("out.db");
    w.cmd(&["restore", "app", "--to", s(&out), "--identity", s(&id_file)])
        .assert()
        .success();
    assert_eq!(sqlite(&out, "SELECT count(*) FROM t;").trim(), "2");
    // A host that writes none (a rebuilt server, no writer key) trusts what its
    // identity opens, as the README says: both are listed there.
    std::fs::remove_file(w.path().join("state/writer.key")).expect("writer key");
    let list = w.stdout(&["backup", "list", "app"]);
    assert!(!list.contains("UNTRUSTED"), "{list}");
}

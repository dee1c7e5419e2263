//! Fitting the operator's world, run as the real binary: secrets as systemd
//! credential names, configuration drop-ins (`conf.d/*.toml`) and their reload.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{sqlite, Workdir, BIN};

/// A key made by `dbkeeper key generate`, mode 0400 as systemd hands credentials
/// over; returns its key id.
fn credential_key(path: &Path) -> String {
    let out = assert_cmd::Command::new(BIN)
        .args(["key", "generate", "-o"])
        .arg(path)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400)).expect("chmod");
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split_whitespace()
        .find(|w| w.len() == 16 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no key id in {text}"))
        .to_owned()
}

#[test]
fn key_files_given_as_credential_names_are_read_from_the_credentials_directory() {
    let w = Workdir::new();
    let creds = w.path().join("credentials");
    std::fs::create_dir(&creds).expect("mkdir");
    let current = credential_key(&creds.join("backup.key"));
    let old = credential_key(&creds.join("backup-2025.key"));
    // Run from a directory that holds neither name, so only the credentials
    // directory can provide them.
    let elsewhere = w.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    let dest = w.path().join("backups");
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"app\"\nurl = \"{}\"\n[database.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nencryption-key-file = \"backup.key\"\ndecryption-key-files = [\"backup-2025.key\"]\n",
            w.sqlite_url("app.db"),
            dest.display()
        ),
    );
    let run = |args: &[&str], credentials: bool| {
        let mut cmd = w.cmd(args);
        cmd.current_dir(&elsewhere)
            .env_remove("CREDENTIALS_DIRECTORY");
        if credentials {
            cmd.env("CREDENTIALS_DIRECTORY", &creds);
        }
        cmd.output().expect("run")
    };
    let out = run(&["run-job", "app.backup"], true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = std::fs::read_dir(dest.join("app"))
        .expect("backups")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(".manifest.json"))
        .expect("a manifest");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(manifest).expect("read")).expect("json");
    assert_eq!(
        manifest["key_id"],
        current.as_str(),
        "made with the credential key"
    );
    let out = run(&["backup", "verify", "app"], true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["check"], true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(current, old);

    // Outside the service the names mean files in the working directory, which
    // do not exist: a config error that says why.
    let out = run(&["check"], false);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("encryption-key-file"), "{err}");
    assert!(err.contains("$CREDENTIALS_DIRECTORY is not set"), "{err}");

    // generate-key-if-missing cannot create a credential that was not loaded.
    std::fs::remove_file(creds.join("backup.key")).expect("rm");
    let text = std::fs::read_to_string(w.config_path()).expect("read");
    std::fs::write(
        w.config_path(),
        text.replace(
            "encryption-key-file = \"backup.key\"",
            "encryption-key-file = \"backup.key\"\ngenerate-key-if-missing = true",
        ),
    )
    .expect("write");
    let out = run(&["run-job", "app.backup"], true);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot write into $CREDENTIALS_DIRECTORY"),
        "{err}"
    );
    assert!(!creds.join("backup.key").exists());
    // Nor, outside the service, a key named like a credential in whatever
    // directory the command ran from (adversary round 5, case 24).
    let out = run(&["run-job", "app.backup"], false);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("generate-key-if-missing writes only to a path"),
        "{err}"
    );
    assert!(!elsewhere.join("backup.key").exists());
}

/// A `[[database]]` for `<workdir>/<name>.db` with a sql job that records each run
/// in the database itself (so the test needs no metric labels).
fn ticking_database(w: &Workdir, name: &str) -> String {
    format!(
        "[[database]]\nname = \"{name}\"\nurl = \"{}\"\n[[database.sql]]\nname = \"tick\"\nschedule = \"every 1s\"\nstatement = \"CREATE TABLE IF NOT EXISTS ticks (at TEXT); INSERT INTO ticks VALUES (datetime('now'))\"\n",
        w.sqlite_url(&format!("{name}.db"))
    )
}

fn ticks(w: &Workdir, name: &str) -> u64 {
    let db = w.path().join(format!("{name}.db"));
    if !db.exists()
        || sqlite(
            &db,
            "SELECT count(*) FROM sqlite_master WHERE name = 'ticks'",
        )
        .trim()
            == "0"
    {
        return 0;
    }
    sqlite(&db, "SELECT count(*) FROM ticks")
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn drop_ins_are_merged_shown_by_check_and_reloaded_on_sighup() {
    let w = Workdir::new();
    w.write_config("", &ticking_database(&w, "main"));
    let conf_d = w.path().join("conf.d");
    std::fs::create_dir(&conf_d).expect("mkdir");
    std::fs::write(
        conf_d.join("10-billing.toml"),
        ticking_database(&w, "billing"),
    )
    .expect("write");

    let check = w.stdout(&["check"]);
    let billing = conf_d.join("10-billing.toml").display().to_string();
    assert!(check.contains(&format!("drop-in {billing}")), "{check}");
    assert!(
        check.contains("database billing (sqlite, ") && check.contains(&format!("from {billing})")),
        "{check}"
    );
    assert!(
        check.contains(&format!("from {})", w.config_path().display())),
        "{check}"
    );

    let d = w.start();
    d.wait_for("both databases tick", Duration::from_secs(20), || {
        ticks(&w, "main") >= 1 && ticks(&w, "billing") >= 1
    });

    // A new application ships its drop-in; SIGHUP picks it up.
    std::fs::write(conf_d.join("20-shop.toml"), ticking_database(&w, "shop")).expect("write");
    d.signal("HUP");
    d.wait_for(
        "the new drop-in's job runs",
        Duration::from_secs(20),
        || ticks(&w, "shop") >= 1,
    );

    // A drop-in that claims a name already taken: the reload fails, naming both
    // files, and the running configuration stays.
    std::fs::write(conf_d.join("30-dup.toml"), ticking_database(&w, "billing")).expect("write");
    d.signal("HUP");
    d.wait_for("reload failure reported", Duration::from_secs(10), || {
        d.metric("dbkeeper_config_last_reload_successful", &[]) == Some(0.0)
    });
    let log = d.log_text();
    assert!(
        log.contains("30-dup.toml") && log.contains("10-billing.toml"),
        "{log}"
    );
    let before = ticks(&w, "shop");
    d.wait_for(
        "the old configuration keeps running",
        Duration::from_secs(15),
        || ticks(&w, "shop") >= before + 2,
    );

    // `check` says the same, with both files.
    let out = w.cmd(&["check"]).output().expect("check");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("30-dup.toml") && err.contains("10-billing.toml"),
        "{err}"
    );
}

/// `retention plan` only looks, like `check`: a `mode=rwc` database that does not
/// exist is not created (adversary round 5, case 15), and planning against one that
/// exists in WAL mode leaves no `-wal`/`-shm` beside it.
#[test]
fn retention_plan_creates_no_file() {
    let w = Workdir::new();
    let data = w.path().join("data");
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"app\"\nurl = \"sqlite://{}/app.db?mode=rwc\"\n[[database.retention]]\ntable = \"events\"\ncolumn = \"at\"\nolder-than = \"30d\"\nschedule = \"manual\"\n",
            data.display()
        ),
    );
    let out = w.cmd(&["retention", "plan", "app"]).output().expect("plan");
    assert!(!out.status.success(), "no table to plan on");
    assert!(!data.exists(), "retention plan created {}", data.display());

    std::fs::create_dir(&data).expect("mkdir");
    sqlite(
        &data.join("app.db"),
        "PRAGMA journal_mode = WAL; CREATE TABLE events (at TEXT); INSERT INTO events VALUES (datetime('now', '-40 days')), (datetime('now'))",
    );
    let files = || {
        let mut names: Vec<String> = std::fs::read_dir(&data)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(files(), ["app.db"]);
    let plan = w.stdout(&["retention", "plan", "app"]);
    let row = plan
        .lines()
        .find(|l| l.starts_with("app.retention"))
        .unwrap_or("");
    assert!(
        row.split_whitespace().any(|c| c == "1"),
        "one expired row: {plan}"
    );
    assert_eq!(files(), ["app.db"], "{plan}");
}

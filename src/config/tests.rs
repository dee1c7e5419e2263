use std::path::Path;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("test.toml"), text)
}

const MINIMAL: &str = r#"
[[database]]
name = "app"
url = "sqlite://app.db"

[[database.sql]]
name = "analyze"
statement = "ANALYZE"
schedule = "@daily"
"#;

#[test]
fn minimal_config_gets_defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.daemon.listen.to_string(), "127.0.0.1:9736");
    assert_eq!(c.daemon.max_concurrent_jobs, 2);
    assert_eq!(c.daemon.shutdown_grace, Duration::from_secs(300));
    let opts = c.databases[0].sql[0].options(None);
    assert_eq!(opts.timeout, Duration::from_secs(3600));
    assert_eq!(opts.missed, Missed::Skip);
    assert_eq!(opts.retries, 0);
    assert_eq!(opts.timezone.to_string(), "UTC");
}

#[test]
fn unknown_key_names_line_and_column() {
    let text = MINIMAL.replace(
        "statement = \"ANALYZE\"",
        "statement = \"ANALYZE\"\nstatment = \"x\"",
    );
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.starts_with("test.toml:9:1: "), "{err}");
    assert!(err.contains("statment"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
}

#[test]
fn wrong_type_bad_cron_bad_duration_bad_zone() {
    let cases = [
        ("[daemon]\nmax-concurrent-jobs = \"two\"\n", "2:23:"),
        ("[daemon]\nshutdown-grace = \"5 fortnights\"\n", "2:18:"),
    ];
    for (prefix, at) in cases {
        let err = parse(&format!("{prefix}{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(&format!("test.toml:{at}")), "{err}");
    }
    let err = parse(&MINIMAL.replace("@daily", "0 0 25 * * *"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("test.toml:9:") && err.contains("invalid schedule"),
        "{err}"
    );
    let err = parse(&MINIMAL.replace(
        "schedule = \"@daily\"",
        "schedule = \"@daily\"\ntimezone = \"Europe/Atlantis\"",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("test.toml:10:") && err.contains("Europe/Atlantis"),
        "{err}"
    );
}

#[test]
fn duplicate_database_name_is_rejected() {
    let err = parse(&format!(
        "{MINIMAL}\n[[database]]\nname = \"app\"\nurl = \"sqlite://b.db\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("database \"app\".name") && err.contains("unique"),
        "{err}"
    );
}

#[test]
fn duplicate_job_names_on_one_database_are_rejected() {
    let sql = MINIMAL.to_owned() + "\n[[database.sql]]\nname = \"analyze\"\nstatement = \"SELECT 1\"\nschedule = \"@hourly\"\n";
    let err = parse(&sql).unwrap_err().to_string();
    assert!(
        err.contains("database \"app\".sql \"analyze\".name") && err.contains("used twice"),
        "{err}"
    );
    // Retention jobs named after the same table in two schemas need a name of their own.
    let rule = |table: &str| {
        format!("\n[[database.retention]]\ntable = \"{table}\"\ncolumn = \"at\"\nolder-than = \"30d\"\nschedule = \"@daily\"\n")
    };
    let err = parse(&format!(
        "{MINIMAL}{}{}",
        rule("a.events"),
        rule("b.events")
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("retention \"b.events\".name") && err.contains("\"events\" is used twice"),
        "{err}"
    );
}

#[test]
fn semantic_errors_name_the_key() {
    let cases = [
        (
            MINIMAL.replace("name = \"app\"", "name = \"app.x\""),
            "database \"app.x\".name",
        ),
        (MINIMAL.replace("sqlite://app.db", "mysql://h/db"), ".url"),
        (MINIMAL.replace("\"ANALYZE\"", "\"  \""), ".statement"),
        (
            MINIMAL.replace(
                "url = \"sqlite://app.db\"",
                "url = \"postgres://h/db\"\npassword-file = \"/nonexistent/pw\"",
            ),
            "password-file",
        ),
        (
            MINIMAL.replace(
                "url = \"sqlite://app.db\"",
                "url = \"sqlite://app.db\"\npassword-file = \"/etc/hostname\"",
            ),
            "password-file",
        ),
        (
            "[daemon]\nmax-concurrent-jobs = 0\n".to_owned() + MINIMAL,
            "max-concurrent-jobs",
        ),
        ("[daemon]\n".to_owned(), "no [[database]]"),
    ];
    for (text, expect) in cases {
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains(expect), "expected {expect:?} in {err}");
        assert!(err.starts_with("test.toml: "), "{err}");
    }
}

#[test]
fn missing_file_is_a_read_error() {
    let err = Config::load(Path::new("/nonexistent/dbkeeper.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(err.to_string().contains("/nonexistent/dbkeeper.toml"));
}

#[test]
fn bare_secret_names_are_read_from_credentials_directory() {
    let creds = std::ffi::OsStr::new("/run/credentials/dbkeeper.service");
    assert_eq!(
        resolve_in(Path::new("app-db"), Some(creds)),
        Path::new("/run/credentials/dbkeeper.service/app-db")
    );
    for path in ["/etc/pw", "./pw", "keys/backup.key", "../pw"] {
        assert_eq!(resolve_in(Path::new(path), Some(creds)), Path::new(path));
    }
    assert_eq!(resolve_in(Path::new("app-db"), None), Path::new("app-db"));
    let empty = std::ffi::OsStr::new("");
    assert_eq!(
        resolve_in(Path::new("app-db"), Some(empty)),
        Path::new("app-db")
    );
}

/// A main file and its `conf.d/`, written into a fresh directory.
fn with_drop_ins(
    main: &str,
    drop_ins: &[(&str, &str)],
) -> (tempfile::TempDir, Result<Config, ConfigError>) {
    let dir = tempfile::tempdir().unwrap();
    let conf_d = dir.path().join("conf.d");
    std::fs::create_dir(&conf_d).unwrap();
    std::fs::write(dir.path().join("dbkeeper.toml"), main).unwrap();
    for (name, text) in drop_ins {
        std::fs::write(conf_d.join(name), text).unwrap();
    }
    let loaded = Config::load(&dir.path().join("dbkeeper.toml"));
    (dir, loaded)
}

fn database(name: &str) -> String {
    format!("[[database]]\nname = \"{name}\"\nurl = \"sqlite://{name}.db\"\n")
}

#[test]
fn drop_ins_add_databases_in_name_order_and_remember_their_file() {
    let main = format!("[daemon]\nmax-concurrent-jobs = 3\n{}", database("main"));
    let (dir, loaded) = with_drop_ins(
        &main,
        &[
            ("20-b.toml", &database("b")),
            (
                "10-a.toml",
                &format!("{}{}", database("a1"), database("a2")),
            ),
            ("notes.txt", "not toml at all ["),
            (".hidden.toml", "not toml at all ["),
            ("30-c.toml.dpkg-old", "not toml at all ["),
            (
                "40-notify.toml",
                "[notify]\nwebhook = \"http://127.0.0.1:9/hook\"\n",
            ),
        ],
    );
    let c = loaded.unwrap();
    let names: Vec<&str> = c.databases.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["main", "a1", "a2", "b"]);
    let conf_d = dir.path().join("conf.d");
    assert_eq!(c.databases[0].source, dir.path().join("dbkeeper.toml"));
    assert_eq!(c.databases[1].source, conf_d.join("10-a.toml"));
    assert_eq!(c.databases[3].source, conf_d.join("20-b.toml"));
    assert_eq!(
        c.drop_ins,
        ["10-a.toml", "20-b.toml", "40-notify.toml"].map(|n| conf_d.join(n))
    );
    assert_eq!(c.daemon.max_concurrent_jobs, 3);
    assert!(c.notify.is_some());
    // Without conf.d, the file alone.
    std::fs::remove_dir_all(&conf_d).unwrap();
    let alone = Config::load(&dir.path().join("dbkeeper.toml")).unwrap();
    assert_eq!(alone.databases.len(), 1);
}

#[test]
fn drop_in_conflicts_name_both_files() {
    let (dir, loaded) = with_drop_ins(
        &database("app"),
        &[("10-x.toml", &database("x")), ("20-y.toml", &database("x"))],
    );
    let err = loaded.unwrap_err().to_string();
    let conf_d = dir.path().join("conf.d");
    assert!(
        err.starts_with(&conf_d.join("20-y.toml").display().to_string()),
        "{err}"
    );
    assert!(
        err.contains(&conf_d.join("10-x.toml").display().to_string()),
        "{err}"
    );

    let (dir, loaded) = with_drop_ins(&database("app"), &[("10-app.toml", &database("app"))]);
    let err = loaded.unwrap_err().to_string();
    assert!(
        err.contains(&dir.path().join("dbkeeper.toml").display().to_string()),
        "{err}"
    );
    assert!(err.contains("10-app.toml"), "{err}");

    let main = format!("[daemon]\nmax-concurrent-jobs = 3\n{}", database("app"));
    let (dir, loaded) = with_drop_ins(
        &main,
        &[("10-d.toml", "[daemon]\nmax-concurrent-jobs = 9\n")],
    );
    let err = loaded.unwrap_err().to_string();
    assert!(err.contains("[daemon] is also written in"), "{err}");
    assert!(
        err.contains(&dir.path().join("dbkeeper.toml").display().to_string()),
        "{err}"
    );
}

#[test]
fn errors_in_a_drop_in_point_at_the_drop_in() {
    let (dir, loaded) = with_drop_ins(
        &database("app"),
        &[(
            "10-bad.toml",
            &format!("{}colour = \"blue\"\n", database("bad")),
        )],
    );
    let err = loaded.unwrap_err().to_string();
    let bad = dir.path().join("conf.d/10-bad.toml").display().to_string();
    assert!(
        err.starts_with(&format!("{bad}:4:1: unknown field `colour`")),
        "{err}"
    );

    // A semantic error in a drop-in's database names the drop-in, not the main file.
    let text = format!(
        "{}[database.backup]\ndestination = \"/tmp/b\"\nschedule = \"@daily\"\nencryption = \"none\"\nlevel = 99\n",
        database("late")
    );
    let (dir, loaded) = with_drop_ins(&database("app"), &[("10-late.toml", &text)]);
    let err = loaded.unwrap_err().to_string();
    let late = dir.path().join("conf.d/10-late.toml").display().to_string();
    assert!(
        err.starts_with(&format!("{late}: database \"late\".backup.level")),
        "{err}"
    );
}

/// Every configuration file shipped in `config/` must load.
#[test]
fn shipped_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    // Files the examples point at (keys, password files) need not exist here: point
    // key files at a real key and leave password files out.
    let scratch = tempfile::tempdir().unwrap();
    let key = scratch.path().join("backup.key");
    crate::repo::archive::Key::generate(&key).unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            // password files named in examples need not exist on this machine
            let text = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("password-file"))
                .map(|l| {
                    if l.trim_start().starts_with("encryption-key-file")
                        && !l.contains("var/demo.key")
                    {
                        format!("encryption-key-file = \"{}\"", key.display())
                    } else {
                        l.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            Config::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"));
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "expected the demo and example configs in {}",
        dir.display()
    );
}

#[test]
fn debug_output_hides_a_password_in_the_url() {
    let text = MINIMAL.replace(
        "sqlite://app.db",
        "postgres://app:hunter2@db/app?password=s3cret",
    );
    let c = parse(&text).unwrap();
    let debug = format!("{c:?}");
    assert!(
        !debug.contains("hunter2") && !debug.contains("s3cret"),
        "{debug}"
    );
    assert!(debug.contains("REDACTED"));
}

#[test]
fn ping_url_per_job_and_notify_default() {
    let text = format!(
        "[notify]\nping-url = \"https://hc-ping.com/default-uuid\"\nping-style = \"cronitor\"\n{MINIMAL}\
         [[database.sql]]\nname = \"own\"\nstatement = \"SELECT 1\"\nschedule = \"@daily\"\n\
         ping-url = \"https://kuma.example/api/push/tok?status=up&msg=OK&ping=\"\nping-style = \"uptime-kuma\"\n\
         [[database.sql]]\nname = \"off\"\nstatement = \"SELECT 1\"\nschedule = \"@daily\"\nping-url = false\n\
         [[database.sql]]\nname = \"empty\"\nstatement = \"SELECT 1\"\nschedule = \"@daily\"\nping-url = \"\"\n"
    );
    let c = parse(&text).unwrap();
    let n = c.notify.as_ref();
    let sql = &c.databases[0].sql;
    let inherited = sql[0].options(n).ping.expect("the [notify] default");
    assert_eq!(
        inherited.url.url().as_str(),
        "https://hc-ping.com/default-uuid"
    );
    assert_eq!(inherited.style, PingStyle::Cronitor);
    let own = sql[1].options(n).ping.expect("its own");
    assert_eq!(own.url.host(), "kuma.example");
    assert_eq!(own.style, PingStyle::UptimeKuma);
    assert!(sql[2].options(n).ping.is_none());
    assert!(sql[3].options(n).ping.is_none());
    // No [notify]: only jobs with their own URL ping.
    assert!(sql[0].options(None).ping.is_none());
    let debug = format!("{c:?}");
    assert!(
        !debug.contains("default-uuid") && !debug.contains("tok?"),
        "{debug}"
    );
}

#[test]
fn webhook_forms_and_formats() {
    let hook = |value: &str| {
        parse(&format!("[notify]\nwebhook = {value}\n{MINIMAL}"))
            .map(|c| c.notify.map(|n| n.webhook).unwrap_or_default())
    };
    let one = hook("\"https://example.com/hook/t0k3n\"").unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].format, WebhookFormat::Json);
    let slack =
        hook("{ url = \"https://hooks.slack.com/services/T/B/X\", format = \"slack\" }").unwrap();
    assert_eq!(slack[0].format, WebhookFormat::Slack);
    let many = hook(
        "[\"https://example.com/a\", { url = \"https://example.com/b\", format = \"teams\" }]",
    )
    .unwrap();
    assert_eq!(
        many.iter().map(|w| w.format).collect::<Vec<_>>(),
        [WebhookFormat::Json, WebhookFormat::Teams]
    );
    let debug = format!(
        "{:?}",
        parse(&format!(
            "[notify]\nwebhook = \"https://example.com/hook/t0k3n\"\n{MINIMAL}"
        ))
        .unwrap()
    );
    assert!(!debug.contains("t0k3n"), "{debug}");
    // The [[notify.webhook]] table-array form is the same list.
    let c = parse(&format!(
        "[[notify.webhook]]\nurl = \"https://chat.example/hooks/x\"\nformat = \"slack\"\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(c.notify.unwrap().webhook[0].format, WebhookFormat::Slack);
}

#[test]
fn malformed_notify_values_say_what_to_write() {
    let cases = [
        (
            "[notify]\nwebhook = { url = \"https://x/h\", format = \"discord\" }\n",
            "2:",
            "discord",
        ),
        (
            "[notify]\nwebhook = \"ftp://x/secret-hook\"\n",
            "2:",
            "http:// or https://",
        ),
        (
            "[notify]\nwebhook = { url = \"https://x/h\", fromat = \"slack\" }\n",
            "2:",
            "fromat",
        ),
        ("[notify]\nping-url = true\n", "2:", "false for no pings"),
        (
            "[notify]\nping-url = \"hc-ping.com/secret-uuid\"\n",
            "2:",
            "http:// or https://",
        ),
        (
            "[notify]\nping-url = \"https://hc-ping.com/u\"\nping-style = \"nagios\"\n",
            "3:",
            "nagios",
        ),
        (
            "[notify]\npublic-url = \"status page\"\nping-url = \"https://hc-ping.com/u\"\n",
            "",
            "notify.public-url",
        ),
        (
            "[notify]\npublic-url = \"https://ops.example.com/\"\n",
            "",
            "set webhook, alertmanager, ping-url",
        ),
    ];
    for (prefix, at, want) in cases {
        let err = parse(&format!("{prefix}{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(&format!("test.toml:{at}")), "{err}");
        assert!(err.contains(want), "{want:?} not in {err}");
        assert!(!err.contains("secret"), "the URL leaked: {err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }
    let err = parse(&MINIMAL.replace(
        "schedule = \"@daily\"",
        "schedule = \"@daily\"\nping-url = \"mailto:ops@example.com\"",
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("ping URL is not an http"), "{err}");
}

/// The commented-out notification keys of the example config are valid once
/// uncommented (the example test only sees them as comments).
#[test]
fn example_notify_keys_parse_when_uncommented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/dbkeeper.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let keys = [
        "[notify]",
        "webhook",
        "alertmanager",
        "public-url",
        "ping-url",
        "ping-style",
    ];
    let mut uncommented = 0;
    let text: Vec<String> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("password-file"))
        .filter(|l| !l.trim_start().starts_with("encryption-key-file"))
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if keys.iter().any(|k| rest.starts_with(k)) => {
                uncommented += 1;
                rest.to_owned()
            }
            _ => l.to_owned(),
        })
        .collect();
    assert!(uncommented >= 6, "the example lost its notification keys");
    let text = text
        .join("\n")
        .replace(
            "[database.backup]",
            "[database.backup]\nencryption = \"none\"",
        )
        .replace("[files.backup]", "[files.backup]\nencryption = \"none\"");
    let c = Config::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    let n = c.notify.expect("[notify]");
    assert!(!n.webhook.is_empty() && n.ping_url.is_some() && n.public_url.is_some());
    let backup = c.databases[0].backup.as_ref().expect("backup");
    assert!(backup.options(Some(&n)).ping.is_some());
}

/// MINIMAL with an unencrypted `[database.backup]` whose `keep` line is `keep`.
fn with_keep(keep: &str) -> String {
    format!(
        "{MINIMAL}\n[database.backup]\nschedule = \"manual\"\ndestination = \"/tmp\"\nencryption = \"none\"\n{keep}\n"
    )
}

fn keep_of(keep: &str) -> Result<Keep, ConfigError> {
    let c = parse(&with_keep(keep))?;
    Ok(c.databases[0].backup.as_ref().unwrap().keep)
}

#[test]
fn keep_takes_counts_all_and_within() {
    assert_eq!(keep_of("").unwrap(), Keep::recommended());
    let k = keep_of("keep = { last = -1, daily = \"all\", weekly = 4, within = \"7d\" }").unwrap();
    assert_eq!(k.last, Count::All);
    assert_eq!(k.daily, Count::All);
    assert_eq!(k.weekly, Count::Limited(4));
    assert_eq!(k.hourly, Count::Limited(0), "left out: off");
    assert_eq!(k.within, Some(Duration::from_secs(7 * 86_400)));
    // As a table of its own, too, with humantime's units.
    let k = keep_of("[database.backup.keep]\nwithin = \"36h\"\nmonthly = 1000000").unwrap();
    assert_eq!(k.within, Some(Duration::from_secs(36 * 3600)));
    assert_eq!(k.monthly, Count::Limited(1_000_000));
    assert_eq!(
        keep_of("keep = { within = \"2w\" }").unwrap().within,
        Some(Duration::from_secs(14 * 86_400))
    );
    assert_eq!(
        keep_of("keep = { within = \"1y\" }").unwrap().within,
        Some(Duration::from_secs(31_557_600))
    );
    // `within` alone, or one unlimited rule alone, keeps something.
    assert!(keep_of("keep = { within = \"1h\" }").is_ok());
    assert!(keep_of("keep = { yearly = -1 }").is_ok());
}

#[test]
fn keep_values_it_cannot_read_are_errors_naming_the_rule() {
    let cases = [
        ("keep = { daily = -2 }", "keep.daily: -2 is not a count"),
        (
            "keep = { last = \"lots\" }",
            "keep.last: \"lots\" is not a count",
        ),
        (
            "keep = { weekly = \"ALL\" }",
            "keep.weekly: \"ALL\" is not a count",
        ),
        (
            "keep = { monthly = 1.5 }",
            "keep.monthly: 1.5 is not a count",
        ),
        (
            "keep = { yearly = true }",
            "keep.yearly: true is not a count",
        ),
        (
            "keep = { daily = [7] }",
            "keep.daily: this value is not a count",
        ),
        (
            "keep = { hourly = -9223372036854775808 }",
            "keep.hourly: -9223372036854775808",
        ),
        (
            "keep = { last = 4294967296 }",
            "keep.last: 4294967296 is not a count",
        ),
        (
            "keep = { within = \"7 fortnights\" }",
            "keep.within: \"7 fortnights\" is not a duration",
        ),
        (
            "keep = { within = \"-7d\" }",
            "keep.within: \"-7d\" is not a duration",
        ),
        ("keep = { within = 7 }", "keep.within: 7 is not a duration"),
        ("keep = { dayly = 7 }", "unknown field `dayly`"),
    ];
    for (keep, expected) in cases {
        let err = keep_of(keep).unwrap_err().to_string();
        assert!(err.contains(expected), "{keep}: {err}");
        assert!(err.starts_with("test.toml:"), "{keep}: {err}");
    }
    // Values that read but are out of range: the full key.
    let cases = [
        ("keep = { last = 1000001 }", "backup.keep.last"),
        ("keep = { within = \"2000y\" }", "backup.keep.within"),
        ("keep = { within = \"0s\" }", "keeps no backup at all"),
        ("keep = { daily = 0 }", "keeps no backup at all"),
    ];
    for (keep, expected) in cases {
        let err = keep_of(keep).unwrap_err().to_string();
        assert!(err.contains(expected), "{keep}: {err}");
    }
}

/// The commented `keep` alternatives in the shipped example are valid too.
#[test]
fn example_keep_alternatives_parse() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/dbkeeper.example.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let alternatives: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("# keep = "))
        .collect();
    assert!(alternatives.len() >= 2, "{alternatives:?}");
    for a in alternatives {
        let line = format!("keep = {}", a.split(" #").next().unwrap_or(a));
        keep_of(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
    }
}

fn with_destination(destination: &str) -> Result<Config, ConfigError> {
    parse(&format!(
        "{MINIMAL}\n[database.backup]\nschedule = \"manual\"\ndestination = {destination}\nencryption = \"none\"\n"
    ))
}

#[test]
fn destinations_take_urls_tables_and_lists_and_refuse_what_cannot_work() {
    let c = with_destination(
        r#"["/tmp", { url = "s3://b/p", keep = { last = 2 }, retry-timeout = "5s" }]"#,
    )
    .unwrap();
    let d = &c.databases[0].backup.as_ref().unwrap().destination;
    assert_eq!(d.labels(), ["/tmp", "s3://b/p"]);
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path(), &link).unwrap();
    let same = format!("[\"{}\", \"{}\"]", dir.path().display(), link.display());
    let err = with_destination(&same).unwrap_err().to_string();
    assert!(err.contains("are the same folder"), "{err}");
    for (text, says) in [
        (
            r#"{ url = "/tmp", endpoint = "http://x" }"#,
            "object stores only",
        ),
        (
            r#"{ url = "s3://b/p", keep = { last = 0 } }"#,
            "keeps no backup",
        ),
        (
            r#"{ url = "s3://b/p", endpoint = "http://u:pw@x" }"#,
            "holds credentials",
        ),
        (
            r#"{ url = "s3://b/p", credentials-file = "/nonexistent/s3.env" }"#,
            "cannot read",
        ),
    ] {
        let err = with_destination(text).unwrap_err().to_string();
        assert!(err.contains(says), "{text}: {err}");
        assert!(!err.contains("pw@"), "{err}");
    }
}

#[test]
fn a_destination_inside_another_is_refused() {
    // Adversary round 6, case 20: an export folder of one destination taken for another.
    let err = with_destination(r#"["s3://b/p", "s3://b/p/events/retention"]"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("lies inside"), "{err}");
    let err = with_destination(r#"["/tmp/x", "/tmp/x/y"]"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("lies inside"), "{err}");
    with_destination(r#"["/tmp/x", "/tmp/xy", "s3://b/p", "s3://b/pq", "s3://c/p"]"#).unwrap();
}

/// The commented gauge of the example config is valid once uncommented, and so is
/// `table-stats` on its database.
#[test]
fn example_gauge_parses_when_uncommented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/dbkeeper.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut inside = false;
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("password-file"))
        .map(|l| {
            inside |= l == "# [[database.gauge]]";
            let line = match l.strip_prefix("# ") {
                Some(rest) if inside => rest.split(" #").next().unwrap_or(rest).to_owned(),
                _ => l.to_owned(),
            };
            inside &= !l.starts_with("# help");
            line
        })
        .collect();
    let text = lines
        .join("\n")
        .replace(
            "[database.backup]",
            "[database.backup]\nencryption = \"none\"",
        )
        .replace("[files.backup]", "[files.backup]\nencryption = \"none\"")
        .replacen(
            "[database.backup]",
            "table-stats = true\n[database.backup]",
            1,
        );
    let text = text.replace("encryption-key-file", "# encryption-key-file");
    let c = Config::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    let db = &c.databases[0];
    assert!(db.table_stats);
    let g = db.gauge.first().expect("the example gauge");
    assert_eq!((g.name.as_str(), g.max_series()), ("tickets", 20));
    assert_eq!(g.options(None).schedule.as_str(), "every 1m");
    assert_eq!(db.table_stats_options(None).schedule.as_str(), "every 5m");
    assert_eq!(db.table_stats_max_tables(), 100);
}

#[test]
fn replica_keys_parse_with_defaults_and_are_checked() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(
        c.daemon.cluster_name(),
        None,
        "no coordination: a single daemon"
    );
    let with = |keys: &str| parse(&format!("[daemon]\n{keys}\n{MINIMAL}"));
    let c = with("coordination = \"postgres://dbkeeper@db1/coord\"").unwrap();
    assert_eq!(c.daemon.cluster_name(), Some("default"));
    assert_eq!(c.daemon.lease_timeout, Duration::from_secs(20));
    let c = with(
        "cluster = \"prod\"\ncoordination = \"postgres://dbkeeper@db1/coord\"\nlease-timeout = \"45s\"",
    )
    .unwrap();
    assert_eq!(c.daemon.cluster_name(), Some("prod"));
    assert_eq!(c.daemon.lease_timeout, Duration::from_secs(45));
    let coord = c
        .daemon
        .coordination_database(Duration::from_secs(1))
        .unwrap();
    assert_eq!(coord.url, "postgres://dbkeeper@db1/coord");

    // kebab-case, unknown keys rejected with their place.
    let e = with("coordination_url = \"postgres://db1/coord\"")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("coordination_url") && e.contains("test.toml:2:1"),
        "{e}"
    );
    for (keys, key, says) in [
        (
            "cluster = \"prod\"",
            "daemon.cluster",
            "daemon.coordination",
        ),
        (
            "coordination = \"sqlite:///tmp/c.db\"",
            "daemon.coordination",
            "postgres://",
        ),
        (
            "coordination = \"postgres://db1/c\"\nlease-timeout = \"1s\"",
            "daemon.lease-timeout",
            "at least 3s",
        ),
        (
            "coordination = \"postgres://db1/c\"\ncluster = \"a b\"",
            "daemon.cluster",
            "not a valid name",
        ),
        (
            "coordination = \"postgres://db1/c\"\ncoordination-password-file = \"/nonexistent/pw\"",
            "daemon.coordination-password-file",
            "not a readable file",
        ),
    ] {
        let e = with(keys).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(says), "{keys}: {e}");
    }
}

#[test]
fn debug_output_hides_a_password_in_the_coordination_url() {
    let c = parse(&format!(
        "[daemon]\ncoordination = \"postgres://dbk:hunter2@db1/coord\"\n{MINIMAL}"
    ))
    .unwrap();
    let debug = format!("{c:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
}

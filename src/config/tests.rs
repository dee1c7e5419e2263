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
    let opts = c.databases[0].sql[0].options();
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
fn relative_password_file_is_read_from_credentials_directory() {
    let creds = std::ffi::OsStr::new("/run/credentials/dbkeeper.service");
    assert_eq!(
        resolve_in(Path::new("app-db"), Some(creds)),
        Path::new("/run/credentials/dbkeeper.service/app-db")
    );
    assert_eq!(
        resolve_in(Path::new("/etc/pw"), Some(creds)),
        Path::new("/etc/pw")
    );
    assert_eq!(resolve_in(Path::new("app-db"), None), Path::new("app-db"));
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

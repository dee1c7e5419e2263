//! The shipped alert rules: promtool's checks and unit tests, and a real Prometheus
//! server scraping a running dbkeeper, watching an alert fire and resolve.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port, http_get, receiver, Answer, Workdir};

fn repo(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(rel)
        .display()
        .to_string()
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool must be installed (apt-get install prometheus; see .ci/run)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rules_pass_promtool_check_and_unit_tests() {
    promtool(&[
        "check",
        "rules",
        &repo("config/prometheus/dbkeeper.rules.yml"),
    ]);
    promtool(&[
        "test",
        "rules",
        &repo("config/prometheus/dbkeeper.rules.test.yml"),
    ]);
    // Every alert has a runbook section.
    let rules =
        std::fs::read_to_string(repo("config/prometheus/dbkeeper.rules.yml")).expect("rules");
    let runbook = std::fs::read_to_string(repo("docs/RUNBOOK.md")).expect("runbook");
    for line in rules
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert: "))
    {
        let name = line.trim_start().trim_start_matches("- alert: ").trim();
        assert!(
            runbook.contains(&format!("## {name}")),
            "docs/RUNBOOK.md has no section for {name}"
        );
        let tests = std::fs::read_to_string(repo("config/prometheus/dbkeeper.rules.test.yml"))
            .expect("tests");
        assert!(
            tests.matches(&format!("alertname: {name}")).count() >= 2,
            "{name} needs a firing and a quiet test"
        );
    }
}

struct Prometheus {
    child: Child,
    port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Prometheus scraping dbkeeper with a default scrape config: no `honor_labels`, so
/// Prometheus's own `job` and `instance` labels win, as in most installations.
fn start_prometheus(w: &Workdir, target_port: u16) -> Prometheus {
    let port = free_port();
    let config = w.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: dbkeeper\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n",
            repo("config/prometheus/dbkeeper.rules.yml")
        ),
    )
    .expect("prometheus.yml");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            w.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(w.path().join("prometheus.log")).expect("log"))
        .spawn()
        .expect("prometheus must be installed (apt-get install prometheus; see .ci/run)");
    Prometheus { child, port }
}

/// State of `alert` for the dbkeeper job `job` in Prometheus: "pending", "firing", or
/// None.
fn alert_state(prom: &Prometheus, alert: &str, job: &str) -> Option<String> {
    let (code, body) = http_get(prom.port, "/api/v1/alerts")?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["alerts"].as_array()?.iter().find_map(|a| {
        // `job` is Prometheus's scrape job; dbkeeper's own job id is `job_id`.
        (a["labels"]["alertname"] == alert
            && a["labels"]["job_id"] == job
            && a["labels"]["job"] == "dbkeeper")
            .then(|| a["state"].as_str().unwrap_or("").to_owned())
    })
}

#[test]
fn a_real_prometheus_sees_a_failing_backup_alert_fire_and_resolve() {
    let w = Workdir::new();
    let key = w.key("k");
    let backup = format!(
        "[database.backup]\nschedule = \"every 2s\"\ndestination = \"{}\"\nencryption-key-file = \"{}\"\nkeep = {{ last = 2 }}\n",
        w.path().join("backups").display(),
        key.display()
    );
    // The database is unreachable: every backup fails.
    w.write_config(
        "probe-interval = \"1s\"",
        &format!(
            "[[database]]\nname = \"app\"\nurl = \"postgres://postgres@127.0.0.1:1/app\"\nconnect-timeout = \"1s\"\n{backup}"
        ),
    );
    let d = w.start();
    let prom = start_prometheus(&w, d.port);
    let log = || std::fs::read_to_string(w.path().join("prometheus.log")).unwrap_or_default();
    d.wait_for(
        "DbkeeperJobFailed pending or firing",
        Duration::from_secs(60),
        || {
            matches!(
                alert_state(&prom, "DbkeeperJobFailed", "app.backup").as_deref(),
                Some("pending" | "firing")
            )
        },
    );
    // Fix it: the same database name, now reachable; reload.
    w.write_config(
        "probe-interval = \"1s\"",
        &format!(
            "[[database]]\nname = \"app\"\nurl = \"{}\"\n{backup}",
            w.sqlite_url("app.db")
        ),
    );
    d.signal("HUP");
    d.wait_for("the alert resolves", Duration::from_secs(60), || {
        alert_state(&prom, "DbkeeperJobFailed", "app.backup").is_none()
            && d.metric(
                "dbkeeper_job_runs_total",
                &["job_id=\"app.backup\"", "result=\"success\""],
            )
            .unwrap_or(0.0)
                >= 1.0
    });
    dashboard_queries_return_data(&prom);
    assert!(
        !log().contains("level=error"),
        "prometheus reported errors:\n{}",
        log()
    );
}

/// Percent-encodes a query-string value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Runs an instant query; the result vector, or None if Prometheus refused it.
fn query(prom: &Prometheus, expr: &str) -> Option<Vec<serde_json::Value>> {
    let (code, body) = http_get(prom.port, &format!("/api/v1/query?query={}", encode(expr)))?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    (code == 200 && v["status"] == "success")
        .then(|| v["data"]["result"].as_array().cloned())
        .flatten()
}

/// Every query of the shipped dashboard, with its template variable filled in as
/// Grafana would (the one instance, regex-escaped), is accepted by Prometheus; those
/// over series that a failed-then-fixed backup job produces return data. Retention,
/// migration, refresh, query-gauge and table panels have no job of theirs here and
/// may be empty.
fn dashboard_queries_return_data(prom: &Prometheus) {
    // Nothing was renamed on the way in: the scrape job is `job`, the dbkeeper job
    // `job_id`.
    let renamed = query(prom, r#"{__name__=~"dbkeeper_.+", exported_job!=""}"#).expect("query");
    assert!(renamed.is_empty(), "series with exported_job: {renamed:?}");
    let runs = query(
        prom,
        r#"dbkeeper_job_runs_total{job="dbkeeper", job_id="app.backup"}"#,
    )
    .expect("query");
    assert_eq!(runs.len(), 2, "{runs:?}");
    // Backup series name their destination (the dashboard's legends and the rules use it).
    let unnamed = query(
        prom,
        r#"{__name__=~"dbkeeper_backups?_.+", destination=""}"#,
    )
    .expect("query");
    assert!(
        unnamed.is_empty(),
        "backup series without destination: {unnamed:?}"
    );
    let builds = query(prom, "dbkeeper_build_info").expect("build_info query");
    let instance = builds
        .first()
        .and_then(|b| b["metric"]["instance"].as_str())
        .expect("dbkeeper_build_info has Prometheus's instance label")
        .replace('.', "\\\\.");
    let text = std::fs::read_to_string(repo("config/grafana/dbkeeper.json")).expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let mut checked = 0;
    let mut empty = Vec::new();
    for _ in 0..100 {
        checked = 0;
        empty.clear();
        for panel in dash["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"]
                    .as_str()
                    .expect("expr")
                    .replace("$instance", &instance);
                let result = query(prom, &expr)
                    .unwrap_or_else(|| panic!("Prometheus refused {expr:?} of {}", panel["title"]));
                let optional = ["retention_", "migrations_", "refresh_", "query_", "table_"]
                    .iter()
                    .any(|m| expr.contains(&format!("dbkeeper_{m}")));
                if !optional {
                    checked += 1;
                    if result.is_empty() {
                        empty.push(format!("{}: {expr}", panel["title"]));
                    }
                }
            }
        }
        if empty.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(checked >= 10, "only {checked} dashboard queries checked");
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );
}

/// The dashboard is valid JSON, its data source is a template variable, and every
/// query uses metrics dbkeeper exports.
#[test]
fn grafana_dashboard_is_valid_and_uses_real_metrics() {
    let text = std::fs::read_to_string(repo("config/grafana/dbkeeper.json")).expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let vars = dash["templating"]["list"].as_array().expect("templating");
    assert!(vars
        .iter()
        .any(|v| v["type"] == "datasource" && v["name"] == "datasource"));
    let known: Vec<&str> = [
        dbkeeper::metrics::BUILD_INFO,
        dbkeeper::metrics::DATABASE_UP,
        dbkeeper::metrics::JOB_RUNS,
        dbkeeper::metrics::JOB_DURATION,
        dbkeeper::metrics::JOB_LAST_SUCCESS,
        dbkeeper::metrics::JOB_LAST_FAILURE,
        dbkeeper::metrics::JOB_NEXT_RUN,
        dbkeeper::metrics::JOB_RUNNING,
        dbkeeper::metrics::BACKUP_LAST_SIZE,
        dbkeeper::metrics::BACKUP_LAST_RAW_SIZE,
        dbkeeper::metrics::BACKUP_LAST_VERIFIED,
        dbkeeper::metrics::BACKUPS_STORED,
        dbkeeper::metrics::BACKUP_STORED_BYTES,
        dbkeeper::metrics::BACKUP_LAST_SUCCESS,
        dbkeeper::metrics::BACKUP_UPLOAD_FAILURES,
        dbkeeper::metrics::RETENTION_DELETED,
        dbkeeper::metrics::RETENTION_OLDEST,
        dbkeeper::metrics::RETENTION_MAX_AGE,
        dbkeeper::metrics::REFRESH_ROWS,
        dbkeeper::metrics::MIGRATIONS_PENDING,
        dbkeeper::metrics::MIGRATIONS_APPLIED_VERSION,
        dbkeeper::metrics::MIGRATIONS_CHECKSUM_MISMATCH,
        dbkeeper::metrics::QUERY_VALUE,
        dbkeeper::metrics::TABLE_BYTES,
    ]
    .to_vec();
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    // Prometheus owns the target labels: with a default scrape config a `job` label
    // from dbkeeper would arrive as `exported_job` and match nothing.
    let rules =
        std::fs::read_to_string(repo("config/prometheus/dbkeeper.rules.yml")).expect("rules");
    for (what, text) in [("dashboard", &text), ("rules", &rules)] {
        for bad in [
            "by (job)",
            "by (job,",
            "{{job}}",
            "$labels.job }}",
            "exported_job",
        ] {
            assert!(
                !text.contains(bad),
                "{what} uses {bad:?}; dbkeeper's label is job_id"
            );
        }
    }
    for panel in panels {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("dbkeeper_") {
                    let base = word.trim_end_matches("_bucket");
                    assert!(
                        known.contains(&base),
                        "panel {} uses unknown metric {word}",
                        panel["title"]
                    );
                }
            }
        }
    }
}

#[test]
fn notifications_reach_a_webhook_and_alertmanager_on_failure_and_recovery() {
    let (port, seen) = receiver(Answer::FailFirst);
    let w = Workdir::new();
    let db = w.path().join("app.db");
    w.write_config(
        "",
        &format!(
            "[notify]\nwebhook = \"http://127.0.0.1:{port}/hook/secret-token\"\nalertmanager = \"http://127.0.0.1:{port}\"\n\
             retries = 2\nretry-backoff = \"200ms\"\ntimeout = \"2s\"\n\
             [[database]]\nname = \"app\"\nurl = \"{}\"\n\
             [[database.sql]]\nname = \"count\"\nstatement = \"SELECT count(*) FROM later\"\nschedule = \"every 1s\"\n",
            w.sqlite_url("app.db")
        ),
    );
    let d = w.start();
    let events = |path: &str, kind: &str| {
        seen.lock()
            .expect("lock")
            .iter()
            .filter(|r| r.target.starts_with(path) && r.body.contains(kind))
            .count()
    };
    d.wait_for(
        "failure delivered to both, after a retry",
        Duration::from_secs(20),
        || {
            events("/hook/", "\"failure\"") >= 1
                && events("/api/v2/alerts", "DbkeeperJobFailed") >= 1
        },
    );
    common::sqlite(&db, "CREATE TABLE later (id int)");
    d.wait_for("recovery delivered", Duration::from_secs(20), || {
        events("/hook/", "\"recovery\"") >= 1
    });
    std::thread::sleep(Duration::from_millis(1500));
    let all = seen.lock().expect("lock").clone();
    let hooks: Vec<(&str, &str)> = all
        .iter()
        .filter(|r| r.target.starts_with("/hook/"))
        .map(|r| (r.target.as_str(), r.body.as_str()))
        .collect();
    // The first delivery got a 500 and was retried: the failure arrives twice at most,
    // and repeated failures do not notify again.
    let failures = hooks
        .iter()
        .filter(|(_, b)| b.contains("\"failure\""))
        .count();
    assert!((1..=2).contains(&failures), "{hooks:?}");
    let body: serde_json::Value = serde_json::from_str(hooks[0].1).expect("JSON");
    assert_eq!(body["job"], "app.sql.count");
    assert_eq!(body["database"], "app");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("no such table"),
        "{body}"
    );
    assert_eq!(
        hooks
            .iter()
            .filter(|(_, b)| b.contains("\"recovery\""))
            .count(),
        1
    );
    // Alertmanager gets the labels the scraped alert has: the job in `job_id`.
    let pushed = all
        .iter()
        .find(|r| r.target.starts_with("/api/v2/alerts"))
        .expect("an alert pushed");
    let alerts: serde_json::Value = serde_json::from_str(&pushed.body).expect("JSON");
    assert_eq!(alerts[0]["labels"]["job_id"], "app.sql.count", "{alerts}");
    assert!(alerts[0]["labels"].get("job").is_none(), "{alerts}");
    let log = d.log_text();
    assert!(
        !log.contains("secret-token"),
        "the webhook URL leaked into the log:\n{log}"
    );
}

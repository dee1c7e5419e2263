//! Replicas (`[daemon] coordination`): real binaries, a real PostgreSQL for the jobs and
//! for coordination, each replica with its own state directory and listener. Each test
//! creates (and drops) its own databases, so tests run in parallel.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{database, free_port, http_get, PgDb, Workdir, BIN};

/// Short leases keep the tests short; the production default is 20 s.
const LEASE: &str = "6s";

/// The `[daemon]` keys of a replica coordinating through `coord_url`.
fn replica_keys(coord_url: &str) -> String {
    format!("cluster = \"test\"\ncoordination = \"{coord_url}\"\nlease-timeout = \"{LEASE}\"\n")
}

/// `n` work directories with the same configuration (own state dir and port each).
fn replicas(n: usize, coord_url: &str, rest: &str) -> Vec<Workdir> {
    (0..n)
        .map(|_| {
            let w = Workdir::new();
            w.write_config(&replica_keys(coord_url), rest);
            w
        })
        .collect()
}

/// Starts every replica at once (no waiting in between), then waits for each to answer.
fn start_together(dirs: &[Workdir]) -> Vec<common::Daemon> {
    let daemons: Vec<common::Daemon> = dirs
        .iter()
        .map(|w| {
            let log = w.path().join(format!("daemon-{}.log", free_port()));
            let child = Command::new(BIN)
                .args(["run", "-c"])
                .arg(w.config_path())
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .spawn()
                .expect("start dbkeeper");
            common::Daemon {
                child,
                port: w.port,
                log,
            }
        })
        .collect();
    for d in &daemons {
        d.wait_for("/healthz answers", Duration::from_secs(30), || {
            http_get(d.port, "/healthz").is_some_and(|(code, _)| code == 200)
        });
    }
    daemons
}

fn members(d: &common::Daemon) -> f64 {
    d.metric("dbkeeper_cluster_members", &["cluster=\"test\""])
        .unwrap_or(-1.0)
}

fn wait_members(d: &common::Daemon, n: f64, within: Duration) {
    d.wait_for(&format!("{n} cluster members"), within, || members(d) == n);
}

fn stop(mut d: common::Daemon) {
    d.signal("TERM");
    d.wait_exit(Duration::from_secs(30));
}

fn kill(mut d: common::Daemon) {
    d.signal("KILL");
    d.wait_exit(Duration::from_secs(10));
}

fn claims(d: &common::Daemon, job: &str, result: &str) -> f64 {
    d.metric(
        "dbkeeper_job_claims_total",
        &[
            &format!("job_id=\"{job}\""),
            &format!("result=\"{result}\""),
        ],
    )
    .unwrap_or(0.0)
}

fn sql_job(name: &str, schedule: &str, statement: &str) -> String {
    format!("[[database.sql]]\nname = \"{name}\"\nschedule = \"{schedule}\"\nstatement = \"{statement}\"\n")
}

/// The database `app` with one `sql` job.
fn app_with_job(app: &PgDb, name: &str, schedule: &str, statement: &str) -> String {
    format!(
        "{}{}",
        database("app", &app.url, ""),
        sql_job(name, schedule, statement)
    )
}

/// Acceptance 1: three replicas, a PostgreSQL `sql` job every second inserting `now()`;
/// one replica is SIGKILLed and restarted mid-way. Every fire time runs at most once.
///
/// The job cannot see its fire time, so rows are bucketed by the second of `now()`:
/// `every 1s` slots of replicas lie on whole seconds and a run starts within
/// milliseconds of its slot (the claim is one round trip), so every run of slot `s`
/// inserts inside `[s, s+1)`; two runs of one fire time would share a bucket. The
/// claims table is checked too: one row per fire time, and as many successful claims
/// as inserted rows.
#[test]
fn three_replicas_run_each_second_once_while_one_is_killed_and_restarted() {
    let coord = PgDb::new("clu_coord");
    let app = PgDb::new("clu_app");
    app.sql("CREATE TABLE beats (at timestamptz NOT NULL)");
    let rest = app_with_job(
        &app,
        "beat",
        "every 1s",
        "INSERT INTO beats (at) VALUES (now())",
    );
    let dirs = replicas(3, &coord.url, &rest);
    let mut daemons = start_together(&dirs);
    wait_members(&daemons[0], 3.0, Duration::from_secs(30));
    daemons[0].wait_for("beats", Duration::from_secs(20), || {
        app.sql("SELECT count(*) FROM beats") != "0"
    });
    std::thread::sleep(Duration::from_secs(20));
    let killed_at = app.sql("SELECT extract(epoch FROM now())::bigint");
    kill(daemons.remove(1));
    // The others see it gone within the lease (plus one renewal round).
    daemons[0].wait_for("the killed replica gone", Duration::from_secs(12), || {
        members(&daemons[0]) == 2.0
    });
    daemons.insert(1, dirs[1].start());
    wait_members(&daemons[0], 3.0, Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(20));
    for d in daemons {
        stop(d);
    }

    let dups = app.sql(
        "SELECT count(*) FROM (SELECT date_trunc('second', at) FROM beats GROUP BY 1 HAVING count(*) > 1) d",
    );
    assert_eq!(
        dups,
        "0",
        "a second ran twice: {}",
        app.sql("SELECT string_agg(at::text, ', ' ORDER BY at) FROM beats")
    );
    // Gaps: seconds without a run between the first and last one.
    let span: i64 = app
        .sql("SELECT extract(epoch FROM date_trunc('second', max(at)) - date_trunc('second', min(at)))::bigint + 1 FROM beats")
        .parse()
        .expect("span");
    let seconds: i64 = app
        .sql("SELECT count(DISTINCT date_trunc('second', at)) FROM beats")
        .parse()
        .expect("count");
    assert!(span >= 50, "the test ran {span} s");
    let missing = app.sql(
        "SELECT coalesce(string_agg(s::text, ', '), '') FROM generate_series( \
           (SELECT date_trunc('second', min(at)) FROM beats), (SELECT date_trunc('second', max(at)) FROM beats), '1 second') s \
         WHERE NOT EXISTS (SELECT 1 FROM beats WHERE date_trunc('second', at) = s)",
    );
    // One tick may be lost around the kill (a slot claimed by the dying replica);
    // allow one more for a run delayed past its second on a loaded machine.
    assert!(
        span - seconds <= 2,
        "{} of {span} seconds had no run (killed at {killed_at}): {missing}",
        span - seconds
    );
    let coord_sql = |q: &str| coord.sql(q);
    assert_eq!(
        coord_sql("SELECT count(*) FROM (SELECT fire_at FROM dbkeeper.claims WHERE job = 'app.sql.beat' GROUP BY fire_at HAVING count(*) > 1) d"),
        "0"
    );
    let won: i64 = coord_sql(
        "SELECT count(*) FROM dbkeeper.claims WHERE job = 'app.sql.beat' AND result = 'success'",
    )
    .parse()
    .expect("count");
    let rows: i64 = app
        .sql("SELECT count(*) FROM beats")
        .parse()
        .expect("count");
    assert_eq!(won, rows, "every inserted row is one successful claim");
    let replicas_that_ran =
        coord_sql("SELECT count(DISTINCT replica) FROM dbkeeper.claims WHERE job = 'app.sql.beat'");
    assert!(
        replicas_that_ran.parse::<i64>().expect("count") >= 2,
        "the work is shared"
    );
}

/// A `pg-dump` stand-in that, while `marker` exists, writes part of a real dump and
/// then hangs (a long backup); without the marker it is the real `pg_dump`.
fn slow_pg_dump(dir: &Path, marker: &Path) -> std::path::PathBuf {
    common::write_script(
        dir,
        "slow-pg-dump",
        &format!(
            "#!/bin/sh\nif [ -e '{m}' ]; then\n  pg_dump \"$@\" | head -c 200000\n  while [ -e '{m}' ]; do sleep 0.2; done\n  exit 1\nfi\nexec pg_dump \"$@\"\n",
            m = marker.display()
        ),
    )
}

/// Acceptance 2: a long backup runs on replica A; A is SIGKILLed. Within the lease
/// timeout B reports A gone, B runs the backup (taking over the interrupted one), and
/// the interrupted backup leaves no visible partial archive.
#[test]
fn a_killed_replicas_backup_is_taken_over_and_leaves_no_partial_archive() {
    let coord = PgDb::new("clu_coord");
    let app = PgDb::new("clu_app");
    app.sql("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g");
    let shared = Workdir::new();
    let key = shared.key("backup.key");
    let dest = shared.path().join("backups");
    let marker = shared.path().join("slow");
    std::fs::write(&marker, "").expect("marker");
    let dump = slow_pg_dump(shared.path(), &marker);
    let backup = format!(
        "[database.backup]\nschedule = \"every 20s\"\ndestination = \"{}\"\nencryption-key-file = \"{}\"\npg-dump = \"{}\"\nverify = \"read\"\n",
        dest.display(),
        key.display(),
        dump.display()
    );
    let rest = database("app", &app.url, &backup);
    let dirs = replicas(2, &coord.url, &rest);
    // Start just after a 20 s slot: the start-up (missed) run is claimed at once, and
    // the next slot comes after A's lease was renewed, which is when other replicas
    // see the run as going (a run younger than a sixth of the lease is not guarded).
    while !(1..=3).contains(
        &(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            % 20),
    ) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut daemons = start_together(&dirs);
    wait_members(&daemons[0], 2.0, Duration::from_secs(30));
    // Whoever claims the slot is A.
    let running = |d: &common::Daemon| {
        d.metric("dbkeeper_job_running", &["job_id=\"app.backup\""]) == Some(1.0)
    };
    let started = Instant::now();
    let a = loop {
        if let Some(i) = daemons.iter().position(running) {
            break i;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no backup started; logs:\n{}\n{}",
            daemons[0].log_text(),
            daemons[1].log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let b = 1 - a;
    // Long enough for A's lease to be renewed: B's next claims see the run going.
    std::thread::sleep(Duration::from_secs(4));
    assert!(!running(&daemons[b]), "the backup runs on one replica only");
    let a_daemon = daemons.remove(a);
    let b_daemon = daemons.remove(0);
    kill(a_daemon);
    let killed = Instant::now();
    // The dump stand-in of A exits; B's own backups are fast from now on.
    std::fs::remove_file(&marker).expect("marker");
    wait_members(&b_daemon, 1.0, Duration::from_secs(10));
    let seen_gone = killed.elapsed();
    assert!(
        seen_gone <= Duration::from_secs(6 + 2 + 1),
        "B saw A gone after {seen_gone:?} (lease 6 s + one round)"
    );
    assert!(b_daemon.log_text().contains("replica gone"));
    // B takes the interrupted backup over at once (missed = "run-once"), then runs the
    // next scheduled slot too.
    b_daemon.wait_for("B backs up twice", Duration::from_secs(45), || {
        b_daemon.metric(
            "dbkeeper_job_runs_total",
            &["job_id=\"app.backup\"", "result=\"success\""],
        ) >= Some(2.0)
    });
    assert!(
        coord.sql("SELECT count(*) FROM dbkeeper.claims WHERE job = 'app.backup' AND trigger = 'schedule' AND result = 'success'") != "0",
        "a scheduled slot ran on B"
    );
    let interrupted = coord.sql(
        "SELECT count(*) FROM dbkeeper.claims WHERE job = 'app.backup' AND message LIKE '%stopped renewing%'",
    );
    assert!(
        interrupted == "1"
            || coord.sql(
                "SELECT count(*) FROM dbkeeper.claims WHERE job = 'app.backup' AND attempt > 1"
            ) == "1",
        "A's claim was found interrupted"
    );
    let status: serde_json::Value =
        serde_json::from_str(&b_daemon.get("/status").1).expect("status JSON");
    assert_eq!(
        status["cluster"]["members"].as_array().map(Vec::len),
        Some(1)
    );
    let replica_b = status["cluster"]["replica"]
        .as_str()
        .expect("replica")
        .to_owned();
    let job = status["jobs"]
        .as_array()
        .and_then(|j| j.iter().find(|j| j["job"] == "app.backup"))
        .expect("backup job");
    assert_eq!(job["last_replica"].as_str(), Some(replica_b.as_str()));
    stop(b_daemon);

    // No partial archive: every listed backup is whole, and every file in the
    // destination is a finished archive with its manifest or a hidden temp file.
    let list = dirs[b].stdout(&["backup", "list", "app"]);
    assert!(!list.trim().is_empty(), "B's backup is listed");
    for line in list.lines().skip(1) {
        assert!(
            !line.contains("untrusted") && !line.contains("broken") && !line.contains("missing"),
            "{list}"
        );
    }
    let mut names = Vec::new();
    for entry in walk(&dest) {
        let name = entry
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_owned();
        names.push(name.clone());
        if name.starts_with('.') {
            continue;
        }
        if let Some(id) = name.strip_suffix(".dbk") {
            assert!(
                entry.with_file_name(format!("{id}.manifest.json")).exists(),
                "archive {name} has no manifest: {names:?}"
            );
        } else {
            assert!(
                name.ends_with(".manifest.json") || name.ends_with(".json"),
                "stray file {name}"
            );
        }
    }
    let verify = dirs[b]
        .cmd(&["backup", "verify", "app", "--backup", "latest"])
        .output()
        .expect("verify");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Acceptance 3: three replicas start together with a pending migration on `@startup`:
/// it is applied once, one claim wins, the other replicas count a lost claim.
#[test]
fn three_replicas_started_together_apply_a_startup_migration_once() {
    let coord = PgDb::new("clu_coord");
    let app = PgDb::new("clu_app");
    let shared = Workdir::new();
    let dir = shared.path().join("migrations");
    common::write_file(
        &dir,
        "1_notes.sql",
        "CREATE TABLE notes (id bigint PRIMARY KEY); SELECT pg_sleep(1); \
         CREATE TABLE applied (at timestamptz DEFAULT now()); INSERT INTO applied DEFAULT VALUES;",
    );
    let rest = database(
        "app",
        &app.url,
        &format!(
            "[database.migrate]\ndir = \"{}\"\nschedule = \"@startup\"\nbackup-first = false\n",
            dir.display()
        ),
    );
    let dirs = replicas(3, &coord.url, &rest);
    let daemons = start_together(&dirs);
    for d in &daemons {
        d.wait_for("the claim decided", Duration::from_secs(30), || {
            claims(d, "app.migrate", "won") + claims(d, "app.migrate", "lost") >= 1.0
        });
    }
    let won: f64 = daemons
        .iter()
        .map(|d| claims(d, "app.migrate", "won"))
        .sum();
    let lost: f64 = daemons
        .iter()
        .map(|d| claims(d, "app.migrate", "lost"))
        .sum();
    assert_eq!((won, lost), (1.0, 2.0));
    for d in &daemons {
        d.wait_for("the migration in", Duration::from_secs(30), || {
            app.sql("SELECT count(*) FROM pg_tables WHERE tablename = 'applied'") == "1"
        });
    }
    assert_eq!(app.sql("SELECT count(*) FROM _sqlx_migrations"), "1");
    assert_eq!(app.sql("SELECT count(*) FROM applied"), "1");
    assert_eq!(
        coord.sql("SELECT count(*) || ' ' || count(DISTINCT replica) FROM dbkeeper.claims WHERE job = 'app.migrate'"),
        "1 1"
    );
    for d in &daemons {
        assert_eq!(
            d.metric(
                "dbkeeper_job_skipped_total",
                &["job_id=\"app.migrate\"", "reason=\"claimed-elsewhere\""]
            ),
            Some(claims(d, "app.migrate", "lost"))
        );
    }
    for d in daemons {
        stop(d);
    }
}

/// A TCP proxy in front of PostgreSQL that can be taken down: while down, it cuts
/// every open connection and refuses new ones (as a stopped server would).
struct Proxy {
    port: u16,
    down: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: &'static str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let down = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (d, o) = (down.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if d.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    let mut conns = o.lock().expect("lock");
                    conns.push(c2);
                    conns.push(s2);
                }
                pipe(&client, &server);
                pipe(&server, &client);
            }
        });
        Proxy { port, down, open }
    }

    /// A proxy in front of `db`, and the URL of `db` through it.
    fn in_front_of(db: &PgDb) -> (Proxy, String) {
        let proxy = Proxy::start("127.0.0.1:5432");
        let url = format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, db.name);
        (proxy, url)
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            for c in self.open.lock().expect("lock").drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }
}

fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// Acceptance 4: the coordination database is unreachable for 10 s. Nothing runs
/// twice (nothing runs at all meanwhile: the skip is counted and the gauge drops), and
/// the jobs resume afterwards.
#[test]
fn coordination_down_for_ten_seconds_runs_nothing_twice_and_resumes() {
    let coord = PgDb::new("clu_coord");
    let app = PgDb::new("clu_app");
    app.sql("CREATE TABLE beats (at timestamptz NOT NULL)");
    let (proxy, via_proxy) = Proxy::in_front_of(&coord);
    let rest = app_with_job(
        &app,
        "beat",
        "every 1s",
        "INSERT INTO beats (at) VALUES (now())",
    );
    let dirs = replicas(2, &via_proxy, &rest);
    let daemons = start_together(&dirs);
    wait_members(&daemons[0], 2.0, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(5));
    let up = |d: &common::Daemon| d.metric("dbkeeper_coordination_up", &["cluster=\"test\""]);
    assert_eq!(up(&daemons[0]), Some(1.0));

    proxy.set_down(true);
    let down_at = app.sql("SELECT now()");
    for d in &daemons {
        d.wait_for("coordination_up 0", Duration::from_secs(5), || {
            up(d) == Some(0.0)
        });
    }
    std::thread::sleep(Duration::from_secs(10));
    let unavailable: f64 = daemons
        .iter()
        .map(|d| {
            d.metric(
                "dbkeeper_job_skipped_total",
                &[
                    "job_id=\"app.sql.beat\"",
                    "reason=\"coordination-unavailable\"",
                ],
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert!(unavailable >= 10.0, "skips while down: {unavailable}");
    // Runs that started in the first moment of the outage may still land; nothing after.
    let during = app.sql(&format!(
        "SELECT count(*) FROM beats WHERE at > '{down_at}'::timestamptz + interval '2 seconds'"
    ));
    proxy.set_down(false);
    assert_eq!(
        during, "0",
        "jobs ran while the coordination database was down"
    );
    for d in &daemons {
        d.wait_for("coordination_up 1", Duration::from_secs(10), || {
            up(d) == Some(1.0)
        });
        let outages = d
            .log_text()
            .matches("coordination database unavailable")
            .count();
        assert_eq!(outages, 1, "logged once per outage:\n{}", d.log_text());
    }
    let resumed_from = app.sql("SELECT now()");
    std::thread::sleep(Duration::from_secs(5));
    let after: i64 = app
        .sql(&format!(
            "SELECT count(*) FROM beats WHERE at > '{resumed_from}'"
        ))
        .parse()
        .expect("count");
    assert!(
        after >= 3,
        "jobs resumed: {after} runs in 5 s\n{}\n{}",
        daemons[0].log_text(),
        daemons[1].log_text()
    );
    for d in daemons {
        stop(d);
    }
    assert_eq!(
        app.sql("SELECT count(*) FROM (SELECT date_trunc('second', at) FROM beats GROUP BY 1 HAVING count(*) > 1) d"),
        "0",
        "no second ran twice"
    );
    // Runs of a second are never renewed: a renewed claim is one kept alive after its
    // run (its result could not be recorded during the outage), which would block the
    // job on every replica.
    assert_eq!(
        coord.sql("SELECT count(*) FROM dbkeeper.claims WHERE renewals > 0"),
        "0"
    );
}

/// Without `coordination` nothing of the cluster shows: no series, no status section.
#[test]
fn a_single_daemon_has_no_cluster_series() {
    let w = Workdir::new();
    w.write_config(
        "",
        &format!(
            "{}{}",
            database("app", &w.sqlite_url("app.db"), ""),
            sql_job("one", "every 1h", "SELECT 1")
        ),
    );
    let d = w.start();
    d.wait_for("job series", Duration::from_secs(20), || {
        d.metric("dbkeeper_job_running", &["job_id=\"app.sql.one\""])
            .is_some()
    });
    let text = d.metrics();
    for name in [
        "dbkeeper_cluster_members",
        "dbkeeper_coordination_up",
        "dbkeeper_job_claims_total",
        "claimed-elsewhere",
    ] {
        assert!(!text.contains(name), "{name} in a single daemon's metrics");
    }
    let status: serde_json::Value = serde_json::from_str(&d.get("/status").1).expect("JSON");
    assert!(status.get("cluster").is_none());
}

/// `config/examples/replicas.toml` as shipped (machine paths and URLs pointed at this
/// test's): a replica joins, `dbkeeper jobs` shows the cluster, and `run-job` runs
/// without a claim.
#[test]
fn the_shipped_replicas_example_runs_and_jobs_shows_the_cluster() {
    let coord = PgDb::new("clu_coord");
    let app = PgDb::new("clu_app");
    app.sql("CREATE TABLE sessions (expires_at timestamptz)");
    let w = Workdir::new();
    let key = w.key("backup.key");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/replicas.toml");
    let mut text = std::fs::read_to_string(path).expect("example");
    let root = w.path().display().to_string();
    for (from, to) in [
        ("/var/lib/dbkeeper", format!("{root}/state")),
        ("/var/backups", format!("{root}/backups")),
        ("127.0.0.1:9736", format!("127.0.0.1:{}", w.port)),
        (
            "postgres://dbkeeper@127.0.0.1:5432/wards",
            coord.url.clone(),
        ),
        ("postgres://wards@127.0.0.1:5432/wards", app.url.clone()),
        ("/etc/dbkeeper/backup.key", key.display().to_string()),
    ] {
        assert!(text.contains(from), "the example mentions {from}");
        text = text.replace(from, &to);
    }
    std::fs::write(w.config_path(), text).expect("config");
    // Before any replica ran: reachable, nobody alive.
    let check = w.stdout(&["check"]);
    assert!(
        check.contains("coordination database (cluster wards): reachable, 0 replica(s) alive"),
        "{check}"
    );
    let d = w.start();
    d.wait_for("the replica joined", Duration::from_secs(30), || {
        d.metric("dbkeeper_cluster_members", &["cluster=\"wards\""]) == Some(1.0)
    });
    let out = w.stdout(&["run-job", "wards.sql.expire-sessions"]);
    assert!(!out.contains("claimed"), "{out}");
    assert_eq!(
        coord.sql("SELECT count(*) FROM dbkeeper.claims WHERE job = 'wards.sql.expire-sessions'"),
        "0",
        "run-job is not claimed"
    );
    // The start-up backup (missed = run-once) ran here, claimed.
    d.wait_for(
        "the backup claimed and done",
        Duration::from_secs(60),
        || {
            claims(&d, "wards.backup", "won") == 1.0
                && d.metric("dbkeeper_job_running", &["job_id=\"wards.backup\""]) == Some(0.0)
        },
    );
    let status: serde_json::Value = serde_json::from_str(&d.get("/status").1).expect("JSON");
    let me = status["cluster"]["replica"]
        .as_str()
        .expect("replica")
        .to_owned();
    d.wait_for("the result recorded", Duration::from_secs(20), || {
        coord.sql("SELECT count(*) FROM dbkeeper.jobs_last WHERE job = 'wards.backup'") == "1"
    });
    let jobs = w.stdout(&["jobs"]);
    assert!(jobs.contains("LAST REPLICA"), "{jobs}");
    assert!(jobs.contains("cluster wards: 1 replica(s) alive"), "{jobs}");
    let backup_row = jobs
        .lines()
        .find(|l| l.starts_with("wards.backup"))
        .expect("backup row");
    assert!(backup_row.contains(&me), "{jobs}");
    stop(d);
}

/// Self-fencing: a replica that cannot renew the lease of its running job cancels the
/// job (the statement is cancelled on the server) before the lease runs out, so that no
/// other replica can run the same claim at the same time.
#[test]
fn a_replica_cut_off_from_coordination_cancels_its_running_job_within_the_lease() {
    let coord = PgDb::new("clu_coord");
    let app = PgDb::new("clu_app");
    let (proxy, via_proxy) = Proxy::in_front_of(&coord);
    let rest = app_with_job(&app, "long", "@startup", "SELECT pg_sleep(120)");
    let dirs = replicas(1, &via_proxy, &rest);
    let d = dirs[0].start();
    d.wait_for("the long job runs", Duration::from_secs(20), || {
        app.sleeping_sessions() == 1
    });
    // Renewed once (it is older than a sixth of the lease): a long run.
    d.wait_for("the claim renewed", Duration::from_secs(10), || {
        coord.sql(
            "SELECT coalesce(max(renewals), 0) FROM dbkeeper.claims WHERE job = 'app.sql.long'",
        ) != "0"
    });
    proxy.set_down(true);
    let cut = Instant::now();
    d.wait_for("the run cancelled", Duration::from_secs(10), || {
        d.metric(
            "dbkeeper_job_runs_total",
            &["job_id=\"app.sql.long\"", "result=\"failure\""],
        ) == Some(1.0)
    });
    // Fenced at two thirds of the 6 s lease (checked every half second), well before
    // the lease could have run out in the database.
    assert!(
        cut.elapsed() < Duration::from_secs(6),
        "cancelled after {:?}",
        cut.elapsed()
    );
    d.wait_for("the statement gone", Duration::from_secs(10), || {
        app.sleeping_sessions() == 0
    });
    assert!(
        d.log_text().contains("cannot renew the lease"),
        "{}",
        d.log_text()
    );
    proxy.set_down(false);
    // Back: the claim is found expired and marked interrupted (not run again: an sql job).
    d.wait_for("the claim closed", Duration::from_secs(20), || {
        coord.sql("SELECT count(*) FROM dbkeeper.claims WHERE job = 'app.sql.long' AND finished_at IS NULL") == "0"
    });
    stop(d);
}

/// Adversary round of issue 17, case 08: replica A stores its backup but loses the
/// coordination database just before it can record the result, so its claim expires
/// as interrupted. That backup was not cut short: B must not run the fire time again
/// (two full dumps and two rotation slots for one fire time).
#[test]
fn a_backup_stored_before_its_replica_lost_the_lease_is_not_taken_over() {
    let coord = PgDb::new("clu_coord");
    let app = PgDb::new("clu_app");
    app.sql("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g");
    let shared = Workdir::new();
    let key = shared.key("backup.key");
    let dest = shared.path().join("backups");
    let marker = shared.path().join("hold");
    std::fs::write(&marker, "").expect("marker");
    // Waits while the marker exists, then dumps for real.
    let dump = common::write_script(
        shared.path(),
        "held-pg-dump",
        &format!(
            "#!/bin/sh\nwhile [ -e '{m}' ]; do sleep 0.1; done\nexec pg_dump \"$@\"\n",
            m = marker.display()
        ),
    );
    let backup = format!(
        "[database.backup]\nschedule = \"every 1h\"\ndestination = \"{}\"\nencryption-key-file = \"{}\"\npg-dump = \"{}\"\nverify = \"read\"\nkeep = {{ last = -1 }}\n",
        dest.display(),
        key.display(),
        dump.display()
    );
    let rest = database("app", &app.url, &backup);
    let (proxy, via_proxy) = Proxy::in_front_of(&coord);
    let a_dir = Workdir::new();
    a_dir.write_config(&replica_keys(&via_proxy), &rest);
    let b_dir = Workdir::new();
    b_dir.write_config(&replica_keys(&coord.url), &rest);
    // A alone at first: it claims the start-up (missed) run and holds in the dump.
    let a = start_together(std::slice::from_ref(&a_dir)).remove(0);
    a.wait_for("A runs the backup", Duration::from_secs(30), || {
        a.metric("dbkeeper_job_running", &["job_id=\"app.backup\""]) == Some(1.0)
    });
    let b = start_together(std::slice::from_ref(&b_dir)).remove(0);
    wait_members(&b, 2.0, Duration::from_secs(30));
    // A's lease was renewed (a third of 6 s); now A loses the coordination database
    // and its dump goes on at once: it stores the backup well before it would fence.
    std::thread::sleep(Duration::from_secs(3));
    proxy.set_down(true);
    std::fs::remove_file(&marker).expect("marker");
    a.wait_for("A's backup succeeds", Duration::from_secs(4), || {
        a.metric(
            "dbkeeper_job_runs_total",
            &["job_id=\"app.backup\"", "result=\"success\""],
        ) == Some(1.0)
    });
    // B sees the claim expire (lease 6 s) and decides about a takeover.
    b.wait_for(
        "B decides about the interrupted backup",
        Duration::from_secs(20),
        || b.log_text().contains("not taken over") || b.log_text().contains("taking over"),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        b.log_text().contains("not taken over"),
        "B took the stored backup over:\n{}",
        b.log_text()
    );
    assert_eq!(
        common::archives(&dest, "app").len(),
        1,
        "one backup for one fire time; A:\n{}\nB:\n{}",
        a.log_text(),
        b.log_text()
    );
    proxy.set_down(false);
    stop(b);
    stop(a);
}

//! Helpers for the integration tests: the real binary in a temporary directory, a
//! throw-away PostgreSQL database per test, and a tiny HTTP client.
#![allow(dead_code)] // each test binary uses a different subset

pub mod s3;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_dbkeeper");

/// Server URL for test databases (no database name); override with
/// `DBKEEPER_TEST_PG=postgres://user@host:port`.
pub fn pg_server() -> String {
    std::env::var("DBKEEPER_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// A PostgreSQL database created for one test and dropped afterwards.
pub struct PgDb {
    pub name: String,
    pub url: String,
}

impl PgDb {
    /// Creates a fresh database.
    pub fn new(tag: &str) -> Self {
        let db = Self::unused(tag);
        psql(
            &format!("{}/postgres", pg_server()),
            &format!("CREATE DATABASE {}", db.name),
        );
        db
    }

    /// A name for a database that does not exist yet (dropped at the end if created).
    pub fn unused(tag: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "dbk_{tag}_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        PgDb {
            url: format!("{}/{name}", pg_server()),
            name,
        }
    }

    pub fn exists(&self) -> bool {
        psql(
            &format!("{}/postgres", pg_server()),
            &format!(
                "SELECT count(*) FROM pg_database WHERE datname = '{}'",
                self.name
            ),
        ) == "1"
    }

    pub fn sql(&self, sql: &str) -> String {
        psql(&self.url, sql)
    }

    /// Other sessions on this database currently running a statement that calls
    /// `pg_sleep(`.
    pub fn sleeping_sessions(&self) -> u32 {
        self.sql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
             AND query LIKE '%pg_sleep(%' AND state = 'active' AND pid <> pg_backend_pid()",
            self.name
        ))
        .parse()
        .expect("a count")
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([&format!("{}/postgres", pg_server()), "-qAtc"])
            .arg(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .output();
    }
}

/// Runs SQL with psql and returns its unaligned output; panics on failure.
pub fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .output()
        .expect("psql must be installed (see .ci/run)");
    assert!(
        out.status.success(),
        "psql {sql:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// A temporary directory with a config file in it.
pub struct Workdir {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Workdir {
    pub fn new() -> Self {
        Workdir {
            dir: tempfile::tempdir().expect("temp dir"),
            port: free_port(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("dbkeeper.toml")
    }

    /// Writes the config: a `[daemon]` table pointing at this directory and port,
    /// then `rest` (databases and jobs). `daemon_extra` goes inside `[daemon]`.
    pub fn write_config(&self, daemon_extra: &str, rest: &str) {
        let text = format!(
            "[daemon]\nstate-dir = \"{}\"\nlisten = \"127.0.0.1:{}\"\n{daemon_extra}\n\n{rest}\n",
            self.path().join("state").display(),
            self.port
        );
        std::fs::write(self.config_path(), text).expect("write config");
    }

    pub fn sqlite_url(&self, file: &str) -> String {
        format!("sqlite://{}?mode=rwc", self.path().join(file).display())
    }

    /// `dbkeeper <args> -c <config>` as an assert_cmd command.
    pub fn cmd(&self, args: &[&str]) -> assert_cmd::Command {
        let mut cmd = assert_cmd::Command::new(BIN);
        cmd.args(args)
            .arg("-c")
            .arg(self.config_path())
            .env("RUST_LOG", "info");
        cmd
    }

    /// Runs `dbkeeper <args> -c <config>`, asserts success and returns stdout.
    pub fn stdout(&self, args: &[&str]) -> String {
        let out = self
            .cmd(args)
            .assert()
            .success()
            .get_output()
            .stdout
            .clone();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Creates a key file with `dbkeeper key generate` and returns its path.
    pub fn key(&self, name: &str) -> PathBuf {
        let path = self.path().join(name);
        assert_cmd::Command::new(BIN)
            .args(["key", "generate", "-o"])
            .arg(&path)
            .assert()
            .success();
        path
    }

    /// Starts `dbkeeper run` and waits until `/healthz` answers.
    pub fn start(&self) -> Daemon {
        self.start_with_env(&[])
    }

    /// [`Workdir::start_with_env`] with owned pairs, e.g. `S3Server::env()`.
    pub fn start_with_envs(&self, env: &[(String, String)]) -> Daemon {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.start_with_env(&env)
    }

    pub fn start_with_env(&self, env: &[(&str, &str)]) -> Daemon {
        let mut port = self.port;
        for _ in 0..5 {
            let log = self.path().join(format!("daemon-{}.log", free_port()));
            let child = Command::new(BIN)
                .args(["run", "-c"])
                .arg(self.config_path())
                .env("RUST_LOG", "info")
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .spawn()
                .expect("start dbkeeper");
            let mut daemon = Daemon { child, port, log };
            // Ours answering, not whatever else took the port between `free_port` and
            // the daemon's bind (another test's process): then try another port.
            let mut lost_port = false;
            daemon.wait_for("/healthz answers", Duration::from_secs(30), || {
                lost_port = daemon.log_text().contains("Address already in use");
                lost_port || http_get(daemon.port, "/healthz").is_some_and(|(code, _)| code == 200)
            });
            if !lost_port {
                return daemon;
            }
            let _ = daemon.child.wait();
            let next = free_port();
            let config = std::fs::read_to_string(self.config_path()).expect("config");
            std::fs::write(
                self.config_path(),
                config.replace(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{next}")),
            )
            .expect("config");
            port = next;
        }
        panic!("no free port for the daemon after 5 tries");
    }
}

/// A running `dbkeeper run`; killed on drop.
pub struct Daemon {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, path)
            .unwrap_or_else(|| panic!("GET {path} failed; log:\n{}", self.log_text()))
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics").1
    }

    /// Value of the series `name{labels}`; `labels` is a substring of the label set,
    /// e.g. `job_id="db.sql.ok",` or `result="success"`.
    pub fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        metric_value(&self.metrics(), name, labels)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `cond` every 100 ms; panics with the daemon log after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out waiting for: {what}\n--- daemon log ---\n{}",
            self.log_text()
        );
    }

    /// Waits for the process to exit and returns its status and how long it took.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status, start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "dbkeeper did not exit within {timeout:?}\n{}",
            self.log_text()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on 127.0.0.1:port; `None` if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some((code, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Finds `name{...labels...} value` in Prometheus text output.
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let series = l.rsplit_once(' ').map_or("", |(s, _)| s);
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name
                && labels
                    .iter()
                    .all(|want| rest.contains(want.trim_end_matches(',')))
        })
        .find_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
}

/// A `[[database]]` table; `extra` goes inside it (keys before any job table).
pub fn database(name: &str, url: &str, extra: &str) -> String {
    format!("[[database]]\nname = \"{name}\"\nurl = \"{url}\"\n{extra}\n")
}

/// Asserts that `promtool check metrics` accepts a scrape.
pub fn promtool_check_metrics(scrape: &str) {
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(scrape.as_bytes())?;
            child.wait_with_output()
        })
        .expect("promtool must be installed (apt-get install prometheus; see .ci/run)");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs SQL on a SQLite file with the sqlite3 shell; panics on failure. It waits up
/// to 10 s for another process's lock instead of failing with "database is locked".
pub fn sqlite(path: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3")
        .args(["-cmd", ".timeout 10000"])
        .arg(path)
        .arg(sql)
        .output()
        .expect("sqlite3 must be installed (see .ci/run)");
    assert!(
        out.status.success(),
        "sqlite3 {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes `text` to `dir/name`, creating `dir` if needed; returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// Writes an executable shell script (a stand-in program, e.g. a misbehaving pg_dump).
pub fn write_script(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = write_file(dir, name, text);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

impl Workdir {
    /// The rows of every retention archive in `dir` (relative to this directory),
    /// decrypted with `dbkeeper decrypt`: one JSON value per archived row.
    pub fn archived_rows(&self, dir: &str) -> Vec<serde_json::Value> {
        let mut rows = Vec::new();
        for entry in std::fs::read_dir(self.path().join(dir)).expect("archive dir") {
            let path = entry.expect("entry").path();
            if !path.to_string_lossy().ends_with(".dbk") {
                continue;
            }
            let out = self.stdout(&["decrypt", path.to_str().expect("utf-8")]);
            rows.extend(
                out.lines()
                    .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line")),
            );
        }
        rows
    }
}

/// A `[database.backup]` table writing to `dest`, encrypted with `key` (or plain).
pub fn backup_table(dest: &Path, key: Option<&Path>, extra: &str) -> String {
    let enc = match key {
        Some(k) => format!("encryption-key-file = \"{}\"", k.display()),
        None => "encryption = \"none\"".to_owned(),
    };
    format!(
        "[database.backup]\nschedule = \"manual\"\ndestination = \"{}\"\n{enc}\n{extra}\n",
        dest.display()
    )
}

/// A `[[database]]` entry for `<workdir>/<name>.db`, followed by `backup`.
pub fn sqlite_db(w: &Workdir, name: &str, backup: &str) -> String {
    format!(
        "[[database]]\nname = \"{name}\"\nurl = \"sqlite://{}\"\n{backup}",
        w.path().join(format!("{name}.db")).display()
    )
}

/// The comment dbkeeper puts on the scratch databases it creates; its clean-up drops
/// only databases that carry it (a leftover of a crashed run is made with it here).
pub const SCRATCH_MARK: &str = "dbkeeper scratch database: dropped when its owner is gone";

/// Marks the database `name` as a dbkeeper scratch database ([`SCRATCH_MARK`]).
pub fn mark_scratch(name: &str) {
    psql(
        &format!("{}/postgres", pg_server()),
        &format!("COMMENT ON DATABASE \"{name}\" IS '{SCRATCH_MARK}'"),
    );
}

/// A file system mounted on `dir` while it lives, unmounted when dropped (also when
/// a test fails). Root only.
pub struct Mount(PathBuf);

impl Mount {
    /// A tmpfs of `size` (e.g. `"3m"`) on `dir` (created): a small disk.
    pub fn tmpfs(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        Self::run(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            dir,
        )
    }

    /// `source` bind-mounted on `dir` (created): the same folder by another path.
    pub fn bind(source: &Path, dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        Self::run(&["--bind", source.to_str().expect("utf-8")], dir)
    }

    fn run(args: &[&str], dir: &Path) -> Self {
        let mounted = std::process::Command::new("mount")
            .args(args)
            .arg(dir)
            .status()
            .expect("mount");
        assert!(mounted.success(), "mounting needs root");
        Mount(dir.to_owned())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The archives in `<dest>/<db>/`, sorted.
pub fn archives(dest: &Path, db: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dest.join(db))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.to_string_lossy().ends_with(".dbk"));
    v.sort();
    v
}

/// A two-worker tokio runtime for tests that talk to databases from this process.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// One request a [`receiver`] got.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// Path and query, e.g. `/hook/token?state=run`.
    pub target: String,
    pub body: String,
}

/// What a [`receiver`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 200 to everything.
    Ok,
    /// 500 to the first request (to exercise retries), 200 to the rest.
    FailFirst,
    /// Reads the request, then never answers (the connection stays open).
    Hang,
}

pub type Requests = std::sync::Arc<std::sync::Mutex<Vec<Received>>>;

/// A local HTTP receiver on a thread: records every request in arrival order.
pub fn receiver(answer: Answer) -> (u16, Requests) {
    use std::io::{BufRead, BufReader};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen: Requests = Default::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut hung = Vec::new();
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let mut words = request_line.split_whitespace();
            log.lock().expect("lock").push(Received {
                method: words.next().unwrap_or("").to_owned(),
                target: words.next().unwrap_or("").to_owned(),
                body: String::from_utf8_lossy(&body).into_owned(),
            });
            let status = match answer {
                Answer::Hang => {
                    hung.push(stream);
                    continue;
                }
                Answer::FailFirst if n == 0 => "500 Internal Server Error",
                _ => "200 OK",
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (port, seen)
}

/// What [`plant_backup`] writes: a backup of `name` (`backend`, `image`) made at
/// `created` with `kind`.
pub struct Planted<'a> {
    pub name: &'a str,
    pub backend: &'a str,
    pub image: &'a str,
    pub created: chrono::DateTime<chrono::Utc>,
    pub kind: dbkeeper::repo::catalog::BackupKind,
}

/// Writes a genuine, encrypted backup (archive and manifest, gzip) of `source` into
/// `<dest>/<name>/`, as a holder of the key could; returns its id.
pub fn plant_backup(dest: &Path, key: &Path, what: Planted<'_>, source: impl Read) -> String {
    use dbkeeper::repo::archive::{self, format, Compression, Header, Key, Settings};
    use dbkeeper::repo::catalog::{Manifest, Verification, VerifyMode, VerifyResult};
    use dbkeeper::repo::storage::{Destination, Storage};
    let key = Key::load(key).expect("key");
    let id = format!(
        "{}-{}",
        what.created.format("%Y%m%dT%H%M%SZ"),
        what.kind.as_str()
    );
    let dest = Destination::new(dest, what.name);
    dest.prepare().expect("dest");
    let out = std::fs::File::create(dest.path(&format!("{id}.dbk"))).expect("archive");
    let settings = Settings {
        header: Header {
            database: what.name.into(),
            backend: what.backend.into(),
            image: what.image.into(),
            created: what.created,
            compression: Compression::Gzip,
            segment_size: format::SEGMENT_SIZE,
            encryption: None,
            globals: None,
            sealed: None,
        },
        key: Some(&key),
        compression: Compression::Gzip,
        level: 6,
        threads: 1,
        check_with: None,
        globals: None,
    };
    let (_, stats) = archive::write_archive(
        source,
        out,
        settings,
        &std::sync::atomic::AtomicBool::new(false),
    )
    .expect("write archive");
    Manifest {
        id: id.clone(),
        database: what.name.into(),
        backend: what.backend.into(),
        server_version: None,
        kind: what.kind,
        started_at: what.created,
        finished_at: what.created,
        raw_bytes: stats.raw_bytes,
        stored_bytes: stats.stored_bytes,
        sha256: stats.sha256,
        key_id: Some(key.id().to_owned()),
        compression: Compression::Gzip,
        format_version: format::VERSION,
        dbkeeper_version: "test".into(),
        schema_version: None,
        verification: Verification {
            mode: VerifyMode::Read,
            result: VerifyResult::Passed,
            at: what.created,
            error: None,
        },
        globals: None,
        files: None,
        with_files: Vec::new(),
        writer: None,
        taken_with: None,
        rewrapped: None,
    }
    .save(&dest)
    .expect("manifest");
    id
}

/// The proptest settings of an oracle test: $DBKEEPER_ORACLE_CASES cases (else
/// `default_cases`), failures saved in `file`, given whole and relative to the
/// package (a hand-made runner knows no source file, so `WithSource` saves nothing).
pub fn oracle_config(file: &'static str, default_cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases: std::env::var("DBKEEPER_ORACLE_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_cases),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(file),
        )),
        ..proptest::test_runner::Config::default()
    }
}

/// The names in `dir`, sorted (none if it cannot be read).
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The ids of the archives in `<dest>/<name>/`, sorted.
pub fn backup_ids(dest: &Path, name: &str) -> Vec<String> {
    archives(dest, name)
        .iter()
        .filter_map(|a| {
            Some(
                a.file_name()?
                    .to_string_lossy()
                    .trim_end_matches(".dbk")
                    .to_owned(),
            )
        })
        .collect()
}

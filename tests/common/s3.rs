//! A throw-away S3 server for the object-storage tests: moto's standalone server
//! (`python3 -m moto.server`, installed by .ci/run with `pip install 'moto[server]'`),
//! one per [`S3Server`], with one fresh bucket in it. It can be stopped, restarted and
//! paused (SIGSTOP, a hung server), and looked at directly with boto3
//! (tests/common/s3_helper.py) rather than through dbkeeper.
//!
//! What moto 5.2 does with conditional and ranged requests (found by experiment with
//! boto3 against `moto.server`, moto 5.2.1 / boto3 1.43):
//! - PutObject with `If-None-Match: *`: honoured. 200 when the key is new; 412
//!   PreconditionFailed when it exists, and the object keeps its old content.
//! - CompleteMultipartUpload with `If-None-Match: *`: honoured. 412 when the key exists
//!   (the upload then stays listed by ListMultipartUploads: the caller must abort it).
//! - GetObject with `If-Match: <etag>`: honoured. 200 when it matches, 412
//!   PreconditionFailed when it differs (HeadObject: 412 with an empty body). Also
//!   PutObject with `If-Match` (412 when it differs) and GetObject with `If-None-Match`
//!   (304 when it matches).
//! - Ranged GetObject: supported. `bytes=0-9`, `bytes=1000-`, `bytes=-5` answer 206 with
//!   a `Content-Range`; a range wholly past the end answers 416 InvalidRange.
//!
//! **Real-bucket mode.** With `DBKEEPER_TEST_S3_BUCKET` set, [`S3Server::start`] starts
//! no moto: it uses that bucket with the credentials, region and endpoint of the
//! process environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//! optionally `AWS_SESSION_TOKEN`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`), and gives each
//! [`S3Server`] its own root `dbkeeper-test/<pid>-<n>-<random>/`: every prefix the
//! tests pass ([`S3Server::url`], [`S3Server::keys`], [`S3Server::put`] …) and every key
//! they get back is relative to that root, so the tests read the same in both modes.
//! On drop everything under the root is deleted and its multipart uploads aborted (best
//! effort). `stop`/`restart`/`pause`/`resume` need the local server: tests using them
//! check [`S3Server::is_local`] first.
//!
//! moto keeps everything in memory: [`S3Server::restart`] comes back empty. It answers
//! about 1.1 s after the spawn on an idle 2-core machine (0.4 s of that is importing
//! moto), 2.6 s while cargo builds alongside. Each inspection helper call is a python3
//! process importing boto3: about 0.4 s.
#![allow(dead_code)] // each test binary uses a different subset

use super::{free_port, http_get};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The boto3 helper that looks at the server without going through dbkeeper.
const HELPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/common/s3_helper.py");

/// How long [`S3Server::start`] waits for moto to answer HTTP.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The variable naming a real bucket to test against instead of a local moto server.
pub const REAL_BUCKET_VAR: &str = "DBKEEPER_TEST_S3_BUCKET";

/// Where every test's root lies in a real bucket.
pub const REAL_ROOT: &str = "dbkeeper-test/";

/// A moto S3 server on a loopback port with one bucket; killed (and reaped) on drop.
/// Or, in real-bucket mode, a unique root in the bucket `DBKEEPER_TEST_S3_BUCKET`
/// names, emptied on drop.
pub struct S3Server {
    /// moto's port; 0 in real-bucket mode.
    pub port: u16,
    pub bucket: String,
    /// `""` with moto (the whole fresh bucket); `dbkeeper-test/<pid>-<n>-<random>/` in a
    /// real bucket.
    root: String,
    local: bool,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl S3Server {
    /// Starts moto on a free port, waits until it answers HTTP and creates a bucket
    /// with a fresh name (`dbk-<hex>`). Panics with the server's log if it does not come
    /// up within 15 s.
    ///
    /// With `DBKEEPER_TEST_S3_BUCKET` set, starts nothing: uses that bucket under a fresh
    /// root (see the module documentation).
    pub fn start() -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let unique = format!(
            "{:x}-{:x}-{:08x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst),
            rand::random::<u32>()
        );
        if let Some(bucket) = std::env::var(REAL_BUCKET_VAR)
            .ok()
            .filter(|b| !b.is_empty())
        {
            return S3Server {
                port: 0,
                bucket,
                root: format!("{REAL_ROOT}{unique}/"),
                local: false,
                dir: tempfile::tempdir().expect("temp dir"),
                child: None,
            };
        }
        let mut server = S3Server {
            port: 0,
            bucket: format!("dbk-{unique}"),
            root: String::new(),
            local: true,
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        // Another process may take the port between `free_port` and moto's bind: then
        // try another one.
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn_and_wait() {
                server.create_bucket();
                return server;
            }
        }
        panic!(
            "moto found no free port after 5 tries\n--- moto log ---\n{}",
            server.log_tail()
        );
    }

    /// What a dbkeeper process needs in its environment to reach this server. Pass
    /// it to `Workdir::cmd(..).envs(s3.env())` or `Workdir::start_with_envs`.
    ///
    /// In real-bucket mode: every `AWS_*` variable of this process's environment.
    pub fn env(&self) -> Vec<(String, String)> {
        if !self.local {
            return std::env::vars()
                .filter(|(k, _)| k.starts_with("AWS_"))
                .collect();
        }
        [
            ("AWS_ACCESS_KEY_ID", "test".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// `http://127.0.0.1:<port>`; in real-bucket mode `AWS_ENDPOINT_URL`, or `""` for
    /// the AWS default.
    pub fn endpoint(&self) -> String {
        if !self.local {
            return std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
        }
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `false` in real-bucket mode: there is no server to stop, restart or pause.
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// Where this test's keys lie in the bucket: `""` with moto,
    /// `dbkeeper-test/<pid>-<n>-<random>/` in a real bucket.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// `s3://<bucket>/<prefix>` (`s3://<bucket>/<root><prefix>` in a real bucket).
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{}{prefix}", self.bucket, self.root)
    }

    /// The moto process id (`None` while stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL) and reaps it: connections drop, requests are refused.
    /// Local server only.
    pub fn stop(&mut self) {
        self.require_local("stop");
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server if it runs, starts it again on the same port and creates the
    /// same bucket again. moto keeps everything in memory, so the bucket comes back
    /// EMPTY: every object and unfinished multipart upload from before is gone.
    pub fn restart(&mut self) {
        self.require_local("restart");
        self.kill();
        // The old socket may linger for a moment; moto's server sets SO_REUSEADDR, so
        // one retry is plenty.
        for _ in 0..3 {
            if self.spawn_and_wait() {
                self.create_bucket();
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!(
            "moto could not bind port {} again\n--- moto log ---\n{}",
            self.port,
            self.log_tail()
        );
    }

    /// SIGSTOP: the server keeps its port and accepts connections (the kernel does)
    /// but never answers: a hung server. Undo with [`S3Server::resume`]. The
    /// inspection helpers hang too meanwhile (30 s read timeout, then they panic).
    pub fn pause(&self) {
        self.require_local("pause");
        self.signal("STOP");
    }

    /// SIGCONT after [`S3Server::pause`]: requests sent meanwhile get answered now.
    pub fn resume(&self) {
        self.require_local("resume");
        self.signal("CONT");
    }

    // Keys and prefixes below are relative to the root (see `root`), both ways.

    /// Every object key under `prefix` (`""` for all), sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self.helper(&["keys", &self.abs(prefix)], None);
        let keys: Vec<String> = serde_json::from_slice(&out).expect("keys JSON");
        let mut keys: Vec<String> = keys.iter().map(|k| self.rel(k)).collect();
        keys.sort();
        keys
    }

    /// The object's bytes; panics if it does not exist.
    pub fn get(&self, key: &str) -> Vec<u8> {
        self.helper(&["get", &self.abs(key)], None)
    }

    /// Stores `bytes` as `key` (a single PutObject).
    pub fn put(&self, key: &str, bytes: &[u8]) {
        self.helper(&["put", &self.abs(key)], Some(bytes));
    }

    pub fn delete(&self, key: &str) {
        self.helper(&["delete", &self.abs(key)], None);
    }

    /// Unfinished multipart uploads under the root (ListMultipartUploads): (key, upload
    /// id).
    pub fn multipart_uploads(&self) -> Vec<(String, String)> {
        let out = self.helper(&["uploads", &self.root], None);
        let uploads: Vec<(String, String)> = serde_json::from_slice(&out).expect("uploads JSON");
        uploads
            .into_iter()
            .map(|(k, id)| (self.rel(&k), id))
            .collect()
    }

    /// Plants a leftover: starts a multipart upload of `key`, uploads one 5 MiB part and
    /// leaves it unfinished. Returns the upload id.
    pub fn create_multipart(&self, key: &str) -> String {
        let out = self.helper(&["create-multipart", &self.abs(key)], None);
        String::from_utf8(out).expect("utf-8").trim().to_owned()
    }

    /// Deletes every object under the root and aborts its unfinished multipart uploads
    /// (with moto: empties the bucket). Drop does this in real-bucket mode.
    pub fn clean(&self) {
        if let Err(e) = self.try_helper(&["clean", &self.root], None) {
            panic!("{e}");
        }
    }

    /// Every key under `prefix` counted from the bucket's top, not from the root (to
    /// look at what another [`S3Server`] left), sorted.
    pub fn bucket_keys(&self, prefix: &str) -> Vec<String> {
        let out = self.helper(&["keys", prefix], None);
        let mut keys: Vec<String> = serde_json::from_slice(&out).expect("keys JSON");
        keys.sort();
        keys
    }

    /// Unfinished multipart uploads under `prefix` counted from the bucket's top.
    pub fn bucket_uploads(&self, prefix: &str) -> Vec<(String, String)> {
        let out = self.helper(&["uploads", prefix], None);
        serde_json::from_slice(&out).expect("uploads JSON")
    }

    fn abs(&self, key: &str) -> String {
        format!("{}{key}", self.root)
    }

    fn rel(&self, key: &str) -> String {
        key.strip_prefix(&self.root)
            .unwrap_or_else(|| panic!("{key} is not under {}", self.root))
            .to_owned()
    }

    fn require_local(&self, what: &str) {
        assert!(
            self.local,
            "S3Server::{what} needs the local moto server (not a real bucket): check \
             S3Server::is_local() first"
        );
    }

    /// The last 50 lines of moto's output (all its starts).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(50)..].join("\n")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("moto.log")
    }

    /// Starts moto on `self.port` and waits until it answers. `false` if the port was
    /// taken; panics if moto cannot start at all or does not answer in time.
    fn spawn_and_wait(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("moto log");
        let log_start = log.metadata().map_or(0, |m| m.len());
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("python3 must be installed (see .ci/run)");
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < START_TIMEOUT {
            if http_get(self.port, "/").is_some() {
                return true;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait"));
            if let Some(status) = exited {
                self.child = None;
                let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                let this_run = text.get(log_start as usize..).unwrap_or(&text);
                if this_run.contains("Address already in use") {
                    return false;
                }
                panic!(
                    "moto server exited ({status}) before answering on port {}; is \
                     `moto[server]` installed (pip install 'moto[server]', see .ci/run)?\n\
                     --- moto log ---\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        panic!(
            "moto server did not answer HTTP on port {} within {START_TIMEOUT:?}\n\
             --- moto log ---\n{}",
            self.port,
            self.log_tail()
        );
    }

    fn create_bucket(&self) {
        self.helper(&["create-bucket"], None);
    }

    fn signal(&self, sig: &str) {
        let pid = self.pid().expect("moto is not running");
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} {pid} failed");
    }

    /// Runs the boto3 helper against this server and returns its stdout; panics with
    /// its stderr on failure.
    fn helper(&self, args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
        self.try_helper(args, stdin)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`S3Server::helper`] returning the failure instead of panicking (for drop).
    fn try_helper(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>, String> {
        let mut cmd = Command::new("python3");
        cmd.arg(Path::new(HELPER));
        if !self.local {
            // The environment's credentials, region and endpoint, not moto's.
            cmd.arg("--env");
        }
        let mut child = cmd
            .arg(self.endpoint())
            .arg(&self.bucket)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("python3 must be installed (see .ci/run): {e}"))?;
        if let Some(bytes) = stdin {
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(bytes)
                .map_err(|e| format!("write to s3_helper.py: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("s3_helper.py: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "s3_helper.py {args:?} against {} (bucket {}) failed: {}",
                self.endpoint(),
                self.bucket,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(out.stdout)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if self.local {
            // SIGKILL works on a paused (SIGSTOPped) process too.
            self.kill();
        } else if let Err(e) = self.try_helper(&["clean", &self.root], None) {
            // Best effort, and never a panic in drop (it may run while unwinding).
            eprintln!("could not clean {}: {e}", self.url(""));
        }
    }
}

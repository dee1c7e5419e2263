//! Command migrations: another tool's migrations (`alembic upgrade head`, a Flyway
//! CLI, an application's own script) run by `[database.migrate] command`, with
//! everything dbkeeper owns for sqlx migrations kept around them: the pending check,
//! the verified pre-migration backup, the dry run on a scratch copy, a lock so that
//! two dbkeepers never run the command together, the job's timeout and shutdown, the
//! metrics and the run history.
//!
//! A command runs without a shell (argv as configured), with stdin from /dev/null, in
//! its own process group: on timeout or shutdown the whole group (the tool and
//! whatever it started) gets SIGTERM, then SIGKILL after [`KILL_GRACE`]; processes it
//! leaves behind when it exits are killed too, since they would hold its output open
//! and run unwatched — those still in its group, and those that left it (`setsid`)
//! but carry its run's [`MARK`] in their environment. A `command` whose dbkeeper was
//! killed (SIGKILL: nothing can stop it then without `unsafe`) is found by that mark
//! by the next run, which refuses to start while it lives. It finds the database in `DATABASE_URL` (with the password from
//! `password-file` in it, plus `PGPASSWORD`; for SQLite `sqlite:///abs/path` plus
//! `DBKEEPER_DATABASE_PATH`) and `DBKEEPER_DATABASE`: never on argv. Its output is
//! kept bounded ([`TAIL`] per stream, the end), with the password masked.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process_group, Pid, Signal};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use super::{MigrateError, MigrateJob, MigrationBackend};
use crate::db::Database;
use crate::jobs::Outcome;
use crate::metrics;
use crate::repo::verify::ScratchCopy;

/// How much of each output stream (stdout, stderr) is kept: the last bytes.
pub const TAIL: usize = 32 * 1024;

/// Between SIGTERM and SIGKILL for the command's process group (within the runner's
/// wait for a cancelled job).
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// How long output is still read once the command exited and its group was killed
/// (a process that left the group may hold the pipes open).
const DRAIN: Duration = Duration::from_secs(2);

/// The PostgreSQL session advisory lock held while a migration command runs:
/// `0x64626b6d69676364` ("dbkmigcd"), one key for every database (advisory locks are
/// per database); distinct from sqlx's migration lock, which dbkeeper takes for
/// migration directories.
pub const PG_LOCK_KEY: i64 = i64::from_be_bytes(*b"dbkmigcd");

/// Beside a SQLite database: the file dbkeeper `flock`s while a migration command
/// runs (SQLite's own locks cannot be held: the command writes the database). Named
/// after the database's canonical path (symbolic links resolved, also in the
/// directories), so that every path leading to the same file shares one lock.
pub fn sqlite_lock_path(database: &Path) -> PathBuf {
    let canonical = std::fs::canonicalize(database).unwrap_or_else(|_| {
        // Not there yet: its directory's canonical path and its name.
        match (database.parent(), database.file_name()) {
            (Some(dir), Some(file)) => std::fs::canonicalize(dir)
                .map(|d| d.join(file))
                .unwrap_or_else(|_| database.to_owned()),
            _ => database.to_owned(),
        }
    });
    let mut name = canonical.as_os_str().to_owned();
    name.push(".dbkeeper-migrate.lock");
    PathBuf::from(name)
}

/// Which configured command ran, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Command,
    Pending,
    Plan,
}

impl Which {
    pub fn key(self) -> &'static str {
        match self {
            Which::Command => "command",
            Which::Pending => "pending-command",
            Which::Plan => "plan-command",
        }
    }
}

/// Where a command is pointed: the database, or a scratch copy of it.
pub struct Target {
    /// "the database" or "the scratch copy", for messages.
    pub label: &'static str,
    /// [`identity`] of the real database (also for a copy): the start of every
    /// [`MARK`] value of its commands.
    identity: String,
    /// `DATABASE_URL` and friends; values may hold the password.
    env: Vec<(&'static str, Zeroizing<String>)>,
}

impl Target {
    /// The database itself, for a command run outside the lock (its marks are only
    /// used to stop that run's own processes).
    pub fn database(db: &Database) -> Self {
        Self::database_at(db, spelled_identity(db))
    }

    /// The database itself, `identity` being [`Held::identity`].
    fn database_at(db: &Database, identity: String) -> Self {
        Target {
            label: "the database",
            identity,
            env: database_env(db, None),
        }
    }

    /// A scratch copy of `db` (`identity`: the real database's).
    fn copy(db: &Database, copy: &ScratchCopy<'_>, identity: String) -> Self {
        Target {
            label: "the scratch copy",
            identity,
            env: database_env(db, Some(copy)),
        }
    }

    /// What must never appear in output kept or shown: the password, as is and as
    /// written in the URL.
    fn secrets(&self) -> Vec<String> {
        let mut secrets = Vec::new();
        for (name, value) in &self.env {
            if *name == "PGPASSWORD" {
                secrets.push(value.to_string());
                // As percent-encoded in DATABASE_URL.
                secrets.push(crate::db::encoded_password(value));
            }
        }
        secrets.retain(|s| !s.is_empty());
        // Longest first, so that a secret containing another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        secrets
    }
}

/// The environment variable that marks every process a migration command starts
/// (children inherit it, also those that leave the process group with `setsid`):
/// `<database identity>:<which>:<run>`. Processes carrying a run's mark are killed
/// when the command ends; a `command` run's mark still alive when the next run of the
/// same database starts means a command whose dbkeeper died (`kill -9`) is still at
/// work, and the run refuses to start.
pub const MARK: &str = "DBKEEPER_MIGRATION_RUN";

/// A database as its configuration spells it: a hash of the server and database
/// (PostgreSQL, as resolved for tools) or of the canonical lock path (SQLite). Only for
/// marks that no other run looks for; the lock gives the identity that does not depend
/// on the spelling ([`Held::identity`]).
fn spelled_identity(db: &Database) -> String {
    let place = match db {
        Database::Postgres(pg) => pg
            .client_env(None)
            .into_iter()
            .filter(|(name, _)| matches!(*name, "PGHOST" | "PGPORT" | "PGDATABASE"))
            .map(|(_, value)| value.to_string())
            .collect::<Vec<_>>()
            .join("\0"),
        Database::Sqlite(lite) => sqlite_lock_path(&lite.path())
            .to_string_lossy()
            .into_owned(),
    };
    hash_identity(&place)
}

/// A short hash of what names a database: the start of every [`MARK`] value.
fn hash_identity(place: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(place.as_bytes())[..8])
}

/// Live processes (not zombies) of ours whose environment has `MARK=<value>` exactly,
/// or (`prefix`) starting with `value`. Other users' processes cannot be read and are
/// not found; nor is one that started with a cleared environment.
fn marked(value: &str, prefix: bool) -> Vec<Pid> {
    let needle = format!("{MARK}={value}");
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|&b| b == 0).any(|v| {
                    if prefix {
                        v.starts_with(needle.as_bytes())
                    } else {
                        v == needle.as_bytes()
                    }
                })
            })
        })
        .filter(|pid| {
            // "pid (comm) S …": the state follows the last ')'.
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit(')')
                    .next()
                    .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
            })
        })
        .filter_map(|pid| i32::try_from(pid).ok().and_then(Pid::from_raw))
        .collect()
}

/// SIGKILLs every live process carrying exactly the mark `value`.
fn kill_marked(value: &str) {
    for pid in marked(value, false) {
        let _ = rustix::process::kill_process(pid, Signal::KILL);
    }
}

/// The environment naming `db` (or the scratch copy of it) for a command.
fn database_env(
    db: &Database,
    copy: Option<&ScratchCopy<'_>>,
) -> Vec<(&'static str, Zeroizing<String>)> {
    let mut env = vec![("DBKEEPER_DATABASE", Zeroizing::new(db.name().to_owned()))];
    match (db, copy) {
        (Database::Postgres(pg), copy) => {
            let scratch = match copy {
                Some(ScratchCopy::Postgres { name, .. }) => Some(name.as_str()),
                _ => None,
            };
            env.extend(pg.client_env(scratch));
        }
        (Database::Sqlite(lite), copy) => {
            let path = match copy {
                Some(ScratchCopy::Sqlite { file, .. }) => file.clone(),
                _ => lite.path(),
            };
            env.push(("DATABASE_URL", Zeroizing::new(sqlite_url(&path))));
            let path = path.to_string_lossy().into_owned();
            env.push(("DBKEEPER_DATABASE_PATH", Zeroizing::new(path)));
        }
    }
    env
}

/// `sqlite://` and the absolute path, every byte but letters, digits, `/` and `-._~`
/// percent-encoded: a URL-aware tool decodes exactly the path back (`?` or `#` in a
/// name would otherwise end it).
pub fn sqlite_url(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut url = String::from("sqlite://");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'.' | b'_' | b'~') {
            url.push(char::from(b));
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url
}

/// The end of an output stream, at most [`TAIL`] bytes once masked, and how much was
/// cut before.
#[derive(Debug)]
pub struct Tail {
    kept: Vec<u8>,
    cut: u64,
    /// How many bytes are read into `kept` at most: [`TAIL`] plus the longest secret,
    /// so that a secret cut at the start can be dropped whole after masking.
    limit: usize,
}

impl Tail {
    fn new(limit: usize) -> Self {
        Tail {
            kept: Vec::new(),
            cut: 0,
            limit,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.kept.extend_from_slice(bytes);
        // Trimmed in steps, so that the copying stays linear in the output.
        if self.kept.len() > 2 * self.limit {
            self.trim();
        }
    }

    fn trim(&mut self) {
        if self.kept.len() > self.limit {
            let extra = self.kept.len() - self.limit;
            self.kept.drain(..extra);
            self.cut += extra as u64;
        }
    }

    /// The kept text (lossy UTF-8, trailing whitespace removed) with every secret
    /// masked, then cut to its last [`TAIL`] bytes, saying so when the beginning was
    /// cut. Masking comes first: a secret straddling the cut is never half shown (the
    /// piece of one that the read limit cut is within the first `limit - TAIL`
    /// bytes, which are dropped).
    pub fn text(&self, secrets: &[String], max: usize) -> String {
        let margin = self.limit.saturating_sub(max);
        let masked = mask(String::from_utf8_lossy(&self.kept).into_owned(), secrets);
        let masked = masked.trim_end();
        let mut start = if self.cut > 0 {
            margin.min(masked.len())
        } else {
            0
        };
        start = start.max(masked.len().saturating_sub(max));
        while !masked.is_char_boundary(start) {
            start += 1;
        }
        let cut = self.cut + start as u64;
        let text = &masked[start..];
        if cut > 0 {
            format!("[{cut} earlier bytes not kept]\n{text}")
        } else {
            text.to_owned()
        }
    }
}

/// Reads a pipe to its end, keeping the last `limit` bytes.
async fn read_tail(mut pipe: impl AsyncRead + Unpin, limit: usize) -> Tail {
    let mut tail = Tail::new(limit);
    let mut buf = vec![0; 16 * 1024];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        tail.push(&buf[..n]);
    }
    tail.trim();
    tail
}

/// How much of a plan-command's stdout `migrate plan` prints at most (the end).
pub const PLAN_MAX: usize = 64 * 1024 * 1024;

/// What a command did.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    /// stdout's tail, the password masked.
    pub stdout: String,
    /// stderr's tail, the password masked.
    pub stderr: String,
    pub took: Duration,
}

impl Ran {
    /// Both streams for the run history and messages: stdout's tail, then stderr's.
    pub fn output(&self) -> String {
        let mut parts = Vec::new();
        if !self.stdout.is_empty() {
            parts.push(format!("stdout: {}", self.stdout));
        }
        if !self.stderr.is_empty() {
            parts.push(format!("stderr: {}", self.stderr));
        }
        if parts.is_empty() {
            "no output".to_owned()
        } else {
            parts.join("\n")
        }
    }
}

/// The whole process group of a started command, and every process carrying its
/// run's [`MARK`]; SIGKILLed when dropped (the job's task aborted) unless
/// [`Group::done`] said they are gone.
struct Group {
    leader: Option<Pid>,
    mark: String,
}

impl Group {
    fn signal(&self, signal: Signal) {
        if let Some(pid) = self.leader {
            // ESRCH: nobody left in the group.
            let _ = kill_process_group(pid, signal);
        }
    }

    /// Kills what is left of the group, and the run's marked processes that left it,
    /// and forgets them.
    fn done(&mut self) {
        self.signal(Signal::KILL);
        if self.leader.take().is_some() {
            kill_marked(&self.mark);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.done();
    }
}

impl MigrateJob {
    /// The configured argv of `which` (validation makes sure `command` exists and
    /// none is empty).
    fn argv(&self, which: Which) -> Option<&[String]> {
        match which {
            Which::Command => self.cfg.command.as_deref(),
            Which::Pending => self.cfg.pending_command.as_deref(),
            Which::Plan => self.cfg.plan_command.as_deref(),
        }
    }

    /// Runs `which` against `target` to its end (or until `cancel`, then its process
    /// group is killed and [`MigrateError::Cancelled`] returned). Any exit status is
    /// returned; only not starting at all is an error.
    pub(super) async fn run_command(
        &self,
        which: Which,
        target: &Target,
        cancel: &CancellationToken,
    ) -> Result<Ran, MigrateError> {
        let argv = self.argv(which).unwrap_or_default();
        let start_err = |source: std::io::Error| MigrateError::CommandStart {
            which: which.key(),
            program: argv.first().cloned().unwrap_or_default(),
            dir: self.workdir.clone(),
            source,
        };
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| start_err(std::io::ErrorKind::InvalidInput.into()))?;
        // A relative path with a slash (`./migrate.py`) is the working directory's,
        // whatever the platform's rule; a bare name is looked up in PATH.
        let program = if program.contains('/') {
            self.workdir.join(program)
        } else {
            PathBuf::from(program)
        };
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(args)
            .current_dir(&self.workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .envs(&self.cfg.env.0);
        for name in crate::db::REDIRECTING_ENV {
            cmd.env_remove(name);
        }
        for (name, value) in &target.env {
            cmd.env(name, value.as_str());
        }
        let mark = format!(
            "{}:{}:{}",
            target.identity,
            which.key(),
            hex::encode(rand::random::<[u8; 8]>())
        );
        cmd.env(MARK, &mark);
        let secrets = target.secrets();
        let margin = secrets.iter().map(String::len).max().unwrap_or(0);
        // `migrate plan` prints the plan (masked) whole, up to PLAN_MAX.
        let out_max = if which == Which::Plan { PLAN_MAX } else { TAIL };
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(start_err)?;
        let mut group = Group {
            leader: child.id().and_then(|id| Pid::from_raw(id as i32)),
            mark,
        };
        let stdout = child
            .stdout
            .take()
            .map(|p| tokio::spawn(read_tail(p, out_max + margin)));
        let stderr = child
            .stderr
            .take()
            .map(|p| tokio::spawn(read_tail(p, TAIL + margin)));
        let waited = tokio::select! {
            status = child.wait() => Some(status),
            _ = cancel.cancelled() => None,
        };
        let status = match waited {
            Some(status) => status,
            None => {
                tracing::warn!(
                    command = which.key(),
                    "stopping the migration command: SIGTERM to its process group"
                );
                group.signal(Signal::TERM);
                if tokio::time::timeout(KILL_GRACE, child.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        command = which.key(),
                        "the migration command outlived SIGTERM: SIGKILL to its process group"
                    );
                    group.signal(Signal::KILL);
                    let _ = child.wait().await;
                }
                group.done();
                return Err(MigrateError::Cancelled);
            }
        };
        // The leader is gone; anything left in its group goes with it.
        group.done();
        let status = status.map_err(start_err)?;
        let collect = |reader: Option<tokio::task::JoinHandle<Tail>>, max: usize| {
            let secrets = &secrets;
            async move {
                let tail = match reader {
                    Some(mut r) => match tokio::time::timeout(DRAIN, &mut r).await {
                        Ok(Ok(tail)) => tail,
                        _ => {
                            r.abort();
                            Tail::new(0)
                        }
                    },
                    None => Tail::new(0),
                };
                tail.text(secrets, max)
            }
        };
        let (stdout, stderr) = tokio::join!(collect(stdout, out_max), collect(stderr, TAIL));
        Ok(Ran {
            status,
            stdout,
            stderr,
            took: started.elapsed(),
        })
    }

    /// Runs `which` and requires exit 0.
    pub(super) async fn run_ok(
        &self,
        which: Which,
        target: &Target,
        cancel: &CancellationToken,
    ) -> Result<Ran, MigrateError> {
        let ran = self.run_command(which, target, cancel).await?;
        if ran.status.success() {
            Ok(ran)
        } else {
            Err(self.failed(which, target, &ran))
        }
    }

    /// `which` ended with a status that is not success.
    pub(super) fn failed(&self, which: Which, target: &Target, ran: &Ran) -> MigrateError {
        MigrateError::CommandFailed {
            which: which.key(),
            argv: self.argv(which).unwrap_or_default().join(" "),
            target: target.label,
            status: describe(ran.status),
            output: ran.output(),
        }
    }
}

/// See [`MigrateJob::deadline`]; the timer stops when dropped.
struct Deadline {
    cancel: CancellationToken,
    timer: tokio::task::JoinHandle<()>,
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.timer.abort();
    }
}

/// A command-migration lock held: a PostgreSQL session (kept alive), or a locked file.
enum Held {
    Postgres(super::postgres::Watched),
    File(#[allow(dead_code)] std::fs::File),
}

/// The lock on a database and what identifies the database whatever its spelling in
/// a configuration: on PostgreSQL the server's system identifier and the database's
/// oid (two URLs naming one database by host name and socket share it), on SQLite the
/// device and inode of the database's directory and its file name (bind mounts and
/// symbolic links share it; hard links are refused). A command of a dbkeeper that
/// died is found by it, whichever configuration started it.
pub(super) struct Locked<T> {
    pub held: T,
    pub identity: String,
}

impl<T> Locked<T> {
    pub(super) fn new(held: T, place: &str) -> Self {
        Locked {
            held,
            identity: hash_identity(place),
        }
    }
}

impl MigrateJob {
    /// Runs the pending-command against the database (bounded by the job's
    /// `timeout`) and publishes the metrics.
    pub async fn command_status(&self, db: &Database) -> Result<Pending, MigrateError> {
        let deadline = self.deadline();
        let result = self.pending(&Target::database(db), &deadline.cancel).await;
        match &result {
            Ok(Pending {
                pending: Some(pending),
                version,
                ..
            }) => metrics::migrations(db.name(), usize::from(*pending), *version, 0, 0),
            Ok(_) => metrics::migrations_blocked(db.name(), 0),
            Err(_) => metrics::migrations_blocked(db.name(), 1),
        }
        result
    }

    /// Runs the plan-command against the database (bounded by the job's `timeout`);
    /// its stdout (password masked, at most [`PLAN_MAX`] bytes) is in the result. `Ok(None)`: none is configured.
    pub async fn command_plan(&self, db: &Database) -> Result<Option<Ran>, MigrateError> {
        if self.cfg.plan_command.is_none() {
            return Ok(None);
        }
        let deadline = self.deadline();
        self.run_ok(Which::Plan, &Target::database(db), &deadline.cancel)
            .await
            .map(Some)
    }

    /// A token cancelled after the job's `timeout`, for commands run outside the
    /// runner (`migrate status`, `migrate plan`, metrics at start-up).
    fn deadline(&self) -> Deadline {
        let cancel = CancellationToken::new();
        let timeout = self.cfg.options(None).timeout;
        let timer = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                cancel.cancel();
            })
        };
        Deadline { cancel, timer }
    }

    /// What the pending-command says about `target`.
    async fn pending(
        &self,
        target: &Target,
        cancel: &CancellationToken,
    ) -> Result<Pending, MigrateError> {
        if self.cfg.pending_command.is_none() {
            return Ok(Pending {
                pending: None,
                output: String::new(),
                version: None,
            });
        }
        let ran = self.run_command(Which::Pending, target, cancel).await?;
        match pending_from(ran.status) {
            Some(pending) => Ok(Pending {
                pending: Some(pending),
                version: version_in(&ran.stdout),
                output: ran.stdout,
            }),
            None => Err(self.failed(Which::Pending, target, &ran)),
        }
    }

    /// The `<database>.migrate` job for command migrations: under the lock, the
    /// pending check, the pre-migration backup, the dry run on a copy, the command.
    pub(super) async fn run_commands(
        &self,
        db: &Database,
        cancel: &CancellationToken,
    ) -> Result<Outcome, MigrateError> {
        // Cancelled with `cancel`, or when the lock session is lost.
        let run_cancel = cancel.child_token();
        let (held, identity) = match db {
            Database::Postgres(pg) => {
                let Locked { held, identity } = pg.command_lock(self, cancel).await?;
                let watched = super::postgres::Watched::start(held, run_cancel.clone());
                (Held::Postgres(watched), identity)
            }
            Database::Sqlite(lite) => {
                let Locked { held, identity } = lite.command_lock(self, cancel).await?;
                (Held::File(held), identity)
            }
        };
        let mut result = self.apply_command(db, identity, &run_cancel).await;
        match (held, db) {
            (Held::Postgres(watched), Database::Postgres(pg)) => match watched.stop().await {
                Ok(session) => MigrationBackend::close(pg, session).await,
                Err(reason) => {
                    let lost = MigrateError::LockLost {
                        database: db.name().to_owned(),
                        reason,
                    };
                    result = Err(match result {
                        Err(MigrateError::AfterBackup { backup, .. }) => {
                            MigrateError::AfterBackup {
                                backup,
                                source: Box::new(lost),
                            }
                        }
                        _ => lost,
                    });
                }
            },
            (held, _) => drop(held),
        }
        // The metrics show the state now (not after a cancel: nothing more runs then).
        if !run_cancel.is_cancelled() {
            match self.command_status(db).await {
                Ok(Pending { pending: None, .. }) if result.is_ok() => {
                    metrics::migrations(db.name(), 0, None, 0, 0)
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(database = db.name(), "cannot read migration status: {e}"),
            }
        }
        result
    }

    async fn apply_command(
        &self,
        db: &Database,
        identity: String,
        cancel: &CancellationToken,
    ) -> Result<Outcome, MigrateError> {
        let real = Target::database_at(db, identity);
        // Under the lock, no command of ours runs on this database: a marked one is
        // left from a dbkeeper that died without stopping it.
        let left = marked(
            &format!("{}:{}:", real.identity, Which::Command.key()),
            true,
        );
        if !left.is_empty() {
            return Err(MigrateError::StillRunning {
                database: db.name().to_owned(),
                pids: left
                    .iter()
                    .map(|p| p.as_raw_nonzero().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let before = self.pending(&real, cancel).await?;
        if before.pending == Some(false) {
            return Ok(Outcome {
                summary: "up to date, nothing to apply".to_owned(),
                details: serde_json::json!({ "applied": false, "pending_output": before.output }),
            });
        }
        let backup_id = self.backup_first(db, cancel).await?;
        let after_backup = |e: MigrateError| match (&backup_id, e) {
            (Some(backup), MigrateError::Cancelled) => MigrateError::AfterBackup {
                backup: backup.clone(),
                source: Box::new(MigrateError::Stopped),
            },
            (
                Some(backup),
                e @ (MigrateError::CommandFailed { .. } | MigrateError::LockLost { .. }),
            ) => MigrateError::AfterBackup {
                backup: backup.clone(),
                source: Box::new(e),
            },
            (_, e) => e,
        };
        if self.cfg.dry_run_on_copy {
            self.dry_run(db, &real.identity, backup_id.as_deref(), cancel)
                .await?;
        }
        let argv = self.argv(Which::Command).unwrap_or_default().join(" ");
        tracing::info!(
            database = db.name(),
            command = argv,
            "running the migration command"
        );
        let ran = self
            .run_ok(Which::Command, &real, cancel)
            .await
            .map_err(after_backup)?;
        Ok(Outcome {
            summary: format!(
                "ran `{argv}` in {:.1}s{}{}",
                ran.took.as_secs_f64(),
                if self.cfg.dry_run_on_copy {
                    ", after it succeeded on a scratch copy"
                } else {
                    ""
                },
                backup_id
                    .as_ref()
                    .map_or(String::new(), |id| format!(", after backup {id}"))
            ),
            details: serde_json::json!({
                "applied": true,
                "command": argv,
                "pre_migration_backup": backup_id,
                "dry_run_on_copy": self.cfg.dry_run_on_copy,
                "output": ran.output(),
            }),
        })
    }

    /// Runs the command on a scratch copy restored from pre-migration backup
    /// `backup_id`, then removes the copy.
    async fn dry_run(
        &self,
        db: &Database,
        identity: &str,
        backup_id: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<(), MigrateError> {
        let id = backup_id.ok_or(MigrateError::Copy(super::BackupFailure::NoBackup))?;
        let copy = self.scratch_copy(db, id, cancel).await?;
        tracing::info!(
            database = db.name(),
            backup = id,
            "running the migration command on a scratch copy first"
        );
        let result = self
            .run_ok(
                Which::Command,
                &Target::copy(db, &copy, identity.to_owned()),
                cancel,
            )
            .await;
        copy.remove().await;
        result.map(drop).map_err(|e| super::dry_run_failed(id, e))
    }
}

/// "exit status 1", "killed by signal 9".
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// `text` with every secret replaced by `***`.
fn mask(mut text: String, secrets: &[String]) -> String {
    for s in secrets {
        if !s.is_empty() && text.contains(s.as_str()) {
            text = text.replace(s.as_str(), "***");
        }
    }
    text
}

/// What the pending-command said.
#[derive(Debug)]
pub struct Pending {
    /// `None`: no pending-command is configured, so dbkeeper cannot tell.
    pub pending: Option<bool>,
    /// Its stdout (tail), shown by `migrate status`.
    pub output: String,
    /// The version for `dbkeeper_migrations_applied_version`: the first whole
    /// number at the start of a word on the last line of its stdout (e.g. Alembic's
    /// `0003 (head)`), if any.
    pub version: Option<i64>,
}

/// The version a pending-command's output names, if any (see [`Pending::version`]).
pub fn version_in(stdout: &str) -> Option<i64> {
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty())?;
    last.split(|c: char| !c.is_ascii_alphanumeric())
        .find_map(|word| word.parse::<i64>().ok())
}

/// Interprets the pending-command's exit status: 0 up to date, 1 pending.
pub fn pending_from(status: ExitStatus) -> Option<bool> {
    match status.code() {
        Some(0) => Some(false),
        Some(1) => Some(true),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_end_and_says_what_was_cut() {
        let mut t = Tail::new(TAIL);
        for i in 0..10_000u32 {
            t.push(format!("line {i}\n").as_bytes());
        }
        t.trim();
        assert_eq!(t.kept.len(), TAIL);
        let text = t.text(&[], TAIL);
        assert!(text.starts_with('['), "{}", &text[..40]);
        assert!(text.ends_with("line 9999"), "{}", &text[text.len() - 40..]);
        let total: u64 = (0..10_000u32)
            .map(|i| format!("line {i}\n").len() as u64)
            .sum();
        assert_eq!(t.cut + TAIL as u64, total);
        let mut short = Tail::new(TAIL);
        short.push(b"ok\n");
        assert_eq!(short.text(&[], TAIL), "ok");
    }

    #[test]
    fn a_secret_cut_at_the_start_of_the_tail_is_not_half_shown() {
        let secret = "s3cr3t-PASSWORD-0123456789".to_owned();
        for shift in 0..secret.len() {
            let mut t = Tail::new(TAIL + secret.len());
            t.push(&vec![b'x'; 100_000]);
            t.push(secret.as_bytes());
            t.push(&vec![b'y'; TAIL + secret.len() - 1 - shift]);
            t.trim();
            let text = t.text(std::slice::from_ref(&secret), TAIL);
            for n in 4..secret.len() {
                assert!(
                    !text.contains(&secret[secret.len() - n..]),
                    "shift {shift}: {n}"
                );
            }
            assert!(text.len() <= TAIL + 40);
        }
        let mut whole = Tail::new(TAIL + secret.len());
        whole.push(format!("a {secret} b").as_bytes());
        assert_eq!(whole.text(std::slice::from_ref(&secret), TAIL), "a *** b");
    }

    #[test]
    fn sqlite_urls_encode_what_a_url_parser_would_read_otherwise() {
        assert_eq!(
            sqlite_url(Path::new("/d/app?v2 #1%.db")),
            "sqlite:///d/app%3Fv2%20%231%25.db"
        );
    }

    #[test]
    fn versions_come_from_the_last_line_and_secrets_are_masked() {
        assert_eq!(version_in("INFO x\n0003 (head)\n\n"), Some(3));
        assert_eq!(version_in("ae1027a6acf (head)"), None);
        assert_eq!(version_in(""), None);
        assert_eq!(
            mask(
                "postgres://u:p%40ss@h/db p@ss".to_owned(),
                &["p@ss".into(), "p%40ss".into()]
            ),
            "postgres://u:***@h/db ***"
        );
        assert_eq!(PG_LOCK_KEY, 0x6462_6b6d_6967_6364);
    }
}

//! The TOML configuration file: plain serde structs, checked once at load time.
//!
//! Everything the daemon does comes from one [`Config`]. Loading it either yields a
//! fully validated value or one [`ConfigError`] that names the file and the line and
//! column (for syntax and type errors) or the key (for semantic errors), so that
//! `dbkeeper check` and a reload on SIGHUP can say exactly what to fix.

mod backup;
mod destination;
mod files;
mod job_options;
mod notify;
mod paths;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub(crate) use job_options::job_table;
pub use job_options::{JobOptions, Missed};
pub use notify::{
    NotifyConfig, PingSetting, PingStyle, PingTarget, SecretUrl, Webhook, WebhookFormat,
};

use crate::keys::{Identity, Key, KeyError, KeyRing, Recipient};

pub use backup::{short_duration, Compression, Count, Keep, KeepError, VerifyMode};
pub use destination::{Cloud, DestinationConfig, DestinationSettings, Destinations, Location};
pub use files::{
    paths_overlap, resolve_path, FilesConfig, Protected, FILES_BACKEND, SQLITE_SIBLINGS,
};

/// Environment variable naming the config file when `-c` is not given.
pub const CONFIG_ENV: &str = "DBKEEPER_CONFIG";
/// Config file used when neither `-c` nor `$DBKEEPER_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/dbkeeper/dbkeeper.toml";

/// Which kind of database a URL points at; the config decides it from the scheme,
/// and everything above (connections, backups, restores) follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database URL with a scheme dbkeeper does not support.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "\"{url}\" is not a supported URL; write postgres://user@host/db or sqlite:///path/file.db"
)]
pub struct UnsupportedUrl {
    /// The URL with any password removed.
    pub url: String,
}

impl Backend {
    /// Picks the backend from the URL scheme.
    pub fn from_url(url: &str) -> Result<Self, UnsupportedUrl> {
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
        match scheme {
            "sqlite" => Ok(Backend::Sqlite),
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            _ => Err(UnsupportedUrl {
                url: crate::redact::redact_url(url),
            }),
        }
    }

    /// The backend [`Backend::as_str`] names (as a manifest records it).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sqlite" => Some(Backend::Sqlite),
            "postgres" => Some(Backend::Postgres),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// A config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read config file {path}: {source}; pass the right file with -c or $DBKEEPER_CONFIG"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// The file this configuration was read from (not a key; set by [`Config::load`]).
    #[serde(skip)]
    pub path: PathBuf,
    /// The drop-in files merged into it, in the order read (not a key; see
    /// [`Config::load`]).
    #[serde(skip)]
    pub drop_ins: Vec<PathBuf>,
    /// Which file wrote `[daemon]` and `[notify]`, so that a second one is refused.
    #[serde(skip)]
    sections: Vec<(PathBuf, String)>,
    /// Secret files written as a bare name and read beside their config file
    /// (`$CREDENTIALS_DIRECTORY` was not set), for the hint when one is missing.
    #[serde(skip)]
    bare_credentials: Vec<PathBuf>,
    /// Daemon-wide settings (`[daemon]`). Every key has a default.
    #[serde(default)]
    pub daemon: DaemonConfig,
    /// The databases to look after (`[[database]]`); at least one is required.
    #[serde(default, rename = "database")]
    pub databases: Vec<DatabaseConfig>,
    /// The directories to back up (`[[files]]`), each with its `[files.backup]`.
    /// Default: none.
    #[serde(default)]
    pub files: Vec<FilesConfig>,
    /// `[notify]`: webhooks and Alertmanager alerts on job failure and recovery, the
    /// default dead-man ping URL, the status page's public address. Default: none.
    #[serde(default)]
    pub notify: Option<NotifyConfig>,
}

/// `[daemon]`: settings of the process itself.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DaemonConfig {
    /// Directory for the run-history database (`state.db`) and temporary files; created
    /// if missing. Default: `/var/lib/dbkeeper`. (Every relative path in a config
    /// file, this one included, is read from the directory of that file.)
    pub state_dir: PathBuf,
    /// Address of the HTTP listener serving `/metrics`, `/healthz`, `/readyz` and
    /// `/status`. Default: `127.0.0.1:9736`. A non-loopback address is logged at start-up.
    pub listen: SocketAddr,
    /// How many jobs may run at the same time across all databases. Default: `2`.
    pub max_concurrent_jobs: usize,
    /// On SIGTERM, how long running jobs may take to finish before they are cancelled.
    /// Default: `5m`.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long finished runs are kept in the run history; the newest success and
    /// failure of every job are always kept. Default: `90d`.
    #[serde(with = "humantime_serde")]
    pub history_keep: Duration,
    /// How often each database's reachability is probed for `database_up` and
    /// `/readyz`. Default: `30s`.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// Name of the group of replicas that share one schedule through `coordination`:
    /// replicas with the same `cluster` (and the same jobs) run each scheduled fire time
    /// of a job once between them. Only with `coordination`. Default: `default`.
    pub cluster: Option<String>,
    /// `postgres://…` URL of the database the replicas coordinate through (it may be one
    /// of the managed databases); dbkeeper keeps its schema `dbkeeper` there. Without it
    /// this daemon runs every job itself, as a single daemon. Never put a password here:
    /// use `coordination-password-file`. Default: none.
    pub coordination: Option<String>,
    /// File holding the password of `coordination`, with the rules of
    /// `[[database]] password-file` (a bare name is a systemd credential). Default: none.
    pub coordination_password_file: Option<PathBuf>,
    /// How long a replica's claim on a running job (and its membership) lives without
    /// renewal; renewed every third of it. A replica that dies is seen gone and its
    /// runs interrupted after at most this long. Between `3s` and `1h`. Default: `20s`.
    #[serde(with = "humantime_serde")]
    pub lease_timeout: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/dbkeeper"),
            listen: SocketAddr::from(([127, 0, 0, 1], 9736)),
            max_concurrent_jobs: 2,
            shutdown_grace: Duration::from_secs(300),
            history_keep: Duration::from_secs(90 * 86_400),
            probe_interval: Duration::from_secs(30),
            cluster: None,
            coordination: None,
            coordination_password_file: None,
            lease_timeout: DEFAULT_LEASE_TIMEOUT,
        }
    }
}

/// By hand, so that a password written into `coordination` against advice stays out of logs.
impl std::fmt::Debug for DaemonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonConfig")
            .field("state_dir", &self.state_dir)
            .field("listen", &self.listen)
            .field("max_concurrent_jobs", &self.max_concurrent_jobs)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("history_keep", &self.history_keep)
            .field("probe_interval", &self.probe_interval)
            .field("cluster", &self.cluster)
            .field(
                "coordination",
                &self.coordination.as_deref().map(crate::redact::redact_url),
            )
            .field(
                "coordination_password_file",
                &self.coordination_password_file,
            )
            .field("lease_timeout", &self.lease_timeout)
            .finish()
    }
}

/// `lease-timeout` when none is written: well under a minute, so that a dead replica's
/// jobs are taken over quickly, and long enough that a busy coordination server or a
/// short network hiccup does not make replicas cancel their own runs.
pub const DEFAULT_LEASE_TIMEOUT: Duration = Duration::from_secs(20);
/// The cluster name when `coordination` is set without `cluster`.
pub const DEFAULT_CLUSTER: &str = "default";

impl DaemonConfig {
    /// The cluster name, when this daemon coordinates with replicas.
    pub fn cluster_name(&self) -> Option<&str> {
        self.coordination
            .as_ref()
            .map(|_| self.cluster.as_deref().unwrap_or(DEFAULT_CLUSTER))
    }

    /// The coordination database as a `[[database]]` entry named `coordination`, so
    /// that it is opened with the same URL and password-file rules as the others.
    pub fn coordination_database(&self, connect_timeout: Duration) -> Option<DatabaseConfig> {
        Some(DatabaseConfig::connection_only(
            "coordination",
            self.coordination.as_deref()?,
            self.coordination_password_file.clone(),
            connect_timeout,
        ))
    }
}

/// `[[database]]`: one database and the jobs that run on it.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DatabaseConfig {
    /// The file this database was configured in: the main file or a drop-in (not a
    /// key; set at load).
    #[serde(skip)]
    pub source: PathBuf,
    /// Short name used in job ids, metric labels and backup paths: letters, digits,
    /// `_` and `-`. Required.
    pub name: String,
    /// `postgres://user@host:port/db` or `sqlite:///path/to/file.db` (a relative
    /// SQLite path is read from the directory of this config file; add `?mode=rwc` to create a
    /// missing file). Required. Never put a password here: use `password-file`.
    pub url: String,
    /// PostgreSQL only: file holding the password (trailing newline ignored). A
    /// bare name (no `/`) is a systemd credential, read from
    /// `$CREDENTIALS_DIRECTORY` when set (`LoadCredential=`); otherwise a relative
    /// path is read from this config file's directory. Default: none.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// How long to wait for a connection before the database counts as down.
    /// Default: `10s`.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// SQLite only: turn `PRAGMA foreign_keys` on for dbkeeper's connections, as the
    /// application does. Leave it off (SQLite's own default) unless the application
    /// turns it on itself: with it on, a deleted row takes its ON DELETE CASCADE
    /// children with it. Default: `false`.
    #[serde(default)]
    pub foreign_keys: bool,
    /// `[database.backup]`: encrypted, compressed, verified backups. Default: none.
    #[serde(default)]
    pub backup: Option<BackupConfig>,
    /// `[[database.retention]]`: expired-row cleanup. Default: none.
    #[serde(default)]
    pub retention: Vec<RetentionConfig>,
    /// `[[database.refresh]]`: materialized-view refreshes. Default: none.
    #[serde(default)]
    pub refresh: Vec<RefreshConfig>,
    /// `[database.migrate]`: pending schema migrations. Default: none.
    #[serde(default)]
    pub migrate: Option<MigrateConfig>,
    /// `[[database.sql]]`: statements run on a schedule. Default: none.
    #[serde(default)]
    pub sql: Vec<SqlJobConfig>,
    /// `[[database.gauge]]`: read-only queries whose results are exported as
    /// `dbkeeper_query_value`. Default: none.
    #[serde(default)]
    pub gauge: Vec<GaugeConfig>,
    /// Export per-table rows, bytes and (PostgreSQL) scan counts from the
    /// `<database>.table-stats` job. Default: `false`.
    #[serde(default)]
    pub table_stats: bool,
    /// When the `table-stats` job runs (any job schedule). Default: `every 5m`.
    #[serde(default)]
    pub table_stats_schedule: Option<crate::schedule::Schedule>,
    /// At most this many tables get series, the largest (total bytes) first.
    /// Default: `100`.
    #[serde(default)]
    pub table_stats_max_tables: Option<usize>,
}

/// `table-stats-schedule` when none is written (`every 5m`): often enough for
/// growth graphs, rarely enough that SQLite's `count(*)` over every table stays cheap.
pub const DEFAULT_TABLE_STATS_INTERVAL: Duration = Duration::from_secs(300);
/// `table-stats-max-tables` and `max-series` when none is written.
pub const DEFAULT_MAX_SERIES: usize = 100;
/// The largest `max-series` and `table-stats-max-tables` accepted: beyond this a
/// scrape grows into megabytes.
pub const MAX_MAX_SERIES: usize = 10_000;

impl DatabaseConfig {
    /// The options of the `<database>.table-stats` job: its schedule, a 5-minute
    /// timeout, no retries, and `missed = "skip"` (the next slot refreshes it).
    pub fn table_stats_options(&self, notify: Option<&NotifyConfig>) -> JobOptions {
        JobOptions {
            schedule: self
                .table_stats_schedule
                .clone()
                .unwrap_or_else(|| crate::schedule::Schedule::every(DEFAULT_TABLE_STATS_INTERVAL)),
            timezone: Default::default(),
            timeout: Duration::from_secs(300),
            retries: 0,
            retry_backoff: Duration::from_secs(30),
            jitter: Duration::ZERO,
            missed: Missed::Skip,
            ping: PingTarget::resolve(None, None, notify),
        }
    }

    /// `table-stats-max-tables` with its default.
    pub fn table_stats_max_tables(&self) -> usize {
        self.table_stats_max_tables.unwrap_or(DEFAULT_MAX_SERIES)
    }

    /// A SQLite database's file, absolute (a relative path in a config file was
    /// made absolute at load; in a config built in code it is read from the working
    /// directory); `None` for PostgreSQL, an in-memory database or a URL that cannot
    /// be read (refused elsewhere).
    pub fn sqlite_file(&self) -> Option<PathBuf> {
        use std::str::FromStr;
        if Backend::from_url(&self.url).ok()? != Backend::Sqlite {
            return None;
        }
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(&self.url).ok()?;
        let file = options.get_filename();
        let name = file.to_string_lossy();
        // sqlx names an in-memory database `file:sqlx-in-memory-*`.
        if name.is_empty() || name.starts_with(':') || name.starts_with("file:") {
            return None;
        }
        Some(std::path::absolute(file).unwrap_or_else(|_| file.to_owned()))
    }
}

impl DatabaseConfig {
    /// An entry with only what a connection needs and no jobs (a restore target, the
    /// coordination database), not read from a config file.
    pub fn connection_only(
        name: &str,
        url: &str,
        password_file: Option<PathBuf>,
        connect_timeout: Duration,
    ) -> Self {
        DatabaseConfig {
            source: PathBuf::new(),
            name: name.to_owned(),
            url: url.to_owned(),
            password_file,
            connect_timeout,
            foreign_keys: false,
            backup: None,
            retention: Vec::new(),
            refresh: Vec::new(),
            migrate: None,
            sql: Vec::new(),
            gauge: Vec::new(),
            table_stats: false,
            table_stats_schedule: None,
            table_stats_max_tables: None,
        }
    }
}

/// By hand, so that a password written into `url` against advice stays out of logs.
impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("source", &self.source)
            .field("name", &self.name)
            .field("url", &crate::redact::redact_url(&self.url))
            .field("password_file", &self.password_file)
            .field("connect_timeout", &self.connect_timeout)
            .field("foreign_keys", &self.foreign_keys)
            .field("backup", &self.backup)
            .field("retention", &self.retention)
            .field("refresh", &self.refresh)
            .field("migrate", &self.migrate)
            .field("sql", &self.sql)
            .field("gauge", &self.gauge)
            .field("table_stats", &self.table_stats)
            .field("table_stats_schedule", &self.table_stats_schedule)
            .field("table_stats_max_tables", &self.table_stats_max_tables)
            .finish()
    }
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

job_table! {
    /// `[[database.sql]]`: one SQL statement (or several, separated by `;`) run on a
    /// schedule, e.g. `VACUUM`, `ANALYZE` or `SELECT refresh_totals()`.
    pub struct SqlJobConfig {
        /// Job name, unique per database; the job id is `<database>.sql.<name>`.
        /// Required.
        pub name: String,
        /// The SQL to run. Required.
        pub statement: String,
    }
    defaults(timeout = Duration::from_secs(3600), missed = Missed::Skip, retries = 0)
}

job_table! {
    /// `[[database.gauge]]`: a read-only query run on a schedule; its rows become
    /// `dbkeeper_query_value{database, gauge, <label columns>}` series.
    pub struct GaugeConfig {
        /// Gauge name, unique per database: the `gauge` label and the job id
        /// `<database>.gauge.<name>`. Required.
        pub name: String,
        /// One SQL query. The first numeric column is the value, every other column
        /// a label named after it. Run in a read-only transaction (PostgreSQL) or on
        /// a `query_only` connection (SQLite). Required.
        pub query: String,
        /// Most rows (series) one run may return; a run returning more fails and
        /// exports nothing. Default: `100`, at most `10000`.
        #[serde(default)]
        pub max_series: Option<usize>,
        /// What the gauge measures, exported as the `help` label of
        /// `dbkeeper_query_info`. Default: none.
        #[serde(default)]
        pub help: Option<String>,
    }
    defaults(timeout = Duration::from_secs(60), missed = Missed::RunOnce, retries = 0)
}

impl GaugeConfig {
    /// `max-series` with its default.
    pub fn max_series(&self) -> usize {
        self.max_series.unwrap_or(DEFAULT_MAX_SERIES)
    }
}

/// How `[[database.retention]]` removes expired data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RetentionMode {
    /// Delete expired rows in batches, each its own short transaction.
    #[default]
    Delete,
    /// PostgreSQL partitioned tables: drop whole partitions whose upper bound is at or
    /// before the cutoff.
    DropPartitions,
    /// Like `drop-partitions`, but detach them (keeping the tables) instead.
    DetachPartitions,
}

job_table! {
    /// `[[database.retention]]`: the `<database>.retention.<name>` job.
    pub struct RetentionConfig {
        /// Table to clean, optionally schema-qualified (`audit.events`); names are
        /// exact (case-sensitive); write `"my.table"` in double quotes for a name that
        /// contains a dot. Required.
        pub table: String,
        /// Job name (the job id is `<database>.retention.<name>`). Default: the table
        /// name, with characters outside letters, digits, `_`, `-` replaced by `_`.
        #[serde(default)]
        pub name: Option<String>,
        /// The column holding each row's time. PostgreSQL: `timestamptz`, `timestamp`,
        /// `date`, or a number of `epoch-unit`s since 1970 (integer, numeric, float).
        /// SQLite: read per value (ISO-8601 text, integers in `epoch-unit`, julian-day
        /// reals). Required.
        pub column: String,
        /// Integer (and numeric) values count this unit since 1970-01-01 UTC: `s`,
        /// `ms` or `us`. Default: `s`.
        #[serde(default)]
        pub epoch_unit: EpochUnit,
        /// PostgreSQL `timestamp` and `date` columns: the IANA zone their wall-clock
        /// values are written in. Default: the database's own default TimeZone (the
        /// zone the application's sessions get). Not the same as `timezone`, which is
        /// the zone of the `schedule`.
        #[serde(default)]
        pub column_timezone: Option<String>,
        /// Allow deleting from a table that other tables reference with ON DELETE
        /// CASCADE, SET NULL or SET DEFAULT (those rows change or go too, without being
        /// counted or archived). Default: `false` (such a rule is refused).
        #[serde(default)]
        pub cascade: bool,
        /// Rows whose `column` is older than this are expired, e.g. `90d`. Required.
        #[serde(with = "humantime_serde")]
        pub older_than: Duration,
        /// Extra SQL predicate a row must also match to be deleted. Default: none.
        #[serde(default, rename = "where")]
        pub where_clause: Option<String>,
        /// Rows in the first batch; each batch is its own transaction. Later batches
        /// are sized to take about `batch-time`. Default: `5000`.
        #[serde(default = "default_batch_size")]
        pub batch_size: u32,
        /// Target duration of one batch (how long it holds its row locks); batch sizes
        /// adapt to it, between 100 rows (or `batch-size`, if smaller) and
        /// `max-batch-size`. `0s` keeps every batch at `batch-size`. Default: `50ms`.
        #[serde(default = "default_batch_time", with = "humantime_serde")]
        pub batch_time: Duration,
        /// Largest batch the adaptation may choose. Default: `100000`.
        #[serde(default = "default_max_batch_size")]
        pub max_batch_size: u32,
        /// PostgreSQL: how batches walk a table. `pages` reads it once, in ranges of
        /// heap pages (fastest when many rows are expired); `rows` picks expired rows
        /// (through an index on the column: best when few are); `auto` chooses per
        /// table from the planner's estimate. Default: `auto`.
        #[serde(default)]
        pub scan: ScanMode,
        /// Pause between batches, to leave room for other work. Default: `0s`.
        #[serde(default, with = "humantime_serde")]
        pub pause: Option<Duration>,
        /// Stop cleanly after this long and report what remains. Default: no limit
        /// (the job `timeout` still applies).
        #[serde(default, with = "humantime_serde")]
        pub max_duration: Option<Duration>,
        /// How long one batch may wait for a lock (PostgreSQL `lock_timeout`, SQLite
        /// busy timeout) before the run fails. Default: `5s`.
        #[serde(default = "default_retention_lock_timeout", with = "humantime_serde")]
        pub lock_timeout: Duration,
        /// Before deleting, write each batch as JSON lines into an archive (same
        /// container, compression and key as the backups) under the backup destination,
        /// so an archive exists for every deleted row. Needs `[database.backup]`.
        /// Default: `false`.
        #[serde(default)]
        pub archive: bool,
        /// `delete`, `drop-partitions` or `detach-partitions`. Default: `delete`.
        #[serde(default)]
        pub mode: RetentionMode,
    }
    defaults(timeout = Duration::from_secs(3600), missed = Missed::Skip, retries = 0)
}

fn default_batch_size() -> u32 {
    5000
}

fn default_batch_time() -> Duration {
    Duration::from_millis(50)
}

fn default_max_batch_size() -> u32 {
    100_000
}

/// `scan` of a retention rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ScanMode {
    /// Page ranges when at least 5 % of a table is expired, else row picking.
    #[default]
    Auto,
    /// Pick expired rows, batch by batch.
    Rows,
    /// Read the table once in ranges of heap pages.
    Pages,
}

/// The unit of integer times in a retention column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EpochUnit {
    /// Seconds since 1970-01-01 UTC (`unixepoch()`, `time.time()` as an integer).
    #[default]
    S,
    /// Milliseconds (JavaScript's `Date.now()`, Java's `currentTimeMillis`).
    Ms,
    /// Microseconds.
    Us,
}

impl EpochUnit {
    /// Units per second.
    pub fn per_second(self) -> i64 {
        match self {
            EpochUnit::S => 1,
            EpochUnit::Ms => 1_000,
            EpochUnit::Us => 1_000_000,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EpochUnit::S => "s",
            EpochUnit::Ms => "ms",
            EpochUnit::Us => "us",
        }
    }
}

fn default_retention_lock_timeout() -> Duration {
    Duration::from_secs(5)
}

job_table! {
    /// `[[database.refresh]]`: the `<database>.refresh.<name>` job.
    pub struct RefreshConfig {
        /// PostgreSQL: the materialized view, optionally schema-qualified. SQLite: the
        /// table that holds the result of `query`. Required.
        pub view: String,
        /// Job name (the job id is `<database>.refresh.<name>`). Default: the view name,
        /// sanitized like retention job names.
        #[serde(default)]
        pub name: Option<String>,
        /// SQLite only: the query whose result replaces the table's contents, atomically.
        #[serde(default)]
        pub query: Option<String>,
        /// PostgreSQL: refresh CONCURRENTLY when the view has a usable unique index and
        /// is populated; otherwise refresh plainly with a warning. Default: `true`.
        #[serde(default = "yes")]
        pub concurrently: bool,
        /// PostgreSQL: fail instead of falling back to a plain (blocking) refresh.
        /// Default: `false`.
        #[serde(default)]
        pub require_concurrently: bool,
        /// How long the refresh may wait for its lock before the attempt fails (and is
        /// retried). Default: `5s`.
        #[serde(default = "default_refresh_lock_timeout", with = "humantime_serde")]
        pub lock_timeout: Duration,
    }
    defaults(timeout = Duration::from_secs(3600), missed = Missed::Skip, retries = 3)
}

/// What to do with a pending migration older than the newest applied one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OutOfOrder {
    /// Refuse to apply anything until it is resolved.
    #[default]
    Error,
    /// Apply it like any other pending migration (what sqlx itself does).
    Apply,
}

job_table! {
    /// `[database.migrate]`: the `<database>.migrate` job.
    pub struct MigrateConfig {
        /// Directory of migrations in sqlx's layout: `<version>_<description>.sql`, or
        /// `.up.sql`/`.down.sql` pairs; `-- no-transaction` as the first line runs a
        /// file outside a transaction. Read at every run; a relative path is read from
        /// this config file's directory. Exactly one of `dir` and `command` is
        /// required.
        #[serde(default)]
        pub dir: Option<PathBuf>,
        /// Another tool's migrations: the command that applies them, as an argv list
        /// (no shell), e.g. `["alembic", "upgrade", "head"]`. It runs with
        /// `DATABASE_URL` in its environment, under dbkeeper's lock, after the
        /// pre-migration backup; exit 0 is success. Default: none.
        #[serde(default)]
        pub command: Option<Vec<String>>,
        /// With `command`: the argv that says whether anything is pending (exit 0: up
        /// to date, 1: pending, anything else: an error); its output is shown by
        /// `migrate status`. Default: none (every run counts as pending).
        #[serde(default)]
        pub pending_command: Option<Vec<String>>,
        /// With `command`: the argv whose output `migrate plan` prints (what would
        /// be applied, e.g. `["alembic", "upgrade", "head", "--sql"]`); it must
        /// change nothing. Default: none.
        #[serde(default)]
        pub plan_command: Option<Vec<String>>,
        /// With `command`: the working directory of the commands; a relative path is
        /// taken from the directory of the config file that declares the database.
        /// Default: that directory.
        #[serde(default)]
        pub working_dir: Option<PathBuf>,
        /// With `command`: extra environment variables for the commands (they may not
        /// override `DATABASE_URL`, the `DBKEEPER_*` ones dbkeeper sets, or any
        /// libpq `PG*` variable). Values are never printed. Default: none.
        #[serde(default)]
        pub env: CommandEnv,
        /// Before applying to the database, restore the pre-migration backup into a
        /// scratch copy and apply there first; the real database is touched only if
        /// that succeeds, and the copy is always removed. Needs `backup-first`.
        /// `migrate apply --dry-run-on-copy` does the same for one run.
        /// Default: `false`.
        #[serde(default)]
        pub dry_run_on_copy: bool,
        /// Before applying anything, take a `pre-migration` backup through
        /// `[database.backup]` and verify it; if that fails, apply nothing.
        /// Default: `true` (needs `[database.backup]`).
        #[serde(default = "yes")]
        pub backup_first: bool,
        /// A pending migration whose version is lower than the newest applied one:
        /// `error` (apply nothing) or `apply`. Default: `error`.
        #[serde(default)]
        pub out_of_order: OutOfOrder,
        /// `lock_timeout` for each migration's statements (PostgreSQL). Default: `10s`.
        #[serde(default = "default_migrate_lock_timeout", with = "humantime_serde")]
        pub lock_timeout: Duration,
        /// `statement_timeout` for each migration's statements (PostgreSQL).
        /// Default: none.
        #[serde(default, with = "humantime_serde")]
        pub statement_timeout: Option<Duration>,
        /// How long to wait for another migrator (dbkeeper or sqlx) holding the
        /// migration lock. Default: `10m`.
        #[serde(default = "default_lock_wait", with = "humantime_serde")]
        pub lock_wait: Duration,
        /// PostgreSQL: before running a migration, drop INVALID indexes left by an
        /// earlier failed `CREATE INDEX CONCURRENTLY` of that same migration (named in
        /// its SQL). Default: `false` (they are reported).
        #[serde(default)]
        pub drop_invalid_indexes: bool,
    }
    defaults(timeout = Duration::from_secs(6 * 3600), missed = Missed::Skip, retries = 0)
}

/// `[database.migrate] env`: variables for migration commands. Its `Debug` shows the
/// names only, since values may be secrets.
#[derive(Clone, Default, Deserialize)]
pub struct CommandEnv(pub std::collections::BTreeMap<String, String>);

impl std::fmt::Debug for CommandEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

/// Environment variables dbkeeper sets for migration commands itself.
pub const COMMAND_ENV_RESERVED: [&str; 4] = [
    "DATABASE_URL",
    "PGPASSWORD",
    "DBKEEPER_DATABASE",
    "DBKEEPER_DATABASE_PATH",
];

fn default_migrate_lock_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_lock_wait() -> Duration {
    Duration::from_secs(600)
}

fn yes() -> bool {
    true
}

fn default_refresh_lock_timeout() -> Duration {
    Duration::from_secs(5)
}

impl MigrateConfig {
    /// Where migration commands run: `working-dir`, relative to the directory of
    /// `source` (the config file declaring the database), which is the default.
    pub fn workdir(&self, source: &Path) -> PathBuf {
        let base = paths::base_dir(source);
        match &self.working_dir {
            Some(dir) => base.join(dir),
            None => base,
        }
    }
}

impl RetentionConfig {
    /// The job name: `name`, or the table's name made safe.
    pub fn job_name(&self) -> String {
        job_name(&self.name, &self.table)
    }
}

impl RefreshConfig {
    /// The job name: `name`, or the view's name made safe.
    pub fn job_name(&self) -> String {
        job_name(&self.name, &self.view)
    }
}

/// `name` if given, else the last part of the (possibly schema-qualified) object name
/// with characters that job ids and metric labels should not carry replaced.
fn job_name(name: &Option<String>, object: &str) -> String {
    name.clone().unwrap_or_else(|| {
        let object =
            crate::ident::QualifiedName::parse(object).map_or(object.to_owned(), |q| q.name);
        sanitize(&object)
    })
}

fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() {
        "_".to_owned()
    } else {
        s
    }
}

/// `encryption = "none"`: the only value, written to opt out of encryption on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncryptionSetting {
    None,
}

job_table! {
    /// `[database.backup]`: the `<database>.backup` job.
    pub struct BackupConfig {
        /// Where backups go: a folder (receives `<database>/<id>.dbk` and
        /// `<id>.manifest.json`, created mode 0700; relative: from this config file's
        /// directory), a `file://`, `s3://bucket/prefix`,
        /// `gs://bucket/prefix` or `az://container/prefix` URL, a table `{ url = …,
        /// endpoint, region, path-style, allow-http, credentials-file, keep }`, or a
        /// list of these: every backup is written to each. Required.
        pub destination: Destinations,
        /// `zstd` (multithreaded), `gzip` (parallel, multi-member) or `none`.
        /// Default: `zstd`.
        #[serde(default)]
        pub compression: Compression,
        /// Compression level: zstd 1-19 (default 3), gzip 1-9 (default 6).
        #[serde(default)]
        pub level: Option<i32>,
        /// 32-byte key file (`dbkeeper key generate`), mode 0600. A bare name (no
        /// `/`) is a systemd credential, read from `$CREDENTIALS_DIRECTORY` when set;
        /// otherwise a relative path is read from this config file's directory.
        /// Required unless `encryption = "none"`.
        #[serde(default)]
        pub encryption_key_file: Option<PathBuf>,
        /// Write `"none"` to store backups unencrypted, on purpose. Default: unset.
        #[serde(default)]
        pub encryption: Option<EncryptionSetting>,
        /// Create `encryption-key-file` (mode 0600) if it does not exist when a
        /// backup is about to be written (the daemon's start, `run-job`), e.g. for a
        /// demo or a first install; read-only commands never create it.
        /// Default: `false`.
        #[serde(default)]
        pub generate_key_if_missing: bool,
        /// Older key files, to read backups made before a key rotation; bare names
        /// are systemd credentials as for `encryption-key-file`. Default: none.
        #[serde(default)]
        pub decryption_key_files: Vec<PathBuf>,
        /// age recipients (`age1…`, as `age-keygen` prints them): each backup's data
        /// key is also wrapped for every one of them, so whoever holds a matching
        /// identity (`--identity`, `identity-files`) reads the backups. With
        /// recipients, `encryption-key-file` may be left out: this host then holds
        /// no secret that reads its backups, and proves it wrote them with
        /// `<state-dir>/writer.key` (created on first use). Default: none.
        #[serde(default)]
        pub recipients: Vec<String>,
        /// A file of age recipients, one per line (`#` comments, blank lines), as
        /// `age -R` reads it; added to `recipients`. A relative path is read from
        /// this config file's directory. Default: none.
        #[serde(default)]
        pub recipients_file: Option<PathBuf>,
        /// age identity files (as `age-keygen` writes them, mode 0600 or stricter)
        /// that every reader of these backups (restore, decrypt, verify, listing)
        /// may open version 3 archives with; bare names are systemd credentials as
        /// for `encryption-key-file`. Default: none.
        #[serde(default)]
        pub identity_files: Vec<PathBuf>,
        /// After writing: `none`, `read` (checksum + full decrypt + decompress) or
        /// `restore` (also restore into a scratch database and check it).
        /// Default: `read`.
        #[serde(default)]
        pub verify: VerifyMode,
        /// Rotation after each successful backup: `{ last, hourly, daily, weekly,
        /// monthly, yearly, within }`; a count of `-1` or `"all"` has no limit,
        /// `within` is a duration (`"7d"`); rules left out are off. Default (no `keep`
        /// at all): `{ last = 3, daily = 7, weekly = 4, monthly = 12 }`.
        #[serde(default = "Keep::recommended")]
        pub keep: Keep,
        /// PostgreSQL only: the `pg_dump` program (match the server's major version;
        /// a bare name is looked up in `$PATH`, a relative path with a `/` is read
        /// from this config file's directory). Default: `pg_dump` from `$PATH`.
        #[serde(default = "default_pg_dump")]
        pub pg_dump: PathBuf,
        /// PostgreSQL only: the `pg_restore` program. Default: `pg_restore` from `$PATH`.
        #[serde(default = "default_pg_restore")]
        pub pg_restore: PathBuf,
        /// PostgreSQL only: store the cluster globals the database needs (the roles
        /// that own or are granted its objects, with their attributes, role-wide
        /// settings, memberships and, if the connecting role may read them, password
        /// hashes; the tablespaces it uses) inside the archive, for `restore
        /// --with-roles`. Default: `true`.
        #[serde(default = "yes")]
        pub globals: bool,
        /// Pre-flight check: a folder destination must have at least the newest
        /// backup's stored size × this much free space before a backup starts, or it
        /// gets no copy of this one (the dump does not start if no destination
        /// qualifies). `0` turns the check off. Default: `2.0`.
        #[serde(default = "default_free_space_margin")]
        pub free_space_margin: f64,
        /// Databases only: the `[[files]]` sets (by name) taken in the same run
        /// under the same backup id, pre-migration backups included, each to its own
        /// destination (`<destination>/<files-name>/`); the database's manifest
        /// records them, so a rollback restores a matching pair. Each set still
        /// rotates by its own `keep`. Default: none.
        #[serde(default)]
        pub with_files: Vec<String>,
    }
    defaults(timeout = Duration::from_secs(6 * 3600), missed = Missed::RunOnce, retries = 0)
}

fn default_free_space_margin() -> f64 {
    2.0
}

fn default_pg_dump() -> PathBuf {
    PathBuf::from("pg_dump")
}

fn default_pg_restore() -> PathBuf {
    PathBuf::from("pg_restore")
}

impl BackupConfig {
    /// The compression level with the codec's default applied.
    pub fn level(&self) -> i32 {
        self.level
            .unwrap_or_else(|| self.compression.default_level())
    }

    /// Whether backups are encrypted: a key file (it may not exist yet when
    /// `generate-key-if-missing` will create it) or recipients are configured.
    pub fn encrypting(&self) -> bool {
        self.encryption_key_file.is_some() || self.has_recipients()
    }

    /// `recipients` or `recipients-file` is given.
    pub fn has_recipients(&self) -> bool {
        !self.recipients.is_empty() || self.recipients_file.is_some()
    }

    /// The age recipients new backups are made for: `recipients`, then those of
    /// `recipients-file`, without repeats.
    pub fn load_recipients(&self) -> Result<Vec<Recipient>, KeyError> {
        let mut all = Vec::new();
        for text in &self.recipients {
            all.push(text.parse::<Recipient>()?);
        }
        if let Some(file) = &self.recipients_file {
            all.extend(Recipient::load_file(file)?);
        }
        let mut seen = HashSet::new();
        all.retain(|r| seen.insert(r.to_string()));
        Ok(all)
    }

    /// The key file `generate-key-if-missing` has yet to create: configured, asked
    /// for, and not there.
    pub fn key_to_generate(&self) -> Option<&Path> {
        let path = self.encryption_key_file.as_deref()?;
        (self.generate_key_if_missing && !path.exists()).then_some(path)
    }

    /// Creates `encryption-key-file` (and its directory, mode 0700) when
    /// `generate-key-if-missing` asks for it and it does not exist. Only commands
    /// that are about to write backups call this; reading never creates a key.
    pub fn ensure_key(&self) -> Result<(), KeyError> {
        let Some(path) = self.key_to_generate() else {
            return Ok(());
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| KeyError::Create {
                    path: path.to_owned(),
                    source,
                })?;
        }
        let key = Key::generate(path)?;
        tracing::warn!(
            file = %path.display(),
            key_id = key.id(),
            "generated a new backup key; keep a copy of it apart from the backups"
        );
        Ok(())
    }

    /// The key new archives are encrypted with, given the loaded one: `None` only
    /// for `encryption = "none"`. A configured key that is not there is an error,
    /// never a reason to write plaintext.
    pub fn writing_key<'k>(&self, loaded: Option<&'k Key>) -> Result<Option<&'k Key>, KeyError> {
        match (&self.encryption_key_file, loaded) {
            (Some(path), None) => Err(KeyError::NotGenerated { path: path.clone() }),
            (_, key) => Ok(key),
        }
    }

    /// Loads the encryption key and every key that may decrypt this database's
    /// backups. Never writes: a key that `generate-key-if-missing` has not created
    /// yet is `None` (see [`BackupConfig::ensure_key`]), and [`Self::encrypting`]
    /// still says backups are encrypted.
    pub fn load_keys(&self) -> Result<(Option<Key>, KeyRing), KeyError> {
        let key = match &self.encryption_key_file {
            Some(_) if self.key_to_generate().is_some() => None,
            Some(path) => Some(Key::load(path)?),
            None => None,
        };
        let mut all: Vec<Key> = key.iter().cloned().collect();
        for path in &self.decryption_key_files {
            all.push(Key::load(path)?);
        }
        let mut identities = Vec::new();
        for path in &self.identity_files {
            identities.extend(Identity::load(path)?);
        }
        Ok((key, KeyRing::with_identities(all, identities)))
    }
}

impl Config {
    /// Every key file of the configuration, for commands that decrypt any archive.
    pub fn key_ring(&self) -> Result<KeyRing, KeyError> {
        let mut keys = Vec::new();
        let mut identities = Vec::new();
        for b in self.backups() {
            let (_, ring) = b.load_keys()?;
            identities.extend(ring.identities().iter().cloned());
            keys.extend(ring.into_keys());
        }
        Ok(KeyRing::with_identities(keys, identities))
    }

    /// This configuration with `files` (command-line `--identity` files) added to
    /// the `identity-files` of `database`'s backups, for a reader that may open
    /// archives made for them.
    pub fn with_identities(&self, database: &str, files: &[PathBuf]) -> Config {
        let mut config = self.clone();
        if files.is_empty() {
            return config;
        }
        let dbs = config
            .databases
            .iter_mut()
            .filter(|d| d.name == database)
            .filter_map(|d| d.backup.as_mut());
        let sets = config
            .files
            .iter_mut()
            .filter(|f| f.name == database)
            .map(|f| &mut f.backup);
        for b in dbs.chain(sets) {
            b.identity_files.extend(files.iter().cloned());
        }
        config
    }

    /// Every backup table with the name its backups are filed under: each
    /// `[database.backup]`, then each `[files.backup]`.
    pub fn named_backups(&self) -> impl Iterator<Item = (&str, &BackupConfig)> {
        let dbs = self
            .databases
            .iter()
            .filter_map(|db| Some((db.name.as_str(), db.backup.as_ref()?)));
        dbs.chain(self.files.iter().map(|f| (f.name.as_str(), &f.backup)))
    }

    fn backups(&self) -> impl Iterator<Item = &BackupConfig> {
        self.named_backups().map(|(_, b)| b)
    }

    /// Reads, parses and validates the file at `path` and its drop-ins: every
    /// `*.toml` file in the `conf.d` directory beside it, in file-name order. A
    /// drop-in adds `[[database]]` tables; `[daemon]` and `[notify]` may each be
    /// written in one file only, and a database name in two files is an error that
    /// names both.
    ///
    /// A file reached through a symbolic link is read where it really is: its
    /// relative paths and its `conf.d` are those beside the real file, so that every
    /// name of one file means one configuration. A `conf.d` beside the link that
    /// would thereby be ignored is an error.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let real = paths::real_file(path)?;
        paths::no_drop_ins_beside_link(path, &real)?;
        let mut config = Self::read_one(&real)?;
        for file in drop_in_files(&real)? {
            let file = paths::real_file(&file)?;
            let more = Self::read_one(&file)?;
            config.merge(more, &file)?;
            config.drop_ins.push(file);
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates `text` alone (no drop-ins); `path` is only used in
    /// error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config = Self::parse_one(path, text)?;
        config.validate()?;
        Ok(config)
    }

    /// One file, parsed but not validated.
    fn read_one(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_one(path, &text)
    }

    /// Adds the drop-in `more` (read from `file`).
    fn merge(&mut self, more: Config, file: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: file.to_owned(),
            key: key.to_owned(),
            message,
        };
        for (_, section) in &more.sections {
            if let Some((earlier, _)) = self.sections.iter().find(|(_, s)| s == section) {
                return Err(invalid(
                    section,
                    format!(
                        "[{section}] is also written in {}; write it in one file only",
                        earlier.display()
                    ),
                ));
            }
            match section.as_str() {
                "daemon" => self.daemon = more.daemon.clone(),
                _ => self.notify = more.notify.clone(),
            }
        }
        self.sections.extend(more.sections);
        self.bare_credentials.extend(more.bare_credentials);
        for db in more.databases {
            if let Some(other) = self.databases.iter().find(|d| d.name == db.name) {
                return Err(invalid(
                    &format!("database \"{}\".name", db.name),
                    format!(
                        "is also configured in {}; database names must be unique across the main file and its drop-ins",
                        other.source.display()
                    ),
                ));
            }
            self.databases.push(db);
        }
        // A name used twice (by files sets or a database) is refused by validation.
        self.files.extend(more.files);
        Ok(())
    }

    fn parse_one(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_column(text, span.start))
                .unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.message().trim().replace('\n', " "),
            }
        })?;
        config.path = path.to_owned();
        for db in &mut config.databases {
            db.source = path.to_owned();
        }
        for f in &mut config.files {
            f.source = path.to_owned();
        }
        config.anchor_paths(path)?;
        if let Ok(table) = text.parse::<toml::Table>() {
            for section in ["daemon", "notify"] {
                if table.contains_key(section) {
                    config.sections.push((path.to_owned(), section.to_owned()));
                }
            }
        }
        Ok(config)
    }

    /// The path to use when `-c` was not given.
    pub fn default_path() -> PathBuf {
        std::env::var_os(CONFIG_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
    }

    /// Added to "file not found" messages for secret files: a bare name outside the
    /// service is read beside the configuration file, which is rarely what was meant.
    fn credential_hint(&self, file: &Path) -> &'static str {
        if self.bare_credentials.iter().any(|b| b == file) {
            " (a bare name is a systemd credential: $CREDENTIALS_DIRECTORY is not set here, so it was looked for beside the configuration file; run under the service, e.g. `systemd-run -P --property=LoadCredential=NAME:/path dbkeeper check`, or write a path)"
        } else {
            ""
        }
    }

    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// `value` must lie in `range`; the error names the key and the range.
    fn bounded<T: PartialOrd + std::fmt::Debug>(
        &self,
        key: impl Into<String>,
        value: T,
        range: std::ops::RangeInclusive<T>,
        show: impl Fn(&T) -> String,
    ) -> Result<(), ConfigError> {
        if range.contains(&value) {
            Ok(())
        } else {
            Err(self.invalid(
                key,
                format!(
                    "{} is out of range; write a value from {} to {}",
                    show(&value),
                    show(range.start()),
                    show(range.end())
                ),
            ))
        }
    }

    fn duration(
        &self,
        key: impl Into<String>,
        d: Duration,
        max: Duration,
    ) -> Result<(), ConfigError> {
        self.bounded(key, d, Duration::ZERO..=max, |d| {
            humantime::format_duration(*d).to_string()
        })
    }

    fn count(
        &self,
        key: impl Into<String>,
        n: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<(), ConfigError> {
        self.bounded(key, n, range, u64::to_string)
    }

    /// The keys every job table shares.
    fn validate_job_options(&self, key: &str, o: &JobOptions) -> Result<(), ConfigError> {
        self.duration(format!("{key}.timeout"), o.timeout, MAX_JOB_TIMEOUT)?;
        if o.timeout.is_zero() {
            return Err(self.invalid(format!("{key}.timeout"), "must be longer than 0s"));
        }
        self.count(format!("{key}.retries"), o.retries.into(), 0..=100)?;
        self.duration(format!("{key}.retry-backoff"), o.retry_backoff, DAY)?;
        self.duration(format!("{key}.jitter"), o.jitter, DAY)
    }

    /// [`Config::check`], with an error about a database pointed at the file that
    /// configured it (a drop-in, perhaps).
    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_destination_overlap()?;
        self.check().map_err(|e| match e {
            ConfigError::Invalid { path, key, message } => {
                let dbs = self
                    .databases
                    .iter()
                    .map(|db| (format!("database \"{}\"", db.name), &db.source));
                let files = self
                    .files
                    .iter()
                    .map(|f| (format!("files \"{}\"", f.name), &f.source));
                let source = dbs
                    .chain(files)
                    .find(|(prefix, _)| key.starts_with(prefix.as_str()))
                    .map_or(path, |(_, source)| source.clone());
                ConfigError::Invalid {
                    path: source,
                    key,
                    message,
                }
            }
            other => other,
        })
    }

    fn check(&self) -> Result<(), ConfigError> {
        let d = &self.daemon;
        self.count(
            "daemon.max-concurrent-jobs",
            d.max_concurrent_jobs as u64,
            1..=1024,
        )?;
        self.duration("daemon.shutdown-grace", d.shutdown_grace, DAY)?;
        self.duration("daemon.history-keep", d.history_keep, MAX_AGE)?;
        self.duration("daemon.probe-interval", d.probe_interval, DAY)?;
        if d.probe_interval.is_zero() {
            return Err(self.invalid("daemon.probe-interval", "must be longer than 0s"));
        }
        self.validate_coordination()?;
        if let Some(n) = &self.notify {
            self.validate_notify(n)?;
        }
        if self.databases.is_empty() && self.files.is_empty() {
            return Err(self.invalid(
                "database",
                "no [[database]] (nor [[files]]) is configured; add one with a name and url",
            ));
        }
        let mut names = HashSet::new();
        for db in &self.databases {
            let key = format!("database \"{}\"", db.name);
            check_name(&db.name).map_err(|m| self.invalid(format!("{key}.name"), m))?;
            self.duration(
                format!("{key}.connect-timeout"),
                db.connect_timeout,
                Duration::from_secs(3600),
            )?;
            self.validate_jobs_of(&key, db)?;
            if !names.insert(db.name.as_str()) {
                return Err(self.invalid(
                    format!("{key}.name"),
                    "is used by two databases; database names must be unique",
                ));
            }
            let backend = Backend::from_url(&db.url)
                .map_err(|e| self.invalid(format!("{key}.url"), e.to_string()))?;
            let service = match backend {
                Backend::Postgres => {
                    crate::pgurl::split_secrets(&db.url)
                        .map_err(|m| self.invalid(format!("{key}.url"), m))?
                        .service
                }
                Backend::Sqlite => false,
            };
            if service {
                return Err(self.invalid(
                    format!("{key}.url"),
                    "has service=, which dbkeeper does not support (a service file could lead \
                     pg_dump or a migration command to another database than dbkeeper's own \
                     connections); write host, port, user and database in the URL instead",
                ));
            }
            if let Some(file) = &db.password_file {
                if backend != Backend::Postgres {
                    return Err(self.invalid(
                        format!("{key}.password-file"),
                        "only PostgreSQL databases take a password; remove this key",
                    ));
                }
                if !file.is_file() {
                    return Err(self.invalid(
                        format!("{key}.password-file"),
                        format!(
                            "{} is not a readable file; create it or fix the path{}",
                            file.display(),
                            self.credential_hint(file)
                        ),
                    ));
                }
            }
            if db.foreign_keys && backend != Backend::Sqlite {
                return Err(self.invalid(
                    format!("{key}.foreign-keys"),
                    "is for SQLite only; PostgreSQL always enforces foreign keys",
                ));
            }
            if let Some(backup) = &db.backup {
                self.validate_backup(&key, backup)?;
            }
            self.validate_retention(&key, db, backend)?;
            if let Some(m) = &db.migrate {
                if m.backup_first && db.backup.is_none() {
                    return Err(self.invalid(
                        format!("{key}.migrate.backup-first"),
                        "needs [database.backup] to take the pre-migration backup; add one or set backup-first = false",
                    ));
                }
                self.validate_migrate_source(&format!("{key}.migrate"), m)?;
            }
            self.validate_refresh(&key, db, backend)?;
            let mut jobs = HashSet::new();
            for job in &db.sql {
                self.claim_name(&mut jobs, &format!("{key}.sql \"{}\"", job.name), &job.name)?;
                if job.statement.trim().is_empty() {
                    return Err(self.invalid(
                        format!("{key}.sql \"{}\".statement", job.name),
                        "is empty; write the SQL to run",
                    ));
                }
            }
            self.validate_gauges(&key, db)?;
        }
        self.validate_files()
    }
}

impl Config {
    /// A job name must be valid and not used by another job of the same kind on the
    /// same database (`names`); `key` names the config entry in the error.
    fn claim_name(
        &self,
        names: &mut HashSet<String>,
        key: &str,
        name: &str,
    ) -> Result<(), ConfigError> {
        check_name(name).map_err(|m| self.invalid(format!("{key}.name"), m))?;
        if !names.insert(name.to_owned()) {
            return Err(self.invalid(
                format!("{key}.name"),
                format!("job name \"{name}\" is used twice on this database; names must be unique"),
            ));
        }
        Ok(())
    }

    fn validate_retention(
        &self,
        db_key: &str,
        db: &DatabaseConfig,
        backend: Backend,
    ) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for r in &db.retention {
            let key = format!("{db_key}.retention \"{}\"", r.table);
            crate::ident::QualifiedName::parse(&r.table)
                .map_err(|m| self.invalid(format!("{key}.table"), m))?;
            if r.column.is_empty() {
                return Err(self.invalid(
                    format!("{key}.column"),
                    "is empty; name the timestamp column",
                ));
            }
            self.claim_name(&mut names, &key, &r.job_name())?;
            self.count(
                format!("{key}.batch-size"),
                r.batch_size.into(),
                1..=MAX_BATCH,
            )?;
            self.count(
                format!("{key}.max-batch-size"),
                r.max_batch_size.into(),
                1..=MAX_BATCH,
            )?;
            self.duration(
                format!("{key}.batch-time"),
                r.batch_time,
                Duration::from_secs(60),
            )?;
            self.bounded(
                format!("{key}.older-than"),
                r.older_than,
                Duration::from_secs(1)..=MAX_AGE,
                |d| humantime::format_duration(*d).to_string(),
            )?;
            self.duration(
                format!("{key}.pause"),
                r.pause.unwrap_or_default(),
                Duration::from_secs(3600),
            )?;
            self.duration(
                format!("{key}.max-duration"),
                r.max_duration.unwrap_or_default(),
                MAX_JOB_TIMEOUT,
            )?;
            self.duration(
                format!("{key}.lock-timeout"),
                r.lock_timeout,
                MAX_PG_TIMEOUT,
            )?;
            if r.scan == ScanMode::Pages && backend != Backend::Postgres {
                return Err(self.invalid(
                    format!("{key}.scan"),
                    "\"pages\" is for PostgreSQL; SQLite batches always pick rows by row id",
                ));
            }
            if let Some(zone) = &r.column_timezone {
                if backend != Backend::Postgres {
                    return Err(self.invalid(
                        format!("{key}.column-timezone"),
                        "is for PostgreSQL timestamp and date columns; SQLite text without an offset is UTC, as SQLite's date functions read it",
                    ));
                }
                if zone.parse::<chrono_tz::Tz>().is_err() {
                    return Err(self.invalid(
                        format!("{key}.column-timezone"),
                        format!(
                            "\"{zone}\" is not an IANA time zone; write e.g. \"America/New_York\""
                        ),
                    ));
                }
            }
            if r.cascade && r.archive {
                return Err(self.invalid(
                    format!("{key}.cascade"),
                    "cannot be combined with archive = true: rows removed by the cascade would not be archived; archive the referencing tables with rules of their own",
                ));
            }
            if let Some(w) = r.where_clause.as_deref() {
                if w.trim().is_empty() {
                    return Err(self.invalid(
                        format!("{key}.where"),
                        "is empty; remove it or write a predicate",
                    ));
                }
                crate::ident::check_expression(w)
                    .map_err(|m| self.invalid(format!("{key}.where"), m))?;
            }
            if r.archive && db.backup.is_none() {
                return Err(self.invalid(
                    format!("{key}.archive"),
                    "needs [database.backup] (its destination and key hold the archives)",
                ));
            }
            if r.mode != RetentionMode::Delete {
                if backend != Backend::Postgres {
                    return Err(self.invalid(
                        format!("{key}.mode"),
                        "partitions exist on PostgreSQL only; use mode = \"delete\"",
                    ));
                }
                if r.archive || r.where_clause.is_some() {
                    return Err(self.invalid(
                        format!("{key}.mode"),
                        "whole partitions are dropped: archive and where only work with mode = \"delete\"",
                    ));
                }
            }
        }
        Ok(())
    }

    /// `[database.migrate]` names exactly one source of migrations (`dir` or
    /// `command`), and the command keys only go with `command`.
    fn validate_migrate_source(&self, k: &str, m: &MigrateConfig) -> Result<(), ConfigError> {
        let argv_ok = |key: &str, argv: &Option<Vec<String>>| {
            match argv {
            Some(a) if a.first().is_none_or(|p| p.trim().is_empty()) => Err(self.invalid(
                format!("{k}.{key}"),
                "is empty; give the program and its arguments, e.g. [\"alembic\", \"upgrade\", \"head\"]",
            )),
            _ => Ok(()),
        }
        };
        match (&m.dir, &m.command) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    format!("{k}.command"),
                    "cannot be combined with dir; keep dir for sqlx migration files or command for another tool, not both",
                ))
            }
            (None, None) => {
                return Err(self.invalid(
                    k.to_owned(),
                    "needs dir (a directory of sqlx migrations) or command (another tool's migrate command)",
                ))
            }
            _ => {}
        }
        argv_ok("command", &m.command)?;
        argv_ok("pending-command", &m.pending_command)?;
        argv_ok("plan-command", &m.plan_command)?;
        if m.command.is_none() {
            let only_with_command = [
                ("pending-command", m.pending_command.is_some()),
                ("plan-command", m.plan_command.is_some()),
                ("working-dir", m.working_dir.is_some()),
                ("env", !m.env.0.is_empty()),
            ];
            if let Some((key, _)) = only_with_command.iter().find(|(_, set)| *set) {
                return Err(self.invalid(
                    format!("{k}.{key}"),
                    "only applies to command migrations; add command = [...] or remove it",
                ));
            }
        }
        if let Some(name) = m
            .env
            .0
            .keys()
            .find(|n| COMMAND_ENV_RESERVED.contains(&n.as_str()) || n.starts_with("PG"))
        {
            return Err(self.invalid(
                format!("{k}.env.{name}"),
                "is set by dbkeeper itself from the database's url and password-file \
                 (libpq's PG* variables too, so that a dry run cannot reach the real database); \
                 remove it and put connection settings in the url",
            ));
        }
        if m.dry_run_on_copy && !m.backup_first {
            return Err(self.invalid(
                format!("{k}.dry-run-on-copy"),
                "copies the pre-migration backup, so it needs backup-first = true",
            ));
        }
        Ok(())
    }

    fn validate_refresh(
        &self,
        db_key: &str,
        db: &DatabaseConfig,
        backend: Backend,
    ) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for r in &db.refresh {
            let key = format!("{db_key}.refresh \"{}\"", r.view);
            let view = crate::ident::QualifiedName::parse(&r.view)
                .map_err(|m| self.invalid(format!("{key}.view"), m))?;
            // A TEMP table lives only as long as dbkeeper's connection: the refresh
            // would report rows that nobody else can ever read.
            if backend == Backend::Sqlite
                && view
                    .schema
                    .as_deref()
                    .is_some_and(|s| s.eq_ignore_ascii_case("temp"))
            {
                return Err(self.invalid(
                    format!("{key}.view"),
                    "names SQLite's TEMP schema, whose tables vanish when dbkeeper's connection closes; use a table in main or an attached schema",
                ));
            }
            self.claim_name(&mut names, &key, &r.job_name())?;
            match (backend, &r.query) {
                (Backend::Sqlite, None) => {
                    return Err(self.invalid(
                        format!("{key}.query"),
                        "is required on SQLite: the table is rebuilt from this query",
                    ))
                }
                (Backend::Postgres, Some(_)) => return Err(self.invalid(
                    format!("{key}.query"),
                    "is for SQLite only; on PostgreSQL the materialized view's own query is used",
                )),
                _ => {}
            }
        }
        Ok(())
    }

    fn validate_backup(&self, db_key: &str, b: &BackupConfig) -> Result<(), ConfigError> {
        let key = format!("{db_key}.backup");
        let range = b.compression.level_range();
        if !range.contains(&b.level()) {
            return Err(self.invalid(
                format!("{key}.level"),
                format!(
                    "{} is out of range for {} ({}..={})",
                    b.level(),
                    b.compression.as_str(),
                    range.start(),
                    range.end()
                ),
            ));
        }
        if !(b.free_space_margin.is_finite() && b.free_space_margin >= 0.0) {
            return Err(self.invalid(
                format!("{key}.free-space-margin"),
                "must be a number ≥ 0 (0 turns the free-space check off)",
            ));
        }
        b.load_recipients().map_err(|e| {
            let name = match e {
                KeyError::BadRecipient { .. } => "recipients",
                _ => "recipients-file",
            };
            self.invalid(format!("{key}.{name}"), e.to_string())
        })?;
        if b.has_recipients() && b.encryption == Some(EncryptionSetting::None) {
            return Err(self.invalid(
                format!("{key}.encryption"),
                "\"none\" contradicts recipients; remove one of the two",
            ));
        }
        match (&b.encryption_key_file, b.encryption) {
            (Some(_), Some(EncryptionSetting::None)) => {
                return Err(self.invalid(
                    format!("{key}.encryption"),
                    "\"none\" contradicts encryption-key-file; remove one of the two",
                ))
            }
            (None, None) if b.has_recipients() => {}
            (None, None) => {
                return Err(self.invalid(
                    format!("{key}.encryption-key-file"),
                    "is required; create a key with `dbkeeper key generate -o FILE`, or write encryption = \"none\" to store backups unencrypted",
                ))
            }
            _ => {}
        }
        let files = b
            .encryption_key_file
            .iter()
            .map(|f| ("encryption-key-file", f));
        let old = b
            .decryption_key_files
            .iter()
            .map(|f| ("decryption-key-files", f));
        for (name, file) in files.chain(old) {
            if name == "encryption-key-file" && b.key_to_generate().is_some() {
                let credentials = std::env::var_os("CREDENTIALS_DIRECTORY");
                if self.bare_credentials.contains(file) {
                    // Outside the service (no $CREDENTIALS_DIRECTORY) a bare name is a
                    // file beside the config: a key made there would not be the one
                    // the service, reading its credentials directory, uses.
                    return Err(self.invalid(
                        format!("{key}.{name}"),
                        format!(
                            "{} is a bare name, which names a systemd credential, and $CREDENTIALS_DIRECTORY is not set here; generate-key-if-missing writes only to a path: write ./NAME (beside the configuration file) or an absolute path",
                            file.display()
                        ),
                    ));
                }
                if credentials.is_some_and(|dir| !dir.is_empty() && file.starts_with(dir)) {
                    return Err(self.invalid(
                        format!("{key}.{name}"),
                        format!(
                            "{} is a systemd credential that was not loaded, and generate-key-if-missing cannot write into $CREDENTIALS_DIRECTORY; create the key with `dbkeeper key generate -o PATH` and add LoadCredential=NAME:PATH to the unit",
                            file.display()
                        ),
                    ));
                }
                continue;
            }
            Key::load(file).map_err(|e| {
                self.invalid(
                    format!("{key}.{name}"),
                    format!("{e}{}", self.credential_hint(file)),
                )
            })?;
        }
        for file in &b.identity_files {
            Identity::load(file).map_err(|e| {
                self.invalid(
                    format!("{key}.identity-files"),
                    format!("{e}{}", self.credential_hint(file)),
                )
            })?;
        }
        self.validate_keep(&format!("{key}.keep"), &b.keep)?;
        for d in &b.destination {
            self.validate_destination(&format!("{key}.destination"), d)?;
        }
        // One folder under two spellings (`./b` and `b`, a symbolic link) would get
        // every backup twice and be rotated by two keep policies.
        let folders: Vec<(String, PathBuf)> = b
            .destination
            .iter()
            .filter_map(|d| Some((d.label(), d.local_dir()?.canonicalize().ok()?)))
            .collect();
        for (i, (label, real)) in folders.iter().enumerate() {
            if let Some((other, _)) = folders[..i].iter().find(|(_, r)| r == real) {
                return Err(self.invalid(
                    format!("{key}.destination"),
                    format!("{other} and {label} are the same folder; list it once"),
                ));
            }
        }
        Ok(())
    }

    /// No destination may lie inside another (of any database): each one's clean-up
    /// and rotation would take the other's files for its own.
    fn validate_destination_overlap(&self) -> Result<(), ConfigError> {
        let all: Vec<(&str, &DestinationConfig)> = self
            .named_backups()
            .flat_map(|(name, b)| b.destination.iter().map(move |d| (name, d)))
            .collect();
        for (db, inner) in &all {
            for (other_db, outer) in &all {
                if outer.location.contains(&inner.location) {
                    return Err(self.invalid(
                        format!("{db}.backup.destination"),
                        format!(
                            "{} lies inside {} (a destination of {other_db}): their clean-up and rotation would take each other's files; use folders or prefixes side by side",
                            inner.label(),
                            outer.label()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_keep(&self, key: &str, keep: &Keep) -> Result<(), ConfigError> {
        for (name, count) in keep.counts() {
            if let Some(n) = count.limit() {
                self.count(format!("{key}.{name}"), n.into(), 0..=1_000_000)?;
            }
        }
        if let Some(within) = keep.within {
            self.duration(format!("{key}.within"), within, MAX_AGE)?;
        }
        if !keep.keeps_something() {
            return Err(self.invalid(
                key,
                "keeps no backup at all; set at least one of last, hourly, daily, weekly, monthly, yearly above 0 (or to \"all\"), or within to a duration",
            ));
        }
        Ok(())
    }

    /// Settings that mean nothing for the destination's kind are refused, and a
    /// credentials file must be there and private (it is read when a backup starts).
    fn validate_destination(&self, key: &str, d: &DestinationConfig) -> Result<(), ConfigError> {
        use std::os::unix::fs::MetadataExt;
        let s = &d.settings;
        let key = format!("{key} ({})", d.label());
        if let Some(keep) = &s.keep {
            self.validate_keep(&format!("{key}.keep"), keep)?;
        }
        let remote_only = [
            ("endpoint", s.endpoint.is_some()),
            ("region", s.region.is_some()),
            ("path-style", s.path_style.is_some()),
            ("allow-http", s.allow_http.is_some()),
            ("credentials-file", s.credentials_file.is_some()),
            ("retry-timeout", s.retry_timeout.is_some()),
            ("stale-upload-after", s.stale_upload_after.is_some()),
        ];
        if d.location.is_local() {
            if let Some((name, _)) = remote_only.iter().find(|(_, set)| *set) {
                return Err(self.invalid(
                    format!("{key}.{name}"),
                    "applies to object stores only (s3://, gs://, az://); remove it for a folder",
                ));
            }
        }
        if let Some(d) = s.stale_upload_after {
            self.duration(format!("{key}.stale-upload-after"), d, DAY)?;
        }
        if let Some(endpoint) = &s.endpoint {
            let url = url::Url::parse(endpoint).map_err(|e| {
                self.invalid(format!("{key}.endpoint"), format!("is not a URL: {e}"))
            })?;
            if !url.username().is_empty() || url.password().is_some() {
                return Err(self.invalid(
                    format!("{key}.endpoint"),
                    "holds credentials; put them in credentials-file or the environment",
                ));
            }
        }
        if let Some(file) = &s.credentials_file {
            let bad = |message: String| {
                self.invalid(
                    format!("{key}.credentials-file"),
                    format!("{message}{}", self.credential_hint(file)),
                )
            };
            let meta = std::fs::metadata(file)
                .map_err(|e| bad(format!("cannot read {}: {e}", file.display())))?;
            if !meta.is_file() {
                return Err(bad(format!("{} is not a regular file", file.display())));
            }
            if meta.mode() & 0o077 != 0 {
                return Err(bad(format!(
                    "{} has mode {:o}; it holds secrets: chmod 0600 it",
                    file.display(),
                    meta.mode() & 0o7777
                )));
            }
        }
        Ok(())
    }
}

const DAY: Duration = Duration::from_secs(86_400);
/// Longest age a rule or the history may name: far beyond any real policy, and short
/// enough that `now - age` is always a valid date for every backend.
const MAX_AGE: Duration = Duration::from_secs(1000 * 31_557_600);
/// Longest a job may run.
const MAX_JOB_TIMEOUT: Duration = Duration::from_secs(30 * 86_400);
/// PostgreSQL's lock_timeout and statement_timeout are milliseconds in an int4.
const MAX_PG_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);
/// Largest retention batch.
const MAX_BATCH: u64 = 10_000_000;

impl Config {
    /// The shared job keys of every job on `db`, and the kind-specific timeouts.
    fn validate_jobs_of(&self, key: &str, db: &DatabaseConfig) -> Result<(), ConfigError> {
        if let Some(b) = &db.backup {
            self.validate_job_options(&format!("{key}.backup"), &b.options(self.notify.as_ref()))?;
        }
        for r in &db.retention {
            self.validate_job_options(
                &format!("{key}.retention \"{}\"", r.table),
                &r.options(self.notify.as_ref()),
            )?;
        }
        for r in &db.refresh {
            let k = format!("{key}.refresh \"{}\"", r.view);
            self.validate_job_options(&k, &r.options(self.notify.as_ref()))?;
            self.duration(format!("{k}.lock-timeout"), r.lock_timeout, MAX_PG_TIMEOUT)?;
        }
        if let Some(m) = &db.migrate {
            let k = format!("{key}.migrate");
            self.validate_job_options(&k, &m.options(self.notify.as_ref()))?;
            self.duration(format!("{k}.lock-timeout"), m.lock_timeout, MAX_PG_TIMEOUT)?;
            self.duration(
                format!("{k}.statement-timeout"),
                m.statement_timeout.unwrap_or_default(),
                MAX_PG_TIMEOUT,
            )?;
            self.duration(format!("{k}.lock-wait"), m.lock_wait, MAX_JOB_TIMEOUT)?;
        }
        for s in &db.sql {
            self.validate_job_options(
                &format!("{key}.sql \"{}\"", s.name),
                &s.options(self.notify.as_ref()),
            )?;
        }
        for g in &db.gauge {
            self.validate_job_options(
                &format!("{key}.gauge \"{}\"", g.name),
                &g.options(self.notify.as_ref()),
            )?;
        }
        Ok(())
    }

    /// `[[database.gauge]]` entries and the `table-stats` keys.
    fn validate_gauges(&self, key: &str, db: &DatabaseConfig) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        let cap = 1..=MAX_MAX_SERIES as u64;
        for g in &db.gauge {
            let k = format!("{key}.gauge \"{}\"", g.name);
            self.claim_name(&mut names, &k, &g.name)?;
            if g.query.trim().is_empty() {
                return Err(self.invalid(
                    format!("{k}.query"),
                    "is empty; write the SELECT whose rows are the gauge's series",
                ));
            }
            self.count(
                format!("{k}.max-series"),
                g.max_series() as u64,
                cap.clone(),
            )?;
        }
        if !db.table_stats {
            for (set, name) in [
                (db.table_stats_schedule.is_some(), "table-stats-schedule"),
                (
                    db.table_stats_max_tables.is_some(),
                    "table-stats-max-tables",
                ),
            ] {
                if set {
                    return Err(self.invalid(
                        format!("{key}.{name}"),
                        "has no effect without table-stats = true; add that or remove this key",
                    ));
                }
            }
        }
        self.count(
            format!("{key}.table-stats-max-tables"),
            db.table_stats_max_tables() as u64,
            cap,
        )
    }
}

/// The drop-in directory of the config file at `main`: `conf.d` beside it.
pub fn drop_in_dir(main: &Path) -> PathBuf {
    main.parent().unwrap_or(Path::new(".")).join("conf.d")
}

/// The `*.toml` files in [`drop_in_dir`], in byte order of their names; none when
/// the directory does not exist. Other files (editor backups, `.rpmnew`, hidden
/// files) are ignored.
fn drop_in_files(main: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = drop_in_dir(main);
    let read_err = |source| ConfigError::Read {
        path: dir.clone(),
        source,
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_err(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(read_err)?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let wanted = name.is_some_and(|n| !n.starts_with('.') && n.ends_with(".toml"));
        if wanted && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Resolves a secret file name: a bare name (no `/`) is a systemd credential when
/// `$CREDENTIALS_DIRECTORY` is set (`LoadCredential=NAME:/path`), found at
/// `$CREDENTIALS_DIRECTORY/NAME`; anything else is a path as written.
pub fn resolve_credential(file: &Path) -> PathBuf {
    resolve_in(file, std::env::var_os("CREDENTIALS_DIRECTORY").as_deref())
}

fn resolve_in(file: &Path, credentials_dir: Option<&std::ffi::OsStr>) -> PathBuf {
    match credentials_dir {
        Some(dir) if !dir.is_empty() && is_bare_name(file) => Path::new(dir).join(file),
        _ => file.to_owned(),
    }
}

/// One plain file name, the only form a systemd credential name can take.
fn is_bare_name(file: &Path) -> bool {
    let mut parts = file.components();
    matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    )
}

impl Config {
    /// `cluster`, `coordination`, `coordination-password-file` and `lease-timeout`.
    fn validate_coordination(&self) -> Result<(), ConfigError> {
        let d = &self.daemon;
        let Some(url) = &d.coordination else {
            for (set, key) in [
                (d.cluster.is_some(), "daemon.cluster"),
                (
                    d.coordination_password_file.is_some(),
                    "daemon.coordination-password-file",
                ),
            ] {
                if set {
                    return Err(self.invalid(
                        key,
                        "only takes effect with daemon.coordination; add the coordination URL or remove this key",
                    ));
                }
            }
            return Ok(());
        };
        if let Some(name) = &d.cluster {
            check_name(name).map_err(|m| self.invalid("daemon.cluster", m))?;
        }
        if Backend::from_url(url).ok() != Some(Backend::Postgres) {
            return Err(self.invalid(
                "daemon.coordination",
                "must be a postgres:// URL: replicas coordinate through a PostgreSQL database",
            ));
        }
        let secrets =
            crate::pgurl::split_secrets(url).map_err(|m| self.invalid("daemon.coordination", m))?;
        if secrets.service {
            return Err(self.invalid(
                "daemon.coordination",
                "has service=, which dbkeeper does not support; write host, port, user and database in the URL instead",
            ));
        }
        if let Some(file) = &d.coordination_password_file {
            if !file.is_file() {
                return Err(self.invalid(
                    "daemon.coordination-password-file",
                    format!(
                        "{} is not a readable file; create it or fix the path{}",
                        file.display(),
                        self.credential_hint(file)
                    ),
                ));
            }
        }
        self.duration(
            "daemon.lease-timeout",
            d.lease_timeout,
            Duration::from_secs(3600),
        )?;
        if d.lease_timeout < Duration::from_secs(3) {
            return Err(self.invalid(
                "daemon.lease-timeout",
                "must be at least 3s (it is renewed every third of it)",
            ));
        }
        Ok(())
    }
}

/// Names end up in job ids (`db.kind.name`), metric labels and file paths, so they are
/// kept to a safe alphabet.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "\"{name}\" is not a valid name; use 1 to 64 letters, digits, '_' or '-'"
        ))
    }
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests;

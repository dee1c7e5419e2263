//! The maintenance jobs: what each kind does once it is its turn to run, and the
//! registry of the configured jobs ([`Jobs`]).
//!
//! This module is the one place that knows the job kinds: [`Work`] is matched here,
//! nowhere else. The
//! daemon, `check`, `/status` and the command line see a [`Job`] through its
//! kind-agnostic hooks ([`Job::execute`], [`Job::activate`], [`Job::check`],
//! [`Job::runs_before_ready`], [`Job::last_success_on_disk`], …) and find the jobs
//! they work on through [`Jobs`] and its typed lookups ([`Jobs::backup_for`],
//! [`Jobs::migrate_for`], [`Jobs::retention_for`]).
//!
//! The runner decides *when* and *whether* (overlap, concurrency, timeout, retries);
//! a [`Job`] only knows how to do its work once, and its error says whether trying
//! again can help ([`Transient`]). Job ids are `<database>.<kind>[.<name>]`.
//!
//! A new job kind touches its config section (`config`), its own `jobs/<kind>/`, and
//! this file: a [`Kind`], a [`Work`] and a `Section` variant; their arms in the
//! hooks of [`Job`], in [`entries`], [`Entry::kind`] and `Builder::work`; and a
//! [`JobError`] variant with its [`Transient`] impl. The compiler lists every match
//! to extend. Its own Prometheus series, if any, go in `metrics`.

pub mod backup;
pub mod gauge;
pub mod migrate;
pub mod refresh;
pub mod retention;
mod sql;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::config::{
    BackupConfig, Config, DatabaseConfig, FilesConfig, GaugeConfig, JobOptions, MigrateConfig,
    RefreshConfig, RetentionConfig, SqlJobConfig,
};
use crate::db::{Access, Database, DbError};
use crate::metrics::{self, JobLabels};
use crate::repo::archive::{Key, KeyRing};
use crate::repo::catalog::{BackupKind, TrustPolicy};
use crate::repo::storage::{self, Storage};

pub use sql::SqlJob;

/// What started a run; stored in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Schedule,
    Startup,
    /// The daemon was down at the scheduled time (`missed = "run-once"`).
    Missed,
    /// `dbkeeper run-job` (and `migrate apply`).
    Manual,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Startup => "startup",
            Trigger::Missed => "missed",
            Trigger::Manual => "manual",
        }
    }
}

/// The job kinds, as they appear in job ids and the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Backup,
    Retention,
    Refresh,
    Migrate,
    Sql,
    Gauge,
    TableStats,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Backup => "backup",
            Kind::Retention => "retention",
            Kind::Refresh => "refresh",
            Kind::Migrate => "migrate",
            Kind::Sql => "sql",
            Kind::Gauge => "gauge",
            Kind::TableStats => "table-stats",
        }
    }
}

/// One configured job, ready to run.
#[derive(Debug)]
pub struct Job {
    /// `<database>.<kind>[.<name>]`, e.g. `app.sql.vacuum`.
    pub id: String,
    pub work: Work,
    /// The database the job runs on; `None` for the backup of a `[[files]]` set.
    pub database: Option<Database>,
    /// The database's or files set's name: the first part of the id and the
    /// `database` label.
    pub name: String,
    pub options: JobOptions,
}

/// What a job does; one variant per job kind.
#[derive(Debug)]
pub enum Work {
    /// Shared with the database's migrate job, which takes a backup first.
    Backup(Arc<backup::BackupJob>),
    Retention(Box<retention::RetentionJob>),
    Refresh(Box<refresh::RefreshJob>),
    Migrate(Box<migrate::MigrateJob>),
    Sql(SqlJob),
    Gauge(Box<gauge::GaugeJob>),
    TableStats(gauge::TableStatsJob),
}

impl Work {
    pub fn kind(&self) -> Kind {
        match self {
            Work::Backup(_) => Kind::Backup,
            Work::Retention(_) => Kind::Retention,
            Work::Refresh(_) => Kind::Refresh,
            Work::Migrate(_) => Kind::Migrate,
            Work::Sql(_) => Kind::Sql,
            Work::Gauge(_) => Kind::Gauge,
            Work::TableStats(_) => Kind::TableStats,
        }
    }
}

impl Job {
    /// The kind label used in job ids and metrics.
    pub fn kind(&self) -> &'static str {
        self.work.kind().as_str()
    }

    pub fn database_name(&self) -> &str {
        &self.name
    }

    /// The database the job runs on; only a files set's backup has none.
    pub fn db(&self) -> Result<&Database, JobError> {
        self.database
            .as_ref()
            .ok_or_else(|| JobError::NoDatabase(self.id.clone()))
    }

    /// The labels of this job's metric series.
    pub fn labels(&self) -> JobLabels<'_> {
        JobLabels {
            job: &self.id,
            kind: self.kind(),
            database: self.database_name(),
        }
    }

    /// True for jobs that must not run beside any other job on the same database.
    pub fn exclusive(&self) -> bool {
        matches!(self.work, Work::Migrate(_))
    }

    /// True for a job the daemon runs (and waits for) at start-up before it reports
    /// ready: `@startup` migrations, so the application never sees an old schema.
    pub fn runs_before_ready(&self) -> bool {
        matches!(self.work, Work::Migrate(_)) && self.options.schedule.is_startup()
    }

    /// True for a job whose results live only in the daemon's memory (query gauges,
    /// table stats): after a start they are empty until it runs, so the daemon runs
    /// it at once instead of leaving Prometheus without the series for up to an
    /// interval. (Periodic schedules only: the daemon never runs a `manual` job.)
    /// Replicas: whether runs are claimed cluster-wide. Query gauges and table stats
    /// are not: they only read, and each replica serves its own `/metrics`.
    pub fn coordinated(&self) -> bool {
        !self.runs_at_start()
    }

    pub fn runs_at_start(&self) -> bool {
        matches!(self.work, Work::Gauge(_) | Work::TableStats(_))
    }

    /// Called for every job whenever a configuration is (re)loaded; `startup` on the
    /// daemon's start only. Publishes the kind's own series (retention rules,
    /// refreshed views, migration status, the backup catalog) and, at start-up,
    /// clears what a crashed run left behind. Never fails: problems are logged.
    pub fn activate(self: &Arc<Self>, startup: bool) {
        let database = self.database_name();
        match &self.work {
            Work::Backup(b) => {
                if startup {
                    b.clean_scratch(database);
                }
                // Before the policy: a key rotation just loaded retires the old key now.
                b.note_current_key(database);
                let policy = b.trust_policy(database, false);
                for place in b.places(database) {
                    let local = place.config.location.is_local();
                    let job = self.id.clone();
                    let (database, policy) = (database.to_owned(), policy.clone());
                    let work = move || {
                        if startup {
                            match crate::repo::catalog::clean(&*place.store) {
                                Ok(removed) => {
                                    for name in removed {
                                        tracing::warn!(job = %job, destination = %place.label(), file = %name, "removed what an interrupted backup left behind");
                                    }
                                }
                                Err(e) => {
                                    tracing::warn!(job = %job, destination = %place.label(), "cannot clean up: {e}")
                                }
                            }
                        }
                        backup::publish_catalog(&database, &place, &policy, true);
                    };
                    // An object store that is down answers only after its retries: it
                    // must not hold the daemon's start (and READY=1) for that long.
                    if local {
                        work();
                    } else {
                        tokio::task::spawn_blocking(work);
                    }
                }
            }
            Work::Retention(r) => {
                metrics::register_retention(database, &r.cfg.table, &r.rule, r.cfg.older_than)
            }
            Work::Refresh(r) => metrics::register_refresh(database, &r.cfg.view),
            Work::Migrate(_) => {
                // Reads the directory and the history; not worth holding start-up for.
                let job = self.clone();
                tokio::spawn(async move {
                    if let Work::Migrate(m) = &job.work {
                        let status = match job.db() {
                            Ok(db) => m.publish_status(db).await.map_err(JobError::from),
                            Err(e) => Err(e),
                        };
                        if let Err(e) = status {
                            tracing::warn!(job = %job.id, "cannot read migration status: {e}");
                        }
                    }
                });
            }
            Work::Gauge(g) => g.register(database),
            Work::Sql(_) | Work::TableStats(_) => {}
        }
    }

    /// When the job last succeeded according to what it left on disk, if it keeps
    /// such a record: a backup's manifests. The daemon uses it when the run history
    /// lost the last success (deleted or corrupted state), so "backup too old"
    /// alerts stay right. Only a trusted backup of the present counts: a planted or
    /// future-dated one would silence the alert.
    pub fn last_success_on_disk(&self) -> Option<DateTime<Utc>> {
        let Work::Backup(b) = &self.work else {
            return None;
        };
        let database = self.database_name();
        let policy = b.trust_policy(database, false);
        b.places(database)
            .iter()
            .filter_map(|place| crate::repo::catalog::list(&*place.store, &policy).ok())
            .filter_map(|listing| {
                crate::repo::catalog::select(&listing.backups, "latest", Utc::now())
                    .map(|m| m.started_at)
            })
            .max()
    }

    /// What `dbkeeper check` asks of a job once its database answered: do the
    /// tables, columns, views and migrations the config names fit the database?
    /// Returns notes to print (`reads events.created_at as …`, warnings); an error
    /// means the configuration does not fit (`check` exits 2).
    pub async fn check(&self) -> Result<Vec<String>, JobError> {
        let mut notes = Vec::new();
        match &self.work {
            Work::Retention(r) => {
                let target = r.check(self.db()?).await?;
                notes.push(format!(
                    "reads {}.{} as {}",
                    r.cfg.table, r.cfg.column, target.reading
                ));
            }
            Work::Refresh(r) => r.check(self.db()?).await?,
            Work::Migrate(m) if m.is_command() => notes.push(format!(
                "runs `{}`; check does not run commands, `migrate status` runs the pending-command",
                m.cfg.command.as_deref().unwrap_or_default().join(" ")
            )),
            Work::Migrate(m) => {
                let status = m.status(self.db()?).await?;
                for problem in &status.problems {
                    notes.push(format!("WARNING: {problem}"));
                }
                if !status.pending.is_empty() {
                    notes.push(format!("{} migrations pending", status.pending.len()));
                }
            }
            Work::Gauge(g) => notes.push(g.check(self.db()?, self.options.timeout).await?),
            Work::Backup(b) => {
                if let Some(files) = &b.files {
                    notes.push(files.check()?);
                }
            }
            Work::Sql(_) | Work::TableStats(_) => {}
        }
        Ok(notes)
    }

    /// Does the work once. The runner decides about timeouts and retries and fires
    /// `cancel` when the attempt must stop; the job then cleans up and returns.
    pub async fn execute(
        &self,
        trigger: Trigger,
        cancel: CancellationToken,
    ) -> Result<Outcome, JobError> {
        match &self.work {
            Work::Backup(b) => {
                let kind = match trigger {
                    Trigger::Manual => BackupKind::Manual,
                    _ => BackupKind::Scheduled,
                };
                Ok(b.run(self.database.as_ref(), kind, &cancel).await?)
            }
            Work::Retention(r) => Ok(r.run(self.db()?, &cancel).await?),
            Work::Refresh(r) => Ok(r.run(self.db()?, &cancel).await?),
            Work::Migrate(m) => Ok(m.run(self.db()?, &cancel).await?),
            Work::Sql(sql) => sql.run(self.db()?, self.options.timeout, &cancel).await,
            Work::Gauge(g) => {
                let timeout = self.options.timeout;
                Ok(g.run(&self.id, self.db()?, timeout, &cancel).await?)
            }
            Work::TableStats(t) => Ok(t.run(&self.id, self.db()?).await?),
        }
    }
}

/// What a successful run reports: a one-line summary for logs and a JSON object for
/// the run history.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub summary: String,
    pub details: serde_json::Value,
}

/// Whether trying again can help: every error a job returns says so itself, and the
/// runner retries (up to the job's `retries`) only what is transient. The rule of
/// thumb: transient unless the configuration names something that is not there,
/// the job refused on purpose, or a second attempt would do harm (run a migration
/// twice).
///
/// Implemented here for each job error; the modules that own an error may move its
/// impl next to it (`DbError`'s stays here: `db` sits below `jobs`).
pub trait Transient {
    /// True when the same attempt may succeed later (a lost connection, a lock
    /// timeout, a full disk someone may clear).
    fn is_transient(&self) -> bool;
}

impl Transient for DbError {
    fn is_transient(&self) -> bool {
        true
    }
}

// Each error decides for itself (an inherent method beside its variants).
impl Transient for backup::BackupError {
    fn is_transient(&self) -> bool {
        backup::BackupError::is_transient(self)
    }
}

impl Transient for retention::RetentionError {
    fn is_transient(&self) -> bool {
        retention::RetentionError::is_transient(self)
    }
}

impl Transient for refresh::RefreshError {
    fn is_transient(&self) -> bool {
        refresh::RefreshError::is_transient(self)
    }
}

impl Transient for gauge::GaugeError {
    fn is_transient(&self) -> bool {
        gauge::GaugeError::is_transient(self)
    }
}

impl Transient for migrate::MigrateError {
    fn is_transient(&self) -> bool {
        migrate::MigrateError::is_transient(self)
    }
}

/// A run of a job failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Backup(#[from] backup::BackupError),
    #[error(transparent)]
    Retention(#[from] retention::RetentionError),
    #[error(transparent)]
    Refresh(#[from] refresh::RefreshError),
    #[error(transparent)]
    Migrate(#[from] migrate::MigrateError),
    #[error(transparent)]
    Gauge(#[from] gauge::GaugeError),
    /// A job that needs a database was asked to run without one (a bug).
    #[error("job {0} has no database to run on; this is a bug in dbkeeper, please report it")]
    NoDatabase(String),
}

impl Transient for JobError {
    fn is_transient(&self) -> bool {
        match self {
            JobError::Db(e) => e.is_transient(),
            JobError::Backup(e) => e.is_transient(),
            JobError::Retention(e) => e.is_transient(),
            JobError::Refresh(e) => e.is_transient(),
            JobError::Migrate(e) => e.is_transient(),
            JobError::Gauge(e) => e.is_transient(),
            JobError::NoDatabase(_) => false,
        }
    }
}

impl JobError {
    /// True when the configuration is wrong rather than the database or the run:
    /// `run-job` and `migrate apply` then exit 2, like `check`.
    pub fn is_config(&self) -> bool {
        matches!(self, JobError::Migrate(e) if e.is_config())
    }

    /// True when the failure means the database could not be reached.
    pub fn database_unreachable(&self) -> bool {
        match self {
            JobError::Db(e) => e.is_unreachable(),
            JobError::Backup(e) => e.database_unreachable(),
            JobError::Retention(retention::RetentionError::Db(e))
            | JobError::Refresh(refresh::RefreshError::Db(e)) => e.is_unreachable(),
            JobError::Migrate(migrate::MigrateError::Db(e))
            | JobError::Gauge(gauge::GaugeError::Db(e)) => e.is_unreachable(),
            JobError::Retention(_)
            | JobError::Refresh(_)
            | JobError::Migrate(_)
            | JobError::Gauge(_)
            | JobError::NoDatabase(_) => false,
        }
    }
}

/// True if `e` says the configuration is wrong rather than the database or the run
/// (e.g. two migrations with one version): the command line exits 2, as for a bad
/// config file.
pub fn is_config_error(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<JobError>()
        .is_some_and(JobError::is_config)
        || e.downcast_ref::<migrate::MigrateError>()
            .is_some_and(migrate::MigrateError::is_config)
}

/// A job could not be set up from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("database \"{database}\": {source}")]
    Key {
        database: String,
        source: crate::repo::archive::KeyError,
    },
    #[error("database \"{database}\": {message}")]
    Name { database: String, message: String },
}

/// A job the configuration defines, before anything is opened or loaded: what
/// `dbkeeper jobs` lists and what a [`Select`] chooses from.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub id: String,
    /// The database or files set the job belongs to.
    pub name: &'a str,
    /// The job's database; `None` for a files set's backup.
    pub database: Option<&'a DatabaseConfig>,
    pub options: JobOptions,
    section: Section<'a>,
}

/// The config section an [`Entry`] comes from.
#[derive(Debug, Clone, Copy)]
enum Section<'a> {
    Backup(&'a BackupConfig),
    Retention(&'a RetentionConfig),
    Refresh(&'a RefreshConfig),
    Migrate(&'a MigrateConfig),
    Sql(&'a SqlJobConfig),
    Gauge(&'a GaugeConfig),
    TableStats(usize),
    /// A `[[files]]` set's backup (kind `backup`).
    Files(&'a FilesConfig),
}

impl Entry<'_> {
    pub fn kind(&self) -> Kind {
        match self.section {
            Section::Backup(_) | Section::Files(_) => Kind::Backup,
            Section::Retention(_) => Kind::Retention,
            Section::Refresh(_) => Kind::Refresh,
            Section::Migrate(_) => Kind::Migrate,
            Section::Sql(_) => Kind::Sql,
            Section::Gauge(_) => Kind::Gauge,
            Section::TableStats(_) => Kind::TableStats,
        }
    }
}

/// Every job of the configuration, in config order (per database: backup,
/// retention rules, refreshes, migrate, sql, gauges, table-stats), without building
/// any.
pub fn entries(config: &Config) -> Vec<Entry<'_>> {
    let mut all = Vec::new();
    let notify = config.notify.as_ref();
    for db in &config.databases {
        let name = &db.name;
        let mut add = |id: String, options, section| {
            all.push(Entry {
                id,
                name,
                database: Some(db),
                options,
                section,
            })
        };
        if let Some(b) = &db.backup {
            add(
                format!("{name}.backup"),
                b.options(notify),
                Section::Backup(b),
            );
        }
        for r in &db.retention {
            let id = format!("{name}.retention.{}", r.job_name());
            add(id, r.options(notify), Section::Retention(r));
        }
        for r in &db.refresh {
            let id = format!("{name}.refresh.{}", r.job_name());
            add(id, r.options(notify), Section::Refresh(r));
        }
        if let Some(m) = &db.migrate {
            add(
                format!("{name}.migrate"),
                m.options(notify),
                Section::Migrate(m),
            );
        }
        for sql in &db.sql {
            let id = format!("{name}.sql.{}", sql.name);
            add(id, sql.options(notify), Section::Sql(sql));
        }
        for g in &db.gauge {
            let id = format!("{name}.gauge.{}", g.name);
            add(id, g.options(notify), Section::Gauge(g));
        }
        if db.table_stats {
            add(
                format!("{name}.table-stats"),
                db.table_stats_options(notify),
                Section::TableStats(db.table_stats_max_tables()),
            );
        }
    }
    for f in &config.files {
        all.push(Entry {
            id: format!("{}.backup", f.name),
            name: &f.name,
            database: None,
            options: f.backup.options(notify),
            section: Section::Files(f),
        });
    }
    all
}

/// Which jobs of the configuration to build. Only the databases of the chosen jobs
/// are opened and only their keys loaded, so a command about one job does not fail
/// on (or generate) another database's key file.
#[derive(Debug, Clone, Copy)]
pub enum Select<'a> {
    /// Every job, and every database (the daemon, `check`).
    All,
    /// The job with this id.
    Id(&'a str),
    /// The jobs of one kind on one database.
    Kind { database: &'a str, kind: Kind },
}

impl Select<'_> {
    fn wants(&self, entry: &Entry<'_>) -> bool {
        match *self {
            Select::All => true,
            Select::Id(id) => entry.id == id,
            Select::Kind { database, kind } => entry.name == database && entry.kind() == kind,
        }
    }
}

/// Where the backups of a backup job are and how they are judged: what the status
/// page lists (see [`backup::newest_backups`]).
pub type BackupSource = (Arc<dyn Storage>, TrustPolicy);

/// The configured jobs, in config order, with the databases they run on.
#[derive(Debug, Default)]
pub struct Jobs {
    jobs: Vec<Arc<Job>>,
    by_id: HashMap<String, usize>,
    databases: Vec<Database>,
}

impl Jobs {
    /// Every job of the configuration, every database opened (lazily: nothing is
    /// connected yet), every backup key loaded.
    pub fn build(config: &Config) -> Result<Self, BuildError> {
        Self::select(config, Select::All)
    }

    /// The jobs `select` picks, for looking only (`check`, `retention plan`): SQLite
    /// files are opened read-only and no key is generated, so nothing on disk is
    /// created or changed. A backup job whose key `generate-key-if-missing` has not
    /// created yet has no key; it refuses to run (see [`backup::BackupJob::run`]).
    pub fn inspect(config: &Config, select: Select<'_>) -> Result<Self, BuildError> {
        Self::open(config, select, Access::ReadOnly)
    }

    /// The jobs `select` picks; only what they need is opened and loaded. A missing
    /// key that `generate-key-if-missing` asks for is created here, before a job
    /// that writes backups can run.
    pub fn select(config: &Config, select: Select<'_>) -> Result<Self, BuildError> {
        Self::open(config, select, Access::ReadWrite)
    }

    fn open(config: &Config, select: Select<'_>, access: Access) -> Result<Self, BuildError> {
        let entries = entries(config);
        let mut jobs = Jobs::default();
        for cfg in &config.databases {
            let wanted: Vec<&Entry<'_>> = entries
                .iter()
                .filter(|e| e.database.is_some_and(|d| std::ptr::eq(d, cfg)) && select.wants(e))
                .collect();
            if wanted.is_empty() && !matches!(select, Select::All) {
                continue;
            }
            let database = Database::open_for(cfg, access)?;
            jobs.databases.push(database.clone());
            let mut builder = Builder {
                config,
                cfg,
                access,
                keys: None,
                backup: None,
            };
            for entry in wanted {
                let work = builder.work(entry)?;
                jobs.by_id.insert(entry.id.clone(), jobs.jobs.len());
                jobs.jobs.push(Arc::new(Job {
                    id: entry.id.clone(),
                    work,
                    database: Some(database.clone()),
                    name: cfg.name.clone(),
                    options: entry.options.clone(),
                }));
            }
        }
        for entry in entries.iter().filter(|e| select.wants(e)) {
            let Section::Files(f) = entry.section else {
                continue;
            };
            let job = backup::BackupJob::for_files(config, f, access)?;
            jobs.by_id.insert(entry.id.clone(), jobs.jobs.len());
            jobs.jobs.push(Arc::new(Job {
                id: entry.id.clone(),
                work: Work::Backup(Arc::new(job)),
                database: None,
                name: f.name.clone(),
                options: entry.options.clone(),
            }));
        }
        Ok(jobs)
    }

    /// The jobs in config order.
    pub fn iter(&self) -> std::slice::Iter<'_, Arc<Job>> {
        self.jobs.iter()
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Job>> {
        self.by_id.get(id).map(|&i| &self.jobs[i])
    }

    pub fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    /// The opened databases, in config order: every configured one after
    /// [`Jobs::build`], those of the chosen jobs after [`Jobs::select`].
    pub fn databases(&self) -> &[Database] {
        &self.databases
    }

    /// The jobs of one database.
    pub fn of_database<'a, 'd>(
        &'a self,
        database: &'d str,
    ) -> impl Iterator<Item = &'a Arc<Job>> + use<'a, 'd> {
        self.jobs
            .iter()
            .filter(move |j| j.database_name() == database)
    }

    /// The `<database>.backup` job.
    pub fn backup_for(&self, database: &str) -> Option<(&Arc<Job>, &backup::BackupJob)> {
        self.of_database(database).find_map(|j| match &j.work {
            Work::Backup(b) => Some((j, &**b)),
            _ => None,
        })
    }

    /// The `<database>.migrate` job.
    pub fn migrate_for(&self, database: &str) -> Option<(&Arc<Job>, &migrate::MigrateJob)> {
        self.of_database(database).find_map(|j| match &j.work {
            Work::Migrate(m) => Some((j, &**m)),
            _ => None,
        })
    }

    /// The `<database>.retention.<name>` job.
    pub fn retention_for(
        &self,
        database: &str,
        name: &str,
    ) -> Option<(&Arc<Job>, &retention::RetentionJob)> {
        self.retention_rules(database)
            .find(|(_, r)| r.cfg.job_name() == name)
    }

    /// Every retention rule of a database, in config order.
    pub fn retention_rules<'a, 'd>(
        &'a self,
        database: &'d str,
    ) -> impl Iterator<Item = (&'a Arc<Job>, &'a retention::RetentionJob)> + use<'a, 'd> {
        self.of_database(database).filter_map(|j| match &j.work {
            Work::Retention(r) => Some((j, &**r)),
            _ => None,
        })
    }

    /// Where every backup job's backups are, for the status page.
    pub fn backup_sources(&self) -> Vec<BackupSource> {
        self.jobs
            .iter()
            .filter_map(|job| match &job.work {
                Work::Backup(b) => Some(
                    b.places(job.database_name())
                        .into_iter()
                        .map(|place| (place.store, b.trust_policy(job.database_name(), false))),
                ),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Closes every opened database's pool.
    pub async fn close(&self) {
        for db in &self.databases {
            db.close().await;
        }
    }
}

/// Builds the jobs of one database, loading its keys at most once and sharing its
/// backup job between `<database>.backup` and the pre-migration backup.
struct Builder<'a> {
    config: &'a Config,
    cfg: &'a DatabaseConfig,
    access: Access,
    keys: Option<(Option<Key>, KeyRing)>,
    backup: Option<Arc<backup::BackupJob>>,
}

impl Builder<'_> {
    fn keys(&mut self, b: &BackupConfig) -> Result<(Option<Key>, KeyRing), BuildError> {
        if let Some(loaded) = &self.keys {
            return Ok(loaded.clone());
        }
        let key_err = |source| BuildError::Key {
            database: self.cfg.name.clone(),
            source,
        };
        if self.access == Access::ReadWrite {
            b.ensure_key().map_err(key_err)?;
        }
        let loaded = b.load_keys().map_err(key_err)?;
        self.keys = Some(loaded.clone());
        Ok(loaded)
    }

    fn backup(&mut self, b: &BackupConfig) -> Result<Arc<backup::BackupJob>, BuildError> {
        if let Some(job) = &self.backup {
            return Ok(job.clone());
        }
        let (key, keys) = self.keys(b)?;
        let recipients = b.load_recipients().map_err(|source| BuildError::Key {
            database: self.cfg.name.clone(),
            source,
        })?;
        let job = Arc::new(backup::BackupJob {
            cfg: b.clone(),
            key,
            keys,
            recipients,
            scratch_dir: self.config.daemon.state_dir.join("tmp"),
            files: None,
            with_files: self
                .config
                .files
                .iter()
                .filter(|f| b.with_files.contains(&f.name))
                .map(|f| backup::BackupJob::for_files(self.config, f, self.access))
                .collect::<Result<_, _>>()?,
            backend: self.config.backend_of(&self.cfg.name),
            paired_with: Vec::new(),
        });
        self.backup = Some(job.clone());
        Ok(job)
    }

    fn work(&mut self, entry: &Entry<'_>) -> Result<Work, BuildError> {
        let name_err = |e: crate::db::NameError| BuildError::Name {
            database: self.cfg.name.clone(),
            message: e.to_string(),
        };
        Ok(match entry.section {
            Section::Backup(b) => Work::Backup(self.backup(b)?),
            Section::Retention(r) => {
                let archive = match (&self.cfg.backup, r.archive) {
                    (Some(b), true) => {
                        let (key, _) = self.keys(b)?;
                        // Exports are made for the backups' recipients too: with
                        // recipients only they were written in plain (adversary
                        // round 3 of issue 16, case 07).
                        let recipients = b.load_recipients().map_err(|source| BuildError::Key {
                            database: self.cfg.name.clone(),
                            source,
                        })?;
                        Some(retention::ArchiveTo {
                            places: storage::for_backups(
                                b,
                                &[&self.cfg.name, "retention", &r.job_name()],
                            ),
                            key,
                            recipients,
                            key_file: b.encryption_key_file.clone(),
                            compression: b.compression,
                            level: b.level(),
                        })
                    }
                    _ => None,
                };
                let job = retention::RetentionJob::new(r.clone(), archive).map_err(name_err)?;
                Work::Retention(Box::new(job))
            }
            Section::Refresh(r) => Work::Refresh(Box::new(
                refresh::RefreshJob::new(r.clone()).map_err(name_err)?,
            )),
            Section::Migrate(m) => {
                // The backup is taken first only with `backup-first`; its keys are not
                // loaded otherwise.
                let backup = match &self.cfg.backup {
                    Some(b) if m.backup_first => Some(self.backup(b)?),
                    _ => None,
                };
                Work::Migrate(Box::new(migrate::MigrateJob {
                    cfg: m.clone(),
                    backup,
                    workdir: m.workdir(&self.cfg.source),
                }))
            }
            Section::Sql(sql) => Work::Sql(SqlJob {
                statement: sql.statement.clone(),
            }),
            Section::Gauge(g) => Work::Gauge(Box::new(gauge::GaugeJob { cfg: g.clone() })),
            Section::TableStats(max_tables) => {
                Work::TableStats(gauge::TableStatsJob { max_tables })
            }
            // Built by `Jobs::open`, without a database.
            Section::Files(f) => Work::Backup(Arc::new(backup::BackupJob::for_files(
                self.config,
                f,
                self.access,
            )?)),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Database `a`: a backup (key file `key`, generated if missing), a
    /// pre-migration backup and a sql job; database `b`: a retention rule and a sql
    /// job.
    fn config(dir: &Path, key: &Path) -> Config {
        let text = format!(
            r#"
[daemon]
state-dir = "{state}"

[[database]]
name = "a"
url = "sqlite://{dir}/a.db"

[database.backup]
schedule = "@daily"
destination = "{dir}/backups"
encryption-key-file = "{key}"
generate-key-if-missing = true

[database.migrate]
dir = "{dir}/migrations"
schedule = "manual"
backup-first = true

[[database.sql]]
name = "analyze"
statement = "ANALYZE"
schedule = "@daily"

[[database]]
name = "b"
url = "sqlite://{dir}/b.db"

[[database.retention]]
table = "events"
column = "created_at"
older-than = "30d"
schedule = "@daily"

[[database.sql]]
name = "analyze"
statement = "ANALYZE"
schedule = "@daily"
"#,
            state = dir.join("state").display(),
            dir = dir.display(),
            key = key.display(),
        );
        Config::parse(&dir.join("test.toml"), &text).unwrap()
    }

    #[test]
    fn entries_are_the_jobs_in_config_order_without_opening_anything() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("backup.key");
        let config = config(dir.path(), &key);
        let listed: Vec<(String, Kind)> = entries(&config)
            .iter()
            .map(|e| (e.id.clone(), e.kind()))
            .collect();
        assert_eq!(
            listed,
            [
                ("a.backup".to_owned(), Kind::Backup),
                ("a.migrate".to_owned(), Kind::Migrate),
                ("a.sql.analyze".to_owned(), Kind::Sql),
                ("b.retention.events".to_owned(), Kind::Retention),
                ("b.sql.analyze".to_owned(), Kind::Sql),
            ]
        );
        assert!(!key.exists(), "listing the jobs loads (and makes) no key");
    }

    #[tokio::test]
    async fn a_selection_opens_only_its_databases_and_loads_only_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("backup.key");
        let config = config(dir.path(), &key);
        // b's retention rules need neither database a nor its key.
        let (database, kind) = ("b", Kind::Retention);
        let jobs = Jobs::select(&config, Select::Kind { database, kind }).unwrap();
        let names: Vec<&str> = jobs.databases().iter().map(Database::name).collect();
        assert_eq!(names, ["b"]);
        assert_eq!(jobs.len(), 1);
        assert!(jobs.retention_for("b", "events").is_some());
        assert!(jobs.backup_for("a").is_none());
        // One job of a that takes no backup needs no key either.
        let jobs = Jobs::select(&config, Select::Id("a.sql.analyze")).unwrap();
        assert!(jobs.contains("a.sql.analyze") && jobs.len() == 1);
        assert!(!key.exists(), "no chosen job needed the key");
        // Everything: the key is loaded (here: generated).
        let jobs = Jobs::build(&config).unwrap();
        assert_eq!(jobs.len(), 5);
        assert!(key.exists());
    }

    /// `check` builds the jobs without generating the key; such a backup job (and a
    /// retention archive) refuses to run rather than write a plaintext archive.
    #[tokio::test]
    async fn inspected_jobs_make_no_key_and_never_write_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("keys/backup.key");
        let config = config(dir.path(), &key);
        let jobs = Jobs::inspect(&config, Select::All).unwrap();
        assert_eq!(jobs.len(), 5);
        assert!(!key.exists() && !dir.path().join("keys").exists());
        let (job, backup) = jobs.backup_for("a").unwrap();
        assert!(backup.key.is_none());
        assert!(backup.trust_policy("a", false).encrypting);
        let cancel = CancellationToken::new();
        let err = backup
            .run(job.database.as_ref(), BackupKind::Manual, &cancel)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not exist yet"), "{err}");
        assert!(!dir.path().join("backups").exists(), "nothing was written");
        // Building to run makes the key (and its private directory).
        Jobs::build(&config).unwrap();
        assert!(key.exists());
    }

    #[tokio::test]
    async fn the_migration_takes_the_backup_of_its_databases_backup_job() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), &dir.path().join("backup.key"));

        let jobs = Jobs::build(&config).unwrap();
        assert_eq!(jobs.len(), 5);
        assert_eq!(jobs.databases().len(), 2);
        let (_, backup) = jobs.backup_for("a").unwrap();
        let (job, migrate) = jobs.migrate_for("a").unwrap();
        assert!(job.exclusive() && !job.runs_before_ready());
        let taken = migrate.backup.as_deref().unwrap();
        assert!(std::ptr::eq(taken, backup), "one BackupJob, shared");

        // Alone, the migration still has its backup, but no backup job is listed.
        let (database, kind) = ("a", Kind::Migrate);
        let jobs = Jobs::select(&config, Select::Kind { database, kind }).unwrap();
        assert!(jobs.backup_for("a").is_none());
        let (_, migrate) = jobs.migrate_for("a").unwrap();
        assert!(migrate.backup.is_some());
    }

    #[test]
    fn errors_say_whether_a_retry_can_help() {
        use migrate::MigrateError as M;
        use refresh::RefreshError as F;
        use retention::RetentionError as R;
        let file = || "1_x.sql".to_owned();
        let not_transient: Vec<JobError> = vec![
            M::Blocked(vec!["dirty".into()]).into(),
            M::RowRemoved {
                version: 1,
                file: file(),
            }
            .into(),
            F::Refused(refresh::Refusal::Concurrently {
                view: "v".into(),
                why: "no unique index",
            })
            .into(),
            F::NoView {
                database: "a".into(),
                view: "v".into(),
            }
            .into(),
            R::Cutoff.into(),
            R::Unaddressable { table: "t".into() }.into(),
            backup::BackupError::Refused("no".into()).into(),
        ];
        for e in &not_transient {
            assert!(!e.is_transient(), "{e}");
        }
        let transient: Vec<JobError> = vec![
            M::LockTimeout(std::time::Duration::from_secs(1)).into(),
            M::Failed {
                version: 1,
                file: file(),
                source: Box::new(M::LockTimeout(std::time::Duration::from_secs(1))),
            }
            .into(),
            R::Cancelled { deleted: 3 }.into(),
            backup::BackupError::Cancelled.into(),
            backup::BackupError::Verification("short read".into()).into(),
        ];
        for e in &transient {
            assert!(e.is_transient(), "{e}");
        }
    }
}

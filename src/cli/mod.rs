//! The command line: argument definitions, exit codes and the one-shot commands
//! (`check`, `jobs`, `run-job`, `history`). `dbkeeper run` is [`crate::daemon::run`].

mod backup;
mod check;
mod logging;
mod migrate;
mod report;
mod retention;
mod rewrap;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, CONFIG_ENV, DEFAULT_CONFIG_PATH};

pub use logging::{init_logging, print_error, print_failure, LogFormat};

/// Process exit codes, as documented in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Success = 0,
    /// A job or operation failed.
    Failed = 1,
    /// Bad command line or configuration.
    Usage = 2,
    /// An archive failed verification (tampered, truncated, wrong key).
    Verification = 3,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// Keeps SQLite and PostgreSQL databases healthy: scheduled SQL maintenance, run
/// history, Prometheus metrics and systemd integration, from one TOML file.
#[derive(Debug, Parser)]
#[command(name = "dbkeeper", version, propagate_version = true)]
#[command(
    after_help = "Exit codes: 0 success, 1 job or operation failed, 2 usage or config error, \
3 verification failed.\nDocumentation: README.md; example configuration: config/dbkeeper.example.toml"
)]
pub struct Cli {
    /// Log format on stderr: `text`, or `json` (one object per line, for container log
    /// shippers). Under systemd, `text` sends structured entries to the journal.
    #[arg(
        long = "log-format",
        global = true,
        value_enum,
        default_value = "text",
        env = "DBKEEPER_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (this is what systemd starts).
    Run(ConfigArg),
    #[command(flatten)]
    Tool(Tool),
}

/// The one-shot commands.
#[derive(Debug, Subcommand)]
pub enum Tool {
    /// Validate the configuration, test every connection and show each job's next 3
    /// run times; exits 0 only if all is well.
    Check(ConfigArg),
    /// Table of jobs: kind, schedule, last result, last success, next run.
    Jobs(ConfigArg),
    /// Run one job now in the foreground, exactly as the daemon would; the exit code
    /// is the result.
    RunJob {
        #[command(flatten)]
        config: ConfigArg,
        /// Job id, `<database>.<kind>[.<name>]`, e.g. `app.sql.vacuum`.
        job: String,
    },
    /// Recent runs from the run history, newest first.
    History {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this job's runs.
        job: Option<String>,
        /// How many runs to show.
        #[arg(short = 'n', long = "limit", default_value_t = 20)]
        limit: u32,
    },
    /// List, verify and prune backups.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Restore a backup to a SQLite file or a PostgreSQL database. Never overwrites an
    /// existing target without --force; a damaged archive writes nothing.
    Restore {
        #[command(flatten)]
        config: ConfigArg,
        /// Database name from the config.
        database: String,
        /// Backup id from `backup list`, or `latest` (the newest good backup).
        #[arg(long = "backup", default_value = "latest")]
        backup: String,
        /// A file path (SQLite; replaced atomically) or a postgres:// URL.
        #[arg(long = "to")]
        to: String,
        /// Replace an existing SQLite file, or restore into a PostgreSQL database
        /// that already has tables (pg_restore --clean --if-exists).
        #[arg(long)]
        force: bool,
        /// PostgreSQL: create the target database if it does not exist.
        #[arg(long)]
        create: bool,
        /// Accept an unencrypted archive although a key is configured (anyone who
        /// can write to the destination can forge one).
        #[arg(long)]
        allow_unencrypted: bool,
        /// Read from this destination (a folder or URL as written in the config);
        /// default: the first destination that holds the backup.
        #[arg(long = "from", value_name = "DEST")]
        from: Option<String>,
        /// PostgreSQL: before the data, create the roles (and grant the memberships)
        /// the backup carries that are missing on the target server. Existing roles
        /// are never altered or dropped; roles created stay if the restore then fails.
        #[arg(long)]
        with_roles: bool,
        /// age identity file (as `age-keygen` writes it, mode 0600) to open version 3
        /// archives with, in addition to the configured keys (repeatable).
        #[arg(long = "identity", value_name = "FILE")]
        identities: Vec<PathBuf>,
    },
    /// Write the plain database image of an archive (a SQLite file or a pg_dump
    /// custom-format archive), e.g. `dbkeeper decrypt x.dbk | pg_restore -l`.
    Decrypt {
        /// Configuration whose key files to try (default: $DBKEEPER_CONFIG, then
        /// /etc/dbkeeper/dbkeeper.toml), unless --key-file is given.
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
        /// Key file to decrypt with (repeatable); the config is not read then.
        #[arg(long = "key-file")]
        key_files: Vec<PathBuf>,
        /// age identity file (as `age-keygen` writes it, mode 0600) to decrypt a
        /// version 3 archive with (repeatable); with --key-file or alone, the config
        /// is not read.
        #[arg(long = "identity", value_name = "FILE")]
        identities: Vec<PathBuf>,
        /// The `.dbk` archive: a file, an object URL (`s3://bucket/prefix/db/ID.dbk`),
        /// or with --from its name under that destination (`db/ID.dbk`).
        archive: String,
        /// A destination of the config (folder or URL as written there) the archive
        /// is read from, with its settings (endpoint, credentials-file …).
        #[arg(long = "from", value_name = "DEST")]
        from: Option<String>,
        /// Output file (must not exist), or `-` for standard output (the default).
        #[arg(short = 'o', long = "output", default_value = "-")]
        output: String,
        /// Accept an unencrypted archive although a key is configured (anyone who
        /// can write to the destination can forge one).
        #[arg(long)]
        allow_unencrypted: bool,
    },
    /// Manage encryption keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Retention rules: what they would delete.
    #[command(subcommand)]
    Retention(RetentionCommand),
    /// Schema migrations (sqlx layout and history table).
    #[command(subcommand)]
    Migrate(MigrateCommand),
}

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Applied, pending, drifted and missing migrations; exit 1 if something blocks apply.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        database: String,
    },
    /// The exact SQL that apply would run, in order; applies nothing.
    Plan {
        #[command(flatten)]
        config: ConfigArg,
        database: String,
    },
    /// Apply pending migrations now (after the pre-migration backup, if configured).
    Apply {
        #[command(flatten)]
        config: ConfigArg,
        database: String,
        /// Apply to a scratch copy restored from the pre-migration backup first, and
        /// to the database only if that succeeds (as `dry-run-on-copy = true`).
        #[arg(long)]
        dry_run_on_copy: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RetentionCommand {
    /// Per rule of DB: the cutoff, the rows (or partitions) that would go now, and the
    /// age of the oldest row. Deletes nothing.
    Plan {
        #[command(flatten)]
        config: ConfigArg,
        database: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// One line per backup and destination: id, database, destination, time, size,
    /// raw size, roles, verification.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this database.
        database: Option<String>,
    },
    /// Check a backup: SHA-256, full decryption and decompression, and with
    /// --restore-test a restore into a scratch database. Exit 3 if it fails.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        database: String,
        /// Backup id, or `latest`.
        #[arg(long = "backup", default_value = "latest")]
        backup: String,
        /// Also restore into a scratch database (SQLite file or PostgreSQL database)
        /// and check it.
        #[arg(long)]
        restore_test: bool,
        /// Read from this destination (a folder or URL as written in the config);
        /// default: the first destination that holds the backup.
        #[arg(long = "from", value_name = "DEST")]
        from: Option<String>,

        /// Accept an unencrypted archive although a key is configured (anyone who
        /// can write to the destination can forge one).
        #[arg(long)]
        allow_unencrypted: bool,
        /// age identity file (as `age-keygen` writes it, mode 0600) to open version 3
        /// archives with, in addition to the configured keys (repeatable).
        #[arg(long = "identity", value_name = "FILE")]
        identities: Vec<PathBuf>,
    },
    /// Apply the keep policy now (in every destination, each with its own keep);
    /// with --dry-run only show what would be deleted.
    Prune {
        #[command(flatten)]
        config: ConfigArg,
        database: String,
        /// Only this destination (a folder or URL as written in the config).
        #[arg(long = "from", value_name = "DEST")]
        from: Option<String>,
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a new random 32-byte key file (mode 0600) and print its key id.
    Generate {
        /// The key file to create; an existing file is never overwritten.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// Rewrap stored backups for the config's current encryption-key-file and
    /// recipients, reading them with every configured key (no re-encryption: only
    /// each archive's key wrapping changes). Prints one line per archive.
    Rewrap {
        #[command(flatten)]
        config: ConfigArg,
        /// Databases or files sets with a backup (default: all).
        names: Vec<String>,
        /// Only this destination (a folder or URL as written in the config).
        #[arg(long = "from", value_name = "DEST")]
        from: Option<String>,
        /// Only say what would be done; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

impl Command {
    /// The configuration file this command needs, if it needs one.
    pub fn config_path(&self) -> Option<PathBuf> {
        let tool = match self {
            Command::Run(c) => return Some(c.path.clone()),
            Command::Tool(tool) => tool,
        };
        match tool {
            Tool::Check(c) | Tool::Jobs(c) => Some(c.path.clone()),
            Tool::RunJob { config, .. }
            | Tool::History { config, .. }
            | Tool::Restore { config, .. }
            | Tool::Retention(RetentionCommand::Plan { config, .. })
            | Tool::Key(KeyCommand::Rewrap { config, .. })
            | Tool::Migrate(
                MigrateCommand::Status { config, .. }
                | MigrateCommand::Plan { config, .. }
                | MigrateCommand::Apply { config, .. },
            )
            | Tool::Backup(
                BackupCommand::List { config, .. }
                | BackupCommand::Verify { config, .. }
                | BackupCommand::Prune { config, .. },
            ) => Some(config.path.clone()),
            Tool::Decrypt {
                key_files,
                identities,
                from: None,
                ..
            } if !key_files.is_empty() || !identities.is_empty() => None,
            Tool::Decrypt { config, .. } => {
                Some(config.clone().unwrap_or_else(Config::default_path))
            }
            Tool::Key(KeyCommand::Generate { .. }) => None,
        }
    }
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Configuration file.
    #[arg(short = 'c', long = "config", env = CONFIG_ENV, default_value = DEFAULT_CONFIG_PATH)]
    pub path: PathBuf,
}

/// Runs a one-shot command and returns its exit code. `config` is loaded by the
/// caller when [`Command::config_path`] asks for one.
pub async fn execute(tool: Tool, config: Option<Config>) -> Exit {
    let result = match (tool, &config) {
        (Tool::Key(KeyCommand::Generate { output }), _) => backup::key_generate(&output),
        (
            Tool::Key(KeyCommand::Rewrap {
                names,
                from,
                dry_run,
                ..
            }),
            Some(c),
        ) => rewrap::key_rewrap(c, &names, from.as_deref(), dry_run),
        (
            Tool::Decrypt {
                key_files,
                identities,
                archive,
                from,
                output,
                allow_unencrypted,
                ..
            },
            config,
        ) => {
            let what = backup::DecryptArgs {
                key_files: &key_files,
                identities: &identities,
                archive: &archive,
                from: from.as_deref(),
                output: &output,
                allow_unencrypted,
            };
            backup::decrypt(config.as_ref(), what).await
        }
        (_, None) => Err(anyhow::anyhow!(
            "this command needs a configuration file (-c)"
        )),
        (Tool::Check(_), Some(c)) => check::check(c).await,
        (Tool::Jobs(_), Some(c)) => report::jobs(c).await,
        (Tool::RunJob { job, .. }, Some(c)) => report::run_job(c, &job).await,
        (Tool::History { job, limit, .. }, Some(c)) => {
            report::history(c, job.as_deref(), limit).await
        }
        (Tool::Backup(BackupCommand::List { database, .. }), Some(c)) => {
            backup::list(c, database.as_deref())
        }
        (
            Tool::Backup(BackupCommand::Verify {
                database,
                backup: id,
                restore_test,
                allow_unencrypted,
                from,
                identities,
                ..
            }),
            Some(c),
        ) => {
            let from = from.as_deref();
            if let Err(e) = backup::check_identities(&identities) {
                return fail(e.into());
            }
            let c = &c.with_identities(&database, &identities);
            backup::verify(c, &database, &id, from, restore_test, allow_unencrypted).await
        }
        (
            Tool::Backup(BackupCommand::Prune {
                database,
                dry_run,
                from,
                ..
            }),
            Some(c),
        ) => backup::prune(c, &database, from.as_deref(), dry_run),
        (
            Tool::Restore {
                database,
                backup: id,
                to,
                force,
                create,
                allow_unencrypted,
                with_roles,
                from,
                identities,
                ..
            },
            Some(c),
        ) => {
            if let Err(e) = backup::check_identities(&identities) {
                return fail(e.into());
            }
            let c = &c.with_identities(&database, &identities);
            let how = backup::RestoreFlags {
                force,
                create,
                allow_unencrypted,
                with_roles,
                from,
            };
            backup::restore(c, &database, &id, &to, how).await
        }
        (Tool::Retention(RetentionCommand::Plan { database, .. }), Some(c)) => {
            retention::plan(c, &database).await
        }
        (Tool::Migrate(MigrateCommand::Status { database, .. }), Some(c)) => {
            migrate::status(c, &database).await
        }
        (Tool::Migrate(MigrateCommand::Plan { database, .. }), Some(c)) => {
            migrate::plan(c, &database).await
        }
        (
            Tool::Migrate(MigrateCommand::Apply {
                database,
                dry_run_on_copy,
                ..
            }),
            Some(c),
        ) => migrate::apply(c, &database, dry_run_on_copy).await,
    };
    result.unwrap_or_else(fail)
}

/// Prints a command's error and gives its exit code.
fn fail(e: anyhow::Error) -> Exit {
    print_error(&one_line(&e));
    if is_verification_failure(&e) {
        Exit::Verification
    } else if is_config_error(&e) {
        Exit::Usage
    } else {
        Exit::Failed
    }
}

/// The error and its causes on one line, skipping causes the message already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

/// A configuration error found while running a command (e.g. two migrations with one
/// version): exit 2, as for a bad config file.
fn is_config_error(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        crate::jobs::is_config_error(cause)
            || cause.downcast_ref::<backup::NotADestination>().is_some()
            || cause.downcast_ref::<backup::GivenKey>().is_some()
    })
}

fn is_verification_failure(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<crate::jobs::backup::BackupError>()
            .is_some_and(|b| b.is_verification())
            || cause
                .downcast_ref::<crate::repo::archive::ArchiveError>()
                .is_some_and(|a| a.is_verification())
    })
}

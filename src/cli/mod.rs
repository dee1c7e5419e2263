//! The command line: argument definitions, exit codes and the one-shot commands
//! (`check`, `jobs`, `run-job`, `history`). `dbkeeper run` is [`crate::daemon::run`].

mod check;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, CONFIG_ENV, DEFAULT_CONFIG_PATH};

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
}

impl Command {
    pub fn config_path(&self) -> &PathBuf {
        match self {
            Command::Run(c) | Command::Tool(Tool::Check(c) | Tool::Jobs(c)) => &c.path,
            Command::Tool(Tool::RunJob { config, .. } | Tool::History { config, .. }) => {
                &config.path
            }
        }
    }
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Configuration file.
    #[arg(short = 'c', long = "config", env = CONFIG_ENV, default_value = DEFAULT_CONFIG_PATH)]
    pub path: PathBuf,
}

/// Runs a one-shot command and returns its exit code.
pub async fn execute(tool: Tool, config: Config) -> Exit {
    let result = match tool {
        Tool::Check(_) => check::check(&config).await,
        Tool::Jobs(_) => report::jobs(&config).await,
        Tool::RunJob { job, .. } => report::run_job(&config, &job).await,
        Tool::History { job, limit, .. } => report::history(&config, job.as_deref(), limit).await,
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        Exit::Failed
    })
}

/// Logs go to stderr (journald under systemd); `RUST_LOG` sets the level, e.g.
/// `RUST_LOG=dbkeeper=debug`.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,sqlx=warn,tokio_cron_scheduler=warn")
    });
    // journald stamps each line itself.
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    if under_systemd {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

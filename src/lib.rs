//! dbkeeper: a maintenance daemon for SQLite and PostgreSQL databases.
//!
//! Where things are:
//! - [`redact`]: what messages may show of a URL; [`ident`]: SQL names, quoted;
//! - [`config`]: the TOML file, parsed and validated;
//! - [`schedule`]: schedule strings and next-run arithmetic (time zones, DST);
//! - [`scheduler`]: the timer (tokio-cron-scheduler) that fires due jobs;
//! - [`runner`]: overlap guard, concurrency limit, timeout, retries;
//! - [`jobs`]: the one module that knows the job kinds, and the registry of the
//!   configured jobs; [`db`]: SQLite and PostgreSQL connections;
//! - [`state`]: the run history; [`status`] (the board), [`metrics`] and [`notify`]:
//!   what the daemon reports, each told by [`reporter`];
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`, `/status`; [`systemd`]: sd_notify;
//! - [`daemon`]: the main loop; [`cli`]: the one-shot commands.

pub mod archive;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod db;
pub mod http;
pub mod ident;
pub mod jobs;
pub mod metrics;
pub mod notify;
pub mod redact;
pub mod reporter;
pub mod runner;
pub mod schedule;
pub mod scheduler;
pub mod state;
pub mod status;
pub mod storage;
pub mod systemd;

pub use config::Config;
pub use daemon::run;

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}); only Ctrl-C stops the daemon");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

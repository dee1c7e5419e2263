//! dbkeeper: a maintenance daemon for SQLite and PostgreSQL databases.
//!
//! Where things are, bottom layer first. A module imports from its own layer or
//! below, and `.ci/modgraph.py` fails on any import cycle:
//! - [`redact`]: what messages may show of a URL; [`ident`]: SQL names, quoted;
//!   [`keys`]: key files, key ids, wrapping data keys;
//! - [`config`]: the TOML file, parsed and validated; [`schedule`]: schedule strings
//!   and next-run arithmetic (time zones, DST);
//! - [`db`]: SQLite and PostgreSQL connections; [`repo`]: the backup repository
//!   (archive format, storage behind [`repo::storage::Storage`], catalog, verify,
//!   restore); [`state`]: the run history; [`metrics`]: every Prometheus series;
//!   [`notify`]: webhook and Alertmanager events, dead-man pings;
//! - [`jobs`]: the one module that knows the job kinds — what each does, and the
//!   registry of configured jobs ([`jobs::Jobs`]);
//! - [`status`]: the status board; [`reporter`]: tells the board, the metrics and the
//!   notifier what happened; [`cluster`]: replicas claiming runs through a PostgreSQL
//!   database; [`runner`]: overlap guard, cluster claim, concurrency limit, timeout,
//!   retries; [`scheduler`]: the timer that fires due jobs;
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`, `/status`; [`systemd`]: sd_notify;
//!   [`daemon`]: the scheduling loop; [`cli`]: the one-shot commands.
//!
//! # Errors
//!
//! The rules every module follows:
//! - **Typed errors all the way.** Each module has its own `thiserror` enum; a caller
//!   wraps it (`#[from]`, `#[source]`, or `#[error(transparent)]`) and never turns it
//!   into text, so the original error and its kind survive to the top. `anyhow` is
//!   used only at the command-line edge ([`cli`]), to add context and print one line.
//!   No `String` or `()` errors in library code (the ones still there, such as
//!   `ident::check_expression` and the job constructors, are on the way out).
//! - **The decision is the error's.** Whether to retry is a method of the error
//!   ([`jobs::Transient::is_transient`]); so are "the configuration is wrong" (exit 2)
//!   and "the archive failed verification" (exit 3). No module keeps a list of
//!   another module's variants.
//! - **Messages say what to do.** One plain sentence naming the thing (file and
//!   line, key, table, backup id) and the fix: "fix `table` in
//!   `[[database.retention]]`", "raise `timeout` for this job".
//! - **Secrets never appear in errors.** URLs go through [`redact`] before they are
//!   in a message; passwords, key bytes and webhook tokens are never formatted.

pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod db;
pub mod http;
pub mod ident;
pub mod jobs;
pub mod keys;
pub mod metrics;
pub mod notify;
pub mod pgurl;
pub mod redact;
pub mod repo;
pub mod reporter;
pub mod runner;
pub mod schedule;
pub mod scheduler;
pub mod state;
pub mod status;
pub mod systemd;
#[cfg(test)]
mod testing;

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

//! Connections to the databases dbkeeper looks after, one backend per file.
//!
//! Pools are created lazily: an unreachable database never stops the daemon from
//! starting; it shows as `database_up 0` and its jobs fail with a clear error until it
//! comes back.
//!
//! [`with_backend!`] is the one place that matches on the backend: a body written once
//! is compiled for [`Sqlite`] and for [`Postgres`]. What a job kind needs from a
//! database is a trait of that kind (`RetentionBackend`, `RefreshBackend`,
//! `MigrationBackend`), implemented once per backend in `jobs/<kind>/<backend>.rs`;
//! the kind's generic code reaches it through this macro, with static dispatch. The
//! helpers every backend shares live here too: the `_sqlx_migrations` probe
//! ([`Database::has_migration_history`]), timeout values ([`timeout_millis`],
//! [`set_timeout`]) and identifier quoting (`ident.rs`).

mod postgres;
mod sqlite;

use std::fmt;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::DatabaseConfig;

pub use crate::config::{Backend, UnsupportedUrl};
pub use crate::ident::{
    check_expression, quote, quote_literal, ExpressionError, NameError, QualifiedName,
};
pub use crate::redact::{redact_url, url_has_password};
pub use postgres::globals::{
    Created, Globals, GlobalsError, GlobalsSummary, Membership, Role, Tablespace,
};
pub use postgres::{
    encoded_password, is_scratch_name, scratch_lock_key, set_timeout, Postgres, Scope,
    ScratchClaim, SwapMode, Swapped, Timeout, ToolFiles, UserObjects, REDIRECTING_ENV,
};
pub use sqlite::{read_only_options, Sqlite};

/// Evaluates `$body` with `$b` bound to the backend of `$db` (`&Sqlite` or
/// `&Postgres`). The body is written once and compiled once per backend, so it can
/// call a job kind's contract (a trait both backends implement) without `dyn`: this
/// is the only `match` on the backend outside the `Database` enum's own definition.
macro_rules! with_backend {
    ($db:expr, $b:ident => $body:expr) => {
        match $db {
            $crate::db::Database::Sqlite($b) => $body,
            $crate::db::Database::Postgres($b) => $body,
        }
    };
}
pub(crate) use with_backend;

/// A timeout in whole milliseconds as both backends' settings take it: at least 1
/// (0 would mean "no timeout" to PostgreSQL and "fail at once" to SQLite) and at most
/// `i32::MAX`, the largest either setting accepts.
pub fn timeout_millis(d: Duration) -> u128 {
    d.as_millis().clamp(1, i32::MAX as u128)
}

/// A database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to database \"{name}\" ({url}): {source}")]
    Connect {
        name: String,
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database \"{name}\": {source}")]
    Query {
        name: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database \"{name}\": the statement was cancelled")]
    Cancelled { name: String },
    #[error("database \"{name}\": cannot read password file {path}: {source}")]
    PasswordFile {
        name: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("database \"{name}\": cannot write a private file for the client tools in {path}: {source}; check that the state directory is writable")]
    PrivateFile {
        name: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("database \"{name}\": the scratch database name \"{scratch}\" is held by another process; try again")]
    ScratchInUse { name: String, scratch: String },
    #[error("database \"{name}\": invalid URL {url}: {source}")]
    Url {
        name: String,
        url: String,
        #[source]
        source: sqlx::Error,
    },
}

impl DbError {
    pub(crate) fn connect(name: &str, url: &str, source: sqlx::Error) -> Self {
        DbError::Connect {
            name: name.to_owned(),
            url: url.to_owned(),
            source,
        }
    }

    /// The SQLSTATE of a statement the server refused (e.g. `55P03`, lock timeout).
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            DbError::Query {
                source: sqlx::Error::Database(e),
                ..
            } => e.code().map(|c| c.into_owned()),
            _ => None,
        }
    }

    /// True when the error means the database could not be reached at all (as opposed
    /// to a statement failing), which is what `database_up` reports.
    pub fn is_unreachable(&self) -> bool {
        match self {
            DbError::Connect { .. } | DbError::PasswordFile { .. } => true,
            DbError::Query { source, .. } => is_connection_error(source),
            DbError::Url { .. }
            | DbError::Cancelled { .. }
            | DbError::PrivateFile { .. }
            | DbError::ScratchInUse { .. } => false,
        }
    }
}

pub(crate) fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

/// A configured database: its name, redacted URL and a lazily connecting pool.
#[derive(Clone)]
pub enum Database {
    Sqlite(Sqlite),
    Postgres(Postgres),
}

/// What a command means to do with a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Run jobs: connections may create a missing SQLite file (`mode=rwc`).
    ReadWrite,
    /// Only look (`check`): a SQLite file is opened read-only and nothing is created
    /// beside it (see [`read_only_options`]). PostgreSQL is opened as usual.
    ReadOnly,
}

impl Database {
    /// Builds the pool for `cfg` without connecting yet.
    pub fn open(cfg: &DatabaseConfig) -> Result<Self, DbError> {
        Self::open_for(cfg, Access::ReadWrite)
    }

    /// [`Database::open`] for `access`.
    pub fn open_for(cfg: &DatabaseConfig, access: Access) -> Result<Self, DbError> {
        match Backend::from_url(&cfg.url) {
            Ok(Backend::Sqlite) => Sqlite::open(cfg, access).map(Database::Sqlite),
            Ok(Backend::Postgres) => Postgres::open(cfg).map(Database::Postgres),
            // Config validation rejects other schemes before we get here.
            Err(e) => Err(DbError::Url {
                name: cfg.name.clone(),
                url: redact_url(&cfg.url),
                source: sqlx::Error::Configuration(e.into()),
            }),
        }
    }

    pub fn name(&self) -> &str {
        self::with_backend!(self, db => &db.name)
    }

    pub fn backend(&self) -> Backend {
        match self {
            Database::Sqlite(_) => Backend::Sqlite,
            Database::Postgres(_) => Backend::Postgres,
        }
    }

    /// A SQLite file that `mode=rwc` will create on first use and that does not
    /// exist yet; `None` for PostgreSQL and for files that exist.
    pub fn not_created_yet(&self) -> Option<std::path::PathBuf> {
        match self {
            Database::Sqlite(db) => db.not_created_yet(),
            Database::Postgres(_) => None,
        }
    }

    /// The URL with any password removed, for messages.
    pub fn url(&self) -> &str {
        self::with_backend!(self, db => &db.url)
    }

    /// Connects and runs a trivial query; `Ok` means the database is up.
    pub async fn ping(&self) -> Result<(), DbError> {
        self::with_backend!(self, db => db.ping().await)
    }

    /// Runs `sql` (one or more statements) and returns the number of affected rows;
    /// stops early with [`DbError::Cancelled`] when `cancel` fires. `timeout` becomes
    /// a server-side statement timeout where the backend has one.
    pub async fn execute_script(
        &self,
        sql: &str,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<u64, DbError> {
        self::with_backend!(self, db => db.execute_script(sql, timeout, cancel).await)
    }

    /// The server's version (`SHOW server_version`, `sqlite_version()`).
    pub async fn server_version(&self) -> Result<String, DbError> {
        self::with_backend!(self, db => db.server_version().await)
    }

    /// Whether sqlx's history table `_sqlx_migrations` exists: the one probe for it.
    pub async fn has_migration_history(&self) -> Result<bool, DbError> {
        self::with_backend!(self, db => db.has_migration_history().await)
    }

    /// Latest applied sqlx migration, if any.
    pub async fn schema_version(&self) -> Result<Option<i64>, DbError> {
        // Two steps: PostgreSQL resolves table names while planning, even in a branch
        // that would not run.
        if !self.has_migration_history().await? {
            return Ok(None);
        }
        self::with_backend!(self, db => {
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&db.pool)
                .await
                .map_err(|e| db.query_error(e))
        })
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self::with_backend!(self, db => db.pool.close().await)
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("name", &self.name())
            .field("url", &self.url())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_from_scheme() {
        assert_eq!(Backend::from_url("sqlite:///x.db"), Ok(Backend::Sqlite));
        assert_eq!(Backend::from_url("postgresql://h/d"), Ok(Backend::Postgres));
        assert!(Backend::from_url("mysql://h/d").is_err());
    }
}

//! Connections to the databases dbkeeper looks after, one backend per file.
//!
//! Pools are created lazily: an unreachable database never stops the daemon from
//! starting; it shows as `database_up 0` and its jobs fail with a clear error until it
//! comes back.

mod ident;
mod postgres;
mod sqlite;

use std::fmt;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::DatabaseConfig;

pub use ident::{check_expression, quote, quote_literal, QualifiedName};
pub use postgres::{
    is_scratch_name, scratch_lock_key, Postgres, ScratchClaim, SwapMode, Swapped, UserObjects,
};
pub use sqlite::Sqlite;

/// Which kind of database a URL points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// Picks the backend from the URL scheme.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
        match scheme {
            "sqlite" => Ok(Backend::Sqlite),
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            _ => Err(format!(
                "\"{}\" is not a supported URL; write postgres://user@host/db or sqlite:///path/file.db",
                redact_url(url)
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
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

impl Database {
    /// Builds the pool for `cfg` without connecting yet.
    pub fn open(cfg: &DatabaseConfig) -> Result<Self, DbError> {
        match Backend::from_url(&cfg.url) {
            Ok(Backend::Sqlite) => Sqlite::open(cfg).map(Database::Sqlite),
            Ok(Backend::Postgres) => Postgres::open(cfg).map(Database::Postgres),
            // Config validation rejects other schemes before we get here.
            Err(message) => Err(DbError::Url {
                name: cfg.name.clone(),
                url: redact_url(&cfg.url),
                source: sqlx::Error::Configuration(message.into()),
            }),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Database::Sqlite(db) => &db.name,
            Database::Postgres(db) => &db.name,
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Database::Sqlite(_) => Backend::Sqlite,
            Database::Postgres(_) => Backend::Postgres,
        }
    }

    /// The URL with any password removed, for messages.
    pub fn url(&self) -> &str {
        match self {
            Database::Sqlite(db) => &db.url,
            Database::Postgres(db) => &db.url,
        }
    }

    /// Connects and runs a trivial query; `Ok` means the database is up.
    pub async fn ping(&self) -> Result<(), DbError> {
        match self {
            Database::Sqlite(db) => db.ping().await,
            Database::Postgres(db) => db.ping().await,
        }
    }

    /// Runs `sql` (one or more statements) and returns the number of affected rows;
    /// stops early with [`DbError::Cancelled`] when `cancel` fires.
    pub async fn execute_script(
        &self,
        sql: &str,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<u64, DbError> {
        match self {
            Database::Sqlite(db) => db.execute_script(sql, cancel).await,
            Database::Postgres(db) => db.execute_script(sql, timeout, cancel).await,
        }
    }

    /// The server's version (`SHOW server_version`, `sqlite_version()`).
    pub async fn server_version(&self) -> Result<String, DbError> {
        match self {
            Database::Sqlite(db) => db.server_version().await,
            Database::Postgres(db) => db.server_version().await,
        }
    }

    /// Latest applied sqlx migration, if any.
    pub async fn schema_version(&self) -> Result<Option<i64>, DbError> {
        match self {
            Database::Sqlite(db) => db.schema_version().await,
            Database::Postgres(db) => db.schema_version().await,
        }
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        match self {
            Database::Sqlite(db) => db.pool.close().await,
            Database::Postgres(db) => db.pool.close().await,
        }
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

/// Removes the password (in the userinfo or a `password=` query parameter) from a URL.
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        // Unparseable: keep only the scheme, which cannot hold a secret.
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
        return format!("{scheme}:<unparseable URL>");
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("REDACTED"));
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let secret = matches!(k.as_ref(), "password" | "sslpassword");
                (
                    k.into_owned(),
                    if secret {
                        "REDACTED".into()
                    } else {
                        v.into_owned()
                    },
                )
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// True if the URL carries a password of its own (which the config should not do).
pub fn url_has_password(url: &str) -> bool {
    url::Url::parse(url)
        .is_ok_and(|u| u.password().is_some() || u.query_pairs().any(|(k, _)| k == "password"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        let r = redact_url(
            "postgres://app:s3cret@db.example:5432/app?password=hunter2&sslmode=require",
        );
        assert!(!r.contains("s3cret") && !r.contains("hunter2"), "{r}");
        assert!(
            r.contains("app@db.example") || r.contains("app:REDACTED@db.example"),
            "{r}"
        );
        assert!(r.contains("sslmode=require"));
        assert_eq!(
            redact_url("sqlite://var/demo.db?mode=rwc"),
            "sqlite://var/demo.db?mode=rwc"
        );
    }

    #[test]
    fn unparseable_urls_show_no_userinfo() {
        let r = redact_url("postgres://user:pa ss@@host:notaport/db");
        assert!(!r.contains("pa ss"), "{r}");
    }

    #[test]
    fn backend_from_scheme() {
        assert_eq!(Backend::from_url("sqlite:///x.db"), Ok(Backend::Sqlite));
        assert_eq!(Backend::from_url("postgresql://h/d"), Ok(Backend::Postgres));
        assert!(Backend::from_url("mysql://h/d").is_err());
    }
}

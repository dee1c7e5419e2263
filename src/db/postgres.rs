//! PostgreSQL databases, reached through a small sqlx pool.
//!
//! The password comes from `password-file` (re-read each time the pool is built, so a
//! rotated credential takes effect on reload) and never from the URL we log.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection};
use tokio_util::sync::CancellationToken;

use super::{redact_url, DbError};
use crate::config::{resolve_credential, DatabaseConfig};

#[derive(Clone)]
pub struct Postgres {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) pool: PgPool,
    /// Kept to open a side connection for cancel requests. Holds the password:
    /// never print it (this struct deliberately has no `Debug`).
    options: std::sync::Arc<PgConnectOptions>,
}

impl Postgres {
    pub(super) fn open(cfg: &DatabaseConfig) -> Result<Self, DbError> {
        let url = redact_url(&cfg.url);
        let mut options = PgConnectOptions::from_str(&cfg.url)
            .map_err(|source| DbError::Url {
                name: cfg.name.clone(),
                url: url.clone(),
                source,
            })?
            .application_name("dbkeeper");
        if let Some(file) = &cfg.password_file {
            let path = resolve_credential(file);
            let password =
                std::fs::read_to_string(&path).map_err(|source| DbError::PasswordFile {
                    name: cfg.name.clone(),
                    path: path.display().to_string(),
                    source,
                })?;
            options = options.password(password.trim_end_matches(['\r', '\n']));
        }
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .acquire_timeout(cfg.connect_timeout)
            .idle_timeout(Some(Duration::from_secs(60)))
            .connect_lazy_with(options.clone());
        Ok(Postgres {
            name: cfg.name.clone(),
            url,
            pool,
            options: std::sync::Arc::new(options),
        })
    }

    fn connect_error(&self, source: sqlx::Error) -> DbError {
        DbError::connect(&self.name, &self.url, source)
    }

    pub(super) async fn ping(&self) -> Result<(), DbError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.connect_error(e))?;
        conn.ping().await.map_err(|e| self.connect_error(e))
    }

    /// Runs the script with `statement_timeout` set, so the server stops a statement
    /// itself when the job's timeout passes. Not wrapped in a transaction, so that
    /// `VACUUM` and friends work; the session setting dies with the connection, which
    /// is closed rather than returned to the pool. When `cancel` fires, the server is
    /// asked to stop the statement (as psql does on Ctrl-C) before this returns.
    pub(super) async fn execute_script(
        &self,
        sql: &str,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<u64, DbError> {
        let query_error = |source| DbError::Query {
            name: self.name.clone(),
            source,
        };
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.connect_error(e))?;
        conn.close_on_drop();
        let millis = timeout.as_millis().clamp(1, i32::MAX as u128);
        // A number we formatted ourselves.
        sqlx::raw_sql(AssertSqlSafe(format!("SET statement_timeout = {millis}")))
            .execute(&mut *conn)
            .await
            .map_err(query_error)?;
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await
            .map_err(query_error)?;
        // The operator's own SQL from the config file, run as written on purpose.
        let script = sqlx::raw_sql(AssertSqlSafe(sql.to_owned()));
        tokio::select! {
            result = script.execute(&mut *conn) => Ok(result.map_err(query_error)?.rows_affected()),
            _ = cancel.cancelled() => {
                self.cancel_backend(pid).await;
                Err(DbError::Cancelled { name: self.name.clone() })
            }
        }
    }

    /// Asks the server to stop whatever session `pid` is running, over a side
    /// connection (the pool may be busy or closing).
    async fn cancel_backend(&self, pid: i32) {
        let cancel = async {
            let mut side = PgConnection::connect_with(&self.options).await?;
            sqlx::query("SELECT pg_cancel_backend($1)")
                .bind(pid)
                .execute(&mut side)
                .await?;
            side.close().await
        };
        match tokio::time::timeout(Duration::from_secs(10), cancel).await {
            Ok(Ok(())) => {
                tracing::info!(database = %self.name, pid, "cancelled the running statement")
            }
            Ok(Err(e)) => {
                tracing::warn!(database = %self.name, pid, "cannot cancel the running statement: {e}")
            }
            Err(_) => tracing::warn!(database = %self.name, pid, "cancel request timed out"),
        }
    }
}

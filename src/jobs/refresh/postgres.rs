//! PostgreSQL's [`RefreshBackend`]: `REFRESH MATERIALIZED VIEW [CONCURRENTLY]` with a
//! lock timeout.

use tokio_util::sync::CancellationToken;

use super::{RefreshBackend, RefreshError, Refreshed, Refusal};
use crate::config::RefreshConfig;
use crate::db::{set_timeout, Postgres, QualifiedName, Scope, Timeout};

/// What the catalog says about a materialized view.
struct ViewInfo {
    /// Quoted, schema-qualified.
    pub sql: String,
    pub populated: bool,
    /// Has a unique index without predicate or expressions: CONCURRENTLY works.
    pub unique_index: bool,
}

impl RefreshBackend for Postgres {
    /// The view must exist.
    async fn check(&self, view: &QualifiedName) -> Result<(), RefreshError> {
        inspect(self, view).await.map(|_| ())
    }

    /// Its row count afterwards, and whether it was refreshed concurrently.
    async fn refresh(
        &self,
        view: &QualifiedName,
        cfg: &RefreshConfig,
        cancel: &CancellationToken,
    ) -> Result<Refreshed, RefreshError> {
        let info = inspect(self, view).await?;
        let concurrently = if !cfg.concurrently {
            false
        } else if info.populated && info.unique_index {
            true
        } else {
            let why = if info.populated {
                "it has no unique index on plain columns"
            } else {
                "it has never been populated"
            };
            if cfg.require_concurrently {
                return Err(RefreshError::Refused(Refusal::Concurrently {
                    view: view.to_string(),
                    why,
                }));
            }
            tracing::warn!(view = %view, "refreshing without CONCURRENTLY (readers are blocked meanwhile): {why}");
            false
        };
        let statement = format!(
            "REFRESH MATERIALIZED VIEW {}{}",
            if concurrently { "CONCURRENTLY " } else { "" },
            info.sql
        );
        let setup = [set_timeout(
            Scope::Session,
            Timeout::Lock,
            Some(cfg.lock_timeout),
        )];
        self.run_cancellable(&setup, statement, cancel).await?;
        let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {}",
            info.sql
        )))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| RefreshError::Db(self.query_error(e)))?;
        Ok(Refreshed {
            rows: rows.max(0) as u64,
            how: if concurrently {
                "refreshed concurrently"
            } else {
                "refreshed"
            },
            dropped: Vec::new(),
        })
    }
}

async fn inspect(pg: &Postgres, view: &QualifiedName) -> Result<ViewInfo, RefreshError> {
    let row: Option<(String, String, bool, bool)> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text, c.relispopulated,
                EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique
                        AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL)
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = to_regclass($1) AND c.relkind = 'm'",
    )
    .bind(view.quoted())
    .fetch_optional(&pg.pool)
    .await
    .map_err(|e| RefreshError::Db(pg.query_error(e)))?;
    let (schema, name, populated, unique_index) = row.ok_or_else(|| RefreshError::NoView {
        database: pg.name.clone(),
        view: view.to_string(),
    })?;
    Ok(ViewInfo {
        sql: QualifiedName {
            schema: Some(schema),
            name,
        }
        .quoted(),
        populated,
        unique_index,
    })
}

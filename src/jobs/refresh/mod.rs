//! `refresh` jobs (`<database>.refresh.<name>`): keep materialized results fresh.
//!
//! PostgreSQL: `REFRESH MATERIALIZED VIEW`, CONCURRENTLY when the view allows it, with
//! a lock timeout (a blocked refresh fails and the runner retries it with backoff).
//! SQLite: a table rebuilt from a query in one transaction, so readers see the old or
//! the new contents, never an empty table; only a table dbkeeper created, and that no
//! other table references with a foreign key, is ever replaced.

mod postgres;
mod sqlite;

use tokio_util::sync::CancellationToken;

use super::Outcome;
use crate::config::RefreshConfig;
use crate::db::{Database, DbError, NameError, QualifiedName};
use crate::metrics;

/// A refresh failed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("materialized view {view} does not exist in database \"{database}\"; fix `view` in [[database.refresh]]")]
    NoView { database: String, view: String },
    #[error("{0}")]
    Refused(String),
    #[error("{kind} {table} in database \"{database}\" was not created by dbkeeper (its CREATE statement has no dbkeeper:refresh marker), and a refresh replaces only tables it created; point `view` in [[database.refresh]] at another name, or drop the {kind} so dbkeeper creates its own table")]
    NotOwned {
        database: String,
        table: String,
        kind: String,
    },
    #[error("index {index} on {table} in database \"{database}\" cannot be created again for the query's new columns ({source}), so the rebuild was rolled back and the old table is intact; drop or change the index, or change `query`")]
    IndexFails {
        database: String,
        table: String,
        index: String,
        source: sqlx::Error,
    },
    #[error("table {table} in database \"{database}\" is referenced by a foreign key from {referencing}, and a refresh deletes its rows (which would delete, or orphan, the rows pointing at them); remove those foreign keys, or point `view` in [[database.refresh]] at a table no other table references")]
    Referenced {
        database: String,
        table: String,
        referencing: String,
    },
}

#[derive(Debug)]
pub struct RefreshJob {
    pub cfg: RefreshConfig,
    pub view: QualifiedName,
}

impl RefreshJob {
    pub fn new(cfg: RefreshConfig) -> Result<Self, NameError> {
        let view = QualifiedName::parse(&cfg.view)?;
        Ok(RefreshJob { cfg, view })
    }

    /// Checks that the view exists (PostgreSQL), or that the table is missing (it is
    /// created on the first run) or one dbkeeper created (SQLite).
    pub async fn check(&self, db: &Database) -> Result<(), RefreshError> {
        match db {
            Database::Postgres(pg) => postgres::inspect(pg, &self.view).await.map(|_| ()),
            Database::Sqlite(lite) => sqlite::check(lite, &self.view).await,
        }
    }

    pub async fn run(
        &self,
        db: &Database,
        cancel: &CancellationToken,
    ) -> Result<Outcome, RefreshError> {
        let (rows, how, dropped) = match db {
            Database::Postgres(pg) => {
                let (rows, how) = postgres::refresh(pg, &self.view, &self.cfg, cancel).await?;
                (rows, how, Vec::new())
            }
            Database::Sqlite(lite) => {
                let query = self.cfg.query.as_deref().unwrap_or_default();
                let done = sqlite::rebuild(lite, &self.view, query, self.cfg.lock_timeout).await?;
                (done.rows, done.how, done.dropped)
            }
        };
        metrics::refresh_rows(db.name(), &self.cfg.view, rows);
        let mut summary = format!("{} {how}: {rows} rows", self.view);
        if !dropped.is_empty() {
            summary.push_str(&format!(
                "; dropped with the old columns: {}",
                dropped.join(", ")
            ));
        }
        Ok(Outcome {
            summary,
            details: serde_json::json!({ "rows": rows, "how": how, "dropped": dropped }),
        })
    }
}

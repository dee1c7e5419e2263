//! `refresh` jobs (`<database>.refresh.<name>`): keep materialized results fresh.
//!
//! PostgreSQL: `REFRESH MATERIALIZED VIEW`, CONCURRENTLY when the view allows it, with
//! a lock timeout (a blocked refresh fails and the runner retries it with backoff).
//! SQLite: a table rebuilt from a query in one transaction, so readers see the old or
//! the new contents, never an empty table; only a table dbkeeper created, and that no
//! other table references with a foreign key, is ever replaced.
//!
//! What a refresh needs from a database is the [`RefreshBackend`] contract, one
//! implementation per backend (`postgres.rs`, `sqlite.rs`); the job reaches it
//! through [`with_backend!`] and reports the same way for both.

mod postgres;
mod sqlite;

use tokio_util::sync::CancellationToken;

use super::Outcome;
use crate::config::RefreshConfig;
use crate::db::{with_backend, Database, DbError, NameError, QualifiedName};
use crate::metrics;

/// A refresh failed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("materialized view {view} does not exist in database \"{database}\"; fix `view` in [[database.refresh]]")]
    NoView { database: String, view: String },
    #[error("{0}")]
    Refused(Refusal),
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

/// A refresh dbkeeper will not do as configured.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("cannot refresh {view} CONCURRENTLY: {why}; add a unique index or set require-concurrently = false")]
    Concurrently { view: String, why: &'static str },
}

impl RefreshError {
    /// Whether another attempt may succeed (the runner retries), as opposed to a
    /// refusal or a name that does not fit, which stays until the configuration or
    /// the database changes. A failing index stays too: the same rows would violate it
    /// again.
    pub fn is_transient(&self) -> bool {
        match self {
            RefreshError::Db(_) => true,
            RefreshError::Refused(_)
            | RefreshError::NoView { .. }
            | RefreshError::NotOwned { .. }
            | RefreshError::Referenced { .. }
            | RefreshError::IndexFails { .. } => false,
        }
    }
}

/// What a refresh did: rows now in the view or table, how (`refreshed`, `created`,
/// …), and what a rebuild with new columns dropped (SQLite: `index x`, `trigger y`).
pub(crate) struct Refreshed {
    pub rows: u64,
    pub how: &'static str,
    pub dropped: Vec<String>,
}

/// What a refresh needs from a database, implemented once per backend. Native
/// `async fn`, reached statically through [`with_backend!`].
pub(crate) trait RefreshBackend {
    /// Refuses, touching nothing, a name the refresh could not or must not replace.
    async fn check(&self, view: &QualifiedName) -> Result<(), RefreshError>;

    /// Brings the view's contents up to date.
    async fn refresh(
        &self,
        view: &QualifiedName,
        cfg: &RefreshConfig,
        cancel: &CancellationToken,
    ) -> Result<Refreshed, RefreshError>;
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
        with_backend!(db, b => b.check(&self.view).await)
    }

    pub async fn run(
        &self,
        db: &Database,
        cancel: &CancellationToken,
    ) -> Result<Outcome, RefreshError> {
        let Refreshed { rows, how, dropped } =
            with_backend!(db, b => b.refresh(&self.view, &self.cfg, cancel).await)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_final_database_errors_are_not() {
        let refused = RefreshError::Refused(Refusal::Concurrently {
            view: "v".into(),
            why: "it has never been populated",
        });
        assert!(!refused.is_transient());
        assert!(!RefreshError::NoView {
            database: "d".into(),
            view: "v".into()
        }
        .is_transient());
        let db = RefreshError::Db(DbError::Cancelled { name: "d".into() });
        assert!(db.is_transient());
    }
}

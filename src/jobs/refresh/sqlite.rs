//! SQLite has no materialized views: a table holds the query's result and is rebuilt
//! in one transaction (created on first use; its indexes survive rebuilds).

use std::time::Duration;

use sqlx::AssertSqlSafe;

use super::RefreshError;
use crate::db::{QualifiedName, Sqlite};

/// Replaces the table's rows with the query's result; returns the new row count.
pub async fn rebuild(
    lite: &Sqlite,
    table: &QualifiedName,
    query: &str,
    lock_timeout: Duration,
) -> Result<u64, RefreshError> {
    let t = table.quoted();
    let mut conn = lite.begin_immediate(lock_timeout).await?;
    // `query` is the operator's own SQL; the table name is quoted.
    let steps = async {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {t} AS SELECT * FROM ({query}) WHERE 0"
        )))
        .execute(&mut *conn)
        .await?;
        sqlx::raw_sql(AssertSqlSafe(format!("DELETE FROM {t}")))
            .execute(&mut *conn)
            .await?;
        let inserted = sqlx::raw_sql(AssertSqlSafe(format!(
            "INSERT INTO {t} SELECT * FROM ({query})"
        )))
        .execute(&mut *conn)
        .await?;
        Ok::<u64, sqlx::Error>(inserted.rows_affected())
    }
    .await
    .map_err(|e| RefreshError::Db(lite.query_error(e)));
    lite.finish(conn, steps).await
}

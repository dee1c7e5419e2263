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
    let db_err = |e| RefreshError::Db(lite.query_error(e));
    let t = table.quoted();
    let mut conn = lite
        .pool
        .acquire()
        .await
        .map_err(|e| RefreshError::Db(lite.connect_error(e)))?;
    conn.close_on_drop();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "PRAGMA busy_timeout = {}",
        lock_timeout.as_millis().max(1)
    )))
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
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
    .await;
    match steps {
        Ok(rows) => {
            sqlx::raw_sql("COMMIT")
                .execute(&mut *conn)
                .await
                .map_err(db_err)?;
            Ok(rows)
        }
        Err(e) => {
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
            Err(db_err(e))
        }
    }
}

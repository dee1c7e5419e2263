//! Retention on SQLite: catalog checks and batched deletes by `rowid`.
//!
//! An integer column holds unix seconds; any other column is compared as text with
//! the cutoff written `YYYY-MM-DD HH:MM:SS` (SQLite's own `datetime()` format), so
//! ISO-8601 text sorts correctly against it.

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Row};

use super::{expired_predicate, Batch, BatchArchive, ColumnKind, RetentionError, Target};
use crate::db::{quote, QualifiedName, Sqlite};

pub async fn resolve(
    lite: &Sqlite,
    table: &QualifiedName,
    column: &str,
) -> Result<Target, RetentionError> {
    let q = |e| RetentionError::Db(lite.query_error(e));
    let schema = table.schema.clone().unwrap_or_else(|| "main".to_owned());
    let listed =
        sqlx::query("SELECT type, wr FROM pragma_table_list WHERE schema = ?1 AND name = ?2")
            .bind(&schema)
            .bind(&table.name)
            .fetch_optional(&lite.pool)
            .await
            .map_err(q)?;
    let Some(listed) = listed.filter(|r| r.get::<String, _>(0) == "table") else {
        return Err(RetentionError::NoTable {
            database: lite.name.clone(),
            table: table.to_string(),
        });
    };
    if listed.get::<i64, _>(1) != 0 {
        return Err(RetentionError::Unsupported(format!(
            "{table} is a WITHOUT ROWID table, which cannot be deleted from in batches by rowid"
        )));
    }
    let columns: Vec<(String, String)> =
        sqlx::query_as("SELECT name, type FROM pragma_table_info(?1, ?2)")
            .bind(&table.name)
            .bind(&schema)
            .fetch_all(&lite.pool)
            .await
            .map_err(q)?;
    let declared = columns
        .iter()
        .find(|(name, _)| name == column)
        .map(|(_, t)| t.to_ascii_uppercase())
        .ok_or_else(|| RetentionError::NoColumn {
            table: table.to_string(),
            column: column.to_owned(),
        })?;
    let kind = if declared.contains("INT") {
        ColumnKind::UnixSeconds
    } else if declared.is_empty()
        || ["DATE", "TIME", "TEXT", "CHAR", "CLOB"]
            .iter()
            .any(|t| declared.contains(t))
    {
        ColumnKind::Timestamp
    } else {
        return Err(RetentionError::ColumnType {
            table: table.to_string(),
            column: column.to_owned(),
            kind: declared,
        });
    };
    Ok(Target {
        table_sql: QualifiedName {
            schema: Some(schema),
            name: table.name.clone(),
        }
        .quoted(),
        table: table.to_string(),
        column_sql: quote(column),
        kind,
        row_key: vec!["rowid".to_owned()],
        columns: columns.iter().map(|(name, _)| name.clone()).collect(),
        oid: None,
        partitioned: false,
    })
}

fn bind_cutoff<'q>(
    q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    target: &Target,
    cutoff: DateTime<Utc>,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    match target.kind {
        ColumnKind::Timestamp => q.bind(cutoff.format("%Y-%m-%d %H:%M:%S").to_string()),
        ColumnKind::UnixSeconds => q.bind(cutoff.timestamp()),
    }
}

pub async fn count_expired(
    lite: &Sqlite,
    target: &Target,
    cutoff: DateTime<Utc>,
    where_clause: Option<&str>,
) -> Result<u64, RetentionError> {
    // Table and column are quoted identifiers; `where` is the operator's own SQL.
    let sql = format!(
        "SELECT count(*) FROM {} WHERE {}",
        target.table_sql,
        expired_predicate(target, "?1", where_clause)
    );
    let row = bind_cutoff(sqlx::query(AssertSqlSafe(sql)), target, cutoff)
        .fetch_one(&lite.pool)
        .await
        .map_err(|e| RetentionError::Db(lite.query_error(e)))?;
    Ok(row.get::<i64, _>(0).max(0) as u64)
}

pub async fn oldest(
    lite: &Sqlite,
    target: &Target,
) -> Result<Option<DateTime<Utc>>, RetentionError> {
    let expr = match target.kind {
        ColumnKind::Timestamp => format!("unixepoch(min({}))", target.column_sql),
        ColumnKind::UnixSeconds => format!("min({})", target.column_sql),
    };
    let secs: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT {expr} FROM {}",
        target.table_sql
    )))
    .fetch_one(&lite.pool)
    .await
    .map_err(|e| RetentionError::Db(lite.query_error(e)))?;
    Ok(secs.and_then(|s| DateTime::from_timestamp(s, 0)))
}

/// Deletes up to `limit` expired rows in one `BEGIN IMMEDIATE` transaction; with
/// `archive`, the rows are archived durably before the commit.
pub async fn delete_batch(
    lite: &Sqlite,
    target: &Target,
    batch: &Batch<'_>,
    archive: Option<BatchArchive<'_>>,
) -> Result<u64, RetentionError> {
    let Batch {
        cutoff,
        where_clause,
        limit,
        lock_timeout,
    } = *batch;
    let db_err = |e| RetentionError::Db(lite.query_error(e));
    let returning = if archive.is_some() {
        let fields: Vec<String> = target
            .columns
            .iter()
            .map(|c| format!("'{}', {}", c.replace('\'', "''"), quote(c)))
            .collect();
        format!(" RETURNING json_object({})", fields.join(", "))
    } else {
        String::new()
    };
    let sql = format!(
        "DELETE FROM {t} WHERE rowid IN (SELECT rowid FROM {t} WHERE {p} LIMIT ?2){returning}",
        t = target.table_sql,
        p = expired_predicate(target, "?1", where_clause)
    );
    let mut conn = lite.begin_immediate(lock_timeout).await?;
    let query = bind_cutoff(sqlx::query(AssertSqlSafe(sql)), target, cutoff).bind(i64::from(limit));
    let result = async {
        match archive {
            None => Ok(query
                .execute(&mut *conn)
                .await
                .map_err(db_err)?
                .rows_affected()),
            Some(archive) => {
                let rows: Vec<String> = query
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(db_err)?
                    .iter()
                    .map(|r| r.get::<String, _>(0))
                    .collect();
                if !rows.is_empty() {
                    archive.write(&rows)?;
                }
                Ok(rows.len() as u64)
            }
        }
    }
    .await;
    lite.finish(conn, result).await
}

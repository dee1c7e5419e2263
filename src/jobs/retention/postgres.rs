//! Retention on PostgreSQL: catalog checks, batched deletes, partition removal.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Row};

use super::{expired_predicate, millis, Batch, BatchArchive, ColumnKind, RetentionError, Target};
use crate::db::{quote, Postgres, QualifiedName};

pub async fn resolve(
    pg: &Postgres,
    table: &QualifiedName,
    column: &str,
) -> Result<Target, RetentionError> {
    let q = |e| RetentionError::Db(pg.query_error(e));
    let row = sqlx::query(
        "SELECT c.oid::int8, c.relkind::text, n.nspname::text, c.relname::text
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')",
    )
    .bind(table.quoted())
    .fetch_optional(&pg.pool)
    .await
    .map_err(q)?
    .ok_or_else(|| RetentionError::NoTable {
        database: pg.name.clone(),
        table: table.to_string(),
    })?;
    let oid: i64 = row.get(0);
    let relkind: String = row.get(1);
    let qualified = QualifiedName {
        schema: Some(row.get(2)),
        name: row.get(3),
    };
    let typ: Option<(String, String)> = sqlx::query_as(
        "SELECT t.typname::text, format_type(a.atttypid, a.atttypmod)
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
         WHERE a.attrelid = $1::int8::oid AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(oid)
    .bind(column)
    .fetch_optional(&pg.pool)
    .await
    .map_err(q)?;
    let (typname, display) = typ.ok_or_else(|| RetentionError::NoColumn {
        table: table.to_string(),
        column: column.to_owned(),
    })?;
    let kind = match typname.as_str() {
        "timestamptz" | "timestamp" | "date" => ColumnKind::Timestamp,
        "int2" | "int4" | "int8" | "numeric" | "float4" | "float8" => ColumnKind::UnixSeconds,
        _ => {
            return Err(RetentionError::ColumnType {
                table: table.to_string(),
                column: column.to_owned(),
                kind: display,
            })
        }
    };
    let partitioned = relkind == "p";
    let row_key = if partitioned {
        // ctid is not unique across partitions: use the primary key.
        let pk: Vec<String> = sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_index i
             JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) ON true
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1::int8::oid AND i.indisprimary ORDER BY k.ord",
        )
        .bind(oid)
        .fetch_all(&pg.pool)
        .await
        .map_err(q)?;
        if pk.is_empty() {
            return Err(RetentionError::Unsupported(format!(
                "{table} is partitioned and has no primary key, so rows cannot be deleted in batches; \
                 use mode = \"drop-partitions\" or add a primary key"
            )));
        }
        pk.iter().map(|c| quote(c)).collect()
    } else {
        vec!["ctid".to_owned()]
    };
    Ok(Target {
        table_sql: qualified.quoted(),
        table: table.to_string(),
        column_sql: quote(column),
        kind,
        row_key,
        columns: Vec::new(),
        oid: u32::try_from(oid).ok(),
        partitioned,
    })
}

/// A transaction on a pooled connection of its own, in UTC (so a `timestamp` column
/// compares with the cutoff the same way whatever the server's time zone) and, if
/// given, with a lock timeout. Dropped without commit, it rolls back.
async fn transaction(
    pg: &Postgres,
    lock_timeout: Option<Duration>,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, RetentionError> {
    let mut tx = pg
        .pool
        .begin()
        .await
        .map_err(|e| RetentionError::Db(pg.connect_error(e)))?;
    let mut settings = "SET LOCAL TimeZone = 'UTC'".to_owned();
    if let Some(t) = lock_timeout {
        // A number we formatted ourselves.
        settings.push_str(&format!("; SET LOCAL lock_timeout = '{}ms'", millis(t)));
    }
    sqlx::raw_sql(AssertSqlSafe(settings))
        .execute(&mut *tx)
        .await
        .map_err(|e| RetentionError::Db(pg.query_error(e)))?;
    Ok(tx)
}

fn bind_cutoff<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    target: &Target,
    cutoff: DateTime<Utc>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    match target.kind {
        ColumnKind::Timestamp => q.bind(cutoff),
        ColumnKind::UnixSeconds => q.bind(cutoff.timestamp()),
    }
}

pub async fn count_expired(
    pg: &Postgres,
    target: &Target,
    cutoff: DateTime<Utc>,
    where_clause: Option<&str>,
) -> Result<u64, RetentionError> {
    // Table and column are quoted identifiers; `where` is the operator's own SQL.
    let sql = format!(
        "SELECT count(*) FROM {} WHERE {}",
        target.table_sql,
        expired_predicate(target, "$1", where_clause)
    );
    let mut tx = transaction(pg, None).await?;
    let row = bind_cutoff(sqlx::query(AssertSqlSafe(sql)), target, cutoff)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| RetentionError::Db(pg.query_error(e)))?;
    Ok(row.get::<i64, _>(0).max(0) as u64)
}

pub async fn oldest(
    pg: &Postgres,
    target: &Target,
) -> Result<Option<DateTime<Utc>>, RetentionError> {
    let expr = match target.kind {
        // timestamp without time zone is read as UTC, like the cutoff.
        ColumnKind::Timestamp => format!(
            "extract(epoch FROM min({})::timestamp AT TIME ZONE 'UTC')::float8",
            target.column_sql
        ),
        ColumnKind::UnixSeconds => format!("min({})::float8", target.column_sql),
    };
    let sql = format!("SELECT {expr} FROM {}", target.table_sql);
    let secs: Option<f64> = sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(&pg.pool)
        .await
        .map_err(|e| RetentionError::Db(pg.query_error(e)))?;
    Ok(secs.and_then(|s| DateTime::from_timestamp_millis((s * 1000.0) as i64)))
}

/// Deletes up to `limit` expired rows in one transaction; with `archive`, the rows are
/// archived durably before the commit. Returns how many rows went.
pub async fn delete_batch(
    pg: &Postgres,
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
    let db_err = |e| RetentionError::Db(pg.query_error(e));
    let key = target.row_key.join(", ");
    let picked = if target.row_key.len() == 1 && key == "ctid" {
        // An array of tids makes the delete a TID scan.
        format!(
            "ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE {p} LIMIT $2 FOR UPDATE SKIP LOCKED))",
            t = target.table_sql,
            p = expired_predicate(target, "$1", where_clause)
        )
    } else {
        format!(
            "({key}) IN (SELECT {key} FROM {t} WHERE {p} LIMIT $2 FOR UPDATE SKIP LOCKED)",
            t = target.table_sql,
            p = expired_predicate(target, "$1", where_clause)
        )
    };
    let returning = if archive.is_some() {
        " RETURNING row_to_json(dbk_row)::text"
    } else {
        ""
    };
    let sql = format!(
        "DELETE FROM {} AS dbk_row WHERE {picked}{returning}",
        target.table_sql
    );

    let mut tx = transaction(pg, Some(lock_timeout)).await?;
    let query = bind_cutoff(sqlx::query(AssertSqlSafe(sql)), target, cutoff).bind(i64::from(limit));
    let deleted = match archive {
        None => query
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected(),
        Some(archive) => {
            let rows: Vec<String> = query
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err)?
                .iter()
                .map(|r| r.get::<String, _>(0))
                .collect();
            if !rows.is_empty() {
                archive.write(&rows)?;
            }
            rows.len() as u64
        }
    };
    tx.commit().await.map_err(db_err)?;
    Ok(deleted)
}

/// Range partitions of a table partitioned on the retention column whose upper bound is
/// at or before the cutoff, oldest first.
pub async fn expired_partitions(
    pg: &Postgres,
    target: &Target,
    cutoff: DateTime<Utc>,
) -> Result<Vec<String>, RetentionError> {
    let db_err = |e| RetentionError::Db(pg.query_error(e));
    if !target.partitioned {
        return Err(RetentionError::Unsupported(format!(
            "{} is not a partitioned table; use mode = \"delete\"",
            target.table
        )));
    }
    let oid = i64::from(target.oid.unwrap_or_default());
    let keydef: String = sqlx::query_scalar("SELECT pg_get_partkeydef($1::int8::oid)")
        .bind(oid)
        .fetch_one(&pg.pool)
        .await
        .map_err(db_err)?;
    let column = target.column_sql.trim_matches('"').replace("\"\"", "\"");
    let plain = format!("RANGE ({column})");
    let quoted = format!("RANGE ({})", target.column_sql);
    if keydef != plain && keydef != quoted {
        return Err(RetentionError::Unsupported(format!(
            "{} is partitioned by {keydef}, not by RANGE on the retention column",
            target.table
        )));
    }
    let rows = sqlx::query(
        "SELECT format('%I.%I', n.nspname, c.relname), pg_get_expr(c.relpartbound, c.oid)
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE i.inhparent = $1::int8::oid",
    )
    .bind(oid)
    .fetch_all(&pg.pool)
    .await
    .map_err(db_err)?;
    let mut tx = transaction(pg, None).await?;
    let mut expired = Vec::new();
    for row in rows {
        let name: String = row.get(0);
        let bound: String = row.get(1);
        // "FOR VALUES FROM ('…') TO ('…')": the server compares the upper bound, so
        // its own parsing of the literal decides (MAXVALUE never expires).
        let Some(upper) = bound
            .split(" TO (")
            .nth(1)
            .and_then(|s| s.strip_suffix(')'))
        else {
            continue;
        };
        if upper.contains("MAXVALUE") {
            continue;
        }
        let cmp = match target.kind {
            ColumnKind::Timestamp => "SELECT ({upper})::timestamptz <= $1",
            ColumnKind::UnixSeconds => "SELECT ({upper})::numeric <= $1::numeric",
        }
        .replace("{upper}", upper);
        // `upper` is the server's own rendering of a partition bound literal.
        let is_old: bool = bind_cutoff(sqlx::query(AssertSqlSafe(cmp)), target, cutoff)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?
            .get(0);
        if is_old {
            expired.push(name);
        }
    }
    expired.sort();
    Ok(expired)
}

/// Drops (or detaches) every expired partition, each in its own transaction (which
/// first counts its rows, for the metrics). Returns the partitions and the row total.
pub async fn remove_partitions(
    pg: &Postgres,
    target: &Target,
    cutoff: DateTime<Utc>,
    detach: bool,
    lock_timeout: Duration,
) -> Result<(Vec<String>, u64), RetentionError> {
    let mut gone = Vec::new();
    let mut rows = 0u64;
    for partition in expired_partitions(pg, target, cutoff).await? {
        // `partition` comes from format('%I.%I'), so it is already quoted.
        let statement = if detach {
            format!(
                "ALTER TABLE {} DETACH PARTITION {partition}",
                target.table_sql
            )
        } else {
            format!("DROP TABLE {partition}")
        };
        let mut tx = transaction(pg, Some(lock_timeout)).await?;
        let count: i64 =
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {partition}")))
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| RetentionError::Db(pg.query_error(e)))?;
        sqlx::raw_sql(AssertSqlSafe(statement))
            .execute(&mut *tx)
            .await
            .map_err(|e| RetentionError::Db(pg.query_error(e)))?;
        rows += count.max(0) as u64;
        tx.commit()
            .await
            .map_err(|e| RetentionError::Db(pg.query_error(e)))?;
        tracing::info!(database = %pg.name, partition, detach, "removed an expired partition");
        gone.push(partition);
    }
    Ok((gone, rows))
}

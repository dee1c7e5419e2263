//! Retention on SQLite ([`RetentionBackend`] for [`Sqlite`]): catalog checks, the
//! per-value expiry predicate, batched deletes by the real row id (or primary key).
//! SQLite has no partitions, so the contract's partition defaults apply.
//!
//! SQLite columns hold any type, so the predicate looks at each value's storage class
//! and reads it with SQLite's own date functions (see [`Reading::SqliteValue`]). The
//! comparisons are in seconds with millisecond precision, SQLite's own resolution.

use base64::Engine;
use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Column, Row, TypeInfo, ValueRef};

use super::reading::{Cutoff, Reading};
use super::{Batch, BatchDone, RetentionBackend, RetentionError, RowKey, Scan, Target};
use crate::config::RetentionConfig;
use crate::db::{quote, QualifiedName, Sqlite};

/// Text is read as a time only if it starts like an ISO-8601 date: SQLite's functions
/// also accept bare times ("12:00", read as 2000-01-01), "now" and numbers as text,
/// none of which is a row's date.
const ISO_DATE: &str = "'[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*'";

impl RetentionBackend for Sqlite {
    async fn resolve(
        &self,
        table: &QualifiedName,
        cfg: &RetentionConfig,
    ) -> Result<Target, RetentionError> {
        let column = cfg.column.as_str();
        let q = |e| RetentionError::Db(self.query_error(e));
        let schema = table.schema.clone().unwrap_or_else(|| "main".to_owned());
        let listed =
            sqlx::query("SELECT type, wr FROM pragma_table_list WHERE schema = ?1 AND name = ?2")
                .bind(&schema)
                .bind(&table.name)
                .fetch_optional(&self.pool)
                .await
                .map_err(q)?;
        let Some(listed) = listed.filter(|r| r.get::<String, _>(0) == "table") else {
            return Err(RetentionError::NoTable {
                database: self.name.clone(),
                table: table.to_string(),
            });
        };
        let without_rowid = listed.get::<i64, _>(1) != 0;
        let columns: Vec<(String, i64, bool)> =
            sqlx::query_as("SELECT name, pk, \"notnull\" FROM pragma_table_info(?1, ?2)")
                .bind(&table.name)
                .bind(&schema)
                .fetch_all(&self.pool)
                .await
                .map_err(q)?;
        if !columns.iter().any(|(name, _, _)| name == column) {
            return Err(RetentionError::NoColumn {
                table: table.to_string(),
                column: column.to_owned(),
            });
        }
        let mut pk: Vec<&(String, i64, bool)> = columns.iter().filter(|(_, k, _)| *k > 0).collect();
        pk.sort_by_key(|(_, k, _)| *k);
        // A rowid table's primary key may hold NULLs (an old SQLite quirk), which no
        // `IN` ever matches; WITHOUT ROWID keys never do.
        let pk_addresses_every_row = without_rowid || pk.iter().all(|(_, _, not_null)| *not_null);
        let pk: Vec<String> = pk.iter().map(|(name, _, _)| quote(name)).collect();
        // A column may be called rowid: then the real row id goes by another of its names.
        let free_alias = ["rowid", "_rowid_", "oid"].into_iter().find(|alias| {
            !columns
                .iter()
                .any(|(n, _, _)| n.eq_ignore_ascii_case(alias))
        });
        let row_key = match free_alias {
            Some(alias) if !without_rowid => RowKey::Rowid(alias),
            _ if !pk.is_empty() && pk_addresses_every_row => RowKey::PrimaryKey(pk),
            _ => {
                return Err(RetentionError::Unaddressable {
                    table: table.to_string(),
                })
            }
        };
        if self.foreign_keys && !cfg.cascade {
            let referencing: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT DISTINCT m.name FROM {}.sqlite_schema m, pragma_foreign_key_list(m.name, ?2) f
                 WHERE m.type = 'table' AND f.\"table\" = ?1 COLLATE NOCASE
                   AND upper(f.on_delete) IN ('CASCADE', 'SET NULL', 'SET DEFAULT')
                 ORDER BY 1",
                quote(&schema)
            )))
            .bind(&table.name)
            .bind(&schema)
            .fetch_all(&self.pool)
            .await
            .map_err(q)?;
            RetentionError::refuse_cascades(table, referencing)?;
        }
        let table_sql = QualifiedName {
            schema: Some(schema),
            name: table.name.clone(),
        }
        .quoted();
        Ok(Target {
            table: table.to_string(),
            alias: quote(&table.name),
            relations: vec![table_sql.clone()],
            table_sql,
            column_sql: quote(column),
            reading: Reading::SqliteValue {
                unit: cfg.epoch_unit,
            },
            row_key,
            oid: None,
            partitioned: false,
            where_clause: cfg.where_clause.clone(),
        })
    }

    fn expired(&self, target: &Target, cutoff: Cutoff) -> String {
        let c = &target.column_sql;
        let unit = unit_of(target);
        let (min, _) = Reading::integer_range(unit);
        let cut_int = cutoff.integer_bound(unit);
        let cut_s = cutoff.exact(crate::config::EpochUnit::S);
        format!(
            "CASE typeof({c}) \
             WHEN 'integer' THEN {c} >= {min} AND {c} < {cut_int} \
             WHEN 'real' THEN coalesce(unixepoch({c}, 'auto', 'subsec') < {cut_s}, 0) \
             WHEN 'text' THEN {c} GLOB {ISO_DATE} AND coalesce(unixepoch({c}, 'subsec') < {cut_s}, 0) \
             ELSE 0 END"
        )
    }

    /// Non-null values that are not a time: other text, BLOBs, integers outside years
    /// 1–9999 in `epoch-unit`, reals outside both the julian and the unix range.
    fn unreadable(&self, target: &Target) -> String {
        let c = &target.column_sql;
        let (min, max) = Reading::integer_range(unit_of(target));
        format!(
            "typeof({c}) <> 'null' AND NOT CASE typeof({c}) \
             WHEN 'integer' THEN {c} BETWEEN {min} AND {max} \
             WHEN 'real' THEN unixepoch({c}, 'auto') IS NOT NULL \
             WHEN 'text' THEN {c} GLOB {ISO_DATE} AND unixepoch({c}) IS NOT NULL \
             ELSE 0 END"
        )
    }

    async fn count(&self, target: &Target, condition: &str) -> Result<u64, RetentionError> {
        let sql = format!(
            "SELECT count(*) FROM {} WHERE {condition}",
            target.table_sql
        );
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| RetentionError::Db(self.query_error(e)))?;
        Ok(n.max(0) as u64)
    }

    async fn validate(&self, target: &Target, condition: &str) -> Result<(), RetentionError> {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "EXPLAIN SELECT 1 FROM {} WHERE {condition}",
            target.table_sql
        )))
        .execute(&self.pool)
        .await
        .map_err(|e| RetentionError::Where(self.query_error(e)))?;
        Ok(())
    }

    /// Looks at every row whatever `from` says: SQLite's per-value reading has no
    /// index order to take advantage of.
    async fn oldest(
        &self,
        target: &Target,
        _from: Option<Cutoff>,
    ) -> Result<Option<DateTime<Utc>>, RetentionError> {
        let sql = format!(
            "SELECT min({}) FROM {} WHERE {}",
            seconds_expr(target),
            target.table_sql,
            target.where_clause.as_deref().unwrap_or("1")
        );
        let secs: Option<f64> = sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| RetentionError::Db(self.query_error(e)))?;
        Ok(secs.and_then(|s| DateTime::from_timestamp_millis((s * 1000.0).round() as i64)))
    }

    /// A `BEGIN IMMEDIATE` transaction.
    async fn delete_batch(
        &self,
        target: &Target,
        batch: &Batch<'_>,
    ) -> Result<BatchDone, RetentionError> {
        let db_err = |e| RetentionError::Db(self.query_error(e));
        let t = batch.relation;
        let condition = batch.condition;
        let n = batch.limit;
        let after = match batch.scan {
            Scan::Rows { after } => *after,
            Scan::Pages { .. } => None,
        };
        let (picked, id) = match &target.row_key {
            RowKey::Rowid(rid) => {
                // Resuming after the last row id taken reads each row once per run.
                let after = after.map_or(String::new(), |a| format!("{rid} > {a} AND "));
                (
                    format!(
                        "{rid} IN (SELECT {rid} FROM {t} WHERE {after}{condition} ORDER BY {rid} LIMIT {n})"
                    ),
                    Some(*rid),
                )
            }
            RowKey::PrimaryKey(cols) => {
                let key = cols.join(", ");
                (
                    format!("({key}) IN (SELECT {key} FROM {t} WHERE {condition} LIMIT {n})"),
                    None,
                )
            }
            RowKey::Ctid => return Err(RetentionError::CtidOnSqlite),
        };
        let mut returning = Vec::new();
        if let Some(rid) = id {
            returning.push(format!("{rid} AS dbk_rowid"));
        }
        if batch.archive.is_some() {
            returning.push("*".to_owned());
        }
        let returning = if returning.is_empty() {
            String::new()
        } else {
            format!(" RETURNING {}", returning.join(", "))
        };
        let sql = format!("DELETE FROM {t} WHERE {picked} AND {condition}{returning}");
        let mut conn = self.begin_immediate(batch.lock_timeout).await?;
        let query = sqlx::query(AssertSqlSafe(sql));
        let result = async {
            if returning.is_empty() {
                let rows = query
                    .execute(&mut *conn)
                    .await
                    .map_err(db_err)?
                    .rows_affected();
                return Ok(BatchDone {
                    rows,
                    last_id: None,
                });
            }
            let rows = query.fetch_all(&mut *conn).await.map_err(db_err)?;
            let last_id = match id {
                Some(_) => rows
                    .iter()
                    .filter_map(|r| r.try_get::<i64, _>(0).ok())
                    .max(),
                None => None,
            };
            if let Some(archive) = batch.archive {
                let skip = usize::from(id.is_some());
                let lines: Vec<String> = rows.iter().map(|r| row_json(r, skip)).collect();
                if !lines.is_empty() {
                    archive.write(&lines)?;
                }
            }
            Ok(BatchDone {
                rows: rows.len() as u64,
                last_id,
            })
        }
        .await;
        self.finish(conn, result).await
    }
}

fn unit_of(target: &Target) -> crate::config::EpochUnit {
    match target.reading {
        Reading::SqliteValue { unit } | Reading::Epoch { unit, .. } => unit,
        _ => crate::config::EpochUnit::S,
    }
}

/// Unix seconds of a readable value, NULL otherwise.
fn seconds_expr(target: &Target) -> String {
    let c = &target.column_sql;
    let unit = unit_of(target);
    let (min, max) = Reading::integer_range(unit);
    format!(
        "CASE typeof({c}) \
         WHEN 'integer' THEN CASE WHEN {c} BETWEEN {min} AND {max} THEN {c} / {}.0 END \
         WHEN 'real' THEN unixepoch({c}, 'auto', 'subsec') \
         WHEN 'text' THEN CASE WHEN {c} GLOB {ISO_DATE} THEN unixepoch({c}, 'subsec') END \
         END",
        unit.per_second()
    )
}

/// One deleted row as a JSON object, columns from `skip` on. BLOBs (and text that is
/// not UTF-8) become `{"base64": "…"}` and infinite reals `{"real": "Infinity"}`
/// (or `"-Infinity"`): objects, which no other value can look like.
fn row_json(row: &sqlx::sqlite::SqliteRow, skip: usize) -> String {
    let mut object = serde_json::Map::new();
    for (i, col) in row.columns().iter().enumerate().skip(skip) {
        let value = match row.try_get_raw(i) {
            Ok(raw) if raw.is_null() => serde_json::Value::Null,
            Ok(raw) => match raw.type_info().name() {
                "INTEGER" => row
                    .try_get::<i64, _>(i)
                    .map_or(serde_json::Value::Null, Into::into),
                "REAL" => match row.try_get::<f64, _>(i) {
                    Ok(r) => serde_json::Number::from_f64(r).map_or_else(
                        // JSON has no infinity: {"real": "Infinity"}, never a null.
                        || serde_json::json!({ "real": if r > 0.0 { "Infinity" } else { "-Infinity" } }),
                        serde_json::Value::Number,
                    ),
                    Err(_) => base64_value(row.try_get::<Vec<u8>, _>(i).unwrap_or_default()),
                },
                "TEXT" => match row.try_get::<String, _>(i) {
                    Ok(text) => text.into(),
                    Err(_) => base64_value(row.try_get::<Vec<u8>, _>(i).unwrap_or_default()),
                },
                _ => base64_value(row.try_get::<Vec<u8>, _>(i).unwrap_or_default()),
            },
            Err(_) => serde_json::Value::Null,
        };
        object.insert(col.name().to_owned(), value);
    }
    serde_json::Value::Object(object).to_string()
}

fn base64_value(bytes: Vec<u8>) -> serde_json::Value {
    serde_json::json!({ "base64": base64::engine::general_purpose::STANDARD.encode(bytes) })
}

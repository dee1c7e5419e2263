//! SQLite's [`GaugeBackend`]: the query on a connection of its own with
//! `PRAGMA query_only`; table sizes from the `dbstat` virtual table and exact row
//! counts (`count(*)`).

use std::time::Duration;

use futures_util::TryStreamExt;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{AssertSqlSafe, Column, ConnectOptions, Row, TypeInfo, ValueRef};
use tokio_util::sync::CancellationToken;

use super::{Cell, GaugeBackend, Table};
use crate::db::{quote, read_only_options, DbError, Sqlite};
use crate::metrics::TableStat;

impl GaugeBackend for Sqlite {
    /// SQLite has no statement timeout: the runner's timeout fires `cancel`, and
    /// the connection is closed (see [`Sqlite::execute_script`]).
    async fn read_only(
        &self,
        query: &str,
        limit: usize,
        _timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Table, DbError> {
        let mut conn = query_only(self).await?;
        // sqlx runs every statement of the text (`SELECT 1; DELETE …`); the
        // read-only connection refuses the write in any of them.
        let read = async {
            let mut table = Table::default();
            let mut rows = sqlx::query(AssertSqlSafe(query.to_owned())).fetch(&mut conn);
            while let Some(row) = rows.try_next().await? {
                if table.columns.is_empty() {
                    table.columns = row.columns().iter().map(|c| c.name().to_owned()).collect();
                }
                table.rows.push(cells(&row)?);
                if table.rows.len() > limit {
                    break;
                }
            }
            Ok::<_, sqlx::Error>(table)
        };
        let mut table = tokio::select! {
            result = read => result.map_err(|e| self.query_error(e))?,
            _ = cancel.cancelled() => return Err(DbError::Cancelled { name: self.name.clone() }),
        };
        // A column is numeric when it holds numbers and NULLs only, at least one
        // number: SQLite's values carry their type, its columns need not.
        table.numeric = (0..table.columns.len())
            .map(|i| {
                let values = table.rows.iter().filter_map(|r| r.get(i));
                let mut any = false;
                for v in values {
                    match v {
                        Cell::Int(_) | Cell::Float(_) => any = true,
                        Cell::Null => {}
                        _ => return false,
                    }
                }
                any
            })
            .collect();
        Ok(table)
    }

    async fn table_stats(&self, max: usize) -> Result<(Vec<TableStat>, usize), DbError> {
        let mut conn = query_only(self).await?;
        // Every b-tree of a table (itself and its indexes), summed per table.
        let sizes: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT t.name, coalesce(sum(d.pgsize), 0) AS bytes, count(*) OVER ()
             FROM sqlite_schema t
             LEFT JOIN sqlite_schema b ON b.tbl_name = t.name AND b.type IN ('table', 'index')
             LEFT JOIN (SELECT name, pgsize FROM dbstat WHERE aggregate = TRUE) d ON d.name = b.name
             WHERE t.type = 'table' AND t.name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
               AND coalesce(t.sql, '') NOT LIKE 'CREATE VIRTUAL%'
             GROUP BY t.name
             ORDER BY bytes DESC, t.name
             LIMIT ?",
        )
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&mut conn)
        .await
        .map_err(|e| self.query_error(e))?;
        let total = sizes.first().map_or(0, |s| s.2.max(0) as usize);
        let mut tables = Vec::with_capacity(sizes.len());
        for (table, bytes, _) in sizes {
            let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT count(*) FROM {}",
                quote(&table)
            )))
            .fetch_one(&mut conn)
            .await
            .map_err(|e| self.query_error(e))?;
            tables.push(TableStat {
                table,
                rows: rows as f64,
                bytes: bytes as f64,
                seq_scans: None,
                index_scans: None,
            });
        }
        Ok((tables, total))
    }
}

/// A connection of its own, opened read-only (as `check` opens files, see
/// [`read_only_options`]), on which SQLite refuses every write. The query could
/// turn `PRAGMA query_only` off again; it cannot reopen the file read-write.
async fn query_only(db: &Sqlite) -> Result<SqliteConnection, DbError> {
    let options = read_only_options((*db.pool.connect_options()).clone());
    let mut conn = options.connect().await.map_err(|e| db.connect_error(e))?;
    sqlx::raw_sql("PRAGMA query_only = ON")
        .execute(&mut conn)
        .await
        .map_err(|e| db.query_error(e))?;
    Ok(conn)
}

/// The row's values by their own storage class.
fn cells(row: &SqliteRow) -> Result<Vec<Cell>, sqlx::Error> {
    let mut cells = Vec::with_capacity(row.len());
    for i in 0..row.len() {
        let raw = row.try_get_raw(i)?;
        let kind = raw.type_info().name().to_owned();
        cells.push(if raw.is_null() {
            Cell::Null
        } else {
            match kind.as_str() {
                "INTEGER" | "BOOLEAN" => Cell::Int(row.try_get_unchecked::<i64, _>(i)?),
                "REAL" => Cell::Float(row.try_get_unchecked::<f64, _>(i)?),
                "TEXT" => Cell::Text(row.try_get_unchecked::<String, _>(i)?),
                other => Cell::Other(other.to_owned()),
            }
        });
    }
    Ok(cells)
}

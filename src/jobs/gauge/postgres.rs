//! PostgreSQL's [`GaugeBackend`]: the query inside `BEGIN READ ONLY` (rolled back)
//! with a statement timeout; table figures from `pg_class` and `pg_stat_user_tables`.

use std::time::Duration;

use futures_util::TryStreamExt;
use sqlx::postgres::{PgRow, PgValueRef};
use sqlx::{AssertSqlSafe, Column, Row, TypeInfo, ValueRef};
use tokio_util::sync::CancellationToken;

use super::{Cell, GaugeBackend, Table};
use crate::db::{set_timeout, DbError, Postgres, Scope, Timeout};
use crate::metrics::TableStat;

/// Column types read as numbers (booleans as 0 and 1).
const NUMERIC: [&str; 8] = [
    "INT2", "INT4", "INT8", "OID", "FLOAT4", "FLOAT8", "NUMERIC", "BOOL",
];
/// Column types read as text.
const TEXT: [&str; 6] = ["TEXT", "VARCHAR", "BPCHAR", "NAME", "\"CHAR\"", "UNKNOWN"];

impl GaugeBackend for Postgres {
    async fn read_only(
        &self,
        query: &str,
        limit: usize,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Table, DbError> {
        let setup = [
            "BEGIN READ ONLY".to_owned(),
            set_timeout(Scope::Transaction, Timeout::Statement, Some(timeout)),
        ];
        let (mut conn, pid) = self.own_session(&setup).await?;
        // The operator's query, sent as one prepared statement: a second statement
        // (`COMMIT; DELETE …`) is a syntax error, so the read-only transaction holds.
        let read = async {
            let mut table = Table::default();
            let mut rows = sqlx::query(AssertSqlSafe(query.to_owned())).fetch(&mut *conn);
            while let Some(row) = rows.try_next().await? {
                if table.columns.is_empty() {
                    for column in row.columns() {
                        table.columns.push(column.name().to_owned());
                        let type_name = column.type_info().name();
                        table.numeric.push(NUMERIC.contains(&type_name));
                    }
                }
                table.rows.push(cells(&row)?);
                if table.rows.len() > limit {
                    break;
                }
            }
            Ok::<_, sqlx::Error>(table)
        };
        let result = tokio::select! {
            result = read => result.map_err(|e| self.query_error(e)),
            _ = cancel.cancelled() => {
                self.cancel_backend(pid).await;
                return Err(DbError::Cancelled { name: self.name.clone() });
            }
        };
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
        result
    }

    async fn table_stats(&self, max: usize) -> Result<(Vec<TableStat>, usize), DbError> {
        // reltuples is -1 until the table is first analyzed (PostgreSQL 14+); then
        // the statistics collector's live-tuple count stands in.
        let rows: Vec<(String, f64, f64, f64, f64, i64)> = sqlx::query_as(
            // Names holding `.` or `"` are quoted, so that no two tables share a
            // label (`"sales.2024"` in public, `sales."2024"` in schema sales).
            "SELECT CASE WHEN s.schemaname = 'public' AND s.relname !~ '[.\"]'
                         THEN s.relname::text
                         ELSE (CASE WHEN s.schemaname ~ '[.\"]'
                                    THEN '\"' || replace(s.schemaname, '\"', '\"\"') || '\"'
                                    ELSE s.schemaname::text END)
                              || '.' ||
                              (CASE WHEN s.relname ~ '[.\"]'
                                    THEN '\"' || replace(s.relname, '\"', '\"\"') || '\"'
                                    ELSE s.relname::text END) END,
                    CASE WHEN c.reltuples >= 0 THEN c.reltuples::float8
                         ELSE s.n_live_tup::float8 END,
                    pg_total_relation_size(s.relid)::float8,
                    coalesce(s.seq_scan, 0)::float8,
                    coalesce(s.idx_scan, 0)::float8,
                    count(*) OVER ()
             FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
             ORDER BY 3 DESC, 1
             LIMIT $1",
        )
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.query_error(e))?;
        let total = rows.first().map_or(0, |r| r.5.max(0) as usize);
        let tables = rows
            .into_iter()
            .map(|(table, rows, bytes, seq, idx, _)| TableStat {
                table,
                rows,
                bytes,
                seq_scans: Some(seq),
                index_scans: Some(idx),
            })
            .collect();
        Ok((tables, total))
    }
}

/// The row's values: numbers and text as such, other types by their type's name.
fn cells(row: &PgRow) -> Result<Vec<Cell>, sqlx::Error> {
    let mut cells = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let raw = row.try_get_raw(i)?;
        let type_name = column.type_info().name();
        cells.push(if raw.is_null() {
            Cell::Null
        } else {
            match type_name {
                "INT2" => Cell::Int(row.try_get::<i16, _>(i)?.into()),
                "INT4" => Cell::Int(row.try_get::<i32, _>(i)?.into()),
                "INT8" => Cell::Int(row.try_get::<i64, _>(i)?),
                "OID" => Cell::Int(row.try_get::<sqlx::postgres::types::Oid, _>(i)?.0.into()),
                "FLOAT4" => Cell::Float(row.try_get::<f32, _>(i)?.into()),
                "FLOAT8" => Cell::Float(row.try_get::<f64, _>(i)?),
                "BOOL" => Cell::Int(row.try_get::<bool, _>(i)?.into()),
                "NUMERIC" => Cell::Float(numeric(raw)?),
                t if TEXT.contains(&t) => Cell::Text(row.try_get_unchecked::<String, _>(i)?),
                other => Cell::Other(other.to_owned()),
            }
        });
    }
    Ok(cells)
}

/// A NUMERIC in PostgreSQL's binary format (sqlx reads it only with a decimal
/// crate): digit count, weight, sign, display scale, then base-10000 digits.
fn numeric(raw: PgValueRef<'_>) -> Result<f64, sqlx::Error> {
    let bytes = raw.as_bytes().map_err(sqlx::Error::Decode)?;
    parse_numeric(bytes)
        .ok_or_else(|| sqlx::Error::Decode("malformed NUMERIC value from the server".into()))
}

fn parse_numeric(bytes: &[u8]) -> Option<f64> {
    let word = |i: usize| -> Option<u16> {
        let b = bytes.get(2 * i..2 * i + 2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    };
    let ndigits = word(0)? as usize;
    let weight = word(1)? as i16;
    match word(2)? {
        0xC000 => return Some(f64::NAN),
        0xD000 => return Some(f64::INFINITY),
        0xF000 => return Some(f64::NEG_INFINITY),
        _ => {}
    }
    let negative = word(2)? == 0x4000;
    let mut value = 0.0;
    for d in 0..ndigits {
        let digit = f64::from(word(4 + d)?);
        value += digit * 10_000f64.powi(i32::from(weight) - d as i32);
    }
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::parse_numeric;

    fn encode(ndigits: u16, weight: i16, sign: u16, digits: &[u16]) -> Vec<u8> {
        let mut b = Vec::new();
        for w in [ndigits, weight as u16, sign, 0] {
            b.extend(w.to_be_bytes());
        }
        for d in digits {
            b.extend(d.to_be_bytes());
        }
        b
    }

    #[test]
    fn numerics_decode() {
        // 12345.678 = 1|2345|6780 with weight 1.
        let v = parse_numeric(&encode(3, 1, 0, &[1, 2345, 6780])).unwrap();
        assert!((v - 12345.678).abs() < 1e-9, "{v}");
        assert_eq!(parse_numeric(&encode(1, 0, 0x4000, &[42])), Some(-42.0));
        assert_eq!(parse_numeric(&encode(0, 0, 0, &[])), Some(0.0));
        // 0.05 = 500 with weight -1.
        let v = parse_numeric(&encode(1, -1, 0, &[500])).unwrap();
        assert!((v - 0.05).abs() < 1e-12, "{v}");
        assert!(parse_numeric(&encode(0, 0, 0xC000, &[])).unwrap().is_nan());
        assert_eq!(parse_numeric(&[0, 1]), None);
    }
}

//! `gauge` jobs (`<database>.gauge.<name>`) and the `table-stats` job
//! (`<database>.table-stats`): numbers read from the database and exported to
//! Prometheus, the "key metrics to monitor" queries of a runbook.
//!
//! A gauge runs its query read-only (PostgreSQL: inside `BEGIN READ ONLY`, rolled
//! back; SQLite: on a connection of its own with `PRAGMA query_only`), so a query
//! that tries to write fails and changes nothing. The first numeric column of each
//! row is its value and every other column a label; the rows of a successful run
//! replace the previous run's series (see `metrics::query_gauge`), a failed run
//! leaves them as they were and `dbkeeper_query_last_success_timestamp_seconds`
//! shows how old they are.
//!
//! What these jobs need from a database is the [`GaugeBackend`] contract, one
//! implementation per backend (`postgres.rs`, `sqlite.rs`).

mod postgres;
mod sqlite;

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::Outcome;
use crate::config::GaugeConfig;
use crate::db::{with_backend, Database, DbError};
use crate::metrics::{self, TableStat};

/// Label names a query column may not take: the gauge's own labels and those
/// Prometheus sets on every scraped series.
const RESERVED_LABELS: [&str; 4] = ["database", "gauge", "job", "instance"];

/// A gauge or table-stats run failed.
#[derive(Debug, thiserror::Error)]
pub enum GaugeError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("gauge \"{gauge}\" returned more than {cap} rows (max-series); nothing was exported from this run; narrow the query (GROUP BY fewer columns, LIMIT) or raise max-series")]
    TooManySeries { gauge: String, cap: usize },
    #[error("gauge \"{gauge}\": column \"{column}\" {why}; rename it in the query (SELECT … AS other_name)")]
    BadLabel {
        gauge: String,
        column: String,
        why: &'static str,
    },
    #[error("gauge \"{gauge}\": the query has no numeric column to use as the value; return a count, sum or other number (integer, float, numeric or boolean)")]
    NoValue { gauge: String },
    #[error("gauge \"{gauge}\": label column \"{column}\" has type {type_name}, which is not exported as text; cast it in the query ({column}::text)")]
    Unsupported {
        gauge: String,
        column: String,
        type_name: String,
    },
    #[error("gauge \"{gauge}\": two rows have the same labels ({labels}); every row must differ in its label columns: GROUP BY them or add a column that tells the rows apart")]
    Duplicate { gauge: String, labels: String },
}

impl GaugeError {
    /// Only a database error may go away by itself; the others stay until the query
    /// or the data changes.
    pub fn is_transient(&self) -> bool {
        matches!(self, GaugeError::Db(_))
    }
}

/// One value read from a query's result.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
    /// A value of a type neither read as a number nor as text: its type's name.
    Other(String),
}

impl Cell {
    fn number(&self) -> Option<f64> {
        match self {
            Cell::Int(i) => Some(*i as f64),
            Cell::Float(f) => Some(*f),
            _ => None,
        }
    }
}

/// What a query returned: its column names, which of them hold numbers, and at most
/// the rows asked for (plus one, to tell that there were more).
#[derive(Debug, Default)]
pub(crate) struct Table {
    pub columns: Vec<String>,
    /// Per column: a numeric type (PostgreSQL), or only numbers and NULLs with at
    /// least one number (SQLite, whose columns have no fixed type).
    pub numeric: Vec<bool>,
    pub rows: Vec<Vec<Cell>>,
}

/// What gauges and table stats need from a database, implemented once per backend.
pub(crate) trait GaugeBackend {
    /// Runs `query` read-only and returns at most `limit` rows (one more if there
    /// are more), stopping at `timeout` or when `cancel` fires.
    async fn read_only(
        &self,
        query: &str,
        limit: usize,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Table, DbError>;

    /// The `max` largest tables (total bytes) with their figures, and how many
    /// tables there are in all.
    async fn table_stats(&self, max: usize) -> Result<(Vec<TableStat>, usize), DbError>;
}

/// A `[[database.gauge]]`.
#[derive(Debug)]
pub struct GaugeJob {
    pub cfg: GaugeConfig,
}

/// The series of one run: label pairs (column order) and value per row.
type Rows = Vec<(Vec<(String, String)>, f64)>;

impl GaugeJob {
    /// Creates the gauge's staleness series (at 0) and its info series.
    pub fn register(&self, database: &str) {
        metrics::register_query_gauge(database, &self.cfg.name, self.cfg.help.as_deref());
    }

    /// What `dbkeeper check` asks: does the query compile? It is planned
    /// (`EXPLAIN`, read-only as always), never run: `check` only looks, and a
    /// query may call functions that act outside its transaction.
    pub async fn check(&self, db: &Database, timeout: Duration) -> Result<String, GaugeError> {
        let never = CancellationToken::new();
        let explain = format!("EXPLAIN {}", self.cfg.query);
        with_backend!(db, b => b.read_only(&explain, 0, timeout, &never).await)?;
        Ok("query compiles (check plans it and does not run it)".to_owned())
    }

    pub async fn run(
        &self,
        job: &str,
        db: &Database,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Outcome, GaugeError> {
        let started = Utc::now();
        let cap = self.cfg.max_series();
        let table =
            with_backend!(db, b => b.read_only(&self.cfg.query, cap, timeout, cancel).await)?;
        let (rows, skipped) = self.series(table)?;
        metrics::query_gauge(job, db.name(), &self.cfg.name, started, &rows, skipped);
        let shown: Vec<String> = rows
            .iter()
            .map(|(labels, value)| {
                let labels: Vec<String> =
                    labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                format!("{{{}}} {value}", labels.join(","))
            })
            .collect();
        let mut summary = format!("{} series", rows.len());
        if skipped > 0 {
            summary.push_str(&format!(" ({skipped} rows with a NULL value skipped)"));
        }
        if !shown.is_empty() {
            summary.push_str(": ");
            summary.push_str(&shown.join(" "));
        }
        Ok(Outcome {
            summary,
            details: serde_json::json!({ "series": rows.len(), "skipped": skipped }),
        })
    }

    /// Turns the query's rows into series: checks the label names, takes the first
    /// numeric column as the value, skips (and counts) rows whose value is NULL.
    fn series(&self, table: Table) -> Result<(Rows, usize), GaugeError> {
        let gauge = || self.cfg.name.clone();
        if table.rows.len() > self.cfg.max_series() {
            return Err(GaugeError::TooManySeries {
                gauge: gauge(),
                cap: self.cfg.max_series(),
            });
        }
        if table.rows.is_empty() {
            // No rows, no series (a SQLite column's type is known only from values).
            return Ok((Vec::new(), 0));
        }
        let value = table
            .numeric
            .iter()
            .position(|n| *n)
            .ok_or_else(|| GaugeError::NoValue { gauge: gauge() })?;
        let mut names = HashSet::new();
        for (i, column) in table.columns.iter().enumerate() {
            if i == value {
                continue;
            }
            let why = label_problem(column).or_else(|| {
                (!names.insert(column.as_str())).then_some("appears twice in the result")
            });
            if let Some(why) = why {
                return Err(GaugeError::BadLabel {
                    gauge: gauge(),
                    column: column.clone(),
                    why,
                });
            }
        }
        let mut rows = Vec::new();
        let mut seen = HashSet::new();
        let mut skipped = 0;
        for row in table.rows {
            let Some(v) = row.get(value).and_then(Cell::number) else {
                skipped += 1;
                continue;
            };
            let mut labels = Vec::new();
            for (i, cell) in row.into_iter().enumerate() {
                if i == value {
                    continue;
                }
                let text = match cell {
                    Cell::Null => String::new(),
                    Cell::Int(n) => n.to_string(),
                    Cell::Float(f) => f.to_string(),
                    Cell::Text(t) => t,
                    Cell::Other(type_name) => {
                        return Err(GaugeError::Unsupported {
                            gauge: gauge(),
                            column: table.columns[i].clone(),
                            type_name,
                        })
                    }
                };
                labels.push((table.columns[i].clone(), text));
            }
            if !seen.insert(labels.clone()) {
                let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
                return Err(GaugeError::Duplicate {
                    gauge: gauge(),
                    labels: shown.join(", "),
                });
            }
            rows.push((labels, v));
        }
        Ok((rows, skipped))
    }
}

/// Why `name` cannot be a Prometheus label of a gauge, if it cannot.
fn label_problem(name: &str) -> Option<&'static str> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        Some("is not a valid Prometheus label name (letters, digits and _, not starting with a digit)")
    } else if name.starts_with("__") {
        Some("starts with __, which Prometheus reserves for itself")
    } else if RESERVED_LABELS.contains(&name) {
        Some("is a reserved label name (database, gauge, job and instance are set by dbkeeper or Prometheus)")
    } else {
        None
    }
}

/// The `<database>.table-stats` job.
#[derive(Debug)]
pub struct TableStatsJob {
    /// At most this many tables get series, the largest first.
    pub max_tables: usize,
}

impl TableStatsJob {
    pub async fn run(&self, job: &str, db: &Database) -> Result<Outcome, GaugeError> {
        let (tables, total) = with_backend!(db, b => b.table_stats(self.max_tables).await)?;
        metrics::table_stats(job, db.name(), &tables);
        let bytes: f64 = tables.iter().map(|t| t.bytes).sum();
        let mut summary = format!("{} tables, {bytes} bytes", tables.len());
        if total > tables.len() {
            summary.push_str(&format!(
                " ({} smaller tables left out by table-stats-max-tables)",
                total - tables.len()
            ));
        }
        Ok(Outcome {
            summary,
            details: serde_json::json!({ "tables": tables.len(), "total_tables": total }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(max: usize) -> GaugeJob {
        let text = format!(
            "name = \"g\"\nquery = \"SELECT 1\"\nschedule = \"@hourly\"\nmax-series = {max}\n"
        );
        GaugeJob {
            cfg: toml::from_str(&text).unwrap(),
        }
    }

    fn table(columns: &[&str], numeric: &[bool], rows: Vec<Vec<Cell>>) -> Table {
        Table {
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            numeric: numeric.to_vec(),
            rows,
        }
    }

    #[test]
    fn the_first_numeric_column_is_the_value_and_nulls_are_handled() {
        let t = table(
            &["status", "n", "shard"],
            &[false, true, true],
            vec![
                vec![Cell::Text("open".into()), Cell::Int(3), Cell::Int(1)],
                vec![Cell::Null, Cell::Float(2.5), Cell::Null],
                vec![Cell::Text("gone".into()), Cell::Null, Cell::Int(2)],
            ],
        );
        let (rows, skipped) = job(10).series(t).unwrap();
        assert_eq!(skipped, 1);
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        assert_eq!(
            rows,
            vec![
                (vec![pair("status", "open"), pair("shard", "1")], 3.0),
                (vec![pair("status", ""), pair("shard", "")], 2.5),
            ]
        );
    }

    #[test]
    fn bad_labels_caps_and_duplicates_are_refused() {
        for name in [
            "job", "gauge", "database", "instance", "__x", "1a", "a-b", "",
        ] {
            let row = vec![Cell::Text("a".into()), Cell::Int(1)];
            let t = table(&[name, "n"], &[false, true], vec![row]);
            let err = job(10).series(t).unwrap_err();
            assert!(matches!(err, GaugeError::BadLabel { .. }), "{name}: {err}");
            assert!(err.to_string().contains("rename it"), "{err}");
        }
        let t = table(&["s"], &[false], vec![vec![Cell::Text("a".into())]]);
        assert!(matches!(job(10).series(t), Err(GaugeError::NoValue { .. })));
        // No rows: no series, whatever the columns.
        let t = table(&["job"], &[false], vec![]);
        assert_eq!(job(10).series(t).unwrap(), (Vec::new(), 0));
        let row = || vec![Cell::Text("a".into()), Cell::Int(1)];
        let t = table(&["s", "n"], &[false, true], vec![row(), row()]);
        let err = job(10).series(t).unwrap_err();
        assert!(matches!(err, GaugeError::Duplicate { .. }), "{err}");
        let t = table(
            &["n"],
            &[true],
            vec![vec![Cell::Int(1)], vec![Cell::Int(2)]],
        );
        let err = job(1).series(t).unwrap_err();
        assert!(err.to_string().contains("more than 1 rows"), "{err}");
        assert!(!err.is_transient());
        let t = table(
            &["s", "n"],
            &[false, true],
            vec![vec![Cell::Other("JSONB".into()), Cell::Int(1)]],
        );
        let err = job(10).series(t).unwrap_err();
        assert!(err.to_string().contains("s::text"), "{err}");
    }
}

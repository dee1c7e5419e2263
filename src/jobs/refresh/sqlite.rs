//! SQLite has no materialized views: a table holds the query's result and is rebuilt
//! in one `BEGIN IMMEDIATE` transaction, so readers in other processes see the old or
//! the new rows, never an empty or half-built table.
//!
//! A refresh replaces only a table it created itself. The table's own `CREATE TABLE`
//! text carries the marker comment `/* dbkeeper:refresh */`, which SQLite keeps
//! verbatim in `sqlite_schema.sql`. The marker travels with the database file (backups,
//! copies) and lives and dies with the table: a separate marker table could outlive a
//! dropped table and then claim an application's new table of the same name.

use std::time::Duration;

use sqlx::{AssertSqlSafe, SqliteConnection};
use tokio_util::sync::CancellationToken;

use super::{RefreshBackend, RefreshError, Refreshed};
use crate::config::RefreshConfig;
use crate::db::{quote, QualifiedName, Sqlite};

/// Written between the table's name and its column list.
const MARKER: &str = "/* dbkeeper:refresh */";

/// Where the query's result columns are read from (on our own connection; dropped
/// again in the same transaction).
const PROBE: &str = "_dbkeeper_refresh_columns";

/// The table a rebuild with new columns fills before it takes the old one's place.
const STAGING: &str = "_dbkeeper_refresh_new";

/// Where the same-columns path keeps the query's result while it empties the table
/// (on our own connection; dropped again in the same transaction).
const STAGE: &str = "_dbkeeper_refresh_stage";

/// A result or table column: name and declared type, in order.
type Columns = Vec<(String, String)>;

/// What the database holds under the refresh table's name.
enum Target {
    Missing,
    /// A table dbkeeper created, with its columns.
    Owned(Columns),
    /// Something else: an application's table (or a view or index); its kind.
    Foreign(String),
    /// Missing or dbkeeper's, but other tables' foreign keys point at it (their names):
    /// the refresh's `DELETE`/`DROP` would cascade into them, or orphan their rows.
    Referenced(Vec<String>),
}

impl RefreshBackend for Sqlite {
    /// Refuses (without touching anything) when the name belongs to something dbkeeper
    /// did not create.
    ///
    /// The table must be missing (it is created on the first run) or one dbkeeper
    /// created.
    async fn check(&self, view: &QualifiedName) -> Result<(), RefreshError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| RefreshError::Db(self.connect_error(e)))?;
        match inspect(&mut conn, view)
            .await
            .map_err(|e| RefreshError::Db(self.query_error(e)))?
        {
            Target::Foreign(kind) => Err(not_owned(self, view, kind)),
            Target::Referenced(names) => Err(referenced(self, view, names)),
            Target::Missing | Target::Owned(_) => Ok(()),
        }
    }

    /// Rebuilds the table from `query`. SQLite statements cannot be interrupted
    /// (without `unsafe`), so `_cancel` is not asked: the transaction is short and
    /// ends by itself.
    async fn refresh(
        &self,
        view: &QualifiedName,
        cfg: &RefreshConfig,
        _cancel: &CancellationToken,
    ) -> Result<Refreshed, RefreshError> {
        let query = cfg.query.as_deref().unwrap_or_default();
        rebuild(self, view, query, cfg.lock_timeout).await
    }
}

/// Replaces the table's rows with the query's result (creating the table, or building
/// it anew when the query's columns changed).
async fn rebuild(
    lite: &Sqlite,
    table: &QualifiedName,
    query: &str,
    lock_timeout: Duration,
) -> Result<Refreshed, RefreshError> {
    let db = |e: sqlx::Error| RefreshError::Db(lite.query_error(e));
    let mut conn = lite.begin_immediate(lock_timeout).await?;
    let steps = async {
        let target = inspect(&mut conn, table).await.map_err(db)?;
        let columns = query_columns(&mut conn, query).await.map_err(db)?;
        match target {
            Target::Foreign(kind) => Err(not_owned(lite, table, kind)),
            Target::Referenced(names) => Err(referenced(lite, table, names)),
            Target::Missing => {
                create(&mut conn, table, &columns).await.map_err(db)?;
                let rows = insert(&mut conn, table, &columns, query)
                    .await
                    .map_err(db)?;
                Ok(Refreshed {
                    rows,
                    how: "created",
                    dropped: Vec::new(),
                })
            }
            // Same columns: the table and its indexes stay, only the rows change.
            Target::Owned(old) if old == columns => {
                let rows = refill(&mut conn, table, &columns, query)
                    .await
                    .map_err(db)?;
                Ok(Refreshed {
                    rows,
                    how: "rebuilt",
                    dropped: Vec::new(),
                })
            }
            Target::Owned(_) => replace(lite, &mut conn, table, &columns, query).await,
        }
    }
    .await;
    lite.finish(conn, steps).await
}

fn not_owned(lite: &Sqlite, table: &QualifiedName, kind: String) -> RefreshError {
    RefreshError::NotOwned {
        database: lite.name.clone(),
        table: table.to_string(),
        kind,
    }
}

fn referenced(lite: &Sqlite, table: &QualifiedName, names: Vec<String>) -> RefreshError {
    RefreshError::Referenced {
        database: lite.name.clone(),
        table: table.to_string(),
        referencing: names.join(", "),
    }
}

/// `"schema".sqlite_schema` for the table's schema (`main` when unqualified).
fn schema_table(table: &QualifiedName) -> String {
    format!(
        "{}.sqlite_schema",
        quote(table.schema.as_deref().unwrap_or("main"))
    )
}

async fn inspect(
    conn: &mut SqliteConnection,
    table: &QualifiedName,
) -> Result<Target, sqlx::Error> {
    // Tables, views and indexes share one namespace, case-insensitively.
    let found: Option<(String, String, Option<String>)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT type, name, sql FROM {} WHERE name = ?1 COLLATE NOCASE AND type <> 'trigger'",
        schema_table(table)
    )))
    .bind(&table.name)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((kind, name, sql)) = &found {
        if kind != "table" || !sql.as_deref().is_some_and(|sql| has_marker(sql, name)) {
            return Ok(Target::Foreign(kind.clone()));
        }
    }
    // Whether or not the database enforces foreign keys: enforced, the `DELETE` cascades
    // into (or is refused by) the referencing rows; not enforced, they are orphaned.
    let referencing = referencing_tables(conn, table).await?;
    if !referencing.is_empty() {
        return Ok(Target::Referenced(referencing));
    }
    let Some((_, name, _)) = found else {
        return Ok(Target::Missing);
    };
    let columns = sqlx::query_as("SELECT name, type FROM pragma_table_info(?1, ?2) ORDER BY cid")
        .bind(&name)
        .bind(table.schema.as_deref().unwrap_or("main"))
        .fetch_all(&mut *conn)
        .await?;
    Ok(Target::Owned(columns))
}

/// Tables with a foreign key pointing at `table` (a foreign key can only point into its
/// own schema; a table not created yet can be referenced already).
async fn referencing_tables(
    conn: &mut SqliteConnection,
    table: &QualifiedName,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT DISTINCT s.name FROM {} AS s, pragma_foreign_key_list(s.name, ?2) AS f \
         WHERE s.type = 'table' AND f.\"table\" = ?1 COLLATE NOCASE ORDER BY s.name",
        schema_table(table)
    )))
    .bind(&table.name)
    .bind(table.schema.as_deref().unwrap_or("main"))
    .fetch_all(&mut *conn)
    .await
}

/// True if `sql` (from `sqlite_schema`) is `CREATE TABLE "<name>" /* dbkeeper:refresh */ …`,
/// as [`create`] writes it and `ALTER TABLE … RENAME` keeps it. Only the text right
/// after the name counts, so a marker inside a name, a default or a comment elsewhere
/// does not.
fn has_marker(sql: &str, name: &str) -> bool {
    sql.strip_prefix("CREATE TABLE ")
        .and_then(|rest| rest.strip_prefix(quote(name).as_str()))
        .is_some_and(|rest| rest.trim_start().starts_with(MARKER))
}

/// The query's result columns with the declared types `CREATE TABLE … AS` would give
/// them (SQLite derives both, including names made unique, so ask it). `LIMIT 0`
/// makes SQLite stop before reading a row.
async fn query_columns(conn: &mut SqliteConnection, query: &str) -> Result<Columns, sqlx::Error> {
    // `query` is the operator's own SQL from the config, run as written on purpose.
    execute(
        conn,
        format!(
            "CREATE TEMP TABLE {} AS SELECT * FROM ({query}) LIMIT 0",
            quote(PROBE)
        ),
    )
    .await?;
    let columns =
        sqlx::query_as("SELECT name, type FROM pragma_table_info(?1, 'temp') ORDER BY cid")
            .bind(PROBE)
            .fetch_all(&mut *conn)
            .await?;
    execute(conn, format!("DROP TABLE temp.{}", quote(PROBE))).await?;
    Ok(columns)
}

/// `CREATE TABLE "t" /* dbkeeper:refresh */ ("a" INT, "b" TEXT)`. The types are the
/// affinity names SQLite itself wrote for the probe (`INT`, `TEXT`, `NUM`, `REAL` or
/// none), never text from the config.
async fn create(
    conn: &mut SqliteConnection,
    table: &QualifiedName,
    columns: &Columns,
) -> Result<(), sqlx::Error> {
    let definitions: Vec<String> = columns
        .iter()
        .map(|(name, decl)| format!("{} {decl}", quote(name)).trim_end().to_owned())
        .collect();
    execute(
        conn,
        format!(
            "CREATE TABLE {} {MARKER} ({})",
            table.quoted(),
            definitions.join(", ")
        ),
    )
    .await
}

/// Inserts the query's rows, naming the columns: each value lands under the name
/// the query gave it.
async fn insert(
    conn: &mut SqliteConnection,
    table: &QualifiedName,
    columns: &Columns,
    query: &str,
) -> Result<u64, sqlx::Error> {
    let names: Vec<String> = columns.iter().map(|(name, _)| quote(name)).collect();
    let done = sqlx::raw_sql(AssertSqlSafe(format!(
        "INSERT INTO {} ({}) SELECT * FROM ({query})",
        table.quoted(),
        names.join(", ")
    )))
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Replaces the rows in place. The query's result is computed into a TEMP stage
/// first: a query that reads the table itself must see its old rows, not the empty
/// table the `DELETE` leaves (as the rebuild with new columns does).
async fn refill(
    conn: &mut SqliteConnection,
    table: &QualifiedName,
    columns: &Columns,
    query: &str,
) -> Result<u64, sqlx::Error> {
    let stage = format!("temp.{}", quote(STAGE));
    execute(
        conn,
        format!(
            "CREATE TEMP TABLE {} AS SELECT * FROM ({query})",
            quote(STAGE)
        ),
    )
    .await?;
    execute(conn, format!("DELETE FROM {}", table.quoted())).await?;
    let rows = insert(conn, table, columns, &format!("SELECT * FROM {stage}")).await?;
    execute(conn, format!("DROP TABLE {stage}")).await?;
    Ok(rows)
}

/// The query's columns changed: a new table with the marker is filled, the old one
/// dropped and the new one renamed into its place, all inside the caller's
/// transaction. The old table's indexes are created again where their columns still
/// exist (the others are reported); one that fails for another reason (a UNIQUE index
/// the new rows violate) fails the rebuild, which rolls back. Triggers are never
/// created again: SQLite does not check a trigger body's columns when it is created, so
/// one using a dropped column would come back and break every later refresh.
async fn replace(
    lite: &Sqlite,
    conn: &mut SqliteConnection,
    table: &QualifiedName,
    columns: &Columns,
    query: &str,
) -> Result<Refreshed, RefreshError> {
    let db = |e: sqlx::Error| RefreshError::Db(lite.query_error(e));
    let staging = QualifiedName {
        schema: table.schema.clone(),
        name: STAGING.to_owned(),
    };
    create(conn, &staging, columns).await.map_err(db)?;
    let rows = insert(conn, &staging, columns, query).await.map_err(db)?;
    let dependents: Vec<(String, String, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT type, name, sql FROM {} WHERE tbl_name = ?1 COLLATE NOCASE \
         AND type IN ('index', 'trigger') AND sql IS NOT NULL ORDER BY type, name",
        schema_table(table)
    )))
    .bind(&table.name)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    execute(conn, format!("DROP TABLE {}", table.quoted()))
        .await
        .map_err(db)?;
    // Since SQLite 3.26 a rename re-checks every view, and a view over the table just
    // dropped fails that check; the legacy rename does not look at views (none names
    // the staging table anyway). This connection is closed afterwards.
    execute(conn, "PRAGMA legacy_alter_table = ON".to_owned())
        .await
        .map_err(db)?;
    execute(
        conn,
        format!(
            "ALTER TABLE {} RENAME TO {}",
            staging.quoted(),
            quote(&table.name)
        ),
    )
    .await
    .map_err(db)?;
    let mut dropped = Vec::new();
    for (kind, name, sql) in dependents {
        if kind == "trigger" {
            tracing::warn!(table = %table, "trigger {name} was dropped with the old columns and is not created again; create it anew if it still applies");
            dropped.push(format!("trigger {name}"));
            continue;
        }
        // In a savepoint, so an index that no longer applies leaves no trace.
        execute(conn, "SAVEPOINT dbkeeper_dependent".to_owned())
            .await
            .map_err(db)?;
        match sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *conn).await {
            Ok(_) => execute(conn, "RELEASE dbkeeper_dependent".to_owned())
                .await
                .map_err(db)?,
            Err(e) if is_missing_column(&e) => {
                execute(
                    conn,
                    "ROLLBACK TO dbkeeper_dependent; RELEASE dbkeeper_dependent".to_owned(),
                )
                .await
                .map_err(db)?;
                tracing::warn!(
                    table = %table,
                    "{kind} {name} no longer applies to the new columns and was dropped: {e}"
                );
                dropped.push(format!("{kind} {name}"));
            }
            Err(e) => {
                return Err(RefreshError::IndexFails {
                    database: lite.name.clone(),
                    table: table.to_string(),
                    index: name,
                    source: e,
                })
            }
        }
    }
    Ok(Refreshed {
        rows,
        how: "rebuilt with new columns",
        dropped,
    })
}

/// SQLite's error for an index over a column the new table does not have.
fn is_missing_column(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.message().starts_with("no such column"))
}

async fn execute(conn: &mut SqliteConnection, sql: String) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(conn)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::has_marker;

    #[test]
    fn only_the_marker_right_after_the_name_counts() {
        assert!(has_marker(
            "CREATE TABLE \"t\" /* dbkeeper:refresh */ (\"a\" INT)",
            "t"
        ));
        assert!(has_marker(
            "CREATE TABLE \"a\"\"b\" /* dbkeeper:refresh */ (x)",
            "a\"b"
        ));
        assert!(
            !has_marker("CREATE TABLE \"t\"(\"a\" INT)", "t"),
            "no marker"
        );
        assert!(
            !has_marker(
                "CREATE TABLE t (a TEXT DEFAULT '/* dbkeeper:refresh */')",
                "t"
            ),
            "marker text elsewhere"
        );
        assert!(
            !has_marker(
                "CREATE TABLE \"x /* dbkeeper:refresh */\" (a)",
                "x /* dbkeeper:refresh */"
            ),
            "marker inside the name"
        );
    }
}

//! Does a database that pg_restore says it restored hold what the dump lists?
//!
//! pg_restore's exit status is its word, or a wrapper's: `pg_restore … | tee log`
//! exits with tee's status, a wrapper may skip a section or not run pg_restore at
//! all. The dump itself was read whole and checked complete on the way in
//! ([`crate::repo::archive::pgdump`]), which also gathered its [`Contents`]; after
//! every section has been restored, the database is held against that list with a
//! few queries on one connection:
//!
//! - every table and index the table of contents creates exists (`to_regclass` of its
//!   quoted, schema-qualified name, all in one query);
//! - every table whose data block held bytes has a row (`EXISTS (SELECT 1 FROM ONLY
//!   …)`, a hundred tables per statement: a page read each, whatever the table's
//!   size);
//! - there are at least as many primary key, unique, exclusion and foreign key
//!   constraints as the dump has `CONSTRAINT` and `FK CONSTRAINT` entries (more is
//!   fine: partitions get copies, extensions bring their own).
//!
//! Row-level security would hide rows from a role that does not bypass it, so the
//! session sets `row_security = off`, with which PostgreSQL raises an error instead of
//! filtering: then, as with any other query failure, the database cannot be checked,
//! which fails the restore like a mismatch ([`BackupError::Unrestored`]), never
//! passes.

use std::collections::HashSet;

use sqlx::{AssertSqlSafe, Connection, PgConnection};

use super::BackupError;
use crate::db::Postgres;
use crate::ident::quote;
use crate::repo::archive::pgdump::{Contents, RelKind, Relation};

/// How many tables one row check statement looks at.
const ROWS_BATCH: usize = 100;
/// How many missing objects a message names.
const NAMED_MAX: usize = 5;

/// Checks database `database` on `pg`'s server against `contents`: a mismatch, or a
/// check that cannot run, is [`BackupError::Unrestored`].
pub async fn check_restored(
    pg: &Postgres,
    database: &str,
    contents: &Contents,
) -> Result<(), BackupError> {
    let cannot = |e: &dyn std::fmt::Display| {
        let e = e.to_string();
        let hint = if e.contains("row-level security") {
            "; a role that restores tables with forced row-level security needs BYPASSRLS \
             (or to be a superuser)"
        } else {
            ""
        };
        BackupError::Unrestored(format!(
            "pg_restore reported success, but the restored database cannot be checked against \
             the dump ({e}){hint}"
        ))
    };
    let mut conn = pg.connect_to(database).await.map_err(|e| cannot(&e))?;
    let found = compare(&mut conn, contents).await.map_err(|e| cannot(&e));
    let _ = conn.close().await;
    let gaps = found?;
    if gaps.is_empty() {
        return Ok(());
    }
    Err(BackupError::Unrestored(gaps.to_string()))
}

/// What the restored database lacks.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Gaps {
    pub missing: Vec<String>,
    pub empty: Vec<String>,
    /// (found, expected) when fewer constraints were found.
    pub constraints: Option<(i64, u64)>,
}

impl Gaps {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.empty.is_empty() && self.constraints.is_none()
    }
}

impl std::fmt::Display for Gaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("missing {}", named(&self.missing)));
        }
        if !self.empty.is_empty() {
            parts.push(format!(
                "without the rows the dump holds: {}",
                named(&self.empty)
            ));
        }
        if let Some((found, expected)) = self.constraints {
            parts.push(format!(
                "{found} of the dump's {expected} key, unique and foreign key constraints"
            ));
        }
        write!(
            f,
            "pg_restore reported success, but the database does not hold the dump ({}): check \
             the pg-restore program (a wrapper that hides pg_restore's errors or skips part of \
             its work?)",
            parts.join("; ")
        )
    }
}

/// The first few of `names`, and how many more.
fn named(names: &[String]) -> String {
    let mut shown: Vec<&str> = names.iter().take(NAMED_MAX).map(String::as_str).collect();
    let more;
    if names.len() > NAMED_MAX {
        more = format!("{} more", names.len() - NAMED_MAX);
        shown.push(&more);
    }
    shown.join(", ")
}

/// `schema.name` as a person reads it: quoted only where it has to be.
fn display(r: &Relation) -> String {
    let part = |s: &str| {
        let plain = s
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if plain {
            s.to_owned()
        } else {
            quote(s)
        }
    };
    let kind = match r.kind {
        RelKind::Table => "table",
        RelKind::Index => "index",
    };
    format!("{kind} {}.{}", part(&r.schema), part(&r.name))
}

async fn compare(conn: &mut PgConnection, contents: &Contents) -> Result<Gaps, sqlx::Error> {
    // Rows hidden by a policy would look like rows that are not there: with this off,
    // PostgreSQL refuses the query instead (for a role that does not bypass RLS).
    sqlx::raw_sql("SET row_security = off")
        .execute(&mut *conn)
        .await?;
    let mut gaps = Gaps::default();

    // A table appears as itself and as its data: look each name up once.
    let mut seen = HashSet::new();
    let unique: Vec<&Relation> = contents
        .relations
        .iter()
        .filter(|r| seen.insert((r.kind, r.schema.as_str(), r.name.as_str())))
        .collect();
    let schemas: Vec<&str> = unique.iter().map(|r| r.schema.as_str()).collect();
    let names: Vec<&str> = unique.iter().map(|r| r.name.as_str()).collect();
    let exists: Vec<bool> = sqlx::query_scalar(
        "SELECT to_regclass(quote_ident(s) || '.' || quote_ident(n)) IS NOT NULL
         FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(s, n, i) ORDER BY i",
    )
    .bind(&schemas)
    .bind(&names)
    .fetch_all(&mut *conn)
    .await?;
    let mut absent = HashSet::new();
    for (r, found) in unique.iter().zip(exists) {
        if !found {
            absent.insert((r.schema.as_str(), r.name.as_str()));
            gaps.missing.push(display(r));
        }
    }

    if contents.rows_known {
        let with_rows: Vec<&Relation> = contents
            .relations
            .iter()
            .filter(|r| r.rows && !absent.contains(&(r.schema.as_str(), r.name.as_str())))
            .collect();
        for batch in with_rows.chunks(ROWS_BATCH) {
            let values: Vec<String> = batch
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    format!(
                        "({i}, EXISTS (SELECT 1 FROM ONLY {}.{} LIMIT 1))",
                        quote(&r.schema),
                        quote(&r.name)
                    )
                })
                .collect();
            let sql = format!(
                "SELECT i FROM (VALUES {}) AS c(i, found) WHERE NOT found ORDER BY i",
                values.join(", ")
            );
            let empty: Vec<i32> = sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_all(&mut *conn)
                .await?;
            for i in empty {
                if let Some(r) = usize::try_from(i).ok().and_then(|i| batch.get(i)) {
                    gaps.empty.push(display(r));
                }
            }
        }
    }

    if contents.constraints > 0 {
        let found: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
             WHERE c.contype IN ('p', 'u', 'x', 'f')
               AND n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'",
        )
        .fetch_one(&mut *conn)
        .await?;
        if u64::try_from(found).unwrap_or(0) < contents.constraints {
            gaps.constraints = Some((found, contents.constraints));
        }
    }
    Ok(gaps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Database;
    use crate::testing::psql;

    fn server_as(role: &str) -> Postgres {
        let url = format!("postgres://{role}@127.0.0.1:5432/postgres");
        match Database::open(&crate::repo::restore::target_config(&url)) {
            Ok(Database::Postgres(pg)) => pg,
            _ => panic!("cannot open {url}"),
        }
    }

    #[tokio::test]
    async fn rows_hidden_by_row_level_security_cannot_be_checked_and_never_pass() {
        let tag = format!("dbk_pgcheck_rls_{}", std::process::id());
        psql("postgres", &format!("DROP DATABASE IF EXISTS {tag}"));
        psql("postgres", &format!("DROP ROLE IF EXISTS {tag}"));
        psql("postgres", &format!("CREATE ROLE {tag} LOGIN"));
        psql("postgres", &format!("CREATE DATABASE {tag}"));
        psql(
            &tag,
            &format!(
                "CREATE TABLE t (x int); INSERT INTO t VALUES (1); CREATE TABLE e (x int);
                 ALTER TABLE t OWNER TO {tag}; ALTER TABLE e OWNER TO {tag};
                 ALTER TABLE t ENABLE ROW LEVEL SECURITY; ALTER TABLE t FORCE ROW LEVEL SECURITY;
                 CREATE POLICY nothing ON t USING (false);"
            ),
        );
        let with_rows = |name: &str| Relation {
            rows: true,
            ..rel(RelKind::Table, "public", name)
        };
        let contents = Contents {
            relations: vec![with_rows("t")],
            constraints: 0,
            rows_known: true,
        };
        // A superuser bypasses row-level security: the row is there.
        let admin = server_as("postgres");
        check_restored(&admin, &tag, &contents).await.unwrap();
        // The owner, made subject to its policy, would see no row: not a pass, and
        // not a verdict either.
        let owner = server_as(&tag);
        let e = check_restored(&owner, &tag, &contents).await.unwrap_err();
        assert!(
            matches!(&e, BackupError::Unrestored(m) if m.contains("cannot be checked")
                && m.contains("BYPASSRLS")),
            "{e}"
        );
        // An empty table that should have rows, and a table that is not there.
        let wrong = Contents {
            relations: vec![with_rows("e"), with_rows("gone")],
            constraints: 1,
            rows_known: true,
        };
        let e = check_restored(&admin, &tag, &wrong).await.unwrap_err();
        let BackupError::Unrestored(m) = &e else {
            panic!("{e}")
        };
        assert!(m.contains("missing table public.gone"), "{m}");
        assert!(
            m.contains("without the rows the dump holds: table public.e"),
            "{m}"
        );
        assert!(m.contains("0 of the dump's 1"), "{m}");
        admin.pool.close().await;
        owner.pool.close().await;
        psql("postgres", &format!("DROP DATABASE {tag} WITH (FORCE)"));
        psql("postgres", &format!("DROP ROLE {tag}"));
    }

    fn rel(kind: RelKind, schema: &str, name: &str) -> Relation {
        Relation {
            kind,
            schema: schema.into(),
            name: name.into(),
            rows: false,
        }
    }

    #[test]
    fn messages_name_a_few_and_quote_only_what_needs_it() {
        assert_eq!(
            display(&rel(RelKind::Table, "public", "t_1")),
            "table public.t_1"
        );
        assert_eq!(
            display(&rel(RelKind::Index, "My Schema", "a\"b")),
            "index \"My Schema\".\"a\"\"b\""
        );
        let names: Vec<String> = (0..7).map(|i| format!("t{i}")).collect();
        assert_eq!(named(&names), "t0, t1, t2, t3, t4, 2 more");
        let gaps = Gaps {
            missing: vec!["table public.a".into()],
            empty: vec![],
            constraints: Some((0, 2)),
        };
        let text = gaps.to_string();
        assert!(text.contains("pg_restore reported success"), "{text}");
        assert!(text.contains("missing table public.a"), "{text}");
        assert!(text.contains("0 of the dump's 2"), "{text}");
        assert!(text.contains("pg-restore program"), "{text}");
    }
}

//! dbkeeper's own schema in the coordination database (`dbkeeper`), created and
//! migrated by every replica at start.
//!
//! The DDL runs in one transaction under a transaction-level advisory lock, so three
//! replicas starting at the same instant do not trip over each other
//! (`CREATE … IF NOT EXISTS` alone is not safe against concurrent creators: both may
//! pass the check and one then fails on the catalog's unique index). Steps are
//! numbered; `dbkeeper.schema_version` holds the last applied one, so later versions
//! of dbkeeper add steps and never edit old ones.

use sqlx::{PgPool, Row};

use super::ClusterError;

/// Key of the advisory lock around the DDL (an arbitrary constant: "dbkeeper" in ASCII,
/// shortened).
const DDL_LOCK: i64 = 0x6462_6b65_6570_6572;

/// The migration steps, in order; step `n` is `STEPS[n - 1]`.
const STEPS: &[&str] = &[r#"
CREATE TABLE dbkeeper.members (
    cluster     text        NOT NULL,
    replica     text        NOT NULL,
    host        text        NOT NULL,
    pid         integer     NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cluster, replica)
);
CREATE TABLE dbkeeper.claims (
    cluster     text        NOT NULL,
    job         text        NOT NULL,
    fire_at     timestamptz NOT NULL,
    trigger     text        NOT NULL,
    replica     text        NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz NOT NULL,
    attempt     integer     NOT NULL DEFAULT 1,
    renewals    integer     NOT NULL DEFAULT 0,
    finished_at timestamptz,
    result      text,
    message     text,
    PRIMARY KEY (cluster, job, fire_at)
);
CREATE INDEX claims_open ON dbkeeper.claims (cluster, lease_until) WHERE finished_at IS NULL;
CREATE INDEX claims_by_job ON dbkeeper.claims (cluster, job, claimed_at);
CREATE TABLE dbkeeper.jobs_last (
    cluster      text        NOT NULL,
    job          text        NOT NULL,
    last_run     timestamptz,
    last_success timestamptz,
    last_failure timestamptz,
    last_result  text,
    last_replica text,
    PRIMARY KEY (cluster, job)
);
"#];

/// Creates the schema or brings it up to date.
pub async fn migrate(pool: &PgPool) -> Result<(), ClusterError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(DDL_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query("CREATE SCHEMA IF NOT EXISTS dbkeeper")
        .execute(&mut *tx)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS dbkeeper.schema_version (version integer NOT NULL)")
        .execute(&mut *tx)
        .await?;
    let current: i32 = sqlx::query("SELECT coalesce(max(version), 0) FROM dbkeeper.schema_version")
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
    let current = usize::try_from(current).unwrap_or(0);
    if current > STEPS.len() {
        return Err(ClusterError::SchemaTooNew {
            found: current,
            known: STEPS.len(),
        });
    }
    for (n, step) in STEPS.iter().enumerate().skip(current) {
        sqlx::raw_sql(*step).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO dbkeeper.schema_version (version) VALUES ($1)")
            .bind(i32::try_from(n + 1).unwrap_or(i32::MAX))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

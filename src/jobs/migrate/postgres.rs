//! Migrations on PostgreSQL: [`MigrationBackend`] for [`Postgres`].
//!
//! The lock is sqlx's advisory lock (same key, so dbkeeper and an application's sqlx
//! migrator exclude each other), but taken by polling `pg_try_advisory_lock`: a
//! waiting migrator then never sits in a long statement, which a concurrent
//! `CREATE INDEX CONCURRENTLY` in the lock holder would wait for — a deadlock with the
//! blocking `pg_advisory_lock`. The lock is session-level on a connection of our own
//! that is closed at the end, so it is released whatever happens.

use std::time::Duration;

use sqlx::migrate::Migration;
use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, Connection};
use tokio_util::sync::CancellationToken;

use super::{Applied, AppliedRow, MigrateError, MigrateJob, MigrationBackend};
use crate::db::{set_timeout, Postgres, Scope, Timeout};

/// sqlx's migration lock key for a database name.
fn lock_id(database_name: &str) -> i64 {
    const CRC_IEEE: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    0x3d32ad9e * i64::from(CRC_IEEE.checksum(database_name.as_bytes()))
}

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
    success BOOLEAN NOT NULL,
    checksum BYTEA NOT NULL,
    execution_time BIGINT NOT NULL
)";

fn db_err(pg: &Postgres) -> impl Fn(sqlx::Error) -> MigrateError + '_ {
    move |e| MigrateError::Db(pg.query_error(e))
}

/// The session the apply loop runs in: a connection of its own holding sqlx's
/// migration lock (`key`), closed when dropped, so the lock and any settings end with
/// it whatever happens.
pub(crate) struct Session {
    conn: PoolConnection<sqlx::Postgres>,
    key: i64,
    /// The session's server process, for cancel requests.
    pid: i32,
}

impl MigrationBackend for Postgres {
    type Session = Session;

    /// The history, or nothing if the table does not exist yet.
    async fn applied(&self) -> Result<Vec<Applied>, MigrateError> {
        if !self.has_migration_history().await? {
            return Ok(Vec::new());
        }
        let rows: Vec<AppliedRow> = sqlx::query_as(
            "SELECT version, description, success, checksum, installed_on::text FROM _sqlx_migrations ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_err(self))?;
        Ok(rows.into_iter().map(Applied::from).collect())
    }

    /// The process id of another session holding sqlx's migration lock on this database:
    /// a migrator at work, whose `-- no-transaction` migration's row says failed until it
    /// ends. Read from `pg_locks`, so looking never takes the lock from a migrator.
    async fn lock_holder(&self) -> Result<Option<i32>, MigrateError> {
        let database: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&self.pool)
            .await
            .map_err(db_err(self))?;
        // A bigint advisory key is stored as its high and low 32 bits, objsubid 1.
        sqlx::query_scalar(
            "SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
               AND d.datname = current_database() AND l.pid <> pg_backend_pid()
               AND l.classid = ($1 >> 32)::oid AND l.objid = ($1 & 4294967295)::oid
             LIMIT 1",
        )
        .bind(lock_id(&database))
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err(self))
    }

    async fn open(
        &self,
        job: &MigrateJob,
        cancel: &CancellationToken,
    ) -> Result<Session, MigrateError> {
        let pg = self;
        let mut conn = own_connection(pg).await?;
        let database: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&mut *conn)
            .await
            .map_err(db_err(pg))?;
        let key = lock_id(&database);
        lock(pg, &mut conn, key, job.cfg.lock_wait, cancel).await?;
        let pid = async {
            sqlx::raw_sql(CREATE_TABLE).execute(&mut *conn).await?;
            sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut *conn)
                .await
        }
        .await;
        match pid {
            Ok(pid) => Ok(Session { conn, key, pid }),
            Err(e) => {
                self.close(Session { conn, key, pid: 0 }).await;
                Err(db_err(pg)(e))
            }
        }
    }

    async fn close(&self, mut session: Session) {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(session.key)
            .execute(&mut *session.conn)
            .await;
    }

    async fn prepare(
        &self,
        session: &mut Session,
        job: &MigrateJob,
        m: &Migration,
    ) -> Result<(), MigrateError> {
        if !job.cfg.drop_invalid_indexes {
            return Ok(());
        }
        let conn = &mut session.conn;
        for index in invalid_indexes(self, conn, Some(m.sql.as_str())).await? {
            tracing::warn!(database = %self.name, index, "dropping an INVALID index left by an earlier failed attempt");
            // `index` comes from format('%I.%I'): already quoted.
            sqlx::raw_sql(AssertSqlSafe(format!("DROP INDEX IF EXISTS {index}")))
                .execute(&mut **conn)
                .await
                .map_err(db_err(self))?;
        }
        Ok(())
    }

    /// On cancel (shutdown, timeout) the server stops the statement; a transactional
    /// migration then rolls back as a whole.
    async fn apply(
        &self,
        session: &mut Session,
        job: &MigrateJob,
        m: &Migration,
        file: &str,
        cancel: &CancellationToken,
    ) -> Result<bool, MigrateError> {
        let pid = session.pid;
        let run = run_one(self, &mut session.conn, job, m, file);
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => r.map(|()| true),
            _ = cancel.cancelled() => {
                self.cancel_backend(pid).await;
                let _ = run.await;
                Err(MigrateError::Cancelled)
            }
        }
    }

    async fn record_time(&self, session: &mut Session, m: &Migration, nanos: i64) {
        let _ = sqlx::query(super::EXECUTION_TIME)
            .bind(nanos)
            .bind(m.version)
            .execute(&mut *session.conn)
            .await;
    }
}

/// Waits for the advisory lock `key` by polling, up to `wait`.
async fn lock(
    pg: &Postgres,
    conn: &mut PoolConnection<sqlx::Postgres>,
    key: i64,
    wait: Duration,
    cancel: &CancellationToken,
) -> Result<(), MigrateError> {
    let mut waiting = super::LockWait::new(&pg.name, wait);
    loop {
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut **conn)
            .await
            .map_err(db_err(pg))?;
        if got {
            return Ok(());
        }
        waiting.pause(cancel).await?;
    }
}

/// A connection of its own, closed when dropped, so that session locks and settings
/// end with it whatever happens.
async fn own_connection(pg: &Postgres) -> Result<PoolConnection<sqlx::Postgres>, MigrateError> {
    let mut conn = pg
        .pool
        .acquire()
        .await
        .map_err(|e| MigrateError::Db(pg.connect_error(e)))?;
    conn.close_on_drop();
    Ok(conn)
}

impl Postgres {
    /// Holds the command-migration lock ([`super::command::PG_LOCK_KEY`]) in a
    /// session of its own, waiting up to `lock-wait`; [`MigrationBackend::close`]
    /// releases it.
    pub(super) async fn command_lock(
        &self,
        job: &MigrateJob,
        cancel: &CancellationToken,
    ) -> Result<super::command::Locked<Session>, MigrateError> {
        let mut conn = own_connection(self).await?;
        // The server's idle_session_timeout would end this idle session, releasing
        // the lock while the command runs: off for it (PostgreSQL 14 and later; an
        // older server does not know the setting and has no such timeout).
        let _ = sqlx::raw_sql("SET idle_session_timeout = 0")
            .execute(&mut *conn)
            .await;
        let key = super::command::PG_LOCK_KEY;
        lock(self, &mut conn, key, job.cfg.lock_wait, cancel).await?;
        // The advisory lock is the server's, whatever URL led here; the identity
        // that finds a dead dbkeeper's command must not depend on the URL either.
        let place: String = sqlx::query_scalar(
            "SELECT 'postgres:' || (SELECT system_identifier FROM pg_control_system()) \
             || ':' || (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| MigrateError::Db(self.query_error(e)))?;
        Ok(super::command::Locked::new(
            Session { conn, key, pid: 0 },
            &place,
        ))
    }
}

/// How often the command-migration lock session is used while the command runs, to
/// keep it alive (NAT and firewall idle timeouts) and to notice when it is lost.
pub const KEEPALIVE: Duration = Duration::from_secs(2);

/// A command-migration lock session kept alive by a task while the command runs.
pub(super) struct Watched {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<Session, String>>,
}

impl Watched {
    /// Runs `SELECT 1` on `session` every [`KEEPALIVE`]; if that fails (the server
    /// ended the session, the connection broke), cancels `lost`.
    pub(super) fn start(mut session: Session, lost: CancellationToken) -> Self {
        let stop = CancellationToken::new();
        let until = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = until.cancelled() => return Ok(session),
                    _ = tokio::time::sleep(KEEPALIVE) => {}
                }
                let ping = sqlx::query("SELECT 1").execute(&mut *session.conn);
                let reason = match tokio::time::timeout(KEEPALIVE * 5, ping).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "the server did not answer for 10s".to_owned(),
                };
                lost.cancel();
                return Err(reason);
            }
        });
        Watched { stop, task }
    }

    /// Stops the keep-alive: the session back, or why it was lost.
    pub(super) async fn stop(self) -> Result<Session, String> {
        self.stop.cancel();
        self.task
            .await
            .unwrap_or_else(|e| Err(format!("the keep-alive task failed: {e}")))
    }
}

/// `SET lock_timeout`/`statement_timeout` statements for one migration (no
/// `statement-timeout`: none).
fn settings(job: &MigrateJob, scope: Scope) -> String {
    format!(
        "{}; {}",
        set_timeout(scope, Timeout::Lock, Some(job.cfg.lock_timeout)),
        set_timeout(scope, Timeout::Statement, job.cfg.statement_timeout)
    )
}

/// One migration and its history row: in one transaction, or (`-- no-transaction`)
/// marked failed first and applied once it ran through. Either way it fails if an
/// INVALID index named in it is left afterwards (see [`refuse_invalid_indexes`]).
async fn run_one(
    pg: &Postgres,
    conn: &mut PoolConnection<sqlx::Postgres>,
    job: &MigrateJob,
    m: &Migration,
    file: &str,
) -> Result<(), MigrateError> {
    let db = |e: sqlx::Error| MigrateError::Db(pg.query_error(e));
    if !m.no_tx {
        let result = async {
            let mut tx = conn.begin().await.map_err(db)?;
            sqlx::raw_sql(AssertSqlSafe(settings(job, Scope::Transaction)))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            // Reverts with the transaction: gone afterwards if the file's own COMMIT or
            // ROLLBACK ended it (a number, formatted here).
            sqlx::raw_sql(AssertSqlSafe(format!(
                "SET LOCAL dbkeeper.migration_tx = '{}'",
                m.version
            )))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            let ran = sqlx::raw_sql(m.sql.clone()).execute(&mut *tx).await;
            // Asked even after an error: statements after the file's COMMIT fail on
            // their own. In dbkeeper's transaction, failed or not, the answer is the
            // version (or an error: the transaction is aborted).
            let marker: Option<String> =
                sqlx::query_scalar("SELECT current_setting('dbkeeper.migration_tx', true)")
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap_or_else(|_| Some(m.version.to_string()));
            if marker != Some(m.version.to_string()) {
                // What ran before its COMMIT stays: recorded as failed, exactly like a
                // `-- no-transaction` migration that failed part-way.
                let _ = tx.rollback().await;
                super::history_row(m, false)
                    .execute(&mut **conn)
                    .await
                    .map_err(db)?;
                return Err(MigrateError::EndsOwnTransaction {
                    version: m.version,
                    file: file.to_owned(),
                    failed: ran.err().map(|e| Box::new(pg.query_error(e))),
                });
            }
            ran.map_err(db)?;
            refuse_invalid_indexes(pg, &mut tx, m).await?;
            super::history_row(m, true)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)
        }
        .await;
        return result.map_err(|e| super::failed_in_transaction(m, file, e));
    }
    // Written as failed before it runs: whether it fails part-way or the process or
    // connection dies meanwhile, the history says so, and neither dbkeeper nor sqlx's
    // migrator (which refuses a "dirty" version) applies anything after it until an
    // operator has looked. sqlx itself writes no row for a failed migration, and would
    // run a half-done one again.
    super::history_row(m, false)
        .execute(&mut **conn)
        .await
        .map_err(|e| super::failed(m, file, false, db(e)))?;
    let ran = async {
        sqlx::raw_sql(AssertSqlSafe(settings(job, Scope::Session)))
            .execute(&mut **conn)
            .await?;
        let ran = sqlx::raw_sql(m.sql.clone()).execute(&mut **conn).await;
        let _ = sqlx::raw_sql("RESET lock_timeout; RESET statement_timeout")
            .execute(&mut **conn)
            .await;
        ran
    }
    .await;
    if let Err(e) = ran {
        // All of them: a failed `CREATE INDEX CONCURRENTLY ON t (x)` names no index.
        let left = invalid_indexes(pg, conn, None).await.unwrap_or_default();
        let e = if left.is_empty() {
            MigrateError::Db(pg.query_error(e))
        } else {
            MigrateError::LeftInvalid {
                source: Box::new(pg.query_error(e)),
                indexes: left,
            }
        };
        return Err(super::failed(m, file, true, e));
    }
    let marked = async {
        refuse_invalid_indexes(pg, conn, m).await?;
        sqlx::query(super::MARK_APPLIED)
            .bind(m.version)
            .execute(&mut **conn)
            .await
            .map_err(db)
    }
    .await;
    let marked = marked.map_err(|e| super::failed(m, file, true, e))?;
    if marked.rows_affected() == 0 {
        // Written back as failed: it ran, but nothing may run it again unseen.
        let _ = super::history_row::<sqlx::Postgres>(m, false)
            .execute(&mut **conn)
            .await;
    }
    super::marked(m, file, marked.rows_affected())
}

/// Fails if an INVALID index named in the migration exists after it ran. PostgreSQL
/// skips `CREATE INDEX [CONCURRENTLY] IF NOT EXISTS` with a mere notice when an index
/// of that name exists, even an INVALID one left by an earlier failed attempt: the
/// migration would be recorded as applied while the index it promises is unusable.
async fn refuse_invalid_indexes(
    pg: &Postgres,
    conn: &mut sqlx::PgConnection,
    m: &Migration,
) -> Result<(), MigrateError> {
    let invalid = invalid_indexes(pg, conn, Some(m.sql.as_str())).await?;
    if invalid.is_empty() {
        Ok(())
    } else {
        Err(MigrateError::InvalidIndexes(invalid))
    }
}

/// INVALID indexes (left by a failed `CREATE INDEX CONCURRENTLY`), quoted; with `sql`,
/// only those it names (see [`names_index`]): an index of the same name in a schema the
/// migration could not have meant is neither blamed nor dropped.
async fn invalid_indexes(
    pg: &Postgres,
    conn: &mut sqlx::PgConnection,
    sql: Option<&str>,
) -> Result<Vec<String>, MigrateError> {
    // The search path of the connection the migration runs on decides where an
    // unqualified name lives.
    let rows: Vec<(String, String, String, bool)> = sqlx::query_as(
        "SELECT format('%I.%I', n.nspname, c.relname), n.nspname::text, c.relname::text,
                n.nspname = ANY (current_schemas(false))
         FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE NOT i.indisvalid ORDER BY 1",
    )
    .fetch_all(conn)
    .await
    .map_err(db_err(pg))?;
    Ok(rows
        .into_iter()
        .filter(|(_, schema, name, on_path)| {
            sql.is_none_or(|s| names_index(s, schema, name, *on_path))
        })
        .map(|(quoted, ..)| quoted)
        .collect())
}

/// True if `sql` names index `name` of `schema`: `name` occurs as a whole identifier
/// (ASCII case ignored, as PostgreSQL folds unquoted names; `t_x` is not named by
/// `t_x_unique`), either qualified as `schema.name` (quotes optional) or unqualified
/// while `schema` is on the search path (`on_path`).
fn names_index(sql: &str, schema: &str, name: &str, on_path: bool) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_' || c == '$';
    let ends_word = |text: &str| text.chars().next_back().is_some_and(ident);
    let sql = sql.to_ascii_lowercase();
    let (schema, name) = (schema.to_ascii_lowercase(), name.to_ascii_lowercase());
    sql.match_indices(&name).any(|(at, _)| {
        let before = &sql[..at];
        if ends_word(before) || sql[at + name.len()..].starts_with(ident) {
            return false;
        }
        let before = before.strip_suffix('"').unwrap_or(before).trim_end();
        match before.strip_suffix('.') {
            None => on_path,
            Some(qualifier) => qualifier
                .trim_end()
                .strip_suffix('"')
                .unwrap_or(qualifier)
                .strip_suffix(schema.as_str())
                .is_some_and(|rest| !ends_word(rest)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::names_index;

    fn mentions(sql: &str, name: &str) -> bool {
        names_index(sql, "public", name, true)
    }

    #[test]
    fn index_names_are_matched_as_whole_identifiers() {
        let sql = "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS t_x_unique ON t (x);\n\
                   CREATE INDEX \"Odd Name\" ON t (y);";
        assert!(mentions(sql, "t_x_unique"));
        assert!(mentions(sql, "T_X_UNIQUE"));
        assert!(mentions(sql, "Odd Name"));
        assert!(!mentions(sql, "t_x"), "a prefix of another name");
        assert!(!mentions(sql, "x_unique"), "a suffix of another name");
        assert!(!mentions(sql, "x_u"));
    }

    #[test]
    fn an_index_counts_only_in_the_schema_the_sql_can_mean() {
        let plain = "CREATE INDEX IF NOT EXISTS t_x ON t (x);";
        assert!(names_index(plain, "public", "t_x", true));
        assert!(
            !names_index(plain, "other", "t_x", false),
            "not on the path"
        );
        for qualified in [
            "CREATE INDEX IF NOT EXISTS app.t_x ON app.t (x);",
            "CREATE INDEX IF NOT EXISTS \"app\".\"t_x\" ON app.t (x);",
            "CREATE INDEX IF NOT EXISTS \"app\" . t_x ON app.t (x);",
        ] {
            assert!(names_index(qualified, "app", "t_x", false), "{qualified}");
            assert!(
                !names_index(qualified, "public", "t_x", true),
                "{qualified}"
            );
            assert!(
                !names_index(qualified, "myapp", "t_x", false),
                "{qualified}"
            );
        }
    }
}

//! SQLite databases, reached through a small sqlx pool.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, Executor};
use tokio_util::sync::CancellationToken;

use super::{redact_url, timeout_millis, Access, DbError};
use crate::config::DatabaseConfig;

/// How long a statement waits for another writer's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

fn create_requested(url: &str) -> bool {
    url.split_once('?')
        .is_some_and(|(_, query)| query.split('&').any(|kv| kv == "mode=rwc"))
}

/// `options` changed to read the file without creating anything, for commands that
/// only look (`check`, `jobs`, `history`). A read-only connection to a WAL-mode
/// database creates the `-wal` and `-shm` files it lacks and leaves them behind.
/// So unless both exist (a writer has the database open: the reader then takes its
/// read mark in that writer's `-shm` index, as every SQLite reader does), the file
/// is read as immutable, which creates and writes nothing. A `-wal` without `-shm`
/// is what a killed writer leaves: its last transactions are not seen until the
/// next writer recovers them. A writer starting during an immutable read appends
/// to its `-wal`, which the main file does not see until a checkpoint.
pub fn read_only_options(options: SqliteConnectOptions) -> SqliteConnectOptions {
    let path = options.get_filename().to_owned();
    let options = options.read_only(true).create_if_missing(false);
    let side = |suffix: &str| {
        let mut p = path.clone().into_os_string();
        p.push(suffix);
        Path::new(&p).exists()
    };
    if is_wal_mode(&path) && !(side("-wal") && side("-shm")) {
        options.immutable(true)
    } else {
        options
    }
}

/// Whether the database header says WAL mode (file format versions 2 at offsets
/// 18 and 19); unreadable or short files say no.
fn is_wal_mode(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| head[18] == 2 && head[19] == 2)
}

#[derive(Clone)]
pub struct Sqlite {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) pool: SqlitePool,
    /// `foreign-keys` from the config: whether connections enforce foreign keys.
    pub(crate) foreign_keys: bool,
    /// See [`Sqlite::not_created_yet`].
    not_created: Option<std::path::PathBuf>,
}

impl Sqlite {
    pub(super) fn open(cfg: &DatabaseConfig, access: Access) -> Result<Self, DbError> {
        let url = redact_url(&cfg.url);
        let mut options = SqliteConnectOptions::from_str(&cfg.url)
            .map_err(|source| DbError::Url {
                name: cfg.name.clone(),
                url: url.clone(),
                source,
            })?
            .busy_timeout(BUSY_TIMEOUT)
            // sqlx turns foreign keys on by default; SQLite (and so the application,
            // unless it says otherwise) has them off. Deleting with them on would
            // cascade into tables the operator never named.
            .foreign_keys(cfg.foreign_keys);
        let file = options.get_filename().to_owned();
        let mut not_created = None;
        if access == Access::ReadOnly && create_requested(&cfg.url) && !file.exists() {
            // What the first job will find is an empty database: look at one in
            // memory rather than create the file.
            options = options.filename(":memory:").in_memory(true);
            not_created = Some(file);
        } else if access == Access::ReadOnly {
            options = read_only_options(options);
        } else if create_requested(&cfg.url) {
            // `mode=rwc` asks for the file to be created; make its directory too, so a
            // fresh checkout's demo works. Failures surface when connecting.
            if let Some(dir) = options.get_filename().parent() {
                let _ = std::fs::create_dir_all(dir);
            }
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .min_connections(0)
            .acquire_timeout(cfg.connect_timeout)
            .idle_timeout(Some(Duration::from_secs(60)))
            .connect_lazy_with(options);
        Ok(Sqlite {
            name: cfg.name.clone(),
            url,
            pool,
            foreign_keys: cfg.foreign_keys,
            not_created,
        })
    }

    /// Opened read-only while its file did not exist yet but the URL asks for it to
    /// be created (`mode=rwc`): the file, and the pool is an empty in-memory
    /// database standing in for it. Not an outage, just nothing written so far.
    pub fn not_created_yet(&self) -> Option<std::path::PathBuf> {
        self.not_created.clone()
    }

    /// The same settings on another file (a scratch copy): a pool of its own,
    /// connecting lazily.
    pub fn on_file(&self, file: &std::path::Path) -> Sqlite {
        let options = (*self.pool.connect_options()).clone().filename(file);
        Sqlite {
            name: self.name.clone(),
            url: format!("sqlite://{}", file.display()),
            pool: SqlitePoolOptions::new()
                .max_connections(2)
                .min_connections(0)
                .connect_lazy_with(options),
            foreign_keys: self.foreign_keys,
            not_created: None,
        }
    }

    /// The database file, absolute (relative URLs are taken from the working
    /// directory, as SQLite does).
    pub fn path(&self) -> std::path::PathBuf {
        let file = self.pool.connect_options().get_filename().to_owned();
        std::path::absolute(&file).unwrap_or(file)
    }

    pub(crate) fn query_error(&self, source: sqlx::Error) -> DbError {
        DbError::Query {
            name: self.name.clone(),
            source,
        }
    }

    /// A connection of its own, closed when dropped (so its settings never reach the
    /// pool), that waits up to `busy` for other writers and enforces foreign keys or
    /// not as `foreign_keys` says.
    pub async fn own_connection(
        &self,
        busy: Duration,
        foreign_keys: bool,
    ) -> Result<PoolConnection<sqlx::Sqlite>, DbError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.connect_error(e))?;
        conn.close_on_drop();
        // A number we formatted ourselves. `foreign_keys` cannot change inside a
        // transaction, so it is set here, before any BEGIN.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "PRAGMA busy_timeout = {}; PRAGMA foreign_keys = {}",
            timeout_millis(busy),
            if foreign_keys { "ON" } else { "OFF" }
        )))
        .execute(&mut *conn)
        .await
        .map_err(|e| self.query_error(e))?;
        Ok(conn)
    }

    /// `BEGIN IMMEDIATE` on `conn`: the write lock is taken now, waiting up to the
    /// connection's busy timeout for other writers. End it with
    /// [`Sqlite::end_transaction`].
    pub async fn begin_immediate_on(
        &self,
        conn: &mut PoolConnection<sqlx::Sqlite>,
    ) -> Result<(), DbError> {
        sqlx::raw_sql("BEGIN IMMEDIATE")
            .execute(&mut **conn)
            .await
            .map_err(|e| self.query_error(e))?;
        Ok(())
    }

    /// A connection of its own (see [`Sqlite::own_connection`], with the configured
    /// foreign-key setting) inside `BEGIN IMMEDIATE`. End it with [`Sqlite::finish`].
    pub async fn begin_immediate(
        &self,
        busy: Duration,
    ) -> Result<PoolConnection<sqlx::Sqlite>, DbError> {
        let mut conn = self.own_connection(busy, self.foreign_keys).await?;
        self.begin_immediate_on(&mut conn).await?;
        Ok(conn)
    }

    /// Commits the transaction on `conn` if `result` is `Ok`, otherwise rolls it back,
    /// and returns `result`; the connection stays open.
    pub async fn end_transaction<T, E: From<DbError>>(
        &self,
        conn: &mut PoolConnection<sqlx::Sqlite>,
        result: Result<T, E>,
    ) -> Result<T, E> {
        match result {
            Ok(value) => {
                sqlx::raw_sql("COMMIT")
                    .execute(&mut **conn)
                    .await
                    .map_err(|e| E::from(self.query_error(e)))?;
                Ok(value)
            }
            Err(e) => {
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut **conn).await;
                Err(e)
            }
        }
    }

    /// Ends the transaction of [`Sqlite::begin_immediate`] (see
    /// [`Sqlite::end_transaction`]) and closes its connection.
    pub async fn finish<T, E: From<DbError>>(
        &self,
        mut conn: PoolConnection<sqlx::Sqlite>,
        result: Result<T, E>,
    ) -> Result<T, E> {
        self.end_transaction(&mut conn, result).await
    }

    pub async fn server_version(&self) -> Result<String, DbError> {
        sqlx::query_scalar("SELECT sqlite_version()")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.query_error(e))
    }

    /// Whether sqlx's history table `_sqlx_migrations` exists.
    pub async fn has_migration_history(&self) -> Result<bool, DbError> {
        sqlx::query_scalar(
            "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.query_error(e))
    }

    /// Writes a consistent copy of the database to `target` (which must not exist)
    /// with `VACUUM INTO`: one read transaction, so writers are not blocked in WAL
    /// mode, and the copy is compact.
    pub async fn vacuum_into(&self, target: &Path) -> Result<(), DbError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.connect_error(e))?;
        sqlx::query("VACUUM INTO ?")
            .bind(target.to_string_lossy().into_owned())
            .execute(&mut *conn)
            .await
            .map_err(|e| self.query_error(e))?;
        Ok(())
    }

    pub(crate) fn connect_error(&self, source: sqlx::Error) -> DbError {
        DbError::connect(&self.name, &self.url, source)
    }

    pub(super) async fn ping(&self) -> Result<(), DbError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.connect_error(e))?;
        // Opening succeeds on a file that is not a database; reading the schema does not.
        conn.execute("SELECT count(*) FROM sqlite_schema")
            .await
            .map_err(|e| self.connect_error(e))?;
        Ok(())
    }

    /// Runs the script. SQLite has no statement timeout (`_timeout` is the runner's
    /// business here) and cannot be interrupted without `unsafe`, so on `cancel` the
    /// connection is closed and the statement ends with the worker thread's current
    /// step (or with the process).
    pub(super) async fn execute_script(
        &self,
        sql: &str,
        _timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<u64, DbError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.connect_error(e))?;
        conn.close_on_drop();
        // The operator's own SQL from the config file, run as written on purpose.
        let script = sqlx::raw_sql(AssertSqlSafe(sql.to_owned()));
        tokio::select! {
            result = script.execute(&mut *conn) => Ok(result
                .map_err(|source| DbError::Query { name: self.name.clone(), source })?
                .rows_affected()),
            _ = cancel.cancelled() => Err(DbError::Cancelled { name: self.name.clone() }),
        }
    }
}

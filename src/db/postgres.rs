//! PostgreSQL databases, reached through a small sqlx pool.
//!
//! The password comes from `password-file` (re-read each time the pool is built, so a
//! rotated credential takes effect on reload) and never from the URL we log.
//!
//! Scratch databases (`<name>_dbk_(restore|old|verify|dryrun)_<8 hex>`, made by
//! `restore`, restore tests and migrations' dry runs) are owned through a session-level advisory lock on the server's
//! maintenance database, derived from the scratch name: [`Postgres::claim_scratch`]
//! takes it before the database is created and holds it until the owner is done, so
//! [`Postgres::clean_scratch_databases`] can tell a crashed owner's leftover (lock
//! free) from one in use — PIDs and timestamps could not.

use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;

use super::{quote, quote_literal, redact_url, timeout_millis, DbError};
use crate::config::{resolve_credential, DatabaseConfig};
use crate::pgurl::{encode_component, split_secrets, Secrets};

pub mod globals;

#[derive(Clone)]
pub struct Postgres {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) pool: PgPool,
    /// How to reach the server outside the pool. Holds the password: never print it
    /// (these structs deliberately have no `Debug`).
    access: Arc<Access>,
}

struct Access {
    /// For side connections (cancel requests, maintenance database).
    options: PgConnectOptions,
    /// Where the configured URL leads, as libpq resolves it: every URL and libpq
    /// variable given to pg_dump, pg_restore, psql and migration commands is made
    /// from it.
    target: Resolved,
    password: Option<Zeroizing<String>>,
    /// libpq's `sslpassword` (passphrase of an encrypted client key). libpq reads it
    /// from no environment variable, so tools get it through a 0600 service file.
    ssl_password: Option<Zeroizing<String>>,
}

/// One PostgreSQL database as libpq resolves the configured URL: host, port and user
/// (`host=`/`port=`/`user=` parameters over the URL's parts, the PG* variables for
/// what is missing) and the database (`dbname=`, else the path, else the user name).
/// The other query parameters are kept exactly as written (never re-encoded: libpq
/// reads `+` as a plus sign). Every URL built from it names its database once, in the
/// path, so that a scratch database name cannot be overridden by a parameter.
#[derive(Clone)]
struct Resolved {
    /// `postgres` or `postgresql`, as configured.
    scheme: String,
    /// A host name, an IP address (no brackets) or a Unix socket directory.
    host: String,
    port: u16,
    user: String,
    database: String,
    /// The other `key=value` query parameters, as written.
    params: Vec<String>,
}

impl Resolved {
    /// A URL for `database` on this server (with `password` in it, if given).
    fn url(&self, database: &str, password: Option<&str>) -> String {
        let mut url = format!("{}://{}", self.scheme, encode_component(&self.user));
        if let Some(pw) = password {
            url.push(':');
            url.push_str(&encode_component(pw));
        }
        url.push('@');
        let mut params = Vec::new();
        if self.host.starts_with('/') {
            // A socket directory cannot be a URL host: libpq takes it as a parameter.
            params.push(format!("host={}", encode_component(&self.host)));
            params.push(format!("port={}", self.port));
        } else if self.host.contains(':') {
            url.push_str(&format!("[{}]:{}", self.host, self.port));
        } else {
            url.push_str(&format!("{}:{}", encode_component(&self.host), self.port));
        }
        url.push('/');
        url.push_str(&encode_path_segment(database));
        params.extend(self.params.iter().cloned());
        if !params.is_empty() {
            url.push('?');
            url.push_str(&params.join("&"));
        }
        url
    }

    /// libpq's variables naming `database` on this server, the same place as
    /// [`Resolved::url`]: for tools that read them rather than a URL.
    fn env(&self, database: &str) -> [(&'static str, String); 4] {
        [
            ("PGHOST", self.host.clone()),
            ("PGPORT", self.port.to_string()),
            ("PGUSER", self.user.clone()),
            ("PGDATABASE", database.to_owned()),
        ]
    }
}

/// sqlx's options for a URL without secrets, and where it leads as libpq resolves it
/// (`params`: its query parameters to pass on, as written); the options name the
/// resolved database explicitly.
fn resolve(
    plain_url: &url::Url,
    params: Vec<String>,
) -> Result<(PgConnectOptions, Resolved), sqlx::Error> {
    let options = PgConnectOptions::from_str(plain_url.as_str())?;
    // libpq's default database is the user name; the server's default is the same,
    // but every tool must be told it explicitly.
    let database = options
        .get_database()
        .unwrap_or(options.get_username())
        .to_owned();
    let target = Resolved {
        scheme: plain_url.scheme().to_owned(),
        host: options.get_socket().map_or_else(
            || {
                options
                    .get_host()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned()
            },
            |s| s.to_string_lossy().into_owned(),
        ),
        port: options.get_port(),
        user: options.get_username().to_owned(),
        database: database.clone(),
        params,
    };
    Ok((options.database(&database), target))
}

/// libpq variables that could send a tool elsewhere than the URL it is given: removed
/// from the environment of every tool and command dbkeeper starts.
pub const REDIRECTING_ENV: [&str; 3] = ["PGHOSTADDR", "PGSERVICE", "PGSERVICEFILE"];

/// [`encode_component`] for a password, as it appears in the URLs dbkeeper builds:
/// what output must be masked for, besides the password itself.
pub fn encoded_password(pw: &str) -> String {
    encode_component(pw)
}

/// Percent-encodes a database name for a URL path, so that libpq decodes it back to
/// exactly the same name (`form_urlencoded` would turn a space into `+`, which libpq
/// keeps as a plus sign).
fn encode_path_segment(name: &str) -> String {
    url::form_urlencoded::byte_serialize(name.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// A client tool command, with the private service file (if any) that must outlive it.
pub struct ToolCommand {
    pub cmd: Command,
    _service: Option<ServiceFile>,
}

/// The private files a started tool reads (removed on drop): keep them until it exits.
pub struct ToolFiles(#[allow(dead_code)] Option<ServiceFile>);

impl ToolCommand {
    /// The command for tokio, and the files to keep while the child runs.
    pub fn into_tokio(self) -> (tokio::process::Command, ToolFiles) {
        (self.cmd.into(), ToolFiles(self._service))
    }
}

/// A libpq connection-service file holding `sslpassword`, mode 0600, removed on drop.
struct ServiceFile(std::path::PathBuf);

impl Drop for ServiceFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The session that owns a scratch database: while it is open, its advisory lock tells
/// [`Postgres::clean_scratch_databases`] (in this or any other dbkeeper process) that
/// the database is in use. Dropping it closes the connection, which releases the lock;
/// keep it until the scratch database has been dropped or swapped in.
pub struct ScratchClaim {
    _session: PgConnection,
}

/// The advisory lock key of a scratch database name: the first 8 bytes of a SHA-256
/// over a fixed prefix and the name, so that keys of other applications' locks (small
/// integers, table OIDs) are unlikely to collide with ours.
pub fn scratch_lock_key(name: &str) -> i64 {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(b"dbkeeper scratch database\0")
        .chain_update(name.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// True for exactly the names dbkeeper gives scratch databases:
/// `<anything>_dbk_(restore|old|verify|dryrun)_<8 lowercase hex digits>`. The cleaner never
/// looks at any other database.
pub fn is_scratch_name(name: &str) -> bool {
    let Some(split) = name.len().checked_sub(8) else {
        return false;
    };
    let Some((head, hex)) = name.split_at_checked(split) else {
        return false;
    };
    if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return false;
    }
    ["_dbk_restore_", "_dbk_old_", "_dbk_verify_", "_dbk_dryrun_"]
        .iter()
        .any(|kind| head.ends_with(kind))
}

/// The comment dbkeeper puts on every scratch database it creates (and on a replaced
/// database renamed `_dbk_old_`): the cleaner drops only databases that carry it,
/// so a database that merely has a scratch-like name — a configured one, one a
/// person named `reports_dbk_old_20240101` — is never touched.
const SCRATCH_MARK: &str = "dbkeeper scratch database: dropped when its owner is gone";

/// `COMMENT ON DATABASE name IS …` (`None`: no comment), both quoted.
async fn comment_on(
    conn: &mut sqlx::PgConnection,
    name: &str,
    comment: Option<&str>,
) -> Result<(), sqlx::Error> {
    let text = comment.map_or_else(|| "NULL".to_owned(), quote_literal);
    sqlx::raw_sql(AssertSqlSafe(format!(
        "COMMENT ON DATABASE {} IS {text}",
        quote(name)
    )))
    .execute(conn)
    .await
    .map(|_| ())
}

/// The service name dbkeeper writes into its private service files.
const SERVICE: &str = "dbkeeper";

fn write_service_file(dir: &Path, ssl_password: &str) -> std::io::Result<ServiceFile> {
    use rand::TryRngCore;
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if ssl_password.contains(['\n', '\r']) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "sslpassword contains a line break",
        ));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut suffix = [0u8; 8];
    rand::rngs::OsRng
        .try_fill_bytes(&mut suffix)
        .map_err(std::io::Error::other)?;
    let path = dir.join(format!("pgservice-{}.conf", hex::encode(suffix)));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    let guard = ServiceFile(path);
    writeln!(file, "[{SERVICE}]\nsslpassword={ssl_password}")?;
    file.sync_all()?;
    Ok(guard)
}

/// What [`Postgres::swap_databases`] may do to a target that exists at the moment of
/// the swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapMode {
    /// End its sessions and replace it, whatever it holds (`restore --force`).
    Force,
    /// Rename it away without ending any session; the caller checks the renamed
    /// database for user objects and swaps back if it is not empty.
    ReplaceIfEmpty,
    /// Leave it alone and swap nothing (`restore --create` onto a name that was free).
    RequireAbsent,
}

/// What [`Postgres::swap_databases`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swapped {
    /// The target existed and now has the old name.
    Replaced,
    /// There was no target: the new database just took the name.
    Created,
    /// [`SwapMode::RequireAbsent`] and the target exists: nothing was renamed.
    TargetAppeared,
}

/// The user objects found in a database, by kind (only kinds with any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserObjects {
    counts: Vec<(&'static str, &'static str, i64)>,
}

impl UserObjects {
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

impl std::fmt::Display for UserObjects {
    /// "3 relations, 1 large object, 2 functions".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.counts.is_empty() {
            return f.write_str("no user objects");
        }
        for (i, (one, many, n)) in self.counts.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{n} {}", if *n == 1 { one } else { many })?;
        }
        Ok(())
    }
}

/// Kinds of user object: (singular, plural, the rows of that kind, from which they are
/// counted).
///
/// Why OIDs: initdb gives everything it creates an OID below 16384
/// (`FirstNormalObjectId`), and every object created afterwards — by `CREATE`, an
/// extension script, `lo_create`, … — gets one at or above it, OIDs being unique
/// within a catalog. So `oid >= 16384` catches every kind of object a user can make
/// (large objects excepted: a client may pick their OID, and initdb makes none, so all
/// of them count) without a list of system schemas or names to keep up to date, and a brand-new
/// database (from `template0`, or a `template1` nobody added to) counts as empty.
/// Changes made to initdb's own objects (`GRANT … ON SCHEMA public`, a comment on it)
/// are not objects and are not counted. Objects that only exist as part of another
/// one (indexes, TOAST tables, a table's row type, array and multirange types) are
/// left out so that the counts read naturally; their owner is counted. Temporary
/// schemas and what is in them belong to sessions, not to the database.
const USER_OBJECTS: &[(&str, &str, &str)] = &[
    (
        "schema",
        "schemas",
        "pg_namespace WHERE oid >= 16384 AND nspname !~ '^pg_(toast_)?temp_'",
    ),
    (
        "relation",
        "relations",
        "pg_class WHERE oid >= 16384 AND relkind NOT IN ('i', 'I', 't') AND relnamespace NOT IN \
         (SELECT oid FROM pg_namespace WHERE nspname ~ '^pg_(toast_)?temp_')",
    ),
    (
        "large object",
        "large objects",
        // initdb makes none, and `lo_create(oid)`/`lo_from_bytea(oid, …)` let a
        // client choose any OID, low ones included: every one counts.
        "pg_largeobject_metadata",
    ),
    (
        "function",
        "functions",
        "pg_proc WHERE oid >= 16384 AND pronamespace NOT IN \
         (SELECT oid FROM pg_namespace WHERE nspname ~ '^pg_(toast_)?temp_')",
    ),
    (
        "type",
        "types",
        "pg_type t WHERE oid >= 16384 AND typrelid = 0 AND typtype <> 'm' \
         AND NOT EXISTS (SELECT 1 FROM pg_type e WHERE e.typarray = t.oid) AND typnamespace NOT IN \
         (SELECT oid FROM pg_namespace WHERE nspname ~ '^pg_(toast_)?temp_')",
    ),
    ("extension", "extensions", "pg_extension WHERE oid >= 16384"),
    ("collation", "collations", "pg_collation WHERE oid >= 16384"),
    (
        "conversion",
        "conversions",
        "pg_conversion WHERE oid >= 16384",
    ),
    ("operator", "operators", "pg_operator WHERE oid >= 16384"),
    (
        "operator class",
        "operator classes",
        "pg_opclass WHERE oid >= 16384",
    ),
    (
        "operator family",
        "operator families",
        "pg_opfamily WHERE oid >= 16384",
    ),
    (
        "access method",
        "access methods",
        "pg_am WHERE oid >= 16384",
    ),
    (
        "text search configuration",
        "text search configurations",
        "pg_ts_config WHERE oid >= 16384",
    ),
    (
        "text search dictionary",
        "text search dictionaries",
        "pg_ts_dict WHERE oid >= 16384",
    ),
    (
        "text search parser",
        "text search parsers",
        "pg_ts_parser WHERE oid >= 16384",
    ),
    (
        "text search template",
        "text search templates",
        "pg_ts_template WHERE oid >= 16384",
    ),
    (
        "foreign-data wrapper",
        "foreign-data wrappers",
        "pg_foreign_data_wrapper WHERE oid >= 16384",
    ),
    (
        "foreign server",
        "foreign servers",
        "pg_foreign_server WHERE oid >= 16384",
    ),
    (
        "publication",
        "publications",
        "pg_publication WHERE oid >= 16384",
    ),
    (
        "event trigger",
        "event triggers",
        "pg_event_trigger WHERE oid >= 16384",
    ),
    ("cast", "casts", "pg_cast WHERE oid >= 16384"),
    ("transform", "transforms", "pg_transform WHERE oid >= 16384"),
    ("language", "languages", "pg_language WHERE oid >= 16384"),
    ("policy", "policies", "pg_policy WHERE oid >= 16384"),
    (
        "default privilege rule",
        "default privilege rules",
        "pg_default_acl WHERE oid >= 16384",
    ),
    (
        "statistics object",
        "statistics objects",
        "pg_statistic_ext WHERE oid >= 16384",
    ),
];

/// One row (kind, count) per entry of [`USER_OBJECTS`]; built from constants only.
fn user_objects_sql() -> String {
    USER_OBJECTS
        .iter()
        .map(|(kind, _, rows)| format!("SELECT '{kind}'::text, count(*) FROM {rows}"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

impl Postgres {
    pub(super) fn open(cfg: &DatabaseConfig) -> Result<Self, DbError> {
        let url = redact_url(&cfg.url);
        let url_error = |source| DbError::Url {
            name: cfg.name.clone(),
            url: url.clone(),
            source,
        };
        let Secrets {
            url: plain_url,
            params,
            mut password,
            ssl_password,
            service,
        } = split_secrets(&cfg.url).map_err(|e| url_error(sqlx::Error::Configuration(e.into())))?;
        if service {
            return Err(url_error(sqlx::Error::Configuration(
                "service= is not supported (a service file could lead tools to another \
                 database than dbkeeper backs up); write host, port, user and database \
                 in the URL instead"
                    .into(),
            )));
        }
        let (options, target) = resolve(&plain_url, params).map_err(url_error)?;
        let mut options = options.application_name("dbkeeper");
        if let Some(pw) = &password {
            options = options.password(pw);
        }
        if let Some(file) = &cfg.password_file {
            // Already resolved at load, but a config built in code may not be.
            let path = resolve_credential(file);
            let text = std::fs::read_to_string(&path).map_err(|source| DbError::PasswordFile {
                name: cfg.name.clone(),
                path: path.display().to_string(),
                source,
            })?;
            let pw = text.trim_end_matches(['\r', '\n']).to_owned();
            options = options.password(&pw);
            password = Some(pw);
        }
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .acquire_timeout(cfg.connect_timeout)
            .idle_timeout(Some(Duration::from_secs(60)))
            .connect_lazy_with(options.clone());
        Ok(Postgres {
            name: cfg.name.clone(),
            url,
            pool,
            access: Arc::new(Access {
                options,
                target,
                password: password.map(Zeroizing::new),
                ssl_password: ssl_password.map(Zeroizing::new),
            }),
        })
    }

    /// The same server and credentials, another database on it (a scratch copy):
    /// a pool of its own, connecting lazily.
    pub fn on_database(&self, database: &str) -> Postgres {
        let options = self.access.options.clone().database(database);
        Postgres {
            name: self.name.clone(),
            url: self.url.clone(),
            pool: PgPoolOptions::new()
                .max_connections(2)
                .min_connections(0)
                .connect_lazy_with(options),
            access: self.access.clone(),
        }
    }

    pub(crate) fn query_error(&self, source: sqlx::Error) -> DbError {
        DbError::Query {
            name: self.name.clone(),
            source,
        }
    }

    /// A `pg_dump`/`pg_restore`/`psql` command aimed at this database (or at another
    /// database on the same server). The password goes in `PGPASSWORD` and
    /// `sslpassword` in a 0600 service file under `private_dir` (named by
    /// `PGSERVICEFILE`), never in argv. The URL and `PGHOST`/`PGPORT`/`PGUSER`/
    /// `PGDATABASE` come from the resolved target (see [`Resolved`]), so they name
    /// the same database; inherited [`REDIRECTING_ENV`] variables are removed.
    pub fn tool_command(
        &self,
        program: &Path,
        database: Option<&str>,
        private_dir: &Path,
    ) -> Result<ToolCommand, DbError> {
        let db = database.map_or_else(|| self.database_name(), str::to_owned);
        let url = self.access.target.url(&db, None);
        let mut cmd = Command::new(direct_program(program));
        cmd.arg("--no-password").arg(format!("--dbname={url}"));
        cmd.env("PGAPPNAME", "dbkeeper");
        for name in REDIRECTING_ENV {
            cmd.env_remove(name);
        }
        cmd.envs(self.access.target.env(&db));
        if let Some(pw) = &self.access.password {
            cmd.env("PGPASSWORD", pw.as_str());
        }
        let service = match &self.access.ssl_password {
            Some(pw) => {
                let file =
                    write_service_file(private_dir, pw).map_err(|source| DbError::PrivateFile {
                        name: self.name.clone(),
                        path: private_dir.display().to_string(),
                        source,
                    })?;
                cmd.env("PGSERVICEFILE", &file.0).env("PGSERVICE", SERVICE);
                Some(file)
            }
            None => None,
        };
        Ok(ToolCommand {
            cmd,
            _service: service,
        })
    }

    /// The environment a client program (a migration tool) connects with:
    /// `DATABASE_URL` for `database` (default: this one) with the password in it,
    /// `PGPASSWORD`, and `PGHOST`/`PGPORT`/`PGUSER`/`PGDATABASE` naming the same
    /// place. The first two hold the password: only ever put them in a child's
    /// environment, never in argv or a message.
    pub fn client_env(&self, database: Option<&str>) -> Vec<(&'static str, Zeroizing<String>)> {
        let target = &self.access.target;
        let db = database.map_or_else(|| self.database_name(), str::to_owned);
        let password = self.access.password.as_ref().map(|pw| pw.as_str());
        let mut env = Vec::new();
        if let Some(pw) = &self.access.password {
            env.push(("PGPASSWORD", pw.clone()));
        }
        env.push(("DATABASE_URL", Zeroizing::new(target.url(&db, password))));
        for (name, value) in target.env(&db) {
            env.push((name, Zeroizing::new(value)));
        }
        env
    }

    /// The database dbkeeper works on, as libpq resolves the URL (`dbname=`, else
    /// the path, else the user name).
    pub fn database_name(&self) -> String {
        self.access.target.database.clone()
    }

    pub async fn server_version(&self) -> Result<String, DbError> {
        sqlx::query_scalar("SHOW server_version")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.query_error(e))
    }

    /// Whether sqlx's history table `_sqlx_migrations` exists (on the search path, as
    /// sqlx looks for it).
    pub async fn has_migration_history(&self) -> Result<bool, DbError> {
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.query_error(e))
    }

    /// Every object in database `database` (on this server) that initdb did not create:
    /// what a restore without `--force` must never throw away.
    pub async fn user_objects_in(&self, database: &str) -> Result<UserObjects, DbError> {
        let options = self.access.options.clone().database(database);
        let mut conn = PgConnection::connect_with(&options)
            .await
            .map_err(|e| DbError::connect(&self.name, &self.url, e))?;
        let rows: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(user_objects_sql()))
            .fetch_all(&mut conn)
            .await
            .map_err(|e| self.query_error(e))?;
        let _ = conn.close().await;
        let counts = rows
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .filter_map(|(kind, n)| {
                USER_OBJECTS
                    .iter()
                    .find(|o| o.0 == kind)
                    .map(|o| (o.0, o.1, n))
            })
            .collect();
        Ok(UserObjects { counts })
    }

    /// A connection of our own to database `database` on this server (a scratch
    /// database, say), with the configured credentials.
    pub async fn connect_to(&self, database: &str) -> Result<PgConnection, DbError> {
        let options = self.access.options.clone().database(database);
        PgConnection::connect_with(&options)
            .await
            .map_err(|e| DbError::connect(&self.name, &self.url, e))
    }

    /// A connection to the server's `postgres` database, for CREATE/DROP DATABASE.
    async fn maintenance(&self) -> Result<PgConnection, DbError> {
        let options = self.access.options.clone().database("postgres");
        PgConnection::connect_with(&options)
            .await
            .map_err(|e| DbError::connect(&self.name, &self.url, e))
    }

    /// [`Self::maintenance`] whose statements sqlx never logs, whatever `RUST_LOG`
    /// says: for statements that carry secrets (`CREATE ROLE … PASSWORD`).
    pub(crate) async fn maintenance_unlogged(&self) -> Result<PgConnection, DbError> {
        let options = self
            .access
            .options
            .clone()
            .database("postgres")
            .disable_statement_logging();
        PgConnection::connect_with(&options)
            .await
            .map_err(|e| DbError::connect(&self.name, &self.url, e))
    }

    pub async fn database_exists(&self, name: &str) -> Result<bool, DbError> {
        let mut conn = self.maintenance().await?;
        let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
            .bind(name)
            .fetch_optional(&mut conn)
            .await
            .map_err(|e| self.query_error(e))?;
        Ok(found.is_some())
    }

    /// Creates the scratch database `name`, marked as dbkeeper's ([`SCRATCH_MARK`]).
    pub async fn create_database(&self, name: &str) -> Result<(), DbError> {
        let mut conn = self.maintenance().await?;
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {}", quote(name))))
            .execute(&mut conn)
            .await
            .map_err(|e| self.query_error(e))?;
        comment_on(&mut conn, name, Some(SCRATCH_MARK))
            .await
            .map_err(|e| self.query_error(e))
    }

    /// Creates `name` as a copy-to-be of `like`: same owner (when that is not us),
    /// encoding and locale, so that swapping it in changes nothing but the contents.
    pub async fn create_database_like(&self, name: &str, like: &str) -> Result<(), DbError> {
        let mut conn = self.maintenance().await?;
        let row: Option<(String, bool, String, String, String)> = sqlx::query_as(
            "SELECT pg_get_userbyid(datdba)::text, pg_get_userbyid(datdba) = current_user,
                    pg_encoding_to_char(encoding)::text, datcollate::text, datctype::text
             FROM pg_database WHERE datname = $1",
        )
        .bind(like)
        .fetch_optional(&mut conn)
        .await
        .map_err(|e| self.query_error(e))?;
        let mut sql = format!("CREATE DATABASE {}", quote(name));
        if let Some((owner, ours, encoding, collate, ctype)) = row {
            if !ours {
                sql.push_str(&format!(" OWNER {}", quote(&owner)));
            }
            sql.push_str(&format!(
                " TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}",
                quote_literal(&encoding),
                quote_literal(&collate),
                quote_literal(&ctype)
            ));
        }
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .map_err(|e| self.query_error(e))?;
        comment_on(&mut conn, name, Some(SCRATCH_MARK))
            .await
            .map_err(|e| self.query_error(e))
    }

    /// In one transaction, renames `target` (if it exists) to `old` and `new` to
    /// `target`: either both renames happen or neither. What an existing `target` may
    /// go through is `mode`'s: see [`SwapMode`]. A session that connects to `target`
    /// in between makes the rename fail, and the transaction leaves everything as it
    /// was.
    pub async fn swap_databases(
        &self,
        target: &str,
        new: &str,
        old: &str,
        mode: SwapMode,
    ) -> Result<Swapped, DbError> {
        let mut conn = self.maintenance().await?;
        let mut tx = conn.begin().await.map_err(|e| self.query_error(e))?;
        // The target's own comment, which the database swapped in takes over.
        let existing: Option<Option<String>> = sqlx::query_scalar(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
        )
        .bind(target)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.query_error(e))?;
        let exists = existing.is_some();
        if exists {
            match mode {
                SwapMode::RequireAbsent => {
                    // Dropping `tx` rolls back: nothing was renamed.
                    return Ok(Swapped::TargetAppeared);
                }
                SwapMode::Force => self.terminate_sessions(&mut tx, target).await?,
                SwapMode::ReplaceIfEmpty => {}
            }
            rename(&mut tx, target, old)
                .await
                .map_err(|e| self.query_error(e))?;
            comment_on(&mut tx, old, Some(SCRATCH_MARK))
                .await
                .map_err(|e| self.query_error(e))?;
        }
        rename(&mut tx, new, target)
            .await
            .map_err(|e| self.query_error(e))?;
        comment_on(&mut tx, target, existing.flatten().as_deref())
            .await
            .map_err(|e| self.query_error(e))?;
        tx.commit().await.map_err(|e| self.query_error(e))?;
        Ok(if exists {
            Swapped::Replaced
        } else {
            Swapped::Created
        })
    }

    /// Undoes [`Postgres::swap_databases`]: in one transaction, `target` goes back to
    /// `new` and `old` back to `target`. Sessions that reached `target` since the swap
    /// are ended: they are on the database that is being taken back.
    pub async fn unswap_databases(
        &self,
        target: &str,
        new: &str,
        old: &str,
    ) -> Result<(), DbError> {
        let mut conn = self.maintenance().await?;
        let mut tx = conn.begin().await.map_err(|e| self.query_error(e))?;
        self.terminate_sessions(&mut tx, target).await?;
        let comment: Option<String> = sqlx::query_scalar(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
        )
        .bind(target)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.query_error(e))?
        .flatten();
        rename(&mut tx, target, new)
            .await
            .map_err(|e| self.query_error(e))?;
        comment_on(&mut tx, new, Some(SCRATCH_MARK))
            .await
            .map_err(|e| self.query_error(e))?;
        rename(&mut tx, old, target)
            .await
            .map_err(|e| self.query_error(e))?;
        comment_on(&mut tx, target, comment.as_deref())
            .await
            .map_err(|e| self.query_error(e))?;
        tx.commit().await.map_err(|e| self.query_error(e))
    }

    /// Ends every other session on `database` (waiting up to 5 s for each to go).
    async fn terminate_sessions(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        database: &str,
    ) -> Result<(), DbError> {
        sqlx::query(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(database)
        .execute(&mut **tx)
        .await
        .map_err(|e| self.query_error(e))?;
        Ok(())
    }

    /// Takes the advisory lock that marks the scratch database `name` as ours, on a
    /// session of its own to the maintenance database (advisory locks are per
    /// database, and the cleaner looks there). Call it before creating the database
    /// and keep the claim until the database is dropped or swapped in.
    pub async fn claim_scratch(&self, name: &str) -> Result<ScratchClaim, DbError> {
        let mut session = self.maintenance().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(scratch_lock_key(name))
            .fetch_one(&mut session)
            .await
            .map_err(|e| self.query_error(e))?;
        if !locked {
            // Only possible if another process drew the same random name (or is
            // cleaning up a leftover of that name right now): never share it.
            return Err(DbError::ScratchInUse {
                name: self.name.clone(),
                scratch: name.to_owned(),
            });
        }
        Ok(ScratchClaim { _session: session })
    }

    /// Drops the scratch databases on this server whose owner is gone (see
    /// [`ScratchClaim`]): each one matching [`is_scratch_name`] and marked as
    /// dbkeeper's ([`SCRATCH_MARK`]) whose advisory lock can be taken. A database with sessions is left (never terminated), as is one we may
    /// not drop; both are logged. Returns the names dropped.
    pub async fn clean_scratch_databases(&self) -> Result<Vec<String>, DbError> {
        let mut conn = self.maintenance().await?;
        // Only databases dbkeeper marked as its scratch (see SCRATCH_MARK).
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT datname::text FROM pg_database
             WHERE datname LIKE '%\\_dbk\\_%'
               AND shobj_description(oid, 'pg_database') = $1
             ORDER BY datname",
        )
        .bind(SCRATCH_MARK)
        .fetch_all(&mut conn)
        .await
        .map_err(|e| self.query_error(e))?;
        let mut dropped = Vec::new();
        for name in names.into_iter().filter(|n| is_scratch_name(n)) {
            let key = scratch_lock_key(&name);
            let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(key)
                .fetch_one(&mut conn)
                .await
                .map_err(|e| self.query_error(e))?;
            if !free {
                tracing::debug!(database = %self.name, scratch = %name, "scratch database in use, left alone");
                continue;
            }
            // No FORCE: a session on it (a pg_restore that outlived its dbkeeper, an
            // operator looking at it) makes the drop fail, and it is tried again later.
            let result = sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {}",
                quote(&name)
            )))
            .execute(&mut conn)
            .await;
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(key)
                .execute(&mut conn)
                .await
                .map_err(|e| self.query_error(e))?;
            match result {
                Ok(_) => {
                    tracing::warn!(database = %self.name, scratch = %name, "dropped a scratch database a crashed restore or restore test left behind");
                    dropped.push(name);
                }
                Err(e) => {
                    tracing::warn!(database = %self.name, scratch = %name, "cannot drop a scratch database a crashed restore or restore test left behind, left as it is: {e}");
                }
            }
        }
        let _ = conn.close().await;
        Ok(dropped)
    }

    /// [`Postgres::clean_scratch_databases`], for callers that go on either way: a
    /// server that cannot be asked is logged, not an error.
    pub async fn tidy_scratch_databases(&self) {
        if let Err(e) = self.clean_scratch_databases().await {
            tracing::warn!(database = %self.name, "cannot look for scratch databases left behind: {e}");
        }
    }

    /// Where this database lives and as whom we log in: databases with the same
    /// server identity share their scratch databases' cleanup.
    pub fn server_identity(&self) -> (String, u16, String) {
        let o = &self.access.options;
        (
            o.get_host().to_owned(),
            o.get_port(),
            o.get_username().to_owned(),
        )
    }

    /// Drops a database, disconnecting its sessions.
    pub async fn drop_database(&self, name: &str) -> Result<(), DbError> {
        let mut conn = self.maintenance().await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote(name)
        )))
        .execute(&mut conn)
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
        conn.ping().await.map_err(|e| self.connect_error(e))
    }

    /// Runs the script with `statement_timeout` set, so the server stops a statement
    /// itself when the job's timeout passes. Not wrapped in a transaction, so that
    /// `VACUUM` and friends work.
    pub(super) async fn execute_script(
        &self,
        sql: &str,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<u64, DbError> {
        // The operator's own SQL from the config file, run as written on purpose.
        self.run_cancellable(
            &[set_timeout(
                Scope::Session,
                Timeout::Statement,
                Some(timeout),
            )],
            sql.to_owned(),
            cancel,
        )
        .await
    }

    /// Runs `setup` statements (session settings we format ourselves), then `sql`, on a
    /// connection of its own that is closed afterwards, so settings never leak into the
    /// pool. When `cancel` fires, the server is asked to stop the statement (as psql
    /// does on Ctrl-C) before this returns. Returns the rows affected.
    pub(crate) async fn run_cancellable(
        &self,
        setup: &[String],
        sql: String,
        cancel: &CancellationToken,
    ) -> Result<u64, DbError> {
        let (mut conn, pid) = self.own_session(setup).await?;
        let script = sqlx::raw_sql(AssertSqlSafe(sql));
        tokio::select! {
            result = script.execute(&mut *conn) => Ok(result.map_err(|e| self.query_error(e))?.rows_affected()),
            _ = cancel.cancelled() => {
                self.cancel_backend(pid).await;
                Err(DbError::Cancelled { name: self.name.clone() })
            }
        }
    }

    /// A connection of its own from the pool, closed when dropped (so its settings
    /// and transaction state never reach the pool), after running `setup` (statements
    /// we format ourselves) on it; with its backend pid for [`Self::cancel_backend`].
    pub(crate) async fn own_session(
        &self,
        setup: &[String],
    ) -> Result<(sqlx::pool::PoolConnection<sqlx::Postgres>, i32), DbError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.connect_error(e))?;
        conn.close_on_drop();
        for statement in setup {
            sqlx::raw_sql(AssertSqlSafe(statement.clone()))
                .execute(&mut *conn)
                .await
                .map_err(|e| self.query_error(e))?;
        }
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| self.query_error(e))?;
        Ok((conn, pid))
    }

    /// Asks the server to stop whatever session `pid` is running, over a side
    /// connection (the pool may be busy or closing).
    pub(crate) async fn cancel_backend(&self, pid: i32) {
        let cancel = async {
            let mut side = PgConnection::connect_with(&self.access.options).await?;
            sqlx::query("SELECT pg_cancel_backend($1)")
                .bind(pid)
                .execute(&mut side)
                .await?;
            side.close().await
        };
        match tokio::time::timeout(Duration::from_secs(10), cancel).await {
            Ok(Ok(())) => {
                tracing::info!(database = %self.name, pid, "cancelled the running statement")
            }
            Ok(Err(e)) => {
                tracing::warn!(database = %self.name, pid, "cannot cancel the running statement: {e}")
            }
            Err(_) => tracing::warn!(database = %self.name, pid, "cancel request timed out"),
        }
    }
}

/// A PostgreSQL timeout setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// `lock_timeout`: how long a statement waits for a lock.
    Lock,
    /// `statement_timeout`: how long a statement may run.
    Statement,
}

/// How long a `SET` lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `SET`: until the session ends or the setting is reset.
    Session,
    /// `SET LOCAL`: until the transaction ends.
    Transaction,
}

/// `SET [LOCAL] lock_timeout = '250ms'`, the one place that formats timeouts for
/// PostgreSQL: whole milliseconds as a quoted literal with its unit (see
/// [`timeout_millis`]); `None` is `'0ms'`, no timeout. The text is ours alone, never
/// from the config, so it can be spliced into a statement.
pub fn set_timeout(scope: Scope, setting: Timeout, duration: Option<Duration>) -> String {
    let scope = match scope {
        Scope::Session => "SET",
        Scope::Transaction => "SET LOCAL",
    };
    let setting = match setting {
        Timeout::Lock => "lock_timeout",
        Timeout::Statement => "statement_timeout",
    };
    let millis = duration.map_or(0, timeout_millis);
    format!("{scope} {setting} = '{millis}ms'")
}

/// `ALTER DATABASE from RENAME TO to`, both names quoted.
async fn rename(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    from: &str,
    to: &str,
) -> Result<(), sqlx::Error> {
    let sql = format!("ALTER DATABASE {} RENAME TO {}", quote(from), quote(to));
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&mut **tx)
        .await
        .map(|_| ())
}

/// Where Debian's postgresql-common keeps each major version's programs.
const PG_LIB: &str = "/usr/lib/postgresql";

/// The program to run for `program` (a PostgreSQL client tool, as configured).
///
/// On Debian and Ubuntu, `pg_dump` and `pg_restore` on `$PATH` are links to
/// postgresql-common's `pg_wrapper`, a Perl script that takes about 0.1 s to start
/// before it runs the real program: a restore runs pg_restore twice, so that is a
/// fixed cost on every backup and restore. When `program` is a bare name that
/// resolves to the wrapper, and nothing would make the wrapper choose a particular
/// cluster (`PGCLUSTER` unset), the real program of the newest installed version is
/// run directly, as the wrapper itself would (a newer pg_dump/pg_restore reads and
/// writes every older server's dumps). Any other value, a full path included, is run
/// as it is.
pub fn direct_program(program: &Path) -> std::path::PathBuf {
    let as_is = || program.to_owned();
    let Some(name) = program.to_str().filter(|n| !n.contains('/')) else {
        return as_is();
    };
    if std::env::var_os("PGCLUSTER").is_some() {
        return as_is();
    }
    let Some(on_path) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    }) else {
        return as_is();
    };
    let is_wrapper = std::fs::canonicalize(&on_path)
        .is_ok_and(|real| real.file_name().is_some_and(|f| f == "pg_wrapper"));
    if !is_wrapper {
        return as_is();
    }
    newest_installed(Path::new(PG_LIB), name).unwrap_or_else(as_is)
}

/// `<lib>/<major>/bin/<name>` of the highest major version that has it.
fn newest_installed(lib: &Path, name: &str) -> Option<std::path::PathBuf> {
    std::fs::read_dir(lib)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin").join(name);
            bin.is_file().then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_installed_version_is_chosen_and_paths_are_run_as_they_are() {
        let lib = tempfile::tempdir().unwrap();
        for (major, has) in [("9", true), ("15", true), ("16", false), ("README", true)] {
            let bin = lib.path().join(major).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            if has {
                std::fs::write(bin.join("pg_restore"), b"").unwrap();
            }
        }
        assert_eq!(
            newest_installed(lib.path(), "pg_restore"),
            Some(lib.path().join("15/bin/pg_restore"))
        );
        assert_eq!(newest_installed(lib.path(), "pg_dump"), None);
        for configured in ["/opt/pg/bin/pg_dump", "./pg_dump", "no-such-tool-on-path"] {
            assert_eq!(direct_program(Path::new(configured)), Path::new(configured));
        }
    }

    fn split_password(raw: &str) -> Option<(url::Url, Option<String>)> {
        split_secrets(raw).ok().map(|s| (s.url, s.password))
    }

    #[test]
    fn libpq_urls_without_a_host_are_read_and_several_hosts_refused() {
        // Adversary round 2, case 08.
        for (raw, url, pw) in [
            (
                "postgres://app:p%3Aw@/db?host=/run/pg",
                "postgres:///db?host=/run/pg&user=app",
                Some("p:w"),
            ),
            ("postgres://app@/db", "postgres:///db?user=app", None),
            (
                "postgresql:///db?host=%2Frun%2Fpg",
                "postgresql:///db?host=%2Frun%2Fpg",
                None,
            ),
            ("postgres:///db", "postgres:///db", None),
            ("postgres://a%26b@?x=1", "postgres://?x=1&user=a%26b", None),
        ] {
            let (got, got_pw) = split_password(raw).unwrap();
            assert_eq!((got.as_str(), got_pw.as_deref()), (url, pw), "{raw}");
        }
        for raw in [
            "postgres://h1,h2/db",
            "postgres://u@h1:5432,h2:5433/db",
            "postgres:///db?host=a,b",
            "postgres://h/db?port=5432,5433",
        ] {
            let err = split_secrets(raw).err().unwrap();
            assert!(err.contains("several hosts"), "{raw}: {err}");
        }
        let (target, _) = target_of("postgres://app@/db?host=/run/pg");
        assert_eq!(
            (target.host.as_str(), target.user.as_str()),
            ("/run/pg", "app")
        );
    }

    #[test]
    fn passwords_leave_the_url() {
        let (url, pw) = split_password("postgres://app:p%40ss@h:5433/db?sslmode=require").unwrap();
        assert_eq!(url.as_str(), "postgres://app@h:5433/db?sslmode=require");
        assert_eq!(pw.as_deref(), Some("p@ss"));
        let (url, pw) =
            split_password("postgres://app@h/db?password=x&application_name=y").unwrap();
        assert_eq!(url.as_str(), "postgres://app@h/db?application_name=y");
        assert_eq!(pw.as_deref(), Some("x"));
        let (url, pw) = split_password("postgres://h/db").unwrap();
        assert_eq!((url.as_str(), pw), ("postgres://h/db", None));
    }

    #[test]
    fn ssl_passwords_leave_the_url() {
        let s = split_secrets("postgres://h/db?sslpassword=k%20ey&sslkey=/k.pem").unwrap();
        assert_eq!(s.url.as_str(), "postgres://h/db?sslkey=/k.pem");
        assert_eq!(s.ssl_password.as_deref(), Some("k ey"));
    }

    /// The resolved target of a URL (adversary 15b, cases 01, 09, 11, 17).
    fn target_of(raw: &str) -> (Resolved, Option<String>) {
        let s = split_secrets(raw).unwrap();
        assert!(!s.service);
        (resolve(&s.url, s.params).unwrap().1, s.password)
    }

    #[test]
    fn every_url_names_the_database_libpq_would_use_and_keeps_the_query() {
        // dbname= wins over the path, and never reaches a scratch URL.
        let (t, _) = target_of("postgres://u@127.0.0.1:5432/path?dbname=real&sslmode=disable");
        assert_eq!(t.database, "real");
        assert_eq!(
            t.url("real_dbk_dryrun_0a1b2c3d", None),
            "postgres://u@127.0.0.1:5432/real_dbk_dryrun_0a1b2c3d?sslmode=disable"
        );
        assert_eq!(t.env("x")[3], ("PGDATABASE", "x".to_owned()));
        // No database: the user name, as libpq does.
        let (t, _) = target_of("postgresql://c11@127.0.0.1:5432");
        assert_eq!(t.database, "c11");
        assert!(t
            .url("c11", None)
            .starts_with("postgresql://c11@127.0.0.1:5432/c11"));
        // Query values as written (no `+` for spaces), the password fully encoded.
        let (t, pw) = target_of(
            "postgres://u:pa%2541ss%2F%40word@h:1/d?options=-c%20statement_timeout%3D0&application_name=my%20app&user=v",
        );
        assert_eq!(pw.as_deref(), Some("pa%41ss/@word"));
        assert_eq!(
            t.url("d", pw.as_deref()),
            "postgres://v:pa%2541ss%2F%40word@h:1/d?options=-c%20statement_timeout%3D0&application_name=my%20app"
        );
        // A socket directory goes in host=.
        let (t, _) = target_of("postgres://u@%2Fvar%2Frun%2Fpostgresql:5433/d");
        assert_eq!(
            t.url("d", None),
            "postgres://u@/d?host=%2Fvar%2Frun%2Fpostgresql&port=5433"
        );
        assert!(
            split_secrets("postgres://h/d?service=prod")
                .unwrap()
                .service
        );
    }

    #[test]
    fn only_dbkeepers_scratch_names_match() {
        for name in [
            "app_dbk_restore_0123abcd",
            "app_dbk_old_deadbeef",
            "dbkeeper_dbk_verify_00000000",
            "app_dbk_dryrun_0a1b2c3d",
            "a b_dbk_restore_12345678",
            "_dbk_restore_12345678",
            "x_dbk_old_dbk_restore_12345678",
        ] {
            assert!(is_scratch_name(name), "{name}");
        }
        for name in [
            "app",
            "x_dbk_restore_ZZZZ",
            "x_dbk_restore_abc",
            "x_dbk_restore_ABCDEF12",
            "x_dbk_restore_abcdef123",
            "x_dbk_restore_abcdef1",
            "x_dbk_restore__abcdef12",
            "x_dbk_backup_abcdef12",
            "x_dbk_restoreabcdef12",
            "dbk_restore_abcdef12",
            "x_dbk_restore_abcdef1é",
            "x_dbk_restore_abcdef12 ",
        ] {
            assert!(!is_scratch_name(name), "{name}");
        }
    }

    #[test]
    fn lock_keys_differ_by_name_and_are_stable() {
        assert_eq!(
            scratch_lock_key("app_dbk_restore_0123abcd"),
            scratch_lock_key("app_dbk_restore_0123abcd")
        );
        assert_ne!(
            scratch_lock_key("app_dbk_restore_0123abcd"),
            scratch_lock_key("app_dbk_restore_0123abce")
        );
    }

    #[test]
    fn timeouts_are_quoted_whole_milliseconds() {
        let ms = |m| Some(Duration::from_millis(m));
        assert_eq!(
            set_timeout(Scope::Transaction, Timeout::Lock, ms(250)),
            "SET LOCAL lock_timeout = '250ms'"
        );
        assert_eq!(
            set_timeout(Scope::Session, Timeout::Statement, None),
            "SET statement_timeout = '0ms'"
        );
        // Never 0 (no timeout) for a set duration, never above what the server takes.
        assert_eq!(
            set_timeout(
                Scope::Session,
                Timeout::Lock,
                Some(Duration::from_micros(10))
            ),
            "SET lock_timeout = '1ms'"
        );
        assert_eq!(
            set_timeout(Scope::Session, Timeout::Lock, Some(Duration::MAX)),
            format!("SET lock_timeout = '{}ms'", i32::MAX)
        );
    }

    #[test]
    fn database_names_round_trip_through_libpq_encoding() {
        assert_eq!(encode_path_segment("adv sp"), "adv%20sp");
        assert_eq!(encode_path_segment("a+b%c"), "a%2Bb%25c");
    }
}

//! `dbkeeper restore`: put a backup back, without ever leaving a half-restored target.
//!
//! SQLite: the image is decrypted into a temporary file beside the target, checked
//! with `PRAGMA integrity_check` and renamed over it. PostgreSQL: the whole archive is
//! authenticated first, and only then streamed into `pg_restore`, so a tampered or
//! truncated archive writes nothing to the target database.

use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::source::Scratch;
use super::verify::{self, Expect};
use super::BackupError;
use crate::archive::KeyRing;
use crate::catalog::{Manifest, TrustPolicy};
use crate::config::DatabaseConfig;
use crate::db::{Database, Postgres};
use crate::storage::sync_dir;

/// What `restore` was told to do besides the target.
pub struct Options<'a> {
    pub force: bool,
    /// PostgreSQL: create the target database if it does not exist.
    pub create: bool,
    pub pg_restore: &'a Path,
    /// What the backup's header must agree with (checked once it is authenticated).
    pub trust: &'a TrustPolicy,
}

/// Restores the backup `manifest` (archive at `archive`) to `target`: a file path for
/// SQLite backups, a `postgres://` URL for PostgreSQL ones.
pub async fn restore(
    archive: &Path,
    manifest: &Manifest,
    keys: &KeyRing,
    target: &str,
    opts: &Options<'_>,
    cancel: &CancellationToken,
) -> Result<String, BackupError> {
    let expect = Expect::trusted(manifest, opts.trust);
    let is_url = target.starts_with("postgres://") || target.starts_with("postgresql://");
    match (manifest.backend.as_str(), is_url) {
        ("sqlite", false) => {
            restore_sqlite(archive, keys, expect, Path::new(target), opts.force, cancel).await
        }
        ("postgres", true) => restore_postgres(archive, keys, expect, target, opts, cancel).await,
        ("sqlite", true) => Err(BackupError::Refused(
            "this is a SQLite backup; --to must be a file path".to_owned(),
        )),
        _ => Err(BackupError::Refused(
            "this is a PostgreSQL backup; --to must be a postgres:// URL".to_owned(),
        )),
    }
}

async fn restore_sqlite(
    archive: &Path,
    keys: &KeyRing,
    expect: Expect<'_>,
    target: &Path,
    force: bool,
    cancel: &CancellationToken,
) -> Result<String, BackupError> {
    if target.exists() && !force {
        return Err(BackupError::Refused(format!(
            "{} exists; add --force to replace it (stop the application using it first)",
            target.display()
        )));
    }
    if target.is_dir() {
        return Err(BackupError::Refused(format!(
            "{} is a directory; name the database file",
            target.display()
        )));
    }
    verify::read_pass(archive, keys, Some(expect), cancel).await?;
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    let tmp = Scratch(verify::sibling_temp(target));
    verify::decode_to_file(archive, keys, &tmp.0, cancel).await?;
    verify::integrity_check(&tmp.0).await?;
    // A stale WAL beside the new file would be replayed into it.
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut side = target.as_os_str().to_owned();
        side.push(suffix);
        match std::fs::remove_file(&side) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(BackupError::Io {
                    what: "cannot remove",
                    path: side.into(),
                    source: e,
                })
            }
            _ => {}
        }
    }
    std::fs::rename(&tmp.0, target)
        .and_then(|()| sync_dir(&dir))
        .map_err(|source| BackupError::Io {
            what: "cannot move the restored file to",
            path: target.to_owned(),
            source,
        })?;
    Ok(format!("restored to {}", target.display()))
}

async fn restore_postgres(
    archive: &Path,
    keys: &KeyRing,
    expect: Expect<'_>,
    url: &str,
    opts: &Options<'_>,
    cancel: &CancellationToken,
) -> Result<String, BackupError> {
    let cfg = DatabaseConfig {
        name: "restore-target".to_owned(),
        url: url.to_owned(),
        password_file: None,
        connect_timeout: Duration::from_secs(10),
        foreign_keys: false,
        backup: None,
        retention: Vec::new(),
        refresh: Vec::new(),
        migrate: None,
        sql: Vec::new(),
    };
    let Database::Postgres(pg) = Database::open(&cfg)? else {
        return Err(BackupError::Refused(
            "--to must be a postgres:// URL".to_owned(),
        ));
    };
    let name = pg.database_name();
    let exists = pg.database_exists(&name).await?;
    let mut args = Vec::new();
    if !exists && !opts.create {
        return Err(BackupError::Refused(format!(
            "database \"{name}\" does not exist on the target server; add --create to create it"
        )));
    }
    if exists {
        let tables = pg.user_table_count().await?;
        if tables > 0 && !opts.force {
            return Err(BackupError::Refused(format!(
                "database \"{name}\" already has {tables} tables or other relations; add --force to restore over them \
                 (pg_restore --clean --if-exists)"
            )));
        }
        if tables > 0 {
            args.extend(["--clean", "--if-exists"]);
        }
    }
    // Authenticate everything before the first byte reaches the target.
    verify::read_pass(archive, keys, Some(expect), cancel).await?;
    if !exists {
        pg.create_database(&name).await?;
    }
    let restored =
        verify::pg_restore_into(&pg, opts.pg_restore, &name, archive, keys, &args, cancel).await;
    pg_close(&pg).await;
    restored?;
    Ok(format!("restored into database \"{name}\" ({})", pg.url))
}

async fn pg_close(pg: &Postgres) {
    pg.pool.close().await;
}

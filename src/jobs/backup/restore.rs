//! `dbkeeper restore`: put a backup back, without ever leaving a half-restored target.
//!
//! Both backends read the archive in one pass over one open file handle
//! (authenticated, decompressed, hashed and compared with the manifest) into
//! something that is not the target yet, so a tampered or truncated archive never
//! reaches the target.
//!
//! SQLite: the image is written beside the target, checked with
//! `PRAGMA integrity_check`, given the target's owner, group, mode and journal mode,
//! and renamed over it; the target's `-wal`/`-shm`/`-journal` are moved aside first
//! and put back if anything fails, so committed transactions in a WAL are never lost.
//!
//! PostgreSQL: the archive is streamed into a fresh scratch database on the same
//! server while it is authenticated (see [`super::pg_restore`]), then one transaction
//! renames the target away and the scratch database into its place. Until that commit the target is untouched; a failure anywhere before it
//! drops the scratch database and leaves the target exactly as it was.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;

use super::source::Scratch;
use super::verify::{self, Durability, Expect, PrivateDir};
use super::{pg_restore, BackupError};
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
    /// Private scratch space (`<state-dir>/tmp`) for the decoded PostgreSQL image.
    pub scratch_dir: &'a Path,
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

/// The files SQLite keeps beside a database, which belong to the old one.
const SIDE_FILES: [&str; 3] = ["-wal", "-shm", "-journal"];

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The target's side files, moved aside (renamed, never deleted) until the new file
/// is in place; dropped without [`Aside::discard`], they are put back.
struct Aside {
    moved: Vec<(PathBuf, PathBuf)>,
}

impl Aside {
    fn take(target: &Path) -> Result<Self, BackupError> {
        let mut aside = Aside { moved: Vec::new() };
        let tag = std::process::id();
        for suffix in SIDE_FILES {
            let side = with_suffix(target, suffix);
            let parked = verify::sibling_temp(&with_suffix(target, &format!("{suffix}.{tag}")));
            match std::fs::rename(&side, &parked) {
                Ok(()) => aside.moved.push((side, parked)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // `aside` goes out of scope here and puts back what it moved.
                Err(source) => {
                    return Err(BackupError::Io {
                        what: "cannot move aside",
                        path: side,
                        source,
                    })
                }
            }
        }
        Ok(aside)
    }

    /// The new database is in place: the old side files are of no use any more.
    fn discard(mut self) {
        for (_, parked) in self.moved.drain(..) {
            let _ = std::fs::remove_file(parked);
        }
    }
}

impl Drop for Aside {
    fn drop(&mut self) {
        for (side, parked) in self.moved.drain(..) {
            if let Err(e) = std::fs::rename(&parked, &side) {
                tracing::error!(
                    "cannot put {} back from {}: {e}; move it back by hand before opening the database",
                    side.display(),
                    parked.display()
                );
            }
        }
    }
}

/// What the restored file inherits from the file it replaces.
struct Inherit {
    mode: u32,
    uid: u32,
    gid: u32,
    wal: bool,
}

/// SQLite records WAL mode in bytes 18 and 19 of the file header (2 = WAL).
fn is_wal(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut header = [0u8; 20];
    let mut file = std::fs::File::open(path)?;
    match file.read_exact(&mut header) {
        Ok(()) => Ok(header[18] == 2 && header[19] == 2),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

fn inherit_from(target: &Path) -> Result<Option<Inherit>, BackupError> {
    let meta = match std::fs::metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(BackupError::Io {
                what: "cannot read",
                path: target.to_owned(),
                source,
            })
        }
    };
    let wal = is_wal(target).map_err(|source| BackupError::Io {
        what: "cannot read",
        path: target.to_owned(),
        source,
    })?;
    Ok(Some(Inherit {
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        wal,
    }))
}

/// Gives the restored file `image` the journal mode, owner, group and mode of the
/// file it will replace.
async fn apply_inherited(image: &Path, from: &Inherit) -> Result<(), BackupError> {
    if is_wal(image).unwrap_or(false) != from.wal {
        let mode = if from.wal { "WAL" } else { "DELETE" };
        let fail = |e: sqlx::Error| {
            BackupError::Internal(format!(
                "cannot set journal_mode={mode} on the restored file: {e}"
            ))
        };
        let mut conn = SqliteConnectOptions::new()
            .filename(image)
            .connect()
            .await
            .map_err(fail)?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PRAGMA journal_mode = {mode}")))
            .execute(&mut conn)
            .await
            .map_err(fail)?;
        conn.close().await.map_err(fail)?;
    }
    let meta = std::fs::metadata(image).map_err(|source| BackupError::Io {
        what: "cannot read",
        path: image.to_owned(),
        source,
    })?;
    if (meta.uid(), meta.gid()) != (from.uid, from.gid) {
        std::os::unix::fs::chown(image, Some(from.uid), Some(from.gid)).map_err(|source| {
            BackupError::Io {
                what: "cannot give the target's owner and group (run as that owner or root) to",
                path: image.to_owned(),
                source,
            }
        })?;
    }
    // After chown, which may clear set-id bits.
    std::fs::set_permissions(
        image,
        std::os::unix::fs::PermissionsExt::from_mode(from.mode),
    )
    .map_err(|source| BackupError::Io {
        what: "cannot set the target's mode on",
        path: image.to_owned(),
        source,
    })
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
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = Scratch(verify::sibling_temp(target));
    verify::decode_to_file(
        archive,
        keys,
        Some(expect),
        &tmp.0,
        Durability::Synced,
        cancel,
    )
    .await?;
    verify::integrity_check(&tmp.0).await?;
    if let Some(from) = inherit_from(target)? {
        apply_inherited(&tmp.0, &from).await?;
    }
    // A WAL beside the new file would be replayed into it; park it (never delete it)
    // until the rename below, the commit point, has happened.
    let aside = Aside::take(target)?;
    if let Err(source) = std::fs::rename(&tmp.0, target) {
        drop(aside);
        return Err(rename_refused(target, source));
    }
    aside.discard();
    sync_dir(&dir).map_err(|source| BackupError::Io {
        what: "cannot sync the directory of",
        path: target.to_owned(),
        source,
    })?;
    Ok(format!("restored to {}", target.display()))
}

/// The rename of the restored file over the target failed; nothing was changed.
fn rename_refused(target: &Path, source: std::io::Error) -> BackupError {
    // EBUSY: the target is a mount point (a bind-mounted file in a container);
    // EXDEV: it is on another file system. Copying into it in place would not be
    // atomic, so dbkeeper refuses rather than risk a torn database.
    if matches!(source.raw_os_error(), Some(16) | Some(18)) {
        return BackupError::Refused(format!(
            "cannot replace {} atomically ({source}): it is a mount point or on another file system; \
             restore to a new file next to it and copy that over the target with the application stopped \
             (the target and its WAL are untouched)",
            target.display()
        ));
    }
    BackupError::Io {
        what: "cannot move the restored file to (the target and its WAL are untouched)",
        path: target.to_owned(),
        source,
    }
}

async fn restore_postgres(
    archive: &Path,
    keys: &KeyRing,
    expect: Expect<'_>,
    url: &str,
    opts: &Options<'_>,
    cancel: &CancellationToken,
) -> Result<String, BackupError> {
    let Database::Postgres(pg) = Database::open(&target_config(url))? else {
        return Err(BackupError::Refused(
            "--to must be a postgres:// URL".to_owned(),
        ));
    };
    let result = restore_postgres_with(&pg, archive, keys, expect, opts, cancel).await;
    pg.pool.close().await;
    result
}

/// A database entry for a restore target given only by its URL (`--to`).
pub fn target_config(url: &str) -> DatabaseConfig {
    DatabaseConfig {
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
    }
}

async fn restore_postgres_with(
    pg: &Postgres,
    archive: &Path,
    keys: &KeyRing,
    expect: Expect<'_>,
    opts: &Options<'_>,
    cancel: &CancellationToken,
) -> Result<String, BackupError> {
    pg.tidy_scratch_databases().await;
    // Decoded once from the URL, and used as is for every statement and tool below.
    let name = pg.database_name();
    let exists = pg.database_exists(&name).await?;
    if !exists && !opts.create {
        return Err(BackupError::Refused(format!(
            "database \"{name}\" does not exist on the target server; add --create to create it"
        )));
    }
    if exists {
        let tables = pg.user_table_count().await?;
        if tables > 0 && !opts.force {
            return Err(BackupError::Refused(format!(
                "database \"{name}\" already has {tables} tables or other relations; add --force to replace it \
                 (it is swapped out only after the restore succeeded)"
            )));
        }
    }
    // Our own pool holds a session on the target; the swap needs none.
    pg.pool.close().await;
    let dir = PrivateDir::new(opts.scratch_dir)?;
    let scratch = verify::scratch_database_name(&name, "restore")?;
    let _claim = pg.claim_scratch(&scratch).await?;
    pg.create_database_like(&scratch, &name).await?;
    let fill = pg_restore::Target {
        pg,
        program: opts.pg_restore,
        database: &scratch,
        args: &[],
        private_dir: dir.path(),
    };
    let swapped = fill_and_swap(&fill, &name, archive, keys, expect, opts, cancel).await;
    drop(dir); // plaintext off the disk as soon as it is no longer needed
    let old = match swapped {
        Ok(old) => old,
        Err(e) => {
            // Nothing of the scratch database may survive a failed restore.
            if let Err(d) = pg.drop_database(&scratch).await {
                tracing::warn!(
                    "cannot drop the scratch database \"{scratch}\": {d}; drop it by hand"
                );
            }
            return Err(e);
        }
    };
    if exists {
        if let Err(e) = pg.drop_database(&old).await {
            tracing::warn!(
                "restored, but cannot drop the previous contents, now database \"{old}\": {e}; drop it by hand"
            );
        }
    }
    Ok(format!("restored into database \"{name}\" ({})", pg.url))
}

/// Restores the archive into the scratch database, then swaps it in for `name`; returns
/// the name the previous database now has.
async fn fill_and_swap(
    fill: &pg_restore::Target<'_>,
    name: &str,
    archive: &Path,
    keys: &KeyRing,
    expect: Expect<'_>,
    opts: &Options<'_>,
    cancel: &CancellationToken,
) -> Result<String, BackupError> {
    let (pg, scratch) = (fill.pg, fill.database);
    pg_restore::restore_archive(fill, archive, keys, Some(expect), cancel).await?;
    if cancel.is_cancelled() {
        return Err(BackupError::Cancelled);
    }
    let old = verify::scratch_database_name(name, "old")?;
    pg.swap_databases(name, scratch, &old, opts.force)
        .await
        .map_err(|e| {
            BackupError::Refused(format!(
                "cannot swap the restored database in for \"{name}\" ({e}); the target is unchanged \
                 (other sessions on it? stop them or add --force to end them)"
            ))
        })?;
    Ok(old)
}

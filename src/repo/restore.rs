//! `dbkeeper restore`: put a backup back, without ever leaving a half-restored target.
//!
//! Both backends read the archive in one pass over one open file handle
//! (authenticated, decompressed, hashed and compared with the manifest) into
//! something that is not the target yet, so a tampered or truncated archive never
//! reaches the target.
//!
//! SQLite: the image is written beside the target, checked with
//! `PRAGMA integrity_check`, given the target's owner, group, mode and journal mode,
//! and renamed over it (`--force`) or hard-linked to it (which fails if a file
//! appeared there meanwhile). A target that is replaced is first made self-contained
//! by SQLite (see [`super::settle`]: WAL checkpointed, hot journal rolled back; refused
//! while another connection is in a transaction), then its `-wal`/`-shm`/`-journal`
//! are moved aside and put back if anything fails, so no committed transaction is ever
//! lost and no uncommitted one ever shows, even if the restore is killed half-way.
//! Only a regular file is ever a target: anything else is refused before it is
//! opened.
//!
//! PostgreSQL: the archive is streamed into a fresh scratch database on the same
//! server while it is authenticated (see [`super::pg_restore`]), then one transaction
//! renames the target away and the scratch database into its place. Before the swap,
//! the scratch database is checked against the dump's table of contents (see
//! [`super::pg_check`]): pg_restore's exit 0 alone never lets it in. Until that commit
//! the target is untouched; a failure anywhere before it drops the scratch database
//! and leaves the target exactly as it was. Without `--force`, the renamed target is
//! checked for user objects again after the commit and the swap undone if it has any.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;

use super::settle;
use super::sibling::{self, SiblingTemp};
use super::verify::{self, Durability, Expect, PrivateDir};
use super::{pg_restore, BackupError};
use crate::config::{Backend, DatabaseConfig};
use crate::db::{Created, Database, Postgres, SwapMode, Swapped};
use crate::repo::archive::KeyRing;
use crate::repo::catalog::{Manifest, TrustPolicy};
use crate::repo::storage::{sync_dir, Object};

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
    /// PostgreSQL: create the archive's roles and memberships that are missing on the
    /// target server before the data (never altering an existing role).
    pub with_roles: bool,
}

/// Restores the backup `manifest` (its archive open as `archive`) to `target`: a file path for
/// SQLite backups, a `postgres://` URL for PostgreSQL ones.
pub async fn restore(
    archive: &dyn Object,
    manifest: &Manifest,
    keys: &KeyRing,
    target: &str,
    opts: &Options<'_>,
    cancel: &CancellationToken,
) -> Result<String, BackupError> {
    let expect = Expect::trusted(manifest, opts.trust);
    let is_url = target.starts_with("postgres://") || target.starts_with("postgresql://");
    match (manifest.backend(), is_url) {
        (Some(Backend::Sqlite), _) if opts.with_roles => Err(BackupError::Refused(
            "--with-roles is for PostgreSQL backups; a SQLite database has no roles".to_owned(),
        )),
        (Some(Backend::Sqlite), false) => {
            restore_sqlite(archive, keys, expect, Path::new(target), opts.force, cancel).await
        }
        (Some(Backend::Postgres), true) => {
            restore_postgres(archive, keys, expect, target, opts, cancel).await
        }
        (Some(Backend::Sqlite), true) => Err(BackupError::Refused(
            "this is a SQLite backup; --to must be a file path".to_owned(),
        )),
        _ => Err(BackupError::Refused(
            "this is a PostgreSQL backup; --to must be a postgres:// URL".to_owned(),
        )),
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
fn is_wal(file: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::Read;
    let mut header = [0u8; 20];
    match file.read_exact(&mut header) {
        Ok(()) => Ok(header[18] == 2 && header[19] == 2),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

fn is_wal_file(path: &Path) -> std::io::Result<bool> {
    is_wal(&mut std::fs::File::open(path)?)
}

/// What is at the SQLite target path, looked at without following a link or opening
/// anything: only a regular file (or nothing) can be restored over. A FIFO would block
/// the open forever, and renaming over a device node, socket or link would replace
/// something that is not a database.
/// True when a regular file is there, false when nothing is.
fn usable_target(target: &Path) -> Result<bool, BackupError> {
    let meta = match std::fs::symlink_metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(BackupError::Io {
                what: "cannot look at",
                path: target.to_owned(),
                source,
            })
        }
    };
    let kind = meta.file_type();
    if kind.is_file() {
        return Ok(true);
    }
    if kind.is_symlink() {
        let points_to = std::fs::canonicalize(target)
            .or_else(|_| std::fs::read_link(target))
            .map_or_else(
                |_| "its destination".to_owned(),
                |p| p.display().to_string(),
            );
        return Err(BackupError::Refused(format!(
            "{} is a symbolic link; restore to the file it points to, {points_to}",
            target.display()
        )));
    }
    if kind.is_dir() {
        return Err(BackupError::Refused(format!(
            "{} is a directory; name the database file",
            target.display()
        )));
    }
    use std::os::unix::fs::FileTypeExt;
    let what = if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(BackupError::Refused(format!(
        "{} is {what}, not a database file; restore to a regular file",
        target.display()
    )))
}

fn inherit_from(target: &Path) -> Result<Option<Inherit>, BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    if !usable_target(target)? {
        return Ok(None);
    }
    let read_err = |source| BackupError::Io {
        what: "cannot read",
        path: target.to_owned(),
        source,
    };
    // Checked above, but it may have been swapped since: never follow a link, never
    // wait for a FIFO's writer, and look at what was actually opened.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(target)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(BackupError::Refused(format!(
            "{} is not a regular file any more; restore to a regular file",
            target.display()
        )));
    }
    let wal = is_wal(&mut file).map_err(read_err)?;
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
    if is_wal_file(image).unwrap_or(false) != from.wal {
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
    archive: &dyn Object,
    keys: &KeyRing,
    expect: Expect<'_>,
    target: &Path,
    force: bool,
    cancel: &CancellationToken,
) -> Result<String, BackupError> {
    // First, whatever else happens: a WAL an interrupted restore parked goes back
    // before the application finds its database without it.
    for done in sibling::recover(target)? {
        tracing::warn!("{done}");
    }
    // Before anything is decoded or opened: an unusable target is refused even with
    // --force.
    if usable_target(target)? && !force {
        return Err(exists_refusal(target));
    }
    // A side file without its database (moved aside after a crash) may hold the only
    // copy of committed transactions: a new database there would make SQLite take it
    // for its own, and parking it would delete it (adversary round 5 on issue 15).
    if !target.exists() {
        for side in ["-wal", "-journal"] {
            let mut name = target.as_os_str().to_owned();
            name.push(side);
            let path = PathBuf::from(name);
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.len() > 0) {
                return Err(BackupError::Refused(format!(
                    "{} exists without its database: it may hold committed transactions of the database that was at {} (moved or deleted); move it away together with that database (SQLite needs both to recover them), or restore to another name",
                    path.display(),
                    target.display()
                )));
            }
        }
    }
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    // Locked while it exists: a restore killed mid-way leaves a file the next one
    // knows to remove.
    let tmp = SiblingTemp::create(target)?;
    let input = verify::read_all(archive)?;
    verify::decode_handle_into(
        input,
        keys,
        Some(expect),
        (tmp.writer()?, tmp.path()),
        Durability::Synced,
        cancel,
    )
    .await?;
    tokio::select! {
        checked = verify::integrity_check(tmp.path()) => checked?,
        _ = cancel.cancelled() => return Err(BackupError::Cancelled),
    }
    if force {
        if let Some(from) = inherit_from(target)? {
            apply_inherited(tmp.path(), &from).await?;
        }
    } else if usable_target(target)? {
        return Err(appeared_refusal(target));
    }
    if cancel.is_cancelled() {
        return Err(BackupError::Cancelled);
    }
    // A WAL beside the new file would be replayed into it; park it (never delete it)
    // until the rename below, the commit point, has happened. With --force the target
    // is first made self-contained (WAL checkpointed, hot journal rolled back), so that
    // a restore killed between here and the rename leaves a complete database behind
    // and side files holding nothing (see `settle`). Without --force nothing was there.
    let parked = if force {
        settle::settle_and_park(&tmp, target).await?
    } else {
        tmp.park_side_files(target)?
    };
    let published = if force {
        std::fs::rename(tmp.path(), target).map_err(|e| rename_refused(target, e))
    } else {
        publish_new(tmp.path(), target)
    };
    if let Err(e) = published {
        drop(parked);
        return Err(e);
    }
    parked.discard();
    sync_dir(&dir).map_err(|source| BackupError::Io {
        what: "cannot sync the directory of",
        path: target.to_owned(),
        source,
    })?;
    Ok(format!("restored to {}", target.display()))
}

fn exists_refusal(target: &Path) -> BackupError {
    BackupError::Refused(format!(
        "{} exists; add --force to replace it (stop the application using it first)",
        target.display()
    ))
}

fn appeared_refusal(target: &Path) -> BackupError {
    BackupError::Refused(format!(
        "{} appeared while restoring; nothing was replaced (add --force to replace it)",
        target.display()
    ))
}

/// Puts `tmp` at `target` only if nothing is there: a hard link fails with `EEXIST`
/// atomically, where a rename would replace a file created since the check.
fn publish_new(tmp: &Path, target: &Path) -> Result<(), BackupError> {
    match std::fs::hard_link(tmp, target) {
        Ok(()) => {
            // `SiblingTemp` removes the other name too; this is only the early path.
            let _ = std::fs::remove_file(tmp);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(appeared_refusal(target)),
        Err(source)
            if matches!(
                source.raw_os_error(),
                Some(libc::EPERM) | Some(libc::EOPNOTSUPP) | Some(libc::EMLINK)
            ) =>
        {
            Err(BackupError::Refused(format!(
                "cannot put the restored file at {} without risking replacing a file created \
                 meanwhile: this file system refuses hard links ({source}); restore with --force \
                 once you are sure nothing is there, or restore elsewhere and move the file",
                target.display()
            )))
        }
        Err(source) => Err(BackupError::Io {
            what: "cannot move the restored file to",
            path: target.to_owned(),
            source,
        }),
    }
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
             (the target keeps all it held; its WAL, if it had one, was checkpointed into it)",
            target.display()
        ));
    }
    BackupError::Io {
        what: "cannot move the restored file to (the target keeps all it held)",
        path: target.to_owned(),
        source,
    }
}

async fn restore_postgres(
    archive: &dyn Object,
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
    DatabaseConfig::connection_only("restore-target", url, None, Duration::from_secs(10))
}

async fn restore_postgres_with(
    pg: &Postgres,
    archive: &dyn Object,
    keys: &KeyRing,
    expect: Expect<'_>,
    opts: &Options<'_>,
    cancel: &CancellationToken,
) -> Result<String, BackupError> {
    // Decoded once from the URL, and used as is for every statement and tool below.
    let name = pg.database_name();
    if crate::db::is_scratch_name(&name) {
        // The crash clean-up drops databases of that shape whose owner is gone: a
        // user's database must never have one.
        return Err(BackupError::Refused(format!(
            "database \"{name}\" has the name of a dbkeeper scratch database (…_dbk_restore_/_old_/_verify_<8 hex>), \
             which dbkeeper drops when their restore is gone; restore under another name"
        )));
    }
    pg.tidy_scratch_databases().await;
    let exists = pg.database_exists(&name).await?;
    if !exists && !opts.create {
        return Err(BackupError::Refused(format!(
            "database \"{name}\" does not exist on the target server; add --create to create it"
        )));
    }
    if exists && !opts.force {
        let found = pg.user_objects_in(&name).await?;
        if !found.is_empty() {
            return Err(BackupError::Refused(format!(
                "database \"{name}\" is not empty ({found}); add --force to replace it \
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
    let mode = if opts.force {
        SwapMode::Force
    } else if exists {
        SwapMode::ReplaceIfEmpty
    } else {
        SwapMode::RequireAbsent
    };
    let fill = pg_restore::Target {
        pg,
        program: opts.pg_restore,
        database: &scratch,
        args: &[],
        private_dir: dir.path(),
        with_roles: opts.with_roles,
    };
    let swapped = fill_and_swap(&fill, &name, mode, archive, keys, expect, cancel).await;
    drop(dir); // plaintext off the disk as soon as it is no longer needed
    let (old, roles) = match swapped {
        Ok(done) => done,
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
    if let Some(old) = old {
        if let Err(e) = pg.drop_database(&old).await {
            tracing::warn!(
                "restored, but cannot drop the previous contents, now database \"{old}\": {e}; drop it by hand"
            );
        }
    }
    let mut done = format!("restored into database \"{name}\" ({})", pg.url);
    if let Some(created) = roles {
        done.push_str(&roles_note(&created));
    }
    Ok(done)
}

/// `; roles created: …; memberships granted: …; existing roles left unchanged: …`.
fn roles_note(created: &Created) -> String {
    let list = |names: &[String]| {
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    };
    let mut note = format!(
        "; roles created: {}; memberships granted: {}; existing roles left unchanged: {}",
        list(&created.roles),
        list(&created.memberships),
        list(&created.existing)
    );
    if !created.not_granted.is_empty() {
        note.push_str(&format!(
            "; NOT granted: {}",
            created.not_granted.join(", ")
        ));
    }
    note
}

/// A pg_restore failure because a role is missing on this server: say what fixes it.
fn suggest_with_roles(e: BackupError, with_roles: bool) -> BackupError {
    match e {
        BackupError::Tool {
            program,
            status,
            stderr,
        } if !with_roles && stderr.contains("role \"") && stderr.contains("does not exist") => {
            BackupError::Tool {
                program,
                status,
                stderr: format!(
                    "{stderr} (a role the backup needs is missing on this server: add --with-roles \
                     to create the missing roles from the backup, or create them by hand)"
                ),
            }
        }
        other => other,
    }
}

/// Restores the archive into the scratch database, then swaps it in for `name`; returns
/// the name the previous database now has, if there was one and it is to be dropped.
///
/// Without `--force`, nothing the target holds at the moment of the swap may be lost,
/// although it may have changed since the check at the start: with `--create` the swap
/// refuses a target that appeared meanwhile; onto an existing (empty) target, the
/// renamed old database is checked again once nobody can reach it any more, and if it
/// is not empty the swap is undone.
async fn fill_and_swap(
    fill: &pg_restore::Target<'_>,
    name: &str,
    mode: SwapMode,
    archive: &dyn Object,
    keys: &KeyRing,
    expect: Expect<'_>,
    cancel: &CancellationToken,
) -> Result<(Option<String>, Option<Created>), BackupError> {
    let (pg, scratch) = (fill.pg, fill.database);
    let restored = pg_restore::restore_archive(fill, archive, keys, Some(expect), cancel)
        .await
        .map_err(|e| match e {
            BackupError::Unrestored(m) => {
                BackupError::Unrestored(format!("{m}; the target was not touched"))
            }
            other => suggest_with_roles(other, fill.with_roles),
        })?;
    let roles = match restored.roles {
        Some((created, owner)) => {
            // A new database gets the owner the backed-up one had (pg_dump does not
            // carry it); an existing target keeps its own (create_database_like).
            // Best effort: a restorer with CREATEROLE but no membership in the owner
            // role may not hand the database over; the data is restored all the same.
            if let (Some(owner), SwapMode::RequireAbsent) = (owner, mode) {
                if let Err(e) = pg.set_database_owner(scratch, &owner).await {
                    tracing::warn!(
                        "cannot give the restored database to its owner \"{owner}\" ({e}); \
                         run ALTER DATABASE … OWNER TO … by hand"
                    );
                }
            }
            Some(created)
        }
        None => None,
    };
    if cancel.is_cancelled() {
        return Err(BackupError::Cancelled);
    }
    // Not `_dbk_old_` without --force: until it has been found empty, the renamed
    // target is not ours to drop, and the crash-leftover cleaner drops `_old_` ones.
    let old = verify::scratch_database_name(
        name,
        if mode == SwapMode::Force {
            "old"
        } else {
            "kept"
        },
    )?;
    let swapped = pg
        .swap_databases(name, scratch, &old, mode)
        .await
        .map_err(|e| {
            BackupError::Refused(format!(
                "cannot swap the restored database in for \"{name}\" ({e}); the target is unchanged \
                 (other sessions on it? stop them or add --force to end them)"
            ))
        })?;
    let kept = match swapped {
        Swapped::Created => Ok(None),
        Swapped::TargetAppeared => Err(BackupError::Refused(format!(
            "database \"{name}\" was created while restoring; nothing was replaced \
             (add --force to replace it)"
        ))),
        Swapped::Replaced if mode == SwapMode::Force => Ok(Some(old)),
        Swapped::Replaced => {
            // Renamed, with no session on it (the rename needs none) under a random
            // name: what it holds now is what the target held at the swap.
            let found = pg.user_objects_in(&old).await;
            if matches!(&found, Ok(f) if f.is_empty()) {
                return Ok((Some(old), roles));
            }
            let found = match found {
                Ok(f) => f.to_string(),
                Err(e) => format!("cannot tell: {e}"),
            };
            if let Err(e) = pg.unswap_databases(name, scratch, &old).await {
                return Err(BackupError::Internal(format!(
                    "the target changed during the restore ({found}) and the swap cannot be undone ({e}): \
                     its previous contents are in database \"{old}\" and the restored ones in \"{name}\"; \
                     rename them by hand (nothing was dropped)"
                )));
            }
            Err(BackupError::Refused(format!(
                "the target changed during the restore; nothing was replaced \
                 (database \"{name}\" now holds {found}; add --force to replace it)"
            )))
        }
    }?;
    Ok((kept, roles))
}

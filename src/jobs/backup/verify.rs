//! Checking a backup: `read` (SHA-256, full authenticated decryption, full
//! decompression) and `restore` (additionally restore into a scratch database and
//! check it: `PRAGMA integrity_check`, or `pg_restore` into a scratch PostgreSQL
//! database that is dropped afterwards).

use std::fs::File;
use std::io::{BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio_util::io::SyncIoBridge;
use tokio_util::sync::CancellationToken;

use super::source::{tail, Scratch};
use super::BackupError;
use crate::archive::{self, HashRead, Header, KeyRing};
use crate::catalog::{self, Manifest, TrustPolicy, VerifyMode};
use crate::db::{Database, Postgres};

/// What a read pass found.
#[derive(Debug, Clone)]
pub struct ReadReport {
    pub header: Header,
    pub sha256: String,
    pub stored_bytes: u64,
    pub raw_bytes: u64,
}

/// Expected values from the manifest (or from writing).
pub struct Expect<'a> {
    pub sha256: &'a str,
    pub raw_bytes: u64,
    /// The manifest and policy the authenticated header must agree with.
    pub trust: Option<(&'a Manifest, &'a TrustPolicy)>,
}

impl<'a> Expect<'a> {
    /// Everything `manifest` claims, checked against `policy` once the header is
    /// authenticated (the listing only read it).
    pub fn trusted(manifest: &'a Manifest, policy: &'a TrustPolicy) -> Self {
        Expect {
            sha256: &manifest.sha256,
            raw_bytes: manifest.raw_bytes,
            trust: Some((manifest, policy)),
        }
    }
}

/// Runs a blocking archive operation; cancelling sets its stop flag.
async fn blocking<T: Send + 'static>(
    cancel: &CancellationToken,
    work: impl FnOnce(&AtomicBool) -> Result<T, BackupError> + Send + 'static,
) -> Result<T, BackupError> {
    let flag = Arc::new(AtomicBool::new(false));
    let stop = flag.clone();
    let mut task = tokio::task::spawn_blocking(move || work(&stop));
    let joined = tokio::select! {
        j = &mut task => j,
        _ = cancel.cancelled() => {
            flag.store(true, Ordering::Relaxed);
            task.await
        }
    };
    if cancel.is_cancelled() {
        return Err(BackupError::Cancelled);
    }
    joined.map_err(|e| BackupError::Internal(format!("worker thread failed: {e}")))?
}

fn open_archive(path: &Path) -> Result<File, BackupError> {
    File::open(path).map_err(|source| BackupError::Io {
        what: "cannot open the archive",
        path: path.to_owned(),
        source,
    })
}

/// Decrypts and decompresses the whole archive, hashing the file on the way.
pub async fn read_pass(
    path: &Path,
    keys: &KeyRing,
    expect: Option<Expect<'_>>,
    cancel: &CancellationToken,
) -> Result<ReadReport, BackupError> {
    let file = open_archive(path)?;
    let keys = keys.clone();
    let report = blocking(cancel, move |stop| {
        let mut input = HashRead::new(BufReader::with_capacity(1 << 20, file));
        let (_, header, raw_bytes) =
            archive::read_archive(&mut input, &keys, std::io::sink(), stop)
                .map_err(BackupError::from_archive)?;
        let (stored_bytes, sha256) = input
            .finish()
            .map_err(|e| BackupError::from_archive(e.into()))?;
        Ok(ReadReport {
            header,
            sha256,
            stored_bytes,
            raw_bytes,
        })
    })
    .await?;
    if let Some(expect) = expect {
        if report.sha256 != expect.sha256 {
            return Err(BackupError::Verification(format!(
                "SHA-256 of the archive is {}, the manifest says {}: the file changed after it was written",
                report.sha256, expect.sha256
            )));
        }
        if report.raw_bytes != expect.raw_bytes {
            return Err(BackupError::Verification(format!(
                "the archive holds {} bytes of database image, the manifest says {}",
                report.raw_bytes, expect.raw_bytes
            )));
        }
        if let Some((manifest, policy)) = expect.trust {
            catalog::trust(
                manifest,
                &report.header,
                &Manifest::manifest_name(&manifest.id),
                policy,
            )
            .map_err(|reason| BackupError::Untrusted {
                id: manifest.id.clone(),
                reason,
            })?;
        }
    }
    Ok(report)
}

/// Everything a restore test needs besides the archive.
pub struct ScratchTarget<'a> {
    pub db: &'a Database,
    pub pg_restore: &'a Path,
    pub scratch_dir: &'a Path,
}

/// `read`, then (for `restore`) a restore into a scratch database.
pub async fn verify(
    path: &Path,
    keys: &KeyRing,
    mode: VerifyMode,
    expect: Option<Expect<'_>>,
    target: &ScratchTarget<'_>,
    cancel: &CancellationToken,
) -> Result<(), BackupError> {
    if mode == VerifyMode::None {
        return Ok(());
    }
    read_pass(path, keys, expect, cancel).await?;
    if mode == VerifyMode::Restore {
        restore_test(path, keys, target, cancel).await?;
    }
    Ok(())
}

/// Restores into a scratch database and checks it.
pub async fn restore_test(
    path: &Path,
    keys: &KeyRing,
    target: &ScratchTarget<'_>,
    cancel: &CancellationToken,
) -> Result<(), BackupError> {
    match target.db {
        Database::Sqlite(_) => {
            let dir = target.scratch_dir;
            let image = Scratch(
                crate::storage::scratch_file(dir, "verify", ".sqlite").map_err(|source| {
                    BackupError::Io {
                        what: "cannot create a scratch file in",
                        path: dir.to_owned(),
                        source,
                    }
                })?,
            );
            // Reserved under this process's token; decoding creates it anew.
            let _ = std::fs::remove_file(&image.0);
            decode_to_file(path, keys, &image.0, cancel).await?;
            integrity_check(&image.0).await
        }
        Database::Postgres(pg) => {
            restore_test_postgres(pg, target.pg_restore, path, keys, cancel).await
        }
    }
}

/// Checks that the file on disk is byte for byte what was written (and checked).
pub async fn stored_sha_matches(
    path: &Path,
    sha256: &str,
    cancel: &CancellationToken,
) -> Result<(), BackupError> {
    let file = open_archive(path)?;
    let sha = sha256.to_owned();
    let found = blocking(cancel, move |_| {
        archive::sha256_of(BufReader::with_capacity(1 << 20, file))
            .map(|(found, _)| found)
            .map_err(|e| BackupError::from_archive(e.into()))
    })
    .await?;
    if found != sha {
        return Err(BackupError::Verification(format!(
            "the stored file's SHA-256 is {found}, but {sha} was written: the storage changed the data"
        )));
    }
    Ok(())
}

/// Writes the plain image of the archive to `out` (which must not exist, and is
/// created 0600: it is plaintext), fsynced.
pub async fn decode_to_file(
    archive_path: &Path,
    keys: &KeyRing,
    out: &Path,
    cancel: &CancellationToken,
) -> Result<Header, BackupError> {
    let input = open_archive(archive_path)?;
    let (keys, out) = (keys.clone(), out.to_owned());
    blocking(cancel, move |stop| {
        let io_err = |what, source| BackupError::Io {
            what,
            path: out.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&out)
            .map_err(|e| io_err("cannot create", e))?;
        let (mut file, header, _) =
            archive::read_archive(BufReader::with_capacity(1 << 20, input), &keys, file, stop)
                .map_err(BackupError::from_archive)?;
        file.flush()
            .and_then(|()| file.sync_all())
            .map_err(|e| io_err("cannot write", e))?;
        Ok(header)
    })
    .await
}

/// `PRAGMA integrity_check` on a SQLite file, opened read-only.
pub async fn integrity_check(path: &Path) -> Result<(), BackupError> {
    let fail = |detail: String| {
        BackupError::Verification(format!(
            "restored SQLite file fails its integrity check: {detail}"
        ))
    };
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await
        .map_err(|e| fail(e.to_string()))?;
    let rows: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_all(&mut conn)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let _ = conn.close().await;
    if rows != ["ok"] {
        return Err(fail(rows.join("; ")));
    }
    Ok(())
}

/// Restores into a fresh scratch database on the same server, then drops it.
async fn restore_test_postgres(
    pg: &Postgres,
    pg_restore: &Path,
    archive_path: &Path,
    keys: &KeyRing,
    cancel: &CancellationToken,
) -> Result<(), BackupError> {
    let suffix: [u8; 4] = crate::archive::crypto::random_bytes()
        .map_err(|e| BackupError::Archive(crate::archive::ArchiveError::from(e)))?;
    let scratch = format!("dbkeeper_verify_{}", hex::encode(suffix));
    pg.create_database(&scratch).await.map_err(|e| {
        BackupError::Verification(format!(
            "cannot create the scratch database for the restore test (the role needs CREATEDB): {e}"
        ))
    })?;
    let restored = pg_restore_into(
        pg,
        pg_restore,
        &scratch,
        archive_path,
        keys,
        &["--no-owner", "--no-privileges"],
        cancel,
    )
    .await;
    if let Err(e) = pg.drop_database(&scratch).await {
        tracing::warn!(database = %pg.name, scratch, "cannot drop the scratch database: {e}");
    }
    restored.map_err(|e| match e {
        BackupError::Tool { stderr, .. } => BackupError::Verification(format!(
            "pg_restore into a scratch database failed: {stderr}"
        )),
        other => other,
    })
}

/// Streams the decrypted image into `pg_restore --dbname=<database>`.
pub async fn pg_restore_into(
    pg: &Postgres,
    program: &Path,
    database: &str,
    archive_path: &Path,
    keys: &KeyRing,
    args: &[&str],
    cancel: &CancellationToken,
) -> Result<(), BackupError> {
    let input = open_archive(archive_path)?;
    let mut cmd = tokio::process::Command::from(pg.tool_command(program, Some(database)));
    cmd.args(args)
        .arg("--exit-on-error")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let spawn_err = |source| BackupError::Spawn {
        program: program.display().to_string(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let (Some(stdin), Some(stderr)) = (child.stdin.take(), child.stderr.take()) else {
        return Err(BackupError::Internal("pg_restore pipes missing".into()));
    };
    let stderr_task = tokio::spawn(tail(stderr));
    let keys = keys.clone();
    let fed = blocking(cancel, move |stop| {
        let sink = SyncIoBridge::new(stdin);
        let (mut sink, _, _) =
            archive::read_archive(BufReader::with_capacity(1 << 20, input), &keys, sink, stop)
                .map_err(BackupError::from_archive)?;
        sink.flush()
            .and_then(|()| sink.shutdown())
            .map_err(|e| BackupError::from_archive(e.into()))?;
        Ok(())
    })
    .await;
    if fed.is_err() {
        let _ = child.start_kill();
    }
    let status = child.wait().await.map_err(spawn_err)?;
    let stderr = stderr_task.await.unwrap_or_default();
    match fed {
        // pg_restore stopped reading because it failed: its message says why.
        Err(BackupError::Io { .. }) | Err(BackupError::Archive(archive::ArchiveError::Io(_)))
            if !status.success() =>
        {
            Err(BackupError::Tool {
                program: "pg_restore",
                status: status.to_string(),
                stderr,
            })
        }
        Err(e) => Err(e),
        Ok(()) if !status.success() => Err(BackupError::Tool {
            program: "pg_restore",
            status: status.to_string(),
            stderr,
        }),
        Ok(()) => Ok(()),
    }
}

/// A path beside `target` for writing its replacement.
pub fn sibling_temp(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map_or_else(|| "restore".into(), |n| n.to_string_lossy().into_owned());
    target.with_file_name(format!(
        ".{name}.dbkeeper-restore.{}.tmp",
        std::process::id()
    ))
}

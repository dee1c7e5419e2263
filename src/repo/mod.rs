//! The backup repository: everything about backups that is not taking one.
//!
//! - [`archive`]: the `.dbk` format (compression, encryption, the header);
//! - [`storage`]: where archives and manifests are kept ([`storage::Storage`], built
//!   from the config by [`storage::for_backups`], with the local directory,
//!   [`storage::Destination`], as its first implementation); everything below reaches
//!   backups only through it;
//! - [`catalog`]: manifests, listing, provenance (trust) and rotation;
//! - [`verify`]: reading an archive back, and the restore test;
//! - [`files`]: the tar of a `[[files]]` set: checked, extracted, `restore --to DIR`;
//! - [`restore`] and [`pg_restore`]: putting a backup back; [`sibling`]: the
//!   plaintext written beside a restore or decrypt target, and its crash recovery;
//! - [`BackupError`]: what any of them (and the backup job) can fail with.
//!
//! The backup job (`jobs::backup`) takes the dump and calls into this module; nothing
//! here knows about jobs, schedules or metrics.

pub mod archive;
pub mod catalog;
mod error;
pub mod files;
pub mod pg_check;
pub mod pg_restore;
pub mod restore;
pub mod rewrap;
mod settle;
pub mod sibling;
pub mod storage;
pub mod verify;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

pub(crate) use error::io_err;
pub(crate) use error::WRITING_BACKUP;
pub use error::{BackupError, NotAnImage};

/// Runs a blocking archive operation; cancelling sets its stop flag.
pub(crate) async fn blocking<T: Send + 'static>(
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

/// Keeps the tail of a tool's stderr for error messages.
const STDERR_KEEP: usize = 4096;

/// The last [`STDERR_KEEP`] bytes of a child's stderr, as one line.
pub async fn tail(mut stderr: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = stderr.read(&mut buf).await {
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
        if all.len() > 2 * STDERR_KEEP {
            all.drain(..all.len() - STDERR_KEEP);
        }
    }
    let start = all.len().saturating_sub(STDERR_KEEP);
    String::from_utf8_lossy(&all[start..])
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

//! The errors of the backup library (and of the backup job, which shares them):
//! writing, reading, verifying and restoring archives.

use std::path::PathBuf;

use super::archive::ArchiveError;
use crate::db::DbError;

/// A backup, verification or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Db(#[from] DbError),
    /// `restore --with-roles` could not recreate the archive's roles.
    #[error(transparent)]
    Globals(#[from] crate::db::GlobalsError),
    #[error("{0}")]
    Archive(ArchiveError),
    #[error("{what} {path}: {source}{}", disk_hint(what, source))]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run {program}: {source}; install the PostgreSQL client tools or set its path in [database.backup]")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Tool {
        program: &'static str,
        status: String,
        stderr: String,
    },
    #[error(transparent)]
    NotAnImage(#[from] NotAnImage),
    /// pg_dump's output (as it was being archived) is not a complete dump.
    #[error("{0}; nothing was published")]
    IncompleteDump(super::archive::pgdump::DumpError),
    /// pg_restore (or what was configured as it) exited 0, but the database it
    /// restored into lacks what the dump lists, or cannot be checked (see
    /// `repo::pg_check`).
    #[error("{0}")]
    Unrestored(String),
    #[error("verification failed: {0}")]
    Verification(String),
    #[error("backup {id} is not trusted: {reason}; it is never restored, counted or used for rotation (see `dbkeeper backup list`)")]
    Untrusted {
        id: String,
        reason: super::catalog::Untrusted,
    },
    #[error("{0}")]
    Refused(String),
    /// A files set named by `with-files` could not be backed up: the database's
    /// backup under that id was not taken.
    #[error("the files set \"{name}\" (with-files) could not be backed up, so backup {id} of \"{database}\" was not taken: {source}")]
    WithFiles {
        name: String,
        id: String,
        database: String,
        source: Box<BackupError>,
    },
    /// Some destinations did not get the backup (the others did, see `stored`).
    #[error("{}", destinations_message(id.as_deref(), stored, failed))]
    Destinations {
        id: Option<String>,
        stored: Vec<String>,
        failed: Vec<(String, String)>,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("internal error: {0}")]
    Internal(String),
}

fn destinations_message(
    id: Option<&str>,
    stored: &[String],
    failed: &[(String, String)],
) -> String {
    let reasons = failed
        .iter()
        .map(|(d, e)| format!("{d}: {e}"))
        .collect::<Vec<_>>()
        .join("; ");
    match (id, stored.is_empty()) {
        (Some(id), false) => format!(
            "backup {id} was stored in {} but not in every destination: {reasons}",
            stored.join(", ")
        ),
        _ => format!("no destination could take the backup: {reasons}"),
    }
}

/// What to do about a full disk: a backup's destination can be moved; a restore's
/// target or a scratch folder (restore tests, SQLite copies) only needs room.
fn disk_hint(what: &str, e: &std::io::Error) -> &'static str {
    match (e.kind(), what) {
        (std::io::ErrorKind::StorageFull, WRITING_BACKUP) => {
            "; free space there or point backup.destination elsewhere (older backups are untouched)"
        }
        (std::io::ErrorKind::StorageFull, _) => "; free space there and try again",
        _ => "",
    }
}

/// The `what` of an [`BackupError::Io`] while a backup is written to a destination.
pub(crate) const WRITING_BACKUP: &str = "cannot write the backup to";

impl BackupError {
    pub(crate) fn from_archive(e: ArchiveError) -> Self {
        match e {
            ArchiveError::Cancelled => BackupError::Cancelled,
            other => BackupError::Archive(other),
        }
    }

    /// True when the archive itself is bad: the command line exits with 3.
    pub fn is_verification(&self) -> bool {
        match self {
            BackupError::Archive(e) => e.is_verification(),
            BackupError::Verification(_) | BackupError::Untrusted { .. } => true,
            BackupError::WithFiles { source, .. } => source.is_verification(),
            _ => false,
        }
    }

    /// Whether trying again can help: everything but a deliberate refusal (a
    /// restore test that cannot run here, a target that would be overwritten).
    pub fn is_transient(&self) -> bool {
        if let BackupError::WithFiles { source, .. } = self {
            return source.is_transient();
        }
        !matches!(
            self,
            BackupError::Refused(_)
                | BackupError::Globals(
                    crate::db::GlobalsError::NoCreateRole(..)
                        | crate::db::GlobalsError::MissingTablespaces(_)
                )
        )
    }

    pub fn database_unreachable(&self) -> bool {
        matches!(self, BackupError::Db(e) if e.is_unreachable())
    }
}

pub(crate) fn io_err(
    what: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.into();
    move |source| BackupError::Io { what, path, source }
}

/// The image does not start the way its kind always does (empty, or something else):
/// archiving it would make a "good" backup that cannot be restored.
#[derive(Debug, thiserror::Error)]
#[error("{what} is not {kind} ({found}); nothing was published")]
pub struct NotAnImage {
    pub(crate) what: &'static str,
    pub(crate) kind: &'static str,
    pub(crate) found: String,
}

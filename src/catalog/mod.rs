//! What backups exist: manifests, listing, selection, rotation.
//!
//! A backup is an archive `<id>.dbk` plus its manifest `<id>.manifest.json`; the
//! manifest is the source of truth (an archive without one is an interrupted write).
//! Ids are `<UTC yyyymmddThhmmssZ>-<kind>`, so they sort by time.

pub mod rotation;

use std::io;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::storage::{Destination, ARCHIVE_SUFFIX, MANIFEST_SUFFIX};

/// Why a backup was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupKind {
    Scheduled,
    Manual,
    PreMigration,
}

impl BackupKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupKind::Scheduled => "scheduled",
            BackupKind::Manual => "manual",
            BackupKind::PreMigration => "pre-migration",
        }
    }
}

/// How thoroughly a backup is checked after it is written (ordered: none < read < restore).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// No check beyond a successful write.
    None,
    /// SHA-256, full authenticated decryption and decompression.
    #[default]
    Read,
    /// `read`, plus a restore into a scratch database and an integrity check.
    Restore,
}

impl VerifyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyMode::None => "none",
            VerifyMode::Read => "read",
            VerifyMode::Restore => "restore",
        }
    }
}

/// Outcome of the latest verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyResult {
    Passed,
    Failed,
    /// `verify = "none"`.
    Skipped,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Verification {
    pub mode: VerifyMode,
    pub result: VerifyResult,
    pub at: DateTime<Utc>,
    pub error: Option<String>,
}

/// `<id>.manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub id: String,
    pub database: String,
    pub backend: String,
    pub server_version: Option<String>,
    pub kind: BackupKind,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Size of the database image before compression.
    pub raw_bytes: u64,
    /// Size of the archive file.
    pub stored_bytes: u64,
    pub sha256: String,
    pub key_id: Option<String>,
    pub compression: crate::archive::Compression,
    pub format_version: u8,
    pub dbkeeper_version: String,
    /// Latest applied migration (`_sqlx_migrations`), if the database has any.
    pub schema_version: Option<i64>,
    pub verification: Verification,
}

impl Manifest {
    pub fn archive_name(&self) -> String {
        format!("{}{ARCHIVE_SUFFIX}", self.id)
    }

    pub fn manifest_name(id: &str) -> String {
        format!("{id}{MANIFEST_SUFFIX}")
    }

    /// A complete backup that did not fail verification counts as good.
    pub fn is_good(&self) -> bool {
        self.verification.result != VerifyResult::Failed
    }

    /// Writes the manifest atomically beside its archive.
    pub fn save(&self, dest: &Destination) -> io::Result<()> {
        let mut json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        json.push(b'\n');
        dest.write_atomic(&Self::manifest_name(&self.id), &json)
    }
}

/// A new backup id for `at` that is not taken in `dest` yet.
pub fn new_id(dest: &Destination, at: DateTime<Utc>, kind: BackupKind) -> String {
    let base = format!("{}-{}", at.format("%Y%m%dT%H%M%SZ"), kind.as_str());
    let taken = |id: &str| {
        dest.path(&format!("{id}{ARCHIVE_SUFFIX}")).exists()
            || dest.path(&Manifest::manifest_name(id)).exists()
    };
    if !taken(&base) {
        return base;
    }
    (2..)
        .map(|n| format!("{base}.{n}"))
        .find(|id| !taken(id))
        .unwrap_or(base)
}

/// All backups in `dest`, oldest first. Unreadable manifests are reported in the
/// second list (file name and reason) rather than hiding the rest.
pub fn list(dest: &Destination) -> io::Result<(Vec<Manifest>, Vec<String>)> {
    let mut found = Vec::new();
    let mut broken = Vec::new();
    let entries = match std::fs::read_dir(dest.dir()) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((found, broken)),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(MANIFEST_SUFFIX) || name.starts_with('.') {
            continue;
        }
        match std::fs::read(entry.path())
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Manifest>(&b).map_err(|e| e.to_string()))
        {
            Ok(m) if dest.path(&m.archive_name()).exists() => found.push(m),
            Ok(m) => broken.push(format!(
                "{name}: its archive {} is missing",
                m.archive_name()
            )),
            Err(e) => broken.push(format!("{name}: {e}")),
        }
    }
    found.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
    Ok((found, broken))
}

/// Picks `latest` (the newest good backup) or the backup with this id.
pub fn select<'a>(backups: &'a [Manifest], which: &str) -> Option<&'a Manifest> {
    if which == "latest" {
        backups.iter().rev().find(|m| m.is_good())
    } else {
        backups.iter().find(|m| m.id == which)
    }
}

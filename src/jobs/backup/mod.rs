//! `backup` jobs (`<database>.backup`): dump → compress → encrypt → upload →
//! verify → publish → manifest → rotate.
//!
//! Nothing is published until it is complete and checked: the archive is published
//! (locally: renamed into place) after verification, the manifest written last. A
//! failed run discards its upload and leaves older backups alone; rotation only runs
//! after a good backup and never removes the newest good one. The job sees its
//! destination only as a [`Storage`], so it runs unchanged on any backend.

pub mod source;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::Outcome;
use crate::config::BackupConfig;
use crate::db::Database;
use crate::db::GlobalsSummary;
use crate::metrics;
use crate::repo::archive::{
    ArchiveError, GlobalsBytes, GlobalsFormat, GlobalsSection, Header, Key, KeyRing,
};
use crate::repo::catalog::rotation::{self, Decision};
use crate::repo::catalog::{
    self, BackupKind, Manifest, TrustPolicy, Verification, VerifyMode, VerifyResult,
};
use crate::repo::storage::{self, Storage, Upload, ARCHIVE_SUFFIX};
use crate::repo::{io_err, verify};

/// The job fails with the repository's error: most of what goes wrong is writing or
/// checking the archive.
pub use crate::repo::BackupError;

/// A configured backup job with its keys loaded.
#[derive(Debug)]
pub struct BackupJob {
    pub cfg: BackupConfig,
    pub key: Option<Key>,
    pub keys: KeyRing,
    /// `<state-dir>/tmp`: SQLite copies and restore tests (never the destination).
    pub scratch_dir: PathBuf,
}

impl BackupJob {
    /// Where the backups of `database` are kept.
    pub fn destination(&self, database: &str) -> Arc<dyn Storage> {
        storage::for_backups(&self.cfg, &[database])
    }

    /// What a genuine backup of `database` looks like under this job's config;
    /// `allow_unencrypted` is the reader's `--allow-unencrypted`.
    pub fn trust_policy(&self, database: &str, allow_unencrypted: bool) -> TrustPolicy {
        Self::policy(
            database,
            &self.cfg,
            self.key.as_ref(),
            &self.keys,
            allow_unencrypted,
        )
    }

    /// [`BackupJob::trust_policy`] from the keys alone, for readers that need no job
    /// (`backup list`).
    pub fn policy(
        database: &str,
        cfg: &BackupConfig,
        key: Option<&Key>,
        keys: &KeyRing,
        allow_unencrypted: bool,
    ) -> TrustPolicy {
        TrustPolicy {
            database: database.to_owned(),
            keys: keys.clone(),
            // From the config, not from the key: a key not generated yet must not
            // make plain archives look expected.
            encrypting: cfg.encrypting(),
            current_key: key.map(|k| k.id().to_owned()),
            allow_unencrypted,
        }
    }

    /// Removes plaintext scratch copies no live process owns (a crashed run's).
    pub fn clean_scratch(&self, database: &str) {
        match crate::repo::storage::clean_scratch(&self.scratch_dir) {
            Ok(removed) => {
                for name in removed {
                    tracing::warn!(database, file = %name, "removed a scratch file a crashed run left behind");
                }
            }
            Err(e) => tracing::warn!(
                database,
                "cannot clean up {}: {e}",
                self.scratch_dir.display()
            ),
        }
    }

    pub fn scratch_target<'a>(&'a self, db: &'a Database) -> verify::ScratchTarget<'a> {
        verify::ScratchTarget {
            db,
            pg_restore: &self.cfg.pg_restore,
            scratch_dir: &self.scratch_dir,
        }
    }

    /// Takes, verifies, stores and rotates one backup.
    pub async fn run(
        &self,
        db: &Database,
        kind: BackupKind,
        cancel: &CancellationToken,
    ) -> Result<Outcome, BackupError> {
        self.run_verified(db, kind, VerifyMode::None, cancel).await
    }

    /// Like [`BackupJob::run`], verifying at least as thoroughly as `at_least`
    /// (pre-migration backups are always read back).
    pub async fn run_verified(
        &self,
        db: &Database,
        kind: BackupKind,
        at_least: VerifyMode,
        cancel: &CancellationToken,
    ) -> Result<Outcome, BackupError> {
        self.cfg
            .writing_key(self.key.as_ref())
            .map_err(|e| BackupError::Archive(e.into()))?;
        let verify = self.cfg.verify.max(at_least);
        let dest = self.destination(db.name());
        let dir = dest.location();
        dest.prepare()
            .map_err(io_err("cannot create backup directory", &dir))?;
        for name in catalog::clean(&*dest).map_err(io_err("cannot clean up", &dir))? {
            tracing::warn!(database = db.name(), file = %name, "removed what an interrupted backup left behind");
        }
        self.clean_scratch(db.name());

        let started = Utc::now();
        let id = catalog::new_id(&*dest, started, kind);
        let archive_name = format!("{id}{ARCHIVE_SUFFIX}");
        let server_version = db.server_version().await?;
        let schema_version = db.schema_version().await.unwrap_or_else(|e| {
            tracing::warn!(database = db.name(), "cannot read the schema version: {e}");
            None
        });
        let header = Header {
            database: db.name().to_owned(),
            backend: db.backend().as_str().to_owned(),
            image: match db {
                Database::Sqlite(_) => "sqlite".to_owned(),
                Database::Postgres(_) => crate::repo::archive::pgdump::IMAGE.to_owned(),
            },
            created: started,
            compression: self.cfg.compression,
            segment_size: crate::repo::archive::format::SEGMENT_SIZE,
            encryption: None,
            globals: None,
        };
        let (header, globals, globals_summary) = self.globals(db, header).await?;
        let header_version = header.version();
        let upload = dest
            .put(&archive_name)
            .map_err(io_err("cannot create a file in", &dir))?;
        let check = verify != VerifyMode::None;
        let (mut upload, stats) = source::dump(self, db, header, globals, upload, check, cancel)
            .await
            .map_err(|e| match e {
                BackupError::Archive(ArchiveError::Io(source)) => BackupError::Io {
                    what: "cannot write the backup to",
                    path: dir.clone(),
                    source,
                },
                other => other,
            })?;

        let verified = self
            .verify_written(
                db,
                verify,
                &mut upload,
                &dir.join(&archive_name),
                &stats,
                cancel,
            )
            .await;
        if matches!(verified, Err(BackupError::Cancelled)) {
            return Err(BackupError::Cancelled);
        }
        let verification = Verification {
            mode: verify,
            result: match (&verified, verify) {
                // Only a bad archive fails a backup; a restore test that could not run
                // (no CREATEDB, server busy) leaves it unverified and fails the job.
                (Err(e), _) if e.is_verification() => VerifyResult::Failed,
                (Err(_), _) => VerifyResult::Skipped,
                (Ok(()), VerifyMode::None) => VerifyResult::Skipped,
                (Ok(()), _) => VerifyResult::Passed,
            },
            at: Utc::now(),
            error: verified.as_ref().err().map(ToString::to_string),
        };
        // Held until the manifest is written, so that no clean-up (a daemon starting,
        // another run) takes the archive for one a crash left without a manifest.
        let publishing = upload
            .publish()
            .map_err(io_err("cannot store the backup in", &dir))?;
        let manifest = Manifest {
            id: id.clone(),
            database: db.name().to_owned(),
            backend: db.backend().as_str().to_owned(),
            server_version: Some(server_version),
            kind,
            started_at: started,
            finished_at: Utc::now(),
            raw_bytes: stats.raw_bytes,
            stored_bytes: stats.stored_bytes,
            sha256: stats.sha256,
            key_id: self.key.as_ref().map(|k| k.id().to_owned()),
            compression: self.cfg.compression,
            format_version: header_version,
            dbkeeper_version: env!("CARGO_PKG_VERSION").to_owned(),
            schema_version,
            verification,
            globals: globals_summary,
        };
        manifest
            .save(&*dest)
            .map_err(io_err("cannot write the manifest in", &dir))?;
        drop(publishing);
        let policy = self.trust_policy(db.name(), false);
        if let Err(e) = verified {
            publish_catalog(db.name(), &*dest, &policy, true);
            return Err(e);
        }
        let pruned = self
            .prune(db.name(), Some(&id), false)?
            .iter()
            .filter(|d| !d.keep)
            .count();
        publish_catalog(db.name(), &*dest, &policy, false);
        tracing::info!(database = db.name(), id, "backup stored");
        Ok(Outcome {
            summary: format!(
                "backup {id}: {} → {} ({}), verify {}, {pruned} pruned",
                human_bytes(manifest.raw_bytes),
                human_bytes(manifest.stored_bytes),
                manifest.compression.as_str(),
                manifest.verification.mode.as_str(),
            ),
            details: serde_json::json!({
                "backup_id": id,
                "raw_bytes": manifest.raw_bytes,
                "stored_bytes": manifest.stored_bytes,
                "verification": manifest.verification,
                "pruned": pruned,
            }),
        })
    }

    /// The globals section for `header`'s archive (PostgreSQL with `globals = true`):
    /// collected just before the dump, so the roles match the objects closely.
    async fn globals(
        &self,
        db: &Database,
        mut header: Header,
    ) -> Result<(Header, Option<GlobalsBytes>, Option<GlobalsSummary>), BackupError> {
        let Database::Postgres(pg) = db else {
            return Ok((header, None, None));
        };
        if !self.cfg.globals {
            return Ok((header, None, None));
        }
        let mut globals = pg.collect_globals().await?;
        if !self.cfg.encrypting() {
            // Password hashes live only inside encrypted archives; a plain archive
            // carries the roles without them (`"passwords": false`).
            for role in &mut globals.roles {
                role.password = None;
            }
        }
        let bytes = GlobalsBytes(zeroize::Zeroizing::new(
            serde_json::to_vec(&globals)
                .map_err(|e| BackupError::Internal(format!("cannot encode the globals: {e}")))?,
        ));
        header.globals = Some(GlobalsSection {
            format: GlobalsFormat::PgJsonV1,
            bytes: bytes.len() as u64,
        });
        Ok((header, Some(bytes), Some(globals.summary())))
    }

    /// `read`: every written byte was decrypted and decompressed as it was written
    /// (`stats.checked`); the stored bytes' SHA-256 must match what was written.
    /// `restore`: additionally a restore into a scratch database. Both read the
    /// upload before it is published (`location` names it in errors).
    async fn verify_written(
        &self,
        db: &Database,
        verify: VerifyMode,
        upload: &mut Box<dyn Upload>,
        location: &Path,
        stats: &crate::repo::archive::WriteStats,
        cancel: &CancellationToken,
    ) -> Result<(), BackupError> {
        if verify == VerifyMode::None {
            return Ok(());
        }
        match &stats.checked {
            Some(Err(e)) => {
                return Err(BackupError::Verification(format!(
                    "reading back what was written: {e}"
                )))
            }
            Some(Ok(())) => {}
            None => {
                return Err(BackupError::Internal(
                    "written bytes were not checked".to_owned(),
                ))
            }
        }
        let stored = upload.written().map_err(|source| BackupError::Io {
            what: "cannot open the archive",
            path: location.to_owned(),
            source,
        })?;
        verify::stored_sha_matches(&*stored, &stats.sha256, cancel).await?;
        if verify == VerifyMode::Restore {
            let target = self.scratch_target(db);
            verify::restore_test(&*stored, &self.keys, &target, cancel).await?;
        }
        Ok(())
    }

    /// Applies the keep policy (or, with `dry_run`, only decides) to the trusted
    /// backups; `just_made` (the id this run wrote) is never pruned. Returns every
    /// trusted backup's verdict, newest first.
    pub fn prune(
        &self,
        database: &str,
        just_made: Option<&str>,
        dry_run: bool,
    ) -> Result<Vec<Decision>, BackupError> {
        let dest = self.destination(database);
        let policy = self.trust_policy(database, false);
        let done = rotation::rotate(
            &*dest,
            &policy,
            &self.cfg.keep,
            Utc::now(),
            just_made,
            dry_run,
        )
        .map_err(io_err("cannot rotate the backups in", dest.location()))?;
        report_suspects(database, &done.untrusted, &done.future, &done.duplicates);
        if !dry_run {
            for d in done.decisions.iter().filter(|d| !d.keep) {
                tracing::info!(database, id = %d.id, "pruned backup");
                metrics::backup_pruned(database);
            }
        }
        Ok(done.decisions)
    }
}

/// Logs backups that rotation and `latest` leave alone because they are not believed,
/// are dated in the future, or share their id with another manifest (once per id).
fn report_suspects(
    database: &str,
    untrusted: &[catalog::Rejected],
    future: &[String],
    duplicates: &[catalog::DuplicateId],
) {
    for d in duplicates {
        tracing::warn!(
            database,
            id = %d.id,
            files = %d.files.join(", "),
            "backup id claimed by more than one manifest file: only the one named after the id is believed, copies are never used or deleted; remove them by hand"
        );
    }
    for r in untrusted {
        tracing::warn!(database, file = %r.file, "untrusted backup, left alone: {}", r.reason);
    }
    for id in future {
        tracing::warn!(
            database,
            id = %id,
            "backup dated in the future (made while a clock was wrong?): kept, and not counted by the keep policy"
        );
    }
}

/// Sets the `backup_*` gauges of a database from the trusted backups of its
/// destination; with `report`, also logs the suspect backups (callers that have just
/// rotated pass `false`: rotation reported them already in this run).
pub fn publish_catalog(database: &str, dest: &dyn Storage, policy: &TrustPolicy, report: bool) {
    match catalog::list(dest, policy) {
        Ok(listing) => {
            let now = Utc::now();
            let future: Vec<String> = listing
                .backups
                .iter()
                .filter(|m| catalog::is_future(m.started_at, now))
                .map(|m| m.id.clone())
                .collect();
            if report {
                report_suspects(database, &listing.untrusted, &future, &listing.duplicates);
            }
            metrics::backup_catalog(database, &listing.backups, future.len());
        }
        Err(e) => {
            tracing::warn!(database, dir = %dest.location().display(), "cannot list backups: {e}")
        }
    }
}

/// The newest `n` trusted backups across `sources`, newest first, read from the
/// manifests (so they are current even after `run-job` or another process): the
/// status page's list. A destination that cannot be listed is left out.
pub fn newest_backups(sources: &[super::BackupSource], n: usize) -> Vec<Manifest> {
    let mut all: Vec<Manifest> = sources
        .iter()
        .filter_map(|(dest, policy)| catalog::list(&**dest, policy).ok())
        .flat_map(|listing| listing.backups)
        .collect();
    all.sort_by_key(|m| std::cmp::Reverse(m.started_at));
    all.truncate(n);
    all
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

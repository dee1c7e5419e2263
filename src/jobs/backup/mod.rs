//! `backup` jobs (`<database>.backup`): dump → compress → encrypt → upload →
//! verify → publish → manifest → rotate.
//!
//! Nothing is published until it is complete and checked: the archive is published
//! (locally: renamed into place) after verification, the manifest written last. A
//! failed run discards its upload and leaves older backups alone; rotation only runs
//! after a good backup and never removes the newest good one. The job sees its
//! destinations only as [`Storage`]s, so it runs unchanged on any backend, and
//! writes one archive to all of them at once ([`FanOut`]).
//!
//! The same job backs up a `[[files]]` set (`<name>.backup`): its source is the
//! directory as a tar stream ([`files`]) instead of a dump, and nothing else differs
//! (header and manifest say backend `files`, image `tar`).

pub mod files;
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
use crate::repo::storage::{self, FanOut, Place, Storage, Upload, ARCHIVE_SUFFIX};
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
    /// The age recipients new backups are made for (`recipients`,
    /// `recipients-file`): with them, archives are format version 3 and carry a
    /// writer tag (see [`crate::keys::writer_tag`]).
    pub recipients: Vec<crate::keys::Recipient>,
    /// `<state-dir>/tmp`: SQLite copies and restore tests (never the destination).
    pub scratch_dir: PathBuf,
    /// Set for a `[[files]]` set's backup: the directory it reads.
    pub files: Option<files::FilesSpec>,
    /// A database's `with-files`: the files sets' jobs, run first in every run of
    /// this one under its backup id.
    pub with_files: Vec<BackupJob>,
    /// The `backend` its backups have (`files`, `sqlite`, `postgres`): what the
    /// trust policy expects (`None`: any).
    pub backend: Option<&'static str>,
    /// A files set's job: the databases whose backups take the set (`with-files`).
    /// The set's rotation never deletes a backup of the set paired with a database
    /// backup that still exists.
    pub paired_with: Vec<Pairing>,
}

/// A database that takes a files set with its backups (`with-files`), with what
/// its backups are listed with.
#[derive(Debug, Clone)]
pub struct Pairing {
    pub database: String,
    pub cfg: BackupConfig,
    pub key: Option<Key>,
    pub keys: KeyRing,
    pub backend: Option<&'static str>,
}

/// What one backup run reads: a database, or a files set's directory.
#[derive(Clone, Copy)]
pub enum Subject<'a> {
    Database(&'a Database),
    Files(&'a files::FilesSpec),
}

impl Subject<'_> {
    pub fn name(&self) -> &str {
        match self {
            Subject::Database(db) => db.name(),
            Subject::Files(f) => &f.name,
        }
    }

    /// The `backend` of header and manifest.
    pub fn backend(&self) -> &'static str {
        match self {
            Subject::Database(db) => db.backend().as_str(),
            Subject::Files(_) => crate::repo::files::BACKEND,
        }
    }
}

/// The id new archives show and the retired-key rule calls current: the key file's,
/// else that of the recipient set (a version 3 archive made for recipients only:
/// see [`crate::repo::archive::envelope::recipients_id`]).
pub fn current_key_id(key: Option<&Key>, recipients: &[crate::keys::Recipient]) -> Option<String> {
    match key {
        Some(k) => Some(k.id().to_owned()),
        None if recipients.is_empty() => None,
        None => {
            let texts: Vec<String> = recipients.iter().map(ToString::to_string).collect();
            Some(crate::repo::archive::envelope::recipients_id(
                texts.iter().map(String::as_str),
            ))
        }
    }
}

impl BackupJob {
    /// The key id this job's archives show: the key's, else the recipients' (see
    /// [`current_key_id`]).
    fn recipients_key_id(&self) -> Option<String> {
        current_key_id(self.key.as_ref(), &self.recipients)
    }

    /// Notes in the state directory that this job's key is the current one (see
    /// [`catalog::note_current_key`]): from the moment a rotation is configured,
    /// nothing newer made with the old key is believed. Done where a configuration
    /// is taken up (the daemon's start and reload, `key rewrap`), never by a backup
    /// run: a daemon not yet reloaded, still on the old key, must not turn the
    /// record back (adversary round 4 of issue 16, case 07); a backup run only ever
    /// moves a boundary earlier ([`catalog::remember_boundary`]).
    pub fn note_current_key(&self, database: &str) {
        if let (Some(key), Some(dir)) = (self.recipients_key_id(), self.state_dir()) {
            if let Err(e) = catalog::note_current_key(dir, database, &key, Utc::now()) {
                tracing::warn!(
                    database,
                    "cannot record the current key in {}: {e}",
                    dir.display()
                );
            }
        }
    }

    /// The backup job of the `[[files]]` set `f`; `access` as for a database's (a
    /// key is generated only to write).
    pub fn for_files(
        config: &crate::config::Config,
        f: &crate::config::FilesConfig,
        access: crate::db::Access,
    ) -> Result<Self, super::BuildError> {
        let key_err = |source| super::BuildError::Key {
            database: f.name.clone(),
            source,
        };
        if access == crate::db::Access::ReadWrite {
            f.backup.ensure_key().map_err(key_err)?;
        }
        let (key, keys) = f.backup.load_keys().map_err(key_err)?;
        let recipients = f.backup.load_recipients().map_err(key_err)?;
        let exclude = f.excludes().map_err(|e| super::BuildError::Name {
            database: f.name.clone(),
            message: format!("exclude: {e}"),
        })?;
        let mut paired_with = Vec::new();
        for (name, b) in config.named_backups() {
            if b.with_files.contains(&f.name) {
                let (key, keys) = b.load_keys().map_err(|source| super::BuildError::Key {
                    database: name.to_owned(),
                    source,
                })?;
                paired_with.push(Pairing {
                    database: name.to_owned(),
                    cfg: b.clone(),
                    key,
                    keys,
                    backend: config.backend_of(name),
                });
            }
        }
        Ok(BackupJob {
            cfg: f.backup.clone(),
            key,
            keys,
            recipients,
            scratch_dir: config.daemon.state_dir.join("tmp"),
            files: Some(files::FilesSpec {
                name: f.name.clone(),
                path: f.path.clone(),
                exclude,
            }),
            with_files: Vec::new(),
            backend: Some(crate::repo::files::BACKEND),
            paired_with,
        })
    }

    /// A files set's name (empty for a database's job, which learns its name from
    /// the database).
    fn subject_name(&self) -> &str {
        self.files.as_ref().map_or("", |f| f.name.as_str())
    }

    /// What a run reads: this job's files set, or else `db`.
    pub fn subject<'a>(&'a self, db: Option<&'a Database>) -> Result<Subject<'a>, BackupError> {
        match (&self.files, db) {
            (Some(f), _) => Ok(Subject::Files(f)),
            (None, Some(db)) => Ok(Subject::Database(db)),
            (None, None) => Err(BackupError::Internal(
                "a database backup without its database".to_owned(),
            )),
        }
    }

    /// The state directory (`scratch_dir`'s parent).
    pub fn state_dir(&self) -> Option<&Path> {
        self.scratch_dir.parent()
    }

    /// Every destination of the backups of `database`, in the configured order.
    pub fn places(&self, database: &str) -> Vec<Place> {
        storage::for_backups(&self.cfg, &[database])
    }

    /// A trusted backup of `database` started at or after `since` in one of its
    /// destinations (blocking: it lists them). Replicas: an interrupted backup whose
    /// replica stored it before it lost its lease (the result could not be recorded)
    /// was not cut short, and is not run again (adversary round of issue 17, case 08).
    pub fn stored_since(&self, database: &str, since: chrono::DateTime<Utc>) -> Option<String> {
        let policy = self.trust_policy(database, false);
        self.places(database).iter().find_map(|place| {
            let listing = catalog::list(&*place.store, &policy).ok()?;
            listing
                .backups
                .iter()
                .rev()
                .find(|m| m.started_at.timestamp() >= since.timestamp())
                .map(|m| m.id.clone())
        })
    }

    /// Every destination of `database`'s backups and of the files sets taken with
    /// it, each with the name its backups are filed under: where a pre-migration
    /// backup's pins go.
    pub fn places_with_files(&self, database: &str) -> Vec<(String, Place)> {
        let own = self
            .places(database)
            .into_iter()
            .map(|p| (database.to_owned(), p));
        let sets = self.with_files.iter().flat_map(|f| {
            let name = f.subject_name();
            f.places(name).into_iter().map(|p| (name.to_owned(), p))
        });
        own.chain(sets).collect()
    }

    /// What a genuine backup of `database` looks like under this job's config;
    /// `allow_unencrypted` is the reader's `--allow-unencrypted`.
    pub fn trust_policy(&self, database: &str, allow_unencrypted: bool) -> TrustPolicy {
        Self::policy(
            database,
            self.backend,
            &self.cfg,
            self.key.as_ref(),
            &self.keys,
            allow_unencrypted,
            self.state_dir(),
        )
    }

    /// [`BackupJob::trust_policy`] from the keys alone, for readers that need no job
    /// (`backup list`).
    pub fn policy(
        database: &str,
        backend: Option<&str>,
        cfg: &BackupConfig,
        key: Option<&Key>,
        keys: &KeyRing,
        allow_unencrypted: bool,
        state_dir: Option<&Path>,
    ) -> TrustPolicy {
        let mut policy = TrustPolicy {
            database: database.to_owned(),
            backend: backend.map(str::to_owned),
            keys: keys.clone(),
            // From the config, not from the key: a key not generated yet must not
            // make plain archives look expected.
            encrypting: cfg.encrypting(),
            // Made for recipients only, the recipient set is the current "key": a
            // key file it replaced is retired like any other (adversary round 2 of
            // issue 16, case 06). A recipients file that cannot be read names none.
            current_key: current_key_id(
                key,
                &(if key.is_none() && cfg.has_recipients() {
                    cfg.load_recipients().unwrap_or_default()
                } else {
                    Vec::new()
                }),
            ),
            allow_unencrypted,
            current_key_since: None,
            boundary_remembered: false,
            writer: state_dir.and_then(crate::keys::writer_key),
        };
        // The retired-key boundary is the database's, not one destination's, and
        // what this host remembers of it outlives the backup that set it.
        if let Some(current) = policy.current_key.clone() {
            let seen = (cfg.destination.0.len() > 1)
                .then(|| {
                    let places = storage::for_backups(cfg, &[database]);
                    catalog::first_current_key_backup(places.iter().map(|p| &*p.store), &policy)
                })
                .flatten();
            let remembered =
                state_dir.and_then(|dir| catalog::remembered_boundary(dir, database, &current));
            policy.boundary_remembered = remembered.is_some();
            policy.current_key_since = remembered.or(seen);
        }
        policy
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

    /// The pre-flight check: drops the folder destinations without room for another
    /// backup as large as the newest one × `free-space-margin`, before anything is
    /// dumped. A destination whose free space cannot be read (an object store) is
    /// kept: its own errors will say more than a guess would.
    fn preflight(&self, database: &str, ready: Vec<Place>, missed: &mut Missed) -> Vec<Place> {
        let margin = self.cfg.free_space_margin;
        let mut newest: Option<Option<u64>> = None;
        let mut newest_size = || {
            *newest.get_or_insert_with(|| {
                let policy = self.trust_policy(database, false);
                ready
                    .iter()
                    .filter_map(|p| catalog::list(&*p.store, &policy).ok())
                    .flat_map(|listing| listing.backups)
                    .max_by_key(|m| m.started_at)
                    .map(|m| m.stored_bytes)
            })
        };
        let mut kept = Vec::new();
        for place in &ready {
            let free = match place.store.free_bytes() {
                Ok(Some(free)) => free,
                Ok(None) => {
                    kept.push(place.clone());
                    continue;
                }
                Err(e) => {
                    tracing::warn!(database, destination = %place.label(), "cannot read the free space: {e}");
                    kept.push(place.clone());
                    continue;
                }
            };
            metrics::destination_free(database, &place.label(), free);
            let last = if margin > 0.0 { newest_size() } else { None };
            let needed = last.map(|b| (b as f64 * margin).ceil() as u64);
            match (last, needed) {
                (Some(last), Some(needed)) if free < needed => missed.add(
                    database,
                    place,
                    std::io::Error::new(
                        std::io::ErrorKind::StorageFull,
                        format!(
                            "pre-flight check: only {} free, but the newest backup took {} and free-space-margin is {margin} ({} needed), so nothing was written there; free space there or lower free-space-margin",
                            human_bytes(free),
                            human_bytes(last),
                            human_bytes(needed)
                        ),
                    ),
                ),
                _ => kept.push(place.clone()),
            }
        }
        kept
    }

    /// Takes, verifies, stores and rotates one backup.
    pub async fn run(
        &self,
        db: Option<&Database>,
        kind: BackupKind,
        cancel: &CancellationToken,
    ) -> Result<Outcome, BackupError> {
        self.run_verified(db, kind, VerifyMode::None, cancel).await
    }

    /// Like [`BackupJob::run`], verifying at least as thoroughly as `at_least`
    /// (pre-migration backups are always read back).
    ///
    /// The archive is made once and written to every destination at once
    /// ([`FanOut`]). A destination that fails (cannot be prepared, fails while
    /// writing, publishing or storing the manifest) loses only its own copy: the
    /// others are published, get their manifest and are rotated, and the job then
    /// fails naming the destinations that did not get the backup.
    pub async fn run_verified(
        &self,
        db: Option<&Database>,
        kind: BackupKind,
        at_least: VerifyMode,
        cancel: &CancellationToken,
    ) -> Result<Outcome, BackupError> {
        self.run_as(db, kind, at_least, None, &mut Vec::new(), cancel)
            .await
    }

    /// [`BackupJob::run_verified`]; `paired`: the id and start time of the database
    /// backup this files set is taken with (`with-files`), used instead of new ones
    /// (the database's run reserved the id). `published` gets the location of every
    /// namespace where this run published its archive: what its clean-up may delete.
    async fn run_as(
        &self,
        db: Option<&Database>,
        kind: BackupKind,
        at_least: VerifyMode,
        paired: Option<(&str, chrono::DateTime<Utc>, &str)>,
        published: &mut Vec<PathBuf>,
        cancel: &CancellationToken,
    ) -> Result<Outcome, BackupError> {
        let subject = self.subject(db)?;
        self.cfg
            .writing_key(self.key.as_ref())
            .map_err(|e| BackupError::Archive(e.into()))?;
        let verify = self.cfg.verify.max(at_least);
        let database = subject.name();
        let mut missed = Missed::default();
        let mut ready = Vec::new();
        for place in self.places(database) {
            match prepare(database, &place) {
                Ok(()) => ready.push(place),
                Err(e) => missed.add(database, &place, e),
            }
        }
        let ready = self.preflight(database, ready, &mut missed);
        if ready.is_empty() {
            return Err(missed.into_error(None, &[]));
        }
        self.clean_scratch(database);

        let started = paired.map_or_else(Utc::now, |(_, at, _)| at);
        // Paired files sets live in their own folders: the id must be free there too.
        let paired_places: Vec<Place> = self
            .with_files
            .iter()
            .flat_map(|f| f.places(f.subject_name()))
            .collect();
        // Held until the run is over (on every path: dropped), so that no other run,
        // in this process or another, takes the same id meanwhile.
        let (id, reservation) = match paired {
            Some((id, _, _)) => (id.to_owned(), None),
            None => {
                for place in &paired_places {
                    // Their folders may not exist yet; the files set's run reports
                    // why one cannot be made.
                    let _ = place.store.prepare();
                }
                let stores: Vec<Arc<dyn Storage>> = ready
                    .iter()
                    .chain(&paired_places)
                    .map(|p| p.store.clone())
                    .collect();
                let reserved = catalog::reserve_id(&stores, started, kind);
                (reserved.id().to_owned(), Some(reserved))
            }
        };
        // Taken first: a database backup that names its files exists only with them.
        let mut with_files = Vec::new();
        for f in &self.with_files {
            let name = f.subject_name();
            let taken = Box::pin(f.run_as(
                None,
                kind,
                at_least,
                Some((&id, started, database)),
                published,
                cancel,
            ))
            .await;
            if let Err(e) = taken {
                self.settle_with_files(&id, false, false, published);
                return Err(BackupError::WithFiles {
                    name: name.to_owned(),
                    id: id.clone(),
                    database: database.to_owned(),
                    source: Box::new(e),
                });
            }
            with_files.push(name.to_owned());
        }
        let taken = self
            .take(
                subject,
                kind,
                verify,
                &ready,
                missed,
                &id,
                started,
                with_files,
                paired.map(|(_, _, database)| database),
                published,
                cancel,
            )
            .await;
        if !self.with_files.is_empty() {
            let stored = ready.iter().any(|p| has_backup(p, &id));
            self.settle_with_files(&id, stored, taken.is_ok(), published);
        }
        drop(reservation);
        taken
    }

    /// After a database backup with `with-files`: when it succeeded, the files sets
    /// are rotated now (never before: a failed database backup must not cost the
    /// good ones their files); when it was not stored (`paired` false), the files
    /// backups this run made under `id` are deleted, as nothing pairs with them; when
    /// it was stored but failed (verification, a destination), they stay unrotated.
    /// What this run made is what it published (`published`, by the namespace's
    /// location): a files backup under the same id that it did not write is never
    /// its to delete.
    fn settle_with_files(&self, id: &str, paired: bool, succeeded: bool, published: &[PathBuf]) {
        for f in &self.with_files {
            let name = f.subject_name();
            let policy = f.trust_policy(name, false);
            for place in f.places(name) {
                // Like a backup's own rotation: only where this run's backup is.
                if paired && succeeded && has_backup(&place, id) {
                    if let Err(e) = f.prune(name, &place, Some(id), false) {
                        tracing::error!(database = name, destination = %place.label(), "rotation failed: {e}");
                    }
                } else if !paired && published.contains(&place.store.location()) {
                    for object in [format!("{id}{ARCHIVE_SUFFIX}"), Manifest::manifest_name(id)] {
                        match place.store.delete(&object) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => tracing::error!(
                                database = name,
                                destination = %place.label(),
                                "cannot delete the unpaired files backup {id}: {e}"
                            ),
                        }
                    }
                }
                publish_catalog(name, &place, &policy, false);
            }
        }
    }

    /// The database (or files set) backup itself, under `id`: dump, verify, store,
    /// manifest, rotate (a files set taken with a database is rotated by it instead).
    #[allow(clippy::too_many_arguments)]
    async fn take(
        &self,
        subject: Subject<'_>,
        kind: BackupKind,
        verify: VerifyMode,
        ready: &[Place],
        mut missed: Missed,
        id: &str,
        started: chrono::DateTime<Utc>,
        with_files: Vec<String>,
        taken_with: Option<&str>,
        published: &mut Vec<PathBuf>,
        cancel: &CancellationToken,
    ) -> Result<Outcome, BackupError> {
        let database = subject.name();
        let id = id.to_owned();
        let archive_name = format!("{id}{ARCHIVE_SUFFIX}");
        let (server_version, schema_version) = match subject {
            Subject::Database(db) => {
                let schema = db.schema_version().await.unwrap_or_else(|e| {
                    tracing::warn!(database, "cannot read the schema version: {e}");
                    None
                });
                (Some(db.server_version().await?), schema)
            }
            Subject::Files(_) => (None, None),
        };
        let header = Header {
            database: database.to_owned(),
            backend: subject.backend().to_owned(),
            image: match subject {
                Subject::Database(Database::Sqlite(_)) => "sqlite".to_owned(),
                Subject::Database(Database::Postgres(_)) => {
                    crate::repo::archive::pgdump::IMAGE.to_owned()
                }
                Subject::Files(_) => crate::repo::files::IMAGE.to_owned(),
            },
            created: started,
            compression: self.cfg.compression,
            segment_size: crate::repo::archive::format::SEGMENT_SIZE,
            encryption: None,
            globals: None,
            sealed: None,
        };
        let (header, globals, globals_summary) = match subject {
            Subject::Database(db) => self.globals(db, header).await?,
            Subject::Files(_) => (header, None, None),
        };
        let header_version = header.version();
        let header_key_id = self.recipients_key_id();
        let uploads = FanOut::start(ready, &archive_name);
        let labels = ready
            .iter()
            .map(Place::label)
            .collect::<Vec<_>>()
            .join(", ");
        let check = verify != VerifyMode::None;
        let (uploads, stats, files_report) =
            source::dump(self, subject, header, globals, uploads, check, cancel)
                .await
                .map_err(|e| match e {
                    BackupError::Archive(ArchiveError::Io(source)) => BackupError::Io {
                        what: crate::repo::WRITING_BACKUP,
                        path: PathBuf::from(&labels),
                        source,
                    },
                    other => other,
                })?;

        let mut manifest = Manifest {
            id: id.clone(),
            database: database.to_owned(),
            backend: subject.backend().to_owned(),
            server_version,
            kind,
            started_at: started,
            finished_at: started,
            raw_bytes: stats.raw_bytes,
            stored_bytes: stats.stored_bytes,
            sha256: stats.sha256.clone(),
            // Version 3: the id the header shows (the key's, else the recipients').
            key_id: match &stats.sealed {
                Some(_) => header_key_id.clone(),
                None => self.key.as_ref().map(|k| k.id().to_owned()),
            },
            compression: self.cfg.compression,
            format_version: header_version,
            dbkeeper_version: env!("CARGO_PKG_VERSION").to_owned(),
            schema_version,
            verification: Verification {
                mode: verify,
                result: VerifyResult::Skipped,
                at: started,
                error: None,
            },
            globals: globals_summary,
            files: files_report,
            with_files,
            writer: None,
            taken_with: taken_with.map(str::to_owned),
            rewrapped: None,
        };
        if let Some((_, envelope)) = &stats.sealed {
            manifest.format_version = crate::repo::archive::envelope::VERSION_ENVELOPE;
            if self.key.is_none() {
                // Nothing this host holds reads the archive: the writer tag is its
                // proof of having written it (listing and rotation check it).
                let dir = self.state_dir().ok_or_else(|| {
                    BackupError::Internal("a backup job without a state directory".to_owned())
                })?;
                let writer = crate::keys::load_or_create_writer_key(dir)
                    .map_err(|e| BackupError::Archive(ArchiveError::Key(e)))?;
                manifest.writer = Some(catalog::WriterTag {
                    key_id: writer.id().to_owned(),
                    tag: crate::keys::writer_tag(&writer, database, &id, envelope),
                });
            }
        }
        // The restore test runs once, on the first copy; the other copies are read
        // back (their SHA-256 must match, so they are the same bytes) and share its
        // verdict.
        let mut first: Option<(VerifyResult, Option<String>)> = None;
        let mut bad: Option<BackupError> = None;
        let mut stored = Vec::new();
        let mut pruned = 0;
        for (place, upload) in uploads.finish() {
            let mut upload = match upload {
                Ok(u) => u,
                Err(e) => {
                    missed.add(database, &place, e);
                    continue;
                }
            };
            let location = place.store.location().join(&archive_name);
            let restore_test = verify == VerifyMode::Restore && first.is_none();
            let verified = self
                .verify_written(
                    subject,
                    verify,
                    &mut upload,
                    &location,
                    &stats,
                    restore_test,
                    cancel,
                )
                .await;
            if matches!(verified, Err(BackupError::Cancelled)) {
                return Err(BackupError::Cancelled);
            }
            let (result, error) = match (&verified, verify, &first) {
                // Only a bad archive fails a backup; a restore test that could not run
                // (no CREATEDB, server busy) leaves it unverified and fails the job.
                (Err(e), _, _) if e.is_verification() => {
                    (VerifyResult::Failed, Some(e.to_string()))
                }
                (Err(e), _, _) => (VerifyResult::Skipped, Some(e.to_string())),
                (Ok(()), VerifyMode::None, _) => (VerifyResult::Skipped, None),
                (Ok(()), _, Some(verdict)) => verdict.clone(),
                (Ok(()), _, None) => (VerifyResult::Passed, None),
            };
            if first.is_none() {
                first = Some((result, error.clone()));
            }
            manifest.verification = Verification {
                mode: verify,
                result,
                at: Utc::now(),
                error,
            };
            manifest.finished_at = Utc::now();
            // Held until the manifest is written, so that no clean-up (a daemon
            // starting, another run) takes the archive for one a crash left without a
            // manifest.
            let saved = upload.written().and_then(|stored| {
                let version = stored.version().clone();
                let publishing = upload.publish()?;
                published.push(place.store.location());
                manifest.save_new(&*place.store)?;
                if let Err(e) = place.store.confirm(&archive_name, &version) {
                    // A manifest must not vouch for an archive that is gone. (One that
                    // was replaced may be another writer's now, with its manifest.)
                    if e.kind() == std::io::ErrorKind::NotFound {
                        let _ = place.store.delete(&Manifest::manifest_name(&id));
                    }
                    return Err(e);
                }
                drop(publishing);
                Ok(())
            });
            if let Err(e) = saved {
                missed.add(database, &place, e);
                continue;
            }
            stored.push(place.label());
            let policy = self.trust_policy(database, false);
            match verified {
                Err(e) => {
                    publish_catalog(database, &place, &policy, true);
                    bad.get_or_insert(e);
                }
                // A files set taken with a database waits for it (see
                // `settle_with_files`).
                Ok(()) if taken_with.is_some() => {}
                Ok(()) => {
                    match self.prune(database, &place, Some(&id), false) {
                        Ok(d) => pruned += d.iter().filter(|d| !d.keep).count(),
                        Err(e) => missed.add_rotation(database, &place, e),
                    }
                    publish_catalog(database, &place, &policy, false);
                }
            }
        }
        if let (Some(key), Some(dir), false) = (
            self.recipients_key_id(),
            self.state_dir(),
            stored.is_empty(),
        ) {
            // The first backup under this key, for the retired-key rule.
            if let Err(e) = catalog::remember_boundary(dir, database, &key, started, &id) {
                tracing::warn!(
                    database,
                    "cannot record the key's first backup in {}: {e}",
                    dir.display()
                );
            }
        }
        if let Some(e) = bad {
            return Err(e);
        }
        if !missed.is_empty() {
            return Err(missed.into_error(Some(&id), &stored));
        }
        tracing::info!(database, id, destinations = %stored.join(", "), "backup stored");
        Ok(Outcome {
            summary: format!(
                "backup {id}: {} → {} ({}), verify {}, {pruned} pruned{}{}",
                human_bytes(manifest.raw_bytes),
                human_bytes(manifest.stored_bytes),
                manifest.compression.as_str(),
                manifest.verification.mode.as_str(),
                if stored.len() > 1 {
                    format!(", {} copies", stored.len())
                } else {
                    String::new()
                },
                manifest
                    .files
                    .as_ref()
                    .map_or_else(String::new, |f| format!(
                        ", {} entries, {} changed while read, {} skipped",
                        f.entries, f.changed, f.skipped
                    )),
            ),
            details: serde_json::json!({
                "backup_id": id,
                "raw_bytes": manifest.raw_bytes,
                "stored_bytes": manifest.stored_bytes,
                "verification": manifest.verification,
                "pruned": pruned,
                "destinations": stored,
                "files": manifest.files,
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
    /// `restore_test`: additionally a restore into a scratch database. Both read the
    /// upload before it is published (`location` names it in errors).
    #[allow(clippy::too_many_arguments)]
    async fn verify_written(
        &self,
        subject: Subject<'_>,
        verify: VerifyMode,
        upload: &mut Box<dyn Upload>,
        location: &Path,
        stats: &crate::repo::archive::WriteStats,
        restore_test: bool,
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
        // An archive made for recipients is read back with its data key, held in
        // memory for this run only: this host may hold no identity.
        let keys = match &stats.sealed {
            Some((data_key, _)) => self.keys.with_data_key(data_key.clone()),
            None => self.keys.clone(),
        };
        match subject {
            Subject::Database(db) => {
                verify::stored_sha_matches(&*stored, &stats.sha256, cancel).await?;
                if restore_test {
                    let target = self.scratch_target(db);
                    verify::restore_test(&*stored, &keys, &target, cancel).await?;
                }
            }
            // One more pass, not two: the whole tar is parsed (the checker only
            // decoded it) while the stored bytes are hashed and compared with what
            // was written; `restore` also extracts it into a scratch directory.
            Subject::Files(_) => {
                let written = verify::Expect {
                    sha256: &stats.sha256,
                    raw_bytes: stats.raw_bytes,
                    trust: None,
                };
                let scratch = &self.scratch_dir;
                crate::repo::files::verify_tree(
                    &*stored,
                    &keys,
                    restore_test,
                    Some(written),
                    scratch,
                    cancel,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Applies the keep policy of `place` (its own `keep`, or the backup's) to the
    /// trusted backups there (or, with `dry_run`, only decides); `just_made` (the id
    /// this run wrote) is never pruned. Returns every trusted backup's verdict,
    /// newest first.
    pub fn prune(
        &self,
        database: &str,
        place: &Place,
        just_made: Option<&str>,
        dry_run: bool,
    ) -> Result<Vec<Decision>, BackupError> {
        let policy = self.trust_policy(database, false);
        // Pins beside the backups (any configuration's), and the state directory's of
        // the first version; one that cannot be read stops the rotation.
        let mut pins = catalog::pins::pinned_in(&*place.store).map_err(io_err(
            "cannot read the pinned backups in",
            place.store.location(),
        ))?;
        if let Some(dir) = self.state_dir() {
            pins.extend(
                catalog::pins::legacy_pinned(dir, database)
                    .map_err(io_err("cannot read the pinned backups in", dir.to_owned()))?,
            );
        }
        let mut pinned: std::collections::BTreeMap<String, String> = pins
            .into_iter()
            .map(|id| {
                let why = "pinned: a failed migration named it; kept until a migration succeeds";
                (id, why.to_owned())
            })
            .collect();
        if self.files.is_some() {
            for (id, why) in self.paired_ids(database, place)? {
                pinned.entry(id).or_insert(why);
            }
        }
        let done = rotation::rotate(
            &*place.store,
            &policy,
            place.config.keep(&self.cfg.keep),
            Utc::now(),
            just_made,
            &pinned,
            dry_run,
        )
        .map_err(io_err(
            "cannot rotate the backups in",
            place.store.location(),
        ))?;
        report_suspects(database, &done.untrusted, &done.future, &done.duplicates);
        if !dry_run {
            let destination = place.label();
            for d in done.decisions.iter().filter(|d| !d.keep) {
                tracing::info!(database, destination, id = %d.id, "pruned backup");
                metrics::backup_pruned(database, &destination);
            }
        }
        Ok(done.decisions)
    }
}

impl BackupJob {
    /// The backups of the files set `name` in `place` that the set's rotation must
    /// keep because they are the files half of a database backup, with the reason
    /// shown. A backup taken with database X's backup (its manifest's `taken_with`)
    /// is let go only once X is configured with this set, every destination of X
    /// lists, each holds at least one trusted backup of X (an unmounted, empty or
    /// missing folder proves nothing), and none holds that id (adversary rounds 7
    /// and 8). A backup written before `taken_with` existed is kept while a
    /// configured database's listed backup names the set under its id.
    fn paired_ids(
        &self,
        name: &str,
        place: &Place,
    ) -> Result<std::collections::BTreeMap<String, String>, BackupError> {
        use std::collections::{BTreeMap, HashSet};
        let mut kept = BTreeMap::new();
        if self.paired_with.is_empty() && self.files.is_none() {
            return Ok(kept);
        }
        let own = catalog::list(&*place.store, &self.trust_policy(name, false)).map_err(io_err(
            "cannot list the backups of the files set in",
            place.store.location(),
        ))?;
        // Per configured database: the ids of its trusted backups that take this set,
        // or `None` when some destination does not show its backups.
        let mut known: BTreeMap<&str, Option<HashSet<String>>> = BTreeMap::new();
        for p in &self.paired_with {
            let policy = Self::policy(
                &p.database,
                p.backend,
                &p.cfg,
                p.key.as_ref(),
                &p.keys,
                false,
                self.state_dir(),
            );
            let mut ids = Some(HashSet::new());
            for db_place in storage::for_backups(&p.cfg, &[&p.database]) {
                match catalog::list(&*db_place.store, &policy) {
                    Ok(listing) if !listing.backups.is_empty() => {
                        if let Some(ids) = ids.as_mut() {
                            ids.extend(
                                listing
                                    .backups
                                    .iter()
                                    .filter(|m| m.with_files.iter().any(|s| s == name))
                                    .map(|m| m.id.clone()),
                            );
                        }
                    }
                    Ok(_) | Err(_) => ids = None,
                }
            }
            known.insert(p.database.as_str(), ids);
        }
        for m in &own.backups {
            let why = match (&m.taken_with, &m.taken_with.as_deref().map(|d| known.get(d))) {
                (Some(db), Some(None)) => Some(format!(
                    "taken with database \"{db}\"'s backup {}, and this configuration does not take this set with that database: kept (delete it by hand once that backup is gone)",
                    m.id
                )),
                (Some(db), Some(Some(None))) => Some(format!(
                    "taken with database \"{db}\"'s backup {}; a destination of \"{db}\" is missing, cannot be listed or shows none of its backups: kept",
                    m.id
                )),
                (Some(db), Some(Some(Some(ids)))) if ids.contains(&m.id) => Some(format!(
                    "the files half of database \"{db}\"'s backup {}: kept while that backup exists",
                    m.id
                )),
                (Some(_), _) => None,
                // Written before `taken_with`: paired if a configured database says so.
                (None, _) => known.iter().find_map(|(db, ids)| match ids {
                    Some(ids) if ids.contains(&m.id) => Some(format!(
                        "the files half of database \"{db}\"'s backup {}: kept while that backup exists",
                        m.id
                    )),
                    _ => None,
                }),
            };
            if let Some(why) = why {
                kept.insert(m.id.clone(), why);
            }
        }
        Ok(kept)
    }
}

/// Whether the manifest of backup `id` is in `place`.
fn has_backup(place: &Place, id: &str) -> bool {
    place
        .store
        .list(&Manifest::manifest_name(id))
        .is_ok_and(|names| !names.is_empty())
}

/// Prepares a destination for a new backup: creates it if needed and clears what
/// an interrupted backup left there.
fn prepare(database: &str, place: &Place) -> std::io::Result<()> {
    place.store.prepare()?;
    for name in catalog::clean(&*place.store)? {
        tracing::warn!(database, destination = %place.label(), file = %name, "removed what an interrupted backup left behind");
    }
    Ok(())
}

/// The destinations that did not get this run's backup, and why.
#[derive(Default)]
struct Missed(Vec<(String, String)>);

impl Missed {
    fn add(&mut self, database: &str, place: &Place, e: std::io::Error) {
        let destination = place.label();
        tracing::error!(
            database,
            destination,
            "the backup could not be stored there: {e}"
        );
        metrics::backup_upload_failed(database, &destination);
        self.0.push((destination, e.to_string()));
    }

    /// Rotation failing after the backup was stored: the job fails, the backup stays.
    fn add_rotation(&mut self, database: &str, place: &Place, e: BackupError) {
        let destination = place.label();
        tracing::error!(database, destination, "rotation failed: {e}");
        self.0.push((destination, format!("rotation failed: {e}")));
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn into_error(self, id: Option<&str>, stored: &[String]) -> BackupError {
        BackupError::Destinations {
            id: id.map(str::to_owned),
            stored: stored.to_vec(),
            failed: self.0,
        }
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
pub fn publish_catalog(database: &str, place: &Place, policy: &TrustPolicy, report: bool) {
    let dest = &*place.store;
    let destination = place.label();
    if let Ok(Some(free)) = dest.free_bytes() {
        metrics::destination_free(database, &destination, free);
    }
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
            metrics::backup_catalog(database, &destination, &listing.backups, future.len());
        }
        Err(e) => {
            // The destination's counters exist even when it could never be listed, so
            // that its first failure is an increase.
            metrics::backup_destination(database, &destination);
            tracing::warn!(database, destination, "cannot list backups: {e}")
        }
    }
}

/// The newest `n` trusted backups across `sources` (each once, however many
/// destinations hold it), newest first, read from the
/// manifests (so they are current even after `run-job` or another process): the
/// status page's list. A destination that cannot be listed is left out.
pub fn newest_backups(sources: &[super::BackupSource], n: usize) -> Vec<Manifest> {
    let mut all: Vec<Manifest> = sources
        .iter()
        .filter_map(|(dest, policy)| catalog::list(&**dest, policy).ok())
        .flat_map(|listing| listing.backups)
        .collect();
    all.sort_by_key(|m| std::cmp::Reverse(m.started_at));
    // A backup kept in several destinations is one backup.
    let mut seen = std::collections::HashSet::new();
    all.retain(|m| seen.insert((m.database.clone(), m.id.clone())));
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

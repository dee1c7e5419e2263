//! `dbkeeper backup list|verify|prune`, `restore`, `decrypt` and `key generate`.
//!
//! Backups are reached through their [`Storage`] only (each destination of the
//! config, opened by `storage::for_backups`), so these commands work on any backend.
//! Readers take a backup from `--from DEST`, or else from the first destination that
//! holds it ([`locate`]): a restore after the local disk is gone needs no flag.
//! `decrypt` reads a file or object the operator names.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::report::print_table;
use super::Exit;
use crate::config::{BackupConfig, Config};
use crate::jobs::backup::{human_bytes, BackupJob};
use crate::jobs::{Job, Jobs, Kind, Select};
use crate::repo::archive::{self, Key, KeyRing};
use crate::repo::catalog::{
    self, Listing, Manifest, TrustPolicy, Verification, VerifyMode, VerifyResult,
};
use crate::repo::storage::{self, LocalObject, Object, Place, Storage};
use crate::repo::{files, restore as restoring, sibling, verify as verifying, BackupError};

/// The `<database>.backup` job alone: only its database is opened (lazily) and
/// only its keys are loaded.
fn backup_jobs(config: &Config, database: &str) -> anyhow::Result<Jobs> {
    let kind = Kind::Backup;
    let jobs = Jobs::select(config, Select::Kind { database, kind })?;
    if jobs.backup_for(database).is_none() {
        return Err(no_backup(config, database));
    }
    Ok(jobs)
}

/// The backup job [`backup_jobs`] selected.
fn backup_of<'a>(
    config: &Config,
    jobs: &'a Jobs,
    database: &str,
) -> anyhow::Result<(&'a Arc<Job>, &'a BackupJob)> {
    jobs.backup_for(database)
        .ok_or_else(|| no_backup(config, database))
}

fn no_backup(config: &Config, database: &str) -> anyhow::Error {
    let with_backups: Vec<&str> = config.named_backups().map(|(name, _)| name).collect();
    anyhow!(
        "database \"{database}\" has no [database.backup] (nor a [[files]] set of that name) in {}; databases and files sets with backups: {}",
        config.path.display(),
        if with_backups.is_empty() {
            "none".to_owned()
        } else {
            with_backups.join(", ")
        }
    )
}

/// How the backups of `database` are judged, from its config alone: no database is
/// opened (`backup list` needs none).
pub(super) fn trust_policy_of(
    config: &Config,
    database: &str,
    b: &BackupConfig,
) -> anyhow::Result<TrustPolicy> {
    let (key, keys) = b
        .load_keys()
        .with_context(|| format!("database \"{database}\""))?;
    let state_dir = Some(config.daemon.state_dir.as_path());
    Ok(BackupJob::policy(
        database,
        config.backend_of(database),
        b,
        key.as_ref(),
        &keys,
        false,
        state_dir,
    ))
}

/// The backups of a destination as `policy` judges them.
fn catalog_of(dest: &dyn Storage, policy: &TrustPolicy) -> anyhow::Result<Listing> {
    catalog::list(dest, policy)
        .with_context(|| format!("cannot list backups in {}", dest.location().display()))
}

/// The trusted backup `which` names; an untrusted one is refused (exit 3), with
/// its reason.
fn selected<'a>(
    listing: &'a Listing,
    which: &str,
    dest: &dyn Storage,
) -> anyhow::Result<&'a Manifest> {
    if let Some(m) = catalog::select(&listing.backups, which, Utc::now()) {
        return Ok(m);
    }
    let untrusted = listing
        .untrusted
        .iter()
        .rev()
        .find(|r| which == "latest" || catalog::id_of_manifest_file(&r.file) == Some(which));
    if let Some(r) = untrusted {
        return Err(BackupError::Untrusted {
            id: catalog::id_of_manifest_file(&r.file)
                .unwrap_or(&r.file)
                .to_owned(),
            reason: r.reason.clone(),
        }
        .into());
    }
    if which == "latest" {
        bail!("no good backup in {}", dest.location().display())
    }
    bail!(
        "no backup \"{which}\" in {}; `dbkeeper backup list` shows the ids",
        dest.location().display()
    )
}

/// The destinations of `database` a reader may use: the one `from` names, or all.
pub(super) fn places_from(
    b: &BackupConfig,
    database: &str,
    from: Option<&str>,
) -> anyhow::Result<Vec<Place>> {
    let places = storage::for_backups(b, &[database]);
    let Some(from) = from else {
        return Ok(places);
    };
    let named: Vec<Place> = places
        .into_iter()
        .filter(|p| p.config.is_named(from))
        .collect();
    if named.is_empty() {
        return Err(NotADestination(format!(
            "{from} is not a destination of database \"{database}\"; its destinations: {}",
            b.destination.labels().join(", ")
        ))
        .into());
    }
    Ok(named)
}

/// A `--key-file` or `--identity` of the command line is unusable (missing, readable
/// by others, not a key): a usage error (exit 2), like a bad key in the config.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct GivenKey(#[from] pub crate::keys::KeyError);

/// Checks the `--identity` files of `restore` and `backup verify` before anything is
/// read, so a bad one is a usage error rather than a failed job.
pub fn check_identities(files: &[PathBuf]) -> Result<(), GivenKey> {
    for f in files {
        archive::Identity::load(f)?;
    }
    Ok(())
}

/// `--from` named no destination of the config: a usage error (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotADestination(String);

/// The trusted backup `which` names and the destination to read it from: with
/// `latest`, the newest trusted backup in any of `places`; the first place (in the
/// configured order) that holds it. A destination that cannot be listed is skipped
/// with a warning; an untrusted match anywhere is refused (exit 3) when no trusted
/// one exists.
fn locate(
    places: Vec<Place>,
    which: &str,
    policy: &TrustPolicy,
) -> anyhow::Result<(Place, Manifest)> {
    let mut best: Option<(Place, Manifest)> = None;
    let mut refusal = None;
    let mut unreachable = Vec::new();
    for place in places {
        let listing = match catalog_of(&*place.store, policy) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("warning: {}: {e:#}", place.label());
                unreachable.push(place.label());
                continue;
            }
        };
        match selected(&listing, which, &*place.store) {
            Ok(m) => {
                if best
                    .as_ref()
                    .is_none_or(|(_, b)| m.started_at > b.started_at)
                {
                    best = Some((place.clone(), m.clone()));
                }
            }
            Err(e) if e.downcast_ref::<BackupError>().is_some() => {
                refusal.get_or_insert(e);
            }
            Err(_) => {}
        }
        if which != "latest" && best.is_some() {
            break;
        }
    }
    if let Some(found) = best {
        return Ok(found);
    }
    if let Some(e) = refusal {
        return Err(e);
    }
    let unreachable = if unreachable.is_empty() {
        String::new()
    } else {
        format!(" (could not be listed: {})", unreachable.join(", "))
    };
    if which == "latest" {
        bail!("no good backup in any destination{unreachable}")
    }
    bail!("no backup \"{which}\" in any destination{unreachable}; `dbkeeper backup list` shows the ids")
}

fn verified_cell(v: &Verification) -> String {
    match v.result {
        VerifyResult::Passed => format!("{} {}", v.mode.as_str(), v.at.format("%Y-%m-%d %H:%M")),
        VerifyResult::Skipped => "not verified".to_owned(),
        VerifyResult::Failed => "FAILED".to_owned(),
    }
}

/// `yes` (with how many roles) when the archive carries the globals `restore
/// --with-roles` needs, `no` for a PostgreSQL backup without them, `-` for SQLite.
fn roles_cell(m: &Manifest) -> String {
    match (&m.globals, m.backend()) {
        (Some(g), _) => format!("yes({})", g.roles),
        (None, Some(crate::config::Backend::Postgres)) => "no".to_owned(),
        (None, _) => "-".to_owned(),
    }
}

/// `, DUPLICATE ID <id> (<files>)`: more than one manifest claims this id.
fn duplicate_note(d: &catalog::DuplicateId) -> String {
    format!(", DUPLICATE ID {} ({})", d.id, d.files.join(", "))
}

pub fn list(config: &Config, only: Option<&str>) -> anyhow::Result<Exit> {
    let mut rows = Vec::new();
    let mut unreachable = Vec::new();
    let mut found_db = only.is_none();
    for (name, b) in config.named_backups() {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        found_db = true;
        let policy = trust_policy_of(config, name, b)?;
        for place in storage::for_backups(b, &[name]) {
            match catalog_of(&*place.store, &policy) {
                Ok(listing) => {
                    let paired = |set: &str, id: &str| files_backup_exists(config, set, id);
                    list_rows(name, &place.label(), &listing, &paired, &mut rows)
                }
                Err(e) => unreachable.push(format!("{}: {e:#}", place.label())),
            }
        }
    }
    if !found_db {
        bail!(
            "database \"{}\" has no [database.backup] in {}",
            only.unwrap_or(""),
            config.path.display()
        );
    }
    let mut header = vec![
        "ID",
        "DATABASE",
        "DESTINATION",
        "TIME (UTC)",
        "SIZE",
        "RAW SIZE",
        "ROLES",
        "KEY",
        "VERIFIED",
    ];
    // The pairing of `with-files`, shown only where there is one.
    if rows.iter().any(|r| r.len() > header.len()) {
        header.push("WITH FILES");
        for r in &mut rows {
            r.resize(header.len(), "-".to_owned());
        }
    }
    print_table(&header, &rows);
    if unreachable.is_empty() {
        return Ok(Exit::Success);
    }
    // The table shows what could be read; a destination that could not is a failure.
    for e in &unreachable {
        super::print_error(e);
    }
    Ok(Exit::Failed)
}

/// Whether the files set `set` has a backup `id` (archive and manifest) in one of
/// its destinations: a `with-files` pairing is shown only then.
fn files_backup_exists(config: &Config, set: &str, id: &str) -> bool {
    let Some(f) = config.files.iter().find(|f| f.name == set) else {
        return false;
    };
    let archive = format!("{id}{}", storage::ARCHIVE_SUFFIX);
    storage::for_backups(&f.backup, &[set]).iter().any(|p| {
        p.store.list(id).is_ok_and(|names| {
            names.contains(&archive) && names.contains(&Manifest::manifest_name(id))
        })
    })
}

/// The rows of one destination's backups, trusted then untrusted; `paired(set,
/// id)`: whether the files set's backup of a `with-files` pairing exists.
fn list_rows(
    database: &str,
    destination: &str,
    listing: &Listing,
    paired: &dyn Fn(&str, &str) -> bool,
    rows: &mut Vec<Vec<String>>,
) {
    let now = Utc::now();
    for m in &listing.backups {
        let mut verified = verified_cell(&m.verification);
        if catalog::is_future(m.started_at, now) {
            verified.push_str(", DATED IN THE FUTURE");
        }
        if let Some(d) = listing.duplicate_of(&Manifest::manifest_name(&m.id)) {
            verified.push_str(&duplicate_note(d));
        }
        rows.push(vec![
            m.id.clone(),
            m.database.clone(),
            destination.to_owned(),
            m.started_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            human_bytes(m.stored_bytes),
            human_bytes(m.raw_bytes),
            roles_cell(m),
            key_cell(listing.made_for(&m.id)),
            verified,
        ]);
        let present: Vec<&str> = m
            .with_files
            .iter()
            .map(String::as_str)
            .filter(|set| paired(set, &m.id))
            .collect();
        if !present.is_empty() {
            if let Some(row) = rows.last_mut() {
                // Restore the same id of each to roll back to a matching pair.
                row.push(format!("{} (same id)", present.join(", ")));
            }
        }
    }
    for r in &listing.untrusted {
        let id = catalog::id_of_manifest_file(&r.file).unwrap_or(&r.file);
        rows.push(vec![
            id.to_owned(),
            database.to_owned(),
            destination.to_owned(),
            r.manifest.as_ref().map_or_else(
                || "-".to_owned(),
                |m| m.started_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            ),
            "-".to_owned(),
            "-".to_owned(),
            "-".to_owned(),
            "-".to_owned(),
            format!(
                "UNTRUSTED: {}{}",
                r.reason,
                listing
                    .duplicate_of(&r.file)
                    .map_or_else(String::new, duplicate_note)
            ),
        ]);
    }
}

/// The KEY cell: the key ids and recipients an archive was made for, recipients cut
/// to a fingerprint (`age1` and 8 characters, `…`, the last 4) that tells them apart
/// in a table; `none` for an unencrypted archive.
fn key_cell(made_for: &[String]) -> String {
    if made_for.is_empty() {
        return "none".to_owned();
    }
    made_for
        .iter()
        .map(|entry| match entry.strip_prefix("recipient ") {
            Some(r) => {
                let chars: Vec<char> = r.chars().collect();
                if chars.len() <= 20 {
                    return r.to_owned();
                }
                let head: String = chars[..12].iter().collect();
                let tail: String = chars[chars.len() - 4..].iter().collect();
                format!("{head}…{tail}")
            }
            None => entry.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn verify(
    config: &Config,
    database: &str,
    which: &str,
    from: Option<&str>,
    restore_test: bool,
    allow_unencrypted: bool,
) -> anyhow::Result<Exit> {
    let jobs = backup_jobs(config, database)?;
    let (job, b) = backup_of(config, &jobs, database)?;
    let policy = b.trust_policy(database, allow_unencrypted);
    let (place, mut manifest) = locate(places_from(&b.cfg, database, from)?, which, &policy)?;
    let dest = place.store.clone();
    let mode = if restore_test {
        VerifyMode::Restore
    } else {
        VerifyMode::Read
    };
    let cancel = cancel_on_signal();
    // Made for recipients and no identity at all here: what can be checked without
    // one is, and the reader is told what was not. With an identity that does not
    // open it, or asked for a restore test, the full read below fails (exit 3) saying
    // what the archive was made for and what is here (adversary round 2 of issue 16,
    // case 03: a wrong identity must never look like a passed check).
    let partial = b.keys.identities().is_empty() && !restore_test;
    if let Some(made_for) = unreadable_here(&*dest, &manifest, &b.keys)?.filter(|_| partial) {
        let archive = verifying::open_archive(&*dest, &manifest.archive_name())
            .with_context(|| format!("backup {} in {}", manifest.id, place.label()))?;
        verifying::stored_sha_matches(&*archive, &manifest.sha256, &cancel)
            .await
            .with_context(|| format!("backup {} in {}", manifest.id, place.label()))?;
        println!(
            "backup {} in {}: the archive's SHA-256 matches its manifest and its header is sound (the writer tag was checked by this host's writer key), but its contents were NOT authenticated or decrypted: it was made for {}, and no identity for them is configured here; pass --identity FILE to verify it fully",
            manifest.id,
            place.label(),
            made_for.join(", ")
        );
        return Ok(Exit::Success);
    }
    let result = match verifying::open_archive(&*dest, &manifest.archive_name()) {
        Ok(archive) => {
            let expect = Some(verifying::Expect::trusted(&manifest, &policy));
            match (&b.files, job.db()) {
                (Some(_), _) => {
                    files::verify_tree(
                        &*archive,
                        &b.keys,
                        restore_test,
                        expect,
                        &b.scratch_dir,
                        &cancel,
                    )
                    .await
                }
                (None, Ok(db)) => {
                    let target = b.scratch_target(db);
                    verifying::verify(&*archive, &b.keys, mode, expect, &target, &cancel).await
                }
                (None, Err(e)) => Err(BackupError::Internal(e.to_string())),
            }
        }
        Err(e) => Err(e),
    };
    // A wrong or missing key says nothing about the archive: do not record it; nor
    // is a manifest that turned out untrusted ever written to.
    let about_archive = match &result {
        Ok(()) => true,
        Err(e) => {
            e.is_verification()
                && !matches!(
                    e,
                    BackupError::Archive(archive::ArchiveError::WrongKey { .. })
                        | BackupError::Untrusted { .. }
                )
        }
    };
    if about_archive {
        manifest.verification = Verification {
            mode,
            result: if result.is_ok() {
                VerifyResult::Passed
            } else {
                VerifyResult::Failed
            },
            at: Utc::now(),
            error: result.as_ref().err().map(ToString::to_string),
        };
        manifest
            .save(&*dest)
            .with_context(|| format!("cannot update the manifest of {}", manifest.id))?;
    }
    result.with_context(|| format!("backup {} in {}", manifest.id, place.label()))?;
    println!(
        "backup {} in {}: verification passed ({})",
        manifest.id,
        place.label(),
        mode.as_str()
    );
    Ok(Exit::Success)
}

/// The recipients a trusted, recipients-only archive was made for when nothing in
/// `keys` opens it (it was trusted on its writer tag); `None` when `keys` can read it.
fn unreadable_here(
    store: &dyn Storage,
    manifest: &Manifest,
    keys: &KeyRing,
) -> anyhow::Result<Option<Vec<String>>> {
    let archive = verifying::open_archive(store, &manifest.archive_name())?;
    let mut reader = archive.read(None)?;
    let (header, _) = archive::format::read_header(&mut reader)?;
    let made_for = header.made_for();
    Ok(
        (crate::repo::catalog::trust::recipients_only(&header) && !keys.may_open(&made_for))
            .then_some(made_for),
    )
}

pub fn prune(
    config: &Config,
    database: &str,
    from: Option<&str>,
    dry_run: bool,
) -> anyhow::Result<Exit> {
    let jobs = backup_jobs(config, database)?;
    let (_, b) = backup_of(config, &jobs, database)?;
    let places = places_from(&b.cfg, database, from)?;
    let several = places.len() > 1;
    let mut failed = Vec::new();
    for place in &places {
        if several {
            println!("{}:", place.label());
        }
        // One destination that cannot be rotated does not stop the others.
        let decisions = match b.prune(database, place, None, dry_run) {
            Ok(d) => d,
            Err(e) => {
                super::print_error(&format!("{}: {e}", place.label()));
                failed.push(place.label());
                continue;
            }
        };
        for d in &decisions {
            if d.keep {
                println!("keep    {}  ({})", d.id, d.reasons.join(", "));
            } else if dry_run {
                println!("would delete {}", d.id);
            } else {
                println!("deleted {}", d.id);
            }
        }
    }
    if failed.is_empty() {
        Ok(Exit::Success)
    } else {
        Ok(Exit::Failed)
    }
}

/// `restore`'s switches.
pub struct RestoreFlags {
    pub force: bool,
    pub create: bool,
    pub allow_unencrypted: bool,
    pub with_roles: bool,
    /// `--from DEST`.
    pub from: Option<String>,
}

pub async fn restore(
    config: &Config,
    database: &str,
    which: &str,
    to: &str,
    how: RestoreFlags,
) -> anyhow::Result<Exit> {
    let jobs = backup_jobs(config, database)?;
    let (_, b) = backup_of(config, &jobs, database)?;
    // Plaintext a killed restore left in the scratch folder goes now, not only at the
    // daemon's next start.
    b.clean_scratch(database);
    let policy = b.trust_policy(database, how.allow_unencrypted);
    let places = places_from(&b.cfg, database, how.from.as_deref())?;
    let (mut place, mut manifest) = locate(places, which, &policy)?;
    if how.with_roles && b.files.is_some() {
        eprintln!("error: --with-roles is for PostgreSQL backups; \"{database}\" is a files set");
        return Ok(Exit::Usage);
    }
    if how.with_roles && manifest.backend() == Some(crate::config::Backend::Sqlite) {
        // A usage mistake, not a failed restore: nothing was tried.
        eprintln!(
            "error: --with-roles is for PostgreSQL backups; database \"{database}\" is SQLite, which has no roles"
        );
        return Ok(Exit::Usage);
    }
    let cancel = cancel_on_signal();
    let opts = restoring::Options {
        force: how.force,
        create: how.create,
        pg_restore: &b.cfg.pg_restore,
        trust: &policy,
        scratch_dir: &b.scratch_dir,
        with_roles: how.with_roles,
    };
    let mut tried = vec![place.label()];
    loop {
        // The one handle that is authenticated and restored: never reopened by name.
        let restored = match verifying::open_archive(&*place.store, &manifest.archive_name()) {
            Ok(archive) if b.files.is_some() => {
                let expect = verifying::Expect::trusted(&manifest, &policy);
                let dir = Path::new(to);
                let kept = config.restore_dir_protected();
                files::restore_dir(&*archive, &b.keys, expect, dir, how.force, &kept, &cancel).await
            }
            Ok(archive) => {
                // A SQLite file restored into a destination or the state directory
                // could replace an archive, a manifest or the run history.
                let file_target = !to.starts_with("postgres:") && !to.starts_with("postgresql:");
                match file_target.then(|| {
                    files::not_a_companion(Path::new(to)).and_then(|()| {
                        files::check_target(Path::new(to), &config.sqlite_restore_protected())
                    })
                }) {
                    Some(Err(e)) => Err(e),
                    _ => {
                        restoring::restore(&*archive, &manifest, &b.keys, to, &opts, &cancel).await
                    }
                }
            }
            Err(e) => Err(e),
        };
        match restored {
            Ok(done) => {
                println!("backup {} (from {}): {done}", manifest.id, place.label());
                return Ok(Exit::Success);
            }
            // A damaged copy never touched the target (it is decoded whole first): the
            // same backup in the next destination may be intact.
            Err(e) if how.from.is_none() && e.is_verification() => {
                let Some(next) = other_copy(&b.cfg, database, &manifest, &policy, &tried) else {
                    return Err(e).with_context(|| {
                        format!(
                            "restore of backup {} from {}",
                            manifest.id,
                            tried.join(", then ")
                        )
                    });
                };
                eprintln!(
                    "warning: the copy of backup {} in {} failed ({e}); trying the copy in {}",
                    manifest.id,
                    place.label(),
                    next.0.label()
                );
                tried.push(next.0.label());
                (place, manifest) = next;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("restore of backup {} from {}", manifest.id, place.label())
                })
            }
        }
    }
}

/// Another copy of the backup `of`: the same id, trusted, with the same SHA-256, size
/// and key, in the first destination (in the configured order) not in `tried`. A
/// different archive under the same id (another host's backup of that second, a
/// forgery) is never taken for a copy (adversary round 7, cases 22 and 29).
fn other_copy(
    b: &BackupConfig,
    database: &str,
    of: &Manifest,
    policy: &TrustPolicy,
    tried: &[String],
) -> Option<(Place, Manifest)> {
    storage::for_backups(b, &[database])
        .into_iter()
        .filter(|p| !tried.contains(&p.label()))
        .find_map(|p| {
            let listing = catalog::list(&*p.store, policy).ok()?;
            let m = catalog::select(&listing.backups, &of.id, Utc::now())?.clone();
            let same =
                m.sha256 == of.sha256 && m.stored_bytes == of.stored_bytes && m.key_id == of.key_id;
            same.then_some((p, m))
        })
}

/// `decrypt`'s arguments.
pub struct DecryptArgs<'a> {
    pub key_files: &'a [PathBuf],
    /// `--identity` files: with or without key files, the config's keys are not used.
    pub identities: &'a [PathBuf],
    /// A path, an object URL, or with `from` a name under that destination.
    pub archive: &'a str,
    pub from: Option<&'a str>,
    pub output: &'a str,
    pub allow_unencrypted: bool,
}

/// Opens the archive `decrypt` was given: one handle (a file, or an object pinned
/// to its version) that every later read goes through.
fn open_for_decrypt(
    config: Option<&Config>,
    args: &DecryptArgs<'_>,
) -> anyhow::Result<Box<dyn Object>> {
    let destinations = || {
        config
            .into_iter()
            .flat_map(|c| c.named_backups())
            .flat_map(|(_, b)| b.destination.iter())
    };
    if let Some(from) = args.from {
        let dest = destinations().find(|d| d.is_named(from)).ok_or_else(|| {
            NotADestination(format!("{from} is not a destination in the configuration"))
        })?;
        let (dir, name) = match args.archive.rsplit_once('/') {
            Some((dir, name)) => (dir.split('/').collect::<Vec<_>>(), name),
            None => (Vec::new(), args.archive),
        };
        let store = storage::open(dest, &dir);
        return store
            .open(name)
            .with_context(|| format!("cannot open {} in {}", args.archive, dest.label()));
    }
    let location = crate::config::Location::parse(args.archive).map_err(|e| anyhow!("{e}"))?;
    match location {
        crate::config::Location::Local(path) => {
            let file = storage::open_regular(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            Ok(Box::new(LocalObject::from_file(file, path)?))
        }
        crate::config::Location::Remote {
            cloud,
            bucket,
            prefix,
        } => {
            let (dir, name) = prefix.rsplit_once('/').unwrap_or(("", prefix.as_str()));
            if name.is_empty() {
                bail!("{} names no object", args.archive);
            }
            // A configured destination's settings (endpoint, credentials) apply to the
            // objects under it; otherwise the environment's.
            let bucket_dest = crate::config::DestinationConfig {
                location: crate::config::Location::Remote {
                    cloud,
                    bucket,
                    prefix: dir.to_owned(),
                },
                settings: Default::default(),
            };
            let configured = destinations().find(|d| {
                d.location == bucket_dest.location || d.location.contains(&bucket_dest.location)
            });
            let dest = match configured {
                Some(d) => crate::config::DestinationConfig {
                    location: bucket_dest.location.clone(),
                    settings: d.settings.clone(),
                },
                None => bucket_dest,
            };
            storage::open(&dest, &[])
                .open(name)
                .with_context(|| format!("cannot open {}", args.archive))
        }
    }
}

pub async fn decrypt(config: Option<&Config>, args: DecryptArgs<'_>) -> anyhow::Result<Exit> {
    let given = !args.key_files.is_empty() || !args.identities.is_empty();
    let keys = if !given {
        config
            .map(Config::key_ring)
            .transpose()?
            .unwrap_or_default()
    } else {
        let keys = args
            .key_files
            .iter()
            .map(|f| Key::load(f))
            .collect::<Result<_, _>>()
            .map_err(GivenKey)?;
        let mut identities = Vec::new();
        for f in args.identities {
            identities.extend(archive::Identity::load(f).map_err(GivenKey)?);
        }
        KeyRing::with_identities(keys, identities)
    };
    // With the config, the archive must be one of its databases'.
    let databases: Option<Vec<&str>> = (!given).then(|| {
        config.map_or_else(Vec::new, |c| {
            c.named_backups().map(|(name, _)| name).collect()
        })
    });
    // One handle for the checks and the output, so nothing can be swapped in between.
    let archive = open_for_decrypt(config, &args)?;
    let context = || archive.location().display().to_string();
    check_provenance(
        databases.as_ref().and(config),
        &*archive,
        &keys,
        databases.as_deref(),
        args.allow_unencrypted,
    )?;
    let cancel = cancel_on_signal();
    let output = args.output;
    if output == "-" {
        // Authenticate everything first: a consumer never sees data from a bad archive.
        let checked = archive.read(None).with_context(context)?;
        let (_, first) = verifying::decode_handle_to(checked, &keys, std::io::sink(), &cancel)
            .await
            .with_context(context)?;
        let again = archive.read(None).with_context(context)?;
        let out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout());
        match verifying::decode_handle_to(again, &keys, out, &cancel).await {
            Ok((mut out, second)) => {
                out.flush()
                    .with_context(|| "cannot write to stdout".to_owned())?;
                if second.sha256 != first.sha256 {
                    return Err(BackupError::Verification(
                        "the archive changed while it was being read; discard the output".into(),
                    ))
                    .with_context(context);
                }
            }
            // The reader stopped early (`| pg_restore -l`, `| head`): its choice, not a failure.
            Err(BackupError::Archive(archive::ArchiveError::Io(e)))
                if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => return Err(e).with_context(context),
        }
    } else {
        let out = Path::new(output);
        // Not `exists()`: a dangling symbolic link is something there too.
        if std::fs::symlink_metadata(out).is_ok() {
            bail!("{output} exists; remove it or choose another -o");
        }
        // SQLite would take a WAL or journal left beside the name for the new file's
        // own and replay it into it (adversary round 4, case 14).
        for side in sibling::SIDE_FILES {
            let mut path = out.as_os_str().to_owned();
            path.push(side);
            if std::fs::symlink_metadata(&path).is_ok() {
                bail!(
                    "{} exists beside {output}: SQLite would read it as the decrypted database's own;                      remove it or choose another -o",
                    Path::new(&path).display()
                );
            }
        }
        for done in sibling::remove_dead_temps(out)? {
            tracing::warn!("{done}");
        }
        // Locked while it exists: a decrypt killed mid-way leaves plaintext the next
        // one into this folder removes.
        let tmp = sibling::SiblingTemp::create(out)?;
        verifying::decode_handle_into(
            archive.read(None).with_context(context)?,
            &keys,
            None,
            (tmp.writer()?, tmp.path()),
            verifying::Durability::Synced,
            &cancel,
        )
        .await
        .with_context(context)?;
        std::fs::rename(tmp.path(), out).with_context(|| format!("cannot write {output}"))?;
        eprintln!("wrote {output}");
    }
    Ok(Exit::Success)
}

/// `decrypt`'s share of the provenance rules, checked on the header before anything
/// is written (a header that claims encryption is authenticated by the decryption
/// itself, which also needs one of the given keys): a plain archive proves nothing
/// about who made it, so when any key is known (the config's or `--key-file`) it is
/// read only with `--allow-unencrypted`; with a config (`databases`), the archive
/// must be one of its databases'.
fn check_provenance(
    config: Option<&Config>,
    archive: &dyn Object,
    keys: &KeyRing,
    databases: Option<&[&str]>,
    allow_unencrypted: bool,
) -> anyhow::Result<()> {
    let context = || archive.location().display().to_string();
    let mut reader = archive.read(None).with_context(context)?;
    let (header, _) = archive::format::read_header(&mut reader).with_context(context)?;
    let untrusted = |reason| BackupError::Untrusted {
        id: context(),
        reason,
    };
    if header.encryption.is_none() && !allow_unencrypted && !keys.is_empty() {
        return Err(untrusted(catalog::Untrusted::Unencrypted).into());
    }
    if let Some(databases) = databases {
        if !databases.contains(&header.database.as_str()) {
            return Err(untrusted(catalog::Untrusted::WrongDatabase {
                what: "header",
                found: header.database.clone(),
                expected: databases.join(", "),
            })
            .into());
        }
    }
    // A retired key vouches only for archives older than the database's first backup
    // under the current key, in any destination (as for every other reader).
    let db = config.and_then(|c| {
        let (_, b) = c
            .named_backups()
            .find(|(name, _)| *name == header.database)?;
        Some((c, b))
    });
    if let (Some((config, b)), Some(enc)) = (db, &header.encryption) {
        let policy = trust_policy_of(config, &header.database, b)?;
        if policy
            .current_key
            .as_ref()
            .is_some_and(|k| *k != enc.key_id)
        {
            let places = storage::for_backups(b, &[&header.database]);
            let seen = catalog::first_current_key_backup(places.iter().map(|p| &*p.store), &policy);
            let first = policy.retired_boundary(seen);
            if let Some((_, id)) =
                first.filter(|(at, _)| header.created.timestamp() >= at.timestamp())
            {
                return Err(untrusted(catalog::Untrusted::RetiredKey {
                    key: enc.key_id.clone(),
                    first: id,
                })
                .into());
            }
        }
    }
    Ok(())
}

pub fn key_generate(output: &Path) -> anyhow::Result<Exit> {
    let key = Key::generate(output)?;
    println!("{}", key.id());
    eprintln!(
        "created {} (mode 0600), key id {}; keep a copy of this file apart from the backups: without it they cannot be read",
        output.display(),
        key.id()
    );
    // Made with sudo, the file is root's and mode 0600: the service user cannot
    // read it directly, and should not need to.
    let by_root = std::fs::metadata(output).is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    if by_root {
        let name = output
            .file_name()
            .map_or("backup.key".into(), |n| n.to_string_lossy());
        eprintln!(
            "it belongs to root: let systemd hand it to the service with `LoadCredential={name}:{}` in the unit and write `encryption-key-file = \"{name}\"` (or `chown dbkeeper: {}`)",
            output.display(),
            output.display()
        );
    }
    Ok(Exit::Success)
}

/// A token cancelled by Ctrl-C or SIGTERM, so long operations stop cleanly.
fn cancel_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        eprintln!("interrupted: stopping");
        trigger.cancel();
    });
    token
}

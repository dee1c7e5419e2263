//! `dbkeeper key rewrap`: re-wraps the data key of a stored backup under the
//! current key file and/or age recipients without re-encrypting its segments.
//!
//! A backup is rewritten in an order chosen so that a kill at any moment leaves its
//! archive readable with the old keys or the new ones, never neither: the new
//! archive (a new v3 prefix, then the old segments copied unchanged) is streamed to
//! a replacing upload, read back in full with the target's keys, published over the
//! old one (an atomic rename locally), and only then is the manifest rewritten.
//! A run killed between the two leaves an archive made for the target under a
//! manifest that still describes the old one; the next run finds it, reads it whole
//! with the target's keys and rewrites the manifest ("repaired").

use std::collections::BTreeSet;
use std::io::{self, Write};

use crate::keys::{Key, KeyRing, Recipient};
use crate::repo::archive::{self, format, ArchiveError, ArchiveReader, HashRead, Hashing, Header};
use crate::repo::catalog::{self, Manifest, TrustPolicy, WriterTag};
use crate::repo::storage::{Object, Storage, Upload};

/// What a backup is rewrapped to.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The current `encryption-key-file`, if any.
    pub key: Option<&'a Key>,
    /// The current `recipients` (and `recipients-file`).
    pub recipients: &'a [Recipient],
    /// This host's writer key: required when `key` is `None`, since nothing the host
    /// holds then reads the result, and the manifest's writer tag vouches for it.
    pub writer: Option<&'a Key>,
}

impl Target<'_> {
    /// What an archive made for this target is made for, as
    /// [`Header::made_for`] lists it.
    pub fn made_for(&self) -> BTreeSet<String> {
        self.key
            .map(|k| format!("key {}", k.id()))
            .into_iter()
            .chain(self.recipients.iter().map(|r| format!("recipient {r}")))
            .collect()
    }

    /// The keys that read an archive made for this target: the key file, and those
    /// identities of `keys` that belong to its recipients.
    fn ring(&self, keys: &KeyRing) -> KeyRing {
        let wanted: BTreeSet<String> = self.recipients.iter().map(ToString::to_string).collect();
        let identities = keys
            .identities()
            .iter()
            .filter(|i| wanted.contains(&i.recipient().to_string()))
            .cloned()
            .collect();
        KeyRing::with_identities(self.key.into_iter().cloned().collect(), identities)
    }
}

/// What [`rewrap_backup`] did (or, dry, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The archive was rewritten for the target, then its manifest.
    Rewrapped,
    /// Made for the target and described by its manifest: nothing to do.
    AlreadyCurrent,
    /// Made for the target (a previous run was killed before the manifest): the
    /// archive was read whole with the target's keys and the manifest rewritten.
    Repaired,
    /// `--dry-run`: would be rewrapped (the current keys open it).
    WouldRewrap,
    /// `--dry-run`: would be repaired.
    WouldRepair,
    /// An unencrypted archive: rewrap never encrypts one.
    NotEncrypted,
}

impl Outcome {
    /// How `key rewrap` reports it.
    pub fn describe(&self) -> &'static str {
        match self {
            Outcome::Rewrapped => "rewrapped",
            Outcome::AlreadyCurrent => "already current",
            Outcome::Repaired => "repaired",
            Outcome::WouldRewrap => "would rewrap",
            Outcome::WouldRepair => "would repair",
            Outcome::NotEncrypted => "skipped: not encrypted: never encrypted by rewrap",
        }
    }
}

/// Why a backup could not be rewrapped. Messages name key ids and recipients, never
/// key material.
#[derive(Debug, thiserror::Error)]
pub enum RewrapError {
    #[error("{0}")]
    Archive(#[from] ArchiveError),
    #[error("{what}: {source}")]
    Storage { what: String, source: io::Error },
    #[error("the target has no key file: a recipients-only rewrap needs this host's writer key")]
    NoWriterKey,
    #[error("nothing to rewrap to: configure encryption-key-file or recipients")]
    NoTarget,
    #[error("the rewritten archive does not read back: {0}")]
    ReadBack(String),
    #[error("the archive is made for the new keys but its manifest cannot be repaired: {0}")]
    Unrepairable(String),
    #[error("nothing proves this host wrote it ({0}); an identity alone proves only that it was made for you, and rewrapping would vouch for a planted archive: left as it is (check it, then delete it or restore it by hand)")]
    NotWrittenHere(String),
}

/// Whether this host can tell that it wrote the archive: a key file of the
/// configuration opens it (only holders of the key make such archives), or it is
/// made for recipients only and its manifest's writer tag checks with this host's
/// writer key (`policy.writer`). An identity opening it proves nothing of the kind:
/// anyone who knows the public recipient makes archives it opens, and a rewrap (new
/// wraps, a new writer tag) or a repair would then vouch for a planted archive
/// (adversary round of issue 16, cases 02 and 03).
fn written_here(
    object: &dyn Object,
    header: &Header,
    envelope: &[u8],
    manifest: &Manifest,
    keys: &KeyRing,
    policy: &TrustPolicy,
) -> Result<(), RewrapError> {
    use std::io::Read;
    let key_files = KeyRing::new(keys.clone().into_keys());
    if key_files.may_open(&header.made_for()) {
        let opened = ArchiveReader::open(
            object
                .read(None)
                .map_err(storage("cannot read the archive"))?,
            &key_files,
        )
        .and_then(|mut r| r.read(&mut [0u8; 1]).map_err(ArchiveError::Io).map(|_| ()));
        return opened.map_err(|e| {
            RewrapError::NotWrittenHere(format!("its key file does not open it: {e}"))
        });
    }
    if catalog::trust::recipients_only(header) {
        return catalog::trust::check_writer(manifest, header, envelope, policy)
            .map_err(|e| RewrapError::NotWrittenHere(e.to_string()));
    }
    Err(RewrapError::NotWrittenHere(
        "no configured key file opens it".to_owned(),
    ))
}

fn storage(what: impl Into<String>) -> impl FnOnce(io::Error) -> RewrapError {
    let what = what.into();
    move |source| RewrapError::Storage { what, source }
}

/// Reads all of `object` through an [`ArchiveReader`] with `ring`, so that every
/// segment authenticates; returns its size and SHA-256.
fn read_whole(object: &dyn Object, ring: &KeyRing) -> Result<(u64, String), RewrapError> {
    let mut raw = HashRead::new(
        object
            .read(None)
            .map_err(storage("cannot read the archive"))?,
    );
    {
        let mut reader = ArchiveReader::open(&mut raw, ring)?;
        io::copy(&mut reader, &mut io::sink()).map_err(|e| RewrapError::ReadBack(e.to_string()))?;
    }
    raw.finish().map_err(storage("cannot read the archive"))
}

/// The header (listing form) of `object` and its bytes (a v3 archive's envelope).
fn header_of(object: &dyn Object) -> Result<(Header, Vec<u8>), RewrapError> {
    let mut input = object
        .read(None)
        .map_err(storage("cannot read the archive"))?;
    Ok(format::read_header(&mut input)?)
}

/// The manifest of `manifest`'s backup once its archive is `header`/`envelope`,
/// `size` bytes with digest `sha256`, made for `target`.
fn updated(
    manifest: &Manifest,
    header: &Header,
    envelope: &[u8],
    size: u64,
    sha256: String,
    target: &Target<'_>,
) -> Result<Manifest, RewrapError> {
    let mut m = manifest.clone();
    m.key_id = header.encryption.as_ref().map(|e| e.key_id.clone());
    m.stored_bytes = size;
    m.sha256 = sha256;
    m.format_version = header.format_version();
    m.rewrapped = Some(chrono::Utc::now());
    m.writer = match target.key {
        Some(_) => None,
        None => {
            let writer = target.writer.ok_or(RewrapError::NoWriterKey)?;
            Some(WriterTag {
                key_id: writer.id().to_owned(),
                tag: crate::keys::writer_tag(writer, &m.database, &m.id, envelope),
            })
        }
    };
    Ok(m)
}

/// Rewraps the backup `manifest` in `store` for `target`, opening it with `keys`.
/// With `dry_run` nothing is written. `trusted`: the listing trusted it; an
/// untrusted one (a manifest a killed rewrap left behind, which no longer agrees
/// with its archive) is only ever repaired, and only when its archive is made for
/// the target and reads whole with the target's keys. `policy` re-checks a
/// repaired manifest.
pub fn rewrap_backup(
    store: &dyn Storage,
    manifest: &Manifest,
    trusted: bool,
    keys: &KeyRing,
    target: &Target<'_>,
    policy: &TrustPolicy,
    dry_run: bool,
) -> Result<Outcome, RewrapError> {
    if target.key.is_none() && target.recipients.is_empty() {
        return Err(RewrapError::NoTarget);
    }
    if target.key.is_none() && target.writer.is_none() {
        return Err(RewrapError::NoWriterKey);
    }
    let name = manifest.archive_name();
    let object = store
        .open(&name)
        .map_err(storage(format!("cannot open {name}")))?;
    let (header, envelope) = header_of(&*object)?;
    if header.encryption.is_none() && trusted {
        return Ok(Outcome::NotEncrypted);
    }
    let made_for: BTreeSet<String> = header.made_for().into_iter().collect();
    if made_for == target.made_for() {
        return current_or_repair(
            store, manifest, &*object, &header, &envelope, keys, target, policy, dry_run,
        );
    }
    if !trusted {
        return Err(RewrapError::Unrepairable(
            "its archive is not made for the new keys".to_owned(),
        ));
    }
    written_here(&*object, &header, &envelope, manifest, keys, policy)?;
    if dry_run {
        return would_rewrap(&*object, keys, target);
    }
    let Replacement {
        upload,
        written,
        bytes: written_bytes,
        sha256,
    } = write_replacement(store, &name, &*object, keys, target)?;
    let (new_header, new_envelope) = header_of(&*written)?;
    let guard = upload
        .publish()
        .map_err(storage(format!("cannot replace {name}")))?;
    let new = updated(
        manifest,
        &new_header,
        &new_envelope,
        written_bytes,
        sha256,
        target,
    )?;
    new.save(store).map_err(storage(format!(
        "cannot write the manifest of {}",
        manifest.id
    )))?;
    drop(guard);
    Ok(Outcome::Rewrapped)
}

/// `--dry-run`: only the prefix is read, and the current keys must open it.
fn would_rewrap(
    object: &dyn Object,
    keys: &KeyRing,
    target: &Target<'_>,
) -> Result<Outcome, RewrapError> {
    rewrapped_prefix(object, keys, target)?;
    Ok(Outcome::WouldRewrap)
}

/// The new prefix of `object` for `target` (see [`archive::rewrap`]): its data key
/// opened with `keys` and wrapped again, the segments untouched.
fn rewrapped_prefix(
    object: &dyn Object,
    keys: &KeyRing,
    target: &Target<'_>,
) -> Result<archive::Rewrapped, RewrapError> {
    Ok(archive::rewrap(
        &mut object
            .read(None)
            .map_err(storage("cannot read the archive"))?,
        keys,
        target.key,
        target.recipients,
    )?)
}

/// A rewrapped archive, written and read back, not yet published.
struct Replacement {
    upload: Box<dyn Upload>,
    /// What the upload wrote, opened.
    written: Box<dyn Object>,
    bytes: u64,
    sha256: String,
}

/// Streams the rewrapped `object` (`name` in `store`) to a replacing upload and reads
/// it back whole with the target's keys.
fn write_replacement(
    store: &dyn Storage,
    name: &str,
    object: &dyn Object,
    keys: &KeyRing,
    target: &Target<'_>,
) -> Result<Replacement, RewrapError> {
    let rewrapped = rewrapped_prefix(object, keys, target)?;
    let size = object.size();
    let upload = store
        .put_replacing(name)
        .map_err(storage(format!("cannot write {name}")))?;
    let mut out = Hashing::new(upload);
    out.write_all(&rewrapped.prefix)
        .map_err(storage(format!("cannot write {name}")))?;
    // The segments are copied as they are, streamed from the open old version.
    let mut segments = object
        .read(Some(rewrapped.segments_offset..size))
        .map_err(storage("cannot read the archive"))?;
    io::copy(&mut segments, &mut out).map_err(storage(format!("cannot write {name}")))?;
    let (mut upload, written_bytes, sha256) = out.finish();
    let written = upload
        .written()
        .map_err(storage(format!("cannot write {name}")))?;
    let ring = match target.key {
        Some(_) => target.ring(keys),
        None => KeyRing::default().with_data_key(rewrapped.data_key.clone()),
    };
    let (read_bytes, read_sha) = read_whole(&*written, &ring)?;
    if (read_bytes, &read_sha) != (written_bytes, &sha256) {
        return Err(RewrapError::ReadBack(format!(
            "{read_bytes} bytes read back, {written_bytes} written"
        )));
    }
    Ok(Replacement {
        upload,
        written,
        bytes: written_bytes,
        sha256,
    })
}

/// Rewraps an archive that has no manifest (a retention rule's export,
/// `<stamp>-NNNNNN.jsonl.dbk`) of `database` for `target`: replaced once it reads
/// back whole with the target's keys. Such an export is made for the target or not,
/// so there is nothing to repair. An archive of another database is refused.
pub fn rewrap_export(
    store: &dyn Storage,
    name: &str,
    database: &str,
    keys: &KeyRing,
    target: &Target<'_>,
    dry_run: bool,
) -> Result<Outcome, RewrapError> {
    if target.key.is_none() && target.recipients.is_empty() {
        return Err(RewrapError::NoTarget);
    }
    let object = store
        .open(name)
        .map_err(storage(format!("cannot open {name}")))?;
    let (header, _) = header_of(&*object)?;
    if header.database != database {
        return Err(RewrapError::Unrepairable(format!(
            "it belongs to database \"{}\", not \"{database}\"",
            header.database
        )));
    }
    if header.encryption.is_none() {
        return Ok(Outcome::NotEncrypted);
    }
    let made_for: BTreeSet<String> = header.made_for().into_iter().collect();
    if made_for == target.made_for() {
        return Ok(Outcome::AlreadyCurrent);
    }
    if dry_run {
        return would_rewrap(&*object, keys, target);
    }
    let upload = write_replacement(store, name, &*object, keys, target)?.upload;
    drop(
        upload
            .publish()
            .map_err(storage(format!("cannot replace {name}")))?,
    );
    Ok(Outcome::Rewrapped)
}

/// An archive already made for the target: current when its manifest agrees,
/// otherwise (a killed run) read whole with the target's keys and its manifest
/// rewritten.
#[allow(clippy::too_many_arguments)]
fn current_or_repair(
    store: &dyn Storage,
    manifest: &Manifest,
    object: &dyn Object,
    header: &Header,
    envelope: &[u8],
    keys: &KeyRing,
    target: &Target<'_>,
    policy: &TrustPolicy,
    dry_run: bool,
) -> Result<Outcome, RewrapError> {
    let key_id = header.encryption.as_ref().map(|e| e.key_id.clone());
    let writer_ok = match (target.key, target.writer, &manifest.writer) {
        (Some(_), _, _) => true,
        (None, Some(w), Some(tag)) => {
            tag.key_id == w.id()
                && crate::keys::writer_tag_matches(
                    w,
                    &manifest.database,
                    &manifest.id,
                    envelope,
                    &tag.tag,
                )
        }
        _ => false,
    };
    let agrees = manifest.key_id == key_id
        && manifest.stored_bytes == object.size()
        && writer_ok
        && archive::sha256_of(
            object
                .read(None)
                .map_err(storage("cannot read the archive"))?,
        )
        .map_err(storage("cannot read the archive"))?
        .0 == manifest.sha256;
    if agrees {
        return Ok(Outcome::AlreadyCurrent);
    }
    // The archive was replaced: only a key file proves that this host's rewrap
    // did it (a recipients-only one carries no tag of its new envelope yet).
    written_here(object, header, envelope, manifest, keys, policy)?;
    let ring = target.ring(keys);
    if !ring.may_open(&header.made_for()) {
        return Err(RewrapError::Unrepairable(
            "no key or identity of the new target is configured to read it whole".to_owned(),
        ));
    }
    let (size, sha256) = read_whole(object, &ring)?;
    let repaired = updated(manifest, header, envelope, size, sha256, target)?;
    // Everything but the fields a rewrap changes must still hold.
    let file = Manifest::manifest_name(&manifest.id);
    let opened = ArchiveReader::open(
        object
            .read(None)
            .map_err(storage("cannot read the archive"))?,
        &ring,
    )?;
    catalog::trust(&repaired, opened.header(), &file, policy)
        .map_err(|e| RewrapError::Unrepairable(e.to_string()))?;
    if dry_run {
        return Ok(Outcome::WouldRepair);
    }
    repaired.save(store).map_err(storage(format!(
        "cannot write the manifest of {}",
        manifest.id
    )))?;
    Ok(Outcome::Repaired)
}

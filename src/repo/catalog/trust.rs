//! Provenance: when a manifest and its archive may be believed.
//!
//! Anyone who can write to the destination can put files there, so a manifest is
//! only a claim. [`trust`] checks it against what an attacker cannot forge without
//! the key (the archive header, authenticated by every segment of an encrypted
//! archive, which a listing checks by opening its first segment) and against the
//! configuration. Every reader (listing, verify, restore,
//! decrypt, rotation, the daemon's catalog) goes through it, so an untrusted backup
//! is never restored, never counted as good and never used to delete anything.

use chrono::{DateTime, NaiveDateTime, Utc};

use super::{BackupKind, Manifest};
use crate::repo::archive::{Header, KeyRing};
use crate::repo::storage::MANIFEST_SUFFIX;

/// What the configuration says a genuine backup of one database looks like.
#[derive(Debug, Clone)]
pub struct TrustPolicy {
    /// The database name of the `[[database]]` entry (and of its folder).
    pub database: String,
    /// The backend a genuine backup has (`files`, `sqlite` or `postgres`): a database
    /// and a files set of one name sharing a destination never take each other's
    /// backups for their own. `None`: any (a reader that does not know it).
    pub backend: Option<String>,
    /// Every configured key (`encryption-key-file` and `decryption-key-files`): a
    /// listing authenticates each encrypted archive's header with them.
    pub keys: KeyRing,
    /// `encryption-key-file` is configured: backups are written encrypted.
    pub encrypting: bool,
    /// The id of `encryption-key-file`, the key new backups are made with. Keys in
    /// `decryption-key-files` only read backups made before the current key's first.
    pub current_key: Option<String>,
    /// `--allow-unencrypted`: the operator accepts plain archives for this read.
    pub allow_unencrypted: bool,
    /// The first trusted backup made with the current key in *any* destination of the
    /// database (time, id), when there are several: a retired key vouches for nothing
    /// newer anywhere, so an attacker who can write to one destination cannot bring a
    /// forgery back by deleting the current-key backups there only.
    pub current_key_since: Option<(chrono::DateTime<chrono::Utc>, String)>,
    /// `current_key_since` is what this host remembers of when the current key took
    /// over (`<state-dir>/key-boundaries.json`): it is then the boundary, and older
    /// backups under the current key in a destination (made before a switch back to
    /// a key used earlier) do not move it.
    pub boundary_remembered: bool,
    /// This host's writer key (`<state-dir>/writer.key`), if it has one: a backup
    /// made for recipients only, which no configured key or identity opens, is
    /// believed when its manifest carries this key's tag (see
    /// [`crate::keys::writer_tag`]).
    pub writer: Option<crate::keys::Key>,
}

impl TrustPolicy {
    /// The retired-key boundary: the remembered one, else the earlier of `here` (the
    /// first backup made with the current key that a listing found) and
    /// `current_key_since`.
    pub fn retired_boundary(
        &self,
        here: Option<(chrono::DateTime<chrono::Utc>, String)>,
    ) -> Option<(chrono::DateTime<chrono::Utc>, String)> {
        if self.boundary_remembered {
            return self.current_key_since.clone();
        }
        here.into_iter().chain(self.current_key_since.clone()).min()
    }

    /// A plain archive is believed only where the configuration writes plain ones,
    /// or the operator said so for this one command: anyone can forge one.
    pub fn accepts_plain(&self) -> bool {
        !self.encrypting || self.allow_unencrypted
    }
}

/// Why a backup is not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    #[error("the file name is not a backup id (<UTC yyyymmddThhmmssZ>-<kind>[.<n>])")]
    BadName,
    #[error("the manifest cannot be read ({0})")]
    Unreadable(String),
    #[error("the manifest says id \"{0}\", not the id of its file name")]
    IdMismatch(String),
    #[error("its archive is missing")]
    ArchiveMissing,
    #[error("the archive header cannot be read ({0})")]
    BadHeader(String),
    #[error("it belongs to database \"{found}\", not \"{expected}\" ({what})")]
    WrongDatabase {
        what: &'static str,
        found: String,
        expected: String,
    },
    #[error("it is a {found} backup, not a {expected} one (another database or files set of this name writes to this destination)")]
    WrongBackend { found: String, expected: String },
    #[error("the manifest and the archive header disagree on the {0}")]
    Disagree(&'static str),
    #[error("the archive is not encrypted but a key is configured; pass --allow-unencrypted if you made it on purpose")]
    Unencrypted,
    #[error("the archive was made with key {0}, which is not configured (encryption-key-file or decryption-key-files)")]
    UnknownKey(String),
    #[error("its {0} is not a regular file (a link, pipe or device planted in the folder)")]
    NotRegularFile(&'static str),
    #[error("the manifest is larger than {} bytes", super::MAX_MANIFEST_BYTES)]
    ManifestTooLarge,
    #[error(
        "the archive header does not authenticate with its key ({0}): it was altered or forged"
    )]
    NotAuthentic(String),
    #[error(
        "its archive is a copy of backup {0} (same authenticated header), which is the one counted"
    )]
    CopyOf(String),
    #[error(
        "it was made with key {key}, a retired key (decryption-key-files), after the current key \
         took over ({first}): retired keys only read older backups"
    )]
    RetiredKey { key: String, first: String },
    #[error("its archive authenticates whole, but the manifest's {0} does not match it: the manifest was edited")]
    ManifestMismatch(String),
    #[error("its archive is {found} bytes, not the {claimed} it was written with: cut short or replaced")]
    SizeMismatch { found: u64, claimed: u64 },
    #[error("it was made for recipients only ({0}), and nothing here proves who wrote it: no identity for those recipients is configured (identity-files, --identity), and its manifest carries no tag of this host's writer key (<state-dir>/writer.key){1}")]
    NoWriterProof(String, String),
    #[error("it was made for recipients only ({0}) and an identity here opens it, but its manifest carries no valid tag of this host's writer key (<state-dir>/writer.key): this host did not write it, and anyone who knows the public recipient could have; if you trust it, read it with `dbkeeper decrypt FILE --identity ID`, or restore on a host without a writer key (or with the writer.key of the host that wrote it)")]
    NotWrittenHere(String),
}

/// Rejects a backup whose manifest, header (`header`), file name (`file_name`, the
/// manifest's) and configuration (`policy`) do not all agree.
pub fn trust(
    manifest: &Manifest,
    header: &Header,
    file_name: &str,
    policy: &TrustPolicy,
) -> Result<(), Untrusted> {
    let id = id_of_manifest_file(file_name).ok_or(Untrusted::BadName)?;
    let (at, kind) = parse_id(id).ok_or(Untrusted::BadName)?;
    if manifest.id != id {
        return Err(Untrusted::IdMismatch(manifest.id.clone()));
    }
    for (what, found) in [
        ("manifest", &manifest.database),
        ("header", &header.database),
    ] {
        if *found != policy.database {
            return Err(Untrusted::WrongDatabase {
                what,
                found: found.clone(),
                expected: policy.database.clone(),
            });
        }
    }
    if header.backend != manifest.backend {
        return Err(Untrusted::Disagree("backend"));
    }
    if let Some(expected) = policy.backend.as_ref().filter(|b| **b != header.backend) {
        return Err(Untrusted::WrongBackend {
            found: header.backend.clone(),
            expected: expected.clone(),
        });
    }
    // The time decides rotation and `latest`: the manifest may not move it.
    if header.created != manifest.started_at || at != seconds(manifest.started_at) {
        return Err(Untrusted::Disagree("time"));
    }
    if kind != manifest.kind.as_str() {
        return Err(Untrusted::Disagree("kind"));
    }
    if header.compression != manifest.compression {
        return Err(Untrusted::Disagree("compression"));
    }
    match &header.encryption {
        None if !policy.accepts_plain() => Err(Untrusted::Unencrypted),
        None if manifest.key_id.is_some() => Err(Untrusted::Disagree("key id")),
        None => Ok(()),
        // Made for recipients only: the manifest's key id is the recipient set's, and
        // who wrote it is checked where the archive is read (an identity opens it, or
        // the writer tag matches).
        Some(enc) if recipients_only(header) => {
            if manifest.key_id.as_deref() != Some(enc.key_id.as_str()) {
                return Err(Untrusted::Disagree("key id"));
            }
            Ok(())
        }
        Some(enc) if policy.keys.find(&enc.key_id).is_none() => {
            Err(Untrusted::UnknownKey(enc.key_id.clone()))
        }
        Some(enc) if manifest.key_id.as_deref() != Some(enc.key_id.as_str()) => {
            Err(Untrusted::Disagree("key id"))
        }
        Some(_) => Ok(()),
    }
}

/// A version 3 archive whose data key is wrapped for age recipients only (no key
/// file): anyone who knows the recipients could have made it.
pub fn recipients_only(header: &Header) -> bool {
    header.sealed.as_ref().is_some_and(|e| e.keys.is_empty())
}

/// The writer proof of a recipients-only backup: the manifest's tag, made with this
/// host's writer key over the database, the id and the archive's envelope bytes.
pub fn check_writer(
    manifest: &Manifest,
    header: &Header,
    envelope: &[u8],
    policy: &TrustPolicy,
) -> Result<(), Untrusted> {
    let made_for = header.made_for().join(", ");
    let Some(key) = &policy.writer else {
        return Err(Untrusted::NoWriterProof(
            made_for,
            " (this host has no writer key)".to_owned(),
        ));
    };
    match &manifest.writer {
        Some(w) if w.key_id == key.id() => {
            if crate::keys::writer_tag_matches(key, &manifest.database, &manifest.id, envelope, &w.tag) {
                Ok(())
            } else {
                Err(Untrusted::NoWriterProof(
                    made_for,
                    ": the tag does not match (forged, or the manifest or archive was edited)"
                        .to_owned(),
                ))
            }
        }
        Some(w) => Err(Untrusted::NoWriterProof(
            made_for,
            format!(
                ": it names writer key {}, this host's is {} (another host wrote it; read it where an identity is configured)",
                w.key_id,
                key.id()
            ),
        )),
        None => Err(Untrusted::NoWriterProof(made_for, String::new())),
    }
}

/// The provenance of a recipients-only backup an identity here opened: on a host
/// with a writer key (one that writes such backups) it must carry that key's tag,
/// since an identity proves only that a backup was made *for* its recipient, not by
/// whom (adversary rounds 2 and 3 of issue 16: an exception for backups older than
/// the writer key let anyone who knows the public recipient plant backdated ones). A
/// host without a writer key (a restore host) goes by the identity alone.
pub fn check_opened_writer(
    manifest: &Manifest,
    header: &Header,
    envelope: &[u8],
    policy: &TrustPolicy,
) -> Result<(), Untrusted> {
    if policy.writer.is_none() {
        return Ok(());
    }
    check_writer(manifest, header, envelope, policy)
        .map_err(|_| Untrusted::NotWrittenHere(header.made_for().join(", ")))
}

/// The backup id of a manifest file name, if it has the manifest suffix and the id
/// is well formed. Ids come only from file names, never from the manifest's JSON.
pub fn id_of_manifest_file(file_name: &str) -> Option<&str> {
    file_name
        .strip_suffix(MANIFEST_SUFFIX)
        .filter(|id| parse_id(id).is_some())
}

/// True for `<UTC yyyymmddThhmmssZ>-<kind>[.<n>]`; such an id is a plain file name
/// (no separator, no dot prefix), so joining it to a folder stays in that folder.
pub fn is_valid_id(id: &str) -> bool {
    parse_id(id).is_some()
}

/// The time (to the second) and kind of a well-formed id.
fn parse_id(id: &str) -> Option<(DateTime<Utc>, &str)> {
    let (stamp, rest) = id.split_at_checked(16)?;
    let at = NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ")
        .ok()?
        .and_utc();
    let rest = rest.strip_prefix('-')?;
    let (kind, n) = match rest.split_once('.') {
        Some((kind, n)) => (kind, Some(n)),
        None => (rest, None),
    };
    let known = [
        BackupKind::Scheduled,
        BackupKind::Manual,
        BackupKind::PreMigration,
    ];
    if !known.iter().any(|k| k.as_str() == kind) {
        return None;
    }
    // `reserve_id` numbers from 2; no leading zeros, so one id has one spelling.
    if let Some(n) = n {
        let ok = n.len() <= 9
            && !n.starts_with('0')
            && n.bytes().all(|b| b.is_ascii_digit())
            && n.parse::<u32>().is_ok_and(|n| n >= 2);
        if !ok {
            return None;
        }
    }
    Some((at, kind))
}

fn seconds(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

/// Where the retired-key boundaries are remembered: `<state-dir>/key-boundaries.json`,
/// `{ "<database>": { "<current key id>": ["<time>", "<backup id>"] } }`.
const BOUNDARIES: &str = "key-boundaries.json";

type Boundaries = std::collections::BTreeMap<
    String,
    std::collections::BTreeMap<String, (chrono::DateTime<chrono::Utc>, String)>,
>;

fn read_boundaries(state_dir: &std::path::Path) -> Boundaries {
    super::pins::read_record(state_dir, BOUNDARIES)
}

/// The first backup made with `key` that this host has seen for `database`, as
/// remembered in the state directory: the retired-key boundary survives the loss,
/// damage or rotation of that backup (adversary round 7, cases 21 and 27).
pub fn remembered_boundary(
    state_dir: &std::path::Path,
    database: &str,
    key: &str,
) -> Option<(chrono::DateTime<chrono::Utc>, String)> {
    read_boundaries(state_dir).get(database)?.get(key).cloned()
}

/// Remembers `at`/`id` as the first backup with `key` of `database` unless an
/// earlier one is remembered. Written atomically (temporary file, rename).
pub fn remember_boundary(
    state_dir: &std::path::Path,
    database: &str,
    key: &str,
    at: chrono::DateTime<chrono::Utc>,
    id: &str,
) -> std::io::Result<()> {
    let mut all = read_boundaries(state_dir);
    let entry = all.entry(database.to_owned()).or_default();
    if entry.get(key).is_some_and(|(first, _)| *first <= at) {
        return Ok(());
    }
    entry.insert(key.to_owned(), (at, id.to_owned()));
    super::pins::write_record(state_dir, BOUNDARIES, &all)
}

/// The entry of a database in `key-boundaries.json` that holds the current key id
/// (with when it became current), not a key's boundary.
const CURRENT: &str = "@current";

/// Notes that `key` (a key id, or a recipient set's id) is the current key of
/// `database` at `now`. When the remembered current key was another one, the key was
/// changed: `now` becomes `key`'s boundary, so that from the moment a rotation is
/// configured nothing newer made with the old key is believed, even before a backup
/// under the new one exists (adversary round 2 of issue 16, case 01), and a key
/// made current again starts afresh (case 05). With no current key remembered (a
/// state directory from before this record), the earlier of a remembered first
/// backup and `now` stays.
pub fn note_current_key(
    state_dir: &std::path::Path,
    database: &str,
    key: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> std::io::Result<()> {
    let mut all = read_boundaries(state_dir);
    let entry = all.entry(database.to_owned()).or_default();
    // From the next whole second: ids and the rule are to the second, and a backup
    // started in the second of the switch was started before it.
    let now = DateTime::from_timestamp(now.timestamp() + 1, 0).unwrap_or(now);
    let switched_at = (
        now,
        format!(
            "the switch to key {key} at {}",
            now.format("%Y-%m-%d %H:%M:%S UTC")
        ),
    );
    match entry.get(CURRENT) {
        Some((_, current)) if current == key => return Ok(()),
        Some(_) => {
            entry.insert(key.to_owned(), switched_at);
        }
        // No record of the current key (a state directory from before it, or only
        // backup runs so far): the key whose first backup is the latest was current
        // last; any other is being switched to.
        None => {
            let last = entry
                .iter()
                .filter(|(k, _)| k.as_str() != CURRENT)
                .max_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone());
            if last.as_ref().is_some_and(|last| last != key) {
                entry.insert(key.to_owned(), switched_at);
            } else {
                entry.entry(key.to_owned()).or_insert(switched_at);
            }
        }
    }
    entry.insert(CURRENT.to_owned(), (now, key.to_owned()));
    super::pins::write_record(state_dir, BOUNDARIES, &all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_names_in_one_spelling() {
        for ok in [
            "20261121T020000Z-scheduled",
            "20261121T020000Z-manual.2",
            "20261121T020000Z-pre-migration.13",
        ] {
            assert!(is_valid_id(ok), "{ok}");
        }
        for bad in [
            "../b/20261121T020000Z-scheduled",
            "20261121T020000Z-scheduled/../../x",
            "20261121T020000Z-other",
            "20261121T020000Z-manual.02",
            "20261121T020000Z-manual.1",
            "20261121T020000Z-manual.",
            "20261321T020000Z-manual",
            "x0261121T020000Z-manual",
            "",
            "20261121T020000Z",
        ] {
            assert!(!is_valid_id(bad), "{bad}");
        }
        assert_eq!(
            id_of_manifest_file("20261121T020000Z-manual.manifest.json"),
            Some("20261121T020000Z-manual")
        );
        assert_eq!(id_of_manifest_file("x.manifest.json"), None);
    }

    #[test]
    fn a_key_change_is_remembered_from_the_moment_it_is_first_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).expect("time");
        // Backup runs only, K2 last: taking up K1 again is a switch.
        let runs = tempfile::tempdir().expect("tempdir");
        remember_boundary(runs.path(), "app", "k1", t(0), "first-k1").expect("remember");
        remember_boundary(runs.path(), "app", "k2", t(50), "first-k2").expect("remember");
        note_current_key(runs.path(), "app", "k1", t(100)).expect("note");
        assert_eq!(
            remembered_boundary(runs.path(), "app", "k1").map(|b| b.0),
            Some(t(101))
        );
        // A state directory from before the record: an earlier first backup stays.
        remember_boundary(dir.path(), "app", "k1", t(0), "first-k1").expect("remember");
        note_current_key(dir.path(), "app", "k1", t(100)).expect("note");
        assert_eq!(
            remembered_boundary(dir.path(), "app", "k1").map(|b| b.0),
            Some(t(0))
        );
        // Seen again: nothing moves.
        note_current_key(dir.path(), "app", "k1", t(200)).expect("note");
        assert_eq!(
            remembered_boundary(dir.path(), "app", "k1").map(|b| b.0),
            Some(t(0))
        );
        // A switch counts from the next whole second after it was first seen.
        note_current_key(dir.path(), "app", "k2", t(300)).expect("note");
        assert_eq!(
            remembered_boundary(dir.path(), "app", "k2").map(|b| b.0),
            Some(t(301))
        );
        note_current_key(dir.path(), "app", "k2", t(400)).expect("note");
        assert_eq!(
            remembered_boundary(dir.path(), "app", "k2").map(|b| b.0),
            Some(t(301))
        );
        // Back to k1: it starts afresh, and its old boundary no longer retires k2.
        note_current_key(dir.path(), "app", "k1", t(500)).expect("note");
        assert_eq!(
            remembered_boundary(dir.path(), "app", "k1").map(|b| b.0),
            Some(t(501))
        );
        // Other databases are their own.
        assert_eq!(remembered_boundary(dir.path(), "other", "k1"), None);
    }
}

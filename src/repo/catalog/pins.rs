//! Backups a failed migration named: pinned by a marker object beside them in each
//! destination (`<id>.pin.<database>`), so that no rotation deletes them until a
//! migration of that database has run successfully — not this configuration's, nor
//! that of another configuration, host or state directory sharing the destination.
//!
//! A migration that fails part-way tells the operator to restore its pre-migration
//! backup. A second attempt takes a new one — of the half-migrated database — which is
//! then the newest; without a pin, `keep = { last = 1 }` would delete the first, the
//! only copy from before the failure (adversary round 2 on issue 15, cases 04 and 05).
//! The pin is taken as soon as the pre-migration backup exists (for the database and
//! each files set taken with it), and the migration does not run unless every pin was
//! written. Pins in the state directory (`pinned-backups.json`, where the first
//! version kept them; round 3, cases 02 and 03) are still honoured and released.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;

use crate::repo::storage::Storage;

/// Between a backup id and the database whose migration pinned it, in a marker's name.
pub const PIN_MARK: &str = ".pin.";

/// The marker that pins backup `id` for `owner`'s migration.
pub fn marker_name(id: &str, owner: &str) -> String {
    format!("{id}{PIN_MARK}{owner}")
}

/// The backup ids pinned in a destination folder, by any database. An error when the
/// folder cannot be listed: rotation then deletes nothing.
pub fn pinned_in(store: &dyn Storage) -> io::Result<BTreeSet<String>> {
    Ok(store
        .list("")?
        .iter()
        .filter_map(|name| name.split_once(PIN_MARK).map(|(id, _)| id.to_owned()))
        .collect())
}

/// Pins backup `id` in `store` for `owner`'s migration. Whatever the marker holds,
/// its presence is the pin (a damaged one still pins).
pub fn pin(store: &dyn Storage, owner: &str, id: &str) -> io::Result<()> {
    let note = serde_json::json!({
        "pinned_by": owner,
        "pinned_at": chrono::Utc::now(),
        "why": "pre-migration backup of a migration that has not succeeded yet",
    });
    store.replace(&marker_name(id, owner), note.to_string().as_bytes())
}

/// Releases every pin `owner`'s migrations put in `store` (one of them succeeded);
/// another database's pins stay. Returns how many were removed.
pub fn unpin_all(store: &dyn Storage, owner: &str) -> io::Result<usize> {
    let suffix = format!("{PIN_MARK}{owner}");
    let mut removed = 0;
    for name in store.list("")? {
        if name.ends_with(&suffix) {
            store.delete(&name)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// `<state-dir>/pinned-backups.json`, the pins of the first version: database or
/// files set → pinned backup id → the database whose migration pinned it.
const PINS: &str = "pinned-backups.json";

type Pins = BTreeMap<String, BTreeMap<String, String>>;

/// A small JSON record of the state directory, or its default when there is none
/// (or it cannot be read: a damaged record protects nothing, it never deletes).
pub(super) fn read_record<T: serde::de::DeserializeOwned + Default>(
    state_dir: &Path,
    name: &str,
) -> T {
    let path = state_dir.join(name);
    let Ok(f) = crate::repo::storage::open_regular(&path) else {
        return T::default();
    };
    use std::io::Read;
    let mut text = String::new();
    let read = f
        .take(1 << 20)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_str(&text).map_err(|e| e.to_string()));
    read.unwrap_or_else(|e| {
        // What it remembered is lost (a crash, a full disk): said, not hidden
        // (adversary round 4 of issue 16, case 06).
        tracing::warn!(file = %path.display(), "cannot read {name}, taking it as empty: {e}");
        T::default()
    })
}

/// Writes a record of the state directory atomically (temporary file, rename).
pub(super) fn write_record<T: serde::Serialize>(
    state_dir: &Path,
    name: &str,
    value: &T,
) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let tmp = state_dir.join(format!(".{name}.{:016x}", rand::random::<u64>()));
    {
        use std::io::Write;
        // Durable before it replaces the old record: a crash leaves one or the other.
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, state_dir.join(name)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The backup ids pinned for `name` (a database or files set) in the state
/// directory's record of the first version. A record that exists but cannot be read
/// is an error: rotation then deletes nothing.
pub fn legacy_pinned(state_dir: &Path, name: &str) -> io::Result<BTreeSet<String>> {
    let path = state_dir.join(PINS);
    if std::fs::symlink_metadata(&path).is_err() {
        return Ok(BTreeSet::new());
    }
    let all: Pins = serde_json::from_slice(&std::fs::read(&path)?).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is damaged ({e}): fix or remove it", path.display()),
        )
    })?;
    Ok(all
        .get(name)
        .map(|ids| ids.keys().cloned().collect())
        .unwrap_or_default())
}

/// Releases the pins `database`'s migrations put on `names` in the state
/// directory's record of the first version; another database's pins stay.
pub fn legacy_unpin_all(state_dir: &Path, database: &str, names: &[&str]) -> io::Result<()> {
    if std::fs::symlink_metadata(state_dir.join(PINS)).is_err() {
        return Ok(());
    }
    let mut all: Pins = read_record(state_dir, PINS);
    for name in names {
        if let Some(ids) = all.get_mut(*name) {
            ids.retain(|_, owner| owner != database);
        }
    }
    all.retain(|_, ids| !ids.is_empty());
    if all.is_empty() {
        return std::fs::remove_file(state_dir.join(PINS));
    }
    write_record(state_dir, PINS, &all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::storage::local::in_temp_dir;

    #[test]
    fn pins_last_until_released_and_are_per_owner() {
        let (_dir, dest) = in_temp_dir();
        assert!(pinned_in(&dest).unwrap().is_empty());
        let a = "20261206T090000Z-pre-migration";
        let a2 = "20261206T091000Z-pre-migration.2";
        let b = "20261206T092000Z-pre-migration";
        pin(&dest, "app", a).unwrap();
        pin(&dest, "app", a2).unwrap();
        pin(&dest, "other", b).unwrap();
        assert_eq!(pinned_in(&dest).unwrap().len(), 3);
        // The other database's success releases its own pins only (round 2, case 05).
        assert_eq!(unpin_all(&dest, "other").unwrap(), 1);
        let left: Vec<String> = pinned_in(&dest).unwrap().into_iter().collect();
        assert_eq!(left, [a, a2]);
        // A marker that was damaged still pins (round 3, case 03).
        dest.replace(&marker_name(b, "x"), b"{\"pinned").unwrap();
        assert!(pinned_in(&dest).unwrap().contains(b));
        assert_eq!(unpin_all(&dest, "app").unwrap(), 2);
        assert_eq!(pinned_in(&dest).unwrap().len(), 1);
    }

    #[test]
    fn a_damaged_legacy_record_stops_rotation_and_releases_work() {
        let dir = tempfile::tempdir().unwrap();
        assert!(legacy_pinned(dir.path(), "app").unwrap().is_empty());
        let mut all = Pins::new();
        all.entry("app".into())
            .or_default()
            .insert("20261206T090000Z-pre-migration".into(), "app".into());
        all.entry("storage".into())
            .or_default()
            .insert("20261206T090000Z-pre-migration".into(), "b".into());
        write_record(dir.path(), PINS, &all).unwrap();
        assert_eq!(legacy_pinned(dir.path(), "app").unwrap().len(), 1);
        legacy_unpin_all(dir.path(), "app", &["app", "storage"]).unwrap();
        assert!(legacy_pinned(dir.path(), "app").unwrap().is_empty());
        assert_eq!(legacy_pinned(dir.path(), "storage").unwrap().len(), 1);
        std::fs::write(dir.path().join(PINS), "{\"app\": {\"2026").unwrap();
        assert!(legacy_pinned(dir.path(), "app").is_err());
    }
}

//! Backups a failed migration named: pinned in the state directory so that no
//! rotation deletes them until a migration of that database succeeds.
//!
//! A migration that fails part-way tells the operator to restore its pre-migration
//! backup. A second attempt takes a new one — of the half-migrated database — which is
//! then the newest; without a pin, `keep = { last = 1 }` would delete the first, the
//! only copy from before the failure (adversary round 2 on issue 15, cases 04 and 05).
//! The pin is taken as soon as the pre-migration backup exists (for the database and
//! each files set taken with it) and cleared when a migration run succeeds.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;

/// `<state-dir>/pinned-backups.json`: database or files set → pinned backup id → the
/// database whose migration pinned it (a files set taken with two databases keeps
/// each one's pins apart).
const PINS: &str = "pinned-backups.json";

type Pins = BTreeMap<String, BTreeMap<String, String>>;

/// A small JSON record of the state directory, or its default when there is none
/// (or it cannot be read: a damaged record protects nothing, it never deletes).
pub(super) fn read_record<T: serde::de::DeserializeOwned + Default>(
    state_dir: &Path,
    name: &str,
) -> T {
    crate::repo::storage::open_regular(&state_dir.join(name))
        .ok()
        .and_then(|f| {
            use std::io::Read;
            let mut text = String::new();
            f.take(1 << 20).read_to_string(&mut text).ok()?;
            serde_json::from_str(&text).ok()
        })
        .unwrap_or_default()
}

/// Writes a record of the state directory atomically (temporary file, rename).
pub(super) fn write_record<T: serde::Serialize>(
    state_dir: &Path,
    name: &str,
    value: &T,
) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let tmp = state_dir.join(format!(".{name}.{:016x}", rand::random::<u64>()));
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, state_dir.join(name)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The backup ids pinned for `name` (a database or files set).
pub fn pinned(state_dir: &Path, name: &str) -> BTreeSet<String> {
    read_record::<Pins>(state_dir, PINS)
        .remove(name)
        .map(|ids| ids.into_keys().collect())
        .unwrap_or_default()
}

/// Pins backup `id` of each of `names` for `database`'s migration, until
/// [`unpin_all`] for that database.
pub fn pin(state_dir: &Path, database: &str, names: &[&str], id: &str) -> io::Result<()> {
    let mut all: Pins = read_record(state_dir, PINS);
    for name in names {
        all.entry((*name).to_owned())
            .or_default()
            .insert(id.to_owned(), database.to_owned());
    }
    write_record(state_dir, PINS, &all)
}

/// Releases the pins `database`'s migrations put on `names` (one of them succeeded);
/// another database's pins on a shared files set stay.
pub fn unpin_all(state_dir: &Path, database: &str, names: &[&str]) -> io::Result<()> {
    let mut all: Pins = read_record(state_dir, PINS);
    let mut changed = false;
    for name in names {
        if let Some(ids) = all.get_mut(*name) {
            let before = ids.len();
            ids.retain(|_, owner| owner != database);
            changed |= ids.len() != before;
        }
    }
    all.retain(|_, ids| !ids.is_empty());
    if changed {
        write_record(state_dir, PINS, &all)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_last_until_released_and_are_per_name() {
        let dir = tempfile::tempdir().unwrap();
        assert!(pinned(dir.path(), "app").is_empty());
        let a = "20261206T090000Z-pre-migration";
        pin(dir.path(), "app", &["app", "storage"], a).unwrap();
        pin(
            dir.path(),
            "app",
            &["app"],
            "20261206T091000Z-pre-migration",
        )
        .unwrap();
        let b = "20261206T092000Z-pre-migration";
        pin(dir.path(), "other", &["other", "storage"], b).unwrap();
        assert_eq!(pinned(dir.path(), "app").len(), 2);
        assert_eq!(pinned(dir.path(), "storage").len(), 2);
        // The other database's success releases its own pins only (round 2, case 05).
        unpin_all(dir.path(), "other", &["other", "storage"]).unwrap();
        let left: Vec<String> = pinned(dir.path(), "storage").into_iter().collect();
        assert_eq!(left, [a]);
        unpin_all(dir.path(), "app", &["app", "storage"]).unwrap();
        assert!(pinned(dir.path(), "app").is_empty());
        assert!(pinned(dir.path(), "storage").is_empty());
    }
}

//! Backup ids held by the runs that use them: `<id>.reserved`.
//!
//! An id is free when no store a run writes to holds its archive or manifest, but
//! two runs starting in the same second (a files set's own schedule and a database
//! taking it `with-files`, two `run-job`s, two `migrate apply`) would both see the
//! same id free, and the loser's clean-up could then take the winner's backup for
//! its own. So a run first reserves its id in every store it will write to: a small
//! marker published with the storage's create-if-absent put (never replaces, in any
//! process, on any backend). The first run to publish the marker has the id; the
//! other gets `AlreadyExists` and tries the next `.n`. Only once the marker is its
//! own does a run look again whether the id's backup exists (a run that ended
//! between the listing and the reservation published it before dropping its
//! marker).
//!
//! The marker's writer holds it like an archive whose manifest is being written
//! ([`Storage::in_use`]: a lock locally, a lease in an object store), so
//! [`super::clean`] removes only the markers of runs that died; a run removes its
//! own when it ends, whatever the outcome.

use std::io::{self, Write};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{id_candidates, BackupKind};
use crate::repo::storage::{Publishing, Storage, ARCHIVE_SUFFIX, MANIFEST_SUFFIX};

/// The marker of a reserved id.
pub const RESERVED_SUFFIX: &str = ".reserved";

/// How many ids of one second are tried before giving up on reserving.
const MAX_CANDIDATES: usize = 1_000;

/// The marker's name for `id`.
pub fn reserved_name(id: &str) -> String {
    format!("{id}{RESERVED_SUFFIX}")
}

/// An id this run holds in its stores until dropped.
pub struct Reservation {
    id: String,
    held: Vec<(Arc<dyn Storage>, Publishing)>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("id", &self.id)
            .field("stores", &self.held.len())
            .finish()
    }
}

impl Reservation {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Drops the markers (the run is over).
    fn release(&mut self) {
        let name = reserved_name(&self.id);
        for (store, guard) in self.held.drain(..) {
            // Removed while still held, so that no clean-up races the owner.
            if let Err(e) = store.delete(&name) {
                tracing::warn!(
                    destination = %store.location().display(),
                    "cannot remove the id reservation {name} (the next backup there removes it): {e}"
                );
            }
            drop(guard);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

/// Reserves a new backup id for `at` in every one of `stores` (the same id
/// everywhere: every copy of a backup has it). A store that cannot take the marker
/// for another reason than the id being taken (down, not writable) is left out: the
/// backup's own write there fails next, with the reason.
pub fn reserve_id(stores: &[Arc<dyn Storage>], at: DateTime<Utc>, kind: BackupKind) -> Reservation {
    let mut unique: Vec<Arc<dyn Storage>> = Vec::new();
    for store in stores {
        if !unique.iter().any(|s| s.location() == store.location()) {
            unique.push(store.clone());
        }
    }
    let listed = taken_names(&unique, &super::id_base(at, kind));
    let mut candidates = id_candidates(at, kind).take(MAX_CANDIDATES);
    for id in candidates.by_ref() {
        if is_taken(&listed, &id) {
            continue;
        }
        let Some(held) = try_reserve(&unique, &id) else {
            continue;
        };
        let reservation = Reservation { id, held };
        // Ours now: a backup published under it before our marker was is not.
        if has_backup(&taken_names(&unique, &reservation.id), &reservation.id) {
            continue;
        }
        return reservation;
    }
    // A thousand backups of one kind in one second: write under the plain id and
    // let the storage refuse it.
    Reservation {
        id: super::id_base(at, kind),
        held: Vec::new(),
    }
}

/// Publishes the marker of `id` in each store; `None` (and nothing left behind)
/// when one of them has it already.
fn try_reserve(
    stores: &[Arc<dyn Storage>],
    id: &str,
) -> Option<Vec<(Arc<dyn Storage>, Publishing)>> {
    let name = reserved_name(id);
    let mut held = Vec::new();
    for store in stores {
        match publish_marker(&**store, &name) {
            Ok(guard) => held.push((store.clone(), guard)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Not ours: the markers published so far are removed again.
                drop(Reservation {
                    id: id.to_owned(),
                    held,
                });
                return None;
            }
            Err(e) => tracing::debug!(
                destination = %store.location().display(),
                "cannot reserve backup id {id} there: {e}"
            ),
        }
    }
    Some(held)
}

fn publish_marker(store: &dyn Storage, name: &str) -> io::Result<Publishing> {
    let mut up = store.put(name)?;
    writeln!(up, "reserved by dbkeeper process {}", std::process::id())?;
    up.publish()
}

/// The names under `prefix` in `stores`; a store that cannot be listed has none
/// (writing there fails next, with the reason).
fn taken_names(stores: &[Arc<dyn Storage>], prefix: &str) -> Vec<String> {
    stores
        .iter()
        .flat_map(|store| store.list(prefix).unwrap_or_default())
        .collect()
}

/// Whether `names` hold a backup of `id`, or its reservation.
fn is_taken(names: &[String], id: &str) -> bool {
    has_backup(names, id) || names.contains(&reserved_name(id))
}

/// Whether `names` hold a backup of `id` (its archive or manifest).
fn has_backup(names: &[String], id: &str) -> bool {
    [ARCHIVE_SUFFIX, MANIFEST_SUFFIX]
        .iter()
        .any(|suffix| names.contains(&format!("{id}{suffix}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::storage::local::in_temp_dir;

    #[test]
    fn a_held_id_is_taken_until_released_and_a_stored_one_for_good() {
        let (_root, dest) = in_temp_dir();
        dest.prepare().unwrap();
        let store: Arc<dyn Storage> = Arc::new(dest.clone());
        let at = Utc::now();
        let first = reserve_id(std::slice::from_ref(&store), at, BackupKind::Manual);
        let second = reserve_id(&[store.clone(), store.clone()], at, BackupKind::Manual);
        assert_eq!(second.id(), format!("{}.2", first.id()));
        // A clean-up leaves live reservations alone.
        assert!(super::super::clean(&*store).unwrap().is_empty());
        let plain = first.id().to_owned();
        drop(first);
        assert!(!dest.path(&reserved_name(&plain)).exists());
        let again = reserve_id(std::slice::from_ref(&store), at, BackupKind::Manual);
        assert_eq!(again.id(), plain);
        drop(again);
        std::fs::write(dest.path(&format!("{plain}{ARCHIVE_SUFFIX}")), b"x").unwrap();
        let after = reserve_id(std::slice::from_ref(&store), at, BackupKind::Manual);
        assert_eq!(after.id(), format!("{plain}.3"));
    }
}

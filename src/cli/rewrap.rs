//! `dbkeeper key rewrap`: every backup of the named databases and files sets (all
//! by default), in every destination (or `--from DEST`), rewrapped for the
//! config's current `encryption-key-file` and `recipients` (see
//! [`crate::repo::rewrap`]). One line per archive, then a summary.

use std::collections::BTreeSet;

use anyhow::{bail, Context};

use super::backup::{places_from, trust_policy_of};
use super::Exit;
use crate::config::Config;
use crate::keys::Key;
use crate::repo::catalog::{self, Untrusted};
use crate::repo::rewrap::{rewrap_backup, rewrap_export, Outcome, Target};
use crate::repo::storage;

/// Whether an untrusted manifest may be one a killed rewrap left behind: its
/// archive was replaced (another size, key id, digest or writer) before it was.
fn maybe_interrupted(reason: &Untrusted) -> bool {
    matches!(
        reason,
        Untrusted::SizeMismatch { .. }
            | Untrusted::Disagree("key id")
            | Untrusted::ManifestMismatch(_)
            | Untrusted::NoWriterProof(..)
    )
}

#[derive(Default)]
struct Tally {
    rewrapped: usize,
    current: usize,
    repaired: usize,
    skipped: usize,
    problems: usize,
}

/// Prints one archive's line and counts it.
fn report(tally: &mut Tally, what: &str, result: Result<Outcome, impl std::fmt::Display>) {
    match result {
        Ok(outcome) => {
            println!("{what}: {}", outcome.describe());
            match outcome {
                Outcome::Rewrapped | Outcome::WouldRewrap => tally.rewrapped += 1,
                Outcome::AlreadyCurrent => tally.current += 1,
                Outcome::Repaired | Outcome::WouldRepair => tally.repaired += 1,
                Outcome::NotEncrypted => tally.skipped += 1,
            }
        }
        Err(e) => {
            println!("{what}: skipped: {e}");
            tally.skipped += 1;
            tally.problems += 1;
        }
    }
}

/// The backups (id, raw size) that the destinations other than `here` hold trusted
/// and made for `target`: their copies here under a retired key are the same backups,
/// not yet rewrapped.
fn current_twins(
    places: &[storage::Place],
    here: &storage::Place,
    policy: &catalog::TrustPolicy,
    target: &Target,
) -> std::collections::HashMap<String, u64> {
    let wanted = target.made_for();
    places
        .iter()
        .filter(|p| p.label() != here.label())
        .filter_map(|p| catalog::list(&*p.store, policy).ok())
        .flat_map(|listing| {
            let current: Vec<(String, u64)> = listing
                .backups
                .iter()
                .filter(|m| {
                    listing
                        .made_for(&m.id)
                        .iter()
                        .cloned()
                        .collect::<BTreeSet<_>>()
                        == wanted
                })
                .map(|m| (m.id.clone(), m.raw_bytes))
                .collect();
            current
        })
        .collect()
}

/// Archives without a manifest (a pinned pre-migration archive whose manifest went
/// missing, a backup cut short): nothing vouches for them, so they are not
/// rewrapped, but they still need the old key, and saying "done" would let the
/// operator destroy it (adversary round 3 of issue 16, case 05).
fn orphans(store: &dyn storage::Storage, tally: &mut Tally, what: &str) {
    let Ok(names) = store.list("") else {
        return;
    };
    let manifests: BTreeSet<&str> = names
        .iter()
        .filter_map(|n| n.strip_suffix(storage::MANIFEST_SUFFIX))
        .collect();
    for archive in &names {
        let Some(id) = archive.strip_suffix(storage::ARCHIVE_SUFFIX) else {
            continue;
        };
        if catalog::is_valid_id(id) && !manifests.contains(id) {
            println!(
                "{what} {id}: skipped: an archive without a manifest (a pinned pre-migration archive, or a backup cut short): not rewrapped, so it still needs the old key; read it with `dbkeeper decrypt {archive}` and keep what you need, or delete it"
            );
            tally.skipped += 1;
            tally.problems += 1;
        }
    }
}

/// The configured folder of a local destination, when it does not exist.
fn missing_folder(place: &storage::Place) -> Option<std::path::PathBuf> {
    match &place.config.location {
        crate::config::Location::Local(dir) if !dir.exists() => Some(dir.clone()),
        _ => None,
    }
}

/// Backups that appeared in `store` while it was being rewrapped (not in `seen`) and
/// are not made for the target: a daemon or another host still writing with the old
/// key, which the operator is about to destroy. Such a backup is listed as trusted,
/// or (newer than the first backup under the current key) as made with a retired
/// key; each is reported and makes the run fail, so "done" is never said while a
/// backup needs the old key.
fn late_arrivals(
    store: &dyn storage::Storage,
    policy: &catalog::TrustPolicy,
    seen: &BTreeSet<String>,
    target: &Target,
    tally: &mut Tally,
    what: &str,
) {
    let Ok(after) = catalog::list(store, policy) else {
        return;
    };
    let wanted = target.made_for();
    let trusted = after.backups.iter().filter_map(|m| {
        let made_for: BTreeSet<String> = after.made_for(&m.id).iter().cloned().collect();
        (!made_for.is_empty() && made_for != wanted).then(|| {
            let made_for = made_for.into_iter().collect::<Vec<_>>().join(", ");
            (
                m.id.clone(),
                format!("still made for {made_for}: run key rewrap again"),
            )
        })
    });
    // Newer than the first backup under the current key: nothing tells it from one
    // forged with the leaked key, so it is never rewrapped; a new backup replaces it.
    let retired = after.untrusted.iter().filter_map(|r| match (&r.reason, &r.manifest) {
        (Untrusted::RetiredKey { key, .. }, Some(m)) => Some((
            m.id.clone(),
            format!("made with the retired key {key}, which nothing tells from a forgery: not rewrapped; take a new backup (dbkeeper run-job {}.backup)", m.database),
        )),
        _ => None,
    });
    for (id, what_now) in trusted.chain(retired).filter(|(id, _)| !seen.contains(id)) {
        println!(
            "{what} {id}: written during the rewrap (is a daemon running with the old key? reload it: systemctl reload dbkeeper), {what_now}"
        );
        tally.skipped += 1;
        tally.problems += 1;
    }
}

pub fn key_rewrap(
    config: &Config,
    names: &[String],
    from: Option<&str>,
    dry_run: bool,
) -> anyhow::Result<Exit> {
    let all: Vec<_> = config.named_backups().collect();
    for n in names {
        if !all.iter().any(|(name, _)| name == n) {
            bail!(
                "\"{n}\" has no [database.backup] nor a [[files]] set of that name in {}",
                config.path.display()
            );
        }
    }
    let mut tally = Tally::default();
    for (name, b) in all {
        if !names.is_empty() && !names.iter().any(|n| n == name) {
            continue;
        }
        let (key, keys) = b
            .load_keys()
            .with_context(|| format!("database \"{name}\""))?;
        let recipients = b
            .load_recipients()
            .with_context(|| format!("database \"{name}\""))?;
        if key.is_none() && recipients.is_empty() {
            println!("{name}: skipped: no encryption-key-file or recipients to rewrap to");
            tally.skipped += 1;
            tally.problems += 1;
            continue;
        }
        // The rotation is under way: from now on, nothing newer made with the old key
        // is believed (a state directory not made yet is made by the writer key
        // below, or has nothing to remember against).
        if !dry_run {
            if let Some(current) = crate::jobs::backup::current_key_id(key.as_ref(), &recipients) {
                if config.daemon.state_dir.is_dir() {
                    catalog::note_current_key(
                        &config.daemon.state_dir,
                        name,
                        &current,
                        chrono::Utc::now(),
                    )
                    .context("cannot record the key change in the state directory")?;
                }
            }
        }
        // Made for recipients only, the manifest carries this host's writer tag;
        // a dry run creates nothing, so a throwaway key stands in for a missing one.
        let writer = match (&key, dry_run) {
            (Some(_), _) => None,
            (None, false) => Some(
                crate::keys::load_or_create_writer_key(&config.daemon.state_dir)
                    .context("cannot load or create the writer key")?,
            ),
            (None, true) => Some(match crate::keys::writer_key(&config.daemon.state_dir) {
                Some(k) => k,
                None => Key::random()?,
            }),
        };
        let target = Target {
            key: key.as_ref(),
            recipients: &recipients,
            writer: writer.as_ref(),
        };
        let policy = trust_policy_of(config, name, b)?;
        let places = places_from(b, name, from)?;
        for place in &places {
            let label = place.label();
            let listing = match catalog::list(&*place.store, &policy) {
                Ok(l) => l,
                Err(e) => {
                    println!("{name} {label}: skipped: cannot list backups: {e}");
                    tally.skipped += 1;
                    tally.problems += 1;
                    continue;
                }
            };
            if let Some(missing) = missing_folder(place) {
                // An unmounted disk lists as empty: saying nothing would let the
                // operator destroy the old key its backups need (adversary round 2
                // of issue 16, case 02).
                println!(
                    "{name} {label}: skipped: the destination folder {} does not exist (not mounted?); its backups, if any, were not rewrapped",
                    missing.display()
                );
                tally.skipped += 1;
                tally.problems += 1;
                continue;
            }
            orphans(&*place.store, &mut tally, &format!("{name} {label}"));
            let twins = current_twins(&places, place, &policy, &target);
            let mut work: Vec<(catalog::Manifest, bool)> = Vec::new();
            for r in &listing.untrusted {
                match &r.manifest {
                    Some(m) if maybe_interrupted(&r.reason) => work.push((m.clone(), false)),
                    // A copy of a backup another destination holds already rewrapped
                    // (a run cut short, `--from` one destination at a time): that
                    // copy moved the retired key's boundary before this one.
                    Some(m)
                        if matches!(r.reason, Untrusted::RetiredKey { .. })
                            && twins.get(&m.id) == Some(&m.raw_bytes) =>
                    {
                        work.push((m.clone(), true))
                    }
                    _ => {
                        let id = catalog::id_of_manifest_file(&r.file).unwrap_or(&r.file);
                        println!("{name} {label} {id}: skipped: untrusted: {}", r.reason);
                        tally.skipped += 1;
                        tally.problems += 1;
                    }
                }
            }
            // Newest first: if the run is killed, the backups still under a retired
            // key are all older than those under the current one, which is what the
            // retired-key rule of the listing accepts.
            work.extend(listing.backups.iter().rev().map(|m| (m.clone(), true)));
            // Every id listed before the work, trusted or not: what appears after it
            // was written meanwhile.
            let seen: BTreeSet<String> = listing
                .backups
                .iter()
                .map(|m| m.id.clone())
                .chain(
                    listing
                        .untrusted
                        .iter()
                        .filter_map(|r| catalog::id_of_manifest_file(&r.file).map(str::to_owned)),
                )
                .collect();
            for (m, trusted) in work {
                let result =
                    rewrap_backup(&*place.store, &m, trusted, &keys, &target, &policy, dry_run);
                let what = format!("{name} {label} {}", m.id);
                let result = result.map_err(|e| {
                    if trusted {
                        e.to_string()
                    } else {
                        format!("untrusted, {e}")
                    }
                });
                report(&mut tally, &what, result);
            }
            if !dry_run {
                late_arrivals(
                    &*place.store,
                    &policy,
                    &seen,
                    &target,
                    &mut tally,
                    &format!("{name} {label}"),
                );
            }
        }
        // The exports of retention rules with `archive = true`: no manifest, in
        // `<destination>/<db>/retention/<rule>/`.
        let rules = config
            .databases
            .iter()
            .filter(|d| d.name == name)
            .flat_map(|d| d.retention.iter())
            .filter(|r| r.archive);
        for rule in rules {
            let rule_name = rule.job_name();
            for place in storage::for_backups(b, &[name, "retention", &rule_name]) {
                if from.is_some_and(|f| !place.config.is_named(f)) {
                    continue;
                }
                let label = place.label();
                let names = match place.store.list("") {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                    Err(e) => {
                        println!("{name} {label} retention {rule_name}: skipped: cannot list: {e}");
                        tally.skipped += 1;
                        tally.problems += 1;
                        continue;
                    }
                };
                let mut exports: Vec<String> = names
                    .into_iter()
                    .filter(|n| n.ends_with(".jsonl.dbk") && !n.starts_with('.'))
                    .collect();
                exports.sort();
                for export in exports.iter().rev() {
                    let result =
                        rewrap_export(&*place.store, export, name, &keys, &target, dry_run);
                    report(
                        &mut tally,
                        &format!("{name} {label} retention/{rule_name}/{export}"),
                        result,
                    );
                }
            }
        }
    }
    let (rw, rp) = if dry_run {
        ("would rewrap", "would repair")
    } else {
        ("rewrapped", "repaired")
    };
    println!(
        "{} {rw}, {} already current, {} {rp}, {} skipped",
        tally.rewrapped, tally.current, tally.repaired, tally.skipped
    );
    Ok(if tally.problems == 0 {
        Exit::Success
    } else {
        Exit::Failed
    })
}

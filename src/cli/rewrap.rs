//! `dbkeeper key rewrap`: every backup of the named databases and files sets (all
//! by default), in every destination (or `--from DEST`), rewrapped for the
//! config's current `encryption-key-file` and `recipients` (see
//! [`crate::repo::rewrap`]). One line per archive, then a summary.

use anyhow::{bail, Context};

use super::backup::{places_from, trust_policy_of};
use super::Exit;
use crate::config::Config;
use crate::keys::Key;
use crate::repo::catalog::{self, Untrusted};
use crate::repo::rewrap::{rewrap_backup, Outcome, Target};

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
        for place in places_from(b, name, from)? {
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
            let mut work: Vec<(catalog::Manifest, bool)> = Vec::new();
            for r in &listing.untrusted {
                match &r.manifest {
                    Some(m) if maybe_interrupted(&r.reason) => work.push((m.clone(), false)),
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
            for (m, trusted) in work {
                let result =
                    rewrap_backup(&*place.store, &m, trusted, &keys, &target, &policy, dry_run);
                match result {
                    Ok(outcome) => {
                        println!("{name} {label} {}: {}", m.id, outcome.describe());
                        match outcome {
                            Outcome::Rewrapped | Outcome::WouldRewrap => tally.rewrapped += 1,
                            Outcome::AlreadyCurrent => tally.current += 1,
                            Outcome::Repaired | Outcome::WouldRepair => tally.repaired += 1,
                            Outcome::NotEncrypted => tally.skipped += 1,
                        }
                    }
                    Err(e) => {
                        let why = if trusted {
                            String::new()
                        } else {
                            "untrusted, ".to_owned()
                        };
                        println!("{name} {label} {}: skipped: {why}{e}", m.id);
                        tally.skipped += 1;
                        tally.problems += 1;
                    }
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

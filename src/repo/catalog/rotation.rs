//! Which backups to keep: `keep = { last, hourly, daily, weekly, monthly, yearly }`
//! with restic/borg `forget` semantics.
//!
//! Backups are walked newest first. `last = n` keeps the n newest. Each period rule
//! keeps the newest backup of each of the n most recent periods (hours, days, ISO
//! weeks, months, years, in UTC) that have a backup, so a gap of failed days does not
//! shorten how far back the policy reaches. Only good backups (complete, not failed
//! verification) count; the newest good backup is always kept; failed ones older than
//! it are removed.
//!
//! Rotation cannot be talked into deleting the wrong thing: it sees only trusted
//! backups (see [`super::trust()`]), deletes only `<id>.dbk`/`<id>.manifest.json` in
//! the database's own folder for ids it took from file names there, never the backup
//! the current run just made, never a backup dated in the future (a run while the
//! clock was wrong: kept, reported, and not given a slot), and never a backup whose id
//! appears twice. A copied or renamed manifest claiming a trusted backup's id is not
//! trusted itself (its file name is not its id), so it is never deleted; the genuine
//! backup is rotated as usual. Either way the id is reported (see
//! [`super::DuplicateId`]).

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::AtomicBool;

use chrono::{DateTime, Datelike, Timelike, Utc};

use super::TrustPolicy;
use crate::repo::archive::{self, KeyRing};
use crate::repo::storage::{Storage, ARCHIVE_SUFFIX};

pub use crate::config::Keep;

/// One backup as rotation sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    pub at: DateTime<Utc>,
    pub good: bool,
    /// Dated after now (plus [`super::FUTURE_SKEW`]): kept, and takes no slot.
    pub future: bool,
    /// Made by the run that is rotating now: kept whatever the policy says.
    pub just_made: bool,
    /// Another manifest (trusted or not) claims the same id: which claim is right
    /// cannot be told, so it is kept and takes no slot.
    pub claimed_twice: bool,
}

impl Candidate {
    /// A backup dated `at`, judged against `now`.
    pub fn new(id: &str, at: DateTime<Utc>, good: bool, now: DateTime<Utc>) -> Self {
        Candidate {
            id: id.to_owned(),
            at,
            good,
            future: super::is_future(at, now),
            just_made: false,
            claimed_twice: false,
        }
    }
}

/// The verdict on one backup, with the rules that keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub keep: bool,
    pub reasons: Vec<String>,
}

type Bucket = fn(DateTime<Utc>) -> (i32, u32, u32);

fn hour(t: DateTime<Utc>) -> (i32, u32, u32) {
    (t.year(), t.ordinal(), t.hour())
}
fn day(t: DateTime<Utc>) -> (i32, u32, u32) {
    (t.year(), t.ordinal(), 0)
}
fn week(t: DateTime<Utc>) -> (i32, u32, u32) {
    let w = t.iso_week();
    (w.year(), w.week(), 0)
}
fn month(t: DateTime<Utc>) -> (i32, u32, u32) {
    (t.year(), t.month(), 0)
}
fn year(t: DateTime<Utc>) -> (i32, u32, u32) {
    (t.year(), 0, 0)
}

/// Decides for every candidate, newest first in the result.
pub fn plan(candidates: &[Candidate], keep: &Keep) -> Vec<Decision> {
    let mut sorted: Vec<&Candidate> = candidates.iter().collect();
    sorted.sort_by(|a, b| (b.at, &b.id).cmp(&(a.at, &a.id)));
    let mut reasons: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &sorted {
        *seen.entry(c.id.as_str()).or_default() += 1;
    }
    let duplicate =
        |c: &Candidate| c.claimed_twice || seen.get(c.id.as_str()).is_some_and(|&n| n > 1);
    // Only good, present-dated, unambiguous backups take slots.
    let good: Vec<&Candidate> = sorted
        .iter()
        .copied()
        .filter(|c| c.good && !c.future && !duplicate(c))
        .collect();

    for c in good.iter().take(keep.last as usize) {
        reasons.entry(&c.id).or_default().push("last".to_owned());
    }
    let rules: [(&str, u32, Bucket); 5] = [
        ("hourly", keep.hourly, hour),
        ("daily", keep.daily, day),
        ("weekly", keep.weekly, week),
        ("monthly", keep.monthly, month),
        ("yearly", keep.yearly, year),
    ];
    for (name, count, bucket) in rules {
        let mut left = count;
        let mut previous = None;
        for c in &good {
            if left == 0 {
                break;
            }
            let b = bucket(c.at);
            if previous != Some(b) {
                previous = Some(b);
                left -= 1;
                reasons.entry(&c.id).or_default().push(name.to_owned());
            }
        }
    }
    // A good backup whose id is claimed twice takes no slot but is never deleted
    // either, so it still makes older failed backups redundant.
    let newest_good = sorted.iter().find(|c| c.good && !c.future).map(|c| c.at);
    if let Some(c) = good.first() {
        let r = reasons.entry(&c.id).or_default();
        if r.is_empty() {
            r.push("newest good backup".to_owned());
        }
    }
    sorted
        .iter()
        .map(|c| {
            let mut r = if duplicate(c) {
                vec!["duplicate id; never deleted".to_owned()]
            } else {
                reasons.get(c.id.as_str()).cloned().unwrap_or_default()
            };
            if c.future {
                r.push("dated in the future; kept until the clock passes it".to_owned());
            }
            if c.just_made {
                r.push("made by this run".to_owned());
            }
            // A failed backup newer than every good one is left for inspection.
            if !c.good && newest_good.is_none_or(|t| c.at > t) {
                r.push("failed verification; kept until a newer good backup exists".to_owned());
            }
            Decision {
                id: c.id.clone(),
                keep: !r.is_empty(),
                reasons: r,
            }
        })
        .collect()
}

/// Whether a backup whose manifest records a failed verification really is bad: the
/// manifest is not authenticated, so a recorded failure is read again before it
/// costs the backup (adversary round 3, case 07). Only a bad archive (not
/// authentic, cut short, damaged, an incomplete dump) confirms it; an archive that
/// reads whole, or one that cannot be read now (I/O, a key not configured), does not.
fn failure_confirmed(store: &dyn Storage, id: &str, keys: &KeyRing) -> bool {
    let Ok(object) = store.open(&format!("{id}{ARCHIVE_SUFFIX}")) else {
        return false;
    };
    let Ok(input) = object.read(None) else {
        return false;
    };
    let read = archive::read_archive(
        io::BufReader::with_capacity(1 << 20, input),
        keys,
        io::sink(),
        &AtomicBool::new(false),
    );
    read.is_err_and(|e| e.is_verification())
}

/// What [`rotate`] found and did.
#[derive(Debug, Clone, Default)]
pub struct Rotation {
    /// Every trusted backup's verdict, newest first.
    pub decisions: Vec<Decision>,
    /// Ids of trusted backups dated in the future.
    pub future: Vec<String>,
    /// Manifests that were not believed (and so were left alone).
    pub untrusted: Vec<super::Rejected>,
    /// Ids claimed by more than one manifest file (the copies were left alone).
    pub duplicates: Vec<super::DuplicateId>,
}

/// Applies `keep` to the trusted backups in `store` (or, with `dry_run`, only
/// decides). `just_made` is the id of the backup the calling run wrote, if any.
pub fn rotate(
    store: &dyn Storage,
    policy: &TrustPolicy,
    keep: &Keep,
    now: DateTime<Utc>,
    just_made: Option<&str>,
    dry_run: bool,
) -> io::Result<Rotation> {
    let listing = super::list(store, policy)?;
    let candidates: Vec<Candidate> = listing
        .backups
        .iter()
        .map(|m| Candidate {
            just_made: just_made == Some(m.id.as_str()),
            // Untrusted manifests' claims count too (adversary round 3, case 09).
            claimed_twice: listing.duplicates.iter().any(|d| d.id == m.id),
            ..Candidate::new(&m.id, m.started_at, m.is_good(), now)
        })
        .collect();
    let mut decisions = plan(&candidates, keep);
    for d in decisions.iter_mut().filter(|d| !d.keep) {
        let failed = candidates.iter().any(|c| c.id == d.id && !c.good);
        if failed && !failure_confirmed(store, &d.id, &policy.keys) {
            d.keep = true;
            d.reasons.push(
                "recorded as failed, but its archive reads whole: kept (was its manifest edited?)"
                    .to_owned(),
            );
        }
    }
    if !dry_run {
        for d in decisions.iter().filter(|d| !d.keep) {
            // Ids come from file names in this folder; checked again so that no
            // future change can turn a manifest's text into a path.
            if !super::is_valid_id(&d.id) {
                return Err(io::Error::other(format!(
                    "refusing to delete backup \"{}\": not a backup id",
                    d.id
                )));
            }
            super::remove_backup(store, &d.id)?;
        }
    }
    Ok(Rotation {
        future: candidates
            .iter()
            .filter(|c| c.future)
            .map(|c| c.id.clone())
            .collect(),
        decisions,
        untrusted: listing.untrusted,
        duplicates: listing.duplicates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    fn at(days_ago: i64, hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 6, 30, hour, 0, 0).unwrap() - Duration::days(days_ago)
    }

    fn daily_timeline(days: i64, skip: &[i64]) -> Vec<Candidate> {
        (0..days)
            .filter(|d| !skip.contains(d))
            .map(|d| Candidate {
                id: format!("b{d:03}"),
                at: at(d, 2),
                good: true,
                future: false,
                just_made: false,
                claimed_twice: false,
            })
            .collect()
    }

    fn kept(decisions: &[Decision]) -> Vec<&str> {
        decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id.as_str())
            .collect()
    }

    fn only(field: &str, n: u32) -> Keep {
        let mut k = Keep::default();
        match field {
            "last" => k.last = n,
            "hourly" => k.hourly = n,
            "daily" => k.daily = n,
            "weekly" => k.weekly = n,
            "monthly" => k.monthly = n,
            _ => k.yearly = n,
        }
        k
    }

    #[test]
    fn last_keeps_the_newest_n() {
        let d = plan(&daily_timeline(10, &[]), &only("last", 3));
        assert_eq!(kept(&d), ["b000", "b001", "b002"]);
    }

    #[test]
    fn daily_keeps_one_per_day_and_reaches_past_gaps() {
        // Days 1..=3 failed (no backup): 5 daily still means 5 days that have one.
        let d = plan(&daily_timeline(20, &[1, 2, 3]), &only("daily", 5));
        assert_eq!(kept(&d), ["b000", "b004", "b005", "b006", "b007"]);
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day() {
        let mut c = daily_timeline(3, &[]);
        c.push(Candidate {
            id: "b000-late".into(),
            at: at(0, 20),
            good: true,
            future: false,
            just_made: false,
            claimed_twice: false,
        });
        c.push(Candidate {
            id: "b001-late".into(),
            at: at(1, 23),
            good: true,
            future: false,
            just_made: false,
            claimed_twice: false,
        });
        let d = plan(&c, &only("daily", 2));
        assert_eq!(kept(&d), ["b000-late", "b001-late"]);
    }

    #[test]
    fn weekly_monthly_yearly_over_two_years() {
        let c = daily_timeline(800, &[]);
        let weekly = plan(&c, &only("weekly", 4));
        assert_eq!(kept(&weekly).len(), 4);
        // 2026-06-30 is a Tuesday: this week's newest, then the Sundays before it.
        assert_eq!(kept(&weekly), ["b000", "b002", "b009", "b016"]);
        let monthly = plan(&c, &only("monthly", 3));
        assert_eq!(kept(&monthly), ["b000", "b030", "b061"]); // Jun 30, May 31, Apr 30
        let yearly = plan(&c, &only("yearly", 5));
        assert_eq!(kept(&yearly).len(), 3, "only 2026, 2025, 2024 exist");
    }

    #[test]
    fn hourly_rule() {
        let c: Vec<Candidate> = (0..10)
            .map(|h| Candidate {
                id: format!("h{h}"),
                at: at(0, 20) - Duration::minutes(30 * h),
                good: true,
                future: false,
                just_made: false,
                claimed_twice: false,
            })
            .collect();
        // 20:00, 19:30, 19:00, 18:30 … -> newest of hours 20, 19, 18
        assert_eq!(kept(&plan(&c, &only("hourly", 3))), ["h0", "h1", "h3"]);
    }

    #[test]
    fn rules_combine_as_a_union() {
        let keep = Keep {
            last: 2,
            hourly: 0,
            daily: 3,
            weekly: 3,
            monthly: 0,
            yearly: 0,
        };
        let d = plan(&daily_timeline(30, &[]), &keep);
        assert_eq!(kept(&d), ["b000", "b001", "b002", "b009"]);
        let first = &d[0];
        assert_eq!(first.reasons, ["last", "daily", "weekly"]);
    }

    #[test]
    fn failed_backups_never_count_and_the_newest_good_one_stays() {
        let mut c = daily_timeline(5, &[]);
        for b in c.iter_mut().take(2) {
            b.good = false; // the two newest failed verification
        }
        let d = plan(&c, &only("last", 1));
        let k = kept(&d);
        assert!(k.contains(&"b002"), "newest good backup kept: {k:?}");
        assert!(
            k.contains(&"b000") && k.contains(&"b001"),
            "newer failures kept for inspection"
        );
        assert!(!k.contains(&"b003"));
        // An old failure goes.
        let mut c = daily_timeline(5, &[]);
        c[3].good = false;
        assert!(!kept(&plan(&c, &Keep::recommended())).contains(&"b003"));
    }

    #[test]
    fn empty_policy_is_detected() {
        assert!(!only("last", 0).keeps_something());
        assert!(Keep::recommended().keeps_something());
        assert!(!Keep::default().keeps_something());
    }

    mod on_disk {
        //! The property: whatever is in the folder and whatever the policy, rotation
        //! keeps the newest good backup and the one just made, never deletes a
        //! future-dated or untrusted one, and touches nothing outside the folder.

        use std::collections::BTreeSet;
        use std::path::Path;
        use std::sync::atomic::AtomicBool;

        use proptest::prelude::*;

        use super::super::*;
        use crate::repo::archive::{self, Compression, Header, Key, Settings};
        use crate::repo::catalog::{BackupKind, Manifest, Verification, VerifyMode, VerifyResult};
        use crate::repo::storage::{Destination, Storage};

        #[derive(Debug, Clone, Copy)]
        enum Sort {
            Good,
            /// Recorded as failed, and damaged past its first segment (which a listing
            /// authenticates), so reading it again confirms the failure.
            Failed,
            /// Recorded as failed by an edited manifest; the archive reads whole.
            FailedClaim,
            Future,
            /// A plain archive although a key is configured.
            Plain,
            /// Header and manifest name another database.
            OtherDatabase,
            /// A second manifest claiming the id of an earlier backup.
            Duplicate,
            /// A byte copy of an earlier good archive under `<its id>.<n>`.
            Copy,
            /// A symbolic link to an earlier good archive under `<its id>.<n>`.
            Link,
            /// A copy of an earlier good archive whose header time was edited (no key).
            EditedTime,
        }

        fn sort() -> impl Strategy<Value = Sort> {
            prop_oneof![
                4 => Just(Sort::Good),
                2 => Just(Sort::Failed),
                1 => Just(Sort::FailedClaim),
                1 => Just(Sort::Future),
                1 => Just(Sort::Plain),
                1 => Just(Sort::OtherDatabase),
                1 => Just(Sort::Duplicate),
                1 => Just(Sort::Copy),
                1 => Just(Sort::Link),
                1 => Just(Sort::EditedTime),
            ]
        }

        fn id_at(at: DateTime<Utc>) -> String {
            format!("{}-scheduled", at.format("%Y%m%dT%H%M%SZ"))
        }

        /// Writes `<file_id>.dbk` and `<file_id>.manifest.json` whose JSON says `id`.
        fn write(
            dest: &Destination,
            file_id: &str,
            id: &str,
            at: DateTime<Utc>,
            sort: Sort,
            key: &Key,
        ) {
            let database = match sort {
                Sort::OtherDatabase => "other",
                _ => "app",
            };
            let key = match sort {
                Sort::Plain => None,
                _ => Some(key),
            };
            let header = Header {
                database: database.to_owned(),
                backend: "sqlite".to_owned(),
                image: "sqlite".to_owned(),
                created: at,
                compression: Compression::None,
                // Small segments, so that a damaged one can follow an intact first.
                segment_size: 1024,
                encryption: None,
                globals: None,
            };
            let path = dest.path(&format!("{file_id}{ARCHIVE}"));
            let out = std::fs::File::create(&path).unwrap();
            let settings = Settings {
                header,
                key,
                compression: Compression::None,
                level: 0,
                threads: 1,
                check_with: None,
                globals: None,
            };
            let image = vec![b'x'; 3000];
            let (_, stats) =
                archive::write_archive(&image[..], out, settings, &AtomicBool::new(false)).unwrap();
            if matches!(sort, Sort::Failed) {
                let mut bytes = std::fs::read(&path).unwrap();
                let last = bytes.len() - 5;
                bytes[last] ^= 1;
                std::fs::write(&path, bytes).unwrap();
            }
            let m = Manifest {
                id: id.to_owned(),
                database: database.to_owned(),
                backend: "sqlite".to_owned(),
                server_version: None,
                kind: BackupKind::Scheduled,
                started_at: at,
                finished_at: at,
                raw_bytes: stats.raw_bytes,
                stored_bytes: stats.stored_bytes,
                sha256: stats.sha256,
                key_id: key.map(|k| k.id().to_owned()),
                compression: Compression::None,
                format_version: 1,
                dbkeeper_version: "test".to_owned(),
                schema_version: None,
                verification: Verification {
                    mode: VerifyMode::Read,
                    result: if matches!(sort, Sort::Failed | Sort::FailedClaim) {
                        VerifyResult::Failed
                    } else {
                        VerifyResult::Passed
                    },
                    at,
                    error: None,
                },
                globals: None,
            };
            let json = serde_json::to_vec_pretty(&m).unwrap();
            std::fs::write(dest.path(&format!("{file_id}{MANIFEST}")), json).unwrap();
        }

        /// Plants a copy, link or time-edited copy (per `sort`) of the backup `of`
        /// under `<of>.<n>`, with its manifest adjusted as an attacker without the key
        /// would.
        fn plant(dest: &Destination, of: &str, n: usize, sort: Sort) -> String {
            let id = format!("{of}.{n}");
            let original = dest.path(&format!("{of}{ARCHIVE}"));
            let path = dest.path(&format!("{id}{ARCHIVE}"));
            let mut bytes = std::fs::read(&original).unwrap();
            let mut m: serde_json::Value = serde_json::from_slice(
                &std::fs::read(dest.path(&format!("{of}{MANIFEST}"))).unwrap(),
            )
            .unwrap();
            match sort {
                Sort::Link => std::os::unix::fs::symlink(&original, &path).unwrap(),
                Sort::EditedTime => {
                    let len = u32::from_be_bytes(bytes[9..13].try_into().unwrap()) as usize;
                    let mut h: serde_json::Value =
                        serde_json::from_slice(&bytes[13..13 + len]).unwrap();
                    let at: DateTime<Utc> = serde_json::from_value(h["created"].clone()).unwrap();
                    let later = at + chrono::Duration::milliseconds(1);
                    h["created"] = serde_json::to_value(later).unwrap();
                    m["started_at"] = h["created"].clone();
                    let edited = serde_json::to_vec(&h).unwrap();
                    let mut out = bytes[..9].to_vec();
                    out.extend_from_slice(&(edited.len() as u32).to_be_bytes());
                    out.extend_from_slice(&edited);
                    out.extend_from_slice(&bytes[13 + len..]);
                    bytes = out;
                    std::fs::write(&path, &bytes).unwrap();
                }
                _ => std::fs::write(&path, &bytes).unwrap(),
            }
            m["id"] = id.clone().into();
            std::fs::write(
                dest.path(&format!("{id}{MANIFEST}")),
                serde_json::to_vec(&m).unwrap(),
            )
            .unwrap();
            id
        }

        /// The backup ids whose manifest is in `dest`.
        fn kept(dest: &Destination, ids: &[String]) -> Vec<String> {
            ids.iter()
                .filter(|id| dest.path(&format!("{id}{MANIFEST}")).exists())
                .cloned()
                .collect()
        }

        const ARCHIVE: &str = crate::repo::storage::ARCHIVE_SUFFIX;
        const MANIFEST: &str = crate::repo::storage::MANIFEST_SUFFIX;

        fn files(root: &Path) -> BTreeSet<String> {
            let mut out = BTreeSet::new();
            let mut stack = vec![root.to_owned()];
            while let Some(dir) = stack.pop() {
                for e in std::fs::read_dir(&dir).unwrap() {
                    let p = e.unwrap().path();
                    if p.is_dir() {
                        stack.push(p);
                    } else {
                        out.insert(p.strip_prefix(root).unwrap().display().to_string());
                    }
                }
            }
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]
            #[test]
            fn rotation_cannot_be_tricked(
                backups in proptest::collection::vec((sort(), 1u32..4000), 0..10),
                just_made in any::<bool>(),
                counts in proptest::array::uniform6(0u32..4),
            ) {
                let keep = Keep {
                    last: counts[0], hourly: counts[1], daily: counts[2],
                    weekly: counts[3], monthly: counts[4], yearly: counts[5],
                };
                let root = tempfile::tempdir().unwrap();
                let key = Key::random().unwrap();
                let now = Utc::now();
                let dest = Destination::new(root.path(), "app");
                let other = Destination::new(root.path(), "other");
                // The oracle: the same genuine backups without anything planted. What
                // rotation keeps of them must not depend on what an attacker added.
                let twin_root = tempfile::tempdir().unwrap();
                let twin = Destination::new(twin_root.path(), "app");
                dest.prepare().unwrap();
                other.prepare().unwrap();
                twin.prepare().unwrap();
                let mut genuine: Vec<String> = Vec::new();
                let mut planted = 0usize;
                let sentinel = id_at(now - chrono::Duration::days(400));
                write(&other, &sentinel, &sentinel, now - chrono::Duration::days(400), Sort::Good, &key);
                std::fs::write(root.path().join("outside.txt"), b"x").unwrap();

                let mut used = BTreeSet::new();
                let mut good_ids: Vec<(DateTime<Utc>, String)> = Vec::new();
                let mut protected: BTreeSet<String> = BTreeSet::new();
                let mut damaged: Vec<(DateTime<Utc>, String)> = Vec::new();
                for (sort, hours) in &backups {
                    let at = match sort {
                        Sort::Future => now + chrono::Duration::hours(i64::from(*hours) + 1),
                        _ => now - chrono::Duration::hours(i64::from(*hours)),
                    };
                    let file_id = id_at(at);
                    if !used.insert(file_id.clone()) {
                        continue;
                    }
                    // A duplicate or copy needs an earlier good backup to copy; without
                    // one it is just another good backup.
                    let sort = match (sort, good_ids.first()) {
                        (Sort::Duplicate | Sort::Copy | Sort::Link | Sort::EditedTime, None) => &Sort::Good,
                        _ => sort,
                    };
                    if let (Sort::Copy | Sort::Link | Sort::EditedTime, Some((_, of))) = (sort, good_ids.first()) {
                        planted += 1;
                        protected.insert(plant(&dest, &of.clone(), planted + 1, *sort));
                        continue;
                    }
                    if matches!(sort, Sort::Good | Sort::Failed | Sort::FailedClaim | Sort::Future) {
                        write(&twin, &file_id, &file_id, at, *sort, &key);
                        genuine.push(file_id.clone());
                    }
                    let claimed = match (sort, good_ids.first()) {
                        (Sort::Duplicate, Some((_, id))) => id.clone(),
                        _ => file_id.clone(),
                    };
                    write(&dest, &file_id, &claimed, at, *sort, &key);
                    if matches!(sort, Sort::Duplicate) {
                        // A second claim on an id is a rule of its own (the claimed
                        // backup is never deleted), not a planted file the twin ignores.
                        write(&twin, &file_id, &claimed, at, *sort, &key);
                        protected.insert(claimed.clone());
                    }
                    match sort {
                        Sort::Good => good_ids.push((at, file_id)),
                        Sort::Failed => damaged.push((at, file_id)),
                        _ => { protected.insert(file_id); }
                    }
                }
                let made = id_at(now);
                if just_made && used.insert(made.clone()) {
                    write(&dest, &made, &made, now, Sort::Good, &key);
                    write(&twin, &made, &made, now, Sort::Good, &key);
                    genuine.push(made.clone());
                    good_ids.push((now, made.clone()));
                    protected.insert(made.clone());
                }
                if let Some((_, newest)) = good_ids.iter().max() {
                    protected.insert(newest.clone());
                }
                let before = files(root.path());
                let policy = TrustPolicy {
                    database: "app".to_owned(),
                    keys: crate::repo::archive::KeyRing::new(vec![key.clone()]),
                    encrypting: true,
                    current_key: Some(key.id().to_owned()),
                    allow_unencrypted: false,
                };
                rotate(&dest, &policy, &keep, now, just_made.then_some(made.as_str()), false).unwrap();
                rotate(&twin, &policy, &keep, now, just_made.then_some(made.as_str()), false).unwrap();
                prop_assert_eq!(kept(&dest, &genuine), kept(&twin, &genuine), "planted files changed what rotation kept");
                let after = files(root.path());
                prop_assert!(after.is_subset(&before));
                for gone in before.difference(&after) {
                    let name = gone.strip_prefix("app/");
                    prop_assert!(name.is_some(), "deleted outside the folder: {gone}");
                    let name = name.unwrap_or_default();
                    let id = name.strip_suffix(ARCHIVE).or_else(|| name.strip_suffix(MANIFEST));
                    prop_assert!(id.is_some_and(crate::repo::catalog::is_valid_id), "deleted {gone}");
                    prop_assert!(!protected.contains(id.unwrap_or_default()), "deleted protected {gone}");
                }
                for id in &protected {
                    prop_assert!(after.contains(&format!("app/{id}{MANIFEST}")), "{id} lost");
                }
                // The README's rule, checked against the files: a backup whose failure
                // reading confirms goes once a newer good one exists.
                let newest_good = good_ids.iter().map(|(at, _)| *at).max();
                for (at, id) in &damaged {
                    if newest_good.is_some_and(|t| *at < t) {
                        prop_assert!(!after.contains(&format!("app/{id}{MANIFEST}")), "damaged {id} kept");
                    }
                }
            }
        }
    }
}

//! Which backups to keep: `keep = { last, hourly, daily, weekly, monthly, yearly,
//! within }` with restic's `forget` semantics (0.16 and later).
//!
//! Backups are walked newest first. `last = n` keeps the n newest. Each period rule
//! keeps the newest backup of each of the n most recent periods (hours, days, ISO
//! weeks, months, years, in UTC) that have a backup, so a gap of failed days does not
//! shorten how far back the policy reaches; a period rule that still has periods left
//! once every backup is walked keeps the oldest backup too (restic 0.16), so a young
//! policy keeps all the history there is. A count of [`Count::All`] (`-1`, `"all"`)
//! has no limit. `within` keeps every backup made at most that long before the newest
//! good one: measured from the newest backup, not from now, so a backup job that
//! stops working does not let the window empty. Only good backups (complete, not
//! failed verification) count; the newest good backup is always kept; failed ones
//! older than it are removed. The newest good pre-migration backup is always kept
//! too (it is the one a failed migration tells the operator to restore, and a
//! policy like `last = 1` would otherwise prune it with the next ordinary backup);
//! it takes its slots like any other good backup.
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

use crate::config::short_duration;
pub use crate::config::{Count, Keep};

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
    /// Taken before a migration: the newest good one is always kept.
    pub pre_migration: bool,
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
            pre_migration: false,
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

/// How many slots a rule has.
fn slots(count: Count) -> usize {
    count.limit().map_or(usize::MAX, |n| n as usize)
}

/// Decides for every candidate, newest first in the result.
pub fn plan<'a>(candidates: &'a [Candidate], keep: &Keep) -> Vec<Decision> {
    let mut sorted: Vec<&'a Candidate> = candidates.iter().collect();
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

    let mut keep_for = |c: &'a Candidate, why: String| {
        reasons.entry(c.id.as_str()).or_default().push(why);
    };
    for c in good.iter().take(slots(keep.last)) {
        keep_for(c, "last".to_owned());
    }
    if let (Some(within), Some(newest)) = (keep.within, good.first()) {
        // Measured from the newest good backup, as restic does, not from now (borg):
        // a backup job that stops working must not let every backup expire.
        let from = chrono::TimeDelta::from_std(within)
            .ok()
            .and_then(|d| newest.at.checked_sub_signed(d));
        let why = format!("within {}", short_duration(within));
        // A window reaching past the calendar's start keeps everything.
        for c in good.iter().filter(|c| from.is_none_or(|from| c.at >= from)) {
            keep_for(c, why.clone());
        }
    }
    let rules: [(&str, Count, Bucket); 5] = [
        ("hourly", keep.hourly, hour),
        ("daily", keep.daily, day),
        ("weekly", keep.weekly, week),
        ("monthly", keep.monthly, month),
        ("yearly", keep.yearly, year),
    ];
    for (name, count, bucket) in rules {
        if !count.is_on() {
            continue;
        }
        let mut left = slots(count);
        let mut previous = None;
        let mut kept_oldest = false;
        for (i, c) in good.iter().enumerate() {
            if left == 0 {
                break;
            }
            let b = bucket(c.at);
            if previous != Some(b) {
                previous = Some(b);
                left -= 1;
                kept_oldest = i + 1 == good.len();
                keep_for(c, name.to_owned());
            }
        }
        // restic >= 0.16: a rule with periods left once every backup is walked keeps
        // the oldest backup too, so that it reaches as far back as there are backups.
        if left > 0 && !kept_oldest {
            if let Some(oldest) = good.last() {
                keep_for(oldest, format!("{name} (oldest; periods left)"));
            }
        }
    }
    // A good backup whose id is claimed twice takes no slot but is never deleted
    // either, so it still makes older failed backups redundant.
    let newest_good = sorted.iter().find(|c| c.good && !c.future).map(|c| c.at);
    // Sorted newest first: the first good pre-migration backup is the newest.
    let newest_pre_migration = sorted
        .iter()
        .find(|c| c.good && c.pre_migration)
        .map(|c| c.id.as_str());
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
            if newest_pre_migration == Some(c.id.as_str()) {
                r.push("newest good pre-migration backup".to_owned());
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
    read_whole(store, id, keys).is_some_and(|read| read.is_err_and(|e| e.is_verification()))
}

/// Whether the archive of `id` authenticates, decompresses and checks whole. A
/// read that fails for any reason (damage, I/O, a key not configured) says no: the
/// backup is then not relied on to make older ones redundant.
fn reads_whole(store: &dyn Storage, id: &str, keys: &KeyRing) -> bool {
    read_whole(store, id, keys).is_some_and(|read| read.is_ok())
}

/// Reads the archive of `id` to the end; `None` when it cannot be opened.
fn read_whole(
    store: &dyn Storage,
    id: &str,
    keys: &KeyRing,
) -> Option<Result<(), archive::ArchiveError>> {
    let object = store.open(&format!("{id}{ARCHIVE_SUFFIX}")).ok()?;
    let input = object.read(None).ok()?;
    let read = archive::read_archive(
        io::BufReader::with_capacity(1 << 20, input),
        keys,
        io::sink(),
        &AtomicBool::new(false),
    );
    Some(read.map(|_| ()))
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
/// decides). `just_made` is the id of the backup the calling run wrote, if any;
/// `pinned` are ids never deleted, each with the reason shown (a failed migration
/// named it, see [`super::pins`]; a database backup pairs with it).
pub fn rotate(
    store: &dyn Storage,
    policy: &TrustPolicy,
    keep: &Keep,
    now: DateTime<Utc>,
    just_made: Option<&str>,
    pinned: &std::collections::BTreeMap<String, String>,
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
            pre_migration: m.kind == super::BackupKind::PreMigration,
            ..Candidate::new(&m.id, m.started_at, m.is_good(), now)
        })
        .collect();
    let mut candidates = candidates;
    let mut unreadable: Vec<String> = Vec::new();
    let decisions = loop {
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
        for d in decisions.iter_mut().filter(|d| !d.keep) {
            if let Some(why) = pinned.get(&d.id) {
                d.keep = true;
                d.reasons.push(why.clone());
            }
        }
        for d in decisions.iter_mut().filter(|d| unreadable.contains(&d.id)) {
            d.reasons.push(
                "did not read whole when rotation checked it: not counted as good".to_owned(),
            );
        }
        if decisions.iter().all(|d| d.keep) {
            break decisions;
        }
        // Deleting is safe only if the newest good backup really is good. A listing
        // authenticates an archive's first segment only; the one the running job
        // just made was read whole while it was written. Any other is read whole
        // now; one that does not read counts as failed (kept, newer than every good
        // one) and the next newest is checked (adversary round 5, case 04).
        let newest = candidates
            .iter()
            .filter(|c| c.good && !c.future)
            .max_by(|a, b| (a.at, &a.id).cmp(&(b.at, &b.id)));
        let Some(newest) = newest else {
            break decisions;
        };
        if newest.just_made || reads_whole(store, &newest.id, &policy.keys) {
            break decisions;
        }
        let id = newest.id.clone();
        tracing::warn!(backup = %id, "the newest good backup does not read whole; rotation counts it as failed");
        for c in candidates.iter_mut().filter(|c| c.id == id) {
            c.good = false;
        }
        unreadable.push(id);
    };
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
                pre_migration: false,
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
        only_count(field, Count::Limited(n))
    }

    fn only_count(field: &str, n: Count) -> Keep {
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
            pre_migration: false,
        });
        c.push(Candidate {
            id: "b001-late".into(),
            at: at(1, 23),
            good: true,
            future: false,
            just_made: false,
            claimed_twice: false,
            pre_migration: false,
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
        // Only 2026, 2025, 2024 exist: their newest, and (restic >= 0.16) the oldest
        // backup, since the rule has years left.
        assert_eq!(kept(&yearly), ["b000", "b181", "b546", "b799"]);
        assert_eq!(yearly[799].reasons, ["yearly (oldest; periods left)"]);
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
                pre_migration: false,
            })
            .collect();
        // 20:00, 19:30, 19:00, 18:30 … -> newest of hours 20, 19, 18
        assert_eq!(kept(&plan(&c, &only("hourly", 3))), ["h0", "h1", "h3"]);
    }

    #[test]
    fn rules_combine_as_a_union() {
        let keep = Keep {
            last: Count::Limited(2),
            daily: Count::Limited(3),
            weekly: Count::Limited(3),
            ..Keep::default()
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
    fn the_newest_good_pre_migration_backup_is_never_deleted() {
        // Adversary 15b, case 07: last = 1 pruned the backup a failed migration named.
        let mut c = daily_timeline(5, &[]);
        c[2].pre_migration = true;
        c[3].pre_migration = true;
        let d = plan(&c, &only("last", 1));
        assert_eq!(kept(&d), ["b000", "b002"]);
        assert_eq!(d[2].reasons, ["newest good pre-migration backup"]);
        // A failed one does not count: the newest good one before it stays.
        c[2].good = false;
        assert_eq!(kept(&plan(&c, &only("last", 1))), ["b000", "b003"]);
    }

    #[test]
    fn empty_policy_is_detected() {
        assert!(!only("last", 0).keeps_something());
        assert!(Keep::recommended().keeps_something());
        assert!(!Keep::default().keeps_something());
        assert!(only_count("yearly", Count::All).keeps_something());
        let within = |d| Keep {
            within: Some(std::time::Duration::from_secs(d)),
            ..Keep::default()
        };
        assert!(within(1).keeps_something());
        assert!(!within(0).keeps_something());
    }

    /// Two backups a day, at 02:00 and 14:00.
    fn twice_daily(days: i64) -> Vec<Candidate> {
        (0..days)
            .flat_map(|d| [(d, 14), (d, 2)])
            .map(|(d, h)| Candidate::new(&format!("b{d:03}-{h:02}"), at(d, h), true, at(0, 23)))
            .collect()
    }

    #[test]
    fn last_all_keeps_every_good_backup() {
        let c = twice_daily(10);
        let d = plan(&c, &only_count("last", Count::All));
        assert_eq!(kept(&d).len(), 20);
        assert!(d.iter().all(|d| d.reasons.contains(&"last".to_owned())));
    }

    #[test]
    fn daily_all_keeps_the_newest_of_every_day_and_the_oldest() {
        let d = plan(&twice_daily(10), &only_count("daily", Count::All));
        let k = kept(&d);
        assert_eq!(k.len(), 11, "{k:?}");
        assert!((0..10).all(|n| k.contains(&format!("b{n:03}-14").as_str())));
        assert_eq!(d[19].id, "b009-02");
        assert_eq!(d[19].reasons, ["daily (oldest; periods left)"]);
        // Failed backups still go once a newer good one exists.
        let mut c = twice_daily(10);
        c[5].good = false;
        assert!(!kept(&plan(&c, &only_count("daily", Count::All))).contains(&"b002-02"));
    }

    #[test]
    fn a_period_rule_with_periods_left_keeps_the_oldest_backup() {
        // restic >= 0.16: daily = 7 over 3 days of backups keeps each day's newest
        // and the oldest backup, so the policy reaches as far back as it can.
        let d = plan(&twice_daily(3), &only("daily", 7));
        assert_eq!(kept(&d), ["b000-14", "b001-14", "b002-14", "b002-02"]);
        // With no periods left, the oldest goes as before.
        let d = plan(&twice_daily(3), &only("daily", 3));
        assert_eq!(kept(&d), ["b000-14", "b001-14", "b002-14"]);
        // The oldest opening a period of its own is kept once, for that period.
        let d = plan(&daily_timeline(3, &[]), &only("daily", 7));
        assert_eq!(d[2].reasons, ["daily"]);
        // `last` is unchanged by the rule: it counts backups, not periods.
        assert_eq!(kept(&plan(&twice_daily(3), &only("last", 2))).len(), 2);
    }

    #[test]
    fn within_keeps_everything_near_the_newest_good_backup_not_near_now() {
        let mut c = daily_timeline(40, &[]);
        // The job stopped 10 days ago; what was made after is not good or not now.
        c.retain(|c| c.at <= at(10, 2));
        c.push(Candidate::new("failed", at(3, 2), false, at(0, 23)));
        c.push(Candidate::new("future", at(-2, 2), true, at(0, 23)));
        let keep = Keep {
            within: Some(std::time::Duration::from_secs(7 * 86_400)),
            ..Keep::default()
        };
        let d = plan(&c, &keep);
        let k = kept(&d);
        // Days 10 to 17: seven days before the newest good backup, both ends kept.
        assert_eq!(
            k,
            ["future", "failed", "b010", "b011", "b012", "b013", "b014", "b015", "b016", "b017"]
        );
        assert_eq!(d[2].reasons, ["within 7d"]);
        // A window beyond the calendar keeps everything rather than failing.
        let all = Keep {
            within: Some(std::time::Duration::from_secs(u64::MAX / 4)),
            ..Keep::default()
        };
        assert_eq!(kept(&plan(&c, &all)).len(), c.len());
    }

    #[test]
    fn reasons_name_the_rule_as_written() {
        use std::time::Duration as D;
        assert_eq!(short_duration(D::from_secs(14 * 86_400)), "14d");
        assert_eq!(short_duration(D::from_secs(36 * 3600)), "36h");
        assert_eq!(short_duration(D::from_secs(31_557_600)), "1y");
        assert_eq!(short_duration(D::from_secs(90)), "90s");
        let keep = Keep {
            within: Some(D::from_secs(36 * 3600)),
            ..Keep::default()
        };
        assert_eq!(
            plan(&daily_timeline(1, &[]), &keep)[0].reasons,
            ["within 36h"]
        );
    }

    mod oracle {
        //! `plan` against an oracle written from restic's documentation of `forget`
        //! (doc/060_forget.rst, and the 0.16 changelog for the oldest backup) rather
        //! than from `plan`: ranks and set sizes instead of one walk with counters,
        //! periods told apart by formatted labels instead of bucket tuples, the
        //! `within` window in whole seconds instead of chrono arithmetic. Inputs are
        //! random policies (counts, `all`, `within`) over random clocks and backups.

        use std::collections::{BTreeMap, BTreeSet};

        use chrono::TimeZone;
        use proptest::prelude::*;

        use super::super::*;

        /// The documented rules, one by one, over the backups that count.
        fn oracle(cands: &[Candidate], keep: &Keep) -> BTreeSet<String> {
            let mut out = BTreeSet::new();
            // Never deleted, whatever the policy: dated in the future, made by this
            // run, or an id that another manifest claims too.
            for c in cands {
                if c.future || c.just_made || c.claimed_twice {
                    out.insert(c.id.clone());
                }
            }
            // The newest good pre-migration backup: no other good pre-migration
            // backup is newer (ties broken by id, as everywhere).
            for c in cands.iter().filter(|c| c.good && c.pre_migration) {
                let beaten = cands
                    .iter()
                    .any(|o| o.good && o.pre_migration && (o.at, &o.id) > (c.at, &c.id));
                if !beaten {
                    out.insert(c.id.clone());
                }
            }
            // A failed backup stays until a good one (dated now or earlier) is newer.
            let newest_good = cands
                .iter()
                .filter(|c| c.good && !c.future)
                .map(|c| c.at)
                .max();
            for c in cands.iter().filter(|c| !c.good) {
                if newest_good.is_none_or(|t| c.at > t) {
                    out.insert(c.id.clone());
                }
            }
            // The backups the rules choose from.
            let counted: Vec<&Candidate> = cands
                .iter()
                .filter(|c| c.good && !c.future && !c.claimed_twice)
                .collect();
            let newer = |a: &Candidate, b: &Candidate| (a.at, &a.id) > (b.at, &b.id);
            let within_n = |count: Count, rank: usize| match count {
                Count::All => true,
                Count::Limited(n) => rank < n as usize,
            };
            let Some(newest) = counted
                .iter()
                .copied()
                .reduce(|a, b| if newer(a, b) { a } else { b })
            else {
                return out;
            };
            let oldest = counted
                .iter()
                .copied()
                .reduce(|a, b| if newer(a, b) { b } else { a });
            // The newest good backup, always.
            out.insert(newest.id.clone());
            // --keep-last n: a backup with fewer than n newer ones.
            for c in &counted {
                let rank = counted.iter().filter(|o| newer(o, c)).count();
                if within_n(keep.last, rank) {
                    out.insert(c.id.clone());
                }
            }
            // --keep-within d: made at most d before the newest backup.
            if let Some(d) = keep.within {
                let d = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                for c in &counted {
                    if c.at.timestamp() >= newest.at.timestamp().saturating_sub(d) {
                        out.insert(c.id.clone());
                    }
                }
            }
            // --keep-{hourly,…} n: the newest backup of each of the n newest periods
            // that have one; if fewer than n periods have one, the oldest backup too.
            let labels: [(Count, &str); 5] = [
                (keep.hourly, "%Y-%m-%d %H"),
                (keep.daily, "%Y-%m-%d"),
                (keep.weekly, "%G-W%V"),
                (keep.monthly, "%Y-%m"),
                (keep.yearly, "%Y"),
            ];
            for (count, label) in labels {
                if count == Count::Limited(0) {
                    continue;
                }
                let mut periods: BTreeMap<String, &Candidate> = BTreeMap::new();
                for c in &counted {
                    let e = periods.entry(c.at.format(label).to_string()).or_insert(c);
                    if newer(c, e) {
                        *e = c;
                    }
                }
                for p in periods.values() {
                    let rank = periods.values().filter(|o| o.at > p.at).count();
                    if within_n(count, rank) {
                        out.insert(p.id.clone());
                    }
                }
                if within_n(count, periods.len()) {
                    if let Some(o) = oldest {
                        out.insert(o.id.clone());
                    }
                }
            }
            out
        }

        fn count() -> impl Strategy<Value = Count> {
            prop_oneof![
                3 => Just(Count::Limited(0)),
                4 => (1u32..6).prop_map(Count::Limited),
                1 => Just(Count::All),
            ]
        }

        /// Seconds before `now` (negative: after it), at every scale rotation has;
        /// whole hours and days too, as schedules make them, so that backups fall
        /// exactly on `within`'s edge.
        fn offset() -> impl Strategy<Value = i64> {
            prop_oneof![
                2 => (0i64..72).prop_map(|h| h * 3600),
                2 => (0i64..60).prop_map(|d| d * 86_400),
                3 => 0i64..3 * 3600,
                3 => 0i64..3 * 86_400,
                3 => 0i64..90 * 86_400,
                2 => 0i64..4 * 366 * 86_400,
                1 => -86_400i64..0,
            ]
        }

        fn within() -> impl Strategy<Value = Option<std::time::Duration>> {
            prop_oneof![
                2 => Just(None),
                1 => (1u64..48).prop_map(|h| Some(std::time::Duration::from_secs(h * 3600))),
                1 => (1u64..60).prop_map(|d| Some(std::time::Duration::from_secs(d * 86_400))),
                1 => (1u64..10_000_000).prop_map(|s| Some(std::time::Duration::from_secs(s))),
            ]
        }

        prop_compose! {
            fn policy()(
                c in proptest::array::uniform6(count()),
                within in within(),
            ) -> Keep {
                Keep {
                    last: c[0], hourly: c[1], daily: c[2], weekly: c[3], monthly: c[4],
                    yearly: c[5], within,
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn plan_follows_the_documented_rules(
                // Any clock from 1971 to 2200: period edges (years, ISO weeks that
                // straddle a year) fall where they may.
                now_secs in 40_000_000i64..7_258_118_400,
                backups in proptest::collection::vec(
                    (offset(), prop::bool::weighted(0.8), prop::bool::weighted(0.05), prop::bool::weighted(0.05), prop::bool::weighted(0.15)),
                    0..24,
                ),
                keep in policy(),
                bigger in (0usize..7, count()),
            ) {
                let now = Utc.timestamp_opt(now_secs, 0).single().unwrap_or_default();
                let cands: Vec<Candidate> = backups
                    .iter()
                    .enumerate()
                    .map(|(i, &(off, good, twice, just_made, pre_migration))| Candidate {
                        just_made,
                        claimed_twice: twice,
                        pre_migration,
                        ..Candidate::new(&format!("c{i:02}"), now - chrono::Duration::seconds(off), good, now)
                    })
                    .collect();
                let decisions = plan(&cands, &keep);
                prop_assert_eq!(decisions.len(), cands.len());
                let got: BTreeSet<String> =
                    decisions.iter().filter(|d| d.keep).map(|d| d.id.clone()).collect();
                prop_assert_eq!(&got, &oracle(&cands, &keep), "policy {:?}", keep);
                for d in &decisions {
                    prop_assert_eq!(d.keep, !d.reasons.is_empty());
                }
                if let Some(w) = keep.within {
                    let why = format!("within {}", short_duration(w));
                    let newest = cands.iter().filter(|c| c.good && !c.future && !c.claimed_twice).map(|c| c.at).max();
                    for (c, d) in cands.iter().filter_map(|c| Some((c, decisions.iter().find(|d| d.id == c.id)?))) {
                        let inside = c.good && !c.future && !c.claimed_twice
                            && newest.is_some_and(|t| t - c.at <= chrono::TimeDelta::from_std(w).unwrap_or(chrono::TimeDelta::MAX));
                        prop_assert_eq!(d.reasons.contains(&why), inside, "{}: {:?}", c.id, d.reasons);
                    }
                }
                // Keeping more never deletes more: raise one rule and nothing kept goes.
                let (rule, raised) = bigger;
                let mut more = keep;
                let up = |c: Count| match (c, raised) {
                    (Count::Limited(a), Count::Limited(b)) => Count::Limited(a + b),
                    _ => Count::All,
                };
                match rule {
                    0 => more.last = up(more.last),
                    1 => more.hourly = up(more.hourly),
                    2 => more.daily = up(more.daily),
                    3 => more.weekly = up(more.weekly),
                    4 => more.monthly = up(more.monthly),
                    5 => more.yearly = up(more.yearly),
                    _ => more.within = Some(keep.within.unwrap_or_default() + std::time::Duration::from_secs(3600)),
                }
                let wider: BTreeSet<String> =
                    plan(&cands, &more).into_iter().filter(|d| d.keep).map(|d| d.id).collect();
                prop_assert!(got.is_subset(&wider), "{:?} kept less than {:?}", more, keep);
            }
        }
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
            /// Recorded as verified, then damaged past its first segment (bit rot, or
            /// an attacker with write access): only a full read finds it.
            Rotten,
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
                sealed: None,
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
            if matches!(sort, Sort::Failed | Sort::Rotten) {
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
                files: None,
                with_files: Vec::new(),
                writer: None,
                taken_with: None,
                rewrapped: None,
            };
            let json = serde_json::to_vec_pretty(&m).unwrap();
            std::fs::write(dest.path(&format!("{file_id}{MANIFEST}")), json).unwrap();
        }

        /// Adversary round 5, case 04: a newest backup that rotted after it was
        /// verified must not be what makes the last readable backup redundant.
        #[test]
        fn a_rotten_newest_backup_never_costs_the_last_readable_one() {
            let root = tempfile::tempdir().unwrap();
            let key = Key::random().unwrap();
            let now = Utc::now();
            let dest = Destination::new(root.path(), "app");
            dest.prepare().unwrap();
            let (older, newer) = (
                now - chrono::Duration::hours(2),
                now - chrono::Duration::hours(1),
            );
            let (good, rotten) = (id_at(older), id_at(newer));
            write(&dest, &good, &good, older, Sort::Good, &key);
            write(&dest, &rotten, &rotten, newer, Sort::Rotten, &key);
            let policy = TrustPolicy {
                database: "app".to_owned(),
                backend: None,
                keys: KeyRing::new(vec![key.clone()]),
                encrypting: true,
                current_key: Some(key.id().to_owned()),
                allow_unencrypted: false,
                current_key_since: None,
                boundary_remembered: false,
                writer: None,
            };
            let keep = super::only("last", 1);
            let manifest = |id: &str| dest.path(&format!("{id}{MANIFEST}"));
            for dry_run in [true, false] {
                let r = rotate(
                    &dest,
                    &policy,
                    &keep,
                    now,
                    None,
                    &Default::default(),
                    dry_run,
                )
                .unwrap();
                assert!(r.decisions.iter().all(|d| d.keep), "{:?}", r.decisions);
                let why = &r.decisions.iter().find(|d| d.id == rotten).unwrap().reasons;
                assert!(
                    why.iter().any(|w| w.contains("did not read whole")),
                    "{why:?}"
                );
                assert!(manifest(&good).exists() && manifest(&rotten).exists());
            }
            // A new backup (read whole as it was written) makes both redundant: the
            // damaged one is not what protects anything any more.
            let made = id_at(now);
            write(&dest, &made, &made, now, Sort::Good, &key);
            rotate(
                &dest,
                &policy,
                &keep,
                now,
                Some(&made),
                &Default::default(),
                false,
            )
            .unwrap();
            assert!(manifest(&made).exists());
            assert!(!manifest(&good).exists() && !manifest(&rotten).exists());
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
                counts in proptest::array::uniform6(prop_oneof![
                    4 => (0u32..4).prop_map(Count::Limited),
                    1 => Just(Count::All),
                ]),
                within in proptest::option::weighted(0.3, (1u64..2000).prop_map(|h| std::time::Duration::from_secs(h * 3600))),
                // Rotation's clock, not the machine's: periods and windows must not
                // depend on when the test runs.
                shift_days in -2000i64..2000,
            ) {
                let keep = Keep {
                    last: counts[0], hourly: counts[1], daily: counts[2],
                    weekly: counts[3], monthly: counts[4], yearly: counts[5], within,
                };
                let root = tempfile::tempdir().unwrap();
                let key = Key::random().unwrap();
                let now = Utc::now() + chrono::Duration::days(shift_days);
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
                // Backups a failed migration named (see `pins`): never deleted,
                // whatever the policy and whatever they are.
                let pinned: std::collections::BTreeMap<String, String> = genuine
                    .iter()
                    .skip(1)
                    .step_by(3)
                    .map(|id| (id.clone(), "pinned".to_owned()))
                    .collect();
                protected.extend(pinned.keys().cloned());
                let before = files(root.path());
                let policy = TrustPolicy {
                    database: "app".to_owned(),
                    backend: None,
                    keys: crate::repo::archive::KeyRing::new(vec![key.clone()]),
                    encrypting: true,
                    current_key: Some(key.id().to_owned()),
                    allow_unencrypted: false,
                    current_key_since: None,
                    boundary_remembered: false,
                writer: None,
                };
                rotate(&dest, &policy, &keep, now, just_made.then_some(made.as_str()), &pinned, false).unwrap();
                rotate(&twin, &policy, &keep, now, just_made.then_some(made.as_str()), &pinned, false).unwrap();
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
                // reading confirms goes once a newer good one exists, unless pinned.
                let newest_good = good_ids.iter().map(|(at, _)| *at).max();
                for (at, id) in &damaged {
                    if newest_good.is_some_and(|t| *at < t) && !pinned.contains_key(id) {
                        prop_assert!(!after.contains(&format!("app/{id}{MANIFEST}")), "damaged {id} kept");
                    }
                }
            }
        }
    }
}

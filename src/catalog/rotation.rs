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
//! appears twice.

use std::collections::BTreeMap;
use std::io;

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::Deserialize;

use super::TrustPolicy;
use crate::storage::Destination;

/// `keep` in the backup config. A rule left out of a written `keep` table is 0; the
/// policy of [`Keep::recommended`] applies only when `keep` is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Keep {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl Keep {
    /// 3 most recent, 7 daily, 4 weekly, 12 monthly.
    pub fn recommended() -> Self {
        Keep {
            last: 3,
            hourly: 0,
            daily: 7,
            weekly: 4,
            monthly: 12,
            yearly: 0,
        }
    }

    /// A policy that would keep nothing is refused at config load.
    pub fn keeps_something(&self) -> bool {
        self.counts().iter().any(|&n| n > 0)
    }

    /// The six counts, in the order last, hourly, daily, weekly, monthly, yearly.
    pub fn counts(&self) -> [u32; 6] {
        [
            self.last,
            self.hourly,
            self.daily,
            self.weekly,
            self.monthly,
            self.yearly,
        ]
    }
}

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
    let duplicate = |c: &Candidate| seen.get(c.id.as_str()).is_some_and(|&n| n > 1);
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
    let newest_good = good.first().map(|c| c.at);
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

/// What [`rotate`] found and did.
#[derive(Debug, Clone, Default)]
pub struct Rotation {
    /// Every trusted backup's verdict, newest first.
    pub decisions: Vec<Decision>,
    /// Ids of trusted backups dated in the future.
    pub future: Vec<String>,
    /// Manifests that were not believed (and so were left alone).
    pub untrusted: Vec<super::Rejected>,
}

/// Applies `keep` to the trusted backups in `dest` (or, with `dry_run`, only
/// decides). `just_made` is the id of the backup the calling run wrote, if any.
pub fn rotate(
    dest: &Destination,
    policy: &TrustPolicy,
    keep: &Keep,
    now: DateTime<Utc>,
    just_made: Option<&str>,
    dry_run: bool,
) -> io::Result<Rotation> {
    let listing = super::list(dest, policy)?;
    let candidates: Vec<Candidate> = listing
        .backups
        .iter()
        .map(|m| Candidate {
            just_made: just_made == Some(m.id.as_str()),
            ..Candidate::new(&m.id, m.started_at, m.is_good(), now)
        })
        .collect();
    let decisions = plan(&candidates, keep);
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
            dest.remove_backup(&d.id)?;
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
        });
        c.push(Candidate {
            id: "b001-late".into(),
            at: at(1, 23),
            good: true,
            future: false,
            just_made: false,
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
}

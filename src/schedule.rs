//! When jobs run: parsing of `schedule` strings and calendar arithmetic.
//!
//! Next run times are always computed from the job's IANA time zone at the moment
//! they are needed, never from a UTC offset captured earlier, so a daily 02:30 job
//! stays at 02:30 local time across daylight-saving changes (tokio-cron-scheduler's
//! own time-zone support freezes the offset when a job is created; the
//! [`crate::scheduler`] only uses it as a timer for instants computed here).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use croner::Cron;
use serde::Deserialize;

/// A parsed `schedule` value.
#[derive(Clone, Deserialize)]
#[serde(try_from = "String")]
pub struct Schedule {
    text: String,
    kind: ScheduleKind,
}

#[derive(Clone)]
enum ScheduleKind {
    Cron(Box<Cron>),
    Every(Duration),
    /// `every <d>` in a cluster: slots on a grid counted from the Unix epoch, so that
    /// every replica computes the same fire times (see [`Schedule::on_grid`]).
    Grid(Duration),
    Startup,
    Manual,
}

impl Schedule {
    /// `every <d>`, for a default written in code.
    pub fn every(d: Duration) -> Self {
        Schedule {
            text: format!("every {}", humantime::format_duration(d)),
            kind: ScheduleKind::Every(d),
        }
    }

    /// The schedule as written in the config.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True for `@startup`: the job runs once each time the daemon starts.
    pub fn is_startup(&self) -> bool {
        matches!(self.kind, ScheduleKind::Startup)
    }

    /// The same schedule with `every <d>` slots fixed on a grid counted from the Unix
    /// epoch (multiples of `d`) instead of following the previous run. Replicas use it:
    /// the fire time is the key of a claim, so every replica must compute the same
    /// instants, whenever each started. Other schedules are returned unchanged.
    pub fn on_grid(&self) -> Self {
        match &self.kind {
            ScheduleKind::Every(d) => Schedule {
                text: self.text.clone(),
                kind: ScheduleKind::Grid(*d),
            },
            _ => self.clone(),
        }
    }

    /// The latest slot at or before `now` (at most a few hundred slots back are
    /// searched): the fire time a missed run stands for. `None` if not periodic.
    pub fn last_slot_until(&self, now: DateTime<Utc>, tz: &TimeZone) -> Option<DateTime<Utc>> {
        match &self.kind {
            ScheduleKind::Grid(d) => grid_floor(now, *d),
            ScheduleKind::Every(_) => Some(now),
            ScheduleKind::Cron(_) => {
                let interval = chrono::Duration::from_std(self.expected_interval(now, tz)?).ok()?;
                let mut slot = self.next_after(now.checked_sub_signed(interval * 2)?, tz)?;
                if slot > now {
                    return None;
                }
                for _ in 0..1000 {
                    match self.next_after(slot, tz) {
                        Some(next) if next <= now => slot = next,
                        _ => break,
                    }
                }
                Some(slot)
            }
            ScheduleKind::Startup | ScheduleKind::Manual => None,
        }
    }

    /// True for `every <duration>`, whose slots follow the previous run.
    pub fn is_every(&self) -> bool {
        matches!(self.kind, ScheduleKind::Every(_))
    }

    /// The first run time strictly after `after`, or `None` for schedules that are
    /// not periodic (`@startup`, `manual`).
    pub fn next_after(&self, after: DateTime<Utc>, tz: &TimeZone) -> Option<DateTime<Utc>> {
        match &self.kind {
            // Cron slots are whole seconds; croner would carry `after`'s fraction over.
            ScheduleKind::Cron(cron) => cron
                .find_next_occurrence(&after.trunc_subsecs(0).with_timezone(&tz.0), false)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
            ScheduleKind::Every(d) => chrono::Duration::from_std(*d)
                .ok()
                .and_then(|d| after.checked_add_signed(d)),
            ScheduleKind::Grid(d) => grid_floor(after, *d)
                .and_then(|t| t.checked_add_signed(chrono::Duration::from_std(*d).ok()?)),
            ScheduleKind::Startup | ScheduleKind::Manual => None,
        }
    }

    /// The slot to arm after a run due at `fired_at` started when the clock said `now`.
    ///
    /// Counting from the later of the two means: a timer that fired a little early, or a
    /// clock set back after the run, never repeats the slot (no double run); a clock set
    /// forward past slots makes the due run start late, once, and continues with the
    /// first slot after the new time (no burst of catch-up runs).
    pub fn next_fire(
        &self,
        fired_at: DateTime<Utc>,
        now: DateTime<Utc>,
        tz: &TimeZone,
    ) -> Option<DateTime<Utc>> {
        self.next_after(fired_at.max(now), tz)
    }

    /// The next `n` run times after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, tz: &TimeZone, n: usize) -> Vec<DateTime<Utc>> {
        std::iter::successors(self.next_after(after, tz), |t| self.next_after(*t, tz))
            .take(n)
            .collect()
    }

    /// The usual gap between two runs, as seen from `now`: the distance between the
    /// next two run times. `None` for schedules that are not periodic.
    pub fn expected_interval(&self, now: DateTime<Utc>, tz: &TimeZone) -> Option<Duration> {
        if let ScheduleKind::Every(d) | ScheduleKind::Grid(d) = self.kind {
            return Some(d);
        }
        let first = self.next_after(now, tz)?;
        let second = self.next_after(first, tz)?;
        (second - first).to_std().ok()
    }
}

/// The multiple of `step` (counted in milliseconds from the Unix epoch) at or before `t`.
fn grid_floor(t: DateTime<Utc>, step: Duration) -> Option<DateTime<Utc>> {
    let step = i64::try_from(step.as_millis()).ok().filter(|s| *s > 0)?;
    let ms = t.timestamp_millis();
    DateTime::from_timestamp_millis(ms - ms.rem_euclid(step))
}

impl FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let kind = match text {
            "@startup" => ScheduleKind::Startup,
            "manual" => ScheduleKind::Manual,
            _ => {
                if let Some(every) = text.strip_prefix("every ") {
                    let d = humantime::parse_duration(every.trim()).map_err(|e| {
                        format!(
                            "invalid duration in schedule \"{text}\": {e}; write e.g. \"every 6h\""
                        )
                    })?;
                    if d < Duration::from_secs(1) {
                        return Err(format!(
                            "schedule \"{text}\" is shorter than one second; use at least \"every 1s\""
                        ));
                    }
                    if d > Duration::from_secs(10 * 366 * 86_400) {
                        return Err(format!(
                            "schedule \"{text}\" is longer than ten years; use \"manual\" for a job that only runs by hand"
                        ));
                    }
                    ScheduleKind::Every(d)
                } else {
                    let fields = text.split_whitespace().count();
                    if !text.starts_with('@') && !(5..=6).contains(&fields) {
                        return Err(format!(
                            "invalid schedule \"{text}\": a cron expression has 5 fields (minute first) or 6 (seconds first); \
                             or use @hourly, @daily, @weekly, @monthly, \"every 6h\", @startup or manual"
                        ));
                    }
                    let cron = Cron::from_str(text).map_err(|e| {
                        format!(
                            "invalid schedule \"{text}\": {e}; write a 5- or 6-field cron expression, @hourly, @daily, \
                             @weekly, @monthly, \"every 6h\", @startup or manual"
                        )
                    })?;
                    ScheduleKind::Cron(Box::new(cron))
                }
            }
        };
        Ok(Schedule {
            text: text.to_owned(),
            kind,
        })
    }
}

impl TryFrom<String> for Schedule {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.text)
    }
}

/// An IANA time zone from the config (`timezone = "Europe/Berlin"`); UTC by default.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub struct TimeZone(pub chrono_tz::Tz);

impl Default for TimeZone {
    fn default() -> Self {
        TimeZone(chrono_tz::UTC)
    }
}

impl TryFrom<String> for TimeZone {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse::<chrono_tz::Tz>().map(TimeZone).map_err(|_| {
            format!(
                "unknown time zone \"{s}\"; use an IANA name such as \"UTC\" or \"Europe/Berlin\""
            )
        })
    }
}

impl fmt::Display for TimeZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    fn berlin() -> TimeZone {
        TimeZone("Europe/Berlin".parse().unwrap())
    }

    #[test]
    fn replicas_put_every_slots_on_the_epoch_grid() {
        let tz = TimeZone::default();
        let every: Schedule = "every 5s".parse().unwrap();
        let grid = every.on_grid();
        assert!(
            !grid.is_every(),
            "grid slots do not follow the previous run"
        );
        // Whenever a replica looks, it names the same slots: multiples of 5 s.
        let a = utc(2026, 12, 6, 10, 0, 1) + chrono::Duration::milliseconds(250);
        let b = utc(2026, 12, 6, 10, 0, 4) + chrono::Duration::milliseconds(999);
        assert_eq!(grid.next_after(a, &tz), Some(utc(2026, 12, 6, 10, 0, 5)));
        assert_eq!(grid.next_after(b, &tz), Some(utc(2026, 12, 6, 10, 0, 5)));
        // A slot itself is not "after" itself.
        let slot = utc(2026, 12, 6, 10, 0, 5);
        assert_eq!(
            grid.next_after(slot, &tz),
            Some(utc(2026, 12, 6, 10, 0, 10))
        );
        assert_eq!(grid.expected_interval(a, &tz), Some(Duration::from_secs(5)));
        // A single daemon's `every` follows the previous run instead.
        assert_eq!(
            every.next_after(a, &tz),
            Some(a + chrono::Duration::seconds(5))
        );
        // Cron schedules are the same on every replica already.
        let cron: Schedule = "0 */15 * * * *".parse().unwrap();
        assert_eq!(cron.on_grid().next_after(a, &tz), cron.next_after(a, &tz));
    }

    #[test]
    fn the_missed_slot_is_the_latest_one_at_or_before_now() {
        let tz = TimeZone::default();
        let now = utc(2026, 12, 6, 10, 7, 3);
        let grid = "every 5m".parse::<Schedule>().unwrap().on_grid();
        assert_eq!(
            grid.last_slot_until(now, &tz),
            Some(utc(2026, 12, 6, 10, 5, 0))
        );
        let cron: Schedule = "0 0 */6 * * *".parse().unwrap();
        assert_eq!(
            cron.last_slot_until(now, &tz),
            Some(utc(2026, 12, 6, 6, 0, 0))
        );
        let exact = utc(2026, 12, 6, 12, 0, 0);
        assert_eq!(cron.last_slot_until(exact, &tz), Some(exact));
        let startup: Schedule = "@startup".parse().unwrap();
        assert_eq!(startup.last_slot_until(now, &tz), None);
    }

    #[test]
    fn six_field_cron_has_seconds_first() {
        let s: Schedule = "30 0 2 * * *".parse().unwrap();
        let next = s.next_after(utc(2026, 1, 1, 0, 0, 0), &TimeZone::default());
        assert_eq!(next, Some(utc(2026, 1, 1, 2, 0, 30)));
    }

    #[test]
    fn cron_slots_are_whole_seconds() {
        let s: Schedule = "*/5 * * * * *".parse().unwrap();
        let after = utc(2026, 1, 1, 0, 0, 5) + chrono::Duration::milliseconds(793);
        assert_eq!(
            s.next_after(after, &TimeZone::default()),
            Some(utc(2026, 1, 1, 0, 0, 10))
        );
    }

    #[test]
    fn five_field_cron_has_minutes_first() {
        let s: Schedule = "30 3 * * *".parse().unwrap();
        let next = s.next_after(utc(2026, 1, 1, 4, 0, 0), &TimeZone::default());
        assert_eq!(next, Some(utc(2026, 1, 2, 3, 30, 0)));
    }

    #[test]
    fn nicknames_and_intervals() {
        let start = utc(2026, 1, 7, 10, 15, 0); // a Wednesday
        let tz = TimeZone::default();
        let next = |s: &str| s.parse::<Schedule>().unwrap().next_after(start, &tz);
        assert_eq!(next("@hourly"), Some(utc(2026, 1, 7, 11, 0, 0)));
        assert_eq!(next("@daily"), Some(utc(2026, 1, 8, 0, 0, 0)));
        assert_eq!(next("@weekly"), Some(utc(2026, 1, 11, 0, 0, 0)));
        assert_eq!(next("@monthly"), Some(utc(2026, 2, 1, 0, 0, 0)));
        assert_eq!(next("every 6h"), Some(utc(2026, 1, 7, 16, 15, 0)));
        assert_eq!(next("every 90s"), Some(utc(2026, 1, 7, 10, 16, 30)));
        assert_eq!(next("@startup"), None);
        assert_eq!(next("manual"), None);
    }

    #[test]
    fn bad_schedules_are_rejected_with_a_hint() {
        for bad in [
            "",
            "* * *",
            "61 * * * *",
            "every",
            "every 6 parsecs",
            "@fortnightly",
            "every 0s",
        ] {
            let err = bad
                .parse::<Schedule>()
                .err()
                .unwrap_or_else(|| panic!("{bad:?} was accepted"));
            assert!(
                err.contains("schedule") || err.contains("duration"),
                "{err}"
            );
        }
    }

    #[test]
    fn expected_interval_follows_the_schedule() {
        let tz = TimeZone::default();
        let now = utc(2026, 5, 1, 12, 0, 0);
        let interval = |s: &str| s.parse::<Schedule>().unwrap().expected_interval(now, &tz);
        assert_eq!(interval("0 */15 * * * *"), Some(Duration::from_secs(900)));
        assert_eq!(interval("@daily"), Some(Duration::from_secs(86_400)));
        assert_eq!(interval("every 6h"), Some(Duration::from_secs(21_600)));
        assert_eq!(interval("@startup"), None);
    }

    /// Created in winter, a daily 02:30 Berlin job must move from 01:30Z to 00:30Z at
    /// the spring change, run exactly once on the short night, and exactly once on the
    /// long autumn night when 02:30 happens twice.
    #[test]
    fn daily_job_keeps_local_time_across_dst() {
        let s: Schedule = "0 30 2 * * *".parse().unwrap();
        let tz = berlin();
        let runs = s.upcoming(utc(2026, 3, 27, 12, 0, 0), &tz, 4);
        assert_eq!(runs[0], utc(2026, 3, 28, 1, 30, 0)); // CET, +01:00
                                                         // 29 March 02:00 -> 03:00: 02:30 does not exist; one run in the gap's wake.
        assert_eq!(
            runs[1].date_naive(),
            chrono::NaiveDate::from_ymd_opt(2026, 3, 29).unwrap()
        );
        assert!(runs[1] >= utc(2026, 3, 29, 1, 0, 0) && runs[1] <= utc(2026, 3, 29, 1, 30, 0));
        assert_eq!(runs[2], utc(2026, 3, 30, 0, 30, 0)); // CEST, +02:00
        assert_eq!(runs[3], utc(2026, 3, 31, 0, 30, 0));

        let autumn = s.upcoming(utc(2026, 10, 24, 12, 0, 0), &tz, 3);
        assert_eq!(autumn[0], utc(2026, 10, 25, 0, 30, 0)); // first 02:30 (CEST)
        assert_eq!(autumn[1], utc(2026, 10, 26, 1, 30, 0)); // not the repeated 02:30 CET
        assert_eq!(autumn[2], utc(2026, 10, 27, 1, 30, 0));
    }

    #[test]
    fn next_is_computed_with_the_offset_of_its_own_date() {
        // Asked in January, the July run is still at 02:30 summer time.
        let s: Schedule = "0 30 2 1 7 *".parse().unwrap();
        let next = s.next_after(utc(2026, 1, 15, 0, 0, 0), &berlin());
        assert_eq!(next, Some(utc(2026, 7, 1, 0, 30, 0)));
    }

    /// Simulates the daemon's timer with a wall clock that jumps: each step is the
    /// time the timer observes when the armed slot fires. Returns the slots that ran.
    fn simulate(
        s: &Schedule,
        tz: &TimeZone,
        start: DateTime<Utc>,
        observed: impl Fn(DateTime<Utc>) -> DateTime<Utc>,
        steps: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut armed = s.next_after(start, tz).unwrap();
        let mut ran = Vec::new();
        for _ in 0..steps {
            let now = observed(armed);
            ran.push(armed);
            armed = s.next_fire(armed, now, tz).unwrap();
        }
        ran
    }

    #[test]
    fn clock_set_back_after_a_run_does_not_repeat_it() {
        let s: Schedule = "0 0 2 * * *".parse().unwrap();
        let tz = TimeZone::default();
        // The timer fires a second early, and after the run the clock is set back 1 h.
        let ran = simulate(
            &s,
            &tz,
            utc(2026, 1, 1, 0, 0, 0),
            |slot| slot - chrono::Duration::hours(1),
            5,
        );
        let days: Vec<u32> = ran.iter().map(chrono::Datelike::day).collect();
        assert_eq!(days, [1, 2, 3, 4, 5], "one run per day, none repeated");
        let early = s.next_fire(utc(2026, 1, 1, 2, 0, 0), utc(2026, 1, 1, 1, 59, 59), &tz);
        assert_eq!(
            early,
            Some(utc(2026, 1, 2, 2, 0, 0)),
            "an early timer does not re-arm the same slot"
        );
    }

    #[test]
    fn clock_set_forward_runs_the_due_slot_once_then_resumes() {
        let s: Schedule = "0 0 2 * * *".parse().unwrap();
        let tz = TimeZone::default();
        // On Jan 2 the clock jumps forward by 30 h while the 02:00 slot is armed.
        let jumped = |slot: DateTime<Utc>| {
            if slot == utc(2026, 1, 2, 2, 0, 0) {
                slot + chrono::Duration::hours(30)
            } else {
                slot
            }
        };
        let ran = simulate(&s, &tz, utc(2026, 1, 1, 0, 0, 0), jumped, 4);
        // Jan 2's run happens (late, once); Jan 3's slot was jumped over; then Jan 4, 5.
        assert_eq!(
            ran,
            [
                utc(2026, 1, 1, 2, 0, 0),
                utc(2026, 1, 2, 2, 0, 0),
                utc(2026, 1, 4, 2, 0, 0),
                utc(2026, 1, 5, 2, 0, 0)
            ]
        );
    }

    #[test]
    fn a_year_of_berlin_nights_runs_once_per_local_day() {
        let s: Schedule = "0 30 2 * * *".parse().unwrap();
        let tz = berlin();
        let ran = simulate(&s, &tz, utc(2026, 1, 1, 0, 0, 0), |slot| slot, 365);
        let mut days: Vec<chrono::NaiveDate> = ran
            .iter()
            .map(|t| t.with_timezone(&tz.0).date_naive())
            .collect();
        days.dedup();
        assert_eq!(
            days.len(),
            365,
            "every local day exactly once, DST nights included"
        );
    }

    #[test]
    fn unknown_time_zone_is_rejected() {
        let err = TimeZone::try_from("Mars/Olympus".to_owned()).unwrap_err();
        assert!(err.contains("Mars/Olympus"));
    }
}

//! How a retention rule reads time out of its column, and the cutoff it compares with.
//!
//! Both backends build their SQL from these values, so the semantics in the README's
//! time table live in one place: what a value means ([`Reading`]), which values are
//! readable at all (the ranges below), and the cutoff's exact forms ([`Cutoff`]),
//! always whole milliseconds so that every backend compares the same instant.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::EpochUnit;

/// Earliest readable time: 0001-01-01T00:00:00Z, in unix seconds.
pub const MIN_SECONDS: i64 = -62_135_596_800;
/// Latest readable time: 9999-12-31T23:59:59Z, in unix seconds.
pub const MAX_SECONDS: i64 = 253_402_300_799;

/// What the values of a retention column mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// PostgreSQL `timestamptz`: instants.
    Instant,
    /// PostgreSQL `timestamp`: wall-clock values in this zone (ambiguous times in a
    /// DST fall-back hour read as the later instant, as PostgreSQL reads them).
    WallClock { zone: String },
    /// PostgreSQL `date`: the midnight that starts the day, in this zone.
    Date { zone: String },
    /// PostgreSQL numbers: `unit`s since 1970-01-01 UTC.
    Epoch { unit: EpochUnit, integer: bool },
    /// SQLite: per value. Integers are `unit`s since 1970; reals are julian days, or
    /// unix seconds when outside the julian range (SQLite's `'auto'`); text is ISO-8601
    /// starting with `YYYY-MM-DD`, as SQLite's date functions parse it (no offset:
    /// UTC). Anything else is unreadable.
    SqliteValue { unit: EpochUnit },
}

impl Reading {
    /// Integer values outside this range are not a time in `unit`.
    pub fn integer_range(unit: EpochUnit) -> (i64, i64) {
        let k = unit.per_second();
        (MIN_SECONDS * k, MAX_SECONDS * k + (k - 1))
    }
}

impl fmt::Display for Reading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reading::Instant => write!(f, "timestamptz"),
            Reading::WallClock { zone } => write!(f, "timestamp in {zone}"),
            Reading::Date { zone } => write!(f, "date in {zone}"),
            Reading::Epoch { unit, .. } => write!(f, "unix {}", unit.as_str()),
            Reading::SqliteValue { unit } => {
                write!(f, "SQLite values (integers: unix {})", unit.as_str())
            }
        }
    }
}

/// The instant before which a row is expired, truncated to whole milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutoff {
    ms: i64,
}

impl Cutoff {
    /// `now - older_than`; `None` if that is before year 1 (config bounds prevent it).
    pub fn before(now: DateTime<Utc>, older_than: Duration) -> Option<Self> {
        let ms = now
            .timestamp_millis()
            .checked_sub(i64::try_from(older_than.as_millis()).ok()?)?;
        (ms >= MIN_SECONDS * 1000).then_some(Cutoff { ms })
    }

    pub fn instant(self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.ms).unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// `'2026-11-22T10:00:00.123Z'`, an SQL string literal.
    pub fn iso_literal(self) -> String {
        format!("'{}'", self.instant().format("%Y-%m-%dT%H:%M:%S%.3fZ"))
    }

    /// The cutoff in `unit`s as an exact decimal, e.g. `1732262400.123` (seconds).
    pub fn exact(self, unit: EpochUnit) -> String {
        match unit {
            EpochUnit::S => {
                let sign = if self.ms < 0 { "-" } else { "" };
                let abs = self.ms.unsigned_abs();
                format!("{sign}{}.{:03}", abs / 1000, abs % 1000)
            }
            EpochUnit::Ms => self.ms.to_string(),
            EpochUnit::Us => (i128::from(self.ms) * 1000).to_string(),
        }
    }

    /// The smallest whole number of `unit`s not before the cutoff: an integer value
    /// `v` is before the cutoff exactly when `v < integer_bound`.
    pub fn integer_bound(self, unit: EpochUnit) -> i64 {
        match unit {
            EpochUnit::S => -((-self.ms).div_euclid(1000)),
            EpochUnit::Ms => self.ms,
            EpochUnit::Us => self.ms.saturating_mul(1000),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cutoff(ms: i64) -> Cutoff {
        Cutoff { ms }
    }

    #[test]
    fn exact_and_integer_forms() {
        let c = cutoff(1_732_262_400_123);
        assert_eq!(c.exact(EpochUnit::S), "1732262400.123");
        assert_eq!(c.exact(EpochUnit::Ms), "1732262400123");
        assert_eq!(c.exact(EpochUnit::Us), "1732262400123000");
        assert_eq!(c.integer_bound(EpochUnit::S), 1_732_262_401);
        assert_eq!(
            cutoff(1_732_262_400_000).integer_bound(EpochUnit::S),
            1_732_262_400
        );
        assert_eq!(cutoff(-1_500).exact(EpochUnit::S), "-1.500");
        assert_eq!(cutoff(-1_500).integer_bound(EpochUnit::S), -1);
        assert_eq!(c.iso_literal(), "'2024-11-22T08:00:00.123Z'");
    }

    #[test]
    fn integer_bound_agrees_with_exact_comparison() {
        for ms in [-2_001, -2_000, -1_999, -1, 0, 1, 999, 1_000, 1_001] {
            let c = cutoff(ms);
            for v in -4..=4i64 {
                assert_eq!(
                    v < c.integer_bound(EpochUnit::S),
                    v * 1000 < ms,
                    "v={v}s cutoff={ms}ms"
                );
            }
        }
    }

    #[test]
    fn cutoff_is_whole_milliseconds_and_bounded() {
        let now = DateTime::from_timestamp(1_800_000_000, 987_654_321).unwrap();
        let c = Cutoff::before(now, Duration::from_millis(1_500)).unwrap();
        assert_eq!(c.instant().timestamp_millis(), 1_799_999_999_487);
        assert!(Cutoff::before(now, Duration::from_secs(3_000 * 366 * 86_400)).is_none());
        assert!(Cutoff::before(now, Duration::MAX).is_none());
    }
}

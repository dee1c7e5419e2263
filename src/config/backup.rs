//! The settings of `[database.backup]` that the backup library reads too: plain
//! values, defined here so that `config` needs nothing from the library above it
//! (`repo` re-exports them where they are used).

use serde::{Deserialize, Serialize};

/// `compression` in the config and the archive header.
///
/// zstd is the default: on two cores it keeps pace with `pg_dump` (a backup takes
/// about as long as an uncompressed dump) at the size of `pg_dump -Fc`, where gzip at
/// a comparable ratio needs twice the CPU (see bench/backup.py and the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Gzip,
    #[default]
    Zstd,
    None,
}

impl Compression {
    /// Level used when the config gives none: gzip's and zstd's own defaults.
    pub fn default_level(self) -> i32 {
        match self {
            Compression::Gzip => 6,
            Compression::Zstd => 3,
            Compression::None => 0,
        }
    }

    pub fn level_range(self) -> std::ops::RangeInclusive<i32> {
        match self {
            Compression::Gzip => 1..=9,
            Compression::Zstd => 1..=19,
            Compression::None => 0..=0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::None => "none",
        }
    }
}

/// One count of `keep`: how many backups (`last`) or periods (the period rules) a
/// rule keeps. The config writes [`Count::All`] as `-1` (restic's spelling) or
/// `"all"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// The n newest; 0 turns the rule off.
    Limited(u32),
    /// Every one the rule matches.
    All,
}

impl Default for Count {
    fn default() -> Self {
        Count::Limited(0)
    }
}

impl Count {
    /// How many the rule keeps at most; `None` for no limit.
    pub fn limit(self) -> Option<u32> {
        match self {
            Count::Limited(n) => Some(n),
            Count::All => None,
        }
    }

    /// Whether the rule keeps anything at all.
    pub fn is_on(self) -> bool {
        self != Count::Limited(0)
    }
}

/// `keep` in the backup config. A rule left out of a written `keep` table is off (0);
/// the policy of [`Keep::recommended`] applies only when `keep` is absent.
///
/// Deserialized by hand (not derived) so that a value it cannot read is an error that
/// names the rule, instead of serde's "data did not match any variant": a count that
/// means nothing must never be read as some other count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Keep {
    /// `last`: the n newest good backups. Default: 0 (off).
    pub last: Count,
    /// `hourly`: the newest backup of each of the n newest hours that have one.
    /// Default: 0 (off).
    pub hourly: Count,
    /// `daily`: likewise per day (UTC). Default: 0 (off).
    pub daily: Count,
    /// `weekly`: likewise per ISO week (UTC). Default: 0 (off).
    pub weekly: Count,
    /// `monthly`: likewise per month (UTC). Default: 0 (off).
    pub monthly: Count,
    /// `yearly`: likewise per year (UTC). Default: 0 (off).
    pub yearly: Count,
    /// `within`: every good backup made at most this long before the newest good
    /// backup (restic `--keep-within`), e.g. `"7d"`. Default: none (off).
    pub within: Option<std::time::Duration>,
}

/// The names of the count rules, in the order of [`Keep::counts`].
pub const COUNT_RULES: [&str; 6] = ["last", "hourly", "daily", "weekly", "monthly", "yearly"];

impl Keep {
    /// 3 most recent, 7 daily, 4 weekly, 12 monthly.
    pub fn recommended() -> Self {
        Keep {
            last: Count::Limited(3),
            daily: Count::Limited(7),
            weekly: Count::Limited(4),
            monthly: Count::Limited(12),
            ..Keep::default()
        }
    }

    /// A policy that would keep nothing is refused at config load.
    pub fn keeps_something(&self) -> bool {
        self.counts().iter().any(|(_, c)| c.is_on()) || self.within.is_some_and(|d| !d.is_zero())
    }

    /// The six counts with their rule names, in the order last, hourly, daily,
    /// weekly, monthly, yearly.
    pub fn counts(&self) -> [(&'static str, Count); 6] {
        let c = [
            self.last,
            self.hourly,
            self.daily,
            self.weekly,
            self.monthly,
            self.yearly,
        ];
        [0, 1, 2, 3, 4, 5].map(|i| (COUNT_RULES[i], c[i]))
    }

    fn count_mut(&mut self, rule: &str) -> Option<&mut Count> {
        match rule {
            "last" => Some(&mut self.last),
            "hourly" => Some(&mut self.hourly),
            "daily" => Some(&mut self.daily),
            "weekly" => Some(&mut self.weekly),
            "monthly" => Some(&mut self.monthly),
            "yearly" => Some(&mut self.yearly),
            _ => None,
        }
    }
}

/// `d` as the config would write it, in the largest unit that divides it ("7d",
/// "36h", "1y"), so that a rotation reason reads like the rule it comes from. Weeks
/// and months are left out: "7d" is how most write a week, and "within 1w" would
/// read like another rule.
pub fn short_duration(d: std::time::Duration) -> String {
    // humantime's year: 365.25 days.
    const UNITS: [(u64, &str); 5] = [
        (31_557_600, "y"),
        (86_400, "d"),
        (3_600, "h"),
        (60, "m"),
        (1, "s"),
    ];
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        return humantime::format_duration(d).to_string();
    }
    let (unit, name) = UNITS
        .iter()
        .copied()
        .find(|(unit, _)| secs.is_multiple_of(*unit))
        .unwrap_or((1, "s"));
    format!("{}{name}", secs / unit)
}

/// A `keep` value that cannot be read; the message names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeepError {
    #[error(
        "keep.{rule}: {value} is not a count; write a whole number (0 turns the rule off), or -1 or \"all\" to keep every one the rule matches"
    )]
    Count { rule: &'static str, value: String },
    #[error("keep.within: {value} is not a duration ({reason}); write one like \"7d\", \"36h\" or \"2w\"")]
    Within { value: String, reason: String },
}

/// A `keep` value as written, before it is judged.
#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    Other(serde::de::IgnoredAny),
}

impl Raw {
    fn shown(&self) -> String {
        match self {
            Raw::Int(n) => n.to_string(),
            Raw::Float(x) => x.to_string(),
            Raw::Bool(b) => b.to_string(),
            Raw::Text(s) => format!("{s:?}"),
            Raw::Other(_) => "this value".to_owned(),
        }
    }

    fn count(self, rule: &'static str) -> Result<Count, KeepError> {
        match &self {
            Raw::Int(-1) => return Ok(Count::All),
            Raw::Text(s) if s == "all" => return Ok(Count::All),
            Raw::Int(n) => {
                if let Ok(n) = u32::try_from(*n) {
                    return Ok(Count::Limited(n));
                }
            }
            _ => {}
        }
        Err(KeepError::Count {
            rule,
            value: self.shown(),
        })
    }

    fn within(self) -> Result<Option<std::time::Duration>, KeepError> {
        let error = |reason: String| KeepError::Within {
            value: self.shown(),
            reason,
        };
        let Raw::Text(text) = &self else {
            return Err(error("a duration is a string".to_owned()));
        };
        let d = humantime::parse_duration(text).map_err(|e| error(e.to_string()))?;
        Ok((!d.is_zero()).then_some(d))
    }
}

impl<'de> Deserialize<'de> for Keep {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(KeepVisitor)
    }
}

struct KeepVisitor;

impl<'de> serde::de::Visitor<'de> for KeepVisitor {
    type Value = Keep;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a table of keep rules, e.g. { last = 3, daily = 7, within = \"7d\" }")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Keep, A::Error> {
        use serde::de::Error;
        const KEYS: [&str; 7] = [
            "last", "hourly", "daily", "weekly", "monthly", "yearly", "within",
        ];
        let mut keep = Keep::default();
        while let Some(key) = map.next_key::<String>()? {
            if key == "within" {
                keep.within = map
                    .next_value::<Raw>()?
                    .within()
                    .map_err(A::Error::custom)?;
                continue;
            }
            let Some(rule) = COUNT_RULES.iter().copied().find(|r| *r == key) else {
                return Err(A::Error::unknown_field(&key, &KEYS));
            };
            let count = map
                .next_value::<Raw>()?
                .count(rule)
                .map_err(A::Error::custom)?;
            if let Some(slot) = keep.count_mut(rule) {
                *slot = count;
            }
        }
        Ok(keep)
    }
}

/// How thoroughly a backup is checked after it is written (ordered: none < read < restore).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// No check beyond a successful write.
    None,
    /// SHA-256, full authenticated decryption and decompression.
    #[default]
    Read,
    /// `read`, plus a restore into a scratch database and an integrity check.
    Restore,
}

impl VerifyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyMode::None => "none",
            VerifyMode::Read => "read",
            VerifyMode::Restore => "restore",
        }
    }
}

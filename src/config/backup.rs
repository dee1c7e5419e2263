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

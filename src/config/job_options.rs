//! Keys every job table accepts (`schedule`, `timezone`, `timeout`, `retries`, …).
//!
//! serde cannot combine `flatten` with `deny_unknown_fields`, so the shared keys are
//! spliced into each job struct by the `job_table!` macro instead; `JobOptions` is the
//! plain value the rest of the daemon works with.

use std::time::Duration;

use serde::Deserialize;

use crate::schedule::{Schedule, TimeZone};

/// What to do at start-up when a job's last success is older than one interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Missed {
    /// Run the job once right away, then follow the schedule.
    RunOnce,
    /// Wait for the next scheduled time (counted in `job_skipped_total{reason="missed"}`).
    Skip,
}

/// The scheduling and supervision settings of one job, with defaults applied.
#[derive(Debug, Clone)]
pub struct JobOptions {
    pub schedule: Schedule,
    pub timezone: TimeZone,
    pub timeout: Duration,
    pub retries: u32,
    pub retry_backoff: Duration,
    pub jitter: Duration,
    pub missed: Missed,
    /// Where the job's start, success and failure are pinged (its own `ping-url` or
    /// the `[notify]` default); `None`: nowhere.
    pub ping: Option<crate::config::PingTarget>,
}

/// Declares a job table struct with the common job keys appended.
///
/// The kind-specific fields come first; `$timeout`, `$missed` and `$retries` are the
/// kind's defaults for `timeout`, `missed` and `retries`.
macro_rules! job_table {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
        defaults(timeout = $timeout:expr, missed = $missed:expr, retries = $retries:expr)
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
            /// When the job runs: 6-field cron (seconds first), 5-field cron,
            /// `@hourly`/`@daily`/`@weekly`/`@monthly`/`@yearly`, `every <duration>`,
            /// `@startup` or `manual`. Required.
            pub schedule: $crate::schedule::Schedule,
            /// IANA time zone the cron expression is read in, e.g. `Europe/Berlin`.
            /// Default: UTC.
            #[serde(default)]
            pub timezone: Option<$crate::schedule::TimeZone>,
            /// Longest time one attempt may run before it is cancelled and counted as
            /// failed. Default depends on the job kind.
            #[serde(default, with = "humantime_serde")]
            pub timeout: Option<std::time::Duration>,
            /// How many times a failed attempt is retried before the run counts as
            /// failed. Default depends on the job kind.
            #[serde(default)]
            pub retries: Option<u32>,
            /// Wait before the first retry; doubled for each further retry, at most
            /// 1 hour. Default: `30s`.
            #[serde(default, with = "humantime_serde")]
            pub retry_backoff: Option<std::time::Duration>,
            /// Random delay in `[0, jitter)` added to every scheduled start, to spread
            /// load. Default: `0s`.
            #[serde(default, with = "humantime_serde")]
            pub jitter: Option<std::time::Duration>,
            /// After downtime, `run-once` runs the job at start-up if its last success
            /// is older than one interval; `skip` waits for the next slot. Default
            /// depends on the job kind.
            #[serde(default)]
            pub missed: Option<$crate::config::Missed>,
            /// Dead-man ping URL of this job (healthchecks.io, Cronitor, Uptime Kuma;
            /// see `ping-style`): told when each run starts, succeeds or fails. `false`
            /// turns the `[notify]` `ping-url` off for this job. Treated as a secret.
            /// Default: `[notify]`'s `ping-url`, else none.
            #[serde(default)]
            pub ping_url: Option<$crate::config::PingSetting>,
            /// How this job's ping URL is spoken to: `healthchecks`, `cronitor` or
            /// `uptime-kuma`. Default: `[notify]`'s `ping-style`, else `healthchecks`.
            #[serde(default)]
            pub ping_style: Option<$crate::config::PingStyle>,
        }

        impl $name {
            /// The common job settings with this kind's defaults and `notify`'s ping
            /// defaults applied.
            pub fn options(
                &self,
                notify: Option<&$crate::config::NotifyConfig>,
            ) -> $crate::config::JobOptions {
                $crate::config::JobOptions {
                    schedule: self.schedule.clone(),
                    timezone: self.timezone.clone().unwrap_or_default(),
                    timeout: self.timeout.unwrap_or($timeout),
                    retries: self.retries.unwrap_or($retries),
                    retry_backoff: self
                        .retry_backoff
                        .unwrap_or(std::time::Duration::from_secs(30)),
                    jitter: self.jitter.unwrap_or_default(),
                    missed: self.missed.unwrap_or($missed),
                    ping: $crate::config::PingTarget::resolve(
                        self.ping_url.as_ref(),
                        self.ping_style,
                        notify,
                    ),
                }
            }
        }
    };
}

pub(crate) use job_table;

//! `[notify]` and the per-job `ping-url`: where dbkeeper tells people and monitors
//! what its jobs did.
//!
//! Webhook and ping URLs carry their token in the path or query, so they are held as
//! [`SecretUrl`]s, whose `Debug` shows the host only. The URL checks happen while
//! deserializing, so a wrong value is reported with its line and column like any
//! type error (and the message never repeats the URL).

use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::redact::url_host;

/// An `http(s)://` URL that may hold a token: shown as its host only.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(url::Url);

impl SecretUrl {
    /// Parses an `http://` or `https://` URL. The error never repeats the URL.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        match url::Url::parse(text) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
                Ok(SecretUrl(u))
            }
            _ => Err("is not an http:// or https:// URL"),
        }
    }

    pub fn url(&self) -> &url::Url {
        &self.0
    }

    /// What logs may show: the host.
    pub fn host(&self) -> String {
        url_host(self.0.as_str())
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/…", self.host())
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        SecretUrl::parse(&text).map_err(|m| de::Error::custom(format!("the URL {m}")))
    }
}

/// How the ping URL is spoken to (`ping-style`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PingStyle {
    /// healthchecks.io: POST `<url>/start`, `<url>`, `<url>/fail`, the run's summary or
    /// error as the body.
    #[default]
    Healthchecks,
    /// Cronitor telemetry: GET `<url>?state=run|complete|fail&message=…`.
    Cronitor,
    /// Uptime Kuma push monitor: GET `<url>?status=up|down&msg=…`; no start ping
    /// (Kuma has no notion of a run in progress).
    UptimeKuma,
}

/// `ping-url` as written: a URL, or `false` (or `""`) for "no pings for this job",
/// which turns a `[notify]` default off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PingSetting {
    Off,
    Url(SecretUrl),
}

impl<'de> Deserialize<'de> for PingSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PingSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a ping URL, or false for no pings")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<PingSetting, E> {
                if v {
                    Err(E::custom(
                        "true is not a ping URL; write the URL, or false for no pings",
                    ))
                } else {
                    Ok(PingSetting::Off)
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PingSetting, E> {
                if v.is_empty() {
                    return Ok(PingSetting::Off);
                }
                SecretUrl::parse(v).map(PingSetting::Url).map_err(|m| {
                    E::custom(format!(
                        "the ping URL {m}; write the check's URL, or false for no pings"
                    ))
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// Where and how one job's runs are pinged, after the `[notify]` defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingTarget {
    pub url: SecretUrl,
    pub style: PingStyle,
}

impl PingTarget {
    /// The job's own `ping-url`/`ping-style`, else `[notify]`'s: `None` if neither
    /// sets a URL or the job says `ping-url = false`.
    pub fn resolve(
        own: Option<&PingSetting>,
        own_style: Option<PingStyle>,
        notify: Option<&NotifyConfig>,
    ) -> Option<PingTarget> {
        let url = match own {
            Some(PingSetting::Off) => return None,
            Some(PingSetting::Url(u)) => u.clone(),
            None => match notify?.ping_url.as_ref()? {
                PingSetting::Url(u) => u.clone(),
                PingSetting::Off => return None,
            },
        };
        let style = own_style
            .or_else(|| notify.and_then(|n| n.ping_style))
            .unwrap_or_default();
        Some(PingTarget { url, style })
    }
}

/// The body a webhook receives (`format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WebhookFormat {
    /// dbkeeper's own JSON: `event`, `job`, `kind`, `database`, `result`, `error`,
    /// `time`.
    #[default]
    Json,
    /// `{"text": …}`: Slack, Mattermost, Discord (`…/slack` endpoint), Rocket.Chat.
    Slack,
    /// An Adaptive Card in a `message` envelope: Teams Workflows ("post to a channel
    /// when a webhook request is received") and the older incoming webhooks.
    Teams,
}

/// One webhook: `webhook = "URL"` (JSON) or `webhook = { url = "URL", format = "slack" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub url: SecretUrl,
    pub format: WebhookFormat,
}

/// The table form of a webhook.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct WebhookTable {
    /// The URL to POST to. Required.
    url: SecretUrl,
    /// `json`, `slack` or `teams`. Default: `json`.
    #[serde(default)]
    format: WebhookFormat,
}

impl<'de> Deserialize<'de> for Webhook {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WebhookVisitor)
    }
}

struct WebhookVisitor;

impl<'de> Visitor<'de> for WebhookVisitor {
    type Value = Webhook;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a URL or a table { url = \"…\", format = \"json|slack|teams\" }")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Webhook, E> {
        let url = SecretUrl::parse(v).map_err(|m| E::custom(format!("the webhook URL {m}")))?;
        Ok(Webhook {
            url,
            format: WebhookFormat::Json,
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Webhook, A::Error> {
        let t = WebhookTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(Webhook {
            url: t.url,
            format: t.format,
        })
    }
}

/// `webhook`: one webhook (a URL or a table) or a list of them.
fn webhooks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Webhook>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<Webhook>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a webhook URL, a table { url, format }, or a list of them")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<Webhook>, E> {
            WebhookVisitor.visit_str(v).map(|w| vec![w])
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Vec<Webhook>, A::Error> {
            WebhookVisitor.visit_map(map).map(|w| vec![w])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<Webhook>, A::Error> {
            Vec::<Webhook>::deserialize(de::value::SeqAccessDeserializer::new(seq))
        }
    }
    d.deserialize_any(V)
}

/// `[notify]`: tell webhooks, Alertmanager and dead-man monitors what jobs do, for
/// sites without (or besides) Prometheus alerting.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NotifyConfig {
    /// Where a POST goes when a job fails and when it recovers: a URL (dbkeeper's
    /// JSON), a table `{ url = "…", format = "json" | "slack" | "teams" }`, or a list
    /// of either. Treated as a secret: logs show the host only. Default: none.
    #[serde(default, deserialize_with = "webhooks")]
    pub webhook: Vec<Webhook>,
    /// Alertmanager base URL (e.g. `http://127.0.0.1:9093`); events go to
    /// `/api/v2/alerts` as alert `DbkeeperJobFailed`, resolved on recovery.
    /// Default: none.
    #[serde(default)]
    pub alertmanager: Option<String>,
    /// Address at which people reach dbkeeper's status page (e.g. through a reverse
    /// proxy: `https://ops.example.com/dbkeeper/`); chat messages and alerts then link
    /// to the job's row on it. Default: none (no link).
    #[serde(default)]
    pub public_url: Option<String>,
    /// Dead-man ping URL for every job that sets no `ping-url` of its own: the
    /// job's start, success and failure are reported to it (see `ping-style`).
    /// Treated as a secret. Default: none.
    #[serde(default)]
    pub ping_url: Option<PingSetting>,
    /// How ping URLs are spoken to when a job does not say: `healthchecks`,
    /// `cronitor` or `uptime-kuma`. Default: `healthchecks`.
    #[serde(default)]
    pub ping_style: Option<PingStyle>,
    /// Time limit of one webhook or Alertmanager delivery attempt. Default: `10s`.
    #[serde(default = "default_notify_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Further webhook or Alertmanager attempts after a failed delivery. Default: `3`.
    #[serde(default = "default_notify_retries")]
    pub retries: u32,
    /// Wait before the first retry, doubled each time. Default: `2s`.
    #[serde(default = "default_notify_backoff", with = "humantime_serde")]
    pub retry_backoff: Duration,
}

fn default_notify_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_notify_retries() -> u32 {
    3
}

fn default_notify_backoff() -> Duration {
    Duration::from_secs(2)
}

/// By hand: webhook URLs often carry a token.
impl std::fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyConfig")
            .field("webhook", &self.webhook)
            .field("alertmanager", &self.alertmanager.as_deref().map(url_host))
            .field("public_url", &self.public_url)
            .field("ping_url", &self.ping_url)
            .field("ping_style", &self.ping_style)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish()
    }
}

impl super::Config {
    /// The `[notify]` checks that need more than one key.
    pub(super) fn validate_notify(&self, n: &NotifyConfig) -> Result<(), super::ConfigError> {
        self.duration("notify.timeout", n.timeout, Duration::from_secs(600))?;
        self.count("notify.retries", n.retries.into(), 0..=100)?;
        self.duration(
            "notify.retry-backoff",
            n.retry_backoff,
            Duration::from_secs(3600),
        )?;
        for (key, url) in [
            ("notify.alertmanager", &n.alertmanager),
            ("notify.public-url", &n.public_url),
        ] {
            if let Some(url) = url {
                SecretUrl::parse(url).map_err(|m| self.invalid(key, m))?;
            }
        }
        // `ping-style` alone is fine: the jobs may bring their own ping URLs.
        let pings = matches!(n.ping_url, Some(PingSetting::Url(_))) || n.ping_style.is_some();
        if n.webhook.is_empty() && n.alertmanager.is_none() && !pings {
            return Err(self.invalid(
                "notify",
                "set webhook, alertmanager, ping-url or ping-style (or remove [notify])",
            ));
        }
        Ok(())
    }
}

//! Direct notifications (`[notify]`): a POST to each webhook (dbkeeper's JSON, a
//! Slack-style message or a Teams card: `message`) and/or an alert to Alertmanager
//! when a job fails and when it recovers, retried with backoff, each attempt under a
//! timeout; and the dead-man pings of every run ([`ping`]). Delivery runs in the
//! background and never delays a job.

mod message;
pub mod ping;

pub use message::status_link;
pub use ping::{PingEvent, Pinger};

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::NotifyConfig;
use crate::redact::url_host;

/// What happened to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A run failed.
    Failure,
    /// The first success after a failure.
    Recovery,
}

/// The webhook body.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub event: EventKind,
    pub job: String,
    pub kind: String,
    pub database: String,
    pub result: &'static str,
    pub error: Option<String>,
    pub time: DateTime<Utc>,
}

/// The HTTP client for `[notify]` could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the HTTP client for notifications and pings: {0}")]
pub struct NotifyError(reqwest::Error);

#[derive(Clone)]
pub struct Notifier {
    cfg: NotifyConfig,
    client: reqwest::Client,
}

impl Notifier {
    pub fn new(cfg: NotifyConfig) -> Result<Self, NotifyError> {
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .user_agent(concat!("dbkeeper/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(NotifyError)?;
        Ok(Notifier { cfg, client })
    }

    /// A run of a job finished (`error` if it failed; `failed_before` if the job's
    /// previous run had failed). Notifies on changes only: the first failure, and
    /// the first success after failures.
    pub fn run_finished(
        &self,
        job: &str,
        kind: &str,
        database: &str,
        failed_before: bool,
        error: Option<&str>,
    ) {
        let event = match error {
            Some(_) if !failed_before => EventKind::Failure,
            None if failed_before => EventKind::Recovery,
            _ => return,
        };
        self.send(Event {
            event,
            job: job.to_owned(),
            kind: kind.to_owned(),
            database: database.to_owned(),
            result: if error.is_none() {
                "success"
            } else {
                "failure"
            },
            error: error.map(str::to_owned),
            time: Utc::now(),
        });
    }

    /// Sends the event in the background.
    pub fn send(&self, event: Event) {
        let this = self.clone();
        tokio::spawn(async move {
            let link = this
                .cfg
                .public_url
                .as_deref()
                .map(|base| status_link(base, &event.job));
            for hook in &this.cfg.webhook {
                let body = message::webhook_body(hook.format, &event, link.as_deref());
                this.deliver(hook.url.url().as_str(), body).await;
            }
            if let Some(base) = this.cfg.alertmanager.clone() {
                let url = format!("{}/api/v2/alerts", base.trim_end_matches('/'));
                this.deliver(&url, alertmanager_body(&event, link.as_deref()))
                    .await;
            }
        });
    }

    async fn deliver(&self, url: &str, body: serde_json::Value) {
        let host = url_host(url);
        let mut wait = self.cfg.retry_backoff;
        for attempt in 0..=self.cfg.retries {
            let result = self.client.post(url).json(&body).send().await;
            let why = match result {
                Ok(resp) if resp.status().is_success() => return,
                Ok(resp) => format!("HTTP {}", resp.status()),
                // Without the URL: it may hold a token.
                Err(e) => e.without_url().to_string(),
            };
            if attempt == self.cfg.retries {
                tracing::warn!(
                    host,
                    attempts = attempt + 1,
                    "notification not delivered: {why}"
                );
                return;
            }
            tracing::info!(
                host,
                attempt = attempt + 1,
                "notification failed ({why}); retrying in {}",
                humantime::format_duration(wait)
            );
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(300));
        }
    }
}

/// Alertmanager v2: one alert, firing on failure, resolved (`endsAt` now) on recovery;
/// `link` (the job on the status page) becomes its `generatorURL`.
fn alertmanager_body(e: &Event, link: Option<&str>) -> serde_json::Value {
    let ends = match e.event {
        EventKind::Recovery => e.time,
        // Stays firing until the recovery resolves it (or a week passes).
        EventKind::Failure => e.time + chrono::Duration::days(7),
    };
    let mut alert = serde_json::json!({
        "labels": {
            "alertname": "DbkeeperJobFailed",
            // The label the scraped DbkeeperJobFailed carries too (see
            // metrics::JOB_LABEL), so one silence or route matches both.
            (crate::metrics::JOB_LABEL): e.job,
            "kind": e.kind,
            "database": e.database,
            "severity": "warning",
            "source": "dbkeeper",
        },
        "annotations": {
            "summary": format!("dbkeeper job {} on database {} failed", e.job, e.database),
            "description": e.error.clone().unwrap_or_default(),
        },
        "startsAt": e.time,
        "endsAt": ends,
    });
    if let Some(link) = link {
        alert["generatorURL"] = link.into();
    }
    serde_json::json!([alert])
}

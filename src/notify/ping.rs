//! Dead-man pings (`ping-url`): each run of a job tells a monitor (healthchecks.io,
//! Cronitor, Uptime Kuma) that it started and how it ended, so the monitor raises
//! the alarm when the pings stop — also when dbkeeper itself is dead.
//!
//! A ping must never delay or fail a job: it is queued and sent by a background
//! task, with a short timeout and a few quick retries. Each job has one queue and
//! one sender task, so the `/start` of a run always reaches the monitor before the
//! run's success or failure, however slow the first delivery is. The tasks are
//! tracked: at shutdown the pings in flight get [`GRACE`], then are abandoned.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use reqwest::Method;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::NotifyError;
use crate::config::{PingStyle, PingTarget};
use crate::metrics;

/// Time limit of one ping attempt.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per ping: the first and two retries.
const ATTEMPTS: u32 = 3;
/// Wait before the first retry; doubled for the next.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// How long pings still queued or in flight may take once dbkeeper is stopping
/// (the daemon after its jobs, `run-job` after its run).
pub const GRACE: Duration = Duration::from_secs(1);
/// Largest body sent, in bytes: healthchecks.io keeps the first 10 KB.
const MAX_BODY: usize = 10_000;
/// Largest message in a query string (Cronitor takes up to 2000 characters; URLs
/// beyond a few KB are refused by some proxies).
const MAX_QUERY_MESSAGE: usize = 1_000;
/// Pings waiting per job; more only pile up behind a monitor that is down.
const QUEUE: usize = 16;

/// What a ping reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PingEvent {
    Start,
    Success,
    Failure,
}

impl PingEvent {
    fn as_str(self) -> &'static str {
        match self {
            PingEvent::Start => "start",
            PingEvent::Success => "success",
            PingEvent::Failure => "failure",
        }
    }
}

/// The HTTP request that reports `event` to `target` in its style, `message` the
/// run's summary or error. `None`: this style has nothing to send for the event.
pub fn request(
    target: &PingTarget,
    event: PingEvent,
    message: &str,
) -> Option<(Method, url::Url, String)> {
    let mut url = target.url.url().clone();
    match target.style {
        PingStyle::Healthchecks => {
            // `/start` and `/fail` go after the path, before any query (`?create=1`).
            let suffix = match event {
                PingEvent::Start => "/start",
                PingEvent::Success => "",
                PingEvent::Failure => "/fail",
            };
            let path = format!("{}{suffix}", url.path().trim_end_matches('/'));
            url.set_path(&path);
            Some((Method::POST, url, truncate(message, MAX_BODY).to_owned()))
        }
        PingStyle::Cronitor => {
            let state = match event {
                PingEvent::Start => "run",
                PingEvent::Success => "complete",
                PingEvent::Failure => "fail",
            };
            set_query(
                &mut url,
                &["state", "message"],
                &[("state", state)],
                message,
            );
            Some((Method::GET, url, String::new()))
        }
        PingStyle::UptimeKuma => {
            let status = match event {
                // A push monitor only knows up and down.
                PingEvent::Start => return None,
                PingEvent::Success => "up",
                PingEvent::Failure => "down",
            };
            // The URL Kuma shows ends in `?status=up&msg=OK&ping=`: ours replace those.
            let msg = if message.is_empty() { "OK" } else { message };
            set_query(
                &mut url,
                &["status", "msg", "ping"],
                &[("status", status)],
                "",
            );
            url.query_pairs_mut()
                .append_pair("msg", truncate(msg, MAX_QUERY_MESSAGE));
            Some((Method::GET, url, String::new()))
        }
    }
}

/// Replaces the query parameters named in `drop` with `set` (and `message=…` if
/// `message` is not empty), keeping the others (an API key, say).
fn set_query(url: &mut url::Url, drop: &[&str], set: &[(&str, &str)], message: &str) {
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| !drop.contains(&k.as_ref()))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut q = url.query_pairs_mut();
    q.clear().extend_pairs(kept).extend_pairs(set);
    if !message.is_empty() {
        q.append_pair("message", truncate(message, MAX_QUERY_MESSAGE));
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// One queued ping.
struct Ping {
    target: PingTarget,
    event: PingEvent,
    message: String,
}

/// Sends the pings of every job; cheap to clone. One per process, so that a reload
/// does not reorder the pings of a run that spans it.
#[derive(Clone)]
pub struct Pinger {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    tracker: TaskTracker,
    /// Cancelled when the grace period at shutdown is over.
    stop: CancellationToken,
    /// Each job's queue; `None` once shutdown began (later pings are dropped).
    queues: Mutex<Option<HashMap<String, mpsc::Sender<Ping>>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pinger {
    pub fn new() -> Result<Self, NotifyError> {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .user_agent(concat!("dbkeeper/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(NotifyError)?;
        Ok(Pinger {
            inner: Arc::new(Inner {
                client,
                tracker: TaskTracker::new(),
                stop: CancellationToken::new(),
                queues: Mutex::new(Some(HashMap::new())),
            }),
        })
    }

    /// Queues a ping of `job`'s run; returns at once. `message` is the run's summary
    /// or error (cut to what the monitor keeps).
    pub fn ping(&self, job: &str, target: &PingTarget, event: PingEvent, message: &str) {
        let ping = Ping {
            target: target.clone(),
            event,
            message: truncate(message, MAX_BODY).to_owned(),
        };
        let mut queues = lock(&self.inner.queues);
        let Some(queues) = queues.as_mut() else {
            return;
        };
        let queue = queues
            .entry(job.to_owned())
            .or_insert_with(|| self.sender_task(job));
        if queue.try_send(ping).is_err() {
            tracing::warn!(
                job,
                host = %target.url.host(),
                event = event.as_str(),
                "ping dropped: {QUEUE} earlier pings of this job are still waiting for the monitor"
            );
            metrics::ping_failed(job);
        }
    }

    /// The task that sends one job's pings in order; it ends when its queue is
    /// closed (at shutdown) and empty.
    fn sender_task(&self, job: &str) -> mpsc::Sender<Ping> {
        let (tx, mut rx) = mpsc::channel::<Ping>(QUEUE);
        let inner = self.inner.clone();
        let job = job.to_owned();
        self.inner.tracker.spawn(async move {
            while let Some(ping) = rx.recv().await {
                inner.deliver(&job, ping).await;
            }
        });
        tx
    }

    /// Lets the pings already queued go out for at most `grace`, then abandons
    /// them; no new pings are taken.
    pub async fn shutdown(&self, grace: Duration) {
        // Dropping the senders lets each task end once its queue is empty.
        drop(lock(&self.inner.queues).take());
        self.inner.tracker.close();
        if tokio::time::timeout(grace, self.inner.tracker.wait())
            .await
            .is_err()
        {
            self.inner.stop.cancel();
            // Every wait in `deliver` ends on `stop`: this is quick.
            let _ = tokio::time::timeout(GRACE, self.inner.tracker.wait()).await;
        }
    }
}

impl Inner {
    /// Sends one ping, retrying network errors, 5xx and 429 answers.
    async fn deliver(&self, job: &str, ping: Ping) {
        let Some((method, url, body)) = request(&ping.target, ping.event, &ping.message) else {
            return;
        };
        let host = ping.target.url.host();
        let event = ping.event.as_str();
        let mut wait = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            let mut req = self.client.request(method.clone(), url.clone());
            if method == Method::POST {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                    .body(body.clone());
            }
            let sent = tokio::select! {
                sent = req.send() => sent,
                _ = self.stop.cancelled() => return failed(job, &host, event, "dbkeeper is stopping"),
            };
            let (why, retry) = match sent {
                Ok(resp) if resp.status().is_success() => return,
                Ok(resp) => {
                    let s = resp.status();
                    (
                        format!("HTTP {s}"),
                        s.is_server_error() || s.as_u16() == 429,
                    )
                }
                // Without the URL: its path is the secret.
                Err(e) => (e.without_url().to_string(), true),
            };
            if !retry || attempt == ATTEMPTS {
                return failed(job, &host, event, &format!("{why} (attempt {attempt})"));
            }
            tracing::debug!(job, host, event, attempt, "ping failed ({why}); retrying");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.stop.cancelled() => return failed(job, &host, event, "dbkeeper is stopping"),
            }
            wait *= 2;
        }
    }
}

/// A ping that did not arrive: a warning (host only) and the failure counter.
fn failed(job: &str, host: &str, event: &str, why: &str) {
    tracing::warn!(job, host, event, "dead-man ping not delivered: {why}");
    metrics::ping_failed(job);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretUrl;

    fn target(url: &str, style: PingStyle) -> PingTarget {
        PingTarget {
            url: SecretUrl::parse(url).expect("url"),
            style,
        }
    }

    #[test]
    fn healthchecks_paths_and_body() {
        let t = target("https://hc-ping.com/0f1e-uuid", PingStyle::Healthchecks);
        let (m, u, b) = request(&t, PingEvent::Start, "").expect("start");
        assert_eq!(
            (m, u.as_str()),
            (Method::POST, "https://hc-ping.com/0f1e-uuid/start")
        );
        assert_eq!(b, "");
        let (_, u, b) = request(&t, PingEvent::Success, "3 rows").expect("ok");
        assert_eq!(
            (u.as_str(), b.as_str()),
            ("https://hc-ping.com/0f1e-uuid", "3 rows")
        );
        // Slug URLs keep their query after the suffix.
        let t = target(
            "https://hc-ping.com/key/app-backup/?create=1",
            PingStyle::Healthchecks,
        );
        let (_, u, _) = request(&t, PingEvent::Failure, "boom").expect("fail");
        assert_eq!(
            u.as_str(),
            "https://hc-ping.com/key/app-backup/fail?create=1"
        );
    }

    #[test]
    fn cronitor_and_kuma_queries() {
        let t = target(
            "https://cronitor.link/p/KEY/nightly?env=prod",
            PingStyle::Cronitor,
        );
        let (m, u, _) = request(&t, PingEvent::Start, "").expect("run");
        assert_eq!(m, Method::GET);
        assert_eq!(
            u.as_str(),
            "https://cronitor.link/p/KEY/nightly?env=prod&state=run"
        );
        let (_, u, _) = request(&t, PingEvent::Failure, "disk full").expect("fail");
        assert_eq!(
            u.as_str(),
            "https://cronitor.link/p/KEY/nightly?env=prod&state=fail&message=disk+full"
        );
        let t = target(
            "https://kuma.example/api/push/TOKEN?status=up&msg=OK&ping=",
            PingStyle::UptimeKuma,
        );
        assert!(request(&t, PingEvent::Start, "").is_none());
        let (_, u, _) = request(&t, PingEvent::Success, "").expect("up");
        assert_eq!(
            u.as_str(),
            "https://kuma.example/api/push/TOKEN?status=up&msg=OK"
        );
        let (_, u, _) = request(&t, PingEvent::Failure, "no such table").expect("down");
        assert_eq!(
            u.as_str(),
            "https://kuma.example/api/push/TOKEN?status=down&msg=no+such+table"
        );
    }

    #[test]
    fn long_messages_are_cut_on_a_character() {
        let long = "é".repeat(8_000);
        let t = target("https://hc-ping.com/u", PingStyle::Healthchecks);
        let (_, _, b) = request(&t, PingEvent::Failure, &long).expect("fail");
        assert!(b.len() <= MAX_BODY && b.len() > MAX_BODY - 2, "{}", b.len());
        let t = target("https://cronitor.link/p/K/m", PingStyle::Cronitor);
        let (_, u, _) = request(&t, PingEvent::Failure, &long).expect("fail");
        assert!(
            u.as_str().len() < 10 * MAX_QUERY_MESSAGE,
            "{}",
            u.as_str().len()
        );
    }

    #[test]
    fn debug_hides_the_secret() {
        let t = target("https://hc-ping.com/secret-uuid", PingStyle::Healthchecks);
        let shown = format!("{t:?}");
        assert!(
            shown.contains("hc-ping.com") && !shown.contains("secret-uuid"),
            "{shown}"
        );
    }
}

//! What a webhook receives, per `format`: dbkeeper's JSON, a Slack-style `text`
//! message, or a Teams Adaptive Card. Pure functions, so each shape is unit-tested.

use serde_json::{json, Value};

use super::{Event, EventKind};
use crate::config::WebhookFormat;

/// The status page row of `job` under `public-url`: the page gives every job row
/// the id `job-<job id>`.
pub fn status_link(public_url: &str, job: &str) -> String {
    format!("{}/#job-{job}", public_url.trim_end_matches('/'))
}

/// The body for a webhook of `format`; `link` points at the job on the status page.
pub fn webhook_body(format: WebhookFormat, e: &Event, link: Option<&str>) -> Value {
    match format {
        // Unchanged since before formats existed: receivers parse it.
        WebhookFormat::Json => serde_json::to_value(e).unwrap_or_default(),
        WebhookFormat::Slack => slack(e, link),
        WebhookFormat::Teams => teams(e, link),
    }
}

/// One line saying what happened, for people.
fn headline(e: &Event) -> String {
    let what = match e.event {
        EventKind::Failure => "failed",
        EventKind::Recovery => "recovered",
    };
    format!(
        "dbkeeper job {} ({}) on database {} {what}",
        e.job, e.kind, e.database
    )
}

/// Slack's escaping: `&`, `<` and `>` are control characters in message text.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `{"text": …}`: what Slack, Mattermost and Discord's `/slack` endpoint all show.
/// The link is a bare URL, which all of them turn into a link (Slack's `<url|label>`
/// is not understood everywhere).
fn slack(e: &Event, link: Option<&str>) -> Value {
    let icon = match e.event {
        EventKind::Failure => "❌",
        EventKind::Recovery => "✅",
    };
    let mut text = format!("{icon} {}", slack_escape(&headline(e)));
    text.push_str(&format!(
        "\nresult: {} · time: {}",
        e.result,
        e.time.format("%Y-%m-%d %H:%M:%S UTC")
    ));
    if let Some(error) = &e.error {
        text.push_str(&format!("\nerror:\n```\n{}\n```", slack_escape(error)));
    }
    if let Some(link) = link {
        text.push_str(&format!("\nstatus: {}", slack_escape(link)));
    }
    json!({ "text": text })
}

/// An Adaptive Card (1.4) in the `message` envelope that Teams Workflows' "post to
/// a channel when a webhook request is received" expects; the older incoming
/// webhook connectors accept it too.
fn teams(e: &Event, link: Option<&str>) -> Value {
    let (color, icon) = match e.event {
        EventKind::Failure => ("Attention", "❌"),
        EventKind::Recovery => ("Good", "✅"),
    };
    let mut body = vec![
        json!({
            "type": "TextBlock",
            "text": format!("{icon} {}", headline(e)),
            "weight": "Bolder",
            "size": "Medium",
            "color": color,
            "wrap": true,
        }),
        json!({
            "type": "FactSet",
            "facts": [
                { "title": "Job", "value": e.job },
                { "title": "Database", "value": e.database },
                { "title": "Kind", "value": e.kind },
                { "title": "Result", "value": e.result },
                { "title": "Time", "value": e.time.format("%Y-%m-%d %H:%M:%S UTC").to_string() },
            ],
        }),
    ];
    if let Some(error) = &e.error {
        body.push(json!({
            "type": "TextBlock",
            "text": error,
            "wrap": true,
            "fontType": "Monospace",
        }));
    }
    let mut card = json!({
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": body,
    });
    if let Some(link) = link {
        card["actions"] = json!([{
            "type": "Action.OpenUrl",
            "title": "Open the status page",
            "url": link,
        }]);
    }
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": null,
            "content": card,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, error: Option<&str>) -> Event {
        Event {
            event: kind,
            job: "app.backup".into(),
            kind: "backup".into(),
            database: "app".into(),
            result: if error.is_some() {
                "failure"
            } else {
                "success"
            },
            error: error.map(str::to_owned),
            time: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
        }
    }

    #[test]
    fn json_is_the_event_as_before() {
        let e = event(EventKind::Failure, Some("disk full"));
        let v = webhook_body(WebhookFormat::Json, &e, Some("https://x/#job-app.backup"));
        assert_eq!(v["event"], "failure");
        assert_eq!(v["job"], "app.backup");
        assert_eq!(v["error"], "disk full");
        assert!(v.get("text").is_none() && v.get("link").is_none(), "{v}");
    }

    #[test]
    fn slack_text_names_job_database_error_and_links() {
        let e = event(EventKind::Failure, Some("relation <events> & co missing"));
        let link = status_link("https://ops.example.com/dbkeeper/", "app.backup");
        assert_eq!(link, "https://ops.example.com/dbkeeper/#job-app.backup");
        let v = webhook_body(WebhookFormat::Slack, &e, Some(&link));
        let text = v["text"].as_str().unwrap_or_default();
        for want in [
            "app.backup",
            "database app",
            "failed",
            "relation &lt;events&gt; &amp; co missing",
            "https://ops.example.com/dbkeeper/#job-app.backup",
        ] {
            assert!(text.contains(want), "{want:?} not in {text}");
        }
        let v = webhook_body(
            WebhookFormat::Slack,
            &event(EventKind::Recovery, None),
            None,
        );
        let text = v["text"].as_str().unwrap_or_default();
        assert!(
            text.contains("recovered") && !text.contains("error"),
            "{text}"
        );
        assert!(!text.contains("status:"), "{text}");
    }

    #[test]
    fn teams_card_has_facts_error_and_action() {
        let e = event(EventKind::Failure, Some("disk full"));
        let v = webhook_body(WebhookFormat::Teams, &e, Some("https://x/#job-app.backup"));
        assert_eq!(v["type"], "message");
        let att = &v["attachments"][0];
        assert_eq!(
            att["contentType"],
            "application/vnd.microsoft.card.adaptive"
        );
        let card = &att["content"];
        assert_eq!(card["type"], "AdaptiveCard");
        let s = card.to_string();
        for want in ["app.backup", "\"Database\"", "\"app\"", "disk full"] {
            assert!(s.contains(want), "{want} not in {s}");
        }
        assert_eq!(card["actions"][0]["url"], "https://x/#job-app.backup");
        let v = webhook_body(
            WebhookFormat::Teams,
            &event(EventKind::Recovery, None),
            None,
        );
        assert!(v["attachments"][0]["content"].get("actions").is_none());
    }
}

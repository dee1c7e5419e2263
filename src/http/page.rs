//! The status page at `/`: a small, readable HTML table of jobs and recent backups for
//! people who do not run Grafana. No scripts, no external assets; refreshes itself.

use std::fmt::Write;

use chrono::{DateTime, Utc};

use crate::jobs::backup::human_bytes;
use crate::repo::catalog::{Manifest, VerifyResult};
use crate::status::Snapshot;

/// Escapes text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn when(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    let Some(t) = t else { return "–".to_owned() };
    let secs = (now - t).num_seconds();
    let ago = match secs.abs() {
        s if s < 90 => format!("{s}s"),
        s if s < 5400 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    };
    let rel = if secs >= 0 {
        format!("{ago} ago")
    } else {
        format!("in {ago}")
    };
    format!(
        "<span title=\"{}\">{rel}</span>",
        t.format("%Y-%m-%d %H:%M:%S UTC")
    )
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}\
h1{font-size:20px}h2{font-size:16px;margin-top:2em}table{border-collapse:collapse;width:100%}\
th,td{text-align:left;padding:4px 10px;border-bottom:1px solid #ddd;vertical-align:top}\
th{background:#f4f4f4}.ok{color:#17692b;font-weight:600}.bad{color:#b00020;font-weight:600}\
.run{color:#8a5a00;font-weight:600}.muted{color:#777}.err{color:#b00020;font-size:12px;max-width:40em}\
code{font-size:12px}";

pub fn render(s: &Snapshot, backups: &[Manifest], now: DateTime<Utc>) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"30\"><title>dbkeeper status</title>\
         <style>{STYLE}</style></head><body><h1>dbkeeper {}</h1><p class=\"muted\">config <code>{}</code>, loaded {}{}</p>",
        esc(s.version),
        esc(&s.config_file),
        when(s.config_loaded_at, now),
        match &s.last_reload_error {
            Some(e) => format!(" — <span class=\"bad\">last reload failed:</span> {}", esc(e)),
            None => String::new(),
        }
    );

    h.push_str("<h2>Databases</h2><table><tr><th>Database</th><th>Backend</th><th>URL</th><th>State</th></tr>");
    for db in &s.databases {
        let state = match db.up {
            Some(true) => "<span class=\"ok\">up</span>".to_owned(),
            Some(false) => format!(
                "<span class=\"bad\">down</span><div class=\"err\">{}</div>",
                esc(db.error.as_deref().unwrap_or(""))
            ),
            None => "<span class=\"muted\">not probed yet</span>".to_owned(),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{state}</td></tr>",
            esc(&db.name),
            esc(&db.backend),
            esc(&db.url)
        );
    }
    h.push_str("</table>");

    h.push_str(
        "<h2>Jobs</h2><table><tr><th>Job</th><th>Schedule</th><th>Last result</th>\
         <th>Last run</th><th>Last success</th><th>Next run</th><th>Last error</th></tr>",
    );
    for j in &s.jobs {
        let result = if j.running {
            "<span class=\"run\">running</span>".to_owned()
        } else {
            match j.last_result.as_deref() {
                Some("success") => "<span class=\"ok\">success</span>".to_owned(),
                Some(other) => format!("<span class=\"bad\">{}</span>", esc(other)),
                None => "<span class=\"muted\">never ran</span>".to_owned(),
            }
        };
        let error = match (&j.last_error, j.last_result.as_deref()) {
            (Some(e), Some(r)) if r != "success" => format!("<div class=\"err\">{}</div>", esc(e)),
            _ => String::new(),
        };
        let _ = write!(
            h,
            // The row's id is what `[notify] public-url` links point at.
            "<tr id=\"job-{}\"><td><code>{}</code></td><td><code>{}</code>{}</td><td>{result}</td><td>{}</td><td>{}</td><td>{}</td><td>{error}</td></tr>",
            esc(&j.job),
            esc(&j.job),
            esc(&j.schedule),
            if j.timezone == "UTC" { String::new() } else { format!(" <span class=\"muted\">{}</span>", esc(&j.timezone)) },
            when(j.last_run, now),
            when(j.last_success, now),
            when(j.next_run, now),
        );
    }
    h.push_str("</table>");

    h.push_str(
        "<h2>Recent backups</h2><table><tr><th>Backup</th><th>Database</th><th>Taken</th>\
         <th>Size</th><th>Raw size</th><th>Verification</th></tr>",
    );
    if backups.is_empty() {
        h.push_str("<tr><td colspan=\"6\" class=\"muted\">no backups yet</td></tr>");
    }
    for b in backups {
        let v = &b.verification;
        let verified = match v.result {
            VerifyResult::Passed => {
                format!("<span class=\"ok\">passed</span> ({})", v.mode.as_str())
            }
            VerifyResult::Skipped => "<span class=\"muted\">not verified</span>".to_owned(),
            VerifyResult::Failed => format!(
                "<span class=\"bad\">FAILED</span><div class=\"err\">{}</div>",
                esc(v.error.as_deref().unwrap_or(""))
            ),
        };
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{verified}</td></tr>",
            esc(&b.id),
            esc(&b.database),
            when(Some(b.started_at), now),
            human_bytes(b.stored_bytes),
            human_bytes(b.raw_bytes),
        );
    }
    h.push_str("</table><p class=\"muted\"><a href=\"/status\">/status</a> · <a href=\"/metrics\">/metrics</a> · \
                <a href=\"/readyz\">/readyz</a></p></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script> & \""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;"
        );
    }
}

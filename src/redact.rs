//! What messages and logs may show of a URL: secrets never appear in errors, logs or
//! `/status`.
//!
//! One home for the scrubbing, below every other module, so that the config (its
//! `Debug` output), the database layer (its errors) and the notifier (its logs) all
//! redact the same way.

/// `https://hooks.example.com/…` → `hooks.example.com`: what logs may show of a URL
/// that can carry a token in its path or query (webhooks).
pub fn url_host(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| "<invalid URL>".to_owned())
}

/// Removes the password (in the userinfo or a `password=` query parameter) from a URL.
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        // Unparseable: keep only the scheme, which cannot hold a secret.
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
        return format!("{scheme}:<unparseable URL>");
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("REDACTED"));
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let secret = matches!(k.as_ref(), "password" | "sslpassword");
                (
                    k.into_owned(),
                    if secret {
                        "REDACTED".into()
                    } else {
                        v.into_owned()
                    },
                )
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// True if the URL carries a password of its own (which the config should not do).
pub fn url_has_password(url: &str) -> bool {
    url::Url::parse(url)
        .is_ok_and(|u| u.password().is_some() || u.query_pairs().any(|(k, _)| k == "password"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        let r = redact_url(
            "postgres://app:s3cret@db.example:5432/app?password=hunter2&sslmode=require",
        );
        assert!(!r.contains("s3cret") && !r.contains("hunter2"), "{r}");
        assert!(
            r.contains("app@db.example") || r.contains("app:REDACTED@db.example"),
            "{r}"
        );
        assert!(r.contains("sslmode=require"));
        assert_eq!(
            redact_url("sqlite://var/demo.db?mode=rwc"),
            "sqlite://var/demo.db?mode=rwc"
        );
    }

    #[test]
    fn unparseable_urls_show_no_userinfo() {
        let r = redact_url("postgres://user:pa ss@@host:notaport/db");
        assert!(!r.contains("pa ss"), "{r}");
    }
}

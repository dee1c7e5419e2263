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

/// A URL cut where a secret may sit, by hand rather than with a URL parser, so that
/// what libpq accepts and the `url` crate does not (`postgres://user@/db`, several
/// hosts) is still shown, and everything but the secrets stays as written.
pub(crate) struct Pieces<'a> {
    /// Up to and including `://` (or the whole URL, if it has no authority).
    pub head: &'a str,
    /// Before the last `@` of the authority.
    pub userinfo: Option<&'a str>,
    /// The rest of the authority, the path, then the query without its `?`.
    pub host_path: &'a str,
    pub query: Option<&'a str>,
    /// `#…`, as written.
    pub fragment: &'a str,
}

impl<'a> Pieces<'a> {
    /// `wary`: the userinfo ends at the last `@` before the query even past a `/`
    /// (libpq stops at the first `/`, but a password with a `/` written unencoded must
    /// not be shown either).
    pub(crate) fn of(url: &'a str, wary: bool) -> Self {
        let (url, fragment) = url.find('#').map_or((url, ""), |i| url.split_at(i));
        let (before, query) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (url, None),
        };
        let (head, after) = match before.find("://") {
            Some(i) => before.split_at(i + 3),
            None => (before, ""),
        };
        let authority_end = match wary {
            true => after.len(),
            false => after.find('/').unwrap_or(after.len()),
        };
        let (userinfo, host_path) = match after[..authority_end].rfind('@') {
            Some(at) => (Some(&after[..at]), &after[at + 1..]),
            None => (None, after),
        };
        Pieces {
            head,
            userinfo,
            host_path,
            query,
            fragment,
        }
    }

    /// The query's `key=value` pieces with their percent-decoded keys.
    pub(crate) fn params(&self) -> impl Iterator<Item = (String, &'a str)> {
        self.query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let key = p.split_once('=').map_or(p, |(k, _)| k);
                (
                    percent_encoding::percent_decode_str(key)
                        .decode_utf8_lossy()
                        .into_owned(),
                    p,
                )
            })
    }
}

/// Query parameters that hold a secret.
const SECRET_PARAMS: [&str; 2] = ["password", "sslpassword"];

/// Removes the password (in the userinfo or a `password=`/`sslpassword=` query
/// parameter) from a URL; the rest stays byte for byte as written.
pub fn redact_url(url: &str) -> String {
    let pieces = Pieces::of(url, true);
    let mut out = pieces.head.to_owned();
    if let Some(userinfo) = pieces.userinfo {
        match userinfo.split_once(':') {
            Some((user, _)) => out.push_str(&format!("{user}:REDACTED@")),
            None => out.push_str(&format!("{userinfo}@")),
        }
    }
    out.push_str(pieces.host_path);
    if pieces.query.is_some() {
        let params: Vec<String> = pieces
            .params()
            .map(|(key, piece)| {
                if SECRET_PARAMS.contains(&key.as_str()) {
                    format!(
                        "{}=REDACTED",
                        piece.split_once('=').map_or(piece, |(k, _)| k)
                    )
                } else {
                    piece.to_owned()
                }
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out.push_str(pieces.fragment);
    out
}

/// True if the URL carries a password of its own (which the config should not do).
pub fn url_has_password(url: &str) -> bool {
    let pieces = Pieces::of(url, true);
    pieces.userinfo.is_some_and(|u| u.contains(':'))
        || pieces.params().any(|(key, _)| key == "password")
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

    #[test]
    fn what_libpq_accepts_is_shown_as_written() {
        for (url, shown) in [
            (
                "postgres://u:pw@/db?host=/var/run/postgresql",
                "postgres://u:REDACTED@/db?host=/var/run/postgresql",
            ),
            (
                "postgresql:///db?host=%2Fvar%2Frun&sslpassword=x%20y&options=-c%20a%3Db",
                "postgresql:///db?host=%2Fvar%2Frun&sslpassword=REDACTED&options=-c%20a%3Db",
            ),
            (
                "postgres://h1:5432,h2:5432/db",
                "postgres://h1:5432,h2:5432/db",
            ),
            ("postgres://u:p@ss@h/db#x", "postgres://u:REDACTED@h/db#x"),
            ("postgres://u:pa/ss@h/db", "postgres://u:REDACTED@h/db"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
        assert!(url_has_password("postgres://u:pw@/db"));
        assert!(url_has_password("postgres:///db?pass%77ord=x"));
        assert!(!url_has_password("postgres://u@h/db?sslpassword=x"));
    }
}

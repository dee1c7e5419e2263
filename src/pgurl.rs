//! How dbkeeper reads a PostgreSQL URL as libpq does, before anything connects: the
//! secrets taken out of it, the forms the `url` crate cannot read itself
//! (`postgres://user@/db?host=/socket/dir`), what is refused (several hosts) and
//! why. Below both the configuration (which checks a URL when it is loaded) and the
//! database layer (which resolves it).

use std::path::{Path, PathBuf};

/// Query parameters that name where to connect: read into the database layer's
/// resolved target (or refused, `service`), never passed on as written.
const RESOLVED_PARAMS: [&str; 8] = [
    "password",
    "sslpassword",
    "dbname",
    "host",
    "hostaddr",
    "port",
    "user",
    "service",
];

/// The secrets a URL may carry, taken out of it so that they never reach argv or logs.
pub(crate) struct Secrets {
    /// The URL without them (and without the parameters of [`RESOLVED_PARAMS`] that
    /// are not for sqlx), query parameters as written.
    pub url: url::Url,
    /// The query parameters not in [`RESOLVED_PARAMS`], as written.
    pub params: Vec<String>,
    pub password: Option<String>,
    pub ssl_password: Option<String>,
    /// A `service=` parameter was given (refused: a service file could name another
    /// database than the one dbkeeper resolves).
    pub service: bool,
}

/// Removes the password (userinfo or `password=` parameter) and `sslpassword=` from a
/// URL and returns them separately, so that they can travel in the environment (or a
/// private file) instead of argv, and never reach sqlx (which logs parameters it does
/// not know, with their values). The query is kept byte for byte otherwise. The error
/// says what is wrong with the URL (without its secrets).
pub(crate) fn split_secrets(raw: &str) -> Result<Secrets, String> {
    let raw = without_empty_host(raw)?;
    let mut url = url::Url::parse(&raw).map_err(|e| format!("not a URL libpq reads: {e}"))?;
    let mut password = url.password().map(percent_decode);
    let mut ssl_password = None;
    let mut service = false;
    if password.is_some() {
        url.set_password(None)
            .map_err(|()| "a password without a host".to_owned())?;
    }
    let mut for_sqlx = Vec::new();
    let mut params = Vec::new();
    for piece in url.query().unwrap_or_default().split('&') {
        if piece.is_empty() {
            continue;
        }
        let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
        let (k, v) = (percent_decode(k), percent_decode(v));
        match k.as_str() {
            "password" => password = Some(v),
            "sslpassword" => ssl_password = Some(v),
            "service" => service = true,
            "host" | "hostaddr" | "port" if v.contains(',') => return Err(several_hosts()),
            k if RESOLVED_PARAMS.contains(&k) => for_sqlx.push(piece.to_owned()),
            _ => {
                for_sqlx.push(piece.to_owned());
                params.push(piece.to_owned());
            }
        }
    }
    if for_sqlx.is_empty() {
        url.set_query(None);
    } else {
        url.set_query(Some(&for_sqlx.join("&")));
    }
    Ok(Secrets {
        url,
        params,
        password,
        ssl_password,
        service,
    })
}

/// libpq parameters that name a file on this host.
const FILE_PARAMS: [&str; 5] = ["sslrootcert", "sslcert", "sslkey", "sslcrl", "passfile"];

/// The files a PostgreSQL URL names in its query (`sslrootcert`, `sslcert`, `sslkey`,
/// `sslcrl`, `passfile`), percent-decoded, as `(parameter, path)`. `sslrootcert=system`
/// (libpq's "the system's CA store") names no file. A URL that cannot be read names
/// none (it is refused elsewhere).
pub(crate) fn named_files(raw: &str) -> Vec<(&'static str, std::path::PathBuf)> {
    let Ok(raw) = without_empty_host(raw) else {
        return Vec::new();
    };
    let Ok(url) = url::Url::parse(&raw) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for piece in url.query().unwrap_or_default().split('&') {
        let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
        let (k, v) = (percent_decode(k), percent_decode(v));
        let Some(param) = FILE_PARAMS.iter().find(|p| **p == k) else {
            continue;
        };
        if v.is_empty() || (*param == "sslrootcert" && v == "system") {
            continue;
        }
        out.push((*param, std::path::PathBuf::from(v)));
    }
    out
}

/// `raw` with the files its query names ([`named_files`]) passed through `anchor`
/// (which makes a relative path absolute); everything else byte for byte as written,
/// the password included.
pub(crate) fn anchor_files(raw: &str, anchor: &dyn Fn(&Path) -> PathBuf) -> String {
    let end = raw.find('#').unwrap_or(raw.len());
    let Some(start) = raw[..end].find('?').map(|i| i + 1) else {
        return raw.to_owned();
    };
    let pieces: Vec<String> = raw[start..end]
        .split('&')
        .map(|piece| {
            let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
            let (k, v) = (percent_decode(k), percent_decode(v));
            let names_file = FILE_PARAMS.contains(&k.as_str())
                && !v.is_empty()
                && !(k == "sslrootcert" && v == "system");
            let path = Path::new(&v);
            match anchor(path) {
                a if names_file && a != path => {
                    format!("{k}={}", encode_component(&a.to_string_lossy()))
                }
                _ => piece.to_owned(),
            }
        })
        .collect();
    format!("{}{}{}", &raw[..start], pieces.join("&"), &raw[end..])
}

fn several_hosts() -> String {
    "several hosts (libpq's failover list) are not supported: dbkeeper's own connections \
     reach one server, and its tools must back up and restore that same one; name the \
     primary, or a name or address that follows it"
        .to_owned()
}

/// `postgres://user:pw@/db?host=/run/pg` (libpq: a user, no host in the URL) as the
/// `url` crate can read it: `postgres:///db?host=/run/pg&user=user&password=pw`. Several
/// hosts (`h1,h2`) are refused.
fn without_empty_host(raw: &str) -> Result<std::borrow::Cow<'_, str>, String> {
    use crate::redact::Pieces;
    let pieces = Pieces::of(raw, false);
    let host = pieces.host_path.split('/').next().unwrap_or_default();
    if host.contains(',') {
        return Err(several_hosts());
    }
    let Some(userinfo) = pieces.userinfo.filter(|_| host.is_empty()) else {
        return Ok(raw.into());
    };
    let mut query: Vec<String> = pieces
        .query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    let (user, pw) = match userinfo.split_once(':') {
        Some((user, pw)) => (user, Some(pw)),
        None => (userinfo, None),
    };
    if !user.is_empty() {
        query.push(format!("user={}", encode_component(&percent_decode(user))));
    }
    if let Some(pw) = pw {
        query.push(format!(
            "password={}",
            encode_component(&percent_decode(pw))
        ));
    }
    let mut url = format!("{}{}", pieces.head, pieces.host_path);
    if !query.is_empty() {
        url.push('?');
        url.push_str(&query.join("&"));
    }
    url.push_str(pieces.fragment);
    Ok(url.into())
}

/// Percent-encodes everything but RFC 3986's unreserved characters: a user name,
/// password or socket directory that any URL parser decodes back to exactly `s`.
pub(crate) fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn named_files_are_percent_decoded_and_system_is_no_file() {
        let got = named_files(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=system&sslcert=%2Fa%20b%2Fc.crt&sslkey=/k&passfile=p&sslcrl=",
        );
        assert_eq!(
            got,
            [
                ("sslcert", PathBuf::from("/a b/c.crt")),
                ("sslkey", PathBuf::from("/k")),
                ("passfile", PathBuf::from("p")),
            ]
        );
        assert!(named_files("not a url").is_empty());
    }

    #[test]
    fn anchored_files_keep_the_rest_of_the_url() {
        let anchor = |p: &Path| Path::new("/etc/dbk").join(p);
        let raw = "postgres://u:p%23w@h/db?sslmode=verify-full&sslrootcert=system&sslcert=c%20d.crt&sslkey=/k&passfile=pass#frag";
        let got = anchor_files(raw, &anchor);
        assert_eq!(
            got,
            "postgres://u:p%23w@h/db?sslmode=verify-full&sslrootcert=system&sslcert=%2Fetc%2Fdbk%2Fc%20d.crt&sslkey=/k&passfile=%2Fetc%2Fdbk%2Fpass#frag"
        );
        assert_eq!(
            named_files(&got),
            vec![
                ("sslcert", PathBuf::from("/etc/dbk/c d.crt")),
                ("sslkey", PathBuf::from("/k")),
                ("passfile", PathBuf::from("/etc/dbk/pass")),
            ]
        );
        assert_eq!(anchor_files("postgres://h/db", &anchor), "postgres://h/db");
    }
}

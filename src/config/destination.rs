//! `[database.backup] destination`: where backups go. One place or a list of
//! places, each a local folder or an object-store URL (`s3://`, `gs://`, `az://`),
//! written as a string or as a table with per-destination settings. Every backup is
//! written to each destination; credentials never appear here (they come from each
//! cloud's standard environment, or from a `credentials-file`).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::Keep;

/// The object stores a destination URL may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    /// `s3://bucket/prefix`: Amazon S3 or any S3-compatible server.
    S3,
    /// `gs://bucket/prefix`: Google Cloud Storage.
    Gcs,
    /// `az://container/prefix`: Azure Blob Storage.
    Azure,
}

impl Cloud {
    pub fn scheme(self) -> &'static str {
        match self {
            Cloud::S3 => "s3",
            Cloud::Gcs => "gs",
            Cloud::Azure => "az",
        }
    }
}

/// Where one destination keeps its backups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A folder on this machine (a path, or a `file://` URL).
    Local(PathBuf),
    /// A bucket (container) and a key prefix without leading or trailing `/`.
    Remote {
        cloud: Cloud,
        bucket: String,
        prefix: String,
    },
}

impl fmt::Display for Location {
    /// The destination as metrics, `backup list` and messages name it: the folder, or
    /// the canonical URL (`s3://bucket/prefix`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(path) => write!(f, "{}", path.display()),
            Location::Remote {
                cloud,
                bucket,
                prefix,
            } if prefix.is_empty() => write!(f, "{}://{bucket}", cloud.scheme()),
            Location::Remote {
                cloud,
                bucket,
                prefix,
            } => write!(f, "{}://{bucket}/{prefix}", cloud.scheme()),
        }
    }
}

impl Location {
    /// Parses a destination as written: a URL with one of the supported schemes,
    /// or else a path.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some((scheme, _)) = text.split_once("://") else {
            if text.is_empty() {
                return Err("is empty; write a folder or an s3://, gs:// or az:// URL".into());
            }
            return Ok(Location::Local(PathBuf::from(text)));
        };
        let (_, rest) = text.split_once("://").unwrap_or_default();
        if rest.split('/').any(|s| s == "." || s == "..") {
            return Err(format!("\"{text}\" has . or .. in its prefix"));
        }
        let url = url::Url::parse(text).map_err(|e| format!("\"{text}\" is not a URL: {e}"))?;
        if !url.username().is_empty() || url.password().is_some() {
            // Never echo the URL: it holds a secret.
            return Err("holds credentials; never write them in the config: use the cloud's environment variables (AWS_ACCESS_KEY_ID …) or a credentials-file".into());
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "\"{text}\" has a query or fragment; write scheme://bucket/prefix only"
            ));
        }
        let cloud = match scheme {
            "file" => {
                let path = url.to_file_path().map_err(|()| {
                    format!("\"{text}\" is not a local path; write file:///absolute/path")
                })?;
                return Ok(Location::Local(path));
            }
            "s3" | "s3a" => Cloud::S3,
            "gs" | "gcs" => Cloud::Gcs,
            "az" | "azure" | "abfs" => Cloud::Azure,
            other => {
                return Err(format!(
                    "\"{other}://\" is not a supported destination; write a folder, file://, s3://, gs:// or az://"
                ))
            }
        };
        let bucket = url.host_str().unwrap_or_default().to_owned();
        if bucket.is_empty() {
            return Err(format!(
                "\"{text}\" names no bucket; write {scheme}://BUCKET/prefix"
            ));
        }
        let segments: Vec<&str> = url.path().split('/').filter(|s| !s.is_empty()).collect();
        let prefix = segments
            .iter()
            .map(|s| percent_decode(s).ok_or_else(|| format!("\"{text}\": {s} is not valid UTF-8")))
            .collect::<Result<Vec<_>, _>>()?
            .join("/");
        Ok(Location::Remote {
            cloud,
            bucket,
            prefix,
        })
    }

    pub fn is_local(&self) -> bool {
        matches!(self, Location::Local(_))
    }

    /// Whether `inner` is strictly inside this location: a sub-folder (as far as the
    /// file system resolves what exists) or a longer key prefix in the same bucket.
    pub fn contains(&self, inner: &Location) -> bool {
        match (inner, self) {
            (Location::Local(i), Location::Local(o)) => {
                let real = |p: &Path| {
                    p.canonicalize()
                        .unwrap_or_else(|_| p.components().collect::<PathBuf>())
                };
                let (i, o) = (real(i), real(o));
                i != o && i.starts_with(&o)
            }
            (
                Location::Remote {
                    cloud: c1,
                    bucket: b1,
                    prefix: p1,
                },
                Location::Remote {
                    cloud: c2,
                    bucket: b2,
                    prefix: p2,
                },
            ) => {
                c1 == c2
                    && b1 == b2
                    && p1 != p2
                    && (p2.is_empty() || p1.starts_with(&format!("{p2}/")))
            }
            _ => false,
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// One destination with its settings (the table form; a plain string is a table
/// with only `url`).
#[derive(Clone, PartialEq)]
pub struct DestinationConfig {
    /// Where the backups go.
    pub location: Location,
    /// The settings that apply to it.
    pub settings: DestinationSettings,
}

impl fmt::Debug for DestinationConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Destination({})", self.location)
    }
}

impl fmt::Display for DestinationConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.location.fmt(f)
    }
}

impl DestinationConfig {
    /// A local folder with no settings of its own.
    pub fn local(path: impl Into<PathBuf>) -> Self {
        DestinationConfig {
            location: Location::Local(path.into()),
            settings: DestinationSettings::default(),
        }
    }

    /// The folder, when the destination is local.
    pub fn local_dir(&self) -> Option<&Path> {
        match &self.location {
            Location::Local(p) => Some(p),
            Location::Remote { .. } => None,
        }
    }

    /// The name of the destination in metrics (`destination` label), `backup list`
    /// and `--from`.
    pub fn label(&self) -> String {
        self.location.to_string()
    }

    /// Whether `given` (a `--from` argument: the destination as written, its label,
    /// or for a folder any path to it) names this destination.
    pub fn is_named(&self, given: &str) -> bool {
        match (&self.location, Location::parse(given)) {
            (Location::Local(mine), Ok(Location::Local(theirs))) => {
                mine == &theirs
                    || matches!(
                        (mine.canonicalize(), theirs.canonicalize()),
                        (Ok(a), Ok(b)) if a == b
                    )
            }
            (mine, Ok(theirs)) => *mine == theirs,
            _ => false,
        }
    }

    /// Its own `keep`, or the backup's.
    pub fn keep<'a>(&'a self, default: &'a Keep) -> &'a Keep {
        self.settings.keep.as_ref().unwrap_or(default)
    }
}

/// The table form of a destination: `{ url = "s3://bucket/prefix", region = … }`.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DestinationSettings {
    /// A folder, `file:///path`, `s3://bucket/prefix`, `gs://bucket/prefix` or
    /// `az://container/prefix`. Required in the table form.
    #[serde(default)]
    pub url: String,
    /// Object stores: the service endpoint, e.g. `http://127.0.0.1:9000` for MinIO or
    /// another S3-compatible server. Default: the environment's (`AWS_ENDPOINT_URL`,
    /// …), else the cloud's own.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// S3: the bucket's region. Default: `AWS_REGION`/`AWS_DEFAULT_REGION`, else
    /// `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
    /// S3: path-style requests (`endpoint/bucket/key`), which most S3-compatible
    /// servers need, instead of virtual-hosted style. Default: `true` when
    /// `endpoint` is set, else virtual-hosted style.
    #[serde(default)]
    pub path_style: Option<bool>,
    /// Object stores: allow a plain `http://` endpoint (a test server on this
    /// machine). Default: `AWS_ALLOW_HTTP` etc., else `false`.
    #[serde(default)]
    pub allow_http: Option<bool>,
    /// Object stores: a file of `NAME=value` lines with this destination's
    /// credentials, named like the cloud's environment variables
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
    /// `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, …), or for `gs://` a
    /// service-account key (JSON). Must be a regular file of mode 0600 or stricter; a
    /// bare name is a systemd credential (`LoadCredential=`), any other relative
    /// path is read from the config file's directory. Default: none (the
    /// environment, then the instance's or workload's identity).
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// Object stores: how long to retry a request that failed for a transient
    /// reason (connection refused, 5xx, throttling), with exponential backoff, before
    /// the job fails naming this destination. Default: `1m`.
    #[serde(default, with = "humantime_serde")]
    pub retry_timeout: Option<std::time::Duration>,
    /// Object stores: how long after its writer stopped renewing it (every fifth of
    /// this, at most every minute) an upload lease is taken for a dead writer's, so
    /// that a backup run or the daemon's start aborts its multipart upload and removes
    /// what it left. Longer than any clock difference between hosts writing to the
    /// bucket. Default: `5m`.
    #[serde(default, with = "humantime_serde")]
    pub stale_upload_after: Option<std::time::Duration>,
    /// This destination's rotation, replacing the backup's `keep` (same keys).
    /// Default: the backup's `keep`.
    #[serde(default)]
    pub keep: Option<Keep>,
}

/// `destination`: one or several places, in the order written (the first that holds
/// a backup is where readers take it from). Never empty.
#[derive(Debug, Clone, PartialEq)]
pub struct Destinations(pub Vec<DestinationConfig>);

impl Destinations {
    pub fn iter(&self) -> std::slice::Iter<'_, DestinationConfig> {
        self.0.iter()
    }

    /// The destination `given` names (see [`DestinationConfig::is_named`]).
    pub fn named(&self, given: &str) -> Option<&DestinationConfig> {
        self.0.iter().find(|d| d.is_named(given))
    }

    /// The labels, for messages ("one of …").
    pub fn labels(&self) -> Vec<String> {
        self.0.iter().map(DestinationConfig::label).collect()
    }
}

impl<'a> IntoIterator for &'a Destinations {
    type Item = &'a DestinationConfig;
    type IntoIter = std::slice::Iter<'a, DestinationConfig>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

fn from_settings<E: de::Error>(settings: DestinationSettings) -> Result<DestinationConfig, E> {
    if settings.url.is_empty() {
        return Err(E::custom(
            "a destination table needs url = \"…\" (a folder or an s3://, gs:// or az:// URL)",
        ));
    }
    let location = Location::parse(&settings.url).map_err(E::custom)?;
    Ok(DestinationConfig { location, settings })
}

fn from_text<E: de::Error>(text: &str) -> Result<DestinationConfig, E> {
    from_settings(DestinationSettings {
        url: text.to_owned(),
        ..DestinationSettings::default()
    })
}

/// One element: a string or a table (hand-written so that serde's messages name the
/// key at fault instead of "did not match any variant").
struct One(DestinationConfig);

impl<'de> Deserialize<'de> for One {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = One;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a folder or URL, or a table with url = \"…\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<One, E> {
                from_text(v).map(One)
            }
            fn visit_map<M: MapAccess<'de>>(self, m: M) -> Result<One, M::Error> {
                let settings =
                    DestinationSettings::deserialize(de::value::MapAccessDeserializer::new(m))?;
                from_settings(settings).map(One)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Destinations {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Destinations;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a folder or URL, a table with url = \"…\", or a list of these")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Destinations, E> {
                Ok(Destinations(vec![from_text(v)?]))
            }
            fn visit_map<M: MapAccess<'de>>(self, m: M) -> Result<Destinations, M::Error> {
                let settings =
                    DestinationSettings::deserialize(de::value::MapAccessDeserializer::new(m))?;
                Ok(Destinations(vec![from_settings(settings)?]))
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut s: S) -> Result<Destinations, S::Error> {
                let mut all: Vec<DestinationConfig> = Vec::new();
                while let Some(One(d)) = s.next_element()? {
                    if all.iter().any(|o| o.location == d.location) {
                        return Err(de::Error::custom(format!("{} is listed twice", d.label())));
                    }
                    all.push(d);
                }
                if all.is_empty() {
                    return Err(de::Error::custom(
                        "is an empty list; name at least one folder or URL",
                    ));
                }
                Ok(Destinations(all))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct T {
        destination: Destinations,
    }

    fn parse(toml_text: &str) -> Result<Destinations, String> {
        toml::from_str::<T>(toml_text)
            .map(|t| t.destination)
            .map_err(|e| e.message().to_owned())
    }

    #[test]
    fn strings_tables_and_lists() {
        let d = parse(r#"destination = "/var/b""#).unwrap();
        assert_eq!(d.0[0].location, Location::Local("/var/b".into()));
        let d = parse(r#"destination = "file:///var/b""#).unwrap();
        assert_eq!(d.0[0].location, Location::Local("/var/b".into()));
        let d = parse(
            r#"destination = ["rel/dir", "s3://bkt/a/b/", { url = "gs://g", keep = { last = 2 } }, "az://c/p", "s3://bkt/a=b&c+d"]"#,
        )
        .unwrap();
        let labels = d.labels();
        assert_eq!(
            labels,
            [
                "rel/dir",
                "s3://bkt/a/b",
                "gs://g",
                "az://c/p",
                "s3://bkt/a=b&c+d"
            ]
        );
        assert!(d.0[2].settings.keep.is_some());
        let d = parse("[destination]\nurl = \"s3://x/y\"\nregion = \"eu-west-1\"\n").unwrap();
        assert_eq!(d.0[0].settings.region.as_deref(), Some("eu-west-1"));
        assert!(d.named("s3://x/y/").is_some());
        assert!(d.named("s3://x").is_none());
    }

    #[test]
    fn refusals_say_what_to_write() {
        for (text, says) in [
            (r#"destination = []"#, "empty list"),
            (
                r#"destination = "ftp://h/p""#,
                "not a supported destination",
            ),
            (
                r#"destination = "s3://AKIA:secret@bkt/p""#,
                "holds credentials",
            ),
            (r#"destination = ["/a", "/a"]"#, "listed twice"),
            (r#"destination = { url = "s3://b", bogus = 1 }"#, "bogus"),
            (r#"destination = { region = "x" }"#, "needs url"),
            (r#"destination = "s3:///p""#, "names no bucket"),
            (r#"destination = "s3://b/../p""#, ". or .."),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
            assert!(!err.contains("secret"), "{err}");
        }
    }
}

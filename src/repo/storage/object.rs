//! Object stores (Amazon S3 and S3-compatible servers, Google Cloud Storage, Azure
//! Blob Storage) as a [`Storage`], through the `object_store` crate.
//!
//! How the contract of [`super`] is kept without rename or file locks:
//! - **Streaming, bounded memory:** an archive goes up as a multipart upload straight
//!   to its final key, in parts of [`PART_SIZE`] (growing past 2,000 parts, so the
//!   10,000-part limit allows ~300 GB), at most [`IN_FLIGHT`] parts uploading while
//!   the next fills, in buffers reused from part to part. An archive smaller than one part is one conditional PUT.
//! - **Published atomically, never overwritten:** a multipart upload is invisible
//!   until completed, and completes only after the key was found free (a single PUT
//!   is `If-None-Match: *`, where the store supports it). The manifest, written last
//!   by the caller, is what makes a backup exist; an archive without one is ignored.
//! - **Who is writing:** a writer keeps a small lease object `.<name>.upload` next to
//!   the archive (hidden from [`Storage::list`]), naming its multipart upload and
//!   rewritten every minute (at most [`LEASE_REFRESH`]) while the upload or its
//!   [`Publishing`] guard lives. A lease older than `stale-upload-after` (default
//!   [`LEASE_TTL`], judged by the store's clock) is a dead writer's:
//!   [`Storage::clean_uploads`] aborts its multipart upload and deletes the lease, and
//!   the catalog's clean-up then removes an archive it left without a manifest.
//! - **Reads see one version:** an opened object is pinned to its ETag; every read
//!   is `If-Match` that ETag, so a replaced object fails the read instead of mixing
//!   two versions.
//! - **Transient errors** are retried with exponential backoff by `object_store`
//!   (up to `retry-timeout`, default one minute); then the job fails naming the
//!   destination.
//!
//! The trait is synchronous (the archive pipeline runs on blocking threads), the
//! crate asynchronous: every request runs on one small runtime of its own
//! ([`io_runtime`]), which the calling thread waits on. Calling from async code blocks
//! that thread only for the request, as a local file system call would.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use super::{bare, Object, Publishing, Reader, Storage, Upload, Version};
use crate::config::{Cloud, DestinationConfig, Location};

/// Size of the first 2,000 parts of a multipart upload (S3's minimum); it doubles
/// every 2,000 parts after that (S3 allows 10,000 parts).
pub const PART_SIZE: usize = 5 << 20;
const PARTS_PER_SIZE: usize = 2_000;
const MAX_PARTS: usize = 10_000;
/// Parts uploading while the next one fills.
pub const IN_FLIGHT: usize = 2;
/// Default `stale-upload-after`: a lease not rewritten for this long is a dead
/// writer's.
pub const LEASE_TTL: Duration = Duration::from_secs(300);
/// How often a live writer rewrites its lease, at most.
pub const LEASE_REFRESH: Duration = Duration::from_secs(60);
const LEASE_SUFFIX: &str = ".upload";
/// Default `retry-timeout`.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(60);

/// The runtime every object-store request runs on (see the module docs).
fn io_runtime() -> io::Result<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dbkeeper-store")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| io::Error::other(format!("cannot start the object-store runtime: {e}")))
}

/// Runs `fut` on [`io_runtime`] and waits for it, from any thread (async or not).
fn block<T: Send + 'static>(fut: impl Future<Output = T> + Send + 'static) -> io::Result<T> {
    let handle = io_runtime()?.spawn(fut);
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    io_runtime()?.spawn(async move {
        let _ = tx.send(handle.await);
    });
    rx.recv()
        .map_err(|_| io::Error::other("the object-store runtime stopped"))?
        .map_err(|e| io::Error::other(format!("object-store request failed: {e}")))
}

/// The store and bucket behind one destination, shared by its namespaces.
#[derive(Clone)]
struct Store {
    objects: Arc<dyn ObjectStore>,
    multipart: Arc<dyn MultipartStore>,
    /// `s3://bucket`, for messages.
    bucket_url: String,
    /// `stale-upload-after`.
    lease_ttl: Duration,
}

impl Store {
    /// How often a live writer renews its lease.
    fn lease_refresh(&self) -> Duration {
        (self.lease_ttl / 5).min(LEASE_REFRESH)
    }

    /// Whether a lease last written at `written` is alive at `now` (both by the
    /// store's clock, so that a host whose clock runs ahead takes no live writer for
    /// dead).
    fn lease_fresh(
        &self,
        written: chrono::DateTime<chrono::Utc>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> bool {
        let age = now - written;
        age < chrono::Duration::from_std(self.lease_ttl).unwrap_or(chrono::Duration::MAX)
    }
}

/// One namespace (`<prefix>/<database>` …) in an object store.
#[derive(Clone)]
pub struct ObjectStorage {
    store: Store,
    /// The key prefix of the namespace, without trailing `/`.
    dir: String,
}

impl std::fmt::Debug for ObjectStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectStorage({})", self.label())
    }
}

/// Writers alive in this process, by lease key: the same process never takes its own
/// upload for a dead one, whatever the clocks say.
fn live() -> &'static Mutex<HashSet<String>> {
    static LIVE: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    LIVE.get_or_init(Default::default)
}

fn set_live(key: &str, alive: bool) {
    if let Ok(mut set) = live().lock() {
        if alive {
            set.insert(key.to_owned());
        } else {
            set.remove(key);
        }
    }
}

fn is_live(key: &str) -> bool {
    live().lock().map(|s| s.contains(key)).unwrap_or(false)
}

/// Maps the crate's errors onto `io::ErrorKind`s the callers already handle, with
/// a message that names the object and says what to check. `object_store` never
/// puts a credential into its messages (it signs with headers).
fn io_error(what: &str, e: object_store::Error) -> io::Error {
    use object_store::Error as E;
    let text = e.to_string();
    // Some stores' refusals arrive as generic errors carrying the HTTP status.
    let refused = matches!(e, E::PermissionDenied { .. } | E::Unauthenticated { .. })
        || [
            "401 Unauthorized",
            "403 Forbidden",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
        ]
        .iter()
        .any(|m| text.contains(m));
    if refused {
        return io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{what}: access denied ({}); check the destination's credentials (the cloud's environment variables or credentials-file) and its permissions on the bucket", one_line(&text)),
            );
    }
    let kind = match &e {
        E::NotFound { .. } => io::ErrorKind::NotFound,
        E::AlreadyExists { .. } => io::ErrorKind::AlreadyExists,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{what}: {}", one_line(&text)))
}

/// A store's error as one line of bounded length: servers answer with XML bodies
/// that would otherwise fill a log line (or several).
fn one_line(text: &str) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(600) {
        Some((at, _)) => format!("{}…", &flat[..at]),
        None => flat,
    }
}

/// `NAME=value` lines (comments `#`, blank lines, `export ` allowed), or a JSON
/// service-account key for GCS.
enum Credentials {
    Pairs(Vec<(String, Zeroizing<String>)>),
    Json(Zeroizing<String>),
}

fn read_credentials(path: &Path) -> io::Result<Credentials> {
    use std::os::unix::fs::MetadataExt;
    let file = super::open_regular(path)?;
    let mode = file.metadata()?.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} has mode {mode:o}; it holds secrets: chmod 0600 it",
                path.display()
            ),
        ));
    }
    let mut text = Zeroizing::new(String::new());
    file.take(1 << 20).read_to_string(&mut text)?;
    if text.trim_start().starts_with('{') {
        return Ok(Credentials::Json(text));
    }
    let mut pairs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, value)) = line.split_once('=') else {
            // Never quote the line: it may be a secret.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} line {}: expected NAME=value", path.display(), n + 1),
            ));
        };
        let value = value.trim().trim_matches('"').trim_matches('\'');
        pairs.push((name.trim().to_owned(), Zeroizing::new(value.to_owned())));
    }
    Ok(Credentials::Pairs(pairs))
}

/// The settings of a credentials file as the cloud's configuration keys `K` (the
/// lower-cased names of its environment variables); a JSON document is not such a file.
fn settings_of<'a, K: std::str::FromStr>(
    creds: &'a Option<(&Path, Credentials)>,
) -> io::Result<Vec<(K, &'a str)>> {
    let Some((path, creds)) = creds else {
        return Ok(Vec::new());
    };
    let Credentials::Pairs(pairs) = creds else {
        return Err(unknown_key(path, "a JSON document"));
    };
    pairs
        .iter()
        .map(|(name, value)| {
            let key = name
                .to_ascii_lowercase()
                .parse()
                .map_err(|_| unknown_key(path, name))?;
            Ok((key, value.as_str()))
        })
        .collect()
}

fn unknown_key(path: &Path, name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{}: {name} is not a setting of this cloud (write the names of its environment variables, e.g. AWS_ACCESS_KEY_ID)",
            path.display()
        ),
    )
}

impl ObjectStorage {
    /// The namespace `parts` under the destination `dest` (which must be remote).
    /// Credentials come from the environment, then from `credentials-file`.
    pub fn open(dest: &DestinationConfig, parts: &[&str]) -> io::Result<Self> {
        let Location::Remote {
            cloud,
            bucket,
            prefix,
        } = &dest.location
        else {
            return Err(io::Error::other("not an object-store destination"));
        };
        let s = &dest.settings;
        let retry = RetryConfig {
            retry_timeout: s.retry_timeout.unwrap_or(RETRY_TIMEOUT),
            ..RetryConfig::default()
        };
        let creds = s
            .credentials_file
            .as_deref()
            .map(|p| read_credentials(p).map(|c| (p, c)))
            .transpose()?;
        let build_err =
            |e: object_store::Error| io::Error::other(format!("cannot use {}: {e}", dest.label()));
        let (objects, multipart): (Arc<dyn ObjectStore>, Arc<dyn MultipartStore>) = match cloud {
            Cloud::S3 => {
                use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry);
                for (key, value) in settings_of::<AmazonS3ConfigKey>(&creds)? {
                    b = b.with_config(key, value);
                }
                if let Some(e) = &s.endpoint {
                    b = b.with_endpoint(e);
                }
                if let Some(r) = &s.region {
                    b = b.with_region(r);
                }
                if let Some(p) = s.path_style {
                    b = b.with_virtual_hosted_style_request(!p);
                }
                if let Some(h) = s.allow_http {
                    b = b.with_allow_http(h);
                }
                let store = Arc::new(b.build().map_err(build_err)?);
                (store.clone(), store)
            }
            Cloud::Gcs => {
                use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
                let mut b = GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry);
                if let Some((_, Credentials::Json(json))) = &creds {
                    b = b.with_service_account_key(json.as_str());
                } else {
                    for (key, value) in settings_of::<GoogleConfigKey>(&creds)? {
                        b = b.with_config(key, value);
                    }
                }
                if let Some(e) = &s.endpoint {
                    b = b.with_base_url(e);
                }
                if let Some(h) = s.allow_http {
                    b = b
                        .with_client_options(object_store::ClientOptions::new().with_allow_http(h));
                }
                let store = Arc::new(b.build().map_err(build_err)?);
                (store.clone(), store)
            }
            Cloud::Azure => {
                use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
                let mut b = MicrosoftAzureBuilder::from_env()
                    .with_container_name(bucket)
                    .with_retry(retry);
                for (key, value) in settings_of::<AzureConfigKey>(&creds)? {
                    b = b.with_config(key, value);
                }
                if let Some(e) = &s.endpoint {
                    b = b.with_endpoint(e.clone());
                }
                if let Some(h) = s.allow_http {
                    b = b.with_allow_http(h);
                }
                let store = Arc::new(b.build().map_err(build_err)?);
                (store.clone(), store)
            }
        };
        let dir = std::iter::once(prefix.as_str())
            .chain(parts.iter().copied())
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("/");
        Ok(ObjectStorage {
            store: Store {
                objects,
                multipart,
                bucket_url: format!("{}://{bucket}", cloud.scheme()),
                lease_ttl: s.stale_upload_after.unwrap_or(LEASE_TTL),
            },
            dir,
        })
    }

    fn label(&self) -> String {
        if self.dir.is_empty() {
            self.store.bucket_url.clone()
        } else {
            format!("{}/{}", self.store.bucket_url, self.dir)
        }
    }

    fn key(&self, name: &str) -> Key {
        if self.dir.is_empty() {
            Key::from(name)
        } else {
            Key::from(format!("{}/{name}", self.dir))
        }
    }

    fn lease_key(&self, name: &str) -> Key {
        self.key(&format!(".{name}{LEASE_SUFFIX}"))
    }

    fn url_of(&self, name: &str) -> String {
        format!("{}/{name}", self.label())
    }

    /// The store's clock: the time it stamps on a small object written now.
    fn server_now(&self) -> io::Result<chrono::DateTime<chrono::Utc>> {
        let key = self.key(&format!(".clock.{:016x}", rand::random::<u64>()));
        let store = self.store.objects.clone();
        let what = format!("cannot read the clock of {}", self.label());
        block(async move {
            store.put(&key, PutPayload::from_static(b"")).await?;
            let meta = store.head(&key).await;
            let _ = store.delete(&key).await;
            meta.map(|m| m.last_modified)
        })?
        .map_err(|e| io_error(&what, e))
    }

    /// Every direct child's name, hidden ones included (leases).
    fn names(&self) -> io::Result<Vec<String>> {
        let store = self.store.objects.clone();
        let prefix = (!self.dir.is_empty()).then(|| Key::from(self.dir.as_str()));
        let label = self.label();
        let listed = block(async move { store.list_with_delimiter(prefix.as_ref()).await })?
            .map_err(|e| io_error(&format!("cannot list {label}"), e))?;
        let objects = listed.objects.into_iter().map(|m| m.location);
        let folders = listed.common_prefixes.into_iter();
        Ok(objects
            .chain(folders)
            .filter_map(|k| k.filename().map(str::to_owned))
            .collect())
    }

    fn head(&self, key: Key) -> io::Result<object_store::ObjectMeta> {
        let store = self.store.objects.clone();
        let what = format!("cannot read {}/{}", self.store.bucket_url, key);
        block(async move { store.head(&key).await })?.map_err(|e| io_error(&what, e))
    }

    /// Writes this writer's lease (see the module docs).
    fn write_lease(store: &Store, key: &Key, lease: &Lease) -> io::Result<()> {
        let body = serde_json::to_vec(lease).map_err(io::Error::other)?;
        let (objects, key2) = (store.objects.clone(), key.clone());
        block(async move { objects.put(&key2, PutPayload::from(body)).await })?
            .map_err(|e| io_error(&format!("cannot write {}/{key}", store.bucket_url), e))?;
        Ok(())
    }

    /// Starts rewriting the lease every [`LEASE_REFRESH`] until the returned task
    /// is aborted.
    fn keep_lease(
        store: &Store,
        key: &Key,
        lease: Arc<Mutex<Lease>>,
    ) -> io::Result<JoinHandle<()>> {
        let (objects, key) = (store.objects.clone(), key.clone());
        let every = store.lease_refresh();
        Ok(io_runtime()?.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let body = match lease.lock() {
                    Ok(l) => serde_json::to_vec(&*l).unwrap_or_default(),
                    Err(_) => return,
                };
                if let Err(e) = objects.put(&key, PutPayload::from(body)).await {
                    tracing::warn!(lease = %key, "cannot renew an upload lease: {e}");
                }
            }
        }))
    }
}

/// What a lease object holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Lease {
    /// The multipart upload to abort if the writer dies.
    upload_id: Option<String>,
}

impl ObjectStorage {
    /// A streaming upload of `name`; `replacing` lets it overwrite an existing
    /// object (see [`Storage::put_replacing`]).
    fn start_upload(&self, name: &str, replacing: bool) -> io::Result<Box<dyn Upload>> {
        let name = bare(name)?;
        let lease_key = self.lease_key(name);
        let lease = Arc::new(Mutex::new(Lease::default()));
        Self::write_lease(&self.store, &lease_key, &Lease::default())?;
        set_live(lease_key.as_ref(), true);
        let refresher = Self::keep_lease(&self.store, &lease_key, lease.clone())?;
        Ok(Box::new(ObjectUpload {
            store: self.store.clone(),
            key: self.key(name),
            url: self.url_of(name),
            lease_key,
            lease,
            refresher: Some(refresher),
            buf: Vec::new(),
            upload_id: None,
            parts: Vec::new(),
            in_flight: VecDeque::new(),
            spare: Vec::new(),
            written: 0,
            done: None,
            published: false,
            replacing,
        }))
    }
}

impl Storage for ObjectStorage {
    fn location(&self) -> PathBuf {
        PathBuf::from(self.label())
    }

    /// Nothing to create: a prefix exists once something is written under it.
    fn prepare(&self) -> io::Result<()> {
        Ok(())
    }

    fn put(&self, name: &str) -> io::Result<Box<dyn Upload>> {
        self.start_upload(name, false)
    }

    fn put_replacing(&self, name: &str) -> io::Result<Box<dyn Upload>> {
        self.start_upload(name, true)
    }

    /// One PUT: atomic on every store, replacing what was there.
    fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let key = self.key(bare(name)?);
        let store = self.store.objects.clone();
        let body = PutPayload::from(bytes.to_vec());
        let what = format!("cannot write {}", self.url_of(name));
        block(async move { store.put(&key, body).await })?.map_err(|e| io_error(&what, e))?;
        Ok(())
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn Object>> {
        let key = self.key(bare(name)?);
        let meta = self.head(key.clone())?;
        Ok(Box::new(RemoteObject::new(
            self.store.clone(),
            key,
            PathBuf::from(self.url_of(name)),
            &meta.e_tag,
            &meta.version,
            meta.size,
        )))
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        Ok(self
            .names()?
            .into_iter()
            .filter(|n| n.starts_with(prefix) && !n.starts_with('.'))
            .collect())
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        let key = self.key(bare(name)?);
        let store = self.store.objects.clone();
        let what = format!("cannot delete {}", self.url_of(name));
        match block(async move { store.delete(&key).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(io_error(&what, e)),
        }
    }

    fn confirm(&self, name: &str, version: &Version) -> io::Result<()> {
        let meta = self.head(self.key(bare(name)?)).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                io::Error::new(io::ErrorKind::NotFound, format!(
                    "{} was removed while its manifest was written (a clean-up that took this writer for dead? see stale-upload-after)",
                    self.url_of(name)
                ))
            } else {
                e
            }
        })?;
        if version_of(&meta.e_tag, &meta.version, meta.size) != *version {
            return Err(io::Error::other(format!(
                "{} was replaced while its manifest was written (another writer of the same backup id?)",
                self.url_of(name)
            )));
        }
        Ok(())
    }

    /// A lease this process holds, or one rewritten within `stale-upload-after`
    /// (by the store's clock).
    fn in_use(&self, name: &str) -> io::Result<bool> {
        let key = self.lease_key(bare(name)?);
        if is_live(key.as_ref()) {
            return Ok(true);
        }
        match self.head(key) {
            Ok(meta) => Ok(self
                .store
                .lease_fresh(meta.last_modified, self.server_now()?)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Leases of dead writers: their multipart uploads are aborted (the parts are
    /// freed), then the leases deleted.
    fn clean_uploads(&self) -> io::Result<Vec<String>> {
        let mut removed = Vec::new();
        let mut now = None;
        for file in self.names()? {
            let Some(name) = file
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(LEASE_SUFFIX))
            else {
                continue;
            };
            let key = self.key(&file);
            if is_live(key.as_ref()) {
                continue;
            }
            let meta = match self.head(key.clone()) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let now = match now {
                Some(t) => t,
                None => *now.insert(self.server_now()?),
            };
            if self.store.lease_fresh(meta.last_modified, now) {
                continue;
            }
            let store = self.store.clone();
            let (k, target) = (key.clone(), self.key(name));
            let url = self.url_of(&file);
            block(async move {
                let lease: Lease = match store.objects.get(&k).await {
                    Ok(got) => match got.bytes().await {
                        Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
                        Err(_) => Lease::default(),
                    },
                    Err(object_store::Error::NotFound { .. }) => return Ok(()),
                    Err(e) => return Err(io_error(&format!("cannot read {url}"), e)),
                };
                if let Some(id) = &lease.upload_id {
                    match store.multipart.abort_multipart(&target, id).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => {
                            return Err(io_error(
                                &format!("cannot abort the upload of {target}"),
                                e,
                            ))
                        }
                    }
                }
                match store.objects.delete(&k).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(io_error(&format!("cannot delete {url}"), e)),
                }
            })??;
            removed.push(file);
        }
        Ok(removed)
    }
}

/// The part size for part number `n` (0-based).
fn part_size(n: usize) -> usize {
    PART_SIZE << (n / PARTS_PER_SIZE).min(4)
}

/// An archive being uploaded (see the module docs).
struct ObjectUpload {
    store: Store,
    key: Key,
    url: String,
    lease_key: Key,
    lease: Arc<Mutex<Lease>>,
    refresher: Option<JoinHandle<()>>,
    buf: Vec<u8>,
    upload_id: Option<String>,
    parts: Vec<PartId>,
    in_flight: VecDeque<JoinHandle<(Result<PartId, object_store::Error>, Bytes)>>,
    /// Buffers of parts already sent, for the next parts: the same few buffers
    /// for the whole upload, instead of a fresh allocation per part that the
    /// allocator may keep.
    spare: Vec<Vec<u8>>,
    written: u64,
    /// Set once completed: the stored object.
    done: Option<Arc<RemoteObject>>,
    published: bool,
    /// Made by [`Storage::put_replacing`]: completing overwrites the object.
    replacing: bool,
}

impl ObjectUpload {
    fn fail(&self, what: &str, e: object_store::Error) -> io::Error {
        io_error(&format!("{what} {}", self.url), e)
    }

    /// Waits for the oldest part in flight.
    fn settle_one(&mut self) -> io::Result<()> {
        if let Some(task) = self.in_flight.pop_front() {
            let (part, data) =
                block(task)?.map_err(|e| io::Error::other(format!("upload task failed: {e}")))?;
            let part = part.map_err(|e| self.fail("cannot upload a part of", e))?;
            self.parts.push(part);
            if let Ok(buf) = data.try_into_mut() {
                let mut buf = Vec::from(buf);
                buf.clear();
                self.spare.push(buf);
            }
        }
        Ok(())
    }

    /// Sends the filled buffer as the next part, starting the multipart upload first.
    fn send_part(&mut self) -> io::Result<()> {
        if self.upload_id.is_none() {
            let (mp, key) = (self.store.multipart.clone(), self.key.clone());
            let id = block(async move { mp.create_multipart(&key).await })?
                .map_err(|e| self.fail("cannot start uploading", e))?;
            let lease = Lease {
                upload_id: Some(id.clone()),
            };
            if let Ok(mut l) = self.lease.lock() {
                *l = lease.clone();
            }
            self.upload_id = Some(id);
            ObjectStorage::write_lease(&self.store, &self.lease_key, &lease)?;
        }
        let index = self.parts.len() + self.in_flight.len();
        if index >= MAX_PARTS {
            return Err(io::Error::other(format!(
                "{} exceeds the {MAX_PARTS} parts an upload may have",
                self.url
            )));
        }
        while self.in_flight.len() >= IN_FLIGHT {
            self.settle_one()?;
        }
        let next = self.spare.pop().unwrap_or_default();
        let data = Bytes::from(std::mem::replace(&mut self.buf, next));
        let (mp, key) = (self.store.multipart.clone(), self.key.clone());
        let id = self.upload_id.clone().unwrap_or_default();
        let task = io_runtime()?.spawn(async move {
            let part = mp
                .put_part(&key, &id, index, PutPayload::from(data.clone()))
                .await;
            (part, data)
        });
        self.in_flight.push_back(task);
        Ok(())
    }

    /// Ends the upload: the last part and the completion, or one conditional PUT for
    /// an archive smaller than a part; then checks what the store holds.
    fn complete(&mut self) -> io::Result<Arc<RemoteObject>> {
        if let Some(done) = &self.done {
            return Ok(done.clone());
        }
        let (objects, key) = (self.store.objects.clone(), self.key.clone());
        let result = if self.upload_id.is_none() {
            let body = PutPayload::from(Bytes::from(std::mem::take(&mut self.buf)));
            let opts = PutOptions {
                mode: if self.replacing {
                    PutMode::Overwrite
                } else {
                    PutMode::Create
                },
                ..PutOptions::default()
            };
            match block(async move { objects.put_opts(&key, body, opts).await })? {
                Ok(r) => r,
                Err(object_store::Error::NotImplemented { .. }) => {
                    return Err(io::Error::other(format!(
                        "{}: the store does not support conditional writes",
                        self.url
                    )))
                }
                Err(e) => return Err(self.fail("cannot store", e)),
            }
        } else {
            if !self.buf.is_empty() {
                self.send_part()?;
            }
            while !self.in_flight.is_empty() {
                self.settle_one()?;
            }
            // Never replace an object: the key must still be free when the upload
            // completes (object_store offers no conditional completion), unless
            // replacing it is the point.
            let head = if self.replacing {
                Err(object_store::Error::NotFound {
                    path: String::new(),
                    source: "replacing".into(),
                })
            } else {
                let (objects, key) = (objects.clone(), key.clone());
                block(async move { objects.head(&key).await })?
            };
            match head {
                Err(object_store::Error::NotFound { .. }) => {}
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} already exists", self.url),
                    ))
                }
                Err(e) => return Err(self.fail("cannot check", e)),
            }
            let (mp, key) = (self.store.multipart.clone(), self.key.clone());
            let id = self.upload_id.clone().unwrap_or_default();
            let parts = std::mem::take(&mut self.parts);
            block(async move { mp.complete_multipart(&key, &id, parts).await })?
                .map_err(|e| self.fail("cannot complete the upload of", e))?
        };
        self.upload_id = None;
        let meta = {
            let (objects, key) = (self.store.objects.clone(), self.key.clone());
            block(async move { objects.head(&key).await })?
                .map_err(|e| self.fail("cannot check the stored", e))?
        };
        if meta.size != self.written {
            return Err(io::Error::other(format!(
                "{} holds {} bytes after the upload, {} were sent",
                self.url, meta.size, self.written
            )));
        }
        if result.e_tag.is_some() && meta.e_tag.is_some() && result.e_tag != meta.e_tag {
            return Err(io::Error::other(format!(
                "{} changed while it was being stored (another writer?)",
                self.url
            )));
        }
        let done = Arc::new(RemoteObject::new(
            self.store.clone(),
            self.key.clone(),
            PathBuf::from(&self.url),
            &meta.e_tag,
            &meta.version,
            meta.size,
        ));
        self.done = Some(done.clone());
        Ok(done)
    }
}

impl Write for ObjectUpload {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.done.is_some() {
            return Err(io::Error::other("the upload is already complete"));
        }
        let index = self.parts.len() + self.in_flight.len();
        let room = part_size(index).saturating_sub(self.buf.len());
        let n = data.len().min(room);
        if self.buf.capacity() < part_size(index) {
            self.buf.reserve_exact(part_size(index) - self.buf.len());
        }
        self.buf.extend_from_slice(&data[..n]);
        self.written += n as u64;
        if self.buf.len() >= part_size(index) {
            self.send_part()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Upload for ObjectUpload {
    fn written(&mut self) -> io::Result<Box<dyn Object>> {
        let done = self.complete()?;
        Ok(Box::new(done.as_ref().clone()))
    }

    fn publish(mut self: Box<Self>) -> io::Result<Publishing> {
        self.complete()?;
        self.published = true;
        Ok(Box::new(LeaseGuard {
            store: self.store.clone(),
            lease_key: self.lease_key.clone(),
            refresher: self.refresher.take(),
        }))
    }
}

impl Drop for ObjectUpload {
    /// Unpublished: the parts are aborted (or the completed object deleted), then the
    /// lease. When the store cannot be reached, the lease stays and a later clean-up
    /// finishes the job.
    fn drop(&mut self) {
        for task in self.in_flight.drain(..) {
            task.abort();
        }
        if self.published {
            return;
        }
        if let Some(r) = self.refresher.take() {
            r.abort();
        }
        let store = self.store.clone();
        let (key, lease_key) = (self.key.clone(), self.lease_key.clone());
        let upload_id = self.upload_id.take();
        // A completed replacement has already overwritten the old object: deleting
        // it would leave nothing, so it stays (its manifest is repaired later).
        let completed = self.done.is_some() && !self.replacing;
        let cleaned = block(async move {
            if let Some(id) = upload_id {
                store.multipart.abort_multipart(&key, &id).await?;
            } else if completed {
                store.objects.delete(&key).await?;
            }
            store.objects.delete(&lease_key).await
        });
        match cleaned {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(upload = %self.url, "cannot remove an unfinished upload (a later backup will): {e}")
            }
            Err(e) => tracing::warn!(upload = %self.url, "{e}"),
        }
        set_live(self.lease_key.as_ref(), false);
    }
}

/// Held from publishing until the manifest is written: keeps the lease alive.
struct LeaseGuard {
    store: Store,
    lease_key: Key,
    refresher: Option<JoinHandle<()>>,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(r) = self.refresher.take() {
            r.abort();
        }
        let (objects, key) = (self.store.objects.clone(), self.lease_key.clone());
        if let Ok(Err(e)) = block(async move { objects.delete(&key).await }) {
            tracing::warn!(lease = %self.lease_key, "cannot delete an upload lease (it expires by itself): {e}");
        }
        set_live(self.lease_key.as_ref(), false);
    }
}

/// One version of a stored object: every read is `If-Match` its ETag.
#[derive(Clone)]
pub struct RemoteObject {
    store: Store,
    key: Key,
    location: PathBuf,
    e_tag: Option<String>,
    version_id: Option<String>,
    version: Version,
    size: u64,
}

/// The [`Version`] of an object as the store describes it.
fn version_of(e_tag: &Option<String>, version_id: &Option<String>, size: u64) -> Version {
    Version(format!(
        "{}:{}:{size}",
        e_tag.as_deref().unwrap_or("-"),
        version_id.as_deref().unwrap_or("-"),
    ))
}

impl RemoteObject {
    fn new(
        store: Store,
        key: Key,
        location: PathBuf,
        e_tag: &Option<String>,
        version_id: &Option<String>,
        size: u64,
    ) -> Self {
        let version = version_of(e_tag, version_id, size);
        RemoteObject {
            store,
            key,
            location,
            e_tag: e_tag.clone(),
            version_id: version_id.clone(),
            version,
            size,
        }
    }
}

impl Object for RemoteObject {
    fn location(&self) -> &Path {
        &self.location
    }

    fn version(&self) -> &Version {
        &self.version
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, range: Option<Range<u64>>) -> io::Result<Reader> {
        let range = range.unwrap_or(0..self.size);
        let end = range.end.min(self.size);
        if range.start >= end {
            return Ok(Box::new(io::empty()));
        }
        let opts = GetOptions {
            if_match: self.e_tag.clone(),
            version: self.version_id.clone(),
            range: Some(GetRange::Bounded(range.start..end)),
            ..GetOptions::default()
        };
        let (objects, key) = (self.store.objects.clone(), self.key.clone());
        let where_ = self.location.display().to_string();
        // A few chunks ahead at most: memory stays bounded whatever the size.
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
        io_runtime()?.spawn(async move {
            let got = match objects.get_opts(&key, opts).await {
                Ok(g) => g,
                Err(e) => {
                    let e = match e {
                        object_store::Error::Precondition { .. } => io::Error::other(format!(
                            "{where_} changed since it was opened (replaced by another writer?)"
                        )),
                        e => io_error(&format!("cannot read {where_}"), e),
                    };
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let mut stream = got.into_stream();
            while let Some(chunk) = stream.next().await {
                let item = chunk.map_err(|e| io_error(&format!("cannot read {where_}"), e));
                let failed = item.is_err();
                // A dropped reader ends the transfer.
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Box::new(ChannelReader {
            rx,
            chunk: Bytes::new(),
            left: end - range.start,
            location: self.location.clone(),
        }))
    }
}

/// The sync side of a streamed GET.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
    left: u64,
    location: PathBuf,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            if self.left == 0 {
                return Ok(0);
            }
            // Not tokio's blocking_recv: readers may sit in async code (a manifest read
            // by the catalog), where that panics; the sender never runs on this thread.
            match futures_executor::block_on(self.rx.recv()) {
                Some(Ok(b)) => self.chunk = b,
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} ended early", self.location.display()),
                    ))
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        self.left = self.left.saturating_sub(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_grow_so_that_300_gb_fit() {
        let total: u64 = (0..MAX_PARTS).map(|n| part_size(n) as u64).sum();
        assert!(total > 300 << 30, "{total}");
        assert_eq!(part_size(0), PART_SIZE);
        assert_eq!(part_size(PARTS_PER_SIZE), 2 * PART_SIZE);
    }

    #[test]
    fn credentials_files_never_echo_a_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        std::fs::write(&path, "AWS_ACCESS_KEY_ID=AKIA\nthis-line-is-secret\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = read_credentials(&path).err().unwrap().to_string();
        assert!(err.contains("line 2") && !err.contains("secret"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_credentials(&path).err().unwrap().to_string();
        assert!(err.contains("chmod 0600"), "{err}");
    }
}

//! Where archives and manifests are kept: the [`Storage`] contract, [`for_backups`]
//! which opens every configured destination ([`Place`]), the local directory
//! ([`local`], [`Destination`]), object stores ([`object`]), and [`FanOut`], which
//! writes one archive to several destinations at once.
//!
//! What a backend must guarantee, whatever it stores in: nothing is visible under
//! its name until it is complete and durable (a streaming put is published
//! atomically, and never replaces an existing object), an unfinished upload is
//! removed when dropped or by [`Storage::clean_uploads`] after a crash, and reads
//! return exactly what was published. Every reader of one opened [`Object`] sees the
//! same version of it, however often it reads: a check and the use that follows it
//! never read two different things. An object store (S3, GCS, Azure) implements the
//! same traits (see [`object`] for how).
//!
//! Callers (the catalog, rotation, verify, restore, the backup job and the CLI) hold
//! an `Arc<dyn Storage>` and never a path; a new backend is one file here plus its
//! case in [`open`]. The scratch helpers re-exported below are not storage:
//! they work in the state directory (`<state-dir>/tmp`), which is always local.

pub mod fanout;
pub mod local;
pub mod object;

use std::fmt;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{BackupConfig, DestinationConfig, Location};

pub use fanout::FanOut;
pub use local::{
    bare, clean_scratch, create_private_dir, open_regular, scratch_dir, scratch_file, sync_dir,
    Destination, LocalObject, Scratch, TempFile, ARCHIVE_SUFFIX, MANIFEST_SUFFIX,
};

/// A stream of an object's bytes, owned (it can be moved to a blocking thread).
pub type Reader = Box<dyn Read + Send>;

/// One namespace of objects under one backup destination: a database's backups
/// (`<id>.dbk`, `<id>.manifest.json`) or one retention rule's exports. Names are
/// bare (no separator, not starting with `.`); anything else is refused with
/// `InvalidInput`.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Where the objects are, for messages only (a folder, a URL).
    fn location(&self) -> PathBuf;

    /// Creates the namespace if it does not exist yet; refuses one that cannot be
    /// trusted to stay where it is (locally: a folder that is a symbolic link).
    fn prepare(&self) -> io::Result<()>;

    /// Starts writing the object `name` (streaming put). Nothing is visible under
    /// `name` until [`Upload::publish`]; dropped unpublished, the upload is removed.
    fn put(&self, name: &str) -> io::Result<Box<dyn Upload>>;

    /// [`Storage::put`] whose [`Upload::publish`] atomically replaces an existing
    /// object `name` (rewrapping an archive under new keys). Locally the old object
    /// stays intact until the rename; on an object store, completing the upload
    /// ([`Upload::written`]) already replaces it, and a completed replacement is
    /// not removed when dropped.
    fn put_replacing(&self, name: &str) -> io::Result<Box<dyn Upload>>;

    /// Writes a small object in one go, atomically, replacing it if present (a
    /// manifest, rewritten when a backup is verified again).
    fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()>;

    /// Opens one version of the published object `name`, to be read (and re-read)
    /// through the handle only, never again by name. `NotFound` when there is none;
    /// `InvalidInput` when something is there that is not a plain object (locally: a
    /// symbolic link, FIFO, device or folder), which is never opened in a way that
    /// can block or follow it.
    fn open(&self, name: &str) -> io::Result<Box<dyn Object>>;

    /// Reads `range` (all of it with `None`) of the object `name`: [`Storage::open`]
    /// and [`Object::read`] at once, with the same errors.
    fn get(&self, name: &str, range: Option<Range<u64>>) -> io::Result<Reader> {
        self.open(name)?.read(range)
    }

    /// The names starting with `prefix` of everything published in the namespace,
    /// in no particular order: unfinished uploads are not listed, and everything else
    /// is, whatever it is ([`Storage::open`] tells what can be read).
    fn list(&self, prefix: &str) -> io::Result<Vec<String>>;

    /// Deletes the object `name`, durably; one that is already gone is not an error.
    fn delete(&self, name: &str) -> io::Result<()>;

    /// Removes the unfinished uploads that no live writer is working on (what a
    /// crash left behind); returns their names, for the log. Uploads in progress, in
    /// this process or another, are left alone.
    fn clean_uploads(&self) -> io::Result<Vec<String>>;

    /// Checks, once its manifest is written, that the object `name` is still the
    /// version `version` that was published (an object store has no lock that would
    /// keep another writer, or a clean-up that took this writer for dead, from
    /// replacing or removing it meanwhile). Locally the writer's lock did.
    fn confirm(&self, name: &str, version: &Version) -> io::Result<()> {
        let _ = (name, version);
        Ok(())
    }

    /// The bytes an unprivileged writer may still add to the namespace, where a
    /// file system says (a folder); `None` where there is no such figure (an object
    /// store). Read before a backup starts, so a destination too small for it is
    /// dropped before anything is dumped.
    fn free_bytes(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }

    /// Whether a live writer still holds the published object `name` (the
    /// [`Publishing`] guard of its upload: its manifest is being written). Clean-ups
    /// never remove such an object.
    fn in_use(&self, name: &str) -> io::Result<bool>;
}

/// An object being written: bytes go in through [`Write`].
/// Held by the writer of a just-published object until it is complete (see
/// [`Upload::publish`]); dropping it says the writer is done.
pub type Publishing = Box<dyn Send + Sync>;

pub trait Upload: Write + Send {
    /// Ends the write (no byte may follow) and opens what was written, before it is
    /// published: the backup job checks the stored bytes (and restores from them) and
    /// publishes only then. The [`Object`] stays valid after [`Upload::publish`].
    /// `AlreadyExists` when the name is taken (an object store completes the upload
    /// under it here; see [`object`]), as [`Upload::publish`] would say.
    fn written(&mut self) -> io::Result<Box<dyn Object>>;

    /// Makes the upload durable and visible under the name given to
    /// [`Storage::put`], atomically. Never replaces an existing object: that is an
    /// `AlreadyExists` error, and the upload is discarded (as on any error). Keep the
    /// returned guard until whatever completes the object (its manifest) is written:
    /// until then [`Storage::in_use`] says so, in every process.
    fn publish(self: Box<Self>) -> io::Result<Publishing>;
}

/// One version of one stored object, open for reading.
pub trait Object: Send + Sync {
    /// Where it is, for messages only.
    fn location(&self) -> &Path;

    /// Which version of the content this handle reads (see [`Version`]).
    fn version(&self) -> &Version;

    /// Its size in bytes.
    fn size(&self) -> u64;

    /// A new, independent reader of `range` (all of it with `None`) of exactly this
    /// version: however the object changes by name meanwhile, every reader of one
    /// handle reads the same bytes (or fails).
    fn read(&self, range: Option<Range<u64>>) -> io::Result<Reader>;
}

/// Identifies one version of an object's content, read from the open handle: equal
/// versions hold equal bytes, and the version changes whenever the content does, so
/// what has been learned about one version (an authenticated header) holds for every
/// handle with that version — a hard link shares its original's. Locally: device,
/// inode, size, mtime and ctime (no user can set a ctime); in an object store: the
/// ETag (with the version id where versioning is on).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version(pub String);

/// One destination of the configuration, opened at one namespace.
#[derive(Debug, Clone)]
pub struct Place {
    /// The destination as configured (its label, `keep`, settings).
    pub config: DestinationConfig,
    pub store: Arc<dyn Storage>,
}

impl Place {
    /// How metrics, `backup list` and messages name the destination.
    pub fn label(&self) -> String {
        self.config.label()
    }
}

/// The namespace `parts` (e.g. `[database]`, or `[database, "retention", rule]`)
/// under each destination of `cfg`, in the configured order.
pub fn for_backups(cfg: &BackupConfig, parts: &[&str]) -> Vec<Place> {
    cfg.destination
        .iter()
        .map(|d| Place {
            config: d.clone(),
            store: open(d, parts),
        })
        .collect()
}

/// The namespace `parts` under one destination. The one place that knows which
/// backend a destination is: a new backend adds its case here. A destination that
/// cannot be set up (an unreadable credentials file) becomes a [`Broken`] store
/// whose every call fails with the reason, so that callers treat it like a
/// destination that is down.
pub fn open(dest: &DestinationConfig, parts: &[&str]) -> Arc<dyn Storage> {
    match &dest.location {
        Location::Local(dir) => {
            let (last, parents) = parts.split_last().map_or(("", &[][..]), |(l, p)| (*l, p));
            let root = parents
                .iter()
                .fold(dir.clone(), |path, part| path.join(part));
            Arc::new(Destination::new(&root, last))
        }
        Location::Remote { .. } => match object::ObjectStorage::open(dest, parts) {
            Ok(store) => Arc::new(store),
            Err(e) => Arc::new(Broken {
                label: dest.label(),
                reason: e.to_string(),
                kind: e.kind(),
            }),
        },
    }
}

/// A destination that could not be set up: every call fails with why.
#[derive(Debug)]
pub struct Broken {
    label: String,
    reason: String,
    kind: io::ErrorKind,
}

impl Broken {
    fn fail<T>(&self) -> io::Result<T> {
        Err(io::Error::new(self.kind, self.reason.clone()))
    }
}

impl Storage for Broken {
    fn location(&self) -> PathBuf {
        PathBuf::from(&self.label)
    }
    fn prepare(&self) -> io::Result<()> {
        self.fail()
    }
    fn put(&self, _: &str) -> io::Result<Box<dyn Upload>> {
        self.fail()
    }
    fn put_replacing(&self, _: &str) -> io::Result<Box<dyn Upload>> {
        self.fail()
    }
    fn replace(&self, _: &str, _: &[u8]) -> io::Result<()> {
        self.fail()
    }
    fn open(&self, _: &str) -> io::Result<Box<dyn Object>> {
        self.fail()
    }
    fn list(&self, _: &str) -> io::Result<Vec<String>> {
        self.fail()
    }
    fn delete(&self, _: &str) -> io::Result<()> {
        self.fail()
    }
    fn clean_uploads(&self) -> io::Result<Vec<String>> {
        self.fail()
    }
    fn in_use(&self, _: &str) -> io::Result<bool> {
        self.fail()
    }
    fn confirm(&self, _: &str, _: &Version) -> io::Result<()> {
        self.fail()
    }
}

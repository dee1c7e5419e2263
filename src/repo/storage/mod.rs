//! Where archives and manifests are kept: the [`Storage`] contract, and the local
//! directory ([`local`], [`Destination`]) as its first implementation.
//!
//! What a backend must guarantee, whatever it stores in: nothing is visible under
//! its name until it is complete and durable (a streaming put is published
//! atomically, and never replaces an existing object), an unfinished upload is
//! removed when dropped or after a crash, and reads return exactly what was
//! published. An object store (S3, GCS, Azure) implements the same trait next:
//! multipart upload + complete for `put`/`publish`, ranged GET for `get`.

pub mod local;

use std::io::{self, Read, Write};
use std::ops::Range;

pub use local::{
    clean_scratch, create_private_dir, open_regular, scratch_dir, scratch_file, sync_dir,
    Destination, Scratch, TempFile, ARCHIVE_SUFFIX, MANIFEST_SUFFIX,
};

/// One backup destination of one database: a flat namespace of named objects
/// (`<id>.dbk`, `<id>.manifest.json`, retention exports).
pub trait Storage {
    /// An object being written: bytes go in, nothing is visible under its name until
    /// [`Storage::publish`]; dropped unpublished, it is removed.
    type Upload: Write + Send;
    /// An object being read.
    type Reader: Read + Send;

    /// Starts writing the object `name` (streaming put).
    fn put(&self, name: &str) -> io::Result<Self::Upload>;

    /// Makes a finished upload durable and visible as `name`, atomically. Never
    /// replaces an existing object: that is an `AlreadyExists` error, and the upload
    /// is discarded.
    fn publish(&self, upload: Self::Upload, name: &str) -> io::Result<()>;

    /// Writes a small object in one go, atomically, replacing it if present (a
    /// manifest, rewritten when a backup is verified again).
    fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()>;

    /// Reads the object `name`, or only the bytes in `range` of it.
    fn get(&self, name: &str, range: Option<Range<u64>>) -> io::Result<Self::Reader>;

    /// The names of the published objects that start with `prefix` (unfinished
    /// uploads are not listed), in no particular order.
    fn list(&self, prefix: &str) -> io::Result<Vec<String>>;

    /// Deletes the object `name`; one that is already gone is not an error.
    fn delete(&self, name: &str) -> io::Result<()>;
}

//! The `.dbk` container, versions 1 and 2, and the entry points for version 3
//! ([`super::envelope`]) (specified in `docs/FORMAT.md`):
//!
//! ```text
//! "DBKEEPER" | version u8 = 1 | header length u32 BE | header (JSON)
//! | segments: sealed(plaintext[segment_size]) … sealed(last, possibly shorter or empty)
//! ```
//!
//! [`ArchiveWriter`] and [`ArchiveReader`] stream: memory is two segments whatever
//! the archive size. The reader tells a truncated archive (a missing last segment)
//! from a corrupted one and never returns plaintext that did not authenticate.

use std::io::{self, Read, Write};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::crypto::{random_bytes, Key, KeyRing, Recipient, Sealer, NONCE_PREFIX_LEN, TAG_LEN};
use super::envelope::{self, Envelope, MAC_LEN, NO_KEY_ID, VERSION_ENVELOPE};
use super::{ArchiveError, Compression};

pub const MAGIC: &[u8; 8] = b"DBKEEPER";
pub const VERSION: u8 = 1;
/// Version 2 is version 1 with a [`GlobalsSection`] before the image: written only
/// when there is one, so archives without it stay readable by every dbkeeper, and an
/// older dbkeeper says "use a newer dbkeeper" instead of "the header was altered".
pub const VERSION_GLOBALS: u8 = 2;
/// The largest globals section a reader accepts (bounds its memory).
pub const MAX_GLOBALS: u64 = 64 << 20;
/// Plaintext bytes per segment.
pub const SEGMENT_SIZE: u32 = 1 << 20;
/// Headers are small; anything larger is not one of ours.
const MAX_HEADER: u32 = 64 * 1024;
/// Segment sizes a reader accepts (bounds its memory).
pub(crate) const SEGMENT_SIZE_RANGE: std::ops::RangeInclusive<u32> = 1024..=(16 << 20);

/// The archive header. Field order is the serialization order; the exact bytes are
/// authenticated with every segment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Database name from the config.
    pub database: String,
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// What the plaintext is: `sqlite` (a database file) or `pg_dump-custom`.
    pub image: String,
    pub created: DateTime<Utc>,
    pub compression: Compression,
    pub segment_size: u32,
    /// `None` for unencrypted archives. In a version 3 archive `key_id` is
    /// [`Envelope::stable_id`] (its first key id, or an id of its recipients) and the
    /// wrap fields are empty: the data key is wrapped in the envelope.
    pub encryption: Option<Encryption>,
    /// Version 2 only: the plaintext starts with this many bytes of globals (roles,
    /// memberships, tablespaces; JSON) before the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub globals: Option<GlobalsSection>,
    /// Version 3 only: the envelope this header came in (not part of the header
    /// bytes). A header read without opening the archive holds the envelope's
    /// plaintext copies; an opened one is the inner header.
    #[serde(skip)]
    pub sealed: Option<Box<Envelope>>,
}

/// The header's `globals` member.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GlobalsSection {
    /// What the section holds: always `pg-globals-json-v1`.
    pub format: GlobalsFormat,
    /// Length of the section in the decompressed plaintext.
    pub bytes: u64,
}

/// The one globals encoding there is (`docs/FORMAT.md`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum GlobalsFormat {
    #[serde(rename = "pg-globals-json-v1")]
    PgJsonV1,
}

impl Header {
    /// What the archive was made for: `key <id>` and `recipient age1…` entries
    /// (version 1 and 2: the one key id; unencrypted: none).
    pub fn made_for(&self) -> Vec<String> {
        match (&self.sealed, &self.encryption) {
            (Some(envelope), _) => envelope.made_for(),
            (None, Some(enc)) => vec![format!("key {}", enc.key_id)],
            (None, None) => Vec::new(),
        }
    }

    pub fn is_encrypted(&self) -> bool {
        self.encryption.is_some() || self.sealed.is_some()
    }

    /// The format version of the archive this header came from.
    pub fn format_version(&self) -> u8 {
        if self.sealed.is_some() {
            VERSION_ENVELOPE
        } else {
            self.version()
        }
    }

    /// The format version this (inner) header is written with.
    pub fn version(&self) -> u8 {
        if self.globals.is_some() {
            VERSION_GLOBALS
        } else {
            VERSION
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    /// Always `xchacha20poly1305-stream-be32`.
    pub algorithm: String,
    /// Id of the key-encryption key (see `Key::id`).
    pub key_id: String,
    /// 24-byte nonce used to wrap the data key, hex.
    pub wrap_nonce: String,
    /// The 32-byte data key encrypted under the key-encryption key (48 bytes), hex.
    pub wrapped_key: String,
    /// The 19-byte STREAM nonce prefix, hex.
    pub nonce_prefix: String,
}

pub const ALGORITHM: &str = "xchacha20poly1305-stream-be32";

/// Encodes the fixed prefix and header bytes.
fn encode_prefix(header: &Header) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let json = serde_json::to_vec(header).map_err(io::Error::other)?;
    let mut prefix = Vec::with_capacity(13);
    prefix.extend_from_slice(MAGIC);
    prefix.push(header.version());
    prefix.extend_from_slice(&(json.len() as u32).to_be_bytes());
    Ok((prefix, json))
}

/// Writes an archive: `write` the plaintext (the compressed image), then [`finish`].
///
/// [`finish`]: ArchiveWriter::finish
pub struct ArchiveWriter<W: Write> {
    out: W,
    sealer: Sealer,
    header: Vec<u8>,
    buf: Vec<u8>,
    segment: usize,
    counter: u32,
    data_key: Option<Key>,
    /// Version 3: the envelope's JSON bytes (what a listing reads as the header
    /// bytes, and what a writer tag covers).
    envelope: Option<Vec<u8>>,
}

impl<W: Write> ArchiveWriter<W> {
    /// Writes a version 3 archive when there are `recipients` (the data key wrapped
    /// under `key` too, if given, and for each recipient); without recipients, the
    /// same as [`ArchiveWriter::new`] (version 1 or 2, byte for byte as before).
    pub fn with_recipients(
        mut out: W,
        mut header: Header,
        key: Option<&Key>,
        recipients: &[Recipient],
    ) -> Result<Self, ArchiveError> {
        if recipients.is_empty() {
            return Self::new(out, header, key);
        }
        check_segment_size(header.segment_size)?;
        let data_key = Key::random()?;
        let prefix: [u8; NONCE_PREFIX_LEN] = random_bytes()?;
        header.sealed = None;
        header.encryption = Some(Encryption {
            algorithm: ALGORITHM.to_owned(),
            key_id: NO_KEY_ID.to_owned(),
            wrap_nonce: String::new(),
            wrapped_key: String::new(),
            nonce_prefix: hex::encode(prefix),
        });
        let json = serde_json::to_vec(&header).map_err(io::Error::other)?;
        let sealed = envelope::seal(&header, &json, header.version(), &data_key, key, recipients)?;
        out.write_all(&sealed)?;
        let segment = header.segment_size as usize;
        let envelope = sealed
            .get(13..sealed.len().saturating_sub(envelope::MAC_LEN))
            .map(<[u8]>::to_vec);
        Ok(ArchiveWriter {
            out,
            sealer: Sealer::encrypted(&data_key, &prefix),
            header: json,
            buf: Vec::with_capacity(segment + TAG_LEN),
            segment,
            counter: 0,
            data_key: Some(data_key),
            envelope,
        })
    }

    /// The archive's data key (encrypted archives), so that the writer can read back
    /// what it wrote with [`ArchiveReader::open_with_data_key`] without an identity.
    /// Keep it in memory only.
    pub fn data_key(&self) -> Option<Key> {
        self.data_key.clone()
    }

    /// Version 3: the envelope's JSON bytes, as [`read_header`] returns them.
    pub fn envelope(&self) -> Option<&[u8]> {
        self.envelope.as_deref()
    }

    /// Writes the header. With `key`, a fresh data key is made and wrapped under it.
    /// `header.segment_size` is used as given (normally [`SEGMENT_SIZE`]).
    pub fn new(mut out: W, mut header: Header, key: Option<&Key>) -> Result<Self, ArchiveError> {
        check_segment_size(header.segment_size)?;
        header.sealed = None;
        let data_key = match key {
            Some(kek) => {
                let data_key = Key::random()?;
                let (wrap_nonce, wrapped) = kek.wrap(&data_key)?;
                let prefix: [u8; NONCE_PREFIX_LEN] = random_bytes()?;
                header.encryption = Some(Encryption {
                    algorithm: ALGORITHM.to_owned(),
                    key_id: kek.id().to_owned(),
                    wrap_nonce: hex::encode(wrap_nonce),
                    wrapped_key: hex::encode(wrapped),
                    nonce_prefix: hex::encode(prefix),
                });
                Some((data_key, prefix))
            }
            None => {
                header.encryption = None;
                None
            }
        };
        let (prefix, json) = encode_prefix(&header)?;
        out.write_all(&prefix)?;
        out.write_all(&json)?;
        let sealer = match &data_key {
            Some((k, prefix)) => Sealer::encrypted(k, prefix),
            None => Sealer::plain(&json),
        };
        let segment = header.segment_size as usize;
        Ok(ArchiveWriter {
            out,
            sealer,
            header: json,
            buf: Vec::with_capacity(segment + TAG_LEN),
            segment,
            counter: 0,
            data_key: data_key.map(|(k, _)| k),
            envelope: None,
        })
    }

    fn emit(&mut self, last: bool) -> io::Result<()> {
        self.sealer
            .seal(self.counter, last, &self.header, &mut self.buf)
            .map_err(io::Error::other)?;
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| io::Error::other("archive exceeds 2^32 segments"))?;
        Ok(())
    }

    /// Seals the last segment and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.emit(true)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for ArchiveWriter<W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let total = data.len();
        while !data.is_empty() {
            // A full segment is only sealed once more data shows it is not the last.
            if self.buf.len() == self.segment {
                self.emit(false)?;
            }
            let take = (self.segment - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Reads an archive's plaintext (the compressed image), authenticating every segment.
pub struct ArchiveReader<R: Read> {
    input: R,
    header: Header,
    header_bytes: Vec<u8>,
    sealer: Sealer,
    stored_segment: usize,
    /// Decrypted bytes not yet handed out, and how far they were read.
    plain: Vec<u8>,
    pos: usize,
    /// The next stored segment, read ahead to learn whether the current one is last.
    ahead: Vec<u8>,
    counter: u32,
    done: bool,
}

/// Reads until `buf` has `want` bytes or the input ends.
fn fill(input: &mut impl Read, buf: &mut Vec<u8>, want: usize) -> io::Result<()> {
    buf.clear();
    input.by_ref().take(want as u64).read_to_end(buf)?;
    Ok(())
}

fn check_segment_size(size: u32) -> Result<(), ArchiveError> {
    if SEGMENT_SIZE_RANGE.contains(&size) {
        Ok(())
    } else {
        Err(ArchiveError::BadHeader(format!(
            "segment size {size} is out of range"
        )))
    }
}

/// Parses v1/v2 header bytes that came with format version `version`.
pub(crate) fn parse_header(bytes: &[u8], version: u8) -> Result<Header, ArchiveError> {
    let header: Header =
        serde_json::from_slice(bytes).map_err(|e| ArchiveError::BadHeader(e.to_string()))?;
    // The version byte is not authenticated; the header is: they must agree.
    if header.version() != version {
        return Err(ArchiveError::BadHeader(format!(
            "format version {} with{} a globals member",
            version,
            if header.globals.is_some() { "" } else { "out" }
        )));
    }
    if header.globals.is_some_and(|g| g.bytes > MAX_GLOBALS) {
        return Err(ArchiveError::BadHeader(
            "the globals section is larger than 64 MiB".to_owned(),
        ));
    }
    check_segment_size(header.segment_size)?;
    Ok(header)
}

/// An archive's prefix as stored, nothing authenticated yet.
pub(crate) enum Raw {
    /// Versions 1 and 2: the header, its exact bytes and the version byte.
    Plain {
        header: Box<Header>,
        bytes: Vec<u8>,
        version: u8,
    },
    /// Version 3: the envelope, the bytes its tag covers (magic through envelope)
    /// and the tag.
    Sealed {
        envelope: Box<Envelope>,
        covered: Vec<u8>,
        tag: [u8; MAC_LEN],
    },
}

pub(crate) fn read_raw(input: &mut impl Read) -> Result<Raw, ArchiveError> {
    let mut prefix = [0u8; 13];
    read_exact_or(input, &mut prefix, ArchiveError::NotAnArchive)?;
    if &prefix[..8] != MAGIC {
        return Err(ArchiveError::NotAnArchive);
    }
    let version = prefix[8];
    if version == VERSION_ENVELOPE {
        let (envelope, covered, tag) = envelope::read(input, &prefix)?;
        return Ok(Raw::Sealed {
            envelope: Box::new(envelope),
            covered,
            tag,
        });
    }
    if version != VERSION && version != VERSION_GLOBALS {
        return Err(ArchiveError::UnsupportedVersion(version));
    }
    let len = u32::from_be_bytes([prefix[9], prefix[10], prefix[11], prefix[12]]);
    if len == 0 || len > MAX_HEADER {
        return Err(ArchiveError::BadHeader(format!(
            "header length {len} is out of range"
        )));
    }
    let mut bytes = vec![0u8; len as usize];
    read_exact_or(input, &mut bytes, ArchiveError::Truncated { segments: 0 })?;
    let header = parse_header(&bytes, version)?;
    Ok(Raw::Plain {
        header: Box::new(header),
        bytes,
        version,
    })
}

/// Reads and parses the prefix and header of an archive, and returns the header with
/// its exact bytes. Nothing is authenticated yet: callers that need a header they can
/// trust read the segments too (the header bytes are their associated data).
///
/// Version 3: the header is [`Envelope::listing_header`] (the envelope's plaintext
/// copies, the envelope attached) and the bytes are the envelope's JSON; the tag
/// after it is read too.
pub fn read_header(input: &mut impl Read) -> Result<(Header, Vec<u8>), ArchiveError> {
    match read_raw(input)? {
        Raw::Plain { header, bytes, .. } => Ok((*header, bytes)),
        Raw::Sealed {
            envelope,
            mut covered,
            ..
        } => {
            let header = envelope.listing_header();
            covered.drain(..13);
            Ok((header, covered))
        }
    }
}

impl<R: Read> ArchiveReader<R> {
    /// Parses the header and finds the key. `keys` may be empty for unencrypted archives.
    /// A version 3 archive opens with a key file it lists or an identity for one of
    /// its recipients; [`ArchiveReader::header`] is then its inner header.
    pub fn open(input: R, keys: &KeyRing) -> Result<Self, ArchiveError> {
        Self::open_inner(input, keys, None)
    }

    /// Opens an archive whose data key is known (the writer's, see
    /// [`ArchiveWriter::data_key`]) instead of unwrapping it.
    pub fn open_with_data_key(input: R, data_key: &Key) -> Result<Self, ArchiveError> {
        Self::open_inner(input, &KeyRing::default(), Some(data_key))
    }

    fn open_inner(mut input: R, keys: &KeyRing, known: Option<&Key>) -> Result<Self, ArchiveError> {
        let (header, header_bytes, sealer) = match read_raw(&mut input)? {
            Raw::Sealed {
                envelope,
                covered,
                tag,
            } => {
                let opened = envelope::open(*envelope, &covered, &tag, keys, known)?;
                let prefix = nonce_prefix(opened.header.encryption.as_ref())?;
                let sealer = Sealer::encrypted(&opened.data_key, &prefix);
                (opened.header, opened.inner_bytes, sealer)
            }
            Raw::Plain { header, bytes, .. } => {
                let sealer = Self::plain_sealer(&header, &bytes, keys, known)?;
                (*header, bytes, sealer)
            }
        };
        Self::start(input, header, header_bytes, sealer)
    }

    fn plain_sealer(
        header: &Header,
        header_bytes: &[u8],
        keys: &KeyRing,
        known: Option<&Key>,
    ) -> Result<Sealer, ArchiveError> {
        Ok(match &header.encryption {
            None => Sealer::plain(header_bytes),
            Some(enc) => {
                let data_key = match known {
                    Some(dk) => dk.clone(),
                    None => envelope::unwrap_v1(enc, keys)?,
                };
                Sealer::encrypted(&data_key, &nonce_prefix(Some(enc))?)
            }
        })
    }

    fn start(
        input: R,
        header: Header,
        header_bytes: Vec<u8>,
        sealer: Sealer,
    ) -> Result<Self, ArchiveError> {
        let stored_segment = header.segment_size as usize + TAG_LEN;
        let mut reader = ArchiveReader {
            input,
            header,
            header_bytes,
            sealer,
            stored_segment,
            plain: Vec::with_capacity(stored_segment),
            pos: 0,
            ahead: Vec::with_capacity(stored_segment),
            counter: 0,
            done: false,
        };
        fill(&mut reader.input, &mut reader.ahead, stored_segment)?;
        Ok(reader)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Opens the next segment into `plain`.
    fn next_segment(&mut self) -> Result<(), ArchiveError> {
        std::mem::swap(&mut self.plain, &mut self.ahead);
        self.pos = 0;
        let full = self.plain.len() == self.stored_segment;
        if full {
            fill(&mut self.input, &mut self.ahead, self.stored_segment)?;
        } else {
            self.ahead.clear();
        }
        let last = self.ahead.is_empty();
        let counter = self.counter;
        if self
            .sealer
            .open(counter, last, &self.header_bytes, &mut self.plain)
            .is_err()
        {
            // A full segment sealed as "not last" followed by nothing: the file was cut
            // at a segment boundary. Anything else that fails is corruption.
            let mut probe = self.plain.clone();
            let cut = last
                && full
                && self
                    .sealer
                    .open(counter, false, &self.header_bytes, &mut probe)
                    .is_ok();
            self.plain.clear();
            return Err(if cut || self.plain_is_short(last, full) {
                ArchiveError::Truncated {
                    segments: u64::from(counter) + u64::from(cut),
                }
            } else {
                ArchiveError::Corrupt {
                    segment: u64::from(counter),
                }
            });
        }
        self.counter = counter
            .checked_add(1)
            .ok_or_else(|| ArchiveError::BadHeader("more than 2^32 segments".to_owned()))?;
        self.done = last;
        Ok(())
    }

    /// A last segment shorter than a tag cannot be genuine: the file was cut.
    fn plain_is_short(&self, last: bool, full: bool) -> bool {
        last && !full && self.plain.len() < TAG_LEN
    }
}

/// The STREAM nonce prefix of an encrypted header.
fn nonce_prefix(enc: Option<&Encryption>) -> Result<[u8; NONCE_PREFIX_LEN], ArchiveError> {
    let enc = enc.ok_or_else(|| ArchiveError::BadHeader("not encrypted".to_owned()))?;
    hex::decode(&enc.nonce_prefix)
        .ok()
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| ArchiveError::BadHeader("nonce_prefix is not 19 bytes of hex".to_owned()))
}

pub(crate) fn read_exact_or(
    input: &mut impl Read,
    buf: &mut [u8],
    short: ArchiveError,
) -> Result<(), ArchiveError> {
    match input.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(short),
        Err(e) => Err(ArchiveError::Io(e)),
    }
}

impl<R: Read> Read for ArchiveReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.plain.len() {
            if self.done {
                return Ok(0);
            }
            self.next_segment().map_err(ArchiveError::into_io)?;
        }
        let n = out.len().min(self.plain.len() - self.pos);
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

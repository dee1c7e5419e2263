//! Format version 3: the envelope that wraps a v1/v2 header for key files and age
//! recipients (specified in `docs/FORMAT.md`):
//!
//! ```text
//! "DBKEEPER" | 3 | envelope length u32 BE | envelope (JSON) | 32-byte tag | segments
//! ```
//!
//! The envelope holds plaintext copies of the listing fields, the data key (DK)
//! wrapped under key files and for age recipients, and the inner (v1/v2) header
//! sealed under a key derived from the DK. The tag, an HMAC under another key derived
//! from the DK, covers every byte from the magic to the end of the envelope: only a
//! DK holder can write an envelope that opens, which is what lets [`rewrap`] replace
//! the wraps while the segments (sealed with the inner header as associated data)
//! stay as they are.

use std::io::Read;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::crypto::{random_bytes, Key, KeyRing, Recipient};
use super::format::{self, Encryption, Header, ALGORITHM, MAGIC};
use super::{ArchiveError, Compression};

pub const VERSION_ENVELOPE: u8 = 3;
/// Length of the HMAC-SHA256 tag after the envelope.
pub const MAC_LEN: usize = 32;
const INNER_NONCE_LEN: usize = 24;
const INNER_AAD: &[u8] = b"dbkeeper inner header v3";
const INNER_CONTEXT: &[u8] = b"dbkeeper v3 inner";
const MAC_CONTEXT: &[u8] = b"dbkeeper v3 mac";
/// The `key_id` of a fresh v3 archive's inner header: no key file wraps the DK there.
pub const NO_KEY_ID: &str = "0000000000000000";
/// Envelopes carry armored age files, larger than v1/v2 headers.
pub(crate) const MAX_ENVELOPE: u32 = 1 << 20;

/// The v3 envelope. Field order is the serialization order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Plaintext copies of the inner header's fields, for listing without a key;
    /// checked against the inner header when the archive is opened.
    pub database: String,
    pub backend: String,
    pub image: String,
    pub created: DateTime<Utc>,
    pub compression: Compression,
    pub segment_size: u32,
    /// The inner header's format version (1 or 2).
    pub inner_version: u8,
    /// The DK wrapped under key files.
    pub keys: Vec<KeyWrap>,
    /// The DK wrapped for age recipients.
    pub recipients: Vec<RecipientWrap>,
    /// 24-byte nonce of `inner`, hex.
    pub inner_nonce: String,
    /// The inner header bytes sealed under K_inner, hex.
    pub inner: String,
}

/// The DK wrapped under one key file, as v1 wraps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyWrap {
    pub key_id: String,
    pub wrap_nonce: String,
    pub wrapped_key: String,
}

/// The DK wrapped for one age recipient: an armored age file of the 32 DK bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RecipientWrap {
    pub recipient: String,
    pub age: String,
}

impl Envelope {
    /// What the archive was made for: its key ids, then its recipients.
    pub fn made_for(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| format!("key {}", k.key_id))
            .chain(
                self.recipients
                    .iter()
                    .map(|r| format!("recipient {}", r.recipient)),
            )
            .collect()
    }

    /// The id existing callers see in `header.encryption.key_id`: the first key id,
    /// or without one `r` + 15 hex digits of SHA-256 of the sorted recipients (stable
    /// across rewraps to the same set).
    pub fn stable_id(&self) -> String {
        if let Some(k) = self.keys.first() {
            return k.key_id.clone();
        }
        recipients_id(self.recipients.iter().map(|r| r.recipient.as_str()))
    }

    /// The header a listing sees before the archive is opened: the plaintext copies,
    /// `encryption` with [`Envelope::stable_id`] (no wrap fields: they are in the
    /// envelope), no globals member (that is known once opened) and the envelope.
    pub fn listing_header(&self) -> Header {
        Header {
            database: self.database.clone(),
            backend: self.backend.clone(),
            image: self.image.clone(),
            created: self.created,
            compression: self.compression,
            segment_size: self.segment_size,
            encryption: Some(Encryption {
                algorithm: ALGORITHM.to_owned(),
                key_id: self.stable_id(),
                wrap_nonce: String::new(),
                wrapped_key: String::new(),
                nonce_prefix: String::new(),
            }),
            globals: None,
            sealed: Some(Box::new(self.clone())),
        }
    }
}

fn derive(context: &[u8], dk: &Key) -> Zeroizing<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(context);
    h.update(dk.expose());
    Zeroizing::new(h.finalize().into())
}

fn mac(dk: &Key, covered: &[u8]) -> Hmac<Sha256> {
    let k = derive(MAC_CONTEXT, dk);
    let mut m = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(k.as_ref())
        .expect("HMAC takes keys of any length");
    m.update(covered);
    m
}

/// Builds a v3 prefix (magic through tag) sealing `inner_bytes` (a v1/v2 header of
/// version `inner_version`) with `dk`, wrapped under `key` and for `recipients`.
pub(crate) fn seal(
    inner: &Header,
    inner_bytes: &[u8],
    inner_version: u8,
    dk: &Key,
    key: Option<&Key>,
    recipients: &[Recipient],
) -> Result<Vec<u8>, ArchiveError> {
    if key.is_none() && recipients.is_empty() {
        return Err(ArchiveError::BadHeader(
            "a version 3 archive needs a key file or a recipient".to_owned(),
        ));
    }
    let keys = match key {
        Some(kek) => {
            let (nonce, wrapped) = kek.wrap(dk)?;
            vec![KeyWrap {
                key_id: kek.id().to_owned(),
                wrap_nonce: hex::encode(nonce),
                wrapped_key: hex::encode(wrapped),
            }]
        }
        None => Vec::new(),
    };
    let recipients = recipients
        .iter()
        .map(|r| {
            Ok(RecipientWrap {
                recipient: r.to_string(),
                age: r.wrap(dk)?,
            })
        })
        .collect::<Result<Vec<_>, ArchiveError>>()?;
    let nonce: [u8; INNER_NONCE_LEN] = random_bytes()?;
    let k_inner = derive(INNER_CONTEXT, dk);
    let sealed_inner = XChaCha20Poly1305::new(&(*k_inner).into())
        .encrypt(
            (&nonce).into(),
            Payload {
                msg: inner_bytes,
                aad: INNER_AAD,
            },
        )
        .map_err(|_| ArchiveError::BadHeader("sealing the inner header failed".to_owned()))?;
    let envelope = Envelope {
        database: inner.database.clone(),
        backend: inner.backend.clone(),
        image: inner.image.clone(),
        created: inner.created,
        compression: inner.compression,
        segment_size: inner.segment_size,
        inner_version,
        keys,
        recipients,
        inner_nonce: hex::encode(nonce),
        inner: hex::encode(sealed_inner),
    };
    let json = serde_json::to_vec(&envelope).map_err(|e| ArchiveError::BadHeader(e.to_string()))?;
    let len = u32::try_from(json.len())
        .ok()
        .filter(|&l| l <= MAX_ENVELOPE)
        .ok_or_else(|| ArchiveError::BadHeader("too many recipients".to_owned()))?;
    let mut out = Vec::with_capacity(13 + json.len() + MAC_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION_ENVELOPE);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&json);
    let tag = mac(dk, &out).finalize().into_bytes();
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Reads the envelope and tag after a v3 prefix of 13 bytes (`prefix`); returns the
/// envelope, the bytes the tag covers and the tag. Nothing is authenticated yet.
pub(crate) fn read(
    input: &mut impl Read,
    prefix: &[u8; 13],
) -> Result<(Envelope, Vec<u8>, [u8; MAC_LEN]), ArchiveError> {
    let len = u32::from_be_bytes([prefix[9], prefix[10], prefix[11], prefix[12]]);
    if len == 0 || len > MAX_ENVELOPE {
        return Err(ArchiveError::BadHeader(format!(
            "envelope length {len} is out of range"
        )));
    }
    let mut covered = prefix.to_vec();
    covered.resize(13 + len as usize, 0);
    format::read_exact_or(
        input,
        &mut covered[13..],
        ArchiveError::Truncated { segments: 0 },
    )?;
    let mut tag = [0u8; MAC_LEN];
    format::read_exact_or(input, &mut tag, ArchiveError::Truncated { segments: 0 })?;
    let envelope: Envelope = serde_json::from_slice(&covered[13..])
        .map_err(|e| ArchiveError::BadHeader(e.to_string()))?;
    if !format::SEGMENT_SIZE_RANGE.contains(&envelope.segment_size) {
        return Err(ArchiveError::BadHeader(format!(
            "segment size {} is out of range",
            envelope.segment_size
        )));
    }
    Ok((envelope, covered, tag))
}

fn hex_field(name: &str, v: &str) -> Result<Vec<u8>, ArchiveError> {
    hex::decode(v).map_err(|_| ArchiveError::BadHeader(format!("{name} is not hex")))
}

/// What an archive was made for, and what `keys` holds, as [`ArchiveError::WrongKey`]
/// reports it.
fn wrong_key(archive: Vec<String>, keys: &KeyRing) -> ArchiveError {
    let have = keys
        .ids()
        .into_iter()
        .map(|id| format!("key {id}"))
        .chain(
            keys.recipients()
                .into_iter()
                .map(|r| format!("identity for {r}")),
        )
        .collect();
    ArchiveError::WrongKey { archive, have }
}

/// The DK of a v1/v2 header from a key file in `keys`.
pub(crate) fn unwrap_v1(enc: &Encryption, keys: &KeyRing) -> Result<Key, ArchiveError> {
    if enc.algorithm != ALGORITHM {
        return Err(ArchiveError::BadHeader(format!(
            "unknown algorithm {}",
            enc.algorithm
        )));
    }
    let kek = keys
        .find(&enc.key_id)
        .ok_or_else(|| wrong_key(vec![format!("key {}", enc.key_id)], keys))?;
    kek.unwrap_key(
        &hex_field("wrap_nonce", &enc.wrap_nonce)?,
        &hex_field("wrapped_key", &enc.wrapped_key)?,
    )
    .ok_or(ArchiveError::KeyUnwrap)
}

/// The DK of an envelope: a key file listed in it, else an identity for a listed
/// recipient.
fn unwrap_v3(envelope: &Envelope, keys: &KeyRing) -> Result<Key, ArchiveError> {
    for wrap in &envelope.keys {
        if let Some(kek) = keys.find(&wrap.key_id) {
            return kek
                .unwrap_key(
                    &hex_field("wrap_nonce", &wrap.wrap_nonce)?,
                    &hex_field("wrapped_key", &wrap.wrapped_key)?,
                )
                .ok_or(ArchiveError::KeyUnwrap);
        }
    }
    for wrap in &envelope.recipients {
        let holder = keys
            .identities()
            .iter()
            .find(|i| i.recipient().to_string() == wrap.recipient);
        if let Some(identity) = holder {
            return identity
                .unwrap_key(&wrap.age)
                .ok_or(ArchiveError::KeyUnwrap);
        }
    }
    Err(wrong_key(envelope.made_for(), keys))
}

/// The id of a set of recipients (`age1…`): `r` + 15 hex digits of SHA-256 of the
/// sorted set, one per line. The [`Envelope::stable_id`] of an archive made for
/// recipients only.
pub fn recipients_id<'a>(recipients: impl IntoIterator<Item = &'a str>) -> String {
    let mut rs: Vec<&str> = recipients.into_iter().collect();
    rs.sort_unstable();
    rs.dedup();
    let digest = Sha256::digest(rs.join("\n").as_bytes());
    format!("r{}", &hex::encode(digest)[..15])
}

/// An opened envelope.
pub(crate) struct Opened {
    pub data_key: Key,
    /// The inner header with the envelope attached and `encryption.key_id` set to
    /// [`Envelope::stable_id`] (the nonce prefix is the inner header's).
    pub header: Header,
    /// The inner header's exact bytes: the segments' associated data.
    pub inner_bytes: Vec<u8>,
}

/// Opens an envelope with `keys` (or a known `data_key`): checks the tag, opens the
/// inner header and checks it against the envelope's plaintext copies.
pub(crate) fn open(
    envelope: Envelope,
    covered: &[u8],
    tag: &[u8; MAC_LEN],
    keys: &KeyRing,
    data_key: Option<&Key>,
) -> Result<Opened, ArchiveError> {
    // A data key the ring holds for an archive this process wrote is the one whose
    // tag matches; otherwise a key file or identity unwraps it.
    let held = || {
        keys.data_keys()
            .iter()
            .find(|dk| mac(dk, covered).verify_slice(tag).is_ok())
            .cloned()
    };
    let dk = match data_key.cloned().or_else(held) {
        Some(dk) => dk,
        None => unwrap_v3(&envelope, keys)?,
    };
    mac(&dk, covered)
        .verify_slice(tag)
        .map_err(|_| ArchiveError::BadHeader("the envelope's tag does not match".to_owned()))?;
    let k_inner = derive(INNER_CONTEXT, &dk);
    let nonce = chacha20poly1305::XNonce::try_from(
        hex_field("inner_nonce", &envelope.inner_nonce)?.as_slice(),
    )
    .map_err(|_| ArchiveError::BadHeader("inner_nonce has the wrong length".to_owned()))?;
    let inner_bytes = XChaCha20Poly1305::new(&(*k_inner).into())
        .decrypt(
            &nonce,
            Payload {
                msg: &hex_field("inner", &envelope.inner)?,
                aad: INNER_AAD,
            },
        )
        .map_err(|_| ArchiveError::BadHeader("the inner header does not open".to_owned()))?;
    let mut header = format::parse_header(&inner_bytes, envelope.inner_version)?;
    let same = header.database == envelope.database
        && header.backend == envelope.backend
        && header.image == envelope.image
        && header.created == envelope.created
        && header.compression == envelope.compression
        && header.segment_size == envelope.segment_size;
    if !same {
        return Err(ArchiveError::BadHeader(
            "the envelope's copies differ from the inner header".to_owned(),
        ));
    }
    let Some(enc) = header.encryption.as_mut() else {
        return Err(ArchiveError::BadHeader(
            "the inner header is not encrypted".to_owned(),
        ));
    };
    if enc.algorithm != ALGORITHM {
        return Err(ArchiveError::BadHeader(format!(
            "unknown algorithm {}",
            enc.algorithm
        )));
    }
    // A rewrapped v1/v2 header still names its old key; that key no longer opens
    // the archive, so callers see the envelope's id instead.
    enc.key_id = envelope.stable_id();
    enc.wrap_nonce.clear();
    enc.wrapped_key.clear();
    header.sealed = Some(Box::new(envelope));
    Ok(Opened {
        data_key: dk,
        header,
        inner_bytes,
    })
}

/// What [`rewrap`] produced: write `prefix`, then the old archive's bytes from
/// `segments_offset` on.
#[derive(Debug)]
pub struct Rewrapped {
    /// A v3 prefix: magic through tag.
    pub prefix: Vec<u8>,
    /// Where the old archive's segments start.
    pub segments_offset: u64,
    /// The archive's data key (unchanged): reads the result back when nothing the
    /// caller holds opens it (a recipients-only target). Never printed.
    pub data_key: Key,
}

/// Reads only the prefix and header/envelope of an archive, opens it with `keys`, and
/// returns a new v3 prefix with the same data key wrapped under `to_key` and for
/// `to_recipients`. The segments are not read: a v1/v2 header's bytes become the
/// inner header unchecked, and a damaged one fails when the result is read.
pub fn rewrap(
    input: &mut impl Read,
    keys: &KeyRing,
    to_key: Option<&Key>,
    to_recipients: &[Recipient],
) -> Result<Rewrapped, ArchiveError> {
    if to_key.is_none() && to_recipients.is_empty() {
        return Err(ArchiveError::BadHeader(
            "nothing to rewrap to: give a key file or a recipient".to_owned(),
        ));
    }
    let raw = format::read_raw(input)?;
    let (dk, inner, inner_bytes, inner_version, offset) = match raw {
        format::Raw::Plain {
            header,
            bytes,
            version,
        } => {
            let Some(enc) = &header.encryption else {
                return Err(ArchiveError::BadHeader(
                    "the archive is not encrypted: there is no key to rewrap".to_owned(),
                ));
            };
            let dk = unwrap_v1(enc, keys)?;
            let offset = 13 + bytes.len() as u64;
            (dk, *header, bytes, version, offset)
        }
        format::Raw::Sealed {
            envelope,
            covered,
            tag,
        } => {
            let offset = (covered.len() + MAC_LEN) as u64;
            let version = envelope.inner_version;
            let opened = open(*envelope, &covered, &tag, keys, None)?;
            (
                opened.data_key,
                opened.header,
                opened.inner_bytes,
                version,
                offset,
            )
        }
    };
    let prefix = seal(
        &inner,
        &inner_bytes,
        inner_version,
        &dk,
        to_key,
        to_recipients,
    )?;
    Ok(Rewrapped {
        prefix,
        segments_offset: offset,
        data_key: dk,
    })
}

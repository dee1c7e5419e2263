//! Segment sealing: XChaCha20-Poly1305 in the STREAM construction (the keys
//! themselves are [`crate::keys`]'s, re-exported here).
//!
//! Each backup gets a random 32-byte data key, wrapped (AEAD) under the key-encryption
//! key from the key file. Segments are sealed with `StreamBE32` (19-byte nonce prefix,
//! 32-bit big-endian counter, last-segment flag) and the exact header bytes as
//! associated data. Unencrypted archives use the same framing with a 16-byte
//! SHA-256-based check value instead of the tag, which catches corruption and
//! truncation (but, having no key, not deliberate tampering).

use aead_stream::{NewStream, StreamBE32, StreamPrimitive};
use chacha20poly1305::XChaCha20Poly1305;
use sha2::{Digest, Sha256};

pub(crate) use crate::keys::random_bytes;
pub use crate::keys::{Identity, Key, KeyError, KeyRing, Recipient, KEY_LEN};

/// Bytes added to each segment: the Poly1305 tag (or the check value when unencrypted).
pub const TAG_LEN: usize = 16;
/// STREAM nonce prefix: the 24-byte XChaCha nonce minus 4 counter bytes and 1 flag byte.
pub const NONCE_PREFIX_LEN: usize = 19;

/// Sealing a segment failed (the AEAD refused: more data than the STREAM allows).
#[derive(Debug, thiserror::Error)]
#[error("segment encryption failed")]
pub struct SealFailed;

/// A stored segment does not authenticate at its position with its last-segment
/// flag: tampered, reordered, truncated or the wrong key. The reader decides which.
#[derive(Debug, thiserror::Error)]
#[error("segment does not authenticate")]
pub struct NotAuthentic;

/// Seals and opens segments; one per archive.
pub enum Sealer {
    Encrypted(Box<StreamBE32<XChaCha20Poly1305>>),
    /// No key: a truncated SHA-256 of (SHA-256(header), counter, flag, plaintext).
    Plain {
        header_hash: [u8; 32],
    },
}

impl Sealer {
    pub fn encrypted(data_key: &Key, nonce_prefix: &[u8; NONCE_PREFIX_LEN]) -> Self {
        let stream = StreamBE32::from_aead(data_key.cipher(), nonce_prefix.into());
        Sealer::Encrypted(Box::new(stream))
    }

    pub fn plain(header: &[u8]) -> Self {
        Sealer::Plain {
            header_hash: Sha256::digest(header).into(),
        }
    }

    fn check_value(header_hash: &[u8; 32], counter: u32, last: bool, data: &[u8]) -> [u8; TAG_LEN] {
        let mut h = Sha256::new();
        h.update(header_hash);
        h.update(counter.to_be_bytes());
        h.update([u8::from(last)]);
        h.update(data);
        let digest = h.finalize();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&digest[..TAG_LEN]);
        tag
    }

    /// Turns the plaintext in `buf` into the stored segment (plaintext + 16 bytes).
    pub(crate) fn seal(
        &self,
        counter: u32,
        last: bool,
        aad: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<(), SealFailed> {
        match self {
            Sealer::Encrypted(stream) => stream
                .encrypt_in_place(counter, last, aad, buf)
                .map_err(|_| SealFailed),
            Sealer::Plain { header_hash } => {
                let tag = Self::check_value(header_hash, counter, last, buf);
                buf.extend_from_slice(&tag);
                Ok(())
            }
        }
    }

    /// Checks and strips a stored segment in `buf`; `Err` if it does not authenticate
    /// at this position with this last-segment flag.
    pub(crate) fn open(
        &self,
        counter: u32,
        last: bool,
        aad: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<(), NotAuthentic> {
        match self {
            Sealer::Encrypted(stream) => stream
                .decrypt_in_place(counter, last, aad, buf)
                .map_err(|_| NotAuthentic),
            Sealer::Plain { header_hash } => {
                if buf.len() < TAG_LEN {
                    return Err(NotAuthentic);
                }
                let split = buf.len() - TAG_LEN;
                let expect = Self::check_value(header_hash, counter, last, &buf[..split]);
                if buf[split..] != expect {
                    return Err(NotAuthentic);
                }
                buf.truncate(split);
                Ok(())
            }
        }
    }
}

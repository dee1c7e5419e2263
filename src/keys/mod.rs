//! Key files: loading, generating, fingerprints (key ids), and wrapping a backup's
//! data key under a key-encryption key; age identities and recipients ([`age`]) wrap
//! it for public keys.
//!
//! At the bottom of the crate: `config` checks the key files it names when it is
//! loaded, and the archive format (`repo::archive::crypto`) seals segments with
//! these keys.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use rand::rngs::OsRng;
use rand::TryRngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

mod age;
mod writer;
pub use self::age::{Identity, Recipient};
pub use self::writer::{
    load_or_create_writer_key, writer_key, writer_key_path, writer_tag, writer_tag_matches,
    WRITER_KEY_FILE,
};

/// Size of every key, data or key-encryption.
pub const KEY_LEN: usize = 32;
const WRAP_NONCE_LEN: usize = 24;
const WRAP_AAD: &[u8] = b"dbkeeper data key v1";
const KEY_ID_CONTEXT: &[u8] = b"dbkeeper key id v1";

/// A key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key file {path} is not a regular file; point to a file made with `dbkeeper key generate`"
    )]
    NotAFile { path: PathBuf },
    #[error(
        "key file {path} is readable by group or others (mode {mode:04o}); run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path} {problem}; it must hold 32 random bytes, raw or as 64 hex digits (make one with `dbkeeper key generate -o FILE`)")]
    Format { path: PathBuf, problem: String },
    #[error("cannot create key file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `generate-key-if-missing` has not created the key yet, and something was
    /// about to write with it (read-only commands never create it).
    #[error("key file {path} does not exist yet; it is created when the daemon starts or `dbkeeper run-job` runs (generate-key-if-missing), or make it with `dbkeeper key generate -o {path}`")]
    NotGenerated { path: PathBuf },
    #[error("the system random number generator failed: {0}")]
    Random(String),
    /// An age identity or recipients file is unusable (`reason` never quotes a secret).
    #[error("age file {path}: {reason}")]
    AgeFile { path: PathBuf, reason: String },
    /// Not an age recipient; `text` is what was given (a secret is never quoted).
    #[error("{text:?} is not an age recipient: {reason}")]
    BadRecipient { text: String, reason: String },
}

/// The contents (at most `max` bytes) of a secret file (a key file, an age
/// identity file): a regular file, not readable by group or others; anything else is
/// refused with the reason.
pub(crate) fn read_secret_file(path: &Path, max: u64) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let read_err = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(KeyError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut raw = Zeroizing::new(Vec::new());
    std::fs::File::open(path)
        .and_then(|f| f.take(max).read_to_end(&mut raw))
        .map_err(read_err)?;
    Ok(raw)
}

/// Writes `text` to a new secret file (mode 0600, synced); never overwrites one.
pub(crate) fn write_secret_file(path: &Path, text: &str) -> Result<(), KeyError> {
    use std::io::Write;
    let create_err = |source| KeyError::Create {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(create_err)?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(create_err)
}

/// A 32-byte key with its public id. The key bytes are wiped on drop and never printed.
#[derive(Clone)]
pub struct Key {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    id: String,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(id {})", self.id)
    }
}

pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut buf = [0u8; N];
    OsRng
        .try_fill_bytes(&mut buf)
        .map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(buf)
}

impl Key {
    fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        let mut h = Sha256::new();
        h.update(KEY_ID_CONTEXT);
        h.update(bytes);
        let id = hex::encode(&h.finalize()[..8]);
        Key {
            bytes: Zeroizing::new(bytes),
            id,
        }
    }

    /// A fresh random key (used for per-backup data keys and `key generate`).
    pub fn random() -> Result<Self, KeyError> {
        Ok(Self::from_bytes(random_bytes()?))
    }

    /// The key's fingerprint: 16 hex digits, safe to show and store.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Loads a key file: a regular file, not readable by group or others, holding 32
    /// raw bytes or 64 hex digits (surrounding whitespace ignored).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let format = |problem: String| KeyError::Format {
            path: path.to_owned(),
            problem,
        };
        // Never read more than a key file can hold, whatever the file turns out to be.
        let raw = read_secret_file(path, 256)?;
        let mut key = [0u8; KEY_LEN];
        let text = std::str::from_utf8(&raw).map(str::trim).unwrap_or("");
        if text.len() == 2 * KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode_to_slice(text, &mut key).map_err(|e| format(e.to_string()))?;
        } else if raw.len() == KEY_LEN {
            key.copy_from_slice(&raw);
        } else {
            return Err(format(format!("holds {} bytes", raw.len())));
        }
        if key.iter().all(|&b| b == key[0]) {
            return Err(format(
                "holds the same byte repeated, not a random key".to_owned(),
            ));
        }
        Ok(Self::from_bytes(key))
    }

    /// Writes a new random key as 64 hex digits to a new file with mode 0600 and
    /// returns it. Refuses to overwrite an existing file.
    pub fn generate(path: &Path) -> Result<Self, KeyError> {
        let key = Self::random()?;
        let text = Zeroizing::new(format!("{}\n", hex::encode(*key.bytes)));
        write_secret_file(path, &text)?;
        Ok(key)
    }

    /// The key bytes, for key derivation inside the crate (never printed).
    pub(crate) fn expose(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    pub(crate) fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&(*self.bytes).into())
    }

    /// Encrypts `data_key` under this key: returns (nonce, wrapped key).
    pub fn wrap(&self, data_key: &Key) -> Result<(Vec<u8>, Vec<u8>), KeyError> {
        let nonce: [u8; WRAP_NONCE_LEN] = random_bytes()?;
        let wrapped = self
            .cipher()
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: data_key.bytes.as_ref(),
                    aad: WRAP_AAD,
                },
            )
            .map_err(|_| KeyError::Random("key wrapping failed".to_owned()))?;
        Ok((nonce.to_vec(), wrapped))
    }

    /// Decrypts a wrapped data key; `None` if this is not the key it was wrapped under
    /// or the wrapped key was altered.
    pub fn unwrap_key(&self, nonce: &[u8], wrapped: &[u8]) -> Option<Key> {
        let nonce = chacha20poly1305::XNonce::try_from(nonce).ok()?;
        let plain = Zeroizing::new(
            self.cipher()
                .decrypt(
                    &nonce,
                    Payload {
                        msg: wrapped,
                        aad: WRAP_AAD,
                    },
                )
                .ok()?,
        );
        let bytes: [u8; KEY_LEN] = plain.as_slice().try_into().ok()?;
        Some(Self::from_bytes(bytes))
    }
}

/// The key files and age identities a command or job may decrypt with, each loaded
/// once.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: Vec<Key>,
    identities: Vec<Identity>,
    /// Data keys of archives this process just wrote for recipients: the job reads
    /// its own archive back (verification) without holding any identity.
    data_keys: Vec<Key>,
}

impl KeyRing {
    pub fn new(keys: Vec<Key>) -> Self {
        KeyRing {
            keys,
            identities: Vec::new(),
            data_keys: Vec::new(),
        }
    }

    pub fn with_identities(keys: Vec<Key>, identities: Vec<Identity>) -> Self {
        KeyRing {
            keys,
            identities,
            data_keys: Vec::new(),
        }
    }

    /// This ring and the data key of one archive just written (see `data_keys`).
    pub fn with_data_key(&self, data_key: Key) -> Self {
        let mut ring = self.clone();
        ring.data_keys.push(data_key);
        ring
    }

    /// Data keys held for archives this process wrote.
    pub fn data_keys(&self) -> &[Key] {
        &self.data_keys
    }

    /// Whether anything in the ring may open an archive made for `made_for` (as
    /// [`crate::repo::archive::Header::made_for`] lists it: `key <id>`,
    /// `recipient age1…`), data keys aside.
    pub fn may_open(&self, made_for: &[String]) -> bool {
        made_for.iter().any(|m| {
            m.strip_prefix("key ")
                .is_some_and(|id| self.find(id).is_some())
                || m.strip_prefix("recipient ").is_some_and(|r| {
                    self.identities
                        .iter()
                        .any(|i| i.recipient().to_string() == r)
                })
        })
    }

    /// Every key and identity of `other` added to this ring.
    pub fn extend(&mut self, other: KeyRing) {
        self.keys.extend(other.keys);
        self.identities.extend(other.identities);
        self.data_keys.extend(other.data_keys);
    }

    /// True when the ring holds nothing that reads an archive.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.identities.is_empty() && self.data_keys.is_empty()
    }

    pub fn add_identity(&mut self, identity: Identity) {
        self.identities.push(identity);
    }

    pub fn identities(&self) -> &[Identity] {
        &self.identities
    }

    /// The public recipients of the identities held (for messages).
    pub fn recipients(&self) -> Vec<Recipient> {
        self.identities.iter().map(Identity::recipient).collect()
    }

    pub fn find(&self, id: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }

    pub fn into_keys(self) -> Vec<Key> {
        self.keys
    }

    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generate_then_load_gives_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let made = Key::generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = Key::load(&path).unwrap();
        assert_eq!(made.id(), loaded.id());
        assert_eq!(made.id().len(), 16);
        assert!(Key::generate(&path).is_err(), "never overwrites");
        assert!(!format!("{loaded:?}").contains(&hex::encode(*loaded.bytes)));
    }

    #[test]
    fn bad_key_files_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, data: &[u8], mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, data).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let good_hex = hex::encode([7u8, 1, 2, 3].repeat(8));
        let open = write("open", good_hex.as_bytes(), 0o644);
        assert!(matches!(
            Key::load(&open),
            Err(KeyError::Permissions { mode: 0o644, .. })
        ));
        let short = write("short", b"abcdef", 0o600);
        let err = Key::load(&short).unwrap_err().to_string();
        assert!(
            err.contains("holds 6 bytes") && err.contains("dbkeeper key generate"),
            "{err}"
        );
        let zeros = write("zeros", &[0u8; 32], 0o600);
        assert!(matches!(Key::load(&zeros), Err(KeyError::Format { .. })));
        let raw = write("raw", &[9u8, 8, 7, 6].repeat(8), 0o600);
        assert!(Key::load(&raw).is_ok());
        let hexed = write("hex", format!("  {good_hex}\n").as_bytes(), 0o400);
        assert!(Key::load(&hexed).is_ok());
        assert!(matches!(
            Key::load(dir.path()),
            Err(KeyError::NotAFile { .. })
        ));
        assert!(matches!(
            Key::load(Path::new("/dev/zero")),
            Err(KeyError::NotAFile { .. })
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(matches!(Key::load(&link), Err(KeyError::NotAFile { .. })));
        assert!(matches!(
            Key::load(&dir.path().join("missing")),
            Err(KeyError::Read { .. })
        ));
    }

    #[test]
    fn wrapped_key_opens_only_with_its_key() {
        let kek = Key::random().unwrap();
        let other = Key::random().unwrap();
        let data = Key::random().unwrap();
        let (nonce, wrapped) = kek.wrap(&data).unwrap();
        assert_eq!(kek.unwrap_key(&nonce, &wrapped).unwrap().id(), data.id());
        assert!(other.unwrap_key(&nonce, &wrapped).is_none());
        let mut bent = wrapped.clone();
        bent[3] ^= 1;
        assert!(kek.unwrap_key(&nonce, &bent).is_none());
    }
}

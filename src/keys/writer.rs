//! The writer key: how a host proves that it wrote a backup made for recipients.
//!
//! An archive made for age recipients authenticates to anyone holding a matching
//! identity, but anyone who knows the public recipient can make one: the identity
//! proves "made for you", not "made by your server". The daemon that writes such a
//! backup holds no key that reads it, so a forgery planted in a destination could
//! otherwise count as a good backup there and push real ones out of rotation. Each
//! writing host therefore keeps a random key of its own in its state directory
//! (`<state-dir>/writer.key`, created on first use, mode 0600; it reads nothing)
//! and puts a tag in the manifest: HMAC-SHA256 over the database, the backup id
//! and the archive's envelope (which binds its data key, see `docs/FORMAT.md`).

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{Key, KeyError};

/// The file name of the writer key in the state directory.
pub const WRITER_KEY_FILE: &str = "writer.key";
const TAG_CONTEXT: &[u8] = b"dbkeeper writer tag v1";

/// Where the writer key of `state_dir` lives.
pub fn writer_key_path(state_dir: &Path) -> PathBuf {
    state_dir.join(WRITER_KEY_FILE)
}

/// The writer key of `state_dir`, created if missing (the writing daemon).
pub fn load_or_create_writer_key(state_dir: &Path) -> Result<Key, KeyError> {
    let path = writer_key_path(state_dir);
    match Key::load(&path) {
        Ok(key) => Ok(key),
        Err(KeyError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            match Key::generate(&path) {
                Ok(key) => Ok(key),
                // Another process made it first: read theirs.
                Err(_) if path.exists() => Key::load(&path),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// The writer key of `state_dir` if there is one (readers: never created).
pub fn writer_key(state_dir: &Path) -> Option<Key> {
    Key::load(&writer_key_path(state_dir)).ok()
}

fn tagger(key: &Key, database: &str, id: &str, envelope: &[u8]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(key.expose())
        .expect("HMAC takes keys of any length");
    // Lengths first, so that no two (database, id) pairs frame the same bytes.
    for part in [TAG_CONTEXT, database.as_bytes(), id.as_bytes(), envelope] {
        m.update(&(part.len() as u64).to_be_bytes());
        m.update(part);
    }
    m
}

/// The tag of backup `id` of `database` whose archive has the envelope bytes
/// `envelope` (hex).
pub fn writer_tag(key: &Key, database: &str, id: &str, envelope: &[u8]) -> String {
    hex::encode(tagger(key, database, id, envelope).finalize().into_bytes())
}

/// Whether `tag` (hex) is the tag [`writer_tag`] gives; constant time.
pub fn writer_tag_matches(key: &Key, database: &str, id: &str, envelope: &[u8], tag: &str) -> bool {
    hex::decode(tag).is_ok_and(|t| tagger(key, database, id, envelope).verify_slice(&t).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_binds_database_id_and_envelope() {
        let dir = tempfile::tempdir().unwrap();
        let key = load_or_create_writer_key(dir.path()).unwrap();
        assert_eq!(
            load_or_create_writer_key(dir.path()).unwrap().id(),
            key.id()
        );
        assert_eq!(writer_key(dir.path()).unwrap().id(), key.id());
        let tag = writer_tag(&key, "app", "20261206T000000Z-manual", b"env");
        assert!(writer_tag_matches(
            &key,
            "app",
            "20261206T000000Z-manual",
            b"env",
            &tag
        ));
        for (db, id, env) in [
            ("ap", "20261206T000000Z-manual", &b"env"[..]),
            ("app", "20261206T000001Z-manual", b"env"),
            ("app", "20261206T000000Z-manual", b"enw"),
            ("appp", "20261206T000000Z-manua", b"env"),
        ] {
            assert!(!writer_tag_matches(&key, db, id, env, &tag), "{db} {id}");
        }
        let other = Key::random().unwrap();
        assert!(!writer_tag_matches(
            &other,
            "app",
            "20261206T000000Z-manual",
            b"env",
            &tag
        ));
        assert!(!writer_tag_matches(
            &key,
            "app",
            "20261206T000000Z-manual",
            b"env",
            "zz"
        ));
        assert!(writer_key(&dir.path().join("none")).is_none());
    }
}

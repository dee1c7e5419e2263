//! age (X25519) identities and recipients: a backup's data key wrapped for a public
//! key, so a server can write archives it cannot read.
//!
//! A wrapped data key is a standard armored age file whose plaintext is the 32 key
//! bytes, one file per recipient, so `age -d -i identity.txt` recovers it without
//! dbkeeper. Secrets (identities) never appear in `Debug` output or errors.

use std::fmt;

use std::path::Path;
use std::str::FromStr;

use zeroize::Zeroizing;

use super::{Key, KeyError, KEY_LEN};

/// Identity files are small; a larger file is not one.
const MAX_IDENTITY_FILE: u64 = 64 * 1024;
const SECRET_PREFIX: &str = "AGE-SECRET-KEY-1";

/// An age X25519 public key (`age1…`).
#[derive(Clone, PartialEq, Eq)]
pub struct Recipient {
    inner: ::age::x25519::Recipient,
    text: String,
}

impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Recipient({})", self.text)
    }
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Recipient {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let s = s.trim();
        // Someone pasting an identity where a recipient belongs must not see the
        // secret echoed back in an error (or a log).
        // Anywhere in the line: quoted, after a list dash, behind `age1 ` (adversary
        // round 3 of issue 16, case 06).
        if s.to_ascii_uppercase().contains(SECRET_PREFIX) {
            return Err(KeyError::BadRecipient {
                text: "AGE-SECRET-KEY-1…".to_owned(),
                reason: "this is a secret identity, not a recipient (use `age-keygen -y` to get its age1… recipient)".to_owned(),
            });
        }
        let inner =
            ::age::x25519::Recipient::from_str(s).map_err(|reason| KeyError::BadRecipient {
                // Only what looks like a recipient is shown: anything else may be a
                // secret pasted in the wrong place, such as a key file's hex
                // (adversary round 4 of issue 16, case 02).
                text: if s.to_ascii_lowercase().starts_with("age1") {
                    s.chars().take(80).collect()
                } else {
                    format!("{}…", s.chars().take(4).collect::<String>())
                },
                reason: format!("{reason}; expected an age X25519 recipient (age1…)"),
            })?;
        Ok(Recipient {
            text: inner.to_string(),
            inner,
        })
    }
}

impl Recipient {
    /// Reads an age recipients file: one `age1…` per line, `#` comments, blank lines.
    pub fn load_file(path: &Path) -> Result<Vec<Recipient>, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let r = line.parse::<Recipient>().map_err(|e| KeyError::AgeFile {
                path: path.to_owned(),
                reason: format!("line {}: {e}", n + 1),
            })?;
            out.push(r);
        }
        if out.is_empty() {
            return Err(KeyError::AgeFile {
                path: path.to_owned(),
                reason: "holds no recipient".to_owned(),
            });
        }
        Ok(out)
    }

    /// The data key as an armored age file for this recipient alone.
    pub fn wrap(&self, data_key: &Key) -> Result<String, KeyError> {
        ::age::encrypt_and_armor(&self.inner, data_key.bytes.as_ref())
            .map_err(|e| KeyError::Random(format!("age encryption failed: {e}")))
    }
}

/// An age X25519 identity (secret key). `Debug` shows only its recipient.
#[derive(Clone)]
pub struct Identity {
    inner: ::age::x25519::Identity,
    recipient: Recipient,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity(for {})", self.recipient)
    }
}

impl Identity {
    fn from_inner(inner: ::age::x25519::Identity) -> Self {
        let public = inner.to_public();
        Identity {
            recipient: Recipient {
                text: public.to_string(),
                inner: public,
            },
            inner,
        }
    }

    /// A fresh random identity.
    pub fn generate() -> Self {
        Self::from_inner(::age::x25519::Identity::generate())
    }

    /// The public recipient that data keys are wrapped for.
    pub fn recipient(&self) -> Recipient {
        self.recipient.clone()
    }

    /// Loads an identity file as `age-keygen` writes it: `#` comments, blank lines
    /// and one or more `AGE-SECRET-KEY-1…` lines. Like a key file, it must be a
    /// regular file not readable by group or others.
    pub fn load(path: &Path) -> Result<Vec<Identity>, KeyError> {
        let raw = super::read_secret_file(path, MAX_IDENTITY_FILE)?;
        let bad = |reason: String| KeyError::AgeFile {
            path: path.to_owned(),
            reason,
        };
        let text = std::str::from_utf8(&raw).map_err(|_| bad("is not text".to_owned()))?;
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // The line itself is the secret: name it by number only.
            let inner = ::age::x25519::Identity::from_str(line).map_err(|reason| {
                bad(format!(
                    "line {}: not an age X25519 identity ({reason}); make one with `age-keygen -o FILE`",
                    n + 1
                ))
            })?;
            out.push(Self::from_inner(inner));
        }
        if out.is_empty() {
            return Err(bad("holds no AGE-SECRET-KEY-1 line".to_owned()));
        }
        Ok(out)
    }

    /// Writes this identity to a new file (mode 0600) in `age-keygen`'s format.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        use ::age::secrecy::ExposeSecret;
        let secret = self.inner.to_string();
        let text = Zeroizing::new(format!(
            "# public key: {}\n{}\n",
            self.recipient,
            secret.expose_secret()
        ));
        super::write_secret_file(path, &text)
    }

    /// Decrypts a data key wrapped by [`Recipient::wrap`]; `None` if it was not
    /// wrapped for this identity or does not hold a key.
    pub fn unwrap_key(&self, armored: &str) -> Option<Key> {
        let plain = Zeroizing::new(::age::decrypt(&self.inner, armored.as_bytes()).ok()?);
        let bytes: [u8; KEY_LEN] = plain.as_slice().try_into().ok()?;
        Some(Key::from_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn wrap_for_a_recipient_opens_only_with_its_identity() {
        let id = Identity::generate();
        let other = Identity::generate();
        let dk = Key::random().unwrap();
        let armored = id.recipient().wrap(&dk).unwrap();
        assert!(armored.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
        assert_eq!(id.unwrap_key(&armored).unwrap().id(), dk.id());
        assert!(other.unwrap_key(&armored).is_none());
        assert!(!format!("{id:?}").contains("AGE-SECRET"));
        assert!(format!("{id:?}").contains(&id.recipient().to_string()));
    }

    #[test]
    fn identity_files_load_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::generate();
        let path = dir.path().join("id.txt");
        a.save(&path).unwrap();
        let b = Identity::generate();
        let both = dir.path().join("both.txt");
        let mut text = std::fs::read_to_string(&path).unwrap();
        let b_path = dir.path().join("b.txt");
        b.save(&b_path).unwrap();
        text.push_str("\n# another\n");
        text.push_str(&std::fs::read_to_string(&b_path).unwrap());
        std::fs::write(&both, &text).unwrap();
        std::fs::set_permissions(&both, std::fs::Permissions::from_mode(0o600)).unwrap();
        let loaded = Identity::load(&both).unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[0].recipient(), a.recipient());
        assert_eq!(loaded[1].recipient(), b.recipient());

        std::fs::set_permissions(&both, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Identity::load(&both),
            Err(KeyError::Permissions { mode: 0o644, .. })
        ));
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, "# c\nAGE-SECRET-KEY-1NOTREALLY\n").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = Identity::load(&bad).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && !err.contains("NOTREALLY"),
            "{err}"
        );
        assert!(matches!(
            Identity::load(dir.path()),
            Err(KeyError::NotAFile { .. })
        ));
    }

    #[test]
    fn recipients_parse_print_and_load_from_a_file() {
        let a = Identity::generate().recipient();
        let text = a.to_string();
        assert!(text.starts_with("age1"));
        assert_eq!(text.parse::<Recipient>().unwrap(), a);
        let err = "age1nope".parse::<Recipient>().unwrap_err().to_string();
        assert!(err.contains("age1nope"), "{err}");
        let err = "AGE-SECRET-KEY-1QQQQSECRET"
            .parse::<Recipient>()
            .unwrap_err()
            .to_string();
        assert!(!err.contains("QQQQSECRET"), "{err}");
        let hex_key = "917c".repeat(16);
        let err = hex_key.parse::<Recipient>().unwrap_err().to_string();
        assert!(!err.contains(&hex_key[..12]), "{err}");
        for pasted in [
            "- AGE-SECRET-KEY-1QQQQSECRET",
            "\"AGE-SECRET-KEY-1QQQQSECRET\"",
            "'age-secret-key-1qqqqsecret'",
            "age1 AGE-SECRET-KEY-1QQQQSECRET",
        ] {
            let err = pasted.parse::<Recipient>().unwrap_err().to_string();
            assert!(!err.to_uppercase().contains("QQQQSECRET"), "{err}");
        }

        let dir = tempfile::tempdir().unwrap();
        let b = Identity::generate().recipient();
        let path = dir.path().join("recipients.txt");
        std::fs::write(&path, format!("# ops\n{a}\n\n  {b}  \n")).unwrap();
        assert_eq!(Recipient::load_file(&path).unwrap(), vec![a.clone(), b]);
        std::fs::write(&path, format!("{a}\nage1broken\n")).unwrap();
        let err = Recipient::load_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("age1broken"),
            "{err}"
        );
    }

    /// The standard `age` tool decrypts a wrapped key to the raw 32 bytes (the
    /// no-dbkeeper recovery path in docs/FORMAT.md). Needs `age` (`.ci/run`
    /// installs it).
    #[test]
    fn the_age_tool_unwraps_a_data_key() {
        let out = std::process::Command::new("age")
            .arg("--version")
            .output()
            .expect("age must be installed (apt-get install age; see .ci/run)");
        assert!(out.status.success());
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::generate();
        let path = dir.path().join("key.txt");
        id.save(&path).unwrap();
        let dk = Key::random().unwrap();
        let wrapped = dir.path().join("dk.age");
        std::fs::write(&wrapped, id.recipient().wrap(&dk).unwrap()).unwrap();
        let out = std::process::Command::new("age")
            .arg("-d")
            .arg("-i")
            .arg(&path)
            .arg(&wrapped)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, dk.expose());
    }
}

//! Bounded fuzzing (proptest) of the parsers that read untrusted input: the archive
//! reader, the pg_dump completeness check and the configuration loader. None may
//! panic; every bad input must come back as a typed error, a damaged archive must
//! never yield the original data, and a dump's verdict must not depend on how the
//! stream was cut into pieces.
//!
//! Cases per property: $DBKEEPER_FUZZ_CASES (default 300; `.ci/run` runs a longer
//! session). Failing cases are kept in `tests/proptest-regressions/fuzz.txt` and replayed
//! first on every later run — the corpus.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;

use dbkeeper::repo::archive::pgdump::{DumpCheck, DumpError, Summary};
use dbkeeper::repo::archive::{self, Compression, Header, Identity, Key, KeyRing, Settings};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("DBKEEPER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    }
}

struct Sample {
    key: Key,
    plain: Vec<u8>,
    /// Archives of `plain`: encrypted gzip, encrypted zstd, unencrypted none, and the
    /// first rewrapped to version 3 (the key and an age recipient).
    archives: Vec<Vec<u8>>,
}

fn sample() -> &'static Sample {
    static SAMPLE: OnceLock<Sample> = OnceLock::new();
    SAMPLE.get_or_init(|| {
        let key = Key::random().expect("key");
        let plain: Vec<u8> = (0..5000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let mut archives: Vec<Vec<u8>> = [
            (Compression::Gzip, true),
            (Compression::Zstd, true),
            (Compression::None, false),
        ]
        .into_iter()
        .map(|(compression, encrypted)| {
            let settings = Settings {
                header: Header {
                    database: "fuzz".into(),
                    backend: "sqlite".into(),
                    image: "sqlite".into(),
                    created: chrono::DateTime::from_timestamp(1_800_000_000, 0).expect("time"),
                    compression,
                    segment_size: 1024,
                    encryption: None,
                    globals: None,
                    sealed: None,
                },
                key: encrypted.then_some(&key),
                compression,
                level: compression.default_level(),
                threads: 1,
                check_with: None,
                globals: None,
            };
            archive::write_archive(&plain[..], Vec::new(), settings, &AtomicBool::new(false))
                .expect("write")
                .0
        })
        .collect();
        let recipient = Identity::generate().recipient();
        let ring = KeyRing::new(vec![key.clone()]);
        let re = archive::rewrap(&mut &archives[0][..], &ring, Some(&key), &[recipient])
            .expect("rewrap");
        let mut v3 = re.prefix.clone();
        v3.extend_from_slice(&archives[0][re.segments_offset as usize..]);
        archives.push(v3);
        Sample {
            key,
            plain,
            archives,
        }
    })
}

fn read(bytes: &[u8]) -> Result<Vec<u8>, archive::ArchiveError> {
    let keys = KeyRing::new(vec![sample().key.clone()]);
    archive::read_archive(bytes, &keys, Vec::new(), &AtomicBool::new(false)).map(|(out, _, _)| out)
}

#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(p, b)| Edit::Flip(p, b)),
        any::<usize>().prop_map(Edit::Truncate),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..64)
        )
            .prop_map(|(p, v)| Edit::Insert(p, v)),
        (any::<usize>(), 1..2000usize).prop_map(|(p, n)| Edit::Remove(p, n)),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let len = bytes.len().max(1);
        match e {
            Edit::Flip(p, b) => {
                if !bytes.is_empty() {
                    bytes[p % len] ^= b;
                }
            }
            Edit::Truncate(p) => bytes.truncate(p % len),
            Edit::Insert(p, v) => {
                let at = p % (bytes.len() + 1);
                bytes.splice(at..at, v.iter().copied());
            }
            Edit::Remove(p, n) => {
                let at = p % len;
                let end = (at + n).min(bytes.len());
                if at < end {
                    bytes.drain(at..end);
                }
            }
        }
    }
    bytes
}

/// A small custom-format dump (archive version 1.14, as pg_dump 12 to 15 write):
/// a table without data, a table with data in three chunks, an empty table, and two
/// large objects.
fn pg_dump_sample() -> &'static [u8] {
    static DUMP: OnceLock<Vec<u8>> = OnceLock::new();
    DUMP.get_or_init(|| {
        let mut out = b"PGDMP\x01\x0e\x00\x04\x08\x01".to_vec();
        let int = |out: &mut Vec<u8>, v: i64| {
            out.push(u8::from(v < 0));
            out.extend_from_slice(&(v.unsigned_abs() as u32).to_le_bytes());
        };
        let text = |out: &mut Vec<u8>, s: Option<&str>| match s {
            Some(s) => {
                int(out, s.len() as i64);
                out.extend_from_slice(s.as_bytes());
            }
            None => int(out, -1),
        };
        for v in [0, 1, 2, 3, 4, 5, 126, 0] {
            int(&mut out, v);
        }
        for v in ["fuzz", "15.0", "15.0"] {
            text(&mut out, Some(v));
        }
        let entries = [
            (1, "TABLE", false),
            (2, "TABLE DATA", true),
            (3, "TABLE DATA", true),
            (4, "BLOBS", true),
        ];
        int(&mut out, entries.len() as i64);
        for (id, desc, data) in entries {
            int(&mut out, id);
            int(&mut out, i64::from(data));
            for field in [Some("1259"), Some("16384"), Some("t"), Some(desc)] {
                text(&mut out, field);
            }
            int(&mut out, 2);
            for field in [
                Some(""),
                Some(""),
                None,
                Some("public"),
                Some(""),
                Some("heap"),
                Some("postgres"),
                Some("false"),
                Some("1"),
                None,
            ] {
                text(&mut out, field);
            }
            out.push(if data { 1 } else { 3 });
            out.extend_from_slice(&[0; 8]);
        }
        for (id, chunks) in [(2, &["1\ta\n", "2\tb\n", "3\tc\n"][..]), (3, &[][..])] {
            out.push(1);
            int(&mut out, id);
            for c in chunks {
                int(&mut out, c.len() as i64);
                out.extend_from_slice(c.as_bytes());
            }
            int(&mut out, 0);
        }
        out.push(3);
        int(&mut out, 4);
        for (oid, data) in [(16400, "large"), (-5, "an OID above 2^31")] {
            int(&mut out, oid);
            int(&mut out, data.len() as i64);
            out.extend_from_slice(data.as_bytes());
            int(&mut out, 0);
        }
        int(&mut out, 0);
        out
    })
}

/// The verdict on `bytes` fed in pieces of `piece` bytes (0: all at once).
fn check_dump(bytes: &[u8], piece: usize) -> Result<Summary, DumpError> {
    let mut check = DumpCheck::new();
    for p in bytes.chunks(if piece == 0 {
        bytes.len().max(1)
    } else {
        piece
    }) {
        check.feed(p)?;
    }
    check.finish()
}

proptest! {
    #![proptest_config(config())]

    /// Mutated pg_dump output: judged without panicking, the same way whatever the
    /// pieces; cut short, it always fails.
    #[test]
    fn mutated_pg_dumps_are_judged_the_same_in_any_pieces(edits in proptest::collection::vec(edit(), 1..4), piece in 1..40usize, cut in any::<usize>()) {
        let original = pg_dump_sample();
        prop_assert!(check_dump(original, 0).is_ok());
        let mutated = apply(original.to_vec(), &edits);
        prop_assert_eq!(check_dump(&mutated, 0), check_dump(&mutated, piece));
        let short = &original[..cut % original.len()];
        let e = check_dump(short, piece).expect_err("a cut dump passed");
        prop_assert!(e.is_truncated(), "{}", e);
    }

    /// Arbitrary bytes after a valid-looking dump header: never a panic, and the same
    /// verdict whatever the pieces.
    #[test]
    fn random_bytes_after_a_dump_header_are_judged_the_same_in_any_pieces(bytes in proptest::collection::vec(any::<u8>(), 0..3000), piece in 1..64usize) {
        let mut dump = pg_dump_sample()[..11].to_vec();
        dump.extend_from_slice(&bytes);
        prop_assert_eq!(check_dump(&dump, 0), check_dump(&dump, piece));
    }

    /// Mutated archives: an error, or — only if the edits cancelled out — the original.
    #[test]
    fn mutated_archives_fail_cleanly(which in 0..4usize, edits in proptest::collection::vec(edit(), 1..4)) {
        let original = &sample().archives[which];
        let mutated = apply(original.clone(), &edits);
        match read(&mutated) {
            Ok(out) => {
                prop_assert_eq!(&mutated, original, "a changed archive was accepted");
                prop_assert_eq!(out, sample().plain.clone());
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// Arbitrary bytes, with or without a valid-looking prefix.
    #[test]
    fn random_bytes_fail_cleanly(mut bytes in proptest::collection::vec(any::<u8>(), 0..3000), magic in any::<bool>(), len in any::<u32>()) {
        if magic {
            let mut prefix = b"DBKEEPER\x01".to_vec();
            prefix.extend_from_slice(&(len % 70_000).to_be_bytes());
            prefix.append(&mut bytes);
            bytes = prefix;
        }
        prop_assert!(read(&bytes).is_err());
    }

    /// Arbitrary text as a configuration file: parsed or refused, never a panic.
    #[test]
    fn arbitrary_config_text_is_parsed_or_refused(text in "\\PC{0,400}") {
        let _ = dbkeeper::Config::parse(Path::new("fuzz.toml"), &text);
    }

    /// A valid configuration with random edits: parsed or refused with the file name.
    #[test]
    fn mutated_configs_are_parsed_or_refused(edits in proptest::collection::vec((any::<usize>(), any::<char>()), 1..6)) {
        let base = "[daemon]\nstate-dir = \"/tmp/x\"\nmax-concurrent-jobs = 2\n\n[[database]]\nname = \"app\"\n\
                    url = \"sqlite:///tmp/app.db\"\n\n[[database.sql]]\nname = \"vacuum\"\nstatement = \"VACUUM\"\n\
                    schedule = \"0 0 3 * * *\"\ntimezone = \"Europe/Berlin\"\ntimeout = \"5m\"\n";
        let mut chars: Vec<char> = base.chars().collect();
        for (pos, c) in edits {
            let at = pos % chars.len();
            chars[at] = c;
        }
        let text: String = chars.into_iter().collect();
        if let Err(e) = dbkeeper::Config::parse(Path::new("fuzz.toml"), &text) {
            prop_assert!(e.to_string().starts_with("fuzz.toml"), "{}", e);
        }
    }
}

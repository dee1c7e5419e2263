//! The object-store backend against an independent oracle: random sequences of
//! storage operations (streamed puts published, abandoned or completed and then
//! dropped; replaces; deletes; ranged reads; clean-ups) run on an S3 namespace
//! (moto) and on the local folder backend, whose behaviour is the contract's
//! reference, and on a plain model (a map of name → bytes). After every step the
//! three must agree on what is visible and what it holds: an object store must
//! never show a partial or abandoned upload, overwrite a published archive, lose
//! what was published, or resurrect what was deleted.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::Arc;

use common::s3::S3Server;
use dbkeeper::config::{DestinationConfig, DestinationSettings, Location};
use dbkeeper::repo::storage::{self, Storage};
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, FileFailurePersistence, TestRunner};

#[derive(Debug, Clone)]
enum Op {
    /// Streamed upload of `len` bytes (in writes of `chunk`); then, by `end`:
    /// 0 publish, 1 drop unpublished, 2 read back (`written`) then drop,
    /// 3 read back then publish.
    Put {
        name: usize,
        len: usize,
        chunk: usize,
        seed: u8,
        end: u8,
    },
    Replace {
        name: usize,
        len: usize,
        seed: u8,
    },
    Delete {
        name: usize,
    },
    Read {
        name: usize,
        from: usize,
        to: usize,
    },
    Clean,
}

const NAMES: [&str; 4] = [
    "20261201T000000Z-scheduled.dbk",
    "20261201T000000Z-scheduled.manifest.json",
    "20261202T000000Z-manual.dbk",
    "odd name+with=chars.dbk",
];

fn op() -> impl Strategy<Value = Op> {
    let name = 0..NAMES.len();
    // Around the 5 MiB part size: single PUTs, one part plus a little, several parts.
    let len = prop_oneof![
        3 => 0usize..5000,
        1 => Just(5usize << 20),
        1 => (5usize << 20) + 1..(5usize << 20) + 70_000,
        1 => (10usize << 20) + 3..(11usize << 20),
    ];
    let chunk = prop_oneof![Just(1usize << 16), Just(1 << 20), 1usize..40_000];
    prop_oneof![
        4 => (name.clone(), len, chunk, any::<u8>(), 0u8..4).prop_map(|(name, len, chunk, seed, end)| Op::Put { name, len, chunk, seed, end }),
        2 => (name.clone(), 0usize..3000, any::<u8>()).prop_map(|(name, len, seed)| Op::Replace { name, len, seed }),
        2 => name.clone().prop_map(|name| Op::Delete { name }),
        2 => (name, 0usize..12 << 20, 0usize..12 << 20).prop_map(|(name, from, to)| Op::Read { name, from, to }),
        1 => Just(Op::Clean),
    ]
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

/// What happened, in terms both backends must agree on.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Ok,
    Exists,
    Missing,
    Bytes(Vec<u8>),
}

fn apply(store: &dyn Storage, op: &Op) -> Seen {
    match op {
        Op::Put {
            name,
            len,
            chunk,
            seed,
            end,
        } => {
            let data = bytes(*len, *seed);
            let mut up = store.put(NAMES[*name]).expect("put");
            for part in data.chunks((*chunk).max(1)) {
                up.write_all(part).expect("write");
            }
            if *end >= 2 {
                let mut back = Vec::new();
                let stored = match up.written() {
                    Ok(o) => o,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Seen::Exists,
                    Err(e) => panic!("written: {e}"),
                };
                stored
                    .read(None)
                    .expect("read")
                    .read_to_end(&mut back)
                    .expect("read back");
                assert_eq!(back.len(), data.len(), "read back what was written");
                assert!(back == data, "read back what was written");
            }
            match end {
                1 | 2 => {
                    drop(up);
                    Seen::Ok
                }
                _ => match up.publish() {
                    Ok(guard) => {
                        assert!(store.in_use(NAMES[*name]).expect("in_use"));
                        drop(guard);
                        Seen::Ok
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Seen::Exists,
                    Err(e) => panic!("publish: {e}"),
                },
            }
        }
        Op::Replace { name, len, seed } => {
            store
                .replace(NAMES[*name], &bytes(*len, *seed))
                .expect("replace");
            Seen::Ok
        }
        Op::Delete { name } => {
            store.delete(NAMES[*name]).expect("delete");
            Seen::Ok
        }
        Op::Read { name, from, to } => match store.open(NAMES[*name]) {
            Ok(obj) => {
                let mut out = Vec::new();
                obj.read(Some(*from as u64..*to as u64))
                    .expect("read")
                    .read_to_end(&mut out)
                    .expect("read");
                Seen::Bytes(out)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Seen::Missing,
            Err(e) => panic!("open: {e}"),
        },
        Op::Clean => {
            // Every upload here has ended: nothing is left to clean, nothing visible
            // may go.
            store.clean_uploads().expect("clean");
            Seen::Ok
        }
    }
}

/// The model: what the contract says the namespace holds after `op`.
fn model(state: &mut BTreeMap<String, Vec<u8>>, op: &Op) -> Seen {
    match op {
        Op::Put {
            name,
            len,
            seed,
            end,
            ..
        } => {
            let n = NAMES[*name].to_owned();
            if *end == 1 {
                return Seen::Ok;
            }
            if state.contains_key(&n) {
                return Seen::Exists;
            }
            if *end == 2 {
                return Seen::Ok;
            }
            state.insert(n, bytes(*len, *seed));
            Seen::Ok
        }
        Op::Replace { name, len, seed } => {
            state.insert(NAMES[*name].to_owned(), bytes(*len, *seed));
            Seen::Ok
        }
        Op::Delete { name } => {
            state.remove(NAMES[*name]);
            Seen::Ok
        }
        Op::Read { name, from, to } => match state.get(NAMES[*name]) {
            Some(b) => {
                let end = (*to).min(b.len());
                Seen::Bytes(if *from >= end {
                    Vec::new()
                } else {
                    b[*from..end].to_vec()
                })
            }
            None => Seen::Missing,
        },
        Op::Clean => Seen::Ok,
    }
}

fn visible(store: &dyn Storage) -> Vec<String> {
    let mut names = store.list("").expect("list");
    names.sort();
    names
}

#[test]
fn object_store_behaves_like_the_local_folder_and_the_model() {
    let s3 = S3Server::start();
    for (k, v) in s3.env() {
        // This test process is the only user of these variables.
        std::env::set_var(k, v);
    }
    let cases = std::env::var("DBKEEPER_ORACLE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12u32);
    let mut runner = TestRunner::new(PropConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/proptest-regressions/storage_oracle.txt",
        ))),
        ..PropConfig::default()
    });
    let case = std::sync::atomic::AtomicU32::new(0);
    runner
        .run(&prop::collection::vec(op(), 1..14), |ops| {
            let n = case.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let dir = tempfile::tempdir().unwrap();
            let local: Arc<dyn Storage> =
                storage::open(&DestinationConfig::local(dir.path()), &["app"]);
            local.prepare().unwrap();
            let remote: Arc<dyn Storage> = storage::open(
                &DestinationConfig {
                    location: Location::parse(&s3.url(&format!("case{n}"))).unwrap(),
                    settings: DestinationSettings::default(),
                },
                &["app"],
            );
            remote.prepare().unwrap();
            let mut state = BTreeMap::new();
            for op in &ops {
                let expected = model(&mut state, op);
                let on_local = apply(&*local, op);
                let on_remote = apply(&*remote, op);
                prop_assert_eq!(&on_local, &expected, "local after {:?}", op);
                prop_assert_eq!(&on_remote, &expected, "s3 after {:?}", op);
                let names: Vec<String> = state.keys().cloned().collect();
                prop_assert_eq!(visible(&*local), names.clone(), "local listing");
                prop_assert_eq!(visible(&*remote), names, "s3 listing");
                prop_assert!(s3.multipart_uploads().is_empty(), "an upload was left");
            }
            // Nothing but the visible objects is left in the bucket (no lease).
            let mut keys = s3.keys(&format!("case{n}/"));
            keys.sort();
            let expected: Vec<String> = state.keys().map(|k| format!("case{n}/app/{k}")).collect();
            prop_assert_eq!(keys, expected);
            Ok(())
        })
        .unwrap();
}

//! `dbkeeper key rewrap` against an independent oracle (issue 16): generated
//! destinations mixing genuine backups under the old key A and the new key B,
//! forgeries under a key nobody configured, and damage (a truncated archive, an
//! edited manifest, one backup's archive copied over another's), at generated times.
//! The oracle knows only what each item is, never how dbkeeper decides:
//! - nothing is deleted, and an archive neither A nor B opened is left byte for byte;
//! - every archive A or B opened still opens with A or B (never neither);
//! - every undamaged genuine backup ends under B only, trusted by a reader holding B
//!   alone, except an A backup newer than the first B backup (the retired-key rule
//!   of the README: nothing tells it from a forgery made with a leaked A);
//! - the run exits 0 exactly when every item is undamaged and genuine (and none is
//!   retired), and a second run finds nothing left to do.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{backup_table, plant_backup, sqlite, sqlite_db, Planted, Workdir, BIN};
use dbkeeper::repo::catalog::BackupKind;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Made {
    /// Genuine, under the old key A.
    A,
    /// Genuine, under the new key B (already current).
    B,
    /// A forgery under key C, which no config knows.
    C,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Damage {
    None,
    /// The archive's last bytes cut off.
    Truncated,
    /// The manifest's digest edited.
    EditedManifest,
    /// The archive of the item `n` (modulo the count) copied over this one's.
    CopiedFrom(usize),
}

fn item() -> impl Strategy<Value = (Made, Damage, u32)> {
    let made = prop_oneof![3 => Just(Made::A), 2 => Just(Made::B), 1 => Just(Made::C)];
    let damage = prop_oneof![
        6 => Just(Damage::None),
        1 => Just(Damage::Truncated),
        1 => Just(Damage::EditedManifest),
        1 => (0usize..8).prop_map(Damage::CopiedFrom),
    ];
    // Minutes before now: the order of A and B items in time matters.
    (made, damage, 10u32..5000)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

fn opens(archive: &Path, key: &Path) -> bool {
    std::process::Command::new(BIN)
        .args(["decrypt", s(archive), "--key-file", s(key)])
        .output()
        .expect("decrypt")
        .status
        .success()
}

struct Before {
    archive: PathBuf,
    bytes: Vec<u8>,
    a: bool,
    b: bool,
}

#[test]
fn rewrap_matches_the_oracle() {
    let mut runner = TestRunner::new(common::oracle_config(
        "tests/proptest-regressions/rewrap_oracle.txt",
        24,
    ));
    runner
        .run(&prop::collection::vec(item(), 1..7), |items| {
            check(&items);
            Ok(())
        })
        .expect("rewrap agrees with the oracle");
}

fn check(items: &[(Made, Damage, u32)]) {
    let w = Workdir::new();
    sqlite(
        &w.path().join("app.db"),
        "CREATE TABLE t (x TEXT); INSERT INTO t VALUES ('one');",
    );
    let image = std::fs::read(w.path().join("app.db")).expect("db");
    let (a, b, c) = (w.key("a.key"), w.key("b.key"), w.key("c.key"));
    let dest = w.path().join("backups");
    let now = chrono::Utc::now();
    // Distinct minutes, so ids never collide.
    let mut used = std::collections::BTreeSet::new();
    let mut planted: Vec<(String, Made, Damage, chrono::DateTime<chrono::Utc>)> = Vec::new();
    for &(made, damage, minutes) in items {
        if !used.insert(minutes) {
            continue;
        }
        let key = match made {
            Made::A => &a,
            Made::B => &b,
            Made::C => &c,
        };
        let created = now - chrono::Duration::minutes(i64::from(minutes));
        let id = plant_backup(
            &dest,
            key,
            Planted {
                name: "app",
                backend: "sqlite",
                image: "app.db",
                created,
                kind: BackupKind::Manual,
            },
            image.as_slice(),
        );
        planted.push((id, made, damage, created));
    }
    let folder = dest.join("app");
    let archive = |id: &str| folder.join(format!("{id}.dbk"));
    let manifest = |id: &str| folder.join(format!("{id}.manifest.json"));
    let count = planted.len();
    for (id, _, damage, _) in &planted {
        match damage {
            Damage::None => {}
            Damage::Truncated => {
                let bytes = std::fs::read(archive(id)).expect("archive");
                std::fs::write(archive(id), &bytes[..bytes.len() - 7]).expect("truncate");
            }
            Damage::EditedManifest => {
                let text = std::fs::read_to_string(manifest(id)).expect("manifest");
                let mut json: serde_json::Value = serde_json::from_str(&text).expect("json");
                json["sha256"] = serde_json::Value::String("0".repeat(64));
                std::fs::write(manifest(id), json.to_string()).expect("edit");
            }
            Damage::CopiedFrom(n) => {
                let from = &planted[n % count].0;
                if from != id {
                    std::fs::copy(archive(from), archive(id)).expect("copy");
                }
            }
        }
    }
    // What a copy did to its source is judged by what the target holds now.
    let damaged = |i: usize| match planted[i].2 {
        Damage::None => false,
        Damage::CopiedFrom(n) => planted[n % count].0 != planted[i].0,
        _ => true,
    };
    // The retired-key boundary is the first B archive that authenticates as itself:
    // the listing checks the header and size, not the digest (that is `verify`'s
    // work), so an edited digest still counts.
    let first_b = planted
        .iter()
        .enumerate()
        .filter(|(i, p)| p.1 == Made::B && (!damaged(*i) || matches!(p.2, Damage::EditedManifest)))
        .map(|(_, p)| p.3)
        .min();
    let retired = |i: usize| {
        planted[i].1 == Made::A
            && first_b.is_some_and(|f| planted[i].3.timestamp() >= f.timestamp())
    };
    let clean = |i: usize| !damaged(i) && planted[i].1 != Made::C && !retired(i);
    let before: Vec<Before> = planted
        .iter()
        .map(|(id, ..)| {
            let path = archive(id);
            Before {
                bytes: std::fs::read(&path).expect("archive"),
                a: opens(&path, &a),
                b: opens(&path, &b),
                archive: path,
            }
        })
        .collect();
    let names_before = common::dir_names(&folder);

    let decryption = format!("decryption-key-files = [\"{}\"]", a.display());
    w.write_config(
        "",
        &sqlite_db(&w, "app", &backup_table(&dest, Some(&b), &decryption)),
    );
    let out = w.cmd(&["key", "rewrap"]).output().expect("rewrap");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let all_clean = (0..count).all(clean);
    let context = format!("{planted:?}\n{text}");

    assert_eq!(
        common::dir_names(&folder),
        names_before,
        "files added or deleted: {context}"
    );
    for (i, was) in before.iter().enumerate() {
        let (now_a, now_b) = (opens(&was.archive, &a), opens(&was.archive, &b));
        if !was.a && !was.b {
            assert_eq!(
                std::fs::read(&was.archive).expect("archive"),
                was.bytes,
                "an archive neither key opened was rewritten: {context}"
            );
        } else {
            assert!(now_a || now_b, "item {i} opens with neither key: {context}");
        }
        if clean(i) {
            assert!(now_b && !now_a, "item {i} is not under B only: {context}");
        }
    }
    // A reader holding B alone trusts exactly the clean items (and a damaged item's
    // copy that is byte for byte another's is never counted twice).
    w.write_config(
        "",
        &sqlite_db(&w, "app", &backup_table(&dest, Some(&b), "")),
    );
    let list = w.stdout(&["backup", "list", "app"]);
    let trusted: BTreeMap<&str, bool> = planted
        .iter()
        .map(|(id, ..)| {
            let row = list.lines().find(|l| l.starts_with(id.as_str()));
            (id.as_str(), row.is_some_and(|r| !r.contains("UNTRUSTED")))
        })
        .collect();
    for (i, (id, ..)) in planted.iter().enumerate() {
        if clean(i) {
            assert!(
                trusted[id.as_str()],
                "clean item {i} is not trusted:\n{list}\n{context}"
            );
        }
        if planted[i].1 == Made::C {
            assert!(
                !trusted[id.as_str()],
                "a forgery is trusted:\n{list}\n{context}"
            );
        }
    }
    if all_clean {
        assert_eq!(out.status.code(), Some(0), "{context}");
        w.write_config(
            "",
            &sqlite_db(&w, "app", &backup_table(&dest, Some(&b), &decryption)),
        );
        let again = w.stdout(&["key", "rewrap"]);
        assert!(
            again.contains(&format!(
                "0 rewrapped, {count} already current, 0 repaired, 0 skipped"
            )),
            "{again}\n{context}"
        );
    } else if (0..count)
        .any(|i| planted[i].1 == Made::C || matches!(planted[i].2, Damage::Truncated) || retired(i))
    {
        assert_eq!(out.status.code(), Some(1), "{context}");
    }
}

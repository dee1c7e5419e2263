//! Real pg_dump output (tables with data, an empty table, large objects; plain,
//! compressed and written to a seekable file) passes in pieces of any size; the same
//! output cut anywhere in its header and table of contents, at a sample of points in
//! its data and exactly at each block boundary, with a block removed, or with bytes
//! appended, fails. Synthetic dumps cover the layouts of the versions this server's
//! pg_dump does not write.

use std::process::Command;
use std::sync::OnceLock;

use super::*;

use crate::testing::{psql, SERVER};

struct Dumps {
    /// As dbkeeper runs it: `--format=custom --compress=0` to a pipe.
    plain: Vec<u8>,
    /// pg_dump's default compression, to a pipe.
    compressed: Vec<u8>,
    /// Uncompressed, written to a file: the table of contents is rewritten with
    /// the data offsets (`K_OFFSET_POS_SET`).
    seekable: Vec<u8>,
}

fn dump(db: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new("pg_dump")
        .args(args)
        .arg(format!("{SERVER}/{db}"))
        .output()
        .expect("pg_dump runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn dumps() -> &'static Dumps {
    static DUMPS: OnceLock<Dumps> = OnceLock::new();
    DUMPS.get_or_init(|| {
        let db = format!("dbk_pgdump_check_{}", std::process::id());
        psql("postgres", &format!("DROP DATABASE IF EXISTS {db}"));
        psql("postgres", &format!("CREATE DATABASE {db}"));
        psql(
            &db,
            "CREATE TABLE a (id int PRIMARY KEY, v text);
             INSERT INTO a SELECT i, md5(i::text) FROM generate_series(1, 3000) i;
             CREATE TABLE empty (x int);
             CREATE SCHEMA s;
             CREATE TABLE s.b (id serial, payload bytea);
             INSERT INTO s.b (payload) SELECT decode(repeat(md5(i::text), 20), 'hex') FROM generate_series(1, 200) i;
             SELECT lo_from_bytea(0, (SELECT string_agg(decode(md5(i::text), 'hex'), '') FROM generate_series(1, 3000) i));
             SELECT lo_from_bytea(0, 'a small large object');",
        );
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let path = file.path().to_string_lossy().into_owned();
        let dumps = Dumps {
            plain: dump(&db, &["--format=custom", "--compress=0"]),
            compressed: dump(&db, &["--format=custom"]),
            seekable: {
                let to_file = ["--format=custom", "--compress=0", "-f", path.as_str()];
                assert!(dump(&db, &to_file).is_empty());
                std::fs::read(file.path()).expect("read the dump")
            },
        };
        psql("postgres", &format!("DROP DATABASE {db}"));
        dumps
    })
}

fn check(bytes: &[u8]) -> Result<Summary, DumpError> {
    let mut c = DumpCheck::new();
    c.feed(bytes)?;
    c.finish()
}

/// Where the data starts, and every offset between two blocks (the data start, after
/// each block), found by feeding one byte at a time.
fn boundaries(bytes: &[u8]) -> Vec<usize> {
    let mut c = DumpCheck::new();
    let mut at = Vec::new();
    for (i, b) in bytes.iter().enumerate() {
        if c.between_blocks() {
            at.push(i);
        }
        c.feed(std::slice::from_ref(b)).expect("a complete dump");
    }
    assert!(c.between_blocks());
    at.push(bytes.len());
    at
}

fn all() -> [(&'static str, &'static [u8]); 3] {
    let d = dumps();
    [
        ("plain", &d.plain),
        ("compressed", &d.compressed),
        ("seekable", &d.seekable),
    ]
}

#[test]
fn complete_dumps_pass_in_pieces_of_any_size() {
    for (name, bytes) in all() {
        for piece in [1, 2, 3, 5, 7, 64, 4096, 256 * 1024] {
            let mut c = DumpCheck::new();
            for p in bytes.chunks(piece) {
                c.feed(p)
                    .unwrap_or_else(|e| panic!("{name}, pieces of {piece}: {e}"));
            }
            let summary = c.finish().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(summary.bytes, bytes.len() as u64);
            // a, empty, s.b and the large objects.
            assert_eq!(summary.blocks, 4, "{name}");
            assert!(summary.entries > summary.blocks, "{name}");
        }
    }
}

#[test]
fn a_dump_cut_anywhere_fails() {
    for (name, bytes) in all() {
        let bounds = boundaries(bytes);
        let data_start = bounds[0];
        let mut cuts: Vec<usize> = (0..data_start).collect();
        // Exactly between blocks, then a sample of the data.
        cuts.extend(&bounds[..bounds.len() - 1]);
        cuts.extend((data_start..bytes.len()).step_by(97));
        cuts.extend(bounds[1..].iter().map(|b| b - 1));
        let (mut in_data, mut in_lo) = (0, 0);
        for cut in cuts {
            let e = check(&bytes[..cut]).expect_err(&format!("{name} cut at {cut} passed"));
            assert!(e.is_truncated(), "{name} cut at {cut}: {e}");
            let text = e.to_string();
            assert!(text.contains("the dump is incomplete"), "{text}");
            if bounds.contains(&cut) {
                assert!(
                    matches!(e, DumpError::Missing { .. }),
                    "{name} cut at {cut}: {e}"
                );
            }
            in_data += usize::from(
                text.contains("inside the data of entry") && text.contains("(TABLE DATA public.a)"),
            );
            in_lo += usize::from(text.contains("large object"));
        }
        assert!(in_data > 0 && in_lo > 0, "{name}: {in_data} {in_lo}");
    }
}

#[test]
fn a_dump_missing_a_block_fails() {
    for (name, bytes) in all() {
        let bounds = boundaries(bytes);
        for pair in bounds.windows(2) {
            let mut cut = bytes[..pair[0]].to_vec();
            cut.extend_from_slice(&bytes[pair[1]..]);
            let e = check(&cut).expect_err(name);
            assert!(matches!(e, DumpError::Missing { .. }), "{name}: {e}");
        }
        // Missing all blocks but the first: the message names a few of them.
        let e = check(&bytes[..bounds[1]]).expect_err(name);
        assert!(
            e.to_string().contains("without the data of entry"),
            "{name}: {e}"
        );
    }
}

#[test]
fn trailing_bytes_and_damaged_blocks_fail() {
    for (name, bytes) in all() {
        let bounds = boundaries(bytes);
        let first_block = &bytes[bounds[0]..bounds[1]];
        for tail in [&b"\0"[..], b"PGDMP", first_block] {
            let mut more = bytes.to_vec();
            more.extend_from_slice(tail);
            let e = check(&more).expect_err(name);
            assert!(
                matches!(e, DumpError::Malformed { .. }) && e.to_string().contains("trailing"),
                "{name}: {e}"
            );
        }
        // The same block twice, before the end.
        let mut twice = bytes[..bounds[1]].to_vec();
        twice.extend_from_slice(first_block);
        let e = check(&twice).expect_err(name);
        assert!(e.to_string().contains("second data block"), "{name}: {e}");
        // An unknown block type, and a block of an entry the table does not list.
        let mut bad = bytes.to_vec();
        bad[bounds[1]] = 2;
        let e = check(&bad).expect_err(name);
        assert!(
            e.to_string().contains("unknown data block type 2"),
            "{name}: {e}"
        );
        let mut bad = bytes.to_vec();
        bad[bounds[1] + 2] ^= 0x40;
        let e = check(&bad).expect_err(name);
        assert!(
            e.to_string().contains("does not list with data"),
            "{name}: {e}"
        );
        // A flipped sign byte of a chunk length.
        let mut bad = bytes.to_vec();
        bad[bounds[0] + 1 + 5] = 7;
        let e = check(&bad).expect_err(name);
        assert!(matches!(e, DumpError::Malformed { .. }), "{name}: {e}");
    }
}

#[test]
fn other_formats_and_garbage_fail_without_panicking() {
    let text = b"--\n-- PostgreSQL database dump\n--\n";
    assert!(matches!(check(text), Err(DumpError::Malformed { .. })));
    assert!(check(b"").unwrap_err().is_truncated());
    let mut tar_like = dumps().plain.clone();
    tar_like[10] = 3;
    let e = check(&tar_like).unwrap_err();
    assert!(e.to_string().contains("not custom"), "{e}");
    // Pseudo-random damage anywhere never panics.
    let plain = &dumps().plain;
    let mut x = 0x9e37_79b9_u32;
    for _ in 0..2000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let mut bad = plain.clone();
        let at = x as usize % bad.len();
        bad[at] = (x >> 8) as u8;
        let _ = check(&bad);
    }
}

/// A synthetic custom-format dump in the layout of archive version 1.`minor`.
struct Synth {
    out: Vec<u8>,
}

impl Synth {
    fn int(&mut self, v: i64) {
        self.out.push(u8::from(v < 0));
        self.out
            .extend_from_slice(&(v.unsigned_abs() as u32).to_le_bytes());
    }

    fn str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.int(s.len() as i64);
                self.out.extend_from_slice(s.as_bytes());
            }
            None => self.int(-1),
        }
    }

    /// Entries 1 (no data) and 2 (data); with `block`, entry 2's block.
    fn dump(major: u8, minor: u8, block: bool) -> Vec<u8> {
        let mut s = Synth { out: Vec::new() };
        s.out.extend_from_slice(b"PGDMP");
        s.out.extend_from_slice(&[major, minor, 0, 4, 8, 1]);
        if minor >= 15 {
            s.out.push(0);
        } else {
            s.int(0);
        }
        for v in [1, 2, 3, 4, 5, 126, 0] {
            s.int(v);
        }
        for v in ["db", "17.0", "17.0"] {
            s.str(Some(v));
        }
        s.int(2);
        for (id, data) in [(1, false), (2, true)] {
            s.int(id);
            s.int(i64::from(data));
            s.str(Some("1259"));
            s.str(Some("16384"));
            s.str(Some("t"));
            s.str(Some(if data { "TABLE DATA" } else { "TABLE" }));
            s.int(if data { 3 } else { 2 });
            s.str(Some(if data { "" } else { "CREATE TABLE t (x int);" }));
            s.str(Some(""));
            s.str(if data {
                Some("COPY t (x) FROM stdin;\n")
            } else {
                None
            });
            s.str(Some("public"));
            s.str(Some(""));
            if minor >= 14 {
                s.str(Some("heap"));
            }
            if minor >= 16 {
                s.int(i64::from(b'r'));
            }
            s.str(Some("postgres"));
            s.str(Some("false"));
            if data {
                s.str(Some("1"));
            }
            s.str(None);
            s.out.push(if data {
                K_OFFSET_POS_NOT_SET
            } else {
                K_OFFSET_NO_DATA
            });
            s.out.extend_from_slice(&[0; 8]);
        }
        if block {
            s.out.push(BLK_DATA);
            s.int(2);
            s.int(4);
            s.out.extend_from_slice(b"1\n2\n");
            s.int(0);
        }
        s.out
    }
}

#[test]
fn every_supported_version_is_read_in_its_own_layout() {
    for minor in OLDEST_MINOR..=NEWEST_MINOR {
        let whole = Synth::dump(1, minor, true);
        let summary = check(&whole).unwrap_or_else(|e| panic!("1.{minor}: {e}"));
        assert_eq!((summary.entries, summary.blocks), (2, 1), "1.{minor}");
        let e = check(&Synth::dump(1, minor, false)).unwrap_err();
        assert!(
            e.to_string()
                .contains("without the data of entry 2 (TABLE DATA public.t)"),
            "1.{minor}: {e}"
        );
        for cut in 0..whole.len() {
            assert!(check(&whole[..cut]).is_err(), "1.{minor} cut at {cut}");
        }
    }
    // A 1.16 dump read with the 1.14 layout would not parse: the layouts differ.
    let mut relabelled = Synth::dump(1, 16, true);
    relabelled[6] = 14;
    assert!(check(&relabelled).is_err());
}

#[test]
fn unsupported_versions_are_refused_saying_what_is_supported() {
    for (major, minor, says) in [
        (1, 17, "a dbkeeper that knows it"),
        (2, 0, "a dbkeeper that knows it"),
        (1, 11, "a newer pg_dump"),
    ] {
        let e = check(&Synth::dump(major, minor, true)).unwrap_err();
        assert!(e.is_unsupported(), "{e}");
        let text = e.to_string();
        assert!(
            text.contains(&format!("version {major}.{minor}.0"))
                && text.contains("1.12 to 1.16")
                && text.contains(says),
            "{text}"
        );
    }
}

/// The contents a DumpCheck gathers from `bytes` fed `piece` bytes at a time.
fn contents_of(bytes: &[u8], piece: usize) -> Contents {
    let mut c = DumpCheck::new();
    for part in bytes.chunks(piece) {
        c.feed(part).unwrap();
    }
    c.finish().unwrap();
    c.into_contents()
}

#[test]
fn contents_list_tables_indexes_constraints_and_which_tables_have_rows() {
    let db = format!("dbk_pgdump_contents_{}", std::process::id());
    psql("postgres", &format!("DROP DATABASE IF EXISTS {db}"));
    psql("postgres", &format!("CREATE DATABASE {db}"));
    psql(
        &db,
        r#"CREATE TABLE full_t (id int PRIMARY KEY, v text);
           INSERT INTO full_t SELECT i, 'v' FROM generate_series(1, 10) i;
           CREATE TABLE empty_t (x int REFERENCES full_t);
           CREATE INDEX empty_x ON empty_t (x);
           CREATE SCHEMA "Odd Schema";
           CREATE TABLE "Odd Schema"."We ""ird"" Name" (x int);
           INSERT INTO "Odd Schema"."We ""ird"" Name" VALUES (1);
           CREATE TABLE p (k int, v text) PARTITION BY RANGE (k);
           CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (10);
           CREATE TABLE p2 PARTITION OF p FOR VALUES FROM (10) TO (20);
           INSERT INTO p VALUES (1, 'only in p1');
           CREATE VIEW vw AS SELECT * FROM full_t;
           CREATE TABLE "Tâble" (x int); INSERT INTO "Tâble" VALUES (1);"#,
    );
    let plain = dump(&db, &["--format=custom", "--compress=0"]);
    let compressed = dump(&db, &["--format=custom"]);
    psql("postgres", &format!("DROP DATABASE {db}"));

    let c = contents_of(&plain, plain.len());
    assert!(c.rows_known);
    // One byte at a time gathers the same.
    assert_eq!(contents_of(&plain, 1), c);
    let table = |schema: &str, name: &str| {
        let found: Vec<&Relation> = c
            .relations
            .iter()
            .filter(|r| r.kind == RelKind::Table && r.schema == schema && r.name == name)
            .collect();
        assert!(!found.is_empty(), "{schema}.{name} not listed: {c:?}");
        found.iter().any(|r| r.rows)
    };
    assert!(table("public", "full_t"));
    // An empty table's data block holds only the end of its COPY (`\.`).
    assert!(!table("public", "empty_t"));
    assert!(table("Odd Schema", "We \"ird\" Name"));
    assert!(table("public", "Tâble"));
    // The partitioned table has no data of its own; its rows are its partitions'.
    assert!(!table("public", "p"));
    assert!(table("public", "p1"));
    assert!(!table("public", "p2"));
    assert!(c
        .relations
        .iter()
        .any(|r| r.kind == RelKind::Index && r.schema == "public" && r.name == "empty_x"));
    // Not a table: a view is not looked up as one.
    assert!(!c.relations.iter().any(|r| r.name == "vw"));
    // The primary key and the foreign key.
    assert_eq!(c.constraints, 2);

    // Compressed, an empty table's block holds the compressor's frame: rows unknown.
    let z = contents_of(&compressed, 4096);
    assert!(!z.rows_known);
    assert_eq!(z.relations.len(), c.relations.len());

    // In a LATIN1 database the same name is other bytes, which a UTF-8 session would
    // not find: it is left out rather than looked up wrong.
    psql("postgres", &format!("DROP DATABASE IF EXISTS {db}_l1"));
    psql(
        "postgres",
        &format!("CREATE DATABASE {db}_l1 ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"),
    );
    psql(
        &format!("{db}_l1"),
        r#"CREATE TABLE "Tâble" (x int); INSERT INTO "Tâble" VALUES (1); CREATE TABLE plain (x int);"#,
    );
    let latin1 = dump(&format!("{db}_l1"), &["--format=custom", "--compress=0"]);
    psql("postgres", &format!("DROP DATABASE {db}_l1"));
    let l = contents_of(&latin1, latin1.len());
    let names: Vec<&str> = l.relations.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["plain", "plain"], "{l:?}");
}

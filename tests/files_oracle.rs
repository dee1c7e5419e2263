//! Differential test of directory backups (`[[files]]`): generated trees (nested
//! folders, files with small contents, odd but valid names, links of every sort,
//! modes, mtimes) and generated `exclude` globs, backed up and restored by the real
//! binary, against a model computed here from the generated spec alone.
//!
//! The model applies the README's exclude rules with its own matcher (not globset):
//! patterns are relative to `path`, `*` does not cross `/`, `**` does (as a whole
//! component, zero or more of them), a matching directory is left out whole, and
//! `dir/**` leaves out `dir` itself too. What is kept comes back with its kind,
//! contents, link target (never followed), permission bits and mtime in whole
//! seconds (docs/FORMAT.md); the restored tree must equal the model exactly, no
//! path more or less. `restore --to` a non-empty directory must leave it byte for
//! byte as it was without `--force` (exit 1) and make it the model tree with it.
//! Cases: $DBKEEPER_ORACLE_CASES (default 64).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{archives, Workdir};
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestRunner};

fn runner() -> TestRunner {
    TestRunner::new(PropConfig {
        // Each case runs the binary five times: shrinking is bounded in time.
        max_shrink_time: 240_000,
        ..common::oracle_config("tests/proptest-regressions/files_oracle.txt", 64)
    })
}

/// Name stems: plain, spaces, unicode, leading dot, `#`, a dash, non-UTF-8 bytes,
/// and two long ones that reach 255 bytes with the longest extension. None holds a
/// glob metacharacter, a quote or a backslash, so a name is its own literal pattern
/// and a TOML string as it is.
fn stems() -> Vec<Vec<u8>> {
    vec![
        b"a".to_vec(),
        b"data".to_vec(),
        b"with space".to_vec(),
        "caf\u{e9}".as_bytes().to_vec(),
        "\u{65e5}\u{672c}\u{8a9e}".as_bytes().to_vec(),
        b".hidden".to_vec(),
        b"#notes#".to_vec(),
        b"-dash".to_vec(),
        b"bad\xff\xfe".to_vec(),
        b"\x80latin".to_vec(),
        vec![b'L'; 251],
        "\u{e9}".repeat(125).into_bytes(),
    ]
}

const EXTS: [&str; 4] = ["", ".txt", ".tmp", ".log"];

#[derive(Debug, Clone)]
enum Target {
    /// A relative path to the n-th created entry (a file, a folder or a link).
    Rel(usize),
    /// The absolute path of the n-th created entry in the source tree.
    Abs(usize),
    Dangling,
    /// Up and out of the tree.
    Outside,
    AbsOutside,
    /// Non-UTF-8 bytes in the target.
    Bytes,
}

#[derive(Debug, Clone)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Link(Target),
}

#[derive(Debug, Clone)]
struct Node {
    /// Which folder created so far holds it (0: the root), modulo their number.
    parent: usize,
    stem: usize,
    ext: usize,
    kind: Kind,
    mode: u32,
    /// Seconds and nanoseconds since 1970.
    mtime: (i64, u32),
}

#[derive(Debug, Clone, Copy)]
enum Form {
    /// The entry's whole relative path, as written.
    Literal,
    /// `<folder>/**`: the entry's folder (itself if it is one).
    DirAll,
    /// `*<ext>`: top-level entries with that extension only.
    Ext,
    /// `**/*<ext>`: anywhere.
    AnyExt,
    /// `**/<name>`: anywhere.
    AnyName,
}

#[derive(Debug, Clone)]
struct Case {
    nodes: Vec<Node>,
    /// (created entry, form) pairs.
    excludes: Vec<(usize, Form)>,
}

fn mtime() -> impl Strategy<Value = (i64, u32)> {
    prop_oneof![
        3 => (1_600_000_000i64..1_790_000_000).prop_map(|s| (s, 0)),
        2 => (1i64..400_000_000).prop_map(|s| (s, 0)),
        1 => Just((0i64, 0u32)),
        1 => (-2_000_000_000i64..0).prop_map(|s| (s, 0)),
        2 => (1_000_000_000i64..1_700_000_000, 1u32..1_000_000_000),
    ]
}

fn kind() -> impl Strategy<Value = Kind> {
    let target = prop_oneof![
        4 => any::<usize>().prop_map(Target::Rel),
        2 => any::<usize>().prop_map(Target::Abs),
        1 => Just(Target::Dangling),
        1 => Just(Target::Outside),
        1 => Just(Target::AbsOutside),
        1 => Just(Target::Bytes),
    ];
    prop_oneof![
        3 => Just(Kind::Dir),
        2 => Just(Kind::File(Vec::new())),
        3 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Kind::File),
        1 => prop::collection::vec(any::<u8>(), 500..1100).prop_map(Kind::File),
        3 => target.prop_map(Kind::Link),
    ]
}

fn node() -> impl Strategy<Value = Node> {
    (
        any::<usize>(),
        0..stems().len(),
        0..EXTS.len(),
        kind(),
        0u32..0o10000,
        mtime(),
    )
        .prop_map(|(parent, stem, ext, kind, mode, mtime)| Node {
            parent,
            stem,
            ext,
            kind,
            mode,
            mtime,
        })
}

fn case() -> impl Strategy<Value = Case> {
    let form = prop_oneof![
        Just(Form::Literal),
        Just(Form::DirAll),
        Just(Form::Ext),
        Just(Form::AnyExt),
        Just(Form::AnyName),
    ];
    (
        prop::collection::vec(node(), 0..18),
        prop::collection::vec((any::<usize>(), form), 0..4),
    )
        .prop_map(|(nodes, excludes)| Case { nodes, excludes })
}

/// An entry as the model says it must be, and as a real tree is read back.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir {
        mode: u32,
        mtime: i64,
    },
    File {
        data: Vec<u8>,
        mode: u32,
        mtime: i64,
    },
    /// A link's own mode is always 0777 on Linux: not compared.
    Link {
        target: OsString,
        mtime: i64,
    },
}

/// Relative path (bytes, `/`-separated) → entry.
type Tree = BTreeMap<Vec<u8>, Entry>;

/// An entry created in the source tree.
struct Made {
    rel: Vec<u8>,
    name: Vec<u8>,
    ext: &'static str,
    /// Index into `made` of its folder (None: the root).
    parent: Option<usize>,
    depth: usize,
    entry: Entry,
    node: Node,
}

fn rel_path(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
}

/// Builds the tree under `root` and returns what was made, in creation order.
fn build(root: &Path, nodes: &[Node]) -> Vec<Made> {
    let stems = stems();
    std::fs::create_dir_all(root).expect("root");
    let mut made: Vec<Made> = Vec::new();
    let mut names: BTreeSet<Vec<u8>> = BTreeSet::new();
    for node in nodes {
        let dirs: Vec<usize> = (0..made.len())
            .filter(|&i| matches!(made[i].entry, Entry::Dir { .. }))
            .collect();
        let pick = node.parent % (dirs.len() + 1);
        // Four levels at most: 4 × 256 bytes stays far below PATH_MAX.
        let parent = (pick > 0)
            .then(|| dirs[pick - 1])
            .filter(|&p| made[p].depth < 4);
        let ext = EXTS[node.ext];
        let mut name = stems[node.stem].clone();
        name.extend_from_slice(ext.as_bytes());
        let rel = match parent {
            Some(p) => [&made[p].rel[..], b"/", &name[..]].concat(),
            None => name.clone(),
        };
        if !names.insert(rel.clone()) {
            continue; // that name is taken in that folder
        }
        let path = rel_path(root, &rel);
        let secs = node.mtime.0;
        let entry = match &node.kind {
            Kind::Dir => {
                std::fs::create_dir(&path).expect("mkdir");
                Entry::Dir {
                    mode: node.mode,
                    mtime: secs,
                }
            }
            Kind::File(data) => {
                std::fs::write(&path, data).expect("write");
                Entry::File {
                    data: data.clone(),
                    mode: node.mode,
                    mtime: secs,
                }
            }
            Kind::Link(t) => {
                let depth = parent.map_or(0, |p| made[p].depth + 1);
                let to_made = |i: usize| (!made.is_empty()).then(|| &made[i % made.len()]);
                let target: Vec<u8> = match t {
                    Target::Rel(i) => match to_made(*i) {
                        Some(m) => [b"../".repeat(depth), m.rel.clone()].concat(),
                        None => b"no/such/entry".to_vec(),
                    },
                    Target::Abs(i) => match to_made(*i) {
                        Some(m) => rel_path(root, &m.rel).into_os_string().into_vec(),
                        None => b"/no/such/entry".to_vec(),
                    },
                    Target::Dangling => b"no/such/entry".to_vec(),
                    Target::Outside => [b"../".repeat(depth + 2), b"outside".to_vec()].concat(),
                    Target::AbsOutside => b"/etc".to_vec(),
                    Target::Bytes => b"odd\xff/..\xfe/x".to_vec(),
                };
                let target = OsString::from_vec(target);
                std::os::unix::fs::symlink(&target, &path).expect("symlink");
                Entry::Link {
                    target,
                    mtime: secs,
                }
            }
        };
        made.push(Made {
            rel,
            name,
            ext,
            parent,
            depth: parent.map_or(0, |p| made[p].depth + 1),
            entry,
            node: node.clone(),
        });
    }
    // Modes and mtimes last, children first: creating an entry touches its folder.
    for m in made.iter().rev() {
        let path = rel_path(root, &m.rel);
        if !matches!(m.entry, Entry::Link { .. }) {
            std::fs::set_permissions(&path, PermissionsExt::from_mode(m.node.mode)).expect("chmod");
        }
        let t = filetime::FileTime::from_unix_time(m.node.mtime.0, m.node.mtime.1);
        filetime::set_symlink_file_times(&path, t, t).expect("mtime");
    }
    made
}

/// The generated `exclude` patterns (only from UTF-8 paths: TOML strings are UTF-8).
fn patterns(made: &[Made], excludes: &[(usize, Form)]) -> Vec<String> {
    let mut out = Vec::new();
    for &(i, form) in excludes {
        if made.is_empty() {
            break;
        }
        let m = &made[i % made.len()];
        let folder = match m.entry {
            Entry::Dir { .. } => Some(m),
            _ => m.parent.map(|p| &made[p]),
        };
        let pattern = match form {
            Form::Literal => Some(m.rel.clone()),
            Form::DirAll => folder.map(|f| [&f.rel[..], b"/**"].concat()),
            Form::Ext if !m.ext.is_empty() => Some(format!("*{}", m.ext).into_bytes()),
            Form::AnyExt if !m.ext.is_empty() => Some(format!("**/*{}", m.ext).into_bytes()),
            Form::Ext | Form::AnyExt => None,
            Form::AnyName => Some([&b"**/"[..], &m.name].concat()),
        };
        if let Some(p) = pattern.and_then(|p| String::from_utf8(p).ok()) {
            out.push(p);
        }
    }
    out
}

/// One path component against one pattern component: `*` is any run of bytes.
fn component_matches(pat: &[u8], name: &[u8]) -> bool {
    match pat.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|k| component_matches(rest, &name[k..])),
        Some((c, rest)) => name
            .split_first()
            .is_some_and(|(d, tail)| c == d && component_matches(rest, tail)),
    }
}

/// A path against a pattern, component by component: `**` is zero or more
/// components, so `dir/**` is `dir` itself too and `**/x` is a top-level `x` too.
fn path_matches(pat: &[&[u8]], path: &[&[u8]]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((p, rest)) if *p == b"**" => (0..=path.len()).any(|k| path_matches(rest, &path[k..])),
        Some((p, rest)) => path
            .split_first()
            .is_some_and(|(c, tail)| component_matches(p, c) && path_matches(rest, tail)),
    }
}

/// Left out: the path or one of its folders matches a pattern.
fn excluded(rel: &[u8], patterns: &[String]) -> bool {
    let parts: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
    patterns.iter().any(|p| {
        let pat: Vec<&[u8]> = p.as_bytes().split(|&b| b == b'/').collect();
        (1..=parts.len()).any(|n| path_matches(&pat, &parts[..n]))
    })
}

fn model(made: &[Made], patterns: &[String]) -> Tree {
    made.iter()
        .filter(|m| !excluded(&m.rel, patterns))
        .map(|m| (m.rel.clone(), m.entry.clone()))
        .collect()
}

/// What is below `root` now (links not followed).
fn read_tree(root: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, out: &mut Tree) {
        for e in std::fs::read_dir(dir).expect("read_dir") {
            let path = e.expect("entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("below")
                .as_os_str()
                .as_bytes();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            let (mode, mtime) = (meta.mode() & 0o7777, meta.mtime());
            let entry = if meta.is_dir() {
                walk(root, &path, out);
                Entry::Dir { mode, mtime }
            } else if meta.file_type().is_symlink() {
                Entry::Link {
                    target: std::fs::read_link(&path)
                        .expect("readlink")
                        .into_os_string(),
                    mtime,
                }
            } else {
                Entry::File {
                    data: std::fs::read(&path).expect("read"),
                    mode,
                    mtime,
                }
            };
            out.insert(rel.to_vec(), entry);
        }
    }
    let mut out = Tree::new();
    walk(root, root, &mut out);
    out
}

/// The differences, one line each (empty: equal).
fn diff(got: &Tree, want: &Tree) -> String {
    let show = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    let mut lines = Vec::new();
    for (p, w) in want {
        match got.get(p) {
            None => lines.push(format!("missing {:?}: {w:?}", show(p))),
            Some(g) if g != w => lines.push(format!("{:?}: got {g:?}, want {w:?}", show(p))),
            Some(_) => {}
        }
    }
    for (p, g) in got {
        if !want.contains_key(p) {
            lines.push(format!("extra {:?}: {g:?}", show(p)));
        }
    }
    lines.join("\n")
}

/// A non-empty directory to restore over: files, a folder, a link, a read-only
/// folder, old mtimes.
fn old_contents(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub/deep")).expect("mkdir");
    std::fs::write(dir.join("old.txt"), "old").expect("write");
    std::fs::write(dir.join("sub/deep/f"), [0u8, 1, 2]).expect("write");
    std::os::unix::fs::symlink("../old.txt", dir.join("sub/link")).expect("symlink");
    std::fs::set_permissions(dir.join("sub/deep"), PermissionsExt::from_mode(0o555))
        .expect("chmod");
    let t = filetime::FileTime::from_unix_time(1_234_567_890, 0);
    for p in ["old.txt", "sub/deep/f", "sub/deep", "sub"] {
        filetime::set_symlink_file_times(dir.join(p), t, t).expect("mtime");
    }
}

fn restore(w: &Workdir, to: &Path, force: bool) -> assert_cmd::assert::Assert {
    let mut args = vec!["restore", "tree", "--to", to.to_str().expect("utf-8")];
    if force {
        args.push("--force");
    }
    w.cmd(&args).assert()
}

fn toml_list(patterns: &[String]) -> String {
    let quoted: Vec<String> = patterns.iter().map(|p| format!("\"{p}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// A work directory with a copy of `key`; the tree goes in `tree`.
fn workdir(key: &Path) -> Workdir {
    let w = Workdir::new();
    std::fs::copy(key, w.path().join("k")).expect("key");
    w
}

/// The files set `tree` of `<dir>/tree`, backed up to `<dir>/backups`, leaving out
/// `patterns`.
fn configure(w: &Workdir, patterns: &[String]) {
    w.write_config(
        "",
        &format!(
            "[[files]]\nname = \"tree\"\npath = \"{}\"\nexclude = {}\n\n[files.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nencryption-key-file = \"{}\"\n",
            w.path().join("tree").display(),
            toml_list(patterns),
            w.path().join("backups").display(),
            w.path().join("k").display()
        ),
    );
}

fn check_case(key: &Path, case: &Case) -> Result<(), TestCaseError> {
    let w = workdir(key);
    let tree = w.path().join("tree");
    let made = build(&tree, &case.nodes);
    let patterns = patterns(&made, &case.excludes);
    let want = model(&made, &patterns);
    configure(&w, &patterns);
    let source_before = read_tree(&tree);
    if !source_before
        .values()
        .any(|e| matches!(e, Entry::File { .. }))
    {
        // A source without a single file (an unmounted file system?) is no backup:
        // the run fails and takes nothing (README, "Directory backups").
        w.cmd(&["run-job", "tree.backup"])
            .assert()
            .code(1)
            .stderr(predicates::str::contains("is empty"));
        prop_assert!(archives(&w.path().join("backups"), "tree").is_empty());
        return Ok(());
    }
    w.stdout(&["run-job", "tree.backup"]);
    // The backed-up directory is only ever read.
    prop_assert_eq!(&read_tree(&tree), &source_before, "the source changed");

    // Into a directory that is not there yet.
    let fresh = w.path().join("fresh");
    restore(&w, &fresh, false).success();
    let d = diff(&read_tree(&fresh), &want);
    prop_assert!(
        d.is_empty(),
        "restore --to a new directory, excludes {patterns:?}:\n{d}"
    );

    // A non-empty directory: untouched without --force, the model tree with it.
    let live = w.path().join("live");
    old_contents(&live);
    let before = read_tree(&live);
    let live_meta = std::fs::metadata(&live).expect("stat");
    restore(&w, &live, false).code(1);
    prop_assert_eq!(
        &read_tree(&live),
        &before,
        "refused restore changed the target"
    );
    let after_meta = std::fs::metadata(&live).expect("stat");
    prop_assert_eq!(
        (
            live_meta.ino(),
            live_meta.mode(),
            live_meta.mtime(),
            live_meta.mtime_nsec()
        ),
        (
            after_meta.ino(),
            after_meta.mode(),
            after_meta.mtime(),
            after_meta.mtime_nsec()
        ),
        "refused restore touched the target itself"
    );
    restore(&w, &live, true).success();
    let d = diff(&read_tree(&live), &want);
    prop_assert!(d.is_empty(), "restore --force, excludes {patterns:?}:\n{d}");

    // Nothing left beside the targets.
    let mut left: Vec<String> = std::fs::read_dir(w.path())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("dbkeeper-restore"))
        .collect();
    left.sort();
    prop_assert_eq!(left, Vec::<String>::new(), "restore left siblings behind");
    Ok(())
}

#[test]
fn restored_tree_is_the_model_of_the_generated_tree_minus_excludes() {
    let keys = Workdir::new();
    let key = keys.key("k");
    runner()
        .run(&case(), |case| check_case(&key, &case))
        .unwrap();
}

/// The oracle's own matcher against the README's examples, so a failure above is
/// not the model's.
#[test]
fn the_model_matcher_follows_the_readme_rules() {
    let pats = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // `*` stays in a folder.
    assert!(excluded(b"x.tmp", &pats(&["*.tmp"])));
    assert!(!excluded(b"a/x.tmp", &pats(&["*.tmp"])));
    assert!(excluded(b".tmp", &pats(&["*.tmp"])));
    // `**` crosses folders, zero or more.
    assert!(excluded(b"a/b/x.log", &pats(&["**/*.log"])));
    assert!(excluded(b"x.log", &pats(&["**/*.log"])));
    assert!(excluded(b"a/b/x", &pats(&["**/x"])));
    assert!(!excluded(b"a/xy", &pats(&["**/x"])));
    // `dir/**`: the folder itself and all below; a matching folder goes whole.
    assert!(excluded(b"cache", &pats(&["cache/**"])));
    assert!(excluded(b"cache/x/blob", &pats(&["cache/**"])));
    assert!(!excluded(b"cachex", &pats(&["cache/**"])));
    assert!(excluded(b"a/b/c", &pats(&["a/b"])));
    assert!(!excluded(b"a/bc", &pats(&["a/b"])));
    // Non-UTF-8 bytes are matched as bytes.
    assert!(excluded(b"bad\xff\xfe.tmp", &pats(&["*.tmp"])));
}

/// Found by the property above (minimal case: one folder with mtime -213930): an
/// mtime before 1970 came back as 1970-01-01, because `tar` stores it unsigned. A
/// folder, a file and a link, restored as they were, and GNU `tar` reads the same
/// dates from `decrypt`'s tar.
#[test]
fn mtimes_before_1970_come_back_and_gnu_tar_reads_them() {
    let keys = Workdir::new();
    let key = keys.key("k");
    let node = |stem, kind, secs| Node {
        parent: 0,
        stem,
        ext: 0,
        kind,
        mode: 0o644,
        mtime: (secs, 0),
    };
    let case = Case {
        nodes: vec![
            node(0, Kind::Dir, -213_930),
            node(1, Kind::File(b"x".to_vec()), -1),
            node(2, Kind::Link(Target::Dangling), -2_000_000_000),
        ],
        excludes: vec![],
    };
    check_case(&key, &case).unwrap();

    let w = workdir(&key);
    build(&w.path().join("tree"), &case.nodes);
    configure(&w, &[]);
    w.stdout(&["run-job", "tree.backup"]);
    let archive = common::archives(&w.path().join("backups"), "tree")
        .pop()
        .expect("an archive");
    let tar = w.path().join("tree.tar");
    let (archive, tar) = (
        archive.to_str().expect("utf-8"),
        tar.to_str().expect("utf-8"),
    );
    w.stdout(&["decrypt", archive, "-o", tar]);
    let listed = std::process::Command::new("tar")
        .args(["--full-time", "-tvf"])
        .arg(tar)
        .env("TZ", "UTC")
        .output()
        .expect("tar");
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{text}");
    for (name, when) in [
        ("a", "1969-12-29 12:34:30"),
        ("data", "1969-12-31 23:59:59"),
        ("with space", "1906-08-16 20:26:40"),
    ] {
        assert!(
            text.lines().any(|l| l.contains(when) && l.contains(name)),
            "{name} at {when}:\n{text}"
        );
    }
}

/// Found by the property above (minimal case: a folder `\x80latin` holding one
/// named `L` × 251): a path of 100 bytes or more whose first byte is not UTF-8
/// fails the whole backup ("paths in archives must have at least one component").
/// `tar` 0.4.46 writes such a name as a GNU long name but also puts its UTF-8
/// prefix, here empty, in the header, and refuses that (`prepare_header_path`).
/// The name is valid on Linux, so the tree must back up and come back as it is.
#[test]
fn a_long_path_starting_with_a_non_utf8_byte_is_backed_up() {
    let keys = Workdir::new();
    let key = keys.key("k");
    let dir = |parent, stem| Node {
        parent,
        stem,
        ext: 0,
        kind: Kind::Dir,
        mode: 0o755,
        mtime: (1_600_000_000, 0),
    };
    let stems = stems();
    let (odd, long) = (
        stems.iter().position(|s| s[0] == 0x80).expect("stem"),
        stems.iter().position(|s| s.len() == 251).expect("stem"),
    );
    let case = Case {
        nodes: vec![dir(0, odd), dir(1, long)],
        excludes: vec![],
    };
    check_case(&key, &case).unwrap();
}

//! Interop with the reference `age` tool (issue 16): `age-keygen` makes the identity
//! dbkeeper's backups are made for, dbkeeper restores with it, and the data key
//! extracted from an archive exactly as `docs/FORMAT.md` says decrypts with
//! `age -d -i`, after which `docs/recover_v3.py` reads the backup without dbkeeper.
//! Needs `age`, `jq`, `zstd`, `xxd` and Python's `cryptography` (`.ci/run` installs
//! them).

mod common;

use std::path::Path;
use std::process::Command;

use common::{archives, sqlite, Workdir};

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("{cmd:?} cannot start ({e}); install age, jq, zstd, xxd (see .ci/run)")
    });
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

#[test]
fn age_keygen_identity_and_the_documented_recovery_recipe() {
    let w = Workdir::new();
    let key = w.path().join("key.txt");
    run(Command::new("age-keygen").arg("-o").arg(&key));
    let recipient = String::from_utf8(run(Command::new("age-keygen").arg("-y").arg(&key)))
        .expect("utf-8")
        .trim()
        .to_owned();
    let db = w.path().join("app.db");
    sqlite(
        &db,
        "CREATE TABLE t (x TEXT); INSERT INTO t VALUES ('made for age');",
    );
    w.write_config(
        "",
        &format!(
            "[[database]]\nname = \"app\"\nurl = \"sqlite://{}\"\n[database.backup]\nschedule = \"manual\"\ndestination = \"{}\"\nrecipients = [\"{recipient}\"]\ncompression = \"zstd\"\n",
            db.display(),
            w.path().join("backups").display()
        ),
    );
    w.cmd(&["run-job", "app.backup"]).assert().success();
    // dbkeeper reads it with the identity age-keygen made.
    let out = w.path().join("out.db");
    w.cmd(&["restore", "app", "--to", s(&out), "--identity", s(&key)])
        .assert()
        .success();
    assert_eq!(sqlite(&out, "SELECT x FROM t;").trim(), "made for age");

    // The recipe of docs/FORMAT.md, "Recovery without dbkeeper", step by step.
    let archive = archives(&w.path().join("backups"), "app").remove(0);
    let recipe = format!(
        r#"set -euo pipefail
cd {dir}
E=$(python3 -c "import struct,sys; d=open(sys.argv[1],'rb').read(13); print(struct.unpack('>I', d[9:13])[0])" {a})
tail -c +14 {a} | head -c "$E" > envelope.json
jq -r '.recipients[0].age' envelope.json > dk.age
age -d -i {key} dk.age | xxd -p -c 64 > dk.hex
python3 {recover} {a} "$(cat dk.hex)" > plain.zst
zstd -q -d plain.zst -o recovered.db
"#,
        dir = w.path().display(),
        a = archive.display(),
        key = key.display(),
        recover = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs/recover_v3.py")
            .display(),
    );
    run(Command::new("bash").arg("-c").arg(&recipe));
    let dk_hex = std::fs::read_to_string(w.path().join("dk.hex")).expect("dk.hex");
    assert_eq!(dk_hex.trim().len(), 64, "a 32-byte data key: {dk_hex}");
    assert_eq!(
        sqlite(&w.path().join("recovered.db"), "SELECT x FROM t;").trim(),
        "made for age"
    );
}

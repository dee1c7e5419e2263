//! A PostgreSQL backup into a database with `pg_restore`, decoding and loading at once.
//!
//! An encrypted archive is piped into `pg_restore --section=pre-data --section=data`
//! while it is being decrypted: every byte pg_restore gets belongs to a segment that
//! has authenticated, under a header that passed the provenance check before the
//! first byte left (see [`archive::read_archive_gated`]), so decoding overlaps with
//! `COPY` instead of preceding it. The indexes, constraints and grants
//! (`--section=post-data`) then get `pg_restore -j <cores>`, which needs a seekable
//! file but reads nothing of it beyond the table of contents: the stream's start, up
//! to where the table of contents ends (found by a [`DumpCheck`] as it passes), is
//! kept in a private file for it. A table of contents longer than [`TOC_COPY_MAX`]
//! (more than a few hundred thousand objects) is read by a second streamed pass
//! instead.
//!
//! An unencrypted archive proves nothing until its SHA-256 is compared with the
//! manifest at the end, so it is decoded to a private file and checked first, and only
//! then handed to pg_restore (`--allow-unencrypted` restores only).
//!
//! Once pg_restore has exited 0 for every section, the database is checked against
//! what the dump's table of contents lists ([`super::pg_check`]): a wrapper that
//! hides pg_restore's failure, or skips its work, fails the restore there.
//!
//! Whatever fails, the caller drops the database it restored into: a failure part-way
//! (a truncated or altered archive found at the end, pg_restore's own errors) leaves
//! a partial scratch database, never a partial target.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use tokio_util::sync::CancellationToken;

use super::verify::{self, Durability, Expect, ReadReport, TrustGate};
use super::{blocking, tail, BackupError};
use crate::db::{Created, Globals, Postgres};
use crate::repo::archive::pgdump::DumpCheck;
use crate::repo::archive::{self, GlobalsBytes, KeyRing};
use crate::repo::storage::{Object, Reader};

/// How much of the decoded stream is kept for the post-data pass. A table of contents
/// takes a few hundred bytes per object, so 64 MiB holds that of any ordinary schema.
const TOC_COPY_MAX: u64 = 64 << 20;

/// What the decoding thread gathers before each write to pg_restore's stdin.
const PIPE_CHUNK: usize = 1 << 20;

/// What to restore with, besides the archive.
pub struct Target<'a> {
    pub pg: &'a Postgres,
    pub program: &'a Path,
    /// The database to restore into (on `pg`'s server).
    pub database: &'a str,
    /// Extra pg_restore arguments (e.g. `--no-owner`).
    pub args: &'a [&'a str],
    /// A private (0700) folder for the table-of-contents copy and libpq files.
    pub private_dir: &'a Path,
    /// `restore --with-roles`: create the archive's missing roles and memberships on
    /// the server before pg_restore starts (see [`create_roles`]).
    pub with_roles: bool,
}

/// What a restore did besides the database.
#[derive(Debug)]
pub struct Restored {
    pub report: ReadReport,
    /// With `with_roles`: the roles and memberships created, and the owner of the
    /// database that was backed up.
    pub roles: Option<(Created, Option<String>)>,
}

/// Restores the archive open as `archive` into `target.database`, checking it against
/// `expect` (SHA-256, size and, before the first byte is restored, provenance).
pub async fn restore_archive(
    target: &Target<'_>,
    archive: &dyn Object,
    keys: &KeyRing,
    expect: Option<Expect<'_>>,
    cancel: &CancellationToken,
) -> Result<Restored, BackupError> {
    restore_archive_with(target, archive, keys, expect, TOC_COPY_MAX, cancel).await
}

fn no_globals() -> BackupError {
    BackupError::Refused(
        "--with-roles: this backup carries no roles (it was made before dbkeeper stored them, \
         or with globals = false); restore without --with-roles after creating the roles by hand"
            .to_owned(),
    )
}

/// Creates the missing roles and memberships of an archive's globals section (`None`:
/// the archive has none, which `--with-roles` refuses). The section is parsed only
/// here, after it authenticated (or, unencrypted, after the whole archive matched its
/// manifest).
async fn create_roles(
    target: &Target<'_>,
    globals: Option<&GlobalsBytes>,
) -> Result<(Created, Option<String>), BackupError> {
    let Some(bytes) = globals else {
        return Err(BackupError::Refused(
            "--with-roles: this backup carries no roles (it was made before dbkeeper stored them,              or with globals = false); restore without --with-roles after creating the roles by hand"
                .to_owned(),
        ));
    };
    let globals: Globals = serde_json::from_slice(bytes).map_err(|e| {
        BackupError::Internal(format!("cannot read the archive's globals section: {e}"))
    })?;
    let created = target.pg.create_missing_globals(&globals).await?;
    if !created.roles.is_empty() || !created.memberships.is_empty() {
        tracing::info!(
            roles = %created.roles.join(", "),
            memberships = %created.memberships.join(", "),
            "created missing roles and memberships"
        );
    }
    Ok((created, globals.database_owner))
}

async fn restore_archive_with(
    target: &Target<'_>,
    archive: &dyn Object,
    keys: &KeyRing,
    expect: Option<Expect<'_>>,
    toc_copy_max: u64,
    cancel: &CancellationToken,
) -> Result<Restored, BackupError> {
    // Every read goes through the one open handle, so nothing can be swapped in
    // between the check and the use.
    let header = archive::format::read_header(&mut verify::read_all(archive)?)
        .map_err(BackupError::from_archive)?;
    if target.with_roles && header.0.globals.is_none() {
        return Err(no_globals());
    }
    let file = verify::read_all(archive)?;
    if header.0.encryption.is_none() {
        let image = target.private_dir.join("image.dump");
        let report = verify::decode_handle_to_file(
            file,
            keys,
            expect,
            &image,
            Durability::Transient,
            cancel,
        )
        .await?;
        // The whole archive matched its manifest: only now are its roles used.
        let roles = match target.with_roles {
            true => Some(create_roles(target, report.globals.as_deref()).await?),
            false => None,
        };
        pg_restore_file(target, &image, &[], cancel).await?;
        check(target, &report, cancel).await?;
        return Ok(Restored { report, roles });
    }
    // The roles must exist before pg_restore reads the first object: their section
    // is read first (every segment of it authenticated, the header through the same
    // gate as the stream's), and the stream's copy must be the same bytes.
    let mut roles = None;
    let mut first_globals = None;
    if target.with_roles {
        let gate = TrustGate::of(expect.as_ref());
        let keys_for = keys.clone();
        let input = verify::read_all(archive)?;
        let (_, globals) = blocking(cancel, move |_| {
            let mut refused = None;
            let read = archive::read_globals(input, &keys_for, |h| match gate.check(h) {
                Err(e) => {
                    refused = Some(e);
                    Err(archive::ArchiveError::Cancelled)
                }
                Ok(()) => Ok(()),
            });
            match refused {
                Some(e) => Err(e),
                None => read.map_err(BackupError::from_archive),
            }
        })
        .await?;
        roles = Some(create_roles(target, globals.as_ref()).await?);
        first_globals = globals;
    }
    let toc = target.private_dir.join("toc.dump");
    let copy = TocCopy::create(&toc, toc_copy_max)?;
    let sections = ["--section=pre-data", "--section=data"];
    let (report, copy) = stream(target, file, keys, &expect, &sections, copy, cancel).await?;
    verify::check_expected(&report, expect)?;
    if target.with_roles && report.globals.as_deref() != first_globals.as_ref() {
        return Err(BackupError::Verification(
            "the archive's globals changed between two reads of it".to_owned(),
        ));
    }
    let whole_toc = copy.is_some_and(|c| c.whole_toc());
    if whole_toc {
        pg_restore_file(target, &toc, &["--section=post-data"], cancel).await?;
    } else {
        tracing::info!("the table of contents is larger than its copy; reading the archive again for indexes and constraints");
        let file = verify::read_all(archive)?;
        let post = ["--section=post-data"];
        let (second, _) = stream(target, file, keys, &None, &post, None, cancel).await?;
        if second.sha256 != report.sha256 {
            return Err(BackupError::Verification(
                "the archive changed between two reads of it".to_owned(),
            ));
        }
    }
    check(target, &report, cancel).await?;
    Ok(Restored { report, roles })
}

/// Holds the restored database against what the dump lists: pg_restore's exit
/// status alone is no proof (see [`super::pg_check`]).
async fn check(
    target: &Target<'_>,
    report: &ReadReport,
    cancel: &CancellationToken,
) -> Result<(), BackupError> {
    let Some(contents) = &report.contents else {
        // Only an image the header does not call a custom-format dump has none; its
        // header authenticated, and pg_restore just read it, so there is no list.
        tracing::warn!(
            image = %report.header.image,
            "not a pg_dump-custom image: the restored database is not checked against it"
        );
        return Ok(());
    };
    tokio::select! {
        checked = super::pg_check::check_restored(target.pg, target.database, contents) => checked,
        _ = cancel.cancelled() => Err(BackupError::Cancelled),
    }
}

/// Pipes the decoded archive into one `pg_restore` with `sections`, keeping the first
/// bytes in `copy`. The whole archive is always read (and hashed), even when
/// pg_restore stops reading early, so the report is complete.
async fn stream(
    target: &Target<'_>,
    file: Reader,
    keys: &KeyRing,
    expect: &Option<Expect<'_>>,
    sections: &[&str],
    copy: Option<TocCopy>,
    cancel: &CancellationToken,
) -> Result<(ReadReport, Option<TocCopy>), BackupError> {
    // A pipe of our own, written with blocking writes straight from the decoding
    // thread: no hop through the runtime, no copy of each chunk.
    let (reader, writer) = std::io::pipe().map_err(|source| BackupError::Spawn {
        program: target.program.display().to_string(),
        source,
    })?;
    let (tool, run) = spawn(target, sections, Stdio::from(reader))?;
    let gate = TrustGate::of(expect.as_ref());
    let keys = keys.clone();
    let decode = blocking(cancel, move |stop| {
        let sink = Tee {
            pipe: Some(std::io::BufWriter::with_capacity(PIPE_CHUNK, writer)),
            broken: None,
            copy,
        };
        let (sink, report) = verify::read_hashed_gated(file, &keys, sink, stop, Some(&gate))?;
        let Tee {
            pipe,
            mut broken,
            mut copy,
        } = sink;
        if let Some(c) = &mut copy {
            c.file.flush().map_err(|source| BackupError::Io {
                what: "cannot write",
                path: "the table-of-contents copy".into(),
                source,
            })?;
        }
        // Closing our end is pg_restore's end of input.
        if let Some(Err(e)) = pipe.map(|p| p.into_inner().map_err(|e| e.into_error())) {
            broken = Some(e);
        }
        Ok((report, copy, broken))
    });
    let (decoded, exited) = tokio::join!(decode, wait(run, cancel));
    drop(tool);
    // The archive's own verdict first: pg_restore fails too when its input is cut off.
    let (report, copy, broken) = decoded?;
    exited?;
    if let Some(e) = broken {
        // pg_restore succeeded without reading to the end: only trailing bytes it had
        // no use for were left, which pg_restore itself judged.
        tracing::debug!("pg_restore closed its input before the end: {e}");
    }
    Ok((report, copy))
}

/// Runs `pg_restore -j <cores>` of a seekable file (which parallel restore needs)
/// into the target.
async fn pg_restore_file(
    target: &Target<'_>,
    image: &Path,
    sections: &[&str],
    cancel: &CancellationToken,
) -> Result<(), BackupError> {
    let jobs = format!("--jobs={}", verify::restore_jobs());
    let image = image.to_string_lossy();
    let mut args = sections.to_vec();
    args.extend([jobs.as_str(), image.as_ref()]);
    let (tool, child) = spawn(target, &args, Stdio::null())?;
    let exited = wait(child, cancel).await;
    drop(tool);
    exited
}

/// Starts `pg_restore <target.args> <args> --exit-on-error` aimed at the target
/// database, its stderr captured. The returned command holds the private libpq
/// files the child reads: keep it until the child has exited.
fn spawn(
    target: &Target<'_>,
    args: &[&str],
    stdin: Stdio,
) -> Result<(crate::db::ToolFiles, Running), BackupError> {
    let (mut cmd, files) = target
        .pg
        .tool_command(target.program, Some(target.database), target.private_dir)?
        .into_tokio();
    // Every object pg_restore creates is committed on its own; none of those commits
    // needs to wait for the disk, because the database is a scratch one until the
    // swap, whose own (synchronous) commit flushes the WAL up to it, this included.
    // Thousands of tables mean thousands of fsyncs saved. A URL's own `options=`
    // takes precedence over PGOPTIONS in libpq: then the commits simply wait.
    let mut options = std::env::var("PGOPTIONS").unwrap_or_default();
    options.push_str(" -c synchronous_commit=off");
    cmd.env("PGOPTIONS", options.trim_start())
        .args(target.args)
        .args(args)
        .arg("--exit-on-error")
        .stdin(stdin)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| BackupError::Spawn {
        program: target.program.display().to_string(),
        source,
    })?;
    let Some(stderr) = child.stderr.take() else {
        return Err(BackupError::Internal("pg_restore pipes missing".into()));
    };
    Ok((
        files,
        Running {
            program: target.program.display().to_string(),
            stderr: tokio::spawn(tail(stderr)),
            child,
        },
    ))
}

/// A pg_restore started by [`spawn`].
struct Running {
    program: String,
    child: tokio::process::Child,
    stderr: tokio::task::JoinHandle<String>,
}

/// Waits for pg_restore to exit (killing it on cancel); a failure carries the end of
/// its stderr.
async fn wait(mut run: Running, cancel: &CancellationToken) -> Result<(), BackupError> {
    let status = tokio::select! {
        status = run.child.wait() => status,
        _ = cancel.cancelled() => {
            let _ = run.child.start_kill();
            let _ = run.child.wait().await;
            return Err(BackupError::Cancelled);
        }
    };
    let status = status.map_err(|source| BackupError::Spawn {
        program: run.program,
        source,
    })?;
    if !status.success() {
        return Err(BackupError::Tool {
            program: "pg_restore",
            status: status.to_string(),
            stderr: run.stderr.await.unwrap_or_default(),
        });
    }
    Ok(())
}

/// The start of the stream, in a private file, up to the end of the table of
/// contents (found by a [`DumpCheck`] of its own) or `max` bytes, whichever is first.
struct TocCopy {
    file: std::io::BufWriter<File>,
    left: u64,
    copied: u64,
    check: DumpCheck,
    state: CopyState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyState {
    Copying,
    /// The whole table of contents is in the copy.
    Whole,
    /// `max` bytes were not enough (or the start did not parse: the decoding pass
    /// reports why); the post-data pass reads the archive again.
    Cut,
}

impl TocCopy {
    fn create(path: &Path, max: u64) -> Result<Option<Self>, BackupError> {
        let file = verify::create_private(path).map_err(|source| BackupError::Io {
            what: "cannot create",
            path: path.to_owned(),
            source,
        })?;
        Ok(Some(TocCopy {
            file: std::io::BufWriter::with_capacity(1 << 20, file),
            left: max,
            copied: 0,
            check: DumpCheck::new(),
            state: CopyState::Copying,
        }))
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if self.state != CopyState::Copying {
            return Ok(());
        }
        let mut take = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let before = self.copied;
        self.state = if self.check.feed(&buf[..take]).is_err() {
            CopyState::Cut
        } else if let Some(end) = self.check.toc_end() {
            // Not a byte of table data beyond it.
            take = usize::try_from(end - before).unwrap_or(take).min(take);
            CopyState::Whole
        } else if take < buf.len() {
            CopyState::Cut
        } else {
            CopyState::Copying
        };
        self.file.write_all(&buf[..take])?;
        self.left -= take as u64;
        self.copied += take as u64;
        Ok(())
    }

    fn whole_toc(&self) -> bool {
        self.state == CopyState::Whole
    }
}

/// pg_restore's pipe, plus the table-of-contents copy.
struct Tee {
    /// Gone once pg_restore has stopped reading (done, or failed): the rest is
    /// decoded unread, because the archive still has to authenticate and hash whole.
    pipe: Option<std::io::BufWriter<std::io::PipeWriter>>,
    broken: Option<std::io::Error>,
    copy: Option<TocCopy>,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(copy) = &mut self.copy {
            copy.write(buf)?;
        }
        if let Some(pipe) = &mut self.pipe {
            if let Err(e) = pipe.write_all(buf) {
                self.broken = Some(e);
                self.pipe = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(copy) = &mut self.copy {
            copy.file.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Against the real server on 127.0.0.1: the streamed restore gives the database
    //! that `pg_restore` of the same dump gives, through either post-data path, and a
    //! damaged archive is reported as damaged.

    use std::process::Command;
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::db::Database;
    use crate::repo::archive::{write_archive, Compression, Header, Key, Settings};
    use crate::repo::storage::LocalObject;

    use crate::testing::{psql, SERVER};

    fn schema(db: &str) -> String {
        let out = Command::new("pg_dump")
            .args(["--schema-only", "--no-owner", &format!("{SERVER}/{db}")])
            .output()
            .expect("pg_dump runs");
        assert!(out.status.success());
        // Drop the lines that name the database or vary per run.
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| {
                !l.starts_with("--")
                    && !l.starts_with("\\restrict")
                    && !l.starts_with("\\unrestrict")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A database with a bit of everything that lives in each section.
    fn source(name: &str) {
        psql("postgres", &format!("DROP DATABASE IF EXISTS {name}"));
        psql("postgres", &format!("CREATE DATABASE {name}"));
        psql(
            name,
            "CREATE TABLE a (id serial PRIMARY KEY, v text NOT NULL, at timestamptz DEFAULT now());
             CREATE TABLE b (id int REFERENCES a ON DELETE CASCADE, w text, UNIQUE (w));
             CREATE INDEX b_id ON b (id) WHERE id > 10;
             INSERT INTO a (v) SELECT md5(i::text) FROM generate_series(1, 20000) i;
             INSERT INTO b SELECT i, 'w' || i FROM generate_series(1, 20000) i;
             CREATE VIEW va AS SELECT id, v FROM a WHERE id < 100;
             CREATE MATERIALIZED VIEW mb AS SELECT id % 7 AS k, count(*) FROM b GROUP BY 1;
             CREATE UNIQUE INDEX mb_k ON mb (k);
             CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.at := now(); RETURN NEW; END $$;
             CREATE TRIGGER a_touch BEFORE UPDATE ON a FOR EACH ROW EXECUTE FUNCTION touch();
             COMMENT ON TABLE a IS 'the a table';
             SELECT setval('a_id_seq', 50000);",
        );
    }

    fn archive_of(db: &str, path: &Path, key: &Key) {
        let dump = Command::new("pg_dump")
            .args(["--format=custom", "--compress=0", &format!("{SERVER}/{db}")])
            .output()
            .expect("pg_dump runs");
        assert!(dump.status.success());
        let settings = Settings {
            header: Header {
                database: "pg".into(),
                backend: "postgres".into(),
                image: "pg_dump-custom".into(),
                created: chrono::Utc::now(),
                compression: Compression::Zstd,
                segment_size: 64 * 1024,
                encryption: None,
                globals: None,
                sealed: None,
            },
            key: Some(key),
            compression: Compression::Zstd,
            level: 3,
            threads: 1,
            check_with: None,
            globals: None,
        };
        let file = File::create(path).unwrap();
        write_archive(&dump.stdout[..], file, settings, &AtomicBool::new(false)).unwrap();
    }

    fn server() -> Postgres {
        let cfg = super::super::restore::target_config(&format!("{SERVER}/postgres"));
        match Database::open(&cfg).unwrap() {
            Database::Postgres(pg) => pg,
            Database::Sqlite(_) => unreachable!(),
        }
    }

    async fn restore_into(
        db: &str,
        archive_path: &Path,
        key: &Key,
        toc_max: u64,
    ) -> Result<ReadReport, BackupError> {
        psql("postgres", &format!("DROP DATABASE IF EXISTS {db}"));
        psql("postgres", &format!("CREATE DATABASE {db}"));
        let dir = tempfile::tempdir().unwrap();
        let pg = server();
        let target = Target {
            pg: &pg,
            program: Path::new("pg_restore"),
            database: db,
            args: &["--no-owner"],
            private_dir: dir.path(),
            with_roles: false,
        };
        let keys = KeyRing::new(vec![key.clone()]);
        let file = crate::repo::storage::open_regular(archive_path).unwrap();
        let archive = LocalObject::from_file(file, archive_path.to_owned()).unwrap();
        restore_archive_with(
            &target,
            &archive,
            &keys,
            None,
            toc_max,
            &CancellationToken::new(),
        )
        .await
        .map(|r| r.report)
    }

    #[tokio::test]
    async fn streamed_restore_equals_the_source_through_either_post_data_path() {
        let tag = std::process::id();
        let (src, dst) = (
            format!("dbk_stream_src_{tag}"),
            format!("dbk_stream_dst_{tag}"),
        );
        source(&src);
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.dbk");
        let key = Key::random().unwrap();
        archive_of(&src, &archive, &key);
        let want = schema(&src);
        let rows = "SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM b), (SELECT sum(count) FROM mb), \
                    (SELECT last_value FROM a_id_seq), (SELECT obj_description('a'::regclass))";
        // 64 bytes cannot hold the table of contents: the second-pass path.
        for toc_max in [TOC_COPY_MAX, 64] {
            let report = restore_into(&dst, &archive, &key, toc_max).await.unwrap();
            assert!(report.raw_bytes > 64);
            assert_eq!(schema(&dst), want, "toc copy of {toc_max} bytes");
            assert_eq!(psql(&dst, rows), psql(&src, rows));
        }
        for db in [&src, &dst] {
            psql("postgres", &format!("DROP DATABASE {db}"));
        }
    }

    #[tokio::test]
    async fn a_damaged_archive_is_reported_as_damaged_not_as_a_pg_restore_failure() {
        let tag = std::process::id();
        let (src, dst) = (
            format!("dbk_stream_bad_{tag}"),
            format!("dbk_stream_badd_{tag}"),
        );
        source(&src);
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.dbk");
        let key = Key::random().unwrap();
        archive_of(&src, &archive, &key);
        let mut bytes = std::fs::read(&archive).unwrap();
        let len = bytes.len();
        // A flipped byte in the middle, and the last segment cut off.
        let mut flipped = bytes.clone();
        flipped[len / 2] ^= 1;
        std::fs::write(&archive, &flipped).unwrap();
        let e = restore_into(&dst, &archive, &key, TOC_COPY_MAX)
            .await
            .unwrap_err();
        assert!(e.is_verification(), "{e}");
        bytes.truncate(len - 100);
        std::fs::write(&archive, &bytes).unwrap();
        let e = restore_into(&dst, &archive, &key, TOC_COPY_MAX)
            .await
            .unwrap_err();
        assert!(e.is_verification(), "{e}");
        for db in [&src, &dst] {
            psql("postgres", &format!("DROP DATABASE {db}"));
        }
    }
}

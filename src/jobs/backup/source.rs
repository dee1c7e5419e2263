//! Where the database image comes from, streamed into an archive (a files set's
//! tar comes from `files`).
//!
//! SQLite: `VACUUM INTO` a scratch file in the state directory (never the
//! destination), then stream it. PostgreSQL: `pg_dump --format=custom --compress=0`
//! streamed from its stdout, so no plaintext dump ever touches a disk; its stderr is
//! kept for the error message, and anything but exit status 0 fails the backup. Its
//! output must also be a complete custom-format dump, checked as it streams past
//! (`repo::archive::pgdump`): a dump cut short fails the backup even after exit 0.

//!
//! This is the backup *job's* input, so it stays with the job in `jobs/backup/`:
//! it talks to the live database (`VACUUM INTO`, `pg_dump`), which the repository
//! (`crate::repo`) never does for a backup; the repository only receives the stream.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::AtomicBool;

use tokio_util::io::SyncIoBridge;
use tokio_util::sync::CancellationToken;

use super::{BackupJob, Subject};
use crate::db::{Database, Postgres, Sqlite};
use crate::repo::archive::pgdump::{DumpCheck, DumpError};
use crate::repo::archive::{self, compress, GlobalsBytes, Header, Settings, WriteStats};
use crate::repo::files::FilesReport;
use crate::repo::storage::{FanOut, Scratch};
use crate::repo::{blocking, tail, BackupError, NotAnImage};

/// The uploads the archive is written into, one per destination.
type TempFile = FanOut;

/// Dumps `db` and writes the archive (`globals` first, if any) into `tmp`; with `check`, every written byte is
/// also decrypted and decompressed on another thread (see `WriteStats::checked`).
pub async fn dump(
    job: &BackupJob,
    subject: Subject<'_>,
    header: Header,
    globals: Option<GlobalsBytes>,
    tmp: TempFile,
    check: bool,
    cancel: &CancellationToken,
) -> Result<(TempFile, WriteStats, Option<FilesReport>), BackupError> {
    let cfg = &job.cfg;
    let key = job.key.clone();
    let recipients = job.recipients.clone();
    let check_with = check.then(|| job.keys.clone());
    let scratch_dir = &job.scratch_dir;
    let compression = cfg.compression;
    let level = cfg.level();
    let encode = move |source: Source, out: TempFile, flag: &AtomicBool| {
        let settings = Settings {
            header,
            key: key.as_ref(),
            compression,
            level,
            threads: compress::threads(),
            check_with,
            globals,
        };
        archive::write_archive_for(source, out, settings, &recipients, flag)
    };
    let encode: Box<Encode> = Box::new(encode);
    let mut report = None;
    let dumped = match subject {
        Subject::Database(Database::Sqlite(lite)) => {
            dump_sqlite(lite, tmp, scratch_dir, cancel, encode).await
        }
        Subject::Database(Database::Postgres(pg)) => {
            dump_postgres(pg, &cfg.pg_dump, tmp, scratch_dir, cancel, encode).await
        }
        Subject::Files(spec) => {
            let stream = spec.stream()?;
            let slot = stream.report();
            let written = run_encoder(encode, Box::new(stream), tmp, cancel).await;
            report = slot.lock().ok().and_then(|mut r| r.take());
            written
        }
    };
    let (tmp, stats) = dumped.map_err(|e| match e {
        BackupError::Archive(archive::ArchiveError::Io(io)) if is_not_an_image(&io) => {
            match io.into_inner().map(|inner| inner.downcast::<NotAnImage>()) {
                Some(Ok(not)) => BackupError::NotAnImage(*not),
                _ => BackupError::Internal("lost the reason an image was refused".into()),
            }
        }
        BackupError::Archive(archive::ArchiveError::Io(io)) if dump_error(&io).is_some() => {
            match io.into_inner().map(|inner| inner.downcast::<DumpError>()) {
                Some(Ok(bad)) => BackupError::IncompleteDump(*bad),
                _ => BackupError::Internal("lost the reason a dump was refused".into()),
            }
        }
        other => other,
    })?;
    Ok((tmp, stats, report))
}

type Source = Box<dyn std::io::Read + Send>;
type Encode = dyn FnOnce(Source, TempFile, &AtomicBool) -> Result<(TempFile, WriteStats), archive::ArchiveError>
    + Send;

/// Runs the blocking encoder; cancelling sets its stop flag and waits for it to return.
async fn run_encoder(
    encode: Box<Encode>,
    source: Source,
    tmp: TempFile,
    cancel: &CancellationToken,
) -> Result<(TempFile, WriteStats), BackupError> {
    blocking(cancel, move |stop| {
        encode(source, tmp, stop).map_err(BackupError::from_archive)
    })
    .await
}

async fn dump_sqlite(
    lite: &Sqlite,
    tmp: TempFile,
    scratch_dir: &Path,
    cancel: &CancellationToken,
    encode: Box<Encode>,
) -> Result<(TempFile, WriteStats), BackupError> {
    // Created empty and private (VACUUM INTO accepts an empty file): the copy is
    // plaintext.
    let image = Scratch(
        crate::repo::storage::scratch_file(
            scratch_dir,
            &format!("backup-{}", lite.name),
            ".sqlite",
        )
        .map_err(|source| BackupError::Io {
            what: "cannot create a scratch file in",
            path: scratch_dir.to_owned(),
            source,
        })?,
    );
    tokio::select! {
        r = lite.vacuum_into(&image.0) => r?,
        _ = cancel.cancelled() => return Err(BackupError::Cancelled),
    }
    let file = std::fs::File::open(&image.0).map_err(|source| BackupError::Io {
        what: "cannot read the SQLite copy",
        path: image.0.clone(),
        source,
    })?;
    let source = Magic::new(file, SQLITE_MAGIC, "the SQLite copy", "a SQLite database");
    run_encoder(encode, Box::new(source), tmp, cancel).await
}

/// How long a pg_dump whose output is not a dump may take to exit by itself.
const NOT_A_DUMP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

async fn dump_postgres(
    pg: &Postgres,
    pg_dump: &Path,
    tmp: TempFile,
    scratch_dir: &Path,
    cancel: &CancellationToken,
    encode: Box<Encode>,
) -> Result<(TempFile, WriteStats), BackupError> {
    let (mut cmd, _files) = pg.tool_command(pg_dump, None, scratch_dir)?.into_tokio();
    cmd.args(["--format=custom", "--compress=0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| BackupError::Spawn {
        program: pg_dump.display().to_string(),
        source,
    })?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(BackupError::Internal("pg_dump pipes missing".into()));
    };
    let stderr_task = tokio::spawn(tail(stderr));
    let source = Box::new(Complete::new(Magic::new(
        SyncIoBridge::new(stdout),
        PG_DUMP_MAGIC,
        "pg_dump's output",
        "a custom-format dump",
    )));
    // On cancel, stop pg_dump too: the encoder thread may be blocked reading its pipe.
    let encoding = run_encoder(encode, source, tmp, cancel);
    tokio::pin!(encoding);
    let written = tokio::select! {
        written = &mut encoding => written,
        _ = cancel.cancelled() => {
            let _ = child.start_kill();
            encoding.await
        }
    };
    let mut stopped_by_us = false;
    match &written {
        // Its output is not a dump: a pg_dump that failed exits on its own at once,
        // and then its status and message say why; one still writing (a wrapper
        // printing something else) is stopped after a grace period. Killing it at
        // once would report our signal instead of its own failure.
        Err(e) if not_an_image(e) || incomplete_dump(e).is_some() => {
            if tokio::time::timeout(NOT_A_DUMP_GRACE, child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                stopped_by_us = true;
            }
        }
        // Writing failed (disk full, cancelled): pg_dump must not linger.
        Err(_) => {
            let _ = child.start_kill();
        }
        Ok(_) => {}
    }
    let status = child.wait().await;
    let stderr = stderr_task.await.unwrap_or_default();
    let failed = matches!(&status, Ok(s) if !s.success());
    let cut_short =
        matches!(&written, Err(e) if incomplete_dump(e).is_some_and(DumpError::is_truncated));
    if failed && !stopped_by_us && (cut_short || matches!(&written, Err(e) if not_an_image(e))) {
        // pg_dump failed before writing anything, or stopped part-way (its output
        // ends early): its own message says why.
        if let Ok(status) = status {
            return Err(BackupError::Tool {
                program: "pg_dump",
                status: status.to_string(),
                stderr,
            });
        }
    }
    let written = written?;
    let status = status.map_err(|source| BackupError::Spawn {
        program: pg_dump.display().to_string(),
        source,
    })?;
    if !status.success() {
        return Err(BackupError::Tool {
            program: "pg_dump",
            status: status.to_string(),
            stderr,
        });
    }
    Ok(written)
}

/// How every SQLite database file starts.
const SQLITE_MAGIC: &[u8] = b"SQLite format 3\0";
/// How every `pg_dump --format=custom` output starts.
const PG_DUMP_MAGIC: &[u8] = b"PGDMP";

fn not_an_image(e: &BackupError) -> bool {
    matches!(e, BackupError::Archive(archive::ArchiveError::Io(io)) if is_not_an_image(io))
}

fn is_not_an_image(io: &std::io::Error) -> bool {
    io.get_ref().is_some_and(|inner| inner.is::<NotAnImage>())
}

/// Why [`Complete`] refused the dump, if it did.
fn incomplete_dump(e: &BackupError) -> Option<&DumpError> {
    match e {
        BackupError::Archive(archive::ArchiveError::Io(io)) => dump_error(io),
        _ => None,
    }
}

fn dump_error(io: &std::io::Error) -> Option<&DumpError> {
    io.get_ref()
        .and_then(|inner| inner.downcast_ref::<DumpError>())
}

/// Passes pg_dump's output through unchanged, checking its framing as it goes by
/// ([`DumpCheck`]): at the end of the stream it must be a complete dump, whatever
/// pg_dump's exit status. A wrapper that passes on part of the dump and exits 0 (a
/// `head -c`, a dropped `ssh` connection) would otherwise make a backup that
/// verifies, takes a rotation slot and cannot be restored.
struct Complete<R> {
    inner: R,
    check: DumpCheck,
    finished: bool,
}

impl<R> Complete<R> {
    fn new(inner: R) -> Self {
        Complete {
            inner,
            check: DumpCheck::new(),
            finished: false,
        }
    }
}

impl<R: std::io::Read> std::io::Read for Complete<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let checked = if n > 0 {
            self.check.feed(&buf[..n]).map(drop)
        } else if !self.finished {
            self.finished = true;
            self.check.finish().map(drop)
        } else {
            Ok(())
        };
        checked.map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        Ok(n)
    }
}

/// Passes an image through unchanged, checking its first bytes as they go by: it must
/// start with `magic` (so be non-empty). Nothing is buffered beyond those bytes.
struct Magic<R> {
    inner: R,
    magic: &'static [u8],
    /// The first bytes seen so far, up to `magic.len()`.
    head: Vec<u8>,
    what: &'static str,
    kind: &'static str,
}

impl<R> Magic<R> {
    fn new(inner: R, magic: &'static [u8], what: &'static str, kind: &'static str) -> Self {
        Magic {
            inner,
            magic,
            head: Vec::with_capacity(magic.len()),
            what,
            kind,
        }
    }

    /// `more`: the bytes read after `head`, some of which are shown too.
    fn refuse(&self, more: &[u8]) -> std::io::Error {
        let found = if self.head.is_empty() {
            "it is empty".to_owned()
        } else {
            let mut sample = self.head.clone();
            sample.extend_from_slice(&more[..more.len().min(40)]);
            format!(
                "it starts with {:?}",
                String::from_utf8_lossy(&sample).into_owned()
            )
        };
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            NotAnImage {
                what: self.what,
                kind: self.kind,
                found,
            },
        )
    }
}

impl<R: std::io::Read> std::io::Read for Magic<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let missing = self.magic.len() - self.head.len();
        if missing == 0 {
            return Ok(n);
        }
        if n == 0 {
            return Err(self.refuse(&[]));
        }
        let take = missing.min(n);
        self.head.extend_from_slice(&buf[..take]);
        if !self.magic.starts_with(&self.head) {
            return Err(self.refuse(&buf[take..n]));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn through(input: &[u8], chunk: usize) -> std::io::Result<Vec<u8>> {
        struct Chunks<'a>(&'a [u8], usize);
        impl Read for Chunks<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(self.1).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut out = Vec::new();
        Magic::new(
            Chunks(input, chunk),
            PG_DUMP_MAGIC,
            "pg_dump's output",
            "a dump",
        )
        .read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn images_pass_unchanged_only_with_their_magic() {
        for chunk in [1, 2, 5, 4096] {
            let dump = b"PGDMP\x01\x0e\x00rest of the dump";
            assert_eq!(through(dump, chunk).expect("a dump"), dump);
            for bad in [&b""[..], b"PGDM", b"PGDMX...", b"Error: no such container"] {
                let e = through(bad, chunk).expect_err("not a dump");
                assert!(e.get_ref().is_some_and(|i| i.is::<NotAnImage>()), "{e}");
            }
        }
        let e = through(b"", 1).expect_err("empty");
        assert!(e.to_string().contains("it is empty"), "{e}");
    }
}

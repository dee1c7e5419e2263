//! The source of a `[[files]]` backup: the directory as a tar stream.
//!
//! A worker thread walks the tree and writes a tar (crate `tar`, GNU headers, so
//! long names and large files fit) into a bounded pipe that the archive writer reads
//! like any database image: memory stays a few chunks whatever the tree's size.
//! Symbolic links are stored as links and never followed; permissions and mtimes
//! are kept. The tree is live, so a file may change while it is read: one that grows
//! is cut at the size its header already promised, one that shrinks is padded with
//! zeros, one that vanishes or cannot be read is left out, and a socket, fifo or
//! device is skipped. None of this fails the backup; every case is counted and named
//! in the [`FilesReport`] (the job summary and the manifest), and logged.

use std::fs::{File, Metadata};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use globset::GlobSet;

use crate::repo::archive::{channel, ChannelReader, ChannelWriter};
use crate::repo::files::FilesReport;
use crate::repo::BackupError;

/// What a files backup reads: the directory and what to leave out.
#[derive(Debug, Clone)]
pub struct FilesSpec {
    /// The `[[files]]` name.
    pub name: String,
    pub path: PathBuf,
    pub exclude: GlobSet,
}

impl FilesSpec {
    /// `dbkeeper check`: the directory must be there.
    pub fn check(&self) -> Result<String, BackupError> {
        match std::fs::metadata(&self.path) {
            Ok(m) if m.is_dir() => Ok(format!("backs up {}", self.path.display())),
            Ok(_) => Err(self.missing("is not a directory")),
            Err(e) => Err(self.missing(&e.to_string())),
        }
    }

    fn missing(&self, why: &str) -> BackupError {
        BackupError::Refused(format!(
            "{} {why}; create it or fix path in [[files]]",
            self.path.display()
        ))
    }

    /// Starts the worker; the stream ends with the tar's end marker. A directory
    /// without a single regular file anywhere below it fails: it is more likely a file
    /// system that is not mounted (a bare mount point, or one left with an empty
    /// `lost+found`) than data, and its backup would make rotation delete the ones
    /// that hold data.
    pub fn stream(&self) -> Result<TarStream, BackupError> {
        self.check()?;
        std::fs::read_dir(&self.path)
            .map_err(|e| self.missing(&format!("cannot be read ({e})")))?;
        if !holds_a_file(&self.path) {
            return Err(BackupError::Refused(format!(
                "{} is empty or holds only folders and links, no file (is a file system not mounted there? an unmounted one often leaves an empty lost+found); the backup was not taken and older backups are kept: put the data back or fix path in [[files]]",
                self.path.display()
            )));
        }
        let (out, input) = channel(PIPE_CHUNKS);
        let spec = self.clone();
        let report = Arc::new(Mutex::new(None));
        let worker = std::thread::Builder::new()
            .name("files-tar".to_owned())
            .spawn(move || write_tree(&spec, out))
            .map_err(|e| BackupError::Internal(format!("cannot start the tar thread: {e}")))?;
        Ok(TarStream {
            input,
            worker: Some(worker),
            report,
        })
    }
}

/// Chunks in flight between the tar thread and the archive writer (each up to
/// [`TAR_BUF`] bytes).
const PIPE_CHUNKS: usize = 4;
const TAR_BUF: usize = 256 * 1024;
/// How many changed or skipped entries are named in the report (all are counted).
const MAX_NOTES: usize = 20;

/// Counting and naming what the walk met (the struct lives in `repo`, which
/// keeps it in the manifest).
trait Noting {
    fn note(&mut self, path: &Path, what: &str);
    fn changed(&mut self, path: &Path, what: &str);
    fn skipped(&mut self, path: &Path, what: &str);
}

impl Noting for FilesReport {
    fn note(&mut self, path: &Path, what: &str) {
        tracing::warn!(file = %path.display(), "{what}");
        if self.notes.len() < MAX_NOTES {
            self.notes.push(format!("{}: {what}", path.display()));
        }
    }

    fn changed(&mut self, path: &Path, what: &str) {
        self.changed += 1;
        self.note(path, what);
    }

    fn skipped(&mut self, path: &Path, what: &str) {
        self.skipped += 1;
        self.note(path, what);
    }
}

/// The tar of a tree, as a reader. At its end the worker's verdict is collected: an
/// error there (the tree's root vanished, the pipe broke) fails the read.
pub struct TarStream {
    input: ChannelReader,
    worker: Option<JoinHandle<io::Result<FilesReport>>>,
    report: Arc<Mutex<Option<FilesReport>>>,
}

impl TarStream {
    /// Where the report appears once the stream has been read to its end.
    pub fn report(&self) -> Arc<Mutex<Option<FilesReport>>> {
        self.report.clone()
    }
}

impl Read for TarStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        if n > 0 {
            return Ok(n);
        }
        if let Some(worker) = self.worker.take() {
            let report = worker
                .join()
                .map_err(|_| io::Error::other("the tar thread panicked"))??;
            if let Ok(mut slot) = self.report.lock() {
                *slot = Some(report);
            }
        }
        Ok(0)
    }
}

fn write_tree(spec: &FilesSpec, out: ChannelWriter) -> io::Result<FilesReport> {
    let mut tar = tar::Builder::new(BufWriter::with_capacity(TAR_BUF, out));
    tar.follow_symlinks(false);
    let mut report = FilesReport::default();
    walk(spec, &spec.path, Path::new(""), &mut tar, &mut report)?;
    tar.into_inner()?.flush()?;
    Ok(report)
}

/// Stores the entries of the directory `dir` (`rel` below the root), sorted by
/// name, recursing into subdirectories.
fn walk<W: Write>(
    spec: &FilesSpec,
    dir: &Path,
    rel: &Path,
    tar: &mut tar::Builder<W>,
    report: &mut FilesReport,
) -> io::Result<()> {
    let listing = match std::fs::read_dir(dir) {
        Ok(l) => l,
        // The root must be readable; below it a directory may go or be private.
        Err(e) if !rel.as_os_str().is_empty() => {
            report.skipped(rel, &format!("directory not read ({e})"));
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in listing {
        match entry {
            Ok(entry) => names.push(entry.file_name()),
            Err(e) => report.skipped(rel, &format!("directory listing cut short ({e})")),
        }
    }
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        if spec.exclude.is_match(&rel) {
            continue;
        }
        let full = dir.join(&name);
        let meta = match std::fs::symlink_metadata(&full) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                report.skipped(&rel, "vanished while the backup ran");
                continue;
            }
            Err(e) => {
                report.skipped(&rel, &format!("cannot be read ({e})"));
                continue;
            }
        };
        let kind = meta.file_type();
        if kind.is_dir() {
            let mut header = header_of(&meta);
            let named = long_name(tar, &rel)?;
            tar.append_data(&mut header, named, io::empty())?;
            report.entries += 1;
            walk(spec, &full, &rel, tar, report)?;
        } else if kind.is_symlink() {
            let target = match std::fs::read_link(&full) {
                Ok(t) => t,
                Err(e) => {
                    report.skipped(&rel, &format!("link not read ({e})"));
                    continue;
                }
            };
            let mut header = header_of(&meta);
            let named = long_name(tar, &rel)?;
            tar.append_link(&mut header, named, &target)?;
            report.entries += 1;
        } else if kind.is_file() {
            add_file(&full, &rel, tar, report)?;
        } else {
            report.skipped(
                &rel,
                "not a regular file, directory or link (socket, fifo or device): skipped",
            );
        }
    }
    Ok(())
}

/// Stores one regular file, read through one open handle.
fn add_file<W: Write>(
    full: &Path,
    rel: &Path,
    tar: &mut tar::Builder<W>,
    report: &mut FilesReport,
) -> io::Result<()> {
    let file = match File::open(full) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            report.skipped(rel, "vanished while the backup ran");
            return Ok(());
        }
        Err(e) => {
            report.skipped(rel, &format!("cannot be read ({e})"));
            return Ok(());
        }
    };
    // The handle's own metadata: the file now open, even if the name was replaced.
    let before = file.metadata()?;
    let mut header = header_of(&before);
    let mut body = Exact {
        file,
        left: before.len(),
        padded: 0,
    };
    let named = long_name(tar, rel)?;
    tar.append_data(&mut header, named, &mut body)?;
    report.entries += 1;
    let mut extra = [0u8; 1];
    let grew = matches!(body.file.read(&mut extra), Ok(1));
    let after = body.file.metadata()?;
    if body.padded > 0 {
        report.changed(
            rel,
            &format!(
                "shrank while it was read: padded with {} zero bytes to {}",
                body.padded,
                before.len()
            ),
        );
    } else if grew {
        report.changed(
            rel,
            &format!(
                "grew while it was read: stored cut at {} bytes",
                before.len()
            ),
        );
    } else if (after.mtime(), after.mtime_nsec(), after.len())
        != (before.mtime(), before.mtime_nsec(), before.len())
    {
        report.changed(rel, "changed while it was read: stored as read");
    }
    Ok(())
}

/// Where a path does not fit a tar header's 100-byte name field, writes the GNU
/// long-name entry (`././@LongLink`, type `L`) carrying it, and returns the short
/// stand-in name for the entry that follows (readers take the long one); otherwise
/// returns `rel`. Written here rather than by the `tar` crate, which refuses a long
/// name whose first byte is not UTF-8: such a name must not fail the backup.
fn long_name<'p, W: Write>(tar: &mut tar::Builder<W>, rel: &'p Path) -> io::Result<&'p Path> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = rel.as_os_str().as_bytes();
    if bytes.len() < 100 {
        return Ok(rel);
    }
    let mut long = tar::Header::new_gnu();
    long.set_path("././@LongLink")?;
    long.set_entry_type(tar::EntryType::GNULongName);
    long.set_mode(0o644);
    long.set_size(bytes.len() as u64 + 1);
    long.set_cksum();
    tar.append(&long, bytes.chain(&[0u8][..]))?;
    Ok(Path::new(LONG_NAME_STAND_IN))
}

/// The name in the header of an entry whose real name came in a long-name entry.
const LONG_NAME_STAND_IN: &str = "././@LongLink-named";

/// Whether a regular file lies anywhere below `dir` (links not followed); stops at
/// the first one, so a tree with data costs a few reads.
fn holds_a_file(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut dirs = Vec::new();
    for entry in entries.flatten() {
        match entry.file_type() {
            Ok(t) if t.is_file() => return true,
            Ok(t) if t.is_dir() => dirs.push(entry.path()),
            _ => {}
        }
    }
    dirs.iter().any(|d| holds_a_file(d))
}

/// A tar header from `meta`: type, mode, owner, size and mtime.
fn header_of(meta: &Metadata) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    // `tar` takes the mtime unsigned, so one before 1970 would be stored as a date
    // far in the future: write GNU's base-256 form of a negative number instead
    // (two's complement, sign-extended over the 12 bytes, so the first is 0xff).
    if meta.mtime() < 0 {
        let field = &mut header.as_old_mut().mtime;
        field[..4].fill(0xff);
        field[4..].copy_from_slice(&meta.mtime().to_be_bytes());
    }
    header
}

/// Exactly `left` bytes of a file: cut if it grew, padded with zeros if it shrank
/// (the header promised that size).
struct Exact {
    file: File,
    left: u64,
    padded: u64,
}

impl Read for Exact {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = match self.file.read(&mut buf[..want]) {
            Ok(0) => {
                buf[..want].fill(0);
                self.padded += want as u64;
                want
            }
            Ok(n) => n,
            Err(e) => return Err(e),
        };
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: &Path) -> FilesSpec {
        FilesSpec {
            name: "t".to_owned(),
            path: path.to_owned(),
            exclude: GlobSet::empty(),
        }
    }

    #[test]
    fn a_file_that_shrank_is_padded_to_its_header_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let file = File::open(&path).unwrap();
        // As if the header had been made when the file was 16 bytes long.
        let mut body = Exact {
            file,
            left: 16,
            padded: 0,
        };
        let mut out = Vec::new();
        body.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"0123456789\0\0\0\0\0\0");
        assert_eq!(body.padded, 6);
        // One that grew is cut.
        let mut body = Exact {
            file: File::open(&path).unwrap(),
            left: 4,
            padded: 0,
        };
        let mut out = Vec::new();
        body.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"0123");
    }

    #[test]
    fn fifos_are_skipped_and_reported_and_the_rest_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("plain"), b"data").unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(dir.path().join("pipe"))
            .status()
            .unwrap();
        assert!(made.success());
        let mut stream = spec(dir.path()).stream().unwrap();
        let slot = stream.report();
        let mut tar = Vec::new();
        stream.read_to_end(&mut tar).unwrap();
        let report = slot.lock().unwrap().clone().unwrap();
        assert_eq!((report.entries, report.skipped, report.changed), (1, 1, 0));
        assert!(report.notes[0].starts_with("pipe: "), "{:?}", report.notes);
        let mut archive = tar::Archive::new(&tar[..]);
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["plain"]);
    }

    #[test]
    fn a_missing_directory_fails_before_anything_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let err = spec(&dir.path().join("gone")).stream().err().unwrap();
        assert!(err.to_string().contains("fix path in [[files]]"), "{err}");
    }
}

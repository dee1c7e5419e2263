//! Backup archives (`.dbk`): compress, then encrypt, streaming.
//!
//! [`write_archive`] turns a database image (SQLite file, `pg_dump` custom archive)
//! into an archive; [`read_archive`] authenticates, decrypts and decompresses it.
//! Both run on a blocking thread with memory bounded by a few segments. The format
//! is specified in `docs/FORMAT.md`. A `pg_dump-custom` image is also checked to be
//! a complete dump whenever it is read ([`pgdump`]).

pub mod compress;
pub mod crypto;
pub mod envelope;
pub mod format;
pub mod pgdump;

use std::io::{self, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};

pub use compress::Compression;
pub use crypto::{Identity, Key, KeyError, KeyRing, Recipient};
pub use envelope::{rewrap, Envelope, Rewrapped};
pub use format::{ArchiveReader, ArchiveWriter, GlobalsFormat, GlobalsSection, Header};

/// A globals section's plaintext (it can hold password hashes): wiped when dropped,
/// never printed (`Debug` shows its length only).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct GlobalsBytes(pub zeroize::Zeroizing<Vec<u8>>);

impl std::ops::Deref for GlobalsBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for GlobalsBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GlobalsBytes(<{} bytes>)", self.0.len())
    }
}

/// An archive could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("not a dbkeeper archive (it does not start with DBKEEPER)")]
    NotAnArchive,
    #[error("archive format version {0} is not supported by this dbkeeper (it reads versions 1 to 3); use a newer dbkeeper")]
    UnsupportedVersion(u8),
    #[error("the archive header is invalid ({0}): the archive is damaged or was altered")]
    BadHeader(String),
    /// `archive`: what the archive was made for (`key <id>`, `recipient age1…`);
    /// `have`: what was given (`key <id>`, `identity for age1…`).
    #[error("the archive was made for {}; you have {}; pass the key file or age identity that made it (decryption-key-files in the config, or --key-file)",
        archive.join(", "),
        if have.is_empty() { "no key".to_owned() } else { have.join(", ") })]
    WrongKey {
        archive: Vec<String>,
        have: Vec<String>,
    },
    #[error("the archive's data key does not open with its key: the header was altered")]
    KeyUnwrap,
    #[error("segment {segment} does not authenticate: the archive was altered or damaged")]
    Corrupt { segment: u64 },
    #[error(
        "the archive ends after {segments} segments without its final segment: it was cut short"
    )]
    Truncated { segments: u64 },
    #[error("the archive's contents do not decompress ({0}): the archive is damaged")]
    Decompress(String),
    /// The archive is intact, but the pg_dump output it holds is not a complete dump.
    #[error("{0}")]
    Dump(#[from] pgdump::DumpError),
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("stopped: the job was cancelled")]
    Cancelled,
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl ArchiveError {
    /// True when the archive itself is bad (tampered, truncated, wrong key), which the
    /// command line reports with exit code 3.
    pub fn is_verification(&self) -> bool {
        match self {
            // A dump in a version this dbkeeper cannot read is not known to be bad.
            ArchiveError::Dump(e) => !e.is_unsupported(),
            ArchiveError::Key(_) | ArchiveError::Cancelled | ArchiveError::Io(_) => false,
            _ => true,
        }
    }

    pub(crate) fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    /// Recovers an `ArchiveError` that travelled through an `io::Error`; other I/O
    /// errors while decoding (`InvalidData` from a decompressor) mean a bad archive.
    fn from_io(e: io::Error, decoding: bool) -> Self {
        let e = match e.downcast::<ArchiveError>() {
            Ok(inner) => return inner,
            Err(e) => e,
        };
        match e.kind() {
            io::ErrorKind::InvalidData
            | io::ErrorKind::InvalidInput
            | io::ErrorKind::UnexpectedEof
                if decoding =>
            {
                ArchiveError::Decompress(e.to_string())
            }
            _ => ArchiveError::Io(e),
        }
    }
}

/// A writer that counts and hashes what passes through it.
pub struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Hashing<W> {
    pub fn new(inner: W) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// The inner writer, the byte count and the SHA-256 (hex).
    pub fn finish(self) -> (W, u64, String) {
        (self.inner, self.bytes, hex::encode(self.hasher.finalize()))
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that counts and hashes what passes through it.
pub struct HashRead<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashRead<R> {
    pub fn new(inner: R) -> Self {
        HashRead {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Reads what is left, then returns the byte count and the SHA-256 (hex).
    pub fn finish(mut self) -> io::Result<(u64, String)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((self.bytes, hex::encode(self.hasher.finalize())))
    }
}

impl<R: Read> Read for HashRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// SHA-256 (hex) and size of everything `input` yields.
pub fn sha256_of(mut input: impl Read) -> io::Result<(String, u64)> {
    let mut h = Hashing::new(io::sink());
    io::copy(&mut input, &mut h)?;
    let (_, bytes, digest) = h.finish();
    Ok((digest, bytes))
}

/// What writing an archive produced.
#[derive(Debug)]
pub struct WriteStats {
    /// Bytes of the database image (before compression).
    pub raw_bytes: u64,
    /// Bytes of the archive file.
    pub stored_bytes: u64,
    /// SHA-256 of the archive file, hex.
    pub sha256: String,
    /// With [`Settings::check_with`]: the outcome of reading back the written bytes.
    pub checked: Option<Result<(), ArchiveError>>,
    /// Version 3 (written for recipients): the data key, kept in memory so that the
    /// writer reads its archive back without an identity, and the envelope's bytes
    /// (see [`ArchiveWriter::envelope`]).
    pub sealed: Option<(Key, Vec<u8>)>,
}

/// Encoding settings of one archive.
pub struct Settings<'a> {
    pub header: Header,
    pub key: Option<&'a Key>,
    pub compression: Compression,
    pub level: i32,
    pub threads: usize,
    /// Decrypt and decompress every byte as it is written, on another thread, with
    /// these keys. Together with a SHA-256 of the stored file this proves what a
    /// separate read pass would, without reading the file again.
    pub check_with: Option<KeyRing>,
    /// The globals section, written before the image; `header.globals` must give its
    /// length.
    pub globals: Option<GlobalsBytes>,
}

/// Feeds the bytes written through it to a reader on another thread.
struct Tee<W> {
    inner: W,
    copy: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        // A checker that stopped has its verdict already; keep writing.
        if self
            .copy
            .as_ref()
            .is_some_and(|tx| tx.send(buf[..n].to_vec()).is_err())
        {
            self.copy = None;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The reading end of a [`Tee`] or a [`ChannelWriter`]: a bounded queue of chunks
/// between two threads, so a producer that writes and a consumer that reads stream
/// into each other with memory bounded by the queue.
pub(crate) struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

/// The writing end of [`channel`]: fails with `BrokenPipe` once the reader is gone.
pub(crate) struct ChannelWriter(std::sync::mpsc::SyncSender<Vec<u8>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .send(buf.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reading side stopped"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A pipe between two threads holding at most `chunks` writes in flight.
pub(crate) fn channel(chunks: usize) -> (ChannelWriter, ChannelReader) {
    let (tx, rx) = std::sync::mpsc::sync_channel(chunks);
    (
        ChannelWriter(tx),
        ChannelReader {
            rx,
            chunk: Vec::new(),
            pos: 0,
        },
    )
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.chunk.len() - self.pos);
        out[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

type Checker = std::thread::JoinHandle<Result<u64, ArchiveError>>;

/// Reads back `input` on another thread: with the written archive's data key when
/// given (an archive for recipients, which `keys` may not open), else with `keys`.
fn start_checker(input: ChannelReader, keys: KeyRing, data_key: Option<Key>) -> Checker {
    std::thread::spawn(move || {
        let reader = match &data_key {
            Some(dk) => ArchiveReader::open_with_data_key(input, dk)?,
            None => ArchiveReader::open(input, &keys)?,
        };
        decode(reader, io::sink(), &AtomicBool::new(false), |_| Ok(())).map(|d| d.raw)
    })
}

const COPY_BUF: usize = 256 * 1024;

/// Compresses and seals everything `source` yields into `out`. Checks `cancelled`
/// between chunks and stops with [`ArchiveError::Cancelled`].
pub fn write_archive<R: Read, W: Write + Send>(
    source: R,
    out: W,
    settings: Settings<'_>,
    cancelled: &AtomicBool,
) -> Result<(W, WriteStats), ArchiveError> {
    write_archive_for(source, out, settings, &[], cancelled)
}

/// [`write_archive`] for age `recipients` too: with recipients the archive is
/// version 3 (the data key wrapped for each, and under `settings.key` if given), and
/// [`Settings::check_with`] reads it back with the data key kept in memory, so the
/// writer needs no identity (its `KeyRing` is then unused). Without recipients, the
/// same as [`write_archive`].
pub fn write_archive_for<R: Read, W: Write + Send>(
    mut source: R,
    out: W,
    settings: Settings<'_>,
    recipients: &[Recipient],
    cancelled: &AtomicBool,
) -> Result<(W, WriteStats), ArchiveError> {
    let declared = settings.header.globals.map(|g| g.bytes);
    if declared != settings.globals.as_ref().map(|g| g.len() as u64) {
        return Err(ArchiveError::BadHeader(
            "the header's globals length does not match the globals given".to_owned(),
        ));
    }
    // The checker starts once the data key exists; the header waits in the channel.
    let (copy, check_input) = match settings.check_with {
        Some(_) => {
            let (ChannelWriter(tx), input) = channel(4);
            (Some(tx), Some(input))
        }
        None => (None, None),
    };
    let tee = Tee { inner: out, copy };
    let sealed = ArchiveWriter::with_recipients(
        Hashing::new(tee),
        settings.header,
        settings.key,
        recipients,
    )?;
    let sealed_with = match (sealed.data_key(), sealed.envelope()) {
        (Some(dk), Some(envelope)) => Some((dk, envelope.to_vec())),
        _ => None,
    };
    let checker = match (check_input, settings.check_with) {
        (Some(input), Some(keys)) => {
            let data_key = if recipients.is_empty() {
                None
            } else {
                sealed.data_key()
            };
            Some(start_checker(input, keys, data_key))
        }
        _ => None,
    };
    let mut enc = compress::Encoder::new(
        settings.compression,
        settings.level,
        settings.threads,
        sealed,
    )?;
    // Before the image, so that a streamed restore has the roles before the data.
    if let Some(globals) = &settings.globals {
        enc.write_all(globals)?;
    }
    let mut buf = vec![0u8; COPY_BUF];
    let mut raw_bytes = 0u64;
    loop {
        if cancelled.load(Ordering::Relaxed) {
            return Err(ArchiveError::Cancelled);
        }
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ArchiveError::Io(e)),
        };
        enc.write_all(&buf[..n])?;
        raw_bytes += n as u64;
    }
    let sealed = enc.finish()?;
    let (tee, stored_bytes, sha256) = sealed.finish()?.finish();
    let Tee { inner: out, copy } = tee;
    drop(copy); // end of input for the checker
    let checked = checker.map(|handle| {
        let read_back = handle
            .join()
            .map_err(|_| ArchiveError::Decompress("the checking thread panicked".to_owned()))?;
        match read_back {
            Ok(raw) if raw == raw_bytes => Ok(()),
            Ok(raw) => Err(ArchiveError::Decompress(format!(
                "read back {raw} bytes of image, wrote {raw_bytes}"
            ))),
            Err(e) => Err(e),
        }
    });
    Ok((
        out,
        WriteStats {
            raw_bytes,
            stored_bytes,
            sha256,
            checked,
            sealed: sealed_with,
        },
    ))
}

/// Authenticates, decrypts and decompresses the archive from `input` into `sink`;
/// returns the sink, the header and the number of image bytes.
pub fn read_archive<R: Read, W: Write>(
    input: R,
    keys: &KeyRing,
    sink: W,
    cancelled: &AtomicBool,
) -> Result<(W, Header, u64), ArchiveError> {
    read_archive_gated(input, keys, sink, cancelled, |_| Ok(())).map(|d| (d.sink, d.header, d.raw))
}

/// What [`read_archive_gated`] read.
pub struct Decoded<W> {
    pub sink: W,
    pub header: Header,
    /// Bytes of the image (the globals section not counted).
    pub raw: u64,
    /// For a `pg_dump-custom` image: what a restore of it must hold.
    pub contents: Option<pgdump::Contents>,
    /// The globals section, if the archive has one.
    pub globals: Option<GlobalsBytes>,
}

/// Reads the start of the plaintext of `input` up to the end of its globals section
/// (none: `None`), calling `admit` with the header first. Every segment read has
/// authenticated (encrypted archives); the rest of the archive is not read, so the
/// caller reads it whole afterwards before trusting it as a whole.
pub fn read_globals<R: Read>(
    input: R,
    keys: &KeyRing,
    admit: impl FnOnce(&Header) -> Result<(), ArchiveError>,
) -> Result<(Header, Option<GlobalsBytes>), ArchiveError> {
    let reader = ArchiveReader::open(input, keys)?;
    let header = reader.header().clone();
    let Some(section) = header.globals else {
        admit(&header)?;
        return Ok((header, None));
    };
    let mut plain = compress::decoder(header.compression, BufReader::new(reader))
        .map_err(|e| ArchiveError::from_io(e, true))?;
    let globals = read_section(&mut plain, section.bytes)?;
    admit(&header)?;
    Ok((header, Some(globals)))
}

/// Exactly `len` bytes of the decompressed plaintext.
fn read_section(plain: &mut impl Read, len: u64) -> Result<GlobalsBytes, ArchiveError> {
    let mut globals = GlobalsBytes::default();
    plain
        .take(len)
        .read_to_end(&mut globals.0)
        .map_err(|e| ArchiveError::from_io(e, true))?;
    if globals.len() as u64 != len {
        return Err(ArchiveError::Decompress(format!(
            "the plaintext ends inside the {len}-byte globals section"
        )));
    }
    Ok(globals)
}

/// [`read_archive`], calling `admit` with the header once it is authenticated (the
/// first segment opened with it as associated data) and before the first byte
/// reaches `sink`, so a consumer that acts on the bytes as they come (a streamed
/// restore) never sees a byte of an archive whose header it would refuse. For an
/// unencrypted archive nothing is authenticated: `admit` runs on the parsed header.
/// For a `pg_dump-custom` image, also returns what a restore of it must hold.
pub fn read_archive_gated<R: Read, W: Write>(
    input: R,
    keys: &KeyRing,
    sink: W,
    cancelled: &AtomicBool,
    admit: impl FnOnce(&Header) -> Result<(), ArchiveError>,
) -> Result<Decoded<W>, ArchiveError> {
    decode(ArchiveReader::open(input, keys)?, sink, cancelled, admit)
}

/// The body of [`read_archive_gated`], on an opened reader.
fn decode<R: Read, W: Write>(
    reader: ArchiveReader<R>,
    mut sink: W,
    cancelled: &AtomicBool,
    admit: impl FnOnce(&Header) -> Result<(), ArchiveError>,
) -> Result<Decoded<W>, ArchiveError> {
    let mut admit = Some(admit);
    let header = reader.header().clone();
    // An archive proves only that these are the bytes pg_dump wrote: whether they
    // are a whole dump is checked as they pass (a dump cut short still starts with
    // PGDMP, and pg_restore would only find out part-way through a restore).
    let mut dump = (header.image == pgdump::IMAGE).then(pgdump::DumpCheck::new);
    let mut plain = compress::decoder(
        header.compression,
        BufReader::with_capacity(COPY_BUF, reader),
    )
    .map_err(|e| ArchiveError::from_io(e, true))?;
    let globals = match header.globals {
        Some(section) => Some(read_section(&mut plain, section.bytes)?),
        None => None,
    };
    let mut buf = vec![0u8; COPY_BUF];
    let mut raw = 0u64;
    loop {
        if cancelled.load(Ordering::Relaxed) {
            return Err(ArchiveError::Cancelled);
        }
        let n = match plain.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ArchiveError::from_io(e, true)),
        };
        if let Some(admit) = admit.take() {
            admit(&header)?;
        }
        if let Some(dump) = &mut dump {
            dump.feed(&buf[..n])?;
        }
        sink.write_all(&buf[..n]).map_err(ArchiveError::Io)?;
        raw += n as u64;
    }
    if let Some(admit) = admit.take() {
        admit(&header)?;
    }
    if let Some(dump) = &dump {
        dump.finish()?;
    }
    Ok(Decoded {
        sink,
        header,
        raw,
        contents: dump.map(pgdump::DumpCheck::into_contents),
        globals,
    })
}

#[cfg(test)]
mod tests;

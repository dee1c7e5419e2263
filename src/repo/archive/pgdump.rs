//! Is a `pg_dump --format=custom` stream complete? The one place that knows the
//! custom format's framing: the backup job runs every byte pg_dump writes through a
//! [`DumpCheck`] (`jobs/backup/source.rs`), and so does every read of an archive whose
//! header says `image = "pg_dump-custom"` ([`super::read_archive_gated`]: `backup
//! verify`, restore, the restore test, `decrypt`, the check while writing).
//!
//! A dump that is cut short still starts with `PGDMP` and can carry a whole table of
//! contents, so only walking it to the end tells: the header (magic, version,
//! integer and offset sizes, format = custom), every table-of-contents entry, then
//! the data blocks — a type byte (`BLK_DATA` or `BLK_BLOBS`), the entry's dump id, and
//! length-prefixed chunks ending with a zero length (large objects: an OID before
//! each run of chunks, ending with OID 0). The stream must end exactly after a
//! block, and every entry the table of contents says has data must have had its
//! block. Field order follows `ReadHead`, `ReadToc`, `ReadInt`, `ReadStr` and
//! `ReadOffset` in PostgreSQL's `pg_backup_archiver.c` and `_ReadExtraToc` and the
//! block reading in `pg_backup_custom.c`, for archive versions 1.12 to 1.16.
//!
//! Only the framing is parsed: data chunks are skipped by their length, never copied
//! or decompressed (but for a 5-byte one, compared with the end-of-COPY mark), so
//! checking costs a few instructions per chunk. Memory is one field at a time plus,
//! per entry with data, its dump id and a short label (the entry's type and name, cut
//! to [`LABEL_MAX`] bytes) for the completeness check and the messages, and the
//! names in [`Contents`].
//!
//! On the way it also gathers what a restore of the dump must produce
//! ([`Contents`]): the tables and indexes the table of contents creates, how many
//! constraints, and which tables' data blocks hold rows (in a dump without
//! compression, any chunk but the end-of-COPY mark `\.` that closes every table's
//! data, an empty table's included). pg_restore's exit status
//! is only its (or a wrapper's) word; the restore checks the restored database
//! against this list before it counts as done (`repo::pg_check`).

use std::collections::HashMap;

/// The archive header's `image` for a `pg_dump --format=custom` stream.
pub const IMAGE: &str = "pg_dump-custom";

const MAGIC: &[u8; 5] = b"PGDMP";
/// `archCustom` in `pg_backup.h`.
const FORMAT_CUSTOM: u8 = 1;
/// Block types (`pg_backup_archiver.h`).
const BLK_DATA: u8 = 1;
const BLK_BLOBS: u8 = 3;
/// Data states of a table-of-contents entry (`ReadOffset`).
const K_OFFSET_POS_NOT_SET: u8 = 1;
const K_OFFSET_POS_SET: u8 = 2;
const K_OFFSET_NO_DATA: u8 = 3;
/// The archive versions (major 1) whose layout this module knows.
const OLDEST_MINOR: u8 = 12;
const NEWEST_MINOR: u8 = 16;
/// What pg_dump (up to 17 at least) writes after a table's COPY rows, in a chunk of
/// its own: all an empty table's block holds.
const COPY_END: &[u8] = b"\\.\n\n\n";
/// How much of an entry's type and name is kept for messages.
pub const LABEL_MAX: usize = 64;
/// How many missing entries a message names.
const NAMED_MAX: usize = 3;

/// Why a stream is not a complete custom-format dump.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DumpError {
    /// The stream stops inside the header, the table of contents or a data block.
    #[error("the pg_dump output ends after {at} bytes, {inside}: the dump is incomplete")]
    Truncated { at: u64, inside: String },
    /// The stream ends between blocks, but entries that have data had no block.
    #[error("the pg_dump output ends after {at} bytes without the data of {missing}: the dump is incomplete")]
    Missing { at: u64, missing: String },
    /// Something no pg_dump writes: a bad field, an unknown block, trailing bytes.
    #[error("the pg_dump output is not a valid custom-format dump: {what} (at byte {at})")]
    Malformed { at: u64, what: String },
    /// A version whose layout this dbkeeper does not know.
    #[error("the pg_dump output is archive version {found}, which this dbkeeper cannot check: it reads versions 1.{OLDEST_MINOR} to 1.{NEWEST_MINOR} (pg_dump 9.0 to 17){hint}")]
    Unsupported { found: String, hint: &'static str },
}

impl DumpError {
    /// The stream stopped early (pg_dump, or a pipe after it, did not finish).
    pub fn is_truncated(&self) -> bool {
        matches!(
            self,
            DumpError::Truncated { .. } | DumpError::Missing { .. }
        )
    }

    /// The dump may be fine, but this dbkeeper cannot tell.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, DumpError::Unsupported { .. })
    }
}

/// What a complete dump held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Table-of-contents entries.
    pub entries: u64,
    /// Data blocks (one per entry with data).
    pub blocks: u64,
    /// Bytes of the whole dump.
    pub bytes: u64,
}

/// The next item the stream must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Raw bytes (at most [`FIELD_MAX`]).
    Raw(usize),
    /// `ReadInt`: a sign byte, then `intSize` bytes, least significant first.
    Int,
    /// `ReadStr`: an int length (negative: NULL), then that many bytes.
    Str,
    /// The rest of a string's bytes (the first [`LABEL_MAX`] are kept).
    StrBody(u64),
    /// `ReadOffset`: a data-state byte, then `offSize` bytes.
    Offset,
    /// The rest of a data chunk, skipped.
    Skip(u64),
}

/// The longest fixed-width field: an offset of at most 16 bytes and its flag.
const FIELD_MAX: usize = 17;

/// Where in the dump the next item belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Magic,
    Version,
    Sizes,
    Compression,
    /// The creation time: this many ints left.
    Time(u8),
    /// Database name, server version, pg_dump version: this many strings left.
    HeadStrings(u8),
    TocCount,
    Entry(Field),
    BlockType,
    BlockId {
        blobs: bool,
    },
    /// A chunk length, or the zero that ends the block (or the large object).
    ChunkLen {
        blobs: bool,
    },
    /// Inside a chunk.
    Chunk {
        blobs: bool,
    },
    /// A large object's OID, or the zero that ends the block.
    BlobOid,
}

/// The fields of a table-of-contents entry, in `ReadToc`'s order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    DumpId,
    HadDumper,
    TableOid,
    Oid,
    Tag,
    Desc,
    Section,
    Defn,
    DropStmt,
    CopyStmt,
    Namespace,
    Tablespace,
    /// Version 1.14 and later.
    TableAm,
    /// Version 1.16 and later.
    Relkind,
    Owner,
    WithOids,
    /// Dependencies: strings until a NULL one.
    Dep,
    /// `_ReadExtraToc`: the data state and offset.
    DataState,
}

/// An entry with data, by dump id.
#[derive(Debug)]
struct WithData {
    /// `TABLE DATA public.t`, cut to [`LABEL_MAX`] bytes.
    label: Box<str>,
    done: bool,
    /// For a `TABLE DATA` entry, its table in [`Contents::relations`].
    table: Option<usize>,
}

/// What kind of relation a table-of-contents entry creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelKind {
    Table,
    Index,
}

/// A table or index that a restore of the dump must create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub kind: RelKind,
    pub schema: String,
    pub name: String,
    /// A table whose data block held at least one non-empty chunk: it must have rows.
    pub rows: bool,
}

/// What a restore of a complete dump must hold (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contents {
    /// Every `TABLE`, `TABLE DATA` and `INDEX` entry whose names are known whole, in
    /// table-of-contents order (a table with data appears twice: as itself and as its
    /// data, which carries `rows`).
    pub relations: Vec<Relation>,
    /// `CONSTRAINT` and `FK CONSTRAINT` entries (primary keys, unique, exclusion and
    /// foreign keys): the restored database holds at least that many.
    pub constraints: u64,
    /// Whether `rows` means anything: only in a dump without compression does a
    /// table without rows have no data bytes (a compressed block of nothing still
    /// holds the compressor's header).
    pub rows_known: bool,
}

/// The table-of-contents entry being read.
#[derive(Debug, Default)]
struct Draft {
    id: u32,
    tag: String,
    desc: String,
    namespace: String,
    /// The tag or namespace was longer than what is kept: its name is not known whole.
    cut: bool,
}

/// Checks a custom-format dump fed to it in pieces of any size: [`DumpCheck::feed`]
/// each piece as it passes, then [`DumpCheck::finish`] at the end of the stream.
#[derive(Debug)]
pub struct DumpCheck {
    /// Bytes consumed so far.
    at: u64,
    need: Need,
    phase: Phase,
    /// A fixed-width field split across pieces.
    field: [u8; FIELD_MAX],
    field_len: usize,
    /// The kept start of the current string.
    text: Vec<u8>,
    /// The current string is longer than its kept start.
    text_cut: bool,
    contents: Contents,
    /// The dump's names are UTF-8 (its `ENCODING` entry says so).
    utf8: bool,
    minor: u8,
    int_size: usize,
    off_size: usize,
    toc_total: u64,
    toc_read: u64,
    draft: Draft,
    with_data: HashMap<u32, WithData>,
    pending: usize,
    blocks: u64,
    /// The entry whose block is being read.
    current: u32,
    /// The large object being read, in a `BLK_BLOBS` block.
    blob: i64,
    /// The first error: the stream is judged once.
    failed: Option<DumpError>,
    /// Where the table of contents ended, once it has.
    toc_end: Option<u64>,
}

impl Default for DumpCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl DumpCheck {
    pub fn new() -> Self {
        DumpCheck {
            at: 0,
            need: Need::Raw(MAGIC.len()),
            phase: Phase::Magic,
            field: [0; FIELD_MAX],
            field_len: 0,
            text: Vec::with_capacity(LABEL_MAX),
            text_cut: false,
            contents: Contents::default(),
            utf8: false,
            minor: 0,
            int_size: 0,
            off_size: 0,
            toc_total: 0,
            toc_read: 0,
            draft: Draft::default(),
            with_data: HashMap::new(),
            pending: 0,
            blocks: 0,
            current: 0,
            blob: 0,
            failed: None,
            toc_end: None,
        }
    }

    /// Checks the next bytes of the stream.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), DumpError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let fed = self.consume(bytes);
        if let Err(e) = &fed {
            self.failed = Some(e.clone());
        }
        fed
    }

    /// The verdict at the end of the stream: complete, or why not.
    pub fn finish(&self) -> Result<Summary, DumpError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if !self.between_blocks() {
            return Err(DumpError::Truncated {
                at: self.at,
                inside: self.position(),
            });
        }
        if self.pending > 0 {
            let mut missing: Vec<(u32, &str)> = self
                .with_data
                .iter()
                .filter(|(_, e)| !e.done)
                .map(|(id, e)| (*id, &*e.label))
                .collect();
            missing.sort_unstable();
            let mut named: Vec<String> = missing
                .iter()
                .take(NAMED_MAX)
                .map(|(id, label)| format!("entry {id} ({label})"))
                .collect();
            if missing.len() > NAMED_MAX {
                named.push(format!("{} more entries", missing.len() - NAMED_MAX));
            }
            return Err(DumpError::Missing {
                at: self.at,
                missing: named.join(", "),
            });
        }
        Ok(Summary {
            entries: self.toc_total,
            blocks: self.blocks,
            bytes: self.at,
        })
    }

    /// What a restore of the dump must hold, as far as the stream has gone (whole once
    /// [`DumpCheck::finish`] says the dump is complete).
    pub fn contents(&self) -> &Contents {
        &self.contents
    }

    /// [`DumpCheck::contents`], taken.
    pub fn into_contents(self) -> Contents {
        self.contents
    }

    /// How many bytes the header and table of contents take, once they have gone past
    /// (data blocks, if any, follow): what a copy of the stream's start needs to hold
    /// for `pg_restore --list`.
    pub fn toc_end(&self) -> Option<u64> {
        self.toc_end
    }

    /// At a point where the stream may end: between data blocks (or right after the
    /// table of contents).
    pub fn between_blocks(&self) -> bool {
        self.phase == Phase::BlockType && self.field_len == 0
    }

    fn consume(&mut self, mut input: &[u8]) -> Result<(), DumpError> {
        while !input.is_empty() {
            match self.need {
                Need::Skip(left) => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    input = &input[take..];
                    self.at += take as u64;
                    let left = left - take as u64;
                    if left == 0 {
                        self.chunk_done();
                    } else {
                        self.need = Need::Skip(left);
                    }
                }
                Need::StrBody(left) => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    let room = LABEL_MAX.saturating_sub(self.text.len()).min(take);
                    self.text.extend_from_slice(&input[..room]);
                    input = &input[take..];
                    self.at += take as u64;
                    let left = left - take as u64;
                    if left == 0 {
                        let text = std::mem::take(&mut self.text);
                        let done = self.string(Some(&text));
                        self.text = text;
                        done?;
                    } else {
                        self.need = Need::StrBody(left);
                    }
                }
                need => {
                    let width = self.width(need);
                    let mut field = [0u8; FIELD_MAX];
                    let start;
                    if self.field_len == 0 && input.len() >= width {
                        // The usual case: the whole field is in this piece.
                        field[..width].copy_from_slice(&input[..width]);
                        input = &input[width..];
                        start = self.at;
                        self.at += width as u64;
                    } else {
                        let take = (width - self.field_len).min(input.len());
                        self.field[self.field_len..self.field_len + take]
                            .copy_from_slice(&input[..take]);
                        self.field_len += take;
                        input = &input[take..];
                        self.at += take as u64;
                        if self.field_len < width {
                            continue;
                        }
                        field[..width].copy_from_slice(&self.field[..width]);
                        self.field_len = 0;
                        start = self.at - width as u64;
                    }
                    self.field_read(need, &field[..width], start)?;
                }
            }
        }
        Ok(())
    }

    fn width(&self, need: Need) -> usize {
        match need {
            Need::Raw(n) => n,
            Need::Int | Need::Str => 1 + self.int_size,
            Need::Offset => 1 + self.off_size,
            Need::StrBody(_) | Need::Skip(_) => 0,
        }
    }

    fn malformed(&self, at: u64, what: impl Into<String>) -> DumpError {
        DumpError::Malformed {
            at,
            what: what.into(),
        }
    }

    /// A fixed-width field that started at byte `at`.
    fn field_read(&mut self, need: Need, bytes: &[u8], at: u64) -> Result<(), DumpError> {
        match need {
            Need::Raw(_) => self.raw(bytes, at),
            Need::Int => {
                let value = self.int(bytes, at)?;
                self.integer(value, at)
            }
            Need::Str => {
                let len = self.int(bytes, at)?;
                if len < 0 {
                    self.string(None)
                } else if len == 0 {
                    self.string(Some(b""))
                } else {
                    self.text.clear();
                    self.text_cut = len.unsigned_abs() > LABEL_MAX as u64;
                    self.need = Need::StrBody(len.unsigned_abs());
                    Ok(())
                }
            }
            Need::Offset => self.data_state(bytes[0], at),
            Need::StrBody(_) | Need::Skip(_) => Ok(()),
        }
    }

    /// `ReadInt`: a sign byte (pg_dump writes 0 or 1), then the magnitude.
    fn int(&self, bytes: &[u8], at: u64) -> Result<i64, DumpError> {
        let magnitude = bytes[1..]
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let magnitude =
            i64::try_from(magnitude).map_err(|_| self.malformed(at, "an integer out of range"))?;
        match bytes[0] {
            0 => Ok(magnitude),
            1 => Ok(-magnitude),
            sign => Err(self.malformed(at, format!("an integer with sign byte {sign}"))),
        }
    }

    fn raw(&mut self, bytes: &[u8], at: u64) -> Result<(), DumpError> {
        match self.phase {
            Phase::Magic => {
                if bytes != MAGIC {
                    return Err(self.malformed(at, "it does not start with PGDMP"));
                }
                self.expect(Phase::Version, Need::Raw(3));
            }
            Phase::Version => {
                let (major, minor, rev) = (bytes[0], bytes[1], bytes[2]);
                if major != 1 || !(OLDEST_MINOR..=NEWEST_MINOR).contains(&minor) {
                    let newer = major > 1 || minor > NEWEST_MINOR;
                    return Err(DumpError::Unsupported {
                        found: format!("{major}.{minor}.{rev}"),
                        hint: if newer {
                            "; use a dbkeeper that knows it, or the pg_dump of an older PostgreSQL"
                        } else {
                            "; use a newer pg_dump"
                        },
                    });
                }
                self.minor = minor;
                self.expect(Phase::Sizes, Need::Raw(3));
            }
            Phase::Sizes => {
                let (int_size, off_size, format) = (bytes[0], bytes[1], bytes[2]);
                if !(1..=8).contains(&int_size) {
                    return Err(self.malformed(at, format!("integer size {int_size}")));
                }
                if !(1..=16).contains(&off_size) {
                    return Err(self.malformed(at, format!("offset size {off_size}")));
                }
                if format != FORMAT_CUSTOM {
                    return Err(self.malformed(
                        at + 2,
                        format!("format {format}, not custom ({FORMAT_CUSTOM})"),
                    ));
                }
                self.int_size = usize::from(int_size);
                self.off_size = usize::from(off_size);
                // 1.15 made the compression an algorithm byte; before, a level.
                let need = if self.minor >= 15 {
                    Need::Raw(1)
                } else {
                    Need::Int
                };
                self.expect(Phase::Compression, need);
            }
            Phase::Compression => {
                // 1.15 and later: the algorithm, 0 = none.
                self.contents.rows_known = bytes[0] == 0;
                self.expect(Phase::Time(7), Need::Int);
            }
            Phase::Chunk { blobs: false } => {
                if bytes != COPY_END {
                    self.table_has_rows();
                }
                self.chunk_done();
            }
            Phase::BlockType => {
                if self.pending == 0 {
                    return Err(self.malformed(
                        at,
                        "more bytes after the last data block (trailing garbage)",
                    ));
                }
                let blobs = match bytes[0] {
                    BLK_DATA => false,
                    BLK_BLOBS => true,
                    other => {
                        return Err(self.malformed(at, format!("unknown data block type {other}")))
                    }
                };
                self.expect(Phase::BlockId { blobs }, Need::Int);
            }
            phase => {
                return Err(self.malformed(at, format!("internal: raw bytes in {phase:?}")));
            }
        }
        Ok(())
    }

    fn integer(&mut self, value: i64, at: u64) -> Result<(), DumpError> {
        match self.phase {
            Phase::Compression => {
                // Before 1.15: the zlib level, 0 = none (-1 is zlib's default).
                self.contents.rows_known = value == 0;
                self.expect(Phase::Time(7), Need::Int);
            }
            Phase::Time(left) => {
                if left > 1 {
                    self.expect(Phase::Time(left - 1), Need::Int);
                } else {
                    self.expect(Phase::HeadStrings(3), Need::Str);
                }
            }
            Phase::TocCount => {
                let count = u64::try_from(value)
                    .map_err(|_| self.malformed(at, format!("a negative entry count {value}")))?;
                self.toc_total = count;
                self.next_entry();
            }
            Phase::Entry(Field::DumpId) => {
                let id = u32::try_from(value)
                    .ok()
                    .filter(|id| *id > 0)
                    .ok_or_else(|| self.malformed(at, format!("entry ID {value} out of range")))?;
                self.draft = Draft {
                    id,
                    ..Draft::default()
                };
                self.expect(Phase::Entry(Field::HadDumper), Need::Int);
            }
            Phase::Entry(Field::HadDumper) => {
                self.expect(Phase::Entry(Field::TableOid), Need::Str);
            }
            Phase::Entry(Field::Section) => self.expect(Phase::Entry(Field::Defn), Need::Str),
            Phase::Entry(Field::Relkind) => self.expect(Phase::Entry(Field::Owner), Need::Str),
            Phase::BlockId { blobs } => self.block(value, blobs, at)?,
            Phase::ChunkLen { blobs } => match value {
                0 if blobs => self.expect(Phase::BlobOid, Need::Int),
                0 => self.block_done(),
                len if !blobs && len.unsigned_abs() == COPY_END.len() as u64 => {
                    // Perhaps only the end of the COPY data: look at it.
                    self.expect(Phase::Chunk { blobs }, Need::Raw(COPY_END.len()));
                }
                len if len > 0 => {
                    if !blobs {
                        self.table_has_rows();
                    }
                    self.expect(Phase::Chunk { blobs }, Need::Skip(len.unsigned_abs()));
                }
                len => return Err(self.malformed(at, format!("a data chunk of length {len}"))),
            },
            Phase::BlobOid => {
                if value == 0 {
                    self.block_done();
                } else {
                    // An OID above 2^31 is written as a negative int: any nonzero is one.
                    self.blob = value;
                    self.expect(Phase::ChunkLen { blobs: true }, Need::Int);
                }
            }
            phase => {
                return Err(self.malformed(at, format!("internal: an integer in {phase:?}")));
            }
        }
        Ok(())
    }

    fn string(&mut self, text: Option<&[u8]>) -> Result<(), DumpError> {
        let keep = |t: Option<&[u8]>| t.map(|t| String::from_utf8_lossy(t).into_owned());
        match self.phase {
            Phase::HeadStrings(left) => {
                if left > 1 {
                    self.expect(Phase::HeadStrings(left - 1), Need::Str);
                } else {
                    self.expect(Phase::TocCount, Need::Int);
                }
            }
            Phase::Entry(field) => {
                let (next, need) = match field {
                    Field::TableOid => (Field::Oid, Need::Str),
                    Field::Oid => (Field::Tag, Need::Str),
                    Field::Tag => {
                        self.draft.cut |= self.text_cut && text.is_some_and(|t| !t.is_empty());
                        self.draft.tag = keep(text).unwrap_or_default();
                        (Field::Desc, Need::Str)
                    }
                    Field::Desc => {
                        self.draft.desc = keep(text).unwrap_or_default();
                        (Field::Section, Need::Int)
                    }
                    Field::Defn => {
                        if self.draft.desc == "ENCODING" {
                            // `SET client_encoding = 'UTF8';`: the encoding of every
                            // name in the dump.
                            self.utf8 = text.is_some_and(|t| t.ends_with(b"'UTF8';\n"));
                        }
                        (Field::DropStmt, Need::Str)
                    }
                    Field::DropStmt => (Field::CopyStmt, Need::Str),
                    Field::CopyStmt => (Field::Namespace, Need::Str),
                    Field::Namespace => {
                        self.draft.cut |= self.text_cut && text.is_some_and(|t| !t.is_empty());
                        self.draft.namespace = keep(text).unwrap_or_default();
                        (Field::Tablespace, Need::Str)
                    }
                    Field::Tablespace if self.minor >= 14 => (Field::TableAm, Need::Str),
                    Field::Tablespace | Field::TableAm if self.minor >= 16 => {
                        (Field::Relkind, Need::Int)
                    }
                    Field::Tablespace | Field::TableAm => (Field::Owner, Need::Str),
                    Field::Owner => (Field::WithOids, Need::Str),
                    Field::WithOids => (Field::Dep, Need::Str),
                    Field::Dep if text.is_some() => (Field::Dep, Need::Str),
                    Field::Dep => (Field::DataState, Need::Offset),
                    other => {
                        return Err(
                            self.malformed(self.at, format!("internal: a string in {other:?}"))
                        );
                    }
                };
                self.expect(Phase::Entry(next), need);
            }
            phase => {
                return Err(self.malformed(self.at, format!("internal: a string in {phase:?}")));
            }
        }
        Ok(())
    }

    /// The end of an entry: whether a data block must follow for it.
    fn data_state(&mut self, flag: u8, at: u64) -> Result<(), DumpError> {
        let has_data = match flag {
            K_OFFSET_POS_NOT_SET | K_OFFSET_POS_SET => true,
            K_OFFSET_NO_DATA => false,
            other => return Err(self.malformed(at, format!("data state {other}"))),
        };
        let draft = std::mem::take(&mut self.draft);
        let table = self.expect_relation(&draft, has_data);
        if has_data {
            let label = match (draft.namespace.is_empty(), draft.tag.is_empty()) {
                (_, true) => draft.desc,
                (true, false) => format!("{} {}", draft.desc, draft.tag),
                (false, false) => format!("{} {}.{}", draft.desc, draft.namespace, draft.tag),
            };
            let label = cut(label);
            if self
                .with_data
                .insert(
                    draft.id,
                    WithData {
                        label: label.into_boxed_str(),
                        done: false,
                        table,
                    },
                )
                .is_some()
            {
                return Err(self.malformed(at, format!("entry {} listed twice", draft.id)));
            }
            self.pending += 1;
        }
        self.toc_read += 1;
        self.next_entry();
        Ok(())
    }

    /// Records what the entry `draft` makes a restore create; returns the index of a
    /// `TABLE DATA` entry's table in the contents.
    fn expect_relation(&mut self, draft: &Draft, has_data: bool) -> Option<usize> {
        let kind = match draft.desc.as_str() {
            "CONSTRAINT" | "FK CONSTRAINT" => {
                self.contents.constraints += 1;
                return None;
            }
            "TABLE" => RelKind::Table,
            "TABLE DATA" if has_data => RelKind::Table,
            "INDEX" => RelKind::Index,
            _ => return None,
        };
        // A name longer than PostgreSQL's identifiers (63 bytes unless it was built
        // otherwise) is not known whole, so it cannot be looked up.
        if draft.cut || draft.namespace.is_empty() || draft.tag.is_empty() {
            return None;
        }
        // Names are in the database's encoding: only in UTF-8 (or plain ASCII) are
        // they what the check's UTF-8 session will look up.
        let known = |n: &str| n.is_ascii() || (self.utf8 && !n.contains('\u{fffd}'));
        if !known(&draft.namespace) || !known(&draft.tag) {
            return None;
        }
        self.contents.relations.push(Relation {
            kind,
            schema: draft.namespace.clone(),
            name: draft.tag.clone(),
            rows: false,
        });
        (draft.desc == "TABLE DATA").then(|| self.contents.relations.len() - 1)
    }

    fn next_entry(&mut self) {
        if self.toc_read < self.toc_total {
            self.expect(Phase::Entry(Field::DumpId), Need::Int);
        } else {
            self.toc_end = Some(self.at);
            self.expect(Phase::BlockType, Need::Raw(1));
        }
    }

    fn block(&mut self, id: i64, blobs: bool, at: u64) -> Result<(), DumpError> {
        let entry = u32::try_from(id)
            .ok()
            .and_then(|id| self.with_data.get_mut(&id));
        match entry {
            None => {
                return Err(self.malformed(
                    at,
                    format!("a data block for entry {id}, which the table of contents does not list with data"),
                ))
            }
            Some(e) if e.done => {
                return Err(self.malformed(at, format!("a second data block for entry {id}")))
            }
            Some(e) => e.done = true,
        }
        self.pending -= 1;
        self.blocks += 1;
        self.current = u32::try_from(id).unwrap_or_default();
        if blobs {
            self.expect(Phase::BlobOid, Need::Int);
        } else {
            self.expect(Phase::ChunkLen { blobs }, Need::Int);
        }
        Ok(())
    }

    /// The table whose block is being read has rows (a chunk other than the end mark).
    fn table_has_rows(&mut self) {
        if let Some(t) = self.with_data.get(&self.current).and_then(|e| e.table) {
            if let Some(r) = self.contents.relations.get_mut(t) {
                r.rows = true;
            }
        }
    }

    fn chunk_done(&mut self) {
        let blobs = matches!(self.phase, Phase::Chunk { blobs: true });
        self.expect(Phase::ChunkLen { blobs }, Need::Int);
    }

    fn block_done(&mut self) {
        self.current = 0;
        self.expect(Phase::BlockType, Need::Raw(1));
    }

    fn expect(&mut self, phase: Phase, need: Need) {
        self.phase = phase;
        self.need = need;
    }

    /// Where the stream stopped, for [`DumpError::Truncated`].
    fn position(&self) -> String {
        let label = |id: u32| {
            self.with_data.get(&id).map_or_else(
                || format!("entry {id}"),
                |e| format!("entry {id} ({})", e.label),
            )
        };
        match self.phase {
            Phase::Magic
            | Phase::Version
            | Phase::Sizes
            | Phase::Compression
            | Phase::Time(_)
            | Phase::HeadStrings(_)
            | Phase::TocCount => "inside its header".to_owned(),
            Phase::Entry(_) => format!(
                "inside its table of contents (entry {} of {})",
                self.toc_read + 1,
                self.toc_total
            ),
            Phase::BlockType | Phase::BlockId { .. } => {
                "inside the header of a data block".to_owned()
            }
            Phase::ChunkLen { blobs: false } | Phase::Chunk { blobs: false } => {
                format!("inside the data of {}", label(self.current))
            }
            Phase::BlobOid => format!("inside the large objects of {}", label(self.current)),
            Phase::ChunkLen { blobs: true } | Phase::Chunk { blobs: true } => format!(
                "inside large object {} of {}",
                // Shown as PostgreSQL shows it: unsigned.
                self.blob as i32 as u32,
                label(self.current)
            ),
        }
    }
}

/// `s` cut to at most [`LABEL_MAX`] bytes, at a character boundary.
fn cut(mut s: String) -> String {
    if s.len() > LABEL_MAX {
        let mut end = LABEL_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests;

//! Differential test of retention: generated tables (types, representations, zones,
//! hierarchies, clocks) against an oracle written here from the README's time table,
//! working from the true instants the generator wrote, not from dbkeeper's code.
//!
//! After a run, the surviving rows must be exactly the rows the oracle says survive,
//! `retention plan`'s count must equal what the run deleted, and the unreadable count
//! must equal the oracle's. Cases per property: $DBKEEPER_ORACLE_CASES (default 64).

mod common;

use std::path::Path;
use std::str::FromStr;

use chrono::{DateTime, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};
use dbkeeper::db::Database;
use dbkeeper::jobs::retention::RetentionJob;
use dbkeeper::Config;
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, FileFailurePersistence, TestRunner};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

fn cases() -> u32 {
    std::env::var("DBKEEPER_ORACLE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn runner() -> TestRunner {
    TestRunner::new(PropConfig {
        cases: cases(),
        // `run` on a hand-made runner knows no source file, so `WithSource` saved
        // nothing: the path is given whole (relative to the package).
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/proptest-regressions/retention_oracle.txt",
        ))),
        ..PropConfig::default()
    })
}

/// Year 1 and year 9999 in microseconds: the readable range of numbers.
const MIN_US: i128 = -62_135_596_800_000_000;
const MAX_US: i128 = 253_402_300_799_999_999;
/// 1970-01-01 as a julian day, in milliseconds (SQLite's internal origin offset).
const JD_UNIX_MS: i64 = 210_866_760_000_000;

const OLDER_THAN: [(&str, i64); 6] = [
    ("1s", 1_000),
    ("90s", 90_000),
    ("1h", 3_600_000),
    ("3h", 10_800_000),
    ("30d", 2_592_000_000),
    ("400d", 34_560_000_000),
];

/// Offsets of row times from the cutoff, clustered around it.
fn delta_ms() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => -2_000i64..2_000,
        2 => -5_400_000i64..5_400_000,
        1 => Just(0i64),
        1 => prop::sample::select(vec![-1i64, 1, -999, 999, -1_000, 1_000, -1_001, 1_001]),
        2 => -3 * 86_400_000i64..3 * 86_400_000,
        1 => -800 * 86_400_000i64..800 * 86_400_000,
    ]
}

/// Builds the rule's config (with the database URL) and runs plan + run at `now`.
/// Returns (plan count, unreadable count, deleted count).
async fn run_rule(toml: &str, now: DateTime<Utc>) -> (u64, u64, u64) {
    let config = Config::parse(Path::new("oracle.toml"), toml).expect("config");
    let cfg = &config.databases[0];
    let db = Database::open(cfg).expect("open");
    let job = RetentionJob::new(cfg.retention[0].clone(), None).expect("job");
    let plan = job.preview_at(&db, now).await.expect("plan");
    let outcome = job
        .run_at(&db, now, &CancellationToken::new())
        .await
        .expect("run");
    let deleted = outcome.details["deleted"].as_u64().expect("deleted");
    let after = job.preview_at(&db, now).await.expect("plan after");
    assert_eq!(
        after.expired_rows, 0,
        "nothing expired is left: {outcome:?}"
    );
    db.close().await;
    (plan.expired_rows, plan.unreadable_rows, deleted)
}

/// What the oracle says a run must leave.
struct Expected {
    left: Vec<i64>,
    deleted: u64,
    unreadable: u64,
}

impl Expected {
    fn matches(
        &self,
        left: &[i64],
        planned: u64,
        unreadable: u64,
        deleted: u64,
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(left, &self.left[..], "survivors");
        prop_assert_eq!(deleted, self.deleted, "deleted");
        prop_assert_eq!(planned, deleted, "plan = run");
        prop_assert_eq!(unreadable, self.unreadable, "unreadable");
        Ok(())
    }
}

// ---------------------------------------------------------------- SQLite

#[derive(Debug, Clone, Copy, PartialEq)]
enum Decl {
    Datetime,
    Timestamp,
    Text,
    Integer,
    Real,
    Numeric,
    Untyped,
}

impl Decl {
    fn sql(self) -> &'static str {
        match self {
            Decl::Datetime => "DATETIME",
            Decl::Timestamp => "TIMESTAMP",
            Decl::Text => "TEXT",
            Decl::Integer => "INTEGER",
            Decl::Real => "REAL",
            Decl::Numeric => "NUMERIC",
            Decl::Untyped => "",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Unit {
    S,
    Ms,
    Us,
}

impl Unit {
    fn per_second(self) -> i64 {
        match self {
            Unit::S => 1,
            Unit::Ms => 1_000,
            Unit::Us => 1_000_000,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Unit::S => "s",
            Unit::Ms => "ms",
            Unit::Us => "us",
        }
    }
}

#[derive(Debug, Clone)]
enum Form {
    IntSeconds,
    IntMillis,
    IntMicros(u16),
    RealJulian,
    RealUnix,
    /// `YYYY-MM-DD HH:MM:SS`
    TextSpace,
    /// `YYYY-MM-DDTHH:MM:SS.fffZ`
    TextZulu,
    /// `YYYY-MM-DD HH:MM:SS.ffffff` (Python's isoformat without zone)
    TextMicros(u16),
    /// `YYYY-MM-DDTHH:MM:SS.fff±HH:MM`
    TextOffset(i32),
    /// `YYYY-MM-DD`
    TextDate,
    /// `YYYY-MM-DDTHH:MM`
    TextMinutes,
    Garbage(&'static str),
    Null,
    Blob,
}

const GARBAGE: [&str; 9] = [
    "11/22/2026 02:28",
    "yesterday",
    "",
    "now",
    "12:00:00",
    "2026-13-05 10:00:00",
    "2026-11-22 25:61:00",
    "Sun, 22 Nov 2026 10:00:00 GMT",
    " 2026-11-22 10:00:00",
];

fn form() -> impl Strategy<Value = Form> {
    prop_oneof![
        Just(Form::IntSeconds),
        Just(Form::IntMillis),
        (0u16..1000).prop_map(Form::IntMicros),
        Just(Form::RealJulian),
        Just(Form::RealUnix),
        Just(Form::TextSpace),
        Just(Form::TextZulu),
        (0u16..1000)
            .prop_filter("not a half millisecond", |e| *e != 500)
            .prop_map(Form::TextMicros),
        prop::sample::select(vec![-300, -210, -60, 0, 60, 330, 345, 840])
            .prop_map(Form::TextOffset),
        Just(Form::TextDate),
        Just(Form::TextMinutes),
        prop::sample::select(GARBAGE.to_vec()).prop_map(Form::Garbage),
        Just(Form::Null),
        Just(Form::Blob),
    ]
}

#[derive(Debug, Clone)]
enum LiteValue {
    Int(i64),
    Real(f64),
    Text(String),
    Null,
    Blob,
}

/// A SQLite value as generated, and what it stands for.
#[derive(Debug, Clone)]
struct LiteRow {
    form: Form,
    at_ms: i64,
    keep_kind: bool,
}

impl LiteRow {
    /// The value written, and the instant (µs) it means if read as the form intends.
    fn value(&self) -> (LiteValue, Option<i128>) {
        let ms = self.at_ms;
        let utc = |ms: i64| DateTime::from_timestamp_millis(ms).expect("in range");
        match &self.form {
            Form::IntSeconds => (LiteValue::Int(ms.div_euclid(1000)), None),
            Form::IntMillis => (LiteValue::Int(ms), None),
            Form::IntMicros(extra) => (LiteValue::Int(ms * 1000 + i64::from(*extra)), None),
            Form::RealJulian => {
                // Not a whole day, which a NUMERIC column would store as an integer.
                let k = if (ms + JD_UNIX_MS) % 86_400_000 == 0 {
                    ms + 1
                } else {
                    ms
                };
                (
                    LiteValue::Real((k + JD_UNIX_MS) as f64 / 86_400_000.0),
                    Some(i128::from(k) * 1000),
                )
            }
            Form::RealUnix => {
                let k = if ms % 1000 == 0 { ms + 1 } else { ms };
                (
                    LiteValue::Real(k as f64 / 1000.0),
                    Some(i128::from(k) * 1000),
                )
            }
            Form::TextSpace => {
                let t = utc(ms.div_euclid(1000) * 1000);
                (
                    LiteValue::Text(t.format("%Y-%m-%d %H:%M:%S").to_string()),
                    Some(i128::from(t.timestamp_millis()) * 1000),
                )
            }
            Form::TextZulu => (
                LiteValue::Text(utc(ms).format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()),
                Some(i128::from(ms) * 1000),
            ),
            Form::TextMicros(extra) => {
                let us = i128::from(ms) * 1000 + i128::from(*extra);
                let t = utc(ms);
                let text = format!("{}{:03}", t.format("%Y-%m-%d %H:%M:%S%.3f"), extra);
                // SQLite keeps milliseconds, rounding to the nearest.
                let rounded = (us + 500).div_euclid(1000) * 1000;
                (LiteValue::Text(text), Some(rounded))
            }
            Form::TextOffset(minutes) => {
                let local = utc(ms) + chrono::Duration::minutes(i64::from(*minutes));
                let sign = if *minutes < 0 { '-' } else { '+' };
                let m = minutes.abs();
                (
                    LiteValue::Text(format!(
                        "{}{sign}{:02}:{:02}",
                        local.format("%Y-%m-%dT%H:%M:%S%.3f"),
                        m / 60,
                        m % 60
                    )),
                    Some(i128::from(ms) * 1000),
                )
            }
            Form::TextDate => {
                let day = utc(ms).date_naive();
                let midnight = day.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
                (
                    LiteValue::Text(day.format("%Y-%m-%d").to_string()),
                    Some(i128::from(midnight.timestamp_millis()) * 1000),
                )
            }
            Form::TextMinutes => {
                let t = utc(ms.div_euclid(60_000) * 60_000);
                (
                    LiteValue::Text(t.format("%Y-%m-%dT%H:%M").to_string()),
                    Some(i128::from(t.timestamp_millis()) * 1000),
                )
            }
            Form::Garbage(g) => (LiteValue::Text((*g).to_owned()), None),
            Form::Null => (LiteValue::Null, None),
            Form::Blob => (LiteValue::Blob, None),
        }
    }

    /// The oracle: the instant (µs) SQLite reads from the stored value, `None` if it is
    /// not a time, following the README: integers are `unit`s since 1970 within years
    /// 1-9999; reals are julian days below 5373484.5, else unix seconds; text must be an
    /// ISO-8601 date-time. Column affinity first converts numbers to text (TEXT) or
    /// integers to reals (REAL), as SQLite documents.
    fn read(&self, decl: Decl, unit: Unit) -> Option<i128> {
        let (value, meant) = self.value();
        let value = match (decl, value) {
            (Decl::Text, LiteValue::Int(_) | LiteValue::Real(_)) => return None,
            (Decl::Real, LiteValue::Int(v)) => LiteValue::Real(v as f64),
            (_, v) => v,
        };
        match value {
            LiteValue::Int(v) => {
                let us = i128::from(v) * i128::from(1_000_000 / unit.per_second());
                (MIN_US..=MAX_US).contains(&us).then_some(us)
            }
            LiteValue::Real(r) => {
                if (0.0..5_373_484.5).contains(&r) {
                    meant.filter(|_| matches!(self.form, Form::RealJulian))
                } else if (-210_866_760_000.0..=253_402_300_799.0).contains(&r) {
                    match self.form {
                        Form::RealUnix => meant,
                        // An integer of seconds that became a real in a REAL column.
                        Form::IntSeconds => {
                            Some(i128::from(self.at_ms.div_euclid(1000)) * 1_000_000)
                        }
                        _ => None,
                    }
                } else {
                    None
                }
            }
            LiteValue::Text(_) => meant,
            LiteValue::Null | LiteValue::Blob => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    /// `id INTEGER PRIMARY KEY` (the rowid).
    Plain,
    /// A user column named `rowid` that is not the row id.
    ShadowedRowid,
    WithoutRowid,
}

#[derive(Debug, Clone)]
struct LiteCase {
    decl: Decl,
    unit: Unit,
    shape: Shape,
    now_ms: i64,
    older: usize,
    with_where: bool,
    batch: u32,
    adaptive: bool,
    rows: Vec<LiteRow>,
}

fn lite_case() -> impl Strategy<Value = LiteCase> {
    (
        prop::sample::select(vec![
            Decl::Datetime,
            Decl::Timestamp,
            Decl::Text,
            Decl::Integer,
            Decl::Real,
            Decl::Numeric,
            Decl::Untyped,
        ]),
        prop::sample::select(vec![Unit::S, Unit::S, Unit::Ms, Unit::Us]),
        prop::sample::select(vec![
            Shape::Plain,
            Shape::ShadowedRowid,
            Shape::WithoutRowid,
        ]),
        // 2001..2033, whole milliseconds.
        978_307_200_000i64..2_000_000_000_000,
        0..OLDER_THAN.len(),
        any::<bool>(),
        1u32..25,
        any::<bool>(),
        prop::collection::vec((form(), delta_ms(), prop::bool::weighted(0.2)), 0..40),
    )
        .prop_map(
            |(decl, unit, shape, now_ms, older, with_where, batch, adaptive, rows)| {
                let cutoff = now_ms - OLDER_THAN[older].1;
                LiteCase {
                    decl,
                    unit,
                    shape,
                    now_ms,
                    older,
                    with_where,
                    batch,
                    adaptive,
                    rows: rows
                        .into_iter()
                        .map(|(form, d, keep_kind)| LiteRow {
                            form,
                            at_ms: cutoff + d,
                            keep_kind,
                        })
                        .collect(),
                }
            },
        )
}

async fn sqlite_case(dir: &Path, n: u32, case: &LiteCase) -> Result<(), TestCaseError> {
    let file = dir.join(format!("oracle-{n}.db"));
    let url = format!("sqlite://{}?mode=rwc", file.display());
    let mut conn = sqlx::SqliteConnection::connect(&url)
        .await
        .expect("connect");
    let columns = format!("kind TEXT, created_at {}", case.decl.sql());
    let create = match case.shape {
        Shape::Plain => format!("CREATE TABLE t (id INTEGER PRIMARY KEY, {columns})"),
        Shape::ShadowedRowid => format!("CREATE TABLE t (rowid INTEGER, id INTEGER, {columns})"),
        Shape::WithoutRowid => {
            format!("CREATE TABLE t (id INTEGER PRIMARY KEY, {columns}) WITHOUT ROWID")
        }
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(create))
        .execute(&mut conn)
        .await
        .expect("create");
    for (i, row) in case.rows.iter().enumerate() {
        let id = i as i64 + 1;
        let kind = if row.keep_kind { "keep" } else { "x" };
        let (value, _) = row.value();
        let sql = match case.shape {
            // Every user "rowid" the same, unlike the real row ids.
            Shape::ShadowedRowid => {
                "INSERT INTO t (rowid, id, kind, created_at) VALUES (1, ?1, ?2, ?3)"
            }
            _ => "INSERT INTO t (id, kind, created_at) VALUES (?1, ?2, ?3)",
        };
        let q = sqlx::query(sql).bind(id).bind(kind);
        let q = match value {
            LiteValue::Int(v) => q.bind(v),
            LiteValue::Real(r) => q.bind(r),
            LiteValue::Text(t) => q.bind(t),
            LiteValue::Null => q.bind(None::<i64>),
            LiteValue::Blob => q.bind(vec![0u8, 0xff, 0x10]),
        };
        q.execute(&mut conn).await.expect("insert");
    }
    conn.close().await.expect("close");

    let (older, older_ms) = OLDER_THAN[case.older];
    let cutoff_us = i128::from(case.now_ms - older_ms) * 1000;
    let mut expect_left = Vec::new();
    let mut expect_deleted = 0u64;
    let mut expect_unreadable = 0u64;
    for (i, row) in case.rows.iter().enumerate() {
        let covered = !(case.with_where && row.keep_kind);
        let read = row.read(case.decl, case.unit);
        let not_null = !matches!(row.form, Form::Null);
        if covered && read.is_some_and(|us| us < cutoff_us) {
            expect_deleted += 1;
        } else {
            expect_left.push(i as i64 + 1);
        }
        if covered && not_null && read.is_none() {
            expect_unreadable += 1;
        }
    }

    let toml = format!(
        "[[database]]\nname = \"lite\"\nurl = \"{url}\"\n\
         [[database.retention]]\ntable = \"t\"\ncolumn = \"created_at\"\nolder-than = \"{older}\"\n\
         epoch-unit = \"{}\"\nbatch-size = {}\nbatch-time = \"{}\"\nschedule = \"manual\"\n{}",
        case.unit.name(),
        case.batch,
        if case.adaptive { "50ms" } else { "0s" },
        if case.with_where {
            "where = \"kind <> 'keep'\"\n"
        } else {
            ""
        },
    );
    let now = DateTime::from_timestamp_millis(case.now_ms).expect("now");
    let (planned, unreadable, deleted) = run_rule(&toml, now).await;

    let mut conn = sqlx::SqliteConnection::connect(&url)
        .await
        .expect("connect");
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM t ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .expect("survivors");
    conn.close().await.expect("close");
    let _ = std::fs::remove_file(&file);
    Expected {
        left: expect_left,
        deleted: expect_deleted,
        unreadable: expect_unreadable,
    }
    .matches(&left, planned, unreadable, deleted)
}

#[test]
fn sqlite_survivors_match_the_oracle() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().expect("dir");
    let n = std::sync::atomic::AtomicU32::new(0);
    runner()
        .run(&lite_case(), |case| {
            let n = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            rt.block_on(sqlite_case(dir.path(), n, &case))
        })
        .expect("property");
}

// ------------------------------------------------------------ PostgreSQL

#[derive(Debug, Clone, Copy, PartialEq)]
enum PgType {
    Timestamptz,
    Timestamp,
    Date,
    Int8(Unit),
    Numeric,
}

impl PgType {
    fn sql(self) -> &'static str {
        match self {
            PgType::Timestamptz => "timestamptz",
            PgType::Timestamp => "timestamp",
            PgType::Date => "date",
            PgType::Int8(_) => "int8",
            PgType::Numeric => "numeric",
        }
    }
    fn unit(self) -> Unit {
        match self {
            PgType::Int8(u) => u,
            _ => Unit::S,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Special {
    No,
    Null,
    Infinity,
    NegInfinity,
    /// A number far outside years 1-9999 (or NaN for numeric).
    OutOfRange,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Hierarchy {
    Single,
    Inherited,
    Partitioned,
}

#[derive(Debug, Clone)]
struct PgRow {
    at_us: i64,
    special: Special,
    part: u8,
    keep_kind: bool,
}

#[derive(Debug, Clone)]
struct PgCase {
    typ: PgType,
    db_zone: &'static str,
    /// `column-timezone`, when the application writes another zone than the default.
    column_zone: Option<&'static str>,
    hierarchy: Hierarchy,
    now_ms: i64,
    older: usize,
    with_where: bool,
    batch: u32,
    scan: &'static str,
    rows: Vec<PgRow>,
}

const ZONES: [&str; 7] = [
    "UTC",
    "America/New_York",
    "Asia/Kolkata",
    "America/St_Johns",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "Europe/Berlin",
];

/// Writing zones with a cutoff right at one of their fall-back hours (when a wall
/// clock is ambiguous), and ordinary times for every zone.
const SCENARIOS: [(&str, i64); 10] = [
    ("America/New_York", 1_793_512_800_000), // 2026-11-01T06:00Z, falls back 02:00 -> 01:00
    ("Europe/Berlin", 1_792_890_000_000),    // 2026-10-25T01:00Z
    ("Australia/Lord_Howe", 1_775_314_800_000), // 2026-04-04T15:00Z, half an hour
    ("Pacific/Chatham", 1_775_311_200_000),  // 2026-04-04T14:00Z
    ("America/St_Johns", 1_793_514_600_000), // 2026-11-01T04:30Z
    ("UTC", 1_788_000_000_000),
    ("Asia/Kolkata", 1_763_000_000_000),
    ("America/New_York", 1_810_000_000_000),
    ("Europe/Berlin", 1_760_000_000_000),
    ("America/St_Johns", 1_770_000_000_000),
];

fn pg_case() -> impl Strategy<Value = PgCase> {
    (
        prop::sample::select(vec![
            PgType::Timestamptz,
            PgType::Timestamp,
            PgType::Timestamp,
            PgType::Date,
            PgType::Int8(Unit::S),
            PgType::Int8(Unit::Ms),
            PgType::Numeric,
        ]),
        prop::sample::select(SCENARIOS.to_vec()),
        prop::option::weighted(0.3, prop::sample::select(ZONES.to_vec())),
        prop::sample::select(vec![
            Hierarchy::Single,
            Hierarchy::Inherited,
            Hierarchy::Partitioned,
        ]),
        prop_oneof![3 => -5_400_000i64..5_400_000, 1 => -86_400_000i64..86_400_000],
        0..OLDER_THAN.len(),
        any::<bool>(),
        (
            1u32..30,
            prop::sample::select(vec!["auto", "rows", "pages"]),
        ),
        prop::collection::vec(
            (
                delta_ms(),
                0i64..1000,
                prop::sample::select(vec![
                    Special::No,
                    Special::No,
                    Special::No,
                    Special::No,
                    Special::No,
                    Special::No,
                    Special::Null,
                    Special::Infinity,
                    Special::NegInfinity,
                    Special::OutOfRange,
                ]),
                0u8..3,
                prop::bool::weighted(0.2),
            ),
            0..40,
        ),
    )
        .prop_map(
            |(
                typ,
                (zone, base),
                other_default,
                hierarchy,
                shift,
                older,
                with_where,
                (batch, scan),
                rows,
            )| {
                let cutoff_ms = base + shift;
                // The application writes wall clocks in `zone`: the database's default,
                // or (column-timezone) a zone other than the default.
                let (db_zone, column_zone) = match other_default {
                    Some(default) => (default, Some(zone)),
                    None => (zone, None),
                };
                PgCase {
                    typ,
                    db_zone,
                    column_zone,
                    hierarchy,
                    now_ms: cutoff_ms + OLDER_THAN[older].1,
                    older,
                    with_where,
                    batch,
                    scan,
                    rows: rows
                        .into_iter()
                        .map(|(d, extra_us, special, part, keep_kind)| PgRow {
                            at_us: (cutoff_ms + d) * 1000 + extra_us,
                            special,
                            part,
                            keep_kind,
                        })
                        .collect(),
                }
            },
        )
}

/// The instant PostgreSQL means by a wall-clock value in `zone`: the later one in a
/// fall-back hour (PostgreSQL reads ambiguous times as standard time).
fn from_wall(zone: chrono_tz::Tz, local: NaiveDateTime) -> i128 {
    let t = match zone.from_local_datetime(&local) {
        LocalResult::Single(t) => t,
        LocalResult::Ambiguous(a, b) => a.max(b),
        LocalResult::None => panic!("generated wall-clock {local} does not exist in {zone}"),
    };
    i128::from(t.timestamp_micros())
}

impl PgRow {
    /// The SQL literal written, and (oracle) the instant in µs it stands for.
    fn literal(&self, typ: PgType, zone: chrono_tz::Tz) -> (String, Option<i128>) {
        let instant = DateTime::from_timestamp_micros(self.at_us).expect("in range");
        match (self.special, typ) {
            (Special::Null, _) => ("NULL".into(), None),
            (Special::Infinity, PgType::Timestamptz | PgType::Timestamp | PgType::Date) => {
                ("'infinity'".into(), None)
            }
            (Special::NegInfinity, PgType::Timestamptz | PgType::Timestamp | PgType::Date) => {
                ("'-infinity'".into(), None)
            }
            (Special::OutOfRange, PgType::Numeric) => ("'NaN'".into(), None),
            (Special::Infinity | Special::OutOfRange, PgType::Int8(_)) => {
                ("9000000000000000000".into(), None)
            }
            (Special::NegInfinity, PgType::Int8(_) | PgType::Numeric) => {
                ("-9000000000000000000".into(), None)
            }
            (Special::Infinity, PgType::Numeric) => ("1e30".into(), None),
            (_, PgType::Timestamptz) => (
                format!("'{}'", instant.format("%Y-%m-%dT%H:%M:%S%.6fZ")),
                Some(i128::from(self.at_us)),
            ),
            (_, PgType::Timestamp) => {
                let local = instant.with_timezone(&zone).naive_local();
                (
                    format!("'{}'", local.format("%Y-%m-%d %H:%M:%S%.6f")),
                    Some(from_wall(zone, local)),
                )
            }
            (_, PgType::Date) => {
                let day: NaiveDate = instant.with_timezone(&zone).date_naive();
                let midnight = day.and_hms_opt(0, 0, 0).expect("midnight");
                (format!("'{day}'"), Some(from_wall(zone, midnight)))
            }
            (_, PgType::Int8(Unit::Ms)) => {
                let ms = self.at_us.div_euclid(1000);
                (ms.to_string(), Some(i128::from(ms) * 1000))
            }
            (_, PgType::Int8(_)) => {
                let s = self.at_us.div_euclid(1_000_000);
                (s.to_string(), Some(i128::from(s) * 1_000_000))
            }
            (_, PgType::Numeric) => {
                let s = self.at_us.div_euclid(1_000_000);
                let frac = self.at_us.rem_euclid(1_000_000);
                (format!("{s}.{frac:06}"), Some(i128::from(self.at_us)))
            }
        }
    }
}

async fn pg_case_run(db: &common::PgDb, n: u32, case: &PgCase) -> Result<(), TestCaseError> {
    let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    let t = format!("t{n}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {} SET timezone TO '{}'",
        db.name, case.db_zone
    )))
    .execute(&mut conn)
    .await
    .expect("zone");
    let cols = format!(
        "id int NOT NULL, part int NOT NULL, kind text, created_at {}",
        case.typ.sql()
    );
    let mut ddl = match case.hierarchy {
        Hierarchy::Single | Hierarchy::Inherited => format!("CREATE TABLE {t} ({cols});"),
        Hierarchy::Partitioned => format!("CREATE TABLE {t} ({cols}) PARTITION BY LIST (part);"),
    };
    for p in 0..3 {
        match case.hierarchy {
            Hierarchy::Single => {}
            Hierarchy::Inherited if p > 0 => {
                ddl.push_str(&format!("CREATE TABLE {t}_c{p} () INHERITS ({t});"))
            }
            Hierarchy::Inherited => {}
            Hierarchy::Partitioned => ddl.push_str(&format!(
                "CREATE TABLE {t}_p{p} PARTITION OF {t} FOR VALUES IN ({p});"
            )),
        }
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
        .execute(&mut conn)
        .await
        .expect("create");

    let zone = chrono_tz::Tz::from_str(case.column_zone.unwrap_or(case.db_zone)).expect("zone");
    let (older, older_ms) = OLDER_THAN[case.older];
    let cutoff_us = i128::from(case.now_ms - older_ms) * 1000;
    let mut expect_left = Vec::new();
    let mut expect_deleted = 0u64;
    let mut expect_unreadable = 0u64;
    let mut inserts = String::new();
    for (i, row) in case.rows.iter().enumerate() {
        let id = i as i64 + 1;
        let (literal, meant) = row.literal(case.typ, zone);
        // Inherited rows go to the parent (part 0) or a child, so ctids repeat.
        let into = match (case.hierarchy, row.part) {
            (Hierarchy::Inherited, p) if p > 0 => format!("{t}_c{p}"),
            _ => t.clone(),
        };
        let kind = if row.keep_kind { "keep" } else { "x" };
        inserts.push_str(&format!(
            "INSERT INTO {into} (id, part, kind, created_at) VALUES ({id}, {}, '{kind}', {literal});",
            row.part
        ));
        let covered = !(case.with_where && row.keep_kind);
        if covered && meant.is_some_and(|us| us < cutoff_us) {
            expect_deleted += 1;
        } else {
            expect_left.push(id);
        }
        if covered && meant.is_none() && row.special != Special::Null {
            expect_unreadable += 1;
        }
    }
    if !inserts.is_empty() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(inserts))
            .execute(&mut conn)
            .await
            .expect("insert");
    }

    let toml = format!(
        "[[database]]\nname = \"pg\"\nurl = \"{}\"\n\
         [[database.retention]]\ntable = \"{t}\"\ncolumn = \"created_at\"\nolder-than = \"{older}\"\n\
         epoch-unit = \"{}\"\nbatch-size = {}\nscan = \"{}\"\nschedule = \"manual\"\n{}{}",
        db.url,
        case.typ.unit().name(),
        case.batch,
        case.scan,
        if case.with_where { "where = \"kind <> 'keep'\"\n" } else { "" },
        case.column_zone
            .map(|z| format!("column-timezone = \"{z}\"\n"))
            .unwrap_or_default(),
    );
    let now = DateTime::from_timestamp_millis(case.now_ms).expect("now");
    let (planned, unreadable, deleted) = run_rule(&toml, now).await;

    let left: Vec<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM {t} ORDER BY id"
    )))
    .fetch_all(&mut conn)
    .await
    .expect("survivors");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {t} CASCADE")))
        .execute(&mut conn)
        .await
        .expect("drop");
    conn.close().await.expect("close");
    let left: Vec<i64> = left.into_iter().map(i64::from).collect();
    Expected {
        left: expect_left,
        deleted: expect_deleted,
        unreadable: expect_unreadable,
    }
    .matches(&left, planned, unreadable, deleted)
}

#[test]
fn postgres_survivors_match_the_oracle() {
    let rt = common::runtime();
    let db = common::PgDb::new("oracle");
    let n = std::sync::atomic::AtomicU32::new(0);
    runner()
        .run(&pg_case(), |case| {
            let n = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            rt.block_on(pg_case_run(&db, n, &case))
        })
        .expect("property");
}

#[test]
fn oracle_reads_wall_clocks_like_postgresql() {
    // The oracle's own rule, checked against the server once: an ambiguous New York
    // 01:30 on the fall-back night is the later instant (06:30Z).
    let ny = chrono_tz::America::New_York;
    let local = NaiveDate::from_ymd_opt(2026, 11, 1)
        .and_then(|d| d.and_hms_opt(1, 30, 0))
        .expect("date");
    let us = from_wall(ny, local);
    assert_eq!(
        DateTime::<Utc>::from_timestamp_micros(us as i64).map(|t| t.to_rfc3339()),
        Some("2026-11-01T06:30:00+00:00".to_owned())
    );
    let server = common::psql(
        &format!("{}/postgres", common::pg_server()),
        "SELECT extract(epoch FROM '2026-11-01 01:30'::timestamp AT TIME ZONE 'America/New_York')::bigint",
    );
    assert_eq!(server, (us / 1_000_000).to_string());
}

/// Adversary round 6, case 21: with dbkeeper's clock a year ahead of the server's, a
/// PostgreSQL rule deleted rows a day old. "Now" is the earlier of the two clocks:
/// for generated host-clock offsets (behind, ahead, far ahead) and row ages, exactly
/// the rows older than `older-than` by the earlier clock go, as the oracle says.
#[test]
fn postgres_retention_never_runs_on_a_host_clock_ahead_of_the_server() {
    let rt = common::runtime();
    let db = common::PgDb::new("clock");
    common::psql(
        &db.url,
        "CREATE TABLE ev (id int PRIMARY KEY, at timestamptz NOT NULL)",
    );
    let toml = format!(
        "[[database]]\nname = \"app\"\nurl = \"{}\"\n[[database.retention]]\ntable = \"ev\"\ncolumn = \"at\"\nolder-than = \"30d\"\nschedule = \"manual\"\n",
        db.url
    );
    let config = Config::parse(Path::new("clock.toml"), &toml).expect("config");
    let cfg = &config.databases[0];
    let job = RetentionJob::new(cfg.retention[0].clone(), None).expect("job");
    let day = 86_400i64;
    // Host-clock offsets in seconds: behind, equal, ahead by a little and a lot.
    let offsets = proptest::collection::vec(
        prop_oneof![
            Just(0i64),
            -400 * day..-day,
            -3600i64..3600,
            day..400 * day,
            Just(365 * day),
        ],
        6,
    );
    // Each case runs six jobs: a quarter of the oracle's case count is plenty.
    let mut runner = TestRunner::new(PropConfig {
        cases: (cases() / 4).max(4),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/proptest-regressions/retention_oracle.txt",
        ))),
        ..PropConfig::default()
    });
    runner
        .run(&offsets, |offsets| {
            rt.block_on(async {
                // Rows aged 1 to 60 days by the server's clock; the rule keeps 30.
                common::psql(
                    &db.url,
                    "TRUNCATE ev; INSERT INTO ev SELECT g, now() - g * interval '1 day' FROM generate_series(1, 60) g",
                );
                let handle = Database::open(cfg).expect("open");
                for offset in offsets {
                    let local = Utc::now() + chrono::Duration::seconds(offset);
                    job.run_with_clock(&handle, local, &CancellationToken::new())
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    // The oracle: by the earlier clock, a row of age `g` days
                    // (measured on the server) is expired when g - min(0, offset) > 30
                    // days, i.e. g > 30 + offset for a host clock behind.
                    let behind = offset.min(0);
                    let left: i64 = common::psql(&db.url, "SELECT count(*) FROM ev")
                        .parse()
                        .expect("count");
                    let oldest: i64 = common::psql(
                        &db.url,
                        "SELECT coalesce(max(id), 0) FROM ev",
                    )
                    .parse()
                    .expect("max");
                    // Survivors are always exactly ids 1..=oldest; nothing younger
                    // than 30 days by the server's clock (ids 1..=29) is ever gone.
                    prop_assert_eq!(left, oldest, "survivors are the youngest rows");
                    prop_assert!(oldest >= 29, "a row younger than 30 days was deleted (offset {offset}s)");
                    // And everything older than 30 days by the earlier clock is gone
                    // (a minute of slack for the test's own time).
                    let limit = (30 * day - behind + 60) / day;
                    prop_assert!(
                        oldest <= limit.max(30),
                        "rows expired by the earlier clock were left (offset {offset}s, oldest {oldest})"
                    );
                }
                handle.close().await;
                Ok(())
            })
        })
        .expect("property");
}

//! Where log lines go, and in what shape.
//!
//! - **journald** (systemd started us with stderr connected to the journal): structured
//!   entries through journald's native socket, with a real priority per level and the
//!   job's fields `JOB_ID`, `DATABASE`, `KIND` (from the runner's [`JOB_SPAN`]), so
//!   `journalctl -p warning -u dbkeeper` and `journalctl JOB_ID=app.backup` work. If the
//!   socket cannot be reached, text lines on stderr carrying a syslog priority prefix
//!   (`<3>`…`<7>`), which journald reads as the line's priority (systemd's
//!   `SyslogLevelPrefix=yes` default).
//! - **text** elsewhere: what a terminal or a plain log file wants, unchanged from before.
//! - **json** (`--log-format json`): one JSON object per line on stderr, for container
//!   log shippers, with the job's span fields under `span`.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing::Level;
use tracing_journald::{Priority, PriorityMappings};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::runner::JOB_SPAN;

/// The log format chosen on the command line (`--log-format`, `DBKEEPER_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; under journald, structured journal entries instead.
    #[default]
    Text,
    /// One JSON object per line, always on stderr (also under journald).
    Json,
}

/// Where the logs went, for [`print_error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Text,
    /// stderr is the journal's stream (whether or not the native socket is used).
    Journal,
    Json,
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

/// Prints a command's final error on stderr: `error: …`, in the shape of the logs
/// (see [`print_failure`]).
pub fn print_error(message: &str) {
    print_failure(&format!("error: {message}"));
}

/// Prints a line that says a command failed on stderr in the shape of the logs: as
/// is; a JSON object (level ERROR) under `--log-format json`; prefixed `<3>`
/// (priority *err*) when stderr is the journal.
pub fn print_failure(line: &str) {
    match OUTPUT.get().copied().unwrap_or(Output::Text) {
        Output::Text => eprintln!("{line}"),
        Output::Journal => eprintln!("<3>{line}"),
        Output::Json => tracing::error!("{line}"),
    }
}

/// Installs the global subscriber. `RUST_LOG` sets the level, e.g.
/// `RUST_LOG=dbkeeper=debug`.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tokio_cron_scheduler=warn"));
    let journal = format == LogFormat::Text && stderr_is_journal();
    let _ = OUTPUT.set(match (format, journal) {
        (LogFormat::Json, _) => Output::Json,
        (LogFormat::Text, true) => Output::Journal,
        (LogFormat::Text, false) => Output::Text,
    });
    let native = journal.then(journald).flatten();
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
    });
    let text = (format == LogFormat::Text && native.is_none()).then(|| {
        let base = tracing_subscriber::fmt::format()
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal());
        // journald stamps each line itself and reads the priority prefix.
        let layer = if journal {
            tracing_subscriber::fmt::layer()
                .event_format(Either::Prefixed(PriorityPrefix(base.without_time())))
        } else {
            tracing_subscriber::fmt::layer().event_format(Either::Plain(base))
        };
        // The job span's fields repeat what each runner event already says (`job=`);
        // hidden here so the text lines stay as they were.
        layer
            .with_writer(std::io::stderr)
            .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                !(m.is_span() && m.name() == JOB_SPAN)
            }))
    });
    // A second initialisation (tests calling this twice) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(native)
        .with(json)
        .with(text)
        .try_init();
}

/// The journal priority of a level: error 3, warn 4, info 6, debug and trace 7.
fn priority(level: &Level) -> Priority {
    match *level {
        Level::ERROR => Priority::Error,
        Level::WARN => Priority::Warning,
        Level::INFO => Priority::Informational,
        Level::DEBUG | Level::TRACE => Priority::Debug,
    }
}

/// journald's native protocol, if its socket answers.
fn journald() -> Option<tracing_journald::Layer> {
    let mappings = PriorityMappings {
        error: priority(&Level::ERROR),
        warn: priority(&Level::WARN),
        info: priority(&Level::INFO),
        debug: priority(&Level::DEBUG),
        trace: priority(&Level::TRACE),
    };
    tracing_journald::layer()
        .map(|layer| {
            layer
                // Unprefixed, so the span's job_id is JOB_ID (not F_JOB_ID): the names
                // an operator filters on with `journalctl JOB_ID=…`.
                .with_field_prefix(None)
                .with_priority_mappings(mappings)
                .with_syslog_identifier("dbkeeper".to_owned())
        })
        .ok()
}

/// True if stderr is the stream systemd connected to the journal: `JOURNAL_STREAM`
/// holds its `device:inode`. Compared rather than merely present, as sd_journal's
/// documentation advises: a child whose stderr was redirected inherits the variable.
fn stderr_is_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM")
        .is_some_and(|v| stream_is(v.to_str().unwrap_or(""), stderr_identity()))
}

/// True if `stream` (`JOURNAL_STREAM`'s value) names the file `identity` (device,
/// inode).
fn stream_is(stream: &str, identity: Option<(u64, u64)>) -> bool {
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    match (dev.parse::<u64>(), ino.parse::<u64>()) {
        (Ok(dev), Ok(ino)) => identity == Some((dev, ino)),
        _ => false,
    }
}

/// Device and inode of whatever stderr is open on.
fn stderr_identity() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Writes `<N>` (the syslog priority of the event's level) before each line.
struct PriorityPrefix<F>(F);

impl<S, N, F> FormatEvent<S, N> for PriorityPrefix<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let code = priority(event.metadata().level()) as u8 as char;
        write!(writer, "<{code}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// One layer type for both text shapes (with time, or prefixed without).
enum Either<A, B> {
    Plain(A),
    Prefixed(B),
}

impl<S, N, A, B> FormatEvent<S, N> for Either<A, B>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    A: FormatEvent<S, N>,
    B: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        match self {
            Either::Plain(f) => f.format_event(ctx, writer, event),
            Either::Prefixed(f) => f.format_event(ctx, writer, event),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_follow_syslog() {
        let codes: Vec<char> = [
            Level::ERROR,
            Level::WARN,
            Level::INFO,
            Level::DEBUG,
            Level::TRACE,
        ]
        .iter()
        .map(|l| priority(l) as u8 as char)
        .collect();
        assert_eq!(codes, ['3', '4', '6', '7', '7']);
    }

    #[test]
    fn journal_stream_must_name_the_file() {
        assert!(stream_is("64769:1234", Some((64769, 1234))));
        assert!(!stream_is("64769:1234", Some((64769, 1235))));
        assert!(!stream_is("64769:1234", None));
        assert!(!stream_is("", Some((0, 0))));
        assert!(!stream_is("0:x", Some((0, 0))));
    }
}

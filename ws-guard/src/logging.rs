//! Logging: every record (ours through the `log` macros, and the kernel programs' own, which
//! aya-log forwards through `log`) goes through tracing-log into tracing-subscriber, filtered by
//! `RUST_LOG` (default `info`), and out in one of three forms (`log_format`):
//!
//! - `text`: one line per record on stderr (`TIME LEVEL TARGET: MESSAGE`); a message that spans
//!   lines (an error quoting a TOML parser's caret block, say) has its line breaks replaced
//!   with `; `, so a line-oriented shipper never splits a record;
//! - `json`: one JSON object per line on stderr (JSON Lines): `timestamp`, `level`, `message`,
//!   `target`;
//! - `journald`: native journal records over `/run/systemd/journal/socket`: `MESSAGE`,
//!   `PRIORITY` from the level (error 3, warn 4, info 6, debug and trace 7), `TARGET` (the
//!   module), `CODE_FILE`, `CODE_LINE` and `SYSLOG_IDENTIFIER=ws-guard`.
//!
//! `auto` (the default) is `journald` when `JOURNAL_STREAM` names stderr's device and inode
//! (systemd sets it for a service whose stderr goes to the journal, see systemd.exec(5)), else
//! `text`. When the journal's socket cannot be used, journald falls back to text on stderr (said
//! once, as a warning when journald was asked for by name).

use std::{
    collections::HashMap,
    fmt, io,
    sync::{Mutex, OnceLock},
};

use serde::Deserialize;
use tracing::{
    Event, Level, Metadata, Subscriber,
    callsite::{Callsite, Identifier},
    field::{Field, FieldSet, Visit},
    metadata::Kind,
    subscriber::Interest,
};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::{
    EnvFilter, Layer as _,
    filter::LevelFilter,
    fmt::{
        FmtContext,
        format::{FormatEvent, FormatFields, Writer},
    },
    layer::{Context, SubscriberExt as _},
    registry::LookupSpan,
    util::SubscriberInitExt as _,
};

/// The journal's native socket (systemd-journald.service(8)).
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// `log_format` in the config file, `--log-format` of `ws-guard run`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald when systemd connected stderr to the journal (JOURNAL_STREAM), else text.
    #[default]
    Auto,
    /// One line of text per record on stderr.
    Text,
    /// One JSON object per record and line on stderr (JSON Lines).
    Json,
    /// Native journal records with priorities and fields.
    Journald,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Auto => "auto",
            LogFormat::Text => "text",
            LogFormat::Json => "json",
            LogFormat::Journald => "journald",
        })
    }
}

/// The form records are written in, once `auto` is decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
    Journald,
}

/// Whether `journal_stream` (the value of `JOURNAL_STREAM`, `DEVICE:INODE` in decimal) names the
/// file `stat` describes, as `(st_dev, st_ino)`.
pub fn names_stream(journal_stream: &str, stat: (u64, u64)) -> bool {
    let Some((dev, ino)) = journal_stream.trim().split_once(':') else {
        return false;
    };
    matches!((dev.parse::<u64>(), ino.parse::<u64>()), (Ok(d), Ok(i)) if (d, i) == stat)
}

/// stderr's `(st_dev, st_ino)`, if it is open.
fn stderr_stat() -> Option<(u64, u64)> {
    // SAFETY: fstat(2) writes a `struct stat` into the zeroed one given; fd 2 may be closed,
    // which it reports as an error.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return None;
    }
    Some((st.st_dev, st.st_ino))
}

/// Whether systemd connected stderr to the journal: `JOURNAL_STREAM` names it (a child that
/// inherits the variable but not the stream, e.g. one started with stderr redirected, does not
/// count).
pub fn stderr_is_journal() -> bool {
    match (std::env::var("JOURNAL_STREAM"), stderr_stat()) {
        (Ok(v), Some(stat)) => names_stream(&v, stat),
        _ => false,
    }
}

/// What `format` means here: `auto` decided from `stderr_is_journal`.
pub fn resolve(format: LogFormat, stderr_is_journal: bool) -> Output {
    match format {
        LogFormat::Auto if stderr_is_journal => Output::Journald,
        LogFormat::Auto | LogFormat::Text => Output::Text,
        LogFormat::Json => Output::Json,
        LogFormat::Journald => Output::Journald,
    }
}

/// `RUST_LOG`, or `info` when it is unset (an invalid directive is skipped, not fatal).
fn filter() -> EnvFilter {
    EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy()
}

/// Starts logging in `format` (see the module's documentation); what is in effect. Called once,
/// before anything logs (a second call changes nothing and returns what it would have chosen).
pub fn init(format: LogFormat) -> Output {
    let mut output = resolve(format, stderr_is_journal());
    let mut fell_back = None;
    let result = match output {
        Output::Journald => match tracing_journald::layer() {
            Ok(layer) => tracing_subscriber::registry()
                .with(
                    LogTargets::new(
                        layer
                            .with_field_prefix(None)
                            .with_syslog_identifier("ws-guard".into())
                            .with_priority_mappings(priorities()),
                    )
                    .with_filter(filter()),
                )
                .try_init(),
            Err(e) => {
                fell_back = Some(e);
                output = Output::Text;
                init_text()
            }
        },
        Output::Text => init_text(),
        Output::Json => tracing_subscriber::registry()
            .with(json_layer(io::stderr).with_filter(filter()))
            .try_init(),
    };
    if result.is_ok()
        && let Some(e) = fell_back
    {
        let why = format!(
            "the journal's socket {JOURNAL_SOCKET} cannot be used ({e}); logging text to \
             stderr"
        );
        if format == LogFormat::Journald {
            log::warn!("log_format = \"journald\": {why}");
        } else {
            log::debug!("log_format = \"auto\" chose journald (JOURNAL_STREAM), but {why}");
        }
    }
    output
}

/// Journal priorities of the levels: as syslog(3) means them (info is 6, not tracing-journald's
/// default of 5, "notice").
pub fn priorities() -> tracing_journald::PriorityMappings {
    use tracing_journald::Priority;
    tracing_journald::PriorityMappings {
        error: Priority::Error,
        warn: Priority::Warning,
        info: Priority::Informational,
        debug: Priority::Debug,
        trace: Priority::Debug,
    }
}

fn init_text() -> Result<(), tracing_subscriber::util::TryInitError> {
    tracing_subscriber::registry()
        .with(text_layer(io::stderr).with_filter(filter()))
        .try_init()
}

/// The text layer writing to `writer` (stderr; a buffer in the tests).
pub fn text_layer<S, W>(writer: W) -> impl tracing_subscriber::Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + 'static,
{
    tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .event_format(OneLine(tracing_subscriber::fmt::format().with_ansi(false)))
        .with_writer(writer)
}

/// The JSON Lines layer writing to `writer` (stderr; a buffer in the tests).
pub fn json_layer<S, W>(writer: W) -> impl tracing_subscriber::Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + 'static,
{
    tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .event_format(JsonLine)
        .with_writer(writer)
}

/// One JSON object per record and line: `timestamp` (RFC 3339, UTC, microseconds), `level`
/// (`ERROR`, `WARN`, `INFO`, `DEBUG`, `TRACE`), `target` (the module for records of the `log`
/// macros), `message`, then the event's other fields by name (none of ours has any).
pub struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let string = |s: &str| serde_json::Value::from(s).to_string();
        write!(
            writer,
            "{{\"timestamp\":\"{}\",\"level\":\"{}\",\"target\":{},\"message\":{}",
            humantime::format_rfc3339_micros(std::time::SystemTime::now()),
            meta.level(),
            string(meta.target()),
            string(&fields.message),
        )?;
        for (name, value) in &fields.other {
            write!(writer, ",{}:{value}", string(name))?;
        }
        writer.write_str("}\n")
    }
}

/// An event's fields for [`JsonLine`]: the message, and the others as JSON values (the `log.*`
/// fields tracing-log adds, which [`JsonLine`] reads through the normalized metadata, left out).
#[derive(Default)]
struct JsonFields {
    message: String,
    other: Vec<(&'static str, serde_json::Value)>,
}

impl JsonFields {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        match field.name() {
            "message" => {
                self.message = match value {
                    serde_json::Value::String(s) => s,
                    v => v.to_string(),
                }
            }
            name if name.starts_with("log.") => {}
            name => self.other.push((name, value)),
        }
    }
}

impl Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
}

/// Hands the records of the `log` macros to the inner layer (the journal's) as events of their
/// own target, file and line, with the message as their only field: tracing-log dispatches
/// them all from one callsite per level (target `log`, the real target in a `log.target` field),
/// so the journal would otherwise say `TARGET=log`. The metadata of each (target, level, file,
/// line) is made once and kept (at most [`LogTargets::MAX`]; past that, records go through as
/// they are).
pub struct LogTargets<L> {
    inner: L,
    made: Mutex<HashMap<MetaKey, &'static Metadata<'static>>>,
}

type MetaKey = (String, Level, Option<String>, Option<u32>);

/// The callsite of metadata made at run time (never registered: its events go to one layer
/// only, directly).
struct MadeCallsite(OnceLock<Metadata<'static>>);

impl Callsite for MadeCallsite {
    fn set_interest(&self, _: Interest) {}
    fn metadata(&self) -> &Metadata<'_> {
        self.0.get().expect("set when made")
    }
}

impl<L> LogTargets<L> {
    /// Distinct (target, level, file, line) kept at most: the log statements of a program.
    pub const MAX: usize = 4096;

    pub fn new(inner: L) -> Self {
        Self {
            inner,
            made: Mutex::new(HashMap::new()),
        }
    }

    fn metadata(&self, m: &Metadata<'_>) -> Option<&'static Metadata<'static>> {
        let key: MetaKey = (
            m.target().to_owned(),
            *m.level(),
            m.file().map(str::to_owned),
            m.line(),
        );
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(meta) = made.get(&key) {
            return Some(meta);
        }
        if made.len() >= Self::MAX {
            return None;
        }
        let leak = |s: &str| -> &'static str { Box::leak(s.to_owned().into_boxed_str()) };
        let callsite: &'static MadeCallsite = Box::leak(Box::new(MadeCallsite(OnceLock::new())));
        let target = leak(&key.0);
        let meta = Metadata::new(
            "log record",
            target,
            key.1,
            key.2.as_deref().map(leak),
            key.3,
            Some(target),
            FieldSet::new(&["message"], Identifier(callsite)),
            Kind::EVENT,
        );
        let meta = callsite.0.get_or_init(|| meta);
        made.insert(key, meta);
        Some(meta)
    }
}

/// The message of an event, as text.
#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_owned();
        }
    }
}

impl<S, L> tracing_subscriber::Layer<S> for LogTargets<L>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    L: tracing_subscriber::Layer<S>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        self.inner.on_new_span(attrs, id, ctx)
    }

    fn on_record(
        &self,
        span: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        self.inner.on_record(span, values, ctx)
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let made = event.normalized_metadata().and_then(|m| self.metadata(&m));
        let Some(meta) = made else {
            return self.inner.on_event(event, ctx);
        };
        let mut message = Message::default();
        event.record(&mut message);
        let Some(field) = meta.fields().field("message") else {
            return self.inner.on_event(event, ctx);
        };
        let values = [(&field, Some(&message.0 as &dyn tracing::Value))];
        let values = meta.fields().value_set(&values);
        self.inner.on_event(&Event::new(meta, &values), ctx)
    }
}

/// `text` with its line breaks replaced by `; ` (blank lines and trailing blanks dropped).
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
    {
        if !out.is_empty() {
            out.push_str("; ");
        }
        out.push_str(line);
    }
    out
}

/// An event format whose records are one line each: `F`'s output with inner line breaks
/// replaced by `; `.
pub struct OneLine<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for OneLine<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut record = String::new();
        self.0.format_event(ctx, Writer::new(&mut record), event)?;
        if record.trim_end().contains(['\n', '\r']) {
            record = one_line(&record);
        } else {
            record.truncate(record.trim_end().len());
        }
        writer.write_str(&record)?;
        writer.write_char('\n')
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn journal_stream_must_name_stderr() {
        assert!(names_stream("8:1234", (8, 1234)));
        assert!(names_stream("64769:42\n", (64769, 42)));
        assert!(!names_stream("8:1234", (8, 1235)));
        assert!(!names_stream("8:1234", (9, 1234)));
        for bad in ["", "8", "8:", ":1", "x:1", "8:1:2", "-1:2"] {
            assert!(!names_stream(bad, (8, 1)), "{bad:?}");
        }
    }

    #[test]
    fn auto_is_journald_only_on_the_journal() {
        assert_eq!(resolve(LogFormat::Auto, true), Output::Journald);
        assert_eq!(resolve(LogFormat::Auto, false), Output::Text);
        assert_eq!(resolve(LogFormat::Text, true), Output::Text);
        assert_eq!(resolve(LogFormat::Json, true), Output::Json);
        assert_eq!(resolve(LogFormat::Journald, false), Output::Journald);
    }

    #[test]
    fn one_line_joins_lines() {
        assert_eq!(one_line("a"), "a");
        assert_eq!(
            one_line("TOML parse error at line 1, column 5\n  |\n1 | x = \n  |     ^\nbad\n"),
            "TOML parse error at line 1, column 5;   |; 1 | x =;   |     ^; bad"
        );
        assert_eq!(one_line("x\r\n\r\ny\n"), "x; y");
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    #[test]
    fn text_records_are_one_line_each() {
        let buf = Buffer::default();
        let subscriber = tracing_subscriber::registry().with(text_layer(buf.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(
                "reload refused, the running limits stay: state.toml: TOML parse error\n  |\n1 \
                 | x\n  |  ^\nexpected `=`\n"
            );
            tracing::warn!("plain");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(
            lines[0].contains("ERROR")
                && lines[0].ends_with(
                    "reload refused, the running limits stay: state.toml: TOML parse error;   \
                     |; 1 | x;   |  ^; expected `=`"
                ),
            "{out}"
        );
        assert!(
            lines[1].contains("WARN") && lines[1].ends_with(": plain"),
            "{out}"
        );
        assert!(!out.contains('\x1b'), "no colours: {out}");
    }
}

//! Logging: text lines (the default) or one JSON object per line
//! (`log.format = "json"`, for journald and post-mortem tools), to stderr and,
//! with `log.dir`, to rotating files. Structured fields given to a log call
//! (`log::info!(request = id; "...")`) become JSON keys. A panic on any thread
//! is logged before the default hook runs, so it reaches the log files too.

use std::fmt::Write as _;

use flexi_logger::{
    Cleanup, Criterion, DeferredNow, Duplicate, FileSpec, Logger, LoggerHandle, Naming, WriteMode,
};
use serde_json::{Map, Value};

use crate::config::{Log, LogFormat};

pub fn init(log: &Log) -> Result<LoggerHandle, flexi_logger::FlexiLoggerError> {
    let format = match log.format {
        LogFormat::Text => text_format,
        LogFormat::Json => json_format,
    };
    let logger = Logger::try_with_env_or_str(&log.level)?.format(format);
    let logger = if log.dir.is_empty() {
        logger.log_to_stderr()
    } else {
        logger
            .log_to_file(
                FileSpec::default()
                    .directory(&log.dir)
                    .basename("inference-core"),
            )
            .rotate(
                Criterion::Size(log.rotate_mb * 1024 * 1024),
                Naming::Numbers,
                Cleanup::KeepLogFiles(log.keep_files),
            )
            .duplicate_to_stderr(Duplicate::All)
            .write_mode(WriteMode::Direct)
    };
    let handle = logger.start()?;
    install_panic_hook();
    Ok(handle)
}

/// Logs every panic (thread, message, place) before the default hook prints it.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let place = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        log::error!(thread = name, location = place.as_str(); "panic in thread {name} at {place}: {message}");
        default(info);
    }));
}

fn text_format(
    w: &mut dyn std::io::Write,
    now: &mut DeferredNow,
    record: &log::Record,
) -> std::io::Result<()> {
    write!(
        w,
        "{} {:<5} [{}] {}",
        now.format("%Y-%m-%dT%H:%M:%S%.3f"),
        record.level(),
        record.target(),
        record.args()
    )
}

fn json_format(
    w: &mut dyn std::io::Write,
    now: &mut DeferredNow,
    record: &log::Record,
) -> std::io::Result<()> {
    write!(
        w,
        "{}",
        json_line(&now.format_rfc3339().to_string(), record)
    )
}

/// One record as a JSON object: time, level, target, message, then its fields.
pub fn json_line(time: &str, record: &log::Record) -> String {
    let mut obj = Map::new();
    obj.insert("time".into(), time.into());
    obj.insert("level".into(), record.level().as_str().into());
    obj.insert("target".into(), record.target().into());
    obj.insert("message".into(), record.args().to_string().into());
    let mut fields = Fields(&mut obj);
    let _ = record.key_values().visit(&mut fields);
    Value::Object(obj).to_string()
}

/// Copies a record's key-values into a JSON object, numbers as numbers.
struct Fields<'a>(&'a mut Map<String, Value>);

impl<'kvs> log::kv::VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        let v = if let Some(n) = value.to_u64() {
            Value::from(n)
        } else if let Some(n) = value.to_i64() {
            Value::from(n)
        } else if let Some(f) = value.to_f64() {
            Value::from(f)
        } else if let Some(b) = value.to_bool() {
            Value::from(b)
        } else {
            let mut s = String::new();
            let _ = write!(s, "{value}");
            Value::from(s)
        };
        self.0.insert(key.as_str().to_owned(), v);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_with_fields_is_one_json_object() {
        let kvs: [(&str, log::kv::Value); 3] = [
            ("request", "r1".into()),
            ("tokens", 12u64.into()),
            ("ttft_ms", 3.5f64.into()),
        ];
        let line = json_line(
            "2026-01-01T00:00:00Z",
            &log::Record::builder()
                .level(log::Level::Info)
                .target("inference_core::engine")
                .args(format_args!("request r1 ended"))
                .key_values(&kvs)
                .build(),
        );
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "request r1 ended");
        assert_eq!(v["request"], "r1");
        assert_eq!(v["tokens"], 12);
        assert_eq!(v["ttft_ms"], 3.5);
        assert_eq!(v["time"], "2026-01-01T00:00:00Z");
    }
}

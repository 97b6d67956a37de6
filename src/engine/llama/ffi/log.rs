//! llama.cpp's log lines, routed into the `log` crate (target `llama.cpp`),
//! and the error lines of a model load collected to become its error.

use std::cell::RefCell;
use std::ffi::{CStr, c_char, c_void};

use llama_cpp_sys_2 as sys;

thread_local! {
    /// Partial log line: llama.cpp logs in fragments (GGML_LOG_LEVEL_CONT).
    static LOG_LINE: RefCell<(sys::ggml_log_level, String)> = const { RefCell::new((0, String::new())) };
    /// While a model loads on this thread, error lines are collected here to
    /// become the reason of a single `ModelLoad` error instead of log noise.
    static CAPTURE: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Runs `f` with llama.cpp's error lines collected instead of logged.
pub(super) fn capturing_errors<R>(f: impl FnOnce() -> R) -> (R, Vec<String>) {
    CAPTURE.with_borrow_mut(|c| *c = Some(Vec::new()));
    let result = f();
    let errors = CAPTURE.with_borrow_mut(|c| c.take()).unwrap_or_default();
    (result, errors)
}

pub(super) extern "C" fn log_callback(
    level: sys::ggml_log_level,
    text: *const c_char,
    _user: *mut c_void,
) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a valid NUL-terminated string for the duration of the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    LOG_LINE.with_borrow_mut(|(line_level, line)| {
        if level != sys::GGML_LOG_LEVEL_CONT {
            *line_level = level;
        }
        line.push_str(&text);
        while let Some(end) = line.find('\n') {
            let full: String = line.drain(..=end).collect();
            emit_log(*line_level, full.trim_end());
        }
    });
}

fn emit_log(level: sys::ggml_log_level, line: &str) {
    if line.is_empty() {
        return;
    }
    if level == sys::GGML_LOG_LEVEL_ERROR {
        let captured = CAPTURE.with_borrow_mut(|c| match c {
            Some(lines) => {
                lines.push(line.to_owned());
                true
            }
            None => false,
        });
        if captured {
            log::debug!(target: "llama.cpp", "{line}");
            return;
        }
    }
    let level = match level {
        sys::GGML_LOG_LEVEL_ERROR => log::Level::Error,
        sys::GGML_LOG_LEVEL_WARN => log::Level::Warn,
        sys::GGML_LOG_LEVEL_INFO => log::Level::Debug,
        _ => log::Level::Trace,
    };
    log::log!(target: "llama.cpp", level, "{line}");
}

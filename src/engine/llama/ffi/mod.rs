//! Our small safe wrapper over llama.cpp (through `llama-cpp-sys-2`).
//!
//! Every `unsafe` block of the project lives in this module and its files
//! (`model`, `context`, `sampler`, `log`), each with a `SAFETY:` comment. The types here own
//! llama.cpp objects and free them on `Drop`; null pointers and negative return
//! codes become typed errors at this boundary, so the engine never sees a raw
//! pointer or a bare integer. A `Context` borrows its `Model`, so the model can
//! never be freed first, and neither type is `Send`: both are created and dropped
//! on the engine thread.

#![allow(unsafe_code)]

mod context;
mod log;
mod model;
mod sampler;

pub use context::{Batch, Context, ContextParams};
pub use model::{Model, ModelParams, Vocab};
pub use sampler::Sampler;

use std::ffi::CStr;
use std::sync::Once;

use llama_cpp_sys_2 as sys;

/// Initialises the llama.cpp backend once per process and routes its logs into
/// the `log` crate (target `llama.cpp`).
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // SAFETY: `log_callback` is a plain `extern "C"` function valid for the
        // whole process and ignores its user-data pointer, which may be null.
        unsafe { sys::llama_log_set(Some(log::log_callback), std::ptr::null_mut()) };
        // SAFETY: called once, before any other llama.cpp call, as llama.h asks.
        unsafe { sys::llama_backend_init() };
    });
}

/// Ends the process at once with `code`, without running exit handlers (see
/// `ops::watchdog::ExitNow` for why).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` only ends the process; it touches no Rust state and
    // never returns. Log lines were written directly (unbuffered) before it.
    unsafe { libc::_exit(code) }
}

/// Gives the calling thread the lowest CPU priority (nice 19), so that
/// work it does in the background yields to decoding; false where the
/// system refuses, and off Linux, where the same call would lower the
/// whole process.
pub fn lower_thread_priority() -> bool {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only reads its integer arguments; on Linux `who`
    // 0 with PRIO_PROCESS names the calling thread.
    return unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) == 0 };
    #[cfg(not(target_os = "linux"))]
    false
}

/// llama.cpp's version (its build number and commit).
pub fn version() -> String {
    // SAFETY: returns a pointer to a static, NUL-terminated string owned by llama.cpp.
    unsafe { CStr::from_ptr(sys::llama_version()) }
        .to_string_lossy()
        .into_owned()
}

/// llama.cpp's description of the CPU features ggml was built with
/// (e.g. "CPU : SSE3 = 1 | AVX2 = 1 | FMA = 1 ...").
pub fn system_info() -> String {
    // SAFETY: returns a pointer to a static, NUL-terminated string owned by llama.cpp.
    unsafe { CStr::from_ptr(sys::llama_print_system_info()) }
        .to_string_lossy()
        .trim()
        .to_owned()
}

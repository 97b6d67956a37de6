//! The engine: one thread that owns the model and turns requests into token
//! events, many sequences at once (continuous batching).
//!
//! `supervisor` starts the thread and loads, parks and wakes the model;
//! `step` is the loop that serves requests over a `Backend` (the seam in
//! `backend`; llama.cpp implements it in `llama`, a fake in the unit tests);
//! `planner`, `scheduler`, `kv`, `prefix`, `host_cache` and `speculate` decide, sans-I/O,
//! what each step does. Requests come in and events go out through `channel`; heartbeat,
//! thermal pause and parking go through `Hooks`, which the ops layer implements. Each request
//! carries an abort flag that the server sets; the engine checks it before
//! every step and while a decode runs. With no work the thread blocks on its
//! channel and uses no CPU.

pub mod backend;
mod channel;
mod cpu_share;
#[cfg(test)]
mod fake;
pub mod guide;
mod hooks;
pub mod host_cache;
pub mod kv;
#[cfg(feature = "llama")]
pub mod llama;
pub mod logits;
pub mod persist;
pub mod planner;
pub mod prefix;
mod prompt;
pub mod scheduler;
mod sequence;
pub mod snapshot;
pub mod speculate;
mod step;
mod supervisor;
pub mod template;
#[cfg(test)]
mod tests;
pub mod text;
pub mod threads;

pub use channel::{Command, EventSink, EventSource, events};
pub use hooks::Hooks;
pub use step::{EngineConfig, StateConfig};
pub use supervisor::{EngineHandle, Ready, spawn};

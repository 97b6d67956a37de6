//! inference-core: serves one llama.cpp model to real-time clients, streaming
//! every token the moment it is sampled.
//!
//! Layers, each depending only on those before it:
//! - `core`: the domain (requests, sampling parameters, outcomes, events,
//!   status), free of I/O and wire formats;
//! - `config`: settings, defaults < TOML file < flags;
//! - `engine`: the thread that owns the model: supervisor, step loop, step
//!   planner, scheduler, KV pages, prefix cache, and llama.cpp behind the
//!   `Backend` seam (`engine::llama`, the only module with `unsafe`);
//! - `ops`: heartbeat, watchdog, metrics, sensors, thermal throttle, VRAM
//!   plan; it implements the engine's `Hooks`;
//! - `http1`: the HTTP/1.1 codec (heads, bodies) the server and the upstream
//!   client share;
//! - `pool`: the workers behind the server (engines in this process,
//!   upstream OpenAI-compatible servers), routing, failover and supervision;
//! - `server`: the mio reactor, connections, one session per protocol
//!   (WebSocket v1), the request table and plain HTTP routes;
//! - `app`: builds the parts from a `Config` and runs them.
//!
//! Without the default `llama` feature the crate builds without compiling
//! llama.cpp (for the fuzz targets and micro-benches): everything but
//! `engine::llama` and `app`.

#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

#[cfg(feature = "llama")]
pub mod app;
pub mod config;
pub mod core;
pub mod engine;
pub mod http1;
pub mod logging;
pub mod ops;
pub mod pool;
pub mod server;

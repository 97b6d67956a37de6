//! inference-core: serves one llama.cpp model to WebSocket clients, streaming
//! every token the moment it is sampled.
//!
//! The main thread runs the mio reactor (`reactor`, `connection`); the engine
//! thread owns llama.cpp (`engine`, through the `llama` wrapper). They talk
//! through crossbeam channels and a `mio::Waker`. `protocol` and `text` are
//! sans-I/O and tested without sockets or a model.

mod config;
mod connection;
mod engine;
mod kv;
mod llama;
mod metrics;
mod monitor;
mod ops;
mod prefix;
mod protocol;
mod reactor;
mod scheduler;
mod text;
mod thermal;
mod vram;
mod watchdog;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use flexi_logger::{
    Cleanup, Criterion, DeferredNow, Duplicate, FileSpec, Logger, LoggerHandle, Naming, WriteMode,
};

use crate::config::{Cli, Config};
use crate::engine::{EngineConfig, EventSink};
use crate::ops::Ops;
use crate::reactor::Reactor;

fn main() -> ExitCode {
    let cli = Cli::from_env();
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("inference-core: error: {e}");
            return ExitCode::from(2);
        }
    };
    let _logger = match init_logging(&config.log) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("inference-core: error: cannot start logging: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: &Config) -> anyhow::Result<()> {
    raise_file_limit(config.server.max_connections);
    let addr = format!("{}:{}", config.server.host, config.server.port);
    let listener =
        std::net::TcpListener::bind(&addr).with_context(|| format!("cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;

    let poll = mio::Poll::new()?;
    let waker = Arc::new(mio::Waker::new(poll.registry(), reactor::WAKER)?);
    let armed = Arc::new(AtomicBool::new(false));
    let (event_tx, event_rx) = crossbeam_channel::unbounded();
    let monitor = monitor::spawn(&config.monitor, &config.thermal)?;
    let ops = Arc::new(Ops::new(
        monitor,
        config.idle.clone(),
        watchdog::Fault::from_env(),
    ));
    let engine_config = EngineConfig {
        model_path: config.model_path(),
        n_ctx: config.model.ctx_size,
        n_batch: config.model.batch_size,
        threads: config.threads(),
        n_gpu_layers: vram::gpu_layers(config),
        repack: config.model.weight_repack,
        slots: config.scheduler.slots,
        page_size: config.scheduler.page_size,
        queue_limit: config.scheduler.max_queue,
        cache_entries: config.scheduler.prefix_cache_entries,
        prefill_chunk: config.scheduler.prefill_chunk,
        chat_template: config.chat_template(),
        ops: ops.clone(),
    };
    let (engine, ready) = engine::spawn(
        engine_config,
        EventSink::new(event_tx, waker.clone(), armed.clone()),
    )?;

    let listener = mio::net::TcpListener::from_std(listener);
    let reactor = Reactor::new(
        poll,
        listener,
        event_rx,
        armed,
        engine,
        ready,
        ops.clone(),
        config,
    )?;
    watchdog::spawn(&config.watchdog, ops, move || {
        let _ = waker.wake();
    })?;
    if let Some(addr) = reactor.local_addr() {
        log::info!("listening on ws://{addr}");
    }
    watchdog::notify_ready();
    reactor.run()
}

/// Every connection is a file descriptor: lift the soft limit to the hard one
/// and say so when even that is below what `max_connections` needs.
fn raise_file_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            log::debug!("open file limit: {limit}");
            if limit < max_connections as u64 + 64 {
                log::warn!(
                    "the open file limit ({limit}) is below server.max_connections ({max_connections}) plus the server's own files"
                );
            }
        }
        Err(e) => log::warn!("cannot raise the open file limit: {e}"),
    }
}

fn init_logging(log: &config::Log) -> Result<LoggerHandle, flexi_logger::FlexiLoggerError> {
    let logger = Logger::try_with_env_or_str(&log.level)?.format(log_format);
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
    logger.start()
}

fn log_format(
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

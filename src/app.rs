//! The composition root: builds the monitor, the engine (llama.cpp), the
//! reactor and the watchdog from a `Config`, and runs the reactor on the
//! calling thread until shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::config::Config;
use crate::engine::guide::GuideLimits;
use crate::engine::llama::{self, LlamaConfig, LlamaLoader};
use crate::engine::{self, EngineConfig, StateConfig};
use crate::ops::{Ops, fault, monitor, vram, watchdog};
use crate::server::auth::{self, ApiKeys};
use crate::server::reactor::{self, Parts, Reactor};

pub fn run(config: &Config) -> anyhow::Result<()> {
    raise_file_limit(config.server.max_connections);
    let keys = api_keys(&config.server)?;
    let addr = format!("{}:{}", config.server.host, config.server.port);
    let listener =
        std::net::TcpListener::bind(&addr).with_context(|| format!("cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;

    let poll = mio::Poll::new()?;
    let waker = Arc::new(mio::Waker::new(poll.registry(), reactor::WAKER)?);
    let monitor = monitor::spawn(&config.monitor, &config.thermal)?;
    let ops = Arc::new(Ops::new(
        monitor,
        config.idle.clone(),
        fault::Fault::from_env(),
    ));
    let s = &config.scheduler;
    let loader = LlamaLoader::new(LlamaConfig {
        model_path: config.model_path(),
        n_ctx: config.model.ctx_size,
        n_batch: config.model.batch_size,
        n_seq_max: (s.slots + s.prefix_cache_entries) as u32,
        threads: config.threads(),
        n_gpu_layers: vram::gpu_layers(config),
        repack: config.model.weight_repack,
        chat_template: config.chat_template(),
        constraints: config.constraints.enabled,
    });
    log::info!(
        "llama.cpp {}, system info: {}",
        llama::version(),
        llama::system_info()
    );
    let engine_config = EngineConfig {
        n_batch: config.model.batch_size as usize,
        slots: s.slots,
        page_size: s.page_size,
        queue_limit: s.max_queue,
        cache_entries: s.prefix_cache_entries,
        prefill_chunk: s.prefill_chunk.max(1),
        itl_target_ms: (s.itl_target_ms > 0.0).then_some(s.itl_target_ms),
        park_keep_bytes: config.idle.keep_prefixes_mb << 20,
        guide_limits: GuideLimits {
            max_bytes: config.constraints.max_bytes,
            compile_ms: config.constraints.compile_ms,
        },
        state: config.state_dir().map(|dir| StateConfig {
            dir,
            max_bytes: config.state.max_mb << 20,
            save_every: Duration::from_secs_f64(config.state.save_every_s),
        }),
    };
    let wake = waker.clone();
    let (sink, events) = engine::events(move || {
        if let Err(e) = wake.wake() {
            log::error!("cannot wake the reactor: {e}");
        }
    });
    let (engine, ready) = engine::spawn(loader, engine_config, ops.clone(), sink)?;

    let parts = Parts {
        poll,
        listener: mio::net::TcpListener::from_std(listener),
        engine,
        events,
        ready,
        ops: ops.clone(),
        exit_now: llama::exit_now,
        keys,
    };
    let reactor = Reactor::new(parts, config)?;
    let wake = move || {
        let _ = waker.wake();
    };
    watchdog::spawn(&config.watchdog, ops, wake, llama::exit_now)?;
    if let Some(addr) = reactor.local_addr() {
        log::info!("listening on ws://{addr}");
    }
    watchdog::notify_ready();
    reactor.run()
}

/// The API keys from the config and the key file; says when there are none.
fn api_keys(server: &crate::config::Server) -> anyhow::Result<ApiKeys> {
    let mut keys = server.api_keys.clone();
    if !server.api_key_file.is_empty() {
        let path = std::path::Path::new(&server.api_key_file);
        keys.extend(
            auth::read_key_file(path)
                .with_context(|| format!("cannot read the API key file {}", path.display()))?,
        );
    }
    let keys = ApiKeys::new(keys);
    let loopback = server.host == "localhost"
        || server
            .host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if keys.is_empty() && loopback {
        log::info!("no API keys set: no authentication (only this machine can connect)");
    } else if keys.is_empty() {
        log::warn!(
            "no API keys set: every client that reaches {} may use the model (no authentication); see --api-key",
            server.host
        );
    } else {
        log::info!(
            "API keys: {} (every route but /health needs one)",
            keys.len()
        );
    }
    Ok(keys)
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

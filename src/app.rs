//! The composition root: builds the monitor, the worker pool (llama.cpp
//! engines, upstream servers), the reactor and the watchdog from a
//! `Config`, and runs the reactor on the calling thread until shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::config::{Config, LlamaWorker, WorkerConfig};
use crate::engine::guide::GuideLimits;
use crate::engine::llama::{self, LlamaConfig, LlamaLoader};
use crate::engine::{EngineConfig, Ready, StateConfig, scheduler};
use crate::ops::{Ops, fault, monitor, vram, watchdog};
use crate::pool::local::{LocalHooks, LocalStates, LocalWorker};
use crate::pool::supervise::Floor;
use crate::pool::upstream::http::Target;
use crate::pool::upstream::{UpstreamConfig, UpstreamWorker};
use crate::pool::worker::Worker;
use crate::pool::{Entry, Pool, Restart, Supervision};
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
    log::info!(
        "llama.cpp {}, system info: {}",
        llama::version(),
        llama::system_info()
    );
    let (pool, ready) = build_pool(config, &ops, &waker)?;

    let parts = Parts {
        poll,
        listener: mio::net::TcpListener::from_std(listener),
        pool,
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

/// The workers: the engine of `[model]` ("local") unless `[[workers]]`
/// lists llama workers or `--no-local` says none, then each listed worker.
/// Every local engine is started (its model loaded) before the server
/// listens; upstreams are probed from their own threads.
fn build_pool(
    config: &Config,
    ops: &Arc<Ops>,
    waker: &Arc<mio::Waker>,
) -> anyhow::Result<(Pool, Ready)> {
    let mut locals: Vec<LlamaWorker> = config
        .workers
        .iter()
        .filter_map(|w| match w {
            WorkerConfig::Llama(l) => Some(l.clone()),
            WorkerConfig::Openai(_) => None,
        })
        .collect();
    if config.local_engine() {
        locals.insert(
            0,
            LlamaWorker {
                name: "local".into(),
                ..LlamaWorker::default()
            },
        );
    }
    // With no workers listed: today's one engine, which the watchdog covers.
    let pooled = !config.workers.is_empty();
    ops.pooled
        .store(pooled, std::sync::atomic::Ordering::Relaxed);
    let states = LocalStates::new(locals.len());
    let stall = Duration::from_secs_f64(config.watchdog.stall_s);
    let mut entries = Vec::new();
    let mut ready = None;
    for (index, worker) in locals.iter().enumerate() {
        let start = local_starter(config, worker, index, ops, &states, waker, stall);
        let (first, r) = start().with_context(|| format!("cannot start worker {}", worker.name))?;
        ready.get_or_insert(r);
        let restart: Option<Restart> = pooled.then(|| {
            Arc::new(move || {
                start()
                    .map(|(w, _)| Box::new(w) as Box<dyn Worker>)
                    .map_err(|e| e.to_string())
            }) as Restart
        });
        entries.push(Entry {
            name: worker.name.clone(),
            worker: Box::new(first),
            restart,
        });
    }
    for w in &config.workers {
        let WorkerConfig::Openai(o) = w else {
            continue;
        };
        let wake = waker.clone();
        let upstream = UpstreamWorker::spawn(
            UpstreamConfig {
                name: o.name.clone(),
                url: o.url.clone(),
                target: Target::parse(&o.url)
                    .map_err(|e| anyhow::anyhow!("workers {:?}: {e}", o.name))?,
                model: o.model.clone(),
                api_key: o.api_key.clone(),
                max_inflight: o.max_inflight,
                max_queue: config.scheduler.max_queue,
                timeout: Duration::from_secs_f64(o.timeout_s),
                probe_every: Duration::from_secs_f64(o.probe_every_s),
                probe_timeout: Duration::from_secs_f64(o.probe_timeout_s),
            },
            move || {
                let _ = wake.wake();
            },
        )
        .with_context(|| format!("cannot start worker {}", o.name))?;
        entries.push(Entry {
            name: o.name.clone(),
            worker: Box::new(upstream),
            restart: None,
        });
    }
    // With upstreams only, the front tells clients what its config says.
    let ready = ready.unwrap_or_else(|| Ready {
        model_name: config
            .workers
            .iter()
            .find_map(|w| match w {
                WorkerConfig::Openai(o) if !o.model.is_empty() => Some(o.model.clone()),
                _ => None,
            })
            .unwrap_or_else(|| "upstream".into()),
        n_ctx: config.model.ctx_size as usize,
        chat: true,
    });
    if pooled {
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        log::info!(
            "worker pool: {} ({:?} routing)",
            names.join(", "),
            config.pool.routing
        );
    }
    let supervision = Supervision {
        enabled: pooled,
        floor: Floor {
            min_tps: config.watchdog.min_tps,
            window: Duration::from_secs_f64(config.watchdog.slow_window_s),
        },
    };
    Ok((Pool::new(entries, config.pool.routing, supervision), ready))
}

/// What starts (and restarts) one local engine.
fn local_starter(
    config: &Config,
    worker: &LlamaWorker,
    index: usize,
    ops: &Arc<Ops>,
    states: &Arc<LocalStates>,
    waker: &Arc<mio::Waker>,
    stall: Duration,
) -> impl Fn() -> anyhow::Result<(LocalWorker, Ready)> + Send + Sync + 'static {
    let s = &config.scheduler;
    let slots = if worker.slots > 0 {
        worker.slots
    } else {
        s.slots
    };
    let n_ctx = if worker.ctx_size > 0 {
        worker.ctx_size
    } else {
        config.model.ctx_size
    };
    // The worker's own layer count, planned as `[model]`'s would be, for
    // its own context (its KV cache is part of the plan).
    let mut own = config.clone();
    own.model.ctx_size = n_ctx;
    if let Some(layers) = worker.n_gpu_layers {
        own.model.n_gpu_layers = layers;
    }
    let n_gpu_layers = vram::gpu_layers(&own);
    let llama_config = LlamaConfig {
        model_path: config.model_path(),
        n_ctx,
        n_batch: config.model.batch_size,
        n_seq_max: scheduler::n_seq_max(slots, s.prefix_cache_entries) as u32,
        threads: if worker.threads > 0 {
            worker.threads
        } else {
            config.threads()
        },
        n_gpu_layers,
        repack: config.model.weight_repack,
        chat_template: config.chat_template(),
        constraints: config.constraints.enabled,
    };
    // The first local engine keeps the state directory; others a folder each.
    let state_dir = config
        .state_dir()
        .map(|d| if index == 0 { d } else { d.join(&worker.name) });
    let engine_config = EngineConfig {
        n_batch: config.model.batch_size as usize,
        slots,
        page_size: s.page_size,
        queue_limit: s.max_queue,
        cache_entries: s.prefix_cache_entries,
        host_cache_bytes: s.prefix_cache_host_mb << 20,
        prefill_chunk: s.prefill_chunk.max(1),
        itl_target_ms: (s.itl_target_ms > 0.0).then_some(s.itl_target_ms),
        // The tile rule is the CPU's flash attention's; offloaded layers
        // attend on the GPU, where larger steps pay.
        mixed_rows: if n_gpu_layers == 0 {
            crate::engine::planner::CPU_MIXED_ROWS
        } else {
            config.model.batch_size as usize
        },
        output_tile: if n_gpu_layers == 0 && config.model.weight_repack {
            crate::engine::planner::CPU_OUTPUT_TILE
        } else {
            1
        },
        speculate: crate::engine::speculate::Settings {
            max_draft: s.draft_max,
            min_match: s.draft_min_match,
        },
        park_keep_bytes: config.idle.keep_prefixes_mb << 20,
        guide_limits: GuideLimits {
            max_bytes: config.constraints.max_bytes,
            compile_ms: config.constraints.compile_ms,
        },
        state: state_dir.map(|dir| StateConfig {
            dir,
            max_bytes: config.state.max_mb << 20,
            save_every: Duration::from_secs_f64(config.state.save_every_s),
        }),
    };
    let (ops, states, waker) = (ops.clone(), states.clone(), waker.clone());
    move || {
        let hooks = Arc::new(LocalHooks::new(ops.clone(), states.clone(), index));
        let wake = waker.clone();
        let started = LocalWorker::spawn(
            LlamaLoader::new(llama_config.clone()),
            engine_config.clone(),
            hooks,
            stall,
            move || {
                if let Err(e) = wake.wake() {
                    log::error!("cannot wake the reactor: {e}");
                }
            },
        )?;
        Ok(started)
    }
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

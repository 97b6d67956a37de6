//! The engine thread's supervisor: it loads the model through a `Loader`,
//! opens a backend and runs the step loop until the engine parks (the backend
//! is dropped and its KV memory released; the next request opens a new one)
//! or stops. `spawn` starts it; `EngineHandle` is the server's side.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::Sender;

use crate::core::{EngineState, Event, Request, RequestError, Status};
use crate::engine::backend::{Backend, BackendError, Loader};
use crate::engine::channel::{Command, EventSink};
use crate::engine::hooks::Hooks;
use crate::engine::persist::Store;
use crate::engine::snapshot::Prefix;
use crate::engine::step::{Engine, EngineConfig, Exit, Io};

/// What the server needs to know once the model is loaded.
#[derive(Debug, Clone)]
pub struct Ready {
    pub model_name: String,
    pub n_ctx: usize,
    /// Whether `messages` can be rendered (the model has a chat template).
    pub chat: bool,
}

pub struct EngineHandle {
    commands: Sender<Command>,
    /// Refreshed by the engine after every step.
    status: Arc<Mutex<Status>>,
    shutdown: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl EngineHandle {
    /// Hands a request to the engine; gives it back if the engine is gone.
    pub fn submit(&self, req: Request) -> Result<(), Box<Request>> {
        self.commands
            .send(Command::Submit(Box::new(req)))
            .map_err(|e| match e.0 {
                Command::Submit(req) => req,
                Command::Shutdown => unreachable!(),
            })
    }

    /// Stops the engine, aborting the decode in progress.
    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
        let _ = self.commands.send(Command::Shutdown);
    }

    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The thread has ended (normally only after `stop`).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }
}

/// Starts the engine thread and waits until the model is loaded (or failed to).
pub fn spawn<L>(
    loader: L,
    config: EngineConfig,
    hooks: Arc<dyn Hooks>,
    sink: EventSink,
) -> Result<(EngineHandle, Ready), BackendError>
where
    L: Loader + Send + 'static,
{
    let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let io = Io {
        sink,
        commands: cmd_rx,
        shutdown: Arc::new(AtomicBool::new(false)),
        status: Arc::new(Mutex::new(Status::default())),
        hooks,
    };
    let (shutdown, status) = (io.shutdown.clone(), io.status.clone());
    let thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || supervise(&loader, &config, &io, ready_tx))
        .expect("cannot spawn the engine thread");
    match ready_rx.recv() {
        Ok(Ok(ready)) => Ok((
            EngineHandle {
                commands: cmd_tx,
                status,
                shutdown,
                thread,
            },
            ready,
        )),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(BackendError::Context(
                "the engine thread died while loading".into(),
            ))
        }
    }
}

/// The engine thread: load, open, serve; on park release the backend (and
/// with `idle.unload_model` the model) and wait for the request that wakes it.
fn supervise<L: Loader>(
    loader: &L,
    config: &EngineConfig,
    io: &Io,
    ready: Sender<Result<Ready, BackendError>>,
) {
    let hooks = &io.hooks;
    let mut held = Held {
        ready: Some(ready),
        model: None,
        kept: Vec::new(),
        store: None,
    };
    // The request that woke a parked engine.
    let mut waking: Option<Box<Request>> = None;
    loop {
        match serve_once(loader, config, io, &mut held, waking.take()) {
            Ok(Exit::Stopped) => break,
            Ok(Exit::Park) => hooks.parked(),
            Err((e, waking)) => match (held.ready.take(), waking) {
                (Some(tx), _) => {
                    let _ = tx.send(Err(e));
                    return;
                }
                (None, Some(req)) => {
                    log::error!("cannot wake the engine: {e}");
                    io.sink.send(Event::Error {
                        key: req.key,
                        error: RequestError::WakeFailed(e.to_string()),
                    });
                    io.sink.wake();
                }
                (None, None) => log::error!("cannot reopen the engine: {e}"),
            },
        }
        if hooks.unload_on_park() {
            held.model = None;
        }
        // Parked (or a wake-up failed): the next request wakes the engine.
        hooks.set_state(EngineState::Parked);
        match io.commands.recv() {
            Ok(Command::Submit(req)) => {
                hooks.set_state(EngineState::Waking);
                waking = Some(req);
            }
            Ok(Command::Shutdown) | Err(_) => break,
        }
    }
    io.sink.send(Event::Stopped);
    io.sink.wake();
    log::info!("engine stopped");
}

/// What the supervisor keeps from one opening of the backend to the next.
struct Held<L: Loader> {
    /// Answered once, at start-up; later (re)loads happen when waking from idle.
    ready: Option<Sender<Result<Ready, BackendError>>>,
    model: Option<L::Model>,
    /// Cached prefixes kept while parked (or loaded at start-up).
    kept: Vec<Prefix>,
    /// The state directory, once the model's binding is known.
    store: Option<Store>,
}

/// Loads the model if needed, opens a backend and serves until it parks or
/// stops. On failure the waking request comes back with the error.
fn serve_once<L: Loader>(
    loader: &L,
    config: &EngineConfig,
    io: &Io,
    held: &mut Held<L>,
    waking: Option<Box<Request>>,
) -> Result<Exit, (BackendError, Option<Box<Request>>)> {
    let Held {
        ready,
        model,
        kept,
        store,
    } = held;
    if model.is_none() {
        match loader.load() {
            Ok(m) => {
                log::info!("{}", loader.describe(&m));
                *model = Some(m);
            }
            Err(e) => return Err((e, waking)),
        }
    }
    let m = model.as_ref().expect("loaded above");
    let backend = match loader.open(m) {
        Ok(b) => b,
        Err(e) => return Err((e, waking)),
    };
    if let Some(tx) = ready.take() {
        let n_ctx = backend.n_ctx();
        log::info!(
            "context {n_ctx} tokens, {} slots, KV pages of {} cells",
            config.slots,
            config.page_size
        );
        let _ = tx.send(Ok(Ready {
            model_name: loader.model_name(),
            n_ctx,
            chat: backend.has_chat_template(),
        }));
    }
    if store.is_none()
        && let Some(s) = &config.state
    {
        // The first start: what the last run saved comes back like a park's.
        let binding = format!("{}; page {}", loader.binding(m), config.page_size);
        let saved = Store::new(s.dir.clone(), binding, s.max_bytes);
        *kept = saved.load();
        log::info!("{} saved prefixes found in {}", kept.len(), s.dir.display());
        *store = Some(saved);
    }
    let mut engine = Engine::new(backend, config, io, store.as_ref());
    if !kept.is_empty() {
        let (count, t0) = (kept.len(), Instant::now());
        let restored = engine.restore_prefixes(std::mem::take(kept));
        log::info!(
            "restored {restored} of {count} cached prefixes in {:.1} ms",
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    if let Some(req) = waking {
        io.hooks.woke(req.received.elapsed());
        io.hooks.set_state(EngineState::Busy);
        engine.submit(*req);
    }
    let exit = engine.serve();
    if exit == Exit::Stopped {
        engine.persist();
        engine.finish_saving();
    }
    if exit == Exit::Park && config.park_keep_bytes > 0 {
        let t0 = Instant::now();
        *kept = engine.save_prefixes(config.park_keep_bytes);
        log::info!(
            "kept {} cached prefixes ({:.1} MB) in memory while parked, saved in {:.1} ms",
            kept.len(),
            kept.iter().map(Prefix::bytes).sum::<usize>() as f64 / 1e6,
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(exit)
}

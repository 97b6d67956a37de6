//! An upstream worker: an OpenAI-compatible server (vLLM, TGI,
//! TensorRT-LLM, llama-server, another inference-core) reached over HTTP.
//!
//! One small I/O thread per upstream with a mio loop of its own drives every
//! connection to it: one per request (streamed with server-sent events) and
//! one for the health probe. It was chosen over driving them from the
//! reactor so that events reach the reactor the way an engine's do (one
//! channel, one wake-up per batch) and a slow or frozen upstream can never
//! cost the reactor a syscall. Requests beyond `max_inflight` wait in its
//! queue, highest priority first.
//!
//! Health: `GET /health` every `probe_every` while up; one that fails or
//! does not answer within `probe_timeout` marks it down, and so does a
//! refused or reset connection once the probe confirms it. Down, it fails
//! every request it holds with `WorkerFailed` (the pool sends those that
//! produced nothing to another worker) and probes with backoff until the
//! upstream answers again.

mod conn;
pub mod http;
mod io_thread;
pub mod openai;

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use mio::{Poll, Token, Waker};

use crate::core::{Event, Request, RequestKey, Status};
use crate::engine::{self, EventSource};
use crate::pool::worker::{Health, Kind, Worker};
use http::Target;
use io_thread::Io;

/// The I/O thread's waker: commands are waiting.
const WAKER: Token = Token(usize::MAX);

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub url: String,
    pub target: Target,
    /// Sent as `model`; empty: left out (the upstream serves its only one).
    pub model: String,
    pub api_key: String,
    pub max_inflight: usize,
    pub max_queue: usize,
    /// A request whose stream sends nothing for this long fails.
    pub timeout: Duration,
    pub probe_every: Duration,
    pub probe_timeout: Duration,
}

enum Command {
    Submit(Box<Request>),
    /// The pool has taken these elsewhere or ended them: drop them unsaid.
    Release(Vec<RequestKey>),
    Nudge,
    Stop,
}

/// What the I/O thread publishes.
struct Shared {
    health: Mutex<Health>,
    tokens: AtomicU64,
    running: AtomicUsize,
    queued: AtomicUsize,
}

impl Shared {
    fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_health(&self, health: Health) {
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = health;
    }
}

pub struct UpstreamWorker {
    commands: Sender<Command>,
    waker: Arc<Waker>,
    events: EventSource,
    shared: Arc<Shared>,
    thread: std::thread::JoinHandle<()>,
    max_inflight: usize,
}

impl UpstreamWorker {
    /// Starts its I/O thread; `wake` wakes the reactor once per batch of events.
    pub fn spawn(
        cfg: UpstreamConfig,
        wake: impl Fn() + Send + 'static,
    ) -> io::Result<UpstreamWorker> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let (sink, events) = engine::events(wake);
        let shared = Arc::new(Shared {
            health: Mutex::new(Health::Down("not probed yet".into())),
            tokens: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
        });
        let max_inflight = cfg.max_inflight;
        let (probed_tx, probed) = crossbeam_channel::bounded(1);
        let wait = cfg.probe_timeout + Duration::from_millis(500);
        let name = format!("upstream-{}", cfg.name);
        let io = Io::new(cfg, poll, rx, sink, shared.clone(), probed_tx);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || io.run())?;
        // Start serving knowing whether it answers (a dead one fails its
        // first probe at once; a frozen one costs `probe_timeout`).
        let _ = probed.recv_timeout(wait);
        Ok(UpstreamWorker {
            commands: tx,
            waker,
            events,
            shared,
            thread,
            max_inflight,
        })
    }

    fn send(&self, command: Command) -> Result<(), Command> {
        self.commands.send(command).map_err(|e| e.0)?;
        let _ = self.waker.wake();
        Ok(())
    }
}

impl Worker for UpstreamWorker {
    fn kind(&self) -> Kind {
        Kind::OpenAi
    }

    fn submit(&self, req: Request) -> Result<(), Box<Request>> {
        self.send(Command::Submit(Box::new(req)))
            .map_err(|c| match c {
                Command::Submit(req) => req,
                _ => unreachable!(),
            })
    }

    fn drain(&self, into: &mut Vec<Event>) {
        into.extend(self.events.drain());
    }

    fn nudge(&self) {
        let _ = self.send(Command::Nudge);
    }

    fn release(&self, keys: Vec<RequestKey>) {
        let _ = self.send(Command::Release(keys));
    }

    fn stop(&self) {
        let _ = self.send(Command::Stop);
    }

    fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    fn status(&self) -> Status {
        let running = self.shared.running.load(Ordering::Relaxed);
        Status {
            slots: self.max_inflight,
            busy_slots: running,
            queued: self.shared.queued.load(Ordering::Relaxed),
            ..Status::default()
        }
    }

    fn health(&self, _now: Instant) -> Health {
        if self.thread.is_finished() {
            return Health::Down("its I/O thread ended".into());
        }
        self.shared.health()
    }

    fn tokens(&self) -> u64 {
        self.shared.tokens.load(Ordering::Relaxed)
    }

    fn capacity(&self) -> usize {
        self.max_inflight
    }
}

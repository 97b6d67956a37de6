//! An in-process worker: one llama.cpp engine thread with its own threads,
//! KV pool and prefix cache. Several may run in one process (a GPU one and a
//! CPU one: the heterogeneous pool). Each has a heartbeat of its own; the
//! process-wide one in `Ops` (which `/health`, the status' `engine` field and
//! the single-engine watchdog read) shows the busiest of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::core::{EngineState, Event, Request, Status};
use crate::engine::backend::{BackendError, Loader};
use crate::engine::{self, EngineConfig, EngineHandle, EventSource, Hooks, Ready};
use crate::ops::Ops;
use crate::ops::heartbeat::Heartbeat;
use crate::pool::worker::{Health, Kind, Worker};

/// The states of every local worker, by index, so the process-wide state is
/// the busiest of them.
pub struct LocalStates(Vec<AtomicU8>);

impl LocalStates {
    pub fn new(count: usize) -> Arc<LocalStates> {
        Arc::new(LocalStates(
            (0..count.max(1))
                .map(|_| AtomicU8::new(EngineState::Idle as u8))
                .collect(),
        ))
    }

    /// Busy or waking if any is; idle if any is; parked only when all are.
    fn busiest(&self) -> EngineState {
        let rank = |s: EngineState| match s {
            EngineState::Busy => 3,
            EngineState::Waking => 2,
            EngineState::Idle => 1,
            EngineState::Parked => 0,
        };
        self.0
            .iter()
            .map(|s| EngineState::from_u8(s.load(Ordering::Relaxed)))
            .max_by_key(|&s| rank(s))
            .unwrap_or(EngineState::Idle)
    }
}

/// One engine's hooks: its own heartbeat and token count; thermal pause,
/// parking and metrics are the process's.
pub struct LocalHooks {
    ops: Arc<Ops>,
    heartbeat: Heartbeat,
    tokens: AtomicU64,
    states: Arc<LocalStates>,
    index: usize,
}

impl LocalHooks {
    pub fn new(ops: Arc<Ops>, states: Arc<LocalStates>, index: usize) -> LocalHooks {
        LocalHooks {
            ops,
            heartbeat: Heartbeat::default(),
            tokens: AtomicU64::new(0),
            states,
            index,
        }
    }
}

impl LocalHooks {
    fn record(&self, state: EngineState) {
        self.heartbeat.set_state(state);
        if let Some(s) = self.states.0.get(self.index) {
            s.store(state as u8, Ordering::Relaxed);
        }
    }
}

impl Hooks for LocalHooks {
    fn beat(&self) {
        self.heartbeat.beat();
        self.ops.beat();
    }

    fn set_state(&self, state: EngineState) {
        self.record(state);
        self.ops.set_state(self.states.busiest());
    }

    fn throttled(&self) -> bool {
        self.ops.throttled()
    }

    fn on_token(&self) {
        self.tokens.fetch_add(1, Ordering::Relaxed);
        self.ops.on_token();
    }

    fn park_after(&self) -> Option<Duration> {
        self.ops.park_after()
    }

    fn unload_on_park(&self) -> bool {
        self.ops.unload_on_park()
    }

    /// The process counts (and logs) a park once every engine has parked.
    fn parked(&self) {
        self.record(EngineState::Parked);
        match self.states.busiest() {
            EngineState::Parked => self.ops.parked(),
            busiest => self.ops.set_state(busiest),
        }
    }

    fn woke(&self, took: Duration) {
        self.ops.woke(took);
    }
}

pub struct LocalWorker {
    engine: EngineHandle,
    events: EventSource,
    hooks: Arc<LocalHooks>,
    slots: usize,
    /// No progress for this long with work pending is a stall.
    stall: Duration,
}

impl LocalWorker {
    /// Starts an engine and waits until its model is loaded. `wake` wakes
    /// the reactor (once per batch of events).
    pub fn spawn<L: Loader + Send + 'static>(
        loader: L,
        config: EngineConfig,
        hooks: Arc<LocalHooks>,
        stall: Duration,
        wake: impl Fn() + Send + 'static,
    ) -> Result<(LocalWorker, Ready), BackendError> {
        let slots = config.slots;
        let (sink, events) = engine::events(wake);
        let (engine, ready) = engine::spawn(loader, config, hooks.clone(), sink)?;
        Ok((
            LocalWorker {
                engine,
                events,
                hooks,
                slots,
                stall,
            },
            ready,
        ))
    }
}

impl Worker for LocalWorker {
    fn kind(&self) -> Kind {
        Kind::Llama
    }

    fn submit(&self, req: Request) -> Result<(), Box<Request>> {
        self.engine.submit(req)
    }

    fn drain(&self, into: &mut Vec<Event>) {
        into.extend(self.events.drain());
    }

    fn stop(&self) {
        self.engine.stop();
    }

    fn is_finished(&self) -> bool {
        self.engine.is_finished()
    }

    fn status(&self) -> Status {
        self.engine.status()
    }

    fn health(&self, now: Instant) -> Health {
        if self.engine.is_finished() {
            return Health::Down("its engine thread ended".into());
        }
        let hb = &self.hooks.heartbeat;
        let lag = hb.age_at(now);
        if hb.state() == EngineState::Busy && lag > self.stall {
            return Health::Down(format!(
                "no progress for {:.1} s with work pending",
                lag.as_secs_f64()
            ));
        }
        Health::Serving
    }

    fn tokens(&self) -> u64 {
        self.hooks.tokens.load(Ordering::Relaxed)
    }

    fn capacity(&self) -> usize {
        self.slots
    }
}

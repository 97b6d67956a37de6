//! The step loop: one engine context serving requests until it parks or
//! stops. Each iteration takes commands, ends aborted requests, admits what
//! the scheduler allows, runs one batched decode planned by `planner`,
//! samples and streams, and publishes the status. It runs over any `Backend`
//! and is unit-tested with the fake one.
//!
//! The loop and the decode are here; `intake` takes requests in, `batch`
//! fills each decode, `output` turns its rows into events, and `saved`
//! keeps cached prefixes across restarts.

mod batch;
mod intake;
mod output;
mod saved;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};

use crate::core::{EngineState, FinishReason, Request, RequestError, RequestKey, Status};
use crate::engine::backend::{Backend, BatchToken, DecodeError};
use crate::engine::channel::{Command, EventSink};
use crate::engine::cpu_share::CpuShare;
use crate::engine::guide::{Guide, GuideLimits, MaskWorker};
use crate::engine::hooks::Hooks;
use crate::engine::persist::{Store, Writer};
use crate::engine::planner::{Costs, Work};
use crate::engine::scheduler::{self, MemOp, Scheduler};
use crate::engine::sequence::{Progress, Seq};
use crate::engine::speculate;
use crate::engine::threads::ThreadTuner;

/// Scheduling settings; the model's own (context size, threads...) belong to
/// its `Loader`.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens one decode may carry.
    pub n_batch: usize,
    /// Sequences decoded together.
    pub slots: usize,
    /// KV cells per accounting page.
    pub page_size: usize,
    /// Requests that may wait for a slot.
    pub queue_limit: usize,
    /// Cached prefixes kept in the KV pool.
    pub cache_entries: usize,
    /// Bytes of cached prefixes moved out of the pool to host memory.
    pub host_cache_bytes: usize,
    /// Prompt tokens a step may carry while other sequences are generating.
    pub prefill_chunk: usize,
    /// Inter-token gap to keep for running streams while prompts go in: the
    /// prompt chunk is sized from the measured step costs, at most
    /// `prefill_chunk`; a drafted step of a stream alone takes at most this
    /// long too. `None`: `planner::AUTO_TARGET_STEPS` measured one-stream
    /// steps (and `speculate::ALONE_STEPS` plain steps for drafts).
    pub itl_target_ms: Option<f64>,
    /// Tokens a step whose rows come from more than one sequence may carry
    /// (`planner::CPU_MIXED_ROWS` on the CPU; `n_batch`: no cap).
    pub mixed_rows: usize,
    /// Rows of logits computed together (`planner::CPU_OUTPUT_TILE` on the
    /// CPU with repacked weights; 1: no padding).
    pub output_tile: usize,
    /// Draft-free speculative decoding.
    pub speculate: speculate::Settings,
    /// Bytes of cached prefixes kept in memory while parked (most recent first).
    pub park_keep_bytes: usize,
    /// Where cached prefixes are saved for the next start; `None`: nowhere.
    pub state: Option<StateConfig>,
    /// What one request's constraint may cost to compile.
    pub guide_limits: GuideLimits,
}

/// Saving cached prefixes to disk.
#[derive(Debug, Clone)]
pub struct StateConfig {
    pub dir: std::path::PathBuf,
    pub max_bytes: usize,
    /// Save at most this often, when the engine goes idle and the cache
    /// changed; and always at shutdown.
    pub save_every: Duration,
}

/// What the step loop shares with the supervisor and the server.
pub struct Io {
    pub sink: EventSink,
    pub commands: Receiver<Command>,
    /// Set on shutdown: aborts the running decode at once.
    pub shutdown: Arc<AtomicBool>,
    pub status: Arc<Mutex<Status>>,
    pub hooks: Arc<dyn Hooks>,
}

/// Why `serve` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    Stopped,
    /// Idle for `idle.park_after_s`: release the context until the next request.
    Park,
}

/// A sequence's draft tokens in the step. Guesses only fill a tile: a step
/// with them is a decode step.
fn drafted<S>(s: &Seq<S>) -> usize {
    if s.guessed { 0 } else { s.draft.len() }
}

/// How a request ended, before it becomes an event.
enum Outcome {
    End(FinishReason),
    Error(RequestError),
}

/// A queued request: its progress so far, its sampler and its compiled
/// constraint, both made on arrival so that a bad one is refused at once.
struct Waiting<S> {
    req: Request,
    progress: Progress,
    sampler: S,
    guide: Option<Guide>,
}

pub struct Engine<'a, B: Backend> {
    backend: B,
    io: &'a Io,
    cfg: &'a EngineConfig,
    scheduler: Scheduler,
    /// Admitted sequences, in admission order (the planner orders their prompts).
    active: Vec<Seq<B::Sampler>>,
    /// Requests the scheduler holds in its queue, with what is known of them.
    waiting: HashMap<RequestKey, Waiting<B::Sampler>>,
    batch: Vec<BatchToken>,
    stopping: bool,
    store: Option<&'a Store>,
    /// Computes constrained requests' next masks while a decode runs.
    masks: Option<MaskWorker>,
    /// What steps cost here, measured.
    costs: Costs,
    /// Decode threads, by measurement (fewer when other processes take the cores).
    threads: ThreadTuner,
    /// What other processes take of the CPUs, which the tuner is told.
    cpu: CpuShare,
    /// How often drafts were right, over every sequence: where a new one starts.
    rates: speculate::Rates,
    /// How often guessed tokens were right, over every sequence.
    guess_rate: speculate::GuessRate,
    /// The current step carries a tile of guesses beyond its last one
    /// (`guess_tile`), and how often one was declined.
    extra_tile: bool,
    declined: usize,
    /// `scheduler.cache_changes()` at the last save, and when it was.
    saved: (u64, Instant),
    /// Writes what `persist` saves, off the engine thread.
    writer: Writer,
    /// When the last decode ended.
    decoded_at: Option<Instant>,
}

impl<'a, B: Backend> Engine<'a, B> {
    /// A fresh engine over a fresh context: its KV bookkeeping and prefix
    /// cache describe that context, which starts empty.
    pub fn new(backend: B, cfg: &'a EngineConfig, io: &'a Io, store: Option<&'a Store>) -> Self {
        let threads = backend.threads();
        let scheduler = Scheduler::new(scheduler::Config {
            n_ctx: backend.n_ctx(),
            page_size: cfg.page_size,
            slots: cfg.slots,
            cache_entries: cfg.cache_entries,
            host_bytes: cfg.host_cache_bytes,
            queue_limit: cfg.queue_limit,
        });
        let mut costs = Costs::new(cfg.slots);
        if let Some(ms) = backend.one_row_ms() {
            costs.observe(1, 0, 0, ms);
        }
        let engine = Engine {
            backend,
            io,
            cfg,
            scheduler,
            active: Vec::new(),
            waiting: HashMap::new(),
            batch: Vec::with_capacity(cfg.n_batch),
            stopping: false,
            store,
            costs,
            threads: ThreadTuner::new(threads),
            cpu: CpuShare::new(),
            rates: Default::default(),
            guess_rate: Default::default(),
            extra_tile: false,
            declined: 0,
            masks: MaskWorker::spawn()
                .inspect_err(|e| log::warn!("masks are computed between decodes: no thread ({e})"))
                .ok(),
            saved: (0, Instant::now()),
            writer: Writer::default(),
            decoded_at: None,
        };
        engine.publish();
        engine
    }

    pub fn serve(&mut self) -> Exit {
        let hooks = &self.io.hooks;
        loop {
            if self.active.is_empty() && self.waiting.is_empty() && !self.stopping {
                // Whatever was sent (a refusal, the last end) must reach the
                // server before the engine sleeps.
                self.io.sink.wake();
                if self
                    .cfg
                    .state
                    .as_ref()
                    .is_some_and(|s| self.saved.1.elapsed() >= s.save_every)
                {
                    self.persist();
                }
                hooks.set_state(EngineState::Idle);
                let command = match hooks.park_after() {
                    Some(after) => match self.io.commands.recv_timeout(after) {
                        Err(RecvTimeoutError::Timeout) => return Exit::Park,
                        other => other.ok(),
                    },
                    None => self.io.commands.recv().ok(),
                };
                self.take(command);
                hooks.set_state(EngineState::Busy);
            }
            self.poll_commands();
            self.thermal_pause();
            if self.stopping {
                self.fail_all(RequestError::ShuttingDown);
                return Exit::Stopped;
            }
            self.reap_cancelled();
            self.admit();
            self.spill_idle();
            if self.active.is_empty() && !self.waiting.is_empty() {
                // Nothing can start yet (cannot happen with a consistent pool, but
                // never spin): wait for a command, or re-check cancellations soon.
                self.wait_command(Duration::from_millis(50));
            } else {
                self.step();
            }
            self.publish();
            if self.active.is_empty() && self.waiting.is_empty() && !self.stopping {
                // Idle before the server hears of the last end: a client that
                // asks for `status` right after it finds the engine idle.
                hooks.set_state(EngineState::Idle);
            }
            self.io.sink.wake();
            hooks.beat();
        }
    }

    /// Acts on one command; `None` means the server is gone.
    fn take(&mut self, command: Option<Command>) {
        match command {
            Some(Command::Submit(req)) => self.submit(*req),
            Some(Command::Shutdown) | None => {
                self.stopping = true;
                self.io.shutdown.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Takes every pending command without blocking.
    fn poll_commands(&mut self) {
        while !self.stopping {
            match self.io.commands.try_recv() {
                Ok(command) => self.take(Some(command)),
                Err(TryRecvError::Disconnected) => self.take(None),
                Err(TryRecvError::Empty) => return,
            }
        }
    }

    /// Waits up to `timeout` for a command, keeping the heartbeat going.
    fn wait_command(&mut self, timeout: Duration) {
        self.io.hooks.beat();
        match self.io.commands.recv_timeout(timeout) {
            Ok(command) => self.take(Some(command)),
            Err(RecvTimeoutError::Disconnected) => self.take(None),
            Err(RecvTimeoutError::Timeout) => {}
        }
    }

    /// While the thermal throttle is on, no step starts; commands, aborts and
    /// shutdown are still served and the heartbeat goes on.
    fn thermal_pause(&mut self) {
        while self.io.hooks.throttled()
            && !self.stopping
            && !(self.active.is_empty() && self.waiting.is_empty())
        {
            self.reap_cancelled();
            self.publish();
            self.io.sink.wake();
            self.wait_command(Duration::from_millis(50));
        }
    }

    fn publish(&self) {
        let snapshot = self.scheduler.status();
        *self.io.status.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
    }

    /// Mirrors the scheduler's operations on the KV cache, in order; false
    /// when a prefix could not be loaded back from host memory (nothing was
    /// then copied from it: a request admitted to share it computes it).
    fn apply(&mut self, ops: &[MemOp]) -> bool {
        let mut failed = None;
        for op in ops {
            match op {
                MemOp::Copy { src, .. } if Some(*src) == failed => {}
                &MemOp::Copy { src, dst, len } => self.backend.seq_cp(src, dst, len),
                &MemOp::Remove { seq, from } => self.backend.seq_rm(seq, from),
                MemOp::Save { seq, tokens } => match self.backend.seq_save(*seq) {
                    Ok(state) => self.scheduler.keep_in_host(tokens.clone(), Arc::new(state)),
                    Err(e) => log::warn!("cannot copy a cached prefix to host memory: {e}"),
                },
                &MemOp::Load { id, seq } => {
                    // A copy saved just before may have pushed the entry out.
                    let loaded = match self.scheduler.host_state(id) {
                        Some(state) => self.backend.seq_load(seq, state).map_err(|e| e.to_string()),
                        None => Err("it left host memory".into()),
                    };
                    if let Err(e) = loaded {
                        log::warn!("cannot load a cached prefix from host memory: {e}");
                        let op = self.scheduler.load_failed(id, seq);
                        self.apply(&[op]);
                        failed = Some(seq);
                    }
                }
            }
        }
        failed.is_none()
    }

    /// Moves the cached prefixes no running request shares out of the cells
    /// while several run (`Scheduler::spill_idle`).
    fn spill_idle(&mut self) {
        let ops = self.scheduler.spill_idle();
        if !ops.is_empty() {
            let t0 = Instant::now();
            self.apply(&ops);
            log::debug!(
                "moved cached prefixes to host memory: {} ops, {:.1} ms",
                ops.len(),
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
    }

    /// One decode of the planned batch, then sampling for every row.
    fn step(&mut self) {
        self.build_batch();
        if self.batch.is_empty() {
            return;
        }
        let decode_only = self
            .active
            .iter()
            .all(|s| drafted(s) == 0 && matches!(s.work, Work::Idle | Work::Decode));
        let threads = if decode_only {
            self.threads.threads()
        } else {
            self.threads.kept()
        };
        if threads != self.backend.threads() {
            self.backend.set_threads(threads);
        }
        let in_batch = |s: &Seq<B::Sampler>| s.work != Work::Idle;
        let result = loop {
            let flags: Vec<Arc<AtomicBool>> = self
                .active
                .iter()
                .filter(|s| in_batch(s))
                .map(|s| s.req.cancel.clone())
                .collect();
            let shutdown = &self.io.shutdown;
            let hooks = &self.io.hooks;
            // One client's abort must not throw away the others' work: only
            // interrupt a decode in which every sequence was aborted.
            let should_abort = || {
                hooks.beat(); // polled between graph nodes: a long decode is not a stall
                shutdown.load(Ordering::Relaxed) || flags.iter().all(|f| f.load(Ordering::Relaxed))
            };
            let t0 = Instant::now();
            let result = self.backend.decode(&self.batch, &should_abort);
            if result.is_ok() {
                self.record_decode(t0, decode_only);
            }
            match result {
                Err(DecodeError::NoKvSlot) => match self.scheduler.evict_lru() {
                    Some(ops) => {
                        log::warn!(
                            "llama.cpp found no KV slot: evicting a cached prefix and retrying"
                        );
                        self.apply(&ops);
                    }
                    None => break Err(DecodeError::NoKvSlot),
                },
                other => break other,
            }
        };
        match result {
            Ok(()) => {}
            Err(DecodeError::Aborted) => return, // reap_cancelled or shutdown ends them
            Err(e) => {
                log::error!("llama_decode failed: {e}");
                while let Some(i) = self.active.iter().position(in_batch) {
                    let error = RequestError::EngineFailed(e.to_string());
                    self.finish(i, Outcome::Error(error));
                }
                return;
            }
        }
        let mut i = 0;
        while i < self.active.len() {
            let s = &mut self.active[i];
            s.advance();
            s.work = Work::Idle;
            match s.row.take().and_then(|row| self.on_rows(i, row)) {
                Some(outcome) => self.finish(i, outcome),
                None => i += 1,
            }
        }
    }

    /// What a decode that began at `t0` and just ended tells: its prompts'
    /// TTFT parts, what steps cost (`Costs`), and the thread tuner's step
    /// times and the other processes' share of the CPUs.
    fn record_decode(&mut self, t0: Instant, decode_only: bool) {
        let now = Instant::now();
        for s in self.active.iter_mut() {
            if let Work::Prefill(_) = s.work {
                let t = &mut s.progress.ttft;
                t.first_decode.get_or_insert(t0);
                t.prefill_steps += 1;
                t.prefill += now - t0;
                if s.row.is_some() {
                    t.logits = Some(now);
                }
            }
        }
        let rows = self
            .active
            .iter()
            .filter(|s| s.work == Work::Decode)
            .count();
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let drafts: usize = self.active.iter().map(drafted).sum();
        let guessed = self.active.iter().filter(|s| s.guessed);
        let guesses: usize = guessed.map(|s| s.draft.len()).sum();
        let prompt_tokens = self.batch.len() - rows - drafts - guesses;
        let outputs = rows + drafts + guesses;
        if prompt_tokens == 0 {
            self.costs.observe_outputs(outputs, ms);
        }
        // A step with a tile of guesses more costs what its rows of
        // logits do, not what its decode rows and drafts would.
        if !self.extra_tile {
            self.costs.observe(rows, prompt_tokens, drafts, ms);
        }
        // The engine's own work between two decodes (sampling,
        // events, planning), or its idle time.
        let host_ms = self
            .decoded_at
            .replace(now)
            .map_or(0.0, |at| (t0 - at).as_secs_f64() * 1e3);
        log::trace!(
            "step: {rows} rows, {prompt_tokens} prompt tokens, {drafts} drafts, {guesses} guesses: {ms:.1} ms ({host_ms:.2} ms since the last)"
        );
        if decode_only {
            self.threads.others(self.cpu.others(now));
            if let Some(n) = self.threads.observe(outputs, ms) {
                log::debug!("decoding with {n} threads");
            }
        }
    }
}

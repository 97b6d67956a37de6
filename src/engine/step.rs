//! The step loop: one engine context serving requests until it parks or
//! stops. Each iteration takes commands, ends aborted requests, admits what
//! the scheduler allows, runs one batched decode planned by `planner`,
//! samples and streams, and publishes the status. It runs over any `Backend`
//! and is unit-tested with the fake one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};

use crate::core::{
    Candidate, EngineState, Event, FinishReason, Request, RequestError, RequestKey, RequestKind,
    Status, TokenLogprobs,
};
use crate::engine::backend::{Backend, BackendError, BatchToken, DecodeError, Filter, Token};
use crate::engine::channel::{Command, EventSink};
use crate::engine::guide::{Guide, GuideError, GuideLimits, MaskWorker, TokenMask};
use crate::engine::hooks::Hooks;
use crate::engine::persist::{Store, Writer};
use crate::engine::planner::{self, Budget, Costs, Work};
use crate::engine::prompt;
use crate::engine::scheduler::{self, Job, MemOp, Scheduler};
use crate::engine::sequence::{Progress, Seq};
use crate::engine::snapshot::Prefix;
use crate::engine::speculate;
use crate::engine::text::Step;
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
    /// Prompt tokens a step may carry while other sequences are generating.
    pub prefill_chunk: usize,
    /// Inter-token gap to keep for running streams while prompts go in: the
    /// prompt chunk is sized from the measured step costs, at most
    /// `prefill_chunk`; a drafted step of a stream alone takes at most this
    /// long too. `None`: `AUTO_TARGET_STEPS` measured one-stream steps (and
    /// `ALONE_DRAFT_STEPS` plain steps for drafts).
    pub itl_target_ms: Option<f64>,
    /// Tokens a step whose rows come from more than one sequence may carry
    /// (`planner::CPU_MIXED_ROWS` on the CPU; `n_batch`: no cap).
    pub mixed_rows: usize,
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
    /// Admitted sequences, in admission order (prefill goes first-come first-served).
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
    /// How often drafts were right, over every sequence: where a new one starts.
    rates: speculate::Rates,
    /// `scheduler.cache_changes()` at the last save, and when it was.
    saved: (u64, Instant),
    /// Writes what `persist` saves, off the engine thread.
    writer: Writer,
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
            rates: Default::default(),
            masks: MaskWorker::spawn()
                .inspect_err(|e| log::warn!("masks are computed between decodes: no thread ({e})"))
                .ok(),
            saved: (0, Instant::now()),
            writer: Writer::default(),
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

    /// The cached prefixes' states, the most recently used first, while
    /// they fit in `budget` bytes.
    pub fn save_prefixes(&self, budget: usize) -> Vec<Prefix> {
        let mut out = Vec::new();
        let mut used = 0;
        for (seq, tokens) in self.scheduler.cached() {
            match self.backend.seq_save(seq) {
                Ok(state) => {
                    let prefix = Prefix {
                        tokens: tokens.to_vec(),
                        state,
                    };
                    if used + prefix.bytes() > budget {
                        break;
                    }
                    used += prefix.bytes();
                    out.push(prefix);
                }
                Err(e) => log::warn!("cannot save a cached prefix: {e}"),
            }
        }
        out
    }

    /// Saves the cached prefixes to the state directory, if they changed.
    pub fn persist(&mut self) {
        let Some(store) = self.store else {
            return;
        };
        let changes = self.scheduler.cache_changes();
        if changes == self.saved.0 {
            return;
        }
        let t0 = Instant::now();
        let prefixes = self.save_prefixes(store.max_bytes());
        self.writer.save(store, prefixes, t0.elapsed());
        self.saved = (changes, Instant::now());
    }

    /// Waits until what `persist` saved is on disk.
    pub fn finish_saving(&mut self) {
        self.writer.finish();
    }

    /// Takes saved prefixes back into the prefix cache, the most recent
    /// first, while entries and pages are free; returns how many.
    pub fn restore_prefixes(&mut self, prefixes: Vec<Prefix>) -> usize {
        let mut restored = 0;
        // Oldest first, so the most recent ends up the most recently used.
        for prefix in prefixes.into_iter().rev() {
            let Some(seq) = self.scheduler.adopt(prefix.tokens) else {
                continue;
            };
            match self.backend.seq_load(seq, &prefix.state) {
                Ok(()) => restored += 1,
                Err(e) => {
                    log::warn!("cannot restore a cached prefix: {e}");
                    let op = self.scheduler.forget(seq);
                    self.apply(&[op]);
                }
            }
        }
        self.publish();
        restored
    }

    /// Tokenizes a request and queues it with the scheduler.
    pub fn submit(&mut self, req: Request) {
        let mut progress = Progress::new(req.received);
        progress.ttft.taken = Some(Instant::now());
        // A prompt over `limit` is refused, or cut to leave room for the reply.
        let capacity = self.scheduler.capacity();
        let limit = match req.max_prompt_tokens {
            0 => capacity.saturating_sub(1),
            n => n.min(capacity.saturating_sub(1)),
        };
        let reply = (req.params.max_tokens as usize).min(capacity / 2);
        let target = limit.min(capacity - reply);
        let fitted = match req.kind {
            RequestKind::CountTokens => prompt::tokens(&self.backend, &req.input).map(|t| (t, 0)),
            RequestKind::Generate => {
                prompt::fit(&self.backend, &req.input, req.truncate, limit, target)
            }
        };
        let (tokens, truncated) = match fitted {
            Ok(t) => t,
            Err(e) => return self.report(&req, Outcome::Error(e), &progress),
        };
        if req.kind == RequestKind::CountTokens {
            log::debug!(request = req.id.as_str(); "request {}: {} prompt tokens", req.id, tokens.len());
            let count = tokens.len();
            return self.io.sink.send(Event::Tokens {
                key: req.key,
                count,
            });
        }
        progress.prompt_tokens = tokens.len();
        progress.truncated_tokens = truncated;
        if req.max_prompt_tokens > 0 && tokens.len() > req.max_prompt_tokens {
            let e = RequestError::PromptTooLong {
                prompt_tokens: tokens.len(),
                max: req.max_prompt_tokens,
            };
            return self.report(&req, Outcome::Error(e), &progress);
        }
        let prepared = self.check_tokens(&req).and_then(|()| {
            let guide = self.guide(&req)?;
            let seed = req.params.seed.unwrap_or_else(random_seed);
            let sampler = self
                .backend
                .sampler(&req.params, seed)
                .map_err(|e| RequestError::Constraint(e.to_string()))?;
            Ok((sampler, guide))
        });
        let (sampler, guide) = match prepared {
            Ok(p) => p,
            Err(e) => return self.report(&req, Outcome::Error(e), &progress),
        };
        progress.ttft.prepared = Some(Instant::now());
        let job = Job {
            key: req.key,
            tokens,
            max_tokens: req.params.max_tokens as usize,
            priority: req.urgency.priority,
        };
        // Requests that arrived together: whoever can start now starts
        // first, so the limit counts only requests that would really wait.
        if self.scheduler.queue_is_full() {
            self.start_admitted();
        }
        match self.scheduler.submit(job) {
            Ok(_) => {
                let waiting = Waiting {
                    req,
                    progress,
                    sampler,
                    guide,
                };
                self.waiting.insert(waiting.req.key, waiting);
            }
            Err(e) => self.report(&req, Outcome::Error(e), &progress),
        }
    }

    /// Token ids a request names must be in the vocabulary.
    fn check_tokens(&self, req: &Request) -> Result<(), RequestError> {
        let n_vocab = self.backend.n_vocab();
        let p = &req.params;
        let named = p
            .logit_bias
            .iter()
            .map(|b| ("logit_bias", b.0))
            .chain(p.stop_token_ids.iter().map(|&t| ("stop_token_ids", t)));
        for (field, token) in named {
            if token < 0 || token as usize >= n_vocab {
                return Err(RequestError::UnknownToken {
                    field,
                    token,
                    n_vocab,
                });
            }
        }
        Ok(())
    }

    /// Compiles the request's constraint, if it has one (on this thread,
    /// within `guide_limits`).
    fn guide(&self, req: &Request) -> Result<Option<Guide>, RequestError> {
        let Some(constraint) = &req.params.constraint else {
            return Ok(None);
        };
        let limits = &self.cfg.guide_limits;
        let refused = |e: GuideError| RequestError::Constraint(e.0);
        if let crate::core::Constraint::Gbnf(_) = constraint {
            // The sampler follows it; only its size is checked here
            // (`compile` checks the others').
            return limits.check(constraint).map(|()| None).map_err(refused);
        }
        let t0 = Instant::now();
        let grammars = self
            .backend
            .grammars()
            .map_err(|e| RequestError::Constraint(e.to_string()))?;
        let guide = grammars.compile(constraint, limits).map_err(refused)?;
        log::debug!(
            request = req.id.as_str();
            "request {}: {} compiled in {:.1} ms", req.id, constraint.kind(), t0.elapsed().as_secs_f64() * 1e3
        );
        Ok(Some(guide))
    }

    /// Ends aborted requests and those past their deadline, waiting or
    /// running, before the next step.
    fn reap_cancelled(&mut self) {
        let now = Instant::now();
        let ended = |r: &Request| {
            if r.cancelled() {
                Some(FinishReason::Abort)
            } else if r.expired(now) {
                Some(FinishReason::Deadline)
            } else {
                None
            }
        };
        let gone: Vec<(RequestKey, FinishReason)> = self
            .waiting
            .values()
            .filter_map(|w| ended(&w.req).map(|reason| (w.req.key, reason)))
            .collect();
        for (key, reason) in gone {
            self.scheduler.cancel_queued(key);
            let w = self.waiting.remove(&key).expect("listed above");
            self.report(&w.req, Outcome::End(reason), &w.progress);
        }
        let mut i = 0;
        while i < self.active.len() {
            match ended(&self.active[i].req) {
                Some(reason) => self.finish(i, Outcome::End(reason)),
                None => i += 1,
            }
        }
    }

    /// Starts every request the scheduler admits and tells the others their place.
    fn admit(&mut self) {
        self.start_admitted();
        for (key, position) in self.scheduler.position_updates() {
            self.io.sink.send(Event::Queued { key, position });
        }
    }

    /// Starts every request the scheduler admits (their places are told
    /// after the whole intake, by `admit`).
    fn start_admitted(&mut self) {
        for (job, admitted) in self.scheduler.admit() {
            let Waiting {
                req,
                mut progress,
                sampler,
                guide,
            } = self
                .waiting
                .remove(&job.key)
                .expect("admitted requests are waiting");
            self.apply(&admitted.ops);
            progress.cached_tokens = admitted.cached_tokens;
            self.active.push(Seq {
                banned: banned(&req.params, self.backend.eog_tokens(), true),
                guide,
                sampler,
                stream: crate::engine::text::TextStream::new(req.params.stop.clone()),
                id: admitted.seq,
                decoded: job.tokens[..admitted.cached_tokens].to_vec(),
                prompt: job.tokens,
                pending: None,
                limit: admitted.limit,
                progress,
                work: Work::Idle,
                row: None,
                draft: Vec::new(),
                matched: 0,
                rates: self.rates.inherit(),
                req,
            });
        }
    }

    fn apply(&mut self, ops: &[MemOp]) {
        for op in ops {
            match *op {
                MemOp::Copy { src, dst, len } => self.backend.seq_cp(src, dst, len),
                MemOp::Remove { seq, from } => self.backend.seq_rm(seq, from),
            }
        }
    }

    /// Fills the batch with the planned work of every sequence.
    fn build_batch(&mut self) {
        let views: Vec<_> = self.active.iter().map(Seq::view).collect();
        let decodes = views.iter().filter(|v| v.generating).count();
        let target = self
            .cfg
            .itl_target_ms
            .or_else(|| Some(self.costs.decode(1)? * AUTO_TARGET_STEPS));
        let prefill_chunk = match target {
            Some(target) => self.costs.chunk(decodes, target, self.cfg.prefill_chunk),
            None => self.cfg.prefill_chunk,
        };
        let budget = Budget {
            batch: self.cfg.n_batch,
            prefill_chunk,
            mixed: self.cfg.mixed_rows,
        };
        let plan = planner::plan(&views, budget);
        // Drafts only in steps without prompts: a waiting prompt's first
        // token matters more than a running stream's extra ones.
        let drafting =
            self.cfg.speculate.max_draft > 0 && !plan.iter().any(|w| matches!(w, Work::Prefill(_)));
        // What this step costs so far and what a draft token adds; until
        // drafts were seen, a guess that lets them be tried (an eighth of
        // the step a token).
        let mut draft_costs = if drafting {
            self.costs.draft(decodes).or_else(|| {
                let step = self.costs.decode(decodes)?;
                Some((step, step / 8.0))
            })
        } else {
            None
        };
        // What drafts may add to the step: alone, up to the target gap (by
        // default a few plain steps); beside other streams, which gain
        // nothing from a draft, a quarter of the step.
        let mut allowance = draft_costs.map_or(0, |(step_ms, token_ms)| {
            let extra_ms = match (decodes, self.cfg.itl_target_ms) {
                (1, Some(target)) => target - step_ms,
                (1, None) => step_ms * (ALONE_DRAFT_STEPS - 1.0),
                _ => step_ms * SHARED_DRAFTS,
            };
            (extra_ms.max(0.0) / token_ms) as usize
        });
        self.batch.clear();
        for (s, work) in self.active.iter_mut().zip(plan) {
            s.work = work;
            s.row = None;
            s.draft.clear();
            match work {
                Work::Idle => {}
                Work::Decode => {
                    let token = s.pending.expect("a decoding sequence has a token");
                    s.row = Some(self.batch.len());
                    let pos = s.decoded.len();
                    self.batch.push(BatchToken {
                        token,
                        pos,
                        seq: s.id,
                        output: true,
                    });
                    if let Some((step_ms, token_ms)) = draft_costs.as_mut() {
                        let room = self.cfg.n_batch.saturating_sub(self.batch.len());
                        let settings = &self.cfg.speculate;
                        let room = room.min(allowance);
                        *step_ms += s.draft(settings, decodes, (*step_ms, *token_ms), room);
                        allowance -= s.draft.len();
                        for (i, &token) in s.draft.iter().enumerate() {
                            self.batch.push(BatchToken {
                                token,
                                pos: pos + 1 + i,
                                seq: s.id,
                                output: true,
                            });
                        }
                    }
                }
                Work::Prefill(n) => {
                    let start = s.decoded.len();
                    for pos in start..start + n {
                        let last = pos + 1 == s.prompt.len();
                        if last {
                            s.row = Some(self.batch.len());
                        }
                        self.batch.push(BatchToken {
                            token: s.prompt[pos],
                            pos,
                            seq: s.id,
                            output: last,
                        });
                    }
                }
            }
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
            .all(|s| s.draft.is_empty() && matches!(s.work, Work::Idle | Work::Decode));
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
                let drafts: usize = self.active.iter().map(|s| s.draft.len()).sum();
                let prompt_tokens = self.batch.len() - rows - drafts;
                self.costs.observe(rows, prompt_tokens, drafts, ms);
                log::trace!(
                    "step: {rows} rows, {prompt_tokens} prompt tokens, {drafts} drafts: {ms:.1} ms"
                );
                if decode_only && let Some(n) = self.threads.observe(rows, ms) {
                    log::debug!("decoding with {n} threads");
                }
            }
            match result {
                Err(DecodeError::NoKvSlot) => match self.scheduler.evict_lru() {
                    Some(op) => {
                        log::warn!(
                            "llama.cpp found no KV slot: evicting a cached prefix and retrying"
                        );
                        self.apply(&[op]);
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

    /// Samples sequence `i`'s next token from row `row`, then, while its
    /// draft was right, the token after each draft token from the rows that
    /// follow; the cells of the draft's wrong tokens are dropped.
    fn on_rows(&mut self, i: usize, row: usize) -> Option<Outcome> {
        let draft = std::mem::take(&mut self.active[i].draft);
        let mut accepted = 0;
        let outcome = loop {
            if let Some(outcome) = self.on_output(i, row + accepted) {
                break Some(outcome);
            }
            let s = &mut self.active[i];
            match draft.get(accepted) {
                Some(&token) if s.pending == Some(token) => {
                    // Its cell holds the token sampled: it stays.
                    s.decoded.push(token);
                    s.pending = None;
                    accepted += 1;
                }
                _ => break None,
            }
        };
        let s = &mut self.active[i];
        if !draft.is_empty() {
            s.rates.update(s.matched, accepted, draft.len());
            self.rates.update(s.matched, accepted, draft.len());
            s.progress.drafted += draft.len();
            s.progress.accepted += accepted;
            if outcome.is_none() && accepted < draft.len() {
                self.backend.seq_rm(s.id, s.decoded.len());
            }
        }
        s.draft = draft;
        outcome
    }

    /// Samples sequence `i`'s next token from batch row `row` and streams its
    /// text; returns how the request ended, if it did.
    fn on_output(&mut self, i: usize, row: usize) -> Option<Outcome> {
        let s = &mut self.active[i];
        let t0 = Instant::now();
        let mask = match s.guide.as_mut().map(Guide::mask).transpose() {
            Ok(mask) => mask,
            Err(e) => return Some(Outcome::Error(RequestError::Constraint(e.0))),
        };
        let eog = self.backend.eog_tokens();
        let only_eog = |m: &&TokenMask| {
            m.num_set() <= eog.len() && m.iter().all(|t| eog.contains(&(t as Token)))
        };
        if mask.is_some_and(|m| only_eog(&m)) {
            // Complete: nothing but its end may follow, whatever
            // `min_tokens` or `ignore_eos` say.
            return Some(self.end_here(i, 1.0, FinishReason::Eos));
        }
        let filter = Filter {
            mask,
            banned: &s.banned,
        };
        let sampled = match self.backend.sample(&mut s.sampler, row, &filter) {
            Ok(x) => x,
            Err(BackendError::GrammarComplete) => {
                return Some(self.end_here(i, 1.0, FinishReason::Eos));
            }
            Err(e) => return Some(Outcome::Error(RequestError::EngineFailed(e.to_string()))),
        };
        s.progress.first_token.get_or_insert_with(Instant::now);
        let (key, prob) = (s.req.key, sampled.prob);
        if s.req.params.stop_token_ids.contains(&sampled.token) {
            return Some(self.end_here(i, prob, FinishReason::Stop));
        }
        if self.backend.is_eog(sampled.token) {
            return Some(self.end_here(i, prob, FinishReason::Eos));
        }
        let masks = self.masks.as_ref();
        if let Some(Err(e)) = s.guide.as_mut().map(|g| g.accept(sampled.token, masks)) {
            return Some(Outcome::Error(RequestError::Constraint(e.0)));
        }
        s.progress.sampling += t0.elapsed();
        let logprobs = sampled
            .top
            .map(|top| self.logprobs(sampled.token, prob, &top));
        let s = &mut self.active[i];
        s.progress.completion_tokens += 1;
        if s.progress.completion_tokens == s.req.params.min_tokens as usize {
            s.banned = banned(&s.req.params, self.backend.eog_tokens(), false);
        }
        self.io.hooks.on_token();
        let mut bytes = Vec::with_capacity(16);
        self.backend.piece(sampled.token, &mut bytes);
        let (text, stopped) = match s.stream.push(&bytes) {
            Step::Emit(text) => (text, false),
            Step::Stop(text) => (text, true),
        };
        let complete = s.guide.as_ref().is_some_and(Guide::is_done);
        let done = s.progress.completion_tokens >= s.req.params.max_tokens as usize
            || s.decoded.len() >= s.limit
            || complete;
        let tail = if done && !stopped {
            s.stream.finish()
        } else {
            String::new()
        };
        s.pending = Some(sampled.token);
        self.send_text(key, text + &tail, prob, logprobs);
        if stopped {
            Some(Outcome::End(FinishReason::Stop))
        } else if complete {
            Some(Outcome::End(FinishReason::Eos))
        } else if done {
            Some(Outcome::End(FinishReason::Length))
        } else {
            None
        }
    }

    /// Ends sequence `i` on the spot, with the text it still holds back
    /// (`prob`: the ending token's).
    fn end_here(&mut self, i: usize, prob: f32, reason: FinishReason) -> Outcome {
        let s = &mut self.active[i];
        let (key, text) = (s.req.key, s.stream.finish());
        self.send_text(key, text, prob, None);
        Outcome::End(reason)
    }

    /// Sends text; a token with log-probabilities goes out even when its
    /// text is held back, so each token's are reported.
    fn send_text(
        &self,
        key: RequestKey,
        text: String,
        prob: f32,
        logprobs: Option<Box<TokenLogprobs>>,
    ) {
        if !text.is_empty() || logprobs.is_some() {
            self.io.sink.send(Event::Token {
                key,
                text,
                prob,
                logprobs,
            });
        }
    }

    /// The sampled token and the most likely ones, with their bytes.
    fn logprobs(&self, token: Token, prob: f32, top: &[(Token, f32)]) -> Box<TokenLogprobs> {
        let candidate = |token: Token, logprob: f32| {
            let mut bytes = Vec::new();
            self.backend.piece(token, &mut bytes);
            Candidate {
                token,
                bytes,
                logprob,
            }
        };
        Box::new(TokenLogprobs {
            chosen: candidate(token, prob.ln().max(-9999.0)),
            top: top.iter().map(|&(t, lp)| candidate(t, lp)).collect(),
        })
    }

    /// Ends active sequence `i`: its KV pages go back to the scheduler (whole
    /// pages of a cleanly ended request stay as a cached prefix).
    fn finish(&mut self, i: usize, outcome: Outcome) {
        let s = self.active.remove(i);
        let keep: &[_] = match outcome {
            Outcome::End(_) => &s.decoded,
            Outcome::Error(..) => &[],
        };
        let ops = self.scheduler.finish(s.req.key, keep);
        self.apply(&ops);
        debug_assert!(
            self.scheduler.check().is_ok(),
            "{:?}",
            self.scheduler.check()
        );
        self.report(&s.req, outcome, &s.progress);
    }

    /// Ends every request, running or waiting, with `error`.
    fn fail_all(&mut self, error: RequestError) {
        while !self.active.is_empty() {
            self.finish(0, Outcome::Error(error.clone()));
        }
        for (key, w) in std::mem::take(&mut self.waiting) {
            self.scheduler.cancel_queued(key);
            self.report(&w.req, Outcome::Error(error.clone()), &w.progress);
        }
    }

    fn report(&self, req: &Request, outcome: Outcome, progress: &Progress) {
        let key = req.key;
        let id = req.id.as_str();
        match outcome {
            Outcome::End(reason) => {
                let s = progress.stats();
                log::info!(
                    request = id, api = req.api, reason = reason.as_str(), prompt_tokens = s.prompt_tokens,
                    truncated_tokens = s.truncated_tokens,
                    cached_tokens = s.cached_tokens, completion_tokens = s.completion_tokens,
                    ttft_ms = s.ttft_ms, tps = s.tps, ms = s.ms;
                    "request {id} ({}) ended ({}): prompt {} tokens ({} cached), completion {} tokens, ttft {:.1} ms, {:.1} tok/s, total {:.1} ms",
                    req.api, reason.as_str(), s.prompt_tokens, s.cached_tokens, s.completion_tokens, s.ttft_ms, s.tps, s.ms
                );
                log::debug!(
                    request = id;
                    "request {id}: sampling took {:.2} ms in all",
                    progress.sampling.as_secs_f64() * 1e3
                );
                if progress.drafted > 0 {
                    log::debug!(
                        request = id;
                        "request {id}: {} of {} draft tokens accepted",
                        progress.accepted, progress.drafted
                    );
                }
                if let Some(parts) = progress.ttft_parts() {
                    log::debug!(request = id; "request {id}: {parts}");
                }
                self.io.sink.send(Event::End {
                    key,
                    reason,
                    stats: s,
                });
            }
            Outcome::Error(error) => {
                log::info!(
                    request = id, api = req.api, code = error.code().as_str();
                    "request {id} ({}) failed ({}): {error}", req.api, error.code().as_str()
                );
                self.io.sink.send(Event::Error { key, error });
            }
        }
    }
}

/// The inter-token gap kept without `itl_target_ms`, in measured
/// one-stream steps: a prompt going in beside running streams may stretch a
/// step this far.
const AUTO_TARGET_STEPS: f64 = 8.0;
/// How long a drafted step of a stream decoded alone may take without
/// `itl_target_ms`, in plain steps: its tokens then come in bursts at most
/// this far apart.
const ALONE_DRAFT_STEPS: f64 = 8.0;
/// What drafts may add to a step shared with other streams, as a share of it.
const SHARED_DRAFTS: f64 = 0.25;

/// The tokens a sequence may not sample: end-of-generation tokens with
/// `ignore_eos`, and also the stop tokens before `min_tokens` (`early`).
fn banned(params: &crate::core::SamplingParams, eog: &[Token], early: bool) -> Vec<Token> {
    let early = early && params.min_tokens > 0;
    let mut banned = Vec::new();
    if early || params.ignore_eos {
        banned.extend_from_slice(eog);
    }
    if early {
        banned.extend_from_slice(&params.stop_token_ids);
    }
    banned
}

fn random_seed() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now()) as u32
}

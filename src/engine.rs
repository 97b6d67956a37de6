//! The engine thread: owns llama.cpp (model, context, samplers) and turns jobs
//! into token events, many sequences at once (continuous batching).
//!
//! Each step is one `llama_decode` holding the next token of every generating
//! sequence plus prompt chunks of newly admitted ones, bounded by `n_batch`, so
//! a long prompt never freezes the others' token cadence. The `scheduler`
//! decides admission, KV pages and prefix reuse; this module executes it.
//!
//! Jobs arrive on a crossbeam channel; events go back on another one, and the
//! reactor is woken through a `mio::Waker` at most once per step, not once per
//! event (uWS's `loop->defer`). Each job carries an abort flag that the reactor
//! sets on `abort` or disconnect; it is checked before every step, and
//! llama.cpp's abort callback stops a decode in which every sequence was
//! aborted. With no work the thread blocks on the channel and uses no CPU.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use crate::llama::{
    self, Batch, Context, ContextParams, DecodeError, LlamaError, Model, ModelParams, Sampler,
    SamplerSpec, Token,
};
use crate::ops::Ops;
use crate::protocol::{EndReason, ErrorCode, Generation, PromptInput, Stats, Status};
use crate::scheduler::{self, MemOp, Request, Scheduler, Submitted};
use crate::text::{Step, TextStream};
use crate::watchdog::EngineState;

/// Identifies one request between the reactor and the engine.
pub type JobKey = u64;

pub struct Job {
    pub key: JobKey,
    /// The client's request id, for logs.
    pub id: String,
    pub input: PromptInput,
    pub params: Generation,
    pub cancel: Arc<AtomicBool>,
    pub received: Instant,
    /// `server.max_prompt_tokens`; 0: no limit but the context.
    pub max_prompt_tokens: usize,
}

pub enum Command {
    Infer(Box<Job>),
    Shutdown,
}

#[derive(Debug)]
pub enum Event {
    /// The request waits for a slot or KV pages; `position` 1 is next.
    Queued { key: JobKey, position: usize },
    Token {
        key: JobKey,
        text: String,
        prob: f32,
    },
    End {
        key: JobKey,
        reason: EndReason,
        stats: Stats,
    },
    Error {
        key: JobKey,
        code: ErrorCode,
        message: String,
    },
    /// The engine has ended every job and is exiting.
    Stopped,
}

/// The engine's side of the event channel.
pub struct EventSink {
    tx: Sender<Event>,
    waker: Arc<mio::Waker>,
    armed: Arc<AtomicBool>,
}

impl EventSink {
    pub fn new(tx: Sender<Event>, waker: Arc<mio::Waker>, armed: Arc<AtomicBool>) -> EventSink {
        EventSink { tx, waker, armed }
    }

    fn send(&self, event: Event) {
        // The reactor only goes away at exit; a send error then is harmless.
        let _ = self.tx.send(event);
    }

    /// Wakes the reactor unless a wake-up is already pending. The reactor
    /// disarms before it drains, so no event is ever left unseen.
    fn wake(&self) {
        if !self.armed.swap(true, Ordering::AcqRel)
            && let Err(e) = self.waker.wake()
        {
            log::error!("cannot wake the reactor: {e}");
        }
    }
}

pub struct EngineConfig {
    pub model_path: PathBuf,
    pub n_ctx: u32,
    pub n_batch: u32,
    pub threads: usize,
    pub n_gpu_layers: i32,
    pub repack: bool,
    pub slots: usize,
    pub page_size: usize,
    pub queue_limit: usize,
    pub cache_entries: usize,
    /// Prompt tokens a step may carry while other sequences are generating.
    pub prefill_chunk: usize,
    /// Overrides the model's own chat template.
    pub chat_template: Option<String>,
    /// Heartbeat, thermal pause, idle parking, metrics.
    pub ops: Arc<Ops>,
}

/// What the reactor needs to know once the model is loaded.
#[derive(Debug, Clone)]
pub struct Ready {
    pub model_name: String,
    pub n_ctx: u32,
}

pub struct EngineHandle {
    pub commands: Sender<Command>,
    /// Refreshed by the engine after every step.
    pub status: Arc<Mutex<Status>>,
    /// Set on shutdown: aborts the running decode at once.
    pub shutdown: Arc<AtomicBool>,
    pub thread: std::thread::JoinHandle<()>,
}

/// Starts the engine thread and waits until the model is loaded (or failed to).
pub fn spawn(config: EngineConfig, sink: EventSink) -> Result<(EngineHandle, Ready), LlamaError> {
    let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let shutdown = Arc::new(AtomicBool::new(false));
    let flag = shutdown.clone();
    let status = Arc::new(Mutex::new(Status::default()));
    let published = status.clone();
    let thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || run(config, sink, cmd_rx, flag, published, ready_tx))
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
            Err(LlamaError::Context(
                "the engine thread died while loading".into(),
            ))
        }
    }
}

fn run(
    config: EngineConfig,
    mut sink: EventSink,
    mut commands: Receiver<Command>,
    mut shutdown: Arc<AtomicBool>,
    mut status: Arc<Mutex<Status>>,
    ready: Sender<Result<Ready, LlamaError>>,
) {
    llama::init();
    log::info!("llama.cpp system info: {}", llama::system_info());
    let threads = config.threads as i32;
    let ops = config.ops.clone();
    // Sent once, at start-up; later (re)loads happen when waking from idle.
    let mut ready = Some(ready);
    let mut model: Option<Model> = None;
    // The request that woke a parked engine, and when it arrived.
    let mut wake: Option<(Instant, Box<Job>)> = None;
    loop {
        let failed = |e: LlamaError,
                      ready: &mut Option<Sender<_>>,
                      wake: &mut Option<(Instant, Box<Job>)>| {
            match (ready.take(), wake.take()) {
                (Some(tx), _) => {
                    let _ = tx.send(Err(e));
                    true
                }
                (None, Some((_, job))) => {
                    log::error!("cannot wake the engine: {e}");
                    sink.send(Event::Error {
                        key: job.key,
                        code: ErrorCode::Internal,
                        message: format!("the engine could not wake up: {e}"),
                    });
                    sink.wake();
                    false
                }
                (None, None) => false,
            }
        };
        if model.is_none() {
            match Model::load(
                &config.model_path,
                &ModelParams {
                    n_gpu_layers: config.n_gpu_layers,
                    repack: config.repack,
                },
            ) {
                Ok(m) => model = Some(m),
                Err(e) => {
                    if failed(e, &mut ready, &mut wake) {
                        return;
                    }
                }
            }
        }
        // Scoped so the context is gone before the model may be dropped.
        {
            let ctx = match model.as_ref().map(|model| {
                Context::new(
                    model,
                    &ContextParams {
                        n_ctx: config.n_ctx,
                        n_batch: config.n_batch,
                        n_seq_max: (config.slots + config.cache_entries) as u32,
                        n_threads: threads,
                        n_threads_batch: threads,
                    },
                )
            }) {
                Some(Ok(c)) => Some(c),
                Some(Err(e)) => {
                    if failed(e, &mut ready, &mut wake) {
                        return;
                    }
                    None
                }
                None => None,
            };
            if let Some(ctx) = ctx {
                let loaded = model.as_ref().expect("a context implies a model");
                let chat_template = config
                    .chat_template
                    .clone()
                    .or_else(|| loaded.chat_template());
                let n_ctx = ctx.n_ctx();
                if let Some(tx) = ready.take() {
                    if let Some(t) = &chat_template
                        && let Err(e) = Model::apply_chat_template(t, &[("user", "hi")])
                    {
                        let reason = format!(
                            "chat template {:?}: {e}",
                            t.chars().take(40).collect::<String>()
                        );
                        let _ = tx.send(Err(LlamaError::Context(reason)));
                        return;
                    }
                    let model_name = config
                        .model_path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    log::info!(
                        "model {} ({}), context {} tokens (trained {}), {} threads, {} slots, KV pages of {} cells",
                        config.model_path.display(),
                        loaded.description(),
                        n_ctx,
                        loaded.n_ctx_train(),
                        threads,
                        config.slots,
                        config.page_size,
                    );
                    let _ = tx.send(Ok(Ready { model_name, n_ctx }));
                }
                // A fresh scheduler: its KV bookkeeping and prefix cache describe
                // this context, which starts empty.
                let mut engine = Engine {
                    vocab_size: loaded.vocab().n_tokens() as usize,
                    eog: loaded.vocab().eog_tokens(),
                    chat_template,
                    batch: Batch::new(config.n_batch as usize, 1),
                    n_batch: config.n_batch as usize,
                    prefill_chunk: config.prefill_chunk.max(1),
                    scheduler: Scheduler::new(scheduler::Config {
                        n_ctx: n_ctx as usize,
                        page_size: config.page_size,
                        slots: config.slots,
                        cache_entries: config.cache_entries,
                        queue_limit: config.queue_limit,
                    }),
                    active: Vec::new(),
                    waiting: HashMap::new(),
                    model: loaded,
                    ctx,
                    sink,
                    commands,
                    shutdown,
                    status,
                    ops: ops.clone(),
                    stopping: false,
                };
                if let Some((since, job)) = wake.take() {
                    ops.woke(since.elapsed());
                    engine.submit(job);
                    ops.set_state(EngineState::Busy);
                }
                engine.publish();
                let exit = engine.serve();
                // Dropping the engine releases the context (KV cache, compute buffers).
                Engine {
                    sink,
                    commands,
                    shutdown,
                    status,
                    ..
                } = engine;
                if exit == Exit::Stopped {
                    break;
                }
                ops.parked();
            }
        }
        if ops.idle.unload_model {
            model = None;
        }
        // Parked (or a wake-up failed): the next request wakes the engine.
        ops.set_state(EngineState::Parked);
        match commands.recv() {
            Ok(Command::Infer(job)) => {
                ops.set_state(EngineState::Waking);
                wake = Some((job.received, job));
            }
            Ok(Command::Shutdown) | Err(_) => break,
        }
    }
    sink.send(Event::Stopped);
    sink.wake();
    log::info!("engine stopped");
}

/// Why `serve` returned.
#[derive(Debug, PartialEq, Eq)]
enum Exit {
    Stopped,
    /// Idle for `idle.park_after_s`: release the context until the next request.
    Park,
}

struct Engine<'m> {
    model: &'m Model,
    ctx: Context<'m>,
    batch: Batch,
    n_batch: usize,
    prefill_chunk: usize,
    vocab_size: usize,
    eog: Vec<Token>,
    chat_template: Option<String>,
    scheduler: Scheduler,
    /// Admitted sequences, in admission order (prefill goes first-come first-served).
    active: Vec<Seq>,
    /// Jobs the scheduler holds in its queue.
    waiting: HashMap<JobKey, Box<Job>>,
    sink: EventSink,
    commands: Receiver<Command>,
    shutdown: Arc<AtomicBool>,
    status: Arc<Mutex<Status>>,
    ops: Arc<Ops>,
    stopping: bool,
}

/// One admitted request.
struct Seq {
    job: Box<Job>,
    id: i32,
    prompt: Vec<Token>,
    /// Tokens whose cells this sequence holds, in position order.
    decoded: Vec<Token>,
    /// Sampled, sent, and to be decoded in the next step.
    pending: Option<Token>,
    /// Positions this sequence may fill (its reserved pages).
    limit: usize,
    sampler: Sampler,
    stream: TextStream,
    progress: Progress,
    /// Where this sequence's tokens sit in the current batch.
    chunk: usize,
    output: Option<i32>,
}

/// How a job ended, before it becomes an event.
enum Outcome {
    End(EndReason),
    Error(ErrorCode, String),
}

impl Engine<'_> {
    fn serve(&mut self) -> Exit {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() && !self.stopping {
                self.ops.set_state(EngineState::Idle);
                let command = match self.ops.park_after() {
                    Some(after) => match self.commands.recv_timeout(after) {
                        Err(RecvTimeoutError::Timeout) => return Exit::Park,
                        other => other.ok(),
                    },
                    None => self.commands.recv().ok(),
                };
                match command {
                    Some(Command::Infer(job)) => self.submit(job),
                    Some(Command::Shutdown) | None => self.stopping = true,
                }
                self.ops.set_state(EngineState::Busy);
            }
            self.poll_commands();
            self.thermal_pause();
            if self.stopping {
                self.fail_all(ErrorCode::ShuttingDown, "the server is shutting down");
                return Exit::Stopped;
            }
            self.reap_cancelled();
            self.admit();
            if self.active.is_empty() && !self.waiting.is_empty() {
                // Nothing can start yet (cannot happen with a consistent pool, but
                // never spin): wait for a command, or re-check cancellations soon.
                self.ops.beat();
                if let Ok(command) = self.commands.recv_timeout(Duration::from_millis(50)) {
                    match command {
                        Command::Infer(job) => self.submit(job),
                        Command::Shutdown => self.stopping = true,
                    }
                }
                continue;
            }
            self.step();
            self.publish();
            self.sink.wake();
            self.ops.beat();
        }
    }

    /// While the thermal throttle is on, no step starts; commands, aborts and
    /// shutdown are still served and the heartbeat goes on.
    fn thermal_pause(&mut self) {
        while self.ops.throttled()
            && !self.stopping
            && !(self.active.is_empty() && self.waiting.is_empty())
        {
            self.ops.beat();
            self.reap_cancelled();
            self.publish();
            self.sink.wake();
            match self.commands.recv_timeout(Duration::from_millis(50)) {
                Ok(Command::Infer(job)) => self.submit(job),
                Ok(Command::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                    self.stopping = true;
                    self.shutdown.store(true, Ordering::Relaxed);
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn publish(&self) {
        let snapshot = self.scheduler.status();
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
    }

    /// Takes every pending command without blocking.
    fn poll_commands(&mut self) {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Infer(job)) => self.submit(job),
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => {
                    self.stopping = true;
                    self.shutdown.store(true, Ordering::Relaxed);
                    return;
                }
                Err(TryRecvError::Empty) => return,
            }
        }
    }

    /// Tokenizes a job and queues it with the scheduler.
    fn submit(&mut self, job: Box<Job>) {
        let mut progress = Progress::new(&job);
        let tokens = match self.prompt_tokens(&job.input) {
            Ok(t) => t,
            Err(o) => return self.report(&job, &o, &progress),
        };
        progress.prompt_tokens = tokens.len();
        if job.max_prompt_tokens > 0 && tokens.len() > job.max_prompt_tokens {
            let message = format!(
                "the prompt has {} tokens; the limit is {} (server.max_prompt_tokens)",
                tokens.len(),
                job.max_prompt_tokens
            );
            let o = Outcome::Error(ErrorCode::ContextOverflow, message);
            return self.report(&job, &o, &progress);
        }
        let req = Request {
            key: job.key,
            tokens,
            max_tokens: job.params.max_tokens as usize,
        };
        match self.scheduler.submit(req) {
            Submitted::Queued { .. } => {
                self.waiting.insert(job.key, job);
            }
            Submitted::Rejected { code, message } => {
                self.report(&job, &Outcome::Error(code, message), &progress)
            }
        }
    }

    fn prompt_tokens(&self, input: &PromptInput) -> Result<Vec<Token>, Outcome> {
        let text = match input {
            PromptInput::Text(t) => t.clone(),
            PromptInput::Messages(messages) => {
                let template = self.chat_template.as_deref().ok_or_else(|| {
                    Outcome::Error(
                        ErrorCode::BadRequest,
                        "this model has no chat template: send \"prompt\" instead, or start the server with --chat-template".into(),
                    )
                })?;
                let pairs: Vec<(&str, &str)> = messages
                    .iter()
                    .map(|m| (m.role.as_str(), m.content.as_str()))
                    .collect();
                Model::apply_chat_template(template, &pairs).map_err(|e| {
                    Outcome::Error(
                        ErrorCode::BadRequest,
                        format!("cannot format messages: {e}"),
                    )
                })?
            }
        };
        self.model.vocab().tokenize(&text, true).map_err(|e| {
            Outcome::Error(
                ErrorCode::BadRequest,
                format!("cannot tokenize the prompt: {e}"),
            )
        })
    }

    /// Ends aborted requests, waiting or running, before the next step.
    fn reap_cancelled(&mut self) {
        let cancelled: Vec<JobKey> = self
            .waiting
            .iter()
            .filter(|(_, j)| j.cancel.load(Ordering::Relaxed))
            .map(|(&k, _)| k)
            .collect();
        for key in cancelled {
            self.scheduler.cancel_queued(key);
            let job = self.waiting.remove(&key).expect("listed above");
            self.report(&job, &Outcome::End(EndReason::Abort), &Progress::new(&job));
        }
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].job.cancel.load(Ordering::Relaxed) {
                self.finish(i, Outcome::End(EndReason::Abort));
            } else {
                i += 1;
            }
        }
    }

    /// Starts every request the scheduler admits and tells the others their place.
    fn admit(&mut self) {
        for (req, admitted) in self.scheduler.admit() {
            let job = self
                .waiting
                .remove(&req.key)
                .expect("admitted jobs are waiting");
            self.apply(&admitted.ops);
            let p = &job.params;
            let n_ctx = self.ctx.n_ctx() as i32;
            let spec = SamplerSpec {
                temp: p.temp,
                top_k: p.top_k,
                top_p: p.top_p,
                min_p: p.min_p,
                repeat_penalty: p.repeat_penalty,
                repeat_last_n: if p.repeat_last_n < 0 {
                    n_ctx
                } else {
                    p.repeat_last_n
                },
                seed: p.seed.unwrap_or_else(random_seed),
                banned: if p.ignore_eos {
                    self.eog.clone()
                } else {
                    Vec::new()
                },
            };
            let mut progress = Progress::new(&job);
            progress.prompt_tokens = req.tokens.len();
            progress.cached_tokens = admitted.cached_tokens;
            self.active.push(Seq {
                sampler: Sampler::new(&spec, self.vocab_size as i32),
                stream: TextStream::new(p.stop.clone()),
                id: admitted.seq,
                decoded: req.tokens[..admitted.cached_tokens].to_vec(),
                prompt: req.tokens,
                pending: None,
                limit: admitted.limit,
                progress,
                chunk: 0,
                output: None,
                job,
            });
        }
        for (key, position) in self.scheduler.position_updates() {
            self.sink.send(Event::Queued { key, position });
        }
    }

    fn apply(&mut self, ops: &[MemOp]) {
        for op in ops {
            match *op {
                MemOp::Copy { src, dst, len } => self.ctx.seq_cp(src, dst, len),
                MemOp::Remove { seq, from } => self.ctx.seq_rm(seq, from),
            }
        }
    }

    /// One decode: the next token of every generating sequence, then prompt
    /// chunks of the others while the batch has room.
    fn step(&mut self) {
        if self.active.is_empty() {
            return;
        }
        self.batch.clear();
        for s in &mut self.active {
            s.chunk = 0;
            s.output = None;
            if let Some(token) = s.pending {
                s.output = Some(self.batch.len() as i32);
                self.batch.push(token, s.decoded.len() as i32, s.id, true);
            }
        }
        // While others are generating, a step takes at most `prefill_chunk`
        // prompt tokens, so their inter-token gap stays short; alone, a
        // prompt goes through in chunks as large as the batch allows.
        let prefill_limit = if self.batch.len() > 0 {
            self.batch.len() + self.prefill_chunk
        } else {
            self.n_batch
        };
        for s in &mut self.active {
            let remaining = s.prompt.len() - s.decoded.len().min(s.prompt.len());
            let room = prefill_limit
                .min(self.n_batch)
                .saturating_sub(self.batch.len());
            if s.pending.is_some() || remaining == 0 || room == 0 {
                continue;
            }
            let n = remaining.min(room);
            let start = s.decoded.len();
            for (j, &t) in s.prompt[start..start + n].iter().enumerate() {
                let last = start + j + 1 == s.prompt.len();
                if last {
                    s.output = Some(self.batch.len() as i32);
                }
                self.batch.push(t, (start + j) as i32, s.id, last);
            }
            s.chunk = n;
        }
        let result = loop {
            let flags: Vec<Arc<AtomicBool>> = self
                .active
                .iter()
                .filter(|s| s.chunk > 0 || s.output.is_some())
                .map(|s| s.job.cancel.clone())
                .collect();
            let shutdown = self.shutdown.clone();
            let ops = self.ops.clone();
            // One client's abort must not throw away the others' work: only
            // interrupt a decode in which every sequence was aborted.
            let should_abort = move || {
                ops.beat(); // polled between graph nodes: a long decode is not a stall
                shutdown.load(Ordering::Relaxed) || flags.iter().all(|f| f.load(Ordering::Relaxed))
            };
            match self.ctx.decode(&self.batch, &should_abort) {
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
                let message = format!("the engine failed: {e}");
                while let Some(i) = self
                    .active
                    .iter()
                    .position(|s| s.chunk > 0 || s.output.is_some())
                {
                    self.finish(i, Outcome::Error(ErrorCode::Internal, message.clone()));
                }
                return;
            }
        }
        let mut i = 0;
        while i < self.active.len() {
            let s = &mut self.active[i];
            if s.chunk > 0 {
                let start = s.decoded.len();
                s.decoded
                    .extend_from_slice(&s.prompt[start..start + s.chunk]);
            } else if let Some(t) = s.pending.take() {
                s.decoded.push(t);
            }
            match s.output {
                Some(row) => match self.on_output(i, row) {
                    Some(outcome) => self.finish(i, outcome),
                    None => i += 1,
                },
                None => i += 1,
            }
        }
    }

    /// Samples sequence `i`'s next token from batch row `row` and streams its
    /// text; returns how the request ended, if it did.
    fn on_output(&mut self, i: usize, row: i32) -> Option<Outcome> {
        let vocab = self.model.vocab();
        let s = &mut self.active[i];
        let t0 = Instant::now();
        let (token, prob) = s.sampler.sample(&self.ctx, row, self.vocab_size);
        s.progress.sampling += t0.elapsed();
        s.progress.first_token.get_or_insert_with(Instant::now);
        if vocab.is_eog(token) {
            let text = s.stream.finish();
            self.send_text(i, text, prob);
            return Some(Outcome::End(EndReason::Eos));
        }
        s.progress.completion_tokens += 1;
        self.ops.on_token();
        let mut bytes = Vec::with_capacity(16);
        vocab.piece(token, &mut bytes);
        let (text, stopped) = match s.stream.push(&bytes) {
            Step::Emit(text) => (text, false),
            Step::Stop(text) => (text, true),
        };
        let done = s.progress.completion_tokens >= s.job.params.max_tokens as usize
            || s.decoded.len() >= s.limit;
        let tail = if done && !stopped {
            s.stream.finish()
        } else {
            String::new()
        };
        s.pending = Some(token);
        self.send_text(i, text + &tail, prob);
        if stopped {
            Some(Outcome::End(EndReason::Stop))
        } else if done {
            Some(Outcome::End(EndReason::Length))
        } else {
            None
        }
    }

    fn send_text(&self, i: usize, text: String, prob: f32) {
        if !text.is_empty() {
            let key = self.active[i].job.key;
            self.sink.send(Event::Token { key, text, prob });
        }
    }

    /// Ends active sequence `i`: its KV pages go back to the scheduler (whole
    /// pages of a cleanly ended request stay as a cached prefix).
    fn finish(&mut self, i: usize, outcome: Outcome) {
        let s = self.active.remove(i);
        let keep: &[Token] = match outcome {
            Outcome::End(_) => &s.decoded,
            Outcome::Error(..) => &[],
        };
        let ops = self.scheduler.finish(s.job.key, keep);
        self.apply(&ops);
        debug_assert!(
            self.scheduler.check().is_ok(),
            "{:?}",
            self.scheduler.check()
        );
        self.report(&s.job, &outcome, &s.progress);
    }

    /// Ends every request (shutdown).
    fn fail_all(&mut self, code: ErrorCode, message: &str) {
        while !self.active.is_empty() {
            self.finish(0, Outcome::Error(code, message.to_owned()));
        }
        let keys: Vec<JobKey> = self.waiting.keys().copied().collect();
        for key in keys {
            self.scheduler.cancel_queued(key);
            let job = self.waiting.remove(&key).expect("listed above");
            self.report(
                &job,
                &Outcome::Error(code, message.to_owned()),
                &Progress::new(&job),
            );
        }
    }

    fn report(&self, job: &Job, outcome: &Outcome, progress: &Progress) {
        let key = job.key;
        match outcome {
            Outcome::End(reason) => {
                let stats = progress.stats();
                log::info!(
                    "request {} ended ({:?}): prompt {} tokens ({} cached), completion {} tokens, ttft {:.1} ms, {:.1} tok/s, total {:.1} ms",
                    job.id,
                    reason,
                    stats.prompt_tokens,
                    stats.cached_tokens,
                    stats.completion_tokens,
                    stats.ttft_ms,
                    stats.tps,
                    stats.ms
                );
                log::debug!(
                    "request {}: sampling took {:.2} ms in all",
                    job.id,
                    progress.sampling.as_secs_f64() * 1e3
                );
                self.sink.send(Event::End {
                    key,
                    reason: *reason,
                    stats,
                });
            }
            Outcome::Error(code, message) => {
                log::info!("request {} failed ({code:?}): {message}", job.id);
                self.sink.send(Event::Error {
                    key,
                    code: *code,
                    message: message.clone(),
                });
            }
        }
    }
}

/// Timing and counts of one job, for its `end` stats.
struct Progress {
    received: Instant,
    first_token: Option<Instant>,
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
    /// Time spent choosing tokens (logged at debug level with each request).
    sampling: std::time::Duration,
}

impl Progress {
    fn new(job: &Job) -> Progress {
        Progress {
            received: job.received,
            first_token: None,
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            sampling: std::time::Duration::ZERO,
        }
    }

    /// `ttft_ms`: receipt to first sampled token. `tps`: tokens after the
    /// first over the time since the first (pure decode rate).
    fn stats(&self) -> Stats {
        let now = Instant::now();
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        let ttft_ms = self.first_token.map_or(0.0, |t| ms(t - self.received));
        let decode_s = self.first_token.map_or(0.0, |t| (now - t).as_secs_f64());
        let tps = if self.completion_tokens > 1 && decode_s > 0.0 {
            (self.completion_tokens - 1) as f64 / decode_s
        } else {
            0.0
        };
        Stats {
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.cached_tokens,
            completion_tokens: self.completion_tokens,
            ttft_ms,
            ms: ms(now - self.received),
            tps,
        }
    }
}

fn random_seed() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now()) as u32
}

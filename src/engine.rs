//! The engine thread: owns llama.cpp (model, context, samplers) and turns jobs
//! into token events.
//!
//! Jobs arrive on a crossbeam channel; events go back on another one, and the
//! reactor is woken through a `mio::Waker` at most once per engine step, not
//! once per event (uWS's `loop->defer`). Each job carries an abort flag that the
//! reactor sets on `abort` or disconnect; llama.cpp's abort callback polls it,
//! so a long prefill stops within milliseconds. With no work the thread blocks
//! on the channel and uses no CPU.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::llama::{
    self, Batch, Context, ContextParams, DecodeError, LlamaError, Model, ModelParams, Sampler,
    SamplerSpec, Token,
};
use crate::protocol::{EndReason, ErrorCode, Generation, PromptInput, Stats};
use crate::text::{Step, TextStream};

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
}

pub enum Command {
    Infer(Box<Job>),
    Shutdown,
}

#[derive(Debug)]
pub enum Event {
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
    /// Overrides the model's own chat template.
    pub chat_template: Option<String>,
}

/// What the reactor needs to know once the model is loaded.
#[derive(Debug, Clone)]
pub struct Ready {
    pub model_name: String,
    pub n_ctx: u32,
}

pub struct EngineHandle {
    pub commands: Sender<Command>,
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
    let thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || run(config, sink, cmd_rx, flag, ready_tx))
        .expect("cannot spawn the engine thread");
    match ready_rx.recv() {
        Ok(Ok(ready)) => Ok((
            EngineHandle {
                commands: cmd_tx,
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
    sink: EventSink,
    commands: Receiver<Command>,
    shutdown: Arc<AtomicBool>,
    ready: Sender<Result<Ready, LlamaError>>,
) {
    llama::init();
    log::info!("llama.cpp system info: {}", llama::system_info());
    let threads = config.threads as i32;
    let model = match Model::load(
        &config.model_path,
        &ModelParams {
            n_gpu_layers: config.n_gpu_layers,
        },
    ) {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let ctx = match Context::new(
        &model,
        &ContextParams {
            n_ctx: config.n_ctx,
            n_batch: config.n_batch,
            n_seq_max: 1,
            n_threads: threads,
            n_threads_batch: threads,
        },
    ) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let model_name = config
        .model_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    log::info!(
        "model {} ({}), context {} tokens (trained {}), {} threads",
        config.model_path.display(),
        model.description(),
        ctx.n_ctx(),
        model.n_ctx_train(),
        threads
    );
    let chat_template = config
        .chat_template
        .clone()
        .or_else(|| model.chat_template());
    if let Some(t) = &chat_template
        && let Err(e) = Model::apply_chat_template(t, &[("user", "hi")])
    {
        let reason = format!(
            "chat template {:?}: {e}",
            t.chars().take(40).collect::<String>()
        );
        let _ = ready.send(Err(LlamaError::Context(reason)));
        return;
    }
    let n_ctx = ctx.n_ctx();
    let _ = ready.send(Ok(Ready { model_name, n_ctx }));
    let mut engine = Engine {
        vocab_size: model.vocab().n_tokens() as usize,
        eog: model.vocab().eog_tokens(),
        chat_template,
        batch: Batch::new(config.n_batch as usize, 1),
        n_batch: config.n_batch as usize,
        model: &model,
        ctx,
        sink,
        commands,
        shutdown,
        queue: VecDeque::new(),
        stopping: false,
    };
    engine.serve();
    engine.sink.send(Event::Stopped);
    engine.sink.wake();
    log::info!("engine stopped");
}

struct Engine<'m> {
    model: &'m Model,
    ctx: Context<'m>,
    batch: Batch,
    n_batch: usize,
    vocab_size: usize,
    eog: Vec<Token>,
    chat_template: Option<String>,
    sink: EventSink,
    commands: Receiver<Command>,
    shutdown: Arc<AtomicBool>,
    /// Jobs received but not started, in arrival order.
    queue: VecDeque<Box<Job>>,
    stopping: bool,
}

/// How a job ended, before it becomes an event.
enum Outcome {
    End(EndReason),
    Error(ErrorCode, String),
}

impl Engine<'_> {
    fn serve(&mut self) {
        loop {
            if self.queue.is_empty() && !self.stopping {
                match self.commands.recv() {
                    Ok(Command::Infer(job)) => self.queue.push_back(job),
                    Ok(Command::Shutdown) | Err(_) => self.stopping = true,
                }
            }
            self.poll_commands();
            let Some(job) = self.queue.pop_front() else {
                if self.stopping {
                    return;
                }
                continue;
            };
            if self.stopping {
                let outcome = Outcome::Error(
                    ErrorCode::ShuttingDown,
                    "the server is shutting down".into(),
                );
                self.finish(&job, &outcome, &Progress::new(&job));
            } else {
                self.run_job(job);
            }
        }
    }

    /// Takes every pending command without blocking; ends cancelled queued jobs.
    fn poll_commands(&mut self) {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Infer(job)) => self.queue.push_back(job),
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => {
                    self.stopping = true;
                    self.shutdown.store(true, Ordering::Relaxed);
                    break;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        let mut i = 0;
        while i < self.queue.len() {
            if self.queue[i].cancel.load(Ordering::Relaxed) {
                let job = self.queue.remove(i).expect("index checked");
                self.finish(&job, &Outcome::End(EndReason::Abort), &Progress::new(&job));
            } else {
                i += 1;
            }
        }
    }

    fn run_job(&mut self, job: Box<Job>) {
        let mut progress = Progress::new(&job);
        let outcome = self.generate(&job, &mut progress);
        self.finish(&job, &outcome, &progress);
    }

    fn finish(&self, job: &Job, outcome: &Outcome, progress: &Progress) {
        let key = job.key;
        match outcome {
            Outcome::End(reason) => {
                let stats = progress.stats();
                log::info!(
                    "request {} ended ({:?}): prompt {} tokens, completion {} tokens, ttft {:.1} ms, {:.1} tok/s, total {:.1} ms",
                    job.id,
                    reason,
                    stats.prompt_tokens,
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
        self.sink.wake();
    }

    fn prompt_text(&self, input: &PromptInput) -> Result<String, Outcome> {
        match input {
            PromptInput::Text(t) => Ok(t.clone()),
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
                })
            }
        }
    }

    fn generate(&mut self, job: &Job, progress: &mut Progress) -> Outcome {
        let text = match self.prompt_text(&job.input) {
            Ok(t) => t,
            Err(o) => return o,
        };
        let tokens = match self.model.vocab().tokenize(&text, true) {
            Ok(t) => t,
            Err(e) => {
                return Outcome::Error(
                    ErrorCode::BadRequest,
                    format!("cannot tokenize the prompt: {e}"),
                );
            }
        };
        progress.prompt_tokens = tokens.len();
        let n_ctx = self.ctx.n_ctx() as usize;
        if tokens.len() >= n_ctx {
            return Outcome::Error(
                ErrorCode::ContextOverflow,
                format!(
                    "the prompt is {} tokens but the context holds {} (at least one must be left for the reply)",
                    tokens.len(),
                    n_ctx
                ),
            );
        }
        let p = &job.params;
        let spec = SamplerSpec {
            temp: p.temp,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            repeat_penalty: p.repeat_penalty,
            repeat_last_n: if p.repeat_last_n < 0 {
                n_ctx as i32
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
        let mut sampler = Sampler::new(&spec, self.vocab_size as i32);
        let mut stream = TextStream::new(p.stop.clone());
        let cancel = job.cancel.clone();
        let shutdown = self.shutdown.clone();
        let should_abort =
            move || cancel.load(Ordering::Relaxed) || shutdown.load(Ordering::Relaxed);

        self.ctx.clear_memory();
        for (c, chunk) in tokens.chunks(self.n_batch).enumerate() {
            self.batch.clear();
            let last_chunk = (c + 1) * self.n_batch >= tokens.len();
            for (i, &t) in chunk.iter().enumerate() {
                let pos = c * self.n_batch + i;
                self.batch
                    .push(t, pos as i32, 0, last_chunk && i + 1 == chunk.len());
            }
            if let Err(e) = self.ctx.decode(&self.batch, &should_abort) {
                return self.decode_failed(e);
            }
            self.poll_commands();
        }

        let mut n_past = tokens.len();
        let mut bytes = Vec::with_capacity(64);
        loop {
            if should_abort() {
                return self.aborted();
            }
            let t0 = Instant::now();
            let (token, prob) = sampler.sample(&self.ctx, -1, self.vocab_size);
            progress.sampling += t0.elapsed();
            progress.first_token.get_or_insert_with(Instant::now);
            if self.model.vocab().is_eog(token) {
                self.send_text(job.key, stream.finish(), prob);
                return Outcome::End(EndReason::Eos);
            }
            progress.completion_tokens += 1;
            bytes.clear();
            self.model.vocab().piece(token, &mut bytes);
            match stream.push(&bytes) {
                Step::Emit(text) => self.send_text(job.key, text, prob),
                Step::Stop(text) => {
                    self.send_text(job.key, text, prob);
                    return Outcome::End(EndReason::Stop);
                }
            }
            if progress.completion_tokens >= p.max_tokens as usize || n_past >= n_ctx {
                self.send_text(job.key, stream.finish(), prob);
                return Outcome::End(EndReason::Length);
            }
            self.sink.wake();
            self.batch.clear();
            self.batch.push(token, n_past as i32, 0, true);
            if let Err(e) = self.ctx.decode(&self.batch, &should_abort) {
                return self.decode_failed(e);
            }
            n_past += 1;
            self.poll_commands();
        }
    }

    fn send_text(&self, key: JobKey, text: String, prob: f32) {
        if !text.is_empty() {
            self.sink.send(Event::Token { key, text, prob });
        }
    }

    fn aborted(&self) -> Outcome {
        if self.shutdown.load(Ordering::Relaxed) {
            Outcome::Error(
                ErrorCode::ShuttingDown,
                "the server is shutting down".into(),
            )
        } else {
            Outcome::End(EndReason::Abort)
        }
    }

    fn decode_failed(&self, e: DecodeError) -> Outcome {
        match e {
            DecodeError::Aborted => self.aborted(),
            other => {
                log::error!("llama_decode failed: {other}");
                Outcome::Error(ErrorCode::Internal, format!("the engine failed: {other}"))
            }
        }
    }
}

/// Timing and counts of one job, for its `end` stats.
struct Progress {
    received: Instant,
    first_token: Option<Instant>,
    prompt_tokens: usize,
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

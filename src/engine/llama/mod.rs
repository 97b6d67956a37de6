//! llama.cpp behind the `Backend` seam: `LlamaLoader` loads the GGUF once and
//! opens a context over it (again after every park); `LlamaBackend` is that
//! context with the model's vocabulary and chat template. Safe code only:
//! every `unsafe` block is in `ffi`.

pub mod ffi;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use ffi::{Batch, Context, ContextParams, Model, ModelParams, Sampler};

use crate::core::SamplingParams;
use crate::engine::backend::{
    Backend, BackendError, BatchToken, DecodeError, Filter, Loader, Sampled, SeqId, Token,
};
use crate::engine::guide::Grammars;
use crate::engine::template::{self, ChatTemplate};

pub use ffi::{exit_now, system_info, version};

/// Everything needed to load the model and open contexts over it.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub model_path: PathBuf,
    pub n_ctx: u32,
    pub n_batch: u32,
    /// Sequence ids the context must provide (slots plus cache entries).
    pub n_seq_max: u32,
    pub threads: usize,
    pub n_gpu_layers: i32,
    pub repack: bool,
    /// Overrides the model's own chat template.
    pub chat_template: Option<String>,
    /// Prepare constrained decoding (on a thread of its own, after the
    /// first load); off, constrained requests are refused.
    pub constraints: bool,
}

pub struct LlamaLoader {
    config: LlamaConfig,
    /// Built from the vocabulary after the first load, kept across parks
    /// (the model file does not change).
    grammars: Arc<OnceLock<Result<Grammars, String>>>,
}

impl LlamaLoader {
    pub fn new(config: LlamaConfig) -> LlamaLoader {
        ffi::init();
        LlamaLoader {
            config,
            grammars: Arc::default(),
        }
    }

    /// Builds the constraint compiler on a thread of its own, so that
    /// serving starts at once; a constrained request that comes before it
    /// is ready waits for it. The thread runs at the lowest priority: it
    /// takes about a second of a core, and beside the first requests' decodes
    /// (which use every core) it made their steps several times slower.
    fn prepare_grammars(&self, model: &Model) {
        let vocab = model.vocab();
        let (tokens, eog) = (vocab.all_token_bytes(), vocab.eog_tokens());
        let cell = self.grammars.clone();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let spawned = std::thread::Builder::new()
            .name("grammars".into())
            .spawn(move || {
                if !ffi::lower_thread_priority() {
                    log::debug!("constrained decoding is prepared at normal priority");
                }
                cell.get_or_init(|| {
                    let _ = tx.send(());
                    Grammars::new(&tokens, &eog).map_err(|e| e.0)
                });
            });
        match spawned {
            // Once the thread runs the initializer, a caller blocks on it.
            Ok(_) => {
                let _ = rx.recv();
            }
            Err(e) => log::warn!("cannot start preparing constrained decoding: {e}"),
        }
    }
}

impl Loader for LlamaLoader {
    type Model = Model;
    type Backend<'m> = LlamaBackend<'m>;

    fn load(&self) -> Result<Model, BackendError> {
        let model = Model::load(
            &self.config.model_path,
            &ModelParams {
                n_gpu_layers: self.config.n_gpu_layers,
                repack: self.config.repack,
            },
        )?;
        if self.config.constraints && self.grammars.get().is_none() {
            self.prepare_grammars(&model);
        }
        Ok(model)
    }

    fn open<'m>(&'m self, model: &'m Model) -> Result<LlamaBackend<'m>, BackendError> {
        let c = &self.config;
        let threads = c.threads as i32;
        let ctx = Context::new(
            model,
            &ContextParams {
                n_ctx: c.n_ctx,
                n_batch: c.n_batch,
                n_seq_max: c.n_seq_max,
                n_threads: threads,
                n_threads_batch: threads,
            },
        )?;
        let vocab = model.vocab();
        let chat = match c.chat_template.clone().or_else(|| model.chat_template()) {
            None => Chat::None,
            Some(text) => {
                let bad = |e: String| {
                    let shown: String = text.chars().take(40).collect();
                    BackendError::BadChatTemplate(format!("{shown:?}: {e}"))
                };
                let chat = if template::is_jinja(&text) {
                    let (bos, eos) = vocab.bos_eos_text();
                    Chat::Jinja(Box::new(ChatTemplate::new(&text, &bos, &eos).map_err(bad)?))
                } else {
                    Chat::Builtin(text.clone())
                };
                chat.render(&[("user", "hi")])
                    .map_err(|e| bad(e.to_string()))?;
                chat
            }
        };
        let mut backend = LlamaBackend {
            eog: vocab.eog_tokens(),
            grammars: &self.grammars,
            batch: Batch::new(c.n_batch as usize, 1),
            chat,
            model,
            ctx,
            one_row_ms: None,
        };
        backend.one_row_ms = backend.warm_up();
        Ok(backend)
    }

    fn model_name(&self) -> String {
        self.config
            .model_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn binding(&self, model: &Model) -> String {
        let c = &self.config;
        let file = model_fingerprint(&c.model_path).unwrap_or_else(|e| format!("unreadable ({e})"));
        let template = c
            .chat_template
            .clone()
            .or_else(|| model.chat_template())
            .map_or(0, |t| crc32fast::hash(t.as_bytes()));
        format!(
            "model {file}; inference-core {}; llama.cpp {} ({}); n_ctx {}; n_batch {}; template {template:08x}",
            env!("CARGO_PKG_VERSION"),
            version(),
            system_info(),
            c.n_ctx,
            c.n_batch
        )
    }

    fn describe(&self, model: &Model) -> String {
        format!(
            "model {} ({}, trained context {}), {} threads",
            self.config.model_path.display(),
            model.description(),
            model.n_ctx_train(),
            self.config.threads
        )
    }
}

/// The model file's size and CRC-32 (read through the page cache: llama.cpp
/// has just mapped it).
fn model_fingerprint(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(format!("{size} bytes crc32 {:08x}", hasher.finalize()))
}

pub struct LlamaBackend<'m> {
    model: &'m Model,
    ctx: Context<'m>,
    batch: Batch,
    eog: Vec<Token>,
    grammars: &'m OnceLock<Result<Grammars, String>>,
    chat: Chat,
    /// What `warm_up` measured.
    one_row_ms: Option<f64>,
}

impl LlamaBackend<'_> {
    /// Decodes two one-token steps of sequence 0 and drops their cells,
    /// leaving the pool empty: the first request (or the one that wakes a
    /// parked engine) then finds the graph allocated and the worker threads
    /// started, and the engine knows a single stream's step. Returns the
    /// second (warm) step's time (ms).
    fn warm_up(&mut self) -> Option<f64> {
        let token = self.tokenize("\n", false, false).ok()?.first().copied()?;
        let mut warm = None;
        for pos in 0..2 {
            let t0 = Instant::now();
            let one = [BatchToken {
                token,
                pos,
                seq: 0,
                output: true,
            }];
            if let Err(e) = self.decode(&one, &|| false) {
                log::warn!("warm-up decode failed: {e}");
                break;
            }
            if pos == 1 {
                warm = Some(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        self.ctx.seq_rm(0, 0);
        if let Some(ms) = warm {
            log::debug!("warm-up: a one-token step takes {ms:.1} ms");
        }
        warm
    }
}

/// How conversations are rendered.
enum Chat {
    None,
    /// A Jinja template (the GGUF's own, or given), rendered by minijinja.
    Jinja(Box<ChatTemplate>),
    /// The name of one of llama.cpp's built-in templates (`gemma`, `chatml`...).
    Builtin(String),
}

impl Chat {
    fn render(&self, messages: &[(&str, &str)]) -> Result<String, BackendError> {
        match self {
            Chat::None => Err(BackendError::NoChatTemplate),
            Chat::Jinja(t) => t.render(messages).map_err(BackendError::Template),
            Chat::Builtin(name) => Model::apply_chat_template(name, messages),
        }
    }
}

impl Backend for LlamaBackend<'_> {
    type Sampler = Sampler;

    fn n_ctx(&self) -> usize {
        self.ctx.n_ctx() as usize
    }

    fn tokenize(
        &self,
        text: &str,
        add_bos: bool,
        special: bool,
    ) -> Result<Vec<Token>, BackendError> {
        self.model.vocab().tokenize(text, add_bos, special)
    }

    fn has_chat_template(&self) -> bool {
        !matches!(self.chat, Chat::None)
    }

    fn render_chat(&self, messages: &[(&str, &str)]) -> Result<String, BackendError> {
        self.chat.render(messages)
    }

    fn is_eog(&self, token: Token) -> bool {
        self.model.vocab().is_eog(token)
    }

    fn eog_tokens(&self) -> &[Token] {
        &self.eog
    }

    fn n_vocab(&self) -> usize {
        self.model.vocab().n_tokens() as usize
    }

    fn grammars(&self) -> Result<&Grammars, BackendError> {
        let built = self
            .grammars
            .get_or_init(|| Err("it is off on this server (constraints.enabled = false)".into()));
        built
            .as_ref()
            .map_err(|e| BackendError::Grammars(e.clone()))
    }

    fn piece(&self, token: Token, out: &mut Vec<u8>) {
        self.model.vocab().piece(token, out)
    }

    fn threads(&self) -> usize {
        self.ctx.threads()
    }

    fn set_threads(&mut self, n: usize) {
        if let Err(e) = self.ctx.set_threads(n) {
            log::warn!("{e}: decoding with {} threads still", self.ctx.threads());
        }
    }

    fn one_row_ms(&self) -> Option<f64> {
        self.one_row_ms
    }

    fn decode(
        &mut self,
        batch: &[BatchToken],
        should_abort: &(dyn Fn() -> bool + Sync),
    ) -> Result<(), DecodeError> {
        self.batch.clear();
        for &t in batch {
            self.batch.push(t);
        }
        self.ctx.decode(&self.batch, should_abort)
    }

    fn sampler(&self, params: &SamplingParams, seed: u32) -> Result<Sampler, BackendError> {
        Sampler::new(params, seed, self.model.vocab(), self.ctx.n_ctx() as i32)
    }

    fn sample(
        &mut self,
        sampler: &mut Sampler,
        row: usize,
        filter: &Filter<'_>,
    ) -> Result<Sampled, BackendError> {
        sampler.sample(&self.ctx, row, filter)
    }

    fn seq_cp(&mut self, src: SeqId, dst: SeqId, len: usize) {
        self.ctx.seq_cp(src, dst, len)
    }

    fn seq_rm(&mut self, seq: SeqId, from: usize) {
        self.ctx.seq_rm(seq, from)
    }

    fn seq_save(&self, seq: SeqId) -> Result<Vec<u8>, BackendError> {
        self.ctx.seq_state(seq)
    }

    fn seq_load(&mut self, seq: SeqId, state: &[u8]) -> Result<(), BackendError> {
        self.ctx.set_seq_state(seq, state)
    }
}

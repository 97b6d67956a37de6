//! The seam under the engine: what the step loop needs from a model.
//!
//! `Backend` is one loaded model with its KV memory: tokenize, render a chat,
//! decode a batch, sample a row, share or drop sequence cells. `Loader` makes
//! them: it loads the weights once and opens a backend over them, again after
//! every park. llama.cpp implements both (`engine::llama`); a small fake does
//! in the unit tests, so the step loop runs without a model.

use crate::core::SamplingParams;
use crate::engine::guide::{Grammars, TokenMask};

pub type Token = i32;
/// A llama.cpp sequence id: one per running request and per cached prefix.
pub type SeqId = i32;

/// One token of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchToken {
    pub token: Token,
    pub pos: usize,
    pub seq: SeqId,
    /// Whether its logits are wanted (a row to sample from).
    pub output: bool,
}

/// Result of a decode that did not go through, as llama.h documents them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("no KV slot for the batch")]
    NoKvSlot,
    #[error("aborted")]
    Aborted,
    #[error("invalid batch")]
    InvalidBatch,
    #[error("llama_decode failed with code {0}")]
    Fatal(i32),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    #[error("model file not found: {0}")]
    ModelMissing(String),
    #[error("cannot load model {path}: {reason}")]
    ModelLoad { path: String, reason: String },
    #[error("cannot create a llama.cpp context: {0}")]
    Context(String),
    #[error("chat template {0}")]
    BadChatTemplate(String),
    #[error("this model has no chat template")]
    NoChatTemplate,
    #[error("text contains a NUL byte")]
    NulByte,
    #[error("tokenization failed ({0})")]
    Tokenize(i32),
    #[error("llama.cpp does not support this chat template")]
    UnsupportedChatTemplate,
    #[error("{0}")]
    Template(String),
    #[error("no logits for batch row {0}: it was not requested in the last decode")]
    NoLogits(usize),
    #[error("the sampler chain selected no token")]
    NothingSampled,
    #[error("sequence state: {0}")]
    State(String),
    #[error("constrained decoding is unavailable: {0}")]
    Grammars(String),
    #[error("invalid GBNF grammar: {0}")]
    Grammar(String),
    /// The grammar allows nothing more that may be sampled (it is complete
    /// and its end-of-generation token is banned).
    #[error("the grammar is complete")]
    GrammarComplete,
}

/// A sampled token and the probability the model gave it: the softmax of the
/// raw logits (temperature 1, before any truncation), on every path.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: Token,
    pub prob: f32,
    /// With `logprobs` asked for: the most likely tokens and their
    /// log-probabilities, most likely first.
    pub top: Option<Vec<(Token, f32)>>,
}

/// The tokens a row may be sampled from this step.
#[derive(Clone, Copy, Default)]
pub struct Filter<'a> {
    /// Only these (a constrained request's next tokens).
    pub mask: Option<&'a TokenMask>,
    /// Never these (end-of-generation tokens before `min_tokens`, or with
    /// `ignore_eos`).
    pub banned: &'a [Token],
}

impl Filter<'_> {
    pub fn allows(&self, token: Token) -> bool {
        self.mask.is_none_or(|m| m.is_allowed(token as u32)) && !self.banned.contains(&token)
    }
}

pub trait Backend {
    /// Per-request sampling state (a llama.cpp sampler chain).
    type Sampler;

    /// KV cells in the pool.
    fn n_ctx(&self) -> usize;
    /// Tokenizes `text`; `add_bos` adds the model's start token, `special`
    /// parses control tokens written as text.
    fn tokenize(
        &self,
        text: &str,
        add_bos: bool,
        special: bool,
    ) -> Result<Vec<Token>, BackendError>;
    fn has_chat_template(&self) -> bool;
    /// Renders `(role, content)` turns with the chat template and opens the
    /// assistant's turn.
    fn render_chat(&self, messages: &[(&str, &str)]) -> Result<String, BackendError>;
    fn is_eog(&self, token: Token) -> bool;
    /// Every end-of-generation token.
    fn eog_tokens(&self) -> &[Token];
    /// Tokens in the vocabulary.
    fn n_vocab(&self) -> usize;
    /// The compiler of constraints over this vocabulary, built on first use.
    fn grammars(&self) -> Result<&Grammars, BackendError>;
    /// Appends the bytes of `token` (maybe part of a UTF-8 character).
    fn piece(&self, token: Token, out: &mut Vec<u8>);

    /// Threads decodes may use (at most the configured number).
    fn threads(&self) -> usize;
    fn set_threads(&mut self, n: usize);
    /// A one-token decode step's time (ms) as measured when the backend
    /// opened; `None` when it was not measured. It stands for the
    /// single-stream step until one is seen, so a server started under load
    /// has its time budget from the first step.
    fn one_row_ms(&self) -> Option<f64> {
        None
    }
    /// Decodes `batch`; `should_abort` is polled while it runs (by llama.cpp,
    /// possibly from one of its worker threads).
    fn decode(
        &mut self,
        batch: &[BatchToken],
        should_abort: &(dyn Fn() -> bool + Sync),
    ) -> Result<(), DecodeError>;
    /// A sampler for validated `params`; a GBNF constraint that does not
    /// parse is an error (`BackendError::Grammar`).
    fn sampler(&self, params: &SamplingParams, seed: u32) -> Result<Self::Sampler, BackendError>;
    /// Samples from batch row `row` of the last decode, among the tokens
    /// `filter` allows.
    fn sample(
        &mut self,
        sampler: &mut Self::Sampler,
        row: usize,
        filter: &Filter<'_>,
    ) -> Result<Sampled, BackendError>;

    /// Makes `dst` share the cells of positions `[0, len)` of `src`.
    fn seq_cp(&mut self, src: SeqId, dst: SeqId, len: usize);
    /// Drops `seq`'s cells from position `from` on.
    fn seq_rm(&mut self, seq: SeqId, from: usize);
    /// The KV state of `seq`'s cells, for `seq_load` into another context
    /// of the same model and settings.
    fn seq_save(&self, seq: SeqId) -> Result<Vec<u8>, BackendError>;
    /// Fills the empty `seq` from a `seq_save` state.
    fn seq_load(&mut self, seq: SeqId, state: &[u8]) -> Result<(), BackendError>;
}

/// Loads the weights and opens backends over them.
pub trait Loader {
    type Model;
    type Backend<'m>: Backend
    where
        Self: 'm;

    fn load(&self) -> Result<Self::Model, BackendError>;
    /// A fresh backend with an empty KV pool.
    fn open<'m>(&'m self, model: &'m Self::Model) -> Result<Self::Backend<'m>, BackendError>;
    /// The model's name, as clients see it.
    fn model_name(&self) -> String;
    /// One line for the start-up log.
    fn describe(&self, model: &Self::Model) -> String;
    /// What saved sequence states depend on (model file, build, context
    /// settings): states saved under another binding are never loaded.
    fn binding(&self, model: &Self::Model) -> String;
}

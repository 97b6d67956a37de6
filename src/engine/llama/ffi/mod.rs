//! Our small safe wrapper over llama.cpp (through `llama-cpp-sys-2`).
//!
//! Every `unsafe` block of the project lives in this module (and its
//! `sampler`), each with a `SAFETY:` comment. The types here own
//! llama.cpp objects and free them on `Drop`; null pointers and negative return
//! codes become typed errors at this boundary, so the engine never sees a raw
//! pointer or a bare integer. A `Context` borrows its `Model`, so the model can
//! never be freed first, and neither type is `Send`: both are created and dropped
//! on the engine thread.

#![allow(unsafe_code)]

mod sampler;

pub use sampler::Sampler;

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_void};
use std::marker::PhantomData;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Once;

use llama_cpp_sys_2 as sys;

use crate::engine::backend::{BackendError, BatchToken, DecodeError, Token};

/// Initialises the llama.cpp backend once per process and routes its logs into
/// the `log` crate (target `llama.cpp`).
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // SAFETY: `log_callback` is a plain `extern "C"` function valid for the
        // whole process and ignores its user-data pointer, which may be null.
        unsafe { sys::llama_log_set(Some(log_callback), std::ptr::null_mut()) };
        // SAFETY: called once, before any other llama.cpp call, as llama.h asks.
        unsafe { sys::llama_backend_init() };
    });
}

/// Ends the process at once with `code`, without running exit handlers (see
/// `ops::watchdog::ExitNow` for why).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` only ends the process; it touches no Rust state and
    // never returns. Log lines were written directly (unbuffered) before it.
    unsafe { libc::_exit(code) }
}

/// llama.cpp's version (its build number and commit).
pub fn version() -> String {
    // SAFETY: returns a pointer to a static, NUL-terminated string owned by llama.cpp.
    unsafe { CStr::from_ptr(sys::llama_version()) }
        .to_string_lossy()
        .into_owned()
}

/// llama.cpp's description of the CPU features ggml was built with
/// (e.g. "CPU : SSE3 = 1 | AVX2 = 1 | FMA = 1 ...").
pub fn system_info() -> String {
    // SAFETY: returns a pointer to a static, NUL-terminated string owned by llama.cpp.
    unsafe { CStr::from_ptr(sys::llama_print_system_info()) }
        .to_string_lossy()
        .trim()
        .to_owned()
}

thread_local! {
    /// Partial log line: llama.cpp logs in fragments (GGML_LOG_LEVEL_CONT).
    static LOG_LINE: RefCell<(sys::ggml_log_level, String)> = const { RefCell::new((0, String::new())) };
    /// While a model loads on this thread, error lines are collected here to
    /// become the reason of a single `ModelLoad` error instead of log noise.
    static CAPTURE: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Runs `f` with llama.cpp's error lines collected instead of logged.
fn capturing_errors<R>(f: impl FnOnce() -> R) -> (R, Vec<String>) {
    CAPTURE.with_borrow_mut(|c| *c = Some(Vec::new()));
    let result = f();
    let errors = CAPTURE.with_borrow_mut(|c| c.take()).unwrap_or_default();
    (result, errors)
}

extern "C" fn log_callback(level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a valid NUL-terminated string for the duration of the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    LOG_LINE.with_borrow_mut(|(line_level, line)| {
        if level != sys::GGML_LOG_LEVEL_CONT {
            *line_level = level;
        }
        line.push_str(&text);
        while let Some(end) = line.find('\n') {
            let full: String = line.drain(..=end).collect();
            emit_log(*line_level, full.trim_end());
        }
    });
}

fn emit_log(level: sys::ggml_log_level, line: &str) {
    if line.is_empty() {
        return;
    }
    if level == sys::GGML_LOG_LEVEL_ERROR {
        let captured = CAPTURE.with_borrow_mut(|c| match c {
            Some(lines) => {
                lines.push(line.to_owned());
                true
            }
            None => false,
        });
        if captured {
            log::debug!(target: "llama.cpp", "{line}");
            return;
        }
    }
    let level = match level {
        sys::GGML_LOG_LEVEL_ERROR => log::Level::Error,
        sys::GGML_LOG_LEVEL_WARN => log::Level::Warn,
        sys::GGML_LOG_LEVEL_INFO => log::Level::Debug,
        _ => log::Level::Trace,
    };
    log::log!(target: "llama.cpp", level, "{line}");
}

pub struct ModelParams {
    pub n_gpu_layers: i32,
    /// Let ggml repack weights into its faster interleaved CPU layouts.
    pub repack: bool,
}

pub struct Model {
    ptr: NonNull<sys::llama_model>,
}

impl Model {
    pub fn load(path: &Path, params: &ModelParams) -> Result<Model, BackendError> {
        init();
        let shown = path.display().to_string();
        if !path.is_file() {
            return Err(BackendError::ModelMissing(shown));
        }
        let c_path =
            CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| BackendError::NulByte)?;
        // SAFETY: returns a plain struct of defaults.
        let mut mparams = unsafe { sys::llama_model_default_params() };
        mparams.n_gpu_layers = params.n_gpu_layers;
        mparams.use_extra_bufts = params.repack;
        // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call;
        // the returned pointer is null on failure and owned by us otherwise.
        let (raw, errors) = capturing_errors(|| unsafe {
            sys::llama_model_load_from_file(c_path.as_ptr(), mparams)
        });
        match NonNull::new(raw) {
            Some(ptr) => Ok(Model { ptr }),
            None => Err(BackendError::ModelLoad {
                path: shown,
                reason: load_reason(&errors),
            }),
        }
    }

    pub fn vocab(&self) -> Vocab<'_> {
        // SAFETY: the model pointer is valid; the vocab lives as long as the model.
        let ptr = unsafe { sys::llama_model_get_vocab(self.ptr.as_ptr()) };
        Vocab {
            ptr,
            _model: PhantomData,
        }
    }

    /// The chat template stored in the GGUF metadata, if any.
    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: the model is valid; a null name selects the default template.
        // The returned string (or null) is owned by the model.
        let raw = unsafe { sys::llama_model_chat_template(self.ptr.as_ptr(), std::ptr::null()) };
        if raw.is_null() {
            return None;
        }
        // SAFETY: non-null, NUL-terminated, valid while the model lives.
        Some(
            unsafe { CStr::from_ptr(raw) }
                .to_string_lossy()
                .into_owned(),
        )
    }

    /// Formats a conversation with `template` (llama.cpp's built-in template
    /// engine detects the template family from its text) and opens the assistant turn.
    pub fn apply_chat_template(
        template: &str,
        messages: &[(&str, &str)],
    ) -> Result<String, BackendError> {
        let c_tmpl = CString::new(template).map_err(|_| BackendError::NulByte)?;
        let owned: Vec<(CString, CString)> = messages
            .iter()
            .map(|(r, c)| Ok((CString::new(*r)?, CString::new(*c)?)))
            .collect::<Result<_, std::ffi::NulError>>()
            .map_err(|_| BackendError::NulByte)?;
        let chat: Vec<sys::llama_chat_message> = owned
            .iter()
            .map(|(r, c)| sys::llama_chat_message {
                role: r.as_ptr(),
                content: c.as_ptr(),
            })
            .collect();
        let mut buf =
            vec![0u8; 2 * messages.iter().map(|(_, c)| c.len() + 16).sum::<usize>() + 256];
        loop {
            // SAFETY: all pointers in `chat` point into `owned`, alive for the call;
            // `buf` is writable for `buf.len()` bytes.
            let n = unsafe {
                sys::llama_chat_apply_template(
                    c_tmpl.as_ptr(),
                    chat.as_ptr(),
                    chat.len(),
                    true,
                    buf.as_mut_ptr().cast(),
                    buf.len() as i32,
                )
            };
            if n < 0 {
                return Err(BackendError::UnsupportedChatTemplate);
            }
            let n = n as usize;
            if n <= buf.len() {
                buf.truncate(n);
                return Ok(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize(n, 0);
        }
    }

    pub fn n_ctx_train(&self) -> u32 {
        // SAFETY: the model pointer is valid.
        unsafe { sys::llama_model_n_ctx_train(self.ptr.as_ptr()) }.max(0) as u32
    }

    /// Short description, e.g. "gemma3 270M Q4_K - Medium".
    pub fn description(&self) -> String {
        let mut buf = [0u8; 256];
        // SAFETY: `buf` is writable for its length; llama.cpp NUL-terminates within it.
        let n =
            unsafe { sys::llama_model_desc(self.ptr.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        let n = (n.max(0) as usize).min(buf.len() - 1);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

fn load_reason(errors: &[String]) -> String {
    let useful: Vec<&str> = errors
        .iter()
        .map(|l| l.split_once(": ").map_or(l.as_str(), |(_, rest)| rest))
        .filter(|l| !l.contains("failed to load model"))
        .collect();
    if useful.is_empty() {
        "llama.cpp could not read it as a GGUF model".to_owned()
    } else {
        useful.join("; ")
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: we own the model; every Context borrowing it is already dropped.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

#[derive(Clone, Copy)]
pub struct Vocab<'m> {
    ptr: *const sys::llama_vocab,
    _model: PhantomData<&'m Model>,
}

impl Vocab<'_> {
    pub fn n_tokens(&self) -> i32 {
        // SAFETY: the vocab is valid while the model lives ('m).
        unsafe { sys::llama_vocab_n_tokens(self.ptr) }
    }

    pub fn is_eog(&self, token: Token) -> bool {
        // SAFETY: the vocab is valid; any token id is accepted.
        unsafe { sys::llama_vocab_is_eog(self.ptr, token) }
    }

    /// The text of the model's BOS and EOS tokens (`<bos>`, `<eos>`), as
    /// chat templates write them; empty when the model has none.
    pub fn bos_eos_text(&self) -> (String, String) {
        // SAFETY: the vocab is valid while the model lives ('m).
        let (bos, eos) = unsafe {
            (
                sys::llama_vocab_bos(self.ptr),
                sys::llama_vocab_eos(self.ptr),
            )
        };
        (self.token_text(bos), self.token_text(eos))
    }

    fn token_text(&self, token: Token) -> String {
        if token < 0 || token >= self.n_tokens() {
            return String::new();
        }
        // SAFETY: `token` is in range; llama.cpp returns a NUL-terminated
        // string owned by the vocab, read here before the vocab can go.
        unsafe {
            let text = sys::llama_vocab_get_text(self.ptr, token);
            if text.is_null() {
                return String::new();
            }
            std::ffi::CStr::from_ptr(text)
                .to_string_lossy()
                .into_owned()
        }
    }

    /// Every end-of-generation token (EOS, end-of-turn...).
    pub fn eog_tokens(&self) -> Vec<Token> {
        (0..self.n_tokens()).filter(|&t| self.is_eog(t)).collect()
    }

    /// Tokenizes `text`, adding BOS if the model wants one (`add_special`);
    /// `parse_special` reads control tokens written as text (`<start_of_turn>`).
    pub fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<Token>, BackendError> {
        let len = i32::try_from(text.len()).map_err(|_| BackendError::Tokenize(i32::MIN))?;
        let mut tokens: Vec<Token> = vec![0; text.len() + 2];
        loop {
            // SAFETY: `text` is valid for `len` bytes (no NUL terminator needed);
            // `tokens` is writable for `tokens.len()` entries.
            let n = unsafe {
                sys::llama_tokenize(
                    self.ptr,
                    text.as_ptr().cast(),
                    len,
                    tokens.as_mut_ptr(),
                    tokens.len() as i32,
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                tokens.truncate(n as usize);
                return Ok(tokens);
            }
            if n == i32::MIN || (-n) as usize <= tokens.len() {
                return Err(BackendError::Tokenize(n));
            }
            tokens.resize((-n) as usize, 0);
        }
    }

    /// Appends the bytes of `token` to `out` (possibly part of a UTF-8
    /// character). Control tokens render as nothing.
    pub fn piece(&self, token: Token, out: &mut Vec<u8>) {
        self.render(token, false, out)
    }

    /// Every token's bytes, as constrained decoding sees the vocabulary: a
    /// control token is 0xFF followed by its text (llguidance's marker).
    pub fn all_token_bytes(&self) -> Vec<Vec<u8>> {
        (0..self.n_tokens())
            .map(|t| {
                let mut bytes = Vec::new();
                self.render(t, false, &mut bytes);
                if bytes.is_empty() {
                    let mut special = vec![0xFF];
                    self.render(t, true, &mut special);
                    if special.len() > 1 {
                        return special;
                    }
                }
                bytes
            })
            .collect()
    }

    /// Appends the bytes of `token`; `special` renders control tokens as
    /// their text.
    fn render(&self, token: Token, special: bool, out: &mut Vec<u8>) {
        let mut buf = [0u8; 64];
        // SAFETY: `buf` is writable for its length.
        let n = unsafe {
            sys::llama_token_to_piece(
                self.ptr,
                token,
                buf.as_mut_ptr().cast(),
                buf.len() as i32,
                0,
                special,
            )
        };
        if n >= 0 {
            out.extend_from_slice(&buf[..n as usize]);
            return;
        }
        let mut big = vec![0u8; (-n) as usize];
        // SAFETY: `big` is writable for the length llama.cpp asked for.
        let n = unsafe {
            sys::llama_token_to_piece(
                self.ptr,
                token,
                big.as_mut_ptr().cast(),
                big.len() as i32,
                0,
                special,
            )
        };
        if n > 0 {
            out.extend_from_slice(&big[..n as usize]);
        }
    }
}

/// How long ggml's worker threads spin for the next graph before they sleep
/// on a condition variable (ggml's poll level, 0 to 100: 128Ki pause
/// instructions a level, a few milliseconds). Ten covers the host's work
/// between two steps (sampling, verifying drafts) so the workers do not
/// sleep mid-stream, and bounds the spinning after the last step of a
/// request to tens of milliseconds (ggml's default, 50, spun for a few
/// hundred).
const POLL: u32 = 10;

/// A ggml thread pool of `n` threads (the caller's plus n - 1 workers).
struct ThreadPool {
    ptr: NonNull<sys::ggml_threadpool>,
}

impl ThreadPool {
    fn new(n: usize) -> Result<ThreadPool, BackendError> {
        // SAFETY: returns a plain struct of defaults (no CPU mask, normal priority).
        let mut params = unsafe { sys::ggml_threadpool_params_default(n as i32) };
        params.poll = POLL;
        // SAFETY: `params` is a valid parameter struct; null on failure.
        let ptr = unsafe { sys::ggml_threadpool_new(&mut params) };
        NonNull::new(ptr)
            .map(|ptr| ThreadPool { ptr })
            .ok_or_else(|| BackendError::Context(format!("no pool of {n} threads")))
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        // SAFETY: we own the pool; the context that used it is freed already.
        unsafe { sys::ggml_threadpool_free(self.ptr.as_ptr()) }
    }
}

pub struct ContextParams {
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_seq_max: u32,
    pub n_threads: i32,
    pub n_threads_batch: i32,
}

pub struct Context<'m> {
    ptr: NonNull<sys::llama_context>,
    /// ggml's worker threads, one pool per thread count used so far (index
    /// n - 1), made when first needed and attached by `set_threads`. Without
    /// an attached pool every decode spawns and joins its helper threads (a
    /// disposable pool per graph): measured against that, a pool made once
    /// decodes 3-4% faster and takes a prompt in 7-9% less time here. A
    /// pool per count, rather than one large pool run with fewer threads,
    /// because the idle workers of a larger pool spin at every graph.
    pools: Vec<Option<ThreadPool>>,
    n_vocab: usize,
    /// Rows of the last decode whose logits were requested: the only ones
    /// `logits` hands out.
    outputs: Vec<bool>,
    _model: PhantomData<&'m Model>,
}

impl<'m> Context<'m> {
    pub fn new(model: &'m Model, params: &ContextParams) -> Result<Context<'m>, BackendError> {
        // SAFETY: returns a plain struct of defaults.
        let mut cparams = unsafe { sys::llama_context_default_params() };
        cparams.n_ctx = params.n_ctx;
        cparams.n_batch = params.n_batch;
        cparams.n_ubatch = params.n_batch;
        cparams.n_seq_max = params.n_seq_max;
        cparams.n_threads = params.n_threads;
        cparams.n_threads_batch = params.n_threads_batch;
        cparams.no_perf = true;
        // One pool of n_ctx cells shared by every sequence, so prefixes can be
        // shared between sequences (seq_cp) and SWA layers keep whole prompts.
        cparams.kv_unified = true;
        cparams.swa_full = true;
        // SAFETY: the model is valid and outlives the context ('m); null on failure.
        let (raw, errors) =
            capturing_errors(|| unsafe { sys::llama_init_from_model(model.ptr.as_ptr(), cparams) });
        let ptr = NonNull::new(raw).ok_or_else(|| BackendError::Context(errors.join("; ")))?;
        let mut ctx = Context {
            ptr,
            pools: Vec::new(),
            n_vocab: model.vocab().n_tokens().max(0) as usize,
            outputs: Vec::new(),
            _model: PhantomData,
        };
        ctx.set_threads(params.n_threads.max(params.n_threads_batch) as usize)?;
        Ok(ctx)
    }

    pub fn n_ctx(&self) -> u32 {
        // SAFETY: the context pointer is valid.
        unsafe { sys::llama_n_ctx(self.ptr.as_ptr()) }
    }

    pub fn threads(&self) -> usize {
        // SAFETY: the context pointer is valid.
        unsafe { sys::llama_n_threads(self.ptr.as_ptr()) }.max(1) as usize
    }

    /// Threads for the next decodes, generation and prompts alike.
    pub fn set_threads(&mut self, n: usize) -> Result<(), BackendError> {
        let n = n.max(1);
        if self.pools.len() < n {
            self.pools.resize_with(n, || None);
        }
        let pool = match &mut self.pools[n - 1] {
            Some(pool) => pool,
            empty => empty.insert(ThreadPool::new(n)?),
        };
        // SAFETY: the context and the pool are valid; the pool outlives the
        // context (Drop frees the context first) and serves generation and
        // prompts alike; setting the thread count only sets parameters.
        unsafe {
            sys::llama_attach_threadpool(self.ptr.as_ptr(), pool.ptr.as_ptr(), pool.ptr.as_ptr());
            sys::llama_set_n_threads(self.ptr.as_ptr(), n as i32, n as i32);
        }
        Ok(())
    }

    /// Runs the batch. `should_abort` is polled by ggml between graph nodes, so
    /// a long prefill stops within milliseconds of being asked to.
    pub fn decode(
        &mut self,
        batch: &Batch,
        should_abort: &(dyn Fn() -> bool + Sync),
    ) -> Result<(), DecodeError> {
        type Callback<'a> = &'a (dyn Fn() -> bool + Sync);
        extern "C" fn trampoline(data: *mut c_void) -> bool {
            // SAFETY: `data` is the `&Callback` set just below, alive until
            // decode returns; the callback is `Sync`, so any ggml thread may call it.
            let f = unsafe { &*(data as *const Callback) };
            f()
        }
        self.outputs.clear();
        let data: *const Callback = &should_abort;
        // SAFETY: the callback and its data stay valid for the whole llama_decode
        // call; they are cleared again before `should_abort` goes out of scope.
        let (rc, errors) = capturing_errors(|| unsafe {
            sys::llama_set_abort_callback(self.ptr.as_ptr(), Some(trampoline), data as *mut c_void);
            let rc = sys::llama_decode(self.ptr.as_ptr(), batch.raw);
            sys::llama_set_abort_callback(self.ptr.as_ptr(), None, std::ptr::null_mut());
            rc
        });
        let result = match rc {
            0 => {
                self.outputs.extend(batch.outputs());
                Ok(())
            }
            1 => Err(DecodeError::NoKvSlot),
            2 => Err(DecodeError::Aborted),
            -1 => Err(DecodeError::InvalidBatch),
            other => Err(DecodeError::Fatal(other)),
        };
        // An abort we asked for makes llama.cpp log errors; they are expected then.
        let level = if result == Err(DecodeError::Aborted) {
            log::Level::Debug
        } else {
            log::Level::Error
        };
        for line in errors {
            log::log!(target: "llama.cpp", level, "{line}");
        }
        result
    }

    /// Logits of batch row `row` of the last successful decode, which must
    /// have asked for them.
    fn logits(&self, row: usize) -> Result<&[f32], BackendError> {
        if !self.outputs.get(row).copied().unwrap_or(false) {
            return Err(BackendError::NoLogits(row));
        }
        // SAFETY: the context is valid and `row` is a row of the last decode
        // that requested logits, so llama.cpp has them; it returns null otherwise.
        let p = unsafe { sys::llama_get_logits_ith(self.ptr.as_ptr(), row as i32) };
        if p.is_null() {
            return Err(BackendError::NoLogits(row));
        }
        // SAFETY: non-null, pointing to one row of `n_vocab` floats (the
        // model's vocabulary size); they stay valid until the next decode,
        // which needs `&mut self` and so cannot overlap this borrow.
        Ok(unsafe { std::slice::from_raw_parts(p, self.n_vocab) })
    }

    /// Makes sequence `dst` share the cells of positions `[0, len)` of `src`.
    pub fn seq_cp(&mut self, src: i32, dst: i32, len: usize) {
        // SAFETY: the context is valid; its memory object lives as long as it.
        unsafe {
            sys::llama_memory_seq_cp(
                sys::llama_get_memory(self.ptr.as_ptr()),
                src,
                dst,
                0,
                len as i32,
            )
        }
    }

    /// The state (KV cells) of sequence `seq`, as llama.cpp serialises it.
    pub fn seq_state(&self, seq: i32) -> Result<Vec<u8>, BackendError> {
        // SAFETY: the context is valid; this only measures the sequence.
        let size = unsafe { sys::llama_state_seq_get_size(self.ptr.as_ptr(), seq) };
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` is writable for `size` bytes, the size llama.cpp asked for.
        let n = unsafe {
            sys::llama_state_seq_get_data(self.ptr.as_ptr(), buf.as_mut_ptr(), buf.len(), seq)
        };
        if n == 0 || n > size {
            return Err(BackendError::State(format!(
                "llama.cpp wrote {n} of {size} bytes for sequence {seq}"
            )));
        }
        buf.truncate(n);
        Ok(buf)
    }

    /// Loads a `seq_state` into the empty sequence `seq`.
    pub fn set_seq_state(&mut self, seq: i32, state: &[u8]) -> Result<(), BackendError> {
        // SAFETY: the context is valid and `state` is readable for its length;
        // llama.cpp checks the data and returns 0 if it cannot use it.
        let n = unsafe {
            sys::llama_state_seq_set_data(self.ptr.as_ptr(), state.as_ptr(), state.len(), seq)
        };
        if n == 0 {
            return Err(BackendError::State(
                "llama.cpp could not load the saved state (another model, build or settings?)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Drops sequence `seq`'s cells from position `from` on.
    pub fn seq_rm(&mut self, seq: i32, from: usize) {
        // SAFETY: as above; removing from a position to the end always succeeds.
        unsafe {
            sys::llama_memory_seq_rm(
                sys::llama_get_memory(self.ptr.as_ptr()),
                seq,
                from as i32,
                -1,
            )
        };
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the context; nothing else references it. Its pools
        // are freed after it (fields drop after this body).
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
    }
}

/// A token batch with room for `capacity` tokens.
pub struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
}

impl Batch {
    pub fn new(capacity: usize, n_seq_max: usize) -> Batch {
        // SAFETY: allocates arrays for `capacity` tokens, each with room for
        // `n_seq_max` sequence ids; freed in Drop.
        let raw = unsafe { sys::llama_batch_init(capacity as i32, 0, n_seq_max as i32) };
        Batch { raw, capacity }
    }

    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_full(&self) -> bool {
        self.len() >= self.capacity
    }

    /// Adds a token; its `output` flag asks for its logits.
    pub fn push(&mut self, t: BatchToken) {
        assert!(!self.is_full(), "batch overflow");
        let i = self.len();
        // SAFETY: i < capacity, and llama_batch_init allocated every array for
        // `capacity` entries and each seq_id row for at least one id.
        unsafe {
            *self.raw.token.add(i) = t.token;
            *self.raw.pos.add(i) = t.pos as i32;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = t.seq;
            *self.raw.logits.add(i) = t.output as i8;
        }
        self.raw.n_tokens += 1;
    }

    /// Which rows ask for logits.
    fn outputs(&self) -> impl Iterator<Item = bool> + '_ {
        // SAFETY: the first `len()` entries of `logits` were written by `push`.
        (0..self.len()).map(|i| unsafe { *self.raw.logits.add(i) } != 0)
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: the batch was allocated by llama_batch_init and is freed once.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_reason_keeps_the_cause() {
        let lines = vec![
            "gguf_init_from_file_impl: invalid magic characters: 'abcd', expected 'GGUF'"
                .to_owned(),
            "llama_model_load_from_file_impl: failed to load model".to_owned(),
        ];
        assert_eq!(
            load_reason(&lines),
            "invalid magic characters: 'abcd', expected 'GGUF'"
        );
        assert!(load_reason(&[]).contains("GGUF"));
    }
}

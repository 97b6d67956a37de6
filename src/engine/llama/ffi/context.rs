//! A llama.cpp context over a model (its KV cache, ggml's thread pools, the
//! decode and the sequences' cells) and the token batch it decodes.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::log::capturing_errors;
use super::model::Model;
use crate::engine::backend::{BackendError, BatchToken, DecodeError};

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
    pub(super) fn logits(&self, row: usize) -> Result<&[f32], BackendError> {
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

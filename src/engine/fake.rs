//! A model-free `Loader` and `Backend` for unit tests: one token per
//! character, a chat template made of control tokens, a scripted reply, and
//! a KV pool that checks every position it is given. Faults (no KV slot, a
//! failing decode or load, a decode that hangs until released) are switched
//! on through the shared `State`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use crate::core::SamplingParams;
use crate::engine::backend::{
    Backend, BackendError, BatchToken, DecodeError, Filter, Loader, Sampled, SeqId, Token,
};
use crate::engine::guide::Grammars;

/// `<ctl>` when control tokens are parsed.
pub const CONTROL: Token = 0x11_0001;
pub const BOS: Token = 0x11_0002;
pub const EOS: Token = 0x11_0003;

/// The character a token stands for (U+FFFD for control tokens).
pub fn char_of(t: Token) -> char {
    char::from_u32(t as u32).unwrap_or('\u{FFFD}')
}

/// What tests observe and the faults they switch on.
#[derive(Debug, Default)]
pub struct State {
    pub batches: Vec<Vec<BatchToken>>,
    pub loads: usize,
    pub opens: usize,
    /// Decodes that answer "no KV slot" before one goes through.
    pub no_kv_slot: usize,
    pub fail_decode: bool,
    pub fail_load: bool,
    /// `seq_load` calls that fail before one goes through.
    pub fail_seq_loads: usize,
    pub fail_open: bool,
    /// While set, a decode waits (polling its abort callback) instead of finishing.
    pub hold: bool,
    /// Sets `hold` when the decode with this number (counted in `batches`) starts.
    pub hold_at_batch: Option<usize>,
    /// A decode is waiting on `hold`.
    pub holding: bool,
    /// Each decode takes this long, and this much more per token.
    pub cost: Option<(Duration, Duration)>,
}

#[derive(Clone)]
pub struct Fake {
    pub n_ctx: usize,
    pub chat_template: bool,
    /// The template trims message text, as Gemma's does.
    pub trims_content: bool,
    /// What every request generates, then EOS.
    pub reply: String,
    pub state: Arc<Mutex<State>>,
    pub grammars: Arc<OnceLock<Grammars>>,
}

impl Default for Fake {
    fn default() -> Self {
        Fake {
            n_ctx: 256,
            chat_template: true,
            trims_content: false,
            reply: "hello world".into(),
            state: Arc::default(),
            grammars: Arc::default(),
        }
    }
}

impl Fake {
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    pub fn backend(&self) -> FakeBackend {
        FakeBackend {
            fake: self.clone(),
            cells: HashMap::new(),
            outputs: Vec::new(),
            threads: 1,
        }
    }
}

impl Loader for Fake {
    type Model = ();
    type Backend<'m> = FakeBackend;

    fn load(&self) -> Result<(), BackendError> {
        let mut s = self.state();
        s.loads += 1;
        if s.fail_load {
            return Err(BackendError::ModelMissing("fake.gguf".into()));
        }
        Ok(())
    }

    fn open(&self, _model: &()) -> Result<FakeBackend, BackendError> {
        let mut s = self.state();
        s.opens += 1;
        if s.fail_open {
            return Err(BackendError::Context("out of fake memory".into()));
        }
        Ok(self.backend())
    }

    fn model_name(&self) -> String {
        "fake".into()
    }

    fn describe(&self, _model: &()) -> String {
        "fake model".into()
    }

    fn binding(&self, _model: &()) -> String {
        format!("fake n_ctx={}", self.n_ctx)
    }
}

pub struct FakeBackend {
    fake: Fake,
    /// Positions each sequence holds.
    cells: HashMap<SeqId, usize>,
    outputs: Vec<bool>,
    threads: usize,
}

pub struct FakeSampler {
    next: usize,
    top: Option<u8>,
}

impl Backend for FakeBackend {
    type Sampler = FakeSampler;

    fn n_ctx(&self) -> usize {
        self.fake.n_ctx
    }

    fn tokenize(
        &self,
        text: &str,
        add_bos: bool,
        special: bool,
    ) -> Result<Vec<Token>, BackendError> {
        let mut out = Vec::new();
        if add_bos {
            out.push(BOS);
        }
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            if special && rest.starts_with("<ctl>") {
                out.push(CONTROL);
                rest = &rest[5..];
            } else {
                out.push(c as Token);
                rest = &rest[c.len_utf8()..];
            }
        }
        Ok(out)
    }

    fn has_chat_template(&self) -> bool {
        self.fake.chat_template
    }

    fn render_chat(&self, messages: &[(&str, &str)]) -> Result<String, BackendError> {
        if !self.fake.chat_template {
            return Err(BackendError::NoChatTemplate);
        }
        let mut out: String = messages
            .iter()
            .map(|(role, content)| {
                let content = if self.fake.trims_content {
                    content.trim()
                } else {
                    content
                };
                format!("<ctl>{role}\n{content}<ctl>\n")
            })
            .collect();
        out.push_str("<ctl>model\n");
        Ok(out)
    }

    fn is_eog(&self, token: Token) -> bool {
        token == EOS
    }

    fn eog_tokens(&self) -> &[Token] {
        &[EOS]
    }

    fn n_vocab(&self) -> usize {
        EOS as usize + 1
    }

    /// Constraints see ASCII characters and EOS (other tokens have no bytes).
    fn grammars(&self) -> Result<&Grammars, BackendError> {
        Ok(self.fake.grammars.get_or_init(|| {
            let tokens: Vec<Vec<u8>> = (0..=EOS)
                .map(|t| match t {
                    0..128 => vec![t as u8],
                    EOS => b"\xFF<eos>".to_vec(),
                    _ => Vec::new(),
                })
                .collect();
            Grammars::new(&tokens, &[EOS]).expect("the fake vocabulary")
        }))
    }

    fn piece(&self, token: Token, out: &mut Vec<u8>) {
        if let Some(c) = char::from_u32(token as u32) {
            out.extend_from_slice(c.to_string().as_bytes());
        }
    }

    fn threads(&self) -> usize {
        self.threads
    }

    fn set_threads(&mut self, n: usize) {
        self.threads = n;
    }

    fn decode(
        &mut self,
        batch: &[BatchToken],
        should_abort: &(dyn Fn() -> bool + Sync),
    ) -> Result<(), DecodeError> {
        self.outputs.clear();
        {
            let mut s = self.fake.state();
            s.batches.push(batch.to_vec());
            if s.hold_at_batch == Some(s.batches.len()) {
                s.hold = true;
            }
            if s.no_kv_slot > 0 {
                s.no_kv_slot -= 1;
                return Err(DecodeError::NoKvSlot);
            }
            if s.fail_decode {
                return Err(DecodeError::Fatal(-3));
            }
            if let Some((base, per)) = s.cost {
                std::thread::sleep(base + per * batch.len() as u32);
            }
        }
        loop {
            if should_abort() {
                self.fake.state().holding = false;
                return Err(DecodeError::Aborted);
            }
            let mut s = self.fake.state();
            s.holding = s.hold;
            if !s.hold {
                break;
            }
            drop(s);
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in batch {
            let held = self.cells.entry(t.seq).or_default();
            assert_eq!(t.pos, *held, "sequence {} decoded out of place", t.seq);
            *held += 1;
        }
        self.outputs = batch.iter().map(|t| t.output).collect();
        Ok(())
    }

    /// GBNF is llama.cpp's: the fake has none.
    fn sampler(&self, params: &SamplingParams, _seed: u32) -> Result<FakeSampler, BackendError> {
        if let Some(crate::core::Constraint::Gbnf(_)) = params.constraint {
            return Err(BackendError::Grammar("the fake backend has no GBNF".into()));
        }
        Ok(FakeSampler {
            next: 0,
            top: params.logprobs,
        })
    }

    /// The reply's next character; one `filter` refuses gives way to the
    /// lowest token the mask allows, or to 'x'.
    fn sample(
        &mut self,
        sampler: &mut FakeSampler,
        row: usize,
        filter: &Filter<'_>,
    ) -> Result<Sampled, BackendError> {
        if !self.outputs.get(row).copied().unwrap_or(false) {
            return Err(BackendError::NoLogits(row));
        }
        let scripted = self
            .fake
            .reply
            .chars()
            .nth(sampler.next)
            .map_or(EOS, |c| c as Token);
        sampler.next += 1;
        let token = if filter.allows(scripted) {
            scripted
        } else {
            match filter.mask {
                Some(_) => (0..=EOS)
                    .find(|&t| filter.allows(t))
                    .ok_or(BackendError::NothingSampled)?,
                None => 'x' as Token,
            }
        };
        // The reply's character is the likelier of two; the other is 'x'.
        let top = sampler.top.map(|k| {
            [(token, 0.5f32.ln()), ('x' as Token, 0.25f32.ln())]
                .into_iter()
                .take(k.into())
                .collect()
        });
        Ok(Sampled {
            token,
            prob: 0.5,
            top,
        })
    }

    fn seq_cp(&mut self, src: SeqId, dst: SeqId, len: usize) {
        let held = self.cells.get(&src).copied().unwrap_or(0);
        assert!(
            held >= len,
            "copying {len} cells of a sequence that holds {held}"
        );
        assert_eq!(
            self.cells.get(&dst).copied().unwrap_or(0),
            0,
            "copy into a used sequence"
        );
        self.cells.insert(dst, len);
    }

    fn seq_rm(&mut self, seq: SeqId, from: usize) {
        let held = self.cells.entry(seq).or_default();
        *held = (*held).min(from);
    }

    /// `fake` and the number of cells.
    fn seq_save(&self, seq: SeqId) -> Result<Vec<u8>, BackendError> {
        let held = self.cells.get(&seq).copied().unwrap_or(0) as u32;
        Ok([b"fake".as_slice(), &held.to_le_bytes()].concat())
    }

    fn seq_load(&mut self, seq: SeqId, state: &[u8]) -> Result<(), BackendError> {
        let cells = state
            .strip_prefix(b"fake")
            .and_then(|n| <[u8; 4]>::try_from(n).ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| BackendError::State("not a fake state".into()))?;
        let mut s = self.fake.state();
        if s.fail_seq_loads > 0 {
            s.fail_seq_loads -= 1;
            return Err(BackendError::State("a fake failure".into()));
        }
        drop(s);
        assert_eq!(
            self.cells.get(&seq).copied().unwrap_or(0),
            0,
            "load into a used sequence"
        );
        self.cells.insert(seq, cells as usize);
        Ok(())
    }
}

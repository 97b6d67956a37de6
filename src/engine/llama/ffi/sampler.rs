//! A request's sampler: llama.cpp's sampler chain in llama.cpp's order, its
//! GBNF grammar sampler, and the model's own probabilities of each pick.

use std::ffi::CString;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::log::capturing_errors;
use super::{Context, Vocab};
use crate::core::{Constraint, SamplingParams};
use crate::engine::backend::{BackendError, Filter, Sampled, Token};
use crate::engine::logits::Row;

/// A llama.cpp sampler chain plus the candidate buffer it works on.
pub struct Sampler {
    chain: NonNull<sys::llama_sampler>,
    candidates: Vec<sys::llama_token_data>,
    /// Plain greedy (nothing that rewrites logits): pick the argmax straight
    /// from the logits, skipping the copy of the vocabulary into `candidates`.
    greedy: bool,
    /// The chain's first step is its top-k (`Some(k)`: nothing before it
    /// rewrites logits): `candidates` gets only those k, found by one
    /// vectorized pass, instead of the whole vocabulary for the chain to
    /// sort. What the chain keeps and draws from is the same.
    top_k_first: Option<usize>,
    /// Report the log-probabilities of this many most likely tokens.
    top: Option<usize>,
    /// llama.cpp's GBNF sampler, outside the chain: a pick is checked
    /// against it, and only a pick it refuses costs a pass over the vocabulary.
    grammar: Option<NonNull<sys::llama_sampler>>,
}

impl Sampler {
    /// A chain for validated `params` (token ids in `logit_bias` within the
    /// vocabulary); `n_ctx` stands for a look-back of -1. The order is
    /// llama.cpp's own (common/sampling): biases, penalties, DRY, top-k,
    /// typical, top-p, min-p, XTC, temperature, then the draw.
    pub fn new(
        params: &SamplingParams,
        seed: u32,
        vocab: Vocab<'_>,
        n_ctx: i32,
    ) -> Result<Sampler, BackendError> {
        let spec = params;
        let grammar = match &spec.constraint {
            Some(Constraint::Gbnf(text)) => Some(grammar_sampler(vocab, text)?),
            _ => None,
        };
        let n_vocab = vocab.n_tokens();
        let whole = |n: i32| if n < 0 { n_ctx } else { n };
        let repeat_last_n = whole(spec.repeat_last_n);
        let penalized = repeat_last_n != 0
            && (spec.repeat_penalty != 1.0
                || spec.frequency_penalty != 0.0
                || spec.presence_penalty != 0.0);
        let dry = spec.dry_multiplier > 0.0;
        // SAFETY: plain constructor; the chain owns every sampler added to it.
        let chain =
            unsafe { sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params()) };
        let chain = NonNull::new(chain).expect("llama_sampler_chain_init returned null");
        let add = |s: *mut sys::llama_sampler| {
            if !s.is_null() {
                // SAFETY: `s` is a freshly created sampler; the chain takes ownership.
                unsafe { sys::llama_sampler_chain_add(chain.as_ptr(), s) }
            }
        };
        let breakers: Vec<std::ffi::CString> = spec
            .dry_sequence_breakers
            .iter()
            .filter_map(|b| std::ffi::CString::new(b.as_str()).ok())
            .collect();
        let mut breaker_ptrs: Vec<*const std::ffi::c_char> =
            breakers.iter().map(|b| b.as_ptr()).collect();
        // SAFETY: the constructors below only read their arguments; `biases`
        // and the breaker strings outlive the constructors, which copy them;
        // the vocab is valid while the model lives.
        unsafe {
            if !spec.logit_bias.is_empty() {
                let biases: Vec<sys::llama_logit_bias> = spec
                    .logit_bias
                    .iter()
                    .map(|&(token, bias)| sys::llama_logit_bias {
                        token,
                        bias: if bias <= -100.0 {
                            f32::NEG_INFINITY
                        } else {
                            bias
                        },
                    })
                    .collect();
                add(sys::llama_sampler_init_logit_bias(
                    n_vocab,
                    biases.len() as i32,
                    biases.as_ptr(),
                ));
            }
            if penalized {
                add(sys::llama_sampler_init_penalties(
                    n_vocab,
                    repeat_last_n,
                    spec.repeat_penalty,
                    spec.frequency_penalty,
                    spec.presence_penalty,
                ));
            }
            if dry {
                add(sys::llama_sampler_init_dry(
                    vocab.ptr,
                    spec.dry_multiplier,
                    spec.dry_base,
                    spec.dry_allowed_length as i32,
                    whole(spec.dry_penalty_last_n),
                    breaker_ptrs.as_mut_ptr(),
                    breaker_ptrs.len(),
                ));
            }
            if spec.temp <= 0.0 {
                add(sys::llama_sampler_init_greedy());
            } else {
                if spec.top_k > 0 {
                    add(sys::llama_sampler_init_top_k(spec.top_k));
                }
                if spec.typical_p < 1.0 {
                    add(sys::llama_sampler_init_typical(spec.typical_p, 1));
                }
                if spec.top_p < 1.0 {
                    add(sys::llama_sampler_init_top_p(spec.top_p, 1));
                }
                if spec.min_p > 0.0 {
                    add(sys::llama_sampler_init_min_p(spec.min_p, 1));
                }
                if spec.xtc_probability > 0.0 {
                    add(sys::llama_sampler_init_xtc(
                        spec.xtc_probability,
                        spec.xtc_threshold,
                        1,
                        seed,
                    ));
                }
                add(sys::llama_sampler_init_temp(spec.temp));
                add(sys::llama_sampler_init_dist(seed));
            }
        }
        let untouched = !penalized && !dry && spec.logit_bias.is_empty();
        let top_k = usize::try_from(spec.top_k).unwrap_or(0);
        Ok(Sampler {
            chain,
            candidates: Vec::new(),
            greedy: spec.temp <= 0.0 && untouched,
            top_k_first: (spec.temp > 0.0 && untouched && (1..=TOP_K_FIRST_MAX).contains(&top_k))
                .then_some(top_k),
            top: spec.logprobs.map(usize::from),
            grammar,
        })
    }

    /// Samples from batch row `row` of the last decode among the tokens
    /// `filter` allows, and records the token in the chain's history (for
    /// repetition penalties). The probability is the model's own (softmax of
    /// the raw logits), whatever the chain did.
    pub fn sample(
        &mut self,
        ctx: &Context<'_>,
        row: usize,
        filter: &Filter<'_>,
    ) -> Result<Sampled, BackendError> {
        let logits = Row::new(ctx.logits(row)?);
        let mut token = self.pick(&logits, filter, false)?;
        if let Some(grammar) = self.grammar
            && !grammar_allows(grammar, token)
        {
            token = self.pick(&logits, filter, true)?;
        }
        if !self.greedy {
            // SAFETY: the chain is valid; accept only updates its history.
            unsafe { sys::llama_sampler_accept(self.chain.as_ptr(), token) };
        }
        if let Some(grammar) = self.grammar {
            // SAFETY: the grammar sampler is valid and `token` is one it
            // allows (checked above), so accepting it keeps its stacks non-empty.
            unsafe { sys::llama_sampler_accept(grammar.as_ptr(), token) };
        }
        Ok(Sampled {
            token,
            prob: logits.prob(token),
            top: self.top.map(|k| logits.top_logprobs(k)),
        })
    }

    /// One pick by the chain among the allowed tokens; `with_grammar` first
    /// applies the grammar to every candidate.
    fn pick(
        &mut self,
        logits: &Row<'_>,
        filter: &Filter<'_>,
        with_grammar: bool,
    ) -> Result<Token, BackendError> {
        if self.greedy && !with_grammar {
            return argmax(logits, filter).ok_or(BackendError::NothingSampled);
        }
        self.candidates.clear();
        let all = filter.mask.is_none() && filter.banned.is_empty();
        let top_k = self.top_k_first.filter(|_| !with_grammar);
        let data = |(id, logit): (Token, f32)| sys::llama_token_data { id, logit, p: 0.0 };
        match top_k {
            Some(k) => self.candidates.extend(
                logits
                    .top_k(k, |id| all || filter.allows(id))
                    .into_iter()
                    .map(data),
            ),
            None => self.candidates.extend(
                logits
                    .logits()
                    .iter()
                    .enumerate()
                    .map(|(id, &logit)| (id as Token, logit))
                    .filter(|&(id, _)| all || filter.allows(id))
                    .map(data),
            ),
        }
        if self.candidates.is_empty() {
            return Err(BackendError::NothingSampled);
        }
        let mut arr = sys::llama_token_data_array {
            data: self.candidates.as_mut_ptr(),
            size: self.candidates.len(),
            selected: -1,
            // The top k come largest first: the chain's top-k then only
            // keeps them, as after its own sort.
            sorted: top_k.is_some(),
        };
        if let (true, Some(grammar)) = (with_grammar, self.grammar) {
            // SAFETY: as below; the grammar sampler only sets refused logits to -inf.
            unsafe { sys::llama_sampler_apply(grammar.as_ptr(), &mut arr) };
        }
        // SAFETY: `arr` points into `self.candidates`, alive and unaliased for the
        // call; the chain only rewrites/shrinks the array in place.
        unsafe { sys::llama_sampler_apply(self.chain.as_ptr(), &mut arr) };
        if arr.selected < 0 || arr.selected as usize >= arr.size {
            return Err(BackendError::NothingSampled);
        }
        // SAFETY: the chain may have shrunk `size` but `data` still points into our buffer.
        let kept = unsafe { std::slice::from_raw_parts(arr.data, arr.size) };
        let chosen = kept[arr.selected as usize];
        if chosen.logit == f32::NEG_INFINITY {
            // The grammar refused everything left: it is complete and its
            // end-of-generation token is banned.
            return Err(BackendError::GrammarComplete);
        }
        Ok(chosen.id)
    }
}

/// The largest top-k whose candidates `Sampler::pick` finds itself: each
/// insertion into the list moves up to k entries (256 of 262k logits took
/// 0.35 ms here, 40 took 0.12, the copy for the chain to sort about 1 ms).
const TOP_K_FIRST_MAX: usize = 256;

/// The most likely token that `filter` allows (the first of equals).
fn argmax(logits: &Row<'_>, filter: &Filter<'_>) -> Option<Token> {
    // Usually the most likely of all is allowed, and the row knows it: the
    // branchy pass is for the rest.
    if let Some(i) = logits.most_likely()
        && filter.allows(i)
    {
        return Some(i);
    }
    let mut best: Option<(Token, f32)> = None;
    for (i, &l) in logits.logits().iter().enumerate() {
        if best.is_none_or(|b| l > b.1) && filter.allows(i as Token) {
            best = Some((i as Token, l));
        }
    }
    best.map(|b| b.0)
}

impl Drop for Sampler {
    fn drop(&mut self) {
        // SAFETY: we own the chain, which frees the samplers added to it,
        // and the grammar sampler.
        unsafe {
            sys::llama_sampler_free(self.chain.as_ptr());
            if let Some(g) = self.grammar {
                sys::llama_sampler_free(g.as_ptr());
            }
        }
    }
}

/// llama.cpp's sampler for a GBNF grammar (start rule `root`); a grammar
/// that does not parse is refused with llama.cpp's reason.
fn grammar_sampler(
    vocab: Vocab<'_>,
    text: &str,
) -> Result<NonNull<sys::llama_sampler>, BackendError> {
    let text =
        CString::new(text).map_err(|_| BackendError::Grammar("it contains a NUL byte".into()))?;
    let (sampler, errors) = capturing_errors(|| {
        // SAFETY: the vocab is valid while the model lives; both strings are
        // NUL-terminated and only read during the call (the parser reports
        // its errors through the log and returns null, it does not throw).
        unsafe { sys::llama_sampler_init_grammar(vocab.ptr, text.as_ptr(), c"root".as_ptr()) }
    });
    NonNull::new(sampler).ok_or_else(|| {
        let reason = errors
            .iter()
            .map(|e| {
                e.trim_start_matches("parse: error parsing grammar: ")
                    .trim()
            })
            .find(|e| !e.is_empty())
            .unwrap_or("llama.cpp could not parse it");
        BackendError::Grammar(reason.to_owned())
    })
}

/// Whether the grammar allows `token` next (a one-candidate pass).
fn grammar_allows(grammar: NonNull<sys::llama_sampler>, token: Token) -> bool {
    let mut one = [sys::llama_token_data {
        id: token,
        logit: 0.0,
        p: 0.0,
    }];
    let mut arr = sys::llama_token_data_array {
        data: one.as_mut_ptr(),
        size: 1,
        selected: -1,
        sorted: false,
    };
    // SAFETY: `arr` points at `one`, alive for the call; the grammar sampler
    // only rewrites the candidate's logit.
    unsafe { sys::llama_sampler_apply(grammar.as_ptr(), &mut arr) };
    one[0].logit != f32::NEG_INFINITY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_skips_banned_tokens_and_reports_the_models_probability() {
        let logits = [0.0, 5.0, 5.0_f32.ln() + 5.0, 1.0];
        let only = |banned: &'static [Token]| Filter { mask: None, banned };
        let row = Row::new(&logits);
        assert_eq!(argmax(&row, &only(&[])), Some(2));
        assert_eq!(argmax(&row, &only(&[2])), Some(1));
        assert_eq!(argmax(&row, &only(&[0, 1, 2, 3])), None);
        let p = row.prob(2);
        assert!(p > 0.8 && p < 0.85, "{p}");
    }

    /// llama.cpp's default chain (top-k 40, top-p 0.95, min-p 0.05,
    /// temperature 0.8, the draw) on `candidates`, seeded: the token drawn.
    fn draw(candidates: &mut [sys::llama_token_data], sorted: bool, seed: u32) -> Token {
        // SAFETY: plain constructors; the chain owns the samplers, `arr`
        // points into `candidates` for the call, and the chain is freed once.
        unsafe {
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_top_k(40));
            sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_top_p(0.95, 1));
            sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_min_p(0.05, 1));
            sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_temp(0.8));
            sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_dist(seed));
            let mut arr = sys::llama_token_data_array {
                data: candidates.as_mut_ptr(),
                size: candidates.len(),
                selected: -1,
                sorted,
            };
            sys::llama_sampler_apply(chain, &mut arr);
            let token = (*arr.data.add(arr.selected as usize)).id;
            sys::llama_sampler_free(chain);
            token
        }
    }

    #[test]
    fn the_top_k_found_first_draws_what_the_whole_vocabulary_draws() {
        const N: usize = 50_000;
        let data = |(id, logit): (Token, f32)| sys::llama_token_data { id, logit, p: 0.0 };
        for seed in 0..200u32 {
            // Distinct logits (a draw among equals may go either way), a
            // different order for each seed, a few well above the rest.
            let logits: Vec<f32> = (0..N)
                .map(|i| {
                    let rank = (i * 7919 + seed as usize * 12_345) % N;
                    let l = rank as f32 / N as f32 * 12.0 - 6.0;
                    if rank > N - 50 { l + 6.0 } else { l }
                })
                .collect();
            let mut whole: Vec<_> = (0..N as Token)
                .map(|i| data((i, logits[i as usize])))
                .collect();
            let mut first: Vec<_> = Row::new(&logits)
                .top_k(40, |_| true)
                .into_iter()
                .map(data)
                .collect();
            assert_eq!(
                draw(&mut whole, false, seed),
                draw(&mut first, true, seed),
                "seed {seed}"
            );
        }
    }
}

//! What a decode's rows become: each sequence's next token sampled (and
//! its draft kept up to the first token not picked), streamed as text, and
//! the request ended where a stop, the end, a limit or an error says, with
//! its final event.

use std::time::Instant;

use super::intake::banned;
use super::{Engine, Outcome};
use crate::core::{
    Candidate, Event, FinishReason, Request, RequestError, RequestKey, TokenLogprobs,
};
use crate::engine::backend::{Backend, BackendError, Filter, Token};
use crate::engine::guide::{Guide, TokenMask};
use crate::engine::sequence::Progress;
use crate::engine::text::Step;

impl<B: Backend> Engine<'_, B> {
    /// Samples sequence `i`'s next token from row `row`, then, while its
    /// draft was right, the token after each draft token from the rows that
    /// follow; the cells of the draft's wrong tokens are dropped.
    pub(super) fn on_rows(&mut self, i: usize, row: usize) -> Option<Outcome> {
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
            log::trace!(
                "draft: {accepted} of {} accepted {}",
                draft.len(),
                if s.guessed {
                    "(guessed)".to_string()
                } else {
                    format!("after a {}-token match", s.matched)
                }
            );
            if !s.guessed {
                s.rates.update(s.matched, accepted, draft.len());
                self.rates.update(s.matched, accepted, draft.len());
            } else if accepted > 0 || outcome.is_none() {
                self.guess_rate.update(accepted > 0);
            }
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
    pub(super) fn finish(&mut self, i: usize, outcome: Outcome) {
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
    pub(super) fn fail_all(&mut self, error: RequestError) {
        while !self.active.is_empty() {
            self.finish(0, Outcome::Error(error.clone()));
        }
        for (key, w) in std::mem::take(&mut self.waiting) {
            self.scheduler.cancel_queued(key);
            self.report(&w.req, Outcome::Error(error.clone()), &w.progress);
        }
    }

    pub(super) fn report(&self, req: &Request, outcome: Outcome, progress: &Progress) {
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

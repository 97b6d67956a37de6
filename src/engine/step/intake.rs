//! Requests coming in: tokenized, checked and given their sampler and
//! constraint on arrival (so a bad one is refused at once), queued with the
//! scheduler, ended while they wait if aborted or past their deadline, and
//! started as sequences when the scheduler admits them.

use std::time::Instant;

use super::{Engine, Outcome, Waiting};
use crate::core::{Event, FinishReason, Request, RequestError, RequestKey, RequestKind};
use crate::engine::backend::{Backend, Token};
use crate::engine::guide::{Guide, GuideError};
use crate::engine::planner::Work;
use crate::engine::prompt;
use crate::engine::scheduler::Job;
use crate::engine::sequence::{Progress, Seq};

impl<B: Backend> Engine<'_, B> {
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
    pub(super) fn reap_cancelled(&mut self) {
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
    pub(super) fn admit(&mut self) {
        self.start_admitted();
        for (key, position) in self.scheduler.position_updates() {
            self.io.sink.send(Event::Queued { key, position });
        }
    }

    /// Starts every request the scheduler admits (their places are told
    /// after the whole intake, by `admit`).
    fn start_admitted(&mut self) {
        while let Some((job, admitted)) = self.scheduler.admit_next() {
            let Waiting {
                req,
                mut progress,
                sampler,
                guide,
            } = self
                .waiting
                .remove(&job.key)
                .expect("admitted requests are waiting");
            let cached = if self.apply(&admitted.ops) {
                admitted.cached_tokens
            } else {
                0
            };
            progress.cached_tokens = cached;
            self.active.push(Seq {
                banned: banned(&req.params, self.backend.eog_tokens(), true),
                guide,
                sampler,
                stream: crate::engine::text::TextStream::new(req.params.stop.clone()),
                id: admitted.seq,
                decoded: job.tokens[..cached].to_vec(),
                prompt: job.tokens,
                pending: None,
                limit: admitted.limit,
                progress,
                work: Work::Idle,
                row: None,
                draft: Vec::new(),
                matched: 0,
                guessed: false,
                rates: self.rates.inherit(),
                req,
            });
        }
    }
}

/// The tokens a sequence may not sample: end-of-generation tokens with
/// `ignore_eos`, and also the stop tokens before `min_tokens` (`early`).
pub(super) fn banned(
    params: &crate::core::SamplingParams,
    eog: &[Token],
    early: bool,
) -> Vec<Token> {
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

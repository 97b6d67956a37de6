//! One admitted request inside the engine: its tokens, its sampler, its text
//! hold-back and its timings.

use std::time::{Duration, Instant};

use crate::core::{Request, Stats};
use crate::engine::backend::{SeqId, Token};
use crate::engine::guide::Guide;
use crate::engine::planner::{SeqView, Work};
use crate::engine::text::TextStream;

pub struct Seq<S> {
    pub req: Request,
    pub id: SeqId,
    pub prompt: Vec<Token>,
    /// Tokens whose cells this sequence holds, in position order.
    pub decoded: Vec<Token>,
    /// Sampled, sent, and to be decoded in the next step.
    pub pending: Option<Token>,
    /// Positions this sequence may fill (its reserved pages).
    pub limit: usize,
    pub sampler: S,
    /// Its constraint, if it has one.
    pub guide: Option<Guide>,
    /// Tokens it may not sample now (see `step::banned`).
    pub banned: Vec<Token>,
    pub stream: TextStream,
    pub progress: Progress,
    /// Its share of the current step.
    pub work: Work,
    /// The batch row whose logits it samples from in the current step.
    pub row: Option<usize>,
}

impl<S> Seq<S> {
    pub fn view(&self) -> SeqView {
        SeqView {
            generating: self.pending.is_some(),
            prompt_left: self.prompt.len().saturating_sub(self.decoded.len()),
            priority: self.req.urgency.priority,
        }
    }

    /// Records what the last decode put into the cache for this sequence.
    pub fn advance(&mut self) {
        match self.work {
            Work::Prefill(n) => {
                let start = self.decoded.len();
                self.decoded
                    .extend_from_slice(&self.prompt[start..start + n]);
            }
            Work::Decode => self.decoded.extend(self.pending.take()),
            Work::Idle => {}
        }
    }
}

/// Timing and counts of one request, for its `end` stats.
pub struct Progress {
    received: Instant,
    pub first_token: Option<Instant>,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub truncated_tokens: usize,
    pub completion_tokens: usize,
    /// Time spent choosing tokens (logged at debug level with each request).
    pub sampling: Duration,
}

impl Progress {
    pub fn new(received: Instant) -> Progress {
        Progress {
            received,
            first_token: None,
            prompt_tokens: 0,
            cached_tokens: 0,
            truncated_tokens: 0,
            completion_tokens: 0,
            sampling: Duration::ZERO,
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats_at(Instant::now())
    }

    /// `ttft_ms`: receipt to first sampled token. `tps`: tokens after the
    /// first over the time since the first (pure decode rate).
    fn stats_at(&self, now: Instant) -> Stats {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
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
            truncated_tokens: self.truncated_tokens,
            completion_tokens: self.completion_tokens,
            ttft_ms,
            ms: ms(now - self.received),
            tps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_measure_from_receipt_and_from_the_first_token() {
        let t0 = Instant::now();
        let mut p = Progress::new(t0);
        p.first_token = Some(t0 + Duration::from_millis(40));
        p.completion_tokens = 11;
        let s = p.stats_at(t0 + Duration::from_millis(540));
        assert_eq!(s.ttft_ms, 40.0);
        assert_eq!(s.ms, 540.0);
        assert!((s.tps - 20.0).abs() < 1e-9, "{}", s.tps);
        assert_eq!(Progress::new(t0).stats_at(t0).tps, 0.0);
    }
}

//! One admitted request inside the engine: its tokens, its sampler, its text
//! hold-back, its drafts and its timings.

use std::time::{Duration, Instant};

use crate::core::{Request, Stats};
use crate::engine::backend::{SeqId, Token};
use crate::engine::guide::Guide;
use crate::engine::planner::{SeqView, Work};
use crate::engine::speculate::{self, Rates};
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
    /// Tokens it may not sample now (see `step::intake::banned`).
    pub banned: Vec<Token>,
    pub stream: TextStream,
    pub progress: Progress,
    /// Its share of the current step.
    pub work: Work,
    /// The batch row whose logits it samples from in the current step (its
    /// draft's rows follow it).
    pub row: Option<usize>,
    /// Draft tokens decoded after its pending one in the current step, and
    /// the length of the repeated run they follow.
    pub draft: Vec<Token>,
    pub matched: usize,
    /// Its draft is guessed tokens that fill a tile of logits rows
    /// (`Seq::guess`): they cost nothing, so their fate teaches `rates`
    /// nothing.
    pub guessed: bool,
    /// How often its drafts were right.
    pub rates: Rates,
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

    /// Looks up its draft for this step, beside `rows` decode rows in a
    /// step that costs `step_ms` so far where a draft token adds `token_ms`,
    /// in at most `room` batch tokens, ending the step's `outputs` rows of
    /// logits so far on a whole `tile` (`speculate::fit_tile`); returns what
    /// it adds to the step.
    pub fn draft(
        &mut self,
        settings: &speculate::Settings,
        rows: usize,
        (step_ms, token_ms): (f64, f64),
        room: usize,
        (outputs, tile): (usize, usize),
    ) -> f64 {
        let available = settings.max_draft.min(self.draft_room()).min(room);
        self.decoded.extend(self.pending);
        let found = speculate::lookup(&self.decoded, settings.min_match, available);
        let p = self.rates.rate(found.matched);
        let k = speculate::length(found.tokens.len(), p, rows, step_ms, token_ms);
        let k = speculate::fit_tile(k, found.tokens.len(), outputs, tile);
        self.draft.extend_from_slice(&found.tokens[..k]);
        self.matched = found.matched;
        self.decoded.pop();
        if self.draft.is_empty() {
            self.rates.rest();
        }
        self.draft.len() as f64 * token_ms
    }

    /// Adds a guessed token to its draft (`speculate::guess`), where it has
    /// no draft of its own and room for one more within `max_draft`; false
    /// where it does not.
    pub fn guess(&mut self, max_draft: usize) -> bool {
        let room = self.draft_room().min(max_draft);
        if (!self.draft.is_empty() && !self.guessed) || self.draft.len() >= room {
            return false;
        }
        let len = self.decoded.len();
        self.decoded.extend(self.pending);
        self.decoded.extend_from_slice(&self.draft);
        let token = speculate::guess(&self.decoded);
        self.decoded.truncate(len);
        self.draft.extend(token);
        self.guessed = true;
        token.is_some()
    }

    /// Draft tokens it may have: none with a constraint, else as many as
    /// its own `draft_max`, its positions and its reply leave (the token
    /// sampled after the draft is one of the reply's too).
    fn draft_room(&self) -> usize {
        if self.guide.is_some() {
            return 0;
        }
        let asked = self.req.params.draft_max.map_or(usize::MAX, |d| d as usize);
        let positions = self.limit.saturating_sub(self.decoded.len() + 1);
        let reply = (self.req.params.max_tokens as usize)
            .saturating_sub(self.progress.completion_tokens + 1);
        asked.min(positions).min(reply)
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
    /// Draft tokens verified, and how many of them were right.
    pub drafted: usize,
    pub accepted: usize,
    /// Where the time to the first token went.
    pub ttft: TtftParts,
}

/// The stations of a request on its way to its first token, as instants
/// (logged at debug level with its end; `cargo bench --bench stream` sums
/// them up for short prompts).
#[derive(Debug, Default, Clone, Copy)]
pub struct TtftParts {
    /// The engine took it from its channel.
    pub taken: Option<Instant>,
    /// Tokenized, its constraint compiled and its sampler built.
    pub prepared: Option<Instant>,
    /// The first decode carrying its prompt began.
    pub first_decode: Option<Instant>,
    /// The decode that gave its first logits ended.
    pub logits: Option<Instant>,
    /// Decodes that carried its prompt.
    pub prefill_steps: usize,
    pub prefill: Duration,
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
            drafted: 0,
            accepted: 0,
            ttft: TtftParts::default(),
        }
    }

    /// "TTFT 31.20 ms: 0.05 reaching the engine, 0.23 tokenizing and
    /// building its sampler, ..." once it has a first token.
    pub fn ttft_parts(&self) -> Option<String> {
        let p = &self.ttft;
        let (first, taken, prepared, decode, logits) = (
            self.first_token?,
            p.taken?,
            p.prepared?,
            p.first_decode?,
            p.logits?,
        );
        let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
        let prefill = p.prefill.as_secs_f64() * 1e3;
        Some(format!(
            "TTFT {:.2} ms: {:.2} reaching the engine, {:.2} tokenizing and building its sampler, {:.2} until its first step, {prefill:.2} in {} prefill decodes (+{:.2} of other work between them), {:.2} sampling",
            ms(self.received, first),
            ms(self.received, taken),
            ms(taken, prepared),
            ms(prepared, decode),
            p.prefill_steps,
            (ms(decode, logits) - prefill).max(0.0),
            ms(logits, first),
        ))
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
            draft_tokens: self.drafted,
            accepted_draft_tokens: self.accepted,
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
    fn ttft_parts_add_up_station_by_station() {
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        let mut p = Progress::new(t0);
        assert_eq!(p.ttft_parts(), None);
        p.ttft = TtftParts {
            taken: Some(at(100)),
            prepared: Some(at(400)),
            first_decode: Some(at(500)),
            logits: Some(at(30_500)),
            prefill_steps: 2,
            prefill: Duration::from_millis(25),
        };
        p.first_token = Some(at(31_500));
        let text = p.ttft_parts().unwrap();
        assert_eq!(
            text,
            "TTFT 31.50 ms: 0.10 reaching the engine, 0.30 tokenizing and building its sampler, 0.10 until its first step, 25.00 in 2 prefill decodes (+5.00 of other work between them), 1.00 sampling"
        );
    }

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

//! What the next decode carries: the planner's work for every sequence
//! (decode rows first, prompt chunks sized to the gap target) and, in steps
//! without prompts, the drafts speculation pays for and guesses that fill
//! the last tile of logits rows.

use super::Engine;
use crate::engine::backend::{Backend, BatchToken};
use crate::engine::planner::{self, Budget, Work};
use crate::engine::sequence::Seq;
use crate::engine::speculate;

/// A tile of guesses that did not pay is tried again every this many times
/// it was declined: the guesses' rate and the steps' costs move.
const EXPLORE_EVERY: usize = 64;

impl<B: Backend> Engine<'_, B> {
    /// Fills the batch with the planned work of every sequence.
    pub(super) fn build_batch(&mut self) {
        let views: Vec<_> = self.active.iter().map(Seq::view).collect();
        let decodes = views.iter().filter(|v| v.generating).count();
        let target = self.costs.gap_target(self.cfg.itl_target_ms);
        let prefill_chunk = match target {
            Some(target) => self.costs.chunk(decodes, target, self.cfg.prefill_chunk),
            None => self.cfg.prefill_chunk,
        };
        let budget = Budget {
            batch: self.cfg.n_batch,
            prefill_chunk,
            mixed: self.cfg.mixed_rows,
        };
        let plan = planner::plan(&views, budget);
        // Drafts only in steps without prompts: a waiting prompt's first
        // token matters more than a running stream's extra ones.
        let drafting =
            self.cfg.speculate.max_draft > 0 && !plan.iter().any(|w| matches!(w, Work::Prefill(_)));
        // What this step costs so far and what a draft token adds.
        let mut draft_costs = drafting
            .then(|| self.costs.draft_estimate(decodes))
            .flatten();
        let mut allowance = draft_costs.map_or(0, |(step_ms, token_ms)| {
            speculate::allowance(decodes, self.cfg.itl_target_ms, step_ms, token_ms)
        });
        let mut drafted = 0;
        for (s, work) in self.active.iter_mut().zip(plan) {
            s.work = work;
            s.draft.clear();
            s.guessed = false;
            if let (Work::Decode, Some((step_ms, token_ms))) = (work, draft_costs.as_mut()) {
                // The decode rows and the drafts so far.
                let outputs = decodes + drafted;
                let room = self.cfg.n_batch.saturating_sub(outputs).min(allowance);
                let fit = (outputs, self.cfg.output_tile);
                let costs = (*step_ms, *token_ms);
                *step_ms += s.draft(&self.cfg.speculate, decodes, costs, room, fit);
                drafted += s.draft.len();
                allowance -= s.draft.len();
            }
        }
        self.extra_tile = false;
        if drafting {
            self.guess_to_tile(decodes + drafted);
            self.extra_tile = self.guess_tile(decodes, target);
        }
        self.batch.clear();
        for s in self.active.iter_mut() {
            s.row = None;
            match s.work {
                Work::Idle => {}
                Work::Decode => {
                    let token = s.pending.expect("a decoding sequence has a token");
                    s.row = Some(self.batch.len());
                    let pos = s.decoded.len();
                    let draft = s.draft.iter().enumerate();
                    let tokens = std::iter::once((pos, token))
                        .chain(draft.map(|(i, &token)| (pos + 1 + i, token)));
                    for (pos, token) in tokens {
                        self.batch.push(BatchToken {
                            token,
                            pos,
                            seq: s.id,
                            output: true,
                        });
                    }
                }
                Work::Prefill(n) => {
                    let start = s.decoded.len();
                    for pos in start..start + n {
                        let last = pos + 1 == s.prompt.len();
                        if last {
                            s.row = Some(self.batch.len());
                        }
                        self.batch.push(BatchToken {
                            token: s.prompt[pos],
                            pos,
                            seq: s.id,
                            output: last,
                        });
                    }
                }
            }
        }
        self.pad_outputs();
    }

    /// Gives decoding sequences without a draft a guessed token each, round
    /// after round, while that fills the last tile of the step's `outputs`
    /// rows of logits (`planner::padded_outputs`): a whole tile costs less
    /// than one with rows left over, and a right guess is a token more.
    fn guess_to_tile(&mut self, outputs: usize) {
        let room = self.cfg.n_batch.saturating_sub(outputs);
        let pad = planner::padded_outputs(outputs, self.cfg.output_tile).min(room);
        self.guess_rows(pad);
    }

    /// Adds a whole tile of guessed rows of logits to a decode step of two
    /// streams or more that ends on one (or has fewer rows than one; a
    /// stream alone has its drafts, sized by what they cost, and a tile
    /// tried there would be a gap three steps long), where the steps measured
    /// say the tokens the guesses are expected to keep (`GuessRate`) make
    /// the step's tokens come faster, and it stays within the gap target
    /// `gap_ms`. Four streams' steps took 33 ms with one tile and 41 with
    /// two on one day (`docs/BENCHMARKS.md`), 55 and 86 on another: 31
    /// right guesses in 100 pay on the first, 65 on the second
    /// (`speculate::tile_pays`). A step it has not seen is tried while half
    /// the guesses or more are right; one that did not pay, now and then
    /// again, for the rate moves. True where it added the tile.
    fn guess_tile(&mut self, decodes: usize, gap_ms: Option<f64>) -> bool {
        let tile = self.cfg.output_tile;
        if tile <= 1 || decodes < 2 {
            return false;
        }
        let rows = |s: &Seq<B::Sampler>| (s.work == Work::Decode).then_some(1 + s.draft.len());
        let outputs: usize = self.active.iter().filter_map(rows).sum();
        let want = (outputs / tile + 1) * tile;
        if planner::padded_outputs(outputs, tile) > 0 || want > self.cfg.n_batch {
            return false;
        }
        let Some(base_ms) = self.costs.outputs(outputs) else {
            return false;
        };
        let with_ms = self.costs.outputs(want);
        if with_ms.zip(gap_ms).is_some_and(|(with, gap)| with > gap) {
            return false;
        }
        // The tokens each decoding stream is expected to make, its draft's
        // tokens each right as often as its drafts (or the guesses) were.
        let a = self.guess_rate.rate();
        let expected = |s: &Seq<B::Sampler>| match (s.work, s.guessed) {
            (Work::Decode, true) => speculate::expected(a, s.draft.len()),
            (Work::Decode, false) => speculate::expected(s.rates.rate(s.matched), s.draft.len()),
            _ => 0.0,
        };
        let before: Vec<(usize, f64)> = self
            .active
            .iter()
            .map(|s| (s.draft.len(), expected(s)))
            .collect();
        let tokens: f64 = before.iter().map(|b| b.1).sum();
        let full = self.guess_rows(want - outputs) == want - outputs;
        let gain: f64 = self
            .active
            .iter()
            .zip(&before)
            .map(|(s, b)| expected(s) - b.1)
            .sum();
        let pays = match with_ms {
            Some(with_ms) => speculate::tile_pays(tokens, base_ms, gain, with_ms),
            None => a >= 0.5,
        };
        if full && pays {
            return true;
        }
        self.declined += 1;
        if full && self.declined.is_multiple_of(EXPLORE_EVERY) {
            return true;
        }
        for (s, &(n, _)) in self.active.iter_mut().zip(&before) {
            if s.guessed {
                s.draft.truncate(n);
                s.guessed = n > 0;
            }
        }
        false
    }

    /// Gives decoding sequences without a draft of their own a guessed
    /// token each, round after round, the streams with the fewest tokens so
    /// far first, until `n` are given or none can take one; returns how
    /// many were.
    fn guess_rows(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let mut order: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].work == Work::Decode)
            .collect();
        order.sort_by_key(|&i| self.active[i].progress.completion_tokens);
        let max_draft = self.cfg.speculate.max_draft;
        let mut given = 0;
        loop {
            let before = given;
            for &i in &order {
                if given < n && self.active[i].guess(max_draft) {
                    given += 1;
                }
            }
            if given == n || given == before {
                return given;
            }
        }
    }

    /// Asks logits of prompt tokens (ignored) while that fills the last tile
    /// of logits rows (`planner::padded_outputs`): a whole tile costs less.
    fn pad_outputs(&mut self) {
        let outputs = self.batch.iter().filter(|t| t.output).count();
        let mut pad = planner::padded_outputs(outputs, self.cfg.output_tile);
        for t in self.batch.iter_mut().rev() {
            if pad == 0 {
                break;
            }
            if !t.output {
                t.output = true;
                pad -= 1;
            }
        }
    }
}

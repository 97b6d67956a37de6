//! What the next decode carries: the planner's work for every sequence
//! (decode rows first, prompt chunks sized to the gap target) and, in steps
//! without prompts, the drafts speculation pays for and guesses that fill
//! the last tile of logits rows.

use super::Engine;
use crate::engine::backend::{Backend, BatchToken};
use crate::engine::planner::{self, Budget, Work};
use crate::engine::sequence::Seq;
use crate::engine::speculate;

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
        if drafting {
            self.guess_to_tile(decodes + drafted);
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
    /// than one with rows left over, and a right guess is a token more. The
    /// streams with the fewest tokens so far guess first.
    fn guess_to_tile(&mut self, outputs: usize) {
        let room = self.cfg.n_batch.saturating_sub(outputs);
        let mut pad = planner::padded_outputs(outputs, self.cfg.output_tile).min(room);
        if pad == 0 {
            return;
        }
        let mut order: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].work == Work::Decode)
            .collect();
        order.sort_by_key(|&i| self.active[i].progress.completion_tokens);
        let max_draft = self.cfg.speculate.max_draft;
        while pad > 0 {
            let before = pad;
            for &i in &order {
                if pad > 0 && self.active[i].guess(max_draft) {
                    pad -= 1;
                }
            }
            if pad == before {
                return;
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

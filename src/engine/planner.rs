//! Step planning, sans-I/O: which tokens of which sequences go into the next
//! decode. Generating sequences first (one token each, so no stream stalls
//! behind a prompt), then prompt chunks while the budget lasts:
//! `prefill_chunk` tokens while others generate, the whole batch when prompts
//! are all there is. Prompts go by priority, then the least left first, then
//! admission order: a short prompt that arrives while a long one is being
//! chunked starts at the next step instead of after the whole long prompt.

/// What the planner needs to know of one admitted sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqView {
    /// It has a sampled token waiting to be decoded.
    pub generating: bool,
    /// Prompt tokens not yet decoded.
    pub prompt_left: usize,
    /// The request's priority (higher first).
    pub priority: i32,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    Idle,
    /// Decode its pending token.
    Decode,
    /// Decode this many of its prompt tokens.
    Prefill(usize),
}

#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Tokens one decode may carry (`n_batch`).
    pub batch: usize,
    /// Prompt tokens a step may carry while others are generating.
    pub prefill_chunk: usize,
}

/// Plans one step; `seqs` are in admission order.
pub fn plan(seqs: &[SeqView], budget: Budget) -> Vec<Work> {
    let mut work: Vec<Work> = seqs
        .iter()
        .map(|s| {
            if s.generating {
                Work::Decode
            } else {
                Work::Idle
            }
        })
        .collect();
    let decodes = work.iter().filter(|w| **w == Work::Decode).count();
    let limit = if decodes > 0 {
        (decodes + budget.prefill_chunk.max(1)).min(budget.batch)
    } else {
        budget.batch
    };
    let mut prompts: Vec<usize> = (0..seqs.len())
        .filter(|&i| !seqs[i].generating && seqs[i].prompt_left > 0)
        .collect();
    // Stable: admission order among equals.
    prompts.sort_by_key(|&i| (std::cmp::Reverse(seqs[i].priority), seqs[i].prompt_left));
    let mut used = decodes;
    for i in prompts {
        if used >= limit {
            break;
        }
        let n = seqs[i].prompt_left.min(limit - used);
        work[i] = Work::Prefill(n);
        used += n;
    }
    work
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Budget = Budget {
        batch: 512,
        prefill_chunk: 128,
    };

    fn running() -> SeqView {
        SeqView {
            generating: true,
            prompt_left: 0,
            priority: 0,
        }
    }

    fn prompt(n: usize) -> SeqView {
        SeqView {
            generating: false,
            prompt_left: n,
            priority: 0,
        }
    }

    #[test]
    fn a_prompt_alone_takes_the_whole_batch() {
        assert_eq!(plan(&[prompt(2000)], BUDGET), [Work::Prefill(512)]);
        assert_eq!(plan(&[prompt(7)], BUDGET), [Work::Prefill(7)]);
    }

    #[test]
    fn every_generating_sequence_decodes_and_prompts_get_the_chunk() {
        let seqs = [running(), prompt(1000), running(), prompt(50)];
        assert_eq!(
            plan(&seqs, BUDGET),
            [
                Work::Decode,
                Work::Prefill(78),
                Work::Decode,
                Work::Prefill(50)
            ]
        );
    }

    #[test]
    fn prompts_are_served_in_admission_order_within_the_budget() {
        let seqs = [running(), prompt(100), prompt(100)];
        assert_eq!(
            plan(&seqs, BUDGET),
            [Work::Decode, Work::Prefill(100), Work::Prefill(28)]
        );
    }

    #[test]
    fn a_short_prompt_goes_before_a_long_one_and_priority_before_both() {
        let seqs = [running(), prompt(1000), prompt(20)];
        assert_eq!(
            plan(&seqs, BUDGET),
            [Work::Decode, Work::Prefill(108), Work::Prefill(20)]
        );
        let urgent = SeqView {
            priority: 5,
            ..prompt(1000)
        };
        let seqs = [running(), prompt(20), urgent];
        assert_eq!(
            plan(&seqs, BUDGET),
            [Work::Decode, Work::Idle, Work::Prefill(128)]
        );
    }

    #[test]
    fn the_batch_bounds_everything() {
        let small = Budget {
            batch: 4,
            prefill_chunk: 128,
        };
        let seqs = [running(), running(), prompt(10)];
        assert_eq!(
            plan(&seqs, small),
            [Work::Decode, Work::Decode, Work::Prefill(2)]
        );
        assert_eq!(plan(&[], BUDGET), []);
        assert_eq!(plan(&[prompt(0)], BUDGET), [Work::Idle]);
    }
}

//! Step planning, sans-I/O: which tokens of which sequences go into the next
//! decode. Generating sequences first (one token each, so no stream stalls
//! behind a prompt), then prompt chunks while the budget lasts:
//! `prefill_chunk` tokens while others generate (or beside prompts that end
//! in this step), the whole batch when one prompt is all there is. Prompts go
//! by priority, then the least left first, then admission order: a short
//! prompt that arrives while a long one is being chunked starts at the next
//! step instead of after the whole long prompt.
//!
//! `Costs` learns what a step costs on this machine; with a target
//! inter-token gap (`scheduler.itl_target_ms`) the engine sizes each step's
//! prompt chunk from it, so running streams keep their gap while prompts go in.

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
    /// Tokens a step may carry when its rows come from more than one
    /// sequence (decodes beside a prompt, or several prompts); at least the
    /// decodes and `MIN_CHUNK`. See `CPU_MIXED_ROWS`.
    pub mixed: usize,
}

/// `Budget::mixed` when llama.cpp runs on the CPU. From 64 rows on, ggml's
/// CPU flash attention works in tiles of 64 rows that skip a tile of cells
/// only when every row of the tile is masked from it. Rows of several
/// sequences together see nearly every cell of a cache filled with cached
/// prefixes, so such a step attends over the whole cache: at 8 streams
/// with 4096 cells a 64-row step took twice what 56 rows did (1.3 ms a
/// prompt token below the tile, 3.7 ms at it). Below it each row skips
/// the cells masked from it, and 32-63-token prompt chunks go through the
/// weights as fast as larger ones (llama-bench pp32-pp128: 585-632 tok/s).
pub const CPU_MIXED_ROWS: usize = 63;

/// Rows of logits that the CPU computes together, in its repacked matrix
/// products (`model.weight_repack`): ggml multiplies the activations four
/// rows at a time and each row left over on its own, one pass through the
/// weights a row, and the output layer (262k tokens for the default model)
/// is most of a step. llama-batched-bench, decode steps of B sequences here:
/// B=4 33.4 ms, 5 49.0, 6 52.7, 7 58.4, 8 40.7, 9 55.5, 11 65.4, 12 50.5.
/// Steps with 5 rows of logits or more are padded to a multiple of this by
/// asking logits of prompt tokens, which are then ignored (`padded_outputs`).
pub const CPU_OUTPUT_TILE: usize = 4;

/// How many more rows of logits make a step of `outputs` cheaper: up to the
/// next multiple of `tile` (1: never), from one tile and a row on. Below
/// that every row is a pass of its own, and the tile is dearer than 2-3 of
/// them.
pub fn padded_outputs(outputs: usize, tile: usize) -> usize {
    if tile <= 1 || outputs <= tile || outputs.is_multiple_of(tile) {
        0
    } else {
        tile - outputs % tile
    }
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
    let mut prompts: Vec<usize> = (0..seqs.len())
        .filter(|&i| !seqs[i].generating && seqs[i].prompt_left > 0)
        .collect();
    // Stable: admission order among equals.
    prompts.sort_by_key(|&i| (std::cmp::Reverse(seqs[i].priority), seqs[i].prompt_left));
    let chunk = budget.prefill_chunk.max(1);
    // With nothing generating, prompts that end within a chunk start
    // generating after this step: they should not wait behind a long prompt
    // filling the batch, which gets a chunk beside them. A prompt alone (or
    // only short ones) takes the whole batch.
    let left = |i: &usize| seqs[*i].prompt_left;
    let mixed = budget.mixed.max(decodes + MIN_CHUNK);
    let limit = if decodes > 0 {
        (decodes + chunk).min(budget.batch).min(mixed)
    } else {
        let ending: usize = prompts.iter().map(left).take_while(|&n| n <= chunk).sum();
        let total: usize = prompts.iter().map(left).sum();
        if ending > 0 && ending < total {
            (ending + chunk).min(budget.batch).min(mixed.max(ending))
        } else if prompts.len() > 1 {
            // Several prompts that all end here, or none of which does:
            // together they stay below `mixed`, but the first may take the
            // batch alone.
            budget.batch.min(left(&prompts[0]).max(mixed))
        } else {
            budget.batch
        }
    };
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

/// What steps cost on this machine, learned from the steps the engine ran:
/// a decode-only step's time by its number of rows, the extra time per
/// prompt token, and, by rows, a line through decode steps' time against
/// their draft tokens. With a target inter-token gap it says how many
/// prompt tokens a step may carry beside the running streams; speculation
/// weighs its drafts with the line.
#[derive(Debug, Clone)]
pub struct Costs {
    /// EWMA of decode-only steps' time (ms), by rows; 0: not seen yet.
    decode_ms: Vec<f64>,
    /// EWMA of the extra time (ms) per prompt token; 0: not seen yet.
    prompt_ms: f64,
    /// Decode steps' time against their draft tokens, by rows.
    drafts: Vec<Fit>,
    /// EWMA of the time (ms) of steps without prompt tokens, by rows of
    /// logits (decode rows, drafts and guesses); 0: not seen yet.
    outputs_ms: Vec<f64>,
}

/// Weight of the newest step in the averages.
const ALPHA: f64 = 0.2;

/// The inter-token gap kept without `itl_target_ms`, in measured
/// one-stream steps: a prompt going in beside running streams may stretch a
/// step this far.
pub const AUTO_TARGET_STEPS: f64 = 8.0;

/// The least a draft token is taken to add to a step, as a share of it:
/// where guesses fill the tile of logits rows (`padded_outputs`), a step
/// costs the same with a few drafts as without, and a fitted cost near
/// zero would let drafts grow without bound until the fit caught up.
pub const MIN_DRAFT_SHARE: f64 = 1.0 / 32.0;

/// Prompt tokens a step carries at the least while others generate, so a
/// prompt always progresses.
pub const MIN_CHUNK: usize = 8;

impl Costs {
    pub fn new(slots: usize) -> Costs {
        Costs {
            decode_ms: vec![0.0; slots + 1],
            prompt_ms: 0.0,
            drafts: vec![Fit::default(); slots + 1],
            outputs_ms: Vec::new(),
        }
    }

    /// Records a step without prompt tokens that computed `outputs` rows of
    /// logits in `ms`.
    pub fn observe_outputs(&mut self, outputs: usize, ms: f64) {
        if !ms.is_finite() || ms <= 0.0 || outputs == 0 {
            return;
        }
        if self.outputs_ms.len() <= outputs {
            self.outputs_ms.resize(outputs + 1, 0.0);
        }
        self.outputs_ms[outputs] = ewma(self.outputs_ms[outputs], ms);
    }

    /// A step without prompt tokens of `outputs` rows of logits, as seen.
    pub fn outputs(&self, outputs: usize) -> Option<f64> {
        self.outputs_ms.get(outputs).copied().filter(|&d| d > 0.0)
    }

    /// Records a step of `rows` decode rows, `prompt_tokens` prompt tokens
    /// and `drafts` draft tokens that took `ms`.
    pub fn observe(&mut self, rows: usize, prompt_tokens: usize, drafts: usize, ms: f64) {
        if !ms.is_finite() || ms <= 0.0 {
            return;
        }
        if prompt_tokens == 0
            && let Some(fit) = self.drafts.get_mut(rows)
        {
            fit.add(drafts as f64, ms);
        }
        if drafts > 0 {
            return;
        }
        if prompt_tokens == 0 {
            if let Some(d) = self.decode_ms.get_mut(rows).filter(|_| rows > 0) {
                *d = ewma(*d, ms);
            }
            return;
        }
        let base = if rows == 0 {
            Some(0.0)
        } else {
            self.decode(rows)
        };
        if let Some(base) = base {
            let per = ((ms - base) / prompt_tokens as f64).max(0.0);
            self.prompt_ms = ewma(self.prompt_ms, per);
        }
    }

    /// A decode-only step of `rows`: as seen, or as the nearest smaller one seen.
    pub fn decode(&self, rows: usize) -> Option<f64> {
        self.decode_ms
            .get(1..=rows.min(self.decode_ms.len() - 1))?
            .iter()
            .rev()
            .copied()
            .find(|&d| d > 0.0)
    }

    /// A step of `rows` decode rows without drafts, and what each draft
    /// token adds to it: fitted to the recent steps of `rows` rows once
    /// they carried drafts of different lengths.
    pub fn draft(&self, rows: usize) -> Option<(f64, f64)> {
        self.drafts
            .get(rows)?
            .line()
            .filter(|&(base, per)| base > 0.0 && per > 0.0)
    }

    /// The inter-token gap to keep for running streams: `configured`, or
    /// `AUTO_TARGET_STEPS` measured one-stream steps; `None` before one was
    /// measured.
    pub fn gap_target(&self, configured: Option<f64>) -> Option<f64> {
        configured.or_else(|| Some(self.decode(1)? * AUTO_TARGET_STEPS))
    }

    /// What a step of `rows` decode rows costs without drafts and what each
    /// draft token adds: the fitted line, or before drafts of different
    /// lengths were seen, a guess that lets them be tried (the decode-only
    /// step, and an eighth of it a token).
    pub fn draft_estimate(&self, rows: usize) -> Option<(f64, f64)> {
        let (step, per) = self.draft(rows).or_else(|| {
            let step = self.decode(rows)?;
            Some((step, step / 8.0))
        })?;
        Some((step, per.max(step * MIN_DRAFT_SHARE)))
    }

    /// Prompt tokens a step beside `rows` decodes may carry to stay within
    /// `target_ms`: between `MIN_CHUNK` and `cap`; `cap` until both costs
    /// have been seen.
    pub fn chunk(&self, rows: usize, target_ms: f64, cap: usize) -> usize {
        let (Some(decode), true) = (self.decode(rows), self.prompt_ms > 0.0) else {
            return cap;
        };
        let fits = ((target_ms - decode) / self.prompt_ms).floor().max(0.0) as usize;
        fits.clamp(MIN_CHUNK.min(cap), cap)
    }
}

/// A line fitted by least squares to (x, y) observations, the older ones
/// weighing less and less.
#[derive(Debug, Clone, Copy, Default)]
struct Fit {
    n: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

/// How much of its weight an observation loses at each new one.
const FIT_DECAY: f64 = 0.1;

impl Fit {
    fn add(&mut self, x: f64, y: f64) {
        let keep = 1.0 - FIT_DECAY;
        self.n = self.n * keep + 1.0;
        self.x = self.x * keep + x;
        self.y = self.y * keep + y;
        self.xx = self.xx * keep + x * x;
        self.xy = self.xy * keep + x * y;
    }

    /// (intercept, slope), once x has varied enough to tell.
    fn line(&self) -> Option<(f64, f64)> {
        if self.n < 3.0 {
            return None;
        }
        let (mx, my) = (self.x / self.n, self.y / self.n);
        let var = self.xx / self.n - mx * mx;
        if var < 0.5 {
            return None;
        }
        let slope = (self.xy / self.n - mx * my) / var;
        Some((my - slope * mx, slope))
    }
}

fn ewma(old: f64, new: f64) -> f64 {
    if old == 0.0 {
        new
    } else {
        old + ALPHA * (new - old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Budget = Budget {
        batch: 512,
        prefill_chunk: 128,
        mixed: 512,
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
    fn short_prompts_beside_a_long_one_are_not_held_back_by_it() {
        // Nothing generating: the short prompts end in this step, the long
        // one gets a chunk beside them instead of the whole batch.
        let seqs = [prompt(2000), prompt(12), prompt(20)];
        assert_eq!(
            plan(&seqs, BUDGET),
            [Work::Prefill(128), Work::Prefill(12), Work::Prefill(20)]
        );
        // Alone, or only short ones, they take what the batch holds.
        assert_eq!(plan(&[prompt(2000)], BUDGET), [Work::Prefill(512)]);
        assert_eq!(
            plan(&[prompt(100), prompt(20)], BUDGET),
            [Work::Prefill(100), Work::Prefill(20)]
        );
        assert_eq!(
            plan(&[prompt(600), prompt(700)], BUDGET),
            [Work::Prefill(512), Work::Idle]
        );
    }

    #[test]
    fn logits_are_padded_to_whole_tiles_from_one_tile_and_a_row_on() {
        let pads: Vec<usize> = (0..=13).map(|n| padded_outputs(n, 4)).collect();
        assert_eq!(pads, [0, 0, 0, 0, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3]);
        assert_eq!(padded_outputs(7, 1), 0, "no tile: no padding");
    }

    #[test]
    fn steps_mixing_sequences_stay_below_the_attention_tile() {
        let cpu = Budget {
            mixed: CPU_MIXED_ROWS,
            ..BUDGET
        };
        let seqs = [running(), prompt(1000), running()];
        assert_eq!(
            plan(&seqs, cpu),
            [Work::Decode, Work::Prefill(61), Work::Decode]
        );
        // Beside short ones a long prompt gets what is left below the tile;
        // short ones that end take their tokens whatever the cap.
        let seqs = [prompt(2000), prompt(12), prompt(20)];
        assert_eq!(
            plan(&seqs, cpu),
            [Work::Prefill(31), Work::Prefill(12), Work::Prefill(20)]
        );
        let seqs = [prompt(2000), prompt(100), prompt(100)];
        assert_eq!(
            plan(&seqs, cpu)[1..],
            [Work::Prefill(100), Work::Prefill(100)]
        );
        // Prompts that do not end in this step go one at a time; alone, the
        // whole batch; many decodes still leave room for a chunk.
        let seqs = [prompt(600), prompt(700)];
        assert_eq!(plan(&seqs, cpu), [Work::Prefill(512), Work::Idle]);
        assert_eq!(plan(&[prompt(2000)], cpu), [Work::Prefill(512)]);
        let mut many = vec![running(); 60];
        many.push(prompt(100));
        assert_eq!(plan(&many, cpu)[60], Work::Prefill(MIN_CHUNK));
    }

    #[test]
    fn the_batch_bounds_everything() {
        let small = Budget {
            batch: 4,
            prefill_chunk: 128,
            mixed: 512,
        };
        let seqs = [running(), running(), prompt(10)];
        assert_eq!(
            plan(&seqs, small),
            [Work::Decode, Work::Decode, Work::Prefill(2)]
        );
        assert_eq!(plan(&[], BUDGET), []);
        assert_eq!(plan(&[prompt(0)], BUDGET), [Work::Idle]);
    }

    #[test]
    fn the_chunk_keeps_a_step_within_the_target_once_costs_are_known() {
        let mut c = Costs::new(4);
        assert_eq!(c.chunk(2, 60.0, 128), 128, "nothing measured yet");
        c.observe(2, 0, 0, 30.0);
        assert_eq!(c.chunk(2, 60.0, 128), 128, "no prompt cost yet");
        c.observe(2, 100, 0, 230.0); // 2 ms a prompt token
        assert_eq!(c.chunk(2, 60.0, 128), 15);
        // Three rows are not seen: two rows' cost stands in.
        assert_eq!(c.chunk(3, 60.0, 128), 15);
        assert_eq!(c.chunk(2, 30.0, 128), MIN_CHUNK, "prompts always progress");
        assert_eq!(c.chunk(2, 10_000.0, 128), 128, "never above the cap");
        // Averages move towards what is seen.
        c.observe(2, 0, 0, 40.0);
        assert!((c.decode(2).unwrap() - 32.0).abs() < 1e-9);
        c.observe(0, 0, 0, f64::NAN);
        c.observe(9, 0, 0, 5.0); // more rows than slots: ignored
        assert_eq!(c.decode(1), None);
    }

    #[test]
    fn draft_costs_are_fitted_to_steps_of_different_drafts() {
        let mut c = Costs::new(4);
        assert_eq!(c.draft(1), None);
        // 16 ms a step, 2 ms a draft token: a line through what is seen.
        for k in [0, 4, 8, 0, 2, 16, 3] {
            c.observe(1, 0, k, 16.0 + 2.0 * k as f64);
        }
        let (base, per) = c.draft(1).unwrap();
        assert!(
            (base - 16.0).abs() < 1e-6 && (per - 2.0).abs() < 1e-6,
            "{base} {per}"
        );
        // What it was long ago fades: the step became 10 ms.
        for k in [0, 4, 8, 0, 2, 16, 3].repeat(10) {
            c.observe(1, 0, k, 10.0 + 2.0 * k as f64);
        }
        let (base, _) = c.draft(1).unwrap();
        assert!((base - 10.0).abs() < 0.01, "{base}");
        // Steps that carry prompts, and unknown rows, say nothing of it.
        c.observe(1, 50, 4, 500.0);
        assert!((c.draft(1).unwrap().0 - 10.0).abs() < 0.01);
        c.observe(9, 0, 4, 5.0);
        // The same draft every time: no line yet.
        for _ in 0..10 {
            c.observe(2, 0, 4, 30.0);
        }
        assert_eq!(c.draft(2), None);
        // Until there is one, a guess from the decode-only step.
        let mut c = Costs::new(4);
        assert_eq!(c.draft_estimate(1), None);
        c.observe(2, 0, 0, 32.0);
        assert_eq!(c.draft_estimate(2), Some((32.0, 4.0)));
        assert_eq!(
            c.draft_estimate(3),
            Some((32.0, 4.0)),
            "as the nearest fewer rows"
        );
        // Drafts that seem free are taken to cost a little.
        for k in [0, 3, 0, 3, 0, 3] {
            c.observe(3, 0, k, 40.0 + 0.01 * k as f64);
        }
        let (base, per) = c.draft_estimate(3).unwrap();
        let floor = 40.0 * MIN_DRAFT_SHARE;
        assert!(
            (base - 40.0).abs() < 1e-6 && (per - floor).abs() < 1e-6,
            "{base} {per}"
        );
    }

    #[test]
    fn the_gap_target_is_the_configured_one_or_some_measured_steps() {
        let mut c = Costs::new(4);
        assert_eq!(c.gap_target(None), None, "nothing measured");
        assert_eq!(c.gap_target(Some(90.0)), Some(90.0));
        c.observe(1, 0, 0, 20.0);
        assert_eq!(c.gap_target(None), Some(20.0 * AUTO_TARGET_STEPS));
        assert_eq!(c.gap_target(Some(90.0)), Some(90.0));
    }
}

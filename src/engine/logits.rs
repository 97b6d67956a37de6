//! The model's own probabilities from raw logits: the most likely token, the
//! softmax at one token (every token event's `prob`) and the top
//! log-probabilities; and the top k logits a sampler's top-k keeps. Sans-I/O.
//!
//! These run once per sampled token over the whole vocabulary (262k entries
//! for Gemma 3), so they are written for the compiler to vectorize: lanes of
//! 16 for the maximum and the sum, and an exponential without branches or
//! library calls (libm's `expf` per element cost about 1 ms per token here,
//! 8% of a decode step; with `floor` and a float-to-int cast in it the loop
//! did not vectorize and the softmax took 0.34 ms, without them 0.12:
//! `cargo bench --bench micro --no-default-features -- logits`). The
//! exponential's relative error is below 2e-7;
//! the f32 sum over the vocabulary's terms carries more (about 1e-5), as the
//! serial sum it replaced did.
//!
//! A [`Row`] makes the two passes every sampled token needs, once: the
//! maximum of each block of 256 logits, and the softmax's sum. Greedy's pick
//! is then the first block whose maximum is the top, and a top-k passes over
//! the blocks whose maximum cannot enter. (Skipping blocks far below the top
//! in the sum does not pay: over Gemma 3's logits 95% of the blocks hold a
//! logit within 24 of the top. Summing each block against its own maximum
//! while it is in L1, in one pass, came out slower than two passes.)

use crate::engine::backend::Token;

const LANES: usize = 16;
/// The logits whose maximum a [`Row`] keeps as one.
const BLOCK: usize = 256;

/// e^x for x <= 0 (e^x of anything below -87, -inf included, is 0).
#[inline(always)]
fn exp_le0(x: f32) -> f32 {
    // x = n ln2 + f with n an integer and |f| <= ln2/2; ln2 in two parts
    // (Cephes' C1 + C2) so that n ln2 loses no bits in f32. n is rounded
    // by adding 1.5 * 2^23, whose ulp is 1: the sum's low mantissa bits
    // are then n itself, and no float-to-int conversion or `floor` (which
    // kept the loop from vectorizing) is needed.
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0;
    let xc = x.max(-87.0);
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let f = xc - n * C1 - n * C2;
    // e^f on [-ln2/2, ln2/2]: a polynomial of the 5th degree fitted for
    // the least largest relative error (9e-8; the Taylor series needs the
    // 7th degree for as little, two multiply-adds more per logit).
    let p = 1.0
        + f * (0.999_999_7
            + f * (0.499_991_5 + f * (0.166_676_36 + f * (0.041_897_933 + f * 0.008_290_307))));
    // 2^n by its exponent bits (n >= -126 since x >= -87): n + 127 is the
    // low bits of t's less those of 1.5 * 2^23, plus 127.
    let biased = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    let e = f32::from_bits(biased << 23) * p;
    if x >= -87.0 { e } else { 0.0 }
}

/// The largest logit (`-inf` for none).
pub fn max(logits: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &l) in lanes.iter_mut().zip(chunk) {
            *m = larger(*m, l);
        }
    }
    rest.iter().fold(halve(lanes, larger), |m, &l| larger(m, l))
}

/// The larger of two, one instruction (`f32::max`'s care for NaN, which
/// logits never are, took three and showed in a block's maximum).
#[inline(always)]
fn larger(a: f32, b: f32) -> f32 {
    if b > a { b } else { a }
}

/// The sum of e^(l - max) over the logits.
fn sum_exp(logits: &[f32], max: f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (s, &l) in lanes.iter_mut().zip(chunk) {
            *s += exp_le0(l - max);
        }
    }
    halve(lanes, |a, b| a + b) + rest.iter().map(|&l| exp_le0(l - max)).sum::<f32>()
}

/// The lanes folded by `op` in halves: four steps, where a fold from one
/// end is a chain of sixteen (it showed at a block of 256).
#[inline(always)]
fn halve(mut lanes: [f32; LANES], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] = op(lanes[i], lanes[i + width]);
        }
        width /= 2;
    }
    lanes[0]
}

/// A row of logits with the maximum of each block of `BLOCK` and the
/// softmax's sum.
pub struct Row<'a> {
    logits: &'a [f32],
    /// Each block's maximum.
    blocks: Vec<f32>,
    /// The largest logit (`-inf` for none).
    top: f32,
    /// The sum of e^(l - top) over the row.
    sum: f32,
}

impl<'a> Row<'a> {
    pub fn new(logits: &'a [f32]) -> Self {
        let blocks: Vec<f32> = logits.chunks(BLOCK).map(max).collect();
        let top = blocks.iter().fold(f32::NEG_INFINITY, |t, &m| larger(t, m));
        let sum = if top.is_finite() {
            sum_exp(logits, top)
        } else {
            0.0
        };
        Row {
            logits,
            blocks,
            top,
            sum,
        }
    }

    pub fn logits(&self) -> &'a [f32] {
        self.logits
    }

    /// The most likely token (the first of equals); `None` for no logits or
    /// none above `-inf`.
    pub fn most_likely(&self) -> Option<Token> {
        if !self.top.is_finite() {
            return None;
        }
        // Its block is the first whose maximum is the top.
        let from = BLOCK * self.blocks.iter().position(|&m| m == self.top)?;
        let i = self.logits[from..].iter().position(|&l| l == self.top)?;
        Some((from + i) as Token)
    }

    /// The probability of `token` under the softmax of the row.
    pub fn prob(&self, token: Token) -> f32 {
        if !self.top.is_finite() {
            return 1.0;
        }
        exp_le0(self.logits[token as usize] - self.top) / self.sum
    }

    /// The `k` most likely tokens with their log-probabilities (log-softmax
    /// of the raw logits), most likely first.
    pub fn top_logprobs(&self, k: usize) -> Vec<(Token, f32)> {
        if !self.top.is_finite() || k == 0 {
            return Vec::new();
        }
        let log_sum = self.sum.ln() + self.top;
        self.top_k(k, |_| true)
            .into_iter()
            .map(|(i, l)| (i, l - log_sum))
            .collect()
    }

    /// The `k` largest logits among the tokens `allows` lets through, with
    /// their tokens, largest first (of equals, the lower token first). For a
    /// small `k` (a sampler's top-k, the top log-probabilities): a block
    /// whose maximum cannot enter the list is passed over, and over a
    /// vocabulary most blocks are (0.12 ms for 40 of 262k here, where copying
    /// all of them for llama.cpp's chain to sort took about 1 ms).
    pub fn top_k(&self, k: usize, allows: impl Fn(Token) -> bool) -> Vec<(Token, f32)> {
        let mut best: Vec<(Token, f32)> = Vec::with_capacity(k + 1);
        if k == 0 {
            return best;
        }
        let offer = |best: &mut Vec<(Token, f32)>, i: usize, l: f32| {
            let full = best.len() == k;
            if (!full || l > best[k - 1].1) && allows(i as Token) {
                let at = best.partition_point(|b| b.1 >= l);
                best.insert(at, (i as Token, l));
                best.truncate(k);
            }
        };
        for (c, (chunk, &m)) in self.logits.chunks(BLOCK).zip(&self.blocks).enumerate() {
            if best.len() == k && m <= best[k - 1].1 {
                continue;
            }
            for (j, &l) in chunk.iter().enumerate() {
                offer(&mut best, c * BLOCK + j, l);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exponential_is_exact_enough_everywhere_it_is_used() {
        let mut worst = 0.0f64;
        let mut x = 0.0f32;
        while x > -87.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_le0(x));
            worst = worst.max(((got - want) / want).abs());
            x -= 0.0137;
        }
        assert!(worst < 2e-7, "relative error {worst:e}");
        assert_eq!(exp_le0(0.0), 1.0);
        assert_eq!(exp_le0(f32::NEG_INFINITY), 0.0);
        assert!(exp_le0(-87.0) > 0.0 && exp_le0(-87.0) < 1e-37);
    }

    #[test]
    fn softmax_matches_the_textbook_one_on_a_large_vocabulary() {
        // A vocabulary-sized spread of logits, not a multiple of the lanes.
        let logits: Vec<f32> = (0..262_147)
            .map(|i| ((i * 7919 % 1000) as f32 / 50.0) - 10.0)
            .collect();
        let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        assert_eq!(max(&logits), m);
        let row = Row::new(&logits);
        let first = logits.iter().position(|&l| l == m).unwrap();
        assert_eq!(row.most_likely(), Some(first as Token));
        let sum: f64 = logits.iter().map(|&l| f64::from(l - m).exp()).sum();
        for token in [0, 1, 999, first, 262_146] {
            let want = f64::from(logits[token] - m).exp() / sum;
            let got = f64::from(row.prob(token as Token));
            // The f32 sum of 262k terms (in 16 lanes) carries the error.
            assert!(
                ((got - want) / want).abs() < 1e-4,
                "{token}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn top_logprobs_are_the_most_likely_in_order() {
        let logits = [0.0, 2.0, 1.0, f32::NEG_INFINITY];
        let row = Row::new(&logits);
        let top = row.top_logprobs(2);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        let total: f32 = [0.0f32, 2.0, 1.0].iter().map(|l| l.exp()).sum();
        assert!((top[0].1 - (2.0 - total.ln())).abs() < 1e-6);
        assert!((top[0].1.exp() - row.prob(1)).abs() < 1e-6);
        assert_eq!(row.top_logprobs(10).len(), 4);
        assert!(row.top_logprobs(0).is_empty());
    }

    #[test]
    fn top_k_is_a_sort_cut_short() {
        // A vocabulary-sized spread with many equal logits, not a multiple of
        // the lanes: the same as sorting everything (largest first, of equals
        // the lower token first) and keeping k, with or without a filter.
        let logits: Vec<f32> = (0..262_147)
            .map(|i| ((i * 7919 % 100_003) as f32 / 5000.0) - 10.0)
            .collect();
        let sorted = |allows: &dyn Fn(Token) -> bool| {
            let mut all: Vec<(Token, f32)> = (0..logits.len() as Token)
                .filter(|&t| allows(t))
                .map(|t| (t, logits[t as usize]))
                .collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            all
        };
        let odd = |t: Token| t % 2 == 1;
        let row = Row::new(&logits);
        for k in [1, 40, 200] {
            assert_eq!(row.top_k(k, |_| true), sorted(&|_| true)[..k]);
            assert_eq!(row.top_k(k, odd), sorted(&odd)[..k]);
        }
        assert_eq!(row.top_k(3, |t| t == 5), [(5, logits[5])]);
        assert!(row.top_k(0, |_| true).is_empty());
        let short = [1.0, f32::NEG_INFINITY];
        assert_eq!(Row::new(&short).top_k(5, |_| true).len(), 2);
    }

    #[test]
    fn softmax_of_logits() {
        let logits = [1.0, 1.0, f32::NEG_INFINITY];
        let row = Row::new(&logits);
        assert!((row.prob(0) - 0.5).abs() < 1e-6);
        assert_eq!(row.prob(2), 0.0);
        assert_eq!(row.most_likely(), Some(0));
        assert_eq!(Row::new(&[3.0]).prob(0), 1.0);
        let none = [f32::NEG_INFINITY; 3];
        assert_eq!(Row::new(&none).prob(1), 1.0);
        assert_eq!(Row::new(&none).most_likely(), None);
        assert_eq!(Row::new(&[]).most_likely(), None);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn blocks_far_apart_and_empty_ones_add_up() {
        // Blocks whose maxima differ by more than e^x's range, whole blocks
        // at -inf, the top in a late block and a short last block.
        let mut logits = vec![f32::NEG_INFINITY; 5 * BLOCK + 7];
        logits[3] = -100.0;
        logits[2 * BLOCK + 9] = 4.0;
        logits[2 * BLOCK + 10] = 4.0_f32 + 2.0_f32.ln();
        logits[5 * BLOCK + 6] = 4.0;
        let row = Row::new(&logits);
        assert_eq!(row.most_likely(), Some((2 * BLOCK + 10) as Token));
        assert!((row.prob((2 * BLOCK + 10) as Token) - 0.5).abs() < 1e-6);
        assert!((row.prob((5 * BLOCK + 6) as Token) - 0.25).abs() < 1e-6);
        assert_eq!(row.prob(3), 0.0);
        assert_eq!(row.prob(0), 0.0);
    }
}

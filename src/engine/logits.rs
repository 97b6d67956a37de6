//! The model's own probabilities from raw logits: the softmax at one token
//! (every token event's `prob`) and the top log-probabilities; and the top
//! k logits a sampler's top-k keeps. Sans-I/O.
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

use crate::engine::backend::Token;

const LANES: usize = 16;
/// Logits `top_k` passes over by their maximum alone where it cannot enter.
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
    // e^f on [-ln2/2, ln2/2]: Taylor to the 7th power (error < 2e-8).
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0
                    + f * (1.0 / 24.0
                        + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
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
            *m = m.max(l);
        }
    }
    rest.iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &l| m.max(l))
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
    lanes.iter().sum::<f32>() + rest.iter().map(|&l| exp_le0(l - max)).sum::<f32>()
}

/// The probability of `token` under the softmax of `logits`.
pub fn softmax_at(logits: &[f32], token: Token) -> f32 {
    let max = max(logits);
    if !max.is_finite() {
        return 1.0;
    }
    exp_le0(logits[token as usize] - max) / sum_exp(logits, max)
}

/// The `k` most likely tokens with their log-probabilities (log-softmax of
/// the raw logits), most likely first.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(Token, f32)> {
    let max = max(logits);
    if !max.is_finite() || k == 0 {
        return Vec::new();
    }
    let log_sum = sum_exp(logits, max).ln() + max;
    top_k(logits, k, |_| true)
        .into_iter()
        .map(|(i, l)| (i, l - log_sum))
        .collect()
}

/// The `k` largest logits among the tokens `allows` lets through, with
/// their tokens, largest first (of equals, the lower token first). For a
/// small `k` (a sampler's top-k, the top log-probabilities): a block of
/// `BLOCK` logits whose maximum cannot enter the list is passed over by
/// that vectorized maximum alone, and over a vocabulary most blocks are
/// (0.12 ms for 40 of 262k here, where copying all of them for llama.cpp's
/// chain to sort took about 1 ms).
pub fn top_k(logits: &[f32], k: usize, allows: impl Fn(Token) -> bool) -> Vec<(Token, f32)> {
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
    for (c, chunk) in logits.chunks(BLOCK).enumerate() {
        if best.len() == k && max(chunk) <= best[k - 1].1 {
            continue;
        }
        for (j, &l) in chunk.iter().enumerate() {
            offer(&mut best, c * BLOCK + j, l);
        }
    }
    best
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
        let sum: f64 = logits.iter().map(|&l| f64::from(l - m).exp()).sum();
        for token in [0, 1, 999, 262_146] {
            let want = f64::from(logits[token] - m).exp() / sum;
            let got = f64::from(softmax_at(&logits, token as Token));
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
        let top = top_logprobs(&logits, 2);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        let total: f32 = [0.0f32, 2.0, 1.0].iter().map(|l| l.exp()).sum();
        assert!((top[0].1 - (2.0 - total.ln())).abs() < 1e-6);
        assert!((top[0].1.exp() - softmax_at(&logits, 1)).abs() < 1e-6);
        assert_eq!(top_logprobs(&logits, 10).len(), 4);
        assert!(top_logprobs(&logits, 0).is_empty());
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
        for k in [1, 40, 200] {
            assert_eq!(top_k(&logits, k, |_| true), sorted(&|_| true)[..k]);
            assert_eq!(top_k(&logits, k, odd), sorted(&odd)[..k]);
        }
        assert_eq!(top_k(&logits, 3, |t| t == 5), [(5, logits[5])]);
        assert!(top_k(&logits, 0, |_| true).is_empty());
        assert_eq!(top_k(&[1.0, f32::NEG_INFINITY], 5, |_| true).len(), 2);
    }

    #[test]
    fn softmax_of_logits() {
        let logits = [1.0, 1.0, f32::NEG_INFINITY];
        assert!((softmax_at(&logits, 0) - 0.5).abs() < 1e-6);
        assert_eq!(softmax_at(&logits, 2), 0.0);
        assert_eq!(softmax_at(&[3.0], 0), 1.0);
        assert_eq!(softmax_at(&[f32::NEG_INFINITY; 3], 1), 1.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }
}

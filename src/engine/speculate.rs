//! Draft-free speculative decoding, sans-I/O. The draft is looked up in the
//! sequence's own tokens (prompt lookup): the longest recent suffix that
//! occurred before, and what followed it then. The engine decodes the
//! pending token and the draft in one step, samples each row in order with
//! the request's own sampler, and keeps the draft up to the first token the
//! sampler did not pick. Every token it sends was sampled from the logits of
//! exactly the tokens before it, one draw each: the text is what plain
//! decoding gives.
//!
//! How much to draft is chosen per step from what steps cost here
//! (`planner::Costs`) and how often this sequence's drafts were right: the
//! length that maximizes the step's tokens per millisecond, none where no
//! length beats plain decoding.

use crate::engine::backend::Token;

/// Settings (`[scheduler] draft_max`, `draft_ngram`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Most draft tokens one step verifies for a sequence; 0: off.
    pub max_draft: usize,
    /// Shortest suffix match that yields a draft.
    pub min_match: usize,
}

/// Longest suffix compared.
const MAX_MATCH: usize = 16;

/// The draft for `history` (every token of the sequence, the pending one
/// last): the tokens that followed the most recent earlier occurrence of its
/// longest suffix of at least `min_match` tokens that occurred before, at
/// most `max` of them.
pub fn lookup(history: &[Token], min_match: usize, max: usize) -> &[Token] {
    let n = history.len();
    let min_match = min_match.max(1);
    if max == 0 || n <= min_match {
        return &[];
    }
    let last = history[n - 1];
    let (mut best_len, mut best_end) = (0, 0);
    // `end`: one past an earlier occurrence; at least one token follows it.
    for end in (min_match..n).rev() {
        if history[end - 1] != last {
            continue;
        }
        let len = (1..=MAX_MATCH.min(end))
            .take_while(|&t| history[end - t] == history[n - t])
            .last()
            .unwrap_or(0);
        if len > best_len {
            (best_len, best_end) = (len, end);
            if len == MAX_MATCH {
                break;
            }
        }
    }
    if best_len < min_match {
        return &[];
    }
    &history[best_end..(best_end + max).min(n)]
}

/// How often a sequence's draft tokens were right: a moving average over
/// the tokens verified, so a draft that keeps failing stops being made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Acceptance(f64);

/// Weight of each verified token in the average.
const WEIGHT: f64 = 0.1;
/// Where a sequence starts, and where a silent one drifts back to.
const PRIOR: f64 = 0.5;

impl Default for Acceptance {
    fn default() -> Self {
        Acceptance(PRIOR)
    }
}

impl Acceptance {
    pub fn rate(&self) -> f64 {
        self.0
    }

    /// `accepted` of `drafted` tokens were right (the first `accepted`).
    pub fn update(&mut self, accepted: usize, drafted: usize) {
        for _ in 0..accepted {
            self.0 += WEIGHT * (1.0 - self.0);
        }
        if accepted < drafted {
            self.0 -= WEIGHT * self.0;
        }
    }

    /// A step in which it drafted nothing: it drifts slowly back to the
    /// prior, so a sequence whose text turns repetitive gets tried again.
    pub fn rest(&mut self) {
        self.0 += 0.01 * (PRIOR - self.0);
    }
}

/// Tokens a sequence is expected to gain from a draft of `k` tokens each
/// right with probability `p`, the token sampled after them included.
fn expected(p: f64, k: usize) -> f64 {
    (0..=k).map(|i| p.powi(i as i32)).sum()
}

/// The draft length, at most `available`, that maximizes a step's tokens
/// per ms: the step has `rows` decode rows and costs `step_ms`, and each
/// draft token adds `token_ms`. 0 where no draft beats plain decoding.
pub fn length(available: usize, p: f64, rows: usize, step_ms: f64, token_ms: f64) -> usize {
    if available == 0 || rows == 0 || step_ms <= 0.0 || token_ms <= 0.0 {
        return 0;
    }
    let rate = |k: usize| (rows as f64 - 1.0 + expected(p, k)) / (step_ms + k as f64 * token_ms);
    let plain = rate(0);
    let (best, best_rate) = (1..=available)
        .map(|k| (k, rate(k)))
        .fold((0, plain), |a, b| if b.1 > a.1 { b } else { a });
    // A gain within a few percent is not worth the risk of the estimates.
    if best_rate > plain * 1.03 { best } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Token> {
        s.chars().map(|c| c as Token).collect()
    }

    #[test]
    fn the_longest_recent_match_gives_what_followed_it() {
        // "cat sat" occurred once; "t sat" and "at" match elsewhere too.
        let h = toks("the cat sat on the mat. the cat sat");
        assert_eq!(lookup(&h, 2, 6), toks(" on th"));
        // Capped by the history's end.
        let h = toks("abcabc");
        assert_eq!(lookup(&h, 2, 10), toks("abc"));
        // The most recent of equal matches.
        let h = toks("xy1 xy2 xy");
        assert_eq!(lookup(&h, 2, 1), toks("2"));
    }

    #[test]
    fn no_draft_without_a_long_enough_match() {
        assert!(lookup(&toks("abcdefg"), 2, 4).is_empty());
        assert!(lookup(&toks("ab zb"), 2, 4).is_empty());
        assert_eq!(lookup(&toks("ab zb"), 1, 4), toks(" zb"));
        assert!(lookup(&toks("a"), 1, 4).is_empty());
        assert!(lookup(&toks("abab"), 2, 0).is_empty());
        assert!(lookup(&[], 2, 4).is_empty());
    }

    #[test]
    fn acceptance_follows_the_drafts_and_rests_back_to_the_prior() {
        let mut a = Acceptance::default();
        a.update(4, 4);
        assert!(a.rate() > 0.65, "{}", a.rate());
        let mut b = Acceptance::default();
        for _ in 0..20 {
            b.update(0, 3);
        }
        assert!(b.rate() < 0.07, "{}", b.rate());
        let before = b.rate();
        b.rest();
        assert!(b.rate() > before && b.rate() < PRIOR);
    }

    #[test]
    fn the_length_pays_for_itself_or_is_zero() {
        // 16 ms a step, 2 ms a draft token.
        assert_eq!(length(16, 0.1, 1, 16.0, 2.0), 0, "drafts that fail");
        let sure = length(16, 0.98, 1, 16.0, 2.0);
        let likely = length(16, 0.8, 1, 16.0, 2.0);
        assert!(sure > likely && likely > 0, "{sure} {likely}");
        assert_eq!(length(3, 0.98, 1, 16.0, 2.0), 3, "bounded by what is there");
        // Beside many other rows the same draft gains the step less.
        assert!(length(16, 0.6, 8, 40.0, 2.0) < length(16, 0.6, 1, 16.0, 2.0));
        assert_eq!(length(0, 0.9, 1, 16.0, 2.0), 0);
        assert_eq!(length(8, 0.9, 1, 0.0, 2.0), 0, "costs not known");
    }
}

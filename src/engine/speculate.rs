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
use crate::engine::planner;

/// Settings (`[scheduler] draft_max`, `draft_min_match`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Most draft tokens one step verifies for a sequence; 0: off.
    pub max_draft: usize,
    /// Shortest suffix match that yields a draft.
    pub min_match: usize,
}

/// Longest suffix compared.
const MAX_MATCH: usize = 16;

/// A draft, and the length of the repeated run it follows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Draft {
    pub tokens: Vec<Token>,
    pub matched: usize,
}

/// The draft for `history` (every token of the sequence, the pending one
/// last): the tokens that followed the most recent earlier occurrence of its
/// longest suffix of at least `min_match` tokens that occurred before, at
/// most `max` of them. Where that occurrence overlaps the suffix itself
/// (the text repeats a run of `period` tokens, two times at least), the
/// draft goes on repeating it past the history's end, as an earlier
/// occurrence in the run would give.
pub fn lookup(history: &[Token], min_match: usize, max: usize) -> Draft {
    let n = history.len();
    let min_match = min_match.max(1);
    if max == 0 || n <= min_match {
        return Draft::default();
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
        return Draft::default();
    }
    let period = n - best_end;
    let len = if best_len >= period {
        max
    } else {
        max.min(period)
    };
    Draft {
        tokens: (0..len).map(|i| history[best_end + i % period]).collect(),
        matched: best_len,
    }
}

/// A guess at the token after `history` (the pending one last), for a row
/// of logits that would otherwise be dearer left out
/// (`planner::padded_outputs`): what followed the last token when it
/// occurred before, else the last token again. Any token will do: it is
/// verified as a draft is.
pub fn guess(history: &[Token]) -> Option<Token> {
    let found = lookup(history, 1, 1);
    found.tokens.first().or(history.last()).copied()
}

/// How often a stream's first guessed token was right, over every stream,
/// the recent guesses weighing most, from a prior of one of two. A guess
/// after a right one is taken to be right as often.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuessRate(f64);

/// What the rate keeps of its weight at each guess verified (about the
/// last fifty count).
const GUESS_KEEP: f64 = 0.98;

impl Default for GuessRate {
    fn default() -> GuessRate {
        GuessRate(0.5)
    }
}

impl GuessRate {
    pub fn rate(&self) -> f64 {
        self.0
    }

    pub fn update(&mut self, right: bool) {
        self.0 = self.0 * GUESS_KEEP + if right { 1.0 - GUESS_KEEP } else { 0.0 };
    }
}

/// How much faster tokens must come for a tile of guesses to be added: a
/// longer step delays every stream's next token.
const TILE_GAIN: f64 = 1.05;

/// Whether a step that makes `tokens` tokens (expected) in `base_ms` makes
/// them clearly faster (`TILE_GAIN`) with a tile more of guessed rows,
/// expected to keep `gain` tokens more, that takes it to `with_ms`.
pub fn tile_pays(tokens: f64, base_ms: f64, gain: f64, with_ms: f64) -> bool {
    gain > 0.0 && (tokens + gain) * base_ms >= TILE_GAIN * tokens * with_ms
}

/// How often draft tokens were right: the tokens kept over the tokens
/// verified (the kept ones and the first wrong one), older counts weighing
/// less and less, from a prior of one of two.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Acceptance {
    kept: f64,
    verified: f64,
}

/// What the counts keep of their weight at each verification, and at one
/// that found a wrong token: trust that took many right drafts to build is
/// soon lost when drafts go wrong.
const KEEP: f64 = 0.9;
const KEEP_WRONG: f64 = 0.5;
/// ... and at each step without a draft: a sequence that stopped drafting
/// drifts back towards the prior and gets tried again.
const REST: f64 = 0.98;
/// The most weight a new sequence takes from the engine's counts.
const INHERIT: f64 = 256.0;

impl Acceptance {
    pub fn rate(&self) -> f64 {
        (self.kept + 1.0) / (self.verified + 2.0)
    }

    /// The first `accepted` of `drafted` tokens were right.
    pub fn update(&mut self, accepted: usize, drafted: usize) {
        let wrong = accepted < drafted;
        let keep = if wrong { KEEP_WRONG } else { KEEP };
        self.kept = self.kept * keep + accepted as f64;
        self.verified = self.verified * keep + (accepted + usize::from(wrong)) as f64;
    }

    /// A step in which it drafted nothing.
    pub fn rest(&mut self) {
        self.kept *= REST;
        self.verified *= REST;
    }

    /// Where a new sequence starts: these counts' rate, with little weight
    /// so its own drafts soon decide.
    pub fn inherit(&self) -> Acceptance {
        let scale = (INHERIT / self.verified.max(INHERIT)).min(1.0);
        Acceptance {
            kept: self.kept * scale,
            verified: self.verified * scale,
        }
    }
}

/// Acceptance by the length of the run a draft follows: a long repeated run
/// foretells what comes next far better than a short one.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rates([Acceptance; 4]);

fn bucket(matched: usize) -> usize {
    match matched {
        0..=4 => 0,
        5..=7 => 1,
        8..=11 => 2,
        _ => 3,
    }
}

impl Rates {
    pub fn rate(&self, matched: usize) -> f64 {
        self.0[bucket(matched)].rate()
    }

    pub fn update(&mut self, matched: usize, accepted: usize, drafted: usize) {
        self.0[bucket(matched)].update(accepted, drafted);
    }

    pub fn rest(&mut self) {
        self.0.iter_mut().for_each(Acceptance::rest);
    }

    pub fn inherit(&self) -> Rates {
        Rates(self.0.map(|a| a.inherit()))
    }
}

/// Tokens a sequence is expected to gain from a draft of `k` tokens each
/// right with probability `p`, the token sampled after them included.
pub fn expected(p: f64, k: usize) -> f64 {
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

/// A draft length `k` moved so that the step's rows of logits, `outputs`
/// before it, end on a whole tile (`planner::CPU_OUTPUT_TILE`; 1: as it
/// is): up to the tile's end where `available` tokens allow (a fuller tile
/// costs less than one with rows left over), else down to the last tile's
/// end. Steps within the first tile keep `k`: there every row is a pass of
/// its own.
pub fn fit_tile(k: usize, available: usize, outputs: usize, tile: usize) -> usize {
    let total = outputs + k;
    let pad = planner::padded_outputs(total, tile);
    if k == 0 || pad == 0 {
        k
    } else if k + pad <= available {
        k + pad
    } else {
        (total - total % tile).saturating_sub(outputs)
    }
}

/// How long a drafted step of a stream decoded alone may take without
/// `itl_target_ms`, in plain steps: its tokens then come in bursts at most
/// this far apart. The bound a step carrying a prompt has.
pub const ALONE_STEPS: f64 = planner::AUTO_TARGET_STEPS;
/// What drafts may add to a step shared with other streams, as a share of it.
const SHARED: f64 = 0.25;

/// Draft tokens one step may carry in all, beside `rows` decode rows, when
/// it costs `step_ms` without drafts and each draft token adds `token_ms`.
/// A stream alone may stretch its step to `target_ms` (without one,
/// `ALONE_STEPS` plain steps); streams beside others, which gain nothing
/// from a draft, add at most a quarter of the step.
pub fn allowance(rows: usize, target_ms: Option<f64>, step_ms: f64, token_ms: f64) -> usize {
    if rows == 0 || token_ms <= 0.0 {
        return 0;
    }
    let extra_ms = match (rows, target_ms) {
        (1, Some(target)) => target - step_ms,
        (1, None) => step_ms * (ALONE_STEPS - 1.0),
        _ => step_ms * SHARED,
    };
    (extra_ms.max(0.0) / token_ms) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Token> {
        s.chars().map(|c| c as Token).collect()
    }

    #[test]
    fn drafts_end_the_logits_on_a_whole_tile() {
        // Alone: 1 row + 5 drafts = 6 rows -> 8 when the lookup has 7, else 4.
        assert_eq!(fit_tile(5, 7, 1, 4), 7);
        assert_eq!(fit_tile(5, 6, 1, 4), 3);
        assert_eq!(fit_tile(2, 9, 1, 4), 2, "within the first tile");
        assert_eq!(fit_tile(3, 9, 1, 4), 3, "a whole tile already");
        // Beside 6 rows: 1 draft -> 2 when it can, else none.
        assert_eq!(fit_tile(1, 2, 6, 4), 2);
        assert_eq!(fit_tile(1, 1, 6, 4), 0);
        assert_eq!(fit_tile(0, 9, 6, 4), 0);
        assert_eq!(fit_tile(5, 9, 1, 1), 5, "no tile");
    }

    #[test]
    fn the_longest_recent_match_gives_what_followed_it() {
        // "cat sat" occurred once; "t sat" and "at" match elsewhere too.
        let h = toks("the cat sat on the mat. the cat sat");
        let draft = lookup(&h, 2, 6);
        assert_eq!((draft.tokens, draft.matched), (toks(" on th"), 11));
        // Capped by the history's end.
        let h = toks("the cat sat on the mat. the cat");
        assert_eq!(lookup(&h, 2, 40).tokens, toks(" sat on the mat. the cat"));
        // The most recent of equal matches.
        let h = toks("xy1 xy2 xy");
        assert_eq!(lookup(&h, 2, 1).tokens, toks("2"));
    }

    #[test]
    fn a_repeating_run_is_drafted_on_past_the_end() {
        // "abc" three times: the match overlaps the suffix, the run goes on.
        let h = toks("xabcabcabc");
        let draft = lookup(&h, 2, 7);
        assert_eq!((draft.tokens, draft.matched), (toks("abcabca"), 6));
        assert_eq!(lookup(&toks("zzzz"), 2, 5).tokens, toks("zzzzz"));
        // A run seen only once before is not a repetition: capped as before.
        let h = toks("abcd-abcd");
        assert_eq!(lookup(&h, 2, 9).tokens, toks("-abcd"));
    }

    #[test]
    fn no_draft_without_a_long_enough_match() {
        let none = Draft::default();
        assert_eq!(lookup(&toks("abcdefg"), 2, 4), none);
        assert_eq!(lookup(&toks("ab zb"), 2, 4), none);
        assert_eq!(lookup(&toks("ab zb"), 1, 4).tokens, toks(" zb"));
        assert_eq!(lookup(&toks("a"), 1, 4), none);
        assert_eq!(lookup(&toks("abab"), 2, 0), none);
        assert_eq!(lookup(&[], 2, 4), none);
    }

    #[test]
    fn a_tile_of_guesses_pays_where_its_kept_tokens_outrun_its_cost() {
        // Four streams: a step of 4 rows takes 33 ms, of 8 rows 41 ms.
        assert!(tile_pays(4.0, 33.0, 4.0 * 0.65, 41.0));
        assert!(!tile_pays(4.0, 33.0, 4.0 * 0.2, 41.0));
        // ... or 55 and 86 (another day): at 60% right, 3% faster is not enough.
        assert!(!tile_pays(4.0, 55.0, 4.0 * 0.6, 86.0));
        assert!(tile_pays(4.0, 55.0, 4.0 * 0.68, 86.0));
        // One stream: 11 ms alone, 33 ms with three chained guesses.
        let chained = |a: f64| a + a * a + a * a * a;
        assert!(!tile_pays(1.0, 11.0, chained(0.65), 33.0));
        assert!(tile_pays(1.0, 11.0, chained(0.99), 33.0));
        assert!(!tile_pays(4.0, 33.0, 0.0, 30.0), "nothing to gain");
        let mut rate = GuessRate::default();
        assert_eq!(rate.rate(), 0.5);
        for _ in 0..200 {
            rate.update(true);
        }
        assert!(rate.rate() > 0.98);
        for _ in 0..50 {
            rate.update(false);
        }
        assert!(rate.rate() < 0.4, "{}", rate.rate());
    }

    #[test]
    fn a_guess_is_what_followed_the_last_token_before_or_that_token() {
        assert_eq!(guess(&toks("abcxa")), Some('b' as Token));
        assert_eq!(guess(&toks("abcab")), Some('c' as Token));
        assert_eq!(guess(&toks("abc")), Some('c' as Token), "never seen before");
        assert_eq!(guess(&[]), None);
    }

    #[test]
    fn acceptance_follows_the_drafts_and_rests_back_to_the_prior() {
        let mut a = Acceptance::default();
        assert_eq!(a.rate(), 0.5);
        a.update(4, 4);
        assert!(a.rate() > 0.8, "{}", a.rate());
        a.update(16, 16);
        assert!(a.rate() > 0.9, "{}", a.rate());
        let mut b = Acceptance::default();
        for _ in 0..20 {
            b.update(0, 3);
        }
        assert!(b.rate() <= 0.26, "{}", b.rate());
        let before = b.rate();
        b.rest();
        assert!(b.rate() > before && b.rate() < 0.5);
        // A new sequence starts where the engine's drafts were, and its
        // own soon decide.
        let mut c = a.inherit();
        assert_eq!(c.rate(), a.rate());
        for _ in 0..2 {
            c.update(0, 8);
        }
        assert!(c.rate() < 0.75, "{}", c.rate());
        let mut many = Acceptance::default();
        for _ in 0..50 {
            many.update(40, 40);
        }
        let light = many.inherit();
        assert!(
            light.verified <= INHERIT && light.rate() > 0.99,
            "{light:?}"
        );
        // Even then, wrong drafts soon end the trust.
        let mut wrong = light;
        for _ in 0..8 {
            wrong.update(0, 40);
        }
        assert!(wrong.rate() < 0.5, "{}", wrong.rate());
        assert_eq!(Acceptance::default().inherit(), Acceptance::default());
    }

    #[test]
    fn long_runs_and_short_ones_are_judged_apart() {
        let mut r = Rates::default();
        for _ in 0..5 {
            r.update(3, 0, 4);
            r.update(12, 16, 16);
        }
        assert!(r.rate(3) <= 0.26 && r.rate(4) <= 0.26, "{}", r.rate(3));
        assert!(r.rate(12) > 0.95 && r.rate(40) > 0.95, "{}", r.rate(12));
        assert_eq!(r.rate(6), 0.5, "nothing seen yet");
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

    #[test]
    fn a_stream_alone_may_stretch_its_step_others_only_a_little() {
        // 20 ms a step, 5 ms a draft token.
        assert_eq!(allowance(1, None, 20.0, 5.0), 28, "seven more plain steps");
        assert_eq!(allowance(1, Some(60.0), 20.0, 5.0), 8, "up to the target");
        assert_eq!(
            allowance(1, Some(15.0), 20.0, 5.0),
            0,
            "a target below one step"
        );
        assert_eq!(
            allowance(4, None, 40.0, 5.0),
            2,
            "a quarter of a shared step"
        );
        assert_eq!(
            allowance(4, Some(500.0), 40.0, 5.0),
            2,
            "whatever the target"
        );
        assert_eq!(allowance(0, None, 20.0, 5.0), 0);
        assert_eq!(allowance(1, None, 20.0, 0.0), 0, "costs not known");
    }
}

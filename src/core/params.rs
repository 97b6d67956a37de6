//! Sampling parameters: one resolved type, one `validate`, used by every path
//! that sets them (each protocol's request and the config file's `[defaults]`).

use serde::Deserialize;

use super::Constraint;

pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_LEN: usize = 256;
/// Most alternatives reported per token (`logprobs`).
pub const MAX_TOP_LOGPROBS: u8 = 20;
/// Most tokens one request may bias (as OpenAI's API allows).
pub const MAX_LOGIT_BIAS: usize = 300;
/// Most stop token ids, and most DRY sequence breakers.
pub const MAX_STOP_TOKENS: usize = 16;

/// Fully resolved generation parameters. `Default` holds the built-in
/// defaults, which `[defaults]` in the config file overrides.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// 0: greedy.
    pub temp: f32,
    /// 0: off.
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    /// 1: off.
    pub repeat_penalty: f32,
    /// Tokens the repeat, presence and frequency penalties look back over;
    /// -1: the whole context.
    pub repeat_last_n: i32,
    /// Subtracted from a token's logit once if it was generated before (0: off).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit per time it was generated (0: off).
    pub frequency_penalty: f32,
    /// `None`: a fresh random seed per request.
    pub seed: Option<u32>,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    /// Never end on an end-of-generation token (benchmarks).
    pub ignore_eos: bool,
    /// Report each sampled token's log-probability and this many of the
    /// most likely alternatives; `None`: off.
    pub logprobs: Option<u8>,
    /// Locally typical sampling (1: off).
    pub typical_p: f32,
    /// XTC: with this probability per token, the most likely tokens above
    /// `xtc_threshold` are dropped, all but the least likely of them (0: off).
    pub xtc_probability: f32,
    pub xtc_threshold: f32,
    /// DRY: penalises extending a sequence that repeats earlier text (0: off).
    pub dry_multiplier: f32,
    pub dry_base: f32,
    /// Repeats up to this long are not penalised.
    pub dry_allowed_length: u32,
    /// Tokens DRY looks back over; -1: the whole context.
    pub dry_penalty_last_n: i32,
    /// Strings that end a repeat DRY would penalise.
    pub dry_sequence_breakers: Vec<String>,
    /// Added to a token's logit before sampling; -100 or less bans it.
    pub logit_bias: Vec<(i32, f32)>,
    /// End-of-generation and stop tokens are not sampled before this many
    /// tokens were generated.
    pub min_tokens: u32,
    /// Tokens that end the generation like a stop string (their text is not sent).
    pub stop_token_ids: Vec<i32>,
    /// Most draft tokens one step verifies for this request, within the
    /// server's `scheduler.draft_max`; 0: none, each token its own step (an
    /// even cadence); `None`: the server's. The text is the same either way.
    pub draft_max: Option<u32>,
    /// What the output must match; `None`: anything.
    #[serde(skip)]
    pub constraint: Option<Constraint>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temp: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 512,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            typical_p: 1.0,
            xtc_probability: 0.0,
            xtc_threshold: 0.1,
            dry_multiplier: 0.0,
            dry_base: 1.75,
            dry_allowed_length: 2,
            dry_penalty_last_n: -1,
            dry_sequence_breakers: ["\n", ":", "\"", "*"].map(String::from).to_vec(),
            logit_bias: Vec::new(),
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            draft_max: None,
            constraint: None,
        }
    }
}

/// A parameter outside its range; `name` is the field's name, which each
/// caller qualifies (`params.temp`, `defaults.temp`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{name} = {value} is out of range: {range}")]
pub struct InvalidParam {
    pub name: &'static str,
    pub value: String,
    pub range: &'static str,
}

impl SamplingParams {
    /// Range checks that the types cannot express.
    pub fn validate(&self) -> Result<(), InvalidParam> {
        fn check<T: std::fmt::Display>(
            name: &'static str,
            v: T,
            ok: bool,
            range: &'static str,
        ) -> Result<(), InvalidParam> {
            if ok {
                Ok(())
            } else {
                Err(InvalidParam {
                    name,
                    value: v.to_string(),
                    range,
                })
            }
        }
        let p = self;
        check(
            "temp",
            p.temp,
            (0.0..=100.0).contains(&p.temp),
            "0 to 100 (0 = greedy)",
        )?;
        check("top_k", p.top_k, p.top_k >= 0, "0 or more (0 = off)")?;
        check(
            "top_p",
            p.top_p,
            p.top_p > 0.0 && p.top_p <= 1.0,
            "above 0, at most 1",
        )?;
        check("min_p", p.min_p, (0.0..=1.0).contains(&p.min_p), "0 to 1")?;
        check(
            "repeat_penalty",
            p.repeat_penalty,
            p.repeat_penalty > 0.0 && p.repeat_penalty <= 10.0,
            "above 0, at most 10 (1 = off)",
        )?;
        check(
            "repeat_last_n",
            p.repeat_last_n,
            p.repeat_last_n >= -1,
            "-1 (whole context) or more",
        )?;
        check(
            "presence_penalty",
            p.presence_penalty,
            (-2.0..=2.0).contains(&p.presence_penalty),
            "-2 to 2 (0 = off)",
        )?;
        check(
            "frequency_penalty",
            p.frequency_penalty,
            (-2.0..=2.0).contains(&p.frequency_penalty),
            "-2 to 2 (0 = off)",
        )?;
        check("max_tokens", p.max_tokens, p.max_tokens >= 1, "1 or more")?;
        check(
            "typical_p",
            p.typical_p,
            p.typical_p > 0.0 && p.typical_p <= 1.0,
            "above 0, at most 1 (1 = off)",
        )?;
        check(
            "xtc_probability",
            p.xtc_probability,
            (0.0..=1.0).contains(&p.xtc_probability),
            "0 to 1 (0 = off)",
        )?;
        check(
            "xtc_threshold",
            p.xtc_threshold,
            (0.0..=1.0).contains(&p.xtc_threshold),
            "0 to 1",
        )?;
        check(
            "dry_multiplier",
            p.dry_multiplier,
            (0.0..=10.0).contains(&p.dry_multiplier),
            "0 to 10 (0 = off)",
        )?;
        check(
            "dry_base",
            p.dry_base,
            (1.0..=10.0).contains(&p.dry_base),
            "1 to 10",
        )?;
        check(
            "dry_allowed_length",
            p.dry_allowed_length,
            p.dry_allowed_length <= 1000,
            "0 to 1000",
        )?;
        check(
            "dry_penalty_last_n",
            p.dry_penalty_last_n,
            p.dry_penalty_last_n >= -1,
            "-1 (whole context) or more",
        )?;
        check(
            "dry_sequence_breakers",
            format!("{} strings", p.dry_sequence_breakers.len()),
            p.dry_sequence_breakers.len() <= MAX_STOP_TOKENS
                && p.dry_sequence_breakers
                    .iter()
                    .all(|s| (1..=40).contains(&s.len())),
            "at most 16 strings, each 1 to 40 bytes long",
        )?;
        check(
            "logit_bias",
            format!("{} tokens", p.logit_bias.len()),
            p.logit_bias.len() <= MAX_LOGIT_BIAS,
            "at most 300 tokens",
        )?;
        if let Some(&(token, bias)) = p
            .logit_bias
            .iter()
            .find(|&&(t, b)| t < 0 || !(-100.0..=100.0).contains(&b))
        {
            check(
                "logit_bias",
                format!("{bias} for token {token}"),
                false,
                "token ids 0 or more, biases -100 to 100",
            )?;
        }
        check(
            "min_tokens",
            p.min_tokens,
            p.min_tokens <= p.max_tokens,
            "at most max_tokens",
        )?;
        check(
            "stop_token_ids",
            format!("{:?}", p.stop_token_ids),
            p.stop_token_ids.len() <= MAX_STOP_TOKENS && p.stop_token_ids.iter().all(|&t| t >= 0),
            "at most 16 token ids, each 0 or more",
        )?;
        if let Some(k) = p.logprobs {
            check("logprobs", k, k <= MAX_TOP_LOGPROBS, "0 to 20 alternatives")?;
        }
        check(
            "stop",
            format!("{} strings", p.stop.len()),
            p.stop.len() <= MAX_STOP_STRINGS,
            "at most 16 strings",
        )?;
        if let Some(s) = p
            .stop
            .iter()
            .find(|s| s.is_empty() || s.len() > MAX_STOP_LEN)
        {
            check("stop", format!("{s:?}"), false, "each 1 to 256 bytes long")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        SamplingParams::default().validate().unwrap();
    }

    #[test]
    fn out_of_range_values_are_named() {
        type Set = fn(&mut SamplingParams);
        let cases: [(&str, Set); 21] = [
            ("typical_p", |p| p.typical_p = 0.0),
            ("xtc_probability", |p| p.xtc_probability = 1.5),
            ("xtc_threshold", |p| p.xtc_threshold = -0.1),
            ("dry_multiplier", |p| p.dry_multiplier = -1.0),
            ("dry_base", |p| p.dry_base = 0.5),
            ("dry_penalty_last_n", |p| p.dry_penalty_last_n = -2),
            ("dry_sequence_breakers", |p| {
                p.dry_sequence_breakers = vec![String::new()]
            }),
            ("logit_bias", |p| p.logit_bias = vec![(5, 101.0)]),
            ("min_tokens", |p| p.min_tokens = p.max_tokens + 1),
            ("stop_token_ids", |p| p.stop_token_ids = vec![-1]),
            ("temp", |p| p.temp = -1.0),
            ("presence_penalty", |p| p.presence_penalty = 2.5),
            ("frequency_penalty", |p| p.frequency_penalty = -3.0),
            ("logprobs", |p| p.logprobs = Some(21)),
            ("top_k", |p| p.top_k = -3),
            ("top_p", |p| p.top_p = 0.0),
            ("min_p", |p| p.min_p = 1.5),
            ("repeat_penalty", |p| p.repeat_penalty = 0.0),
            ("repeat_last_n", |p| p.repeat_last_n = -2),
            ("max_tokens", |p| p.max_tokens = 0),
            ("stop", |p| p.stop = vec![String::new()]),
        ];
        for (name, set) in cases {
            let mut p = SamplingParams::default();
            set(&mut p);
            let e = p.validate().unwrap_err();
            assert_eq!(e.name, name);
            assert!(e.to_string().starts_with(&format!("{name} = ")), "{e}");
        }
        let p = SamplingParams {
            stop: vec!["x".into(); MAX_STOP_STRINGS + 1],
            ..SamplingParams::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("17 strings"));
    }
}

//! Constrained decoding: a request's `Constraint` (JSON Schema, regex,
//! choice list, Lark grammar) compiled by llguidance into a `Guide` that
//! says, before each sampled token, which tokens may come next.
//!
//! `Grammars` is built once per model from its vocabulary (the token trie
//! and llguidance's token slices take a moment for a 262k-token vocabulary)
//! and compiles each request's constraint under `GuideLimits`, so one
//! client's schema cannot stall the engine. Sans-I/O: no model here, only
//! token bytes; the unit tests use a small made-up vocabulary.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use llguidance::api::{GrammarInit, ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities, TokRxInfo, TokTrie};
use llguidance::{JsonCompileOptions, Logger, Matcher, ParserFactory};

use crate::core::Constraint;
use crate::engine::backend::Token;

/// The tokens allowed at one step: a bit per vocabulary entry.
pub type TokenMask = llguidance::toktrie::SimpleVob;

/// How much one request's constraint may cost.
#[derive(Debug, Clone, PartialEq)]
pub struct GuideLimits {
    /// Longest constraint text (a schema's JSON, a grammar, a regex), in bytes.
    pub max_bytes: usize,
    /// Time a constraint may take to compile, roughly: llguidance's lexer
    /// fuel is derived from it.
    pub compile_ms: u64,
}

impl GuideLimits {
    /// Refuses a constraint over `max_bytes`, whoever compiles it.
    pub fn check(&self, constraint: &Constraint) -> Result<(), GuideError> {
        let size = constraint.size();
        if size > self.max_bytes {
            return Err(GuideError(format!(
                "the {} is {size} bytes; this server accepts at most {} (constraints.max_bytes)",
                constraint.kind(),
                self.max_bytes
            )));
        }
        Ok(())
    }
}

/// Runs llguidance on a client's constraint: its error, or a panic inside
/// it (a bug some input finds), becomes that request's error (the first line
/// of it), not the engine's end.
fn guarded<R>(f: impl FnOnce() -> anyhow::Result<R>) -> Result<R, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| first_line(&e.to_string()).to_owned()),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(format!("llguidance failed on it ({what})"))
        }
    }
}

impl Default for GuideLimits {
    fn default() -> Self {
        GuideLimits {
            max_bytes: 64 * 1024,
            compile_ms: 200,
        }
    }
}

/// Why a constraint was refused, in words for the client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct GuideError(pub String);

/// The compiler of constraints for one model's vocabulary.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// `tokens[i]` is the bytes of token `i`; a control token's bytes start
    /// with 0xFF (llguidance's marker for special tokens). `eog` are the
    /// tokens that end a generation.
    pub fn new(tokens: &[Vec<u8>], eog: &[Token]) -> Result<Grammars, GuideError> {
        let t0 = Instant::now();
        let eos = *eog
            .first()
            .ok_or_else(|| GuideError("the model has no end-of-generation token".into()))?;
        let info = TokRxInfo::new(tokens.len() as u32, eos as u32);
        let eog: Vec<u32> = eog.iter().map(|&t| t as u32).collect();
        let trie = TokTrie::from(&info, tokens).with_eos_tokens(&eog);
        let env = Arc::new(ApproximateTokEnv::new(trie));
        // llguidance's token slices (JSON-oriented) double the build time and
        // memory (0.9 s and ~125 MB for a 262k vocabulary, against 0.5 s
        // and ~60 MB without) but keep masks fast inside strings.
        let mut factory = ParserFactory::new_simple(&(env as _))
            .map_err(|e| GuideError(format!("cannot prepare constrained decoding: {e}")))?;
        factory.quiet();
        log::info!(
            "constrained decoding ready: {} tokens in {:.0} ms",
            tokens.len(),
            t0.elapsed().as_secs_f64() * 1e3
        );
        Ok(Grammars { factory })
    }

    /// Compiles `constraint` and computes its first mask, so that a grammar
    /// that matches nothing is refused here, before any token is generated.
    pub fn compile(
        &self,
        constraint: &Constraint,
        limits: &GuideLimits,
    ) -> Result<Guide, GuideError> {
        limits.check(constraint)?;
        let grammar = match constraint {
            Constraint::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema)),
            Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Constraint::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
            Constraint::Choice(options) => TopLevelGrammar::from_lark(choice_grammar(options)),
            Constraint::Gbnf(_) => {
                return Err(GuideError(
                    "GBNF grammars are llama.cpp's: the backend's sampler follows them".into(),
                ));
            }
        };
        // llguidance's documented speeds: lexer fuel ~14-50k per ms, Earley
        // items ~20k per ms.
        let ms = limits.compile_ms.max(1);
        let parser_limits = ParserLimits {
            initial_lexer_fuel: 50_000 * ms,
            step_lexer_fuel: (14_000 * ms).min(ParserLimits::default().step_lexer_fuel),
            verbose_errors: false,
            ..ParserLimits::default()
        };
        let parser = guarded(|| {
            self.factory.create_parser_from_init_ext(
                GrammarInit::Serialized(grammar),
                Logger::new(0, 0),
                InferenceCapabilities::default(),
                parser_limits,
            )
        });
        // An empty first mask, or llguidance stopping at once (its stop
        // reasons say `NoExtension...`), means nothing can be generated: no
        // token of this vocabulary starts a match.
        let nothing = |why: &str| {
            GuideError(format!(
                "the {} matches no text this model can write{why}",
                constraint.kind()
            ))
        };
        let parser = parser.map_err(|e| {
            if e.starts_with("NoExtension") {
                nothing("")
            } else {
                GuideError(format!("invalid {}: {e}", constraint.kind()))
            }
        })?;
        let mut guide = Guide::new(Matcher::new(Ok(parser)));
        match guide.mask() {
            Ok(mask) if mask.is_zero() => Err(nothing("")),
            Ok(_) => Ok(guide),
            Err(e) => Err(nothing(&format!(" ({})", e.0))),
        }
    }
}

/// JSON on one line with Python's separators (`, ` and `: `), unless the
/// schema says otherwise in llguidance's `x-guidance`: free whitespace lets
/// a small model pad its output with newlines until `max_tokens`.
fn compact(schema: &serde_json::Value) -> serde_json::Value {
    let mut schema = schema.clone();
    if let Some(map) = schema.as_object_mut()
        && !map.contains_key("x-guidance")
    {
        let options = JsonCompileOptions {
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            whitespace_flexible: false,
            ..JsonCompileOptions::default()
        };
        options.apply_to(&mut schema);
    }
    schema
}

/// A Lark grammar matching exactly one of `options`.
fn choice_grammar(options: &[String]) -> String {
    let alternatives: Vec<String> = options
        .iter()
        .map(|o| serde_json::to_string(o).expect("a string serializes"))
        .collect();
    format!("start: {}", alternatives.join(" | "))
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s).trim()
}

/// One request's constraint while it generates.
///
/// Its next mask can be computed on the `MaskWorker` while the engine
/// decodes the step that needs it: `accept` takes the sampled token at once
/// (that is cheap) and hands the matcher over; `mask` takes it back.
pub struct Guide {
    state: State,
}

enum State {
    /// The matcher is here, with the next mask once computed.
    Here(Box<Matcher>, Option<TokenMask>),
    /// The worker computes the next mask.
    Away(Receiver<Computed>),
}

type Computed = (Box<Matcher>, Result<TokenMask, GuideError>);

impl Guide {
    fn new(matcher: Matcher) -> Guide {
        Guide {
            state: State::Here(Box::new(matcher), None),
        }
    }

    /// The tokens that may come next (an end-of-generation token among them
    /// once the text so far is complete).
    pub fn mask(&mut self) -> Result<&TokenMask, GuideError> {
        if let State::Away(rx) = &self.state {
            let (matcher, mask) = rx
                .recv()
                .map_err(|_| GuideError("the mask worker is gone".into()))?;
            self.state = State::Here(matcher, Some(mask?));
        }
        let State::Here(matcher, mask) = &mut self.state else {
            unreachable!("taken back above")
        };
        if mask.is_none() {
            *mask = Some(compute(matcher)?);
        }
        Ok(mask.as_ref().expect("computed above"))
    }

    /// Takes the sampled token (an error means it broke the constraint);
    /// with a `worker`, the next mask is computed there meanwhile.
    pub fn accept(&mut self, token: Token, worker: Option<&MaskWorker>) -> Result<(), GuideError> {
        self.mask()?;
        let State::Here(matcher, mask) = &mut self.state else {
            unreachable!("mask() takes the matcher back")
        };
        *mask = None;
        guarded(|| matcher.consume_token(token as u32)).map_err(GuideError)?;
        if let Some(worker) = worker
            && !matcher.is_stopped()
        {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let State::Here(matcher, _) = std::mem::replace(&mut self.state, State::Away(rx))
            else {
                unreachable!("matched above")
            };
            if let Err(job) = worker.jobs.send((matcher, tx)) {
                // No worker: compute here, at the next `mask`.
                self.state = State::Here(job.into_inner().0, None);
            }
        }
        Ok(())
    }

    /// The text is complete and nothing can follow it.
    pub fn is_done(&self) -> bool {
        matches!(&self.state, State::Here(m, _) if m.is_stopped())
    }
}

fn compute(matcher: &mut Matcher) -> Result<TokenMask, GuideError> {
    guarded(|| matcher.compute_mask()).map_err(GuideError)
}

/// A thread that computes constrained requests' next masks while the
/// engine decodes; it ends when the engine drops it.
pub struct MaskWorker {
    jobs: Sender<(Box<Matcher>, Sender<Computed>)>,
}

impl MaskWorker {
    pub fn spawn() -> std::io::Result<MaskWorker> {
        let (jobs, rx) = crossbeam_channel::unbounded::<(Box<Matcher>, Sender<Computed>)>();
        std::thread::Builder::new()
            .name("masks".into())
            .spawn(move || {
                for (mut matcher, reply) in rx {
                    let mask = compute(&mut matcher);
                    let _ = reply.send((matcher, mask));
                }
            })?;
        Ok(MaskWorker { jobs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Single bytes for printable ASCII, a few multi-byte words, then EOS.
    fn vocab() -> (Vec<Vec<u8>>, Token) {
        let mut tokens: Vec<Vec<u8>> = (0u8..128).map(|b| vec![b]).collect();
        for w in ["true", "false", "\"name\"", "\": \"", "abc", "{\"", "12"] {
            tokens.push(w.as_bytes().to_vec());
        }
        let eos = tokens.len() as Token;
        tokens.push(b"\xFF<eos>".to_vec());
        (tokens, eos)
    }

    fn grammars() -> (Grammars, Vec<Vec<u8>>, Token) {
        let (tokens, eos) = vocab();
        (Grammars::new(&tokens, &[eos]).unwrap(), tokens, eos)
    }

    /// Greedily follows `text` byte by byte through the guide, taking the
    /// longest allowed token each time; returns whether EOS is then allowed.
    fn drive(guide: &mut Guide, tokens: &[Vec<u8>], eos: Token, text: &str) -> bool {
        let mut rest = text.as_bytes();
        while !rest.is_empty() {
            let mask = guide.mask().unwrap().clone();
            let (t, len) = tokens
                .iter()
                .enumerate()
                .filter(|(i, w)| mask.is_allowed(*i as u32) && rest.starts_with(w) && !w.is_empty())
                .map(|(i, w)| (i as Token, w.len()))
                .max_by_key(|x| x.1)
                .unwrap_or_else(|| {
                    panic!("nothing allowed at {:?}", String::from_utf8_lossy(rest))
                });
            guide.accept(t, None).unwrap();
            rest = &rest[len..];
        }
        guide.is_done() || guide.mask().unwrap().is_allowed(eos as u32)
    }

    #[test]
    fn a_schema_allows_only_matching_text() {
        let (g, tokens, eos) = grammars();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"name": {"type": "string", "enum": ["abc", "xyz"]}},
            "required": ["name"],
            "additionalProperties": false
        });
        let limits = GuideLimits::default();
        let mut guide = g
            .compile(&Constraint::JsonSchema(schema.clone()), &limits)
            .unwrap();
        let mask = guide.mask().unwrap();
        assert!(mask.is_allowed(b'{' as u32));
        assert!(!mask.is_allowed(b'x' as u32) && !mask.is_allowed(eos as u32));
        assert!(drive(&mut guide, &tokens, eos, r#"{"name": "abc"}"#));
        let mut guide = g.compile(&Constraint::JsonSchema(schema), &limits).unwrap();
        for &b in br#"{"name": "#.iter() {
            guide.accept(b as Token, None).unwrap();
        }
        assert!(!guide.mask().unwrap().is_allowed(b'q' as u32));
        assert!(guide.accept(b'q' as Token, None).is_err());
    }

    #[test]
    fn masks_computed_on_the_worker_are_the_same() {
        let (g, _, eos) = grammars();
        let worker = MaskWorker::spawn().unwrap();
        let rx = Constraint::Regex("ab(c|d)".into());
        let limits = GuideLimits::default();
        let (mut here, mut away) = (
            g.compile(&rx, &limits).unwrap(),
            g.compile(&rx, &limits).unwrap(),
        );
        for &b in b"ab" {
            here.accept(b as Token, None).unwrap();
            away.accept(b as Token, Some(&worker)).unwrap();
            assert!(!away.is_done());
            assert_eq!(
                here.mask().unwrap().to_list(),
                away.mask().unwrap().to_list()
            );
        }
        assert!(away.accept(b'x' as Token, Some(&worker)).is_err());
        here.accept(b'c' as Token, Some(&worker)).unwrap();
        assert!(here.is_done() || here.mask().unwrap().is_allowed(eos as u32));
    }

    #[test]
    fn regex_and_choice() {
        let (g, tokens, eos) = grammars();
        let limits = GuideLimits::default();
        let mut guide = g
            .compile(&Constraint::Regex("[0-9]{3}".into()), &limits)
            .unwrap();
        assert!(drive(&mut guide, &tokens, eos, "123"));
        let choice = Constraint::Choice(vec!["true".into(), "no \"way\"".into()]);
        let mut guide = g.compile(&choice, &limits).unwrap();
        assert!(!guide.mask().unwrap().is_allowed(b'x' as u32));
        assert!(drive(&mut guide, &tokens, eos, "no \"way\""));
        let mut guide = g.compile(&choice, &limits).unwrap();
        assert!(drive(&mut guide, &tokens, eos, "true"));
    }

    #[test]
    fn bad_constraints_are_refused_with_a_reason() {
        let (g, _, _) = grammars();
        let limits = GuideLimits::default();
        let err = |c: Constraint| g.compile(&c, &limits).err().expect("refused").0;
        assert!(err(Constraint::Regex("(".into())).starts_with("invalid regex"));
        assert!(err(Constraint::Lark("start: nothing_here".into())).starts_with("invalid grammar"));
        let e = err(Constraint::JsonSchema(
            serde_json::json!({"type": "no-such-type"}),
        ));
        assert!(e.starts_with("invalid JSON schema"), "{e}");
        // Only characters outside this vocabulary: nothing can be generated.
        let e = err(Constraint::Regex("é+".into()));
        assert!(e.contains("matches no text"), "{e}");
        let big = Constraint::Lark(format!("start: \"{}\"", "a".repeat(100)));
        let small = GuideLimits {
            max_bytes: 50,
            ..limits
        };
        let e = g.compile(&big, &small).err().unwrap().0;
        assert!(e.contains("at most 50"), "{e}");
    }
}

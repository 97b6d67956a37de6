//! What the engine tells the server about a request.

use super::{FinishReason, RequestError, RequestKey, Stats};

#[derive(Debug)]
pub enum Event {
    /// The request waits for a slot or KV pages; `position` 1 is next.
    Queued { key: RequestKey, position: usize },
    /// Text that may be sent (complete UTF-8, no part of a stop string), and
    /// the probability the model gave the token that ended it. With
    /// `logprobs` asked for, one event per sampled token (its text may be
    /// empty while held back) carrying that token's log-probabilities.
    Token {
        key: RequestKey,
        text: String,
        prob: f32,
        logprobs: Option<Box<TokenLogprobs>>,
    },
    /// The request ended normally (including an abort).
    End {
        key: RequestKey,
        reason: FinishReason,
        stats: Stats,
    },
    /// The prompt's token count, the answer to `RequestKind::CountTokens`.
    Tokens { key: RequestKey, count: usize },
    /// The request failed; nothing more comes for it.
    Error {
        key: RequestKey,
        error: RequestError,
    },
    /// The engine has ended every request and is exiting.
    Stopped,
}

/// A token with its log-probability under the model (softmax of the raw
/// logits, before any sampler).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub token: i32,
    /// Its bytes (maybe part of a UTF-8 character).
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// The sampled token and the most likely ones at its step, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub chosen: Candidate,
    pub top: Vec<Candidate>,
}

impl Event {
    /// Whether this is the last event of its request.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Event::End { .. } | Event::Error { .. } | Event::Tokens { .. }
        )
    }
}

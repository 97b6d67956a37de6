//! A request as the engine sees it, whichever protocol it came in on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::SamplingParams;

/// Identifies one request between the server and the engine; never reused.
pub type RequestKey = u64;

/// Cloned only by the worker pool, to send a request that has produced
/// nothing yet to another worker when its own fails (the clone shares the
/// abort flag).
#[derive(Clone)]
pub struct Request {
    pub key: RequestKey,
    /// The client's own id, for logs.
    pub id: String,
    /// The API it came through (`ws`, `openai`, `http`), for logs.
    pub api: &'static str,
    pub input: PromptInput,
    pub params: SamplingParams,
    pub kind: RequestKind,
    pub truncate: Truncate,
    /// Set by the server on abort or disconnect; the engine checks it before
    /// every step and from llama.cpp's abort callback.
    pub cancel: Arc<AtomicBool>,
    pub received: Instant,
    /// Longest prompt accepted, in tokens; 0: only the context bounds it.
    pub max_prompt_tokens: usize,
    pub urgency: Urgency,
}

impl Request {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Its deadline has passed by `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.urgency
            .deadline
            .is_some_and(|d| now >= self.received + d)
    }
}

#[cfg(test)]
impl Request {
    /// A request to generate, as unit tests build them.
    pub fn for_test(key: RequestKey, input: PromptInput, params: SamplingParams) -> Request {
        Request {
            key,
            id: format!("r{key}"),
            api: "test",
            input,
            params,
            kind: RequestKind::Generate,
            truncate: Truncate::None,
            cancel: Arc::new(AtomicBool::new(false)),
            received: Instant::now(),
            max_prompt_tokens: 0,
            urgency: Urgency::default(),
        }
    }
}

/// How urgent a request is. `priority` orders the queue: higher first,
/// first come first served within a level (a voice turn need not wait behind
/// a batch job's queue). Past its `deadline`, counted from receipt, a request
/// ends (`FinishReason::Deadline`), queued or running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Urgency {
    pub priority: i32,
    pub deadline: Option<Duration>,
}

/// Longest deadline a request may give (a day), in milliseconds.
pub const MAX_DEADLINE_MS: u64 = 86_400_000;

/// What is asked of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Generate a reply.
    Generate,
    /// Only count the prompt's tokens (after the chat template).
    CountTokens,
}

/// What to do with a prompt too long for the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Truncate {
    /// Refuse it (`context_overflow`).
    #[default]
    None,
    /// Drop from the start: the oldest turns of a conversation (its system
    /// messages and its last message stay), the oldest tokens of a raw
    /// prompt, until it leaves room for `max_tokens` (at most half the context).
    Left,
}

/// A request as a protocol asks for it, before the server gives it a key.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    pub input: PromptInput,
    pub params: SamplingParams,
    pub kind: RequestKind,
    pub truncate: Truncate,
    pub urgency: Urgency,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Raw text: control tokens written in it (`<start_of_turn>`) are parsed.
    Text(String),
    /// A conversation, rendered by the chat template; message text is never
    /// read as control tokens.
    Messages(Vec<ChatMessage>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

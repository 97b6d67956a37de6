//! A request as the engine sees it, whichever protocol it came in on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::SamplingParams;

/// Identifies one request between the server and the engine; never reused.
pub type RequestKey = u64;

pub struct Request {
    pub key: RequestKey,
    /// The client's own id, for logs.
    pub id: String,
    pub input: PromptInput,
    pub params: SamplingParams,
    /// Set by the server on abort or disconnect; the engine checks it before
    /// every step and from llama.cpp's abort callback.
    pub cancel: Arc<AtomicBool>,
    pub received: Instant,
    /// Longest prompt accepted, in tokens; 0: only the context bounds it.
    pub max_prompt_tokens: usize,
}

impl Request {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
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

//! How a request ends: a finish reason and its statistics, or an error that
//! is data (a kind with its numbers), rendered to words only at the edge.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Eos,
    /// `max_tokens`, or the request's share of the context, was reached.
    Length,
    /// A stop string was found.
    Stop,
    /// The client aborted it.
    Abort,
    /// Its `deadline_ms` passed, while it waited or ran.
    Deadline,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Abort => "abort",
            FinishReason::Deadline => "deadline",
        }
    }
}

/// The broad class of an error, as clients branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    ContextOverflow,
    Overloaded,
    ShuttingDown,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::ContextOverflow => "context_overflow",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Why a request was refused or failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error(
        "the prompt is {prompt_tokens} tokens but the context holds {capacity} (at least one must be left for the reply)"
    )]
    ContextOverflow {
        prompt_tokens: usize,
        capacity: usize,
    },
    #[error(
        "the prompt is {prompt_tokens} tokens; this server accepts at most {max} (server.max_prompt_tokens)"
    )]
    PromptTooLong { prompt_tokens: usize, max: usize },
    #[error("the server is busy: {waiting} requests are already waiting")]
    QueueFull { waiting: usize },
    #[error(
        "this model has no chat template: send \"prompt\" instead, or start the server with --chat-template"
    )]
    NoChatTemplate,
    #[error("cannot format messages: {0}")]
    Template(String),
    #[error("cannot tokenize the prompt: {0}")]
    Tokenize(String),
    /// A constraint that cannot be compiled, or that the output broke.
    #[error("{0}")]
    Constraint(String),
    #[error("{field} names token {token}, but this model's vocabulary has {n_vocab} tokens")]
    UnknownToken {
        field: &'static str,
        token: i32,
        n_vocab: usize,
    },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the engine could not wake up: {0}")]
    WakeFailed(String),
    #[error("the engine failed: {0}")]
    EngineFailed(String),
    #[error("the engine stalled; the server restarts")]
    Stalled,
    #[error("the engine stopped unexpectedly")]
    EngineGone,
    /// The worker serving it failed after it had streamed tokens (before
    /// that, the pool sends it to another worker).
    #[error("worker {worker} failed: {why}")]
    WorkerFailed { worker: String, why: String },
    /// An upstream worker refused the request as malformed (its words).
    #[error("the upstream worker {worker} refused the request: {message}")]
    UpstreamRefused { worker: String, message: String },
    /// Every worker of the pool is out of rotation.
    #[error("no worker can serve the request: {0}")]
    NoWorker(String),
}

impl RequestError {
    pub fn code(&self) -> ErrorCode {
        match self {
            RequestError::ContextOverflow { .. } | RequestError::PromptTooLong { .. } => {
                ErrorCode::ContextOverflow
            }
            RequestError::QueueFull { .. } => ErrorCode::Overloaded,
            RequestError::NoChatTemplate
            | RequestError::Template(_)
            | RequestError::Tokenize(_)
            | RequestError::Constraint(_)
            | RequestError::UnknownToken { .. }
            | RequestError::UpstreamRefused { .. } => ErrorCode::BadRequest,
            RequestError::NoWorker(_) => ErrorCode::Overloaded,
            RequestError::ShuttingDown => ErrorCode::ShuttingDown,
            RequestError::WakeFailed(_)
            | RequestError::EngineFailed(_)
            | RequestError::Stalled
            | RequestError::EngineGone
            | RequestError::WorkerFailed { .. } => ErrorCode::Internal,
        }
    }
}

/// Counts and timings of one request, reported with its end.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache instead of being computed.
    pub cached_tokens: usize,
    /// Prompt tokens dropped to fit the context (`Truncate::Left`).
    pub truncated_tokens: usize,
    pub completion_tokens: usize,
    /// Receipt to first sampled token.
    pub ttft_ms: f64,
    /// Receipt to end.
    pub ms: f64,
    /// Tokens after the first over the time since the first (decode rate).
    pub tps: f64,
    /// Draft tokens verified (speculative decoding), and how many of them
    /// were kept: those were generated without a step of their own.
    pub draft_tokens: usize,
    pub accepted_draft_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_and_how_much() {
        let e = RequestError::ContextOverflow {
            prompt_tokens: 600,
            capacity: 512,
        };
        assert_eq!(e.code(), ErrorCode::ContextOverflow);
        assert!(e.to_string().contains("600 tokens") && e.to_string().contains("holds 512"));
        assert_eq!(
            RequestError::QueueFull { waiting: 3 }.code().as_str(),
            "overloaded"
        );
    }
}

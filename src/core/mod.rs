//! The domain: what a request is, how it is sampled, how it ends, and what the
//! engine reports. No I/O, no wire format, no llama.cpp: the engine consumes
//! these types, and each protocol (WebSocket v1, the OpenAI API) is a thin mapping to
//! and from them.

mod constraint;
mod event;
mod outcome;
mod params;
mod request;
mod status;
pub mod tools;

pub use constraint::Constraint;
pub use event::{Candidate, Event, TokenLogprobs};
pub use outcome::{ErrorCode, FinishReason, RequestError, Stats};
pub use params::{InvalidParam, MAX_STOP_LEN, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, SamplingParams};
pub use request::{
    ChatMessage, MAX_DEADLINE_MS, PromptInput, Request, RequestKey, RequestKind, RequestSpec, Role,
    Truncate, Urgency,
};
pub use status::{EngineState, KvStatus, OpsStatus, Status, WorkerStatus};

//! The contract every worker keeps, whatever serves behind it: take a
//! request, send its events, stop, and say how it is doing. The pool routes,
//! supervises and fails over through this and nothing else, so the serving
//! layer never changes when the backend does.

use std::time::Instant;

use crate::core::{Constraint, Event, Request, RequestKey, RequestKind, Status, Truncate};

/// What serves behind a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A llama.cpp engine in this process (a thread of its own).
    Llama,
    /// An OpenAI-compatible server reached over HTTP (vLLM, TGI,
    /// TensorRT-LLM, llama-server, another inference-core).
    OpenAi,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Llama => "llama",
            Kind::OpenAi => "openai",
        }
    }

    /// Whether this kind of worker does everything the request asks. An
    /// upstream counts no tokens, truncates no prompt (`truncate: left`) and
    /// constrains only by a JSON schema or a GBNF grammar.
    pub fn serves(self, req: &Request) -> bool {
        match self {
            Kind::Llama => true,
            Kind::OpenAi => {
                req.kind != RequestKind::CountTokens
                    && req.truncate == Truncate::None
                    && matches!(
                        req.params.constraint,
                        None | Some(Constraint::JsonSchema(_) | Constraint::Gbnf(_))
                    )
            }
        }
    }
}

/// How a worker says it is doing.
#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    Serving,
    /// It cannot serve now (why, in words): the pool takes it out of rotation.
    Down(String),
}

pub trait Worker: Send {
    fn kind(&self) -> Kind;
    /// Hands it a request; gives it back if the worker is gone.
    fn submit(&self, req: Request) -> Result<(), Box<Request>>;
    /// Appends the events it sent since the last call.
    fn drain(&self, into: &mut Vec<Event>);
    /// Some request's abort flag was set: look now (an upstream stream is
    /// closed at once; an engine checks before every step anyway).
    fn nudge(&self) {}
    /// The pool has sent these requests elsewhere or ended them: forget
    /// them without a word (an upstream closes their streams; an engine
    /// being restarted needs nothing).
    fn release(&self, _keys: Vec<RequestKey>) {}
    /// Stops it; requests in flight end with `shutting_down`.
    fn stop(&self);
    /// Its thread has ended.
    fn is_finished(&self) -> bool;
    /// Its slots, queue and KV pages (an upstream knows only its in-flight count).
    fn status(&self) -> Status;
    fn health(&self, now: Instant) -> Health;
    /// Tokens it has generated so far.
    fn tokens(&self) -> u64;
    /// Requests it serves at once; more wait in its queue.
    fn capacity(&self) -> usize;
}

//! The seam between the reactor and the protocols. A `Session` drives one
//! open connection: it turns what the client sends into core requests
//! (through the `Host`, the reactor's side) and the engine's events for its
//! requests into messages. The reactor never knows which protocol a
//! connection speaks; sessions never touch a socket, so they are tested with
//! a fake host.

use crate::core::{ErrorCode, Event, RequestSpec, SamplingParams, Status};
use crate::server::http::Response;
use crate::server::requests::Refused;

/// What a client sent.
#[derive(Debug, Clone, Copy)]
pub enum Message<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    /// A message over the size limit, refused unread (`why` says which
    /// limit); the connection closes right after the answer.
    TooLarge(&'a str),
}

/// One thing for the client.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    /// A WebSocket text message.
    Text(String),
    /// The whole HTTP response to the current request.
    Http(Response),
    /// The head of a streamed HTTP response (its body is ignored).
    StreamStart(Response),
    /// A piece of the streamed body (server-sent events).
    StreamData(String),
    /// The end of the streamed body, and of the request.
    StreamEnd,
}

/// Which API a request came through (a label in metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// WebSocket protocol v1.
    Ws,
    /// The OpenAI-compatible HTTP API.
    OpenAi,
    /// Our own plain HTTP routes (`/tokenize`).
    Http,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Ws => "ws",
            Api::OpenAi => "openai",
            Api::Http => "http",
        }
    }
}

/// What a session has for the client, in order.
#[derive(Debug, Default)]
pub struct Outbox {
    items: Vec<Out>,
}

impl Outbox {
    pub fn push(&mut self, text: String) {
        self.items.push(Out::Text(text));
    }

    pub fn respond(&mut self, response: Response) {
        self.items.push(Out::Http(response));
    }

    pub fn start_stream(&mut self, head: Response) {
        self.items.push(Out::StreamStart(head));
    }

    pub fn stream(&mut self, data: String) {
        self.items.push(Out::StreamData(data));
    }

    pub fn end_stream(&mut self) {
        self.items.push(Out::StreamEnd);
    }

    pub fn drain(&mut self) -> std::vec::Drain<'_, Out> {
        self.items.drain(..)
    }

    /// The text messages (for tests).
    pub fn texts(&self) -> Vec<&str> {
        self.items
            .iter()
            .filter_map(|o| match o {
                Out::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    pub fn items(&self) -> &[Out] {
        &self.items
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    Refused(#[from] Refused),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the engine is not running")]
    EngineGone,
    #[error("no worker is serving: every worker of the pool is out of rotation")]
    NoWorker,
    #[error("counting tokens needs a llama worker; this server only fronts upstream servers")]
    CannotCount,
}

impl SubmitError {
    /// The class of the refusal, as every protocol reports it.
    pub fn code(&self) -> ErrorCode {
        match self {
            SubmitError::Refused(Refused::Duplicate) => ErrorCode::BadRequest,
            SubmitError::Refused(Refused::TooMany(_)) => ErrorCode::Overloaded,
            SubmitError::ShuttingDown => ErrorCode::ShuttingDown,
            SubmitError::EngineGone => ErrorCode::Internal,
            SubmitError::NoWorker => ErrorCode::Overloaded,
            SubmitError::CannotCount => ErrorCode::BadRequest,
        }
    }
}

/// What a new client is told about the server.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerInfo {
    pub model: String,
    pub n_ctx: usize,
    /// Whether the model has a chat template (`messages` work).
    pub chat: bool,
    /// The engine is parked: the first request wakes it.
    pub parked: bool,
    pub max_inflight: usize,
    /// 0: only the context bounds a prompt.
    pub max_prompt_tokens: usize,
    pub max_message_bytes: usize,
    pub defaults: SamplingParams,
}

/// The server, as one connection's session sees it.
pub trait Host {
    fn info(&self) -> ServerInfo;
    fn defaults(&self) -> &SamplingParams;
    /// Starts a request; returns the id it goes by (a given one, or `req-N`).
    fn submit(&mut self, id: Option<&str>, spec: RequestSpec) -> Result<String, SubmitError>;
    /// Aborts this connection's request `id`, or all of them; unknown ids are ignored.
    fn abort(&mut self, id: Option<&str>);
    /// Whether this connection has a request `id` in flight.
    fn in_flight(&self, id: &str) -> bool;
    fn status(&self) -> Status;
}

pub trait Session {
    /// The API it speaks.
    fn api(&self) -> Api;
    /// The connection is open (after the WebSocket handshake).
    fn opened(&mut self, host: &mut dyn Host, out: &mut Outbox);
    fn on_message(&mut self, msg: Message<'_>, host: &mut dyn Host, out: &mut Outbox);
    /// An engine event for this session's request `id`.
    fn on_event(&mut self, id: &str, event: &Event, out: &mut Outbox);
}

/// A host for sessions' unit tests.
#[cfg(test)]
pub mod testing {
    use super::*;

    /// Records what the session asked for; refuses what it is told to.
    #[derive(Default)]
    pub struct FakeHost {
        pub defaults: SamplingParams,
        pub submitted: Vec<(Option<String>, RequestSpec)>,
        pub aborted: Vec<Option<String>>,
        pub refuse: Option<SubmitError>,
    }

    impl Host for FakeHost {
        fn info(&self) -> ServerInfo {
            ServerInfo {
                model: "m".into(),
                n_ctx: 4096,
                chat: true,
                parked: true,
                max_inflight: 8,
                max_prompt_tokens: 0,
                max_message_bytes: 1 << 20,
                defaults: self.defaults.clone(),
            }
        }
        fn defaults(&self) -> &SamplingParams {
            &self.defaults
        }
        fn submit(&mut self, id: Option<&str>, spec: RequestSpec) -> Result<String, SubmitError> {
            if let Some(e) = self.refuse {
                return Err(e);
            }
            self.submitted.push((id.map(Into::into), spec));
            Ok(id.unwrap_or("req-1").into())
        }
        fn abort(&mut self, id: Option<&str>) {
            self.aborted.push(id.map(Into::into));
        }
        fn in_flight(&self, id: &str) -> bool {
            self.submitted.iter().any(|(s, _)| s.as_deref() == Some(id))
        }
        fn status(&self) -> Status {
            Status {
                slots: 4,
                ..Status::default()
            }
        }
    }
}

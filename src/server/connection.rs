//! One client socket: a state machine from HTTP request to open WebSocket to
//! close. Transport only: what the messages mean is the job of the
//! connection's protocol session (`session`).
//!
//! The reactor calls `on_readable` / `on_writable` when mio reports readiness
//! (edge-triggered: each drains until `WouldBlock`), gets back what the client
//! sent as `Input`s, queues replies with `send_text` / `respond`, and calls
//! `flush`. A plain HTTP request (no `Upgrade: websocket`) becomes
//! `Input::Http` so the reactor can serve routes such as `/health` on the same
//! port. Outbound bytes are bounded by tungstenite's `max_write_buffer_size`:
//! a client that reads too slowly gets `SendError::SlowReader`.
//!
//! The frame path after the handshake (`read_messages`) is generic over the
//! stream, so `feed` (in `feed.rs`) can drive it from a byte slice.

use std::io::{self, Read, Write};
use std::time::Instant;

use mio::net::TcpStream;
use tungstenite::handshake::server::{NoCallback, ServerHandshake};
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

use crate::server::http::{Response, WS_VERSION};
use crate::server::session::Session;

/// Largest HTTP request head we accept before answering 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest plain-HTTP request body (`POST /tokenize`) before answering 413.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// What every connection is configured with.
pub struct Settings {
    pub ws: WebSocketConfig,
    /// Path of the test-only echo route (`server.echo_path`); `None`: off.
    pub echo_path: Option<String>,
}

/// A socket whose first bytes were already read (the HTTP request head we
/// parsed to route it) and are replayed to tungstenite's handshake.
pub struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl Read for Prefixed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.prefix.len() {
            let n = buf.len().min(self.prefix.len() - self.pos);
            buf[..n].copy_from_slice(&self.prefix[self.pos..self.pos + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Ok(n);
        }
        self.inner.read(buf)
    }
}

impl Write for Prefixed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

type Handshake = MidHandshake<ServerHandshake<Prefixed, NoCallback>>;

enum State {
    /// Reading the HTTP request head, then its body (`need`: head and body
    /// length, once the head said it).
    Http {
        stream: TcpStream,
        head: Vec<u8>,
        need: Option<usize>,
    },
    /// tungstenite is answering the upgrade; may take several readiness events.
    Handshaking(Box<Handshake>),
    Open(Box<WebSocket<Prefixed>>),
    /// Writing a plain HTTP response, then closing.
    Responding {
        stream: TcpStream,
        out: Vec<u8>,
        written: usize,
    },
    Closed,
}

/// What a client sent, for the reactor to act on.
#[derive(Debug)]
pub enum Input {
    /// The WebSocket is open: send the greeting.
    Opened,
    Text(String),
    Binary,
    /// A message over the size limit was refused; the connection is failed
    /// with 1009 once what the session answers is queued.
    TooLarge(String),
    /// A plain HTTP request (not an upgrade), with its body.
    Http {
        method: String,
        path: String,
        body: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Gone,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the client reads too slowly: its outbound buffer is full")]
    SlowReader,
    #[error("the connection is closed")]
    Closed,
}

pub struct Connection {
    /// Distinguishes this connection from earlier ones that used the same slab slot.
    pub generation: u64,
    state: State,
    /// Handshake or close deadline; past it the reactor drops the connection.
    pub deadline: Option<Instant>,
    /// The protocol spoken once the WebSocket is open.
    pub session: Option<Box<dyn Session>>,
    pub peer: String,
    /// Accepted over `max_connections`: its request is read, then answered 503.
    pub refused: bool,
    /// The test-only echo route: messages are echoed, the engine is never involved.
    echo: bool,
    /// When the client last sent anything (a frame of any kind).
    pub last_seen: Instant,
    /// When we pinged a silent client; cleared by any frame from it.
    pub ping_sent: Option<Instant>,
    /// A close to send at the next `flush`, after what is queued.
    failing: Option<(CloseCode, String)>,
}

impl Connection {
    pub fn new(stream: TcpStream, generation: u64, deadline: Instant, refused: bool) -> Connection {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        Connection {
            generation,
            state: State::Http {
                stream,
                head: Vec::new(),
                need: None,
            },
            deadline: Some(deadline),
            session: None,
            peer,
            refused,
            echo: false,
            last_seen: Instant::now(),
            ping_sent: None,
            failing: None,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    pub fn on_readable(&mut self, settings: &Settings, inputs: &mut Vec<Input>) -> Liveness {
        match &mut self.state {
            State::Http { stream, head, need } => match read_request(stream, head, *need) {
                Ok(true) => self.route_head(settings, inputs),
                Ok(false) => Liveness::Alive,
                Err(_) => Liveness::Gone,
            },
            State::Handshaking(_) => self.drive_handshake(inputs),
            State::Open(ws) => {
                let (read, active) = read_messages(ws, self.echo, inputs);
                if active {
                    self.last_seen = Instant::now();
                    self.ping_sent = None;
                }
                self.after_read(read)
            }
            State::Responding { stream, .. } => {
                // Discard anything more the client sends; we are closing.
                let mut sink = [0u8; 4096];
                loop {
                    match stream.read(&mut sink) {
                        Ok(0) => return Liveness::Gone,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Liveness::Alive,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return Liveness::Gone,
                    }
                }
            }
            State::Closed => Liveness::Gone,
        }
    }

    /// Writes what is queued; a pending close waits for the `flush` that
    /// follows the handling of this event's inputs.
    pub fn on_writable(&mut self, inputs: &mut Vec<Input>) -> Liveness {
        match &self.state {
            State::Handshaking(_) => self.drive_handshake(inputs),
            _ => self.write_out(),
        }
    }

    fn after_read(&mut self, read: ReadEnd) -> Liveness {
        match read {
            ReadEnd::Alive => Liveness::Alive,
            ReadEnd::Gone => Liveness::Gone,
            ReadEnd::Fail(code, why) => {
                self.failing = Some((code, why));
                Liveness::Alive
            }
        }
    }

    /// Writes queued bytes until done or `WouldBlock` (the rest goes out on
    /// WRITABLE), then a pending close.
    pub fn flush(&mut self) -> Liveness {
        if let Some((code, why)) = self.failing.take() {
            if let State::Open(ws) = &mut self.state {
                fail(ws, code, &why);
            }
            return Liveness::Gone;
        }
        self.write_out()
    }

    fn write_out(&mut self) -> Liveness {
        match &mut self.state {
            State::Open(ws) => match ws.flush() {
                Ok(()) => Liveness::Alive,
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    Liveness::Alive
                }
                Err(_) => Liveness::Gone,
            },
            State::Responding {
                stream,
                out,
                written,
            } => {
                while *written < out.len() {
                    match stream.write(&out[*written..]) {
                        Ok(0) => return Liveness::Gone,
                        Ok(n) => *written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Liveness::Alive,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return Liveness::Gone,
                    }
                }
                let _ = stream.shutdown(std::net::Shutdown::Write);
                Liveness::Gone
            }
            State::Http { .. } | State::Handshaking(_) => Liveness::Alive,
            State::Closed => Liveness::Gone,
        }
    }

    /// Queues a text frame (sent by the next `flush`).
    pub fn send_text(&mut self, text: String) -> Result<(), SendError> {
        let State::Open(ws) = &mut self.state else {
            return Err(SendError::Closed);
        };
        match ws.write(Message::text(text)) {
            Ok(()) => Ok(()),
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(tungstenite::Error::WriteBufferFull(_)) => Err(SendError::SlowReader),
            Err(_) => Err(SendError::Closed),
        }
    }

    /// Answers a plain HTTP request and closes the connection once written.
    pub fn respond(&mut self, response: &Response) {
        let State::Http { .. } = self.state else {
            return;
        };
        let State::Http { stream, .. } = std::mem::replace(&mut self.state, State::Closed) else {
            unreachable!()
        };
        let out = response.to_bytes();
        self.state = State::Responding {
            stream,
            out,
            written: 0,
        };
    }

    /// Starts the WebSocket closing handshake; the client has until `deadline` to answer.
    pub fn close(&mut self, code: CloseCode, reason: &str, deadline: Instant) {
        if let State::Open(ws) = &mut self.state {
            let _ = ws.close(Some(CloseFrame {
                code,
                reason: reason.to_owned().into(),
            }));
            self.deadline = Some(deadline);
        }
    }

    /// Pings a client that has been silent; `flush` sends it.
    pub fn ping(&mut self, now: Instant) {
        if let State::Open(ws) = &mut self.state {
            let _ = ws.write(Message::Ping(Default::default()));
            self.ping_sent = Some(now);
        }
    }

    /// Whether the closing handshake has begun (no message can be sent any more).
    pub fn is_closing(&self) -> bool {
        match &self.state {
            State::Open(ws) => !ws.can_write(),
            _ => false,
        }
    }

    fn route_head(&mut self, settings: &Settings, inputs: &mut Vec<Input>) -> Liveness {
        let State::Http { head, .. } = &self.state else {
            unreachable!()
        };
        // The head must end within the limit; a body may follow it.
        let head_end = head.windows(4).position(|w| w == b"\r\n\r\n");
        if head_end.is_none_or(|end| end > MAX_HEAD_BYTES) {
            self.respond(&Response::new(
                431,
                "text/plain",
                "request header too large\n",
            ));
            return self.flush();
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(head) {
            Ok(httparse::Status::Complete(n)) => n,
            _ => {
                self.respond(&Response::new(
                    400,
                    "text/plain",
                    "malformed HTTP request\n",
                ));
                return self.flush();
            }
        };
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
        };
        let upgrade = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        let version = header("sec-websocket-version");
        let method = req.method.unwrap_or("").to_owned();
        let path = req.path.unwrap_or("").to_owned();
        if self.refused {
            self.respond(&Response::too_many_connections());
            return self.flush();
        }
        if !upgrade {
            if header("transfer-encoding").is_some() {
                self.respond(&Response::new(
                    411,
                    "text/plain",
                    "send the body with Content-Length (chunked bodies are not supported)\n",
                ));
                return self.flush();
            }
            let length = match header("content-length").map(|v| v.parse::<usize>()) {
                None => 0,
                Some(Ok(n)) if n <= MAX_BODY_BYTES => n,
                Some(Ok(_)) => {
                    self.respond(&Response::new(
                        413,
                        "text/plain",
                        format!("the body is over {MAX_BODY_BYTES} bytes\n"),
                    ));
                    return self.flush();
                }
                Some(Err(_)) => {
                    self.respond(&Response::new(400, "text/plain", "bad Content-Length\n"));
                    return self.flush();
                }
            };
            let State::Http { head, need, .. } = &mut self.state else {
                unreachable!()
            };
            if head.len() < head_len + length {
                // The rest of the body comes on the next reads.
                *need = Some(head_len + length);
                return Liveness::Alive;
            }
            let body = head[head_len..head_len + length].to_vec();
            inputs.push(Input::Http { method, path, body });
            return Liveness::Alive;
        }
        if version.as_deref() != Some(WS_VERSION) {
            log::debug!(
                "{}: refusing WebSocket version {version:?} with 426",
                self.peer
            );
            self.respond(&Response::upgrade_required());
            return self.flush();
        }
        self.echo = settings
            .echo_path
            .as_deref()
            .is_some_and(|p| path.split('?').next() == Some(p));
        let State::Http { stream, head, .. } = std::mem::replace(&mut self.state, State::Closed)
        else {
            unreachable!()
        };
        let replay = Prefixed {
            prefix: head,
            pos: 0,
            inner: stream,
        };
        self.finish_handshake(
            tungstenite::accept_with_config(replay, Some(settings.ws)),
            inputs,
        )
    }

    fn drive_handshake(&mut self, inputs: &mut Vec<Input>) -> Liveness {
        let State::Handshaking(mid) = std::mem::replace(&mut self.state, State::Closed) else {
            unreachable!()
        };
        self.finish_handshake(mid.handshake(), inputs)
    }

    fn finish_handshake(
        &mut self,
        result: Result<WebSocket<Prefixed>, HandshakeError<ServerHandshake<Prefixed, NoCallback>>>,
        inputs: &mut Vec<Input>,
    ) -> Liveness {
        match result {
            Ok(ws) => {
                self.state = State::Open(Box::new(ws));
                self.deadline = None;
                self.last_seen = Instant::now();
                if !self.echo {
                    inputs.push(Input::Opened);
                }
                // Frames may have arrived right behind the request head.
                let State::Open(ws) = &mut self.state else {
                    unreachable!()
                };
                let (read, _) = read_messages(ws, self.echo, inputs);
                self.after_read(read)
            }
            Err(HandshakeError::Interrupted(mid)) => {
                self.state = State::Handshaking(Box::new(mid));
                Liveness::Alive
            }
            Err(HandshakeError::Failure(e)) => {
                log::debug!("{}: WebSocket handshake failed: {e}", self.peer);
                Liveness::Gone
            }
        }
    }
}

/// Reads into `buf` until the request head is complete (`\r\n\r\n`), or
/// with `need` until it holds that many bytes (head and body), the socket
/// would block, or the head is too large.
fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    need: Option<usize>,
) -> io::Result<bool> {
    let mut chunk = [0u8; 4096];
    loop {
        let done = match need {
            Some(n) => buf.len() >= n,
            None => buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > MAX_HEAD_BYTES,
        };
        if done {
            return Ok(true);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// How a read of the frames ended.
#[derive(Debug, PartialEq)]
pub(super) enum ReadEnd {
    Alive,
    Gone,
    /// Fail the connection with this close once the inputs are answered.
    Fail(CloseCode, String),
}

/// Reads every available message; returns how it ended and whether the
/// client sent anything.
/// Pings, pongs and the close handshake are answered by tungstenite itself
/// (queued; the reactor flushes afterwards). On the echo route, text and
/// binary messages are queued straight back, before a close that may follow
/// them in the same read makes sending impossible.
pub(super) fn read_messages<S: Read + Write>(
    ws: &mut WebSocket<S>,
    echo: bool,
    inputs: &mut Vec<Input>,
) -> (ReadEnd, bool) {
    let mut active = false;
    loop {
        let result = ws.read();
        if result.is_ok() {
            active = true;
        }
        match result {
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) if echo => match ws.write(msg) {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(tungstenite::Error::WriteBufferFull(_)) => {
                    fail(ws, CloseCode::Policy, "reading too slowly");
                    return (ReadEnd::Gone, active);
                }
                Err(_) => return (ReadEnd::Gone, active),
            },
            Ok(Message::Text(t)) => inputs.push(Input::Text(t.as_str().to_owned())),
            Ok(Message::Binary(_)) => inputs.push(Input::Binary),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                return (ReadEnd::Alive, active);
            }
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return (ReadEnd::Gone, active);
            }
            Err(e) => {
                // tungstenite reports protocol violations but leaves the close
                // frame to us: send the RFC 6455 code that names the problem.
                let (code, why) = match &e {
                    tungstenite::Error::Capacity(c) => (CloseCode::Size, c.to_string()),
                    tungstenite::Error::Utf8(_) => (
                        CloseCode::Invalid,
                        "text frame is not valid UTF-8".to_owned(),
                    ),
                    other => (CloseCode::Protocol, other.to_string()),
                };
                log::debug!("closing WebSocket after read error: {e}");
                if code == CloseCode::Size && !echo {
                    // The session says why before the close.
                    inputs.push(Input::TooLarge(why.clone()));
                    return (ReadEnd::Fail(code, why), active);
                }
                fail(ws, code, &why);
                return (ReadEnd::Gone, active);
            }
        }
    }
}

/// Fails the connection: a close frame with `code`, written at once if the
/// socket takes it (the connection is dropped right after).
pub(super) fn fail<S: Read + Write>(ws: &mut WebSocket<S>, code: CloseCode, why: &str) {
    let reason: String = why.chars().take(100).collect();
    let _ = ws.close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = ws.flush();
}

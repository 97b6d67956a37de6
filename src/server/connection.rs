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
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use tungstenite::handshake::server::{self, Callback, ErrorResponse, ServerHandshake};
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

use crate::http1::{self, BodyReader, Head, Limits};
use crate::server::auth::ApiKeys;
use crate::server::http::{Response, WS_VERSION};
use crate::server::session::Session;

/// What every connection is configured with.
pub struct Settings {
    pub ws: WebSocketConfig,
    /// Path of the test-only echo route (`server.echo_path`); `None`: off.
    pub echo_path: Option<String>,
    pub limits: Limits,
    pub keys: ApiKeys,
    /// Origins allowed to call from a browser (CORS); `*`: any.
    pub cors_origins: Vec<String>,
    /// Time for a request's head and body (or the WebSocket handshake) to arrive.
    pub request_timeout: Duration,
    /// How long a kept-alive HTTP connection may sit idle between requests.
    pub keep_alive_timeout: Duration,
    /// Most bytes queued for a client that reads too slowly.
    pub max_queued: usize,
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

/// Adds the subprotocol the client authenticated with to the handshake's answer.
pub struct Answer {
    protocol: Option<String>,
}

impl Callback for Answer {
    fn on_request(
        self,
        _request: &server::Request,
        mut response: server::Response,
    ) -> Result<server::Response, ErrorResponse> {
        if let Some(value) = self.protocol.and_then(|p| p.parse().ok()) {
            response
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", value);
        }
        Ok(response)
    }
}

type Handshake = MidHandshake<ServerHandshake<Prefixed, Answer>>;

enum State {
    /// Plain HTTP/1.1: requests read one at a time (pipelined ones wait in
    /// the buffer), each answered before the next is parsed.
    Http(Box<Http>),
    /// tungstenite is answering the upgrade; may take several readiness events.
    Handshaking(Box<Handshake>),
    Open(Box<WebSocket<Prefixed>>),
    Closed,
}

struct Http {
    stream: TcpStream,
    inbuf: Vec<u8>,
    reading: Reading,
    out: Vec<u8>,
    written: usize,
    /// Close once `out` is written.
    close_after: bool,
    /// The client closed its side: nothing more to read.
    eof: bool,
    /// The next request waits until the client has read the answers before
    /// it (`PIPELINE_BACKLOG`).
    paused: bool,
}

/// Answers a pipelining client has not read yet, in bytes, above which its
/// next request waits: what it sends without reading does not grow memory.
const PIPELINE_BACKLOG: usize = 64 << 10;

/// WebSocket messages handled per readiness event; the rest are read on the
/// loop's next turn, after the other connections' events.
pub(super) const MESSAGES_PER_TURN: usize = 64;

enum Reading {
    Head,
    Body {
        head: Head,
        body: BodyReader,
    },
    /// A request is being answered.
    Exchange(Exchange),
}

/// The request being answered: how its response goes out.
struct Exchange {
    keep_alive: bool,
    /// The `Access-Control-Allow-Origin` to answer with.
    cors: Option<String>,
    streaming: bool,
    /// A `HEAD` request: the answer's head only, as `GET` would have it.
    head_only: bool,
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
    /// A plain HTTP request (not an upgrade), with its body. The next one is
    /// read once this one is answered (`respond` or `end_stream`).
    Http {
        head: Head,
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
    /// Request, handshake, idle or close deadline; past it the reactor drops the connection.
    pub deadline: Option<Instant>,
    /// The protocol spoken: the WebSocket's, or the current HTTP request's.
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
    /// More is waiting to be read or parsed: the reactor comes back to it
    /// on the loop's next turn (mio reports no new readiness for it).
    pub unread: bool,
}

impl Connection {
    pub fn new(stream: TcpStream, generation: u64, deadline: Instant, refused: bool) -> Connection {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        Connection {
            generation,
            state: State::Http(Box::new(Http {
                stream,
                inbuf: Vec::new(),
                reading: Reading::Head,
                out: Vec::new(),
                written: 0,
                close_after: false,
                eof: false,
                paused: false,
            })),
            deadline: Some(deadline),
            session: None,
            peer,
            refused,
            echo: false,
            last_seen: Instant::now(),
            ping_sent: None,
            failing: None,
            unread: false,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    pub fn on_readable(&mut self, settings: &Settings, inputs: &mut Vec<Input>) -> Liveness {
        match &mut self.state {
            State::Http(http) => {
                let was_idle = http.inbuf.is_empty() && matches!(http.reading, Reading::Head);
                let cap = settings.limits.max_head + settings.limits.max_body;
                let answering = matches!(http.reading, Reading::Exchange(_));
                if !http.eof {
                    match read_some(&mut http.stream, &mut http.inbuf, cap) {
                        Ok(Got::More) => {}
                        // The client went away while being answered: what it
                        // asked is aborted.
                        Ok(Got::Eof) if answering => return Liveness::Gone,
                        // It sent its last request and closed its side: answer it.
                        Ok(Got::Eof) => http.eof = true,
                        Err(_) => return Liveness::Gone,
                    }
                }
                // A refused connection keeps the short deadline it came with.
                if was_idle && !http.inbuf.is_empty() && !self.refused {
                    self.deadline = Some(Instant::now() + settings.request_timeout);
                }
                let live = self.advance(settings, inputs);
                match &mut self.state {
                    // Closed with no request to answer: done once written.
                    State::Http(h) if h.eof && !matches!(h.reading, Reading::Exchange(_)) => {
                        h.close_after = true;
                        self.write_out()
                    }
                    _ => live,
                }
            }
            State::Handshaking(_) => self.drive_handshake(inputs),
            State::Open(ws) => {
                let (read, active) = read_messages(ws, self.echo, inputs);
                if active {
                    self.last_seen = Instant::now();
                    self.ping_sent = None;
                }
                self.after_read(read)
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
            ReadEnd::More => {
                self.unread = true;
                Liveness::Alive
            }
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
            State::Http(http) => {
                while http.written < http.out.len() {
                    match http.stream.write(&http.out[http.written..]) {
                        Ok(0) => return Liveness::Gone,
                        Ok(n) => http.written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Liveness::Alive,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return Liveness::Gone,
                    }
                }
                http.out.clear();
                http.written = 0;
                if std::mem::take(&mut http.paused) {
                    self.unread = true;
                }
                if http.close_after {
                    let _ = http.stream.shutdown(std::net::Shutdown::Write);
                    return Liveness::Gone;
                }
                Liveness::Alive
            }
            State::Handshaking(_) => Liveness::Alive,
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

    /// Answers the current HTTP request (or a request that could not be
    /// read, closing after). Returns whether the connection may go on to
    /// the next request (the reactor then parses what is buffered).
    pub fn respond(&mut self, response: &Response, settings: &Settings) -> bool {
        let State::Http(http) = &mut self.state else {
            return false;
        };
        let (keep_alive, cors, head_only) = match &http.reading {
            Reading::Exchange(x) if !x.streaming => (x.keep_alive, x.cors.clone(), x.head_only),
            Reading::Exchange(_) => return false,
            _ => (false, None, false),
        };
        let keep_alive = keep_alive && !http.close_after && !http.eof;
        let bytes = if head_only {
            response.head_bytes(Some(response.body.len()), keep_alive, cors.as_deref())
        } else {
            response.to_bytes(keep_alive, cors.as_deref())
        };
        http.out.extend_from_slice(&bytes);
        self.end_exchange(keep_alive, settings)
    }

    /// Starts a streamed response (chunked) to the current request.
    pub fn start_stream(&mut self, response: &Response) {
        let State::Http(http) = &mut self.state else {
            return;
        };
        let Reading::Exchange(x) = &mut http.reading else {
            return;
        };
        if x.streaming {
            return;
        }
        x.streaming = true;
        let keep_alive = x.keep_alive && !http.close_after && !http.eof;
        x.keep_alive = keep_alive;
        http.out
            .extend_from_slice(&response.head_bytes(None, keep_alive, x.cors.as_deref()));
    }

    /// Queues a chunk of the streamed response.
    pub fn stream_data(&mut self, data: &[u8], settings: &Settings) -> Result<(), SendError> {
        let State::Http(http) = &mut self.state else {
            return Err(SendError::Closed);
        };
        if !matches!(&http.reading, Reading::Exchange(x) if x.streaming) {
            return Err(SendError::Closed);
        }
        if http.out.len() - http.written > settings.max_queued {
            return Err(SendError::SlowReader);
        }
        if !data.is_empty() {
            http1::chunk_bytes(data, &mut http.out);
        }
        Ok(())
    }

    /// Ends the streamed response; returns whether the next request may be read.
    pub fn end_stream(&mut self, settings: &Settings) -> bool {
        let State::Http(http) = &mut self.state else {
            return false;
        };
        let Reading::Exchange(x) = &http.reading else {
            return false;
        };
        if !x.streaming {
            return false;
        }
        let keep_alive = x.keep_alive;
        http.out.extend_from_slice(http1::LAST_CHUNK);
        self.end_exchange(keep_alive, settings)
    }

    fn end_exchange(&mut self, keep_alive: bool, settings: &Settings) -> bool {
        let State::Http(http) = &mut self.state else {
            return false;
        };
        self.session = None;
        if !keep_alive || http.eof {
            http.close_after = true;
            http.reading = Reading::Head;
            self.deadline = Some(Instant::now() + settings.request_timeout);
            return false;
        }
        http.reading = Reading::Head;
        self.deadline = Some(
            Instant::now()
                + if http.inbuf.is_empty() {
                    settings.keep_alive_timeout
                } else {
                    settings.request_timeout
                },
        );
        true
    }

    /// Whether an HTTP request is being answered with a stream.
    pub fn is_streaming(&self) -> bool {
        matches!(&self.state, State::Http(h) if matches!(&h.reading, Reading::Exchange(x) if x.streaming))
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

    /// Parses what is buffered: request heads and bodies, one request at a
    /// time, until a request is complete or more bytes are needed.
    fn advance(&mut self, settings: &Settings, inputs: &mut Vec<Input>) -> Liveness {
        loop {
            let State::Http(http) = &mut self.state else {
                return Liveness::Alive;
            };
            if http.close_after {
                return Liveness::Alive;
            }
            match &mut http.reading {
                Reading::Exchange(_) => return Liveness::Alive,
                Reading::Head if http.out.len() - http.written > PIPELINE_BACKLOG => {
                    http.paused = true;
                    return Liveness::Alive;
                }
                Reading::Head => {
                    let head = match http1::parse_head(&http.inbuf, settings.limits) {
                        Ok(Some(head)) => head,
                        Ok(None) => return Liveness::Alive,
                        Err(e) => {
                            log::debug!("{}: {e}", self.peer);
                            self.refuse(Response::error(e.status(), &e.to_string()));
                            return self.flush();
                        }
                    };
                    if self.refused {
                        self.refuse(Response::too_many_connections());
                        return self.flush();
                    }
                    let granted = match settings.keys.check(&head) {
                        Ok(g) => g,
                        Err(e) => {
                            log::info!(
                                "{}: {} {}: refused: {e}",
                                self.peer,
                                head.method,
                                head.path()
                            );
                            self.refuse(Response::unauthorized(&e.to_string()));
                            return self.flush();
                        }
                    };
                    if head.is_websocket_upgrade() {
                        return self.upgrade(head, granted.protocol, settings, inputs);
                    }
                    let State::Http(http) = &mut self.state else {
                        unreachable!()
                    };
                    http.inbuf.drain(..head.len);
                    if head.expects_continue()
                        && head.framing != http1::Framing::Length(0)
                        && http.inbuf.is_empty()
                    {
                        http.out.extend_from_slice(http1::CONTINUE);
                    }
                    let body = BodyReader::new(head.framing, settings.limits.max_body);
                    http.reading = Reading::Body { head, body };
                }
                Reading::Body { body, .. } => {
                    let (used, done) = match body.feed(&http.inbuf) {
                        Ok(x) => x,
                        Err(e) => {
                            log::debug!("{}: {e}", self.peer);
                            self.refuse(Response::error(e.status(), &e.to_string()));
                            return self.flush();
                        }
                    };
                    http.inbuf.drain(..used);
                    let Some(body) = done else {
                        return Liveness::Alive;
                    };
                    let Reading::Body { head, .. } =
                        std::mem::replace(&mut http.reading, Reading::Head)
                    else {
                        unreachable!()
                    };
                    http.reading = Reading::Exchange(Exchange {
                        keep_alive: head.keep_alive,
                        cors: cors_origin(&head, &settings.cors_origins),
                        streaming: false,
                        head_only: head.method == "HEAD",
                    });
                    self.deadline = None;
                    inputs.push(Input::Http { head, body });
                    return Liveness::Alive;
                }
            }
        }
    }

    /// Answers a request that cannot be served and closes.
    fn refuse(&mut self, response: Response) {
        if let State::Http(http) = &mut self.state {
            http.reading = Reading::Head;
            http.out.extend_from_slice(&response.to_bytes(false, None));
            http.close_after = true;
        }
    }

    fn upgrade(
        &mut self,
        head: Head,
        protocol: Option<String>,
        settings: &Settings,
        inputs: &mut Vec<Input>,
    ) -> Liveness {
        let version = head.header("sec-websocket-version");
        if version != Some(WS_VERSION) {
            log::debug!(
                "{}: refusing WebSocket version {version:?} with 426",
                self.peer
            );
            self.refuse(Response::upgrade_required());
            return self.flush();
        }
        self.echo = settings
            .echo_path
            .as_deref()
            .is_some_and(|p| head.path() == p);
        let State::Http(http) = std::mem::replace(&mut self.state, State::Closed) else {
            unreachable!()
        };
        let Http { stream, inbuf, .. } = *http;
        let replay = Prefixed {
            prefix: inbuf,
            pos: 0,
            inner: stream,
        };
        self.deadline = Some(Instant::now() + settings.request_timeout);
        self.finish_handshake(
            tungstenite::accept_hdr_with_config(replay, Answer { protocol }, Some(settings.ws)),
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
        result: Result<WebSocket<Prefixed>, HandshakeError<ServerHandshake<Prefixed, Answer>>>,
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

/// The origin to allow in the answer to a browser's request, if it may call.
fn cors_origin(head: &Head, allowed: &[String]) -> Option<String> {
    let origin = head.header("origin")?;
    allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
        .then(|| origin.to_owned())
}

enum Got {
    More,
    Eof,
}

/// Reads until the socket would block, or `buf` holds `cap` bytes (the rest
/// waits for the next request: it is read once this one is answered).
fn read_some(stream: &mut TcpStream, buf: &mut Vec<u8>, cap: usize) -> io::Result<Got> {
    let mut chunk = [0u8; 4096];
    while buf.len() < cap {
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(Got::Eof),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Got::More),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Got::More)
}

/// How a read of the frames ended.
#[derive(Debug, PartialEq)]
pub(super) enum ReadEnd {
    Alive,
    /// `MESSAGES_PER_TURN` were read; more may be waiting.
    More,
    Gone,
    /// Fail the connection with this close once the inputs are answered.
    Fail(CloseCode, String),
}

/// Reads the available messages, at most `MESSAGES_PER_TURN`; returns how
/// it ended and whether the client sent anything.
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
    for _ in 0..MESSAGES_PER_TURN {
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
    (ReadEnd::More, active)
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

//! The event loop: one mio `Poll` on the main thread owns every socket.
//!
//! Fixed tokens for the listener, the engine's waker and the signal pipe;
//! connections live in a `Slab` and carry a generation so an engine event for
//! a connection that has gone (and whose slot was reused) is dropped, never
//! misdelivered. The loop accepts, reads, hands messages to each connection's
//! protocol session, delivers engine events (drained in batches after each
//! wake-up) through the request table, flushes every touched connection once
//! per batch, and runs the timers: handshake and close deadlines, pings,
//! shutdown.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::config;
use crate::core::{Event, Request, RequestError, RequestKey, RequestSpec, SamplingParams, Status};
use crate::engine::Ready;
use crate::http1::{Head, Limits};
use crate::ops::Ops;
use crate::ops::watchdog;
use crate::pool::{Pool, Refused};
use crate::server::auth::ApiKeys;
use crate::server::connection::{Connection, Input, Liveness, SendError, Settings};
use crate::server::http::{self, Health, Response};
use crate::server::http_tokenize::Tokenize;
use crate::server::openai::{self, Endpoint, OpenAi};
use crate::server::requests::{ConnId, RequestTable};
use crate::server::session::{Api, Host, Message, Out, Outbox, ServerInfo, Session, SubmitError};
use crate::server::ws_v1::WsV1;

pub const LISTENER: Token = Token(usize::MAX - 1);
pub const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);

/// Connections accepted beyond `max_connections` only to read their request
/// and answer 503 (closing at once would reset the socket before the client
/// reads the answer). Past this many more, a connection is closed at once.
const REFUSE_HEADROOM: usize = 64;
/// How long a refused connection may take to send its request.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client disconnected for a limit gets to read its close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Largest HTTP request head we accept before answering 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// What the reactor is built from.
pub struct Parts {
    pub poll: Poll,
    pub listener: TcpListener,
    pub pool: Pool,
    pub ready: Ready,
    pub ops: Arc<Ops>,
    /// Ends the process after a stall (see `watchdog::ExitNow`).
    pub exit_now: watchdog::ExitNow,
    pub keys: ApiKeys,
}

pub struct Reactor {
    poll: Poll,
    listener: Option<TcpListener>,
    signals: Signals,
    conns: Slab<Connection>,
    next_generation: u64,
    table: RequestTable,
    pool: Pool,
    ready: Ready,
    ops: Arc<Ops>,
    exit_now: watchdog::ExitNow,
    server: config::Server,
    defaults: SamplingParams,
    settings: Settings,
    /// Connections in the slab that are only being answered 503.
    refusing: usize,
    shutdown_deadline: Option<Instant>,
    last_sweep: Instant,
    inputs: Vec<Input>,
    dirty: Vec<usize>,
    /// Connections to read again on the loop's next turn: an HTTP request
    /// was answered (parse the next one), or more is waiting than one turn
    /// reads (`Connection::unread`).
    resume: Vec<usize>,
    /// When the server started (`created` of `/v1/models`).
    started: u64,
}

impl Reactor {
    pub fn new(parts: Parts, config: &config::Config) -> io::Result<Reactor> {
        let Parts {
            poll,
            mut listener,
            pool,
            ready,
            ops,
            exit_now,
            keys,
        } = parts;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let s = &config.server;
        let ws_config = WebSocketConfig::default()
            // Allocated up front for every connection: 4 KiB keeps an idle
            // WebSocket's cost to a few KiB (larger messages grow it as needed).
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0)
            .max_write_buffer_size(s.max_write_buffer_bytes)
            .max_message_size(Some(s.max_message_bytes))
            .max_frame_size(Some(s.max_frame_bytes));
        Ok(Reactor {
            poll,
            listener: Some(listener),
            signals,
            conns: Slab::new(),
            next_generation: 0,
            table: RequestTable::new(s.max_inflight_per_connection),
            pool,
            ready,
            ops,
            exit_now,
            server: s.clone(),
            defaults: config.defaults.clone(),
            settings: Settings {
                ws: ws_config,
                echo_path: Some(s.echo_path.clone()).filter(|p| !p.is_empty()),
                limits: Limits {
                    max_head: MAX_HEAD_BYTES,
                    max_body: s.max_body_bytes,
                },
                keys,
                cors_origins: s.cors_origins.clone(),
                request_timeout: Duration::from_secs_f64(s.handshake_timeout_s),
                keep_alive_timeout: Duration::from_secs_f64(s.keep_alive_timeout_s),
                max_queued: s.max_write_buffer_bytes,
            },
            refusing: 0,
            shutdown_deadline: None,
            last_sweep: Instant::now(),
            inputs: Vec::new(),
            dirty: Vec::new(),
            resume: Vec::new(),
            started: openai::unix_now(),
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Runs until a shutdown signal has been handled (returns `Ok`) or the
    /// engine thread died (returns an error, so the process exits non-zero).
    pub fn run(mut self) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = if !self.resume.is_empty() {
                Duration::ZERO
            } else if self.shutdown_deadline.is_some() {
                Duration::from_millis(50)
            } else {
                Duration::from_secs(1)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => self.drain_engine(),
                    SIGNALS => self.on_signals(),
                    Token(slot) => {
                        let readable =
                            event.is_readable() || event.is_read_closed() || event.is_error();
                        self.on_socket(slot, readable, event.is_writable());
                    }
                }
            }
            self.flush_dirty();
            self.resume_reading();
            if self.ops.heartbeat.stalled() {
                self.fail_all(RequestError::Stalled);
                log::error!("exiting with status {}", watchdog::EXIT_STALL);
                (self.exit_now)(watchdog::EXIT_STALL);
            }
            self.sweep_deadlines();
            if let Some(deadline) = self.shutdown_deadline
                && ((self.conns.is_empty() && self.pool.stopped()) || Instant::now() >= deadline)
            {
                break;
            }
            if self.pool.dead() {
                self.drain_engine();
                self.fail_all(RequestError::EngineGone);
                anyhow::bail!("the engine thread stopped unexpectedly");
            }
        }
        log::info!("shutdown complete");
        Ok(())
    }

    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((mut stream, _addr)) => {
                    let _ = stream.set_nodelay(true);
                    let open = self.conns.len() - self.refusing;
                    let refused = open >= self.server.max_connections;
                    if refused {
                        log::warn!("refusing a connection: {open} connections already open");
                        if self.refusing >= REFUSE_HEADROOM {
                            // Best effort: a fresh socket takes this small write at once.
                            let _ = stream
                                .write(&Response::too_many_connections().to_bytes(false, None));
                            continue;
                        }
                    }
                    let entry = self.conns.vacant_entry();
                    let slot = entry.key();
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(slot),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        log::warn!("cannot register a connection: {e}");
                        continue;
                    }
                    self.next_generation += 1;
                    let deadline = Instant::now()
                        + if refused {
                            REFUSE_TIMEOUT
                        } else {
                            Duration::from_secs_f64(self.server.handshake_timeout_s)
                        };
                    entry.insert(Connection::new(
                        stream,
                        self.next_generation,
                        deadline,
                        refused,
                    ));
                    self.refusing += usize::from(refused);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn on_socket(&mut self, slot: usize, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let mut inputs = std::mem::take(&mut self.inputs);
        let mut live = Liveness::Alive;
        if readable {
            live = conn.on_readable(&self.settings, &mut inputs);
        }
        if writable && live == Liveness::Alive {
            live = conn.on_writable(&mut inputs);
        }
        for input in inputs.drain(..) {
            self.handle_input(slot, input);
        }
        self.inputs = inputs;
        if live == Liveness::Alive
            && let Some(conn) = self.conns.get_mut(slot)
        {
            live = conn.flush();
            if std::mem::take(&mut conn.unread) {
                self.resume.push(slot);
            }
        }
        if live == Liveness::Gone {
            self.remove(slot);
        }
    }

    fn handle_input(&mut self, slot: usize, input: Input) {
        // Closing (a slow reader, a silent client): its requests were
        // aborted, and what it still sends is not started.
        let closing = self.conns.get(slot).is_some_and(|c| c.is_closing());
        if closing && matches!(input, Input::Text(_) | Input::Binary | Input::TooLarge(_)) {
            return;
        }
        match input {
            Input::Opened => {
                if let Some(conn) = self.conns.get_mut(slot) {
                    conn.session = Some(Box::new(WsV1::default()));
                }
                self.with_session(slot, |s, host, out| s.opened(host, out));
            }
            Input::Http { head, body } => self.serve_http(slot, &head, body),
            Input::Binary => self.with_session(slot, |s, host, out| {
                s.on_message(Message::Binary(&[]), host, out)
            }),
            Input::Text(text) => self.with_session(slot, |s, host, out| {
                s.on_message(Message::Text(&text), host, out)
            }),
            Input::TooLarge(why) => self.with_session(slot, |s, host, out| {
                s.on_message(Message::TooLarge(&why), host, out)
            }),
        }
    }

    /// Runs `f` on the session of `slot` with this connection's view of the
    /// server, then queues what it wrote.
    fn with_session(
        &mut self,
        slot: usize,
        f: impl FnOnce(&mut dyn Session, &mut dyn Host, &mut Outbox),
    ) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let Some(session) = conn.session.as_mut() else {
            return;
        };
        let mut host = ConnHost {
            api: session.api(),
            conn: ConnId {
                slot,
                generation: conn.generation,
            },
            table: &mut self.table,
            pool: &mut self.pool,
            ready: &self.ready,
            ops: &self.ops,
            server: &self.server,
            defaults: &self.defaults,
            draining: self.shutdown_deadline.is_some(),
        };
        let mut out = Outbox::default();
        f(session.as_mut(), &mut host, &mut out);
        self.emit(slot, out);
    }

    /// Sends what a session wrote: WebSocket messages, or an HTTP response
    /// (whole or streamed).
    fn emit(&mut self, slot: usize, mut out: Outbox) {
        for item in out.drain() {
            if let Out::Text(text) = item {
                self.send(slot, text);
                continue;
            }
            let Some(conn) = self.conns.get_mut(slot) else {
                return;
            };
            self.dirty.push(slot);
            match item {
                Out::Text(_) => unreachable!(),
                Out::Http(response) => {
                    if conn.respond(&response, &self.settings) {
                        self.resume.push(slot);
                    }
                }
                Out::StreamStart(head) => conn.start_stream(&head),
                Out::StreamData(data) => match conn.stream_data(data.as_bytes(), &self.settings) {
                    Ok(()) => {}
                    Err(SendError::SlowReader) => {
                        log::warn!(
                            "{}: disconnecting a client that reads too slowly (over {} bytes queued)",
                            conn.peer,
                            self.server.max_write_buffer_bytes
                        );
                        self.remove(slot);
                        return;
                    }
                    Err(SendError::Closed) => {}
                },
                Out::StreamEnd => {
                    if conn.end_stream(&self.settings) {
                        self.resume.push(slot);
                    }
                }
            }
        }
    }

    /// Goes on with the connections to read again (`resume`), once each a
    /// turn: what they queue again waits for the next turn, after the other
    /// connections' events, so no client holds the loop.
    fn resume_reading(&mut self) {
        let mut slots = std::mem::take(&mut self.resume);
        slots.sort_unstable();
        slots.dedup();
        for slot in slots {
            self.on_socket(slot, true, false);
        }
        self.flush_dirty();
    }

    fn health(&self) -> Health {
        if self.shutdown_deadline.is_some() {
            Health::Draining
        } else if !self.pool.serving() {
            Health::Unavailable
        } else if self.ops.engine_state().is_parked() {
            Health::Parked
        } else {
            Health::Ready
        }
    }

    fn serve_http(&mut self, slot: usize, head: &Head, body: Vec<u8>) {
        let (method, path) = (head.method.as_str(), head.path());
        let session: Option<Box<dyn Session>> = match (method, path) {
            ("POST", "/tokenize") => Some(Box::new(Tokenize::new(body))),
            ("POST", _) => Endpoint::from_path(path)
                .map(|e| Box::new(OpenAi::new(e, body)) as Box<dyn Session>),
            _ => None,
        };
        if let Some(session) = session {
            // Answered once the engine has counted or generated.
            if let Some(conn) = self.conns.get_mut(slot) {
                conn.session = Some(session);
            }
            return self.with_session(slot, |s, host, out| s.opened(host, out));
        }
        let model = &self.ready.model_name;
        let response =
            openai::models_route(method, path, model, self.started).unwrap_or_else(|| {
                let asked = head.header("access-control-request-headers");
                http::route(method, &head.target, asked, self.health(), || {
                    self.ops
                        .render_metrics(self.pool.status(), self.conns.len())
                })
            });
        let mut out = Outbox::default();
        out.respond(response);
        self.emit(slot, out);
    }

    fn drain_engine(&mut self) {
        for event in self.pool.drain() {
            let key = match &event {
                Event::Stopped => continue,
                Event::Queued { key, .. }
                | Event::Token { key, .. }
                | Event::End { key, .. }
                | Event::Tokens { key, .. }
                | Event::Error { key, .. } => *key,
            };
            self.on_engine_event(key, &event);
        }
    }

    /// Counts an event and hands it to its request's session, if its
    /// connection is still there.
    fn on_engine_event(&mut self, key: RequestKey, event: &Event) {
        let Some(route) = self.table.get_mut(key) else {
            return; // ended by the server already (shutdown)
        };
        let m = &self.ops.metrics;
        let api = route.api;
        match event {
            Event::Token { .. } => {
                let now = Instant::now();
                if let Some(last) = route.last_token.replace(now) {
                    m.itl.observe((now - last).as_secs_f64());
                }
                if route.cancelled() {
                    return; // aborted: only its end is still wanted
                }
            }
            Event::End { reason, stats, .. } => {
                m.request_done(api, reason.as_str());
                if stats.completion_tokens > 0 {
                    m.ttft.observe(stats.ttft_ms / 1e3);
                }
                if stats.cached_tokens > 0 {
                    m.record_prefix_hit(stats.cached_tokens);
                }
            }
            Event::Error { error, .. } => m.request_done(api, error.code().as_str()),
            Event::Queued { .. } | Event::Tokens { .. } | Event::Stopped => {}
        }
        let (conn, id) = if event.is_final() {
            let route = self.table.finish(key).expect("looked up above");
            (route.conn, route.id)
        } else {
            (route.conn, route.id.clone())
        };
        if let Some(conn) = conn {
            self.deliver(conn, &id, event);
        }
    }

    fn deliver(&mut self, conn: ConnId, id: &str, event: &Event) {
        let Some(c) = self
            .conns
            .get_mut(conn.slot)
            .filter(|c| c.generation == conn.generation)
        else {
            return;
        };
        let Some(session) = c.session.as_mut() else {
            return;
        };
        let mut out = Outbox::default();
        session.on_event(id, event, &mut out);
        self.emit(conn.slot, out);
    }

    /// Queues a message; the connection is flushed once the current batch is done.
    fn send(&mut self, slot: usize, json: String) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        match conn.send_text(json) {
            Ok(()) => self.dirty.push(slot),
            Err(SendError::SlowReader) => {
                log::warn!(
                    "{}: disconnecting a client that reads too slowly (over {} bytes queued)",
                    conn.peer,
                    self.server.max_write_buffer_bytes
                );
                self.disconnect(slot, CloseCode::Policy, "reading too slowly");
            }
            Err(SendError::Closed) => {}
        }
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for &slot in &dirty {
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.flush() == Liveness::Gone {
                self.remove(slot);
            } else if std::mem::take(&mut conn.unread) {
                self.resume.push(slot);
            }
        }
        dirty.clear();
        self.dirty = dirty;
    }

    /// Drops a connection; its requests are aborted and their events discarded.
    fn remove(&mut self, slot: usize) {
        if !self.conns.contains(slot) {
            return;
        }
        let conn = self.conns.remove(slot);
        self.refusing -= usize::from(conn.refused);
        self.detach(slot, conn.generation, &conn.peer, "the client went away");
    }

    fn detach(&mut self, slot: usize, generation: u64, peer: &str, why: &str) {
        let ids = self.table.detach(ConnId { slot, generation });
        for id in &ids {
            log::info!("{peer}: request {id} aborted: {why}");
        }
        if !ids.is_empty() {
            self.pool.nudge();
        }
    }

    /// Closes a connection that broke a limit: its requests are aborted, a
    /// close frame is queued (the client may never read it: it gets
    /// `CLOSE_GRACE`, then the socket is dropped) and nothing more is sent.
    fn disconnect(&mut self, slot: usize, code: CloseCode, reason: &str) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        conn.close(code, reason, Instant::now() + CLOSE_GRACE);
        let (open, generation, peer) = (conn.is_open(), conn.generation, conn.peer.clone());
        self.detach(slot, generation, &peer, reason);
        if open {
            self.dirty.push(slot);
        } else {
            self.remove(slot);
        }
    }

    /// Drops connections past their handshake or close deadline, pings silent
    /// clients and closes those that do not answer (at most 4 times a second).
    fn sweep_deadlines(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_sweep) < Duration::from_millis(250) {
            return;
        }
        self.last_sweep = now;
        self.ops.reactor.beat_at(now);
        self.pool.tick(now, self.ops.monitor.throttled());
        self.ops
            .pool_healthy
            .store(self.pool.healthy(), std::sync::atomic::Ordering::Relaxed);
        self.drain_engine();
        let ping_every = Duration::from_secs_f64(self.server.ping_interval_s);
        let pong_within = Duration::from_secs_f64(self.server.pong_timeout_s);
        let pinging = self.server.ping_interval_s > 0.0 && self.shutdown_deadline.is_none();
        let mut expired = Vec::new();
        let mut silent = Vec::new();
        let mut to_ping = Vec::new();
        for (slot, c) in &self.conns {
            if c.deadline.is_some_and(|d| d <= now) {
                expired.push(slot);
            } else if !pinging || !c.is_open() || c.is_closing() {
            } else if let Some(sent) = c.ping_sent {
                if now.duration_since(sent) >= pong_within {
                    silent.push(slot);
                }
            } else if now.duration_since(c.last_seen) >= ping_every {
                to_ping.push(slot);
            }
        }
        for slot in expired {
            log::debug!("{}: dropped at its deadline", self.conns[slot].peer);
            self.remove(slot);
        }
        for slot in silent {
            log::info!(
                "{}: closing an idle connection: no answer to a ping within {} s",
                self.conns[slot].peer,
                self.server.pong_timeout_s
            );
            self.disconnect(slot, CloseCode::Away, "idle: no answer to ping");
        }
        for slot in to_ping {
            self.conns[slot].ping(now);
            self.dirty.push(slot);
        }
    }

    fn on_signals(&mut self) {
        let signals: Vec<i32> = self.signals.pending().collect();
        if let Some(sig) = signals.first() {
            log::info!("received signal {sig}: shutting down");
            self.begin_shutdown();
        }
    }

    /// Stops accepting, ends every request with `shutting_down`, stops the
    /// engine (aborting its current decode) and closes every WebSocket.
    fn begin_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs_f64(self.server.shutdown_timeout_s);
        self.shutdown_deadline = Some(deadline);
        watchdog::notify_stopping();
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        self.pool.stop();
        self.fail_all(RequestError::ShuttingDown);
        let slots: Vec<usize> = self.conns.iter().map(|(slot, _)| slot).collect();
        // What clients already sent (a starved loop may not have read it yet)
        // is answered `shutting_down` before the close frame, after which
        // nothing more may be sent.
        for &slot in &slots {
            self.on_socket(slot, true, false);
        }
        for slot in slots {
            let Some(conn) = self.conns.get_mut(slot) else {
                continue; // gone while reading
            };
            if conn.is_open() {
                conn.close(CloseCode::Away, "server shutting down", deadline);
                self.dirty.push(slot);
            } else {
                self.remove(slot);
            }
        }
    }

    /// Ends every request in flight with `error` (shutdown, a stalled or a
    /// dead engine); whatever the engine sends for them later is dropped.
    fn fail_all(&mut self, error: RequestError) {
        for (key, route) in self.table.drain() {
            self.ops
                .metrics
                .request_done(route.api, error.code().as_str());
            route
                .cancel
                .store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(conn) = route.conn {
                let event = Event::Error {
                    key,
                    error: error.clone(),
                };
                self.deliver(conn, &route.id, &event);
            }
        }
        self.flush_dirty();
    }
}

/// The server as one connection's session sees it.
struct ConnHost<'a> {
    conn: ConnId,
    api: Api,
    table: &'a mut RequestTable,
    pool: &'a mut Pool,
    ready: &'a Ready,
    ops: &'a Ops,
    server: &'a config::Server,
    defaults: &'a SamplingParams,
    draining: bool,
}

impl Host for ConnHost<'_> {
    fn info(&self) -> ServerInfo {
        ServerInfo {
            model: self.ready.model_name.clone(),
            n_ctx: self.ready.n_ctx,
            chat: self.ready.chat,
            parked: self.ops.engine_state().is_parked(),
            max_inflight: self.server.max_inflight_per_connection,
            max_prompt_tokens: self.server.max_prompt_tokens,
            max_message_bytes: self.server.max_message_bytes,
            defaults: self.defaults.clone(),
        }
    }

    fn defaults(&self) -> &SamplingParams {
        self.defaults
    }

    fn submit(&mut self, id: Option<&str>, spec: RequestSpec) -> Result<String, SubmitError> {
        if self.draining {
            return Err(SubmitError::ShuttingDown);
        }
        let opened = self.table.open(self.conn, id, self.api.as_str())?;
        let req = Request {
            key: opened.key,
            id: opened.id.clone(),
            api: self.api.as_str(),
            input: spec.input,
            params: spec.params,
            kind: spec.kind,
            truncate: spec.truncate,
            cancel: opened.cancel,
            received: Instant::now(),
            max_prompt_tokens: self.server.max_prompt_tokens,
            urgency: spec.urgency,
        };
        if let Err(refused) = self.pool.submit(req) {
            self.table.finish(opened.key);
            return Err(match refused {
                Refused::NoneServing => SubmitError::NoWorker,
                Refused::CannotCount => SubmitError::CannotCount,
                Refused::EngineGone => SubmitError::EngineGone,
            });
        }
        Ok(opened.id)
    }

    fn abort(&mut self, id: Option<&str>) {
        self.table.abort(self.conn, id);
        self.pool.nudge();
    }

    fn in_flight(&self, id: &str) -> bool {
        self.table.has(self.conn, id)
    }

    fn status(&self) -> Status {
        let mut status = self.pool.status();
        status.ops = self.ops.status();
        status
    }
}

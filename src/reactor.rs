//! The event loop: one mio `Poll` on the main thread owns every socket.
//!
//! Fixed tokens for the listener, the engine's waker and the signal pipe;
//! connections live in a `Slab` and carry a generation so an engine event for
//! a connection that has gone (and whose slot was reused) is dropped, never
//! misdelivered. Engine events are drained in batches after each wake-up and
//! every touched connection is flushed once per batch.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::config;
use crate::connection::{Connection, Input, Liveness, SendError, Settings, http_response};
use crate::engine::{Command, EngineHandle, Event, Job, JobKey, Ready};
use crate::ops::Ops;
use crate::protocol::{self, ClientMsg, ErrorCode, Generation, InferRequest, ServerMsg, Status};
use crate::watchdog;

/// The page served at `GET /`: one self-contained file, no build step.
const PAGE: &str = include_str!("page.html");

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

/// Where an engine event for a request goes.
struct Route {
    slot: usize,
    generation: u64,
    id: String,
    cancel: Arc<AtomicBool>,
    /// When its last token event arrived (inter-token latency).
    last_token: Option<Instant>,
}

pub struct Reactor {
    poll: Poll,
    listener: Option<TcpListener>,
    signals: Signals,
    conns: Slab<Connection>,
    next_generation: u64,
    routes: HashMap<JobKey, Route>,
    next_key: JobKey,
    engine: EngineHandle,
    events: Receiver<Event>,
    /// Shared with the engine's `EventSink`: set while a wake-up is pending.
    armed: Arc<AtomicBool>,
    engine_stopped: bool,
    ready: Ready,
    ops: Arc<Ops>,
    server: config::Server,
    defaults: Generation,
    settings: Settings,
    /// Connections in the slab that are only being answered 503.
    refusing: usize,
    shutdown_deadline: Option<Instant>,
    last_sweep: Instant,
    inputs: Vec<Input>,
    dirty: Vec<usize>,
}

impl Reactor {
    // The parts main builds, each used once here; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        poll: Poll,
        mut listener: TcpListener,
        events: Receiver<Event>,
        armed: Arc<AtomicBool>,
        engine: EngineHandle,
        ready: Ready,
        ops: Arc<Ops>,
        config: &config::Config,
    ) -> io::Result<Reactor> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let s = &config.server;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
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
            routes: HashMap::new(),
            next_key: 1,
            engine,
            events,
            armed,
            engine_stopped: false,
            ready,
            ops,
            server: s.clone(),
            defaults: config.defaults.clone(),
            settings: Settings {
                ws: ws_config,
                echo_path: Some(s.echo_path.clone()).filter(|p| !p.is_empty()),
            },
            refusing: 0,
            shutdown_deadline: None,
            last_sweep: Instant::now(),
            inputs: Vec::new(),
            dirty: Vec::new(),
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
            let timeout = if self.shutdown_deadline.is_some() {
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
            if self.ops.heartbeat.stalled() {
                self.fail_all("the engine stalled; the server restarts");
                log::error!("exiting with status {}", watchdog::EXIT_STALL);
                crate::llama::exit_now(watchdog::EXIT_STALL);
            }
            self.sweep_deadlines();
            if let Some(deadline) = self.shutdown_deadline
                && ((self.conns.is_empty() && self.engine_stopped) || Instant::now() >= deadline)
            {
                break;
            }
            if self.engine.thread.is_finished() && !self.engine_stopped {
                self.drain_engine();
                if !self.engine_stopped {
                    self.fail_all("the engine thread stopped unexpectedly");
                    anyhow::bail!("the engine thread stopped unexpectedly");
                }
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
                            let body = "{\"error\":\"too many connections\"}\n";
                            let _ = stream
                                .write(http_response(503, "application/json", body).as_bytes());
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
        }
        if live == Liveness::Gone {
            self.remove(slot);
        }
    }

    fn handle_input(&mut self, slot: usize, input: Input) {
        match input {
            Input::Opened => {
                let hello = ServerMsg::Hello {
                    status: "ready",
                    model: &self.ready.model_name,
                    n_ctx: self.ready.n_ctx,
                    version: env!("CARGO_PKG_VERSION"),
                };
                let json = hello.to_json();
                self.send(slot, json);
            }
            Input::Http { method, path } => self.serve_http(slot, &method, &path),
            Input::Binary => self.send_error(
                slot,
                None,
                ErrorCode::BadRequest,
                "binary frames are not supported: send JSON text frames",
            ),
            Input::Text(text) => match protocol::parse(&text) {
                Ok(ClientMsg::Infer(req)) => self.start_infer(slot, req),
                Ok(ClientMsg::Abort { id }) => self.abort(slot, id),
                Ok(ClientMsg::Status) => {
                    let mut status = self.engine_status();
                    status.ops = self.ops.status();
                    let json = ServerMsg::Status(&status).to_json();
                    self.send(slot, json);
                }
                Err(e) => self.send_error(slot, e.id.as_deref(), e.code, &e.message),
            },
        }
    }

    fn engine_status(&self) -> Status {
        self.engine
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn serve_http(&mut self, slot: usize, method: &str, path: &str) {
        let metrics = (method, path) == ("GET", "/metrics");
        let metrics = metrics.then(|| {
            self.ops
                .render_metrics(self.engine_status(), self.conns.len())
        });
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let path = path.split('?').next().unwrap_or("");
        match (method, path) {
            ("GET", "/health") if self.shutdown_deadline.is_some() => {
                conn.respond(503, "application/json", "{\"status\":\"draining\"}\n")
            }
            // Parked is healthy: the next request wakes the engine (docs/operations.md).
            ("GET", "/health") if self.ops.is_parked() => {
                conn.respond(200, "application/json", "{\"status\":\"parked\"}\n")
            }
            ("GET", "/health") => conn.respond(200, "application/json", "{\"status\":\"ready\"}\n"),
            ("GET", "/metrics") => conn.respond(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &metrics.unwrap_or_default(),
            ),
            ("GET", "/") => conn.respond(200, "text/html; charset=utf-8", PAGE),
            ("GET", _) => conn.respond(404, "application/json", "{\"error\":\"not found\"}\n"),
            _ => conn.respond(
                405,
                "application/json",
                "{\"error\":\"method not allowed\"}\n",
            ),
        }
    }

    fn start_infer(&mut self, slot: usize, req: InferRequest) {
        let key = self.next_key;
        let id = req.id.unwrap_or_else(|| format!("req-{key}"));
        if self.shutdown_deadline.is_some() {
            return self.send_error(
                slot,
                Some(&id),
                ErrorCode::ShuttingDown,
                "the server is shutting down",
            );
        }
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.requests.contains_key(&id) {
            let message =
                format!("a request with id {id:?} is already in flight on this connection");
            return self.send_error(slot, Some(&id), ErrorCode::BadRequest, &message);
        }
        if conn.requests.len() >= self.server.max_inflight_per_connection {
            let message = format!(
                "this connection already has {} requests in flight (the limit)",
                self.server.max_inflight_per_connection
            );
            return self.send_error(slot, Some(&id), ErrorCode::Overloaded, &message);
        }
        self.next_key += 1;
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job {
            key,
            id: id.clone(),
            input: req.input,
            params: req.params.resolve(&self.defaults),
            cancel: cancel.clone(),
            received: Instant::now(),
            max_prompt_tokens: self.server.max_prompt_tokens,
        };
        if self
            .engine
            .commands
            .send(Command::Infer(Box::new(job)))
            .is_err()
        {
            return self.send_error(
                slot,
                Some(&id),
                ErrorCode::Internal,
                "the engine is not running",
            );
        }
        conn.requests.insert(id.clone(), key);
        let generation = conn.generation;
        self.routes.insert(
            key,
            Route {
                slot,
                generation,
                id,
                cancel,
                last_token: None,
            },
        );
    }

    fn abort(&mut self, slot: usize, id: Option<String>) {
        let Some(conn) = self.conns.get(slot) else {
            return;
        };
        match id {
            Some(id) => match conn.requests.get(&id) {
                Some(key) => {
                    if let Some(route) = self.routes.get(key) {
                        route.cancel.store(true, Ordering::Relaxed);
                    }
                }
                None => {
                    let message =
                        format!("abort: no request with id {id:?} is in flight on this connection");
                    self.send_error(slot, None, ErrorCode::BadRequest, &message);
                }
            },
            None => {
                for route in conn
                    .requests
                    .values()
                    .filter_map(|key| self.routes.get(key))
                {
                    route.cancel.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    fn drain_engine(&mut self) {
        self.armed.store(false, Ordering::Release);
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Queued { key, position } => {
                    let Some(route) = self.routes.get(&key) else {
                        continue;
                    };
                    let json = ServerMsg::Queued {
                        id: &route.id,
                        position,
                    }
                    .to_json();
                    let (slot, generation) = (route.slot, route.generation);
                    self.deliver(slot, generation, json);
                }
                Event::Token { key, text, prob } => {
                    let Some(route) = self.routes.get_mut(&key) else {
                        continue;
                    };
                    let now = Instant::now();
                    if let Some(last) = route.last_token.replace(now) {
                        self.ops.metrics.itl.observe((now - last).as_secs_f64());
                    }
                    if route.cancel.load(Ordering::Relaxed) {
                        continue; // aborted: only its `end` is still wanted
                    }
                    let json = ServerMsg::Token {
                        id: &route.id,
                        content: &text,
                        prob,
                    }
                    .to_json();
                    let (slot, generation) = (route.slot, route.generation);
                    self.deliver(slot, generation, json);
                }
                Event::End { key, reason, stats } => {
                    let m = &self.ops.metrics;
                    m.request_done(&label(&reason));
                    if stats.completion_tokens > 0 {
                        m.ttft.observe(stats.ttft_ms / 1e3);
                    }
                    if stats.cached_tokens > 0 {
                        m.prefix_hits.fetch_add(1, Ordering::Relaxed);
                        m.cached_tokens
                            .fetch_add(stats.cached_tokens as u64, Ordering::Relaxed);
                    }
                    if let Some(route) = self.finish_route(key) {
                        let json = ServerMsg::End {
                            id: &route.id,
                            reason,
                            stats: &stats,
                        }
                        .to_json();
                        self.deliver(route.slot, route.generation, json);
                    }
                }
                Event::Error { key, code, message } => {
                    self.ops.metrics.request_done(&label(&code));
                    if let Some(route) = self.finish_route(key) {
                        let json = ServerMsg::Error {
                            id: Some(&route.id),
                            code,
                            message: &message,
                        }
                        .to_json();
                        self.deliver(route.slot, route.generation, json);
                    }
                }
                Event::Stopped => self.engine_stopped = true,
            }
        }
    }

    /// Forgets a finished request; returns its route if its connection is still there.
    fn finish_route(&mut self, key: JobKey) -> Option<Route> {
        let route = self.routes.remove(&key)?;
        let conn = self
            .conns
            .get_mut(route.slot)
            .filter(|c| c.generation == route.generation)?;
        conn.requests.remove(&route.id);
        Some(route)
    }

    fn deliver(&mut self, slot: usize, generation: u64, json: String) {
        if self
            .conns
            .get(slot)
            .is_some_and(|c| c.generation == generation)
        {
            self.send(slot, json);
        }
    }

    fn send_error(&mut self, slot: usize, id: Option<&str>, code: ErrorCode, message: &str) {
        let json = ServerMsg::Error { id, code, message }.to_json();
        self.send(slot, json);
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
            if let Some(conn) = self.conns.get_mut(slot)
                && conn.flush() == Liveness::Gone
            {
                self.remove(slot);
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
        self.abort_requests(&conn.peer, conn.requests, "the client went away");
    }

    fn abort_requests(&mut self, peer: &str, requests: HashMap<String, JobKey>, why: &str) {
        for key in requests.values() {
            if let Some(route) = self.routes.remove(key) {
                route.cancel.store(true, Ordering::Relaxed);
                log::info!("{peer}: request {} aborted: {why}", route.id);
            }
        }
    }

    /// Closes a connection that broke a limit: its requests are aborted, a
    /// close frame is queued (the client may never read it: it gets
    /// `CLOSE_GRACE`, then the socket is dropped) and nothing more is sent.
    fn disconnect(&mut self, slot: usize, code: CloseCode, reason: &str) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let requests = std::mem::take(&mut conn.requests);
        conn.close(code, reason, Instant::now() + CLOSE_GRACE);
        let open = conn.is_open();
        let peer = conn.peer.clone();
        self.abort_requests(&peer, requests, reason);
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
        self.engine.shutdown.store(true, Ordering::Relaxed);
        let _ = self.engine.commands.send(Command::Shutdown);
        self.fail_all("the server is shutting down");
        let slots: Vec<usize> = self.conns.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            let conn = &mut self.conns[slot];
            if conn.is_open() {
                conn.close(CloseCode::Away, "server shutting down", deadline);
                self.dirty.push(slot);
            } else {
                self.remove(slot);
            }
        }
    }

    /// Ends every request in flight with an error (shutdown, or a dead engine).
    fn fail_all(&mut self, message: &str) {
        let code = if self.shutdown_deadline.is_some() {
            ErrorCode::ShuttingDown
        } else {
            ErrorCode::Internal
        };
        let keys: Vec<JobKey> = self.routes.keys().copied().collect();
        for key in keys {
            self.ops.metrics.request_done(&label(&code));
            if let Some(route) = self.finish_route(key) {
                route.cancel.store(true, Ordering::Relaxed);
                let json = ServerMsg::Error {
                    id: Some(&route.id),
                    code,
                    message,
                }
                .to_json();
                self.deliver(route.slot, route.generation, json);
            }
        }
        self.routes.clear();
        self.flush_dirty();
    }
}

/// An `end` reason or `error` code as it appears on the wire, for metrics labels.
fn label<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "other".into(),
    }
}

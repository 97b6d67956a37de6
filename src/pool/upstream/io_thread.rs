//! The upstream worker's I/O thread: a mio loop of its own that drives one
//! connection per request (the request out, its server-sent events in,
//! each turned into our events) and one for the health probe, queues what
//! is over `max_inflight`, and marks the upstream down or up.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::{Events, Poll, Token};
use slab::Slab;

use super::conn::{Conn, Flow, resolve};
use super::http::Sse;
use super::openai;
use super::{Command, Shared, UpstreamConfig, WAKER};
use crate::core::{Event, FinishReason, Request, RequestError, RequestKey, Stats};
use crate::engine::EventSink;
use crate::pool::worker::Health;

const PROBE: Token = Token(usize::MAX - 1);
/// The loop's longest sleep: deadlines and timeouts are checked this often.
const TICK: Duration = Duration::from_millis(50);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(8);

struct Call {
    req: Request,
    conn: Conn,
    sse: Sse,
    first: Option<Instant>,
    completion: usize,
    prompt_tokens: Option<usize>,
    usage_completion: Option<usize>,
    cached: Option<usize>,
    finish: Option<FinishReason>,
}

struct Probe {
    conn: Conn,
    started: Instant,
}

/// The I/O thread's state.
pub(super) struct Io {
    cfg: UpstreamConfig,
    poll: Poll,
    commands: Receiver<Command>,
    sink: EventSink,
    shared: Arc<Shared>,
    calls: Slab<Call>,
    queue: VecDeque<Request>,
    probe: Option<Probe>,
    next_probe: Instant,
    backoff: Duration,
    up: bool,
    /// Events were sent since the last wake-up.
    sent: bool,
    /// Told once the first probe has an answer.
    first_probe: Option<Sender<()>>,
    addrs: Vec<SocketAddr>,
    next_addr: usize,
    /// Probes failed in a row.
    probe_failures: u32,
}

impl Io {
    pub(super) fn new(
        cfg: UpstreamConfig,
        poll: Poll,
        commands: Receiver<Command>,
        sink: EventSink,
        shared: Arc<Shared>,
        first_probe: Sender<()>,
    ) -> Io {
        Io {
            poll,
            commands,
            sink,
            shared,
            calls: Slab::new(),
            queue: VecDeque::new(),
            probe: None,
            next_probe: Instant::now(),
            backoff: FIRST_BACKOFF,
            up: false,
            sent: false,
            first_probe: Some(first_probe),
            addrs: resolve(&cfg.target).unwrap_or_default(),
            next_addr: 0,
            probe_failures: 0,
            cfg,
        }
    }

    pub(super) fn run(mut self) {
        let mut events = Events::with_capacity(256);
        log::info!(
            "worker {}: upstream {} (model {:?}, {} in flight at most)",
            self.cfg.name,
            self.cfg.url,
            self.cfg.model,
            self.cfg.max_inflight
        );
        loop {
            if let Err(e) = self.poll.poll(&mut events, Some(TICK))
                && e.kind() != io::ErrorKind::Interrupted
            {
                log::error!("worker {}: poll failed: {e}", self.cfg.name);
                break;
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    WAKER => {}
                    PROBE => self.drive_probe(now),
                    Token(i) => self.drive_call(i, now),
                }
            }
            if !self.take_commands() {
                break;
            }
            self.sweep(now);
            self.start_calls();
            self.schedule_probe(now);
            self.publish();
        }
        // Stopping: what is still here ends with the server.
        for (_, call) in std::mem::take(&mut self.calls) {
            call.conn.close(&self.poll);
        }
        self.sink.send(Event::Stopped);
        self.sink.wake();
    }

    fn emit(&mut self, event: Event) {
        self.sink.send(event);
        self.sent = true;
    }

    fn publish(&mut self) {
        self.shared
            .running
            .store(self.calls.len(), Ordering::Relaxed);
        self.shared
            .queued
            .store(self.queue.len(), Ordering::Relaxed);
        if std::mem::take(&mut self.sent) {
            self.sink.wake();
        }
    }

    /// Takes new requests; false once told to stop.
    fn take_commands(&mut self) -> bool {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Submit(req) => self.enqueue(*req),
                Command::Release(keys) => {
                    self.queue.retain(|r| !keys.contains(&r.key));
                    let gone: Vec<usize> = self
                        .calls
                        .iter()
                        .filter(|(_, c)| keys.contains(&c.req.key))
                        .map(|(i, _)| i)
                        .collect();
                    for i in gone {
                        self.remove_call(i);
                    }
                }
                Command::Nudge => {}
                Command::Stop => return false,
            }
        }
        true
    }

    fn enqueue(&mut self, req: Request) {
        if !self.up {
            let why = self.down_why();
            return self.fail(req.key, why);
        }
        if self.calls.len() >= self.cfg.max_inflight && self.queue.len() >= self.cfg.max_queue {
            let waiting = self.queue.len();
            return self.emit(Event::Error {
                key: req.key,
                error: RequestError::QueueFull { waiting },
            });
        }
        // Highest priority first, in arrival order within a level.
        let at = self
            .queue
            .iter()
            .position(|q| q.urgency.priority < req.urgency.priority)
            .unwrap_or(self.queue.len());
        let (key, waiting) = (req.key, self.calls.len() >= self.cfg.max_inflight);
        self.queue.insert(at, req);
        if waiting {
            self.emit(Event::Queued {
                key,
                position: at + 1,
            });
        }
    }

    fn down_why(&self) -> String {
        match self.shared.health() {
            Health::Down(why) => why,
            Health::Serving => "unreachable".into(),
        }
    }

    fn fail(&mut self, key: RequestKey, why: String) {
        self.emit(Event::Error {
            key,
            error: RequestError::WorkerFailed {
                worker: self.cfg.name.clone(),
                why,
            },
        });
    }

    fn start_calls(&mut self) {
        while self.up && self.calls.len() < self.cfg.max_inflight {
            let Some(req) = self.queue.pop_front() else {
                return;
            };
            let (path, body) = match openai::request_body(&req, &self.cfg.model) {
                Ok(x) => x,
                Err(error) => {
                    self.emit(Event::Error {
                        key: req.key,
                        error,
                    });
                    continue;
                }
            };
            let bytes = self
                .cfg
                .target
                .request("POST", path, &self.cfg.api_key, Some(&body));
            let slot = self.calls.vacant_key();
            let opened = self
                .address()
                .and_then(|addr| Conn::open(&self.poll, addr, Token(slot), bytes));
            if opened.is_err() {
                self.connect_failed(Instant::now());
            }
            match opened {
                Ok(conn) => {
                    self.calls.insert(Call {
                        req,
                        conn,
                        sse: Sse::default(),
                        first: None,
                        completion: 0,
                        prompt_tokens: None,
                        usage_completion: None,
                        cached: None,
                        finish: None,
                    });
                }
                Err(e) => self.fail(req.key, format!("cannot connect to {}: {e}", self.cfg.url)),
            }
        }
    }

    /// The address to connect to (IPv4 first: `localhost` servers often
    /// listen on 127.0.0.1 only); a failed connection moves on to the next
    /// one. Resolved (blocking) while it has none.
    fn address(&mut self) -> io::Result<SocketAddr> {
        if self.addrs.is_empty() {
            self.addrs = resolve(&self.cfg.target)?;
            self.next_addr = 0;
        }
        Ok(self.addrs[self.next_addr % self.addrs.len()])
    }

    /// A connection failed: the next one tries the next address, and once
    /// each has failed, the name is resolved again (an upstream in a
    /// container may come back at another address).
    fn connect_failed(&mut self, now: Instant) {
        self.next_addr = self.next_addr.wrapping_add(1);
        if self.next_addr >= self.addrs.len() {
            self.addrs.clear();
        }
        self.next_probe = self.next_probe.min(now);
    }

    fn drive_call(&mut self, i: usize, now: Instant) {
        let Some(call) = self.calls.get_mut(i) else {
            return;
        };
        let io = match call.conn.drive(now) {
            Ok(flow) => flow,
            Err(e) => return self.end_call(i, Err(format!("a malformed response: {e}"))),
        };
        if let Err(e) = self.read_stream(i, now) {
            return self.end_call(i, Err(e));
        }
        let Some(call) = self.calls.get_mut(i) else {
            return; // ended by its stream
        };
        match io {
            Flow::Open => {}
            Flow::Closed => {
                // A body that runs until the close is complete now.
                if call.conn.resp.closed() {
                    let _ = self.read_stream(i, now);
                }
                self.end_call(
                    i,
                    Err("the upstream closed the stream before its end".into()),
                );
            }
            Flow::Failed(e) => {
                let connecting = call.conn.written == 0;
                if connecting {
                    self.connect_failed(now);
                }
                self.next_probe = now;
                let why = if connecting {
                    format!("cannot connect to {}: {e}", self.cfg.url)
                } else {
                    format!("the connection to {} failed: {e}", self.cfg.url)
                };
                self.end_call(i, Err(why));
            }
        }
    }

    /// Acts on the response data read so far: error bodies once whole,
    /// stream events as they come.
    fn read_stream(&mut self, i: usize, now: Instant) -> Result<(), String> {
        let call = &mut self.calls[i];
        let status = call.conn.resp.status;
        if status == 0 {
            return Ok(());
        }
        if status != 200 {
            if !call.conn.resp.is_done() {
                return Ok(());
            }
            let body = String::from_utf8_lossy(&call.conn.resp.data).into_owned();
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .map(|v| openai::error_message(&v))
                .unwrap_or_else(|_| body.chars().take(300).collect());
            let (key, worker) = (call.req.key, self.cfg.name.clone());
            let refused = matches!(status, 400 | 413 | 422);
            self.remove_call(i);
            if refused {
                self.emit(Event::Error {
                    key,
                    error: RequestError::UpstreamRefused { worker, message },
                });
            } else {
                self.fail(key, format!("HTTP {status}: {message}"));
            }
            return Ok(());
        }
        let data = std::mem::take(&mut call.conn.resp.data);
        let mut payloads = Vec::new();
        call.sse.feed(&data, &mut payloads)?;
        for payload in payloads {
            if payload.trim() == "[DONE]" {
                self.end_call(i, Ok(()));
                return Ok(());
            }
            let chunk = openai::parse_chunk(&payload)?;
            let call = &mut self.calls[i];
            if chunk.prompt_tokens.is_some() {
                call.prompt_tokens = chunk.prompt_tokens;
                call.usage_completion = chunk.completion_tokens;
            }
            call.cached = chunk.cached_tokens.or(call.cached);
            call.finish = chunk.finish.or(call.finish);
            if !chunk.text.is_empty() {
                call.first.get_or_insert(now);
                call.completion += 1;
                self.shared.tokens.fetch_add(1, Ordering::Relaxed);
                let key = call.req.key;
                self.emit(Event::Token {
                    key,
                    text: chunk.text,
                    prob: f32::NAN,
                    logprobs: None,
                });
            }
        }
        if self.calls[i].conn.resp.is_done() {
            let call = &self.calls[i];
            if call.finish.is_some() {
                self.end_call(i, Ok(()));
            } else {
                self.end_call(i, Err("the stream ended without a finish reason".into()));
            }
        }
        Ok(())
    }

    /// Takes a call out; its connection closes when it is dropped.
    fn remove_call(&mut self, i: usize) -> Call {
        let mut call = self.calls.remove(i);
        let _ = self.poll.registry().deregister(&mut call.conn.stream);
        call
    }

    /// Ends a call: `Ok` with its finish reason (or `reason` if given),
    /// `Err` as a worker failure.
    fn end_call(&mut self, i: usize, result: Result<(), String>) {
        self.end_call_as(i, result, None);
    }

    fn end_call_as(&mut self, i: usize, result: Result<(), String>, reason: Option<FinishReason>) {
        if !self.calls.contains(i) {
            return;
        }
        let call = self.remove_call(i);
        let key = call.req.key;
        if let Err(why) = result {
            return self.fail(key, why);
        }
        let now = Instant::now();
        let completion = call.usage_completion.unwrap_or(call.completion);
        let since = |t: Instant| now.saturating_duration_since(t).as_secs_f64();
        let stats = Stats {
            prompt_tokens: call.prompt_tokens.unwrap_or(0),
            cached_tokens: call.cached.unwrap_or(0),
            completion_tokens: completion,
            ttft_ms: call.first.map_or(0.0, |f| {
                f.saturating_duration_since(call.req.received).as_secs_f64() * 1e3
            }),
            ms: since(call.req.received) * 1e3,
            tps: match call.first {
                Some(f) if completion > 1 && since(f) > 0.0 => (completion - 1) as f64 / since(f),
                _ => 0.0,
            },
            ..Stats::default()
        };
        self.emit(Event::End {
            key,
            reason: reason.or(call.finish).unwrap_or(FinishReason::Eos),
            stats,
        });
    }

    /// Aborts, deadlines and silent streams, for calls and the queue; the
    /// probe's timeout.
    fn sweep(&mut self, now: Instant) {
        let ended: Vec<(usize, Option<FinishReason>)> = self
            .calls
            .iter()
            .filter_map(|(i, c)| {
                if c.req.cancelled() {
                    Some((i, Some(FinishReason::Abort)))
                } else if c.req.expired(now) {
                    Some((i, Some(FinishReason::Deadline)))
                } else if now.saturating_duration_since(c.conn.last_io) > self.cfg.timeout {
                    Some((i, None))
                } else {
                    None
                }
            })
            .collect();
        for (i, reason) in ended {
            match reason {
                Some(r) => self.end_call_as(i, Ok(()), Some(r)),
                None => {
                    let why = format!(
                        "no answer for {:.0} s (upstream timeout_s)",
                        self.cfg.timeout.as_secs_f64()
                    );
                    self.next_probe = now;
                    self.end_call(i, Err(why));
                }
            }
        }
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for req in std::mem::take(&mut self.queue) {
            let reason = if req.cancelled() {
                FinishReason::Abort
            } else if req.expired(now) {
                FinishReason::Deadline
            } else {
                kept.push_back(req);
                continue;
            };
            self.emit(Event::End {
                key: req.key,
                reason,
                stats: Stats {
                    ms: now.saturating_duration_since(req.received).as_secs_f64() * 1e3,
                    ..Stats::default()
                },
            });
        }
        self.queue = kept;
        if let Some(p) = &self.probe
            && now.saturating_duration_since(p.started) > self.cfg.probe_timeout
        {
            let secs = self.cfg.probe_timeout.as_secs_f64();
            self.probe_done(
                now,
                Err(format!("no answer to GET /health within {secs:.1} s")),
            );
        }
    }

    fn schedule_probe(&mut self, now: Instant) {
        if self.probe.is_some() || now < self.next_probe {
            return;
        }
        let bytes = self
            .cfg
            .target
            .request("GET", "/health", &self.cfg.api_key, None);
        match self
            .address()
            .and_then(|addr| Conn::open(&self.poll, addr, PROBE, bytes))
        {
            Ok(conn) => self.probe = Some(Probe { conn, started: now }),
            Err(e) => {
                self.connect_failed(now);
                self.probe_done(now, Err(format!("cannot connect: {e}")));
            }
        }
    }

    fn drive_probe(&mut self, now: Instant) {
        let Some(p) = &mut self.probe else {
            return;
        };
        let result = match p.conn.drive(now) {
            Err(e) => Err(e),
            Ok(Flow::Failed(e)) => {
                self.connect_failed(now);
                Err(format!("cannot connect: {e}"))
            }
            Ok(io) => {
                let resp = &mut p.conn.resp;
                let done = resp.is_done() || (matches!(io, Flow::Closed) && resp.closed());
                match (resp.status, done) {
                    (200, true) => Ok(()),
                    (0, _) if matches!(io, Flow::Closed) => {
                        Err("the connection closed without an answer".into())
                    }
                    (status, true) => Err(format!(
                        "GET /health answered {status}: {}",
                        String::from_utf8_lossy(&resp.data)
                            .chars()
                            .take(200)
                            .collect::<String>()
                    )),
                    (_, false) if matches!(io, Flow::Closed) => {
                        Err("the connection closed mid-answer".into())
                    }
                    _ => return,
                }
            }
        };
        self.probe_done(now, result);
    }

    fn probe_done(&mut self, now: Instant, result: Result<(), String>) {
        if let Some(p) = self.probe.take() {
            p.conn.close(&self.poll);
        }
        let name = self.cfg.name.clone();
        match result {
            Ok(()) => {
                if !self.up {
                    log::info!("worker {name}: {} answers /health: serving", self.cfg.url);
                }
                self.up = true;
                self.probe_failures = 0;
                self.backoff = FIRST_BACKOFF;
                self.next_probe = now + self.cfg.probe_every;
                self.shared.set_health(Health::Serving);
            }
            Err(why) => {
                self.probe_failures += 1;
                // One unanswered probe (a lost packet) does not end healthy
                // streams: it is asked again at once; two in a row, or a
                // refused connection, is down.
                let refused = why.starts_with("cannot connect");
                if self.up && !refused && self.probe_failures < 2 {
                    self.next_probe = now;
                    return;
                }
                let why = format!("{}: {why}", self.cfg.url);
                if self.up {
                    log::warn!("worker {name}: down: {why}");
                }
                self.up = false;
                self.next_probe = now + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                self.shared.set_health(Health::Down(why.clone()));
                // Everything it holds fails; the pool sends what produced
                // nothing to another worker.
                let keys: Vec<usize> = self.calls.iter().map(|(i, _)| i).collect();
                for i in keys {
                    self.end_call(i, Err(why.clone()));
                }
                for req in std::mem::take(&mut self.queue) {
                    self.fail(req.key, why.clone());
                }
            }
        }
        // Told once its health is published.
        if let Some(tx) = self.first_probe.take() {
            let _ = tx.send(());
        }
    }
}

//! The worker pool behind the server: one or more workers (llama.cpp
//! engines in this process, upstream OpenAI-compatible servers), a router
//! that sends each request to one of them, and a supervisor that takes
//! failing, stalled or slow workers out of rotation and brings them back.
//!
//! The reactor sees only the pool: `submit`, `drain` (the events to deliver,
//! in place of the engine's), `tick` (supervision, a few times a second) and
//! the status. A request that has not produced a token when its worker fails
//! is sent to another worker (the pool keeps a copy until its first token);
//! one that has streamed tokens ends with an error naming the worker. Events
//! from a worker for a request it no longer owns are dropped.
//!
//! With no workers configured the pool holds today's single engine and does
//! no supervision of its own: the watchdog ends the process on a stall.

pub mod local;
pub mod route;
pub mod supervise;
pub mod upstream;
pub mod worker;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::core::{
    Event, FinishReason, Request, RequestError, RequestKey, RequestKind, Stats, Status,
    WorkerStatus,
};
use route::{Candidate, Policy, Router};
use supervise::{Floor, Verdict, Watch};
use worker::{Kind, Worker};

/// Builds a fresh worker in place of a failed one (on a thread of its own:
/// loading a model takes a while).
pub type Restart = Arc<dyn Fn() -> Result<Box<dyn Worker>, String> + Send + Sync>;

/// How long after a failed restart the next is tried.
const RESTART_RETRY: Duration = Duration::from_secs(10);

/// A restart's outcome: the worker's index and its new worker.
type Restarted = (usize, Result<Box<dyn Worker>, String>);

/// A worker as the pool is given it.
pub struct Entry {
    pub name: String,
    pub worker: Box<dyn Worker>,
    /// `None`: it is not restarted (an upstream is probed until it is back).
    pub restart: Option<Restart>,
}

/// Why the pool took no request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every worker that could is out of rotation.
    NoneServing,
    /// Counting tokens needs a local engine and there is none.
    CannotCount,
    /// The single engine's thread is gone (no pool: nothing to fail over to).
    EngineGone,
}

/// How the pool supervises.
#[derive(Debug, Clone, Copy)]
pub struct Supervision {
    /// Off for the single default engine (the watchdog covers it).
    pub enabled: bool,
    pub floor: Floor,
}

struct Slot {
    name: String,
    kind: Kind,
    worker: Box<dyn Worker>,
    restart: Option<Restart>,
    watch: Watch,
    /// Why it is out of rotation.
    why: Option<String>,
    restarting: bool,
    /// A failed restart is tried again then.
    restart_at: Option<Instant>,
    stopped: bool,
    in_flight: usize,
    requests_total: u64,
    prefix_hits: u64,
    failures: u64,
}

struct Flight {
    worker: usize,
    /// A copy to send elsewhere, until its first token.
    retry: Option<Request>,
    hashes: Vec<u64>,
    /// Workers it was sent to.
    tried: Vec<usize>,
}

pub struct Pool {
    slots: Vec<Slot>,
    router: Router,
    flights: HashMap<RequestKey, Flight>,
    supervision: Supervision,
    /// Events the pool made itself (a failed worker's requests).
    pending: Vec<Event>,
    restarted_tx: Sender<Restarted>,
    restarted: Receiver<Restarted>,
    stopping: bool,
    buf: Vec<Event>,
}

impl Pool {
    pub fn new(entries: Vec<Entry>, policy: Policy, supervision: Supervision) -> Pool {
        let (restarted_tx, restarted) = crossbeam_channel::unbounded();
        let now = Instant::now();
        let slots: Vec<Slot> = entries
            .into_iter()
            .map(|e| Slot {
                name: e.name.clone(),
                kind: e.worker.kind(),
                watch: match e.worker.health(now) {
                    worker::Health::Serving => Watch::default(),
                    worker::Health::Down(why) => {
                        log::warn!("worker {}: not serving yet: {why}", e.name);
                        Watch::starting(now)
                    }
                },
                worker: e.worker,
                restart: e.restart,
                why: None,
                restarting: false,
                restart_at: None,
                stopped: false,
                in_flight: 0,
                requests_total: 0,
                prefix_hits: 0,
                failures: 0,
            })
            .collect();
        Pool {
            router: Router::new(policy, slots.len()),
            slots,
            flights: HashMap::new(),
            supervision,
            pending: Vec::new(),
            restarted_tx,
            restarted,
            stopping: false,
            buf: Vec::new(),
        }
    }

    /// Sends a request to a worker; says why when none can take it.
    pub fn submit(&mut self, req: Request) -> Result<(), Refused> {
        if req.kind == RequestKind::CountTokens && self.slots.iter().all(|s| s.kind != Kind::Llama)
        {
            return Err(Refused::CannotCount);
        }
        let hashes = route::prefix_hashes(&req.input);
        self.place(req, hashes, Vec::new()).map_err(|_| {
            if self.supervision.enabled {
                Refused::NoneServing
            } else {
                Refused::EngineGone
            }
        })
    }

    fn place(
        &mut self,
        mut req: Request,
        hashes: Vec<u64>,
        mut tried: Vec<usize>,
    ) -> Result<(), Box<Request>> {
        loop {
            // Workers that do all it asks, where one does; else any (an
            // upstream then says clearly what it cannot do).
            let any_kind = self.slots.iter().all(|s| !s.kind.serves(&req));
            let candidates: Vec<Candidate> = self
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| Candidate {
                    eligible: s.watch.in_rotation()
                        && !s.restarting
                        && !tried.contains(&i)
                        && (any_kind || s.kind.serves(&req)),
                    load: s.in_flight,
                    capacity: s.worker.capacity(),
                })
                .collect();
            let Some(choice) = self.router.choose(&hashes, &candidates) else {
                return Err(Box::new(req));
            };
            let i = choice.worker;
            tried.push(i);
            let key = req.key;
            // Only a pool has somewhere else to send it.
            let generate = req.kind == RequestKind::Generate;
            let retry = (generate && self.supervision.enabled).then(|| req.clone());
            match self.slots[i].worker.submit(req) {
                Ok(()) => {
                    let slot = &mut self.slots[i];
                    slot.in_flight += 1;
                    slot.requests_total += 1;
                    slot.prefix_hits += u64::from(choice.shared_blocks > 0);
                    // Counting tokens caches nothing.
                    if generate {
                        self.router.sent(i, &hashes);
                    }
                    self.flights.insert(
                        key,
                        Flight {
                            worker: i,
                            retry,
                            hashes,
                            tried,
                        },
                    );
                    return Ok(());
                }
                Err(back) => {
                    // Gone: the supervisor's next tick takes it out.
                    log::warn!(
                        "worker {} refused a request: it is gone",
                        self.slots[i].name
                    );
                    req = *back;
                }
            }
        }
    }

    /// The events to deliver since the last call, in order per request.
    pub fn drain(&mut self) -> Vec<Event> {
        let mut out = std::mem::take(&mut self.pending);
        let mut buf = std::mem::take(&mut self.buf);
        for i in 0..self.slots.len() {
            self.slots[i].worker.drain(&mut buf);
            for event in buf.drain(..) {
                self.on_event(i, event, &mut out);
            }
        }
        self.buf = buf;
        out.append(&mut self.pending);
        out
    }

    fn on_event(&mut self, worker: usize, event: Event, out: &mut Vec<Event>) {
        let key = match &event {
            Event::Stopped => {
                self.slots[worker].stopped = true;
                return;
            }
            Event::Queued { key, .. }
            | Event::Token { key, .. }
            | Event::End { key, .. }
            | Event::Tokens { key, .. }
            | Event::Error { key, .. } => *key,
        };
        let Some(flight) = self.flights.get_mut(&key).filter(|f| f.worker == worker) else {
            return; // failed over, or ended by the pool: this worker's word is stale
        };
        match &event {
            Event::Token { .. } => flight.retry = None,
            Event::Error {
                error: RequestError::WorkerFailed { why, .. },
                ..
            } if flight.retry.is_some() => {
                let why = why.clone();
                return self.fail_over(key, &why);
            }
            _ => {}
        }
        if event.is_final() {
            self.flights.remove(&key);
            self.slots[worker].in_flight -= 1;
        }
        out.push(event);
    }

    /// Sends a request that produced nothing on its failed worker to
    /// another; ends it when there is none.
    fn fail_over(&mut self, key: RequestKey, why: &str) {
        let Some(mut flight) = self.flights.remove(&key) else {
            return;
        };
        let from = flight.worker;
        self.slots[from].in_flight -= 1;
        let name = self.slots[from].name.clone();
        let Some(req) = flight.retry.take() else {
            return self.pending.push(Event::Error {
                key,
                error: RequestError::WorkerFailed {
                    worker: name,
                    why: why.into(),
                },
            });
        };
        if req.cancelled() {
            return self.pending.push(Event::End {
                key,
                reason: FinishReason::Abort,
                stats: Stats::default(),
            });
        }
        let id = req.id.clone();
        match self.place(req, flight.hashes, flight.tried) {
            Ok(()) => {
                let to = self.flights.get(&key).map(|f| f.worker).unwrap_or(from);
                log::info!(
                    "request {id}: worker {name} failed before its first token ({why}): sent to {}",
                    self.slots[to].name
                );
            }
            Err(_) => self.pending.push(Event::Error {
                key,
                error: RequestError::NoWorker(format!(
                    "worker {name} failed ({why}) and no other worker can take the request"
                )),
            }),
        }
    }

    /// Supervision: takes unhealthy workers out of rotation (failing over
    /// what they held), restarts local ones, puts recovered ones back.
    /// Returns whether at least one worker serves.
    pub fn tick(&mut self, now: Instant, throttled: bool) -> bool {
        for (i, result) in self.restarted.try_iter().collect::<Vec<_>>() {
            let slot = &mut self.slots[i];
            slot.restarting = false;
            match result {
                Ok(worker) if !self.stopping => {
                    log::info!("worker {}: restarted, back in rotation", slot.name);
                    let old = std::mem::replace(&mut slot.worker, worker);
                    drop(old);
                    slot.watch = Watch::default();
                    slot.why = None;
                    slot.stopped = false;
                    self.router.forget(i);
                }
                Ok(worker) => worker.stop(),
                Err(e) => {
                    log::error!(
                        "worker {}: cannot restart: {e}; trying again in {} s",
                        slot.name,
                        RESTART_RETRY.as_secs()
                    );
                    slot.why = Some(format!("cannot restart: {e}"));
                    slot.restart_at = Some(Instant::now() + RESTART_RETRY);
                }
            }
        }
        if !self.supervision.enabled || self.stopping {
            return true;
        }
        for i in 0..self.slots.len() {
            if self.slots[i].restart_at.is_some_and(|at| now >= at) {
                self.restart(i);
            }
            let slot = &mut self.slots[i];
            if slot.restarting || slot.restart_at.is_some() {
                continue;
            }
            let health = slot.worker.health(now);
            // Thermally paused, every local engine is slow alike: not its fault.
            let busy = slot.in_flight > 0 && !(throttled && slot.kind == Kind::Llama);
            let tokens = slot.worker.tokens();
            match slot
                .watch
                .observe(now, &health, busy, tokens, &self.supervision.floor)
            {
                Verdict::Keep => {}
                Verdict::TakeOut(why) => self.take_out(i, &why),
                Verdict::PutBack => {
                    log::info!("worker {}: healthy again, back in rotation", slot.name);
                    slot.why = None;
                }
            }
        }
        self.serving()
    }

    fn take_out(&mut self, i: usize, why: &str) {
        let slot = &mut self.slots[i];
        log::warn!("worker {}: out of rotation: {why}", slot.name);
        slot.failures += 1;
        slot.why = Some(why.to_owned());
        let name = slot.name.clone();
        let keys: Vec<RequestKey> = self
            .flights
            .iter()
            .filter(|(_, f)| f.worker == i)
            .map(|(&k, _)| k)
            .collect();
        self.slots[i].worker.release(keys.clone());
        for key in keys {
            let started = self.flights[&key].retry.is_none();
            if started {
                self.flights.remove(&key);
                self.slots[i].in_flight -= 1;
                self.pending.push(Event::Error {
                    key,
                    error: RequestError::WorkerFailed {
                        worker: name.clone(),
                        why: why.to_owned(),
                    },
                });
            } else {
                self.fail_over(key, why);
            }
        }
        if self.slots[i].restart.is_some() {
            self.slots[i].worker.stop();
            self.restart(i);
        }
    }

    /// Starts a fresh worker for slot `i` on a thread of its own; its
    /// outcome (a panic included) comes back through `restarted`.
    fn restart(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Some(restart) = slot.restart.clone() else {
            return;
        };
        slot.restarting = true;
        slot.restart_at = None;
        let tx = self.restarted_tx.clone();
        let name = slot.name.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("restart-{name}"))
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| restart()))
                    .unwrap_or_else(|_| Err("the restart panicked".into()));
                let _ = tx.send((i, result));
            });
        if let Err(e) = spawned {
            log::error!("worker {name}: cannot start its restart: {e}");
            slot.restarting = false;
            slot.restart_at = Some(Instant::now() + RESTART_RETRY);
        }
    }

    /// At least one worker is in rotation.
    pub fn serving(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.watch.in_rotation() && !s.restarting)
    }

    /// Whether systemd's watchdog should hear that the process is well: a
    /// worker serves, or the pool has only upstream workers, whose outage
    /// restarting this process would not end (a front over a vLLM that is
    /// reloading must not be killed over and over meanwhile).
    pub fn healthy(&self) -> bool {
        self.serving() || self.slots.iter().all(|s| s.kind == Kind::OpenAi)
    }

    /// A request's abort flag was set: upstream workers look at once.
    pub fn nudge(&self) {
        for s in &self.slots {
            s.worker.nudge();
        }
    }

    pub fn stop(&mut self) {
        self.stopping = true;
        for s in &self.slots {
            s.worker.stop();
        }
    }

    /// Every worker has stopped (after `stop`).
    pub fn stopped(&self) -> bool {
        self.slots
            .iter()
            .all(|s| s.stopped || s.worker.is_finished())
    }

    /// Every worker's thread ended while none was asked to stop and none can
    /// come back: the process must exit.
    pub fn dead(&self) -> bool {
        !self.stopping
            && self
                .slots
                .iter()
                .all(|s| s.worker.is_finished() && s.restart.is_none() && !s.restarting)
    }

    /// The sum of the workers' snapshots, and each worker's line.
    pub fn status(&self) -> Status {
        let mut total = Status::default();
        for s in &self.slots {
            let st = s.worker.status();
            total.slots += st.slots;
            total.busy_slots += st.busy_slots;
            total.queued += st.queued;
            let (kv, k) = (&mut total.kv, &st.kv);
            kv.page_size = kv.page_size.max(k.page_size);
            kv.pages_total += k.pages_total;
            kv.pages_owned += k.pages_owned;
            kv.pages_cached += k.pages_cached;
            kv.pages_free += k.pages_free;
            kv.prefix_entries += k.prefix_entries;
            kv.prefix_host_entries += k.prefix_host_entries;
            kv.prefix_host_bytes += k.prefix_host_bytes;
            total.workers.push(WorkerStatus {
                name: s.name.clone(),
                kind: s.kind.as_str(),
                state: if s.restarting {
                    "starting"
                } else if s.stopped {
                    "stopped"
                } else if s.watch.in_rotation() {
                    "serving"
                } else {
                    "down"
                },
                why: s.why.clone(),
                in_flight: s.in_flight,
                tokens_per_s: s.watch.tokens_per_s,
                tokens_total: s.worker.tokens(),
                prefix_hits: s.prefix_hits,
                requests_total: s.requests_total,
                failures: s.failures,
            });
        }
        total
    }
}

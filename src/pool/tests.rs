//! The pool's routing, failover and supervision over scripted workers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::core::{Constraint, PromptInput, SamplingParams, Truncate};
use worker::Health;

/// A worker whose requests, events and health the test controls.
#[derive(Clone, Default)]
struct Scripted(Arc<Mutex<Script>>);

#[derive(Default)]
struct Script {
    got: Vec<RequestKey>,
    events: Vec<Event>,
    down: Option<String>,
    stopped: bool,
    /// It plays a local llama.cpp engine, not an upstream.
    local: bool,
}

impl Scripted {
    fn say(&self, event: Event) {
        self.0.lock().unwrap().events.push(event);
    }
    fn got(&self) -> Vec<RequestKey> {
        self.0.lock().unwrap().got.clone()
    }
}

impl Worker for Scripted {
    fn kind(&self) -> Kind {
        if self.0.lock().unwrap().local {
            Kind::Llama
        } else {
            Kind::OpenAi
        }
    }
    fn submit(&self, req: Request) -> Result<(), Box<Request>> {
        self.0.lock().unwrap().got.push(req.key);
        Ok(())
    }
    fn drain(&self, into: &mut Vec<Event>) {
        into.append(&mut self.0.lock().unwrap().events);
    }
    fn stop(&self) {
        self.0.lock().unwrap().stopped = true;
    }
    fn is_finished(&self) -> bool {
        false
    }
    fn status(&self) -> Status {
        Status::default()
    }
    fn health(&self, _now: Instant) -> Health {
        match &self.0.lock().unwrap().down {
            Some(why) => Health::Down(why.clone()),
            None => Health::Serving,
        }
    }
    fn tokens(&self) -> u64 {
        0
    }
    fn capacity(&self) -> usize {
        2
    }
}

fn pool(n: usize) -> (Pool, Vec<Scripted>) {
    let workers: Vec<Scripted> = (0..n).map(|_| Scripted::default()).collect();
    (pool_over(&workers), workers)
}

fn pool_over(workers: &[Scripted]) -> Pool {
    let entries = workers
        .iter()
        .enumerate()
        .map(|(i, w)| Entry {
            name: format!("w{i}"),
            worker: Box::new(w.clone()),
            restart: None,
        })
        .collect();
    let supervision = Supervision {
        enabled: true,
        floor: Floor {
            min_tps: 0.0,
            window: Duration::from_secs(10),
        },
    };
    Pool::new(entries, Policy::LeastLoaded, supervision)
}

fn request(key: RequestKey) -> Request {
    Request::for_test(
        key,
        PromptInput::Text("hello".into()),
        SamplingParams::default(),
    )
}

fn token(key: RequestKey) -> Event {
    Event::Token {
        key,
        text: "x".into(),
        prob: 1.0,
        logprobs: None,
    }
}

fn failed(key: RequestKey) -> Event {
    Event::Error {
        key,
        error: RequestError::WorkerFailed {
            worker: "w".into(),
            why: "connection reset".into(),
        },
    }
}

fn end(key: RequestKey) -> Event {
    Event::End {
        key,
        reason: FinishReason::Eos,
        stats: Stats::default(),
    }
}

#[test]
fn requests_spread_by_load_and_leave_when_they_end() {
    let (mut p, w) = pool(2);
    for key in 1..=4 {
        p.submit(request(key)).unwrap();
    }
    assert_eq!((w[0].got(), w[1].got()), (vec![1, 3], vec![2, 4]));
    w[0].say(token(1));
    w[0].say(end(1));
    let out = p.drain();
    assert_eq!(out.len(), 2);
    assert_eq!(p.status().workers[0].in_flight, 1);
    // The least loaded now: w0.
    p.submit(request(5)).unwrap();
    assert_eq!(w[0].got(), [1, 3, 5]);
}

#[test]
fn a_failure_before_the_first_token_moves_the_request_silently() {
    let (mut p, w) = pool(2);
    p.submit(request(1)).unwrap();
    w[0].say(failed(1));
    assert!(p.drain().is_empty(), "the client sees nothing of it");
    assert_eq!(w[1].got(), [1]);
    // What the first worker says of it later is stale.
    w[0].say(token(1));
    w[1].say(token(1));
    w[1].say(end(1));
    let out = p.drain();
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|e| !matches!(e, Event::Error { .. })));
}

#[test]
fn a_failure_after_tokens_reaches_the_client_and_one_with_nowhere_to_go_too() {
    let (mut p, w) = pool(2);
    p.submit(request(1)).unwrap();
    w[0].say(token(1));
    w[0].say(failed(1));
    let out = p.drain();
    assert!(matches!(
        out.last(),
        Some(Event::Error {
            error: RequestError::WorkerFailed { .. },
            ..
        })
    ));
    // Failing on both workers: the second failure ends it.
    p.submit(request(2)).unwrap();
    let first = if w[0].got().contains(&2) { 0 } else { 1 };
    w[first].say(failed(2));
    assert!(p.drain().is_empty());
    w[1 - first].say(failed(2));
    let out = p.drain();
    assert!(
        matches!(&out[..], [Event::Error { error: RequestError::NoWorker(m), .. }] if m.contains("no other worker")),
        "{out:?}"
    );
}

#[test]
fn a_worker_that_goes_down_hands_over_what_has_not_started() {
    let (mut p, w) = pool(2);
    for key in 1..=4 {
        p.submit(request(key)).unwrap();
    }
    // w0 holds 1 (streaming) and 3 (not started).
    w[0].say(token(1));
    p.drain();
    w[0].0.lock().unwrap().down = Some("no answer".into());
    assert!(p.tick(Instant::now(), false));
    let out = p.drain();
    assert!(
        matches!(&out[..], [Event::Error { key: 1, error: RequestError::WorkerFailed { why, .. } }] if why == "no answer"),
        "{out:?}"
    );
    assert_eq!(w[1].got(), [2, 4, 3]);
    let s = p.status();
    assert_eq!((s.workers[0].state, s.workers[0].failures), ("down", 1));
    // New work goes to the survivor only; with it down too, nothing serves.
    p.submit(request(5)).unwrap();
    assert_eq!(w[1].got(), [2, 4, 3, 5]);
    w[1].0.lock().unwrap().down = Some("gone".into());
    assert!(!p.tick(Instant::now(), false));
    assert_eq!(p.submit(request(6)), Err(Refused::NoneServing));
    // Upstreams only: restarting this process would not bring them back.
    assert!(p.healthy());
    // Healthy again: back after the backoff.
    w[0].0.lock().unwrap().down = None;
    assert!(p.tick(Instant::now() + Duration::from_secs(2), false));
    p.submit(request(7)).unwrap();
    assert_eq!(w[0].got(), [1, 3, 7]);
}

#[test]
fn counting_tokens_needs_a_local_worker() {
    let (mut p, _) = pool(1);
    let mut req = request(1);
    req.kind = RequestKind::CountTokens;
    assert_eq!(p.submit(req), Err(Refused::CannotCount));
}

#[test]
fn systemd_hears_of_a_pool_whose_local_worker_is_down_and_nothing_serves() {
    let workers: Vec<Scripted> = (0..2).map(|_| Scripted::default()).collect();
    workers[0].0.lock().unwrap().local = true;
    let mut p = pool_over(&workers);
    workers[1].0.lock().unwrap().down = Some("gone".into());
    assert!(p.tick(Instant::now(), false));
    assert!(p.healthy(), "the local worker serves");
    workers[0].0.lock().unwrap().down = Some("wedged".into());
    assert!(!p.tick(Instant::now(), false));
    assert!(!p.healthy(), "a restart may bring the local worker back");
}

#[test]
fn what_only_a_local_engine_does_goes_to_one() {
    let workers: Vec<Scripted> = (0..2).map(|_| Scripted::default()).collect();
    workers[1].0.lock().unwrap().local = true;
    let mut p = pool_over(&workers);
    let regex = |key| {
        let mut r = request(key);
        r.params.constraint = Some(Constraint::Regex("[a-z]+".into()));
        r
    };
    let left = |key| Request {
        truncate: Truncate::Left,
        ..request(key)
    };
    for r in [regex(1), left(2), regex(3)] {
        p.submit(r).unwrap();
    }
    // A JSON schema and a plain request: either kind (the least loaded).
    let mut schema = request(4);
    schema.params.constraint = Some(Constraint::JsonSchema(serde_json::json!({})));
    p.submit(schema).unwrap();
    assert_eq!(workers[1].got(), [1, 2, 3]);
    assert_eq!(workers[0].got(), [4]);
    // Upstreams only: it goes to one, which says what it cannot do.
    let (mut p, w) = pool(1);
    p.submit(regex(5)).unwrap();
    assert_eq!(w[0].got(), [5]);
}

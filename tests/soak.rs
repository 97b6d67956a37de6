//! Soak: real traffic with random aborts, disconnects mid-stream and
//! malformed messages mixed in, from several clients at once. Afterwards:
//! no unexpected error event, resident memory after warm-up stayed within 5%,
//! and every KV page is back (`pages_owned` is 0 once idle).
//!
//! CI runs it for `SOAK_SECS` (default 60 s); the long run is
//! `SOAK_SECS=3600 cargo test --release --test soak -- --nocapture`.

mod util;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::Message;
use util::{Client, Server};

const WORKERS: usize = 5;

/// A small xorshift generator: reproducible from its seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const MALFORMED: &[&str] = &[
    "{oops",
    "[]",
    r#"{"op":"fly"}"#,
    r#"{"op":"infer","prompt":""}"#,
    r#"{"op":"infer","prompt":"x","params":{"temprature":1}}"#,
    r#"{"op":"infer","prompt":"x","params":{"top_p":7}}"#,
    r#"{"op":"infer","messages":[{"role":"wizard","content":"x"}]}"#,
    "\u{0}\u{1}garbage",
];

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    aborts: AtomicU64,
    disconnects: AtomicU64,
    malformed: AtomicU64,
    tokens: AtomicU64,
}

/// An error event the worker did not provoke fails the soak.
fn unexpected(ev: &Value, why: &str) -> ! {
    panic!("unexpected event ({why}): {ev}")
}

/// Reads `id`'s events to its end; returns the end reason. A racing abort of
/// a request that already ended earns nothing (abort is idempotent).
fn finish(c: &mut Client, id: &str, tally: &Tally) -> String {
    loop {
        let ev = c.recv();
        match (ev["op"].as_str().unwrap(), ev["id"].as_str()) {
            ("token", Some(i)) if i == id => {
                tally.tokens.fetch_add(1, Ordering::Relaxed);
            }
            ("queued", _) => {}
            ("end", Some(i)) if i == id => return ev["reason"].as_str().unwrap().to_owned(),
            _ => unexpected(&ev, &format!("while reading request {id}")),
        }
    }
}

fn worker(port: u16, seed: u64, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut rng = Rng(seed);
    let mut c = Client::connect(port);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let id = format!("w{seed}-{n}");
        let max_tokens = 1 + rng.below(24);
        let infer = json!({"op":"infer","id":id,"prompt":format!("Story number {} begins:", rng.below(50)),
            "params":{"temp":0.7,"max_tokens":max_tokens,"seed":rng.below(1000)}});
        match rng.below(20) {
            // A request read to its end.
            0..=9 => {
                c.send(infer);
                tally.requests.fetch_add(1, Ordering::Relaxed);
                let reason = finish(&mut c, &id, &tally);
                assert!(reason == "length" || reason == "eos", "{reason}");
            }
            // Aborted after its first event.
            10..=12 => {
                c.send(infer);
                tally.requests.fetch_add(1, Ordering::Relaxed);
                c.send(json!({"op":"abort","id":id}));
                tally.aborts.fetch_add(1, Ordering::Relaxed);
                finish(&mut c, &id, &tally);
            }
            // The client vanishes mid-stream, without a close frame.
            13..=14 => {
                c.send(infer);
                tally.requests.fetch_add(1, Ordering::Relaxed);
                let _ = c.recv();
                tally.disconnects.fetch_add(1, Ordering::Relaxed);
                c = Client::connect(port);
            }
            // Malformed input: a bad_request error, nothing else.
            15..=17 => {
                let bad = MALFORMED[rng.below(MALFORMED.len() as u64) as usize];
                tally.malformed.fetch_add(1, Ordering::Relaxed);
                if rng.below(4) == 0 {
                    c.ws.send(Message::binary(bad.as_bytes().to_vec())).unwrap();
                } else {
                    c.send_raw(bad);
                }
                let ev = c.recv();
                if ev["op"] != "error" || ev["code"] != "bad_request" {
                    unexpected(&ev, &format!("answer to {bad:?}"));
                }
            }
            // A status snapshot.
            18 => {
                c.send(json!({"op":"status"}));
                let ev = c.recv();
                if ev["op"] != "status" {
                    unexpected(&ev, "answer to status");
                }
            }
            // A clean close and a new connection.
            _ => {
                let _ = c.ws.close(None);
                c = Client::connect(port);
            }
        }
    }
}

#[test]
fn soak_with_aborts_disconnects_and_malformed_messages() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let warmup = Duration::from_secs((secs / 4).clamp(20, 300));
    // Cached prefixes leave the KV pool for host memory while several
    // requests run, up to a bound: a small one fills within the warm-up, so
    // what is measured after it is what a leak would add.
    let server = Server::start_with_config("soak", "[scheduler]\nprefix_cache_host_mb = 8\n", &[]);
    // Constrained decoding is prepared once, at the lowest priority, on a
    // thread of its own: under this traffic it would end (and its ~125 MB
    // land) after the warm-up. A constrained request waits for it.
    let ready = server
        .connect()
        .infer("ready", "x", json!({"regex": "[a-z]+", "max_tokens": 4}));
    assert_eq!(ready.last["op"], "end", "{}", ready.last);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let workers: Vec<_> = (0..WORKERS as u64)
        .map(|i| {
            let (stop, tally, port) = (stop.clone(), tally.clone(), server.port);
            std::thread::spawn(move || worker(port, 0x9e37_79b9 + i, stop, tally))
        })
        .collect();

    let start = Instant::now();
    std::thread::sleep(warmup);
    let rss_warm = server.rss_kib();
    let mut samples = vec![rss_warm];
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(5).min(Duration::from_secs(secs) / 4));
        samples.push(server.rss_kib());
        assert!(
            workers.iter().all(|w| !w.is_finished()),
            "a worker failed:\n{}",
            server.log_text()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker");
    }
    let rss_end = server.rss_kib();
    let max = *samples.iter().max().unwrap();

    // Once idle, every KV page is back with the allocator or the prefix cache.
    let start_idle = Instant::now();
    let status = loop {
        let status = server.status();
        if status["busy_slots"] == 0 && status["queued"] == 0 {
            break status;
        }
        assert!(start_idle.elapsed() < Duration::from_secs(10), "{status}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let kv = &status["kv"];
    let n = |k: &str| kv[k].as_u64().unwrap();
    assert_eq!(n("pages_owned"), 0, "{status}");
    assert_eq!(
        n("pages_owned") + n("pages_cached") + n("pages_free"),
        n("pages_total"),
        "{status}"
    );
    assert_eq!(server.http_get("/health").0, 200);
    let log = server.log_text();
    assert!(
        !log.contains(" ERROR ") && !log.contains("panicked"),
        "{log}"
    );

    let drift = (rss_end as f64 - rss_warm as f64) / rss_warm as f64 * 100.0;
    let t = &tally;
    eprintln!(
        "soak: {secs} s, {} requests ({} tokens), {} aborts, {} disconnects, {} malformed; RSS after {} s warm-up {rss_warm} KiB, at the end {rss_end} KiB ({drift:+.2}%), peak {max} KiB; idle KV: {kv}",
        t.requests.load(Ordering::Relaxed),
        t.tokens.load(Ordering::Relaxed),
        t.aborts.load(Ordering::Relaxed),
        t.disconnects.load(Ordering::Relaxed),
        t.malformed.load(Ordering::Relaxed),
        warmup.as_secs(),
    );
    assert!(
        drift.abs() <= 5.0 && (max as f64) <= rss_warm as f64 * 1.05,
        "RSS drifted: after warm-up {rss_warm} KiB, samples {samples:?}, end {rss_end} KiB"
    );
}

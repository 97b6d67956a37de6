//! The worker pool on one small box, two questions users ask:
//!
//! 1. Prefix affinity: clients rotating among 6 system prompts of about 600
//!    tokens, over 2 local workers whose KV cache cannot hold all 6 each.
//!    Routed by prefix, each worker keeps its share cached; round-robin
//!    sends every prompt everywhere. Reported: prefix-cache hit rate, TTFT
//!    of the hits (warm) and of all requests.
//! 2. Two CPU workers of one thread each against one worker of two threads,
//!    same slots in all: aggregate tokens/s and TTFT, so users know when a
//!    pool pays on a small box.
//!
//! `cargo bench --bench pool` (`-- --smoke`: a few requests of each, for CI;
//! it fails on a request error, never on speed). The report goes to
//! target/bench/pool.json.

#[path = "common/mod.rs"]
mod common;

use std::time::Instant;

use common::{Stream, collect, config, connect, median, send, start_server, write_report};
use serde_json::{Value, json};

/// A system prompt of about 600 tokens, different for each `n`.
fn system_prompt(n: usize) -> String {
    let topics = [
        "harbour", "orchard", "library", "railway", "glacier", "market",
    ];
    let mut s = format!("You are the guide of the {} archive. ", topics[n]);
    for i in 0..36 {
        s.push_str(&format!(
            "Rule {i} of the {}: answer briefly, cite the ledger, keep to facts. ",
            topics[n]
        ));
    }
    s
}

/// `clients` closed-loop clients send `total` requests; `prompt(i)` is the
/// i-th. Returns the streams and the wall time.
fn run_load(
    port: u16,
    clients: usize,
    total: usize,
    max_tokens: usize,
    prompt: impl Fn(usize) -> String + Sync,
) -> (Vec<Stream>, f64) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t0 = Instant::now();
    let streams: Vec<Stream> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| {
                    let mut ws = connect(port);
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= total {
                            return out;
                        }
                        let id = format!("r{i}");
                        let sent = send(&mut ws, &id, &prompt(i), max_tokens);
                        out.push(collect(&mut ws, &id, sent));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    (streams, t0.elapsed().as_secs_f64())
}

fn ms(streams: &[&Stream]) -> f64 {
    if streams.is_empty() {
        return f64::NAN;
    }
    median(
        streams
            .iter()
            .map(|s| s.ttft().as_secs_f64() * 1e3)
            .collect(),
    )
}

fn affinity(routing: &str, smoke: bool) -> Value {
    let cfg = config(
        &format!("pool-{routing}"),
        &format!(
            "[model]\nctx_size = 3072\n[scheduler]\nslots = 2\n[pool]\nrouting = \"{routing}\"\n\
             [[workers]]\nkind = \"llama\"\nthreads = 1\n[[workers]]\nkind = \"llama\"\nthreads = 1\n"
        ),
    );
    let server = start_server(&["--config", &cfg]);
    // Hits are counted after the first six requests (as many as prompts);
    // the smoke sends three more, so it counts some too.
    let total = if smoke { 9 } else { 48 };
    // The same pseudo-random order of prompts for both routings.
    let order: Vec<usize> = (0..total)
        .scan(7u64, |x, _| {
            *x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            Some((*x >> 33) as usize % 6)
        })
        .collect();
    let prompts: Vec<String> = (0..6).map(system_prompt).collect();
    let (streams, _) = run_load(server.port, 2, total, 16, |i| {
        format!(
            "{}\nQuestion {i}: what is kept here?\nAnswer:",
            prompts[order[i]]
        )
    });
    // The first request of each prompt cannot hit: count the rest.
    let warm: Vec<&Stream> = streams.iter().skip(6).collect();
    let hits: Vec<&Stream> = warm
        .iter()
        .copied()
        .filter(|s| s.stat("cached_tokens") > 100.0)
        .collect();
    let hit_rate = hits.len() as f64 / warm.len().max(1) as f64;
    let row = json!({
        "routing": routing,
        "requests": warm.len(),
        "hit_rate": hit_rate,
        "warm_ttft_ms_p50": ms(&hits),
        "ttft_ms_p50": ms(&warm),
    });
    println!(
        "{routing:>12}: hit rate {:.0}% of {} warm requests, TTFT p50 of hits {:.0} ms, of all {:.0} ms",
        hit_rate * 100.0,
        warm.len(),
        ms(&hits),
        ms(&warm)
    );
    row
}

fn threads_vs_workers(pool: bool, smoke: bool) -> Value {
    let server = if pool {
        let cfg = config(
            "pool-2x1",
            "[scheduler]\nslots = 2\n[[workers]]\nkind = \"llama\"\nthreads = 1\n\
             [[workers]]\nkind = \"llama\"\nthreads = 1\n",
        );
        start_server(&["--config", &cfg])
    } else {
        start_server(&["-t", "2", "--parallel", "4"])
    };
    let (total, max_tokens) = if smoke { (4, 8) } else { (24, 64) };
    let (streams, wall) = run_load(server.port, 4, total, max_tokens, |i| {
        format!("Story {i}: once upon a time in a quiet village by the sea,")
    });
    let tokens: f64 = streams.iter().map(|s| s.stat("completion_tokens")).sum();
    let all: Vec<&Stream> = streams.iter().collect();
    let name = if pool {
        "2 workers x 1 thread"
    } else {
        "1 worker x 2 threads"
    };
    println!(
        "{name:>22}: {:.1} tok/s aggregate, TTFT p50 {:.0} ms",
        tokens / wall,
        ms(&all)
    );
    json!({"setup": name, "tok_s": tokens / wall, "ttft_ms_p50": ms(&all)})
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    println!(
        "prefix affinity: 6 rotating ~600-token system prompts, 2 local workers (1 thread, 2 slots, 3072-token KV each), 2 clients"
    );
    let prefix = affinity("prefix", smoke);
    let rr = affinity("round_robin", smoke);
    println!("threads or workers: 4 closed-loop clients, 64-token replies");
    let single = threads_vs_workers(false, smoke);
    let pool = threads_vs_workers(true, smoke);
    let get = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let ratio = |a: &Value, b: &Value, k: &str| get(a, k) / get(b, k);
    println!(
        "ratios: prefix/round-robin warm TTFT {:.2}, all TTFT {:.2}; 2x1/1x2 tok/s {:.2}, TTFT {:.2}",
        ratio(&prefix, &rr, "warm_ttft_ms_p50"),
        ratio(&prefix, &rr, "ttft_ms_p50"),
        ratio(&pool, &single, "tok_s"),
        ratio(&pool, &single, "ttft_ms_p50"),
    );
    write_report(
        "pool.json",
        &json!({"affinity": [prefix, rr], "threads_or_workers": [single, pool], "smoke": smoke}),
    );
}

//! Continuous batching and prefix-cache figures, measured in one run:
//! - aggregate decode tok/s at 1, 4 and 8 concurrent streams, against
//!   llama-batched-bench's S_TG at the same batch sizes (same model, threads);
//! - TTFT of a request whose ~1k-token prefix is cached, against the same cold;
//! - warm TTFT with 6 distinct ~600-token system prompts rotating over 4 slots.
//!
//! Prints a markdown table and writes `target/bench/batching.json`.
//!
//!     cargo bench --bench batching          # BENCH_QUICK=1 for a smoke run

mod common;

use std::process::{Command, Stdio};
use std::time::Instant;

use common::*;
use serde_json::{Value, json};

fn main() {
    let threads = threads();
    let quick = quick();
    let n_gen = if quick { 16 } else { 128 };
    let streams: &[usize] = if quick { &[1, 2] } else { &[1, 4, 8] };
    let runs = if quick { 1 } else { 5 };
    let t = threads.to_string();

    // For each concurrency, ours on a fresh server, then llama-batched-bench,
    // so both see the same machine state (it is shared and noisy).
    let batched_bench = llama_tool("llama-batched-bench").filter(|_| !quick);
    let mut served = Vec::new();
    let mut reference = Vec::new();
    for &n in streams {
        let server = start_server(&["-t", &t, "--parallel", "8"]);
        served.push(aggregate_tps(server.port, n, n_gen));
        drop(server);
        if let Some(bin) = &batched_bench {
            let out = Command::new(bin)
                .args([
                    "-m",
                    model_path().to_str().unwrap(),
                    "-t",
                    &t,
                    "-c",
                    "4096",
                    "-b",
                    "512",
                    "-ub",
                    "512",
                ])
                .args([
                    "-npp",
                    "16",
                    "-ntg",
                    &n_gen.to_string(),
                    "-npl",
                    &n.to_string(),
                    "--output-format",
                    "jsonl",
                ])
                .stderr(Stdio::null())
                .output()
                .expect("run llama-batched-bench");
            let row = String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|l| serde_json::from_str::<Value>(l).ok());
            reference.push(
                row.expect("llama-batched-bench output")["speed_tg"]
                    .as_f64()
                    .unwrap(),
            );
        }
    }
    let reference = (!reference.is_empty()).then_some(reference);

    let (cold, warm, cached) = cached_prefix_ttft(&t, runs);
    let rotation = rotating_prompts(&t, if quick { 1 } else { 3 });

    println!(
        "\n| concurrent streams ({threads} threads) | inference-core tok/s | llama-batched-bench S_TG | ratio |"
    );
    println!("|---|---|---|---|");
    for (i, &n) in streams.iter().enumerate() {
        match &reference {
            Some(r) => println!(
                "| {n} | {:.1} | {:.1} | {:.2} |",
                served[i],
                r[i],
                served[i] / r[i]
            ),
            None => println!(
                "| {n} | {:.1} | (run benches/llama-tools.sh llama-batched-bench) | |",
                served[i]
            ),
        }
    }
    println!("\n| TTFT, ~1k-token shared prefix | ms |");
    println!("|---|---|");
    println!("| cold | {cold:.1} |");
    println!("| prefix cached ({cached:.0} tokens reused) | {warm:.1} |");
    println!("| ratio cached/cold | {:.3} |", warm / cold);
    println!("\n| 6 system prompts (~600 tokens) rotating over 4 slots | ms |");
    println!("|---|---|");
    println!(
        "| first round (cold) median TTFT | {:.1} |",
        rotation["cold_ttft_ms"].as_f64().unwrap()
    );
    println!(
        "| later rounds median TTFT | {:.1} |",
        rotation["warm_ttft_ms"].as_f64().unwrap()
    );
    println!(
        "| later rounds median cached tokens | {:.0} |",
        rotation["warm_cached_tokens"].as_f64().unwrap()
    );
    write_report(
        "batching.json",
        &json!({
            "threads": threads, "streams": streams, "served_tps": served, "llama_batched_bench_s_tg": reference,
            "prefix_1k": {"cold_ttft_ms": cold, "cached_ttft_ms": warm, "cached_tokens": cached},
            "rotation": rotation,
        }),
    );
}

/// Steady-state decode rate of `n` concurrent greedy streams: tokens that
/// arrived while all `n` were generating, over that window.
fn aggregate_tps(port: u16, n: usize, n_gen: usize) -> f64 {
    let start = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            std::thread::spawn(move || {
                let mut ws = connect(port);
                request(&mut ws, &format!("Story number {i}, about the sea:"), n_gen).arrivals
            })
        })
        .collect();
    let all: Vec<Vec<Instant>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let t0 = all.iter().map(|a| a[0]).max().unwrap_or(start);
    let t1 = all.iter().map(|a| *a.last().unwrap()).min().unwrap();
    let tokens = all.iter().flatten().filter(|&&t| t > t0 && t <= t1).count();
    tokens as f64 / (t1 - t0).as_secs_f64()
}

fn system_prompt(i: usize, sentences: usize) -> String {
    let mut s = format!(
        "System prompt {i}. You are assistant number {i}, for customer {}. ",
        i * 7919
    );
    for k in 0..sentences {
        s.push_str(&format!(
            "Rule {k}: always answer about topic {} with care and precision. ",
            (i * 31 + k) % 97
        ));
    }
    s
}

/// Median server TTFT of (cold, cached) for distinct ~1k-token prefixes, and tokens reused.
fn cached_prefix_ttft(threads: &str, runs: usize) -> (f64, f64, f64) {
    let server = start_server(&["-t", threads]);
    let mut ws = connect(server.port);
    request(&mut ws, "Warm-up", 2);
    let (mut cold, mut warm, mut cached) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let system = system_prompt(100 + i, 60);
        let a = request(
            &mut ws,
            &format!("{system}\nQuestion: what is rule 3?\nAnswer:"),
            1,
        );
        let b = request(
            &mut ws,
            &format!("{system}\nQuestion: what is rule 7?\nAnswer:"),
            1,
        );
        cold.push(a.stat("ttft_ms"));
        warm.push(b.stat("ttft_ms"));
        cached.push(b.stat("cached_tokens"));
    }
    (median(cold), median(warm), median(cached))
}

/// Six distinct system prompts used in turn by single requests on a 4-slot server.
fn rotating_prompts(threads: &str, rounds: usize) -> Value {
    let server = start_server(&["-t", threads, "--parallel", "4", "-c", "8192"]);
    let mut ws = connect(server.port);
    request(&mut ws, "Warm-up", 2);
    let systems: Vec<String> = (0..6).map(|i| system_prompt(i, 36)).collect();
    let (mut cold, mut warm, mut cached) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..=rounds {
        for system in &systems {
            let s = request(
                &mut ws,
                &format!("{system}\nUser question {round}?\nAnswer:"),
                1,
            );
            if round == 0 {
                cold.push(s.stat("ttft_ms"));
            } else {
                warm.push(s.stat("ttft_ms"));
                cached.push(s.stat("cached_tokens"));
            }
        }
    }
    json!({"prompt_tokens_approx": 600, "cold_ttft_ms": median(cold), "warm_ttft_ms": median(warm), "warm_cached_tokens": median(cached)})
}

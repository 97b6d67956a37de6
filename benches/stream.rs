//! Single-stream figures of the served model against llama.cpp's ceiling.
//!
//! Starts the release server, measures from a real WebSocket client the TTFT
//! of a short prompt, the prompt-processing time of a longer one and the
//! decode rate of a greedy stream (speculation off: llama-bench's tg has
//! none; `benches/speculate.py` measures it), and, when `benches/llama-tools.sh` has built
//! it, runs `llama-bench` on the same model and threads before and after, so
//! both sides are measured in one run. Prints a markdown table and writes
//! `target/bench/stream.json`.
//!
//!     cargo bench --bench stream            # BENCH_THREADS=N, BENCH_QUICK=1 for a smoke run

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use serde_json::{Value, json};

fn main() {
    let threads = threads();
    let (runs, n_gen) = if quick() { (1, 16) } else { (5, 128) };
    let model = model_path();
    let llama_bench = llama_tool("llama-bench").filter(|_| !quick());

    let before = llama_bench
        .as_ref()
        .map(|b| run_llama_bench(b, &model, threads, n_gen));
    let served = measure_server(threads, runs, n_gen);
    let after = llama_bench
        .as_ref()
        .map(|b| run_llama_bench(b, &model, threads, n_gen));

    let mut report = json!({"threads": threads, "served": served});
    println!("\n| figure ({threads} threads) | inference-core | llama-bench | ratio |");
    println!("|---|---|---|---|");
    let (tg_served, pp_ms_served, ttft) = (
        served["decode_tps"].as_f64().unwrap(),
        served["prefill_ms_256"].as_f64().unwrap(),
        served["ttft_short_ms"].as_f64().unwrap(),
    );
    if let (Some(b), Some(a)) = (before, after) {
        let tg = (b.0 + a.0) / 2.0;
        let pp = (b.1 + a.1) / 2.0;
        let pp_ms = 256.0 / pp * 1000.0;
        println!(
            "| decode tok/s (tg{n_gen}) | {tg_served:.1} | {tg:.1} | {:.2} |",
            tg_served / tg
        );
        println!(
            "| 256-token prompt, ms (pp256) | {pp_ms_served:.1} | {pp_ms:.1} | {:.2} |",
            pp_ms_served / pp_ms
        );
        report["llama_bench"] =
            json!({"tg_tps": tg, "pp256_tps": pp, "tg_runs": [b.0, a.0], "pp_runs": [b.1, a.1]});
        report["ratio_decode"] = json!(tg_served / tg);
    } else {
        println!("| decode tok/s | {tg_served:.1} | (run benches/llama-tools.sh) | |");
        println!("| 256-token prompt, ms | {pp_ms_served:.1} | | |");
    }
    println!("| TTFT, short prompt, ms (client) | {ttft:.1} | | |");
    write_report("stream.json", &report);
}

/// Returns (tg tok/s, pp256 tok/s).
fn run_llama_bench(bin: &Path, model: &Path, threads: usize, n_gen: usize) -> (f64, f64) {
    let out = Command::new(bin)
        .args([
            "-m",
            model.to_str().unwrap(),
            "-t",
            &threads.to_string(),
            "-p",
            "256",
            "-n",
            &n_gen.to_string(),
            "-r",
            "3",
            "-o",
            "json",
        ])
        .stderr(Stdio::null())
        .output()
        .expect("run llama-bench");
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("llama-bench JSON");
    let ts = |decode: bool| {
        rows.iter()
            .find(|r| (r["n_gen"].as_u64().unwrap() > 0) == decode)
            .map(|r| r["avg_ts"].as_f64().unwrap())
            .unwrap()
    };
    (ts(true), ts(false))
}

fn measure_server(threads: usize, runs: usize, n_gen: usize) -> Value {
    let plain = manifest_dir().join("target/bench/stream-plain.toml");
    std::fs::write(&plain, "[scheduler]\ndraft_max = 0\n").unwrap();
    let server = start_server(&[
        "-t",
        &threads.to_string(),
        "--config",
        plain.to_str().unwrap(),
    ]);
    let mut ws = connect(server.port);
    request(&mut ws, "Warm-up", 8);

    let ttft_short = median(
        (0..runs * 2)
            .map(|i| {
                request(&mut ws, &format!("Hello {i}"), 1)
                    .ttft()
                    .as_secs_f64()
                    * 1e3
            })
            .collect(),
    );
    // A ~256-token prompt, one token out: TTFT is the prefill (scaled to exactly
    // 256 tokens). Each run differs at its start so the prefix cache cannot help.
    let prefill = median(
        (0..runs)
            .map(|i| {
                let prompt = format!(
                    "{i} {}",
                    "The quick brown fox jumps over the lazy dog. ".repeat(25)
                );
                let s = request(&mut ws, &prompt, 1);
                s.ttft().as_secs_f64() * 1e3 * 256.0 / s.stat("prompt_tokens")
            })
            .collect(),
    );
    let decode = median(
        (0..runs)
            .map(|_| {
                let s = request(
                    &mut ws,
                    "Write a long story about a lighthouse keeper.",
                    n_gen,
                );
                let span = (*s.arrivals.last().unwrap() - s.arrivals[0]).as_secs_f64();
                (s.arrivals.len() - 1) as f64 / span
            })
            .collect(),
    );
    json!({"ttft_short_ms": ttft_short, "prefill_ms_256": prefill, "decode_tps": decode})
}

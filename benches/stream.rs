//! Single-stream figures of the served model against llama.cpp's ceiling.
//!
//! Starts the release server, measures from a real WebSocket client the TTFT
//! of a short prompt, the prompt-processing time of a longer one and the
//! decode rate of a greedy stream (speculation off: llama-bench's tg has
//! none; `benches/speculate.py` measures it), and, when `benches/llama-tools.sh` has built
//! it, runs `llama-bench` on the same model and threads: its tg in
//! alternation with our decode, round by round (the decode ratio is the
//! median of the rounds' ratios), its pp256 after. Prints a markdown table
//! and writes `target/bench/stream.json`.
//!
//!     cargo bench --bench stream            # BENCH_THREADS=N, BENCH_QUICK=1 for a smoke run

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use serde_json::{Value, json};
use tungstenite::WebSocket;

fn main() {
    let threads = threads();
    let (runs, n_gen) = if quick() { (1, 16) } else { (5, 128) };
    let model = model_path();
    let llama_bench = llama_tool("llama-bench").filter(|_| !quick());

    let plain = config("stream-plain", "[scheduler]\ndraft_max = 0\n");
    let server = start_server(&["-t", &threads.to_string(), "--config", &plain]);
    let mut ws = connect(server.port);
    request(&mut ws, "Warm-up", 8);

    // Decode in alternation with llama-bench's tg (our server idle meanwhile),
    // so that both sides of each ratio ran within seconds of each other: this
    // machine's speed drifts by more than the difference measured.
    let mut rounds = Vec::new();
    for _ in 0..runs {
        let tg = llama_bench
            .as_ref()
            .map(|b| run_llama_bench(b, &model, threads, 0, n_gen, 1));
        let ours = decode_rate(&mut ws, n_gen);
        rounds.push((ours, tg));
    }
    let served = measure_server(&mut ws, runs);
    let pp = llama_bench
        .as_ref()
        .map(|b| run_llama_bench(b, &model, threads, 256, 0, 3));
    drop(server);

    let tg_served = median(rounds.iter().map(|r| r.0).collect());
    let (pp_ms_served, ttft) = (
        served["prefill_ms_256"].as_f64().unwrap(),
        served["ttft_short_ms"].as_f64().unwrap(),
    );
    let mut report = json!({"threads": threads, "served": served, "decode_tps": tg_served,
        "decode_rounds": rounds.iter().map(|r| json!({"ours": r.0, "llama_bench": r.1})).collect::<Vec<_>>()});
    println!("\n| figure ({threads} threads) | inference-core | llama-bench | ratio |");
    println!("|---|---|---|---|");
    let tgs: Option<Vec<f64>> = rounds.iter().map(|r| r.1).collect();
    if let (Some(tgs), Some(pp)) = (tgs, pp) {
        let ratio = median(rounds.iter().zip(&tgs).map(|(r, tg)| r.0 / tg).collect());
        let each: Vec<String> = rounds
            .iter()
            .zip(&tgs)
            .map(|(r, tg)| format!("{:.1}/{tg:.1}", r.0))
            .collect();
        let tg = median(tgs);
        let pp_ms = 256.0 / pp * 1000.0;
        println!(
            "| decode tok/s (tg{n_gen}; ratio: median of {runs} alternating rounds) | {tg_served:.1} | {tg:.1} | {ratio:.2} |"
        );
        println!(
            "| 256-token prompt, ms (pp256) | {pp_ms_served:.1} | {pp_ms:.1} | {:.2} |",
            pp_ms_served / pp_ms
        );
        println!("| TTFT, short prompt, ms (client) | {ttft:.1} | | |");
        println!(
            "\ndecode rounds, ours/llama-bench tok/s: {}",
            each.join(", ")
        );
        report["llama_bench"] = json!({"tg_tps": tg, "pp256_tps": pp});
        report["ratio_decode"] = json!(ratio);
    } else {
        println!("| decode tok/s | {tg_served:.1} | (run benches/llama-tools.sh) | |");
        println!("| 256-token prompt, ms | {pp_ms_served:.1} | | |");
        println!("| TTFT, short prompt, ms (client) | {ttft:.1} | | |");
    }
    write_report("stream.json", &report);
}

/// llama-bench's rate in tok/s: a prompt of `n_prompt` tokens or the
/// generation of `n_gen` (one of them 0), averaged over `reps` repetitions.
fn run_llama_bench(
    bin: &Path,
    model: &Path,
    threads: usize,
    n_prompt: usize,
    n_gen: usize,
    reps: usize,
) -> f64 {
    let out = Command::new(bin)
        .args([
            "-m",
            model.to_str().unwrap(),
            "-t",
            &threads.to_string(),
            "-p",
            &n_prompt.to_string(),
            "-n",
            &n_gen.to_string(),
            "-r",
            &reps.to_string(),
            "-o",
            "json",
        ])
        .stderr(Stdio::null())
        .output()
        .expect("run llama-bench");
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("llama-bench JSON");
    rows[0]["avg_ts"].as_f64().expect("llama-bench avg_ts")
}

/// One greedy stream of `n_gen` tokens: tokens after the first over the time
/// from the first to the last, as the client saw them.
fn decode_rate(ws: &mut WebSocket<TcpStream>, n_gen: usize) -> f64 {
    let s = request(ws, "Write a long story about a lighthouse keeper.", n_gen);
    let span = (*s.arrivals.last().unwrap() - s.arrivals[0]).as_secs_f64();
    (s.arrivals.len() - 1) as f64 / span
}

/// The short prompt's TTFT and a 256-token prompt's time, medians.
fn measure_server(ws: &mut WebSocket<TcpStream>, runs: usize) -> Value {
    let ttft_short = median(
        (0..runs * 2)
            .map(|i| request(ws, &format!("Hello {i}"), 1).ttft().as_secs_f64() * 1e3)
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
                let s = request(ws, &prompt, 1);
                s.ttft().as_secs_f64() * 1e3 * 256.0 / s.stat("prompt_tokens")
            })
            .collect(),
    );
    json!({"ttft_short_ms": ttft_short, "prefill_ms_256": prefill})
}

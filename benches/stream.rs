//! Single-stream figures of the served model against llama.cpp's ceiling.
//!
//! Starts the release server, measures from a real WebSocket client the TTFT
//! of a short prompt, the prompt-processing time of a longer one and the
//! decode rate of a greedy stream, and, when `benches/llama-tools.sh` has built
//! it, runs `llama-bench` on the same model and threads before and after, so
//! both sides are measured in one run. Prints a markdown table and writes
//! `target/bench/stream.json`.
//!
//!     cargo bench --bench stream            # BENCH_THREADS=N, BENCH_QUICK=1 for a smoke run

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

fn main() {
    let threads: usize = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(num_cpus::get_physical);
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let (runs, n_gen) = if quick { (1, 16) } else { (5, 128) };
    let model = model_path();
    let llama_bench =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/llama-tools/bin/llama-bench");
    let reference = llama_bench.is_file() && !quick;

    let before = reference.then(|| run_llama_bench(&llama_bench, &model, threads, n_gen));
    let served = measure_server(threads, runs, n_gen);
    let after = reference.then(|| run_llama_bench(&llama_bench, &model, threads, n_gen));

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
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("stream.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
}

fn model_path() -> PathBuf {
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/fetch-model.sh"
    ))
    .output()
    .expect("fetch-model.sh");
    assert!(out.status.success(), "fetch-model.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
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

struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(threads: usize) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_inference-core"))
        .args(["--port", "0", "-t", &threads.to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start server");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let port = loop {
        let line = lines.next().expect("server exited").unwrap();
        if let Some(rest) = line.split("listening on ws://").nth(1) {
            break rest.rsplit(':').next().unwrap().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Server(child, port)
}

struct Stream {
    ttft: Duration,
    arrivals: Vec<Instant>,
    prompt_tokens: f64,
}

fn request(ws: &mut WebSocket<TcpStream>, prompt: &str, max_tokens: usize) -> Stream {
    let start = Instant::now();
    let msg = json!({"op":"infer","id":"b","prompt":prompt,"params":{"temp":0,"max_tokens":max_tokens,"ignore_eos":true}});
    ws.send(Message::text(msg.to_string())).unwrap();
    let mut arrivals = Vec::new();
    loop {
        let Message::Text(t) = ws.read().unwrap() else {
            continue;
        };
        let ev: Value = serde_json::from_str(t.as_str()).unwrap();
        match ev["op"].as_str().unwrap() {
            "token" => arrivals.push(Instant::now()),
            "end" => {
                let prompt_tokens = ev["stats"]["prompt_tokens"].as_f64().unwrap();
                return Stream {
                    ttft: arrivals[0] - start,
                    arrivals,
                    prompt_tokens,
                };
            }
            _ => panic!("unexpected {ev}"),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn measure_server(threads: usize, runs: usize, n_gen: usize) -> Value {
    let server = start_server(threads);
    let stream = TcpStream::connect(("127.0.0.1", server.1)).unwrap();
    let (mut ws, _) = tungstenite::client(format!("ws://127.0.0.1:{}/", server.1), stream).unwrap();
    ws.read().unwrap(); // hello
    request(&mut ws, "Warm-up", 8);

    let ttft_short = median(
        (0..runs * 2)
            .map(|_| request(&mut ws, "Hello", 1).ttft.as_secs_f64() * 1e3)
            .collect(),
    );
    // A ~256-token prompt, one token out: TTFT is the prefill (scaled to exactly 256 tokens).
    let long_prompt = "The quick brown fox jumps over the lazy dog. ".repeat(25);
    let prefill = median(
        (0..runs)
            .map(|_| {
                let s = request(&mut ws, &long_prompt, 1);
                s.ttft.as_secs_f64() * 1e3 * 256.0 / s.prompt_tokens
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

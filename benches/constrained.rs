//! What constrained decoding costs, measured from real clients.
//!
//! 1. Single stream, same sampler (temperature 0.8, a seed per run): decode
//!    tok/s unconstrained against a JSON schema (llguidance), a Lark grammar
//!    (llguidance) and the same grammar in GBNF (llama.cpp's grammar sampler).
//!    With `benches/llama-tools.sh llama-server` built, llama-server runs the
//!    same unconstrained and JSON-schema requests (it turns the schema into
//!    GBNF) in the same sitting.
//! 2. A batch: the inter-token gaps of three greedy streams beside a fourth
//!    that is greedy too, then beside a fourth that is JSON-constrained.
//!
//! Prints markdown tables and writes `target/bench/constrained.json`.
//!
//!     cargo bench --bench constrained         # BENCH_THREADS=N; BENCH_QUICK=1: a smoke run

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;

const PROMPT: &str = "A list of characters for a fantasy game, as JSON:\n";

fn schema() -> Value {
    let person = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["knight", "wizard", "merchant", "thief"]},
            "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 2, "maxItems": 3},
        },
        "required": ["name", "age", "role", "skills"],
        "additionalProperties": false,
    });
    json!({"type": "array", "items": person, "minItems": 4, "maxItems": 4})
}

/// The same language in both grammar dialects: 24 comma-separated words.
const LARK: &str = "start: WORD (\", \" WORD)~23 \".\"\nWORD: /[a-z]{2,12}/";
const GBNF: &str = "root ::= word (\", \" word){23} \".\"\nword ::= [a-z] [a-z] [a-z]? [a-z]? [a-z]? [a-z]? [a-z]? [a-z]? [a-z]? [a-z]? [a-z]? [a-z]?";

fn main() {
    let threads = threads();
    let runs = if quick() { 1 } else { 6 };
    let server = start_server(&["-t", &threads.to_string(), "--parallel", "4"]);
    // Constrained decoding is prepared on a thread of its own at start-up.
    std::thread::sleep(Duration::from_secs(2));

    let cases: [(&str, Value); 4] = [
        ("unconstrained", json!({})),
        ("JSON schema (llguidance)", json!({"json_schema": schema()})),
        ("Lark grammar (llguidance)", json!({"grammar": LARK})),
        ("GBNF grammar (llama.cpp)", json!({"grammar": GBNF})),
    ];
    let mut single = Vec::new();
    println!(
        "\n| single stream ({threads} threads, {runs} runs) | decode tok/s | vs unconstrained | tokens |"
    );
    println!("|---|---|---|---|");
    let mut base = 0.0;
    for (name, extra) in &cases {
        let (tps, tokens) = single_stream(server.port, extra, runs);
        if base == 0.0 {
            base = tps;
        }
        println!("| {name} | {tps:.1} | {:.2} | {tokens:.0} |", tps / base);
        single
            .push(json!({"case": name, "decode_tps": tps, "ratio": tps / base, "tokens": tokens}));
    }

    let mut report = json!({"threads": threads, "single": single});
    if let Some(bin) = llama_tool("llama-server").filter(|_| !quick()) {
        drop(server);
        let ls = LlamaServer::start(&bin, &model_path(), threads);
        let plain = ls.decode_tps(&json!({}), runs);
        let constrained = ls.decode_tps(&json!({"json_schema": schema()}), runs);
        println!(
            "\n| llama-server, same requests | decode tok/s | vs unconstrained | ours / llama-server |"
        );
        println!("|---|---|---|---|");
        let ours = |i: usize| report["single"][i]["decode_tps"].as_f64().unwrap();
        println!(
            "| unconstrained | {plain:.1} | 1.00 | {:.2} |",
            ours(0) / plain
        );
        println!(
            "| JSON schema (llama.cpp grammar) | {constrained:.1} | {:.2} | {:.2} |",
            constrained / plain,
            ours(1) / constrained
        );
        report["llama_server"] = json!({"decode_tps": plain, "json_schema_tps": constrained});
        let server = start_server(&["-t", &threads.to_string(), "--parallel", "4"]);
        std::thread::sleep(Duration::from_secs(2));
        report["batch"] = batch(server.port, runs);
    } else {
        report["batch"] = batch(server.port, runs);
    }
    write_report("constrained.json", &report);
}

/// Median decode tok/s and mean tokens of `runs` requests with `extra` params.
fn single_stream(port: u16, extra: &Value, runs: usize) -> (f64, f64) {
    let mut ws = connect(port);
    let mut tps = Vec::new();
    let mut tokens = 0.0;
    for run in 0..runs + 1 {
        let mut params = json!({"temp": 0.8, "seed": run, "max_tokens": 256});
        params
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let msg = json!({"op": "infer", "id": "s", "prompt": PROMPT, "params": params});
        ws.send(Message::text(msg.to_string())).unwrap();
        let s = collect(&mut ws, "s", Instant::now());
        assert_eq!(s.end["op"], "end", "{}", s.end);
        if run > 0 {
            // The first run warms the caches.
            tps.push(s.stat("tps"));
            tokens += s.stat("completion_tokens") / runs as f64;
        }
    }
    (median(tps), tokens)
}

/// ITL of three greedy streams beside a fourth, unconstrained then
/// JSON-constrained.
fn batch(port: u16, runs: usize) -> Value {
    let mut out = json!({});
    println!("\n| 3 greedy streams beside a 4th | ITL p50 ms | ITL p99 ms | 4th's tok/s |");
    println!("|---|---|---|---|");
    let mut p50s = Vec::new();
    for (name, fourth) in [
        ("unconstrained 4th", json!({"temp": 0.8})),
        (
            "JSON-constrained 4th",
            json!({"temp": 0.8, "json_schema": schema()}),
        ),
    ] {
        let mut gaps = Vec::new();
        let mut fourth_tps = Vec::new();
        for run in 0..runs {
            let conns: Vec<_> = (0..4).map(|_| connect(port)).collect();
            // A reader per stream, so each token's arrival is seen when it comes.
            let readers: Vec<_> = conns
                .into_iter()
                .enumerate()
                .map(|(i, mut ws)| {
                    let params = if i == 3 {
                        let mut p = fourth.clone();
                        p["seed"] = json!(run);
                        p["max_tokens"] = json!(200);
                        p
                    } else {
                        json!({"temp": 0, "max_tokens": 96, "ignore_eos": true})
                    };
                    let msg = json!({"op": "infer", "id": "b", "prompt": PROMPT, "params": params});
                    ws.send(Message::text(msg.to_string())).unwrap();
                    let sent = Instant::now();
                    std::thread::spawn(move || collect(&mut ws, "b", sent))
                })
                .collect();
            let streams: Vec<Stream> = readers.into_iter().map(|r| r.join().unwrap()).collect();
            for s in &streams[..3] {
                // Gaps while the fourth was still running: the ones it can touch.
                let fourth_end = *streams[3].arrivals.last().unwrap();
                gaps.extend(
                    s.arrivals
                        .windows(2)
                        .filter(|w| w[1] <= fourth_end)
                        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3),
                );
            }
            fourth_tps.push(streams[3].stat("tps"));
        }
        gaps.sort_by(f64::total_cmp);
        let at = |q: f64| gaps[((gaps.len() - 1) as f64 * q) as usize];
        let (p50, p99) = (at(0.5), at(0.99));
        println!(
            "| {name} | {p50:.1} | {p99:.1} | {:.1} |",
            median(fourth_tps.clone())
        );
        p50s.push(p50);
        out[name] = json!({"itl_p50_ms": p50, "itl_p99_ms": p99, "gaps": gaps.len()});
    }
    println!(
        "\nITL p50 beside a constrained stream / beside an unconstrained one: {:.2}",
        p50s[1] / p50s[0]
    );
    out
}

impl LlamaServer {
    fn start(bin: &Path, model: &Path, threads: usize) -> LlamaServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args(["-m", model.to_str().unwrap(), "--host", "127.0.0.1"])
            .args([
                "--port",
                &port.to_string(),
                "-t",
                &threads.to_string(),
                "-np",
                "4",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start llama-server");
        let server = LlamaServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(120);
        while server.post("/health", None).0 != 200 {
            assert!(Instant::now() < deadline, "llama-server not ready in 120 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    /// Status and body of a request (`GET` without a body).
    fn post(&self, path: &str, body: Option<&Value>) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return (0, String::new());
        };
        let req = match body {
            None => format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            Some(b) => {
                let b = b.to_string();
                format!(
                    "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                    b.len()
                )
            }
        };
        let mut text = String::new();
        if s.write_all(req.as_bytes()).is_err() || s.read_to_string(&mut text).is_err() {
            return (0, String::new());
        }
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_owned();
        (status, body)
    }

    fn decode_tps(&self, extra: &Value, runs: usize) -> f64 {
        let mut tps = Vec::new();
        for run in 0..runs + 1 {
            let mut body = json!({"prompt": PROMPT, "temperature": 0.8, "seed": run, "n_predict": 256,
                "cache_prompt": false});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let (status, text) = self.post("/completion", Some(&body));
            assert_eq!(status, 200, "{text}");
            let v: Value = serde_json::from_str(&text).expect("llama-server's JSON");
            if run > 0 {
                tps.push(v["timings"]["predicted_per_second"].as_f64().unwrap());
            }
        }
        median(tps)
    }
}

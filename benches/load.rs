//! Load generator: TTFT, inter-token latency and throughput under load,
//! inference-core side by side with llama-server.
//!
//! Each scenario (closed loop with N clients, or open loop with Poisson
//! arrivals at R requests/s) runs the same seeded requests against our server
//! (WebSocket) and llama-server (`POST /completion`, server-sent events), in
//! turn: ours, theirs, ours, theirs... (`--rounds`), both started once with the
//! same model, threads, context and slots, greedy with `ignore_eos`. Every
//! prompt of a round starts with a text unique to the round, so neither server
//! has it cached unless the workload shares it on purpose (`shared`,
//! `rotating`). The first `--warmup` requests of each scenario are excluded.
//!
//! Per request: TTFT, every gap between two token events, end-to-end time,
//! completion tokens. Reported per scenario and server: p50/p90/p99/max
//! (hdrhistogram), aggregate tok/s and requests/s over the measured window,
//! errors; then the ratios inference-core / llama-server. Output: a markdown
//! table on stdout, `target/bench/load-<tag>.json` and a plot of the latency
//! percentiles, `target/bench/load-<tag>.svg`.
//!
//!     cargo bench --bench load                      # the default suite
//!     cargo bench --bench load -- --smoke           # CI: a few requests, ours only
//!     cargo bench --bench load -- --help

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

use common::{manifest_dir, model_path, start_server, write_report};

#[derive(Parser, Debug, Clone)]
#[command(about = "WebSocket load generator: inference-core vs llama-server")]
struct Args {
    /// Closed-loop scenarios: this many concurrent clients each (mixed workload).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 8])]
    concurrency: Vec<usize>,
    /// Open-loop scenarios: Poisson arrivals at these rates, requests/s (mixed workload).
    #[arg(long, value_delimiter = ',', default_values_t = [1.0])]
    rate: Vec<f64>,
    /// Clients of the shared-system-prompt scenario (0: skip it).
    #[arg(long, default_value_t = 4)]
    shared: usize,
    /// Clients of the rotating-system-prompts scenario (0: skip it).
    #[arg(long, default_value_t = 4)]
    rotating: usize,
    /// Measured requests per scenario, server and round.
    #[arg(long, default_value_t = 12)]
    requests: usize,
    /// Warm-up requests before them, excluded from the figures (default: one
    /// per client; rotating: at least one per system prompt).
    #[arg(long)]
    warmup: Option<usize>,
    /// Prompt lengths in words (about 1.3 tokens each), drawn uniformly per request.
    #[arg(long, value_delimiter = ',', default_values_t = [16, 64, 256])]
    prompt_words: Vec<usize>,
    /// Output lengths in tokens, drawn uniformly per request (ignore_eos: exact).
    #[arg(long, value_delimiter = ',', default_values_t = [32, 64])]
    output_tokens: Vec<usize>,
    /// Seed of the request mix and of the arrivals.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Alternations ours/theirs per scenario (ours, theirs, ours, theirs...); rounds are merged.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// llama.cpp threads of both servers (default: physical cores).
    #[arg(short, long)]
    threads: Option<usize>,
    /// Context size of both servers (one KV cache shared by all slots).
    #[arg(short = 'c', long, default_value_t = 4096)]
    ctx_size: usize,
    /// Parallel slots of both servers.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Measure inference-core only, even when llama-server is built.
    #[arg(long)]
    ours_only: bool,
    /// llama-server binary (default: target/llama-tools/bin/llama-server, built by benches/llama-tools.sh).
    #[arg(long)]
    llama_server: Option<PathBuf>,
    /// Names the outputs: target/bench/load-<tag>.{json,svg}.
    #[arg(long, default_value = "suite")]
    tag: String,
    /// A few short requests against our server only, for CI: checks the bench
    /// works and every request succeeds, asserts nothing about speed.
    #[arg(long)]
    smoke: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Args {
    fn smoke(mut self) -> Args {
        self.concurrency = vec![2];
        self.rate = vec![4.0];
        self.shared = 2;
        self.rotating = 0;
        self.requests = 4;
        self.warmup = Some(1);
        self.prompt_words = vec![8, 32];
        self.output_tokens = vec![8];
        self.rounds = 1;
        self.ctx_size = 2048;
        self.parallel = 2;
        self.ours_only = true;
        self.tag = "smoke".into();
        self
    }
}

// ---------------------------------------------------------------- workload

#[derive(Debug, Clone, Copy, PartialEq)]
enum Workload {
    /// Prompt and output lengths drawn from the mixes; every prompt distinct.
    Mix,
    /// One ~600-token system prompt shared by every request, a short question after it.
    Shared,
    /// Six distinct ~600-token system prompts used in turn.
    Rotating,
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Closed { clients: usize },
    Open { rate: f64 },
}

#[derive(Debug, Clone)]
struct Scenario {
    name: String,
    mode: Mode,
    workload: Workload,
}

struct Job {
    prompt: String,
    n_predict: usize,
}

/// SplitMix64: a seeded generator, enough for workloads and arrivals.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

const WORDS: &[&str] = &[
    "the", "river", "quiet", "engine", "morning", "light", "across", "stone", "garden", "music",
    "winter", "signal", "harbor", "window", "paper", "silver", "forest", "number", "bridge",
    "letter", "market", "cloud", "thread", "mountain", "story", "clock", "ocean", "village",
    "lantern", "copper", "meadow", "station",
];

fn words(rng: &mut Rng, n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        if i > 0 {
            s.push(if i % 12 == 0 { '.' } else { ' ' });
            if i % 12 == 0 {
                s.push(' ');
            }
        }
        s.push_str(WORDS[rng.below(WORDS.len())]);
    }
    s
}

fn system_prompt(i: usize) -> String {
    let mut s = format!("System prompt {i}. You are assistant number {i}. ");
    for k in 0..36 {
        s.push_str(&format!(
            "Rule {k}: always answer about topic {} with care and precision. ",
            (i * 31 + k) % 97
        ));
    }
    s
}

/// The requests of one scenario and round: the same for both servers.
fn plan(args: &Args, sc: &Scenario, scenario_index: usize, round: usize, n: usize) -> Vec<Job> {
    let mut rng = Rng(args.seed ^ ((scenario_index as u64) << 32) ^ round as u64);
    (0..n)
        .map(|k| {
            let n_predict = args.output_tokens[rng.below(args.output_tokens.len())];
            let prompt = match sc.workload {
                Workload::Mix => {
                    let w = args.prompt_words[rng.below(args.prompt_words.len())];
                    format!("Request {round}-{k}: {}", words(&mut rng, w))
                }
                Workload::Shared => format!(
                    "{}\nQuestion {round}-{k}: {}?\nAnswer:",
                    system_prompt(1000),
                    words(&mut rng, 8)
                ),
                Workload::Rotating => format!(
                    "{}\nQuestion {round}-{k}: {}?\nAnswer:",
                    system_prompt(k % 6),
                    words(&mut rng, 8)
                ),
            };
            Job { prompt, n_predict }
        })
        .collect()
}

// ---------------------------------------------------------------- clients

#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Ours(u16),
    Llama(u16),
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Ours(_) => "inference-core",
            Target::Llama(_) => "llama-server",
        }
    }
}

/// What the client saw of one request.
struct Sample {
    start: Instant,
    /// Arrival of every token event.
    arrivals: Vec<Instant>,
    end: Instant,
    tokens: usize,
    error: Option<String>,
}

/// One client: a WebSocket kept open across requests (ours), or one HTTP
/// connection per request (llama-server's SSE stream ends with the response).
enum Client {
    Ours(Box<WebSocket<TcpStream>>),
    Llama(u16),
}

impl Client {
    fn new(target: Target) -> Result<Client, String> {
        match target {
            Target::Ours(port) => {
                let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
                stream.set_nodelay(true).ok();
                let (mut ws, _) = tungstenite::client(format!("ws://127.0.0.1:{port}/"), stream)
                    .map_err(|e| e.to_string())?;
                ws.read().map_err(|e| e.to_string())?; // hello
                Ok(Client::Ours(Box::new(ws)))
            }
            Target::Llama(port) => Ok(Client::Llama(port)),
        }
    }

    /// Runs one request; `start` is when it was due (open loop: its scheduled
    /// arrival, so a late client thread counts against the latency).
    fn run(&mut self, id: usize, job: &Job, start: Instant) -> Sample {
        let mut arrivals = Vec::with_capacity(job.n_predict);
        let result = match self {
            Client::Ours(ws) => ours(ws, id, job, &mut arrivals),
            Client::Llama(port) => llama(*port, job, &mut arrivals),
        };
        let end = Instant::now();
        let (tokens, error) = match result {
            Ok(t) => (t, None),
            Err(e) => (0, Some(e)),
        };
        Sample {
            start,
            arrivals,
            end,
            tokens,
            error,
        }
    }
}

/// Returns the completion tokens.
fn ours(
    ws: &mut WebSocket<TcpStream>,
    id: usize,
    job: &Job,
    arrivals: &mut Vec<Instant>,
) -> Result<usize, String> {
    let id = format!("r{id}");
    let msg = json!({"op":"infer","id":id,"prompt":job.prompt,
        "params":{"temp":0,"max_tokens":job.n_predict,"ignore_eos":true}});
    ws.send(Message::text(msg.to_string()))
        .map_err(|e| e.to_string())?;
    loop {
        let Message::Text(t) = ws.read().map_err(|e| e.to_string())? else {
            continue;
        };
        let now = Instant::now();
        let ev: Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
        if ev["id"] != id.as_str() {
            continue;
        }
        match ev["op"].as_str() {
            Some("token") => arrivals.push(now),
            Some("queued") => {}
            Some("end") => {
                return ev["stats"]["completion_tokens"]
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("end without stats: {ev}"));
            }
            _ => return Err(ev.to_string()),
        }
    }
}

/// `POST /completion` with `stream: true`; every `data:` event before the
/// final one (`"stop": true`) is one token. Returns the completion tokens.
fn llama(port: u16, job: &Job, arrivals: &mut Vec<Instant>) -> Result<usize, String> {
    let body = json!({"prompt": job.prompt, "n_predict": job.n_predict, "stream": true,
        "ignore_eos": true, "temperature": 0, "cache_prompt": true})
    .to_string();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).ok();
    write!(
        stream,
        "POST /completion HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(stream);
    let (status, chunked) = read_head(&mut r)?;
    if status != 200 {
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        return Err(format!("HTTP {status}: {}", rest.trim()));
    }
    let mut sse = String::new();
    let mut piece = Vec::new();
    loop {
        piece.clear();
        if chunked {
            let mut size = String::new();
            r.read_line(&mut size).map_err(|e| e.to_string())?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|e| format!("bad chunk size {size:?}: {e}"))?;
            if size == 0 {
                return Err("stream ended without a final event".into());
            }
            piece.resize(size + 2, 0);
            r.read_exact(&mut piece).map_err(|e| e.to_string())?;
            piece.truncate(size);
        } else {
            let n = r.read_until(b'\n', &mut piece).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("stream ended without a final event".into());
            }
        }
        let now = Instant::now();
        sse.push_str(&String::from_utf8_lossy(&piece));
        while let Some(pos) = sse.find("\n\n") {
            let event: String = sse.drain(..pos + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    if let Some(e) = line.strip_prefix("error: ") {
                        return Err(e.to_owned());
                    }
                    continue;
                };
                let ev: Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
                if ev.get("error").is_some() {
                    return Err(ev.to_string());
                }
                if ev["stop"] == true {
                    return Ok(ev["timings"]["predicted_n"]
                        .as_u64()
                        .map_or(arrivals.len(), |n| n as usize));
                }
                arrivals.push(now);
            }
        }
    }
}

/// Reads the status line and headers: (status, chunked transfer encoding).
fn read_head(r: &mut BufReader<TcpStream>) -> Result<(u16, bool), String> {
    let mut head = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut head).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the response".into());
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(&head).map_err(|e| e.to_string())?;
    let chunked = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value).contains("chunked")
    });
    Ok((resp.code.unwrap_or(0), chunked))
}

// ---------------------------------------------------------------- servers

/// llama-server, killed on drop.
struct LlamaServer {
    child: Child,
    port: u16,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_llama_server(bin: &Path, model: &Path, args: &Args, threads: usize) -> LlamaServer {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let help = Command::new(bin)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut cmd = Command::new(bin);
    cmd.args(["-m", model.to_str().unwrap(), "--host", "127.0.0.1"])
        .args(["--port", &port.to_string(), "-t", &threads.to_string()])
        .args(["-c", &args.ctx_size.to_string()])
        .args(["-np", &args.parallel.to_string()]);
    // Like ours, one KV cache shared by all slots (otherwise each slot gets ctx/np).
    if help.contains("--kv-unified") {
        cmd.arg("--kv-unified");
    }
    let log = std::fs::File::create(manifest_dir().join("target/bench/llama-server.log")).unwrap();
    let child = cmd
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start llama-server");
    let mut server = LlamaServer { child, port };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("llama-server exited ({status}): see target/bench/llama-server.log");
        }
        if health_ok(port) {
            return server;
        }
        assert!(Instant::now() < deadline, "llama-server not ready in 120 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn health_ok(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let req =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut r = BufReader::new(s);
    matches!(read_head(&mut r), Ok((200, _)))
}

// ---------------------------------------------------------------- running

/// Runs one scenario's jobs against one server; samples in job order.
fn run_jobs(
    sc: &Scenario,
    target: Target,
    jobs: Arc<Vec<Job>>,
    seed: u64,
    label: &str,
) -> Vec<Sample> {
    let bar = ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>34} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap()
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    let samples: Arc<Mutex<Vec<Option<Sample>>>> =
        Arc::new(Mutex::new((0..jobs.len()).map(|_| None).collect()));
    match sc.mode {
        Mode::Closed { clients } => {
            let next = Arc::new(AtomicUsize::new(0));
            let handles: Vec<_> = (0..clients)
                .map(|_| {
                    let (jobs, next, samples, bar) =
                        (jobs.clone(), next.clone(), samples.clone(), bar.clone());
                    std::thread::spawn(move || {
                        let mut client = Client::new(target);
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= jobs.len() {
                                break;
                            }
                            let start = Instant::now();
                            let s = match &mut client {
                                Ok(c) => c.run(i, &jobs[i], start),
                                Err(e) => failed(start, e),
                            };
                            samples.lock().unwrap()[i] = Some(s);
                            bar.inc(1);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
        }
        Mode::Open { rate } => {
            // Exponential gaps: Poisson arrivals, from the seed, the same for both servers.
            let mut rng = Rng(seed);
            let t0 = Instant::now();
            let mut at = Duration::ZERO;
            let mut handles = Vec::new();
            for i in 0..jobs.len() {
                let due = t0 + at;
                at += Duration::from_secs_f64(-rng.unit().ln() / rate);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let (jobs, samples, bar) = (jobs.clone(), samples.clone(), bar.clone());
                handles.push(std::thread::spawn(move || {
                    let s = match Client::new(target) {
                        Ok(mut c) => c.run(i, &jobs[i], due),
                        Err(e) => failed(due, &e),
                    };
                    samples.lock().unwrap()[i] = Some(s);
                    bar.inc(1);
                }));
            }
            for h in handles {
                h.join().unwrap();
            }
        }
    }
    bar.finish_and_clear();
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    samples.into_iter().map(Option::unwrap).collect()
}

fn failed(start: Instant, e: &str) -> Sample {
    Sample {
        start,
        arrivals: Vec::new(),
        end: Instant::now(),
        tokens: 0,
        error: Some(e.to_owned()),
    }
}

/// The figures of one scenario on one server, merged over rounds.
struct Figures {
    ttft: Histogram<u64>,
    itl: Histogram<u64>,
    e2e: Histogram<u64>,
    requests: usize,
    errors: usize,
    first_error: Option<String>,
    tokens: usize,
    wall: Duration,
}

impl Figures {
    fn new() -> Figures {
        let h = || Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        Figures {
            ttft: h(),
            itl: h(),
            e2e: h(),
            requests: 0,
            errors: 0,
            first_error: None,
            tokens: 0,
            wall: Duration::ZERO,
        }
    }

    /// Adds the measured samples of one run (the window: first start to last end).
    fn add(&mut self, samples: &[Sample]) {
        let us = |d: Duration| (d.as_micros() as u64).max(1);
        for s in samples {
            self.requests += 1;
            if let Some(e) = &s.error {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| e.clone());
                continue;
            }
            self.tokens += s.tokens;
            self.e2e.saturating_record(us(s.end - s.start));
            if let Some(first) = s.arrivals.first() {
                self.ttft.saturating_record(us(*first - s.start));
            }
            for w in s.arrivals.windows(2) {
                self.itl.saturating_record(us(w[1] - w[0]));
            }
        }
        if let (Some(a), Some(b)) = (
            samples.iter().map(|s| s.start).min(),
            samples.iter().map(|s| s.end).max(),
        ) {
            self.wall += b - a;
        }
    }

    fn tps(&self) -> f64 {
        self.tokens as f64 / self.wall.as_secs_f64()
    }
    fn rps(&self) -> f64 {
        (self.requests - self.errors) as f64 / self.wall.as_secs_f64()
    }

    fn json(&self) -> Value {
        let pct = |h: &Histogram<u64>| {
            let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
            json!({"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": h.max() as f64 / 1e3,
                "mean": h.mean() / 1e3, "count": h.len()})
        };
        json!({"requests": self.requests, "errors": self.errors, "first_error": self.first_error,
            "completion_tokens": self.tokens, "wall_s": self.wall.as_secs_f64(),
            "tok_per_s": self.tps(), "req_per_s": self.rps(),
            "ttft_ms": pct(&self.ttft), "itl_ms": pct(&self.itl), "e2e_ms": pct(&self.e2e),
            // 0..100 percentiles, for plots.
            "ttft_percentiles_ms": curve(&self.ttft), "itl_percentiles_ms": curve(&self.itl)})
    }
}

const CURVE: &[f64] = &[
    0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.9, 100.0,
];

fn curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    CURVE
        .iter()
        .map(|&p| (p, h.value_at_quantile(p / 100.0) as f64 / 1e3))
        .collect()
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1e3
}

fn scenarios(args: &Args) -> Vec<Scenario> {
    let mut v = Vec::new();
    for &c in &args.concurrency {
        v.push(Scenario {
            name: format!("closed c={c}, mix"),
            mode: Mode::Closed { clients: c },
            workload: Workload::Mix,
        });
    }
    if args.shared > 0 {
        v.push(Scenario {
            name: format!("closed c={}, shared prefix", args.shared),
            mode: Mode::Closed {
                clients: args.shared,
            },
            workload: Workload::Shared,
        });
    }
    if args.rotating > 0 {
        v.push(Scenario {
            name: format!("closed c={}, 6 rotating prefixes", args.rotating),
            mode: Mode::Closed {
                clients: args.rotating,
            },
            workload: Workload::Rotating,
        });
    }
    for &r in &args.rate {
        v.push(Scenario {
            name: format!("open {r} req/s, mix"),
            mode: Mode::Open { rate: r },
            workload: Workload::Mix,
        });
    }
    v
}

fn main() {
    let mut args = Args::parse();
    if args.smoke {
        args = args.smoke();
    }
    let threads = args.threads.unwrap_or_else(common::threads);
    let model = model_path();
    std::fs::create_dir_all(manifest_dir().join("target/bench")).unwrap();
    let llama_bin = args
        .llama_server
        .clone()
        .or_else(|| common::llama_tool("llama-server"))
        .filter(|_| !args.ours_only);
    if llama_bin.is_none() && !args.ours_only {
        eprintln!("llama-server not built (benches/llama-tools.sh llama-server): our side only");
    }

    let (t, c, np) = (
        threads.to_string(),
        args.ctx_size.to_string(),
        args.parallel.to_string(),
    );
    let ours = start_server(&["-t", &t, "-c", &c, "--parallel", &np]);
    let theirs = llama_bin
        .as_ref()
        .map(|b| start_llama_server(b, &model, &args, threads));
    let mut targets = vec![Target::Ours(ours.port)];
    if let Some(s) = &theirs {
        targets.push(Target::Llama(s.port));
    }

    let scenarios = scenarios(&args);
    let mut results: Vec<Vec<Figures>> = Vec::new();
    let started = Instant::now();
    for (si, sc) in scenarios.iter().enumerate() {
        let clients = match sc.mode {
            Mode::Closed { clients } => clients,
            Mode::Open { .. } => 1,
        };
        // Rotating: one warm-up request per system prompt, so the figures show
        // whether the cache holds all six.
        let warmup = args.warmup.unwrap_or(match sc.workload {
            Workload::Rotating => clients.max(6),
            _ => clients,
        });
        let mut figures: Vec<Figures> = targets.iter().map(|_| Figures::new()).collect();
        for round in 0..args.rounds {
            let mut jobs = plan(&args, sc, si, round, warmup + args.requests);
            let measured = Arc::new(jobs.split_off(warmup));
            let warm = Arc::new(jobs);
            let seed = args.seed ^ round as u64;
            for (ti, &target) in targets.iter().enumerate() {
                // The warm-up ends before the measured requests start.
                let label = format!("{} / {} warm-up", sc.name, target.name());
                run_jobs(sc, target, warm.clone(), seed, &label);
                let label = format!("{} / {}", sc.name, target.name());
                let samples = run_jobs(sc, target, measured.clone(), seed, &label);
                figures[ti].add(&samples);
            }
        }
        results.push(figures);
    }
    let elapsed = started.elapsed();

    print_tables(&scenarios, &targets, &results);
    let json_scenarios: Vec<Value> = scenarios
        .iter()
        .zip(&results)
        .map(|(sc, figs)| {
            let mut servers = serde_json::Map::new();
            for (t, f) in targets.iter().zip(figs) {
                servers.insert(t.name().into(), f.json());
            }
            let mut v = json!({"name": sc.name, "mode": format!("{:?}", sc.mode),
                "workload": format!("{:?}", sc.workload), "servers": servers});
            if figs.len() == 2 {
                v["ratios"] = ratios_json(&figs[0], &figs[1]);
            }
            v
        })
        .collect();
    let report = json!({
        "args": format!("{args:?}"), "threads": threads, "ctx_size": args.ctx_size,
        "parallel": args.parallel, "model": model.file_name().map(|f| f.to_string_lossy()),
        "elapsed_s": elapsed.as_secs_f64(), "scenarios": json_scenarios,
    });
    write_report(&format!("load-{}.json", args.tag), &report);
    let svg = manifest_dir().join(format!("target/bench/load-{}.svg", args.tag));
    plot(&svg, &scenarios, &results);
    eprintln!(
        "wrote target/bench/load-{tag}.json and target/bench/load-{tag}.svg ({:.0} s)",
        elapsed.as_secs_f64(),
        tag = args.tag
    );

    let errors: usize = results.iter().flatten().map(|f| f.errors).sum();
    if errors > 0 {
        for (sc, figs) in scenarios.iter().zip(&results) {
            for (t, f) in targets.iter().zip(figs) {
                if let Some(e) = &f.first_error {
                    eprintln!(
                        "{} / {}: {} errors, first: {e}",
                        sc.name,
                        t.name(),
                        f.errors
                    );
                }
            }
        }
        std::process::exit(1);
    }
}

/// (name, inference-core / llama-server, lower is better)
fn ratios(a: &Figures, b: &Figures) -> Vec<(&'static str, f64)> {
    vec![
        ("TTFT p50", ms(&a.ttft, 0.5) / ms(&b.ttft, 0.5)),
        ("TTFT p90", ms(&a.ttft, 0.9) / ms(&b.ttft, 0.9)),
        ("TTFT p99", ms(&a.ttft, 0.99) / ms(&b.ttft, 0.99)),
        ("ITL p50", ms(&a.itl, 0.5) / ms(&b.itl, 0.5)),
        ("ITL p90", ms(&a.itl, 0.9) / ms(&b.itl, 0.9)),
        ("ITL p99", ms(&a.itl, 0.99) / ms(&b.itl, 0.99)),
        ("E2E p50", ms(&a.e2e, 0.5) / ms(&b.e2e, 0.5)),
        ("E2E p99", ms(&a.e2e, 0.99) / ms(&b.e2e, 0.99)),
        ("tok/s", a.tps() / b.tps()),
        ("req/s", a.rps() / b.rps()),
    ]
}

fn ratios_json(a: &Figures, b: &Figures) -> Value {
    Value::Object(
        ratios(a, b)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), json!(v)))
            .collect(),
    )
}

fn print_tables(scenarios: &[Scenario], targets: &[Target], results: &[Vec<Figures>]) {
    println!(
        "\n| scenario | server | req | err | TTFT p50 | p90 | p99 | max | ITL p50 | p90 | p99 | max | E2E p50 | p99 | tok/s | req/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (sc, figs) in scenarios.iter().zip(results) {
        for (t, f) in targets.iter().zip(figs) {
            let (tt, it) = (&f.ttft, &f.itl);
            println!(
                "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.2} |",
                sc.name,
                t.name(),
                f.requests,
                f.errors,
                ms(tt, 0.5),
                ms(tt, 0.9),
                ms(tt, 0.99),
                tt.max() as f64 / 1e3,
                ms(it, 0.5),
                ms(it, 0.9),
                ms(it, 0.99),
                it.max() as f64 / 1e3,
                ms(&f.e2e, 0.5),
                ms(&f.e2e, 0.99),
                f.tps(),
                f.rps()
            );
        }
    }
    println!(
        "\nLatencies in ms, from the client: TTFT from sending the request to the first token event."
    );
    if targets.len() < 2 {
        return;
    }
    let names: Vec<&str> = ratios(&results[0][0], &results[0][1])
        .iter()
        .map(|r| r.0)
        .collect();
    println!(
        "\nRatios inference-core / llama-server (latency: below 1 is better; tok/s, req/s: above 1 is better)\n"
    );
    println!("| scenario | {} |", names.join(" | "));
    println!("|---|{}", "---|".repeat(names.len()));
    for (sc, figs) in scenarios.iter().zip(results) {
        let cells: Vec<String> = ratios(&figs[0], &figs[1])
            .iter()
            .map(|r| format!("{:.2}", r.1))
            .collect();
        println!("| {} | {} |", sc.name, cells.join(" | "));
    }
}

/// TTFT and ITL percentile curves, one line per scenario and server, as SVG
/// (no system fonts needed).
fn plot(path: &Path, scenarios: &[Scenario], results: &[Vec<Figures>]) {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let panels = root.split_evenly((1, 2));
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    for (panel, (title, pick)) in panels.iter().zip([
        ("TTFT (ms) by percentile", 0usize),
        ("inter-token latency (ms) by percentile", 1),
    ]) {
        let hist = |f: &Figures| {
            if pick == 0 {
                f.ttft.clone()
            } else {
                f.itl.clone()
            }
        };
        let top = results
            .iter()
            .flatten()
            .map(|f| ms(&hist(f), 0.999))
            .fold(1.0f64, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..100f64, 0f64..top)
            .unwrap();
        chart.configure_mesh().x_desc("percentile").draw().unwrap();
        for (si, (sc, figs)) in scenarios.iter().zip(results).enumerate() {
            for (ti, f) in figs.iter().enumerate() {
                let color = palette[si % palette.len()];
                let style = if ti == 0 {
                    color.stroke_width(2)
                } else {
                    color.mix(0.6).stroke_width(1)
                };
                let h = hist(f);
                if h.is_empty() {
                    continue;
                }
                let points: Vec<(f64, f64)> = CURVE
                    .iter()
                    .filter(|&&p| p <= 99.9)
                    .map(|&p| (p, ms(&h, p / 100.0)))
                    .collect();
                let short = if ti == 0 { "ours" } else { "llama-server" };
                chart
                    .draw_series(LineSeries::new(points, style))
                    .unwrap()
                    .label(format!("{} ({short})", sc.name))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style));
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()
            .unwrap();
    }
    root.present().unwrap();
}

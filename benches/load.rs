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
//! `--api openai` drives both servers through the OpenAI-compatible `POST
//! /v1/completions` instead (streamed: chunked server-sent events, one
//! kept-alive connection per client), with the same prompts; its outputs are
//! `target/bench/load-openai-<tag>.{json,svg}`.
//!
//!     cargo bench --bench load                      # the default suite
//!     cargo bench --bench load -- --api openai      # the same, through /v1/completions
//!     cargo bench --bench load -- --smoke           # CI: a few requests, ours only
//!     cargo bench --bench load -- --help

mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

use common::{LlamaServer, bench_dir, manifest_dir, model_path, start_server, write_report};

#[derive(Parser, Debug, Clone)]
#[command(about = "Load generator: inference-core vs llama-server")]
struct Args {
    /// How both servers are driven: `ws` (ours over WebSocket, llama-server
    /// through `POST /completion`) or `openai` (both through `POST
    /// /v1/completions`, streamed, one kept-alive connection per client).
    #[arg(long, value_enum, default_value_t = Api::Ws)]
    api: Api,
    /// Closed-loop scenarios: this many concurrent clients each (mixed workload; 0: none).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 8])]
    concurrency: Vec<usize>,
    /// Open-loop scenarios: Poisson arrivals at these rates, requests/s (mixed workload; 0: none).
    #[arg(long, value_delimiter = ',', default_values_t = [1.0])]
    rate: Vec<f64>,
    /// Clients of the shared-system-prompt scenario (0: skip it).
    #[arg(long, default_value_t = 4)]
    shared: usize,
    /// Clients of the rotating-system-prompts scenario (0: skip it).
    #[arg(long, default_value_t = 4)]
    rotating: usize,
    /// The single-stream short-prompt scenario: ~12-token prompts, 16 tokens
    /// out, one client (TTFT of a short request on an idle server).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    short: bool,
    /// The single-stream copy-heavy scenario: a ~80-token passage to copy,
    /// one client (where speculative decoding pays).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    copy: bool,
    /// Short interactive clients beside one client sending ~1300-token
    /// prompts (0: skip it); each class is reported on its own.
    #[arg(long, default_value_t = 3)]
    beside_long: usize,
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
    /// Ours as a pure front (`--no-local --upstream`) over a second
    /// llama-server started alike: the ratios are then the front's cost (the
    /// pool's upstream worker: its I/O thread, HTTP and SSE relay).
    #[arg(long)]
    front: bool,
    /// llama-server binary (default: target/llama-tools/bin/llama-server, built by benches/llama-tools.sh).
    #[arg(long)]
    llama_server: Option<PathBuf>,
    /// An argument more for llama-server, repeatable: `--llama-server-arg=--spec-type
    /// --llama-server-arg=ngram-simple` compares single streams with its own n-gram
    /// speculation, whose tokens also come in bursts.
    #[arg(long, allow_hyphen_values = true)]
    llama_server_arg: Vec<String>,
    /// Names the outputs: target/bench/load-<tag>.{json,svg} (`--api ws`),
    /// target/bench/load-openai-<tag>.{json,svg} (`--api openai`).
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
        self.beside_long = 1;
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
    /// A ~12-token prompt, 16 tokens out.
    Short,
    /// A few-shot "copy this passage" prompt, the passage's length out.
    Copy,
    /// Short prompts (`Short`) for all clients but the last, which sends
    /// ~1300-token prompts, 64 tokens out.
    BesideLong,
}

/// Which clients a job is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Any,
    Short,
    Long,
}

impl Class {
    const ALL: [Class; 3] = [Class::Any, Class::Short, Class::Long];
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
    class: Class,
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
            let short = |rng: &mut Rng| Job {
                prompt: format!("Request {round}-{k}: {}", words(rng, 8)),
                n_predict: 16,
                class: Class::Short,
            };
            match sc.workload {
                Workload::Short => return short(&mut rng),
                // One job in four is the long client's: it takes fewer,
                // each lasting longer, and stops when the short ones are done.
                Workload::BesideLong if k % 4 != 3 => return short(&mut rng),
                Workload::BesideLong => {
                    return Job {
                        prompt: format!("Document {round}-{k}: {}", words(&mut rng, 1000)),
                        n_predict: 64,
                        class: Class::Long,
                    };
                }
                Workload::Copy => {
                    let passage = words(&mut rng, 60);
                    return Job {
                        prompt: format!(
                            "Text: The cat sat on the mat.\nCopy: The cat sat on the mat.\n\nText: {passage}\nCopy:"
                        ),
                        n_predict: 80,
                        class: Class::Any,
                    };
                }
                _ => {}
            }
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
                Workload::Short | Workload::Copy | Workload::BesideLong => unreachable!(),
            };
            Job {
                prompt,
                n_predict,
                class: Class::Any,
            }
        })
        .collect()
}

// ---------------------------------------------------------------- clients

/// Which API the bench drives.
#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
enum Api {
    /// Ours over its WebSocket protocol, llama-server through `POST /completion`.
    Ws,
    /// Both through the OpenAI-compatible `POST /v1/completions`, streamed.
    Openai,
}

/// One server and how the bench talks to it.
#[derive(Debug, Clone)]
struct Target {
    ours: bool,
    port: u16,
    route: Route,
}

#[derive(Debug, Clone)]
enum Route {
    /// Our WebSocket protocol.
    WebSocket,
    /// llama-server's `POST /completion`.
    Completion,
    /// `POST /v1/completions` with this model name.
    OpenAi { model: String },
}

impl Target {
    fn name(&self) -> &'static str {
        if self.ours {
            "inference-core"
        } else {
            "llama-server"
        }
    }

    /// What the bench talks to, for the report.
    fn endpoint(&self) -> String {
        match &self.route {
            Route::WebSocket => "WebSocket /".into(),
            Route::Completion => "POST /completion".into(),
            Route::OpenAi { model } => format!("POST /v1/completions (model {model:?})"),
        }
    }
}

/// What the client saw of one request.
struct Sample {
    class: Class,
    start: Instant,
    /// Arrival of every token event.
    arrivals: Vec<Instant>,
    end: Instant,
    tokens: usize,
    error: Option<String>,
}

/// One client: a WebSocket kept open across requests (ours, `--api ws`), or
/// an HTTP client: one connection per request for llama-server's
/// `/completion` (`--api ws`, as before), one kept-alive connection reused
/// across requests for `/v1/completions` (`--api openai`).
enum Client {
    Ws(Box<WebSocket<TcpStream>>),
    Completion(Http),
    OpenAi(Http, String),
}

impl Client {
    fn new(target: &Target) -> Result<Client, String> {
        let port = target.port;
        match &target.route {
            Route::WebSocket => {
                let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
                stream.set_nodelay(true).ok();
                let (mut ws, _) = tungstenite::client(format!("ws://127.0.0.1:{port}/"), stream)
                    .map_err(|e| e.to_string())?;
                ws.read().map_err(|e| e.to_string())?; // hello
                Ok(Client::Ws(Box::new(ws)))
            }
            Route::Completion => Ok(Client::Completion(Http::new(port, false))),
            Route::OpenAi { model } => Ok(Client::OpenAi(Http::new(port, true), model.clone())),
        }
    }

    /// Runs one request; `start` is when it was due (open loop: its scheduled
    /// arrival, so a late client thread counts against the latency).
    fn run(&mut self, id: usize, job: &Job, start: Instant) -> Sample {
        let mut arrivals = Vec::with_capacity(job.n_predict);
        let result = match self {
            Client::Ws(ws) => ours(ws, id, job, &mut arrivals),
            Client::Completion(http) => llama(http, job, &mut arrivals),
            Client::OpenAi(http, model) => openai(http, model, job, &mut arrivals),
        };
        let (tokens, end, error) = match result {
            Ok((t, end)) => (t, end, None),
            Err(e) => (0, Instant::now(), Some(e)),
        };
        Sample {
            class: job.class,
            start,
            arrivals,
            end,
            tokens,
            error,
        }
    }
}

/// Returns the completion tokens and when the last event arrived.
fn ours(
    ws: &mut WebSocket<TcpStream>,
    id: usize,
    job: &Job,
    arrivals: &mut Vec<Instant>,
) -> Result<(usize, Instant), String> {
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
                    .map(|n| (n as usize, now))
                    .ok_or_else(|| format!("end without stats: {ev}"));
            }
            _ => return Err(ev.to_string()),
        }
    }
}

/// llama-server's `POST /completion` with `stream: true`; every event before
/// the final one (`"stop": true`) is one token. Returns the completion tokens
/// and when the final event arrived.
fn llama(
    http: &mut Http,
    job: &Job,
    arrivals: &mut Vec<Instant>,
) -> Result<(usize, Instant), String> {
    let body = json!({"prompt": job.prompt, "n_predict": job.n_predict, "stream": true,
        "ignore_eos": true, "temperature": 0, "cache_prompt": true})
    .to_string();
    http.stream("/completion", &body, |data, now| {
        let ev: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
        if ev.get("error").is_some() {
            return Err(ev.to_string());
        }
        if ev["stop"] == true {
            return Ok(Some(
                ev["timings"]["predicted_n"]
                    .as_u64()
                    .map_or(arrivals.len(), |n| n as usize),
            ));
        }
        arrivals.push(now);
        Ok(None)
    })
}

/// `POST /v1/completions` with `stream: true` (either server): every event
/// whose `choices[0].text` is not empty is a token; `data: [DONE]` ends the
/// stream. The completion tokens are `usage.completion_tokens` when a chunk
/// carries it (`stream_options.include_usage`), else the token events.
fn openai(
    http: &mut Http,
    model: &str,
    job: &Job,
    arrivals: &mut Vec<Instant>,
) -> Result<(usize, Instant), String> {
    let body = json!({"model": model, "prompt": job.prompt, "max_tokens": job.n_predict,
        "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
        "ignore_eos": true})
    .to_string();
    let mut usage = None;
    http.stream("/v1/completions", &body, |data, now| {
        if data.trim() == "[DONE]" {
            return Ok(Some(usage.unwrap_or(arrivals.len())));
        }
        let ev: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
        if ev.get("error").is_some() {
            return Err(ev.to_string());
        }
        if ev["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            arrivals.push(now);
        }
        if let Some(n) = ev["usage"]["completion_tokens"].as_u64() {
            usage = Some(n as usize);
        }
        Ok(None)
    })
}

// ---------------------------------------------------------------- HTTP/1.1 and SSE

/// A blocking HTTP/1.1 client for one server: with `keep_alive`, one
/// connection reused from request to request (a new one when the server has
/// closed it); without, `Connection: close` and a new connection each time.
struct Http {
    port: u16,
    keep_alive: bool,
    conn: Option<BufReader<TcpStream>>,
}

impl Http {
    fn new(port: u16, keep_alive: bool) -> Http {
        Http {
            port,
            keep_alive,
            conn: None,
        }
    }

    /// Sends a request and reads the response head. A kept connection that
    /// fails before the first byte of the response (the server closed it
    /// while idle) is replaced by a new one, once.
    fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<(BufReader<TcpStream>, Head), String> {
        let port = self.port;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\nConnection: {}\r\n",
            if self.keep_alive {
                "keep-alive"
            } else {
                "close"
            }
        );
        if method == "POST" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        if let Some(mut r) = self.conn.take() {
            let answered = r.get_mut().write_all(req.as_bytes()).is_ok()
                && matches!(r.fill_buf(), Ok(b) if !b.is_empty());
            if answered {
                let head = read_head(&mut r)?;
                return Ok((r, head));
            }
        }
        let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        stream.set_nodelay(true).ok();
        let mut r = BufReader::new(stream);
        r.get_mut()
            .write_all(req.as_bytes())
            .map_err(|e| e.to_string())?;
        let head = read_head(&mut r)?;
        Ok((r, head))
    }

    /// Whether the connection can carry the next request.
    fn reusable(&self, head: &Head) -> bool {
        self.keep_alive && head.keep_alive
    }

    /// `POST path` whose answer is a stream of server-sent events, handed to
    /// `on_event` (see `read_sse`) until it returns a result. Returns it and
    /// when its event arrived. With keep-alive the rest of the body is then
    /// read, so the connection can carry the next request.
    fn stream<T>(
        &mut self,
        path: &str,
        body: &str,
        on_event: impl FnMut(&str, Instant) -> Result<Option<T>, String>,
    ) -> Result<(T, Instant), String> {
        let (mut r, head) = self.exchange("POST", path, body)?;
        let reusable = self.reusable(&head);
        let mut body = Body::new(&mut r, head.framing);
        if head.status != 200 {
            return Err(format!("HTTP {}: {}", head.status, text(&mut body).trim()));
        }
        let done = read_sse(&mut body, on_event)?;
        if reusable {
            // Nothing should follow the final event but the end of the body:
            // do not wait forever for a server that never ends it.
            body.r
                .get_ref()
                .set_read_timeout(Some(Duration::from_secs(10)))
                .ok();
            io::copy(&mut body, &mut io::sink())
                .map_err(|e| format!("reading the body after the final event: {e}"))?;
            body.r.get_ref().set_read_timeout(None).ok();
            if r.buffer().is_empty() {
                self.conn = Some(r);
            }
        }
        Ok(done)
    }

    /// `GET path`, a JSON answer.
    fn get_json(&mut self, path: &str) -> Result<Value, String> {
        let (mut r, head) = self.exchange("GET", path, "")?;
        let reusable = self.reusable(&head);
        let mut body = Body::new(&mut r, head.framing);
        let text = text(&mut body);
        if head.status != 200 {
            return Err(format!("HTTP {}: {}", head.status, text.trim()));
        }
        if reusable && body.done && r.buffer().is_empty() {
            self.conn = Some(r);
        }
        serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
    }
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// `Content-Length`.
    Length(u64),
    /// Up to the end of the connection.
    Close,
}

struct Head {
    status: u16,
    framing: Framing,
    /// Whether the server keeps the connection open after this response.
    keep_alive: bool,
}

/// Reads the status line and headers.
fn read_head(r: &mut impl BufRead) -> Result<Head, String> {
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
    let header = |name: &str| {
        resp.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
            .collect::<Vec<_>>()
            .join(",")
    };
    let status = resp.code.unwrap_or(0);
    let length = header("content-length");
    let framing = if header("transfer-encoding").contains("chunked") {
        Framing::Chunked
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Length(0)
    } else if !length.is_empty() {
        let first = length.split(',').next().unwrap_or("").trim();
        Framing::Length(
            first
                .parse()
                .map_err(|e| format!("bad Content-Length {length:?}: {e}"))?,
        )
    } else {
        Framing::Close
    };
    let connection = header("connection");
    let keep_alive = framing != Framing::Close
        && if resp.version == Some(0) {
            connection.contains("keep-alive")
        } else {
            !connection.contains("close")
        };
    Ok(Head {
        status,
        framing,
        keep_alive,
    })
}

/// A response body as bytes, whatever its framing: chunked transfer encoding
/// decoded (hexadecimal sizes, extensions and trailers skipped, a chunk
/// possibly split across reads or several in one), `Content-Length` bytes,
/// or everything up to the close. Never reads past the body, so the
/// connection can carry the next response.
struct Body<R> {
    r: R,
    framing: Framing,
    /// Bytes left in the current chunk or of the `Content-Length`.
    left: u64,
    /// Chunked: a chunk was read, whose CRLF comes before the next size line
    /// (read then rather than right after the data, not to wait for it).
    after_chunk: bool,
    done: bool,
}

impl<R: BufRead> Body<R> {
    fn new(r: R, framing: Framing) -> Body<R> {
        let left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Body {
            r,
            framing,
            left,
            after_chunk: false,
            done: false,
        }
    }

    fn line(&mut self, line: &mut String) -> io::Result<()> {
        line.clear();
        if self.r.read_line(line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in a chunked body",
            ));
        }
        Ok(())
    }

    /// Reads up to the next chunk's data: false at the last chunk (its
    /// trailers read too).
    fn next_chunk(&mut self) -> io::Result<bool> {
        let mut line = String::new();
        if self.after_chunk {
            self.line(&mut line)?;
            if !line.trim().is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("chunk data not followed by CRLF: {line:?}"),
                ));
            }
        }
        self.line(&mut line)?;
        let hex = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(hex, 16).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad chunk size {line:?}: {e}"),
            )
        })?;
        if size == 0 {
            loop {
                self.line(&mut line)?;
                if line.trim().is_empty() {
                    return Ok(false);
                }
            }
        }
        self.left = size;
        self.after_chunk = true;
        Ok(true)
    }
}

impl<R: BufRead> Read for Body<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.framing == Framing::Close {
            let n = self.r.read(buf)?;
            self.done = n == 0;
            return Ok(n);
        }
        if self.left == 0 {
            // Length: the end; chunked: the end of a chunk, maybe the last.
            let more = self.framing == Framing::Chunked && self.next_chunk()?;
            if !more {
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the middle of a response body",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A (short) body as text, for error messages and small JSON answers.
fn text(body: &mut impl Read) -> String {
    let mut bytes = Vec::new();
    if let Err(e) = body.take(1 << 20).read_to_end(&mut bytes) {
        return format!("{} (then: {e})", String::from_utf8_lossy(&bytes));
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Reads server-sent events from a body, handing each event's data (its
/// `data:` lines joined by newlines) to `on_event` with when it arrived (the
/// read that completed it), until `on_event` returns a result: returns it and
/// that instant. Lines end in LF or CRLF; an event ends at a blank line and
/// may span reads and chunks; `: comment`, `event:`, `id:` and `retry:` lines
/// are skipped; an `error: ...` line (llama-server) is an error.
fn read_sse<T>(
    body: &mut impl Read,
    mut on_event: impl FnMut(&str, Instant) -> Result<Option<T>, String>,
) -> Result<(T, Instant), String> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut data = String::new();
    let mut has_data = false;
    loop {
        let n = body.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("stream ended without a final event".into());
        }
        let now = Instant::now();
        pending.extend_from_slice(&buf[..n]);
        let mut start = 0;
        while let Some(len) = pending[start..].iter().position(|&b| b == b'\n') {
            let raw = &pending[start..start + len];
            start += len + 1;
            let line = String::from_utf8_lossy(raw.strip_suffix(b"\r").unwrap_or(raw));
            if line.is_empty() {
                if has_data && let Some(t) = on_event(&data, now)? {
                    return Ok((t, now));
                }
                data.clear();
                has_data = false;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (&*line, ""),
            };
            match field {
                "data" => {
                    if has_data {
                        data.push('\n');
                    }
                    data.push_str(value);
                    has_data = true;
                }
                "error" => return Err(value.to_owned()),
                _ => {}
            }
        }
        pending.drain(..start);
    }
}

// ---------------------------------------------------------------- servers

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
        .args(["-np", &args.parallel.to_string()])
        .args(&args.llama_server_arg);
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
    matches!(read_head(&mut r), Ok(h) if h.status == 200)
}

// ---------------------------------------------------------------- running

/// Runs one scenario's jobs against one server; samples in job order (of
/// the jobs that ran).
fn run_jobs(
    sc: &Scenario,
    target: &Target,
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
            // Each client takes the next job of its class; the long client
            // (`BesideLong`) stops once the short jobs are all taken.
            // The jobs of each class, in order, and how many of each are taken.
            let queues: Arc<[Vec<usize>; 3]> = Arc::new(Class::ALL.map(|class| {
                (0..jobs.len())
                    .filter(|&i| jobs[i].class == class)
                    .collect()
            }));
            let taken = Arc::new(Class::ALL.map(|_| AtomicUsize::new(0)));
            let handles: Vec<_> = (0..clients)
                .map(|c| {
                    let class = match sc.workload {
                        Workload::BesideLong if c + 1 == clients => Class::Long,
                        Workload::BesideLong | Workload::Short => Class::Short,
                        _ => Class::Any,
                    } as usize;
                    let (jobs, queues, taken, samples, bar, target) = (
                        jobs.clone(),
                        queues.clone(),
                        taken.clone(),
                        samples.clone(),
                        bar.clone(),
                        target.clone(),
                    );
                    std::thread::spawn(move || {
                        let mut client = Client::new(&target);
                        let short = Class::Short as usize;
                        loop {
                            let n = taken[class].fetch_add(1, Ordering::Relaxed);
                            let shorts_done = class == Class::Long as usize
                                && taken[short].load(Ordering::Relaxed) >= queues[short].len();
                            if n >= queues[class].len() || shorts_done {
                                break;
                            }
                            let i = queues[class][n];
                            let start = Instant::now();
                            let s = match &mut client {
                                Ok(c) => c.run(i, &jobs[i], start),
                                Err(e) => failed(jobs[i].class, start, e),
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
                let (jobs, samples, bar, target) =
                    (jobs.clone(), samples.clone(), bar.clone(), target.clone());
                handles.push(std::thread::spawn(move || {
                    let s = match Client::new(&target) {
                        Ok(mut c) => c.run(i, &jobs[i], due),
                        Err(e) => failed(jobs[i].class, due, &e),
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
    // Jobs the long client never reached are left out.
    samples.into_iter().flatten().collect()
}

fn failed(class: Class, start: Instant, e: &str) -> Sample {
    Sample {
        class,
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
    fn add(&mut self, samples: &[&Sample]) {
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
    for &c in args.concurrency.iter().filter(|&&c| c > 0) {
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
    if args.short {
        v.push(Scenario {
            name: "closed c=1, short prompt".into(),
            mode: Mode::Closed { clients: 1 },
            workload: Workload::Short,
        });
    }
    if args.copy {
        v.push(Scenario {
            name: "closed c=1, copy-heavy".into(),
            mode: Mode::Closed { clients: 1 },
            workload: Workload::Copy,
        });
    }
    if args.beside_long > 0 {
        v.push(Scenario {
            name: format!(
                "closed c={}, {} short beside 1 long",
                args.beside_long + 1,
                args.beside_long
            ),
            mode: Mode::Closed {
                clients: args.beside_long + 1,
            },
            workload: Workload::BesideLong,
        });
    }
    for &r in args.rate.iter().filter(|&&r| r > 0.0) {
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
    bench_dir(); // llama-server's log and the report go there
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
    let theirs = llama_bin
        .as_ref()
        .map(|b| start_llama_server(b, &model, &args, threads));
    // With --front, a llama-server of its own behind our front (sharing one
    // would hand the second target the first one's cached prompts).
    let upstream = match (&llama_bin, args.front) {
        (Some(b), true) => Some(start_llama_server(b, &model, &args, threads)),
        (None, true) => panic!("--front needs llama-server (benches/llama-tools.sh llama-server)"),
        (_, false) => None,
    };
    let ours = match &upstream {
        Some(up) => {
            let url = format!("http://127.0.0.1:{}", up.port);
            start_server(&["--no-local", "--upstream", &url, "--parallel", &np])
        }
        None => start_server(&["-t", &t, "-c", &c, "--parallel", &np]),
    };
    let mut targets = vec![Target {
        ours: true,
        port: ours.port,
        route: Route::WebSocket,
    }];
    if let Some(s) = &theirs {
        targets.push(Target {
            ours: false,
            port: s.port,
            route: Route::Completion,
        });
    }
    if args.api == Api::Openai {
        // Each server's own model name: ours answers 404 to any other.
        for t in &mut targets {
            let model = Http::new(t.port, false)
                .get_json("/v1/models")
                .and_then(|v| {
                    v["data"][0]["id"]
                        .as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| format!("no data[0].id in {v}"))
                })
                .unwrap_or_else(|e| panic!("GET /v1/models on {}: {e}", t.name()));
            eprintln!("{}: model {model:?}", t.name());
            t.route = Route::OpenAi { model };
        }
    }
    // The outputs' names: the WebSocket mode's as they always were.
    let stem = match args.api {
        Api::Ws => format!("load-{}", args.tag),
        Api::Openai => format!("load-openai-{}", args.tag),
    };

    // A row of the report per scenario, and per class of client where a
    // scenario mixes them.
    let mut rows: Vec<Scenario> = Vec::new();
    let mut results: Vec<Vec<Figures>> = Vec::new();
    let started = Instant::now();
    for (si, sc) in scenarios(&args).iter().enumerate() {
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
        let classes: &[(Class, &str)] = match sc.workload {
            Workload::BesideLong => &[
                (Class::Short, "the short ones"),
                (Class::Long, "the long one"),
            ],
            _ => &[(Class::Any, "")],
        };
        let mut figures: Vec<Vec<Figures>> = classes
            .iter()
            .map(|_| targets.iter().map(|_| Figures::new()).collect())
            .collect();
        for round in 0..args.rounds {
            let mut jobs = plan(&args, sc, si, round, warmup + args.requests);
            let measured = Arc::new(jobs.split_off(warmup));
            let warm = Arc::new(jobs);
            let seed = args.seed ^ round as u64;
            for (ti, target) in targets.iter().enumerate() {
                // The warm-up ends before the measured requests start.
                let label = format!("{} / {} warm-up", sc.name, target.name());
                run_jobs(sc, target, warm.clone(), seed, &label);
                let label = format!("{} / {}", sc.name, target.name());
                let samples = run_jobs(sc, target, measured.clone(), seed, &label);
                for (ci, &(class, _)) in classes.iter().enumerate() {
                    let of: Vec<&Sample> = samples
                        .iter()
                        .filter(|s| s.class == class || class == Class::Any)
                        .collect();
                    figures[ci][ti].add(&of);
                }
            }
        }
        for (&(_, label), figs) in classes.iter().zip(figures) {
            let name = match label {
                "" => sc.name.clone(),
                _ => format!("{}: {label}", sc.name),
            };
            rows.push(Scenario { name, ..sc.clone() });
            results.push(figs);
        }
    }
    let scenarios = rows;
    let elapsed = started.elapsed();

    for t in &targets {
        println!("{}: {}", t.name(), t.endpoint());
    }
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
    let endpoints: serde_json::Map<String, Value> = targets
        .iter()
        .map(|t| (t.name().to_owned(), json!(t.endpoint())))
        .collect();
    let report = json!({
        "args": format!("{args:?}"), "api": format!("{:?}", args.api).to_lowercase(),
        "endpoints": endpoints, "threads": threads, "ctx_size": args.ctx_size,
        "parallel": args.parallel, "model": model.file_name().map(|f| f.to_string_lossy()),
        "elapsed_s": elapsed.as_secs_f64(), "scenarios": json_scenarios,
    });
    write_report(&format!("{stem}.json"), &report);
    let svg = manifest_dir().join(format!("target/bench/{stem}.svg"));
    plot(&svg, &scenarios, &results);
    eprintln!(
        "wrote target/bench/{stem}.json and target/bench/{stem}.svg ({:.0} s)",
        elapsed.as_secs_f64()
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

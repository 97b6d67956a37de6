//! Shared by the bench binaries: start the release server, talk to it over a
//! real WebSocket, time what the client sees.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn model_path() -> PathBuf {
    let out = Command::new(manifest_dir().join("scripts/fetch-model.sh"))
        .output()
        .expect("fetch-model.sh");
    assert!(out.status.success(), "fetch-model.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub fn threads() -> usize {
    std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(num_cpus::get_physical)
}

pub fn quick() -> bool {
    std::env::var_os("BENCH_QUICK").is_some()
}

/// A llama.cpp tool built by benches/llama-tools.sh, if present.
pub fn llama_tool(name: &str) -> Option<PathBuf> {
    let p = manifest_dir().join("target/llama-tools/bin").join(name);
    p.is_file().then_some(p)
}

/// llama-server (built by benches/llama-tools.sh), killed on drop.
pub struct LlamaServer {
    pub child: Child,
    pub port: u16,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Server {
    child: Child,
    pub port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Our server: this build's binary, or `BENCH_SERVER_BIN` (another build, to
/// compare two versions against the same reference in one sitting).
pub fn server_bin() -> std::ffi::OsString {
    std::env::var_os("BENCH_SERVER_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_inference-core").into())
}

pub fn start_server(args: &[&str]) -> Server {
    // A fresh state directory: no prefix saved by an earlier run warms this one.
    let state = std::env::temp_dir().join(format!("ic-bench-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let mut child = Command::new(server_bin())
        .env("INFERENCE_CORE_STATE", &state)
        .args(["--port", "0"])
        .args(args)
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
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server { child, port }
}

pub fn connect(port: u16) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (mut ws, _) = tungstenite::client(format!("ws://127.0.0.1:{port}/"), stream).unwrap();
    ws.read().unwrap(); // hello
    ws
}

/// What the client saw of one request.
pub struct Stream {
    pub sent: Instant,
    pub arrivals: Vec<Instant>,
    pub end: Value,
}

impl Stream {
    pub fn ttft(&self) -> Duration {
        self.arrivals[0] - self.sent
    }
    pub fn stat(&self, name: &str) -> f64 {
        self.end["stats"][name].as_f64().unwrap()
    }
}

pub fn send(ws: &mut WebSocket<TcpStream>, id: &str, prompt: &str, max_tokens: usize) -> Instant {
    let msg = json!({"op":"infer","id":id,"prompt":prompt,"params":{"temp":0,"max_tokens":max_tokens,"ignore_eos":true}});
    ws.send(Message::text(msg.to_string())).unwrap();
    Instant::now()
}

/// Reads events until request `id` ends.
pub fn collect(ws: &mut WebSocket<TcpStream>, id: &str, sent: Instant) -> Stream {
    let mut arrivals = Vec::new();
    loop {
        let Message::Text(t) = ws.read().unwrap() else {
            continue;
        };
        let ev: Value = serde_json::from_str(t.as_str()).unwrap();
        if ev["id"] != id {
            continue;
        }
        match ev["op"].as_str().unwrap() {
            "token" => arrivals.push(Instant::now()),
            "queued" => {}
            "end" => {
                return Stream {
                    sent,
                    arrivals,
                    end: ev,
                };
            }
            _ => panic!("unexpected {ev}"),
        }
    }
}

pub fn request(ws: &mut WebSocket<TcpStream>, prompt: &str, max_tokens: usize) -> Stream {
    let sent = send(ws, "b", prompt, max_tokens);
    collect(ws, "b", sent)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `target/bench`, where the benches write what they make; created if missing
/// (a fresh checkout has none).
pub fn bench_dir() -> PathBuf {
    let dir = manifest_dir().join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a server config `target/bench/<name>.toml`; its path.
pub fn config(name: &str, text: &str) -> String {
    let path = bench_dir().join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

pub fn write_report(name: &str, report: &Value) {
    std::fs::write(
        bench_dir().join(name),
        serde_json::to_string_pretty(report).unwrap(),
    )
    .unwrap();
}

//! Test helpers: start the real release binary on a free port with the real
//! model, and talk to it with a real WebSocket client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

pub const BIN: &str = env!("CARGO_BIN_EXE_inference-core");
const START_TIMEOUT: Duration = Duration::from_secs(60);
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts the server with the default model and `args`, waits until it listens.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with_env(args, &[])
    }

    /// Starts the server with a config file holding `toml` (written under
    /// target/tmp as `name.toml`), then `args`.
    pub fn start_with_config(name: &str, toml: &str, args: &[&str]) -> Server {
        let path = config_file(name, toml);
        let mut all = vec!["--config", path.to_str().unwrap()];
        all.extend_from_slice(args);
        Server::start(&all)
    }

    /// Like `start`, on a given port (0: a free one).
    pub fn start_on(port: u16, args: &[&str]) -> Server {
        Server::start_on_with_env(port, args, &[])
    }

    /// As `start`, with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_on_with_env(0, args, env)
    }

    fn start_on_with_env(port: u16, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(BIN)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(args)
            // Every server starts with its own, empty state directory (saved
            // prefixes); a test that restarts on the same one passes --state-dir.
            .env("INFERENCE_CORE_STATE", fresh_dir("state"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start inference-core");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ws://").nth(1) {
                    let port: u16 = rest.rsplit(':').next().unwrap().trim().parse().unwrap();
                    let _ = tx.send(port);
                }
                sink.lock().unwrap().push(line);
            }
        });
        let port = match rx.recv_timeout(START_TIMEOUT) {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not start; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Server { child, port, log }
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.port)
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits (up to 10 s) for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str) {
        let start = Instant::now();
        while !self.log_text().contains(needle) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no log line with {needle:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: &str) {
        signal(&self.child, sig);
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "server did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.proc_status_kib("VmRSS:")
    }

    /// The server's resident anonymous memory (RssAnon: its heap and
    /// stacks, not the model file's pages), in KiB.
    pub fn anon_kib(&self) -> u64 {
        self.proc_status_kib("RssAnon:")
    }

    fn proc_status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"))
    }

    /// The engine's `status` snapshot, asked on a fresh connection.
    pub fn status(&self) -> Value {
        let mut c = self.connect();
        c.send(json!({"op":"status"}));
        loop {
            let ev = c.recv();
            if ev["op"] == "status" {
                return ev;
            }
        }
    }

    /// A raw HTTP GET; returns (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out.split(' ').nth(1).unwrap().parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    }
}

/// `base` (a JSON object) with the fields of `extra` added: a message and its
/// input (`prompt` or `messages`).
/// Runs a client script of tests/clients/ against `server` with `args`; it
/// must exit 0 and print "all ok" (its "ok: ..." lines go to the test's log).
pub fn client_check(server: &Server, script: &str, args: &[&str]) {
    let path = format!("{}/tests/clients/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(path)
        .args(args)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all ok"),
        "{script} failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    eprint!("{stdout}");
}

pub fn with(mut base: Value, extra: &Value) -> Value {
    base.as_object_mut()
        .expect("an object")
        .extend(extra.as_object().expect("an object").clone());
    base
}

/// A new, empty directory under target/tmp.
pub fn fresh_dir(name: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `text` to target/tmp/`name`.toml and returns its path.
pub fn config_file(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Client {
    pub ws: WebSocket<TcpStream>,
    pub hello: Value,
}

/// The events of one request.
#[derive(Debug)]
pub struct Outcome {
    pub tokens: Vec<Value>,
    /// `queued` events (position updates) received before the request ran.
    pub queued: Vec<Value>,
    /// The final event: `end` or `error`.
    pub last: Value,
}

impl Outcome {
    pub fn text(&self) -> String {
        self.tokens
            .iter()
            .map(|t| t["content"].as_str().unwrap())
            .collect()
    }
    pub fn reason(&self) -> &str {
        self.last["reason"].as_str().unwrap_or("")
    }
    pub fn op(&self) -> &str {
        self.last["op"].as_str().unwrap()
    }
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
        let (ws, _) =
            tungstenite::client(format!("ws://127.0.0.1:{port}/"), stream).expect("handshake");
        let mut c = Client {
            ws,
            hello: Value::Null,
        };
        c.hello = c.recv();
        assert_eq!(c.hello["op"], "hello", "{}", c.hello);
        c
    }

    /// Reads past any remaining events to the server's close frame and checks its code.
    pub fn expect_close(&mut self, code: u16) {
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(f))) => {
                    assert_eq!(u16::from(f.code), code, "{f:?}");
                    return;
                }
                Ok(_) => {}
                Err(e) => panic!("expected a close frame, got {e}"),
            }
        }
    }

    pub fn send(&mut self, v: Value) {
        self.send_raw(&v.to_string());
    }

    pub fn send_raw(&mut self, text: &str) {
        self.ws.send(Message::text(text)).expect("send");
    }

    pub fn recv(&mut self) -> Value {
        loop {
            match self.ws.read().expect("read event") {
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str()).expect("event is JSON");
                }
                Message::Close(f) => panic!("connection closed: {f:?}"),
                _ => {}
            }
        }
    }

    /// Sends a greedy request and collects its events.
    pub fn infer(&mut self, id: &str, prompt: &str, params: Value) -> Outcome {
        self.send(json!({"op":"infer","id":id,"prompt":prompt,"params":params}));
        self.collect(id)
    }

    /// Reads events until `id`'s final event; other requests' events are dropped.
    pub fn collect(&mut self, id: &str) -> Outcome {
        let mut tokens = Vec::new();
        let mut queued = Vec::new();
        loop {
            let ev = self.recv();
            if ev["id"] != id {
                continue;
            }
            match ev["op"].as_str().unwrap() {
                "token" => tokens.push(ev),
                "queued" => queued.push(ev),
                "end" | "error" => {
                    return Outcome {
                        tokens,
                        queued,
                        last: ev,
                    };
                }
                other => panic!("unexpected event {other}: {ev}"),
            }
        }
    }
}

/// One HTTP/1.1 response as read off the wire.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// A raw HTTP/1.1 connection: send bytes, read responses one by one
/// (`Content-Length` or chunked bodies), so keep-alive and pipelining show.
pub struct HttpConn {
    reader: BufReader<TcpStream>,
}

impl HttpConn {
    pub fn connect(port: u16) -> HttpConn {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
        HttpConn {
            reader: BufReader::new(s),
        }
    }

    pub fn send(&mut self, raw: &[u8]) {
        self.reader.get_mut().write_all(raw).unwrap();
    }

    /// A request with a JSON body, kept alive.
    pub fn post(&mut self, path: &str, body: &Value) {
        let body = body.to_string();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.send(format!("{head}{body}").as_bytes());
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read a line");
        line.trim_end_matches(['\r', '\n']).to_owned()
    }

    /// Reads the head of the next response (status, headers).
    pub fn read_head(&mut self) -> HttpResponse {
        let status_line = self.line();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line();
            if line.is_empty() {
                break;
            }
            let (n, v) = line.split_once(':').expect("a header");
            headers.push((n.to_ascii_lowercase(), v.trim().to_owned()));
        }
        HttpResponse {
            status,
            headers,
            body: String::new(),
        }
    }

    /// Reads the next chunk of a chunked body; `None` at its end.
    pub fn read_chunk(&mut self) -> Option<String> {
        let size = usize::from_str_radix(self.line().split(';').next().unwrap(), 16).unwrap();
        if size == 0 {
            assert_eq!(self.line(), "", "trailers");
            return None;
        }
        let mut data = vec![0; size];
        self.reader.read_exact(&mut data).unwrap();
        assert_eq!(self.line(), "");
        Some(String::from_utf8(data).unwrap())
    }

    /// Reads the next whole response.
    pub fn read_response(&mut self) -> HttpResponse {
        let mut r = self.read_head();
        if r.status == 100 {
            return self.read_response();
        }
        if r.header("transfer-encoding") == Some("chunked") {
            while let Some(chunk) = self.read_chunk() {
                r.body.push_str(&chunk);
            }
        } else {
            let n: usize = r.header("content-length").map_or(0, |v| v.parse().unwrap());
            let mut data = vec![0; n];
            self.reader.read_exact(&mut data).unwrap();
            r.body = String::from_utf8(data).unwrap();
        }
        r
    }
}

/// The `data:` payloads of server-sent events.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// llama-server, built from llama.cpp's sources by `benches/llama-tools.sh
/// llama-server` (scripts/test builds it): the stand-in for an upstream
/// OpenAI-compatible engine (vLLM, TGI...). Killed on drop.
pub struct Upstream {
    pub child: Child,
    pub port: u16,
    args: Vec<String>,
}

impl Upstream {
    /// Starts one with `slots` parallel slots and one thread on the default
    /// model, on a free port; waits until `/health` says it is ready.
    pub fn start(slots: usize) -> Upstream {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let model = model_path();
        let args = [
            "-m",
            model.to_str().unwrap(),
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "-t",
            "1",
            "-c",
            "2048",
            "-np",
            &slots.to_string(),
        ]
        .map(String::from)
        .to_vec();
        let mut u = Upstream {
            child: spawn_llama_server(&args),
            port,
            args,
        };
        u.wait_ready();
        u
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sends a signal (KILL, STOP, CONT) to it.
    pub fn signal(&self, sig: &str) {
        signal(&self.child, sig);
    }

    /// After a SIGKILL: the same server again, on the same port.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_llama_server(&self.args);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("llama-server exited: {status}");
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ =
                    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut text = String::new();
                let _ = s.read_to_string(&mut text);
                if text.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            assert!(
                start.elapsed() < START_TIMEOUT,
                "llama-server did not get ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `sig` (TERM, KILL, STOP...) to a child process.
pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} failed");
}

fn spawn_llama_server(args: &[String]) -> Child {
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/llama-tools/bin/llama-server");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `benches/llama-tools.sh llama-server` (scripts/test does)",
        bin.display()
    );
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start llama-server")
}

/// The default model in the cache (as the server finds it).
pub fn model_path() -> std::path::PathBuf {
    inference_core::config::model_cache_dir().join(inference_core::config::DEFAULT_MODEL_FILE)
}

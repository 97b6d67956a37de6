//! The worker pool with real parts: llama-server processes (built from
//! llama.cpp's sources, the stand-in for vLLM or TGI) as upstream workers
//! beside the local engine, real signals (SIGKILL, SIGSTOP, SIGCONT) to
//! them, and two local engines of which one stalls.

mod util;

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use util::{Client, HttpConn, Server, Upstream, config_file, sse_data};

const PROMPT: &str = "The history of the city began";

fn workers(server: &Server) -> HashMap<String, Value> {
    let status = server.status();
    status["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("no workers in {status}"))
        .iter()
        .map(|w| (w["name"].as_str().unwrap().to_owned(), w.clone()))
        .collect()
}

/// Waits until worker `name` is in `state`.
fn wait_state(server: &Server, name: &str, state: &str, within: Duration) {
    let start = Instant::now();
    loop {
        let w = &workers(server)[name];
        if w["state"] == state {
            return;
        }
        assert!(
            start.elapsed() < within,
            "worker {name} not {state} within {within:?}: {w}\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `n` requests over `conns` connections (ids `{tag}-i`); returns the
/// clients, each with the ids it sent.
fn send_all(
    server: &Server,
    tag: &str,
    n: usize,
    conns: usize,
    params: Value,
) -> Vec<(Client, Vec<String>)> {
    let mut clients: Vec<(Client, Vec<String>)> =
        (0..conns).map(|_| (server.connect(), Vec::new())).collect();
    for i in 0..n {
        let (c, ids) = &mut clients[i % conns];
        let id = format!("{tag}-{i}");
        c.send(json!({"op": "infer", "id": id, "prompt": PROMPT, "params": params}));
        ids.push(id);
    }
    clients
}

/// Each request's final event and its token count (every connection read
/// at once, so none sits unread long enough to be pinged away).
fn collect_all(clients: Vec<(Client, Vec<String>)>) -> Vec<(String, Value, usize)> {
    let readers: Vec<_> = clients
        .into_iter()
        .map(|(mut c, ids)| {
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let mut tokens: HashMap<String, usize> = HashMap::new();
                let mut left = ids.len();
                while left > 0 {
                    let ev = c.recv();
                    let id = ev["id"].as_str().unwrap_or("").to_owned();
                    match ev["op"].as_str().unwrap() {
                        "token" => *tokens.entry(id).or_default() += 1,
                        "end" | "error" => {
                            left -= 1;
                            let n = tokens.get(&id).copied().unwrap_or(0);
                            out.push((id, ev, n));
                        }
                        _ => {}
                    }
                }
                out
            })
        })
        .collect();
    readers
        .into_iter()
        .flat_map(|r| r.join().expect("a reader panicked"))
        .collect()
}

fn upstream_worker(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[workers]]\nkind = \"openai\"\nname = \"{name}\"\nurl = \"{url}\"\nmax_inflight = 2\n{extra}\n"
    )
}

#[test]
fn requests_spread_over_the_pool_and_a_killed_upstream_hurts_only_its_streams() {
    let a = Upstream::start(2);
    let mut b = Upstream::start(2);
    let config = format!(
        "[scheduler]\nslots = 2\n{}{}",
        upstream_worker("a", &a.url(), ""),
        upstream_worker("b", &b.url(), "")
    );
    let server = Server::start_with_config("pool-kill", &config, &["-t", "1"]);
    let names = ["local", "a", "b"];

    // 16 concurrent requests: all complete, spread over the three workers.
    let params = json!({"max_tokens": 16, "temp": 0});
    let outcomes = collect_all(send_all(&server, "spread", 16, 4, params));
    for (id, last, n) in &outcomes {
        assert_eq!(last["op"], "end", "{id}: {last}");
        assert!(*n > 0, "{id}: no tokens");
    }
    let before = workers(&server);
    for name in names {
        let w = &before[name];
        assert_eq!(w["state"], "serving", "{w}");
        assert!(
            w["requests_total"].as_u64().unwrap() >= 2,
            "{name} got too few: {w}\n{}",
            server.log_text()
        );
    }
    let kind = |n: &str| before[n]["kind"].as_str().unwrap().to_owned();
    assert_eq!([kind("local"), kind("a")], ["llama", "openai"]);

    // Long requests; once b streams, kill it.
    let params = json!({"max_tokens": 120, "temp": 0, "ignore_eos": true});
    let clients = send_all(&server, "kill", 16, 4, params);
    let start = Instant::now();
    loop {
        let w = &workers(&server)["b"];
        let streamed =
            w["tokens_total"].as_u64().unwrap() > before["b"]["tokens_total"].as_u64().unwrap() + 4;
        if streamed && w["in_flight"].as_u64().unwrap() >= 3 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "b never got busy: {w}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    b.signal("KILL");
    let outcomes = collect_all(clients);
    let failed: Vec<&(String, Value, usize)> = outcomes
        .iter()
        .filter(|(_, last, _)| last["op"] == "error")
        .collect();
    // Only what b was streaming fails, with a clear error naming it; the
    // rest (b's queue among them) completes elsewhere.
    assert!(!failed.is_empty() && failed.len() <= 2, "{failed:?}");
    for (id, last, n) in &failed {
        assert_eq!(last["code"], "internal", "{id}: {last}");
        let msg = last["message"].as_str().unwrap();
        assert!(msg.contains("worker b failed"), "{id}: {msg}");
        assert!(
            *n > 0,
            "{id} failed before streaming: it should have failed over"
        );
    }
    for (id, last, n) in &outcomes {
        if last["op"] == "end" {
            assert_eq!(last["reason"], "length", "{id}: {last}");
            assert_eq!(*n, 120, "{id}");
        }
    }
    assert!(server.log_text().contains("failed before its first token"));

    // b is out; new requests go to the survivors and complete.
    wait_state(&server, "b", "down", Duration::from_secs(10));
    let b_sent = workers(&server)["b"]["requests_total"].as_u64().unwrap();
    let params = json!({"max_tokens": 8, "temp": 0});
    for (id, last, _) in collect_all(send_all(&server, "after", 6, 2, params.clone())) {
        assert_eq!(last["op"], "end", "{id}: {last}");
    }
    assert_eq!(workers(&server)["b"]["requests_total"], b_sent);

    // Restarted, b is probed back into rotation and gets work again.
    b.restart();
    wait_state(&server, "b", "serving", Duration::from_secs(30));
    for (id, last, _) in collect_all(send_all(&server, "back", 9, 3, params)) {
        assert_eq!(last["op"], "end", "{id}: {last}");
    }
    let after = workers(&server);
    assert!(
        after["b"]["requests_total"].as_u64().unwrap() > b_sent,
        "{:?}",
        after["b"]
    );
    assert!(after["b"]["failures"].as_u64().unwrap() >= 1);
    // The metrics carry a worker label.
    let (_, metrics) = server.http_get("/metrics");
    assert!(
        metrics.contains("inference_core_worker_up{worker=\"b\",kind=\"openai\"} 1"),
        "{metrics}"
    );
    drop(a);
}

#[test]
fn a_frozen_upstream_leaves_rotation_and_comes_back() {
    let a = Upstream::start(2);
    let config = format!(
        "[scheduler]\nslots = 2\n{}",
        upstream_worker("a", &a.url(), "probe_every_s = 0.5\nprobe_timeout_s = 1.0")
    );
    let server = Server::start_with_config("pool-freeze", &config, &["-t", "1"]);
    wait_state(&server, "a", "serving", Duration::from_secs(5));
    a.signal("STOP");
    let frozen = Instant::now();
    wait_state(&server, "a", "down", Duration::from_secs(10));
    let took = frozen.elapsed();
    let why = workers(&server)["a"]["why"].as_str().unwrap().to_owned();
    assert!(why.contains("no answer to GET /health"), "{why}");
    // Meanwhile the local engine serves everything.
    let params = json!({"max_tokens": 8, "temp": 0});
    for (id, last, _) in collect_all(send_all(&server, "frozen", 4, 2, params.clone())) {
        assert_eq!(last["op"], "end", "{id}: {last}");
    }
    assert_eq!(workers(&server)["local"]["requests_total"], 4);
    a.signal("CONT");
    wait_state(&server, "a", "serving", Duration::from_secs(15));
    for (id, last, _) in collect_all(send_all(&server, "thawed", 6, 2, params)) {
        assert_eq!(last["op"], "end", "{id}: {last}");
    }
    assert!(workers(&server)["a"]["requests_total"].as_u64().unwrap() > 0);
    eprintln!("the frozen upstream left rotation after {took:?}");
}

#[test]
fn a_pure_front_serves_the_openai_api_from_an_upstream_and_says_when_it_cannot() {
    let a = Upstream::start(2);
    // Under systemd (its notification socket, a watchdog of 0.4 s).
    let notify = std::env::temp_dir().join(format!("ic-pool-notify-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&notify);
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let server = Server::start_with_env(
        &["--no-local", "--upstream", &a.url()],
        &[
            ("NOTIFY_SOCKET", notify.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let w = workers(&server);
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w["upstream-1"]["kind"], "openai");
    assert_eq!(server.http_get("/health").0, 200);

    // A streamed chat completion through the front.
    let mut http = HttpConn::connect(server.port);
    let body = json!({
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 12, "temperature": 0, "stream": true
    });
    http.post("/v1/chat/completions", &body);
    let resp = http.read_response();
    assert_eq!(resp.status, 200, "{}", resp.body);
    let events = sse_data(&resp.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let text: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert!(!text.is_empty(), "{events:?}");

    // A WebSocket request with a JSON schema: the upstream enforces it.
    let mut c = server.connect();
    let schema =
        json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]});
    let out = c.infer(
        "json",
        "A number:",
        json!({"max_tokens": 40, "temp": 0, "json_schema": schema}),
    );
    assert_eq!(out.last["op"], "end", "{}", out.last);
    let v: Value =
        serde_json::from_str(&out.text()).unwrap_or_else(|e| panic!("{e}: {}", out.text()));
    assert!(v["n"].is_i64(), "{v}");
    // What the upstream cannot take is a clear error before anything runs.
    let out = c.infer("rx", "x", json!({"regex": "a+"}));
    assert_eq!(out.last["code"], "bad_request", "{}", out.last);
    assert!(
        out.last["message"]
            .as_str()
            .unwrap()
            .contains("not a regex"),
        "{}",
        out.last
    );
    c.send(json!({"op": "tokenize", "id": "count", "prompt": "x"}));
    let answer = c.recv();
    assert_eq!(answer["code"], "bad_request", "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("needs a llama worker"),
        "{answer}"
    );

    // With its only upstream gone, the front says so: 503 and clear errors.
    a.signal("KILL");
    let start = Instant::now();
    while server.http_get("/health").0 != 503 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "/health still ok"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = c.infer("gone", PROMPT, json!({"max_tokens": 4}));
    assert_eq!(out.last["code"], "overloaded", "{}", out.last);
    assert!(
        out.last["message"].as_str().unwrap().contains("no worker"),
        "{}",
        out.last
    );
    // systemd keeps hearing from it: restarting the front would not bring
    // the upstream back, and it must be up when the upstream is.
    let mut buf = [0u8; 4096];
    sock.set_nonblocking(true).unwrap();
    while sock.recv(&mut buf).is_ok() {}
    sock.set_nonblocking(false).unwrap();
    let pings = (0..3)
        .filter(|_| {
            let n = sock
                .recv(&mut buf)
                .expect("WATCHDOG=1 while the upstream is down");
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "WATCHDOG=1")
        })
        .count();
    assert_eq!(pings, 3);
    let _ = std::fs::remove_file(&notify);
}

#[test]
fn a_stalled_local_worker_is_restarted_while_the_other_serves() {
    // Two engines in this process; the 30th token sampled hangs one of them.
    let config = config_file(
        "pool-stall",
        "[watchdog]\nstall_s = 1.5\n[scheduler]\nslots = 2\n\
         [[workers]]\nkind = \"llama\"\nname = \"one\"\nthreads = 1\n\
         [[workers]]\nkind = \"llama\"\nname = \"two\"\nthreads = 1\n",
    );
    let server = Server::start_with_env(
        &["--config", config.to_str().unwrap()],
        &[("INFERENCE_CORE_FAULT", "stall_after_tokens:30")],
    );
    let params = json!({"max_tokens": 40, "temp": 0});
    let outcomes = collect_all(send_all(&server, "stall", 8, 2, params.clone()));
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|(_, l, _)| l["op"] == "error")
        .collect();
    assert!(!failed.is_empty() && failed.len() <= 2, "{outcomes:?}");
    for (id, last, _) in &failed {
        let msg = last["message"].as_str().unwrap();
        assert!(msg.contains("failed: no progress for"), "{id}: {msg}");
    }
    // The process did not exit; the stalled worker came back as a new engine.
    let w = workers(&server);
    let stalled = ["one", "two"]
        .into_iter()
        .find(|n| w[*n]["failures"] == 1)
        .unwrap_or_else(|| panic!("no worker failed: {w:?}"));
    wait_state(&server, stalled, "serving", Duration::from_secs(30));
    for (id, last, _) in collect_all(send_all(&server, "after", 8, 2, params)) {
        assert_eq!(last["op"], "end", "{id}: {last}");
    }
    assert!(server.log_text().contains("restarted, back in rotation"));
}

#[test]
fn pool_settings_are_checked_before_anything_starts() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(util::BIN)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--no-local"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("needs an upstream"), "{err}");
    let (code, err) = run(&["--upstream", "https://gpu-box:8000"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("https is not supported"), "{err}");
    let bad = config_file(
        "pool-bad",
        "[[workers]]\nkind = \"tgi\"\nurl = \"http://x\"\n",
    );
    let (code, err) = run(&["--config", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown variant `tgi`"), "{err}");
    let dup = config_file(
        "pool-dup",
        "[[workers]]\nkind = \"openai\"\nname = \"x\"\nurl = \"http://a\"\n[[workers]]\nkind = \"openai\"\nname = \"x\"\nurl = \"http://b\"\n",
    );
    let (code, err) = run(&["--config", dup.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("two workers are named \"x\""), "{err}");
}

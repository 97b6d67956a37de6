//! Operations: thermal throttle, watchdog, systemd notifications, idle mode,
//! /health and /metrics, the systemd unit. Each test drives the real binary.

mod util;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use util::{Client, EVENT_TIMEOUT, Server, config_file};

/// The next event, or `None` if none arrives within `timeout`.
fn event_within(c: &mut Client, timeout: Duration) -> Option<Value> {
    c.ws.get_ref().set_read_timeout(Some(timeout)).unwrap();
    let out = match c.ws.read() {
        Ok(tungstenite::Message::Text(t)) => Some(serde_json::from_str(t.as_str()).unwrap()),
        Ok(other) => panic!("unexpected message {other:?}"),
        Err(tungstenite::Error::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("read failed: {e}"),
    };
    c.ws.get_ref()
        .set_read_timeout(Some(EVENT_TIMEOUT))
        .unwrap();
    out
}

/// Parses Prometheus text strictly: every sample belongs to a family with a
/// TYPE line before it; every value is a number. Returns sample -> value.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut families: Vec<String> = Vec::new();
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect(line);
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            families.push(name.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').expect(line);
        let name = key.split('{').next().unwrap();
        assert!(
            families.iter().any(|f| {
                name == f
                    || [
                        f.clone() + "_bucket",
                        f.clone() + "_sum",
                        f.clone() + "_count",
                    ]
                    .contains(&name.to_owned())
            }),
            "sample without a TYPE: {line}"
        );
        if let Some(labels) = key.strip_prefix(name) {
            assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')));
        }
        let v: f64 = value.parse().expect(line);
        assert!(
            samples.insert(key.to_owned(), v).is_none(),
            "duplicate {key}"
        );
    }
    samples
}

#[test]
fn health_and_metrics_are_served_as_json_and_prometheus_text() {
    let server = Server::start(&[]);
    let (status, body) = server.http_get("/health");
    assert_eq!((status, body.trim()), (200, r#"{"status":"ready"}"#));
    let mut c = server.connect();
    let out = c.infer(
        "m",
        "The capital of France is",
        json!({"temp":0,"max_tokens":6}),
    );
    assert_eq!(out.reason(), "length");
    c.send(json!({"op":"status"}));
    let status = c.recv();
    assert_eq!(status["op"], "status");
    assert_eq!(status["engine"], "idle", "{status}");
    assert_eq!(status["throttled"], false, "{status}");

    let (code, text) = server.http_get("/metrics");
    assert_eq!(code, 200);
    let m = parse_prometheus(&text);
    assert_eq!(
        m["inference_core_requests_total{api=\"ws\",outcome=\"length\"}"], 1.0,
        "{text}"
    );
    assert_eq!(m["inference_core_tokens_generated_total"], 6.0);
    assert_eq!(m["inference_core_ttft_seconds_count"], 1.0);
    assert_eq!(m["inference_core_ttft_seconds_bucket{le=\"+Inf\"}"], 1.0);
    assert!(m["inference_core_inter_token_seconds_count"] >= 1.0);
    assert_eq!(m["inference_core_busy_slots"], 0.0);
    assert_eq!(m["inference_core_queue_depth"], 0.0);
    let pages: f64 = ["used", "cached", "free"]
        .iter()
        .map(|s| m[&format!("inference_core_kv_pages{{state=\"{s}\"}}")])
        .sum();
    assert_eq!(pages, 256.0, "4096 cells in pages of 16");
    assert_eq!(m["inference_core_engine_state{state=\"idle\"}"], 1.0);
    assert_eq!(m["inference_core_thermal_throttled"], 0.0);
    assert_eq!(m["inference_core_watchdog_stalls_total"], 0.0);
    assert_eq!(
        m["inference_core_connections"], 2.0,
        "the WebSocket and this scrape"
    );
    assert_eq!(server.http_get("/nope").0, 404);
    assert_eq!(server.http_get("/").0, 200);
}

#[test]
fn a_hot_sensor_pauses_generation_and_cooling_resumes_it_without_loss() {
    let temp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("thermal.temp");
    std::fs::write(&temp, "40000\n").unwrap();
    let server = Server::start_with_config(
        "thermal",
        &format!(
            "[monitor]\ninterval_s = 0.05\nnvml = false\ntemp_file = {:?}\n[thermal]\nlimit_c = 80.0\nresume_c = 75.0\n",
            temp.to_str().unwrap()
        ),
        &[],
    );
    let mut c = server.connect();
    let n = 60;
    c.send(json!({"op":"infer","id":"t","prompt":"Once upon a time",
        "params":{"temp":0,"max_tokens":n,"ignore_eos":true}}));
    let mut tokens = 0;
    while tokens < 3 {
        assert_eq!(c.recv()["op"], "token");
        tokens += 1;
    }
    std::fs::write(&temp, "90\n").unwrap();
    server.wait_log("thermal: 90.0 °C at or above the limit: throttling");
    // The step running when the flag flipped may still deliver its token.
    while let Some(ev) = event_within(&mut c, Duration::from_millis(300)) {
        assert_eq!(ev["op"], "token", "{ev}");
        tokens += 1;
    }
    let hot = Instant::now();
    assert_eq!(
        event_within(&mut c, Duration::from_millis(1500)),
        None,
        "a token arrived while hot"
    );
    let m = parse_prometheus(&server.http_get("/metrics").1);
    assert_eq!(m["inference_core_thermal_throttled"], 1.0);
    assert_eq!(m["inference_core_temperature_celsius"], 90.0);
    assert_eq!(m["inference_core_thermal_throttle_events_total"], 1.0);
    // Hysteresis: 77 °C is below the limit but above the resume point.
    std::fs::write(&temp, "77\n").unwrap();
    assert_eq!(
        event_within(&mut c, Duration::from_millis(500)),
        None,
        "resumed above resume_c"
    );
    std::fs::write(&temp, "70000\n").unwrap();
    server.wait_log("thermal: 70.0 °C: resuming");
    let rest = c.collect("t");
    assert!(hot.elapsed() >= Duration::from_secs(2));
    assert_eq!(rest.reason(), "length", "{:?}", rest.last);
    assert_eq!(rest.last["stats"]["completion_tokens"], n, "no token lost");
    assert!(tokens + rest.tokens.len() <= n as usize);
}

#[test]
fn a_stalled_engine_fails_its_clients_and_exits_70() {
    let cfg = config_file("stall", "[watchdog]\nstall_s = 1.0\n");
    let mut server = Server::start_with_env(
        &["--config", cfg.to_str().unwrap()],
        &[("INFERENCE_CORE_FAULT", "stall_after_tokens:5")],
    );
    let mut c = server.connect();
    c.send(json!({"op":"infer","id":"w","prompt":"Hello","params":{"temp":0,"max_tokens":50,"ignore_eos":true}}));
    let out = c.collect("w");
    let stalled_at = Instant::now();
    assert_eq!(out.op(), "error", "{:?}", out.last);
    assert_eq!(out.last["code"], "internal");
    assert!(out.tokens.len() < 5, "{} tokens", out.tokens.len());
    let status = server.wait_exit(Duration::from_secs(6));
    assert_eq!(status.code(), Some(70), "{}", server.log_text());
    assert!(stalled_at.elapsed() < Duration::from_secs(4));
    assert!(
        server
            .log_text()
            .contains("watchdog: the engine made no progress")
    );
}

#[test]
fn systemd_gets_ready_watchdog_and_stopping_in_order() {
    let dir = std::env::temp_dir().join(format!("ic-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut server = Server::start_with_env(
        &[],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut recv = |seen: &mut Vec<String>| {
        let n = sock.recv(&mut buf).expect("a notification");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.extend(msg.lines().map(str::to_owned));
    };
    while !seen.iter().any(|l| l == "WATCHDOG=1") {
        recv(&mut seen);
    }
    server.signal("TERM");
    while !seen.iter().any(|l| l == "STOPPING=1") {
        recv(&mut seen);
    }
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    let at = |what: &str| seen.iter().position(|l| l == what).unwrap();
    assert!(at("READY=1") < at("WATCHDOG=1"), "{seen:?}");
    assert!(at("WATCHDOG=1") < at("STOPPING=1"), "{seen:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// utime + stime of a process, in clock ticks (1/100 s on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_server_uses_no_cpu() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    assert_eq!(c.infer("w", "Hi", json!({"max_tokens":4})).op(), "end");
    // Start-up work: constrained decoding is prepared on a thread of its own.
    server.wait_log("constrained decoding ready");
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(server.child.id());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(server.child.id()) - before;
    eprintln!("idle CPU time over 3 s: {} ms", used * 10);
    assert!(used <= 3, "{} ms of CPU in 3 idle seconds", used * 10);
}

fn park_and_wake(unload_model: bool) {
    let server = Server::start_with_config(
        if unload_model { "park-unload" } else { "park" },
        &format!("[idle]\npark_after_s = 1.0\nunload_model = {unload_model}\n"),
        &[],
    );
    let mut c = server.connect();
    let params = json!({"temp":0,"max_tokens":12});
    let before = c.infer("a", "The capital of France is", params.clone());
    assert_eq!(before.reason(), "length");
    server.wait_log("parked (released the KV cache");
    assert_eq!(
        server.http_get("/health"),
        (200, "{\"status\":\"parked\"}\n".into())
    );
    let m = parse_prometheus(&server.http_get("/metrics").1);
    assert_eq!(m["inference_core_engine_state{state=\"parked\"}"], 1.0);
    let after = c.infer("b", "The capital of France is", params);
    assert_eq!(
        after.text(),
        before.text(),
        "greedy output changed across park/wake"
    );
    server.wait_log("woke up in");
    let log = server.log_text();
    let line = log.lines().find(|l| l.contains("woke up in")).unwrap();
    eprintln!(
        "unload_model = {unload_model}: {line}; ttft {}",
        after.last["stats"]["ttft_ms"]
    );
    assert_eq!(server.http_get("/health").1.trim(), r#"{"status":"ready"}"#);
    let m = parse_prometheus(&server.http_get("/metrics").1);
    assert_eq!(m["inference_core_wakes_total"], 1.0);
}

#[test]
fn park_and_wake_give_the_same_greedy_output() {
    park_and_wake(false);
}

#[test]
fn park_with_unload_and_wake_give_the_same_greedy_output() {
    park_and_wake(true);
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = include_str!("../systemd/inference-core.service");
    assert!(unit.contains("ExecStart=/usr/local/bin/inference-core "));
    // Saved prefixes go where the sandbox lets the service write.
    let setting = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the unit"))
    };
    let state = setting("Environment=INFERENCE_CORE_STATE=");
    assert!(
        setting("ReadWritePaths=")
            .split_whitespace()
            .any(|p| state.starts_with(p)),
        "{state} is not writable under ProtectSystem=strict"
    );
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = std::env::temp_dir().join(format!("ic-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("inference-core.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/inference-core", util::BIN),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is missing: run scripts/setup.sh --tests");
    std::fs::remove_dir_all(&dir).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("inference-core.service"), "{stderr}");
}

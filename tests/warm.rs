//! Warm after every sleep and every restart: cached prompt prefixes survive
//! a park (kept in memory) and a restart (saved in the state directory), and
//! saved files that do not fit are skipped without harm.

mod util;

use std::time::Duration;

use serde_json::{Value, json};
use util::{Client, Server, fresh_dir};

/// About 1,000 tokens.
fn system_prompt() -> String {
    "You are the guide of a lighthouse museum on a windy northern coast. ".repeat(70)
}

/// A request with the system prompt; returns its `end` stats.
fn ask(c: &mut Client, id: &str, question: &str) -> Value {
    let out = c.infer(
        id,
        &format!("{}\nQuestion: {question}\nAnswer:", system_prompt()),
        json!({"temp":0,"max_tokens":4}),
    );
    assert_eq!(out.op(), "end", "{}", out.last);
    out.last["stats"].clone()
}

fn tokens(stats: &Value, field: &str) -> u64 {
    stats[field].as_u64().unwrap()
}

#[test]
fn a_restart_finds_the_system_prompt_warm() {
    let dir = fresh_dir("warm-restart");
    let state = dir.to_str().unwrap();
    let mut first = Server::start(&["--state-dir", state]);
    let cold = ask(&mut first.connect(), "q1", "when was it built?");
    assert_eq!(tokens(&cold, "cached_tokens"), 0);
    first.signal("TERM");
    assert_eq!(first.wait_exit(Duration::from_secs(20)).code(), Some(0));
    assert!(
        first.log_text().contains("saved 1 cached prefixes"),
        "{}",
        first.log_text()
    );

    let second = Server::start(&["--state-dir", state]);
    second.wait_log("restored 1 of 1 cached prefixes");
    let warm = ask(&mut second.connect(), "q2", "who lived there?");
    let prompt = tokens(&cold, "prompt_tokens");
    let cached = tokens(&warm, "cached_tokens");
    assert!(
        cached * 10 >= (prompt - 12) * 9,
        "{cached} of a ~{prompt}-token prompt came from the saved prefix"
    );
    eprintln!(
        "restart: {prompt}-token prompt, cold TTFT {:.0} ms; after a restart {cached} cached, TTFT {:.0} ms",
        cold["ttft_ms"].as_f64().unwrap(),
        warm["ttft_ms"].as_f64().unwrap()
    );
}

#[test]
fn a_park_and_wake_keep_the_system_prompt_warm() {
    let server = Server::start_with_config(
        "warm-park",
        "[idle]\npark_after_s = 0.3\n[state]\nmax_mb = 0\n",
        &[],
    );
    let mut c = server.connect();
    let cold = ask(&mut c, "q1", "when was it built?");
    server.wait_log("parked");
    assert!(server.log_text().contains("kept 1 cached prefixes"));
    let warm = ask(&mut c, "q2", "who lived there?");
    server.wait_log("woke up in");
    let prompt = tokens(&cold, "prompt_tokens");
    let cached = tokens(&warm, "cached_tokens");
    assert!(cached * 10 >= (prompt - 12) * 9, "{cached} of ~{prompt}");
    eprintln!(
        "park: cold TTFT {:.0} ms; after a wake {cached} cached, TTFT {:.0} ms (wake-up included)",
        cold["ttft_ms"].as_f64().unwrap(),
        warm["ttft_ms"].as_f64().unwrap()
    );
}

#[test]
fn saved_files_that_do_not_fit_are_skipped_and_the_server_serves() {
    let dir = fresh_dir("warm-skip");
    let state = dir.to_str().unwrap();
    let mut first = Server::start(&["--state-dir", state]);
    ask(&mut first.connect(), "q1", "when was it built?");
    first.signal("TERM");
    assert_eq!(first.wait_exit(Duration::from_secs(20)).code(), Some(0));
    let saved: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    let bytes = std::fs::read(&saved[0]).unwrap();
    std::fs::write(dir.join("truncated.icp"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(dir.join("noise.icp"), b"\x00\x01 random bytes").unwrap();

    // Same settings: the damaged files are skipped, the good one is used.
    let mut second = Server::start(&["--state-dir", state]);
    second.wait_log("restored 1 of 1 cached prefixes");
    let log = second.log_text();
    assert_eq!(log.matches("skipping saved prefix").count(), 2, "{log}");
    assert!(
        log.contains("truncated.icp: it is truncated or corrupt"),
        "{log}"
    );
    assert!(log.contains("noise.icp: not a prefix snapshot"), "{log}");
    let warm = ask(&mut second.connect(), "q2", "who lived there?");
    assert!(tokens(&warm, "cached_tokens") > 900, "{warm}");
    second.signal("TERM");
    assert_eq!(second.wait_exit(Duration::from_secs(20)).code(), Some(0));

    // Another context size: nothing saved fits, and the server serves cold.
    let other = Server::start(&["--state-dir", state, "-c", "2048"]);
    other.wait_log("0 saved prefixes found in");
    let log = other.log_text();
    assert!(
        log.contains("saved for another model, build or settings"),
        "{log}"
    );
    let cold = ask(&mut other.connect(), "q3", "who lived there?");
    assert_eq!(tokens(&cold, "cached_tokens"), 0);
}

fn count(c: &mut Client, id: &str, input: Value) -> u64 {
    c.send(util::with(json!({"op":"tokenize","id":id}), &input));
    loop {
        let ev = c.recv();
        if ev["id"] == id {
            assert_eq!(ev["op"], "tokens", "{ev}");
            return ev["count"].as_u64().unwrap();
        }
    }
}

#[test]
fn tokenize_counts_what_a_request_would_use() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    let messages = json!([
        {"role":"system","content":"Answer in one word."},
        {"role":"user","content":"What colour is the sky?"}]);
    for (i, input) in [
        json!({"prompt":"The capital of France is"}),
        json!({"messages":messages}),
    ]
    .into_iter()
    .enumerate()
    {
        let counted = count(&mut c, &format!("t{i}"), input.clone());
        c.send(util::with(
            json!({"op":"infer","id":format!("i{i}"),"params":{"max_tokens":1}}),
            &input,
        ));
        let out = c.collect(&format!("i{i}"));
        assert_eq!(out.last["stats"]["prompt_tokens"], counted, "{input}");
    }
    // Bad input to tokenize is refused like any request.
    c.send(json!({"op":"tokenize","id":"bad"}));
    let ev = c.recv();
    assert_eq!(
        (&ev["op"], &ev["code"]),
        (&json!("error"), &json!("bad_request"))
    );
}

#[test]
fn truncate_left_keeps_the_system_message_and_the_latest_turn() {
    let server = Server::start(&["-c", "256"]);
    let mut c = server.connect();
    let system = json!({"role":"system","content":"You are a terse assistant."});
    let last = json!({"role":"user","content":"And the last question?"});
    let mut history = vec![system.clone()];
    for i in 0..12 {
        history.push(json!({"role":"user","content":format!("Question number {i} about the lighthouse keepers?")}));
        history.push(json!({"role":"assistant","content":format!("Answer number {i}: they kept the light burning all night.")}));
    }
    history.push(last.clone());
    let params = json!({"temp":0,"max_tokens":16});
    c.send(json!({"op":"infer","id":"plain","messages":history,"params":params}));
    let refused = c.collect("plain");
    assert_eq!(refused.last["code"], "context_overflow", "{}", refused.last);
    c.send(json!({"op":"infer","id":"cut","messages":history,"params":params,"truncate":"left"}));
    let out = c.collect("cut");
    assert_eq!(out.op(), "end", "{}", out.last);
    let stats = &out.last["stats"];
    let prompt = stats["prompt_tokens"].as_u64().unwrap();
    assert!(prompt <= 256 - 16, "{stats}");
    assert!(stats["truncated_tokens"].as_u64().unwrap() > 0, "{stats}");
    // The kept prompt is the system message and the latest turns: its size
    // is that of [system, the last k messages] for some k.
    let turns = &history[1..];
    let sizes: Vec<u64> = (1..=turns.len())
        .map(|k| {
            let mut kept = vec![system.clone()];
            kept.extend_from_slice(&turns[turns.len() - k..]);
            count(&mut c, &format!("k{k}"), json!({"messages":kept}))
        })
        .collect();
    assert!(sizes.contains(&prompt), "{prompt} is none of {sizes:?}");
}

#[test]
fn parks_and_restarts_leak_neither_pages_nor_files() {
    let dir = fresh_dir("warm-soak");
    let state = dir.to_str().unwrap();
    let config =
        "[idle]\npark_after_s = 0.2\n[scheduler]\nprefix_cache_entries = 4\n[state]\nmax_mb = 64\n";
    let prefixes: Vec<String> = (0..6)
        .map(|i| format!("Rotating system prompt number {i}. ").repeat(8))
        .collect();
    let mut rss = Vec::new();
    for round in 0..3 {
        let mut server = Server::start_with_config("warm-soak", config, &["--state-dir", state]);
        let mut c = server.connect();
        for cycle in 0..3 {
            for (j, p) in prefixes.iter().enumerate().skip(cycle).take(3) {
                let id = format!("r{round}-{cycle}-{j}");
                let out = c.infer(
                    &id,
                    &format!("{p}Question?"),
                    json!({"temp":0,"max_tokens":4}),
                );
                assert_eq!(out.op(), "end", "{}", out.last);
            }
            let before = server.log_text().matches("kept ").count();
            while server.log_text().matches("kept ").count() == before {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Parked: every page is free or held by the cache, none owned.
            let kv = &server.status()["kv"];
            assert_eq!(kv["pages_owned"], 0, "{kv}");
            let (free, cached) = (
                kv["pages_free"].as_u64().unwrap(),
                kv["pages_cached"].as_u64().unwrap(),
            );
            assert_eq!(free + cached, kv["pages_total"].as_u64().unwrap(), "{kv}");
            assert!(kv["prefix_entries"].as_u64().unwrap() <= 4, "{kv}");
        }
        rss.push(server.rss_kib());
        server.signal("TERM");
        assert_eq!(server.wait_exit(Duration::from_secs(20)).code(), Some(0));
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        assert!(
            files.len() <= 4,
            "{} files for 4 cache entries",
            files.len()
        );
        let bytes: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
        assert!(bytes <= 64 << 20, "{bytes} bytes over the 64 MB budget");
        assert!(
            files
                .iter()
                .all(|f| !f.file_name().to_string_lossy().ends_with(".tmp")),
            "a temporary file was left behind"
        );
    }
    eprintln!("RSS after each round (KiB): {rss:?}");
}

/// `curl` with `args`, returning (HTTP status, body).
fn curl(port: u16, args: &[&str]) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "30"])
        .args(args)
        .arg(format!("http://127.0.0.1:{port}/tokenize"))
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.trim().parse().unwrap(), body.to_owned())
}

#[test]
fn post_tokenize_answers_http_clients() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    let body = json!({"messages":[{"role":"user","content":"What colour is the sky?"}]});
    let (status, answer) = curl(server.port, &["-X", "POST", "-d", &body.to_string()]);
    assert_eq!(status, 200, "{answer}");
    let counted: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(counted["count"], count(&mut c, "ws", body.clone()));
    c.send(json!({"op":"infer","id":"i","messages":body["messages"],"params":{"max_tokens":1}}));
    assert_eq!(
        c.collect("i").last["stats"]["prompt_tokens"],
        counted["count"]
    );

    let (status, answer) = curl(server.port, &["-X", "POST", "-d", "{oops"]);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains(r#""code":"bad_request""#), "{answer}");
    let (status, _) = curl(
        server.port,
        &["-X", "POST", "-d", r#"{"prompt":"x","n":1}"#],
    );
    assert_eq!(status, 400);
    let huge = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(2 << 20));
    let file = util::config_file("huge-body", &huge);
    let (status, _) = curl(
        server.port,
        &[
            "-X",
            "POST",
            "--data-binary",
            &format!("@{}", file.display()),
        ],
    );
    assert_eq!(status, 413);
    // A chunked body is read like any other.
    let (status, answer) = curl(
        server.port,
        &[
            "-X",
            "POST",
            "-H",
            "Transfer-Encoding: chunked",
            "-d",
            r#"{"prompt":"x"}"#,
        ],
    );
    assert_eq!(status, 200, "{answer}");
    let (status, _) = curl(server.port, &[]);
    assert_eq!(status, 405, "GET /tokenize");
    // And the WebSocket client was not disturbed.
    assert_eq!(
        c.infer("after", "Hello", json!({"max_tokens":2})).op(),
        "end"
    );
}

//! Thousands of idle WebSocket connections held open while streams run:
//! nothing errors, every stream completes with exactly the text it produces
//! alone, and every idle connection is still open at the end, having been
//! sent its greeting and nothing else; each costs the server at most 10 KiB
//! of anonymous memory. The streams' token cadence with and without the idle
//! connections is printed (a figure for docs/hardening.md, not an assertion:
//! timings on a shared CI machine are too noisy to gate on).

mod util;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use tungstenite::Message;
use util::Server;

/// At most this many idle connections (fewer if the file limit is lower).
const MAX_IDLE: u64 = 4000;
/// One stream, with the prefix cache off: both runs then do exactly the same
/// computation, so greedy text must match token for token.
const STREAMS: usize = 1;
const TOKENS: usize = 64;

/// Runs `STREAMS` greedy requests at once; returns every inter-token gap in
/// ms and each stream's text.
fn run_streams(server: &Server) -> (Vec<f64>, Vec<String>) {
    let handles: Vec<_> = (0..STREAMS)
        .map(|i| {
            let mut c = server.connect();
            std::thread::spawn(move || {
                let id = format!("s{i}");
                c.send(
                    json!({"op":"infer","id":id,"prompt":"Tell me a long story about the sea:",
                    "params":{"temp":0,"max_tokens":TOKENS,"ignore_eos":true}}),
                );
                let mut gaps = Vec::new();
                let mut text = String::new();
                let mut last: Option<Instant> = None;
                loop {
                    let ev = c.recv();
                    match ev["op"].as_str().unwrap() {
                        "token" => {
                            text.push_str(ev["content"].as_str().unwrap());
                            let now = Instant::now();
                            if let Some(l) = last {
                                gaps.push(now.duration_since(l).as_secs_f64() * 1000.0);
                            }
                            last = Some(now);
                        }
                        "end" => {
                            assert_eq!(ev["stats"]["completion_tokens"], TOKENS, "{ev}");
                            return (gaps, text);
                        }
                        "queued" => {}
                        _ => panic!("unexpected event {ev}"),
                    }
                }
            })
        })
        .collect();
    let mut gaps = Vec::new();
    let mut texts = Vec::new();
    for h in handles {
        let (g, t) = h.join().unwrap();
        gaps.extend(g);
        texts.push(t);
    }
    (gaps, texts)
}

fn summary(gaps: &mut [f64]) -> String {
    gaps.sort_by(f64::total_cmp);
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let p = |q: f64| gaps[((gaps.len() - 1) as f64 * q) as usize];
    format!(
        "mean {mean:.1} ms, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        p(0.5),
        p(0.99),
        p(1.0)
    )
}

#[test]
fn thousands_of_idle_connections_do_not_disturb_streams() {
    // Both ends of every connection live on this machine: this process holds
    // one descriptor per idle client, the server one per connection.
    let soft = rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let idle_count = MAX_IDLE.min(soft.saturating_sub(200)) as usize;
    assert!(
        idle_count >= 1000,
        "file limit {soft} is too low for this test"
    );
    // Constrained decoding off: its ~125 MB, built on a thread of its own in
    // the first seconds, would count against the connections whenever the
    // build ended while they were opened (a connection then seemed to cost
    // 12.4 KiB instead of 5).
    let config = format!(
        "[server]\nmax_connections = {}\nping_interval_s = 0.0\n[scheduler]\nprefix_cache_entries = 0\n[constraints]\nenabled = false\n",
        idle_count + 16
    );
    let server = Server::start_with_config("idle-connections", &config, &[]);

    let (mut alone, alone_texts) = run_streams(&server);

    let (rss_before, anon_before) = (server.rss_kib(), server.anon_kib());
    let start = Instant::now();
    let url = format!("ws://127.0.0.1:{}/", server.port);
    let mut idle = Vec::with_capacity(idle_count);
    for _ in 0..idle_count {
        let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        let (ws, _) = tungstenite::client(url.as_str(), stream).expect("handshake");
        idle.push(ws);
    }
    let opened_in = start.elapsed();
    // Each idle connection's cost to the server: the anonymous memory it
    // adds (its socket buffers are the kernel's; the model file's pages,
    // which the kernel may page out and back in meanwhile, are no
    // connection's).
    let per_connection_kib =
        (server.anon_kib().saturating_sub(anon_before)) as f64 / idle_count as f64;
    let rss_per_connection_kib =
        (server.rss_kib().saturating_sub(rss_before)) as f64 / idle_count as f64;
    assert!(
        per_connection_kib <= 10.0,
        "an idle connection costs the server {per_connection_kib:.1} KiB"
    );

    let (mut crowded, crowded_texts) = run_streams(&server);
    // Greedy streams are not disturbed: the same text, token for token.
    assert_eq!(crowded_texts, alone_texts);

    // Every idle connection is still open, was greeted once, and was sent
    // nothing more (pings are off).
    for ws in &mut idle {
        ws.get_mut()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        match ws.read().expect("idle connection still open") {
            Message::Text(t) => assert!(t.as_str().contains("\"op\":\"hello\"")),
            other => panic!("unexpected {other:?}"),
        }
        ws.get_mut().set_nonblocking(true).unwrap();
        match ws.read() {
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("an idle connection was sent more than its greeting: {other:?}"),
        }
    }
    let log = server.log_text();
    for line in log.lines() {
        assert!(
            !(line.contains("[inference_core")
                && (line.contains(" WARN ") || line.contains(" ERROR "))),
            "{line}"
        );
    }
    eprintln!(
        "idle connections: {idle_count} opened in {:.1} s, {per_connection_kib:.1} KiB of anonymous server memory each ({rss_per_connection_kib:.1} KiB of RSS); {STREAMS} streams of {TOKENS} tokens, inter-token gap alone: {}; with {idle_count} idle: {}",
        opened_in.as_secs_f64(),
        summary(&mut alone),
        summary(&mut crowded)
    );
}

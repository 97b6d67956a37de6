//! The `[server]` limits against slow and hostile clients: each one is cut
//! off by its limit, with a close code or an HTTP status and a log line,
//! while a well-behaved client on the same server is served as usual.

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use tungstenite::Message;
use util::{Client, Server};

/// A well-behaved client's greedy request, started before the misbehaviour.
fn start_bystander(server: &Server) -> Client {
    let mut c = server.connect();
    c.send(
        json!({"op":"infer","id":"bystander","prompt":"Write a story about a lighthouse:",
        "params":{"temp":0,"max_tokens":40,"ignore_eos":true}}),
    );
    c
}

fn finish_bystander(mut c: Client) {
    let out = c.collect("bystander");
    assert_eq!(out.op(), "end", "{}", out.last);
    assert_eq!(out.last["stats"]["completion_tokens"], 40);
}

/// Reads until the server closes the socket (EOF or reset); returns how long it took.
fn wait_closed(s: &mut TcpStream, within: Duration) -> Duration {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        assert!(start.elapsed() < within, "still open after {within:?}");
        match s.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return start.elapsed(),
        }
    }
}

#[test]
fn over_max_connections_the_handshake_is_refused_with_503_and_a_freed_slot_is_reused() {
    let server = Server::start_with_config("limits-conns", "[server]\nmax_connections = 3\n", &[]);
    let mut clients: Vec<Client> = (0..3).map(|_| server.connect()).collect();
    // A WebSocket client over the limit is answered 503 at once, not left hanging.
    for _ in 0..5 {
        let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let url = format!("ws://127.0.0.1:{}/", server.port);
        match tungstenite::client(url, stream) {
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                assert_eq!(response.status(), 503);
            }
            Err(e) => panic!("expected a 503, got {e}"),
            Ok(_) => panic!("a connection over max_connections was accepted"),
        }
    }
    // So is a plain HTTP request (a health check is a connection too).
    assert_eq!(server.http_get("/health").0, 503);
    server.wait_log("refusing a connection: 3 connections already open");
    // The refused connections did not take slots: closing one client frees one.
    let mut first = clients.remove(0);
    first.ws.close(None).unwrap();
    while first.ws.read().is_ok() {}
    let start = Instant::now();
    let mut c = loop {
        let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        let url = format!("ws://127.0.0.1:{}/", server.port);
        if let Ok((ws, _)) = tungstenite::client(url, stream) {
            break ws;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "no slot freed");
        std::thread::sleep(Duration::from_millis(50));
    };
    let hello = c.read().unwrap();
    assert!(hello.to_text().unwrap().contains("hello"));
    assert_eq!(
        clients[0].infer("x", "Hi", json!({"max_tokens":2})).op(),
        "end"
    );
}

#[test]
fn slowloris_clients_are_dropped_at_the_handshake_timeout_while_others_are_served() {
    let server = Server::start_with_config(
        "limits-slowloris",
        "[server]\nmax_connections = 4\nhandshake_timeout_s = 2.0\n",
        &[],
    );
    let bystander = start_bystander(&server);
    // Three clients that send their request head one byte a second, never finishing it.
    let lorises: Vec<_> = (0..3)
        .map(|_| {
            let port = server.port;
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let start = Instant::now();
                for b in
                    b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa".iter()
                {
                    if s.write_all(&[*b]).is_err() {
                        return start.elapsed();
                    }
                    let mut probe = [0u8; 64];
                    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                    match s.read(&mut probe) {
                        Ok(0) => return start.elapsed(),
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        _ => return start.elapsed(),
                    }
                }
                panic!("a slowloris client was never dropped");
            })
        })
        .collect();
    // While they hold their slots the server is full: the next client is refused...
    std::thread::sleep(Duration::from_millis(500));
    let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let refused = tungstenite::client(format!("ws://127.0.0.1:{}/", server.port), stream);
    assert!(refused.is_err(), "the server should be full");
    // ...until the handshake timeout frees them.
    for loris in lorises {
        let held = loris.join().unwrap();
        assert!(
            held >= Duration::from_millis(1500) && held < Duration::from_secs(5),
            "a slowloris client was dropped after {held:?}, expected about 2 s"
        );
    }
    let mut late = server.connect();
    assert_eq!(
        late.infer("late", "Hi", json!({"max_tokens":3})).op(),
        "end"
    );
    finish_bystander(bystander);
}

#[test]
fn a_client_that_never_reads_is_disconnected_and_others_are_unaffected() {
    let server = Server::start_with_config(
        "limits-slow-reader",
        "[server]\nmax_write_buffer_bytes = 16384\n",
        &[],
    );
    // The slow reader: a small receive buffer, four long generations, and it never
    // reads. Tokens alone (about 12 KB/s here) would take minutes to fill the
    // kernel's socket buffers (up to 4 MB on loopback) before ours, so it also
    // asks for a status snapshot many times: the answers pile up much faster.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    let url = format!("ws://127.0.0.1:{}/", server.port);
    let (mut slow, _) = tungstenite::client(url, stream).unwrap();
    for i in 0..4 {
        slow.send(Message::text(
            json!({"op":"infer","id":format!("slow{i}"),"prompt":"Count to a thousand:",
                "params":{"max_tokens":3000,"ignore_eos":true}})
            .to_string(),
        ))
        .unwrap();
    }
    let bystander = start_bystander(&server);
    let status = Message::text(r#"{"op":"status"}"#);
    for _ in 0..40_000 {
        if slow.send(status.clone()).is_err() {
            break; // already disconnected
        }
    }
    let start = Instant::now();
    while !server.log_text().contains("reads too slowly") {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the slow reader was never disconnected:\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("slow reader disconnected after {:?}", start.elapsed());
    server.wait_log("aborted: reading too slowly");
    finish_bystander(bystander);
    // The slow reader's requests were aborted: the engine is idle again.
    let start = Instant::now();
    while server.status()["busy_slots"] != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "requests still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Reading now, the client finds the close frame (1008) behind the backlog,
    // or the socket already dropped after the close grace period.
    slow.get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    loop {
        match slow.read() {
            Ok(Message::Close(Some(f))) => {
                assert_eq!(u16::from(f.code), 1008, "{f:?}");
                break;
            }
            Ok(Message::Close(None)) => panic!("close frame without a code"),
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

#[test]
fn a_client_that_pipelines_without_reading_waits_and_gets_every_answer_after() {
    // Without constrained decoding, whose ~125 MB land whenever it is ready.
    let server =
        Server::start_with_config("limits-pipelining", "[constraints]\nenabled = false\n", &[]);
    // A first request has had its share of memory (llama.cpp's buffers).
    finish_bystander(start_bystander(&server));
    let rss_before = server.rss_kib();
    let bystander = start_bystander(&server);
    // Requests for the page (13 KB each) sent one after another while not
    // one answer is read: queued, the answers would take 50 MB.
    let n = 4000;
    let mut writer = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let mut reader = writer.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        let request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
        for _ in 0..n {
            writer.write_all(request).unwrap();
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let grew = server.rss_kib().saturating_sub(rss_before);
    assert!(grew < 16 << 10, "the server's memory grew by {grew} KiB");
    // Meanwhile everyone else is served.
    finish_bystander(bystander);
    // Reading, the client gets all its answers, in order.
    reader
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let one = loop {
        let k = reader.read(&mut buf).unwrap();
        assert!(k > 0, "closed");
        got.extend_from_slice(&buf[..k]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let length: usize = head
            .split("content-length:")
            .nth(1)
            .and_then(|v| v.lines().next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{head}"));
        break end + 4 + length;
    };
    while got.len() < n * one {
        let k = reader.read(&mut buf).unwrap();
        assert!(k > 0, "closed after {} answers", got.len() / one);
        got.extend_from_slice(&buf[..k]);
    }
    assert_eq!(got.len(), n * one);
    sending.join().unwrap();
}

#[test]
fn silent_clients_are_pinged_and_closed_while_answering_ones_stay() {
    let server = Server::start_with_config(
        "limits-idle",
        "[server]\nping_interval_s = 1.0\npong_timeout_s = 1.0\n",
        &[],
    );
    let mut answering = server.connect();
    let mut silent = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let silent_ws = {
        let url = format!("ws://127.0.0.1:{}/", server.port);
        let (ws, _) = tungstenite::client(url, silent.try_clone().unwrap()).unwrap();
        ws
    };
    // The answering client reads (tungstenite answers pings as it reads) for 4 s.
    answering
        .ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(4) {
        match answering.ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("the answering client was closed: {e}"),
        }
    }
    assert!(pings >= 2, "{pings} pings in 4 s");
    // The silent one was pinged, then closed with 1001.
    let held = wait_closed(&mut silent, Duration::from_secs(5));
    drop(silent_ws);
    assert!(held < Duration::from_secs(5));
    server.wait_log("closing an idle connection: no answer to a ping");
    answering
        .ws
        .get_mut()
        .set_read_timeout(Some(util::EVENT_TIMEOUT))
        .unwrap();
    assert_eq!(
        answering.infer("a", "Hi", json!({"max_tokens":2})).op(),
        "end"
    );
}

#[test]
fn a_prompt_over_max_prompt_tokens_is_refused_with_the_limit_named() {
    let server =
        Server::start_with_config("limits-prompt", "[server]\nmax_prompt_tokens = 16\n", &[]);
    let mut c = server.connect();
    let long = "one two three four five six seven eight nine ten eleven twelve thirteen".repeat(3);
    let out = c.infer("long", &long, json!({"max_tokens":2}));
    assert_eq!(out.op(), "error", "{}", out.last);
    assert_eq!(out.last["code"], "context_overflow");
    let message = out.last["message"].as_str().unwrap();
    assert!(message.contains("server.max_prompt_tokens"), "{message}");
    assert!(message.contains("16"), "{message}");
    assert_eq!(c.infer("short", "Hi", json!({"max_tokens":2})).op(), "end");
}

#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let server = Server::start(&[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    // "Max open files  SOFT  HARD  files"
    assert_eq!(fields[3], fields[4], "{line}");
}

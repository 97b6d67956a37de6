//! The OpenAI-compatible HTTP API on the WebSocket port: the official `openai`
//! Python package, `curl -N`, raw HTTP/1.1 (keep-alive, pipelining, chunked
//! bodies, `Expect: 100-continue`), API keys, and bad input.

mod util;

use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use util::{HttpConn, Server, sse_data};

const MODEL: &str = "gemma-3-270m-q4_k_m";

/// Runs the `openai` package's checks (tests/clients/openai_check.py).
fn openai_check(server: &Server, key: Option<&str>) {
    let base = format!("http://127.0.0.1:{}", server.port);
    let mut args = vec![base.as_str(), MODEL];
    args.extend(key);
    util::client_check(server, "openai_check.py", &args);
}

#[test]
fn the_official_openai_client_streams_completes_and_gets_typed_errors() {
    let server = Server::start(&[]);
    openai_check(&server, None);
    let metrics = server.http_get("/metrics").1;
    assert!(
        metrics.contains(r#"requests_total{api="openai",outcome="length"}"#),
        "{metrics}"
    );
}

#[test]
fn curl_receives_each_token_as_a_server_sent_event() {
    let server = Server::start(&[]);
    let body = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6,
        "temperature": 0, "stream": true, "ignore_eos": true});
    let out = Command::new("curl")
        .args(["-sS", "-N", "-D", "-", "--max-time", "30", "-H"])
        .arg("Content-Type: application/json")
        .args(["-d", &body.to_string()])
        .arg(format!("http://127.0.0.1:{}/v1/completions", server.port))
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("Content-Type: text/event-stream"), "{head}");
    assert!(head.contains("Transfer-Encoding: chunked"), "{head}");
    let data = sse_data(body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let texts: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(texts.len(), 6, "one event per token: {body}");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[test]
fn one_connection_serves_pipelined_requests_in_order() {
    let server = Server::start(&[]);
    let mut c = HttpConn::connect(server.port);
    let completion = json!({"prompt": "Hello", "max_tokens": 2, "temperature": 0}).to_string();
    // Two GETs, a POST with a chunked body and one with Expect: 100-continue,
    // all written at once before any answer is read.
    let (a, b) = completion.split_at(7);
    let count = r#"{"prompt":"Hi"}"#;
    let wire = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\n\r\n\
         GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n\
         POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n\
         POST /tokenize HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n{count}",
        a.len(),
        b.len(),
        count.len()
    );
    c.send(wire.as_bytes());
    let health = c.read_response();
    assert_eq!(
        (health.status, health.header("connection")),
        (200, Some("keep-alive"))
    );
    let models = c.read_response();
    assert_eq!(models.json()["data"][0]["id"], MODEL);
    let done = c.read_response();
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(done.json()["usage"]["completion_tokens"], 2);
    let counted = c.read_response();
    assert_eq!(counted.json()["count"], 2, "{}", counted.body); // BOS, "Hi"
    // And the connection stays open for more, here a streamed one.
    c.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": true}),
    );
    let streamed = c.read_response();
    assert_eq!(sse_data(&streamed.body).last().unwrap(), "[DONE]");
    // `Connection: close` is honoured.
    c.send(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(c.read_response().header("connection"), Some("close"));
    let mut rest = Vec::new();
    c.stream().read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

/// The engine's status, through a WebSocket client.
fn active(c: &mut util::Client) -> u64 {
    c.send(json!({"op": "status"}));
    loop {
        let ev = c.recv();
        if ev["op"] == "status" {
            return ev["busy_slots"].as_u64().unwrap() + ev["queued"].as_u64().unwrap();
        }
    }
}

#[test]
fn a_client_gone_mid_stream_frees_its_slot_at_once() {
    let server = Server::start(&[]);
    let mut ws = server.connect();
    let mut c = HttpConn::connect(server.port);
    c.post(
        "/v1/completions",
        &json!({"prompt": "Tell a long story.", "max_tokens": 3000, "ignore_eos": true, "stream": true}),
    );
    let head = c.read_head();
    assert_eq!(head.status, 200);
    assert!(c.read_chunk().unwrap().starts_with("data: "));
    assert_eq!(active(&mut ws), 1);
    drop(c);
    let start = Instant::now();
    while active(&mut ws) != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the request still runs after its client left:\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.wait_log("aborted: the client went away");
    let end = ws.infer("after", "Hi", json!({"max_tokens": 2}));
    assert_eq!(end.op(), "end");
}

#[test]
fn a_prefix_cached_over_websocket_is_a_hit_over_http() {
    let server = Server::start(&[]);
    let system = "You are a careful assistant. ".repeat(20);
    let messages =
        json!([{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]);
    let mut ws = server.connect();
    ws.send(json!({"op": "infer", "id": "w", "messages": messages, "params": {"max_tokens": 2}}));
    assert_eq!(ws.collect("w").op(), "end");
    let mut c = HttpConn::connect(server.port);
    c.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 2}),
    );
    let usage = c.read_response().json()["usage"].clone();
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 128, "{usage}");
}

/// A raw request on a fresh connection; returns the response.
fn ask(port: u16, raw: &[u8]) -> util::HttpResponse {
    let mut c = HttpConn::connect(port);
    c.send(raw);
    c.read_response()
}

fn error_of(r: &util::HttpResponse) -> Value {
    r.json()["error"].clone()
}

#[test]
fn bad_http_requests_get_clear_errors_and_hurt_no_one() {
    let server =
        Server::start_with_config("openai-bad", "[server]\nhandshake_timeout_s = 1.0\n", &[]);
    let port = server.port;
    let mut ws = server.connect();
    ws.send(
        json!({"op": "infer", "id": "bystander", "prompt": "Count to ten:",
        "params": {"max_tokens": 48, "ignore_eos": true, "temp": 0}}),
    );

    let post = |path: &str, body: &str| {
        ask(
            port,
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    let r = post("/v1/chat/completions", "{oops");
    assert_eq!(r.status, 400);
    assert_eq!(error_of(&r)["type"], "invalid_request_error");
    assert!(
        error_of(&r)["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    let r = post(
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}"#,
    );
    assert_eq!(
        (r.status, error_of(&r)["param"].clone()),
        (400, json!("max_tokens"))
    );
    let r = post("/v1/completions", r#"{"prompt":"x","n":3}"#);
    assert_eq!((r.status, error_of(&r)["param"].clone()), (400, json!("n")));
    let r = post("/v1/completions", r#"{"prompt":"x","model":"llama-70b"}"#);
    assert_eq!(
        (r.status, error_of(&r)["code"].clone()),
        (404, json!("model_not_found"))
    );
    let r = ask(port, b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.status, 404);
    let r = ask(
        port,
        b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(r.status, 405);
    let r = ask(
        port,
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
    );
    assert_eq!(r.status, 413);
    let r = ask(
        port,
        b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    );
    assert_eq!(r.status, 400);
    let r = ask(port, b"\x16\x03\x01 not http at all\r\n\r\n");
    assert_eq!(r.status, 400);
    // A non-ASCII byte right after /v1/models (this once sliced a character).
    let r = ask(
        port,
        "GET /v1/modelsé HTTP/1.1\r\nHost: x\r\n\r\n".as_bytes(),
    );
    assert!(matches!(r.status, 400 | 404), "{}", r.status);
    let r = ask(
        port,
        "GET /v1/models/é HTTP/1.1\r\nHost: x\r\n\r\n".as_bytes(),
    );
    assert!(matches!(r.status, 400 | 404), "{}", r.status);

    // A body that never finishes (slowloris): the connection is dropped at
    // the request timeout, and nobody else notices.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(
        &mut slow,
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"prompt\":",
    )
    .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let n = slow.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the server answered a half-sent request");
    assert!(start.elapsed() < Duration::from_secs(4));

    let bystander = ws.collect("bystander");
    assert_eq!((bystander.op(), bystander.reason()), ("end", "length"));
    assert_eq!(bystander.tokens.len(), 48);
}

#[test]
fn api_keys_guard_every_route_but_health() {
    let server = Server::start(&["--api-key", "key-one-1234", "--api-key", "key-two-5678"]);
    let port = server.port;
    openai_check(&server, Some("key-two-5678"));

    let get = |path: &str, auth: &str| {
        ask(
            port,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes(),
        )
    };
    assert_eq!(get("/health", "").status, 200);
    let r = get("/metrics", "");
    assert_eq!(
        (r.status, r.header("www-authenticate")),
        (401, Some("Bearer"))
    );
    assert_eq!(error_of(&r)["type"], "authentication_error");
    assert_eq!(
        get("/metrics", "Authorization: Bearer nope\r\n").status,
        401
    );
    assert_eq!(
        get("/metrics", "Authorization: Bearer key-one-1234\r\n").status,
        200
    );
    assert_eq!(get("/?api_key=key-one-1234", "").status, 200);
    // A CORS preflight carries no key.
    assert_eq!(
        ask(port, b"OPTIONS /v1/models HTTP/1.1\r\nHost: x\r\n\r\n").status,
        204
    );

    // WebSocket: refused without a key; the header, a subprotocol or the query carries one.
    // The handshake's answer: the subprotocol chosen, or the refusal's status.
    let ws = |url: String, header: Option<(&'static str, &str)>| -> Result<String, u16> {
        let mut req = url.into_client_request().unwrap();
        if let Some((name, value)) = header {
            req.headers_mut().insert(name, value.parse().unwrap());
        }
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        match tungstenite::client(req, stream) {
            Ok((_, r)) => Ok(r
                .headers()
                .get("sec-websocket-protocol")
                .map_or(String::new(), |v| v.to_str().unwrap().to_owned())),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                Err(r.status().as_u16())
            }
            Err(e) => panic!("handshake: {e}"),
        }
    };
    let base = format!("ws://127.0.0.1:{port}/");
    assert_eq!(ws(base.clone(), None), Err(401));
    assert_eq!(
        ws(base.clone(), Some(("Authorization", "Bearer key-two-5678"))),
        Ok(String::new())
    );
    assert_eq!(ws(format!("{base}?api_key=wrong"), None), Err(401));
    assert_eq!(
        ws(format!("{base}?api_key=key-two-5678"), None),
        Ok(String::new())
    );
    let offered = "inference-core.v1, bearer.key-one-1234";
    assert_eq!(
        ws(base.clone(), Some(("Sec-WebSocket-Protocol", offered))),
        Ok("inference-core.v1".into())
    );
    // With the key in a query, an offered protocol is answered all the same.
    assert_eq!(
        ws(
            format!("{base}?api_key=key-two-5678"),
            Some(("Sec-WebSocket-Protocol", "inference-core.v1"))
        ),
        Ok("inference-core.v1".into())
    );

    let log = server.log_text();
    assert!(log.contains("API keys: 2"), "{log}");
    assert!(
        !log.contains("key-one-1234") && !log.contains("key-two-5678"),
        "a key was logged"
    );
}

#[test]
fn without_keys_the_log_says_there_is_no_authentication() {
    let server = Server::start(&[]);
    server.wait_log("no API keys set");
    // A browser that offers a subprotocol fails the handshake unless it
    // gets one back (tungstenite's client too).
    let mut req = format!("ws://127.0.0.1:{}/", server.port)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "inference-core.v1".parse().unwrap(),
    );
    let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let (_, r) = tungstenite::client(req, stream).expect("the handshake");
    assert_eq!(r.headers()["sec-websocket-protocol"], "inference-core.v1");
}

#[test]
fn browsers_from_allowed_origins_get_cors_answers() {
    let server = Server::start_with_config(
        "openai-cors",
        "[server]\ncors_origins = [\"https://chat.example\"]\n",
        &[],
    );
    let preflight = |origin: &str| {
        ask(
            server.port,
            format!(
                "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\n\
                 Access-Control-Request-Method: POST\r\n\
                 Access-Control-Request-Headers: authorization, content-type, x-stainless-lang\r\n\r\n"
            )
            .as_bytes(),
        )
    };
    let r = preflight("https://chat.example");
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://chat.example")
    );
    // What it asks for: the OpenAI SDKs send headers of their own.
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("authorization, content-type, x-stainless-lang")
    );
    assert!(
        r.header("access-control-allow-methods")
            .unwrap()
            .contains("POST")
    );
    let r = preflight("https://evil.example");
    assert_eq!(r.header("access-control-allow-origin"), None);
    let r = ask(
        server.port,
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nOrigin: https://chat.example\r\n\r\n",
    );
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://chat.example")
    );
}

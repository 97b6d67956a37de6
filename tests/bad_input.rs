//! Every kind of bad input gets a specific error event; the connection stays
//! open and other requests and connections are untouched.

mod util;

use serde_json::{Value, json};
use tungstenite::Message;
use util::Server;

fn expect_error(ev: &Value, code: &str, needle: &str) {
    assert_eq!(ev["op"], "error", "{ev}");
    assert_eq!(ev["code"], code, "{ev}");
    let msg = ev["message"].as_str().unwrap();
    assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
}

#[test]
fn each_bad_message_gets_a_clear_error_and_the_connection_stays_usable() {
    let server = Server::start(&[]);
    let mut other = server.connect();
    other.send(json!({"op":"infer","id":"bystander","prompt":"Write a story:","params":{"temp":0,"max_tokens":60,"ignore_eos":true}}));

    let mut c = server.connect();
    let cases: &[(&str, &str, &str)] = &[
        ("{oops", "bad_request", "malformed JSON"),
        ("42", "bad_request", "JSON object"),
        (r#"{"op":"fly"}"#, "bad_request", "unknown op"),
        (r#"{"id":"x"}"#, "bad_request", "missing \"op\""),
        (
            r#"{"op":"infer","id":"t1","prompt":7}"#,
            "bad_request",
            "invalid type",
        ),
        (
            r#"{"op":"infer","id":"t2"}"#,
            "bad_request",
            "missing \"prompt\"",
        ),
        (
            r#"{"op":"infer","id":"t3","prompt":""}"#,
            "bad_request",
            "empty",
        ),
        (
            r#"{"op":"infer","id":"t4","prompt":"x","params":{"temprature":0.2}}"#,
            "bad_request",
            "unknown field `temprature`",
        ),
        (
            r#"{"op":"infer","id":"t8","prompt":"x","params":{"temp":0.2,"temperature":0.2}}"#,
            "bad_request",
            "give one",
        ),
        (
            r#"{"op":"infer","id":"t9","prompt":"x","params":{"seed":-7}}"#,
            "bad_request",
            "params.seed = -7",
        ),
        (
            r#"{"op":"infer","id":"t5","prompt":"x","params":{"top_p":3}}"#,
            "bad_request",
            "params.top_p",
        ),
        (
            r#"{"op":"infer","id":"t6","prompt":"x","params":{"max_tokens":"many"}}"#,
            "bad_request",
            "invalid type",
        ),
        (
            r#"{"op":"infer","id":"t7","messages":[{"role":"wizard","content":"x"}]}"#,
            "bad_request",
            "unknown variant",
        ),
    ];
    for (raw, code, needle) in cases {
        c.send_raw(raw);
        let ev = c.recv();
        expect_error(&ev, code, needle);
        if let Some(id) = serde_json::from_str::<Value>(raw)
            .ok()
            .and_then(|v| v.get("id").cloned())
            && id.as_str().is_some_and(|s| s.starts_with('t'))
        {
            assert_eq!(ev["id"], id, "error should carry the request id: {ev}");
        }
    }
    c.ws.send(Message::binary(vec![1u8, 2, 3])).unwrap();
    expect_error(&c.recv(), "bad_request", "binary frames");
    // Aborting what is not running is no error: abort is idempotent, so the
    // next event is the status asked for after it.
    c.send(json!({"op":"abort","id":"nothing-here"}));
    c.send(json!({"op":"abort"}));
    c.send(json!({"op":"status"}));
    assert_eq!(c.recv()["op"], "status");

    // Still usable.
    let ok = c.infer("fine", "Hello", json!({"temp":0,"max_tokens":3}));
    assert_eq!(ok.op(), "end", "{}", ok.last);
    // And the other client never noticed.
    let bystander = other.collect("bystander");
    assert_eq!(bystander.op(), "end", "{}", bystander.last);
    assert_eq!(bystander.reason(), "length");
}

#[test]
fn prompt_longer_than_the_context_is_a_context_overflow() {
    let server = Server::start(&["-c", "256"]);
    let mut c = server.connect();
    let out = c.infer("big", &"hello world ".repeat(400), json!({}));
    assert_eq!(out.op(), "error");
    expect_error(&out.last, "context_overflow", "context holds 256");
    assert_eq!(out.last["id"], "big");
    let ok = c.infer("small", "hello", json!({"max_tokens":2}));
    assert_eq!(ok.op(), "end");
}

#[test]
fn duplicate_id_and_too_many_in_flight_are_refused() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    let p = json!({"max_tokens":40,"ignore_eos":true});
    c.send(json!({"op":"infer","id":"same","prompt":"a","params":p}));
    c.send(json!({"op":"infer","id":"same","prompt":"b","params":p}));
    // The refusal carries no id, so a client that ends a request on an error
    // with its id does not drop the live stream; that stream runs to its end.
    let mut refused = 0;
    let mut tokens = 0;
    let end = loop {
        let ev = c.recv();
        match ev["op"].as_str().unwrap() {
            "error" => {
                expect_error(&ev, "bad_request", "already in flight");
                assert_eq!(ev["id"], Value::Null, "{ev}");
                refused += 1;
            }
            "token" => tokens += 1,
            "end" => break ev,
            _ => panic!("unexpected {ev}"),
        }
    };
    assert_eq!(refused, 1);
    assert_eq!(
        (&end["id"], &end["reason"]),
        (&json!("same"), &json!("length"))
    );
    assert_eq!(end["stats"]["completion_tokens"], 40);
    assert!(tokens > 0);

    // The default limit is 8 per connection: long requests keep all 8 in flight.
    let long = json!({"max_tokens":300,"ignore_eos":true});
    for i in 0..9 {
        c.send(json!({"op":"infer","id":format!("n{i}"),"prompt":"a","params":long}));
    }
    let refused = c.collect("n8");
    expect_error(&refused.last, "overloaded", "in flight");
    c.send(json!({"op":"abort"}));
    let mut ended = 0;
    while ended < 8 {
        let ev = c.recv();
        if ev["op"] == "end" {
            assert_eq!(ev["reason"], "abort", "{ev}");
            ended += 1;
        }
    }
}

#[test]
fn an_unsupported_websocket_version_gets_426_naming_ours() {
    use std::io::{Read, Write};
    let server = Server::start(&[]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 426 "), "{answer}");
    assert!(
        answer.contains("\r\nSec-WebSocket-Version: 13\r\n"),
        "{answer}"
    );
}

#[test]
fn oversized_message_gets_an_error_then_a_close() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    let huge = format!(r#"{{"op":"infer","prompt":"{}"}}"#, "a".repeat(2 << 20));
    let _ = c.ws.send(Message::text(huge));
    expect_error(&c.recv(), "bad_request", "message rejected");
    // The server closes with 1009 (message too big); other clients are fine.
    c.expect_close(1009);
    let mut d = server.connect();
    assert_eq!(d.infer("ok", "hi", json!({"max_tokens":1})).op(), "end");
}

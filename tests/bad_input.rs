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
            r#"{"op":"infer","id":"t4","prompt":"x","params":{"temperature":0.2}}"#,
            "bad_request",
            "unknown field `temperature`",
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
        (
            r#"{"op":"abort","id":"nothing-here"}"#,
            "bad_request",
            "no request with id",
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
    // The refusal arrives before anything of the second; events of the first may interleave.
    loop {
        let ev = c.recv();
        if ev["op"] == "error" {
            expect_error(&ev, "bad_request", "already in flight");
            break;
        }
    }
    c.send(json!({"op":"abort"}));
    assert_eq!(c.collect("same").reason(), "abort");

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
fn oversized_message_gets_an_error_then_a_close() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    let huge = format!(r#"{{"op":"infer","prompt":"{}"}}"#, "a".repeat(2 << 20));
    let _ = c.ws.send(Message::text(huge));
    expect_error(&c.recv(), "bad_request", "message rejected");
    // The server closes with 1009 (message too big); other clients are fine.
    let mut d = server.connect();
    assert_eq!(d.infer("ok", "hi", json!({"max_tokens":1})).op(), "end");
}

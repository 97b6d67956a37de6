//! Priority and deadlines with the real model: a higher-priority request
//! overtakes the queue, and a request past its `deadline_ms` ends with
//! reason `deadline`, queued or running, on both APIs.

mod util;

use serde_json::json;
use util::{HttpConn, Server};

#[test]
fn a_higher_priority_request_overtakes_the_queue() {
    let server = Server::start(&["--parallel", "1"]);
    let mut c = server.connect();
    let long = json!({"temp": 0, "max_tokens": 64, "ignore_eos": true});
    c.send(json!({"op": "infer", "id": "running", "prompt": "Once upon a time", "params": long}));
    // The first token means it holds the only slot.
    assert_eq!(c.recv()["op"], "token");
    let short = json!({"temp": 0, "max_tokens": 4, "ignore_eos": true});
    c.send(json!({"op": "infer", "id": "batch", "prompt": "A", "params": short, "priority": 0}));
    c.send(json!({"op": "infer", "id": "voice", "prompt": "B", "params": short, "priority": 5}));
    let mut ends = Vec::new();
    let mut voice_positions = Vec::new();
    while ends.len() < 3 {
        let ev = c.recv();
        match ev["op"].as_str().unwrap() {
            "end" => ends.push(ev["id"].as_str().unwrap().to_owned()),
            "queued" if ev["id"] == "voice" => voice_positions.push(ev["position"].clone()),
            "error" => panic!("{ev}"),
            _ => {}
        }
    }
    assert_eq!(ends, ["running", "voice", "batch"]);
    assert_eq!(
        voice_positions.last(),
        Some(&json!(1)),
        "{voice_positions:?}"
    );
}

#[test]
fn deadlines_end_requests_queued_or_running() {
    let server = Server::start(&["--parallel", "1"]);
    let mut c = server.connect();
    let long = json!({"temp": 0, "max_tokens": 4000, "ignore_eos": true});
    c.send(
        json!({"op": "infer", "id": "r", "prompt": "Once upon a time", "params": long,
        "deadline_ms": 400}),
    );
    c.send(
        json!({"op": "infer", "id": "q", "prompt": "Hi", "params": {"max_tokens": 4},
        "deadline_ms": 100}),
    );
    let queued = c.collect("q");
    assert_eq!(queued.reason(), "deadline", "{}", queued.last);
    assert_eq!(queued.last["stats"]["completion_tokens"], 0);
    let running = c.collect("r");
    assert_eq!(running.reason(), "deadline", "{}", running.last);
    let n = running.last["stats"]["completion_tokens"].as_u64().unwrap();
    assert!(n > 0 && n < 4000, "{n} tokens in 400 ms");
    // The OpenAI API: a reply cut by its deadline says "length".
    let mut http = HttpConn::connect(server.port);
    http.post(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true,
            "deadline_ms": 300}),
    );
    let r = http.read_response();
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    http.post("/v1/completions", &json!({"prompt": "x", "deadline_ms": 0}));
    let r = http.read_response();
    assert_eq!(
        (r.status, r.json()["error"]["param"].as_str()),
        (400, Some("deadline_ms"))
    );
}

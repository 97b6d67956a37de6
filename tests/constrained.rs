//! Structured output with the real model: constrained generations checked by
//! independent validators and a tool-call round trip with the official
//! `openai` package (tests/clients/structured_check.py), and constrained
//! streams batched with unconstrained ones.

mod util;

use serde_json::json;
use util::{Client, Server};

const MODEL: &str = "gemma-3-270m-q4_k_m";

#[test]
fn constrained_output_always_parses_and_tool_calls_round_trip() {
    let server = Server::start(&[]);
    let port = server.port.to_string();
    util::client_check(&server, "structured_check.py", &[&port, MODEL]);
    assert!(!server.log_text().contains("panicked"));
}

/// Masks are per row: a greedy stream batched with constrained ones writes
/// what it writes alone (up to the near-ties batching itself moves, see
/// tests/batching.rs), and the constrained ones still match.
#[test]
fn a_constrained_stream_leaves_the_others_in_its_batch_alone() {
    let server = Server::start(&[]);
    let prompt = "The history of the Roman Empire began";
    let plain = json!({"temp": 0, "max_tokens": 48, "ignore_eos": true});
    let tokens = |out: &util::Outcome| -> Vec<(String, f64)> {
        out.tokens
            .iter()
            .map(|t| {
                (
                    t["content"].as_str().unwrap().to_owned(),
                    t["prob"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let alone = tokens(&server.connect().infer("alone", prompt, plain.clone()));
    let mut plain_client = server.connect();
    let mut guided: Vec<Client> = (0..3).map(|_| server.connect()).collect();
    for (i, c) in guided.iter_mut().enumerate() {
        c.send(json!({"op": "infer", "id": format!("g{i}"), "prompt": "A date:",
            "params": {"temp": 1.0, "seed": i, "regex": "[0-9]{4}-[0-9]{2}-[0-9]{2}", "max_tokens": 32}}));
    }
    let batched = tokens(&plain_client.infer("plain", prompt, plain));
    if let Some(at) = alone.iter().zip(&batched).position(|(a, b)| a.0 != b.0) {
        assert!(at >= 3, "the greedy text parts at token {at}");
        assert!(
            alone[at].1 < 0.6 && batched[at].1 < 0.6,
            "a confident choice flipped beside constrained streams: {:?} vs {:?}",
            alone[at],
            batched[at]
        );
    }
    for (i, c) in guided.iter_mut().enumerate() {
        let out = c.collect(&format!("g{i}"));
        let text = out.text();
        assert_eq!(out.reason(), "eos", "{}", out.last);
        let digits: Vec<&str> = text.split('-').collect();
        assert!(
            digits.len() == 3 && digits.iter().all(|d| d.chars().all(|c| c.is_ascii_digit())),
            "{text:?}"
        );
    }
}

/// Off in the config: no memory spent, and constrained requests are told why.
#[test]
fn constraints_can_be_switched_off() {
    let server =
        Server::start_with_config("no-constraints", "[constraints]\nenabled = false\n", &[]);
    let mut c = server.connect();
    let out = c.infer("r", "x", json!({"regex": "[a-z]+"}));
    assert_eq!(out.last["code"], "bad_request", "{}", out.last);
    let message = out.last["message"].as_str().unwrap();
    assert!(message.contains("constraints.enabled = false"), "{message}");
    let out = c.infer(
        "ok",
        "The capital of France is",
        json!({"temp": 0, "max_tokens": 3}),
    );
    assert_eq!(out.op(), "end");
}

//! Speculative decoding on the real model: a request that copies text from
//! its prompt is drafted from that text and verified in the same steps, and
//! its greedy reply is exactly the one plain decoding gives, stop strings
//! and log-probabilities included. A sampled one draws from the same
//! distribution with the same draws; it is the plain one too except where
//! a near-tie rounds the other way in a wider batch (as it can beside other
//! streams without drafts), so it is checked for its drafts, not its text.
//! A request's own `draft_max` of 0 turns drafts off for it alone.
//! Speed is measured by `python3 benches/speculate.py`, not here.

mod util;

use serde_json::{Value, json};
use util::Server;

const PARAGRAPH: &str = "The lighthouse keeper climbed the spiral stairs every evening at dusk, \
carrying a can of oil and a cloth for the great lens. From the gallery he could see the fishing \
boats returning to the harbour, their lamps swinging with the swell, and beyond them the dark line \
of the northern cliffs where the gulls nested in spring.";

fn copy_prompt() -> String {
    format!(
        "Text: The cat sat on the mat.\nCopy: The cat sat on the mat.\n\nText: {PARAGRAPH}\nCopy:"
    )
}

/// Each request's text, reason and stats, one after the other on one connection.
fn replies(server: &Server, requests: &[Value]) -> Vec<(String, String, Value)> {
    let mut c = server.connect();
    requests
        .iter()
        .enumerate()
        .map(|(i, params)| {
            let out = c.infer(&format!("r{i}"), &copy_prompt(), params.clone());
            assert_eq!(out.op(), "end", "{}", out.last);
            (
                out.text(),
                out.reason().to_string(),
                out.last["stats"].clone(),
            )
        })
        .collect()
}

#[test]
fn drafted_replies_are_the_plain_ones() {
    let requests = [
        json!({"temp": 0, "max_tokens": 96, "ignore_eos": true}),
        json!({"temp": 0.8, "seed": 7, "max_tokens": 96, "ignore_eos": true}),
        json!({"temp": 0, "max_tokens": 96, "stop": ["fishing"]}),
        json!({"temp": 0, "max_tokens": 96, "logprobs": 2}),
        // A request of its own without drafts: token by token, the same text.
        json!({"temp": 0, "max_tokens": 96, "ignore_eos": true, "draft_max": 0}),
    ];
    // No prefix cache, so both servers compute every prompt the same way.
    let plain = Server::start_with_config(
        "speculate-plain",
        "[scheduler]\ndraft_max = 0\nprefix_cache_entries = 0\n",
        &[],
    );
    let want = replies(&plain, &requests);
    drop(plain);
    let drafting = Server::start_with_config(
        "speculate-on",
        "[scheduler]\ndraft_max = 48\nprefix_cache_entries = 0\n",
        &[],
    );
    let got = replies(&drafting, &requests);
    assert!(
        want[0].0.starts_with(" The lighthouse keeper"),
        "the model copies: {:?}",
        want[0].0
    );
    for (i, ((text, reason, stats), (plain_text, plain_reason, plain_stats))) in
        got.iter().zip(&want).enumerate()
    {
        if requests[i]["temp"] == 0 {
            assert_eq!(text, plain_text, "request {i}");
        }
        assert_eq!(reason, plain_reason, "request {i}");
        assert_eq!(stats["completion_tokens"], plain_stats["completion_tokens"]);
        assert_eq!(plain_stats["draft_tokens"], 0);
        let (drafted, accepted) = (
            stats["draft_tokens"].as_u64().unwrap(),
            stats["draft_accepted"].as_u64().unwrap(),
        );
        assert!(accepted <= drafted, "{stats}");
    }
    assert_eq!(
        want[2].1, "stop",
        "the stop string ends it: {:?}",
        want[2].0
    );
    // The copies were drafted and most drafts were right.
    for (_, _, stats) in &got[..2] {
        let (drafted, accepted) = (
            stats["draft_tokens"].as_u64().unwrap(),
            stats["draft_accepted"].as_u64().unwrap(),
        );
        assert!(accepted >= 30 && accepted * 2 >= drafted, "{stats}");
    }
    assert_eq!(got[4].0, got[0].0);
    assert_eq!(got[4].2["draft_tokens"], 0, "{}", got[4].2);
}

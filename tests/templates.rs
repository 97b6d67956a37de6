//! Jinja chat templates (as current GGUFs ship them) rendered by minijinja,
//! with the real model: Gemma's Jinja template gives exactly the tokens of
//! llama.cpp's built-in `gemma`, ChatML serves chats, and a template that
//! does not parse stops the start with a message.

mod util;

use std::process::Command;

use serde_json::{Value, json};
use util::{BIN, Client, Server};

/// Gemma's template as its instruction-tuned GGUFs ship it.
const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn count(c: &mut Client, messages: &Value) -> Value {
    c.send(json!({"op": "tokenize", "id": "n", "messages": messages}));
    loop {
        let ev = c.recv();
        if ev["id"] == "n" {
            return ev;
        }
    }
}

#[test]
fn gemmas_jinja_template_gives_the_builtins_tokens() {
    let messages = json!([
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "  Capital of France? "},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "<end_of_turn> and of Italy?"},
    ]);
    let builtin = Server::start(&[]);
    let expected = count(&mut builtin.connect(), &messages);
    drop(builtin);
    let jinja = Server::start(&["--chat-template", GEMMA]);
    let mut c = jinja.connect();
    let got = count(&mut c, &messages);
    assert_eq!(got["op"], "tokens", "{got}");
    assert_eq!(
        got["count"], expected["count"],
        "jinja {got} vs built-in {expected}"
    );
    c.send(json!({"op": "infer", "id": "r", "messages": messages, "params": {"max_tokens": 3}}));
    assert_eq!(c.collect("r").op(), "end");
    // The template's own error is the request's, and the server goes on.
    let twice = json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]);
    let err = count(&mut c, &twice);
    assert_eq!(err["code"], "bad_request", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("must alternate"),
        "{err}"
    );
    assert_eq!(c.infer("after", "Hi", json!({"max_tokens": 2})).op(), "end");
}

#[test]
fn chatml_as_jinja_serves_chats_over_both_apis() {
    let server = Server::start(&["--chat-template", CHATML]);
    let mut c = server.connect();
    let messages =
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]);
    c.send(json!({"op": "infer", "id": "r", "messages": messages, "params": {"max_tokens": 2}}));
    assert_eq!(c.collect("r").op(), "end");
    let mut h = util::HttpConn::connect(server.port);
    h.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 2}),
    );
    let r = h.read_response();
    assert_eq!(r.status, 200, "{}", r.body);
    // <|im_start|> is not a control token of this model: the rendered text
    // is tokenized as text, so the prompt is longer than the bare messages.
    assert!(r.json()["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
}

#[test]
fn a_template_that_does_not_parse_stops_the_start() {
    let out = Command::new(BIN)
        .args([
            "--port",
            "0",
            "--chat-template",
            "{% for m in messages %}{{ m.content }",
        ])
        .env("INFERENCE_CORE_STATE", util::fresh_dir("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chat template"), "{err}");
    assert!(err.contains("syntax error"), "{err}");
}

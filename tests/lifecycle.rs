//! Process-level behaviour: start-up errors, HTTP routes, signals.

mod util;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use util::{BIN, Server};

#[test]
fn missing_model_is_one_clear_error_and_a_failure_exit() {
    let out = Command::new(BIN)
        .args(["-m", "/nonexistent/model.gguf", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = err.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains("model file not found: /nonexistent/model.gguf"),
        "{err}"
    );
}

#[test]
fn corrupt_model_is_one_clear_error_and_a_failure_exit() {
    let dir = std::env::temp_dir().join(format!("ic-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.gguf");
    std::fs::write(&path, b"this is not a gguf file at all, just some bytes").unwrap();
    let out = Command::new(BIN)
        .args(["-m", path.to_str().unwrap(), "--port", "0"])
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = err.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("cannot load model"), "{err}");
}

#[test]
fn bad_flag_and_bad_config_fail_with_a_message() {
    let out = Command::new(BIN)
        .args(["--ctx-size", "lots"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let dir = std::env::temp_dir().join(format!("ic-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(&path, "[server]\nprot = 1\n").unwrap();
    let out = Command::new(BIN)
        .args(["--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `prot`"));
}

#[test]
fn shipped_config_file_starts_the_server() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/inference-core.toml");
    let server = Server::start(&["--config", config]);
    let mut c = server.connect();
    assert_eq!(c.infer("x", "Hi", json!({"max_tokens":2})).op(), "end");
}

#[test]
fn health_and_unknown_routes() {
    let server = Server::start(&[]);
    let (status, body) = server.http_get("/health");
    assert_eq!(status, 200);
    assert_eq!(body.trim(), r#"{"status":"ready"}"#);
    assert_eq!(server.http_get("/nope").0, 404);
}

#[test]
fn sigterm_while_streaming_gives_a_final_event_and_exit_zero() {
    let mut server = Server::start(&[]);
    let mut c = server.connect();
    let mut idle = server.connect();
    c.send(json!({"op":"infer","id":"s","prompt":"Tell a long story:","params":{"max_tokens":500,"ignore_eos":true}}));
    assert_eq!(c.recv()["op"], "token");
    server.signal("TERM");
    let out = c.collect("s");
    assert_eq!(out.op(), "error", "{}", out.last);
    assert_eq!(out.last["code"], "shutting_down");
    // Both connections are closed cleanly (close frame 1001), then the process exits 0.
    for client in [&mut c, &mut idle] {
        client.expect_close(1001);
    }
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", server.log_text());
}

#[test]
fn sigint_when_idle_exits_zero() {
    let mut server = Server::start(&[]);
    server.signal("INT");
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

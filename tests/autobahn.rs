//! WebSocket conformance: the Autobahn test cases, run by the PyPI package
//! `kosoku` (scripts/setup.sh --tests installs it) in fuzzingclient mode
//! against the test-only echo route of the real reactor. Every case outside
//! compression (12.*, 13.*: permessage-deflate, which the server does not
//! offer) must pass. The report is written to target/tmp/autobahn/
//! (index.json, and an HTML page per case).

mod util;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use util::Server;

/// The echo route, and limits high enough for the 16 MiB messages of 9.*.
const ECHO_CONFIG: &str = r#"
[server]
echo_path = "/echo"
max_message_bytes = 67108864
max_frame_bytes = 67108864
max_write_buffer_bytes = 67108864
"#;

/// Verdicts Autobahn itself counts as a pass.
fn passes(verdict: &str) -> bool {
    matches!(verdict, "OK" | "NON-STRICT" | "INFORMATIONAL")
}

#[test]
fn autobahn_cases_pass_on_the_echo_route() {
    let server = Server::start_with_config("autobahn", ECHO_CONFIG, &[]);
    let outdir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("autobahn");
    let _ = std::fs::remove_dir_all(&outdir);
    let url = format!("ws://127.0.0.1:{}/echo", server.port);
    // The console script may not be on PATH (pip --user): call its entry point.
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys; from kosoku._cli import main; sys.argv[0] = 'kosoku'; main()",
            &url,
            "-x",
            "12.*",
            "-x",
            "13.*",
            "-p",
            "4",
            "-o",
            outdir.to_str().unwrap(),
        ])
        .output()
        .expect("run python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'kosoku'"),
        "kosoku is not installed: run scripts/setup.sh --tests"
    );
    let index = std::fs::read_to_string(outdir.join("index.json")).unwrap_or_else(|e| {
        panic!(
            "kosoku wrote no report ({e}); stdout:\n{}\nstderr:\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let index: Value = serde_json::from_str(&index).unwrap();
    let cases = index.as_object().unwrap().values().next().unwrap();
    let cases = cases.as_object().unwrap();

    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = Vec::new();
    for (id, case) in cases {
        assert!(
            !id.starts_with("12.") && !id.starts_with("13."),
            "case {id} should be excluded"
        );
        let behavior = case["behavior"].as_str().unwrap();
        let close = case["behaviorClose"].as_str().unwrap();
        *tally.entry(behavior.to_owned()).or_default() += 1;
        if !passes(behavior) || !passes(close) {
            failed.push(format!("{id}: {behavior} / close {close}"));
        }
    }
    eprintln!(
        "autobahn: {} cases, by verdict {tally:?}; report in {}",
        cases.len(),
        outdir.display()
    );
    // Sections 1 to 10 without compression hold 301 cases.
    assert!(cases.len() >= 300, "only {} cases ran", cases.len());
    assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
    assert!(out.status.success(), "kosoku failed:\n{stderr}");
    // The echo route never reached the engine, and the server is still serving.
    assert!(
        !server.log_text().contains("request "),
        "{}",
        server.log_text()
    );
    let c = server.connect();
    assert_eq!(c.hello["op"], "hello");
}

#[test]
fn echo_route_is_off_by_default() {
    let server = Server::start(&[]);
    let stream = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let url = format!("ws://127.0.0.1:{}/echo", server.port);
    let (mut ws, _) = tungstenite::client(url, stream).unwrap();
    // Without echo_path, /echo is the ordinary API: it greets and answers JSON errors.
    let hello = ws.read().unwrap();
    assert!(hello.to_text().unwrap().contains("\"op\":\"hello\""));
    ws.send(tungstenite::Message::text("ping me back")).unwrap();
    let answer = ws.read().unwrap();
    assert!(
        answer.to_text().unwrap().contains("malformed JSON"),
        "{answer}"
    );
}

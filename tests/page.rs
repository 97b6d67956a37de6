//! The page at `GET /`: served from the binary, then driven end to end in
//! Debian's headless Chromium by Playwright (tests/e2e/page.mjs) against the
//! real server and model. `scripts/setup.sh` installs Chromium and the
//! driver's npm packages.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use util::Server;

const CHROMIUM: &str = "/usr/bin/chromium";

fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e")
}

/// Sends raw requests on one connection; what came back until it closed.
fn ask(port: u16, requests: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(requests.as_bytes()).unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn root_serves_the_page_as_html() {
    let server = Server::start(&[]);
    let response = ask(
        server.port,
        "GET /?from=test HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/html; charset=utf-8\r\n"),
        "{head}"
    );
    assert_eq!(body, include_str!("../src/server/page.html"));
    // Self-contained: the page loads nothing from anywhere else.
    for needle in ["src=\"http", "href=\"http", "@import", "<link"] {
        assert!(!body.contains(needle), "the page fetches {needle}...");
    }
    assert!(
        body.contains("://${location.host}/"),
        "the page connects elsewhere"
    );
    // HEAD: the same head, no body, and the kept-alive connection goes on.
    let both = ask(
        server.port,
        "HEAD / HTTP/1.1\r\nHost: localhost\r\n\r\nGET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    let (head, health) = both.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let length = format!("\r\nContent-Length: {}\r\n", body.len());
    assert!(head.contains(&length), "{head}");
    assert!(health.starts_with("HTTP/1.1 200 OK\r\n"), "{health}");
    assert!(
        health.trim_end().ends_with(r#"{"status":"ready"}"#),
        "{health}"
    );
}

#[test]
fn page_streams_shows_errors_chats_aborts_and_reports_a_lost_server() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run scripts/setup.sh (Debian package chromium)"
    );
    assert!(
        e2e_dir().join("node_modules/playwright-core").is_dir(),
        "tests/e2e/node_modules is missing: run scripts/setup.sh (npm ci in tests/e2e)"
    );
    let server = Server::start(&[]);
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("page.png");
    let mut driver = Command::new("node")
        .arg(e2e_dir().join("page.mjs"))
        .arg(server.port.to_string())
        .arg(&shot)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run node (install Node.js: scripts/setup.sh)");
    // The driver says when to stop the server, to see the page report it.
    let mut stopped = false;
    for line in BufReader::new(driver.stdout.take().unwrap()).lines() {
        let line = line.expect("read the driver's output");
        eprintln!("{line}");
        if line == "STOP_SERVER" {
            server.signal("TERM");
            stopped = true;
        }
    }
    let status = driver.wait().unwrap();
    assert!(
        status.success(),
        "tests/e2e/page.mjs failed ({status}); server log:\n{}",
        server.log_text()
    );
    assert!(stopped, "the driver never asked to stop the server");
    assert!(shot.exists(), "no screenshot at {}", shot.display());
    eprintln!("screenshot: {}", shot.display());
}

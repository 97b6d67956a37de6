//! Faults under load: SIGTERM drains within `shutdown_timeout_s` with a final
//! event for every request (running or queued); SIGKILL followed by a restart
//! on the same port comes back healthy.

mod util;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::json;
use util::Server;

#[test]
fn sigterm_under_load_gives_every_request_a_final_event_within_the_bound() {
    let mut server = Server::start_with_config(
        "faults-sigterm",
        "[server]\nshutdown_timeout_s = 3.0\n",
        &[],
    );
    // 3 clients x 4 long requests: 4 run (4 slots), the others queue.
    let mut clients: Vec<_> = (0..3).map(|_| server.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        for j in 0..4 {
            c.send(
                json!({"op":"infer","id":format!("c{i}r{j}"),"prompt":"Tell a long story:",
                "params":{"max_tokens":2000,"ignore_eos":true}}),
            );
        }
    }
    // Wait until tokens flow.
    while clients[0].recv()["op"] != "token" {}
    let signalled = Instant::now();
    server.signal("TERM");
    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            std::thread::spawn(move || {
                let mut open: HashSet<String> = (0..4).map(|j| format!("c{i}r{j}")).collect();
                while !open.is_empty() {
                    let ev = c.recv();
                    let id = ev["id"].as_str().unwrap_or("").to_owned();
                    match ev["op"].as_str().unwrap() {
                        "token" | "queued" => {}
                        "end" => assert!(open.remove(&id), "{ev}"),
                        "error" => {
                            assert_eq!(ev["code"], "shutting_down", "{ev}");
                            assert!(open.remove(&id), "{ev}");
                        }
                        _ => panic!("unexpected {ev}"),
                    }
                }
                // Then the close frame: 1001, going away.
                c.expect_close(1001);
            })
        })
        .collect();
    for r in readers {
        r.join().expect("every request got its final event");
    }
    let status = server.wait_exit(Duration::from_secs(10));
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", server.log_text());
    assert!(took < Duration::from_secs(4), "drained in {took:?}");
    eprintln!("SIGTERM under load: 12 requests ended, exit 0 after {took:?}");
}

#[test]
fn requests_sent_just_before_sigterm_still_get_their_final_event() {
    // The signal and the requests race: whichever the loop sees first, every
    // request the server received is answered before the close frame.
    for round in 0..5 {
        let mut server = Server::start(&[]);
        let mut c = server.connect();
        let ids: Vec<String> = (0..3).map(|j| format!("r{round}-{j}")).collect();
        for id in &ids {
            c.send(json!({"op":"infer","id":id,"prompt":"Tell a long story:",
                "params":{"max_tokens":500,"ignore_eos":true}}));
        }
        server.signal("TERM");
        let mut open: HashSet<String> = ids.into_iter().collect();
        while !open.is_empty() {
            let ev = c.recv();
            match ev["op"].as_str().unwrap() {
                "token" | "queued" => {}
                "end" | "error" => assert!(open.remove(ev["id"].as_str().unwrap()), "{ev}"),
                _ => panic!("unexpected {ev}"),
            }
        }
        c.expect_close(1001);
        assert_eq!(server.wait_exit(Duration::from_secs(10)).code(), Some(0));
    }
}

#[test]
fn sigkill_then_a_restart_on_the_same_port_is_healthy() {
    let mut server = Server::start(&[]);
    let port = server.port;
    let mut c = server.connect();
    c.send(json!({"op":"infer","id":"k","prompt":"Tell a long story:",
        "params":{"max_tokens":500,"ignore_eos":true}}));
    assert_eq!(c.recv()["op"], "token");
    server.signal("KILL");
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    // The socket died with the process: reading ends in an error, not a hang.
    while c.ws.read().is_ok() {}
    drop(server);

    let start = Instant::now();
    let restarted = Server::start_on(port, &[]);
    assert_eq!(restarted.port, port);
    assert_eq!(restarted.http_get("/health").0, 200);
    let mut c = restarted.connect();
    assert_eq!(c.infer("after", "Hi", json!({"max_tokens":3})).op(), "end");
    eprintln!("restart after SIGKILL: healthy in {:?}", start.elapsed());
}

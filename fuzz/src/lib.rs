//! The server's sans-I/O entry points, from the main crate's library (built
//! without llama.cpp): `protocol::parse` (one client text frame) and
//! `feed::feed` (raw client bytes through the WebSocket frame path).

use inference_core::core::SamplingParams;
use inference_core::server::{feed, protocol};
use tungstenite::protocol::WebSocketConfig;

/// Buffers as the reactor sets them; limits smaller so inputs can reach them.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(64 * 1024))
        .max_frame_size(Some(16 * 1024))
        .max_write_buffer_size(64 * 1024)
}

/// One fuzz input: the first byte picks the target, the rest is its input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let _ = protocol::parse(&String::from_utf8_lossy(rest), &SamplingParams::default());
        }
        m => {
            let fed = feed::feed(rest, &ws_config(), m == 2);
            assert!(fed.output.len() <= 4 * rest.len() + 1024);
        }
    }
}

/// Without AFL: replays the files named on the command line, or runs
/// `--random N` inputs built from well-formed frames with random damage.
pub fn main_without_afl() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--random") {
        let n: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let start = std::time::Instant::now();
        for _ in 0..n {
            let len = (next() % 512) as usize;
            let mut data: Vec<u8> = Vec::with_capacity(len + 8);
            data.push((next() % 3) as u8);
            // Half the time start from a valid masked text frame, then damage it.
            if next() % 2 == 0 {
                let payload: Vec<u8> = (0..len.min(125))
                    .map(|_| b'a' + (next() % 26) as u8)
                    .collect();
                data.extend([0x81, 0x80 | payload.len() as u8, 1, 2, 3, 4]);
                data.extend(
                    payload
                        .iter()
                        .enumerate()
                        .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
                );
                for _ in 0..(next() % 4) {
                    let i = (next() as usize) % data.len().max(1);
                    data[i] ^= next() as u8;
                }
            } else {
                data.extend((0..len).map(|_| next() as u8));
            }
            run(&data);
        }
        println!("{n} executions in {:.1} s", start.elapsed().as_secs_f64());
        return;
    }
    for path in args {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        run(&data);
        println!("{path}: ok");
    }
}

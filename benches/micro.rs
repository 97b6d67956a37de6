//! Criterion micro-benches of the server's own work per streamed token, with
//! no model: what inference-core adds on top of llama.cpp.
//!
//! - `token_event/*`: one `token` event, serialised by `server::messages::ServerMsg`
//!   (the server's own code), framed by tungstenite as the reactor does
//!   (`write` + `flush`), into memory and into a real localhost TCP socket.
//! - `token_event/sse_chunk+tcp_write`: the same token as the OpenAI API
//!   streams it: a `chat.completion.chunk` server-sent event
//!   (`server::openai::Reply::chunk`), framed as an HTTP/1.1 chunk
//!   (`server::http1::chunk_bytes`) and written to a TCP socket: the HTTP/SSE
//!   path's cost per token next to the WebSocket one.
//! - `reactor_hop/*`: the whole path of a token through a stub of the
//!   reactor: an engine-like thread sends token events through the engine's
//!   own event channel (`engine::events`: crossbeam plus one `mio::Waker`
//!   wake-up per batch), the loop drains it, the WebSocket v1 session turns
//!   each event into JSON, tungstenite frames it and it is written to a TCP
//!   socket that another thread drains: one write per token (a single
//!   stream, where the engine is slower than the loop), or one per batch of
//!   what arrived between two wake-ups. Cost per token.
//! - `logits/*`: what sampling reads per token over Gemma 3's 262k logits:
//!   a plain maximum (for scale), then a greedy pick and a top-k pick, each
//!   with the model's own probability of the pick (`prob`), from one
//!   `logits::Row`.
//! - `scheduler/*`: prefix-cache lookup of a 1k-token prompt among 64
//!   entries, and a whole submit/admit/finish cycle of the scheduler.
//!
//! Built from the library without llama.cpp:
//!
//!     cargo bench --bench micro --no-default-features

use std::hint::black_box;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tungstenite::Message;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};

use inference_core::core::Event;
use inference_core::engine::{self, kv, logits, prefix, scheduler};
use inference_core::http1;
use inference_core::server::messages::ServerMsg;
use inference_core::server::openai::{Endpoint, Reply};
use inference_core::server::session::{Out, Outbox, Session};
use inference_core::server::ws_v1::WsV1;

fn token_json() -> String {
    ServerMsg::Token {
        id: "r12",
        content: " Paris",
        prob: 0.93,
        logprobs: None,
    }
    .to_json()
}

/// Writes go nowhere: the cost of framing alone.
struct Sink;

impl Read for Sink {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        black_box(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connected localhost pair; the far end is drained by a thread.
fn tcp_pair() -> TcpStream {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    std::thread::spawn(move || {
        let mut client = client;
        let mut buf = vec![0u8; 1 << 16];
        while matches!(client.read(&mut buf), Ok(n) if n > 0) {}
    });
    server.set_nodelay(true).unwrap();
    server
}

fn server_ws<S: Read + Write>(stream: S) -> WebSocket<S> {
    // The server's limits (config: 4 MiB outbound buffer).
    let config = WebSocketConfig::default().max_write_buffer_size(4 << 20);
    WebSocket::from_raw_socket(stream, Role::Server, Some(config))
}

fn token_event(c: &mut Criterion) {
    let mut g = c.benchmark_group("token_event");
    g.bench_function("json", |b| b.iter(|| black_box(token_json())));
    let mut ws = server_ws(Sink);
    g.bench_function("json+frame", |b| {
        b.iter(|| {
            ws.write(Message::text(token_json())).unwrap();
            ws.flush().unwrap();
        })
    });
    let mut ws = server_ws(tcp_pair());
    g.bench_function("json+frame+tcp_write", |b| {
        b.iter(|| {
            ws.write(Message::text(token_json())).unwrap();
            ws.flush().unwrap();
        })
    });
    let reply = Reply::new(
        Endpoint::Chat,
        "chatcmpl-6b0580-req-12".into(),
        1_795_522_626,
        "gemma-3-270m-q4_k_m".into(),
    );
    g.bench_function("sse_chunk", |b| {
        b.iter(|| black_box(reply.chunk(black_box(" Paris"), &[], false)))
    });
    let mut tcp = tcp_pair();
    let mut out = Vec::new();
    g.bench_function("sse_chunk+tcp_write", |b| {
        b.iter(|| {
            out.clear();
            http1::chunk_bytes(reply.chunk(" Paris", &[], false).as_bytes(), &mut out);
            tcp.write_all(&out).unwrap();
        })
    });
    g.finish();
}

/// `n` tokens through channel + waker + poll + encode + frame + TCP write.
/// `flush_each`: one write syscall per token (the loop flushes once per batch
/// of events, and a batch holds one token when the engine is slower than the
/// loop, as it always is with a real model); otherwise whatever arrived
/// between two wake-ups goes out in one write.
fn reactor_run(n: u64, flush_each: bool) -> Duration {
    const WAKER: mio::Token = mio::Token(0);
    let mut poll = mio::Poll::new().unwrap();
    let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER).unwrap());
    // The loop keeps the waker alive too: closing its eventfd (when the engine
    // thread's clone drops) would take its pending event out of the epoll set.
    let engine_waker = waker.clone();
    let (sink, source) = engine::events(move || engine_waker.wake().unwrap());
    let mut ws = server_ws(tcp_pair());
    let mut session = WsV1::default();
    let mut out = Outbox::default();
    let start = Instant::now();
    let engine = std::thread::spawn(move || {
        for i in 0..n {
            sink.send(Event::Token {
                key: 1,
                text: if i % 2 == 0 { " the" } else { " sea" }.to_owned(),
                prob: 0.5,
                logprobs: None,
            });
            sink.wake();
        }
    });
    let mut events = mio::Events::with_capacity(64);
    let mut seen = 0u64;
    while seen < n {
        poll.poll(&mut events, None).unwrap();
        for ev in events.iter() {
            if ev.token() != WAKER {
                continue;
            }
            for e in source.drain() {
                session.on_event("r1", &e, &mut out);
                for item in out.drain() {
                    let Out::Text(json) = item else { continue };
                    ws.write(Message::text(json)).unwrap();
                    if flush_each {
                        ws.flush().unwrap();
                    }
                }
                seen += 1;
            }
            // One flush per batch of events, as the reactor does.
            ws.flush().unwrap();
        }
    }
    let elapsed = start.elapsed();
    engine.join().unwrap();
    elapsed
}

fn reactor_hop(c: &mut Criterion) {
    let mut g = c.benchmark_group("reactor_hop");
    g.bench_function("write_per_token", |b| {
        b.iter_custom(|n| reactor_run(n, true))
    });
    g.bench_function("write_per_batch", |b| {
        b.iter_custom(|n| reactor_run(n, false))
    });
    g.finish();
}

fn scheduler_ops(c: &mut Criterion) {
    use prefix::PrefixCache;
    use scheduler::{Config, Job, Scheduler};
    let mut g = c.benchmark_group("scheduler");
    let page = 16;
    let mut cache = PrefixCache::new(page);
    for e in 0..64i32 {
        let tokens: Vec<i32> = (0..1024).map(|t| t + e * 100_000).collect();
        let pages: Vec<kv::PageId> = (0..64).map(|p| (e as usize * 64 + p) as _).collect();
        cache.insert(e, tokens, pages);
    }
    let prompt: Vec<i32> = (0..1024).map(|t| t + 17 * 100_000).collect();
    g.bench_function("prefix_lookup_1k_of_64", |b| {
        b.iter(|| black_box(cache.lookup(black_box(&prompt), 63)))
    });

    let mut s = Scheduler::new(Config {
        n_ctx: 4096,
        page_size: page,
        slots: 8,
        cache_entries: 8,
        host_bytes: 0,
        queue_limit: 64,
    });
    let system: Vec<i32> = (0..512).collect();
    let mut key = 0u64;
    g.bench_function("submit_admit_finish_512_shared", |b| {
        b.iter(|| {
            key += 1;
            let mut tokens = system.clone();
            tokens.extend([7, 8, 9, key as i32]);
            s.submit(Job {
                key,
                tokens: tokens.clone(),
                max_tokens: 32,
                priority: 0,
            })
            .unwrap();
            assert!(s.admit_next().is_some());
            black_box(s.finish(key, &tokens));
        })
    });
    g.finish();
}

fn logits_passes(c: &mut Criterion) {
    let mut g = c.benchmark_group("logits");
    // Logits of a plausible spread: most far below the top.
    let mut x = 12345u32;
    let row: Vec<f32> = (0..262_144)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 8) as f32 / (1 << 24) as f32 * 30.0 - 20.0
        })
        .collect();
    g.bench_function("max_262k", |b| {
        b.iter(|| black_box(logits::max(black_box(&row))))
    });
    // What a sampled token reads: the row's one pass (its blocks' maxima,
    // the softmax's sum), then greedy's pick or a top-k, and the pick's
    // probability.
    g.bench_function("greedy_262k", |b| {
        b.iter(|| {
            let read = logits::Row::new(black_box(&row));
            black_box(read.most_likely().map(|t| read.prob(t)))
        })
    });
    g.bench_function("top_k_40_262k", |b| {
        b.iter(|| {
            let read = logits::Row::new(black_box(&row));
            let top = read.top_k(40, |_| true);
            black_box(read.prob(top[0].0))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = token_event, reactor_hop, scheduler_ops, logits_passes
}
criterion_main!(benches);

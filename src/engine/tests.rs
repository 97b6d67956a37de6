//! The step loop, admission, abort in every state, eviction on a full KV
//! pool, park/wake and shutdown, run in memory over the fake backend.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::backend::{BackendError, BatchToken};
use super::fake::Fake;
use super::*;
use crate::core::{
    ChatMessage, EngineState, ErrorCode, Event, FinishReason, PromptInput, Request, RequestError,
    RequestKind, Role, SamplingParams, Stats, Truncate,
};

const WAIT: Duration = Duration::from_secs(10);

fn config(slots: usize) -> EngineConfig {
    EngineConfig {
        n_batch: 64,
        slots,
        page_size: 4,
        queue_limit: 4,
        cache_entries: 4,
        host_cache_bytes: 0,
        prefill_chunk: 8,
        itl_target_ms: None,
        mixed_rows: 64,
        output_tile: 1,
        speculate: crate::engine::speculate::Settings {
            max_draft: 0,
            min_match: 2,
        },
        park_keep_bytes: 1 << 20,
        state: None,
        guide_limits: Default::default(),
    }
}

/// The operations side as the engine sees it, recorded.
#[derive(Default)]
struct TestHooks {
    park_after: Option<Duration>,
    unload: bool,
    state: AtomicU8,
    tokens: AtomicUsize,
    parks: AtomicUsize,
    wakes: AtomicUsize,
}

impl TestHooks {
    fn state(&self) -> EngineState {
        EngineState::from_u8(self.state.load(Ordering::Relaxed))
    }
}

impl Hooks for TestHooks {
    fn beat(&self) {}
    fn set_state(&self, state: EngineState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }
    fn throttled(&self) -> bool {
        false
    }
    fn on_token(&self) {
        self.tokens.fetch_add(1, Ordering::Relaxed);
    }
    fn park_after(&self) -> Option<Duration> {
        self.park_after
    }
    fn unload_on_park(&self) -> bool {
        self.unload
    }
    fn parked(&self) {
        self.parks.fetch_add(1, Ordering::Relaxed);
    }
    fn woke(&self, _took: Duration) {
        self.wakes.fetch_add(1, Ordering::Relaxed);
    }
}

fn parking(after_s: f64, unload: bool) -> TestHooks {
    TestHooks {
        park_after: Some(Duration::from_secs_f64(after_s)),
        unload,
        ..TestHooks::default()
    }
}

struct Harness {
    engine: EngineHandle,
    events: EventSource,
    /// Wake-ups the engine sent, and how many of them were handled: like the
    /// reactor, the harness drains only after a wake-up, so a missing one
    /// leaves events unseen and the test times out.
    woken: Arc<AtomicUsize>,
    handled: usize,
    buffered: VecDeque<Event>,
    fake: Fake,
    hooks: Arc<TestHooks>,
    next_key: u64,
    /// Given to every request submitted.
    urgency: crate::core::Urgency,
}

/// What one request produced.
#[derive(Debug)]
struct Done {
    text: String,
    queued: Vec<usize>,
    last: Event,
}

impl Done {
    fn end(&self) -> (FinishReason, &Stats) {
        match &self.last {
            Event::End { reason, stats, .. } => (*reason, stats),
            other => panic!("expected an end, got {other:?}"),
        }
    }

    fn error(&self) -> &RequestError {
        match &self.last {
            Event::Error { error, .. } => error,
            other => panic!("expected an error, got {other:?}"),
        }
    }
}

impl Harness {
    fn start(fake: Fake, cfg: EngineConfig, hooks: TestHooks) -> Harness {
        let hooks = Arc::new(hooks);
        let woken = Arc::new(AtomicUsize::new(0));
        let count = woken.clone();
        let (sink, events) = events(move || {
            count.fetch_add(1, Ordering::SeqCst);
        });
        let (engine, ready) = spawn(fake.clone(), cfg, hooks.clone(), sink).expect("starts");
        assert_eq!(ready.model_name, "fake");
        Harness {
            engine,
            events,
            woken,
            handled: 0,
            buffered: VecDeque::new(),
            fake,
            hooks,
            next_key: 1,
            urgency: Default::default(),
        }
    }

    fn new(slots: usize) -> Harness {
        Harness::start(Fake::default(), config(slots), TestHooks::default())
    }

    fn submit_request(
        &mut self,
        input: PromptInput,
        params: SamplingParams,
        kind: RequestKind,
        truncate: Truncate,
    ) -> (u64, Arc<AtomicBool>) {
        let key = self.next_key;
        self.next_key += 1;
        let cancel = Arc::new(AtomicBool::new(false));
        let req = Request {
            key,
            id: format!("r{key}"),
            api: "test",
            input,
            params,
            kind,
            truncate,
            cancel: cancel.clone(),
            received: Instant::now(),
            max_prompt_tokens: 0,
            urgency: self.urgency,
        };
        self.engine.submit(req).map_err(|_| "engine gone").unwrap();
        (key, cancel)
    }

    fn submit_input(
        &mut self,
        input: PromptInput,
        params: SamplingParams,
    ) -> (u64, Arc<AtomicBool>) {
        self.submit_request(input, params, RequestKind::Generate, Truncate::None)
    }

    fn submit(&mut self, prompt: &str) -> (u64, Arc<AtomicBool>) {
        self.submit_input(PromptInput::Text(prompt.into()), greedy(64))
    }

    fn next(&mut self) -> Event {
        let deadline = Instant::now() + WAIT;
        loop {
            let woken = self.woken.load(Ordering::SeqCst);
            if woken > self.handled {
                self.handled = woken;
                self.buffered.extend(self.events.drain());
            }
            if let Some(e) = self.buffered.pop_front() {
                return e;
            }
            assert!(Instant::now() < deadline, "no event within {WAIT:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Events of `key` up to its final one; other requests' events are kept.
    fn finish(&mut self, key: u64) -> Done {
        let mut others = VecDeque::new();
        let mut text = String::new();
        let mut queued = Vec::new();
        loop {
            let event = self.next();
            match &event {
                Event::Token {
                    key: k, text: t, ..
                } if *k == key => text.push_str(t),
                Event::Queued { key: k, position } if *k == key => queued.push(*position),
                Event::End { key: k, .. }
                | Event::Error { key: k, .. }
                | Event::Tokens { key: k, .. }
                    if *k == key =>
                {
                    others.extend(self.buffered.drain(..));
                    self.buffered = others;
                    return Done {
                        text,
                        queued,
                        last: event,
                    };
                }
                _ => others.push_back(event),
            }
        }
    }

    fn wait_until(&self, what: &str, done: impl Fn(&Harness) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        temp: 0.0,
        max_tokens,
        ..SamplingParams::default()
    }
}

#[test]
fn streams_the_reply_and_ends_at_end_of_generation() {
    let mut h = Harness::new(2);
    let (key, _) = h.submit("hi");
    let done = h.finish(key);
    assert_eq!(done.text, "hello world");
    let (reason, stats) = done.end();
    assert_eq!(reason, FinishReason::Eos);
    assert_eq!(stats.prompt_tokens, 3, "BOS + 2 characters");
    assert_eq!(stats.completion_tokens, 11);
}

#[test]
fn max_tokens_and_stop_strings_end_a_request() {
    let mut h = Harness::new(2);
    let (key, _) = h.submit_input(PromptInput::Text("a".into()), greedy(4));
    let done = h.finish(key);
    assert_eq!(
        (done.text.as_str(), done.end().0),
        ("hell", FinishReason::Length)
    );
    let params = SamplingParams {
        stop: vec!["o w".into()],
        ..greedy(64)
    };
    let (key, _) = h.submit_input(PromptInput::Text("a".into()), params);
    let done = h.finish(key);
    assert_eq!(
        (done.text.as_str(), done.end().0),
        ("hell", FinishReason::Stop)
    );
}

#[test]
fn requests_beyond_the_slots_queue_and_run_in_order() {
    let mut h = Harness::new(1);
    h.fake.state().hold = true;
    let (a, _) = h.submit("first");
    h.wait_until("the first decode", |h| h.fake.state().holding);
    let (b, _) = h.submit("second");
    let (c, _) = h.submit("third");
    h.fake.state().hold = false;
    let (da, db, dc) = (h.finish(a), h.finish(b), h.finish(c));
    assert!(da.queued.is_empty());
    assert_eq!(db.queued, [1]);
    assert_eq!(dc.queued, [2, 1]);
    for d in [da, db, dc] {
        assert_eq!(d.text, "hello world");
    }
}

/// Requests that arrive together, while a decode runs: whoever can start
/// starts before the queue limit is applied, so only a request that would
/// really wait behind `queue_limit` others is refused (the WebSocket
/// batching test raced on this: its four requests sometimes came in one intake).
#[test]
fn the_queue_limit_counts_only_requests_that_must_wait() {
    let cfg = EngineConfig {
        queue_limit: 1,
        ..config(2)
    };
    let mut h = Harness::start(Fake::default(), cfg, TestHooks::default());
    h.fake.state().hold = true;
    let (a, _) = h.submit("first");
    h.wait_until("the first decode", |h| h.fake.state().holding);
    let keys: Vec<u64> = ["second", "third", "fourth"]
        .iter()
        .map(|p| h.submit(p).0)
        .collect();
    h.fake.state().hold = false;
    let refused = h.finish(keys[2]);
    assert!(
        matches!(
            refused.last,
            Event::Error {
                error: RequestError::QueueFull { waiting: 1 },
                ..
            }
        ),
        "{:?}",
        refused.last
    );
    for key in [a, keys[0], keys[1]] {
        assert_eq!(h.finish(key).text, "hello world");
    }
}

#[test]
fn every_request_is_decoded_at_its_own_positions_while_others_run() {
    let fake = Fake {
        reply: "abcdefghijklmnopqrstuvwxyz".into(),
        ..Fake::default()
    };
    let mut h = Harness::start(fake, config(3), TestHooks::default());
    let keys: Vec<u64> = ["one", "a much longer prompt than the chunk", "x"]
        .iter()
        .map(|p| h.submit(p).0)
        .collect();
    for key in keys {
        assert_eq!(h.finish(key).text, "abcdefghijklmnopqrstuvwxyz");
    }
    // The fake asserts positions; here: no step carried more prompt tokens
    // than the chunk while another sequence was generating. Sequence ids
    // follow admission; prompts are BOS plus one token per character.
    let prompt_len = [4, 36, 2];
    for batch in &h.fake.state().batches {
        let is_decode = |t: &&BatchToken| t.pos >= prompt_len[t.seq as usize];
        let decodes = batch.iter().filter(is_decode).count();
        let prompt = batch.len() - decodes;
        assert!(decodes == 0 || prompt <= 8, "{batch:?}");
    }
}

#[test]
fn abort_while_queued_prefilling_and_decoding() {
    let mut h = Harness::new(1);
    // Prefilling: the decode holds until the abort callback fires.
    h.fake.state().hold = true;
    let (a, cancel_a) = h.submit("prefill me");
    h.wait_until("the prefill", |h| h.fake.state().holding);
    // Queued behind it.
    let (b, cancel_b) = h.submit("queued");
    cancel_b.store(true, Ordering::Relaxed);
    cancel_a.store(true, Ordering::Relaxed);
    let (da, db) = (h.finish(a), h.finish(b));
    assert_eq!(da.end().0, FinishReason::Abort);
    assert_eq!(db.end().0, FinishReason::Abort);
    assert!(db.text.is_empty());
    // Decoding: abort after the first token, while the second decode runs.
    {
        let mut s = h.fake.state();
        s.hold = false;
        s.hold_at_batch = Some(s.batches.len() + 2);
    }
    let (c, cancel_c) = h.submit("decode");
    loop {
        if let Event::Token { key, .. } = h.next()
            && key == c
        {
            break;
        }
    }
    cancel_c.store(true, Ordering::Relaxed);
    let dc = h.finish(c);
    assert_eq!(dc.end().0, FinishReason::Abort);
    assert!(
        dc.text.is_empty(),
        "streamed after the abort: {:?}",
        dc.text
    );
    h.fake.state().hold = false;
    // Every page is back (whole pages may stay cached as a prefix).
    h.wait_until("an idle engine", |h| h.engine.status().busy_slots == 0);
    let kv = h.engine.status().kv;
    assert_eq!(kv.pages_owned, 0);
    assert_eq!(kv.pages_free + kv.pages_cached, kv.pages_total);
}

#[test]
fn a_finished_prompt_is_reused_by_the_next_request() {
    let mut h = Harness::new(1);
    let system = "You are a terse assistant. ";
    let (a, _) = h.submit(&format!("{system}Hi"));
    assert_eq!(h.finish(a).end().1.cached_tokens, 0);
    let (b, _) = h.submit(&format!("{system}Bye"));
    let cached = h.finish(b).end().1.cached_tokens;
    assert!(cached >= 24 && cached.is_multiple_of(4), "{cached}");
    let batches = &h.fake.state().batches;
    let first_of_b = batches
        .iter()
        .rev()
        .find(|b| b.iter().all(|t| !t.output) || b.len() > 1)
        .unwrap();
    assert!(first_of_b[0].pos >= cached, "recomputed a cached prefix");
}

#[test]
fn a_prefix_moved_to_host_memory_while_others_run_comes_back() {
    let fake = Fake {
        n_ctx: 2048,
        ..Fake::default()
    };
    fake.state().cost = Some((Duration::from_millis(2), Duration::ZERO));
    let cfg = EngineConfig {
        host_cache_bytes: 1 << 20,
        ..config(3)
    };
    let mut h = Harness::start(fake, cfg, TestHooks::default());
    // Two long replies keep the engine busy throughout (they end aborted).
    let long = SamplingParams {
        ignore_eos: true,
        ..greedy(900)
    };
    let busy: Vec<_> = ["keep going", "and on"]
        .map(|p| h.submit_input(PromptInput::Text(p.into()), long.clone()))
        .into();
    let system = "You are a terse assistant. ";
    let (a, _) = h.submit(&format!("{system}Hi"));
    assert_eq!(h.finish(a).end().1.cached_tokens, 0);
    h.wait_until("the prefix in host memory", |h| {
        let kv = h.engine.status().kv;
        kv.prefix_host_entries == 1 && kv.prefix_host_bytes > 0
    });
    let (b, _) = h.submit(&format!("{system}Bye"));
    let done = h.finish(b);
    assert_eq!(done.text, "hello world");
    let cached = done.end().1.cached_tokens;
    assert!(cached >= 24 && cached.is_multiple_of(4), "{cached}");
    // Both entries leave the cells again (the first without a second copy).
    h.wait_until("both prefixes in host memory only", |h| {
        let kv = h.engine.status().kv;
        (kv.prefix_entries, kv.prefix_host_entries) == (0, 2)
    });
    // A load that fails: the prompt is computed instead, nothing else changes.
    h.fake.state().fail_seq_loads = 1;
    let (c, _) = h.submit(&format!("{system}Bye now"));
    let done = h.finish(c);
    assert_eq!(done.text, "hello world");
    assert_eq!(done.end().1.cached_tokens, 0);
    for (key, cancel) in busy {
        cancel.store(true, Ordering::Relaxed);
        assert_eq!(h.finish(key).end().0, FinishReason::Abort);
    }
    h.wait_until("an idle engine", |h| h.engine.status().busy_slots == 0);
    let kv = h.engine.status().kv;
    assert_eq!(kv.pages_owned, 0);
    assert_eq!(kv.pages_free + kv.pages_cached, kv.pages_total);
}

/// Five streams of `max_tokens` each (EOS ignored) on an engine whose rows
/// of logits go in tiles of four, with `slots` and drafts of up to
/// `max_draft` tokens from 32-token matches (none in these texts: only
/// guesses), over a fake whose decodes take `cost` (a step, a batch token;
/// 2 ms a step lets every stream be admitted before one ends).
fn five_streams_in_tiles(
    slots: usize,
    max_draft: usize,
    max_tokens: u32,
    cost: (Duration, Duration),
) -> (Harness, Vec<u64>) {
    let fake = Fake {
        n_ctx: 2048,
        ..Fake::default()
    };
    fake.state().cost = Some(cost);
    let cfg = EngineConfig {
        output_tile: 4,
        speculate: crate::engine::speculate::Settings {
            max_draft,
            min_match: 32,
        },
        ..config(slots)
    };
    let mut h = Harness::start(fake, cfg, TestHooks::default());
    let long = SamplingParams {
        ignore_eos: true,
        ..greedy(max_tokens)
    };
    let streams = (0..5)
        .map(|i| {
            let prompt = PromptInput::Text(format!("stream {i}"));
            h.submit_input(prompt, long.clone()).0
        })
        .collect();
    (h, streams)
}

#[test]
fn rows_of_logits_fill_their_last_tile_with_prompt_tokens() {
    let (mut h, streams) = five_streams_in_tiles(6, 0, 60, FLAT);
    h.wait_until("five streams decoding", |h| {
        h.fake.state().batches.last().is_some_and(|b| b.len() == 5)
    });
    let (late, _) = h.submit("a prompt that arrives while five streams decode");
    assert_eq!(h.finish(late).text, "hello world");
    for key in streams {
        assert_eq!(h.finish(key).end().0, FinishReason::Length);
    }
    let batches = h.fake.state().batches.clone();
    let padded = batches
        .iter()
        .filter(|b| b.len() > 5 && b.iter().filter(|t| t.output).count() == 8)
        .count();
    assert!(
        padded > 0,
        "five decode rows beside a prompt: 8 rows of logits"
    );
    for b in &batches {
        let outputs = b.iter().filter(|t| t.output).count();
        let prompt = b.iter().any(|t| !t.output);
        assert!(
            outputs <= 4 || outputs % 4 == 0 || !prompt,
            "{outputs} rows of logits with prompt tokens left to pad"
        );
    }
}

/// A fake step's cost: the same whatever it carries.
const FLAT: (Duration, Duration) = (Duration::from_millis(2), Duration::ZERO);

/// Five streams as `five_streams_in_tiles` with drafts of up to `max_draft`
/// tokens: their replies, and the sizes of the decode steps that carried
/// all five (each row a row of logits).
fn five_streams_decoding(max_draft: usize, cost: (Duration, Duration)) -> (Vec<Done>, Vec<usize>) {
    let (mut h, streams) = five_streams_in_tiles(5, max_draft, 40, cost);
    let done: Vec<_> = streams.into_iter().map(|key| h.finish(key)).collect();
    let seqs = |b: &Vec<BatchToken>| {
        let mut seqs: Vec<_> = b.iter().map(|t| t.seq).collect();
        seqs.dedup();
        seqs.len()
    };
    let five = h
        .fake
        .state()
        .batches
        .iter()
        .filter(|b| b.iter().all(|t| t.output) && seqs(b) == 5)
        .map(Vec::len)
        .collect();
    (done, five)
}

/// Decode steps of five streams, where no draft matches, guess tokens to
/// fill the second tile of logits rows, and, where steps cost the same
/// whatever their rows and the guesses are right (the repeated 'x' past the
/// reply), a third tile too: the text is the plain one, and right guesses
/// are kept.
#[test]
fn decode_steps_guess_tokens_to_fill_their_last_tile_of_logits() {
    let (plain, _) = five_streams_decoding(0, FLAT);
    let (guessed, five) = five_streams_decoding(8, FLAT);
    for (a, b) in plain.iter().zip(&guessed) {
        assert_eq!(a.text, b.text);
        assert!(a.text.starts_with("hello worldxxx"), "{:?}", a.text);
        assert_eq!(b.end().0, FinishReason::Length);
    }
    // Near the reply's end the streams run out of room for guesses.
    let tiled = five.iter().filter(|&&n| n >= 8 && n % 4 == 0).count();
    assert!(tiled * 2 > five.len(), "{five:?}");
    assert!(five.contains(&12), "a third tile pays: {five:?}");
    assert!(five.iter().all(|&n| n <= 12), "{five:?}");
    let kept: usize = guessed
        .iter()
        .map(|d| d.end().1.accepted_draft_tokens)
        .sum();
    assert!(kept > 0, "guessed 'x' after 'x'");
}

/// Where every row of a step costs as much as the others, a tile of
/// guesses more cannot make tokens come faster: it is tried, then left,
/// while the tile the five streams' rows begin is still filled.
#[test]
fn a_tile_of_guesses_more_is_left_where_it_does_not_pay() {
    let cost = (Duration::ZERO, Duration::from_millis(1));
    let (guessed, five) = five_streams_decoding(8, cost);
    assert!(guessed.iter().all(|d| d.end().0 == FinishReason::Length));
    let more = five.iter().filter(|&&n| n > 8).count();
    assert!(more <= 2, "{five:?}");
    assert!(
        five.iter().filter(|&&n| n == 8).count() * 2 > five.len(),
        "{five:?}"
    );
}

#[test]
fn no_kv_slot_evicts_a_cached_prefix_and_retries() {
    let mut h = Harness::new(1);
    let (a, _) = h.submit("a prompt that stays cached");
    h.finish(a);
    assert_eq!(h.engine.status().kv.prefix_entries, 1);
    // The first decode of the next request finds no slot: the cached prefix
    // is evicted, the decode retried and the request completes.
    h.fake.state().no_kv_slot = 1;
    let before = h.fake.state().batches.len();
    let (b, _) = h.submit("something else");
    assert_eq!(h.finish(b).text, "hello world");
    let retried = h.fake.state().batches[before..before + 2].to_vec();
    assert_eq!(retried[0], retried[1], "the same batch, retried");
    // Its own prompt is the only entry now.
    assert_eq!(h.engine.status().kv.prefix_entries, 1);
    // With nothing left to evict the request fails, and the engine goes on.
    h.fake.state().no_kv_slot = 100;
    let (d, _) = h.submit("yet another prompt");
    let done = h.finish(d);
    assert_eq!(done.error().code(), ErrorCode::Internal, "{:?}", done.last);
    assert_eq!(h.engine.status().kv.prefix_entries, 0, "all evicted first");
    h.fake.state().no_kv_slot = 0;
    let (e, _) = h.submit("fine again");
    assert_eq!(h.finish(e).text, "hello world");
}

#[test]
fn a_failing_decode_fails_its_requests_and_the_engine_goes_on() {
    let mut h = Harness::new(2);
    h.fake.state().fail_decode = true;
    let (a, _) = h.submit("doomed");
    assert!(matches!(h.finish(a).error(), RequestError::EngineFailed(_)));
    h.fake.state().fail_decode = false;
    let (b, _) = h.submit("fine");
    assert_eq!(h.finish(b).text, "hello world");
}

#[test]
fn bad_prompts_get_errors_that_say_why() {
    let fake = Fake {
        chat_template: false,
        n_ctx: 32,
        ..Fake::default()
    };
    let mut h = Harness::start(fake, config(1), TestHooks::default());
    let chat = PromptInput::Messages(vec![ChatMessage {
        role: Role::User,
        content: "hi".into(),
    }]);
    let (a, _) = h.submit_input(chat, greedy(4));
    assert_eq!(h.finish(a).error(), &RequestError::NoChatTemplate);
    let (b, _) = h.submit(&"x".repeat(40));
    assert_eq!(
        h.finish(b).error(),
        &RequestError::ContextOverflow {
            prompt_tokens: 41,
            capacity: 32
        }
    );
}

#[test]
fn the_idle_engine_parks_and_the_next_request_wakes_it() {
    let mut h = Harness::start(Fake::default(), config(1), parking(0.02, true));
    let (a, _) = h.submit("hi");
    h.finish(a);
    h.wait_until("parked", |h| h.hooks.state() == EngineState::Parked);
    assert_eq!(h.hooks.parks.load(Ordering::Relaxed), 1);
    let (b, _) = h.submit("hi again");
    assert_eq!(h.finish(b).text, "hello world");
    let s = h.fake.state();
    assert_eq!(
        (s.loads, s.opens),
        (2, 2),
        "the model was unloaded and reloaded"
    );
    assert_eq!(h.hooks.wakes.load(Ordering::Relaxed), 1);
    assert_eq!(h.hooks.tokens.load(Ordering::Relaxed), 22);
}

#[test]
fn cached_prefixes_survive_a_park_with_and_without_the_model() {
    for unload in [false, true] {
        let mut h = Harness::start(Fake::default(), config(1), parking(0.02, unload));
        let system = "A long system prompt that stays. ";
        let (a, _) = h.submit(&format!("{system}One"));
        assert_eq!(h.finish(a).end().1.cached_tokens, 0);
        h.wait_until("parked", |h| h.hooks.state() == EngineState::Parked);
        assert_eq!(
            h.engine.status().kv.prefix_entries,
            1,
            "published before parking"
        );
        let (b, _) = h.submit(&format!("{system}Two"));
        let cached = h.finish(b).end().1.cached_tokens;
        assert!(
            cached >= 32,
            "unload {unload}: {cached} cached after the wake"
        );
        assert_eq!(h.fake.state().opens, 2);
    }
}

#[test]
fn nothing_is_kept_when_the_budget_is_zero() {
    let cfg = EngineConfig {
        park_keep_bytes: 0,
        ..config(1)
    };
    let mut h = Harness::start(Fake::default(), cfg, parking(0.02, false));
    let system = "A long system prompt that stays. ";
    let (a, _) = h.submit(&format!("{system}One"));
    h.finish(a);
    h.wait_until("parked", |h| h.hooks.state() == EngineState::Parked);
    let (b, _) = h.submit(&format!("{system}Two"));
    assert_eq!(h.finish(b).end().1.cached_tokens, 0);
}

#[test]
fn a_request_refused_on_waking_still_reaches_the_server() {
    let fake = Fake {
        chat_template: false,
        ..Fake::default()
    };
    let mut h = Harness::start(fake, config(1), parking(0.02, false));
    h.wait_until("parked", |h| h.hooks.state() == EngineState::Parked);
    let chat = PromptInput::Messages(vec![ChatMessage {
        role: Role::User,
        content: "hi".into(),
    }]);
    let (a, _) = h.submit_input(chat, greedy(4));
    assert_eq!(h.finish(a).error(), &RequestError::NoChatTemplate);
}

#[test]
fn a_failed_wake_fails_the_waking_request_only() {
    let mut h = Harness::start(Fake::default(), config(1), parking(0.02, false));
    h.wait_until("parked", |h| h.hooks.state() == EngineState::Parked);
    h.fake.state().fail_open = true;
    let (a, _) = h.submit("hi");
    assert!(matches!(h.finish(a).error(), RequestError::WakeFailed(_)));
    h.fake.state().fail_open = false;
    let (b, _) = h.submit("hi");
    assert_eq!(h.finish(b).text, "hello world");
}

#[test]
fn a_failed_load_is_reported_by_spawn() {
    let fake = Fake::default();
    fake.state().fail_load = true;
    let (sink, _events) = events(|| {});
    let e = spawn(fake, config(1), Arc::new(TestHooks::default()), sink)
        .err()
        .unwrap();
    assert_eq!(e, BackendError::ModelMissing("fake.gguf".into()));
}

#[test]
fn shutdown_fails_running_and_queued_requests_then_stops() {
    let mut h = Harness::new(1);
    h.fake.state().hold = true;
    let (a, _) = h.submit("running");
    h.wait_until("the decode", |h| h.fake.state().holding);
    let (b, _) = h.submit("queued");
    h.engine.stop();
    for key in [a, b] {
        assert_eq!(h.finish(key).error(), &RequestError::ShuttingDown);
    }
    assert!(matches!(h.next(), Event::Stopped));
    h.wait_until("the thread ends", |h| h.engine.is_finished());
}

#[test]
fn count_tokens_answers_the_prompts_length_and_generates_nothing() {
    let mut h = Harness::new(1);
    let abc = || PromptInput::Text("abc".into());
    let (count, _) = h.submit_request(abc(), greedy(4), RequestKind::CountTokens, Truncate::None);
    let (generate, _) = h.submit_input(abc(), greedy(4));
    assert!(matches!(
        h.finish(count).last,
        Event::Tokens { count: 4, .. }
    ));
    assert_eq!(h.finish(generate).end().1.prompt_tokens, 4);
    assert_eq!(
        h.fake.state().batches.len(),
        4,
        "a prefill and 3 decodes, none for the count"
    );
}

#[test]
fn a_prompt_too_long_is_cut_from_the_left_when_asked() {
    let fake = Fake {
        n_ctx: 64,
        ..Fake::default()
    };
    let mut h = Harness::start(fake, config(1), TestHooks::default());
    let long = || PromptInput::Text("x".repeat(100));
    let (a, _) = h.submit_input(long(), greedy(8));
    assert_eq!(h.finish(a).error().code(), ErrorCode::ContextOverflow);
    let (b, _) = h.submit_request(long(), greedy(8), RequestKind::Generate, Truncate::Left);
    let done = h.finish(b);
    let (reason, stats) = done.end();
    assert_eq!(reason, FinishReason::Length);
    assert_eq!(stats.prompt_tokens, 64 - 8, "room left for max_tokens");
    assert_eq!(stats.truncated_tokens, 101 - 56);
}

#[test]
fn a_constraint_steers_the_reply_and_ends_it_when_complete() {
    let mut h = Harness::new(2);
    let with = |constraint| SamplingParams {
        constraint: Some(constraint),
        ..greedy(64)
    };
    // The fake's scripted "hello world" is not allowed: it falls back to the
    // lowest token the mask allows, so "no" (n < y), and ends there.
    let choice = crate::core::Constraint::Choice(vec!["yes".into(), "no".into()]);
    let (key, _) = h.submit_input(PromptInput::Text("a".into()), with(choice));
    let done = h.finish(key);
    assert_eq!(
        (done.text.as_str(), done.end().0),
        ("no", FinishReason::Eos)
    );
    // A regex the script fits: the same text as unconstrained, then the end.
    let regex = crate::core::Constraint::Regex("hel+o".into());
    let (key, _) = h.submit_input(PromptInput::Text("a".into()), with(regex));
    let done = h.finish(key);
    assert_eq!(
        (done.text.as_str(), done.end().0),
        ("hello", FinishReason::Eos)
    );
}

#[test]
fn bad_constraints_and_unknown_tokens_are_refused_and_the_others_go_on() {
    let mut h = Harness::new(2);
    let (good, _) = h.submit("hi");
    let bad = [
        SamplingParams {
            constraint: Some(crate::core::Constraint::Regex("(".into())),
            ..greedy(8)
        },
        SamplingParams {
            logit_bias: vec![(i32::MAX - 1, 1.0)],
            ..greedy(8)
        },
        SamplingParams {
            stop_token_ids: vec![0x7FFF_FFF0],
            ..greedy(8)
        },
    ];
    for params in bad {
        let (key, _) = h.submit_input(PromptInput::Text("a".into()), params);
        let done = h.finish(key);
        assert_eq!(
            done.error().code(),
            ErrorCode::BadRequest,
            "{:?}",
            done.error()
        );
    }
    assert_eq!(h.finish(good).text, "hello world");
}

#[test]
fn min_tokens_holds_the_end_back_and_stop_tokens_end_a_reply() {
    let mut h = Harness::new(1);
    // The script ends after "hello world" (11 tokens): EOS is banned until 13,
    // so the fake writes 'x' twice, then ends.
    let params = SamplingParams {
        min_tokens: 13,
        ..greedy(64)
    };
    let (key, _) = h.submit_input(PromptInput::Text("a".into()), params);
    let done = h.finish(key);
    assert_eq!(
        (done.text.as_str(), done.end().0),
        ("hello worldxx", FinishReason::Eos)
    );
    let params = SamplingParams {
        stop_token_ids: vec!['w' as i32],
        ..greedy(64)
    };
    let (key, _) = h.submit_input(PromptInput::Text("a".into()), params);
    let done = h.finish(key);
    assert_eq!(
        (done.text.as_str(), done.end().0),
        ("hello ", FinishReason::Stop)
    );
}

#[test]
fn priority_orders_the_queue_and_deadlines_end_requests_queued_or_running() {
    let mut h = Harness::new(1);
    h.fake.state().hold = true;
    let (running, _) = h.submit("first");
    h.wait_until("the first decode", |h| h.fake.state().holding);
    let (low, _) = h.submit("low");
    h.urgency.priority = 10;
    let (high, _) = h.submit("high");
    h.urgency = crate::core::Urgency {
        priority: 0,
        deadline: Some(Duration::from_millis(30)),
    };
    let (late, _) = h.submit("late");
    std::thread::sleep(Duration::from_millis(60));
    h.fake.state().hold = false;
    let late = h.finish(late);
    assert_eq!(late.end().0, FinishReason::Deadline);
    assert_eq!(late.end().1.completion_tokens, 0);
    assert_eq!(h.finish(running).text, "hello world");
    let (high, low) = (h.finish(high), h.finish(low));
    // The three arrived in one intake (the engine was inside the held decode).
    assert_eq!(high.queued, [1], "the high one goes ahead of the low one");
    assert_eq!(low.queued, [2, 1]);
    // Running past its deadline: it ends between two tokens.
    h.urgency.deadline = Some(Duration::from_millis(40));
    let batches = h.fake.state().batches.len();
    h.fake.state().hold_at_batch = Some(batches + 3);
    let (slow, _) = h.submit("slow");
    h.wait_until("held mid-reply", |h| h.fake.state().holding);
    std::thread::sleep(Duration::from_millis(60));
    h.fake.state().hold = false;
    let slow = h.finish(slow);
    assert_eq!(slow.end().0, FinishReason::Deadline);
    assert!(slow.text.len() < "hello world".len(), "{:?}", slow.text);
}

/// An engine whose fake replies `reply`, each decode taking 4 ms and
/// `per_token_us` more a token, drafting up to `max_draft` tokens.
fn drafting(reply: &str, max_draft: usize, slots: usize, per_token_us: u64) -> Harness {
    let fake = Fake {
        reply: reply.into(),
        ..Fake::default()
    };
    fake.state().cost = Some((
        Duration::from_millis(4),
        Duration::from_micros(per_token_us),
    ));
    let cfg = EngineConfig {
        speculate: crate::engine::speculate::Settings {
            max_draft,
            min_match: 2,
        },
        ..config(slots)
    };
    Harness::start(fake, cfg, TestHooks::default())
}

/// Speculation: a reply that repeats itself is drafted from its own text
/// and verified in the same step as its pending token; every token streamed
/// is the one plain decoding gives, and a draft's wrong tokens leave no
/// cells behind (the fake checks every position it is given).
#[test]
fn drafts_from_repeated_text_give_exactly_the_plain_reply_in_fewer_steps() {
    let reply = "abcdefgh abcdefgh abcdefgh abcdefgh abcdefgX abcdefgh";
    let run = |max_draft: usize| {
        let mut h = drafting(reply, max_draft, 2, 200);
        let (key, _) = h.submit("abcdefgh");
        let done = h.finish(key);
        let batches = h.fake.state().batches.clone();
        (done.end().1.completion_tokens, done.text, batches)
    };
    let (plain_tokens, plain, plain_batches) = run(0);
    let (tokens, drafted, batches) = run(8);
    assert_eq!(plain, reply);
    assert_eq!(drafted, plain);
    assert_eq!(tokens, plain_tokens);
    let widest = batches.iter().map(Vec::len).max().unwrap();
    assert!(
        widest > 1 + 2,
        "drafts were verified: {widest} tokens in a step"
    );
    assert!(
        batches.len() < plain_batches.len() * 2 / 3,
        "{} steps with drafts, {} without",
        batches.len(),
        plain_batches.len()
    );
}

/// A request's own `draft_max` bounds its drafts within the server's: 0
/// decodes it token by token, as with speculation off, and the text is
/// the same.
#[test]
fn a_request_may_ask_for_shorter_drafts_or_none() {
    let reply = "abcdefgh abcdefgh abcdefgh abcdefgh abcdefgX abcdefgh";
    let run = |draft_max: Option<u32>| {
        let mut h = drafting(reply, 8, 2, 200);
        let params = SamplingParams {
            draft_max,
            ..greedy(reply.len() as u32)
        };
        let (key, _) = h.submit_input(PromptInput::Text("abcdefgh".into()), params);
        let done = h.finish(key);
        let widest = h.fake.state().batches.iter().skip(1).map(Vec::len).max();
        let drafted = done.end().1.draft_tokens;
        (done.text, drafted, widest.unwrap())
    };
    let (text, drafted, _) = run(None);
    assert!(drafted > 0);
    assert_eq!(run(Some(0)), (text.clone(), 0, 1));
    let (short, _, widest) = run(Some(2));
    assert_eq!(short, text);
    assert!(widest <= 3, "{widest} tokens in a step");
}

/// A draft never runs past the reply's length or the sequence's pages.
#[test]
fn drafts_stop_at_max_tokens() {
    let mut h = drafting("xyxyxyxyxyxyxyxyxyxyxyxyxyxyxyxy", 16, 1, 100);
    let (key, _) = h.submit_input(PromptInput::Text("xyxyxy".into()), greedy(13));
    let done = h.finish(key);
    assert_eq!(done.text, "xyxyxyxyxyxyx");
    let (reason, stats) = done.end();
    assert_eq!(
        (reason, stats.completion_tokens),
        (FinishReason::Length, 13)
    );
    // The last step's draft ends where the reply does.
    let batches = h.fake.state().batches.clone();
    let last = batches.last().unwrap();
    let prompt_len = 7;
    assert!(last.iter().all(|t| t.pos < prompt_len + 13), "{last:?}");
}

/// Beside another stream, drafts lengthen a step by a quarter at most: the
/// other stream gains nothing from them.
#[test]
fn drafts_beside_other_streams_stay_short() {
    let reply = "abcdefgh abcdefgh abcdefgh abcdefgh abcdefgh abcdefgh abcdefgh";
    let mut h = drafting(reply, 16, 2, 200);
    let (a, _) = h.submit("abcdefgh");
    let (b, _) = h.submit("abcdefgh");
    assert_eq!(h.finish(a).text, h.finish(b).text);
    let batches = h.fake.state().batches.clone();
    let shared: Vec<usize> = batches
        .iter()
        // Decode steps (every row wants its logits) of both streams.
        .filter(|b| b.iter().all(|t| t.output) && b.iter().any(|t| t.seq != b[0].seq))
        .map(Vec::len)
        .collect();
    assert!(shared.iter().any(|&n| n > 2), "they drafted: {shared:?}");
    // 2 rows of about 4.4 ms: a quarter of that is 5 draft tokens of 0.2 ms
    // (before the costs are fitted, a guess allows fewer).
    assert!(shared.iter().all(|&n| n <= 2 + 6), "{shared:?}");
}

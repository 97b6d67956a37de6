//! Counters and histograms for `GET /metrics`, and their rendering in the
//! Prometheus text format (version 0.0.4), sans-I/O.
//!
//! The engine, the reactor and the watchdog update `Metrics` with relaxed
//! atomics (a scrape may see a request counted a moment before its tokens;
//! nothing depends on cross-metric consistency). Gauges that already live
//! elsewhere (the scheduler's status, the monitor's snapshot) are read at
//! scrape time and passed in as `Gauges`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::core::{EngineState, Status, WorkerStatus};
use crate::ops::monitor::Snapshot;

const PREFIX: &str = "inference_core";

/// Time to first token, seconds.
pub const TTFT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Time between two token events of one request, seconds.
pub const ITL_BUCKETS: &[f64] = &[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5];

pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative: `buckets[i]` counts values in (bounds[i-1], bounds[i]]; the last is +Inf.
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        let i = self.bounds.partition_point(|&b| b < seconds);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((seconds.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {PREFIX}_{name} {help}");
        let _ = writeln!(out, "# TYPE {PREFIX}_{name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |v| v.to_string());
            let _ = writeln!(out, "{PREFIX}_{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{PREFIX}_{name}_sum {sum}");
        let _ = writeln!(out, "{PREFIX}_{name}_count {cumulative}");
    }
}

pub struct Metrics {
    /// Finished requests by outcome: an `end` reason or an `error` code.
    /// Finished requests by (API, outcome).
    requests: Mutex<BTreeMap<(&'static str, String), u64>>,
    pub tokens: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub stalls: AtomicU64,
    pub slow_worker_events: AtomicU64,
    /// Decode rate over the supervisor's last window, in milli-tokens/s.
    pub decode_tps_milli: AtomicU64,
    pub parks: AtomicU64,
    pub wakes: AtomicU64,
    pub last_wake_us: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            tokens: AtomicU64::new(0),
            prefix_hits: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            stalls: AtomicU64::new(0),
            slow_worker_events: AtomicU64::new(0),
            decode_tps_milli: AtomicU64::new(0),
            parks: AtomicU64::new(0),
            wakes: AtomicU64::new(0),
            last_wake_us: AtomicU64::new(0),
        }
    }
}

/// Read at scrape time from their owners.
#[derive(Debug, Default)]
pub struct Gauges {
    pub status: Status,
    pub monitor: Snapshot,
    pub throttled: bool,
    pub throttle_events: u64,
    /// The engine's state: idle, busy, parked or waking.
    pub engine_state: &'static str,
    pub connections: usize,
}

impl Metrics {
    /// Counts a finished request of `api` (`ws`, `openai`, `http`);
    /// `outcome` is its `end` reason or `error` code.
    pub fn request_done(&self, api: &'static str, outcome: &str) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((api, outcome.to_owned()))
            .or_default() += 1;
    }

    /// A request reused `tokens` prompt tokens from the prefix cache.
    pub fn record_prefix_hit(&self, tokens: usize) {
        self.prefix_hits.fetch_add(1, Ordering::Relaxed);
        self.cached_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let o = &mut out;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        {
            let requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            header(
                o,
                "requests_total",
                "counter",
                "Finished requests by API and outcome (end reason or error code).",
            );
            for ((api, outcome), n) in requests.iter() {
                let _ = writeln!(
                    o,
                    "{PREFIX}_requests_total{{api=\"{api}\",outcome=\"{outcome}\"}} {n}"
                );
            }
        }
        counter(
            o,
            "tokens_generated_total",
            "Tokens sampled for replies.",
            load(&self.tokens),
        );
        counter(
            o,
            "prefix_cache_hits_total",
            "Requests that reused a cached prefix.",
            load(&self.prefix_hits),
        );
        counter(
            o,
            "prefix_cache_tokens_total",
            "Prompt tokens served from the prefix cache.",
            load(&self.cached_tokens),
        );
        self.ttft.render(
            o,
            "ttft_seconds",
            "Time from receiving a request to its first token.",
        );
        self.itl.render(
            o,
            "inter_token_seconds",
            "Time between two token events of a request.",
        );
        let s = &g.status;
        gauge(
            o,
            "queue_depth",
            "Requests waiting for a slot or KV pages.",
            s.queued as f64,
        );
        gauge(o, "slots", "Sequences decoded together.", s.slots as f64);
        gauge(
            o,
            "busy_slots",
            "Slots running a request.",
            s.busy_slots as f64,
        );
        header(o, "kv_pages", "gauge", "KV cache pages by use.");
        for (state, n) in [
            ("used", s.kv.pages_owned),
            ("cached", s.kv.pages_cached),
            ("free", s.kv.pages_free),
        ] {
            let _ = writeln!(o, "{PREFIX}_kv_pages{{state=\"{state}\"}} {n}");
        }
        gauge(
            o,
            "prefix_cache_entries",
            "Prefixes held in the KV cache.",
            s.kv.prefix_entries as f64,
        );
        gauge(
            o,
            "prefix_cache_host_entries",
            "Prefixes copied out of the KV cache to host memory.",
            s.kv.prefix_host_entries as f64,
        );
        gauge(
            o,
            "prefix_cache_host_bytes",
            "Bytes of the prefixes in host memory.",
            s.kv.prefix_host_bytes as f64,
        );
        gauge(
            o,
            "connections",
            "Open client connections.",
            g.connections as f64,
        );
        render_workers(o, &s.workers);
        if let Some(t) = g.monitor.temp_c {
            gauge(
                o,
                "temperature_celsius",
                "The temperature the thermal throttle acts on.",
                t,
            );
        }
        if let Some(gpu) = &g.monitor.gpu {
            let opt = |o: &mut String, name, help, v: Option<f64>| {
                if let Some(v) = v {
                    gauge(o, name, help, v);
                }
            };
            opt(o, "gpu_temperature_celsius", "GPU temperature.", gpu.temp_c);
            opt(
                o,
                "gpu_vram_used_bytes",
                "GPU memory in use.",
                gpu.vram_used_mb.map(mb),
            );
            opt(
                o,
                "gpu_vram_free_bytes",
                "GPU memory free.",
                gpu.vram_free_mb.map(mb),
            );
            opt(o, "gpu_power_watts", "GPU power draw.", gpu.power_w);
            opt(
                o,
                "gpu_utilization_ratio",
                "GPU busy fraction.",
                gpu.util_pct.map(|p| f64::from(p) / 100.0),
            );
            opt(
                o,
                "gpu_sm_clock_hertz",
                "GPU SM clock.",
                gpu.sm_clock_mhz.map(|c| f64::from(c) * 1e6),
            );
            opt(
                o,
                "gpu_memory_clock_hertz",
                "GPU memory clock.",
                gpu.mem_clock_mhz.map(|c| f64::from(c) * 1e6),
            );
        }
        gauge(
            o,
            "thermal_throttled",
            "1 while generation is paused for heat.",
            f64::from(u8::from(g.throttled)),
        );
        counter(
            o,
            "thermal_throttle_events_total",
            "Times the thermal throttle engaged.",
            g.throttle_events,
        );
        header(
            o,
            "engine_state",
            "gauge",
            "1 for the engine's current state.",
        );
        for state in EngineState::ALL.map(EngineState::name) {
            let v = u8::from(state == g.engine_state);
            let _ = writeln!(o, "{PREFIX}_engine_state{{state=\"{state}\"}} {v}");
        }
        counter(
            o,
            "parks_total",
            "Times the idle engine released its context.",
            load(&self.parks),
        );
        counter(
            o,
            "wakes_total",
            "Times a parked engine was woken by a request.",
            load(&self.wakes),
        );
        gauge(
            o,
            "last_wake_seconds",
            "Duration of the last wake-up.",
            load(&self.last_wake_us) as f64 / 1e6,
        );
        counter(
            o,
            "watchdog_stalls_total",
            "Engine stalls detected (each ends the process).",
            load(&self.stalls),
        );
        counter(
            o,
            "slow_worker_events_total",
            "Windows in which decoding ran below watchdog.min_tps.",
            load(&self.slow_worker_events),
        );
        gauge(
            o,
            "decode_tokens_per_second",
            "Decode rate over the supervisor's last window.",
            load(&self.decode_tps_milli) as f64 / 1e3,
        );
        out
    }
}

fn mb(v: u64) -> f64 {
    (v * 1024 * 1024) as f64
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {PREFIX}_{name} {help}");
    let _ = writeln!(o, "# TYPE {PREFIX}_{name} {kind}");
}

fn counter(o: &mut String, name: &str, help: &str, v: u64) {
    header(o, name, "counter", help);
    let _ = writeln!(o, "{PREFIX}_{name} {v}");
}

fn gauge(o: &mut String, name: &str, help: &str, v: f64) {
    header(o, name, "gauge", help);
    let _ = writeln!(o, "{PREFIX}_{name} {v}");
}

/// One line per worker for each of its gauges and counters, labelled
/// `worker` (its name) and `kind`.
fn render_workers(o: &mut String, workers: &[WorkerStatus]) {
    type Row = (
        &'static str,
        &'static str,
        &'static str,
        fn(&WorkerStatus) -> f64,
    );
    let rows: [Row; 6] = [
        (
            "worker_up",
            "gauge",
            "1 while the worker is in rotation.",
            |w| f64::from(u8::from(w.state == "serving")),
        ),
        (
            "worker_in_flight",
            "gauge",
            "Requests the worker holds (running and queued).",
            |w| w.in_flight as f64,
        ),
        (
            "worker_tokens_total",
            "counter",
            "Tokens the worker generated.",
            |w| w.tokens_total as f64,
        ),
        (
            "worker_requests_total",
            "counter",
            "Requests routed to the worker.",
            |w| w.requests_total as f64,
        ),
        (
            "worker_prefix_routed_total",
            "counter",
            "Requests routed to the worker for the prompt prefix it holds.",
            |w| w.prefix_hits as f64,
        ),
        (
            "worker_failures_total",
            "counter",
            "Times the worker was taken out of rotation.",
            |w| w.failures as f64,
        ),
    ];
    for (name, kind, help, value) in rows {
        header(o, name, kind, help);
        for w in workers {
            let _ = writeln!(
                o,
                "{PREFIX}_{name}{{worker=\"{}\",kind=\"{}\"}} {}",
                w.name,
                w.kind,
                value(w)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::monitor::GpuSample;

    /// A strict reader of the text format: every sample belongs to a family
    /// declared by a TYPE line before it, and every value is a number.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut families = Vec::new();
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                families.push(it.next().unwrap().to_owned());
                assert!(matches!(it.next(), Some("counter" | "gauge" | "histogram")));
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (key, value) = line.rsplit_once(' ').expect(line);
            let name = key.split('{').next().unwrap();
            assert!(
                families.iter().any(|f| name == f
                    || ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name == format!("{f}{s}"))),
                "{line}"
            );
            let v: f64 = if value == "+Inf" {
                f64::INFINITY
            } else {
                value.parse().expect(line)
            };
            assert!(
                samples.insert(key.to_owned(), v).is_none(),
                "duplicate {key}"
            );
        }
        samples
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        for s in [0.004, 0.03, 0.03, 20.0] {
            m.ttft.observe(s);
        }
        let p = parse(&m.render(&Gauges::default()));
        assert_eq!(p["inference_core_ttft_seconds_bucket{le=\"0.01\"}"], 1.0);
        assert_eq!(p["inference_core_ttft_seconds_bucket{le=\"0.05\"}"], 3.0);
        assert_eq!(p["inference_core_ttft_seconds_bucket{le=\"10\"}"], 3.0);
        assert_eq!(p["inference_core_ttft_seconds_bucket{le=\"+Inf\"}"], 4.0);
        assert_eq!(p["inference_core_ttft_seconds_count"], 4.0);
        assert!((p["inference_core_ttft_seconds_sum"] - 20.064).abs() < 1e-6);
    }

    #[test]
    fn renders_counters_gauges_and_optional_gpu_readings() {
        let m = Metrics::default();
        m.request_done("ws", "length");
        m.request_done("ws", "length");
        m.request_done("ws", "internal");
        m.tokens.fetch_add(7, Ordering::Relaxed);
        let mut g = Gauges {
            engine_state: "parked",
            throttled: true,
            ..Gauges::default()
        };
        g.status.kv.pages_free = 12;
        let p = parse(&m.render(&g));
        assert_eq!(
            p["inference_core_requests_total{api=\"ws\",outcome=\"length\"}"],
            2.0
        );
        assert_eq!(
            p["inference_core_requests_total{api=\"ws\",outcome=\"internal\"}"],
            1.0
        );
        assert_eq!(p["inference_core_tokens_generated_total"], 7.0);
        assert_eq!(p["inference_core_kv_pages{state=\"free\"}"], 12.0);
        assert_eq!(p["inference_core_engine_state{state=\"parked\"}"], 1.0);
        assert_eq!(p["inference_core_engine_state{state=\"idle\"}"], 0.0);
        assert_eq!(p["inference_core_thermal_throttled"], 1.0);
        assert!(!p.contains_key("inference_core_gpu_power_watts"));
        assert!(!p.contains_key("inference_core_temperature_celsius"));

        g.monitor.temp_c = Some(64.0);
        g.monitor.gpu = Some(GpuSample {
            power_w: Some(55.5),
            vram_used_mb: Some(1),
            ..GpuSample::default()
        });
        let p = parse(&m.render(&g));
        assert_eq!(p["inference_core_temperature_celsius"], 64.0);
        assert_eq!(p["inference_core_gpu_power_watts"], 55.5);
        assert_eq!(p["inference_core_gpu_vram_used_bytes"], 1048576.0);
        assert!(!p.contains_key("inference_core_gpu_temperature_celsius"));
    }
}

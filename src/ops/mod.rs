//! Operations: what keeps a 24/7 server healthy and observable. The shared
//! state (`Ops`) that the reactor, the monitor and the watchdog hold, and the
//! engine sees through its `Hooks`: heartbeat, engine state, thermal pause,
//! token counting, idle parking.

pub mod fault;
pub mod heartbeat;
pub mod metrics;
pub mod monitor;
pub mod thermal;
pub mod vram;
pub mod watchdog;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::config;
use crate::core::{EngineState, OpsStatus, Status};
use crate::engine::Hooks;
use fault::Fault;
use heartbeat::Heartbeat;
use metrics::{Gauges, Metrics};

pub struct Ops {
    pub heartbeat: Heartbeat,
    pub metrics: Metrics,
    pub monitor: Arc<monitor::Shared>,
    pub fault: Fault,
    pub idle: config::Idle,
    /// Several workers: the pool supervises each (stalls, slow ones), and
    /// the watchdog only tells systemd whether the pool serves.
    pub pooled: AtomicBool,
    /// The pool serves, or only upstream workers are out (see
    /// `Pool::healthy`): what systemd's watchdog hears, with `reactor`.
    pub pool_healthy: AtomicBool,
    /// Beaten by the reactor's loop (at least once a second while it turns).
    pub reactor: Heartbeat,
}

impl Ops {
    pub fn new(monitor: Arc<monitor::Shared>, idle: config::Idle, fault: Fault) -> Ops {
        Ops {
            heartbeat: Heartbeat::default(),
            metrics: Metrics::default(),
            monitor,
            fault,
            idle,
            pooled: AtomicBool::new(false),
            pool_healthy: AtomicBool::new(true),
            reactor: Heartbeat::default(),
        }
    }

    pub fn engine_state(&self) -> EngineState {
        self.heartbeat.state()
    }

    /// The operational part of the `status` snapshot.
    pub fn status(&self) -> OpsStatus {
        let snap = self.monitor.snapshot();
        let gpu = snap.gpu.unwrap_or_default();
        OpsStatus {
            engine: Some(self.engine_state().name()),
            throttled: Some(self.monitor.throttled()),
            temp_c: snap.temp_c,
            gpu_temp_c: gpu.temp_c,
            gpu_vram_used_mb: gpu.vram_used_mb,
            gpu_vram_free_mb: gpu.vram_free_mb,
            gpu_power_w: gpu.power_w,
            gpu_util_pct: gpu.util_pct,
        }
    }

    /// The `/metrics` page.
    pub fn render_metrics(&self, status: Status, connections: usize) -> String {
        self.metrics.render(&Gauges {
            status,
            monitor: self.monitor.snapshot(),
            throttled: self.monitor.throttled(),
            throttle_events: self.monitor.throttle_events.load(Ordering::Relaxed),
            engine_state: self.engine_state().name(),
            connections,
        })
    }
}

/// The engine reports through these.
impl Hooks for Ops {
    fn beat(&self) {
        self.heartbeat.beat();
    }

    fn set_state(&self, state: EngineState) {
        self.heartbeat.set_state(state);
    }

    /// True while the engine must not start a step.
    fn throttled(&self) -> bool {
        self.monitor.throttled()
    }

    /// A token was sampled.
    fn on_token(&self) {
        self.metrics.tokens.fetch_add(1, Ordering::Relaxed);
        self.fault.on_token();
    }

    /// How long the engine may sit idle before parking; `None`: never park.
    fn park_after(&self) -> Option<Duration> {
        (self.idle.park_after_s > 0.0).then(|| Duration::from_secs_f64(self.idle.park_after_s))
    }

    fn unload_on_park(&self) -> bool {
        self.idle.unload_model
    }

    /// The engine released its context (and, with `idle.unload_model`, its model).
    fn parked(&self) {
        self.set_state(EngineState::Parked);
        self.metrics.parks.fetch_add(1, Ordering::Relaxed);
        log::info!(
            "idle for {} s: parked (released the KV cache and compute buffers{}); the next request wakes the engine",
            self.idle.park_after_s,
            if self.idle.unload_model {
                " and the model"
            } else {
                ""
            }
        );
    }

    /// A parked engine is serving again; `took` runs from the waking request's arrival.
    fn woke(&self, took: Duration) {
        self.metrics.wakes.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .last_wake_us
            .store(took.as_micros() as u64, Ordering::Relaxed);
        log::info!(
            "woke up in {:.1} ms (the waking request's TTFT includes it)",
            took.as_secs_f64() * 1e3
        );
    }
}

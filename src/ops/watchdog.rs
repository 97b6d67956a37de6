//! Self-healing: the watchdog thread that ends the
//! process when the engine stalls, the slow-worker supervisor, and systemd's
//! notification protocol (READY, WATCHDOG, STOPPING).
//!
//! A C++ call stuck inside llama.cpp cannot be cancelled safely, so a stall is
//! answered by exiting with `EXIT_STALL` and letting systemd
//! (`Restart=on-failure`) start a fresh process. Before that, the reactor
//! tells every client in flight (`error` `internal`). systemd's own watchdog
//! (`WatchdogSec`) backs this up: WATCHDOG=1 is only sent while the process
//! is well (`well`: the reactor turns, the engine beats, the pool serves), so
//! a process too wedged to exit is killed by systemd.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::config;
use crate::core::EngineState;
use crate::ops::Ops;

/// Exit status after a stall (or a slow worker with `restart_on_slow`):
/// EX_SOFTWARE from sysexits.h, distinct from 1 (start-up failure) and 2 (usage).
pub const EXIT_STALL: i32 = 70;

/// Tells systemd the service is up (no-op without `NOTIFY_SOCKET`).
pub fn notify_ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

pub fn notify_stopping() {
    notify(&[NotifyState::Stopping]);
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("cannot notify systemd: {e}");
    }
}

/// Starts the watchdog thread. `wake` wakes the reactor so it sees `stalled`.
pub fn spawn(
    cfg: &config::Watchdog,
    ops: Arc<Ops>,
    wake: impl Fn() + Send + 'static,
    exit_now: ExitNow,
) -> std::io::Result<()> {
    let cfg = cfg.clone();
    let stall = Duration::from_secs_f64(cfg.stall_s);
    let tick = Duration::from_secs_f64((cfg.stall_s / 5.0).clamp(0.02, 0.5));
    let systemd = sd_notify::watchdog_enabled().map(|usec| usec / 2);
    if let Some(period) = systemd {
        log::info!("systemd watchdog: pinging every {period:?} while the engine is healthy");
    }
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut last_ping = Instant::now() - systemd.unwrap_or_default();
            let mut window = Window::new(&ops);
            loop {
                std::thread::sleep(tick);
                let hb = &ops.heartbeat;
                let lag = hb.since_beat();
                let pooled = ops.pooled.load(Ordering::Relaxed);
                if !pooled && hb.state() == EngineState::Busy && lag > stall {
                    log::error!(
                        "watchdog: the engine made no progress for {:.1} s with work pending: failing its requests and exiting with status {EXIT_STALL} for a restart",
                        lag.as_secs_f64()
                    );
                    ops.metrics.stalls.fetch_add(1, Ordering::Relaxed);
                    restart(&ops, &wake, exit_now);
                }
                let engine_lag = match hb.state() {
                    _ if pooled => Duration::ZERO,
                    EngineState::Busy | EngineState::Waking => lag,
                    EngineState::Idle | EngineState::Parked => Duration::ZERO,
                };
                if let Some(period) = systemd
                    && last_ping.elapsed() >= period
                    && well(
                        ops.reactor.since_beat(),
                        engine_lag,
                        stall,
                        ops.pool_healthy.load(Ordering::Relaxed),
                    )
                {
                    notify(&[NotifyState::Watchdog]);
                    last_ping = Instant::now();
                }
                if let Some(tps) = window.tick(&ops, Duration::from_secs_f64(cfg.slow_window_s)) {
                    ops.metrics
                        .decode_tps_milli
                        .store((tps * 1e3) as u64, Ordering::Relaxed);
                    if !pooled && cfg.min_tps > 0.0 && tps < cfg.min_tps {
                        ops.metrics
                            .slow_worker_events
                            .fetch_add(1, Ordering::Relaxed);
                        log::warn!(
                            "watchdog: slow worker: {tps:.1} tokens/s over {} s, below watchdog.min_tps = {}",
                            cfg.slow_window_s,
                            cfg.min_tps
                        );
                        if cfg.restart_on_slow {
                            restart(&ops, &wake, exit_now);
                        }
                    }
                }
            }
        })?;
    Ok(())
}

/// The reactor beats at least once a second while its loop turns.
const REACTOR_LAG: Duration = Duration::from_secs(10);

/// Whether systemd hears WATCHDOG=1: the reactor's loop turns, the engine
/// (alone, not pooled) has made progress within `stall` while it has work
/// or wakes, and the pool is healthy (`Pool::healthy`). Otherwise systemd
/// restarts the process after `WatchdogSec`.
fn well(reactor_lag: Duration, engine_lag: Duration, stall: Duration, pool_healthy: bool) -> bool {
    reactor_lag < REACTOR_LAG && engine_lag <= stall && pool_healthy
}

/// Hands over to the reactor (which fails every request and exits); exits
/// from here if the reactor does not manage within two seconds.
fn restart(ops: &Ops, wake: &dyn Fn(), exit_now: ExitNow) -> ! {
    ops.heartbeat.mark_stalled();
    wake();
    std::thread::sleep(Duration::from_secs(2));
    log::error!("watchdog: the reactor did not exit: exiting now");
    exit_now(EXIT_STALL)
}

/// Ends the process at once with a status, without running exit handlers:
/// the engine thread may be stuck inside llama.cpp holding its locks, and the
/// C++ static destructors that `exit` runs could then wait forever. The app
/// passes `engine::llama::exit_now` (`_exit`, in the FFI module).
pub type ExitNow = fn(i32) -> !;

/// The slow-worker supervisor's measuring window: it only spans time in
/// which the engine was busy and not thermally throttled.
struct Window {
    start: Instant,
    tokens: u64,
}

impl Window {
    fn new(ops: &Ops) -> Window {
        Window {
            start: Instant::now(),
            tokens: ops.metrics.tokens.load(Ordering::Relaxed),
        }
    }

    /// The decode rate once a full window has passed.
    fn tick(&mut self, ops: &Ops, length: Duration) -> Option<f64> {
        if ops.heartbeat.state() != EngineState::Busy || ops.monitor.throttled() {
            *self = Window::new(ops);
            return None;
        }
        let elapsed = self.start.elapsed();
        if elapsed < length {
            return None;
        }
        let tokens = ops.metrics.tokens.load(Ordering::Relaxed) - self.tokens;
        *self = Window::new(ops);
        Some(tokens as f64 / elapsed.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_hears_only_of_a_process_that_is_well() {
        let (s, stall) = (Duration::from_secs, Duration::from_secs(30));
        assert!(well(s(1), s(0), stall, true));
        // The engine busy (or waking) and beating within the stall bound.
        assert!(well(s(1), s(29), stall, true));
        // A wedged reactor loop, a stuck engine, a pool whose local
        // workers are all out.
        assert!(!well(s(11), s(0), stall, true));
        assert!(!well(s(1), s(31), stall, true));
        assert!(!well(s(1), s(0), stall, false));
    }
}

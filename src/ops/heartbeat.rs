//! The engine's heartbeat: when it last made progress and what state it is
//! in. Written by the engine, read by the watchdog, the reactor and `/health`.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::core::EngineState;

pub struct Heartbeat {
    origin: Instant,
    /// Milliseconds since `origin` at the last beat.
    last_ms: AtomicU64,
    state: AtomicU8,
    stalled: AtomicBool,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat::new(Instant::now())
    }
}

impl Heartbeat {
    pub fn new(origin: Instant) -> Heartbeat {
        Heartbeat {
            origin,
            last_ms: AtomicU64::new(0),
            state: AtomicU8::new(EngineState::Idle as u8),
            stalled: AtomicBool::new(false),
        }
    }

    pub fn beat(&self) {
        self.beat_at(Instant::now());
    }

    pub fn beat_at(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.origin).as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_state(&self, state: EngineState) {
        self.beat();
        self.state.store(state as u8, Ordering::Relaxed);
    }

    pub fn state(&self) -> EngineState {
        EngineState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn since_beat(&self) -> Duration {
        self.age_at(Instant::now())
    }

    /// Time from the last beat to `now`.
    pub fn age_at(&self, now: Instant) -> Duration {
        let ms = now.saturating_duration_since(self.origin).as_millis() as u64;
        Duration::from_millis(ms.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Set by the watchdog: the reactor fails every request and exits.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    pub fn mark_stalled(&self) {
        self.stalled.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_runs_from_the_last_beat() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let hb = Heartbeat::new(t0);
        hb.beat_at(at(100));
        assert_eq!(hb.age_at(at(100)), Duration::ZERO);
        assert_eq!(hb.age_at(at(1600)), Duration::from_millis(1500));
        hb.beat_at(at(1500));
        assert_eq!(hb.age_at(at(1600)), Duration::from_millis(100));
        // A clock read before the last beat (another thread's) is no age at all.
        assert_eq!(hb.age_at(at(1000)), Duration::ZERO);
    }

    #[test]
    fn state_round_trips() {
        let hb = Heartbeat::default();
        assert_eq!(hb.state(), EngineState::Idle);
        for s in EngineState::ALL {
            hb.set_state(s);
            assert_eq!(hb.state(), s);
        }
        assert!(!hb.stalled());
        hb.mark_stalled();
        assert!(hb.stalled());
    }
}

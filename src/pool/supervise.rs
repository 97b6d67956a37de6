//! The supervisor's judgement of one worker, sans-I/O: from what the worker
//! says of itself (its health), whether it has work, and its token count over
//! time, decide when it leaves rotation and when it may come back.
//!
//! The decode-rate floor is measured only over time in which the worker had
//! work (an idle worker generates nothing and is not slow). A worker taken
//! out for being slow comes back after a backoff that doubles with each
//! removal in a row (an upstream is probed meanwhile; a local engine is
//! restarted, which resets it).

use std::time::{Duration, Instant};

use crate::pool::worker::Health;

/// A worker slower than `min_tps` over `window` (while it had work) is slow;
/// 0: no floor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Floor {
    pub min_tps: f64,
    pub window: Duration,
}

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Keep,
    TakeOut(String),
    PutBack,
}

#[derive(Debug)]
pub struct Watch {
    out: Option<Out>,
    /// Where the current measuring window started: time and token count.
    window: Option<(Instant, u64)>,
    /// The last full window's rate.
    pub tokens_per_s: f64,
    backoff: Duration,
}

#[derive(Debug)]
struct Out {
    /// Not back before this, even if it says it is healthy.
    until: Instant,
}

impl Default for Watch {
    fn default() -> Self {
        Watch {
            out: None,
            window: None,
            tokens_per_s: 0.0,
            backoff: FIRST_BACKOFF,
        }
    }
}

impl Watch {
    /// For a worker not known to serve yet: it enters rotation the first
    /// time it says it serves, without counting as a failure.
    pub fn starting(now: Instant) -> Watch {
        Watch {
            out: Some(Out { until: now }),
            ..Watch::default()
        }
    }

    pub fn in_rotation(&self) -> bool {
        self.out.is_none()
    }

    pub fn observe(
        &mut self,
        now: Instant,
        health: &Health,
        busy: bool,
        tokens: u64,
        floor: &Floor,
    ) -> Verdict {
        if let Some(out) = &self.out {
            if *health == Health::Serving && now >= out.until {
                self.out = None;
                self.window = None;
                return Verdict::PutBack;
            }
            return Verdict::Keep;
        }
        if let Health::Down(why) = health {
            return self.take_out(now, why.clone());
        }
        if !busy {
            self.window = None;
            return Verdict::Keep;
        }
        let Some((start, at)) = self.window else {
            self.window = Some((now, tokens));
            return Verdict::Keep;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < floor.window || floor.window.is_zero() {
            return Verdict::Keep;
        }
        let rate = tokens.saturating_sub(at) as f64 / elapsed.as_secs_f64();
        self.tokens_per_s = rate;
        self.window = Some((now, tokens));
        if floor.min_tps > 0.0 && rate < floor.min_tps {
            return self.take_out(
                now,
                format!(
                    "{rate:.1} tokens/s over {:.0} s, below the floor of {}",
                    elapsed.as_secs_f64(),
                    floor.min_tps
                ),
            );
        }
        // A full window at speed: the next removal starts the backoff anew.
        self.backoff = FIRST_BACKOFF;
        Verdict::Keep
    }

    fn take_out(&mut self, now: Instant, why: String) -> Verdict {
        self.out = Some(Out {
            until: now + self.backoff,
        });
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.window = None;
        Verdict::TakeOut(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOR: Floor = Floor {
        min_tps: 5.0,
        window: Duration::from_secs(10),
    };

    #[test]
    fn a_worker_that_says_it_is_down_leaves_and_returns_when_healthy() {
        let t0 = Instant::now();
        let mut w = Watch::default();
        let down = Health::Down("connection refused".into());
        assert_eq!(
            w.observe(t0, &down, false, 0, &FLOOR),
            Verdict::TakeOut("connection refused".into())
        );
        assert!(!w.in_rotation());
        assert_eq!(w.observe(t0, &down, false, 0, &FLOOR), Verdict::Keep);
        // Healthy again, but within the backoff: not yet.
        let soon = t0 + Duration::from_millis(500);
        assert_eq!(
            w.observe(soon, &Health::Serving, false, 0, &FLOOR),
            Verdict::Keep
        );
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            w.observe(later, &Health::Serving, false, 0, &FLOOR),
            Verdict::PutBack
        );
        assert!(w.in_rotation());
    }

    #[test]
    fn the_rate_floor_counts_only_busy_time() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut w = Watch::default();
        let ok = Health::Serving;
        // Idle for a minute: never slow.
        assert_eq!(w.observe(at(0), &ok, false, 0, &FLOOR), Verdict::Keep);
        assert_eq!(w.observe(at(60), &ok, false, 0, &FLOOR), Verdict::Keep);
        // Busy at 10 tokens/s: fine.
        assert_eq!(w.observe(at(60), &ok, true, 0, &FLOOR), Verdict::Keep);
        assert_eq!(w.observe(at(70), &ok, true, 100, &FLOOR), Verdict::Keep);
        assert_eq!(w.tokens_per_s, 10.0);
        // Then 2 tokens/s: out.
        let v = w.observe(at(80), &ok, true, 120, &FLOOR);
        assert!(
            matches!(&v, Verdict::TakeOut(why) if why.contains("2.0 tokens/s")),
            "{v:?}"
        );
    }

    #[test]
    fn removals_in_a_row_back_off_longer() {
        let t0 = Instant::now();
        let mut w = Watch::default();
        let down = Health::Down("x".into());
        let mut t = t0;
        let mut waits = Vec::new();
        for _ in 0..4 {
            assert!(matches!(
                w.observe(t, &down, false, 0, &FLOOR),
                Verdict::TakeOut(_)
            ));
            let back = (1..=120)
                .map(|s| t + Duration::from_secs(s))
                .find(|&at| w.observe(at, &Health::Serving, false, 0, &FLOOR) == Verdict::PutBack)
                .unwrap();
            waits.push((back - t).as_secs());
            t = back;
        }
        assert_eq!(waits, [1, 2, 4, 8]);
    }
}

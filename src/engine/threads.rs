//! How many threads llama.cpp decodes with, chosen by measurement.
//!
//! On a small box other processes take cores too, and ggml's threads wait
//! for each other at every graph node: two threads on two cores of which
//! one is taken decode slower than one thread alone (measured with a busy
//! loop beside the server: 21-31 tok/s with two threads, 50 with one; 69
//! with two when alone). So every `PROBE_EVERY` decode-only steps the tuner
//! tries a neighbouring thread count for `PROBE_STEPS` steps and keeps the
//! faster of the two. At every thread (alone, as usual) a probe that loses
//! doubles the wait for the next, up to `MAX_PROBE_EVERY`, and one that
//! is far slower ends after `CLEAR_STEPS` steps (a probe then costs about
//! 0.6% of the steps' time instead of 1.4%, 2.3% at the first wait instead
//! of 5.2%); below it the wait stays short,
//! for the cores may come back any time. A probe that wins, or a step time
//! that moves by a quarter from where the last verdict left it, brings the
//! next one back to `PROBE_EVERY`. Steps with prompt or draft tokens run at
//! the kept count, never a probe's.
//!
//! Where the box is known to be quiet (other processes took less than
//! `QUIET_CORES` of the CPUs between its last two readings, at least a
//! second apart: `engine::cpu_share`), the tuner at every thread does not
//! probe at all: there is nothing to find, and each probe's steps at one
//! thread of two were the slowest gaps of a lone stream (2x a plain step,
//! 1% of its gaps: its ITL p99). Probes start again as soon as the box is
//! not quiet. Sans-I/O: it sees step times and
//! the others' share, and answers thread counts.

/// Decode-only steps between two probes, at first.
pub const PROBE_EVERY: usize = 128;
/// The longest wait between probes, after losing ones in a row.
pub const MAX_PROBE_EVERY: usize = 512;
/// Steps a probe runs (after one to settle).
pub const PROBE_STEPS: usize = 6;
/// A probe ends early as lost after this many steps (the one to settle
/// included) if its steps took `CLEAR_LOSS` times those it left or more.
pub const CLEAR_STEPS: usize = 3;
const CLEAR_LOSS: f64 = 1.3;
/// Other processes taking less than this many cores leave the box quiet.
pub const QUIET_CORES: f64 = 0.25;

#[derive(Debug, Clone)]
pub struct ThreadTuner {
    max: usize,
    current: usize,
    /// Average decode-only step time at `current` threads since it was
    /// chosen, and the rows it was measured with.
    here: Option<Timing>,
    /// While probing: the count probed from and its timing.
    probe: Option<(usize, Timing)>,
    steps: usize,
    /// The next probe goes up (else down) when both are possible.
    up: bool,
    /// Steps between probes now.
    interval: usize,
    /// The timing the last verdict kept.
    settled: Option<Timing>,
    /// Other processes take (next to) nothing of the CPUs.
    quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Timing {
    rows: usize,
    ms: f64,
    n: usize,
}

impl Timing {
    fn add(slot: &mut Option<Timing>, rows: usize, ms: f64) {
        match slot {
            Some(t) if t.rows == rows => {
                t.n += 1;
                t.ms += (ms - t.ms) / t.n.min(32) as f64;
            }
            _ => *slot = Some(Timing { rows, ms, n: 1 }),
        }
    }
}

impl ThreadTuner {
    pub fn new(max: usize) -> ThreadTuner {
        ThreadTuner {
            max: max.max(1),
            current: max.max(1),
            here: None,
            probe: None,
            steps: 0,
            up: false,
            interval: PROBE_EVERY,
            settled: None,
            quiet: false,
        }
    }

    /// What other processes took of the CPUs lately, in cores (`None`:
    /// unknown, which is not quiet).
    pub fn others(&mut self, cores: Option<f64>) {
        self.quiet = cores.is_some_and(|c| c < QUIET_CORES);
    }

    /// Threads for a decode-only step (the probed count while probing).
    pub fn threads(&self) -> usize {
        self.current
    }

    /// Threads for a step that carries prompt or draft tokens: the count the
    /// last verdict kept, never a probe's. Probes compare decode-only steps,
    /// and a prompt chunk run at a losing probe's count took twice as long.
    pub fn kept(&self) -> usize {
        self.probe.map_or(self.current, |(from, _)| from)
    }

    /// Records a decode-only step of `rows` rows that took `ms`; returns the
    /// thread count for the next steps when it changes.
    pub fn observe(&mut self, rows: usize, ms: f64) -> Option<usize> {
        if self.max == 1 || !ms.is_finite() || ms <= 0.0 {
            return None;
        }
        self.steps += 1;
        if let Some((from, before)) = self.probe {
            if self.steps > 1 {
                Timing::add(&mut self.here, rows, ms); // the first step settles
            }
            // A probe far slower than what it left (one thread of two when
            // alone: about twice) need not run its course.
            let lost = self.steps >= CLEAR_STEPS
                && self
                    .here
                    .is_some_and(|t| t.rows == before.rows && t.ms > before.ms * CLEAR_LOSS);
            if self.steps <= PROBE_STEPS && !lost {
                return None;
            }
            self.probe = None;
            self.steps = 0;
            let faster = self
                .here
                .is_some_and(|t| t.rows == before.rows && t.ms < before.ms * 0.95);
            if faster {
                self.interval = PROBE_EVERY;
                self.settled = self.here;
                return None; // keep the probed count
            }
            // At every thread (alone, as usual) losing probes wait longer
            // and longer; below it, the cores may come back any time.
            self.interval = if from == self.max {
                (self.interval * 2).min(MAX_PROBE_EVERY)
            } else {
                PROBE_EVERY
            };
            self.settled = Some(before);
            self.current = from;
            self.here = Some(before);
            return Some(from);
        }
        Timing::add(&mut self.here, rows, ms);
        if let (Some(h), Some(s)) = (self.here, self.settled)
            && h.rows == s.rows
            && (h.ms > s.ms * 1.25 || h.ms * 1.25 < s.ms)
        {
            // Something else started or stopped on the box: look soon.
            self.interval = PROBE_EVERY;
            self.settled = None;
        }
        if self.steps < self.interval || (self.quiet && self.current == self.max) {
            return None;
        }
        let (Some(before), next) = (self.here, self.neighbour()) else {
            return None;
        };
        self.probe = Some((self.current, before));
        self.current = next;
        self.here = None;
        self.steps = 0;
        Some(next)
    }

    fn neighbour(&mut self) -> usize {
        let up = match (self.current > 1, self.current < self.max) {
            (true, true) => {
                self.up = !self.up;
                self.up
            }
            (false, _) => true,
            (_, false) => false,
        };
        if up {
            self.current + 1
        } else {
            self.current - 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `steps` decode-only steps of one row whose time `cost` gives per
    /// thread count; returns the thread counts used.
    fn run(t: &mut ThreadTuner, steps: usize, cost: impl Fn(usize) -> f64) -> Vec<usize> {
        (0..steps)
            .map(|_| {
                let used = t.threads();
                t.observe(1, cost(used));
                used
            })
            .collect()
    }

    #[test]
    fn alone_it_keeps_every_thread_and_probes_less_and_less() {
        let mut t = ThreadTuner::new(2);
        let used = run(&mut t, 4000, |n| 30.0 / n as f64);
        assert_eq!(t.kept(), 2, "(the run may end in a probe)");
        // Where each probe (one thread) started: the waits double to the cap.
        let starts: Vec<usize> = (0..used.len())
            .filter(|&i| used[i] == 1 && (i == 0 || used[i - 1] == 2))
            .collect();
        let waits: Vec<usize> = starts
            .windows(2)
            .map(|w| w[1] - w[0] - CLEAR_STEPS)
            .collect();
        assert_eq!(waits[..3], [256, 512, 512], "{starts:?}");
        let probed = used.iter().filter(|&&n| n == 1).count();
        assert_eq!(
            probed,
            starts.len() * CLEAR_STEPS,
            "short probes only: one thread is clearly slower"
        );
    }

    #[test]
    fn on_a_quiet_box_it_does_not_probe_until_something_else_runs() {
        let mut t = ThreadTuner::new(2);
        t.others(Some(0.1));
        let used = run(&mut t, 4000, |n| 30.0 / n as f64);
        assert_eq!(used, vec![2; 4000]);
        // Something else takes a core: probes start again, and within a
        // short wait (as in the test below) one thread wins.
        t.others(Some(1.0));
        run(&mut t, PROBE_EVERY + 2 * PROBE_STEPS + 40, |n| {
            if n == 2 { 45.0 } else { 20.0 }
        });
        assert_eq!(t.threads(), 1);
        // Below every thread it probes on, quiet or not, to climb back.
        t.others(Some(0.0));
        run(&mut t, PROBE_EVERY + PROBE_STEPS + 2, |n| 30.0 / n as f64);
        assert_eq!(t.threads(), 2);
        // Unknown is not quiet.
        t.others(None);
        let used = run(&mut t, 1000, |n| 30.0 / n as f64);
        assert!(used.contains(&1));
    }

    #[test]
    fn a_probe_that_loses_narrowly_runs_its_course() {
        let mut t = ThreadTuner::new(2);
        // One thread 10% slower than two: not clearly, so every probe step runs.
        let used = run(&mut t, PROBE_EVERY + 2 * PROBE_STEPS, |n| {
            if n == 2 { 30.0 } else { 33.0 }
        });
        let probed = used.iter().filter(|&&n| n == 1).count();
        assert_eq!((probed, t.threads()), (PROBE_STEPS + 1, 2));
    }

    #[test]
    fn with_the_cores_taken_it_drops_a_thread_and_climbs_back_when_they_are_free() {
        let mut t = ThreadTuner::new(2);
        // Contended: two threads take 45 ms a step, one 20 ms.
        run(&mut t, PROBE_EVERY + PROBE_STEPS + 2, |n| {
            if n == 2 { 45.0 } else { 20.0 }
        });
        assert_eq!(t.threads(), 1);
        run(
            &mut t,
            2 * PROBE_EVERY,
            |n| if n == 2 { 45.0 } else { 20.0 },
        );
        assert_eq!(t.threads(), 1, "the probe up lost");
        // Free again: two threads win the next probe up.
        run(&mut t, PROBE_EVERY + PROBE_STEPS + 2, |n| 30.0 / n as f64);
        assert_eq!(t.threads(), 2);
    }

    #[test]
    fn a_hog_arriving_after_the_backoff_is_answered_soon() {
        let mut t = ThreadTuner::new(2);
        // Alone long enough for the waits to reach the cap.
        run(&mut t, 2000, |n| 30.0 / n as f64);
        // Then two threads slow to 45 ms (one is 20): within a short wait
        // (the average moves, then one probe), one thread it is.
        let used = run(&mut t, PROBE_EVERY + 2 * PROBE_STEPS + 40, |n| {
            if n == 2 { 45.0 } else { 20.0 }
        });
        assert_eq!(t.threads(), 1, "{used:?}");
    }

    #[test]
    fn steps_with_prompts_keep_the_kept_count_while_a_probe_runs() {
        let mut t = ThreadTuner::new(2);
        run(&mut t, PROBE_EVERY, |n| 30.0 / n as f64);
        assert_eq!((t.threads(), t.kept()), (1, 2), "probing one thread");
        run(&mut t, PROBE_STEPS + 1, |n| 30.0 / n as f64);
        assert_eq!((t.threads(), t.kept()), (2, 2), "the probe lost");
    }

    #[test]
    fn probes_compare_like_with_like_and_one_thread_never_probes() {
        let mut t = ThreadTuner::new(2);
        run(&mut t, PROBE_EVERY, |_| 30.0);
        // The probe runs with other rows than before: no verdict, back to 2.
        for _ in 0..=PROBE_STEPS {
            t.observe(3, 10.0);
        }
        assert_eq!(t.threads(), 2);
        let mut one = ThreadTuner::new(1);
        assert_eq!(run(&mut one, 500, |_| 10.0), vec![1; 500]);
    }
}

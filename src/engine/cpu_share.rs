//! How much of the CPUs other processes take, for the thread tuner: from
//! Linux's `/proc/stat` (every CPU's busy and idle time) less this
//! process's own (`/proc/self/stat`), in cores. Elsewhere, or where those
//! files cannot be read, it knows nothing and the tuner probes as always.

use std::time::{Duration, Instant};

/// The least time between two readings: a reading costs two small file
/// reads, and a CPU's times move in ticks of 10 ms.
const EVERY: Duration = Duration::from_secs(1);

/// Cumulative CPU times, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Times {
    /// Busy time of every CPU, whoever ran.
    busy: u64,
    /// Busy and idle time of every CPU.
    total: u64,
    /// CPUs counted.
    cpus: u64,
    /// This process's user and system time.
    own: u64,
}

pub struct CpuShare {
    last: Option<(Instant, Times)>,
    others: Option<f64>,
}

impl CpuShare {
    pub fn new() -> Self {
        CpuShare {
            last: None,
            others: None,
        }
    }

    /// Cores other processes used between the last two readings (at most
    /// one a second: until the next is due, the last answer); `None`
    /// until two readings were made, or where they cannot be.
    pub fn others(&mut self, now: Instant) -> Option<f64> {
        if self.last.is_some_and(|(at, _)| now - at < EVERY) {
            return self.others;
        }
        let read = |path| std::fs::read_to_string(path).ok();
        let Some(times) = read("/proc/stat")
            .zip(read("/proc/self/stat"))
            .and_then(|(stat, own)| times(&stat, &own))
        else {
            self.others = None;
            return None;
        };
        self.others = self.last.and_then(|(_, before)| others(before, times));
        self.last = Some((now, times));
        self.others
    }
}

/// Cores used by others from `before` to `after`.
fn others(before: Times, after: Times) -> Option<f64> {
    let total = after.total.checked_sub(before.total)?;
    let busy = after.busy.checked_sub(before.busy)?;
    let own = after.own.checked_sub(before.own)?;
    (total > 0).then(|| busy.saturating_sub(own) as f64 / total as f64 * after.cpus as f64)
}

/// The times in `/proc/stat`'s text and `/proc/self/stat`'s.
fn times(stat: &str, own: &str) -> Option<Times> {
    // "cpu  user nice system idle iowait irq softirq steal guest guest_nice":
    // idle and iowait are idle; guest time is already in user's.
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    let idle = field(3) + field(4);
    let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
    let cpus = stat
        .lines()
        .skip(1)
        .filter(|l| l.starts_with("cpu"))
        .count() as u64;
    // "pid (comm) state ..." where comm may hold spaces and parentheses:
    // utime and stime are the 12th and 13th fields after its last ')'.
    let after_comm: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = after_comm.get(11)?.parse().ok()?;
    let stime: u64 = after_comm.get(12)?.parse().ok()?;
    Some(Times {
        busy,
        total: busy + idle,
        cpus: cpus.max(1),
        own: utime + stime,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &str = "4242 (inference (core)) S 1 4242 4242 0 -1 4194560 2000 0 0 0 300 50 0 0 20 0 5 0 100 1000000 5000 18446744073709551615";

    fn stat(user: u64, idle: u64) -> String {
        format!(
            "cpu  {user} 0 100 {idle} 10 0 5 0 0 0\ncpu0 1 0 0 1 0 0 0 0 0 0\ncpu1 1 0 0 1 0 0 0 0 0 0\nintr 1 2 3\n"
        )
    }

    #[test]
    fn both_files_are_read() {
        let t = times(&stat(1000, 5000), OWN).unwrap();
        assert_eq!(
            t,
            Times {
                busy: 1105,
                total: 6115,
                cpus: 2,
                own: 350
            }
        );
        assert_eq!(times("intr 1\n", OWN), None);
        assert_eq!(times(&stat(1, 1), "4242 (x) S 1"), None);
    }

    #[test]
    fn others_are_the_busy_time_that_is_not_ours() {
        let before = times(&stat(1000, 5000), OWN).unwrap();
        // 200 ticks over two CPUs: 150 busy, of which ours 100.
        let after = Times {
            busy: before.busy + 150,
            total: before.total + 200,
            own: before.own + 100,
            ..before
        };
        assert_eq!(others(before, after), Some(0.5));
        // Ours counted more than the CPUs' busy time (the files are read
        // one after the other): nobody else.
        let after = Times {
            own: before.own + 160,
            ..after
        };
        assert_eq!(others(before, after), Some(0.0));
        assert_eq!(others(after, before), None);
    }

    #[test]
    fn this_machine_is_read_once_a_second_at_most() {
        let mut share = CpuShare::new();
        let t0 = Instant::now();
        assert_eq!(share.others(t0), None, "one reading tells nothing yet");
        if cfg!(target_os = "linux") {
            assert!(share.last.is_some());
            // A CPU's times move in ticks of 10 ms.
            std::thread::sleep(Duration::from_millis(100));
            let later = t0 + EVERY;
            let got = share.others(later);
            assert!(got.is_some_and(|c| c >= 0.0), "{got:?}");
            assert_eq!(share.others(later + EVERY / 2), got);
        }
    }
}

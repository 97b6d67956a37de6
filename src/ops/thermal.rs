//! Thermal throttle: a hysteresis state machine, sans-I/O.
//!
//! The monitor feeds it one temperature per sample; it answers whether the
//! throttle state changed. At or above `limit_c` the engine pauses between
//! steps; it resumes only at or below `resume_c`, so a temperature hovering at
//! the limit does not flap. A missing reading keeps the current state: a
//! sensor that fails while hot must not release the brake.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Crossed the limit: pause.
    Throttle,
    /// Cooled below the resume point: go on.
    Resume,
}

#[derive(Debug, Clone)]
pub struct Throttle {
    limit_c: f64,
    resume_c: f64,
    throttled: bool,
}

impl Throttle {
    pub fn new(limit_c: f64, resume_c: f64) -> Throttle {
        Throttle {
            limit_c,
            resume_c: resume_c.min(limit_c),
            throttled: false,
        }
    }

    pub fn throttled(&self) -> bool {
        self.throttled
    }

    /// Takes one reading; returns the change it caused, if any.
    pub fn update(&mut self, temp_c: Option<f64>) -> Option<Change> {
        let t = temp_c?;
        if !self.throttled && t >= self.limit_c {
            self.throttled = true;
            Some(Change::Throttle)
        } else if self.throttled && t <= self.resume_c {
            self.throttled = false;
            Some(Change::Resume)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttles_at_the_limit_and_resumes_below_the_resume_point() {
        let mut t = Throttle::new(80.0, 75.0);
        assert_eq!(t.update(Some(79.9)), None);
        assert_eq!(t.update(Some(80.0)), Some(Change::Throttle));
        assert!(t.throttled());
        // Hysteresis: between resume and limit nothing changes, either way.
        assert_eq!(t.update(Some(77.0)), None);
        assert_eq!(t.update(Some(85.0)), None);
        assert!(t.throttled());
        assert_eq!(t.update(Some(75.0)), Some(Change::Resume));
        assert_eq!(t.update(Some(77.0)), None);
        assert!(!t.throttled());
    }

    #[test]
    fn a_missing_reading_keeps_the_state() {
        let mut t = Throttle::new(80.0, 75.0);
        t.update(Some(90.0));
        assert_eq!(t.update(None), None);
        assert!(t.throttled());
    }

    #[test]
    fn resume_above_limit_is_clamped() {
        let mut t = Throttle::new(70.0, 90.0);
        assert_eq!(t.update(Some(70.0)), Some(Change::Throttle));
        assert_eq!(t.update(Some(70.0)), Some(Change::Resume));
    }
}

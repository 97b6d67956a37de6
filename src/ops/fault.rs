//! Test-only fault injection, off unless `INFERENCE_CORE_FAULT` is set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Test-only fault injection, off unless `INFERENCE_CORE_FAULT` is set:
/// `stall_after_tokens:N` makes the engine hang (without beating) once it
/// has sampled N tokens, as a stuck GPU call would.
#[derive(Debug, Default)]
pub struct Fault {
    stall_after_tokens: Option<u64>,
    tokens: AtomicU64,
}

impl Fault {
    pub const ENV: &str = "INFERENCE_CORE_FAULT";

    pub fn from_env() -> Fault {
        let spec = std::env::var(Self::ENV).unwrap_or_default();
        let fault = Fault::parse(&spec);
        if fault.stall_after_tokens.is_some() {
            log::warn!("fault injection is on: {}={spec}", Self::ENV);
        } else if !spec.is_empty() {
            log::warn!("ignoring unknown fault {spec:?} in {}", Self::ENV);
        }
        fault
    }

    fn parse(spec: &str) -> Fault {
        let stall_after_tokens = spec
            .strip_prefix("stall_after_tokens:")
            .and_then(|n| n.trim().parse().ok());
        Fault {
            stall_after_tokens,
            tokens: AtomicU64::new(0),
        }
    }

    /// Called for every sampled token; hangs forever once the fault triggers.
    pub fn on_token(&self) {
        if self.triggered() {
            log::warn!("fault injection: the engine stalls now");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }

    /// Counts a token; true for the one that reaches the configured number
    /// (with several engines, only the engine that samples it stalls).
    fn triggered(&self) -> bool {
        match self.stall_after_tokens {
            Some(limit) => self.tokens.fetch_add(1, Ordering::Relaxed) + 1 == limit,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_spec_is_parsed_and_off_by_default() {
        assert_eq!(Fault::parse("").stall_after_tokens, None);
        assert_eq!(Fault::parse("explode").stall_after_tokens, None);
        assert_eq!(
            Fault::parse("stall_after_tokens:5").stall_after_tokens,
            Some(5)
        );
    }

    #[test]
    fn the_fault_triggers_at_the_nth_token_and_never_without_one() {
        let off = Fault::parse("");
        assert!((0..100).all(|_| !off.triggered()));
        let fault = Fault::parse("stall_after_tokens:3");
        assert_eq!(
            (0..3).map(|_| fault.triggered()).collect::<Vec<_>>(),
            [false, false, true]
        );
    }
}

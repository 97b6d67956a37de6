//! What the engine tells the operations side, and asks of it, without knowing
//! what is behind: heartbeat and state for the watchdog, the thermal pause,
//! token counting, idle parking. `ops::Ops` implements it; the unit tests use
//! a recording fake.

use std::time::Duration;

use crate::core::EngineState;

pub trait Hooks: Send + Sync {
    /// Progress: the watchdog measures stalls from the last beat.
    fn beat(&self);
    fn set_state(&self, state: EngineState);
    /// While true, no step starts (thermal throttle).
    fn throttled(&self) -> bool;
    /// A token was sampled.
    fn on_token(&self);
    /// How long the engine may sit idle before parking; `None`: never.
    fn park_after(&self) -> Option<Duration>;
    /// Whether parking releases the model's weights too, not only the context.
    fn unload_on_park(&self) -> bool;
    /// The engine released its context (and maybe its model).
    fn parked(&self);
    /// A parked engine is serving again; `took` runs from the waking request's arrival.
    fn woke(&self, took: Duration);
}

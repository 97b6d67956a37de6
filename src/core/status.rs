//! Snapshots the engine and the operations side publish: slots, queue, KV
//! pages, engine state, temperatures.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EngineState {
    /// No work: blocked on its channel.
    Idle = 0,
    /// Work pending: must beat.
    Busy = 1,
    /// Idle and its context (maybe its model) released.
    Parked = 2,
    /// Re-creating what parking released.
    Waking = 3,
}

impl EngineState {
    pub const ALL: [EngineState; 4] = [
        EngineState::Idle,
        EngineState::Busy,
        EngineState::Parked,
        EngineState::Waking,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EngineState::Idle => "idle",
            EngineState::Busy => "busy",
            EngineState::Parked => "parked",
            EngineState::Waking => "waking",
        }
    }

    pub fn from_u8(v: u8) -> EngineState {
        Self::ALL
            .get(v as usize)
            .copied()
            .unwrap_or(EngineState::Waking)
    }

    /// Parked or on its way back: the next request pays for the wake-up.
    pub fn is_parked(self) -> bool {
        matches!(self, EngineState::Parked | EngineState::Waking)
    }
}

/// A snapshot of the engine, answered to a status request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Status {
    pub slots: usize,
    pub busy_slots: usize,
    pub queued: usize,
    pub kv: KvStatus,
    /// Engine state, temperature, throttle and GPU readings; absent fields are unknown.
    pub ops: OpsStatus,
    /// The pool's workers (empty for the engine's own snapshot).
    pub workers: Vec<WorkerStatus>,
}

/// One worker of the pool as `status` and `/metrics` show it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerStatus {
    pub name: String,
    /// `llama` (in this process) or `openai` (an upstream server).
    pub kind: &'static str,
    /// `serving`, `starting`, `down` (out of rotation) or `stopped`.
    pub state: &'static str,
    /// Why it is out of rotation, while it is.
    pub why: Option<String>,
    pub in_flight: usize,
    /// Tokens per second over the supervisor's last window.
    pub tokens_per_s: f64,
    pub tokens_total: u64,
    /// Requests routed to it because it held their prompt's prefix.
    pub prefix_hits: u64,
    pub requests_total: u64,
    /// Times it was taken out of rotation.
    pub failures: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpsStatus {
    /// idle, busy, parked or waking.
    pub engine: Option<&'static str>,
    pub throttled: Option<bool>,
    pub temp_c: Option<f64>,
    pub gpu_temp_c: Option<f64>,
    pub gpu_vram_used_mb: Option<u64>,
    pub gpu_vram_free_mb: Option<u64>,
    pub gpu_power_w: Option<f64>,
    pub gpu_util_pct: Option<u32>,
}

/// KV cache pages: owned by running requests, held by the prefix cache, free.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvStatus {
    pub page_size: usize,
    pub pages_total: usize,
    pub pages_owned: usize,
    pub pages_cached: usize,
    pub pages_free: usize,
    pub prefix_entries: usize,
    /// Cached prefixes copied out of the cells to host memory, and their bytes.
    pub prefix_host_entries: usize,
    pub prefix_host_bytes: usize,
}

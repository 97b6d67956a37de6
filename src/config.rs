//! Settings: built-in defaults, overlaid by a TOML file (`--config`), overlaid
//! by command-line flags. `config/inference-core.toml` documents every key and
//! a unit test keeps it identical to the built-in defaults.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

use crate::core::SamplingParams;

/// The default model's file name inside the model cache (see scripts/fetch-model.sh).
pub const DEFAULT_MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
/// The default model's GGUF carries no chat template; it uses Gemma's turns.
const DEFAULT_MODEL_CHAT_TEMPLATE: &str = "gemma";
/// The longest any setting in seconds may be: far beyond a sensible value,
/// and what keeps one from overflowing a `Duration` or an `Instant`.
pub const MAX_SECONDS: f64 = 86_400.0;

#[derive(Debug, Parser)]
#[command(
    name = "inference-core",
    version,
    about = "Streams tokens from one llama.cpp model to WebSocket clients"
)]
pub struct Cli {
    /// GGUF model to serve [default: the cached Gemma 3 270M Q4_K_M]
    #[arg(short = 'm', long = "model", value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1]
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free one [default: 8080]
    #[arg(long)]
    pub port: Option<u16>,
    /// Threads for generation and prompt processing [default: physical cores]
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Context size in tokens [default: 4096]
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<u32>,
    /// Requests generated together (scheduler slots; also -np) [default: 4]
    #[arg(long = "parallel")]
    pub parallel: Option<usize>,
    /// Chat template for "messages": a llama.cpp built-in name (gemma, chatml,
    /// llama3...) or a template text [default: the model's own]
    #[arg(long, value_name = "NAME")]
    pub chat_template: Option<String>,
    /// TOML settings file (see config/inference-core.toml)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log level: error, warn, info, debug, trace [default: info]
    #[arg(long)]
    pub log_level: Option<String>,
    /// Where cached prompt prefixes are saved across restarts
    /// [default: $INFERENCE_CORE_STATE, else ~/.local/state/inference-core]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Log lines as text, or as one JSON object per line [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// An API key clients must send (`Authorization: Bearer KEY`); repeat for
    /// several. Added to server.api_keys.
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line (# comments)
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// An upstream OpenAI-compatible server (vLLM, TGI, llama-server...) to
    /// serve through, as a worker of the pool; repeat for several
    #[arg(long = "upstream", value_name = "URL")]
    pub upstreams: Vec<String>,
    /// Start no llama.cpp engine in this process: only upstream workers serve
    #[arg(long)]
    pub no_local: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: Server,
    pub model: Model,
    pub scheduler: Scheduler,
    pub constraints: Constraints,
    pub defaults: SamplingParams,
    pub log: Log,
    pub monitor: Monitor,
    pub thermal: Thermal,
    pub idle: Idle,
    pub state: State,
    pub watchdog: Watchdog,
    pub pool: Pool,
    /// The pool's workers; none: the one engine of `[model]`.
    pub workers: Vec<WorkerConfig>,
}

/// The worker pool (docs/scale-out.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Pool {
    /// How requests are spread over the workers.
    pub routing: Routing,
    /// Start the engine of `[model]` as worker "local" when no `llama`
    /// worker is listed (`--no-local` sets false).
    pub local: bool,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            routing: Routing::Prefix,
            local: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// The worker that was sent the longest shared prompt prefix (its cache
    /// holds it), else the least loaded.
    #[default]
    Prefix,
    LeastLoaded,
    /// Each worker in turn (for comparison).
    RoundRobin,
}

/// One `[[workers]]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum WorkerConfig {
    /// A llama.cpp engine in this process, on the model of `[model]`.
    Llama(LlamaWorker),
    /// An OpenAI-compatible server over HTTP.
    Openai(OpenAiWorker),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct LlamaWorker {
    /// Empty: `llama-N`.
    pub name: String,
    /// 0: `model.threads`.
    pub threads: usize,
    /// Unset: `model.n_gpu_layers`.
    pub n_gpu_layers: Option<GpuLayers>,
    /// 0: `scheduler.slots`.
    pub slots: usize,
    /// 0: `model.ctx_size`.
    pub ctx_size: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiWorker {
    /// Empty: `upstream-N`.
    pub name: String,
    /// `http://host:port` (a `/v1` at the end is the API root, also accepted).
    pub url: String,
    /// Sent as `model`; empty: left out.
    pub model: String,
    /// Sent as `Authorization: Bearer`; empty: none.
    pub api_key: String,
    /// Requests it is sent at once; more wait in this server's queue.
    pub max_inflight: usize,
    /// A stream silent this long fails (queued upstream, a long prompt: be generous).
    pub timeout_s: f64,
    /// `GET /health` this often while it serves.
    pub probe_every_s: f64,
    /// Two probes in a row unanswered this long mark it down.
    pub probe_timeout_s: f64,
}

impl Default for OpenAiWorker {
    fn default() -> Self {
        OpenAiWorker {
            name: String::new(),
            url: String::new(),
            model: String::new(),
            api_key: String::new(),
            max_inflight: 8,
            timeout_s: 120.0,
            probe_every_s: 2.0,
            probe_timeout_s: 2.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub max_connections: usize,
    pub max_inflight_per_connection: usize,
    pub handshake_timeout_s: f64,
    pub max_message_bytes: usize,
    pub max_frame_bytes: usize,
    pub max_write_buffer_bytes: usize,
    /// Ping a WebSocket client silent this long; 0: never.
    pub ping_interval_s: f64,
    /// Close a pinged client that sends nothing within this time.
    pub pong_timeout_s: f64,
    /// Longest prompt, in tokens after tokenization; 0: only the context size bounds it.
    pub max_prompt_tokens: usize,
    pub shutdown_timeout_s: f64,
    /// Path of a test-only WebSocket echo route (the Autobahn conformance
    /// suite runs against it); empty: off.
    pub echo_path: String,
    /// Keys clients must send; empty (and no key file): no authentication.
    pub api_keys: Vec<String>,
    /// A file of keys, one per line; empty: none.
    pub api_key_file: String,
    /// Browser origins allowed to call the HTTP API (CORS); "*": any.
    pub cors_origins: Vec<String>,
    /// Largest HTTP request body.
    pub max_body_bytes: usize,
    /// A kept-alive HTTP connection idle this long is closed.
    pub keep_alive_timeout_s: f64,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            host: "127.0.0.1".into(),
            port: 8080,
            max_connections: 1024,
            max_inflight_per_connection: 8,
            handshake_timeout_s: 10.0,
            max_message_bytes: 1 << 20,
            max_frame_bytes: 1 << 20,
            max_write_buffer_bytes: 4 << 20,
            ping_interval_s: 30.0,
            pong_timeout_s: 10.0,
            max_prompt_tokens: 0,
            shutdown_timeout_s: 5.0,
            echo_path: String::new(),
            api_keys: Vec::new(),
            api_key_file: String::new(),
            cors_origins: Vec::new(),
            max_body_bytes: 1 << 20,
            keep_alive_timeout_s: 30.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Model {
    /// Empty: the default model in the cache directory.
    pub path: String,
    pub ctx_size: u32,
    /// 0: the number of physical cores.
    pub threads: usize,
    pub batch_size: u32,
    pub n_gpu_layers: GpuLayers,
    /// MB of VRAM `n_gpu_layers = "auto"` may plan for; 0: all that is free.
    pub vram_budget_mb: u64,
    /// ggml's repacked CPU weight layouts (faster; see docs/batching.md on determinism).
    pub weight_repack: bool,
    /// Empty: the template in the GGUF (or "gemma" for the default model, whose GGUF has none).
    pub chat_template: String,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            path: String::new(),
            ctx_size: 4096,
            threads: 0,
            batch_size: 512,
            n_gpu_layers: GpuLayers::Count(0),
            vram_budget_mb: 0,
            weight_repack: true,
            chat_template: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scheduler {
    /// Sequences decoded together in one batch.
    pub slots: usize,
    /// KV cells per accounting page.
    pub page_size: usize,
    /// Requests that may wait for a slot; beyond it: `overloaded`.
    pub max_queue: usize,
    /// Cached prefixes kept in the KV pool (each holds one llama.cpp sequence id).
    pub prefix_cache_entries: usize,
    /// Host memory (MiB) for cached prefixes moved out of the KV pool while
    /// several requests run (kept cells slow every row); 0: they stay in it.
    pub prefix_cache_host_mb: usize,
    /// Prompt tokens one step may carry while other requests are generating.
    pub prefill_chunk: usize,
    /// Inter-token gap (ms) to keep for generating requests while prompts go
    /// in (and that a stream's drafted step may take); 0: eight measured
    /// one-stream steps (eight plain steps for drafts).
    pub itl_target_ms: f64,
    /// Most draft tokens (looked up in the request's own text) one step
    /// verifies for a sequence; 0: no speculative decoding.
    pub draft_max: usize,
    /// Shortest repeated run of tokens that yields a draft.
    pub draft_min_match: usize,
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler {
            slots: 4,
            page_size: 16,
            max_queue: 64,
            prefix_cache_entries: 32,
            prefix_cache_host_mb: 256,
            prefill_chunk: 128,
            itl_target_ms: 0.0,
            draft_max: 48,
            draft_min_match: 3,
        }
    }
}

/// What one request's constraint (`json_schema`, `regex`, `grammar`...) may cost.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Constraints {
    /// Prepare constrained decoding at start-up (about 1 s on a thread of
    /// its own, at the lowest priority, and ~125 MB for a 262k-token
    /// vocabulary); off, constrained requests are refused.
    pub enabled: bool,
    /// Longest schema, grammar or regex, in bytes.
    pub max_bytes: usize,
    /// Compile time one constraint may take (llguidance's lexer fuel), in ms.
    pub compile_ms: u64,
}

impl Default for Constraints {
    fn default() -> Self {
        Constraints {
            enabled: true,
            max_bytes: 65536,
            compile_ms: 200,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    pub level: String,
    /// `text`, or `json`: one object per line (time, level, target, message, fields).
    pub format: LogFormat,
    /// Directory for rotating log files; empty: stderr only.
    pub dir: String,
    pub rotate_mb: u64,
    pub keep_files: usize,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".into(),
            format: LogFormat::Text,
            dir: String::new(),
            rotate_mb: 16,
            keep_files: 5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `n_gpu_layers`: a count (-1: all) or `"auto"` (as many as fit in VRAM, see `vram`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuLayers {
    Auto,
    Count(i32),
}

impl<'de> Deserialize<'de> for GpuLayers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(i32),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(GpuLayers::Count(n)),
            Raw::Name(s) if s == "auto" => Ok(GpuLayers::Auto),
            Raw::Name(s) => Err(serde::de::Error::custom(format!(
                "n_gpu_layers must be \"auto\" or a number of layers, not {s:?}"
            ))),
        }
    }
}

/// The sensor thread (`monitor`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Monitor {
    pub interval_s: f64,
    /// A file holding a temperature (°C or millidegrees); empty: NVML, else the CPU's thermal zones.
    pub temp_file: String,
    /// Query the NVIDIA driver (libnvidia-ml) when it is installed.
    pub nvml: bool,
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor {
            interval_s: 1.0,
            temp_file: String::new(),
            nvml: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thermal {
    /// At or above this temperature the engine pauses between steps.
    pub limit_c: f64,
    /// ... until the temperature is at or below this one.
    pub resume_c: f64,
}

impl Default for Thermal {
    fn default() -> Self {
        Thermal {
            limit_c: 80.0,
            resume_c: 75.0,
        }
    }
}

/// Cached prompt prefixes saved across restarts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct State {
    /// Empty: `$INFERENCE_CORE_STATE`, else `$XDG_STATE_HOME/inference-core`,
    /// else `~/.local/state/inference-core`.
    pub dir: String,
    /// MB of prefixes saved (the most recently used first); 0: none saved or loaded.
    pub max_mb: usize,
    /// Save when the engine goes idle at most this often (and at shutdown).
    pub save_every_s: f64,
}

impl Default for State {
    fn default() -> Self {
        State {
            dir: String::new(),
            max_mb: 256,
            save_every_s: 60.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Idle {
    /// Seconds without work after which the context is released; 0: never.
    pub park_after_s: f64,
    /// Release the model's weights too when parking.
    pub unload_model: bool,
    /// MB of cached prefixes (the most recently used first) kept in memory
    /// while parked and restored on wake; 0: parking forgets them.
    pub keep_prefixes_mb: usize,
}

impl Default for Idle {
    fn default() -> Self {
        Idle {
            park_after_s: 300.0,
            unload_model: false,
            keep_prefixes_mb: 256,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Watchdog {
    /// A step running longer than this while work is pending is a stall: exit 70.
    pub stall_s: f64,
    /// Decode rate (tokens/s, all sequences) below which the worker counts as slow; 0: off.
    pub min_tps: f64,
    /// Seconds of sustained slowness before it is reported.
    pub slow_window_s: f64,
    /// Exit 70 (systemd restarts the service) when the worker is slow, not only report it.
    pub restart_on_slow: bool,
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog {
            stall_s: 30.0,
            min_tps: 0.0,
            slow_window_s: 60.0,
            restart_on_slow: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(String, std::io::Error),
    #[error("invalid config file {0}: {1}")]
    Parse(String, toml::de::Error),
    #[error("invalid setting: {0}")]
    Invalid(String),
}

impl Cli {
    /// Parses the process arguments, accepting llama-server's `-np N` too.
    pub fn from_env() -> Cli {
        Cli::parse_from(std::env::args().map(|a| {
            if a == "-np" {
                "--parallel".to_owned()
            } else {
                a
            }
        }))
    }
}

impl Config {
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(origin.to_owned(), e))
    }

    /// Defaults, then the `--config` file, then flags.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let mut config = match &cli.config {
            Some(path) => {
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::Read(shown.clone(), e))?;
                Config::from_toml(&text, &shown)?
            }
            None => Config::default(),
        };
        if let Some(m) = &cli.model {
            config.model.path = m.display().to_string();
        }
        if let Some(h) = &cli.host {
            config.server.host = h.clone();
        }
        if let Some(p) = cli.port {
            config.server.port = p;
        }
        if let Some(t) = cli.threads {
            config.model.threads = t;
        }
        if let Some(c) = cli.ctx_size {
            config.model.ctx_size = c;
        }
        if let Some(n) = cli.parallel {
            config.scheduler.slots = n;
        }
        if let Some(t) = &cli.chat_template {
            config.model.chat_template = t.clone();
        }
        if let Some(l) = &cli.log_level {
            config.log.level = l.clone();
        }
        if let Some(d) = &cli.state_dir {
            config.state.dir = d.display().to_string();
        }
        if let Some(f) = cli.log_format {
            config.log.format = f;
        }
        config.server.api_keys.extend(cli.api_keys.iter().cloned());
        if let Some(f) = &cli.api_key_file {
            config.server.api_key_file = f.display().to_string();
        }
        for url in &cli.upstreams {
            config.workers.push(WorkerConfig::Openai(OpenAiWorker {
                url: url.clone(),
                ..OpenAiWorker::default()
            }));
        }
        if cli.no_local {
            config.pool.local = false;
        }
        config.name_workers();
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.model.ctx_size < 16 {
            return bad("model.ctx_size must be at least 16");
        }
        if self.model.batch_size == 0 {
            return bad("model.batch_size must be at least 1");
        }
        if self.server.max_connections == 0 || self.server.max_inflight_per_connection == 0 {
            return bad(
                "server.max_connections and server.max_inflight_per_connection must be at least 1",
            );
        }
        let sv = &self.server;
        self.validate_seconds()?;
        if sv.max_body_bytes == 0 {
            return bad("server.max_body_bytes must be above 0");
        }
        if !sv.echo_path.is_empty() && !sv.echo_path.starts_with('/') {
            return bad("server.echo_path must be empty or start with /");
        }
        let s = &self.scheduler;
        if s.slots == 0 || s.page_size == 0 || s.slots + s.prefix_cache_entries > 256 {
            return bad(
                "scheduler.slots and scheduler.page_size must be at least 1, and slots + prefix_cache_entries at most 256",
            );
        }
        if !(0.0..=MAX_SECONDS * 1e3).contains(&s.itl_target_ms) {
            return bad(
                "scheduler.itl_target_ms must be 0 (derived from the measured steps) or more, at most a day",
            );
        }
        if s.draft_min_match == 0 || s.draft_max >= self.model.batch_size as usize {
            return bad(
                "scheduler.draft_min_match must be at least 1 and scheduler.draft_max below model.batch_size",
            );
        }
        if s.slots as u32 > self.model.batch_size {
            return bad("scheduler.slots must not exceed model.batch_size");
        }
        if self.constraints.max_bytes == 0 || self.constraints.compile_ms == 0 {
            return bad("constraints.max_bytes and constraints.compile_ms must be at least 1");
        }
        let t = &self.thermal;
        if !(t.limit_c.is_finite() && t.resume_c.is_finite() && t.resume_c <= t.limit_c) {
            return bad("thermal.resume_c must not exceed thermal.limit_c");
        }
        if !(self.watchdog.min_tps.is_finite() && self.watchdog.min_tps >= 0.0) {
            return bad("watchdog.min_tps must be 0 (off) or more");
        }
        self.validate_workers()?;
        self.defaults
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("defaults.{e}")))
    }

    /// Every setting in seconds is a number within its range and at most a
    /// day (`MAX_SECONDS`): NaN, infinity or a huge value would otherwise
    /// pass and panic later, where it becomes a `Duration`.
    fn validate_seconds(&self) -> Result<(), ConfigError> {
        // (key, value, least, whether the least itself is allowed)
        let settings = [
            (
                "server.handshake_timeout_s",
                self.server.handshake_timeout_s,
                0.0,
                false,
            ),
            (
                "server.ping_interval_s",
                self.server.ping_interval_s,
                0.0,
                true,
            ),
            (
                "server.pong_timeout_s",
                self.server.pong_timeout_s,
                0.0,
                false,
            ),
            (
                "server.shutdown_timeout_s",
                self.server.shutdown_timeout_s,
                0.0,
                true,
            ),
            (
                "server.keep_alive_timeout_s",
                self.server.keep_alive_timeout_s,
                0.0,
                false,
            ),
            ("monitor.interval_s", self.monitor.interval_s, 0.01, true),
            ("state.save_every_s", self.state.save_every_s, 0.0, true),
            ("idle.park_after_s", self.idle.park_after_s, 0.0, true),
            ("watchdog.stall_s", self.watchdog.stall_s, 0.0, false),
            (
                "watchdog.slow_window_s",
                self.watchdog.slow_window_s,
                0.0,
                false,
            ),
        ];
        for (key, v, least, inclusive) in settings {
            let low = if inclusive { v >= least } else { v > least };
            if !(low && v <= MAX_SECONDS) {
                let bound = if inclusive { "at least" } else { "above" };
                return Err(ConfigError::Invalid(format!(
                    "{key} must be {bound} {least} and at most {MAX_SECONDS} (a day), not {v}"
                )));
            }
        }
        Ok(())
    }

    /// Gives unnamed workers `llama-N` / `upstream-N`.
    fn name_workers(&mut self) {
        let (mut llama, mut upstream) = (0, 0);
        for w in &mut self.workers {
            let (name, n, prefix) = match w {
                WorkerConfig::Llama(l) => (&mut l.name, &mut llama, "llama"),
                WorkerConfig::Openai(o) => (&mut o.name, &mut upstream, "upstream"),
            };
            *n += 1;
            if name.is_empty() {
                *name = format!("{prefix}-{n}");
            }
        }
    }

    fn validate_workers(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let mut names = std::collections::HashSet::new();
        if self.local_engine() {
            names.insert("local");
        }
        for w in &self.workers {
            let name = match w {
                WorkerConfig::Llama(l) => {
                    let slots = if l.slots > 0 {
                        l.slots
                    } else {
                        self.scheduler.slots
                    };
                    if slots + self.scheduler.prefix_cache_entries > 256
                        || slots as u32 > self.model.batch_size
                    {
                        return bad(format!(
                            "workers {:?}: slots + scheduler.prefix_cache_entries must be at most 256, and slots at most model.batch_size",
                            l.name
                        ));
                    }
                    if l.ctx_size != 0 && l.ctx_size < 16 {
                        return bad(format!(
                            "workers {:?}: ctx_size must be 0 (model.ctx_size) or at least 16",
                            l.name
                        ));
                    }
                    &l.name
                }
                WorkerConfig::Openai(o) => {
                    let host = url::Url::parse(&o.url)
                        .ok()
                        .filter(|u| u.scheme() == "http")
                        .and_then(|u| u.host_str().map(str::to_owned));
                    if host.is_none() {
                        return bad(format!(
                            "workers {:?}: url {:?} must be http://HOST[:PORT][/PATH] (https is not supported: reach the upstream on a private network or through a local TLS proxy)",
                            o.name, o.url
                        ));
                    }
                    let seconds = |v: f64| v > 0.0 && v <= MAX_SECONDS;
                    if o.max_inflight == 0
                        || !(seconds(o.timeout_s)
                            && seconds(o.probe_every_s)
                            && seconds(o.probe_timeout_s))
                    {
                        return bad(format!(
                            "workers {:?}: max_inflight must be at least 1, and timeout_s, probe_every_s and probe_timeout_s above 0 and at most a day",
                            o.name
                        ));
                    }
                    &o.name
                }
            };
            // Names become metric labels and state folders.
            let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
            if name.is_empty() || name.starts_with('.') || !name.chars().all(plain) {
                return bad(format!(
                    "worker name {name:?}: use letters, digits, '-', '_' and '.' (not first)"
                ));
            }
            if !names.insert(name.as_str()) {
                return bad(format!("two workers are named {name:?}"));
            }
        }
        if names.is_empty() {
            return bad("no worker: --no-local (pool.local = false) needs an upstream (--upstream URL or [[workers]])".into());
        }
        Ok(())
    }

    /// Whether the engine of `[model]` runs as worker "local".
    pub fn local_engine(&self) -> bool {
        self.pool.local
            && !self
                .workers
                .iter()
                .any(|w| matches!(w, WorkerConfig::Llama(_)))
    }

    pub fn model_path(&self) -> PathBuf {
        if self.model.path.is_empty() {
            model_cache_dir().join(DEFAULT_MODEL_FILE)
        } else {
            PathBuf::from(&self.model.path)
        }
    }

    /// The chat template to use instead of the model's own, if any.
    pub fn chat_template(&self) -> Option<String> {
        match (self.model.chat_template.as_str(), self.model.path.as_str()) {
            ("", "") => Some(DEFAULT_MODEL_CHAT_TEMPLATE.to_owned()),
            ("", _) => None,
            (t, _) => Some(t.to_owned()),
        }
    }

    /// The state directory; `None` when saving is off (`state.max_mb = 0`).
    pub fn state_dir(&self) -> Option<PathBuf> {
        if self.state.max_mb == 0 {
            return None;
        }
        if !self.state.dir.is_empty() {
            return Some(PathBuf::from(&self.state.dir));
        }
        if let Some(dir) = std::env::var_os("INFERENCE_CORE_STATE") {
            return Some(PathBuf::from(dir));
        }
        let base = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))?;
        Some(base.join("inference-core"))
    }

    pub fn threads(&self) -> usize {
        if self.model.threads == 0 {
            num_cpus::get_physical().max(1)
        } else {
            self.model.threads
        }
    }
}

/// `$INFERENCE_CORE_CACHE`, else `$XDG_CACHE_HOME/inference-core/models`, else
/// `~/.cache/inference-core/models`; scripts/fetch-model.sh uses the same rule.
pub fn model_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("INFERENCE_CORE_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("inference-core").join("models")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_file_equals_builtin_defaults() {
        let text = include_str!("../config/inference-core.toml");
        let parsed = Config::from_toml(text, "config/inference-core.toml").unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn n_gpu_layers_is_auto_or_a_count() {
        let c = Config::from_toml("[model]\nn_gpu_layers = \"auto\"\n", "t").unwrap();
        assert_eq!(c.model.n_gpu_layers, GpuLayers::Auto);
        let c = Config::from_toml("[model]\nn_gpu_layers = -1\n", "t").unwrap();
        assert_eq!(c.model.n_gpu_layers, GpuLayers::Count(-1));
        let e = Config::from_toml("[model]\nn_gpu_layers = \"most\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("\"auto\" or a number"), "{e}");
    }

    #[test]
    fn defaults_are_validated_like_requests() {
        let c = Config::from_toml("[defaults]\ntemp = -1.0\n", "t").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("defaults.temp = -1 is out of range"), "{e}");
    }

    #[test]
    fn draft_settings_must_fit_the_batch() {
        for bad in [
            "[scheduler]\ndraft_min_match = 0\n",
            "[scheduler]\ndraft_max = 512\n",
        ] {
            let e = Config::from_toml(bad, "t").unwrap().validate().unwrap_err();
            assert!(
                e.to_string()
                    .contains("scheduler.draft_min_match must be at least 1"),
                "{e}"
            );
        }
        let off = Config::from_toml("[scheduler]\ndraft_max = 0\n", "t").unwrap();
        assert!(off.validate().is_ok());
    }

    #[test]
    fn every_setting_in_seconds_is_a_bounded_number() {
        for (table, key, zero_ok) in [
            ("server", "handshake_timeout_s", false),
            ("server", "ping_interval_s", true),
            ("server", "pong_timeout_s", false),
            ("server", "shutdown_timeout_s", true),
            ("server", "keep_alive_timeout_s", false),
            ("state", "save_every_s", true),
            ("idle", "park_after_s", true),
            ("watchdog", "stall_s", false),
            ("watchdog", "slow_window_s", false),
        ] {
            let zero = if zero_ok { None } else { Some("0.0") };
            for v in ["nan", "inf", "-1.0", "1e20"].into_iter().chain(zero) {
                let toml = format!("[{table}]\n{key} = {v}\n");
                let e = Config::from_toml(&toml, "t")
                    .unwrap()
                    .validate()
                    .unwrap_err();
                assert!(
                    e.to_string().contains(&format!("{table}.{key} must be")),
                    "{toml}: {e}"
                );
            }
            let fine = format!("[{table}]\n{key} = 5.0\n");
            assert!(
                Config::from_toml(&fine, "t").unwrap().validate().is_ok(),
                "{fine}"
            );
        }
        for bad in [
            "[monitor]\ninterval_s = 0.001\n",
            "[scheduler]\nitl_target_ms = inf\n",
            "[watchdog]\nmin_tps = nan\n",
            "[thermal]\nlimit_c = nan\n",
        ] {
            assert!(
                Config::from_toml(bad, "t").unwrap().validate().is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_log_format_is_text_or_json() {
        let c = Config::from_toml("[log]\nformat = \"json\"\n", "t").unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(Config::from_toml("[log]\nformat = \"xml\"\n", "t").is_err());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = Config::from_toml("[server]\nprot = 1\n", "t").unwrap_err();
        assert!(e.to_string().contains("unknown field `prot`"), "{e}");
    }

    #[test]
    fn flags_override_file() {
        let dir = std::env::temp_dir().join(format!("ic-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[server]\nport = 9000\nhost = \"0.0.0.0\"\n[model]\nctx_size = 1024\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "inference-core",
            "--config",
            file.to_str().unwrap(),
            "--port",
            "9100",
            "-t",
            "3",
            "--parallel",
            "2",
        ]);
        let c = Config::load(&cli).unwrap();
        assert_eq!(c.server.port, 9100);
        assert_eq!(c.server.host, "0.0.0.0");
        assert_eq!(c.model.ctx_size, 1024);
        assert_eq!(c.threads(), 3);
        assert_eq!(c.scheduler.slots, 2);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

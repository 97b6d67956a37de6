//! Protocol v1, the server's side: every message the server sends, with the
//! wire shapes of the core's stats and status, serialised with `to_json`.
//! What clients send is parsed in `protocol`.

use serde::Serialize;

use crate::core::tools::ToolCall;
use crate::core::{Candidate, ErrorCode, Stats, Status, TokenLogprobs, WorkerStatus};

/// What `hello` tells a new client about the server.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hello<'a> {
    pub protocol: u32,
    /// The engine's state: `ready`, or `parked` (the first request wakes it).
    pub status: &'a str,
    pub model: &'a str,
    pub n_ctx: usize,
    pub version: &'a str,
    /// Whether `messages` can be sent (the model has a chat template).
    pub chat: bool,
    pub limits: Limits,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    /// Requests in flight on one connection.
    pub max_inflight: usize,
    /// Longest prompt, in tokens.
    pub max_prompt_tokens: usize,
    /// Most tokens one request can generate (the context's share left after a prompt).
    pub max_tokens: usize,
    /// `max_tokens` when a request does not say.
    pub default_max_tokens: u32,
    pub max_stop_strings: usize,
    pub max_stop_bytes: usize,
    pub max_message_bytes: usize,
}

/// `end`'s statistics, as v1 names them.
#[derive(Debug, Serialize)]
pub struct WireStats {
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub truncated_tokens: usize,
    pub completion_tokens: usize,
    pub ttft_ms: f64,
    pub ms: f64,
    pub tps: f64,
    pub draft_tokens: usize,
    pub draft_accepted: usize,
}

impl From<&Stats> for WireStats {
    fn from(s: &Stats) -> WireStats {
        WireStats {
            prompt_tokens: s.prompt_tokens,
            cached_tokens: s.cached_tokens,
            truncated_tokens: s.truncated_tokens,
            completion_tokens: s.completion_tokens,
            ttft_ms: s.ttft_ms,
            ms: s.ms,
            tps: s.tps,
            draft_tokens: s.draft_tokens,
            draft_accepted: s.accepted_draft_tokens,
        }
    }
}

/// The `status` snapshot as v1 shows it: the engine's counts, its KV pages,
/// and the operational readings that are known, side by side.
#[derive(Debug, Serialize)]
pub struct WireStatus {
    pub slots: usize,
    pub busy_slots: usize,
    pub queued: usize,
    pub kv: WireKv,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temp_c: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_temp_c: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_vram_used_mb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_vram_free_mb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_power_w: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_util_pct: Option<u32>,
    /// The pool's workers.
    pub workers: Vec<WireWorker>,
}

#[derive(Debug, Serialize)]
pub struct WireWorker {
    pub name: String,
    pub kind: &'static str,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    pub in_flight: usize,
    pub tokens_per_s: f64,
    pub tokens_total: u64,
    pub requests_total: u64,
    pub prefix_hits: u64,
    pub failures: u64,
}

impl From<&WorkerStatus> for WireWorker {
    fn from(w: &WorkerStatus) -> WireWorker {
        WireWorker {
            name: w.name.clone(),
            kind: w.kind,
            state: w.state,
            why: w.why.clone(),
            in_flight: w.in_flight,
            tokens_per_s: (w.tokens_per_s * 10.0).round() / 10.0,
            tokens_total: w.tokens_total,
            requests_total: w.requests_total,
            prefix_hits: w.prefix_hits,
            failures: w.failures,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct WireKv {
    pub page_size: usize,
    pub pages_total: usize,
    pub pages_owned: usize,
    pub pages_cached: usize,
    pub pages_free: usize,
    pub prefix_entries: usize,
    pub prefix_host_entries: usize,
    pub prefix_host_bytes: usize,
}

impl From<&Status> for WireStatus {
    fn from(s: &Status) -> WireStatus {
        let (kv, ops) = (&s.kv, &s.ops);
        WireStatus {
            slots: s.slots,
            busy_slots: s.busy_slots,
            queued: s.queued,
            kv: WireKv {
                page_size: kv.page_size,
                pages_total: kv.pages_total,
                pages_owned: kv.pages_owned,
                pages_cached: kv.pages_cached,
                pages_free: kv.pages_free,
                prefix_entries: kv.prefix_entries,
                prefix_host_entries: kv.prefix_host_entries,
                prefix_host_bytes: kv.prefix_host_bytes,
            },
            engine: ops.engine,
            throttled: ops.throttled,
            temp_c: ops.temp_c,
            gpu_temp_c: ops.gpu_temp_c,
            gpu_vram_used_mb: ops.gpu_vram_used_mb,
            gpu_vram_free_mb: ops.gpu_vram_free_mb,
            gpu_power_w: ops.gpu_power_w,
            gpu_util_pct: ops.gpu_util_pct,
            workers: s.workers.iter().map(WireWorker::from).collect(),
        }
    }
}

/// A tool call in `end`, its arguments as JSON (not JSON text, as OpenAI's).
#[derive(Debug, Serialize)]
pub struct WireToolCall {
    pub id: String,
    pub name: String,
    pub arguments: serde_json::Value,
}

impl From<ToolCall> for WireToolCall {
    fn from(c: ToolCall) -> Self {
        WireToolCall {
            arguments: serde_json::from_str(&c.arguments)
                .unwrap_or(serde_json::Value::String(c.arguments)),
            id: c.id,
            name: c.name,
        }
    }
}

/// One token and its log-probability, as `token.logprobs` shows it.
#[derive(Debug, Serialize)]
pub struct WireCandidate {
    pub token: i32,
    /// Its text (a piece of a UTF-8 character shows as U+FFFD).
    pub text: String,
    pub logprob: f32,
}

impl From<&Candidate> for WireCandidate {
    fn from(c: &Candidate) -> Self {
        WireCandidate {
            token: c.token,
            text: String::from_utf8_lossy(&c.bytes).into_owned(),
            logprob: c.logprob,
        }
    }
}

/// The sampled token and the most likely ones at its step.
#[derive(Debug, Serialize)]
pub struct WireLogprobs {
    #[serde(flatten)]
    pub chosen: WireCandidate,
    pub top: Vec<WireCandidate>,
}

impl From<&TokenLogprobs> for WireLogprobs {
    fn from(l: &TokenLogprobs) -> Self {
        WireLogprobs {
            chosen: (&l.chosen).into(),
            top: l.top.iter().map(Into::into).collect(),
        }
    }
}

/// Everything the server sends, serialised with `to_json`.
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ServerMsg<'a> {
    Queued {
        id: &'a str,
        position: usize,
    },
    Status(&'a WireStatus),
    Hello(&'a Hello<'a>),
    Token {
        id: &'a str,
        content: &'a str,
        prob: f32,
        /// With `params.logprobs`.
        #[serde(skip_serializing_if = "Option::is_none")]
        logprobs: Option<WireLogprobs>,
    },
    End {
        id: &'a str,
        reason: &'a str,
        stats: WireStats,
        /// With tools: the answer in words (`tool_choice` auto)...
        #[serde(skip_serializing_if = "Option::is_none")]
        content: Option<&'a str>,
        /// ...or the calls (`reason` is then `tool_calls`).
        #[serde(skip_serializing_if = "Option::is_none")]
        tool_calls: Option<Vec<WireToolCall>>,
    },
    /// The answer to `tokenize`.
    Tokens {
        id: &'a str,
        count: usize,
    },
    Error {
        id: Option<&'a str>,
        code: &'a str,
        message: &'a str,
    },
}

impl ServerMsg<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialise")
    }

    pub fn error(id: Option<&str>, code: ErrorCode, message: &str) -> String {
        ServerMsg::Error {
            id,
            code: code.as_str(),
            message,
        }
        .to_json()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_snapshot_has_v1_names_and_leaves_out_the_unknown() {
        let mut status = Status {
            slots: 4,
            busy_slots: 1,
            ..Status::default()
        };
        status.kv.pages_total = 256;
        status.ops.engine = Some("busy");
        status.ops.throttled = Some(false);
        assert_eq!(
            ServerMsg::Status(&(&status).into()).to_json(),
            r#"{"op":"status","slots":4,"busy_slots":1,"queued":0,"kv":{"page_size":0,"pages_total":256,"pages_owned":0,"pages_cached":0,"pages_free":0,"prefix_entries":0,"prefix_host_entries":0,"prefix_host_bytes":0},"engine":"busy","throttled":false,"workers":[]}"#
        );
    }

    #[test]
    fn server_messages_serialise() {
        let stats = Stats {
            prompt_tokens: 3,
            cached_tokens: 0,
            truncated_tokens: 0,
            completion_tokens: 2,
            ttft_ms: 1.5,
            ms: 3.0,
            tps: 100.0,
            ..Stats::default()
        };
        assert_eq!(
            ServerMsg::Token {
                id: "r1",
                content: " The",
                prob: 0.5,
                logprobs: None,
            }
            .to_json(),
            r#"{"op":"token","id":"r1","content":" The","prob":0.5}"#
        );
        assert_eq!(
            ServerMsg::End {
                id: "r1",
                reason: "eos",
                stats: (&stats).into(),
                content: None,
                tool_calls: None,
            }
            .to_json(),
            r#"{"op":"end","id":"r1","reason":"eos","stats":{"prompt_tokens":3,"cached_tokens":0,"truncated_tokens":0,"completion_tokens":2,"ttft_ms":1.5,"ms":3.0,"tps":100.0,"draft_tokens":0,"draft_accepted":0}}"#
        );
        assert_eq!(
            ServerMsg::error(None, ErrorCode::ContextOverflow, "m"),
            r#"{"op":"error","id":null,"code":"context_overflow","message":"m"}"#
        );
    }
}

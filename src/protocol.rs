//! Protocol v1: the JSON messages exchanged over WebSocket text frames.
//!
//! Sans-I/O: `parse` turns one client text frame into a typed, validated
//! message (or a `ProtoError` saying exactly what was wrong), and `ServerMsg`
//! serialises what the server sends. No sockets, no model: everything here is
//! unit-tested in memory. See docs/protocol.md for the user-facing description.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const MAX_ID_LEN: usize = 64;
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_LEN: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    ContextOverflow,
    Overloaded,
    ShuttingDown,
    Internal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    Eos,
    Length,
    Stop,
    Abort,
}

/// A rejected client message. `id` is the request's id when it could be read.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtoError {
    pub id: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

impl ProtoError {
    fn bad(id: Option<&str>, message: impl Into<String>) -> ProtoError {
        ProtoError {
            id: id.map(str::to_owned),
            code: ErrorCode::BadRequest,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClientMsg {
    Infer(InferRequest),
    /// `id: None` aborts every request of the connection.
    Abort {
        id: Option<String>,
    },
    /// Asks for a `status` snapshot.
    Status,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    pub id: Option<String>,
    pub input: PromptInput,
    pub params: Params,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Messages(Vec<ChatMessage>),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// Per-request generation parameters as sent; `None` means "server default".
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub temp: Option<f32>,
    pub top_k: Option<i32>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i32>,
    pub seed: Option<u32>,
    pub max_tokens: Option<u32>,
    pub stop: Option<Vec<String>>,
    pub ignore_eos: Option<bool>,
}

/// Fully resolved generation parameters. Its `Default` is the server's
/// built-in defaults, which `[defaults]` in the config file overrides.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Generation {
    pub temp: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: i32,
    /// `None`: a fresh random seed per request.
    pub seed: Option<u32>,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl Default for Generation {
    fn default() -> Self {
        Generation {
            temp: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: None,
            max_tokens: 512,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl Params {
    /// Overlays these parameters on `defaults`.
    pub fn resolve(&self, defaults: &Generation) -> Generation {
        let d = defaults.clone();
        Generation {
            temp: self.temp.unwrap_or(d.temp),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(d.repeat_penalty),
            repeat_last_n: self.repeat_last_n.unwrap_or(d.repeat_last_n),
            seed: self.seed.or(d.seed),
            max_tokens: self.max_tokens.unwrap_or(d.max_tokens),
            stop: self.stop.clone().unwrap_or(d.stop),
            ignore_eos: self.ignore_eos.unwrap_or(d.ignore_eos),
        }
    }

    /// Range checks that serde's types cannot express.
    fn validate(&self) -> Result<(), String> {
        fn check<T: PartialOrd + Copy + std::fmt::Display>(
            name: &str,
            v: Option<T>,
            ok: impl Fn(T) -> bool,
            range: &str,
        ) -> Result<(), String> {
            match v {
                Some(v) if !ok(v) => Err(format!("params.{name} = {v} is out of range: {range}")),
                _ => Ok(()),
            }
        }
        check(
            "temp",
            self.temp,
            |v| (0.0..=100.0).contains(&v),
            "0 to 100 (0 = greedy)",
        )?;
        check("top_k", self.top_k, |v| v >= 0, "0 or more (0 = off)")?;
        check(
            "top_p",
            self.top_p,
            |v| v > 0.0 && v <= 1.0,
            "above 0, at most 1",
        )?;
        check("min_p", self.min_p, |v| (0.0..=1.0).contains(&v), "0 to 1")?;
        check(
            "repeat_penalty",
            self.repeat_penalty,
            |v| v > 0.0 && v <= 10.0,
            "above 0, at most 10 (1 = off)",
        )?;
        check(
            "repeat_last_n",
            self.repeat_last_n,
            |v| v >= -1,
            "-1 (whole context) or more",
        )?;
        check("max_tokens", self.max_tokens, |v| v >= 1, "1 or more")?;
        if let Some(stop) = &self.stop {
            if stop.len() > MAX_STOP_STRINGS {
                return Err(format!(
                    "params.stop has {} strings; at most {MAX_STOP_STRINGS}",
                    stop.len()
                ));
            }
            if let Some(s) = stop.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_LEN) {
                return Err(format!(
                    "params.stop entry {s:?} must be 1 to {MAX_STOP_LEN} bytes long"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InferWire {
    #[allow(dead_code)]
    op: String,
    id: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    params: Params,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AbortWire {
    #[allow(dead_code)]
    op: String,
    id: Option<String>,
}

/// Parses one client text frame.
pub fn parse(text: &str) -> Result<ClientMsg, ProtoError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ProtoError::bad(None, format!("malformed JSON: {e}")))?;
    let Value::Object(obj) = &value else {
        return Err(ProtoError::bad(
            None,
            "a message must be a JSON object with an \"op\" field",
        ));
    };
    // The id is read first so that every later error can carry it.
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(ProtoError::bad(None, "\"id\" must be a string")),
    };
    if let Some(id) = id
        && (id.is_empty() || id.chars().count() > MAX_ID_LEN)
    {
        return Err(ProtoError::bad(
            None,
            format!("\"id\" must be 1 to {MAX_ID_LEN} characters long"),
        ));
    }
    let op = match obj.get("op") {
        Some(Value::String(op)) => op.as_str(),
        Some(_) => return Err(ProtoError::bad(id, "\"op\" must be a string")),
        None => return Err(ProtoError::bad(id, "missing \"op\" (one of: infer, abort)")),
    };
    let field_err =
        |e: serde_json::Error| ProtoError::bad(id, format!("invalid {op} message: {e}"));
    match op {
        "infer" => {
            let wire = InferWire::deserialize(&value).map_err(field_err)?;
            let input = match (wire.prompt, wire.messages) {
                (Some(_), Some(_)) => {
                    return Err(ProtoError::bad(
                        id,
                        "send either \"prompt\" or \"messages\", not both",
                    ));
                }
                (None, None) => {
                    return Err(ProtoError::bad(id, "missing \"prompt\" (or \"messages\")"));
                }
                (Some(p), None) if p.is_empty() => {
                    return Err(ProtoError::bad(id, "\"prompt\" is empty"));
                }
                (Some(p), None) => PromptInput::Text(p),
                (None, Some(m)) if m.is_empty() => {
                    return Err(ProtoError::bad(id, "\"messages\" is empty"));
                }
                (None, Some(m)) => PromptInput::Messages(m),
            };
            wire.params.validate().map_err(|m| ProtoError::bad(id, m))?;
            Ok(ClientMsg::Infer(InferRequest {
                id: wire.id,
                input,
                params: wire.params,
            }))
        }
        "abort" => {
            let wire = AbortWire::deserialize(&value).map_err(field_err)?;
            Ok(ClientMsg::Abort { id: wire.id })
        }
        "status" => {
            AbortWire::deserialize(&value).map_err(field_err)?;
            Ok(ClientMsg::Status)
        }
        other => Err(ProtoError::bad(
            id,
            format!("unknown op {other:?} (expected infer, abort or status)"),
        )),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache instead of being computed.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub ttft_ms: f64,
    pub ms: f64,
    pub tps: f64,
}

/// A snapshot of the engine, answered to `{"op":"status"}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Status {
    pub slots: usize,
    pub busy_slots: usize,
    pub queued: usize,
    pub kv: KvStatus,
    /// Engine state, temperature, throttle and GPU readings, filled in by the
    /// reactor (`ops`); absent fields are unknown.
    #[serde(flatten)]
    pub ops: OpsStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OpsStatus {
    /// idle, busy, parked or waking.
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
}

/// KV cache pages: owned by running requests, held by the prefix cache, free.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KvStatus {
    pub page_size: usize,
    pub pages_total: usize,
    pub pages_owned: usize,
    pub pages_cached: usize,
    pub pages_free: usize,
    pub prefix_entries: usize,
}

/// Everything the server sends, serialised with `to_json`.
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ServerMsg<'a> {
    Queued {
        id: &'a str,
        position: usize,
    },
    Status(&'a Status),
    Hello {
        status: &'a str,
        model: &'a str,
        n_ctx: u32,
        version: &'a str,
    },
    Token {
        id: &'a str,
        content: &'a str,
        prob: f32,
    },
    End {
        id: &'a str,
        reason: EndReason,
        stats: &'a Stats,
    },
    Error {
        id: Option<&'a str>,
        code: ErrorCode,
        message: &'a str,
    },
}

impl ServerMsg<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ProtoError {
        parse(text).expect_err(text)
    }

    #[test]
    fn infer_with_prompt_and_params() {
        let msg = parse(r#"{"op":"infer","id":"r1","prompt":"Hi","params":{"temp":0,"max_tokens":8,"stop":["\n"]}}"#).unwrap();
        let ClientMsg::Infer(req) = msg else { panic!() };
        assert_eq!(req.id.as_deref(), Some("r1"));
        assert_eq!(req.input, PromptInput::Text("Hi".into()));
        let g = req.params.resolve(&Generation::default());
        assert_eq!(g.temp, 0.0);
        assert_eq!(g.max_tokens, 8);
        assert_eq!(g.stop, vec!["\n".to_owned()]);
        assert_eq!(g.top_k, Generation::default().top_k);
    }

    #[test]
    fn infer_with_messages_and_no_id() {
        let msg = parse(r#"{"op":"infer","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}]}"#).unwrap();
        let ClientMsg::Infer(req) = msg else { panic!() };
        assert_eq!(req.id, None);
        let PromptInput::Messages(m) = req.input else {
            panic!()
        };
        assert_eq!(m[0].role, Role::System);
        assert_eq!(m[1].content, "Hi");
    }

    #[test]
    fn abort_with_and_without_id() {
        assert_eq!(
            parse(r#"{"op":"abort","id":"r1"}"#).unwrap(),
            ClientMsg::Abort {
                id: Some("r1".into())
            }
        );
        assert_eq!(
            parse(r#"{"op":"abort"}"#).unwrap(),
            ClientMsg::Abort { id: None }
        );
    }

    #[test]
    fn status_request_and_snapshot() {
        assert_eq!(parse(r#"{"op":"status"}"#).unwrap(), ClientMsg::Status);
        let json = ServerMsg::Status(&Status::default()).to_json();
        assert!(
            json.starts_with(
                r#"{"op":"status","slots":0,"busy_slots":0,"queued":0,"kv":{"page_size":0"#
            ),
            "{json}"
        );
    }

    #[test]
    fn malformed_json() {
        let e = err("{not json");
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
        assert!(err("[1,2]").message.contains("JSON object"));
    }

    #[test]
    fn unknown_and_missing_op() {
        let e = err(r#"{"op":"dance","id":"x"}"#);
        assert!(e.message.contains("unknown op \"dance\""));
        assert_eq!(e.id.as_deref(), Some("x"));
        assert!(err(r#"{"prompt":"hi"}"#).message.contains("missing \"op\""));
        assert!(
            err(r#"{"op":5}"#)
                .message
                .contains("\"op\" must be a string")
        );
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = err(r#"{"op":"infer","id":"a","prompt":42}"#);
        assert_eq!(e.id.as_deref(), Some("a"));
        assert!(e.message.contains("invalid type"), "{}", e.message);
        let e = err(r#"{"op":"infer","prompt":"x","params":{"temp":"hot"}}"#);
        assert!(e.message.contains("invalid type"), "{}", e.message);
        assert!(
            err(r#"{"op":"infer","id":7,"prompt":"x"}"#)
                .message
                .contains("\"id\" must be a string")
        );
    }

    #[test]
    fn missing_or_empty_prompt() {
        assert!(
            err(r#"{"op":"infer"}"#)
                .message
                .contains("missing \"prompt\"")
        );
        assert!(
            err(r#"{"op":"infer","prompt":""}"#)
                .message
                .contains("empty")
        );
        assert!(
            err(r#"{"op":"infer","messages":[]}"#)
                .message
                .contains("empty")
        );
        assert!(
            err(r#"{"op":"infer","prompt":"a","messages":[{"role":"user","content":"b"}]}"#)
                .message
                .contains("not both")
        );
        assert!(
            err(r#"{"op":"infer","messages":[{"role":"robot","content":"b"}]}"#)
                .message
                .contains("unknown variant")
        );
    }

    #[test]
    fn unknown_parameter_is_named() {
        let e = err(r#"{"op":"infer","prompt":"x","params":{"temperature":0.5}}"#);
        assert!(
            e.message.contains("unknown field `temperature`"),
            "{}",
            e.message
        );
        let e = err(r#"{"op":"infer","prompt":"x","extra":1}"#);
        assert!(e.message.contains("unknown field `extra`"), "{}", e.message);
    }

    #[test]
    fn out_of_range_parameters() {
        for (p, name) in [
            (r#"{"temp":-1}"#, "temp"),
            (r#"{"top_p":0}"#, "top_p"),
            (r#"{"min_p":1.5}"#, "min_p"),
            (r#"{"top_k":-3}"#, "top_k"),
            (r#"{"repeat_penalty":0}"#, "repeat_penalty"),
            (r#"{"repeat_last_n":-2}"#, "repeat_last_n"),
            (r#"{"max_tokens":0}"#, "max_tokens"),
        ] {
            let e = err(&format!(r#"{{"op":"infer","prompt":"x","params":{p}}}"#));
            assert!(
                e.message.contains(&format!("params.{name}")),
                "{p}: {}",
                e.message
            );
        }
        assert!(
            err(r#"{"op":"infer","prompt":"x","params":{"max_tokens":-5}}"#)
                .message
                .contains("invalid value")
        );
        assert!(
            err(r#"{"op":"infer","prompt":"x","params":{"stop":[""]}}"#)
                .message
                .contains("params.stop")
        );
    }

    #[test]
    fn id_length_is_bounded() {
        let long = "x".repeat(MAX_ID_LEN + 1);
        assert!(
            err(&format!(r#"{{"op":"infer","id":"{long}","prompt":"x"}}"#))
                .message
                .contains("\"id\"")
        );
        assert!(
            parse(&format!(
                r#"{{"op":"infer","id":"{}","prompt":"x"}}"#,
                "é".repeat(MAX_ID_LEN)
            ))
            .is_ok()
        );
    }

    #[test]
    fn server_messages_serialise() {
        let stats = Stats {
            prompt_tokens: 3,
            cached_tokens: 0,
            completion_tokens: 2,
            ttft_ms: 1.5,
            ms: 3.0,
            tps: 100.0,
        };
        assert_eq!(
            ServerMsg::Token {
                id: "r1",
                content: " The",
                prob: 0.5
            }
            .to_json(),
            r#"{"op":"token","id":"r1","content":" The","prob":0.5}"#
        );
        assert_eq!(
            ServerMsg::End {
                id: "r1",
                reason: EndReason::Eos,
                stats: &stats
            }
            .to_json(),
            r#"{"op":"end","id":"r1","reason":"eos","stats":{"prompt_tokens":3,"cached_tokens":0,"completion_tokens":2,"ttft_ms":1.5,"ms":3.0,"tps":100.0}}"#
        );
        assert_eq!(
            ServerMsg::Error {
                id: None,
                code: ErrorCode::ContextOverflow,
                message: "m"
            }
            .to_json(),
            r#"{"op":"error","id":null,"code":"context_overflow","message":"m"}"#
        );
    }

    mod properties {
        //! Property tests: `parse` takes any text a client may send.

        use super::super::*;
        use proptest::prelude::*;

        /// JSON objects made of the protocol's own keys and values of every type.
        fn json_like() -> impl Strategy<Value = String> {
            let key = prop_oneof![
                Just("op"),
                Just("id"),
                Just("prompt"),
                Just("messages"),
                Just("params"),
                Just("temp"),
                Just("max_tokens"),
                Just("stop"),
                Just("role"),
                Just("content"),
            ];
            let value = prop_oneof![
                Just("null".to_owned()),
                Just("true".to_owned()),
                Just("[]".to_owned()),
                Just("{}".to_owned()),
                Just(r#""infer""#.to_owned()),
                Just(r#""abort""#.to_owned()),
                Just(r#""status""#.to_owned()),
                any::<f64>().prop_map(|f| f.to_string()),
                any::<i64>().prop_map(|i| i.to_string()),
                "\\PC{0,20}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            ];
            proptest::collection::vec((key, value), 0..8).prop_map(|fields| {
                let body: Vec<String> =
                    fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", body.join(","))
            })
        }

        proptest! {
            #[test]
            fn any_text_is_parsed_or_refused_with_a_message(text in "\\PC{0,200}") {
                if let Err(e) = parse(&text) {
                    prop_assert!(!e.message.is_empty());
                }
            }

            #[test]
            fn any_json_object_is_parsed_or_refused_with_a_message(text in json_like()) {
                match parse(&text) {
                    Ok(ClientMsg::Infer(req)) => {
                        let has_input = match &req.input {
                            PromptInput::Text(t) => !t.is_empty(),
                            PromptInput::Messages(m) => !m.is_empty(),
                        };
                        prop_assert!(has_input);
                    }
                    Ok(_) => {}
                    Err(e) => prop_assert!(!e.message.is_empty()),
                }
            }

            #[test]
            fn a_valid_infer_comes_back_as_sent(
                id in "[a-zA-Z0-9_.-]{1,64}",
                prompt in "\\PC{1,300}",
                max_tokens in 1u32..100_000,
                temp in 0.0f32..=100.0,
                stop in proptest::collection::vec("\\PC{1,20}", 0..=MAX_STOP_STRINGS),
            ) {
                let text = serde_json::json!({"op":"infer","id":id,"prompt":prompt,
                    "params":{"max_tokens":max_tokens,"temp":temp,"stop":stop}}).to_string();
                let Ok(ClientMsg::Infer(req)) = parse(&text) else {
                    return Err(TestCaseError::fail(format!("not an infer: {text}")));
                };
                prop_assert_eq!(req.id.as_deref(), Some(id.as_str()));
                prop_assert_eq!(req.input, PromptInput::Text(prompt));
                prop_assert_eq!(req.params.max_tokens, Some(max_tokens));
                prop_assert_eq!(req.params.temp, Some(temp));
                prop_assert_eq!(req.params.stop, Some(stop));
            }

            #[test]
            fn an_error_after_a_readable_id_carries_it(
                id in "[a-z0-9]{1,64}",
                bad in prop_oneof![Just(r#""prompt":7"#), Just(r#""prompt":"""#),
                    Just(r#""prompt":"x","params":{"top_p":3}"#), Just(r#""nope":1"#)],
            ) {
                let text = format!(r#"{{"op":"infer","id":"{id}",{bad}}}"#);
                let e = parse(&text).expect_err(&text);
                prop_assert_eq!(e.id.as_deref(), Some(id.as_str()));
            }
        }
    }
}

//! Protocol v1, the client's side: the JSON messages clients send over
//! WebSocket text frames, parsed into the core's types.
//!
//! Sans-I/O: `parse` turns one client text frame into a typed, validated
//! message (or a `ProtoError` saying exactly what was wrong); what the server
//! sends is in `messages`. No sockets, no model: everything here is
//! unit-tested in memory. See docs/protocol.md for the user-facing description.

use serde::Deserialize;
use serde_json::Value;

use crate::core::tools::{Tool, ToolCall, ToolChoice, Tools, Turn};
use crate::core::{
    ChatMessage, Constraint, ErrorCode, InvalidParam, PromptInput, Role, SamplingParams, Truncate,
    Urgency,
};
use crate::server::fields::{json_schema, one_constraint, parse_logit_bias, urgency};

/// The protocol version `hello` announces.
pub const VERSION: u32 = 1;
pub const MAX_ID_LEN: usize = 64;

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
    Infer(Box<InferRequest>),
    /// `id: None` aborts every request of the connection.
    Abort {
        id: Option<String>,
    },
    /// Asks for a `status` snapshot.
    Status,
    /// Counts the tokens of a prompt or of messages (after the template).
    Tokenize {
        id: Option<String>,
        input: PromptInput,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    pub id: Option<String>,
    pub input: PromptInput,
    /// `params` laid over the server's defaults, validated.
    pub params: SamplingParams,
    pub truncate: Truncate,
    /// The model is offered tools: its reply is JSON, read at its end.
    pub tools: bool,
    pub urgency: Urgency,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum WireTruncate {
    None,
    Left,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireMessage {
    role: WireRole,
    /// Optional only beside `tool_calls`.
    content: Option<String>,
    /// An assistant turn's calls, as an earlier `end` gave them.
    tool_calls: Option<Vec<WireCall>>,
    /// A `tool` message: the call it answers.
    tool_call_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum WireRole {
    System,
    User,
    Assistant,
    Tool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireCall {
    id: Option<String>,
    name: String,
    /// An object, or its JSON text.
    #[serde(default)]
    arguments: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireTool {
    name: String,
    description: Option<String>,
    parameters: Option<Value>,
}

impl WireMessage {
    fn into_turn(self, i: usize) -> Result<Turn, String> {
        let content = match (self.content, &self.tool_calls) {
            (Some(c), _) => c,
            (None, Some(_)) => String::new(),
            (None, None) => return Err(format!("messages[{i}]: missing field `content`")),
        };
        match (self.role, self.tool_calls, self.tool_call_id) {
            (WireRole::Tool, None, call_id) => Ok(Turn::Result { call_id, content }),
            (WireRole::Assistant, Some(calls), None) => Ok(Turn::Calls {
                content,
                calls: calls
                    .into_iter()
                    .map(|c| ToolCall {
                        id: c.id.unwrap_or_default(),
                        name: c.name,
                        arguments: match c.arguments {
                            Value::String(s) => s,
                            Value::Null => "{}".into(),
                            v => v.to_string(),
                        },
                    })
                    .collect(),
            }),
            (_, Some(_), _) => Err(format!(
                "messages[{i}]: tool_calls are for assistant messages"
            )),
            (_, _, Some(_)) => Err(format!("messages[{i}]: tool_call_id is for tool messages")),
            (role, None, None) => {
                let role = match role {
                    WireRole::System => Role::System,
                    WireRole::User => Role::User,
                    WireRole::Assistant | WireRole::Tool => Role::Assistant,
                };
                Ok(Turn::Message(ChatMessage { role, content }))
            }
        }
    }
}

/// `tools`, `tool_choice` and `parallel_tool_calls` of an `infer`.
fn tools(
    list: Option<Vec<WireTool>>,
    choice: Option<Value>,
    parallel: Option<bool>,
) -> Result<Option<Tools>, String> {
    if list.is_none() && choice.is_none() {
        return Ok(None);
    }
    let choice = match choice {
        None => ToolChoice::Auto,
        Some(v) => v
            .as_str()
            .and_then(ToolChoice::named)
            .or_else(|| {
                v.get("name")?
                    .as_str()
                    .map(|n| ToolChoice::Function(n.into()))
            })
            .ok_or("tool_choice must be \"auto\", \"none\", \"required\" or {\"name\": ...}")?,
    };
    let tools = Tools {
        tools: list
            .unwrap_or_default()
            .into_iter()
            .map(|t| Tool {
                name: t.name,
                description: t.description,
                parameters: t
                    .parameters
                    .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
            })
            .collect(),
        choice,
        parallel: parallel.unwrap_or(false),
    };
    tools.validate()?;
    Ok(Some(tools))
}

/// Per-request generation parameters as sent; `None` keeps the server's default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    temp: Option<f32>,
    /// What every other API calls `temp`.
    temperature: Option<f32>,
    top_k: Option<i32>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// -1: a fresh random seed, as in llama-server.
    seed: Option<i64>,
    max_tokens: Option<u32>,
    stop: Option<Vec<String>>,
    ignore_eos: Option<bool>,
    /// Alternatives reported per token (0 to 20): `logprobs` in `token`.
    logprobs: Option<u8>,
    typical_p: Option<f32>,
    xtc_probability: Option<f32>,
    xtc_threshold: Option<f32>,
    dry_multiplier: Option<f32>,
    dry_base: Option<f32>,
    dry_allowed_length: Option<u32>,
    dry_penalty_last_n: Option<i32>,
    dry_sequence_breakers: Option<Vec<String>>,
    /// `{"token id": bias}`, as OpenAI's API, or `[[id, bias]]`.
    logit_bias: Option<Value>,
    min_tokens: Option<u32>,
    stop_token_ids: Option<Vec<i32>>,
    draft_max: Option<u32>,
    /// Constraints: at most one of these.
    json_schema: Option<Value>,
    regex: Option<String>,
    choice: Option<Vec<String>>,
    grammar: Option<String>,
}

impl Params {
    /// Lays these parameters over `defaults` and validates the result.
    fn resolve(self, defaults: &SamplingParams) -> Result<SamplingParams, String> {
        let d = defaults.clone();
        let temp = match (self.temp, self.temperature) {
            (Some(_), Some(_)) => {
                return Err(
                    "params.temp and params.temperature are the same setting: give one".into(),
                );
            }
            (t, u) => t.or(u).unwrap_or(d.temp),
        };
        let seed = match self.seed {
            None => d.seed,
            Some(-1) => None,
            Some(s) => Some(u32::try_from(s).map_err(|_| {
                format!(
                    "params.seed = {s} is out of range: -1 (random) or 0 to {}",
                    u32::MAX
                )
            })?),
        };
        let params = SamplingParams {
            temp,
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(d.repeat_penalty),
            repeat_last_n: self.repeat_last_n.unwrap_or(d.repeat_last_n),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
            seed,
            max_tokens: self.max_tokens.unwrap_or(d.max_tokens),
            stop: self.stop.unwrap_or(d.stop),
            ignore_eos: self.ignore_eos.unwrap_or(d.ignore_eos),
            logprobs: self.logprobs.or(d.logprobs),
            typical_p: self.typical_p.unwrap_or(d.typical_p),
            xtc_probability: self.xtc_probability.unwrap_or(d.xtc_probability),
            xtc_threshold: self.xtc_threshold.unwrap_or(d.xtc_threshold),
            dry_multiplier: self.dry_multiplier.unwrap_or(d.dry_multiplier),
            dry_base: self.dry_base.unwrap_or(d.dry_base),
            dry_allowed_length: self.dry_allowed_length.unwrap_or(d.dry_allowed_length),
            dry_penalty_last_n: self.dry_penalty_last_n.unwrap_or(d.dry_penalty_last_n),
            dry_sequence_breakers: self
                .dry_sequence_breakers
                .unwrap_or(d.dry_sequence_breakers),
            logit_bias: match &self.logit_bias {
                None => d.logit_bias,
                Some(v) => parse_logit_bias(v).map_err(|e| format!("params.logit_bias {e}"))?,
            },
            min_tokens: self.min_tokens.unwrap_or(d.min_tokens),
            stop_token_ids: self.stop_token_ids.unwrap_or(d.stop_token_ids),
            draft_max: self.draft_max.or(d.draft_max),
            constraint: one_constraint([
                (
                    "params.json_schema",
                    self.json_schema
                        .map(|s| json_schema("params.json_schema", s))
                        .transpose()?,
                ),
                ("params.regex", self.regex.map(Constraint::Regex)),
                ("params.choice", self.choice.map(Constraint::Choice)),
                ("params.grammar", self.grammar.map(Constraint::grammar)),
            ])?,
        };
        if let Some(Constraint::Choice(options)) = &params.constraint
            && (options.is_empty() || options.iter().any(String::is_empty))
        {
            return Err("params.choice must list at least one string, none of them empty".into());
        }
        params
            .validate()
            .map_err(|e: InvalidParam| format!("params.{e}"))?;
        Ok(params)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InferWire {
    #[allow(dead_code)]
    op: String,
    id: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<WireMessage>>,
    #[serde(default)]
    params: Params,
    truncate: Option<WireTruncate>,
    tools: Option<Vec<WireTool>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    priority: Option<i32>,
    deadline_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeWire {
    #[allow(dead_code)]
    op: String,
    id: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<WireMessage>>,
}

/// Exactly one of `prompt` and `messages`, not empty; `tools` shape the
/// conversation (see `core::tools`).
fn input(
    id: Option<&str>,
    prompt: Option<String>,
    messages: Option<Vec<WireMessage>>,
    tools: Option<&Tools>,
) -> Result<PromptInput, ProtoError> {
    match (prompt, messages) {
        (Some(_), Some(_)) => Err(ProtoError::bad(
            id,
            "send either \"prompt\" or \"messages\", not both",
        )),
        (None, None) => Err(ProtoError::bad(id, "missing \"prompt\" (or \"messages\")")),
        (Some(p), None) if p.is_empty() => Err(ProtoError::bad(id, "\"prompt\" is empty")),
        (Some(p), None) => Ok(PromptInput::Text(p)),
        (None, Some(m)) if m.is_empty() => Err(ProtoError::bad(id, "\"messages\" is empty")),
        (None, Some(m)) => {
            let turns = m
                .into_iter()
                .enumerate()
                .map(|(i, m)| m.into_turn(i))
                .collect::<Result<Vec<Turn>, String>>()
                .map_err(|e| ProtoError::bad(id, e))?;
            Ok(PromptInput::Messages(match tools {
                Some(t) => t.render(turns),
                None => Tools::none().render(turns),
            }))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AbortWire {
    #[allow(dead_code)]
    op: String,
    id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeBody {
    prompt: Option<String>,
    messages: Option<Vec<WireMessage>>,
}

/// The body of `POST /tokenize`: `prompt` or `messages`, as in `tokenize`.
pub fn parse_tokenize_body(body: &[u8]) -> Result<PromptInput, String> {
    let wire: TokenizeBody =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    input(None, wire.prompt, wire.messages, None).map_err(|e| e.message)
}

/// Parses one client text frame; request parameters are laid over `defaults`.
pub fn parse(text: &str, defaults: &SamplingParams) -> Result<ClientMsg, ProtoError> {
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
        None => {
            return Err(ProtoError::bad(
                id,
                "missing \"op\" (one of: infer, abort, status, tokenize)",
            ));
        }
    };
    let field_err =
        |e: serde_json::Error| ProtoError::bad(id, format!("invalid {op} message: {e}"));
    match op {
        "infer" => {
            let wire = InferWire::deserialize(&value).map_err(field_err)?;
            let tools = tools(wire.tools, wire.tool_choice, wire.parallel_tool_calls)
                .map_err(|m| ProtoError::bad(id, m))?;
            if tools.is_some() && wire.prompt.is_some() {
                return Err(ProtoError::bad(
                    id,
                    "tools need \"messages\", not \"prompt\"",
                ));
            }
            let input = input(id, wire.prompt, wire.messages, tools.as_ref())?;
            let mut params = wire
                .params
                .resolve(defaults)
                .map_err(|m| ProtoError::bad(id, m))?;
            if let Some(c) = tools.as_ref().and_then(Tools::constraint) {
                if params.constraint.is_some() {
                    return Err(ProtoError::bad(
                        id,
                        "tools and params.json_schema (or regex, choice, grammar) both constrain the reply: give one",
                    ));
                }
                params.constraint = Some(c);
            }
            let truncate = match wire.truncate {
                None | Some(WireTruncate::None) => Truncate::None,
                Some(WireTruncate::Left) => Truncate::Left,
            };
            Ok(ClientMsg::Infer(Box::new(InferRequest {
                id: wire.id,
                input,
                params,
                truncate,
                tools: tools.as_ref().is_some_and(Tools::active),
                urgency: urgency(wire.priority, wire.deadline_ms)
                    .map_err(|m| ProtoError::bad(id, m))?,
            })))
        }
        "tokenize" => {
            let wire = TokenizeWire::deserialize(&value).map_err(field_err)?;
            let input = input(id, wire.prompt, wire.messages, None)?;
            Ok(ClientMsg::Tokenize { id: wire.id, input })
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
            format!("unknown op {other:?} (expected infer, abort, status or tokenize)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Status;
    use crate::server::messages::ServerMsg;

    fn parse(text: &str) -> Result<ClientMsg, ProtoError> {
        super::parse(text, &SamplingParams::default())
    }

    fn err(text: &str) -> ProtoError {
        parse(text).expect_err(text)
    }

    #[test]
    fn priority_and_deadline_are_read_and_checked() {
        let Ok(ClientMsg::Infer(req)) =
            parse(r#"{"op":"infer","prompt":"x","priority":-3,"deadline_ms":250}"#)
        else {
            panic!()
        };
        assert_eq!(req.urgency.priority, -3);
        assert_eq!(
            req.urgency.deadline,
            Some(std::time::Duration::from_millis(250))
        );
        for bad in [
            r#"{"op":"infer","prompt":"x","deadline_ms":0}"#,
            r#"{"op":"infer","prompt":"x","deadline_ms":100000000}"#,
            r#"{"op":"infer","prompt":"x","priority":"high"}"#,
        ] {
            let e = err(bad);
            assert!(
                e.message.contains("deadline_ms") || e.message.contains("expected i32"),
                "{e:?}"
            );
        }
    }

    #[test]
    fn infer_with_prompt_and_params() {
        let msg = parse(r#"{"op":"infer","id":"r1","prompt":"Hi","params":{"temp":0,"max_tokens":8,"stop":["\n"],"draft_max":0}}"#).unwrap();
        let ClientMsg::Infer(req) = msg else { panic!() };
        assert_eq!(req.id.as_deref(), Some("r1"));
        assert_eq!(req.input, PromptInput::Text("Hi".into()));
        let g = req.params;
        assert_eq!(g.temp, 0.0);
        assert_eq!(g.max_tokens, 8);
        assert_eq!(g.stop, vec!["\n".to_owned()]);
        assert_eq!(g.draft_max, Some(0));
        assert_eq!(g.top_k, SamplingParams::default().top_k);
        assert!(parse(r#"{"op":"infer","prompt":"Hi","params":{"draft_max":-1}}"#).is_err());
    }

    #[test]
    fn defaults_come_from_the_server() {
        let defaults = SamplingParams {
            max_tokens: 7,
            ..SamplingParams::default()
        };
        let Ok(ClientMsg::Infer(req)) = super::parse(r#"{"op":"infer","prompt":"Hi"}"#, &defaults)
        else {
            panic!()
        };
        assert_eq!(req.params, defaults);
    }

    #[test]
    fn temperature_is_temp_and_seed_minus_one_is_random() {
        let infer = |params: &str| match parse(&format!(
            r#"{{"op":"infer","prompt":"x","params":{params}}}"#
        )) {
            Ok(ClientMsg::Infer(req)) => Ok(req.params),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.message),
        };
        assert_eq!(infer(r#"{"temperature":0.3}"#).unwrap().temp, 0.3);
        assert!(
            infer(r#"{"temp":0.3,"temperature":0.3}"#)
                .unwrap_err()
                .contains("give one")
        );
        assert!(
            infer(r#"{"temperature":-1}"#)
                .unwrap_err()
                .contains("params.temp")
        );
        assert_eq!(infer(r#"{"seed":-1}"#).unwrap().seed, None);
        assert_eq!(infer(r#"{"seed":42}"#).unwrap().seed, Some(42));
        assert!(
            infer(r#"{"seed":-2}"#)
                .unwrap_err()
                .contains("params.seed = -2")
        );
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
        let json = ServerMsg::Status(&(&Status::default()).into()).to_json();
        assert!(
            json.starts_with(
                r#"{"op":"status","slots":0,"busy_slots":0,"queued":0,"kv":{"page_size":0"#
            ),
            "{json}"
        );
    }

    #[test]
    fn tokenize_and_truncate() {
        assert_eq!(
            parse(r#"{"op":"tokenize","id":"t","prompt":"Hi"}"#).unwrap(),
            ClientMsg::Tokenize {
                id: Some("t".into()),
                input: PromptInput::Text("Hi".into())
            }
        );
        assert!(
            err(r#"{"op":"tokenize","id":"t"}"#)
                .message
                .contains("missing \"prompt\"")
        );
        assert!(
            err(r#"{"op":"tokenize","prompt":"x","params":{}}"#)
                .message
                .contains("unknown field")
        );
        let Ok(ClientMsg::Infer(req)) = parse(r#"{"op":"infer","prompt":"x","truncate":"left"}"#)
        else {
            panic!()
        };
        assert_eq!(req.truncate, Truncate::Left);
        assert!(
            err(r#"{"op":"infer","prompt":"x","truncate":"middle"}"#)
                .message
                .contains("unknown variant")
        );
        assert_eq!(
            ServerMsg::Tokens { id: "t", count: 7 }.to_json(),
            r#"{"op":"tokens","id":"t","count":7}"#
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
        let e = err(r#"{"op":"infer","prompt":"x","params":{"temprature":0.5}}"#);
        assert!(
            e.message.contains("unknown field `temprature`"),
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

    mod properties {
        //! Property tests: `parse` takes any text a client may send.

        use super::super::ClientMsg;
        use super::parse;
        use crate::core::{MAX_STOP_STRINGS, PromptInput};
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
                prop_assert_eq!(req.params.max_tokens, max_tokens);
                prop_assert_eq!(req.params.temp, temp);
                prop_assert_eq!(req.params.stop, stop);
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

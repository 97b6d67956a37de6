//! Request bodies of `/v1/chat/completions` and `/v1/completions` to core
//! requests. Unknown fields are ignored, as OpenAI does; a known field with a
//! wrong type or range is a 400 naming it (`param`).

use serde_json::{Map, Value};

use super::Endpoint;
use crate::core::tools::{Tool, ToolCall, ToolChoice, Tools, Turn};
use crate::core::{
    ChatMessage, Constraint, MAX_TOP_LOGPROBS, PromptInput, RequestKind, RequestSpec, Role,
    SamplingParams, Truncate,
};
use crate::server::fields;

/// A request as the OpenAI API asked for it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    pub endpoint: Endpoint,
    pub model: Option<String>,
    pub spec: RequestSpec,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
    /// The model is offered tools: its reply is JSON to read at the end.
    pub tools: bool,
}

/// A request that cannot be served: a 400 naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    pub param: Option<String>,
    pub message: String,
}

impl BadRequest {
    fn new(param: &str, message: impl Into<String>) -> BadRequest {
        BadRequest {
            param: Some(param.to_owned()),
            message: message.into(),
        }
    }
}

/// The fields of a JSON object, read with type and range checks.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    /// A field; `null` counts as absent, as OpenAI treats it.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn number(&self, name: &str, lo: f64, hi: f64) -> Result<Option<f32>, BadRequest> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x as f32)),
            Some(x) => Err(BadRequest::new(
                name,
                format!("{name} = {x} is out of range: {lo} to {hi}"),
            )),
            None => Err(BadRequest::new(name, format!("{name} must be a number"))),
        }
    }

    fn integer(&self, name: &str, lo: i64, hi: i64) -> Result<Option<i64>, BadRequest> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        match v.as_i64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            Some(x) => Err(BadRequest::new(
                name,
                format!("{name} = {x} is out of range: {lo} to {hi}"),
            )),
            None => Err(BadRequest::new(name, format!("{name} must be an integer"))),
        }
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, BadRequest> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(BadRequest::new(
                name,
                format!("{name} must be true or false"),
            )),
        }
    }

    fn string(&self, name: &str) -> Result<Option<&'a str>, BadRequest> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(BadRequest::new(name, format!("{name} must be a string"))),
        }
    }
}

/// Parses a request body for `endpoint`, laying its parameters over `defaults`.
pub fn parse(
    endpoint: Endpoint,
    body: &[u8],
    defaults: &SamplingParams,
) -> Result<ApiRequest, BadRequest> {
    let value: Value = serde_json::from_slice(body).map_err(|e| BadRequest {
        param: None,
        message: format!("the body is not valid JSON: {e}"),
    })?;
    let Value::Object(map) = &value else {
        return Err(BadRequest {
            param: None,
            message: "the body must be a JSON object".into(),
        });
    };
    let f = Fields(map);
    let model = f.string("model")?.map(str::to_owned);
    refuse_unsupported(&f)?;
    let tools = match endpoint {
        Endpoint::Chat => tools(&f)?,
        Endpoint::Completions => None,
    };
    let input = match endpoint {
        Endpoint::Chat => {
            let turns = messages(&f)?;
            PromptInput::Messages(match &tools {
                Some(t) => t.render(turns),
                None => Tools::none().render(turns),
            })
        }
        Endpoint::Completions => PromptInput::Text(prompt(&f)?),
    };
    let mut params = params(endpoint, &f, defaults)?;
    // response_format, llama-server's own `json_schema` and `grammar`, tools:
    // at most one of them.
    let json_schema = f
        .get("json_schema")
        .map(|s| fields::json_schema("json_schema", s.clone()))
        .transpose()
        .map_err(|m| BadRequest::new("json_schema", m))?;
    let grammar = f
        .string("grammar")?
        .map(|g| Constraint::grammar(g.to_owned()));
    params.constraint = fields::one_constraint([
        ("response_format", response_format(&f)?),
        ("json_schema", json_schema),
        ("grammar", grammar),
        ("tools", tools.as_ref().and_then(Tools::constraint)),
    ])
    .map_err(|m| {
        let param = m.split(' ').next().unwrap_or_default().to_owned();
        BadRequest::new(&param, m)
    })?;
    let tools = tools.as_ref().is_some_and(Tools::active);
    let priority = f.integer("priority", i32::MIN.into(), i32::MAX.into())?;
    let deadline = f.integer("deadline_ms", 1, crate::core::MAX_DEADLINE_MS as i64)?;
    let urgency = fields::urgency(priority.map(|p| p as i32), deadline.map(|d| d as u64))
        .map_err(|m| BadRequest::new("deadline_ms", m))?;
    let stream = f.boolean("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o)
            .boolean("include_usage")
            .map_err(|_| {
                BadRequest::new(
                    "stream_options.include_usage",
                    "stream_options.include_usage must be true or false",
                )
            })?
            .unwrap_or(false),
        Some(_) => {
            return Err(BadRequest::new(
                "stream_options",
                "stream_options must be an object",
            ));
        }
    };
    Ok(ApiRequest {
        endpoint,
        model,
        spec: RequestSpec {
            input,
            params,
            kind: RequestKind::Generate,
            truncate: Truncate::None,
            urgency,
        },
        stream,
        include_usage,
        tools,
    })
}

/// Fields this server does not serve (yet), refused rather than ignored:
/// a client that asks for them would otherwise get something else.
fn refuse_unsupported(f: &Fields) -> Result<(), BadRequest> {
    if let Some(n) = f.integer("n", 1, i64::MAX)?
        && n != 1
    {
        return Err(BadRequest::new("n", "n must be 1: one choice per request"));
    }
    if let Some(n) = f.integer("best_of", 1, i64::MAX)?
        && n != 1
    {
        return Err(BadRequest::new("best_of", "best_of must be 1"));
    }
    if f.boolean("echo")? == Some(true) {
        return Err(BadRequest::new("echo", "echo is not supported"));
    }
    if f.get("suffix").is_some() {
        return Err(BadRequest::new("suffix", "suffix is not supported"));
    }
    if f.get("functions").is_some() || f.get("function_call").is_some() {
        return Err(BadRequest::new(
            "functions",
            "functions and function_call are deprecated: send tools and tool_choice",
        ));
    }
    Ok(())
}

fn messages(f: &Fields) -> Result<Vec<Turn>, BadRequest> {
    let list = match f.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(BadRequest::new("messages", "messages is empty")),
        Some(_) => {
            return Err(BadRequest::new(
                "messages",
                "messages must be an array of messages",
            ));
        }
        None => return Err(BadRequest::new("messages", "messages is required")),
    };
    let with_tools = f
        .get("tools")
        .is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()));
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |field: &str| format!("messages[{i}].{field}");
            let Value::Object(m) = m else {
                return Err(BadRequest::new(
                    &format!("messages[{i}]"),
                    format!("messages[{i}] must be an object"),
                ));
            };
            let m = Fields(m);
            let role = match m.get("role").and_then(Value::as_str) {
                Some("system" | "developer") => Role::System,
                Some("user") => Role::User,
                Some("assistant") => Role::Assistant,
                Some("tool") => Role::User,
                Some("function") => {
                    return Err(BadRequest::new(
                        &at("role"),
                        format!("{} = \"function\" is deprecated: send \"tool\"", at("role")),
                    ));
                }
                _ => {
                    return Err(BadRequest::new(
                        &at("role"),
                        format!(
                            "{} must be \"system\", \"developer\", \"user\", \"assistant\" or \"tool\"",
                            at("role")
                        ),
                    ));
                }
            };
            let is_tool = m.get("role").and_then(Value::as_str) == Some("tool");
            let calls = match m.get("tool_calls") {
                Some(_) if role != Role::Assistant => {
                    return Err(BadRequest::new(
                        &at("tool_calls"),
                        format!("{} is for assistant messages", at("tool_calls")),
                    ));
                }
                Some(calls) => tool_calls(calls, &at("tool_calls"))?,
                None => Vec::new(),
            };
            if (is_tool || !calls.is_empty()) && !with_tools {
                return Err(BadRequest::new(
                    &at("role"),
                    format!("{}: tool calls and results need the request's tools", at("role")),
                ));
            }
            let content = match m.get("content") {
                None if role == Role::Assistant => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => text_parts(parts, &at("content"))?,
                _ => {
                    return Err(BadRequest::new(
                        &at("content"),
                        format!(
                            "{} must be a string or an array of text parts",
                            at("content")
                        ),
                    ));
                }
            };
            Ok(if is_tool {
                let call_id = m.string("tool_call_id").map_err(|_| {
                    BadRequest::new(&at("tool_call_id"), format!("{} must be a string", at("tool_call_id")))
                })?;
                Turn::Result {
                    call_id: call_id.map(str::to_owned),
                    content,
                }
            } else if !calls.is_empty() {
                Turn::Calls { content, calls }
            } else {
                Turn::Message(ChatMessage { role, content })
            })
        })
        .collect()
}

/// An assistant message's `tool_calls`, as an earlier reply gave them.
fn tool_calls(value: &Value, at: &str) -> Result<Vec<ToolCall>, BadRequest> {
    let shape = || {
        BadRequest::new(
            at,
            format!(
                "{at} must be an array of {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}"
            ),
        )
    };
    let list = value.as_array().ok_or_else(shape)?;
    list.iter()
        .map(|c| {
            let function = c.get("function").ok_or_else(shape)?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(shape)?;
            let arguments = match function.get("arguments") {
                Some(Value::String(s)) => s.clone(),
                Some(v @ Value::Object(_)) => v.to_string(),
                None => "{}".into(),
                _ => return Err(shape()),
            };
            Ok(ToolCall {
                id: c
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                name: name.to_owned(),
                arguments,
            })
        })
        .collect()
}

/// `tools`, `tool_choice` and `parallel_tool_calls`; `None` without tools.
fn tools(f: &Fields) -> Result<Option<Tools>, BadRequest> {
    let list = match f.get("tools") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(BadRequest::new("tools", "tools must be an array")),
    };
    let tools = list
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let function = match (t.get("type").and_then(Value::as_str), t.get("function")) {
                (Some("function"), Some(Value::Object(function))) => Fields(function),
                _ => {
                    return Err(BadRequest::new(
                        &format!("tools[{i}]"),
                        format!("tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", \"parameters\"...}}}}"),
                    ));
                }
            };
            let name = function
                .string("name")
                .ok()
                .flatten()
                .ok_or_else(|| {
                    BadRequest::new(&format!("tools[{i}].function.name"), format!("tools[{i}].function.name is required"))
                })?;
            let description = function.string("description").ok().flatten().map(str::to_owned);
            Ok(Tool {
                name: name.to_owned(),
                description,
                parameters: function
                    .get("parameters")
                    .cloned()
                    .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
            })
        })
        .collect::<Result<Vec<Tool>, BadRequest>>()?;
    let choice = match f.get("tool_choice") {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => ToolChoice::named(s).ok_or_else(|| {
            BadRequest::new(
                "tool_choice",
                format!(
                    "tool_choice {s:?} is not one of \"auto\", \"none\", \"required\" or a function"
                ),
            )
        })?,
        Some(v) => match v
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
        {
            Some(name) if v.get("type").and_then(Value::as_str) == Some("function") => {
                ToolChoice::Function(name.to_owned())
            }
            _ => {
                return Err(BadRequest::new(
                    "tool_choice",
                    "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ));
            }
        },
    };
    if tools.is_empty() && f.get("tool_choice").is_none() {
        return Ok(None);
    }
    let tools = Tools {
        tools,
        choice,
        // Off unless asked for, as in llama-server: a small model given the
        // choice repeats its call until `max_tokens`.
        parallel: f.boolean("parallel_tool_calls")?.unwrap_or(false),
    };
    tools.validate().map_err(|e| {
        BadRequest::new(
            if e.starts_with("tools") {
                "tools"
            } else {
                "tool_choice"
            },
            e,
        )
    })?;
    Ok(Some(tools))
}

/// `response_format`: `text`, `json_object` or `json_schema`.
fn response_format(f: &Fields) -> Result<Option<Constraint>, BadRequest> {
    let Some(format) = f.get("response_format") else {
        return Ok(None);
    };
    let bad = |m: &str| BadRequest::new("response_format", m);
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonSchema(
            serde_json::json!({"type": "object"}),
        ))),
        Some("json_schema") => {
            let schema = format
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .cloned()
                .unwrap_or_else(|| serde_json::json!({"type": "object"}));
            fields::json_schema("response_format.json_schema.schema", schema)
                .map(Some)
                .map_err(|m| BadRequest::new("response_format.json_schema.schema", m))
        }
        _ => Err(bad(
            "response_format.type must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

/// Content given as parts: the text parts joined (this model reads text only).
fn text_parts(parts: &[Value], at: &str) -> Result<String, BadRequest> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        match (
            part.get("type").and_then(Value::as_str),
            part.get("text").and_then(Value::as_str),
        ) {
            (Some("text"), Some(t)) => text.push_str(t),
            (Some(kind), _) if kind != "text" => {
                return Err(BadRequest::new(
                    &format!("{at}[{j}].type"),
                    format!("{at}[{j}] is {kind:?}: this model reads text only"),
                ));
            }
            _ => {
                return Err(BadRequest::new(
                    &format!("{at}[{j}]"),
                    format!("{at}[{j}] must be {{\"type\": \"text\", \"text\": \"...\"}}"),
                ));
            }
        }
    }
    Ok(text)
}

fn string_list(v: &Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|s| s.as_str().map(str::to_owned))
        .collect()
}

fn prompt(f: &Fields) -> Result<String, BadRequest> {
    let text = match f.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => match a.as_slice() {
            [Value::String(s)] => s.clone(),
            [] => return Err(BadRequest::new("prompt", "prompt is empty")),
            [Value::String(_), ..] => {
                return Err(BadRequest::new(
                    "prompt",
                    "one prompt per request: send the others as separate requests",
                ));
            }
            _ => {
                return Err(BadRequest::new(
                    "prompt",
                    "prompt must be a string (token arrays are not supported)",
                ));
            }
        },
        Some(_) => return Err(BadRequest::new("prompt", "prompt must be a string")),
        None => return Err(BadRequest::new("prompt", "prompt is required")),
    };
    if text.is_empty() {
        return Err(BadRequest::new("prompt", "prompt is empty"));
    }
    Ok(text)
}

fn params(
    endpoint: Endpoint,
    f: &Fields,
    defaults: &SamplingParams,
) -> Result<SamplingParams, BadRequest> {
    let mut p = defaults.clone();
    if let Some(t) = f.number("temperature", 0.0, 2.0)? {
        p.temp = t;
    }
    if let Some(x) = f.number("top_p", 0.0, 1.0)? {
        p.top_p = x;
    }
    if let Some(x) = f.number("min_p", 0.0, 1.0)? {
        p.min_p = x;
    }
    if let Some(x) = f.integer("top_k", 0, i32::MAX.into())? {
        p.top_k = x as i32;
    }
    if let Some(x) = f.number("repeat_penalty", 0.0, 10.0)? {
        p.repeat_penalty = x;
    }
    if let Some(x) = f.number("presence_penalty", -2.0, 2.0)? {
        p.presence_penalty = x;
    }
    if let Some(x) = f.number("frequency_penalty", -2.0, 2.0)? {
        p.frequency_penalty = x;
    }
    let max = u32::MAX.into();
    let max_tokens = match f.integer("max_completion_tokens", 1, max)? {
        Some(n) => Some(n),
        None => f.integer("max_tokens", 1, max)?,
    };
    if let Some(n) = max_tokens {
        p.max_tokens = n as u32;
    }
    match f.integer("seed", i64::MIN, i64::MAX)? {
        None => {}
        Some(-1) => p.seed = None,
        // Any integer seeds; its low 32 bits are what llama.cpp takes.
        Some(s) => p.seed = Some(s as u32),
    }
    p.stop = match f.get("stop") {
        None => p.stop,
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                BadRequest::new("stop", "stop must be a string or an array of strings")
            })?,
        Some(_) => {
            return Err(BadRequest::new(
                "stop",
                "stop must be a string or an array of strings",
            ));
        }
    };
    if let Some(b) = f.boolean("ignore_eos")? {
        p.ignore_eos = b;
    }
    // Beyond OpenAI's own: llama-server's and vLLM's names, and ours.
    if let Some(x) = f.integer("draft_max", 0, u32::MAX.into())? {
        p.draft_max = Some(x as u32);
    }
    if let Some(x) = f.number("typical_p", 0.0, 1.0)? {
        p.typical_p = x;
    }
    if let Some(x) = f.number("xtc_probability", 0.0, 1.0)? {
        p.xtc_probability = x;
    }
    if let Some(x) = f.number("xtc_threshold", 0.0, 1.0)? {
        p.xtc_threshold = x;
    }
    if let Some(x) = f.number("dry_multiplier", 0.0, 10.0)? {
        p.dry_multiplier = x;
    }
    if let Some(x) = f.number("dry_base", 1.0, 10.0)? {
        p.dry_base = x;
    }
    if let Some(x) = f.integer("dry_allowed_length", 0, 1000)? {
        p.dry_allowed_length = x as u32;
    }
    if let Some(x) = f.integer("dry_penalty_last_n", -1, i32::MAX.into())? {
        p.dry_penalty_last_n = x as i32;
    }
    if let Some(v) = f.get("dry_sequence_breakers") {
        p.dry_sequence_breakers = string_list(v).ok_or_else(|| {
            BadRequest::new(
                "dry_sequence_breakers",
                "dry_sequence_breakers must be an array of strings",
            )
        })?;
    }
    if let Some(x) = f.integer("min_tokens", 0, u32::MAX.into())? {
        p.min_tokens = x as u32;
    }
    if let Some(v) = f.get("stop_token_ids") {
        p.stop_token_ids = v
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|t| t.as_i64().and_then(|t| i32::try_from(t).ok()))
                    .collect()
            })
            .ok_or_else(|| {
                BadRequest::new(
                    "stop_token_ids",
                    "stop_token_ids must be an array of token ids",
                )
            })?;
    }
    if let Some(v) = f.get("logit_bias") {
        p.logit_bias = fields::parse_logit_bias(v)
            .map_err(|e| BadRequest::new("logit_bias", format!("logit_bias {e}")))?;
    }
    p.logprobs = match endpoint {
        Endpoint::Chat => {
            let top = f.integer("top_logprobs", 0, MAX_TOP_LOGPROBS.into())?;
            match (f.boolean("logprobs")?, top) {
                (Some(true), top) => Some(top.unwrap_or(0) as u8),
                (_, Some(_)) => {
                    return Err(BadRequest::new(
                        "top_logprobs",
                        "top_logprobs needs logprobs: true",
                    ));
                }
                _ => None,
            }
        }
        // The legacy API: `logprobs` is the number of alternatives (0 to 5).
        Endpoint::Completions => f.integer("logprobs", 0, 5)?.map(|k| k as u8),
    };
    p.validate()
        .map_err(|e| BadRequest::new(e.name, e.to_string()))?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn chat(body: Value) -> Result<ApiRequest, BadRequest> {
        parse(
            Endpoint::Chat,
            body.to_string().as_bytes(),
            &SamplingParams::default(),
        )
    }

    fn completion(body: Value) -> Result<ApiRequest, BadRequest> {
        parse(
            Endpoint::Completions,
            body.to_string().as_bytes(),
            &SamplingParams::default(),
        )
    }

    fn param_of(r: Result<ApiRequest, BadRequest>) -> String {
        r.unwrap_err().param.unwrap_or_default()
    }

    #[test]
    fn chat_bodies_map_to_core_requests() {
        let r = chat(json!({
            "model": "m", "stream": true, "stream_options": {"include_usage": true},
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": null},
            ],
            "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0, "top_p": 0.5,
            "stop": "\n", "seed": 42, "presence_penalty": 0.5, "frequency_penalty": -0.5,
            "logprobs": true, "top_logprobs": 3, "n": 1, "user": "u", "top_k": 5, "min_p": 0.1,
            "repeat_penalty": 1.1, "draft_max": 0, "something_new": {"ignored": true},
        }))
        .unwrap();
        assert_eq!(r.model.as_deref(), Some("m"));
        assert!(r.stream && r.include_usage);
        let PromptInput::Messages(m) = &r.spec.input else {
            panic!()
        };
        assert_eq!(m[0].role, Role::System);
        assert_eq!(m[1].content, "Hi there");
        assert_eq!((m[2].role, m[2].content.as_str()), (Role::Assistant, ""));
        let p = &r.spec.params;
        assert_eq!((p.max_tokens, p.temp, p.top_p), (7, 0.0, 0.5));
        assert_eq!((p.stop.clone(), p.seed), (vec!["\n".to_string()], Some(42)));
        assert_eq!((p.presence_penalty, p.frequency_penalty), (0.5, -0.5));
        assert_eq!((p.logprobs, p.top_k, p.min_p), (Some(3), 5, 0.1));
        assert_eq!(p.draft_max, Some(0));
        assert_eq!(r.spec.kind, RequestKind::Generate);
    }

    #[test]
    fn completion_bodies_take_one_prompt() {
        let r = completion(json!({"prompt": ["Once"], "logprobs": 2, "max_tokens": 3})).unwrap();
        assert_eq!(r.spec.input, PromptInput::Text("Once".into()));
        assert_eq!(r.spec.params.logprobs, Some(2));
        assert!(!r.stream);
        assert_eq!(
            param_of(completion(json!({"prompt": ["a", "b"]}))),
            "prompt"
        );
        assert_eq!(param_of(completion(json!({"prompt": [1, 2]}))), "prompt");
        assert_eq!(param_of(completion(json!({"prompt": ""}))), "prompt");
        assert_eq!(param_of(completion(json!({}))), "prompt");
        assert_eq!(
            param_of(completion(json!({"prompt": "x", "logprobs": 6}))),
            "logprobs"
        );
        assert_eq!(
            param_of(completion(json!({"prompt": "x", "echo": true}))),
            "echo"
        );
    }

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    #[test]
    fn tools_and_formats_become_constraints() {
        let user = json!({"role": "user", "content": "Weather in Oslo?"});
        let r = chat(json!({"messages": [user], "tools": [weather()], "tool_choice": "required"}))
            .unwrap();
        assert!(r.tools);
        let Some(Constraint::JsonSchema(schema)) = &r.spec.params.constraint else {
            panic!("{:?}", r.spec.params.constraint)
        };
        assert_eq!(schema["properties"]["tool_calls"]["maxItems"], json!(1));
        let PromptInput::Messages(m) = &r.spec.input else {
            panic!()
        };
        assert_eq!(m[0].role, Role::System);
        assert!(m[0].content.contains("get_weather"));
        // A round trip: the call and its result go back as JSON turns.
        let history = json!([
            user,
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
        ]);
        let r = chat(json!({"messages": history, "tools": [weather()]})).unwrap();
        let PromptInput::Messages(m) = &r.spec.input else {
            panic!()
        };
        let roles: Vec<Role> = m.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [Role::System, Role::User, Role::Assistant, Role::User]
        );
        assert!(m[2].content.contains("Oslo") && m[3].content.contains("-3 C"));
        let none =
            chat(json!({"messages": [user], "tools": [weather()], "tool_choice": "none"})).unwrap();
        assert!(!none.tools && none.spec.params.constraint.is_none());
        let json = chat(
            json!({"messages": [user], "response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "strict": true, "schema": {"type": "object"}}}}),
        )
        .unwrap();
        assert_eq!(
            json.spec.params.constraint,
            Some(Constraint::JsonSchema(json!({"type": "object"})))
        );
        let biased =
            chat(json!({"messages": [user], "logit_bias": {"42": -100}, "min_tokens": 3})).unwrap();
        assert_eq!(biased.spec.params.logit_bias, vec![(42, -100.0)]);
        assert_eq!(biased.spec.params.min_tokens, 3);
    }

    #[test]
    fn wrong_types_and_ranges_name_the_field() {
        let user = json!([{"role": "user", "content": "x"}]);
        let cases = [
            (
                json!({"messages": user, "temperature": "hot"}),
                "temperature",
            ),
            (json!({"messages": user, "temperature": 2.5}), "temperature"),
            (json!({"messages": user, "max_tokens": 0}), "max_tokens"),
            (json!({"messages": user, "max_tokens": 1.5}), "max_tokens"),
            (json!({"messages": user, "stop": [1]}), "stop"),
            (json!({"messages": user, "n": 2}), "n"),
            (json!({"messages": user, "stream": "yes"}), "stream"),
            (json!({"messages": user, "top_logprobs": 2}), "top_logprobs"),
            (
                json!({"messages": user, "logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (
                json!({"messages": user, "presence_penalty": 3}),
                "presence_penalty",
            ),
            (json!({"messages": user, "top_p": 0}), "top_p"),
            (
                json!({"messages": user, "tools": [{"type": "function"}]}),
                "tools[0]",
            ),
            (
                json!({"messages": user, "response_format": {"type": "xml"}}),
                "response_format",
            ),
            (
                json!({"messages": user, "response_format": {"type": "json_object"}, "tools": [weather()]}),
                "response_format",
            ),
            (
                json!({"messages": user, "tool_choice": "required"}),
                "tool_choice",
            ),
            (
                json!({"messages": user, "tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "tool_choice",
            ),
            (
                json!({"messages": user, "tools": [weather(), weather()]}),
                "tools",
            ),
            (
                json!({"messages": user, "logit_bias": {"x": 1}}),
                "logit_bias",
            ),
            (
                json!({"messages": user, "logit_bias": {"5": 150}}),
                "logit_bias",
            ),
            (json!({"messages": user, "min_tokens": 600}), "min_tokens"),
            (json!({"messages": user, "model": 3}), "model"),
            (json!({"messages": []}), "messages"),
            (json!({"messages": "hi"}), "messages"),
            (
                json!({"messages": [{"role": "robot", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user"}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages[0].content[0].type",
            ),
        ];
        for (body, param) in cases {
            let e = chat(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
            assert!(
                e.message.contains(param.split('[').next().unwrap()),
                "{}",
                e.message
            );
        }
        for body in [&b"{oops"[..], b"[1]", b"\xff"] {
            let e = parse(Endpoint::Chat, body, &SamplingParams::default()).unwrap_err();
            assert_eq!(e.param, None);
        }
    }
}

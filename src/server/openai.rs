//! The OpenAI API as a thin mapping: request bodies of `/v1/chat/completions`
//! and `/v1/completions` to core requests, and the core's events to OpenAI's
//! JSON (whole responses and server-sent-event chunks). Sans-I/O; the session
//! in `http_openai.rs` drives it.
//!
//! Unknown fields are ignored, as OpenAI does; a known field with a wrong
//! type or range is a 400 naming it (`param`).

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::core::{
    ChatMessage, FinishReason, MAX_TOP_LOGPROBS, PromptInput, RequestKind, RequestSpec, Role,
    SamplingParams, Stats, TokenLogprobs, Truncate,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions`
    Completions,
}

impl Endpoint {
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path {
            "/v1/chat/completions" => Some(Endpoint::Chat),
            "/v1/completions" => Some(Endpoint::Completions),
            _ => None,
        }
    }
}

/// A request as the OpenAI API asked for it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    pub endpoint: Endpoint,
    pub model: Option<String>,
    pub spec: RequestSpec,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
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
    let input = match endpoint {
        Endpoint::Chat => PromptInput::Messages(messages(&f)?),
        Endpoint::Completions => PromptInput::Text(prompt(&f)?),
    };
    let params = params(endpoint, &f, defaults)?;
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
        },
        stream,
        include_usage,
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
    let tools = f
        .get("tools")
        .or(f.get("functions"))
        .is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty()));
    if tools {
        return Err(BadRequest::new(
            "tools",
            "tools: tool calling is not supported yet",
        ));
    }
    if let Some(format) = f.get("response_format") {
        let kind = format.get("type").and_then(Value::as_str);
        if kind != Some("text") {
            return Err(BadRequest::new(
                "response_format",
                "only response_format {\"type\": \"text\"} is supported yet",
            ));
        }
    }
    Ok(())
}

fn messages(f: &Fields) -> Result<Vec<ChatMessage>, BadRequest> {
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
                Some(other @ ("tool" | "function")) => {
                    return Err(BadRequest::new(
                        &at("role"),
                        format!(
                            "{} = {other:?}: tool messages are not supported yet",
                            at("role")
                        ),
                    ));
                }
                _ => {
                    return Err(BadRequest::new(
                        &at("role"),
                        format!(
                            "{} must be \"system\", \"developer\", \"user\" or \"assistant\"",
                            at("role")
                        ),
                    ));
                }
            };
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
            Ok(ChatMessage { role, content })
        })
        .collect()
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

/// What every object of one response shares.
#[derive(Debug, Clone)]
pub struct Reply {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    /// A plain token chunk (not the first, no log-probabilities) is this,
    /// the token's text as a JSON string, then `tail`: serialized once.
    head: String,
    tail: String,
}

impl Reply {
    pub fn new(endpoint: Endpoint, id: String, created: u64, model: String) -> Reply {
        let mut r = Reply {
            endpoint,
            id,
            created,
            model,
            head: String::new(),
            tail: String::new(),
        };
        // A placeholder no text holds unescaped marks where the text goes.
        let whole = r.serialize_chunk("\0", &[], false);
        let (head, tail) = whole.split_once(r#""\u0000""#).expect("the placeholder");
        (r.head, r.tail) = (head.to_owned(), tail.to_owned());
        r
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        })
    }

    /// A streamed chunk with `text` (for chat, the first carries the role).
    /// This runs once per token: a plain one is the text between two
    /// prepared pieces, so it costs what the WebSocket `token` message does.
    pub fn chunk(&self, text: &str, logprobs: &[TokenLogprobs], first: bool) -> String {
        if first || !logprobs.is_empty() {
            return self.serialize_chunk(text, logprobs, first);
        }
        let mut out = String::with_capacity(self.head.len() + text.len() + self.tail.len() + 8);
        out.push_str(&self.head);
        out.push_str(&serde_json::to_string(text).expect("a string serializes"));
        out.push_str(&self.tail);
        out
    }

    fn serialize_chunk(&self, text: &str, logprobs: &[TokenLogprobs], first: bool) -> String {
        let logprobs = (!logprobs.is_empty()).then(|| self.logprobs(logprobs));
        let choice = match self.endpoint {
            Endpoint::Chat => Choice::Delta {
                index: 0,
                delta: Delta {
                    role: first.then_some("assistant"),
                    content: text,
                },
                logprobs,
                finish_reason: None,
            },
            Endpoint::Completions => Choice::Text {
                index: 0,
                text,
                logprobs,
                finish_reason: None,
            },
        };
        let chunk = Chunk {
            id: &self.id,
            object: self.object(true),
            created: self.created,
            model: &self.model,
            system_fingerprint: None,
            choices: [choice],
        };
        let mut out = String::with_capacity(256);
        out.push_str("data: ");
        out.push_str(&serde_json::to_string(&chunk).expect("serializable"));
        out.push_str("\n\n");
        out
    }

    /// The last chunk: the finish reason, then the usage if asked for.
    pub fn last_chunks(&self, reason: FinishReason, stats: &Stats, usage: bool) -> String {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason(reason)})
            }
            Endpoint::Completions => {
                json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish_reason(reason)})
            }
        };
        let mut out = sse(&self.envelope(true, json!([choice])));
        if usage {
            let mut last = self.envelope(true, json!([]));
            last["usage"] = self::usage(stats);
            out.push_str(&sse(&last));
        }
        out.push_str("data: [DONE]\n\n");
        out
    }

    /// The whole response of a request that did not stream.
    pub fn complete(
        &self,
        text: &str,
        logprobs: &[TokenLogprobs],
        reason: FinishReason,
        stats: &Stats,
    ) -> String {
        let reason = finish_reason(reason);
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": self.logprobs(logprobs),
                "finish_reason": reason,
            }),
            Endpoint::Completions => json!({
                "index": 0, "text": text, "logprobs": self.logprobs(logprobs), "finish_reason": reason,
            }),
        };
        let mut body = self.envelope(false, json!([choice]));
        body["usage"] = usage(stats);
        body.to_string()
    }

    fn logprobs(&self, tokens: &[TokenLogprobs]) -> Value {
        if tokens.is_empty() {
            return Value::Null;
        }
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        match self.endpoint {
            Endpoint::Chat => {
                let entry = |t: &crate::core::Candidate| json!({"token": text(&t.bytes), "logprob": t.logprob, "bytes": t.bytes});
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut e = entry(&t.chosen);
                        e["top_logprobs"] = t.top.iter().map(entry).collect();
                        e
                    })
                    .collect();
                json!({"content": content})
            }
            Endpoint::Completions => {
                let mut offset = 0;
                let mut offsets = Vec::new();
                for t in tokens {
                    offsets.push(offset);
                    offset += text(&t.chosen.bytes).len();
                }
                json!({
                    "tokens": tokens.iter().map(|t| text(&t.chosen.bytes)).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.chosen.logprob).collect::<Vec<_>>(),
                    "top_logprobs": tokens.iter().map(|t| {
                        t.top.iter().map(|c| (text(&c.bytes), json!(c.logprob))).collect::<Map<_, _>>()
                    }).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        }
    }
}

/// A streamed chunk as OpenAI writes it (the fields in its order).
#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: Option<&'a str>,
    choices: [Choice<'a>; 1],
}

#[derive(Serialize)]
#[serde(untagged)]
enum Choice<'a> {
    Delta {
        index: u32,
        delta: Delta<'a>,
        logprobs: Option<Value>,
        finish_reason: Option<&'static str>,
    },
    Text {
        index: u32,
        text: &'a str,
        logprobs: Option<Value>,
        finish_reason: Option<&'static str>,
    },
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    content: &'a str,
}

/// One server-sent event.
pub fn sse(data: &Value) -> String {
    format!("data: {data}\n\n")
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop | FinishReason::Abort => "stop",
    }
}

fn usage(s: &Stats) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    })
}

/// `GET /v1/models`: the one model served.
pub fn models(model: &str, created: u64) -> String {
    json!({"object": "list", "data": [model_object(model, created)]}).to_string()
}

/// `GET /v1/models/{id}`.
pub fn model_object(model: &str, created: u64) -> Value {
    json!({"id": model, "object": "model", "created": created, "owned_by": "inference-core"})
}

/// Whether a request's `model` names the model served: its id, or its file name.
pub fn is_our_model(asked: &str, ours: &str) -> bool {
    asked.eq_ignore_ascii_case(ours)
        || asked
            .strip_suffix(".gguf")
            .is_some_and(|a| a.eq_ignore_ascii_case(ours))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Candidate;

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
            "repeat_penalty": 1.1, "something_new": {"ignored": true},
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
                "tools",
            ),
            (
                json!({"messages": user, "response_format": {"type": "json_object"}}),
                "response_format",
            ),
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

    fn reply(endpoint: Endpoint) -> Reply {
        Reply::new(endpoint, "chatcmpl-1".into(), 7, "m\"odel".into())
    }

    #[test]
    fn prepared_chunks_are_what_serializing_gives() {
        for endpoint in [Endpoint::Chat, Endpoint::Completions] {
            let r = reply(endpoint);
            for text in ["", " Paris", "a\"b\\c\n\u{1}é🙂", "\0"] {
                assert_eq!(
                    r.chunk(text, &[], false),
                    r.serialize_chunk(text, &[], false)
                );
            }
        }
    }

    fn data(sse: &str) -> Vec<Value> {
        sse.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let d = e.strip_prefix("data: ").unwrap();
                if d == "[DONE]" {
                    json!("[DONE]")
                } else {
                    serde_json::from_str(d).unwrap()
                }
            })
            .collect()
    }

    #[test]
    fn chunks_and_responses_have_openais_shape() {
        let r = reply(Endpoint::Chat);
        let first = &data(&r.chunk("Hi", &[], true))[0];
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(
            first["choices"][0]["delta"],
            json!({"role": "assistant", "content": "Hi"})
        );
        let stats = Stats {
            prompt_tokens: 5,
            cached_tokens: 2,
            completion_tokens: 3,
            ..Stats::default()
        };
        let end = data(&r.last_chunks(FinishReason::Length, &stats, true));
        assert_eq!(end[0]["choices"][0]["finish_reason"], "length");
        assert_eq!(end[1]["choices"], json!([]));
        assert_eq!(end[1]["usage"]["total_tokens"], 8);
        assert_eq!(end[1]["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
        assert_eq!(end[2], "[DONE]");
        assert_eq!(
            data(&r.last_chunks(FinishReason::Eos, &stats, false)).len(),
            2
        );

        let lp = TokenLogprobs {
            chosen: Candidate {
                token: 1,
                bytes: b"Hi".to_vec(),
                logprob: -0.5,
            },
            top: vec![Candidate {
                token: 1,
                bytes: b"Hi".to_vec(),
                logprob: -0.5,
            }],
        };
        let whole: Value = serde_json::from_str(&r.complete(
            "Hi",
            std::slice::from_ref(&lp),
            FinishReason::Stop,
            &stats,
        ))
        .unwrap();
        assert_eq!(whole["object"], "chat.completion");
        assert_eq!(whole["choices"][0]["message"]["content"], "Hi");
        assert_eq!(whole["choices"][0]["finish_reason"], "stop");
        let c = &whole["choices"][0]["logprobs"]["content"][0];
        assert_eq!(
            (c["token"].as_str(), c["bytes"].clone()),
            (Some("Hi"), json!([72, 105]))
        );
        assert_eq!(c["top_logprobs"][0]["logprob"], -0.5);

        let r = reply(Endpoint::Completions);
        let whole: Value =
            serde_json::from_str(&r.complete("Hi", &[lp], FinishReason::Eos, &stats)).unwrap();
        assert_eq!(whole["object"], "text_completion");
        assert_eq!(whole["choices"][0]["text"], "Hi");
        assert_eq!(whole["choices"][0]["logprobs"]["tokens"], json!(["Hi"]));
        assert_eq!(
            whole["choices"][0]["logprobs"]["top_logprobs"][0]["Hi"],
            -0.5
        );
        assert_eq!(data(&r.chunk("x", &[], true))[0]["choices"][0]["text"], "x");
    }

    #[test]
    fn models_are_named_by_id_or_file() {
        assert!(is_our_model("gemma-3", "gemma-3"));
        assert!(is_our_model("Gemma-3.gguf", "gemma-3"));
        assert!(!is_our_model("gpt-4o", "gemma-3"));
        let list: Value = serde_json::from_str(&models("gemma-3", 1)).unwrap();
        assert_eq!(list["data"][0]["id"], "gemma-3");
    }
}

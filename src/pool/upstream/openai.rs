//! A core request as an OpenAI-compatible upstream takes it, and its
//! streamed chunks back as core terms. Sans-I/O.
//!
//! A raw prompt goes to `/v1/completions`, a conversation to
//! `/v1/chat/completions`, always streamed with usage. Sampling fields are
//! OpenAI's plus the extensions llama-server and vLLM share (`top_k`,
//! `min_p`, `repetition_penalty`...); a JSON schema becomes
//! `response_format`, a GBNF grammar `grammar` (llama-server).

use serde_json::{Map, Value, json};

use crate::core::{Constraint, FinishReason, PromptInput, Request, RequestError};

/// The path and JSON body for `req`, or why the upstream cannot serve it.
pub fn request_body(req: &Request, model: &str) -> Result<(&'static str, String), RequestError> {
    let p = &req.params;
    let mut body = Map::new();
    let path = match &req.input {
        PromptInput::Text(text) => {
            body.insert("prompt".into(), json!(text));
            "/v1/completions"
        }
        PromptInput::Messages(msgs) => {
            let msgs: Vec<Value> = msgs
                .iter()
                .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
                .collect();
            body.insert("messages".into(), Value::Array(msgs));
            "/v1/chat/completions"
        }
    };
    if !model.is_empty() {
        body.insert("model".into(), json!(model));
    }
    body.insert("stream".into(), json!(true));
    body.insert("stream_options".into(), json!({"include_usage": true}));
    body.insert("max_tokens".into(), json!(p.max_tokens));
    body.insert("temperature".into(), json!(p.temp));
    body.insert("top_p".into(), json!(p.top_p));
    // Our 0 (off) is not every upstream's (older vLLM wants -1): left out.
    if p.top_k > 0 {
        body.insert("top_k".into(), json!(p.top_k));
    }
    body.insert("min_p".into(), json!(p.min_p));
    if p.repeat_penalty != 1.0 {
        body.insert("repeat_penalty".into(), json!(p.repeat_penalty));
        body.insert("repetition_penalty".into(), json!(p.repeat_penalty));
    }
    if p.presence_penalty != 0.0 {
        body.insert("presence_penalty".into(), json!(p.presence_penalty));
    }
    if p.frequency_penalty != 0.0 {
        body.insert("frequency_penalty".into(), json!(p.frequency_penalty));
    }
    if let Some(seed) = p.seed {
        body.insert("seed".into(), json!(seed));
    }
    if !p.stop.is_empty() {
        body.insert("stop".into(), json!(p.stop));
    }
    if p.ignore_eos {
        body.insert("ignore_eos".into(), json!(true));
    }
    if p.min_tokens > 0 {
        body.insert("min_tokens".into(), json!(p.min_tokens));
    }
    if !p.logit_bias.is_empty() {
        let bias: Map<String, Value> = p
            .logit_bias
            .iter()
            .map(|(t, b)| (t.to_string(), json!(b)))
            .collect();
        body.insert("logit_bias".into(), Value::Object(bias));
    }
    match &p.constraint {
        None => {}
        Some(Constraint::JsonSchema(schema)) => {
            body.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": true}}),
            );
            // llama-server reads `response_format` on chat only; on
            // completions it takes its own `json_schema`.
            if path == "/v1/completions" {
                body.insert("json_schema".into(), schema.clone());
            }
        }
        Some(Constraint::Gbnf(g)) => {
            body.insert("grammar".into(), json!(g));
        }
        Some(other) => {
            return Err(RequestError::Constraint(format!(
                "an upstream worker takes JSON schemas and GBNF grammars, not a {}",
                other.kind()
            )));
        }
    }
    Ok((path, Value::Object(body).to_string()))
}

/// One streamed chunk, as far as it matters here.
#[derive(Debug, Default, PartialEq)]
pub struct Chunk {
    pub text: String,
    pub finish: Option<FinishReason>,
    pub prompt_tokens: Option<usize>,
    pub completion_tokens: Option<usize>,
    pub cached_tokens: Option<usize>,
}

/// Reads one `data:` payload (not `[DONE]`). An `error` object in the
/// stream is the upstream's failure, in its words.
pub fn parse_chunk(data: &str) -> Result<Chunk, String> {
    let v: Value =
        serde_json::from_str(data).map_err(|e| format!("a malformed event from upstream: {e}"))?;
    if let Some(err) = v.get("error") {
        return Err(error_message(err));
    }
    let mut chunk = Chunk::default();
    if let Some(choice) = v.get("choices").and_then(|c| c.get(0)) {
        let text = choice
            .get("delta")
            .and_then(|d| d.get("content"))
            .or_else(|| choice.get("text"))
            .and_then(Value::as_str);
        chunk.text = text.unwrap_or("").to_owned();
        chunk.finish = choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(|r| match r {
                "length" => FinishReason::Length,
                _ => FinishReason::Eos,
            });
    }
    if let Some(usage) = v.get("usage").filter(|u| u.is_object()) {
        let n = |u: &Value, k: &str| u.get(k).and_then(Value::as_u64).map(|n| n as usize);
        chunk.prompt_tokens = n(usage, "prompt_tokens");
        chunk.completion_tokens = n(usage, "completion_tokens");
        chunk.cached_tokens = usage
            .get("prompt_tokens_details")
            .and_then(|d| n(d, "cached_tokens"));
    }
    if chunk.cached_tokens.is_none() {
        // llama-server's own counts.
        chunk.cached_tokens = v
            .get("timings")
            .and_then(|t| t.get("cache_n"))
            .and_then(Value::as_u64)
            .map(|n| n as usize);
    }
    Ok(chunk)
}

/// The message of an error body (`{"error": {"message": ...}}`, or TGI's
/// `{"error": "..."}`), or the body itself, shortened.
pub fn error_message(v: &Value) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Object(o) => match o.get("error") {
            Some(inner) => return error_message(inner),
            None => o
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| v.to_string(), str::to_owned),
        },
        other => other.to_string(),
    };
    text.chars().take(500).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{ChatMessage, Role, SamplingParams};

    fn req(input: PromptInput, params: SamplingParams) -> Request {
        Request::for_test(1, input, params)
    }

    #[test]
    fn prompts_and_conversations_go_to_their_routes() {
        let params = SamplingParams {
            seed: Some(7),
            stop: vec!["\n".into()],
            max_tokens: 9,
            ..SamplingParams::default()
        };
        let (path, body) = request_body(&req(PromptInput::Text("hi".into()), params), "m").unwrap();
        assert_eq!(path, "/v1/completions");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["prompt"], "hi");
        assert_eq!(v["model"], "m");
        assert_eq!(v["stream"], true);
        assert_eq!(v["max_tokens"], 9);
        assert_eq!(v["seed"], 7);
        assert_eq!(v["stop"], json!(["\n"]));
        assert!(v.get("repeat_penalty").is_none());
        let chat = PromptInput::Messages(vec![ChatMessage {
            role: Role::User,
            content: "hello".into(),
        }]);
        let params = SamplingParams {
            constraint: Some(Constraint::JsonSchema(json!({"type": "object"}))),
            ..SamplingParams::default()
        };
        let (path, body) = request_body(&req(chat.clone(), params), "").unwrap();
        assert_eq!(path, "/v1/chat/completions");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["messages"], json!([{"role": "user", "content": "hello"}]));
        assert_eq!(
            v["response_format"]["json_schema"]["schema"],
            json!({"type": "object"})
        );
        assert!(v.get("model").is_none());
        let params = SamplingParams {
            constraint: Some(Constraint::Regex("a+".into())),
            ..SamplingParams::default()
        };
        let err = request_body(&req(chat, params), "").unwrap_err();
        assert!(err.to_string().contains("not a regex"), "{err}");
    }

    #[test]
    fn chunks_of_both_routes_read_alike() {
        let chat = r#"{"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#;
        assert_eq!(parse_chunk(chat).unwrap().text, "Hel");
        let text = r#"{"choices":[{"index":0,"text":"lo","finish_reason":"length"}]}"#;
        let c = parse_chunk(text).unwrap();
        assert_eq!(
            (c.text.as_str(), c.finish),
            ("lo", Some(FinishReason::Length))
        );
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3},"timings":{"cache_n":4}}"#;
        let c = parse_chunk(usage).unwrap();
        assert_eq!(
            (c.prompt_tokens, c.completion_tokens, c.cached_tokens),
            (Some(5), Some(3), Some(4))
        );
        assert!(parse_chunk("{nope").unwrap_err().contains("malformed"));
        let err = r#"{"error":{"code":500,"message":"out of memory"}}"#;
        assert_eq!(parse_chunk(err).unwrap_err(), "out of memory");
        assert_eq!(
            error_message(&json!({"error": "TGI says no"})),
            "TGI says no"
        );
    }
}

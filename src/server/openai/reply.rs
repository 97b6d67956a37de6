//! The core's events as OpenAI's JSON: whole responses, and the chunks of a
//! stream as server-sent events.

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::Endpoint;
use crate::core::tools::ToolCall;
use crate::core::{FinishReason, Stats, TokenLogprobs};

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

    /// The response's id (`chatcmpl-...`).
    pub fn id(&self) -> &str {
        &self.id
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

    /// The first chunk of a reply that calls tools: every call whole.
    pub fn calls_chunk(&self, calls: &[ToolCall]) -> String {
        let delta =
            json!({"role": "assistant", "content": null, "tool_calls": tool_calls(calls, true)});
        let choice = json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": null});
        sse(&self.envelope(true, json!([choice])))
    }

    /// The whole response of a reply that calls tools, not streamed.
    pub fn complete_calls(&self, calls: &[ToolCall], stats: &Stats) -> String {
        let message =
            json!({"role": "assistant", "content": null, "tool_calls": tool_calls(calls, false)});
        let choice = json!({"index": 0, "message": message, "logprobs": null, "finish_reason": "tool_calls"});
        let mut body = self.envelope(false, json!([choice]));
        body["usage"] = usage(stats);
        body.to_string()
    }

    /// The last chunk: the finish reason (`finish_reason`, or
    /// `"tool_calls"`), then the usage if asked for.
    pub fn last_chunks(&self, finish: &str, stats: &Stats, usage: bool) -> String {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completions => {
                json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish})
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

/// Tool calls as OpenAI writes them (a stream's deltas carry their index).
fn tool_calls(calls: &[ToolCall], indexed: bool) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut call = json!({
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            });
            if indexed {
                call["index"] = json!(i);
            }
            call
        })
        .collect()
}

pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length | FinishReason::Deadline => "length",
        FinishReason::Eos | FinishReason::Stop | FinishReason::Abort => "stop",
    }
}

fn usage(s: &Stats) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
        "completion_tokens_details": {
            "accepted_prediction_tokens": s.accepted_draft_tokens,
            "rejected_prediction_tokens": s.draft_tokens - s.accepted_draft_tokens,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Candidate;

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
            draft_tokens: 4,
            accepted_draft_tokens: 1,
            ..Stats::default()
        };
        let end = data(&r.last_chunks(finish_reason(FinishReason::Length), &stats, true));
        assert_eq!(end[0]["choices"][0]["finish_reason"], "length");
        assert_eq!(end[1]["choices"], json!([]));
        assert_eq!(end[1]["usage"]["total_tokens"], 8);
        assert_eq!(end[1]["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
        let details = &end[1]["usage"]["completion_tokens_details"];
        assert_eq!(details["accepted_prediction_tokens"], 1);
        assert_eq!(details["rejected_prediction_tokens"], 3);
        assert_eq!(end[2], "[DONE]");
        assert_eq!(
            data(&r.last_chunks(finish_reason(FinishReason::Eos), &stats, false)).len(),
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
}

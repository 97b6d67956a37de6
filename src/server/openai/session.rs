//! One OpenAI API request (`/v1/chat/completions`, `/v1/completions`) as a
//! session: its body becomes a core request; the engine's events become one
//! JSON response, or server-sent events as the tokens are sampled. The
//! stream's head waits for the first token, so a request refused before it
//! (queue full, prompt too long) still gets its HTTP status.

use crate::core::tools::{self, Answer, ToolCall};
use crate::core::{Event, TokenLogprobs};
use crate::server::http::Response;
use crate::server::openai::{self, ApiRequest, Endpoint, Reply, reply};
use crate::server::session::{Api, Host, Message, Outbox, Session};

pub struct OpenAi {
    endpoint: Endpoint,
    body: Vec<u8>,
    /// Set once the request is submitted.
    live: Option<Live>,
}

struct Live {
    reply: Reply,
    stream: bool,
    include_usage: bool,
    /// The reply is tools' JSON: kept whole and read at the end...
    tools: bool,
    /// ...except the text of an answer in words, streamed as it comes:
    /// what of it was sent.
    answered: String,
    /// The stream's head has been sent.
    started: bool,
    /// Text and log-probabilities so far (not streaming), or not yet sent
    /// (streaming: log-probabilities of tokens whose text is held back).
    text: String,
    logprobs: Vec<TokenLogprobs>,
}

impl OpenAi {
    pub fn new(endpoint: Endpoint, body: Vec<u8>) -> OpenAi {
        OpenAi {
            endpoint,
            body,
            live: None,
        }
    }
}

impl Session for OpenAi {
    fn api(&self) -> Api {
        Api::OpenAi
    }

    fn opened(&mut self, host: &mut dyn Host, out: &mut Outbox) {
        let body = std::mem::take(&mut self.body);
        let ApiRequest {
            endpoint,
            model,
            spec,
            stream,
            include_usage,
            tools,
        } = match openai::parse(self.endpoint, &body, host.defaults()) {
            Ok(r) => r,
            Err(e) => {
                return out.respond(Response::api_error(
                    400,
                    Some("bad_request"),
                    e.param.as_deref(),
                    &e.message,
                ));
            }
        };
        let ours = host.info().model;
        if let Some(asked) = model
            && !openai::is_our_model(&asked, &ours)
        {
            return out.respond(Response::api_error(
                404,
                Some("model_not_found"),
                Some("model"),
                &format!("the model {asked:?} does not exist: this server serves {ours:?}"),
            ));
        }
        let id = match host.submit(None, spec) {
            Ok(id) => id,
            Err(e) => return out.respond(Response::for_code(e.code(), None, &e.to_string())),
        };
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        let created = openai::unix_now();
        self.live = Some(Live {
            reply: Reply::new(
                endpoint,
                format!("{prefix}-{created:x}-{id}"),
                created,
                ours,
            ),
            stream,
            include_usage,
            tools,
            answered: String::new(),
            started: false,
            text: String::new(),
            logprobs: Vec::new(),
        });
    }

    fn on_message(&mut self, _msg: Message<'_>, _host: &mut dyn Host, _out: &mut Outbox) {}

    fn on_event(&mut self, _id: &str, event: &Event, out: &mut Outbox) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        match event {
            Event::Queued { .. } | Event::Tokens { .. } | Event::Stopped => {}
            Event::Token { text, logprobs, .. } => {
                live.logprobs.extend(logprobs.as_deref().cloned());
                if !live.stream || live.tools {
                    live.text.push_str(text);
                    if live.stream && live.tools {
                        live.stream_answer(out);
                    }
                    return;
                }
                // Log-probabilities of held-back tokens wait for their text.
                if text.is_empty() && live.started {
                    return;
                }
                let first = live.start(out);
                out.stream(live.reply.chunk(text, &live.logprobs, first));
                live.logprobs.clear();
            }
            Event::End { stats, .. } if live.tools => {
                let ids = live.reply.id().trim_start_matches("chatcmpl-");
                let calls: Vec<ToolCall> = match tools::parse_answer(&live.text, ids) {
                    Some(Answer::Calls(calls)) => calls,
                    Some(Answer::Text(text)) => {
                        live.text = text;
                        Vec::new()
                    }
                    // Cut short (`max_tokens`): the JSON as it is.
                    None => Vec::new(),
                };
                if calls.is_empty() {
                    live.tools = false;
                    // What of an answer was not streamed yet.
                    let rest = live
                        .text
                        .strip_prefix(live.answered.as_str())
                        .unwrap_or_default()
                        .to_owned();
                    if live.stream && !rest.is_empty() {
                        let first = live.start(out);
                        out.stream(live.reply.chunk(&rest, &live.logprobs, first));
                        live.logprobs.clear();
                    }
                    return self.on_event(_id, event, out);
                }
                if live.stream {
                    live.start(out);
                    out.stream(live.reply.calls_chunk(&calls));
                    out.stream(
                        live.reply
                            .last_chunks("tool_calls", stats, live.include_usage),
                    );
                    out.end_stream();
                } else {
                    let body = live.reply.complete_calls(&calls, stats);
                    out.respond(Response::new(200, "application/json", body));
                }
            }
            Event::End { reason, stats, .. } => {
                if live.stream {
                    live.start(out);
                    if !live.logprobs.is_empty() {
                        out.stream(live.reply.chunk("", &live.logprobs, false));
                    }
                    let finish = reply::finish_reason(*reason);
                    out.stream(live.reply.last_chunks(finish, stats, live.include_usage));
                    out.end_stream();
                } else {
                    let body = live
                        .reply
                        .complete(&live.text, &live.logprobs, *reason, stats);
                    out.respond(Response::new(200, "application/json", body));
                }
            }
            Event::Error { error, .. } => {
                let response = Response::for_code(error.code(), None, &error.to_string());
                if live.started {
                    out.stream(format!("data: {}\n\n", response.body.trim_end()));
                    out.end_stream();
                } else {
                    out.respond(response);
                }
            }
        }
    }
}

impl Live {
    /// Streams what is new of an answer in words (`{"response": "..."}`)
    /// under `tool_choice` auto; calls wait for the end.
    fn stream_answer(&mut self, out: &mut Outbox) {
        let Some(so_far) = tools::partial_answer(&self.text) else {
            return;
        };
        let Some(new) = so_far
            .strip_prefix(self.answered.as_str())
            .filter(|n| !n.is_empty())
        else {
            return;
        };
        let first = self.start(out);
        out.stream(self.reply.chunk(new, &[], first));
        self.answered = so_far;
    }

    /// Sends the stream's head if it is not out yet; returns whether it was
    /// just sent (the next chunk is the first).
    fn start(&mut self, out: &mut Outbox) -> bool {
        if self.started {
            return false;
        }
        self.started = true;
        out.start_stream(
            Response::new(200, "text/event-stream", "").with_header("X-Accel-Buffering", "no"),
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{FinishReason, RequestError, Stats};
    use crate::server::session::Out;
    use crate::server::session::testing::FakeHost;

    fn token(text: &str) -> Event {
        Event::Token {
            key: 1,
            text: text.into(),
            prob: 0.5,
            logprobs: None,
        }
    }

    fn end() -> Event {
        Event::End {
            key: 1,
            reason: FinishReason::Length,
            stats: Stats {
                prompt_tokens: 3,
                completion_tokens: 2,
                ..Stats::default()
            },
        }
    }

    fn open(body: &str) -> (OpenAi, FakeHost, Outbox) {
        let mut host = FakeHost::default();
        let mut out = Outbox::default();
        let mut s = OpenAi::new(Endpoint::Chat, body.as_bytes().to_vec());
        s.opened(&mut host, &mut out);
        (s, host, out)
    }

    #[test]
    fn a_stream_starts_with_its_first_token_and_ends_with_done() {
        let (mut s, host, mut out) =
            open(r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#);
        assert_eq!(host.submitted.len(), 1);
        assert!(out.items().is_empty(), "nothing before the first token");
        s.on_event("req-1", &token("A"), &mut out);
        s.on_event("req-1", &token("B"), &mut out);
        s.on_event("req-1", &end(), &mut out);
        let items = out.items();
        assert!(matches!(&items[0], Out::StreamStart(r) if r.content_type == "text/event-stream"));
        let Out::StreamData(first) = &items[1] else {
            panic!("{items:?}")
        };
        assert!(first.contains(r#""role":"assistant""#) && first.contains(r#""content":"A""#));
        assert!(matches!(&items[2], Out::StreamData(d) if !d.contains("role")));
        assert!(matches!(&items[3], Out::StreamData(d) if d.ends_with("data: [DONE]\n\n")));
        assert_eq!(items[4], Out::StreamEnd);
    }

    #[test]
    fn with_tools_an_answer_streams_as_it_comes_and_calls_come_whole_at_the_end() {
        let tools = r#""tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]"#;
        let body =
            format!(r#"{{"stream":true,"messages":[{{"role":"user","content":"Hi"}}],{tools}}}"#);
        let (mut s, _, mut out) = open(&body);
        for piece in [r#"{"resp"#, r#"onse": "He"#, r#"llo \"#, r#"" you"}"#] {
            s.on_event("req-1", &token(piece), &mut out);
        }
        s.on_event("req-1", &end(), &mut out);
        let texts: Vec<String> = out
            .items()
            .iter()
            .filter_map(|i| match i {
                Out::StreamData(d) => Some(d.clone()),
                _ => None,
            })
            .flat_map(|d| sse_contents(&d))
            .collect();
        assert_eq!(texts.concat(), "Hello \" you", "{:?}", out.items());
        assert_eq!(texts[0], "He", "streamed before the end: {texts:?}");
        let (mut s, _, mut out) = open(&body);
        s.on_event(
            "req-1",
            &token(r#"{"tool_calls": [{"name": "f", "arguments": {}}]}"#),
            &mut out,
        );
        assert!(out.items().is_empty(), "a call waits for the end");
        s.on_event("req-1", &end(), &mut out);
        let all: String = out
            .items()
            .iter()
            .filter_map(|i| match i {
                Out::StreamData(d) => Some(d.clone()),
                _ => None,
            })
            .collect();
        assert!(all.contains(r#""tool_calls""#) && all.contains(r#""finish_reason":"tool_calls""#));
    }

    /// The `delta.content` of each chunk in server-sent events.
    fn sse_contents(data: &str) -> Vec<String> {
        data.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|j| serde_json::from_str::<serde_json::Value>(j).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .filter(|c| !c.is_empty())
            .collect()
    }

    #[test]
    fn without_stream_one_response_carries_the_text_and_usage() {
        let (mut s, _, mut out) = open(r#"{"messages":[{"role":"user","content":"Hi"}]}"#);
        s.on_event("req-1", &token("A"), &mut out);
        s.on_event("req-1", &token("B"), &mut out);
        assert!(out.items().is_empty());
        s.on_event("req-1", &end(), &mut out);
        let Out::Http(r) = &out.items()[0] else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "AB");
        assert_eq!(v["usage"]["completion_tokens"], 2);
    }

    #[test]
    fn refusals_before_the_first_token_keep_their_status() {
        let (_, host, out) =
            open(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}"#);
        assert!(host.submitted.is_empty());
        assert!(
            matches!(&out.items()[0], Out::Http(r) if r.status == 404 && r.body.contains("model_not_found"))
        );
        let (_, _, out) =
            open(r#"{"messages":[{"role":"user","content":"Hi"}],"temperature":"x"}"#);
        assert!(
            matches!(&out.items()[0], Out::Http(r) if r.status == 400 && r.body.contains(r#""param":"temperature""#))
        );

        let (mut s, _, mut out) =
            open(r#"{"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#);
        let full = Event::Error {
            key: 1,
            error: RequestError::QueueFull { waiting: 3 },
        };
        s.on_event("req-1", &full, &mut out);
        assert!(matches!(&out.items()[0], Out::Http(r) if r.status == 429));
        // After the head, an error is an event and the stream ends.
        let (mut s, _, mut out) =
            open(r#"{"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#);
        s.on_event("req-1", &token("A"), &mut out);
        s.on_event(
            "req-1",
            &Event::Error {
                key: 1,
                error: RequestError::ShuttingDown,
            },
            &mut out,
        );
        let items = out.items();
        assert!(matches!(&items[2], Out::StreamData(d) if d.starts_with("data: {\"error\"")));
        assert_eq!(items[3], Out::StreamEnd);
    }
}

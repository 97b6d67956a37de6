//! The WebSocket protocol v1 session: JSON text frames in (`infer`, `abort`,
//! `status`), events out (`hello`, `queued`, `token`, `end`, `error`,
//! `status`). See docs/protocol.md.

use std::collections::HashMap;

use crate::core::tools::{self, Answer};
use crate::core::{ErrorCode, Event, RequestKind, RequestSpec, Truncate};
use crate::server::messages::{Hello, Limits, ServerMsg, WireToolCall};
use crate::server::protocol::{self, ClientMsg};
use crate::server::requests::Refused;
use crate::server::session::{Api, Host, Message, Outbox, Session, SubmitError};

#[derive(Debug, Default)]
pub struct WsV1 {
    /// The text so far of requests offered tools, by id: read at their end.
    tool_replies: HashMap<String, String>,
}

impl Session for WsV1 {
    fn api(&self) -> Api {
        Api::Ws
    }

    fn opened(&mut self, host: &mut dyn Host, out: &mut Outbox) {
        let info = host.info();
        let hello = Hello {
            protocol: protocol::VERSION,
            status: if info.parked { "parked" } else { "ready" },
            model: &info.model,
            n_ctx: info.n_ctx,
            version: env!("CARGO_PKG_VERSION"),
            chat: info.chat,
            limits: Limits {
                max_inflight: info.max_inflight,
                max_prompt_tokens: match info.max_prompt_tokens {
                    0 => info.n_ctx.saturating_sub(1),
                    n => n.min(info.n_ctx.saturating_sub(1)),
                },
                max_tokens: info.n_ctx.saturating_sub(1),
                default_max_tokens: info.defaults.max_tokens,
                max_stop_strings: crate::core::MAX_STOP_STRINGS,
                max_stop_bytes: crate::core::MAX_STOP_LEN,
                max_message_bytes: info.max_message_bytes,
            },
        };
        out.push(ServerMsg::Hello(&hello).to_json());
    }

    fn on_message(&mut self, msg: Message<'_>, host: &mut dyn Host, out: &mut Outbox) {
        let text = match msg {
            Message::Text(text) => text,
            Message::Binary(_) => {
                out.push(ServerMsg::error(
                    None,
                    ErrorCode::BadRequest,
                    "binary frames are not supported: send JSON text frames",
                ));
                return;
            }
            Message::TooLarge(why) => {
                let message = format!("message rejected: {why}");
                out.push(ServerMsg::error(None, ErrorCode::BadRequest, &message));
                return;
            }
        };
        match protocol::parse(text, host.defaults()) {
            Ok(ClientMsg::Infer(req)) => {
                let spec = RequestSpec {
                    input: req.input,
                    params: req.params,
                    kind: RequestKind::Generate,
                    truncate: req.truncate,
                    urgency: req.urgency,
                };
                match host.submit(req.id.as_deref(), spec) {
                    Ok(id) if req.tools => {
                        self.tool_replies.insert(id, String::new());
                    }
                    Ok(_) => {}
                    Err(e) => out.push(refusal(req.id.as_deref(), e)),
                }
            }
            Ok(ClientMsg::Tokenize { id, input }) => {
                let spec = RequestSpec {
                    input,
                    params: host.defaults().clone(),
                    kind: RequestKind::CountTokens,
                    truncate: Truncate::None,
                    urgency: Default::default(),
                };
                if let Err(e) = host.submit(id.as_deref(), spec) {
                    out.push(refusal(id.as_deref(), e));
                }
            }
            Ok(ClientMsg::Abort { id }) => host.abort(id.as_deref()),
            Ok(ClientMsg::Status) => {
                let status = (&host.status()).into();
                out.push(ServerMsg::Status(&status).to_json())
            }
            // An error with an id ends that request for the client: one
            // about a request in flight says its id in words only.
            Err(e) => match e.id.as_deref() {
                Some(id) if host.in_flight(id) => {
                    let message = format!("{} (about id {id:?}, which goes on)", e.message);
                    out.push(ServerMsg::error(None, e.code, &message))
                }
                id => out.push(ServerMsg::error(id, e.code, &e.message)),
            },
        }
    }

    fn on_event(&mut self, id: &str, event: &Event, out: &mut Outbox) {
        let json = match event {
            Event::Queued { position, .. } => ServerMsg::Queued {
                id,
                position: *position,
            }
            .to_json(),
            Event::Token {
                text,
                prob,
                logprobs,
                ..
            } => {
                if let Some(reply) = self.tool_replies.get_mut(id) {
                    reply.push_str(text);
                }
                ServerMsg::Token {
                    id,
                    content: text,
                    prob: *prob,
                    logprobs: logprobs.as_deref().map(Into::into),
                }
                .to_json()
            }
            Event::End { reason, stats, .. } => {
                let answer = self
                    .tool_replies
                    .remove(id)
                    .and_then(|text| tools::parse_answer(&text, id));
                let (content, tool_calls) = match answer {
                    Some(Answer::Text(text)) => (Some(text), None),
                    Some(Answer::Calls(calls)) => (
                        None,
                        Some(calls.into_iter().map(WireToolCall::from).collect()),
                    ),
                    None => (None, None),
                };
                ServerMsg::End {
                    id,
                    reason: if tool_calls.is_some() {
                        "tool_calls"
                    } else {
                        reason.as_str()
                    },
                    stats: stats.into(),
                    content: content.as_deref(),
                    tool_calls,
                }
                .to_json()
            }
            Event::Tokens { count, .. } => ServerMsg::Tokens { id, count: *count }.to_json(),
            Event::Error { error, .. } => {
                self.tool_replies.remove(id);
                ServerMsg::error(Some(id), error.code(), &error.to_string())
            }
            Event::Stopped => return,
        };
        out.push(json);
    }
}

/// The error for a request the server would not start. A duplicate id is
/// answered without an id: the live request of that id must not look ended.
fn refusal(id: Option<&str>, e: SubmitError) -> String {
    match e {
        SubmitError::Refused(Refused::Duplicate) => {
            let message = format!(
                "a request with id {:?} is already in flight on this connection: this one is refused, that one goes on",
                id.unwrap_or_default()
            );
            ServerMsg::error(None, e.code(), &message)
        }
        _ => ServerMsg::error(id, e.code(), &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::core::{FinishReason, PromptInput, RequestError, SamplingParams, Stats};
    use crate::server::session::testing::FakeHost;

    fn send(host: &mut FakeHost, msg: Value) -> Vec<Value> {
        let mut out = Outbox::default();
        WsV1::default().on_message(Message::Text(&msg.to_string()), host, &mut out);
        out.texts()
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect()
    }

    #[test]
    fn hello_says_what_the_server_can_do() {
        let mut out = Outbox::default();
        WsV1::default().opened(&mut FakeHost::default(), &mut out);
        let hello: Value = serde_json::from_str(out.texts()[0]).unwrap();
        assert_eq!(hello["op"], "hello");
        assert_eq!(hello["protocol"], 1);
        assert_eq!(hello["status"], "parked");
        assert_eq!(hello["chat"], true);
        assert_eq!(hello["limits"]["max_inflight"], 8);
        assert_eq!(hello["limits"]["max_prompt_tokens"], 4095);
        assert_eq!(hello["limits"]["max_stop_strings"], 16);
    }

    #[test]
    fn infer_becomes_a_core_request_over_the_defaults() {
        let mut host = FakeHost::default();
        let out = send(
            &mut host,
            json!({"op":"infer","id":"a","prompt":"Hi","params":{"temperature":0}}),
        );
        assert!(out.is_empty(), "{out:?}");
        let (id, spec) = &host.submitted[0];
        assert_eq!(id.as_deref(), Some("a"));
        assert_eq!(spec.input, PromptInput::Text("Hi".into()));
        assert_eq!(spec.params.temp, 0.0);
        assert_eq!(spec.params.max_tokens, SamplingParams::default().max_tokens);
        assert_eq!(
            (spec.kind, spec.truncate),
            (RequestKind::Generate, Truncate::None)
        );
    }

    #[test]
    fn a_reply_to_tools_ends_with_its_calls_or_its_answer() {
        let mut host = FakeHost::default();
        let mut s = WsV1::default();
        let mut out = Outbox::default();
        let tool = json!({"name": "f", "parameters": {"type": "object"}});
        for (id, choice) in [("c", "required"), ("a", "auto")] {
            let msg = json!({"op": "infer", "id": id, "messages": [{"role": "user", "content": "x"}],
                "tools": [tool], "tool_choice": choice});
            s.on_message(Message::Text(&msg.to_string()), &mut host, &mut out);
        }
        let (_, spec) = &host.submitted[0];
        assert!(matches!(
            spec.params.constraint,
            Some(crate::core::Constraint::JsonSchema(_))
        ));
        let token = |text: &str| Event::Token {
            key: 1,
            text: text.into(),
            prob: 0.5,
            logprobs: None,
        };
        let end = Event::End {
            key: 1,
            reason: FinishReason::Eos,
            stats: Stats::default(),
        };
        s.on_event("c", &token(r#"{"tool_calls": [{"name": "f", "#), &mut out);
        s.on_event("c", &token(r#""arguments": {"x": 1}}]}"#), &mut out);
        s.on_event("c", &end, &mut out);
        s.on_event("a", &token(r#"{"response": "hi"}"#), &mut out);
        s.on_event("a", &end, &mut out);
        let texts: Vec<Value> = out
            .texts()
            .iter()
            .map(|t| serde_json::from_str(t).unwrap())
            .collect();
        let ends: Vec<&Value> = texts.iter().filter(|m| m["op"] == "end").collect();
        assert_eq!(ends[0]["reason"], "tool_calls");
        assert_eq!(
            ends[0]["tool_calls"],
            json!([{"id": "call_c_0", "name": "f", "arguments": {"x": 1}}])
        );
        assert_eq!(
            (ends[1]["reason"].as_str(), ends[1]["content"].as_str()),
            (Some("eos"), Some("hi"))
        );
        assert!(s.tool_replies.is_empty());
        // Refused: tools with a prompt, a constraint beside them, a bad choice.
        for bad in [
            json!({"op": "infer", "prompt": "x", "tools": [tool]}),
            json!({"op": "infer", "messages": [{"role": "user", "content": "x"}], "tools": [tool],
                "params": {"regex": "a"}}),
            json!({"op": "infer", "messages": [{"role": "user", "content": "x"}], "tools": [tool],
                "tool_choice": {"name": "g"}}),
            json!({"op": "infer", "messages": [{"role": "user", "tool_calls": []}]}),
        ] {
            let out = send(&mut host, bad.clone());
            assert_eq!(out[0]["code"], "bad_request", "{bad}: {out:?}");
        }
    }

    #[test]
    fn tokenize_is_a_request_whose_answer_is_a_count() {
        let mut host = FakeHost::default();
        assert!(send(&mut host, json!({"op":"tokenize","id":"t","prompt":"Hi"})).is_empty());
        assert_eq!(host.submitted[0].1.kind, RequestKind::CountTokens);
        let mut out = Outbox::default();
        WsV1::default().on_event("t", &Event::Tokens { key: 1, count: 3 }, &mut out);
        assert_eq!(out.texts(), [r#"{"op":"tokens","id":"t","count":3}"#]);
    }

    #[test]
    fn a_duplicate_is_refused_without_the_live_id() {
        let mut host = FakeHost {
            refuse: Some(SubmitError::Refused(Refused::Duplicate)),
            ..FakeHost::default()
        };
        let out = send(&mut host, json!({"op":"infer","id":"a","prompt":"Hi"}));
        assert_eq!(out[0]["op"], "error");
        assert_eq!(out[0]["id"], Value::Null);
        assert!(out[0]["message"].as_str().unwrap().contains("\"a\""));
        host.refuse = Some(SubmitError::Refused(Refused::TooMany(8)));
        let out = send(&mut host, json!({"op":"infer","id":"b","prompt":"Hi"}));
        assert_eq!(
            (&out[0]["id"], &out[0]["code"]),
            (&json!("b"), &json!("overloaded"))
        );
    }

    #[test]
    fn a_bad_message_about_a_live_request_does_not_end_it() {
        let mut host = FakeHost::default();
        assert!(send(&mut host, json!({"op":"infer","id":"r1","prompt":"Hi"})).is_empty());
        let out = send(&mut host, json!({"op":"abort","id":"r1","x":1}));
        assert_eq!(out[0]["op"], "error");
        assert_eq!(out[0]["id"], Value::Null);
        assert!(
            out[0]["message"].as_str().unwrap().contains("\"r1\""),
            "{}",
            out[0]
        );
        // About an id not in flight, the error carries it.
        let out = send(&mut host, json!({"op":"abort","id":"r2","x":1}));
        assert_eq!(out[0]["id"], "r2");
    }

    #[test]
    fn abort_is_passed_on_and_answers_nothing() {
        let mut host = FakeHost::default();
        assert!(send(&mut host, json!({"op":"abort","id":"zzz"})).is_empty());
        assert!(send(&mut host, json!({"op":"abort"})).is_empty());
        assert_eq!(host.aborted, [Some("zzz".to_owned()), None]);
    }

    #[test]
    fn bad_input_gets_an_error_and_status_a_snapshot() {
        let mut host = FakeHost::default();
        let out = send(&mut host, json!({"op":"infer","id":"q","prompt":""}));
        assert_eq!(
            (&out[0]["id"], &out[0]["code"]),
            (&json!("q"), &json!("bad_request"))
        );
        let mut out = Outbox::default();
        WsV1::default().on_message(Message::Binary(b"x"), &mut host, &mut out);
        assert!(out.texts()[0].contains("binary frames"));
        let out = send(&mut host, json!({"op":"status"}));
        assert_eq!(out[0]["slots"], 4);
        assert!(host.submitted.is_empty());
    }

    #[test]
    fn engine_events_become_v1_messages() {
        let mut out = Outbox::default();
        let mut s = WsV1::default();
        s.on_event(
            "r",
            &Event::Queued {
                key: 1,
                position: 2,
            },
            &mut out,
        );
        s.on_event(
            "r",
            &Event::Token {
                key: 1,
                text: " hi".into(),
                prob: 0.5,
                logprobs: None,
            },
            &mut out,
        );
        s.on_event(
            "r",
            &Event::End {
                key: 1,
                reason: FinishReason::Length,
                stats: Stats::default(),
            },
            &mut out,
        );
        s.on_event(
            "r",
            &Event::Error {
                key: 1,
                error: RequestError::QueueFull { waiting: 3 },
            },
            &mut out,
        );
        let v: Vec<Value> = out
            .texts()
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect();
        assert_eq!(v[0], json!({"op":"queued","id":"r","position":2}));
        assert_eq!(
            v[1],
            json!({"op":"token","id":"r","content":" hi","prob":0.5})
        );
        assert_eq!(
            (&v[2]["op"], &v[2]["reason"]),
            (&json!("end"), &json!("length"))
        );
        assert_eq!(v[3]["code"], "overloaded");
        assert!(v[3]["message"].as_str().unwrap().contains("3 requests"));
    }
}

//! `POST /tokenize` on the plain-HTTP side: the body is `{"prompt": "..."}`
//! or `{"messages": [...]}`, the answer `{"count": N}` once the engine has
//! counted (after the chat template, as a request would use them). A session
//! like the WebSocket one, whose whole output is one HTTP response.

use crate::core::{ErrorCode, Event, RequestKind, RequestSpec, Truncate};
use crate::server::http::Response;
use crate::server::protocol;
use crate::server::session::{Api, Host, Message, Outbox, Session};

pub struct Tokenize {
    body: Vec<u8>,
}

impl Tokenize {
    pub fn new(body: Vec<u8>) -> Tokenize {
        Tokenize { body }
    }
}

fn error(code: ErrorCode, message: &str) -> Response {
    Response::for_code(code, None, message)
}

impl Session for Tokenize {
    fn api(&self) -> Api {
        Api::Http
    }

    fn opened(&mut self, host: &mut dyn Host, out: &mut Outbox) {
        let input = match protocol::parse_tokenize_body(&self.body) {
            Ok(input) => input,
            Err(message) => return out.respond(error(ErrorCode::BadRequest, &message)),
        };
        let spec = RequestSpec {
            input,
            params: host.defaults().clone(),
            kind: RequestKind::CountTokens,
            truncate: Truncate::None,
            urgency: Default::default(),
        };
        if let Err(e) = host.submit(None, spec) {
            out.respond(error(e.code(), &e.to_string()));
        }
    }

    fn on_message(&mut self, _msg: Message<'_>, _host: &mut dyn Host, _out: &mut Outbox) {}

    fn on_event(&mut self, _id: &str, event: &Event, out: &mut Outbox) {
        match event {
            Event::Tokens { count, .. } => {
                out.respond(Response::json(200, &format!(r#"{{"count":{count}}}"#)))
            }
            Event::Error { error: e, .. } => out.respond(error(e.code(), &e.to_string())),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{PromptInput, RequestError};
    use crate::server::session::Out;
    use crate::server::session::testing::FakeHost;

    fn response(out: &Outbox) -> (u16, String) {
        match &out.items()[0] {
            Out::Http(r) => (r.status, r.body.clone()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_body_becomes_a_count_request_and_the_count_a_200() {
        let mut host = FakeHost::default();
        let mut out = Outbox::default();
        let mut s = Tokenize::new(br#"{"prompt":"Hi"}"#.to_vec());
        s.opened(&mut host, &mut out);
        assert!(out.items().is_empty());
        assert_eq!(host.submitted[0].1.kind, RequestKind::CountTokens);
        assert_eq!(host.submitted[0].1.input, PromptInput::Text("Hi".into()));
        s.on_event("req-1", &Event::Tokens { key: 1, count: 5 }, &mut out);
        assert_eq!(response(&out), (200, "{\"count\":5}\n".into()));
    }

    #[test]
    fn bad_bodies_and_failures_are_json_errors_with_their_status() {
        for body in [
            &b"{oops"[..],
            br#"{"prompt":""}"#,
            br#"{"prompt":"a","x":1}"#,
            b"\xff",
        ] {
            let mut out = Outbox::default();
            Tokenize::new(body.to_vec()).opened(&mut FakeHost::default(), &mut out);
            let (status, text) = response(&out);
            assert_eq!(status, 400, "{text}");
            assert!(text.contains(r#""code":"bad_request""#), "{text}");
        }
        let mut out = Outbox::default();
        let failed = Event::Error {
            key: 1,
            error: RequestError::NoChatTemplate,
        };
        Tokenize::new(Vec::new()).on_event("req-1", &failed, &mut out);
        assert_eq!(response(&out).0, 400);
    }
}

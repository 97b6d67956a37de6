//! Plain HTTP on the WebSocket port: responses, the page, health, metrics,
//! CORS preflights, and the answers for requests the server will not take
//! (404, 405, 426, 431, 503), every error in one JSON shape.

use crate::core::ErrorCode;
use crate::http1;

/// The page served at `GET /`: one self-contained file, no build step.
const PAGE: &str = include_str!("page.html");

/// The WebSocket version we speak (RFC 6455).
pub const WS_VERSION: &str = "13";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    pub fn json(status: u16, body: &str) -> Response {
        Response::new(status, "application/json", format!("{body}\n"))
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// An error in the shape every route uses (OpenAI's): `{"error":
    /// {"message","type","param","code"}}`, `type` following the status.
    pub fn error(status: u16, message: &str) -> Response {
        Response::api_error(status, None, None, message)
    }

    /// An error with a machine-readable `code` and the `param` at fault.
    pub fn api_error(
        status: u16,
        code: Option<&str>,
        param: Option<&str>,
        message: &str,
    ) -> Response {
        let kind = match status {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            503 => "unavailable_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        let body = serde_json::json!({"error": {
            "message": message, "type": kind, "param": param, "code": code,
        }});
        let r = Response::json(status, &body.to_string());
        match status {
            401 => r.with_header("WWW-Authenticate", "Bearer"),
            429 | 503 => r.with_header("Retry-After", "1"),
            _ => r,
        }
    }

    /// An error of class `code` with the status that goes with it.
    pub fn for_code(code: ErrorCode, param: Option<&str>, message: &str) -> Response {
        let status = match code {
            ErrorCode::BadRequest | ErrorCode::ContextOverflow => 400,
            ErrorCode::Overloaded => 429,
            ErrorCode::ShuttingDown => 503,
            ErrorCode::Internal => 500,
        };
        Response::api_error(status, Some(code.as_str()), param, message)
    }

    pub fn unauthorized(message: &str) -> Response {
        Response::api_error(401, Some("invalid_api_key"), None, message)
    }

    pub fn too_many_connections() -> Response {
        Response::api_error(503, Some("overloaded"), None, "too many connections")
    }

    /// The answer to a WebSocket upgrade of a version we do not speak.
    pub fn upgrade_required() -> Response {
        Response::error(
            426,
            "unsupported WebSocket version: this server speaks version 13",
        )
        .with_header("Sec-WebSocket-Version", WS_VERSION)
    }

    /// The head alone: `length` `None` streams the body in chunks.
    pub fn head_bytes(
        &self,
        length: Option<usize>,
        keep_alive: bool,
        cors: Option<&str>,
    ) -> Vec<u8> {
        let mut headers: Vec<(&str, &str)> = vec![
            ("Content-Type", self.content_type),
            ("Cache-Control", "no-store"),
        ];
        headers.extend(self.headers.iter().map(|(n, v)| (*n, v.as_str())));
        if let Some(origin) = cors {
            headers.push(("Access-Control-Allow-Origin", origin));
            headers.push(("Vary", "Origin"));
        }
        http1::head_bytes(self.status, &headers, length, keep_alive)
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self, keep_alive: bool, cors: Option<&str>) -> Vec<u8> {
        let mut out = self.head_bytes(Some(self.body.len()), keep_alive, cors);
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

/// What `/health` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ready,
    /// Parked is healthy: the next request wakes the engine (docs/operations.md).
    Parked,
    /// Shutting down: 503, so a load balancer stops sending.
    Draining,
    /// Every worker of the pool is out of rotation: 503.
    Unavailable,
}

/// The headers a CORS preflight allows when it names none.
const ALLOW_HEADERS: &str = "Authorization, Content-Type";

/// Answers a plain request that no session serves; `metrics` renders
/// `/metrics` when asked. A CORS preflight is allowed the headers it asks
/// for (`Access-Control-Request-Headers`: the OpenAI SDKs send headers of
/// their own), whether its origin is allowed is the connection's to say.
pub fn route(
    method: &str,
    target: &str,
    request_headers: Option<&str>,
    health: Health,
    metrics: impl FnOnce() -> String,
) -> Response {
    let path = target.split('?').next().unwrap_or("");
    // HEAD is GET without the body (the connection leaves it out).
    let method = if method == "HEAD" { "GET" } else { method };
    match (method, path) {
        // A CORS preflight: the connection adds the origin if it is allowed.
        ("OPTIONS", _) => Response::new(204, "text/plain", "")
            .with_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            .with_header(
                "Access-Control-Allow-Headers",
                request_headers.unwrap_or(ALLOW_HEADERS),
            )
            .with_header("Access-Control-Max-Age", "600"),
        ("GET", "/health") => match health {
            Health::Draining => Response::json(503, r#"{"status":"draining"}"#),
            Health::Unavailable => Response::json(503, r#"{"status":"unavailable"}"#),
            Health::Parked => Response::json(200, r#"{"status":"parked"}"#),
            Health::Ready => Response::json(200, r#"{"status":"ready"}"#),
        },
        ("GET", "/metrics") => {
            Response::new(200, "text/plain; version=0.0.4; charset=utf-8", metrics())
        }
        ("GET", "/") => Response::new(200, "text/html; charset=utf-8", PAGE),
        // These are served by their sessions when the method is right.
        (_, "/tokenize" | "/v1/chat/completions" | "/v1/completions") => {
            Response::error(405, &format!("use POST for {path}"))
        }
        (_, "/v1/models" | "/" | "/health" | "/metrics") => {
            Response::error(405, &format!("use GET for {path}"))
        }
        ("GET" | "POST", _) => Response::error(404, &format!("no route {method} {path}")),
        _ => Response::error(405, &format!("method {method} not allowed")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &Response) -> String {
        String::from_utf8(r.to_bytes(false, None)).unwrap()
    }

    #[test]
    fn routes() {
        let none = || -> String { panic!("metrics not asked for") };
        assert_eq!(
            route("GET", "/health", None, Health::Ready, none).status,
            200
        );
        assert!(
            route("GET", "/health?x", None, Health::Parked, none)
                .body
                .contains("parked")
        );
        assert_eq!(
            route("GET", "/health", None, Health::Draining, none).status,
            503
        );
        assert_eq!(
            route("GET", "/metrics", None, Health::Ready, || "m 1".into()).body,
            "m 1"
        );
        assert!(
            route("GET", "/", None, Health::Ready, none)
                .body
                .contains("<html")
        );
        assert_eq!(route("GET", "/nope", None, Health::Ready, none).status, 404);
        assert_eq!(route("POST", "/", None, Health::Ready, none).status, 405);
        assert_eq!(
            route("GET", "/tokenize", None, Health::Ready, none).status,
            405
        );
        assert_eq!(
            route("OPTIONS", "/v1/models", None, Health::Ready, none).status,
            204
        );
        assert_eq!(route("PUT", "/", None, Health::Ready, none).status, 405);
    }

    #[test]
    fn the_wire_form_has_a_length_and_closes() {
        let t = text(&Response::new(200, "text/plain", "hi"));
        assert!(t.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(t.contains("\r\nContent-Length: 2\r\n") && t.contains("\r\nConnection: close\r\n"));
        assert!(t.ends_with("\r\n\r\nhi"));
        let t = text(&Response::upgrade_required());
        assert!(t.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(t.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{t}");
        let t = String::from_utf8(Response::error(429, "busy").to_bytes(true, Some("https://a")))
            .unwrap();
        assert!(
            t.contains("\r\nRetry-After: 1\r\n") && t.contains("Connection: keep-alive"),
            "{t}"
        );
        assert!(
            t.contains("\r\nAccess-Control-Allow-Origin: https://a\r\n"),
            "{t}"
        );
        let body = t.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["message"], "busy");
    }
}

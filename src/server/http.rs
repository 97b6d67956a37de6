//! Plain HTTP on the WebSocket port: the page, health, metrics, and the
//! answers for requests the server will not take (404, 405, 426, 431, 503).

/// The page served at `GET /`: one self-contained file, no build step.
const PAGE: &str = include_str!("page.html");

/// The WebSocket version we speak (RFC 6455).
pub const WS_VERSION: &str = "13";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    pub headers: Vec<(&'static str, &'static str)>,
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

    pub fn too_many_connections() -> Response {
        Response::json(503, r#"{"error":"too many connections"}"#)
    }

    /// The answer to a WebSocket upgrade of a version we do not speak.
    pub fn upgrade_required() -> Response {
        let mut r = Response::json(
            426,
            r#"{"error":"unsupported WebSocket version: this server speaks version 13"}"#,
        );
        r.headers.push(("Sec-WebSocket-Version", WS_VERSION));
        r
    }

    /// The bytes on the wire; the connection closes after them.
    pub fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            411 => "Length Required",
            413 => "Payload Too Large",
            426 => "Upgrade Required",
            429 => "Too Many Requests",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
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
}

/// Answers a plain (non-upgrade) request; `metrics` renders `/metrics` when asked.
pub fn route(
    method: &str,
    target: &str,
    health: Health,
    metrics: impl FnOnce() -> String,
) -> Response {
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/health") => match health {
            Health::Draining => Response::json(503, r#"{"status":"draining"}"#),
            Health::Parked => Response::json(200, r#"{"status":"parked"}"#),
            Health::Ready => Response::json(200, r#"{"status":"ready"}"#),
        },
        ("GET", "/metrics") => {
            Response::new(200, "text/plain; version=0.0.4; charset=utf-8", metrics())
        }
        ("GET", "/") => Response::new(200, "text/html; charset=utf-8", PAGE),
        // POST /tokenize is served by its session; other methods are not.
        (_, "/tokenize") => Response::json(405, r#"{"error":"use POST for /tokenize"}"#),
        ("GET", _) => Response::json(404, r#"{"error":"not found"}"#),
        _ => Response::json(405, r#"{"error":"method not allowed"}"#),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &Response) -> String {
        String::from_utf8(r.to_bytes()).unwrap()
    }

    #[test]
    fn routes() {
        let none = || -> String { panic!("metrics not asked for") };
        assert_eq!(route("GET", "/health", Health::Ready, none).status, 200);
        assert!(
            route("GET", "/health?x", Health::Parked, none)
                .body
                .contains("parked")
        );
        assert_eq!(route("GET", "/health", Health::Draining, none).status, 503);
        assert_eq!(
            route("GET", "/metrics", Health::Ready, || "m 1".into()).body,
            "m 1"
        );
        assert!(
            route("GET", "/", Health::Ready, none)
                .body
                .contains("<html")
        );
        assert_eq!(route("GET", "/nope", Health::Ready, none).status, 404);
        assert_eq!(route("POST", "/", Health::Ready, none).status, 405);
        assert_eq!(route("GET", "/tokenize", Health::Ready, none).status, 405);
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
    }
}

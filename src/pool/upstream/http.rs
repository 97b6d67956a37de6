//! The client side of one HTTP/1.1 exchange with an upstream, sans-I/O: the
//! request's bytes, then the response read as it arrives (head, then body
//! data: chunked, sized or until close) and, for a stream, its server-sent
//! events split into `data:` payloads.

use crate::http1::{BodyReader, Framing, HttpError};

/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest response body (a stream's total) accepted.
const MAX_BODY: usize = 64 << 20;
/// Longest server-sent event line.
const MAX_LINE: usize = 1 << 20;

/// An upstream's address as the config gives it: `http://host:port/base`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// The path before `/v1/...` (empty, or `/something` without a trailing `/`).
    pub base: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("invalid URL {url:?}: {e}"))?;
        match parsed.scheme() {
            "http" => {}
            "https" => {
                return Err(format!(
                    "{url}: https is not supported; reach the upstream over http (on a private network, or through a local TLS proxy)"
                ));
            }
            other => return Err(format!("{url}: unsupported scheme {other:?} (use http://)")),
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| format!("{url}: no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let mut base = parsed.path().trim_end_matches('/').to_owned();
        // `http://host:8000/v1` names the API root itself.
        if base.ends_with("/v1") {
            base.truncate(base.len() - 3);
        }
        Ok(Target {
            host,
            port: parsed.port_or_known_default().unwrap_or(80),
            base,
        })
    }

    /// The request's bytes: `POST` with a JSON body, or `GET` without one.
    pub fn request(&self, method: &str, path: &str, api_key: &str, body: Option<&str>) -> Vec<u8> {
        // An IPv6 literal goes in brackets (RFC 7230's Host is a URI authority).
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let mut out = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {host}:{}\r\nUser-Agent: inference-core\r\nAccept: {}\r\nConnection: close\r\n",
            self.base,
            self.port,
            if body.is_some() {
                "text/event-stream"
            } else {
                "application/json"
            }
        );
        if !api_key.is_empty() {
            out.push_str(&format!("Authorization: Bearer {api_key}\r\n"));
        }
        if let Some(body) = body {
            out.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if let Some(body) = body {
            bytes.extend_from_slice(body.as_bytes());
        }
        bytes
    }
}

#[derive(Debug)]
enum State {
    Head,
    Body(BodyReader),
    /// No length, not chunked: the body runs until the connection closes.
    UntilClose,
    Done,
}

/// One response, fed bytes as they are read.
#[derive(Debug)]
pub struct Response {
    state: State,
    buf: Vec<u8>,
    pub status: u16,
    /// Body data not yet taken.
    pub data: Vec<u8>,
}

impl Default for Response {
    fn default() -> Self {
        Response {
            state: State::Head,
            buf: Vec::new(),
            status: 0,
            data: Vec::new(),
        }
    }
}

impl Response {
    /// Consumes `bytes`: the head sets `status`, body data collects in
    /// `data`, and `is_done` says when the body is whole.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), HttpError> {
        self.buf.extend_from_slice(bytes);
        if matches!(self.state, State::Head) {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    self.status = resp.code.unwrap_or(0);
                    let header = |name: &str| {
                        resp.headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
                    };
                    self.state =
                        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
                            State::Body(BodyReader::new(Framing::Chunked, MAX_BODY))
                        } else if let Some(n) = header("content-length") {
                            let n = n
                                .parse::<usize>()
                                .map_err(|_| HttpError::Malformed("bad Content-Length"))?;
                            State::Body(BodyReader::new(Framing::Length(n.min(MAX_BODY)), MAX_BODY))
                        } else {
                            State::UntilClose
                        };
                    self.buf.drain(..len);
                }
                Ok(httparse::Status::Partial) if self.buf.len() > MAX_HEAD => {
                    return Err(HttpError::HeadTooLarge(MAX_HEAD));
                }
                Ok(httparse::Status::Partial) => return Ok(()),
                Err(_) => return Err(HttpError::Malformed("bad response head")),
            }
        }
        match &mut self.state {
            State::Body(body) => {
                let (used, done) = body.feed_into(&self.buf, &mut self.data)?;
                self.buf.drain(..used);
                if done {
                    self.state = State::Done;
                }
            }
            State::UntilClose => {
                self.data.append(&mut self.buf);
                if self.data.len() > MAX_BODY {
                    return Err(HttpError::BodyTooLarge(MAX_BODY));
                }
            }
            State::Head | State::Done => {}
        }
        Ok(())
    }

    /// The connection closed: whether that ends the body properly.
    pub fn closed(&mut self) -> bool {
        match self.state {
            State::UntilClose | State::Done => {
                self.state = State::Done;
                true
            }
            _ => false,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }
}

/// Splits server-sent events into their `data:` payloads (one per event,
/// multi-line data joined by `\n`); comments and other fields are skipped.
#[derive(Debug, Default)]
pub struct Sse {
    line: Vec<u8>,
    data: Option<String>,
}

impl Sse {
    /// Consumes body data; returns the payloads of the events it completes.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<String>) -> Result<(), String> {
        for &b in bytes {
            if b != b'\n' {
                if self.line.len() >= MAX_LINE {
                    return Err(format!("an event line is over {MAX_LINE} bytes"));
                }
                self.line.push(b);
                continue;
            }
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            let line = std::mem::take(&mut self.line);
            if line.is_empty() {
                if let Some(data) = self.data.take() {
                    out.push(data);
                }
                continue;
            }
            let line = String::from_utf8(line).map_err(|_| "an event is not UTF-8".to_owned())?;
            if let Some(value) = line.strip_prefix("data:") {
                let value = value.strip_prefix(' ').unwrap_or(value);
                match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_host_port_and_base() {
        let t = Target::parse("http://10.0.0.5:8000/v1").unwrap();
        assert_eq!(
            t,
            Target {
                host: "10.0.0.5".into(),
                port: 8000,
                base: String::new()
            }
        );
        let t = Target::parse("http://gpu-box/proxy/").unwrap();
        assert_eq!((t.port, t.base.as_str()), (80, "/proxy"));
        assert!(
            Target::parse("https://x")
                .unwrap_err()
                .contains("https is not supported")
        );
        assert!(Target::parse("localhost:8000").is_err());
        let req = Target::parse("http://[::1]:9/")
            .unwrap()
            .request("GET", "/health", "k", None);
        let text = String::from_utf8(req).unwrap();
        assert!(
            text.starts_with("GET /health HTTP/1.1\r\nHost: [::1]:9\r\n"),
            "{text}"
        );
        assert!(text.contains("Authorization: Bearer k\r\n") && text.ends_with("\r\n\r\n"));
    }

    /// Feeds `bytes` in pieces of `step`; returns the statuses seen (each
    /// change of `status`), the data and whether it completed.
    fn read(bytes: &[u8], step: usize) -> (Vec<u16>, Vec<u8>, bool) {
        let mut r = Response::default();
        let (mut heads, mut data) = (Vec::new(), Vec::new());
        for piece in bytes.chunks(step) {
            let before = r.status;
            r.feed(piece).unwrap();
            if r.status != before {
                heads.push(r.status);
            }
            data.append(&mut r.data);
        }
        (heads, data, r.is_done())
    }

    #[test]
    fn responses_come_whole_whatever_the_pieces() {
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        let sized = b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope";
        for step in [1, 3, 7, 1000] {
            assert_eq!(
                read(chunked, step),
                (vec![200], b"hello world".to_vec(), true)
            );
            assert_eq!(read(sized, step), (vec![404], b"nope".to_vec(), true));
        }
        // Neither: the body ends with the connection.
        let mut r = Response::default();
        r.feed(b"HTTP/1.1 200 OK\r\n\r\ndata").unwrap();
        assert_eq!(r.status, 200);
        assert!(!r.is_done() && r.closed());
        // A chunked body cut short is not a proper end.
        let mut r = Response::default();
        r.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe")
            .unwrap();
        assert!(!r.closed());
        assert!(Response::default().feed(b"SMTP ready\r\n\r\n").is_err());
    }

    #[test]
    fn events_split_into_data_payloads() {
        let stream = b": comment\n\ndata: {\"a\":1}\r\n\r\nevent: x\ndata: one\ndata: two\n\ndata: [DONE]\n\n";
        for step in [1, 5, 100] {
            let (mut sse, mut out) = (Sse::default(), Vec::new());
            for piece in stream.chunks(step) {
                sse.feed(piece, &mut out).unwrap();
            }
            assert_eq!(out, ["{\"a\":1}", "one\ntwo", "[DONE]"]);
        }
        let mut out = Vec::new();
        assert!(Sse::default().feed(b"data: \xff\n", &mut out).is_err());
    }
}

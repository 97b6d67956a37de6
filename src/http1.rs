//! HTTP/1.1 framing, sans-I/O: request heads (httparse), request bodies
//! (`Content-Length` or `chunked`), and the bytes of responses, whole or
//! streamed as chunks. The connection feeds it bytes and writes what it
//! returns; nothing here touches a socket, so keep-alive, pipelining and
//! every malformed input are unit-tested in memory.

use std::fmt::Write as _;

/// The most headers a request may have.
const MAX_HEADERS: usize = 64;

/// What a request may not exceed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_head: usize,
    pub max_body: usize,
}

/// Why a request cannot be served; each maps to a status and closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("the request head is over {0} bytes")]
    HeadTooLarge(usize),
    #[error("malformed HTTP request: {0}")]
    Malformed(&'static str),
    #[error("the request body is over {0} bytes")]
    BodyTooLarge(usize),
    #[error("unsupported Transfer-Encoding {0:?} (chunked is supported)")]
    UnsupportedEncoding(String),
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge(_) => 431,
            HttpError::Malformed(_) => 400,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::UnsupportedEncoding(_) => 501,
        }
    }
}

/// How the body of a request is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(usize),
    Chunked,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The request target: path and query.
    pub target: String,
    /// Names lower-cased, values trimmed.
    pub headers: Vec<(String, String)>,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    pub framing: Framing,
    /// Its length in bytes (replayed to the WebSocket handshake).
    pub len: usize,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// The value of query parameter `key` (not percent-decoded).
    pub fn query(&self, key: &str) -> Option<&str> {
        let query = self.target.split_once('?')?.1;
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    pub fn is_websocket_upgrade(&self) -> bool {
        self.header("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
    }

    /// The client waits for `100 Continue` before sending its body.
    pub fn expects_continue(&self) -> bool {
        self.header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    }
}

/// Parses a request head at the start of `buf`: `Ok(None)` until it is complete.
pub fn parse_head(buf: &[u8], limits: Limits) -> Result<Option<Head>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > limits.max_head => {
            return Err(HttpError::HeadTooLarge(limits.max_head));
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > limits.max_head => {
            return Err(HttpError::HeadTooLarge(limits.max_head));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::HeadTooLarge(limits.max_head));
        }
        Err(_) => return Err(HttpError::Malformed("cannot parse the request head")),
    };
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).trim().to_owned(),
            )
        })
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let has_token = |name: &str, token: &str| {
        get(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    let http11 = req.version == Some(1);
    let keep_alive = if http11 {
        !has_token("connection", "close")
    } else {
        has_token("connection", "keep-alive")
    };
    let framing = match (get("transfer-encoding"), get("content-length")) {
        (Some(te), _) if te.eq_ignore_ascii_case("chunked") => Framing::Chunked,
        (Some(te), _) => return Err(HttpError::UnsupportedEncoding(te.to_owned())),
        (None, Some(cl)) => match cl.parse::<usize>() {
            Ok(n) if n > limits.max_body => return Err(HttpError::BodyTooLarge(limits.max_body)),
            Ok(n) => Framing::Length(n),
            Err(_) => return Err(HttpError::Malformed("bad Content-Length")),
        },
        (None, None) => Framing::Length(0),
    };
    Ok(Some(Head {
        method: req.method.unwrap_or("").to_owned(),
        target: req.path.unwrap_or("").to_owned(),
        headers,
        keep_alive,
        framing,
        len,
    }))
}

/// Reads one body, however it arrives in pieces: whole (`feed`, a
/// request's) or as its data comes (`feed_into`, a streamed response's).
#[derive(Debug)]
pub struct BodyReader {
    framing: Framing,
    max: usize,
    body: Vec<u8>,
    /// Data bytes read so far.
    received: usize,
    chunk: Chunk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// This many data bytes of the current chunk are still to come.
    Data(usize),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

impl BodyReader {
    pub fn new(framing: Framing, max: usize) -> BodyReader {
        BodyReader {
            framing,
            max,
            body: Vec::new(),
            received: 0,
            chunk: Chunk::Size,
        }
    }

    /// Consumes what it can of `buf`; returns the bytes consumed and the
    /// body once complete.
    pub fn feed(&mut self, buf: &[u8]) -> Result<(usize, Option<Vec<u8>>), HttpError> {
        let mut body = std::mem::take(&mut self.body);
        let fed = self.feed_into(buf, &mut body);
        self.body = body;
        let (used, done) = fed?;
        Ok((used, done.then(|| std::mem::take(&mut self.body))))
    }

    /// Consumes what it can of `buf`, appending the body's data to `data`;
    /// returns the bytes consumed and whether the body is complete.
    pub fn feed_into(
        &mut self,
        buf: &[u8],
        data: &mut Vec<u8>,
    ) -> Result<(usize, bool), HttpError> {
        match self.framing {
            Framing::Length(n) => {
                let take = (n - self.received).min(buf.len());
                data.extend_from_slice(&buf[..take]);
                self.received += take;
                Ok((take, self.received == n))
            }
            Framing::Chunked => self.feed_chunked(buf, data),
        }
    }

    fn feed_chunked(&mut self, buf: &[u8], data: &mut Vec<u8>) -> Result<(usize, bool), HttpError> {
        let mut pos = 0;
        loop {
            let rest = &buf[pos..];
            match self.chunk {
                Chunk::Done => return Ok((pos, true)),
                Chunk::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        pos += used;
                        let size = usize::try_from(size).unwrap_or(usize::MAX);
                        if size > self.max - self.received {
                            return Err(HttpError::BodyTooLarge(self.max));
                        }
                        self.chunk = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if rest.len() > 1024 => {
                        return Err(HttpError::Malformed("chunk size line too long"));
                    }
                    Ok(httparse::Status::Partial) => return Ok((pos, false)),
                    Err(_) => return Err(HttpError::Malformed("bad chunk size")),
                },
                Chunk::Data(left) => {
                    let take = left.min(rest.len());
                    data.extend_from_slice(&rest[..take]);
                    self.received += take;
                    pos += take;
                    if take < left {
                        self.chunk = Chunk::Data(left - take);
                        return Ok((pos, false));
                    }
                    self.chunk = Chunk::DataEnd;
                }
                Chunk::DataEnd => {
                    if rest.len() < 2 {
                        return Ok((pos, false));
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(HttpError::Malformed("chunk data not followed by CRLF"));
                    }
                    pos += 2;
                    self.chunk = Chunk::Size;
                }
                Chunk::Trailers => match rest.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        pos += 2;
                        self.chunk = Chunk::Done;
                    }
                    Some(end) if end <= 1024 => pos += end + 2,
                    None if rest.len() <= 1024 => return Ok((pos, false)),
                    _ => return Err(HttpError::Malformed("trailer line too long")),
                },
            }
        }
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A response head; `length` `None` streams the body in chunks.
pub fn head_bytes(
    status: u16,
    headers: &[(&str, &str)],
    length: Option<usize>,
    keep_alive: bool,
) -> Vec<u8> {
    let mut h = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in headers {
        let _ = write!(h, "{name}: {value}\r\n");
    }
    match length {
        Some(n) => {
            let _ = write!(h, "Content-Length: {n}\r\n");
        }
        None => h.push_str("Transfer-Encoding: chunked\r\n"),
    }
    h.push_str(if keep_alive {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    h.into_bytes()
}

/// One chunk of a streamed body (never empty: an empty chunk ends the body).
pub fn chunk_bytes(data: &[u8], out: &mut Vec<u8>) {
    debug_assert!(!data.is_empty());
    let _ = write!(StrOut(out), "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The end of a streamed body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

struct StrOut<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for StrOut<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_head: 1024,
        max_body: 64,
    };

    fn head(s: &str) -> Head {
        parse_head(s.as_bytes(), LIMITS).unwrap().unwrap()
    }

    #[test]
    fn heads_say_how_the_body_comes_and_whether_to_keep_alive() {
        let wire = "POST /v1/x?a=1&api_key=k HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello";
        let h = head(wire);
        assert_eq!((h.method.as_str(), h.path()), ("POST", "/v1/x"));
        assert_eq!(h.query("api_key"), Some("k"));
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.keep_alive);
        assert_eq!(h.len, wire.len() - 5);
        let h = head("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head("GET / HTTP/1.0\r\n\r\n");
        assert!(!h.keep_alive && h.framing == Framing::Length(0));
        let h = head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(h.keep_alive);
        let h =
            head("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\nExpect: 100-continue\r\n\r\n");
        assert!(h.framing == Framing::Chunked && h.expects_continue());
        let h = head("GET /ws HTTP/1.1\r\nUpgrade: WebSocket\r\n\r\n");
        assert!(h.is_websocket_upgrade());
    }

    #[test]
    fn incomplete_heads_wait_and_bad_ones_are_named() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost:", LIMITS), Ok(None));
        let big = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(2000));
        assert_eq!(
            parse_head(big.as_bytes(), LIMITS).unwrap_err().status(),
            431
        );
        let e = parse_head(b"\x01\x02 nonsense\r\n\r\n", LIMITS).unwrap_err();
        assert_eq!(e.status(), 400);
        let e = parse_head(b"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n", LIMITS);
        assert_eq!(e.unwrap_err().status(), 413);
        let e = parse_head(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", LIMITS);
        assert_eq!(e.unwrap_err().status(), 400);
        let e = parse_head(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            LIMITS,
        );
        assert_eq!(e.unwrap_err().status(), 501);
    }

    /// Feeds `wire` in pieces of `step` bytes, as reads would deliver it.
    fn read_body(
        framing: Framing,
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, usize), HttpError> {
        let mut r = BodyReader::new(framing, LIMITS.max_body);
        let mut buf = Vec::new();
        let mut consumed = 0;
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            let (used, body) = r.feed(&buf)?;
            buf.drain(..used);
            consumed += used;
            if let Some(body) = body {
                return Ok((body, consumed));
            }
        }
        panic!("incomplete body");
    }

    #[test]
    fn bodies_arrive_whole_whatever_the_pieces() {
        let chunked = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\nGET /next";
        for step in 1..chunked.len() {
            let (body, used) = read_body(Framing::Chunked, chunked, step).unwrap();
            assert_eq!(body, b"hello world");
            assert_eq!(used, chunked.len() - b"GET /next".len(), "step {step}");
        }
        for step in [1, 3, 100] {
            let (body, used) = read_body(Framing::Length(5), b"hellopipelined", step).unwrap();
            assert_eq!((body.as_slice(), used), (&b"hello"[..], 5));
        }
    }

    #[test]
    fn bad_or_huge_chunked_bodies_are_refused() {
        let e = read_body(Framing::Chunked, b"zz\r\n", 100).unwrap_err();
        assert_eq!(e.status(), 400);
        let e = read_body(Framing::Chunked, b"3\r\nabcX\r\n", 100).unwrap_err();
        assert_eq!(e.status(), 400);
        let e = read_body(Framing::Chunked, b"41\r\n", 100).unwrap_err();
        assert_eq!(e.status(), 413);
        let twice = format!("20\r\n{}\r\n21\r\n", "a".repeat(32));
        let e = read_body(Framing::Chunked, twice.as_bytes(), 7).unwrap_err();
        assert_eq!(e.status(), 413);
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;
        use super::LIMITS;

        proptest! {
            /// Whatever arrives, the parsers answer (a head, an error, or
            /// "more"), never panic.
            #[test]
            fn any_bytes_are_parsed_or_refused(
                bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            ) {
                let _ = parse_head(&bytes, LIMITS);
                let _ = BodyReader::new(Framing::Chunked, LIMITS.max_body).feed(&bytes);
            }

            /// A body cut into any chunks and delivered in any pieces comes
            /// back whole, and nothing after it is consumed.
            #[test]
            fn chunked_bodies_come_back_whole(
                body in proptest::collection::vec(any::<u8>(), 0..64),
                cuts in proptest::collection::vec(1usize..16, 1..8),
                step in 1usize..32,
            ) {
                let mut wire = Vec::new();
                let mut rest = body.as_slice();
                for cut in cuts.iter().cycle() {
                    if rest.is_empty() {
                        break;
                    }
                    let (chunk, tail) = rest.split_at((*cut).min(rest.len()));
                    chunk_bytes(chunk, &mut wire);
                    rest = tail;
                }
                wire.extend_from_slice(LAST_CHUNK);
                let end = wire.len();
                wire.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
                let mut reader = BodyReader::new(Framing::Chunked, LIMITS.max_body);
                let (mut buf, mut consumed, mut got) = (Vec::new(), 0, None);
                for piece in wire.chunks(step) {
                    buf.extend_from_slice(piece);
                    let (used, done) = reader.feed(&buf).unwrap();
                    buf.drain(..used);
                    consumed += used;
                    if done.is_some() {
                        got = done;
                        break;
                    }
                }
                prop_assert_eq!(got, Some(body));
                prop_assert_eq!(consumed, end);
            }
        }
    }

    #[test]
    fn responses_have_a_length_or_are_chunked() {
        let h = String::from_utf8(head_bytes(
            200,
            &[("Content-Type", "text/plain")],
            Some(2),
            true,
        ))
        .unwrap();
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n"
        );
        let h = String::from_utf8(head_bytes(200, &[], None, false)).unwrap();
        assert!(
            h.contains("Transfer-Encoding: chunked\r\n")
                && h.ends_with("Connection: close\r\n\r\n")
        );
        let mut out = Vec::new();
        chunk_bytes(&[b'x'; 26], &mut out);
        assert!(out.starts_with(b"1a\r\nxxx") && out.ends_with(b"x\r\n"));
    }
}

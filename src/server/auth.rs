//! API keys: who may use the server. With keys configured, every request but
//! `GET /health` and CORS preflights must carry one: `Authorization: Bearer
//! KEY`, or for browsers that cannot set headers, the WebSocket subprotocol
//! `bearer.KEY` or the query parameter `api_key=KEY`. Keys are compared in
//! constant time and never logged.

use subtle::ConstantTimeEq;

use crate::http1::Head;

/// The subprotocol prefix that carries a key.
const PROTOCOL_PREFIX: &str = "bearer.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("this server needs an API key: send \"Authorization: Bearer KEY\"")]
    Missing,
    #[error("the API key is not valid")]
    Wrong,
}

/// What an accepted request authenticated with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Granted {
    /// The WebSocket subprotocol to answer with: a client that offers
    /// protocols must get one back (browsers fail the handshake otherwise),
    /// the first that is not a key, else the first.
    pub protocol: Option<String>,
}

#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

impl ApiKeys {
    pub fn new(keys: impl IntoIterator<Item = String>) -> ApiKeys {
        ApiKeys {
            keys: keys
                .into_iter()
                .filter(|k| !k.is_empty())
                .map(String::into_bytes)
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether `key` is one of ours. Every key is compared, each in constant
    /// time, so the time taken says nothing about which bytes matched.
    fn allows(&self, key: &str) -> bool {
        self.keys.iter().fold(0u8, |any, k| {
            any | k.as_slice().ct_eq(key.as_bytes()).unwrap_u8()
        }) == 1
    }

    /// Checks a request head.
    pub fn check(&self, head: &Head) -> Result<Granted, AuthError> {
        let offered: Vec<&str> = head
            .header("sec-websocket-protocol")
            .map(|v| v.split(',').map(str::trim).collect())
            .unwrap_or_default();
        let granted = Granted {
            protocol: offered
                .iter()
                .find(|p| !p.starts_with(PROTOCOL_PREFIX))
                .or(offered.first())
                .map(|p| p.to_string()),
        };
        if self.keys.is_empty() || exempt(head) {
            return Ok(granted);
        }
        let bearer = head
            .header("authorization")
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let in_protocol = offered.iter().find_map(|p| p.strip_prefix(PROTOCOL_PREFIX));
        let key = bearer.or(in_protocol).or_else(|| head.query("api_key"));
        match key {
            None => Err(AuthError::Missing),
            Some(k) if !self.allows(k) => Err(AuthError::Wrong),
            Some(_) => Ok(granted),
        }
    }
}

/// Routes open to everyone: health checks and CORS preflights.
fn exempt(head: &Head) -> bool {
    (head.method == "GET" && head.path() == "/health") || head.method == "OPTIONS"
}

/// Reads keys from a file: one per line; blank lines and `#` comments skipped.
pub fn read_key_file(path: &std::path::Path) -> std::io::Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::{Limits, parse_head};

    fn head(lines: &str) -> Head {
        let text = format!("{lines}\r\n\r\n");
        let limits = Limits {
            max_head: 4096,
            max_body: 0,
        };
        parse_head(text.as_bytes(), limits).unwrap().unwrap()
    }

    #[test]
    fn without_keys_everything_is_open() {
        let keys = ApiKeys::new(Vec::<String>::new());
        assert!(
            keys.check(&head("POST /v1/chat/completions HTTP/1.1"))
                .is_ok()
        );
        // Offered subprotocols are answered with keys or without.
        let ws = "GET / HTTP/1.1\r\nSec-WebSocket-Protocol: inference-core.v1, bearer.k";
        assert_eq!(
            keys.check(&head(ws)).unwrap().protocol.as_deref(),
            Some("inference-core.v1")
        );
    }

    #[test]
    fn a_key_comes_as_bearer_subprotocol_or_query() {
        let keys = ApiKeys::new(["k1".to_string(), "secret-2".to_string()]);
        let ok = |h: &str| keys.check(&head(h));
        assert_eq!(
            ok("GET /v1/models HTTP/1.1\r\nAuthorization: Bearer secret-2"),
            Ok(Granted::default())
        );
        assert_eq!(
            ok("GET /v1/models HTTP/1.1\r\nAuthorization: Bearer nope"),
            Err(AuthError::Wrong)
        );
        assert_eq!(ok("GET /v1/models HTTP/1.1"), Err(AuthError::Missing));
        assert_eq!(
            ok("GET /metrics?api_key=k1 HTTP/1.1"),
            Ok(Granted::default())
        );
        assert_eq!(ok("GET /?api_key=k HTTP/1.1"), Err(AuthError::Wrong));
        assert_eq!(
            ok("GET / HTTP/1.1\r\nSec-WebSocket-Protocol: v1, bearer.k1").unwrap(),
            Granted {
                protocol: Some("v1".into())
            }
        );
        assert_eq!(
            ok("GET / HTTP/1.1\r\nSec-WebSocket-Protocol: bearer.k1").unwrap(),
            Granted {
                protocol: Some("bearer.k1".into())
            }
        );
        assert_eq!(
            ok("GET / HTTP/1.1\r\nAuthorization: Bearer k1\r\nSec-WebSocket-Protocol: v1")
                .unwrap()
                .protocol
                .as_deref(),
            Some("v1")
        );
        assert!(ok("GET /health HTTP/1.1").is_ok());
        assert!(ok("OPTIONS /v1/completions HTTP/1.1").is_ok());
        assert!(ok("POST /health HTTP/1.1").is_err());
    }

    #[test]
    fn key_files_skip_comments_and_blanks() {
        let path = std::env::temp_dir().join(format!("keys-{}", std::process::id()));
        std::fs::write(&path, "# ops team\nabc\n\n  def  \n").unwrap();
        assert_eq!(read_key_file(&path).unwrap(), ["abc", "def"]);
        std::fs::remove_file(path).unwrap();
    }
}

//! The OpenAI API (`/v1/chat/completions`, `/v1/completions`, `/v1/models`)
//! as a thin mapping over the core, sans-I/O: `request` reads bodies into
//! core requests, `reply` writes the core's events as OpenAI's JSON (whole
//! responses and server-sent-event chunks), `session` drives one request
//! between them.

pub mod reply;
pub mod request;
pub mod session;

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::server::http::Response;

pub use reply::Reply;
pub use request::{ApiRequest, BadRequest, parse};
pub use session::OpenAi;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions`
    Completions,
}

impl Endpoint {
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path {
            "/v1/chat/completions" => Some(Endpoint::Chat),
            "/v1/completions" => Some(Endpoint::Completions),
            _ => None,
        }
    }
}

/// Seconds since the Unix epoch (`created` fields).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Answers `GET /v1/models` (the one model served) and `GET /v1/models/{id}`;
/// `None` for any other request.
pub fn models_route(method: &str, path: &str, model: &str, created: u64) -> Option<Response> {
    let rest = path.strip_prefix("/v1/models")?;
    if method != "GET" {
        return None;
    }
    let json = |v: Value| Response::new(200, "application/json", v.to_string());
    match rest.strip_prefix('/') {
        None if rest.is_empty() => Some(json(
            json!({"object": "list", "data": [model_object(model, created)]}),
        )),
        None => None,
        Some(id) if is_our_model(id, model) => Some(json(model_object(model, created))),
        Some(id) => Some(Response::api_error(
            404,
            Some("model_not_found"),
            Some("model"),
            &format!("the model {id:?} does not exist"),
        )),
    }
}

fn model_object(model: &str, created: u64) -> Value {
    json!({"id": model, "object": "model", "created": created, "owned_by": "inference-core"})
}

/// Whether a request's `model` names the model served: its id, or its file name.
pub fn is_our_model(asked: &str, ours: &str) -> bool {
    asked.eq_ignore_ascii_case(ours)
        || asked
            .strip_suffix(".gguf")
            .is_some_and(|a| a.eq_ignore_ascii_case(ours))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_are_named_by_id_or_file() {
        assert!(is_our_model("gemma-3", "gemma-3"));
        assert!(is_our_model("Gemma-3.gguf", "gemma-3"));
        assert!(!is_our_model("gpt-4o", "gemma-3"));
        let route = |method, path| models_route(method, path, "gemma-3", 1);
        let list: Value = serde_json::from_str(&route("GET", "/v1/models").unwrap().body).unwrap();
        assert_eq!(list["data"][0]["id"], "gemma-3");
        assert_eq!(route("GET", "/v1/models/gemma-3.gguf").unwrap().status, 200);
        assert_eq!(route("GET", "/v1/models/gpt-4o").unwrap().status, 404);
        // Not these routes: the plain routes answer (404, 405).
        assert!(route("GET", "/v1/modelsé").is_none());
        assert!(route("POST", "/v1/models").is_none());
        assert!(route("GET", "/health").is_none());
    }
}

//! The OpenAI API (`/v1/chat/completions`, `/v1/completions`, `/v1/models`)
//! as a thin mapping over the core, sans-I/O: `request` reads bodies into
//! core requests, `reply` writes the core's events as OpenAI's JSON (whole
//! responses and server-sent-event chunks), `session` drives one request
//! between them.

pub mod reply;
pub mod request;
pub mod session;

use serde_json::{Value, json};

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

/// `GET /v1/models`: the one model served.
pub fn models(model: &str, created: u64) -> String {
    json!({"object": "list", "data": [model_object(model, created)]}).to_string()
}

/// `GET /v1/models/{id}`.
pub fn model_object(model: &str, created: u64) -> Value {
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
        let list: Value = serde_json::from_str(&models("gemma-3", 1)).unwrap();
        assert_eq!(list["data"][0]["id"], "gemma-3");
    }
}

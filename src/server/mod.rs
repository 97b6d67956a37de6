//! The server: one mio reactor on the main thread owns every socket; each
//! connection speaks a protocol through its session (WebSocket v1, or one
//! HTTP request at a time: the OpenAI API, /tokenize);
//! the request table routes the engine's events back to their clients.

pub mod auth;
pub mod connection;
pub mod feed;
pub mod fields;
pub mod http;

pub mod http_tokenize;
pub mod messages;
pub mod openai;
pub mod protocol;
pub mod reactor;
pub mod requests;
pub mod session;
pub mod ws_v1;

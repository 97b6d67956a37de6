//! Saved prefixes: the KV state of cached prompt prefixes, kept across a park
//! (in memory) and a restart (in files, `engine::persist`).

use std::sync::Arc;

use crate::engine::backend::Token;

/// A sequence's KV state: opaque bytes from `Backend::seq_save`, shared
/// between the host-memory cache and a save without a copy.
pub type State = Arc<Vec<u8>>;

/// One cached prefix: its tokens and its sequence's KV state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix {
    pub tokens: Vec<Token>,
    pub state: State,
}

impl Prefix {
    pub fn bytes(&self) -> usize {
        self.tokens.len() * std::mem::size_of::<Token>() + self.state.len()
    }
}

//! Saved prefixes: the KV state of cached prompt prefixes, kept across a park
//! (in memory) and a restart (in files, `engine::persist`).

use crate::engine::backend::Token;

/// One cached prefix: its tokens and its sequence's KV state (opaque bytes
/// from `Backend::seq_save`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix {
    pub tokens: Vec<Token>,
    pub state: Vec<u8>,
}

impl Prefix {
    pub fn bytes(&self) -> usize {
        self.tokens.len() * std::mem::size_of::<Token>() + self.state.len()
    }
}

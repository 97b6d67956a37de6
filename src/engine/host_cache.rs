//! The prefix cache's second tier: cached prefixes whose KV state was copied
//! out of the cells into host memory (`llama_state_seq_get_data`).
//!
//! Kept cells are not free to keep: every row of every step walks the mask
//! of every cell in use, so while several streams run, prefixes no running
//! request shares move here and their cells go back to the pool. A request
//! that starts with one of them has it loaded back into cells (a copy, not a
//! prefill) and shared from there. Bounded in bytes, least recently used out.
//! Sans-I/O: the engine does the copies.

use crate::engine::backend::Token;
use crate::engine::prefix::PrefixCache;
use crate::engine::snapshot::State;

pub type HostId = u64;

#[derive(Debug)]
pub struct HostCache {
    page_size: usize,
    index: PrefixCache<HostId, State>,
    bytes: usize,
    budget: usize,
    next: HostId,
}

impl HostCache {
    pub fn new(page_size: usize, budget: usize) -> HostCache {
        HostCache {
            page_size,
            index: PrefixCache::new(page_size),
            bytes: 0,
            budget,
            next: 0,
        }
    }

    /// Whether prefixes may move here at all (a budget of zero: never).
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The entry sharing the most whole pages with `tokens` (at most
    /// `max_pages`), and how many pages it shares.
    pub fn lookup(&self, tokens: &[Token], max_pages: usize) -> Option<(HostId, usize)> {
        self.index.lookup(tokens, max_pages)
    }

    pub fn tokens(&self, id: HostId) -> &[Token] {
        &self.index.get(id).expect("a host entry").tokens
    }

    pub fn state(&self, id: HostId) -> Option<&State> {
        self.index.get(id).map(|e| &e.held)
    }

    /// Whether an entry already starts with all of `tokens`.
    pub fn covers(&self, tokens: &[Token]) -> bool {
        self.index.covers(tokens)
    }

    pub fn touch(&mut self, id: HostId) {
        self.index.touch(id);
    }

    /// Keeps the state of `tokens`, unless they are not whole pages, an entry
    /// covers them already or it alone is over the budget. Entries it covers
    /// go; then the least recently used ones, until everything fits.
    pub fn insert(&mut self, tokens: Vec<Token>, state: State) -> bool {
        if tokens.is_empty()
            || !tokens.len().is_multiple_of(self.page_size)
            || state.len() > self.budget
            || self.index.covers(&tokens)
        {
            return false;
        }
        for redundant in self.index.prefixes_of(&tokens) {
            self.remove(redundant);
        }
        while self.bytes + state.len() > self.budget {
            let victim = self.index.lru(None).expect("over budget means not empty");
            self.remove(victim);
        }
        self.bytes += state.len();
        self.next += 1;
        self.index.insert(self.next, tokens, state);
        true
    }

    pub fn remove(&mut self, id: HostId) {
        if let Some(e) = self.index.remove(id) {
            self.bytes -= e.held.len();
        }
    }

    /// Every entry, the most recently used first: (tokens, state).
    pub fn by_recency(&self) -> Vec<(&[Token], &State)> {
        self.index
            .by_recency()
            .into_iter()
            .map(|(_, e)| (e.tokens.as_slice(), &e.held))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn state(n: usize, byte: u8) -> State {
        Arc::new(vec![byte; n])
    }

    fn toks(n: usize, seed: i32) -> Vec<Token> {
        (0..n as i32).map(|i| i * 7 + seed).collect()
    }

    #[test]
    fn the_budget_bounds_the_bytes_least_recently_used_out() {
        let mut h = HostCache::new(4, 10);
        assert!(h.insert(toks(4, 0), state(4, 0)));
        assert!(h.insert(toks(4, 1), state(4, 0)));
        let (first, _) = h.lookup(&toks(4, 0), 1).unwrap();
        h.touch(first);
        assert!(h.insert(toks(4, 2), state(4, 0)));
        assert_eq!((h.len(), h.bytes()), (2, 8));
        assert!(h.lookup(&toks(4, 1), 1).is_none(), "the least recent went");
        assert!(h.lookup(&toks(4, 0), 1).is_some());
        assert!(!h.insert(toks(8, 3), state(11, 0)), "alone over the budget");
        assert!(!h.insert(toks(6, 3), state(1, 0)), "not whole pages");
        assert_eq!(h.bytes(), 8);
    }

    #[test]
    fn a_longer_entry_replaces_its_prefixes_and_a_covered_one_is_not_kept() {
        let mut h = HostCache::new(2, 100);
        assert!(h.insert(toks(4, 0), state(4, 1)));
        assert!(h.insert(toks(8, 0), state(8, 2)));
        assert_eq!((h.len(), h.bytes()), (1, 8));
        assert!(!h.insert(toks(6, 0), state(6, 3)), "covered");
        let (id, pages) = h.lookup(&toks(6, 0), 10).unwrap();
        assert_eq!((pages, h.tokens(id).len()), (3, 8));
        assert_eq!(h.state(id).map(|s| s.as_slice()), Some(&[2u8; 8][..]));
        h.remove(id);
        assert_eq!((h.len(), h.bytes()), (0, 0));
        assert!(!HostCache::new(2, 0).enabled());
    }
}

//! The prefix cache's index: token sequences kept after their request ended,
//! so that any later request on any connection that starts with the same
//! tokens reuses their KV state instead of recomputing it.
//!
//! Entries cover whole pages and are found by a key `K` with what holds them,
//! `V`: the KV cells of one llama.cpp sequence id (the finished request's own
//! id, handed over to the cache) and their pages, or a copy of that state in
//! host memory (`ram`). Lookup walks the prompt page by page with chained
//! hashes (hash of page i folds in the hash of page i-1, so equal hashes mean
//! equal prefixes, checked once on the tokens at the end): O(prompt pages),
//! whatever the number of entries. Entries are evicted least-recently-used.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::engine::backend::Token;

#[derive(Debug)]
pub struct Entry<V> {
    pub tokens: Vec<Token>,
    pub held: V,
    last_used: u64,
}

#[derive(Debug)]
pub struct PrefixCache<K, V> {
    page_size: usize,
    entries: HashMap<K, Entry<V>>,
    /// Chained hash of the first i pages -> entries that start with them.
    index: HashMap<u64, Vec<K>>,
    clock: u64,
}

fn chain(prev: u64, page: &[Token]) -> u64 {
    let mut h = DefaultHasher::new();
    prev.hash(&mut h);
    page.hash(&mut h);
    h.finish()
}

impl<K: Copy + Eq + Hash, V> PrefixCache<K, V> {
    pub fn new(page_size: usize) -> Self {
        PrefixCache {
            page_size,
            entries: HashMap::new(),
            index: HashMap::new(),
            clock: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, seq: K) -> Option<&Entry<V>> {
        self.entries.get(&seq)
    }

    /// The entry sharing the most whole pages with `tokens` (at most
    /// `max_pages`), and how many pages it shares.
    pub fn lookup(&self, tokens: &[Token], max_pages: usize) -> Option<(K, usize)> {
        let mut hash = 0;
        let mut best = None;
        for (i, page) in tokens
            .chunks_exact(self.page_size)
            .take(max_pages)
            .enumerate()
        {
            hash = chain(hash, page);
            match self.index.get(&hash) {
                Some(seqs) => best = Some((seqs[0], i + 1)),
                None => break,
            }
        }
        let (seq, pages) = best?;
        let n = pages * self.page_size;
        (self.entries[&seq].tokens[..n] == tokens[..n]).then_some((seq, pages))
    }

    /// Marks an entry as just used (for LRU eviction).
    pub fn touch(&mut self, seq: K) {
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(&seq) {
            e.last_used = self.clock;
        }
    }

    /// Whether an entry already starts with all of `tokens`.
    pub fn covers(&self, tokens: &[Token]) -> bool {
        let pages = tokens.len() / self.page_size;
        self.lookup(tokens, pages).is_some_and(|(_, p)| p == pages)
    }

    /// Entries whose whole token sequence is a prefix of `tokens` (they become
    /// redundant once `tokens` is cached).
    pub fn prefixes_of(&self, tokens: &[Token]) -> Vec<K> {
        self.entries
            .iter()
            .filter(|(_, e)| e.tokens.len() <= tokens.len() && tokens.starts_with(&e.tokens))
            .map(|(&s, _)| s)
            .collect()
    }

    /// Caches `tokens` (whole pages), held by `held` under the key `seq`.
    pub fn insert(&mut self, seq: K, tokens: Vec<Token>, held: V) {
        assert!(
            tokens.len().is_multiple_of(self.page_size),
            "entries cover whole pages"
        );
        let mut hash = 0;
        for page in tokens.chunks_exact(self.page_size) {
            hash = chain(hash, page);
            self.index.entry(hash).or_default().push(seq);
        }
        self.clock += 1;
        self.entries.insert(
            seq,
            Entry {
                tokens,
                held,
                last_used: self.clock,
            },
        );
    }

    pub fn remove(&mut self, seq: K) -> Option<Entry<V>> {
        let entry = self.entries.remove(&seq)?;
        let mut hash = 0;
        for page in entry.tokens.chunks_exact(self.page_size) {
            hash = chain(hash, page);
            if let Some(seqs) = self.index.get_mut(&hash) {
                seqs.retain(|&s| s != seq);
                if seqs.is_empty() {
                    self.index.remove(&hash);
                }
            }
        }
        Some(entry)
    }

    pub fn iter(&self) -> impl Iterator<Item = (K, &Entry<V>)> {
        self.entries.iter().map(|(&k, e)| (k, e))
    }

    /// Every entry, the most recently used first.
    pub fn by_recency(&self) -> Vec<(K, &Entry<V>)> {
        let mut all: Vec<(K, &Entry<V>)> = self.entries.iter().map(|(&s, e)| (s, e)).collect();
        all.sort_by_key(|(_, e)| std::cmp::Reverse(e.last_used));
        all
    }

    /// The least recently used entry other than `except`.
    pub fn lru(&self, except: Option<K>) -> Option<K> {
        self.entries
            .iter()
            .filter(|(s, _)| Some(**s) != except)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(&s, _)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::SeqId;
    use crate::engine::kv::PageId;

    type Cells = PrefixCache<SeqId, Vec<PageId>>;

    fn toks(n: usize, seed: i32) -> Vec<Token> {
        (0..n as i32).map(|i| i * 7 + seed).collect()
    }

    #[test]
    fn longest_shared_whole_pages() {
        let mut c = Cells::new(4);
        c.insert(10, toks(12, 0), vec![0, 1, 2]);
        let mut prompt = toks(10, 0);
        prompt.extend([999, 998]);
        // 10 shared tokens = 2 whole pages.
        assert_eq!(c.lookup(&prompt, 100), Some((10, 2)));
        assert_eq!(c.lookup(&prompt, 1), Some((10, 1)));
        assert_eq!(c.lookup(&toks(12, 1), 100), None);
        assert!(c.covers(&toks(8, 0)));
        assert!(!c.covers(&toks(16, 0)));
    }

    #[test]
    fn remove_and_lru() {
        let mut c = Cells::new(2);
        c.insert(1, toks(4, 0), vec![0, 1]);
        c.insert(2, toks(4, 5), vec![2, 3]);
        c.touch(1);
        assert_eq!(c.lru(None), Some(2));
        assert_eq!(c.lru(Some(2)), Some(1));
        assert!(c.remove(2).is_some());
        assert_eq!(c.lookup(&toks(4, 5), 10), None);
        assert_eq!(c.lookup(&toks(4, 0), 10), Some((1, 2)));
        assert_eq!(c.prefixes_of(&toks(6, 0)), vec![1]);
    }

    #[test]
    fn entries_sharing_a_prefix_survive_each_others_eviction() {
        let mut c = Cells::new(2);
        let mut a = toks(2, 0);
        a.extend([50, 51]);
        let mut b = toks(2, 0);
        b.extend([60, 61]);
        c.insert(1, a.clone(), vec![0, 1]);
        c.insert(2, b.clone(), vec![0, 2]);
        c.remove(1);
        assert_eq!(c.lookup(&a, 10), Some((2, 1)));
        assert_eq!(c.lookup(&b, 10), Some((2, 2)));
    }
}

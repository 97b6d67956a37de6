//! Cached prefixes across restarts: their KV states copied out for the
//! state directory (written off the engine thread by `persist::Writer`) and
//! taken back into the prefix cache at start-up.

use std::sync::Arc;
use std::time::Instant;

use super::Engine;
use crate::engine::backend::Backend;
use crate::engine::snapshot::Prefix;

impl<B: Backend> Engine<'_, B> {
    /// The cached prefixes' states, those in cells then those in host
    /// memory, each the most recently used first, while they fit in
    /// `budget` bytes.
    pub fn save_prefixes(&self, budget: usize) -> Vec<Prefix> {
        let mut out = Vec::new();
        let mut used = 0;
        let mut keep = |prefix: Prefix| {
            let fits = used + prefix.bytes() <= budget;
            if fits {
                used += prefix.bytes();
                out.push(prefix);
            }
            fits
        };
        for (seq, tokens) in self.scheduler.cached() {
            match self.backend.seq_save(seq) {
                Ok(state) => {
                    let (tokens, state) = (tokens.to_vec(), Arc::new(state));
                    if !keep(Prefix { tokens, state }) {
                        return out;
                    }
                }
                Err(e) => log::warn!("cannot save a cached prefix: {e}"),
            }
        }
        for (tokens, state) in self.scheduler.cached_in_host() {
            let (tokens, state) = (tokens.to_vec(), state.clone());
            if !keep(Prefix { tokens, state }) {
                break;
            }
        }
        out
    }

    /// Saves the cached prefixes to the state directory, if they changed.
    pub fn persist(&mut self) {
        let Some(store) = self.store else {
            return;
        };
        let changes = self.scheduler.cache_changes();
        if changes == self.saved.0 {
            return;
        }
        let t0 = Instant::now();
        let prefixes = self.save_prefixes(store.max_bytes());
        self.writer.save(store, prefixes, t0.elapsed());
        self.saved = (changes, Instant::now());
    }

    /// Waits until what `persist` saved is on disk.
    pub fn finish_saving(&mut self) {
        self.writer.finish();
    }

    /// Takes saved prefixes back into the prefix cache, the most recent
    /// first: into cells while entries and pages are free, the others into
    /// host memory; returns how many went into cells.
    pub fn restore_prefixes(&mut self, prefixes: Vec<Prefix>) -> usize {
        let mut restored = 0;
        // Oldest first, so the most recent ends up the most recently used.
        for prefix in prefixes.into_iter().rev() {
            let Some(seq) = self.scheduler.adopt(&prefix.tokens) else {
                self.scheduler.keep_in_host(prefix.tokens, prefix.state);
                continue;
            };
            match self.backend.seq_load(seq, &prefix.state) {
                Ok(()) => restored += 1,
                Err(e) => {
                    log::warn!("cannot restore a cached prefix: {e}");
                    let op = self.scheduler.forget(seq);
                    self.apply(&[op]);
                }
            }
        }
        self.publish();
        restored
    }
}

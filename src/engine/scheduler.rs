//! Admission control and KV bookkeeping for continuous batching.
//!
//! Sans-I/O: the scheduler decides, the engine executes. It holds the waiting
//! queue (bounded FIFO), the KV page accounting (`kv`), the prefix cache in
//! two tiers (in cells: `prefix`; copied out to host memory: `host_cache`)
//! and the pool of llama.cpp sequence ids, and answers in `MemOp`s that the
//! engine mirrors on the real KV cache.
//!
//! Policy: a request is admitted when a slot is free and the pages for its
//! prompt plus `max_tokens` (capped at the context) are free or can be freed by
//! evicting cached prefixes; it then can never run out of KV memory. The
//! queue is ordered by priority, first-in first-out within a level: a large
//! request at the head is not overtaken by one of its level or lower. Pages
//! it shares with a cached prefix are not counted twice.

use std::collections::{HashMap, VecDeque};

use crate::core::{KvStatus, RequestError, RequestKey, Status};
use crate::engine::backend::{SeqId, Token};
use crate::engine::host_cache::{HostCache, HostId};
#[cfg(test)]
use crate::engine::kv::Usage;
use crate::engine::kv::{KvPages, PageId};
use crate::engine::prefix::PrefixCache;
use crate::engine::snapshot::State;

/// From this many running requests on, cached prefixes that none of them
/// shares move out of the cells to host memory: every kept cell costs each
/// row of each step a mask entry per layer and head; with one stream that
/// costs less than the copies would.
const BUSY: usize = 2;

/// An operation on llama.cpp's KV cache, applied by the engine in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemOp {
    /// `llama_memory_seq_cp(src, dst, 0, len)`: share the cells of a prefix.
    Copy { src: SeqId, dst: SeqId, len: usize },
    /// `llama_memory_seq_rm(seq, from, -1)`: drop a sequence's cells from `from` on.
    Remove { seq: SeqId, from: usize },
    /// `llama_state_seq_get_data(seq)`: copy a cached prefix, `tokens`, out
    /// to host memory (`Scheduler::keep_in_host`).
    Save { seq: SeqId, tokens: Vec<Token> },
    /// `llama_state_seq_set_data`: load host entry `id` into the empty `seq`
    /// (on failure, `Scheduler::load_failed`).
    Load { id: HostId, seq: SeqId },
}

/// A tokenized request, as the scheduler sees it.
pub struct Job {
    pub key: RequestKey,
    pub tokens: Vec<Token>,
    pub max_tokens: usize,
    /// Higher is admitted first; equal ones in arrival order.
    pub priority: i32,
}

#[derive(Debug, PartialEq)]
pub struct Admitted {
    pub seq: SeqId,
    /// Prompt tokens whose cells were copied from the prefix cache.
    pub cached_tokens: usize,
    /// Positions this request may fill (prompt plus reply).
    pub limit: usize,
    /// To apply before the request's first decode.
    pub ops: Vec<MemOp>,
}

struct Waiting {
    req: Job,
    reported: usize,
}

struct Active {
    seq: SeqId,
    pages: Vec<PageId>,
}

pub struct Config {
    pub n_ctx: usize,
    pub page_size: usize,
    pub slots: usize,
    pub cache_entries: usize,
    /// Bytes of cached prefixes host memory may hold (0: none).
    pub host_bytes: usize,
    pub queue_limit: usize,
}

pub struct Scheduler {
    cfg: Config,
    kv: KvPages,
    cache: PrefixCache<SeqId, Vec<PageId>>,
    host: HostCache,
    queue: VecDeque<Waiting>,
    active: HashMap<RequestKey, Active>,
    free_seqs: Vec<SeqId>,
    /// Counts changes to the prefix cache (to know when to save it again).
    changes: u64,
}

/// Sequence ids llama.cpp must provide for `slots` and `cache_entries`: one
/// each.
pub fn n_seq_max(slots: usize, cache_entries: usize) -> usize {
    slots + cache_entries
}

impl Scheduler {
    pub fn new(cfg: Config) -> Scheduler {
        let n_seq = n_seq_max(cfg.slots, cfg.cache_entries) as SeqId;
        Scheduler {
            kv: KvPages::new(cfg.n_ctx, cfg.page_size),
            cache: PrefixCache::new(cfg.page_size),
            // No cells' cache, no host copies of it.
            host: HostCache::new(
                cfg.page_size,
                if cfg.cache_entries > 0 {
                    cfg.host_bytes
                } else {
                    0
                },
            ),
            queue: VecDeque::new(),
            active: HashMap::new(),
            free_seqs: (0..n_seq).rev().collect(),
            changes: 0,
            cfg,
        }
    }

    /// Sequence ids llama.cpp must provide (`n_seq_max`).
    pub fn n_seq_max(&self) -> usize {
        n_seq_max(self.cfg.slots, self.cfg.cache_entries)
    }

    pub fn status(&self) -> Status {
        let u = self.kv.usage();
        Status {
            slots: self.cfg.slots,
            busy_slots: self.active.len(),
            queued: self.queue.len(),
            kv: KvStatus {
                page_size: self.cfg.page_size,
                pages_total: self.kv.total(),
                pages_owned: u.owned,
                pages_cached: u.cached,
                pages_free: u.free,
                prefix_entries: self.cache.len(),
                prefix_host_entries: self.host.len(),
                prefix_host_bytes: self.host.bytes(),
            },
            ..Status::default()
        }
    }

    #[cfg(test)]
    fn usage(&self) -> Usage {
        self.kv.usage()
    }

    #[cfg(test)]
    fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Cells a single request may use: the whole pool, in whole pages.
    pub fn capacity(&self) -> usize {
        self.kv.total() * self.cfg.page_size
    }

    /// Queues a tokenized request (returns its position, 1 is next), or
    /// rejects one that can never run or that the full queue cannot take.
    pub fn submit(&mut self, req: Job) -> Result<usize, RequestError> {
        if req.tokens.len() >= self.capacity() {
            return Err(RequestError::ContextOverflow {
                prompt_tokens: req.tokens.len(),
                capacity: self.capacity(),
            });
        }
        if self.queue.len() >= self.cfg.queue_limit {
            return Err(RequestError::QueueFull {
                waiting: self.queue.len(),
            });
        }
        // Behind every request of its priority or higher, ahead of the rest.
        let at = self
            .queue
            .partition_point(|w| w.req.priority >= req.priority);
        self.queue.insert(at, Waiting { req, reported: 0 });
        Ok(at + 1)
    }

    /// Whether the next request would be refused for the queue's length.
    pub fn queue_is_full(&self) -> bool {
        self.queue.len() >= self.cfg.queue_limit
    }

    /// Removes a waiting request, if it is waiting (not yet admitted).
    pub fn cancel_queued(&mut self, key: RequestKey) {
        self.queue.retain(|w| w.req.key != key);
    }

    /// Waiting requests whose position is new or changed since they were last told.
    pub fn position_updates(&mut self) -> Vec<(RequestKey, usize)> {
        let mut out = Vec::new();
        for (i, w) in self.queue.iter_mut().enumerate() {
            if w.reported != i + 1 {
                w.reported = i + 1;
                out.push((w.req.key, i + 1));
            }
        }
        out
    }

    /// Admits waiting requests, in order, while slots and pages allow.
    #[cfg(test)]
    pub fn admit(&mut self) -> Vec<(Job, Admitted)> {
        std::iter::from_fn(|| self.admit_next()).collect()
    }

    /// Admits the request at the head of the queue if a slot and pages allow.
    /// Its ops are to be applied before the next admission: a load from host
    /// memory may fail (`load_failed`), and the next one may share its cells.
    pub fn admit_next(&mut self) -> Option<(Job, Admitted)> {
        if self.active.len() >= self.cfg.slots {
            return None;
        }
        let head = self.queue.pop_front()?;
        match self.try_admit(&head.req) {
            Some(admitted) => Some((head.req, admitted)),
            None => {
                self.queue.push_front(head);
                None
            }
        }
    }

    fn try_admit(&mut self, req: &Job) -> Option<Admitted> {
        let limit = (req.tokens.len() + req.max_tokens).min(self.capacity());
        let need = self.kv.pages_for(limit);
        // At least one prompt token is always decoded, for its logits.
        let reusable = (req.tokens.len() - 1) / self.cfg.page_size;
        let mut hit = self.cache.lookup(&req.tokens, reusable);
        let mut ops = Vec::new();
        if let Some((id, k)) = self.host.lookup(&req.tokens, reusable)
            && k > hit.map_or(0, |h| h.1)
            && let Some(seq) = self.load_from_host(id, need - k, &mut ops)
        {
            hit = Some((seq, k));
        }
        let shared: Vec<PageId> = hit.map_or_else(Vec::new, |(src, k)| {
            self.cache.get(src).unwrap().held[..k].to_vec()
        });
        let shared_cached = shared.iter().filter(|&&id| self.kv.only_cached(id)).count();
        let reclaimable = self.kv.usage().cached - shared_cached;
        if self.kv.free_count() + reclaimable < need - shared.len() {
            debug_assert!(
                ops.is_empty(),
                "a load from host memory is only planned to admit"
            );
            return None;
        }
        let seq = match self.free_seqs.pop() {
            Some(s) => s,
            None => {
                // Every id is held by the cache: free one, not the one we copy from.
                let victim = match self.cache.lru(hit.map(|h| h.0)) {
                    Some(v) => v,
                    None => {
                        hit = None;
                        self.cache.lru(None)?
                    }
                };
                ops.extend(self.evict(victim));
                self.free_seqs.pop().expect("eviction frees a sequence id")
            }
        };
        let shared = if hit.is_some() { shared } else { Vec::new() };
        let mut cached_tokens = 0;
        if let Some((src, k)) = hit {
            cached_tokens = k * self.cfg.page_size;
            ops.push(MemOp::Copy {
                src,
                dst: seq,
                len: cached_tokens,
            });
            self.kv.retain_active(&shared);
            self.cache.touch(src);
        }
        let fresh = need - shared.len();
        while self.kv.free_count() < fresh {
            let victim = self
                .cache
                .lru(None)
                .expect("admission counted enough reclaimable pages");
            ops.extend(self.evict(victim));
        }
        let mut pages = shared;
        pages.extend(self.kv.alloc(fresh).expect("pages were made free"));
        self.active.insert(req.key, Active { seq, pages });
        Some(Admitted {
            seq,
            cached_tokens,
            limit,
            ops,
        })
    }

    /// Plans loading host entry `id` back into cells, as an entry of the
    /// cells' cache under a sequence id of its own, when that leaves a
    /// sequence id and `then` more pages for the request that asked: its
    /// sequence, or `None` (nothing planned).
    fn load_from_host(&mut self, id: HostId, then: usize, ops: &mut Vec<MemOp>) -> Option<SeqId> {
        let tokens = self.host.tokens(id).to_vec();
        let pages = self.kv.pages_for(tokens.len());
        let ids = self.free_seqs.len() + self.cache.len();
        if ids < 2 || self.kv.free_count() + self.kv.usage().cached < pages + then {
            return None;
        }
        if self.free_seqs.is_empty() || self.cache.len() >= self.cfg.cache_entries {
            let victim = self.cache.lru(None).expect("ids are held by the cache");
            ops.extend(self.evict(victim));
        }
        while self.kv.free_count() < pages {
            let victim = self.cache.lru(None).expect("counted above");
            ops.extend(self.evict(victim));
        }
        let seq = self.enter(tokens).expect("made free above");
        self.host.touch(id);
        self.changes += 1;
        ops.push(MemOp::Load { id, seq });
        Some(seq)
    }

    /// How many times the prefix cache has changed so far.
    pub fn cache_changes(&self) -> u64 {
        self.changes
    }

    /// Takes an entry out of the cells: a copy goes to host memory first,
    /// unless host memory is off or holds it already.
    fn evict(&mut self, seq: SeqId) -> Vec<MemOp> {
        let tokens = &self.cache.get(seq).expect("evicting a cached entry").tokens;
        let mut ops = Vec::new();
        if self.host.enabled() && !self.host.covers(tokens) {
            ops.push(MemOp::Save {
                seq,
                tokens: tokens.clone(),
            });
        }
        ops.push(self.drop_entry(seq));
        ops
    }

    /// Takes an entry out of the cells, without a copy.
    fn drop_entry(&mut self, seq: SeqId) -> MemOp {
        self.changes += 1;
        let entry = self.cache.remove(seq).expect("evicting a cached entry");
        self.kv.release_cached(&entry.held);
        self.free_seqs.push(seq);
        MemOp::Remove { seq, from: 0 }
    }

    /// While `BUSY` requests or more run, moves every cached prefix that none
    /// of them shares a page with out of the cells to host memory.
    pub fn spill_idle(&mut self) -> Vec<MemOp> {
        if !self.host.enabled() || self.active.len() < BUSY {
            return Vec::new();
        }
        let idle: Vec<SeqId> = self
            .cache
            .iter()
            .filter(|(_, e)| e.held.iter().all(|&id| self.kv.only_cached(id)))
            .map(|(seq, _)| seq)
            .collect();
        idle.into_iter().flat_map(|seq| self.evict(seq)).collect()
    }

    /// The state a `MemOp::Save` copied out.
    pub fn keep_in_host(&mut self, tokens: Vec<Token>, state: State) {
        if self.host.insert(tokens, state) {
            self.changes += 1;
        }
    }

    /// The state of host entry `id`, for a `MemOp::Load`.
    pub fn host_state(&self, id: HostId) -> Option<&State> {
        self.host.state(id)
    }

    /// A `MemOp::Load` failed: host entry `id` goes, and so does the cells'
    /// entry `seq` it was loaded for (to apply: the returned op). Requests
    /// that were to share it hold its pages as their own and compute them.
    pub fn load_failed(&mut self, id: HostId, seq: SeqId) -> MemOp {
        self.host.remove(id);
        self.drop_entry(seq)
    }

    /// A request ended; `decoded` are the tokens whose cells its sequence
    /// holds. Its whole pages become a prefix-cache entry (unless already
    /// cached), the rest is freed.
    pub fn finish(&mut self, key: RequestKey, decoded: &[Token]) -> Vec<MemOp> {
        let Some(a) = self.active.remove(&key) else {
            return Vec::new();
        };
        let p = self.cfg.page_size;
        let full = (decoded.len() / p).min(a.pages.len());
        let tokens = &decoded[..full * p];
        let mut ops = Vec::new();
        let keep = self.cfg.cache_entries > 0 && full > 0 && !self.cache.covers(tokens);
        if keep {
            for redundant in self.cache.prefixes_of(tokens) {
                ops.push(self.drop_entry(redundant));
            }
            while self.cache.len() >= self.cfg.cache_entries {
                let victim = self.cache.lru(None).expect("cache is not empty");
                ops.extend(self.evict(victim));
            }
            self.kv.retain_cached(&a.pages[..full]);
            self.cache
                .insert(a.seq, tokens.to_vec(), a.pages[..full].to_vec());
            self.changes += 1;
            ops.push(MemOp::Remove {
                seq: a.seq,
                from: full * p,
            });
        } else {
            ops.push(MemOp::Remove {
                seq: a.seq,
                from: 0,
            });
            self.free_seqs.push(a.seq);
        }
        self.kv.release_active(&a.pages);
        ops
    }

    /// Cached prefixes in cells, the most recently used first: (sequence, tokens).
    pub fn cached(&self) -> Vec<(SeqId, &[Token])> {
        self.cache
            .by_recency()
            .into_iter()
            .map(|(seq, e)| (seq, e.tokens.as_slice()))
            .collect()
    }

    /// Cached prefixes in host memory that the cells do not hold too, the
    /// most recently used first: (tokens, state).
    pub fn cached_in_host(&self) -> Vec<(&[Token], &State)> {
        self.host
            .by_recency()
            .into_iter()
            .filter(|(tokens, _)| !self.cache.covers(tokens))
            .collect()
    }

    /// Takes in a prefix restored from a saved state: a sequence id and whole
    /// pages for `tokens`, as a cache entry whose cells the engine then loads.
    /// `None` (nothing changed) when it is not whole pages, is already covered,
    /// or when no entry, sequence id or page is free: a restored prefix never
    /// pushes out anything.
    pub fn adopt(&mut self, tokens: &[Token]) -> Option<SeqId> {
        let p = self.cfg.page_size;
        if tokens.is_empty()
            || !tokens.len().is_multiple_of(p)
            || self.cache.len() >= self.cfg.cache_entries
            || self.cache.covers(tokens)
        {
            return None;
        }
        self.enter(tokens.to_vec())
    }

    /// A cache entry for `tokens` (whole pages) on a free sequence id and
    /// free pages, whose cells the engine then loads; `None` (nothing
    /// changed) when either is short.
    fn enter(&mut self, tokens: Vec<Token>) -> Option<SeqId> {
        if self.free_seqs.is_empty() {
            return None;
        }
        let pages = self.kv.alloc(self.kv.pages_for(tokens.len()))?;
        let seq = self.free_seqs.pop().expect("checked above");
        self.kv.retain_cached(&pages);
        self.kv.release_active(&pages);
        self.cache.insert(seq, tokens, pages);
        Some(seq)
    }

    /// Drops a cached prefix (a restore that failed).
    pub fn forget(&mut self, seq: SeqId) -> MemOp {
        self.drop_entry(seq)
    }

    /// Frees the least recently used cached prefix in cells (llama.cpp found
    /// no room for a batch after all); `None` when there is none.
    pub fn evict_lru(&mut self) -> Option<Vec<MemOp>> {
        let victim = self.cache.lru(None)?;
        Some(self.evict(victim))
    }

    /// Page invariant plus: every sequence id is exactly one of free, active, cached.
    pub fn check(&self) -> Result<(), String> {
        self.kv.check()?;
        let ids = self.free_seqs.len() + self.active.len() + self.cache.len();
        if ids != self.n_seq_max() {
            return Err(format!(
                "{ids} sequence ids accounted, {} exist",
                self.n_seq_max()
            ));
        }
        let active_pages: usize = self.active.values().map(|a| a.pages.len()).sum();
        if active_pages < self.kv.usage().owned {
            return Err("owned pages without an owner".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(n_ctx: usize, slots: usize, entries: usize) -> Scheduler {
        Scheduler::new(Config {
            n_ctx,
            page_size: 4,
            slots,
            cache_entries: entries,
            host_bytes: 0,
            queue_limit: 3,
        })
    }

    fn req(key: RequestKey, tokens: Vec<Token>, max_tokens: usize) -> Job {
        Job {
            key,
            tokens,
            max_tokens,
            priority: 0,
        }
    }

    fn prompt(n: usize, seed: i32) -> Vec<Token> {
        (0..n as i32).map(|i| i + seed * 1000).collect()
    }

    #[test]
    fn admits_in_order_and_queues_the_rest() {
        let mut s = sched(64, 2, 4);
        for k in 1..=3 {
            assert_eq!(s.submit(req(k, prompt(4, k as i32), 4)), Ok(k as usize));
        }
        let admitted = s.admit();
        assert_eq!(
            admitted.iter().map(|(r, _)| r.key).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(s.queued(), 1);
        assert_eq!(s.position_updates(), vec![(3, 1)]);
        assert_eq!(s.usage().owned, 4);
        s.finish(1, &prompt(4, 1));
        let admitted = s.admit();
        assert_eq!(admitted[0].0.key, 3);
        s.check().unwrap();
    }

    #[test]
    fn higher_priority_goes_first_and_arrival_order_holds_within_a_level() {
        let mut s = Scheduler::new(Config {
            queue_limit: 8,
            ..sched(256, 1, 4).cfg
        });
        let mut with = |key: RequestKey, priority: i32| {
            let job = Job {
                priority,
                ..req(key, prompt(4, key as i32), 4)
            };
            s.submit(job).unwrap()
        };
        assert_eq!(with(1, 0), 1);
        assert_eq!(with(2, 0), 2);
        assert_eq!(with(3, 5), 1, "ahead of the lower level");
        assert_eq!(with(4, 5), 2, "behind its own level");
        assert_eq!(with(5, -1), 5);
        let order: Vec<RequestKey> = std::iter::from_fn(|| {
            let admitted = s.admit().pop().map(|(j, _)| j.key);
            if let Some(k) = admitted {
                s.finish(k, &[]);
            }
            admitted
        })
        .collect();
        assert_eq!(order, [3, 4, 1, 2, 5]);
    }

    #[test]
    fn rejects_what_never_fits_and_a_full_queue() {
        let mut s = sched(16, 1, 1);
        assert_eq!(
            s.submit(req(1, prompt(16, 0), 1)),
            Err(RequestError::ContextOverflow {
                prompt_tokens: 16,
                capacity: 16
            })
        );
        for k in 0..3 {
            assert!(s.submit(req(k, prompt(2, 0), 1)).is_ok());
        }
        assert_eq!(
            s.submit(req(9, prompt(2, 0), 1)),
            Err(RequestError::QueueFull { waiting: 3 })
        );
    }

    #[test]
    fn a_pool_that_is_not_a_whole_number_of_pages_still_admits_the_largest_request() {
        let mut s = sched(30, 1, 1); // 7 whole pages of 4: 28 usable cells
        assert!(s.submit(req(1, prompt(28, 0), 1)).is_err());
        s.submit(req(2, prompt(27, 0), 100)).unwrap();
        let (_, a) = s.admit().remove(0);
        assert_eq!(a.limit, 28);
    }

    #[test]
    fn waits_for_pages_then_runs() {
        let mut s = sched(32, 2, 0); // 8 pages
        s.submit(req(1, prompt(10, 1), 10)).unwrap(); // 5 pages
        s.submit(req(2, prompt(10, 2), 10)).unwrap(); // 5 pages: must wait
        assert_eq!(s.admit().len(), 1);
        assert!(s.admit().is_empty());
        s.finish(1, &prompt(12, 1));
        assert_eq!(s.admit().len(), 1);
        s.check().unwrap();
    }

    #[test]
    fn finished_prefix_is_reused_by_the_next_request() {
        let mut s = sched(64, 1, 4);
        let system = prompt(10, 7);
        s.submit(req(1, system.clone(), 4)).unwrap();
        let (_, a) = s.admit().remove(0);
        assert_eq!(a.cached_tokens, 0);
        // 10 prompt + 3 generated decoded: 3 whole pages are kept.
        let mut decoded = system.clone();
        decoded.extend([1, 2, 3]);
        let ops = s.finish(1, &decoded);
        assert_eq!(
            ops,
            vec![MemOp::Remove {
                seq: a.seq,
                from: 12
            }]
        );
        assert_eq!(s.usage().cached, 3);

        let mut next = system.clone();
        next.extend([42, 43, 44]);
        s.submit(req(2, next, 4)).unwrap();
        let (_, b) = s.admit().remove(0);
        assert_eq!(b.cached_tokens, 8); // 10 shared tokens: 2 whole pages
        assert_eq!(
            b.ops,
            vec![MemOp::Copy {
                src: a.seq,
                dst: b.seq,
                len: 8
            }]
        );
        s.check().unwrap();
    }

    #[test]
    fn the_whole_prompt_is_never_reused() {
        let mut s = sched(64, 1, 4);
        s.submit(req(1, prompt(8, 1), 4)).unwrap();
        s.admit();
        s.finish(1, &prompt(8, 1));
        s.submit(req(2, prompt(8, 1), 4)).unwrap();
        let (_, b) = s.admit().remove(0);
        assert_eq!(
            b.cached_tokens, 4,
            "the last prompt token must be decoded for logits"
        );
    }

    #[test]
    fn cached_prefixes_are_evicted_lru_only_when_pages_are_needed() {
        let mut s = sched(32, 1, 8); // 8 pages
        for k in 1..=3 {
            s.submit(req(k, prompt(8, k as i32), 1)).unwrap();
            s.admit();
            s.finish(k, &prompt(8, k as i32));
        }
        assert_eq!(
            s.usage(),
            Usage {
                owned: 0,
                cached: 6,
                free: 2
            }
        );
        // Needs 4 pages: the oldest entry (2 pages) goes, the others stay.
        s.submit(req(9, prompt(15, 9), 1)).unwrap();
        let (_, a) = s.admit().remove(0);
        assert_eq!(a.ops, vec![MemOp::Remove { seq: 0, from: 0 }]);
        assert_eq!(s.usage().cached, 4);
        s.check().unwrap();
    }

    #[test]
    fn restored_prefixes_are_ordinary_entries_and_push_nothing_out() {
        let mut s = sched(32, 1, 2); // 8 pages, 2 entries
        let a = s.adopt(&prompt(8, 1)).unwrap();
        assert_eq!(s.adopt(&prompt(8, 1)), None, "already covered");
        assert_eq!(s.adopt(&prompt(6, 2)), None, "not whole pages");
        let b = s.adopt(&prompt(4, 3)).unwrap();
        assert_eq!(s.adopt(&prompt(4, 4)), None, "no entry free");
        assert_eq!(s.usage().cached, 3);
        assert_eq!(
            s.cached().iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            [b, a],
            "most recent first"
        );
        s.check().unwrap();
        // A request with that prefix reuses it.
        let mut next = prompt(8, 1);
        next.extend([5, 6]);
        s.submit(req(1, next, 2)).unwrap();
        let (_, admitted) = s.admit().remove(0);
        assert_eq!(admitted.cached_tokens, 8);
        assert_eq!(s.forget(b), MemOp::Remove { seq: b, from: 0 });
        s.check().unwrap();
    }

    /// The cells each sequence holds, as llama.cpp would after the ops: they
    /// check that the engine can apply them in order.
    #[derive(Default)]
    struct Cells(HashMap<SeqId, usize>);

    impl Cells {
        /// Applies `ops`, failing loads when `fail_loads`; false if one failed.
        fn run(&mut self, s: &mut Scheduler, ops: Vec<MemOp>, fail_loads: bool) -> bool {
            let mut ok = true;
            for op in ops {
                match op {
                    MemOp::Copy { src, dst, len } => {
                        let held = self.0.get(&src).copied().unwrap_or(0);
                        assert!(
                            held >= len || !ok,
                            "copy of {len} from {src} holding {held}: {:?} host {}",
                            self.0,
                            s.host.len()
                        );
                        assert_eq!(self.0.get(&dst).copied().unwrap_or(0), 0, "copy into {dst}");
                        self.0.insert(dst, len.min(held));
                    }
                    MemOp::Remove { seq, from } => {
                        let held = self.0.entry(seq).or_default();
                        *held = (*held).min(from);
                    }
                    MemOp::Save { seq, tokens } => {
                        assert_eq!(self.0.get(&seq).copied().unwrap_or(0), tokens.len());
                        let state = std::sync::Arc::new(vec![0; tokens.len()]);
                        s.keep_in_host(tokens, state);
                    }
                    MemOp::Load { id, seq } => {
                        assert_eq!(self.0.get(&seq).copied().unwrap_or(0), 0, "load into {seq}");
                        if fail_loads || s.host.state(id).is_none() {
                            let op = s.load_failed(id, seq);
                            self.run(s, vec![op], false);
                            ok = false;
                        } else {
                            self.0.insert(seq, s.host.tokens(id).len());
                        }
                    }
                }
            }
            ok
        }
    }

    fn with_host(n_ctx: usize, slots: usize, entries: usize) -> Scheduler {
        Scheduler::new(Config {
            host_bytes: 1 << 20,
            ..sched(n_ctx, slots, entries).cfg
        })
    }

    #[test]
    fn idle_prefixes_move_to_host_memory_only_while_several_requests_run() {
        let mut s = with_host(64, 2, 4);
        let mut cells = Cells::default();
        let system = prompt(10, 7);
        s.submit(req(1, system.clone(), 4)).unwrap();
        let (_, a) = s.admit().remove(0);
        cells.run(&mut s, a.ops, false);
        cells.0.insert(a.seq, 12);
        let ops = s.finish(1, &system[..8]);
        cells.run(&mut s, ops, false);
        assert!(s.spill_idle().is_empty(), "nothing runs: it stays in cells");
        // Two running requests that share nothing with it: it moves out.
        for k in [2, 3] {
            s.submit(req(k, prompt(6, k as i32), 4)).unwrap();
        }
        for (_, b) in s.admit() {
            cells.run(&mut s, b.ops, false);
        }
        let ops = s.spill_idle();
        assert_eq!(
            ops,
            vec![
                MemOp::Save {
                    seq: a.seq,
                    tokens: system[..8].to_vec()
                },
                MemOp::Remove {
                    seq: a.seq,
                    from: 0
                }
            ]
        );
        cells.run(&mut s, ops, false);
        let st = s.status().kv;
        assert_eq!((st.prefix_entries, st.prefix_host_entries), (0, 1));
        assert_eq!(s.usage().cached, 0, "its pages are free");
        s.check().unwrap();
    }

    /// A scheduler with `slots` whose host memory holds `system`.
    fn with_host_prefix(slots: usize, system: &[Token]) -> (Scheduler, Cells) {
        let mut s = with_host(64, slots, 4);
        s.keep_in_host(system.to_vec(), std::sync::Arc::new(vec![0; 3]));
        (s, Cells::default())
    }

    #[test]
    fn a_prefix_in_host_memory_is_loaded_back_and_shared_from_cells() {
        let system = prompt(8, 7);
        let (mut s, mut cells) = with_host_prefix(3, &system);
        let mut first = system.clone();
        first.extend([1, 2]);
        s.submit(req(1, first.clone(), 4)).unwrap();
        s.submit(req(2, first, 4)).unwrap();
        let admitted = s.admit();
        let (_, a) = &admitted[0];
        let entry = match a.ops[0] {
            MemOp::Load { seq, .. } => seq,
            ref other => panic!("expected a load first, got {other:?}"),
        };
        assert_eq!(
            a.ops[1..],
            [MemOp::Copy {
                src: entry,
                dst: a.seq,
                len: 8
            }]
        );
        assert_eq!(a.cached_tokens, 8);
        let (_, b) = &admitted[1];
        assert_eq!(
            b.ops,
            [MemOp::Copy {
                src: entry,
                dst: b.seq,
                len: 8
            }],
            "the second shares the cells the first loaded"
        );
        for (_, x) in admitted {
            assert!(cells.run(&mut s, x.ops, false));
        }
        assert!(s.spill_idle().is_empty(), "both share it");
        // Once neither shares it, it leaves the cells again: no second copy.
        let ops = s.finish(1, &[]);
        cells.run(&mut s, ops, false);
        let ops = s.finish(2, &[]);
        cells.run(&mut s, ops, false);
        s.submit(req(3, prompt(4, 1), 4)).unwrap();
        s.submit(req(4, prompt(4, 2), 4)).unwrap();
        for (_, x) in s.admit() {
            cells.run(&mut s, x.ops, false);
        }
        assert_eq!(
            s.spill_idle(),
            [MemOp::Remove {
                seq: entry,
                from: 0
            }]
        );
        s.check().unwrap();
    }

    #[test]
    fn a_failed_load_leaves_the_request_its_pages_to_compute() {
        let system = prompt(8, 7);
        let (mut s, mut cells) = with_host_prefix(2, &system);
        let mut first = system.clone();
        first.push(1);
        s.submit(req(1, first, 4)).unwrap();
        let (_, a) = s.admit().remove(0);
        assert_eq!(a.cached_tokens, 8);
        assert!(!cells.run(&mut s, a.ops, true));
        let st = s.status().kv;
        assert_eq!((st.prefix_entries, st.prefix_host_entries), (0, 0));
        assert_eq!(s.usage().owned, 4, "9 prompt + 4 reply: its own 4 pages");
        s.check().unwrap();
        s.finish(1, &[]);
        assert_eq!(s.usage().free, 16);
    }

    /// Property test: random submit/admit/abort/finish/evict sequences keep
    /// every page and sequence id accounted for, and all pages come back.
    #[test]
    fn random_operations_keep_the_page_invariant() {
        let mut rng = 0x2545F4914F6CDD1Du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for round in 0..400 {
            // Half the rounds with host memory, whose loads fail now and then.
            let host = round % 2 == 1;
            let mut s = if host {
                // Room for a few entries: host memory evicts too.
                Scheduler::new(Config {
                    host_bytes: 64,
                    ..sched(128, 3, 5).cfg
                })
            } else {
                sched(128, 3, 5)
            };
            let mut cells = Cells::default();
            let mut running: Vec<(RequestKey, Vec<Token>)> = Vec::new();
            for key in 0..60u64 {
                match next() % 5 {
                    0 | 1 => {
                        // Prompts drawn from a few families so prefixes repeat.
                        let family = (next() % 3) as i32;
                        let len = 1 + (next() % 40) as usize;
                        let _ = s.submit(req(key, prompt(len, family), 1 + (next() % 30) as usize));
                    }
                    2 => {
                        if let Some(i) =
                            (!running.is_empty()).then(|| next() as usize % running.len())
                        {
                            let (k, toks) = running.swap_remove(i);
                            let keep = next() as usize % (toks.len() + 1);
                            let ops = s.finish(k, &toks[..keep]);
                            cells.run(&mut s, ops, false);
                        }
                    }
                    3 => {
                        if let Some(ops) = s.evict_lru() {
                            cells.run(&mut s, ops, false);
                        }
                        let ops = s.spill_idle();
                        cells.run(&mut s, ops, false);
                    }
                    _ => {
                        s.cancel_queued(next() % key.max(1));
                    }
                }
                while let Some((r, a)) = s.admit_next() {
                    assert!(a.cached_tokens < r.tokens.len());
                    cells.run(&mut s, a.ops, next() % 7 == 0);
                    // What the request's sequence holds after its decodes.
                    cells.0.insert(a.seq, r.tokens.len());
                    running.push((r.key, r.tokens));
                }
                s.check().unwrap();
            }
            for (k, toks) in running.drain(..) {
                s.finish(k, &toks);
            }
            while s.evict_lru().is_some() {}
            s.check().unwrap();
            assert_eq!(s.usage().free, 32, "every page is back");
        }
    }
}

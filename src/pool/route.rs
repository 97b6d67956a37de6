//! Which worker a request goes to. Sans-I/O and unit-tested.
//!
//! A prompt is cut into 256-byte blocks, each hashed together with all the
//! blocks before it, so equal hashes mean equal prefixes. The router keeps,
//! per worker, the block hashes it recently sent there (what that worker's
//! prefix cache most likely holds, an upstream's or our own) and prefers the
//! worker that shares the longest prefix with the request, as long as it has
//! a free place; otherwise the least loaded worker takes it.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::core::PromptInput;

/// Bytes per prefix block.
pub const BLOCK: usize = 256;
/// Blocks hashed per prompt: prefixes past 8 KiB count as 8 KiB.
const MAX_BLOCKS: usize = 32;
/// Block hashes remembered per worker.
const REMEMBERED: usize = 1024;

pub use crate::config::Routing as Policy;

/// The prefix hashes of a prompt, one per whole block.
pub fn prefix_hashes(input: &PromptInput) -> Vec<u64> {
    let mut bytes = Vec::new();
    match input {
        PromptInput::Text(t) => bytes.extend_from_slice(t.as_bytes()),
        PromptInput::Messages(msgs) => {
            for m in msgs {
                bytes.extend_from_slice(m.role.as_str().as_bytes());
                bytes.push(0);
                bytes.extend_from_slice(m.content.as_bytes());
                bytes.push(0);
            }
        }
    }
    let mut hasher = DefaultHasher::new();
    bytes
        .chunks_exact(BLOCK)
        .take(MAX_BLOCKS)
        .map(|block| {
            block.hash(&mut hasher);
            hasher.finish()
        })
        .collect()
}

/// A worker as the router sees it at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// In rotation and able to take this kind of request.
    pub eligible: bool,
    /// Requests it holds now (running and queued).
    pub load: usize,
    /// Requests it runs at once.
    pub capacity: usize,
}

/// Where a request goes, and whether for its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub worker: usize,
    /// Blocks of its prompt the worker was sent before.
    pub shared_blocks: usize,
}

#[derive(Debug, Default)]
pub struct Router {
    policy: Policy,
    /// Per worker: hash -> last use, and the order of use.
    seen: Vec<Remembered>,
    next: usize,
}

#[derive(Debug, Default)]
struct Remembered {
    tick: u64,
    at: HashMap<u64, u64>,
    order: VecDeque<(u64, u64)>,
}

impl Remembered {
    fn insert(&mut self, hash: u64) {
        self.tick += 1;
        self.at.insert(hash, self.tick);
        self.order.push_back((hash, self.tick));
        while self.at.len() > REMEMBERED {
            let Some((old, tick)) = self.order.pop_front() else {
                break;
            };
            if self.at.get(&old) == Some(&tick) {
                self.at.remove(&old);
            }
        }
        // Stale entries (re-inserted since) do not let the queue grow unbounded.
        if self.order.len() > 4 * REMEMBERED {
            self.order.retain(|(h, t)| self.at.get(h) == Some(t));
        }
    }

    /// How many leading blocks of `hashes` this worker was sent.
    fn shared(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .rposition(|h| self.at.contains_key(h))
            .map_or(0, |i| i + 1)
    }
}

impl Router {
    pub fn new(policy: Policy, workers: usize) -> Router {
        Router {
            policy,
            seen: (0..workers).map(|_| Remembered::default()).collect(),
            next: 0,
        }
    }

    /// Picks a worker among the eligible ones; `None` when there is none.
    pub fn choose(&mut self, hashes: &[u64], workers: &[Candidate]) -> Option<Choice> {
        let eligible = || workers.iter().enumerate().filter(|(_, w)| w.eligible);
        // Ties go to the worker with the fewest prefixes remembered: a new
        // prompt goes where it evicts least.
        let least_loaded = || {
            eligible()
                .min_by(|(a, x), (b, y)| {
                    let (lx, ly) = (x.load * y.capacity.max(1), y.load * x.capacity.max(1));
                    lx.cmp(&ly)
                        .then(self.remembered(*a).cmp(&self.remembered(*b)))
                        .then(a.cmp(b))
                })
                .map(|(i, _)| i)
        };
        let worker = match self.policy {
            Policy::RoundRobin => {
                let n = workers.len();
                let i = (0..n)
                    .map(|k| (self.next + k) % n)
                    .find(|&i| workers[i].eligible)?;
                self.next = i + 1;
                i
            }
            Policy::LeastLoaded => least_loaded()?,
            Policy::Prefix => {
                let best = eligible()
                    .filter(|(_, w)| w.load < w.capacity)
                    .map(|(i, _)| (i, self.shared(i, hashes)))
                    .filter(|&(_, shared)| shared > 0)
                    .max_by(|(a, x), (b, y)| x.cmp(y).then(b.cmp(a)));
                match best {
                    Some((i, _)) => i,
                    None => least_loaded()?,
                }
            }
        };
        Some(Choice {
            worker,
            shared_blocks: self.shared(worker, hashes),
        })
    }

    /// Remembers that `worker` was sent these prefix blocks.
    pub fn sent(&mut self, worker: usize, hashes: &[u64]) {
        if let Some(seen) = self.seen.get_mut(worker) {
            for &h in hashes {
                seen.insert(h);
            }
        }
    }

    /// A worker restarted (or came back): its cache is empty.
    pub fn forget(&mut self, worker: usize) {
        if let Some(seen) = self.seen.get_mut(worker) {
            *seen = Remembered::default();
        }
    }

    fn remembered(&self, worker: usize) -> usize {
        self.seen.get(worker).map_or(0, |s| s.at.len())
    }

    fn shared(&self, worker: usize, hashes: &[u64]) -> usize {
        self.seen.get(worker).map_or(0, |s| s.shared(hashes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{ChatMessage, Role};

    fn free(load: usize) -> Candidate {
        Candidate {
            eligible: true,
            load,
            capacity: 4,
        }
    }

    fn text(prefix: char, len: usize, tail: &str) -> PromptInput {
        PromptInput::Text(format!("{}{tail}", prefix.to_string().repeat(len)))
    }

    #[test]
    fn equal_prefixes_hash_alike_block_by_block() {
        let a = prefix_hashes(&text('a', 600, "one question"));
        let b = prefix_hashes(&text('a', 600, "another question, longer"));
        assert_eq!(a.len(), 2);
        assert_eq!(a, b[..2]);
        let c = prefix_hashes(&text('b', 600, ""));
        assert_ne!(a[0], c[0]);
        // Shorter than a block: nothing to share.
        assert!(prefix_hashes(&text('a', 100, "")).is_empty());
        // Messages hash their roles too.
        let msg = |role| {
            PromptInput::Messages(vec![ChatMessage {
                role,
                content: "x".repeat(300),
            }])
        };
        assert_ne!(
            prefix_hashes(&msg(Role::System)),
            prefix_hashes(&msg(Role::User))
        );
    }

    #[test]
    fn a_prompt_goes_where_its_prefix_went() {
        let mut r = Router::new(Policy::Prefix, 2);
        let a = prefix_hashes(&text('a', 800, ""));
        let b = prefix_hashes(&text('b', 800, ""));
        let first = r.choose(&a, &[free(0), free(0)]).unwrap();
        assert_eq!(
            first,
            Choice {
                worker: 0,
                shared_blocks: 0
            }
        );
        r.sent(0, &a);
        // b goes to the least loaded; a follows its prefix even to the busier one.
        assert_eq!(r.choose(&b, &[free(1), free(0)]).unwrap().worker, 1);
        r.sent(1, &b);
        assert_eq!(
            r.choose(&a, &[free(2), free(0)]).unwrap(),
            Choice {
                worker: 0,
                shared_blocks: 3
            }
        );
        assert_eq!(r.choose(&b, &[free(0), free(3)]).unwrap().worker, 1);
    }

    #[test]
    fn a_full_or_ineligible_worker_loses_its_affinity() {
        let mut r = Router::new(Policy::Prefix, 2);
        let a = prefix_hashes(&text('a', 800, ""));
        r.sent(0, &a);
        // Worker 0 has no free place: the other takes it.
        assert_eq!(r.choose(&a, &[free(4), free(1)]).unwrap().worker, 1);
        let down = Candidate {
            eligible: false,
            ..free(0)
        };
        assert_eq!(r.choose(&a, &[down, free(3)]).unwrap().worker, 1);
        assert_eq!(r.choose(&a, &[down, down]), None);
        // After a restart its cache is gone: nothing draws a to it.
        r.forget(0);
        assert_eq!(r.choose(&a, &[free(1), free(0)]).unwrap().worker, 1);
    }

    #[test]
    fn least_loaded_counts_capacity_and_round_robin_skips_the_down() {
        let mut r = Router::new(Policy::LeastLoaded, 2);
        let big = Candidate {
            eligible: true,
            load: 3,
            capacity: 8,
        };
        // 3 of 8 is less loaded than 2 of 4.
        assert_eq!(r.choose(&[], &[free(2), big]).unwrap().worker, 1);
        let mut r = Router::new(Policy::RoundRobin, 3);
        let down = Candidate {
            eligible: false,
            ..free(0)
        };
        let ws = [free(0), down, free(0)];
        let picks: Vec<usize> = (0..4).map(|_| r.choose(&[], &ws).unwrap().worker).collect();
        assert_eq!(picks, [0, 2, 0, 2]);
    }

    #[test]
    fn memory_per_worker_is_bounded() {
        let mut r = Router::new(Policy::Prefix, 1);
        for i in 0..(10 * REMEMBERED as u64) {
            r.sent(0, &[i]);
        }
        assert_eq!(r.seen[0].at.len(), REMEMBERED);
        assert!(r.seen[0].order.len() <= 4 * REMEMBERED + 1);
        assert_eq!(r.shared(0, &[10 * REMEMBERED as u64 - 1]), 1);
        assert_eq!(r.shared(0, &[0]), 0);
    }
}

//! Accounting for the KV cache in pages.
//!
//! llama.cpp reserves one unified pool of `ctx_size` cells at start-up; we
//! account for it in pages of `page_size` cells so that admission control can
//! promise a request its memory before it starts. A page is referenced by
//! active requests and/or by prefix-cache entries; it is *owned* while any
//! request references it, *cached* while only the cache does, *free*
//! otherwise. owned + cached + free = total, always (`check`).
//!
//! Sans-I/O: plain counters, no llama.cpp. The engine mirrors every change on
//! the real cache (llama_memory_seq_cp / seq_rm); since shared pages are shared
//! cells there, the real cache never holds more cells than pages allow.

pub type PageId = u32;

#[derive(Debug, Clone, Copy, Default)]
struct Page {
    active: u32,
    cached: u32,
}

#[derive(Debug)]
pub struct KvPages {
    page_size: usize,
    pages: Vec<Page>,
    free: Vec<PageId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub owned: usize,
    pub cached: usize,
    pub free: usize,
}

impl KvPages {
    pub fn new(n_cells: usize, page_size: usize) -> KvPages {
        let n = n_cells / page_size;
        KvPages {
            page_size,
            pages: vec![Page::default(); n],
            free: (0..n as PageId).rev().collect(),
        }
    }

    pub fn total(&self) -> usize {
        self.pages.len()
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Pages needed to hold `tokens` positions.
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size)
    }

    /// Takes `n` free pages for a request, or none if fewer are free.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<PageId>> {
        if n > self.free.len() {
            return None;
        }
        let ids = self.free.split_off(self.free.len() - n);
        for &id in &ids {
            self.pages[id as usize].active = 1;
        }
        Some(ids)
    }

    /// A request starts sharing pages that already exist (a cached prefix).
    pub fn retain_active(&mut self, ids: &[PageId]) {
        for &id in ids {
            self.pages[id as usize].active += 1;
        }
    }

    pub fn release_active(&mut self, ids: &[PageId]) {
        for &id in ids {
            let p = &mut self.pages[id as usize];
            assert!(
                p.active > 0,
                "page {id} released by a request that did not hold it"
            );
            p.active -= 1;
            self.free_if_unused(id);
        }
    }

    pub fn retain_cached(&mut self, ids: &[PageId]) {
        for &id in ids {
            self.pages[id as usize].cached += 1;
        }
    }

    pub fn release_cached(&mut self, ids: &[PageId]) {
        for &id in ids {
            let p = &mut self.pages[id as usize];
            assert!(
                p.cached > 0,
                "page {id} released by a cache entry that did not hold it"
            );
            p.cached -= 1;
            self.free_if_unused(id);
        }
    }

    /// Whether only the cache holds this page (evicting would free it).
    pub fn only_cached(&self, id: PageId) -> bool {
        let p = self.pages[id as usize];
        p.active == 0 && p.cached > 0
    }

    fn free_if_unused(&mut self, id: PageId) {
        let p = self.pages[id as usize];
        if p.active == 0 && p.cached == 0 {
            self.free.push(id);
        }
    }

    pub fn usage(&self) -> Usage {
        let owned = self.pages.iter().filter(|p| p.active > 0).count();
        let cached = self
            .pages
            .iter()
            .filter(|p| p.active == 0 && p.cached > 0)
            .count();
        Usage {
            owned,
            cached,
            free: self.free.len(),
        }
    }

    /// The page invariant: every page is exactly one of owned, cached, free,
    /// and the free list holds exactly the unreferenced pages, once each.
    pub fn check(&self) -> Result<(), String> {
        let u = self.usage();
        if u.owned + u.cached + u.free != self.total() {
            return Err(format!("{u:?} does not add up to {} pages", self.total()));
        }
        let mut seen = vec![false; self.total()];
        for &id in &self.free {
            let p = self.pages[id as usize];
            if p.active != 0 || p.cached != 0 || std::mem::replace(&mut seen[id as usize], true) {
                return Err(format!(
                    "page {id} is on the free list but in use or listed twice"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_share_and_release() {
        let mut kv = KvPages::new(64, 16);
        assert_eq!(kv.total(), 4);
        assert_eq!(kv.pages_for(17), 2);
        let a = kv.alloc(3).unwrap();
        assert!(kv.alloc(2).is_none());
        kv.retain_cached(&a[..2]);
        kv.release_active(&a);
        assert_eq!(
            kv.usage(),
            Usage {
                owned: 0,
                cached: 2,
                free: 2
            }
        );
        kv.retain_active(&a[..1]);
        assert_eq!(
            kv.usage(),
            Usage {
                owned: 1,
                cached: 1,
                free: 2
            }
        );
        assert!(!kv.only_cached(a[0]) && kv.only_cached(a[1]));
        kv.release_cached(&a[..2]);
        assert_eq!(
            kv.usage(),
            Usage {
                owned: 1,
                cached: 0,
                free: 3
            }
        );
        kv.release_active(&a[..1]);
        assert_eq!(kv.usage().free, 4);
        kv.check().unwrap();
    }
}

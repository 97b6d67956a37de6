//! The request table: which connection and client id each engine request
//! belongs to, in one place. Sans-I/O and unit-tested.
//!
//! A request enters when a session submits it and leaves when its final event
//! (`end` or `error`) is handled, or when the server fails everything at
//! shutdown. A connection that goes away detaches its requests: they are
//! cancelled but stay until the engine confirms the end, so every request is
//! counted exactly once whatever happens to its client.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::core::RequestKey;

/// A connection: its slab slot and a generation that tells it apart from
/// earlier connections in the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub slot: usize,
    pub generation: u64,
}

/// Where an engine event for a request goes.
#[derive(Debug)]
pub struct Route {
    /// `None` once its connection has gone.
    pub conn: Option<ConnId>,
    /// The client's id for it.
    pub id: String,
    pub cancel: Arc<AtomicBool>,
    /// When its last token event arrived (inter-token latency).
    pub last_token: Option<Instant>,
    /// The API it came through (`ws`, `openai`, `http`), for metrics.
    pub api: &'static str,
}

impl Route {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("a request with this id is already in flight on this connection")]
    Duplicate,
    #[error("this connection already has {0} requests in flight (the limit)")]
    TooMany(usize),
}

/// A newly opened request.
#[derive(Debug)]
pub struct Opened {
    pub key: RequestKey,
    pub id: String,
    pub cancel: Arc<AtomicBool>,
}

pub struct RequestTable {
    next_key: RequestKey,
    routes: HashMap<RequestKey, Route>,
    by_conn: HashMap<ConnId, HashMap<String, RequestKey>>,
    max_per_conn: usize,
}

impl RequestTable {
    pub fn new(max_per_conn: usize) -> RequestTable {
        RequestTable {
            next_key: 1,
            routes: HashMap::new(),
            by_conn: HashMap::new(),
            max_per_conn,
        }
    }

    /// Registers a request of `conn`; without an id it gets `req-N`, one
    /// that no request of the connection uses.
    pub fn open(
        &mut self,
        conn: ConnId,
        id: Option<&str>,
        api: &'static str,
    ) -> Result<Opened, Refused> {
        let ids = self.by_conn.entry(conn).or_default();
        if id.is_some_and(|id| ids.contains_key(id)) {
            return Err(Refused::Duplicate);
        }
        if ids.len() >= self.max_per_conn {
            return Err(Refused::TooMany(self.max_per_conn));
        }
        let key = self.next_key;
        self.next_key += 1;
        let id = match id {
            Some(id) => id.to_owned(),
            None => (0..)
                .map(|n| match n {
                    0 => format!("req-{key}"),
                    n => format!("req-{key}-{n}"),
                })
                .find(|id| !ids.contains_key(id))
                .expect("some id is free"),
        };
        let cancel = Arc::new(AtomicBool::new(false));
        ids.insert(id.clone(), key);
        self.routes.insert(
            key,
            Route {
                conn: Some(conn),
                id: id.clone(),
                cancel: cancel.clone(),
                last_token: None,
                api,
            },
        );
        Ok(Opened { key, id, cancel })
    }

    /// Whether `conn` has a request `id` in flight.
    pub fn has(&self, conn: ConnId, id: &str) -> bool {
        self.by_conn
            .get(&conn)
            .is_some_and(|ids| ids.contains_key(id))
    }

    pub fn get_mut(&mut self, key: RequestKey) -> Option<&mut Route> {
        self.routes.get_mut(&key)
    }

    /// Cancels `conn`'s request `id`, or all of them; unknown ids are
    /// ignored (abort is idempotent). Returns how many were cancelled.
    pub fn abort(&mut self, conn: ConnId, id: Option<&str>) -> usize {
        let Some(ids) = self.by_conn.get(&conn) else {
            return 0;
        };
        let keys: Vec<RequestKey> = match id {
            Some(id) => ids.get(id).copied().into_iter().collect(),
            None => ids.values().copied().collect(),
        };
        for key in &keys {
            if let Some(route) = self.routes.get(key) {
                route.cancel.store(true, Ordering::Relaxed);
            }
        }
        keys.len()
    }

    /// The request ended: forget it.
    pub fn finish(&mut self, key: RequestKey) -> Option<Route> {
        let route = self.routes.remove(&key)?;
        if let Some(conn) = route.conn
            && let Some(ids) = self.by_conn.get_mut(&conn)
        {
            ids.remove(&route.id);
            if ids.is_empty() {
                self.by_conn.remove(&conn);
            }
        }
        Some(route)
    }

    /// `conn` went away: its requests are cancelled and routed nowhere.
    /// Returns their ids.
    pub fn detach(&mut self, conn: ConnId) -> Vec<String> {
        let Some(ids) = self.by_conn.remove(&conn) else {
            return Vec::new();
        };
        ids.into_iter()
            .filter_map(|(id, key)| {
                let route = self.routes.get_mut(&key)?;
                route.cancel.store(true, Ordering::Relaxed);
                route.conn = None;
                Some(id)
            })
            .collect()
    }

    /// Takes every request out (the server ends them itself).
    pub fn drain(&mut self) -> Vec<(RequestKey, Route)> {
        self.by_conn.clear();
        self.routes.drain().collect()
    }

    pub fn in_flight(&self, conn: ConnId) -> usize {
        self.by_conn.get(&conn).map_or(0, HashMap::len)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ConnId = ConnId {
        slot: 0,
        generation: 1,
    };
    const B: ConnId = ConnId {
        slot: 1,
        generation: 2,
    };

    #[test]
    fn ids_are_per_connection_and_keys_never_repeat() {
        let mut t = RequestTable::new(8);
        let a = t.open(A, Some("r1"), "ws").unwrap();
        let b = t.open(B, Some("r1"), "ws").unwrap();
        assert_ne!(a.key, b.key);
        assert_eq!(t.open(A, Some("r1"), "ws").unwrap_err(), Refused::Duplicate);
        let anon = t.open(A, None, "ws").unwrap();
        assert_eq!(anon.id, format!("req-{}", anon.key));
        assert_eq!(t.in_flight(A), 2);
        assert_eq!(t.finish(a.key).unwrap().id, "r1");
        assert!(t.finish(a.key).is_none(), "finished once");
        // The id is free again.
        assert!(t.open(A, Some("r1"), "ws").is_ok());
    }

    #[test]
    fn a_generated_id_never_takes_a_clients_id() {
        let mut t = RequestTable::new(8);
        let client = t.open(A, Some("req-2"), "ws").unwrap();
        let generated = t.open(A, None, "ws").unwrap();
        assert_eq!(generated.key, 2);
        assert_eq!(generated.id, "req-2-1");
        assert_eq!(t.in_flight(A), 2);
        assert_eq!(t.detach(A).len(), 2, "both are reachable");
        assert!(client.cancel.load(Ordering::Relaxed));
    }

    #[test]
    fn a_duplicate_leaves_the_live_request_alone() {
        let mut t = RequestTable::new(8);
        let live = t.open(A, Some("x"), "ws").unwrap();
        assert!(t.open(A, Some("x"), "ws").is_err());
        assert!(!live.cancel.load(Ordering::Relaxed));
        assert_eq!(t.in_flight(A), 1);
        assert_eq!(t.get_mut(live.key).unwrap().conn, Some(A));
    }

    #[test]
    fn the_per_connection_limit_counts_open_requests() {
        let mut t = RequestTable::new(2);
        let first = t.open(A, None, "ws").unwrap();
        t.open(A, None, "ws").unwrap();
        assert_eq!(t.open(A, None, "ws").unwrap_err(), Refused::TooMany(2));
        assert!(
            t.open(B, None, "ws").is_ok(),
            "other connections are not affected"
        );
        t.finish(first.key);
        assert!(t.open(A, None, "ws").is_ok());
    }

    #[test]
    fn abort_is_idempotent_and_scoped_to_the_connection() {
        let mut t = RequestTable::new(8);
        let a1 = t.open(A, Some("1"), "ws").unwrap();
        let a2 = t.open(A, Some("2"), "ws").unwrap();
        let b1 = t.open(B, Some("1"), "ws").unwrap();
        assert_eq!(t.abort(A, Some("1")), 1);
        assert_eq!(t.abort(A, Some("1")), 1, "again: still just a flag");
        assert_eq!(t.abort(A, Some("nope")), 0);
        assert!(a1.cancel.load(Ordering::Relaxed));
        assert!(!a2.cancel.load(Ordering::Relaxed));
        assert!(!b1.cancel.load(Ordering::Relaxed));
        assert_eq!(t.abort(A, None), 2);
        assert!(a2.cancel.load(Ordering::Relaxed));
        t.finish(a1.key);
        t.finish(a2.key);
        assert_eq!(t.abort(A, Some("1")), 0, "finished requests are unknown");
    }

    #[test]
    fn a_detached_request_stays_until_its_end() {
        let mut t = RequestTable::new(8);
        let a = t.open(A, Some("1"), "ws").unwrap();
        assert_eq!(t.detach(A), ["1"]);
        assert!(a.cancel.load(Ordering::Relaxed));
        assert_eq!(t.in_flight(A), 0);
        assert_eq!(t.len(), 1);
        let route = t.finish(a.key).unwrap();
        assert_eq!(route.conn, None);
        assert!(t.is_empty());
    }

    #[test]
    fn drain_takes_everything() {
        let mut t = RequestTable::new(8);
        t.open(A, None, "ws").unwrap();
        t.open(B, None, "ws").unwrap();
        assert_eq!(t.drain().len(), 2);
        assert!(t.is_empty());
        assert_eq!(t.in_flight(A), 0);
    }
}

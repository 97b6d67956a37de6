//! The engine's two channels: requests in (`Command`), events out. The
//! sink wakes the server at most once per batch of events (uWS's
//! `loop->defer`): it arms a flag before calling `notify`, and the server
//! disarms it before draining, so no event is ever left unseen.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender};

use crate::core::{Event, Request};

pub enum Command {
    /// A request to serve (generate, or count tokens).
    Submit(Box<Request>),
    Shutdown,
}

/// The engine's side of the event channel.
pub struct EventSink {
    tx: Sender<Event>,
    armed: Arc<AtomicBool>,
    notify: Box<dyn Fn() + Send>,
}

impl EventSink {
    pub fn send(&self, event: Event) {
        // The server only goes away at exit; a send error then is harmless.
        let _ = self.tx.send(event);
    }

    /// Wakes the server unless a wake-up is already pending. The server
    /// disarms before it drains, so no event is ever left unseen.
    pub fn wake(&self) {
        if !self.armed.swap(true, Ordering::AcqRel) {
            (self.notify)();
        }
    }
}

/// The server's side of the event channel.
pub struct EventSource {
    rx: Receiver<Event>,
    armed: Arc<AtomicBool>,
}

impl EventSource {
    /// Every event sent so far; the next `wake` will notify again.
    pub fn drain(&self) -> impl Iterator<Item = Event> + '_ {
        self.armed.store(false, Ordering::Release);
        self.rx.try_iter()
    }
}

/// An event channel whose sink calls `notify` (a `mio::Waker`) once per batch.
pub fn events(notify: impl Fn() + Send + 'static) -> (EventSink, EventSource) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let armed = Arc::new(AtomicBool::new(false));
    (
        EventSink {
            tx,
            armed: armed.clone(),
            notify: Box::new(notify),
        },
        EventSource { rx, armed },
    )
}

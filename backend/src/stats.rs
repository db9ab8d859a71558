//! Counters shared between the poll thread and [`crate::Backend::stats`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A snapshot of the backend's counters, cumulative over all connections.
///
/// Queue names follow virtio-net: **rx** (queue 0) carries frames from this
/// backend to the frontend, **tx** (queue 1) frames from the frontend to this
/// backend. Byte counts are Ethernet frame bytes, without the 12-byte
/// `virtio_net_hdr_v1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames written into the rx queue (delivered to the frontend).
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames taken from the tx queue (sent by the frontend).
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames that passed [`traffic::FrameVerifier`] (sink with
    /// `verify`, or gen with `verify_tx`), duplicates included.
    pub verified: u64,
    /// Frames that failed verification.
    pub corrupted: u64,
    /// Seqs below the highest verified one that never arrived (so far).
    pub lost: u64,
    /// Seqs that arrived after a higher one.
    pub reordered: u64,
    pub duplicates: u64,
    /// Frames that should have gone to the frontend but found no rx buffer
    /// (reflect, and gen/tap buffers too small without MRG_RXBUF).
    pub rx_dropped: u64,
    /// Frames from the frontend that could not be passed on (tap write
    /// failed or would block).
    pub tx_dropped: u64,
    /// Malformed descriptor chains (address outside the memory table, length
    /// overflowing a region, index out of range, loop, wrong direction,
    /// indirect): counted, returned to the frontend with length 0, skipped.
    pub bad_descriptors: u64,
    /// Ring-level faults (ring outside memory, avail index jumping by more
    /// than the queue size): the queue is stopped until the frontend
    /// restarts it.
    pub bad_rings: u64,
    /// Interrupts sent to the frontend (call eventfd writes).
    pub notifications: u64,
    /// Times the poll thread went to sleep after idling (and woke again).
    pub sleeps: u64,
    /// Poll-loop iterations, and those that found nothing to do: the idle
    /// fraction `idle_polls / polls` shows how far the backend is from being
    /// the bottleneck.
    pub polls: u64,
    pub idle_polls: u64,
    /// Frontend connections accepted so far.
    pub connections: u64,
    /// A frontend is connected now.
    pub connected: bool,
    /// Virtio features the current (or last) frontend acknowledged.
    pub features: u64,
    /// The most recent error (malformed descriptors, refused features,
    /// connection errors), if any.
    pub last_error: Option<String>,
}

#[derive(Default)]
pub(crate) struct Shared {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub verified: AtomicU64,
    pub corrupted: AtomicU64,
    pub lost: AtomicU64,
    pub reordered: AtomicU64,
    pub duplicates: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub bad_descriptors: AtomicU64,
    pub bad_rings: AtomicU64,
    pub notifications: AtomicU64,
    pub sleeps: AtomicU64,
    pub polls: AtomicU64,
    pub idle_polls: AtomicU64,
    pub connections: AtomicU64,
    pub connected: AtomicBool,
    pub features: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            rx_frames: self.rx_frames.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            tx_frames: self.tx_frames.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            verified: self.verified.load(Relaxed),
            corrupted: self.corrupted.load(Relaxed),
            lost: self.lost.load(Relaxed),
            reordered: self.reordered.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            rx_dropped: self.rx_dropped.load(Relaxed),
            tx_dropped: self.tx_dropped.load(Relaxed),
            bad_descriptors: self.bad_descriptors.load(Relaxed),
            bad_rings: self.bad_rings.load(Relaxed),
            notifications: self.notifications.load(Relaxed),
            sleeps: self.sleeps.load(Relaxed),
            polls: self.polls.load(Relaxed),
            idle_polls: self.idle_polls.load(Relaxed),
            connections: self.connections.load(Relaxed),
            connected: self.connected.load(Relaxed),
            features: self.features.load(Relaxed),
            last_error: self.last_error.lock().unwrap().clone(),
        }
    }

    pub(crate) fn set_error(&self, msg: String) {
        *self.last_error.lock().unwrap() = Some(msg);
    }
}

/// Per-thread counters, flushed into [`Shared`] once per loop iteration that
/// did something (a handful of relaxed adds per burst, not per frame).
#[derive(Default)]
pub(crate) struct Local {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    pub bad_descriptors: u64,
    pub bad_rings: u64,
    pub notifications: u64,
    pub sleeps: u64,
    pub polls: u64,
    pub idle_polls: u64,
}

impl Local {
    pub(crate) fn flush(&mut self, s: &Shared) {
        macro_rules! f {
            ($($n:ident),*) => {$(
                if self.$n != 0 {
                    s.$n.fetch_add(self.$n, Relaxed);
                    self.$n = 0;
                }
            )*};
        }
        f!(
            rx_frames,
            rx_bytes,
            tx_frames,
            tx_bytes,
            rx_dropped,
            tx_dropped,
            bad_descriptors,
            bad_rings,
            notifications,
            sleeps,
            polls,
            idle_polls
        );
    }
}

/// Logs and records errors at most once per interval per reporter, so a
/// frontend flooding malformed descriptors cannot make us format strings per
/// descriptor. Everything is still counted.
pub(crate) struct ErrorReporter {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorReporter {
    pub(crate) fn new() -> Self {
        ErrorReporter {
            last: None,
            suppressed: 0,
        }
    }

    pub(crate) fn report(&mut self, shared: &Shared, what: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        if let Some(t) = self.last {
            if now.duration_since(t) < Duration::from_secs(1) {
                self.suppressed += 1;
                return;
            }
        }
        self.last = Some(now);
        let msg = if self.suppressed > 0 {
            format!("{what} ({} similar errors suppressed)", self.suppressed)
        } else {
            what.to_string()
        };
        self.suppressed = 0;
        tracing::warn!("{msg}");
        shared.set_error(msg);
    }
}

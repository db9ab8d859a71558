//! The zero-copy receive path does not touch the heap in steady state, and does not kick a
//! device that asked not to be kicked.
//!
//! A `NetRx` is registered on a fake transport whose DMA context maps identity (IOVA = process
//! address), so the test thread can play the device right on the split rings whose addresses
//! the driver gave to `setup_queue`: take avail buffers, write virtio-net frames (MRG_RXBUF,
//! frames of one to four buffers) into them, publish used entries. The driver side —
//! `NetRx::poll` (reap, complete, refill, consume the refill queue) and the application side
//! (`IfqUser::recv` / `data` / `refill` / `commit_rq` / `flush_rq`) — runs with a counting
//! global allocator armed (a thread-local flag, so only this thread's driver calls count) for
//! well over 2^16 buffers, so every free-running ring index wraps.
//!
//! Both notification schemes: without EVENT_IDX the device sets `VRING_USED_F_NO_NOTIFY`; with
//! it, the device keeps `avail_event` behind what it has consumed. Either way `kicks` must stay
//! 0. Then the device asks for kicks again and gets them (the check is not vacuous).
//!
//! One #[test] only: the allocation counter is process wide.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{counted, counted_turn, fill, frag_len, Device, Fake, IdentityDma, State, HDR};
use driver::{register_ifq, NetConfig, NetRx};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use zcrx::uapi::ZCRX_CQE_F_CONTD;
use zcrx::{AreaReg, Cqe, IfqReg, IfqUser, MemoryKind};

// The counting allocator, the fake transport and the device side are in `common`.

const BUF: usize = 4096;
/// What the driver posts of each niov: past the headroom that aligns frames to a cache line.
const POSTED: usize = BUF - driver::net::RX_HEADROOM as usize;

/// Payload bytes of frame `seq`: mostly small frames, every 7th spans two to four buffers.
fn frame_len(seq: u32) -> usize {
    if seq % 7 == 3 {
        4085 + (seq as usize * 2654435761) % (4 * BUF - HDR - 4085)
    } else {
        60 + (seq as usize * 40503) % 1455
    }
}

// ---------------------------------------------------------------------------------------------
// The application: reads every completion in place, checks it, returns the buffer.

struct App {
    cqes: [Cqe; 64],
    /// Frame being reassembled and its next fragment.
    seq: u32,
    frag: usize,
    frames: u64,
    bytes: u64,
}

impl App {
    fn consume(&mut self, user: &mut IfqUser, flush: bool) -> usize {
        let mut total = 0;
        loop {
            let n = user.recv(&mut self.cqes);
            for k in 0..n {
                let c = self.cqes[k];
                let len = frame_len(self.seq);
                let d = user.data(&c).expect("held buffer readable");
                assert_eq!(d.len(), frag_len(len, self.frag, POSTED), "frame {} fragment {}", self.seq, self.frag);
                let f = fill(self.seq, self.frag);
                if self.frag == 0 {
                    assert_eq!(c.area_offset() % BUF as u64, (driver::net::RX_HEADROOM as usize + HDR) as u64, "frame after the headroom and header, cache-line aligned");
                    assert_eq!(c.area_offset() % 64, 0);
                    assert_eq!(u32::from_le_bytes(d[..4].try_into().unwrap()), self.seq, "frame order");
                    assert_eq!(d[4], f);
                } else {
                    assert_eq!(c.area_offset() % BUF as u64, driver::net::RX_HEADROOM as u64);
                    assert_eq!(d[0], f);
                }
                assert_eq!(d[d.len() - 1], f, "frame {} fragment {} last byte", self.seq, self.frag);
                self.bytes += d.len() as u64;
                let last = (HDR + len).div_ceil(POSTED) == self.frag + 1;
                assert_eq!(c.flags & ZCRX_CQE_F_CONTD == 0, last, "CONTD on all but the last fragment: seq {} frag {} len {} d {}", self.seq, self.frag, len, d.len());
                if last {
                    self.seq += 1;
                    self.frag = 0;
                    self.frames += 1;
                } else {
                    self.frag += 1;
                }
                user.refill(&c).expect("refill queue has room");
            }
            total += n;
            if n < self.cqes.len() {
                break;
            }
        }
        if flush {
            user.flush_rq();
        } else {
            user.commit_rq();
        }
        total
    }
}

/// Frames offered per device turn: 1..=40, varying.
fn batch(iter: u32) -> u32 {
    1 + (iter * 17 + iter / 3) % 40
}

struct Run {
    rx: NetRx,
    user: IfqUser,
    dev: Device,
    app: App,
    kicks: Arc<AtomicU64>,
    /// Next frame the device sends.
    next_seq: u32,
    sent_bytes: u64,
    buffers_used: u64,
}

impl Run {
    fn new(event_idx: bool) -> (Self, Arc<Mutex<State>>) {
        let offer = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_MAC
            | if event_idx { 1 << VIRTIO_RING_F_EVENT_IDX } else { 0 };
        let s = Arc::new(Mutex::new(State::default()));
        let kicks = Arc::new(AtomicU64::new(0));
        let t = Fake { offer, s: s.clone(), kicks: kicks.clone(), dma: Arc::new(IdentityDma(s.clone())) };
        let reg = IfqReg { rq_entries: 256, rx_buf_len: BUF as u32, flags: 0, ..IfqReg::default() };
        let (rx, user) = register_ifq(Box::new(t), reg, AreaReg::new(MemoryKind::Memfd, 1 << 20), NetConfig::default())
            .expect("registration");
        let q = s.lock().unwrap().queues[0].expect("rx queue");
        assert_eq!(q.size, 256);
        let dev = Device::new(q, event_idx, POSTED);
        let app = App { cqes: [Cqe::default(); 64], seq: 0, frag: 0, frames: 0, bytes: 0 };
        (Self { rx, user, dev, app, kicks, next_seq: 0, sent_bytes: 0, buffers_used: 0 }, s)
    }

    /// One turn: the device delivers a batch (outside the counted region), then the driver and
    /// the application run with the allocator armed. Returns their (allocations, frees).
    fn turn(&mut self, iter: u32, max_frames: u32) -> (u64, u64) {
        let before = self.dev.used_idx;
        for _ in 0..max_frames {
            if !self.dev.deliver(self.next_seq, frame_len(self.next_seq)) {
                break;
            }
            self.sent_bytes += frame_len(self.next_seq) as u64;
            self.next_seq += 1;
        }
        if !self.dev.suppress && self.dev.avail_ready() == 0 {
            // Ran dry: ask to be kicked on the next avail buffer (as a device about to sleep).
            self.dev.want_kicks(true);
        }
        self.dev.publish();
        self.buffers_used += self.dev.used_idx.wrapping_sub(before) as u64;
        let Self { rx, user, app, .. } = self;
        counted_turn(rx, || {
            app.consume(user, iter % 5 == 0);
        })
    }
}

fn scenario(event_idx: bool) {
    let what = if event_idx { "EVENT_IDX" } else { "VRING_USED_F_NO_NOTIFY" };
    let (mut r, s) = Run::new(event_idx);
    assert!(r.rx.ifq().posted_count() > 0, "{what}: buffers posted at registration");

    // Warm up (uncounted), then the steady state: > 2^16 buffers, every index wraps.
    for iter in 0..64 {
        r.turn(iter, batch(iter));
    }
    let (mut allocs, mut frees) = (0, 0);
    let mut iter = 64;
    while r.buffers_used < 70_000 {
        assert!(iter < 20_000, "{what}: stuck after {} buffers; {:?}", r.buffers_used, r.rx);
        let (a, f) = r.turn(iter, batch(iter));
        allocs += a;
        frees += f;
        iter += 1;
    }
    // Drain: whatever is still in the used ring or the completion ring.
    for _ in 0..4 {
        let Run { rx, user, app, .. } = &mut r;
        let (a, f) = counted_turn(rx, || {
            app.consume(user, true);
        });
        allocs += a;
        frees += f;
    }
    assert_eq!((allocs, frees), (0, 0), "{what}: heap allocations / frees on the receive path in {iter} turns");
    assert_eq!(r.app.frames, r.next_seq as u64, "{what}: every frame received");
    assert_eq!(r.app.bytes, r.sent_bytes, "{what}: every byte received");
    let st = r.rx.device().stats();
    assert_eq!((st.rx_frames, st.rx_bytes, st.device_errors), (r.next_seq as u64, r.sent_bytes, 0), "{what}: {st:?}");
    let ifs = r.rx.ifq().stats();
    assert_eq!((ifs.zc_count, ifs.invalid_rqes, ifs.copy_count), (r.buffers_used, 0, 0), "{what}: {ifs:?}");
    assert_eq!(st.kicks, 0, "{what}: the device asked not to be kicked, yet was kicked {} times", st.kicks);
    assert_eq!(r.kicks.load(Ordering::Relaxed), 0, "{what}: notify() called");

    // The device wants kicks again: it gets them, counted, still without allocating. (With
    // EVENT_IDX a device asks for a kick once it has consumed every avail buffer, so here it
    // takes all it can before asking.)
    r.dev.suppress = false;
    let mut kicked = 0;
    for k in 0..32 {
        let before = r.rx.device().stats().kicks;
        let (a, f) = r.turn(iter + k, u32::MAX);
        assert_eq!((a, f), (0, 0), "{what}: allocation on the kicking path");
        kicked += r.rx.device().stats().kicks - before;
    }
    assert!(kicked > 0, "{what}: a device that wants kicks got none");
    assert_eq!(r.rx.device().stats().kicks, r.kicks.load(Ordering::Relaxed), "{what}: kicks counted = notify() calls");

    let Run { rx, user, .. } = r;
    drop(rx);
    drop(user);
    let st = s.lock().unwrap();
    assert!(st.mapped.is_empty() && !st.started, "{what}: teardown left {:x?} mapped", st.mapped);
}

#[test]
fn steady_state_rx_is_allocation_free_and_kick_free() {
    // The counter counts (so a zero below means something).
    let (_, a, f) = counted(|| drop(std::hint::black_box(Vec::<u8>::with_capacity(16))));
    assert_eq!((a, f), (1, 1), "the counting allocator works");
    let t = std::time::Instant::now();
    scenario(false);
    scenario(true);
    assert!(t.elapsed() < std::time::Duration::from_secs(20), "took {:?}", t.elapsed());
}

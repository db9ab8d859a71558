//! Copy mode with a device attached (`NetConfig::rx_copy`, the kernel's copy fallback for
//! fragments it cannot place): the rx queue is fed with the driver's own 2 KiB bounce buffers,
//! every fragment is copied into a free niov and completed with `copied = true`.
//!
//! Same setting as `alloc_free_rx.rs` (shared in `common`): a `NetRx` on a fake transport with
//! identity DMA, the test thread playing the device on the split rings. Proven here:
//! - frames arrive intact and in order, split at bounce-buffer boundaries (CONTD on all but a
//!   frame's last fragment), each fragment at the start of its niov; `copy_count` counts every
//!   completion, `zc_count` none; the receive path does not allocate in steady state (> 2^16
//!   buffers, every ring index wraps); no niov is ever posted to the device;
//! - back pressure loses nothing: with every niov held by the user, or the completion ring full,
//!   the entries stay in the device's used ring (bounce buffers are not re-posted) and arrive
//!   later, in order, a frame interrupted between two fragments included;
//! - a device error stops the device and takes every bounce buffer back; niovs go back to the
//!   free list (the user's stay the user's); teardown unmaps everything.

mod common;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use common::{bufs_for, counted, counted_turn, fill, frag_len, Device, Fake, IdentityDma, State, HDR};
use driver::net::RX_COPY_BUF_LEN;
use driver::{register_ifq, NetConfig, NetError, NetRx};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use zcrx::uapi::{ZCRX_CQE_F_CONTD, ZCRX_EVENT_ALLOC_FAIL, ZCRX_EVENT_COPY};
use zcrx::{AreaReg, Cqe, IfqReg, IfqUser, MemoryKind, NiovState};

/// Bounce buffer length (what the device sees) and niov length (what the user sees).
const BOUNCE: usize = RX_COPY_BUF_LEN as usize;
const NIOV: usize = 4096;

/// Payload bytes of frame `seq`: mostly single-buffer frames, every 7th spans two to four
/// bounce buffers.
fn frame_len(seq: u32) -> usize {
    if seq % 7 == 3 {
        (BOUNCE - HDR + 1) + (seq as usize * 2654435761) % (4 * BOUNCE - HDR - (BOUNCE - HDR + 1))
    } else {
        60 + (seq as usize * 40503) % 1455
    }
}

/// The application: reads every completion in place, checks it, returns the buffer (or not).
struct App {
    cqes: [Cqe; 64],
    seq: u32,
    frag: usize,
    frames: u64,
    completions: u64,
    bytes: u64,
    /// Completions taken and not returned (back-pressure tests hold buffers).
    held: Vec<Cqe>,
    len_of: fn(u32) -> usize,
}

impl App {
    fn new(len_of: fn(u32) -> usize) -> Self {
        Self { cqes: [Cqe::default(); 64], seq: 0, frag: 0, frames: 0, completions: 0, bytes: 0, held: Vec::with_capacity(1024), len_of }
    }

    fn check(&mut self, user: &IfqUser, c: &Cqe) {
        let len = (self.len_of)(self.seq);
        let d = user.data(c).expect("held buffer readable");
        // (Messages formatted only on failure: this runs with the allocation counter armed.)
        let (seq, frag) = (self.seq, self.frag);
        assert_eq!(c.area_offset() % NIOV as u64, 0, "frame {seq} fragment {frag}: copied to the start of a niov");
        assert_eq!(d.len(), frag_len(len, frag, BOUNCE), "frame {seq} fragment {frag}");
        let f = fill(seq, frag);
        if frag == 0 {
            assert_eq!(u32::from_le_bytes(d[..4].try_into().unwrap()), seq, "frame {seq}: frame order");
            assert!(d[4..].iter().all(|&b| b == f), "frame {seq} fragment {frag}: payload");
        } else {
            assert!(d.iter().all(|&b| b == f), "frame {seq} fragment {frag}: payload");
        }
        self.bytes += d.len() as u64;
        self.completions += 1;
        let last = bufs_for(len, BOUNCE) == self.frag + 1;
        assert_eq!(c.flags & ZCRX_CQE_F_CONTD == 0, last, "frame {seq} fragment {frag}: CONTD on all but the last fragment");
        if last {
            self.seq += 1;
            self.frag = 0;
            self.frames += 1;
        } else {
            self.frag += 1;
        }
    }

    /// Take every completion, check it, return its buffer (`keep`: hold it instead).
    fn consume(&mut self, user: &mut IfqUser, keep: bool) -> usize {
        let mut total = 0;
        loop {
            let n = user.recv(&mut self.cqes);
            for k in 0..n {
                let c = self.cqes[k];
                self.check(user, &c);
                if keep {
                    self.held.push(c);
                } else {
                    user.refill(&c).expect("refill queue has room");
                }
            }
            total += n;
            if n < self.cqes.len() {
                break;
            }
        }
        user.flush_rq();
        total
    }

    /// Return up to `n` held buffers.
    fn give_back(&mut self, user: &mut IfqUser, n: usize) {
        for c in self.held.drain(..n.min(self.held.len())) {
            user.refill(&c).expect("refill queue has room");
        }
        user.flush_rq();
    }
}

struct Run {
    rx: NetRx,
    user: IfqUser,
    dev: Device,
    app: App,
    s: Arc<Mutex<State>>,
    next_seq: u32,
    sent_bytes: u64,
    buffers_used: u64,
}

impl Run {
    fn new(event_idx: bool, area_len: usize, cq_entries: u32, len_of: fn(u32) -> usize) -> Self {
        let offer = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_MAC
            | if event_idx { 1 << VIRTIO_RING_F_EVENT_IDX } else { 0 };
        let s = Arc::new(Mutex::new(State::default()));
        let t = Fake { offer, s: s.clone(), kicks: Arc::new(AtomicU64::new(0)), dma: Arc::new(IdentityDma(s.clone())) };
        let reg = IfqReg { rq_entries: 256, cq_entries, rx_buf_len: NIOV as u32, flags: 0, ..IfqReg::default() };
        let cfg = NetConfig { rx_copy: true, ..NetConfig::default() };
        let (rx, user) = register_ifq(Box::new(t), reg, AreaReg::new(MemoryKind::Memfd, area_len), cfg).expect("registration");
        let q = s.lock().unwrap().queues[0].expect("rx queue");
        assert_eq!(q.size, 256);
        let dev = Device::new(q, event_idx, BOUNCE);
        // Bounce buffers are posted, not niovs.
        assert_eq!(dev.avail_ready(), 256, "one bounce buffer per descriptor");
        assert_eq!(rx.ifq().posted_count(), 0, "copy mode posts no niov");
        assert_eq!(rx.ifq().free_count(), rx.ifq().area().num_niovs());
        Self { rx, user, dev, app: App::new(len_of), s, next_seq: 0, sent_bytes: 0, buffers_used: 0 }
    }

    /// The device delivers up to `max` frames (stops when it runs out of posted buffers) and
    /// publishes them; returns how many.
    fn send(&mut self, max: u32) -> u32 {
        let before = self.dev.used_idx;
        let mut n = 0;
        while n < max && self.dev.deliver(self.next_seq, (self.app.len_of)(self.next_seq)) {
            self.sent_bytes += (self.app.len_of)(self.next_seq) as u64;
            self.next_seq += 1;
            n += 1;
        }
        self.dev.publish();
        self.buffers_used += self.dev.used_idx.wrapping_sub(before) as u64;
        n
    }

    fn poll(&mut self) -> driver::RxPoll {
        let p = self.rx.poll().expect("poll");
        assert_eq!(self.rx.ifq().posted_count(), 0, "copy mode posts no niov");
        p
    }

    /// Bounce buffers the driver has posted and the device has not taken.
    fn bounces_posted(&self) -> u16 {
        self.dev.avail_ready()
    }

    fn teardown(self) {
        let Run { rx, user, s, .. } = self;
        drop(rx);
        drop(user);
        let st = s.lock().unwrap();
        assert!(st.mapped.is_empty() && !st.started, "teardown left {:x?} mapped", st.mapped);
    }
}

fn steady_state(event_idx: bool) {
    let what = if event_idx { "EVENT_IDX" } else { "no EVENT_IDX" };
    let mut r = Run::new(event_idx, 1 << 20, 0, frame_len);
    let (mut allocs, mut frees) = (0, 0);
    let mut iter = 0u32;
    while r.buffers_used < 70_000 {
        assert!(iter < 20_000, "{what}: stuck after {} buffers", r.buffers_used);
        r.send(1 + (iter * 17 + iter / 3) % 40);
        let Run { rx, user, app, .. } = &mut r;
        let (a, f) = counted_turn(rx, || {
            app.consume(user, false);
        });
        if iter >= 64 {
            allocs += a;
            frees += f;
        }
        iter += 1;
    }
    for _ in 0..4 {
        let Run { rx, user, app, .. } = &mut r;
        let (a, f) = counted_turn(rx, || {
            app.consume(user, false);
        });
        allocs += a;
        frees += f;
    }
    assert_eq!((allocs, frees), (0, 0), "{what}: heap allocations / frees on the copy-mode receive path");
    assert_eq!(r.app.frames, r.next_seq as u64, "{what}: every frame received");
    assert_eq!(r.app.bytes, r.sent_bytes, "{what}: every byte received");
    assert_eq!(r.app.completions, r.buffers_used, "{what}: one completion per bounce buffer");
    assert!(r.app.frames > 10_000 && r.buffers_used > r.app.frames, "{what}: multi-buffer frames too");
    let st = r.rx.device().stats();
    assert_eq!((st.rx_frames, st.rx_bytes, st.device_errors), (r.next_seq as u64, r.sent_bytes, 0), "{what}: {st:?}");
    let ifs = r.rx.ifq().stats();
    assert_eq!((ifs.copy_count, ifs.copy_bytes), (r.buffers_used, r.sent_bytes), "{what}: {ifs:?}");
    assert_eq!((ifs.zc_count, ifs.zc_bytes, ifs.invalid_rqes), (0, 0, 0), "{what}: {ifs:?}");
    assert_ne!(r.user.take_events() & ZCRX_EVENT_COPY, 0, "{what}: the copy event is raised");
    // Every bounce buffer came back to the device.
    assert_eq!(r.bounces_posted(), 256, "{what}");
    r.teardown();
}

#[test]
fn copy_mode_frames_arrive_intact_counted_as_copies_without_allocating() {
    // The counter counts (so a zero above means something).
    let (_, a, f) = counted(|| drop(std::hint::black_box(Vec::<u8>::with_capacity(16))));
    assert_eq!((a, f), (1, 1), "the counting allocator works");
    steady_state(false);
    steady_state(true);
}

/// Back pressure from the niovs: 16 of them, all held by the user.
#[test]
fn copy_mode_back_pressure_without_free_niovs_loses_nothing() {
    // Single-buffer frames, but frame 20 spans three bounce buffers: it is interrupted between
    // two fragments when the niovs run out.
    fn len(seq: u32) -> usize {
        if seq == 20 { 3 * BOUNCE - HDR - 100 } else { 100 + seq as usize }
    }
    let mut r = Run::new(true, 16 * NIOV, 0, len);
    assert_eq!(r.send(100), 100);
    assert_eq!(r.bounces_posted(), 256 - 102);

    let p = r.poll();
    assert_eq!((p.completions, p.no_buffer), (16, false), "{p:?}");
    assert_eq!(r.app.consume(&mut r.user, true), 16);
    assert_eq!(r.bounces_posted(), 256 - 102 + 16, "the copied bounce buffers went back");
    assert_eq!(r.user.take_events() & ZCRX_EVENT_ALLOC_FAIL, 0);

    // The user holds every niov: nothing is reaped, the data waits in the used ring.
    for _ in 0..10 {
        let p = r.poll();
        assert_eq!((p.completions, p.no_buffer), (0, true), "{p:?}");
    }
    assert_eq!(r.bounces_posted(), 256 - 102 + 16, "nothing reaped: no bounce buffer re-posted");
    assert_eq!(r.rx.ifq().stats().copy_count, 16);
    assert_eq!(r.rx.device().stats().rx_frames, 16, "frames past the 16th not even looked at");
    assert_ne!(r.user.take_events() & ZCRX_EVENT_ALLOC_FAIL, 0, "the alloc-fail event is raised");

    // Five buffers back: five more completions, in order (frame 20's first two fragments).
    r.app.give_back(&mut r.user, 5);
    let p = r.poll();
    assert_eq!(p.completions, 5, "{p:?}");
    assert_eq!(r.app.consume(&mut r.user, true), 5);
    assert_eq!((r.app.seq, r.app.frag), (20, 1), "frame 20 interrupted after its first fragment");
    r.app.give_back(&mut r.user, 1);
    r.poll();
    r.app.consume(&mut r.user, true);
    assert_eq!((r.app.seq, r.app.frag), (20, 2), "and after its second");

    // Everything back: the rest arrives, nothing lost.
    for _ in 0..100 {
        let n = r.app.held.len();
        r.app.give_back(&mut r.user, n);
        r.poll();
        r.app.consume(&mut r.user, true);
        if r.app.frames == 100 {
            break;
        }
    }
    assert_eq!((r.app.frames, r.app.bytes), (100, r.sent_bytes));
    let ifs = r.rx.ifq().stats();
    assert_eq!((ifs.copy_count, ifs.zc_count), (102, 0), "{ifs:?}");
    assert_eq!(r.bounces_posted(), 256);
    r.teardown();
}

/// Back pressure from the completion ring: 8 slots, plenty of niovs.
#[test]
fn copy_mode_back_pressure_with_a_full_completion_ring_loses_nothing() {
    fn len(seq: u32) -> usize {
        60 + seq as usize * 13
    }
    let mut r = Run::new(false, 64 * NIOV, 8, len);
    assert_eq!(r.send(50), 50);
    let p = r.poll();
    assert_eq!((p.completions, p.cq_full), (8, false), "{p:?}");
    for _ in 0..5 {
        let p = r.poll();
        assert_eq!((p.completions, p.cq_full, p.no_buffer), (0, true, false), "{p:?}");
    }
    assert_eq!(r.rx.ifq().stats().copy_count, 8);
    assert_eq!(r.rx.ifq().user_count(), 8);
    assert_eq!(r.bounces_posted(), 256 - 50 + 8);
    while r.app.frames < 50 {
        assert!(r.app.consume(&mut r.user, false) > 0, "stuck at frame {}", r.app.frames);
        r.poll();
    }
    assert_eq!((r.app.frames, r.app.bytes), (50, r.sent_bytes));
    // The receive loop keeps going after a full ring, more frames included.
    assert_eq!(r.send(30), 30);
    while r.app.frames < 80 {
        r.poll();
        assert!(r.app.consume(&mut r.user, false) > 0, "stuck at frame {}", r.app.frames);
    }
    let ifs = r.rx.ifq().stats();
    assert_eq!((ifs.copy_count, ifs.zc_count, ifs.copy_bytes), (80, 0, r.sent_bytes), "{ifs:?}");
    r.teardown();
}

#[test]
fn copy_mode_device_error_takes_every_buffer_back() {
    let mut r = Run::new(true, 64 * NIOV, 0, frame_len);
    // Two good frames, then a header saying num_buffers 0.
    assert_eq!(r.send(2), 2);
    assert!(r.dev.deliver_as(99, 200, 0));
    r.dev.publish();
    let err = r.rx.poll().expect_err("num_buffers 0 is a protocol violation");
    assert!(matches!(err, NetError::BadHeader(_)), "{err}");
    assert!(err.to_string().contains("num_buffers 0"), "{err}");
    assert!(!r.s.lock().unwrap().started, "the device was stopped");
    // The frames before the bad one were completed; every other niov is free.
    assert_eq!(r.app.consume(&mut r.user, true), 2);
    let ifq = r.rx.ifq();
    let n = ifq.area().num_niovs();
    assert_eq!((ifq.user_count(), ifq.posted_count(), ifq.free_count()), (2, 0, n - 2));
    assert!((0..n).all(|i| ifq.niov_state(i) != NiovState::Posted));
    assert_eq!(r.rx.device().stats().device_errors, 1);
    r.teardown();
}

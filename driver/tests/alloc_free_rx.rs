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

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use driver::transport::{QueueAddrs, Transport, TransportError};
use driver::{register_ifq, NetConfig, NetRx};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use zcrx::uapi::ZCRX_CQE_F_CONTD;
use zcrx::{AreaReg, Cqe, DmaError, DmaMap, DmaSegment, IfqReg, IfqUser, MemoryKind};

// ---------------------------------------------------------------------------------------------
// Counting allocator, armed per thread.

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
}
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static FREES: AtomicU64 = AtomicU64::new(0);

fn armed() -> bool {
    ARMED.try_with(|a| a.get()).unwrap_or(false)
}

// SAFETY: forwards to the system allocator; counting has no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if armed() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if armed() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if armed() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if armed() {
            FREES.fetch_add(1, Ordering::Relaxed);
        }
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Run `f` with the counter armed; returns (allocations, frees) it made.
fn counted<R>(f: impl FnOnce() -> R) -> (R, u64, u64) {
    let (a, d) = (ALLOCS.load(Ordering::Relaxed), FREES.load(Ordering::Relaxed));
    ARMED.with(|x| x.set(true));
    let r = f();
    ARMED.with(|x| x.set(false));
    (r, ALLOCS.load(Ordering::Relaxed) - a, FREES.load(Ordering::Relaxed) - d)
}

// ---------------------------------------------------------------------------------------------
// The fake transport: identity DMA, records the queues, counts kicks (without allocating).

const BUF: usize = 4096;
const HDR: usize = 12;

#[derive(Default)]
struct State {
    queues: [Option<QueueAddrs>; 2],
    /// (vaddr, len) mapped now.
    mapped: Vec<(u64, usize)>,
    started: bool,
}

struct Fake {
    offer: u64,
    s: Arc<Mutex<State>>,
    kicks: Arc<AtomicU64>,
    dma: Arc<IdentityDma>,
}

struct IdentityDma(Arc<Mutex<State>>);

impl DmaMap for IdentityDma {
    fn map(&self, seg: DmaSegment<'_>) -> Result<u64, DmaError> {
        if seg.fd.is_none() {
            return Err(DmaError::new("the fake device needs fd-backed memory"));
        }
        self.0.lock().unwrap().mapped.push((seg.vaddr as u64, seg.len));
        Ok(seg.vaddr as u64)
    }
    fn unmap(&self, iova: u64, len: usize) -> Result<(), DmaError> {
        let mut s = self.0.lock().unwrap();
        let k = s.mapped.iter().position(|&m| m == (iova, len)).ok_or_else(|| DmaError::new("not mapped"))?;
        s.mapped.remove(k);
        Ok(())
    }
}

impl Transport for Fake {
    fn describe(&self) -> String {
        "fake identity-mapped virtio-net".into()
    }
    fn device_features(&mut self) -> Result<u64, TransportError> {
        Ok(self.offer)
    }
    fn set_features(&mut self, _: u64) -> Result<(), TransportError> {
        Ok(())
    }
    fn dma(&self) -> Arc<dyn DmaMap> {
        self.dma.clone()
    }
    fn translates_addresses(&self) -> bool {
        false
    }
    fn max_queue_size(&mut self, _: u16) -> Result<u16, TransportError> {
        Ok(256)
    }
    fn setup_queue(&mut self, q: u16, a: &QueueAddrs) -> Result<(), TransportError> {
        assert_eq!((a.desc.0, a.avail.0, a.used.0), (a.desc.1, a.avail.1, a.used.1), "identity mapping");
        self.s.lock().unwrap().queues[q as usize] = Some(*a);
        Ok(())
    }
    fn read_config(&mut self, _: u32, buf: &mut [u8]) -> Result<(), TransportError> {
        buf.fill(0x02);
        Ok(())
    }
    fn start(&mut self) -> Result<(), TransportError> {
        let mut s = self.s.lock().unwrap();
        s.started = true;
        // The device polls: from the start it asks not to be kicked (the queues were zeroed
        // when they were set up, so this is the device's first word on them).
        let rx = s.queues[0].expect("rx queue set up");
        let dev = Device::new(rx, self.offer & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        dev.want_kicks(false);
        Ok(())
    }
    fn notify(&self, _: u16) {
        self.kicks.fetch_add(1, Ordering::Relaxed);
    }
    fn is_alive(&self) -> bool {
        true
    }
    fn stop(&mut self) {
        self.s.lock().unwrap().started = false;
    }
}

// ---------------------------------------------------------------------------------------------
// The device side of the rx queue, straight on the split-ring layout (virtio 1.2, 2.7).

struct Device {
    q: QueueAddrs,
    event_idx: bool,
    last_avail: u16,
    used_idx: u16,
    suppress: bool,
}

// SAFETY (every helper below): the addresses come from `setup_queue` and stay mapped while the
// NetRx lives; offsets are inside the layout for `q.size` entries and naturally aligned; the
// driver accesses the same words atomically.
fn a16(addr: u64) -> &'static AtomicU16 {
    unsafe { AtomicU16::from_ptr(addr as *mut u16) }
}
fn a32(addr: u64) -> &'static AtomicU32 {
    unsafe { AtomicU32::from_ptr(addr as *mut u32) }
}
fn a64(addr: u64) -> &'static AtomicU64 {
    unsafe { AtomicU64::from_ptr(addr as *mut u64) }
}

/// The payload byte fragment `frag` of frame `seq` is filled with.
fn fill(seq: u32, frag: usize) -> u8 {
    (seq as u8) ^ (frag as u8).wrapping_mul(0x55) ^ 0xa5
}

/// Payload bytes of frame `seq`: mostly small frames, every 7th spans two to four buffers.
fn frame_len(seq: u32) -> usize {
    if seq % 7 == 3 {
        4085 + (seq as usize * 2654435761) % (4 * BUF - HDR - 4085)
    } else {
        60 + (seq as usize * 40503) % 1455
    }
}

/// Payload bytes in fragment `frag` of a frame of `len` payload bytes.
fn frag_len(len: usize, frag: usize) -> usize {
    let total = HDR + len;
    let end = total.min((frag + 1) * BUF);
    end - (frag * BUF).max(HDR)
}

impl Device {
    fn new(q: QueueAddrs, event_idx: bool) -> Self {
        Self { q, event_idx, last_avail: 0, used_idx: 0, suppress: true }
    }
    fn size(&self) -> u16 {
        self.q.size
    }
    fn avail_ready(&self) -> u16 {
        u16::from_le(a16(self.q.avail.0 + 2).load(Ordering::Acquire)).wrapping_sub(self.last_avail)
    }
    /// Say whether we want to be kicked on new avail buffers.
    fn want_kicks(&self, on: bool) {
        if self.event_idx {
            let ev_addr = self.q.used.0 + 4 + 8 * self.size() as u64;
            // Kick when avail.idx passes `last_avail`; never, when kept one behind it.
            let ev = if on { self.last_avail } else { self.last_avail.wrapping_sub(1) };
            a16(ev_addr).store(ev.to_le(), Ordering::Relaxed);
        } else {
            let flags = if on { 0 } else { VRING_USED_F_NO_NOTIFY as u16 };
            a16(self.q.used.0).store(flags.to_le(), Ordering::Relaxed);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
    }
    /// Write frame `seq` into as many avail buffers as it needs and stage their used entries;
    /// false (nothing taken) when not enough buffers are posted.
    fn deliver(&mut self, seq: u32) -> bool {
        let len = frame_len(seq);
        let nbufs = (HDR + len).div_ceil(BUF);
        if (self.avail_ready() as usize) < nbufs {
            return false;
        }
        let mask = self.size() - 1;
        for frag in 0..nbufs {
            let head = u16::from_le(a16(self.q.avail.0 + 4 + 2 * (self.last_avail & mask) as u64).load(Ordering::Relaxed));
            self.last_avail = self.last_avail.wrapping_add(1);
            assert!(head < self.size(), "avail entry names descriptor {head}");
            let d = self.q.desc.0 + 16 * head as u64;
            let addr = u64::from_le(a64(d).load(Ordering::Relaxed));
            let dlen = u32::from_le(a32(d + 8).load(Ordering::Relaxed)) as usize;
            let flags = u16::from_le(a16(d + 12).load(Ordering::Relaxed));
            assert_eq!((dlen, flags), (BUF, VRING_DESC_F_WRITE as u16), "rx descriptor {head}");
            let p = addr as *mut u8;
            let start = if frag == 0 { HDR } else { 0 };
            let n = frag_len(len, frag);
            // SAFETY: identity mapping: `addr` is a posted niov of BUF bytes in our area, which
            // the driver does not touch while it is posted.
            unsafe {
                if frag == 0 {
                    std::ptr::write_bytes(p, 0, HDR);
                    p.add(10).cast::<u16>().write_unaligned((nbufs as u16).to_le());
                }
                std::ptr::write_bytes(p.add(start), fill(seq, frag), n);
                if frag == 0 {
                    p.add(HDR).cast::<u32>().write_unaligned(seq.to_le());
                }
            }
            let e = self.q.used.0 + 4 + 8 * (self.used_idx & mask) as u64;
            a32(e).store((head as u32).to_le(), Ordering::Relaxed);
            a32(e + 4).store(((start + n) as u32).to_le(), Ordering::Relaxed);
            self.used_idx = self.used_idx.wrapping_add(1);
        }
        if self.suppress {
            // Keep kicks off as we consume (EVENT_IDX: avail_event one behind last_avail).
            self.want_kicks(false);
        }
        true
    }
    fn publish(&self) {
        a16(self.q.used.0 + 2).store(self.used_idx.to_le(), Ordering::Release);
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
                assert_eq!(d.len(), frag_len(len, self.frag), "frame {} fragment {}", self.seq, self.frag);
                let f = fill(self.seq, self.frag);
                if self.frag == 0 {
                    assert_eq!(c.area_offset() % BUF as u64, HDR as u64, "data after the header");
                    assert_eq!(u32::from_le_bytes(d[..4].try_into().unwrap()), self.seq, "frame order");
                    assert_eq!(d[4], f);
                } else {
                    assert_eq!(c.area_offset() % BUF as u64, 0);
                    assert_eq!(d[0], f);
                }
                assert_eq!(d[d.len() - 1], f, "frame {} fragment {} last byte", self.seq, self.frag);
                self.bytes += d.len() as u64;
                let last = (HDR + len).div_ceil(BUF) == self.frag + 1;
                assert_eq!(c.flags & ZCRX_CQE_F_CONTD == 0, last, "CONTD on all but the last fragment");
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
        let dev = Device::new(q, event_idx);
        let app = App { cqes: [Cqe::default(); 64], seq: 0, frag: 0, frames: 0, bytes: 0 };
        (Self { rx, user, dev, app, kicks, next_seq: 0, sent_bytes: 0, buffers_used: 0 }, s)
    }

    /// One turn: the device delivers a batch (outside the counted region), then the driver and
    /// the application run with the allocator armed. Returns their (allocations, frees).
    fn turn(&mut self, iter: u32, max_frames: u32) -> (u64, u64) {
        let before = self.dev.used_idx;
        for _ in 0..max_frames {
            if !self.dev.deliver(self.next_seq) {
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
        let (_, a, f) = counted(|| {
            // Twice: the first poll reaps, the second refills with what the user returned.
            rx.poll().expect("poll");
            app.consume(user, iter % 5 == 0);
            rx.poll().expect("poll");
        });
        (a, f)
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
        let (_, a, f) = counted(|| {
            rx.poll().expect("poll");
            app.consume(user, true);
            rx.poll().expect("poll");
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

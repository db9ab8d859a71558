//! The data plane: one busy-polling thread per connection serving both
//! queues on raw, bounds-checked ring memory (see [`crate::ring`]).
//!
//! Per iteration: produce into rx (gen / tap), consume tx (sink / reflect /
//! tap / gen's loopback check), then publish each queue's used index once and
//! interrupt the frontend only if it asked for it. After `spin` of idling the
//! thread asks for kicks and sleeps until a kick (forwarded by the vring epoll
//! thread through `wake`), a tap frame, a rate-limit deadline, or 100 ms.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use traffic::{DatagramStats, FrameGen, FrameVerifier};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::ring::{gather, scatter, ChainError, GuestMap, RawQueue, RingError, Seg};
use crate::stats::{ErrorReporter, Local, Shared};

/// Frames per queue per loop iteration (and per used-index publication).
pub(crate) const BURST: usize = 64;
pub(crate) const MAX_FRAME: usize = 65535;
/// How many avail entries ahead buffers are prefetched.
const PREFETCH_AHEAD: u16 = 4;
/// Idle polls between two looks at the clock (to decide when to stop spinning and sleep).
const IDLE_CLOCK_EVERY: u64 = 32;
const RX: usize = 0;
const TX: usize = 1;

pub(crate) const F_MRG_RXBUF: u64 = 1 << 15;
pub(crate) const F_VERSION_1: u64 = 1 << 32;

pub(crate) struct GenState {
    pub gen: FrameGen,
    pub remaining: Option<u64>,
    pub rate: Option<u64>,
    pub rate_start: Option<Instant>,
    pub rate_sent: u64,
    pub verifier: Option<FrameVerifier>,
    /// Pre-built frames sent in a cycle instead of generating each one.
    pub templates: Option<Vec<Vec<u8>>>,
    /// The template to send next (frame `seq` is template `seq % len`).
    pub next_template: usize,
}

impl GenState {
    /// Frames that may be sent now (rate limit, count), at most `BURST`.
    fn allowed(&mut self, now: impl FnOnce() -> Instant) -> usize {
        let mut n = BURST as u64;
        if let Some(r) = self.remaining {
            n = n.min(r);
        }
        if let Some(rate) = self.rate {
            // The clock only when rate-limited: clock_gettime costs here what ten frames do.
            let now = now();
            let start = *self.rate_start.get_or_insert(now);
            let due =
                (now.duration_since(start).as_nanos() * rate as u128 / 1_000_000_000) as u64 + 1;
            if due > self.rate_sent + BURST as u64 {
                // Do not bank credit while the frontend had no buffers.
                self.rate_sent = due - BURST as u64;
            }
            n = n.min(due - self.rate_sent.min(due));
        }
        n as usize
    }

    fn sent(&mut self, n: u64) {
        if let Some(r) = self.remaining.as_mut() {
            *r -= n.min(*r);
        }
        self.rate_sent += n;
    }

    /// When the rate limit allows the next frame (None: unlimited or done).
    fn next_due(&self) -> Option<Instant> {
        if self.remaining == Some(0) {
            return None;
        }
        let rate = self.rate?;
        let start = self.rate_start?;
        let ns = (self.rate_sent as u128 * 1_000_000_000).div_ceil(rate as u128);
        Some(start + Duration::from_nanos(ns.min(u64::MAX as u128) as u64))
    }

    fn done(&self) -> bool {
        self.remaining == Some(0)
    }
}

/// iovec array for writev; raw pointers only live during one call.
struct IoVecs(Vec<libc::iovec>);
// SAFETY: the pointers are rebuilt for every writev and never dereferenced across threads.
unsafe impl Send for IoVecs {}

pub(crate) struct TapState {
    pub fd: Arc<OwnedFd>,
    buf: Vec<u8>,
    held: Option<usize>,
    iov: IoVecs,
}

impl TapState {
    pub(crate) fn new(fd: Arc<OwnedFd>) -> Self {
        TapState {
            fd,
            buf: vec![0; MAX_FRAME + 1],
            held: None,
            iov: IoVecs(Vec::with_capacity(1024)),
        }
    }
}

pub(crate) enum ModeState {
    Gen(GenState),
    Sink { verifier: Option<FrameVerifier> },
    Reflect,
    Tap(TapState),
}

/// Per-connection data-plane state; survives poll-thread restarts within a
/// connection (a vring stopped and restarted).
pub(crate) struct Engine {
    pub mode: ModeState,
    pub shared: Arc<Shared>,
    pub spin: Duration,
    pub cpu: Option<usize>,
    frame_buf: Vec<u8>,
    verify_last: DatagramStats,
    desc_err: ErrorReporter,
    ring_err: ErrorReporter,
    io_err: ErrorReporter,
}

impl Engine {
    pub(crate) fn new(
        mode: ModeState,
        shared: Arc<Shared>,
        spin: Duration,
        cpu: Option<usize>,
    ) -> Self {
        Engine {
            mode,
            shared,
            spin,
            cpu,
            frame_buf: vec![0; MAX_FRAME + 1],
            verify_last: DatagramStats::default(),
            desc_err: ErrorReporter::new(),
            ring_err: ErrorReporter::new(),
            io_err: ErrorReporter::new(),
        }
    }

    fn verifier(&mut self) -> Option<&mut FrameVerifier> {
        match &mut self.mode {
            ModeState::Gen(g) => g.verifier.as_mut(),
            ModeState::Sink { verifier } => verifier.as_mut(),
            _ => None,
        }
    }

    fn publish_verify_stats(&mut self) {
        let Some(v) = self.verifier() else { return };
        let s = v.stats();
        let last = self.verify_last;
        let sh = &self.shared;
        let d = |a: u64, b: u64| a.wrapping_sub(b);
        sh.verified
            .fetch_add(d(s.received, last.received), Ordering::Relaxed);
        sh.corrupted
            .fetch_add(d(s.corrupted, last.corrupted), Ordering::Relaxed);
        sh.lost.fetch_add(d(s.lost, last.lost), Ordering::Relaxed);
        sh.reordered
            .fetch_add(d(s.reordered, last.reordered), Ordering::Relaxed);
        sh.duplicates
            .fetch_add(d(s.duplicates, last.duplicates), Ordering::Relaxed);
        self.verify_last = s;
    }
}

/// Everything a poll thread needs from the connection.
pub(crate) struct RunCtx {
    pub vrings: Vec<VringRwLock>,
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    pub mem_gen: Arc<AtomicU64>,
    /// The memory-table generation this thread has switched to.
    pub seen_gen: Arc<AtomicU64>,
    pub stop: Arc<AtomicBool>,
    pub wake: Arc<EventFd>,
    pub sleeping: Arc<AtomicBool>,
    pub features: u64,
}

#[derive(Default)]
struct Slot {
    q: Option<RawQueue>,
    active: bool,
    broken: bool,
}

#[derive(Clone, Copy)]
struct Chain {
    head: u16,
    cap: u32,
    nsegs: u32,
}

/// Rx buffers reserved for the frame being assembled (several chains with
/// MRG_RXBUF), plus the scratch used when a frame does not fit the first
/// segment.
struct RxState {
    segs: Vec<Seg>,
    chains: Vec<Chain>,
    cap: u64,
    mrg: bool,
    hdr_len: usize,
    scratch: Vec<u8>,
}

enum Deliver {
    Done,
    /// No (or not enough) buffers yet; reserved buffers are kept.
    NoBuffers,
    /// The frame cannot be delivered (buffer too small without MRG_RXBUF).
    Dropped,
}

struct Errs<'a> {
    shared: &'a Shared,
    rep: &'a mut ErrorReporter,
}

impl Errs<'_> {
    #[cold]
    fn bad(&mut self, local: &mut Local, queue: &str, e: ChainError) {
        local.bad_descriptors += 1;
        self.rep.report(
            self.shared,
            format_args!("malformed descriptor chain on the {queue} queue: {e}; chain skipped"),
        );
    }
}

#[inline]
fn write_hdr(dst: &mut [u8], num_buffers: u16) {
    dst[..10].fill(0);
    if dst.len() >= 12 {
        dst[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    }
}

impl RxState {
    /// Return every reserved chain (and `bad`, a rejected head) with length 0.
    #[cold]
    fn abandon(&mut self, q: &mut RawQueue, bad: Option<u16>) {
        for c in &self.chains {
            q.push_used(c.head, 0);
        }
        if let Some(h) = bad {
            if h < q.size {
                q.push_used(h, 0);
            }
        }
        self.chains.clear();
        self.segs.clear();
        self.cap = 0;
    }

    fn clear(&mut self) {
        self.chains.clear();
        self.segs.clear();
        self.cap = 0;
    }

    /// Deliver one frame of `flen` bytes produced by `fill`.
    #[inline]
    fn deliver(
        &mut self,
        q: &mut RawQueue,
        map: &GuestMap,
        flen: usize,
        local: &mut Local,
        errs: &mut Errs<'_>,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<Deliver, RingError> {
        let hdr = self.hdr_len;
        let need = hdr + flen;
        if flen > MAX_FRAME {
            // Only a tx chain (reflect) can be this long; no Ethernet frame is.
            local.rx_dropped += 1;
            errs.rep.report(
                errs.shared,
                format_args!("frame of {flen} bytes is longer than {MAX_FRAME}; dropped"),
            );
            return Ok(Deliver::Dropped);
        }
        if self.chains.is_empty() && q.available()? != 0 {
            // The common case: the next chain is one buffer the frame fits in.
            if let Some((head, ptr)) = q.peek_single_writable(map, need as u32) {
                q.pop();
                // SAFETY: `ptr` was translated and bounds-checked for at least `need` bytes of
                // a device-writable buffer the frontend handed over and does not touch until we
                // return it.
                let buf = unsafe { std::slice::from_raw_parts_mut(ptr, need) };
                write_hdr(&mut buf[..hdr], 1);
                fill(&mut buf[hdr..]);
                q.push_used(head, need as u32);
                local.rx_frames += 1;
                local.rx_bytes += flen as u64;
                return Ok(Deliver::Done);
            }
        }
        loop {
            let enough = if self.mrg {
                self.cap >= need as u64
            } else {
                !self.chains.is_empty()
            };
            if enough {
                break;
            }
            if q.available()? == 0 {
                return Ok(Deliver::NoBuffers);
            }
            let head = q.pop();
            if self.chains.len() == self.chains.capacity() {
                // Only a frontend re-posting buffers gets here; never
                // allocate on the hot path.
                errs.bad(local, "rx", ChainError::TooLong { size: q.size });
                self.abandon(q, Some(head));
                continue;
            }
            let start = self.segs.len();
            match q.walk(map, head, true, &mut self.segs) {
                Ok(cap) if cap as usize >= hdr => {
                    self.chains.push(Chain {
                        head,
                        cap,
                        nsegs: (self.segs.len() - start) as u32,
                    });
                    self.cap += cap as u64;
                }
                Ok(cap) => {
                    self.segs.truncate(start);
                    local.bad_descriptors += 1;
                    errs.rep.report(
                        errs.shared,
                        format_args!(
                            "rx buffer of {cap} bytes cannot hold the {hdr}-byte virtio-net header; chain skipped"
                        ),
                    );
                    self.abandon(q, Some(head));
                }
                Err(e) => {
                    errs.bad(local, "rx", e);
                    self.abandon(q, Some(head));
                }
            }
        }
        if !self.mrg && self.cap < need as u64 {
            let cap = self.cap;
            local.rx_dropped += 1;
            errs.rep.report(
                errs.shared,
                format_args!(
                    "rx buffer of {cap} bytes too small for a {need}-byte frame+header and MRG_RXBUF not negotiated; frame dropped"
                ),
            );
            self.abandon(q, None);
            return Ok(Deliver::Dropped);
        }
        let nbuf = self.chains.len() as u16;
        let first = self.segs[0];
        if first.len as usize >= need {
            // SAFETY: the segment was translated and bounds-checked for
            // first.len >= need bytes; it is a device-writable buffer the
            // frontend handed over and does not touch until we return it.
            let buf = unsafe { std::slice::from_raw_parts_mut(first.ptr, need) };
            write_hdr(&mut buf[..hdr], nbuf);
            fill(&mut buf[hdr..]);
            q.push_used(self.chains[0].head, need as u32);
        } else {
            let buf = &mut self.scratch[..need];
            write_hdr(&mut buf[..hdr], nbuf);
            fill(&mut buf[hdr..]);
            let (mut off, mut si) = (0usize, 0usize);
            for c in &self.chains {
                let take = (c.cap as usize).min(need - off);
                let segs = &self.segs[si..si + c.nsegs as usize];
                scatter(segs, 0, &buf[off..off + take]);
                q.push_used(c.head, take as u32);
                off += take;
                si += c.nsegs as usize;
            }
        }
        self.clear();
        local.rx_frames += 1;
        local.rx_bytes += flen as u64;
        Ok(Deliver::Done)
    }
}

/// `[off, off + len)` of the segments' concatenation, if it lies in one segment.
#[inline]
fn contiguous(segs: &[Seg], mut off: usize, len: usize) -> Option<*mut u8> {
    for s in segs {
        let l = s.len as usize;
        if off < l || (off == l && len == 0) {
            return if off + len <= l {
                // SAFETY: off <= l, inside the checked segment.
                Some(unsafe { s.ptr.add(off) })
            } else {
                None
            };
        }
        off -= l;
    }
    None
}

struct Poller<'a> {
    ctx: &'a RunCtx,
    map: GuestMap,
    map_gen: u64,
    slots: [Slot; 2],
    rx: RxState,
    txsegs: Vec<Seg>,
    local: Local,
}

pub(crate) fn run(engine: &mut Engine, ctx: &RunCtx) {
    if let Some(cpu) = engine.cpu {
        let mut set = rustix::thread::CpuSet::new();
        set.set(cpu);
        if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
            tracing::warn!("cannot pin the poll thread to CPU {cpu}: {e}");
        }
    }
    let mrg = ctx.features & F_MRG_RXBUF != 0;
    let hdr_len = if ctx.features & (F_VERSION_1 | F_MRG_RXBUF) != 0 {
        12
    } else {
        10
    };
    let map_gen = ctx.mem_gen.load(Ordering::Acquire);
    ctx.seen_gen.store(map_gen, Ordering::Release);
    let mut p = Poller {
        ctx,
        map: GuestMap::new(ctx.mem.memory().into_inner()),
        map_gen,
        slots: Default::default(),
        rx: RxState {
            segs: Vec::new(),
            chains: Vec::new(),
            cap: 0,
            mrg,
            hdr_len,
            scratch: vec![0; hdr_len + MAX_FRAME + 1],
        },
        txsegs: Vec::new(),
        local: Local::default(),
    };
    p.refresh(engine);
    let mut iter: u32 = 0;
    let mut idle_since: Option<Instant> = None;
    while !ctx.stop.load(Ordering::Relaxed) {
        iter = iter.wrapping_add(1);
        // A new memory table must be in use before SET_MEM_TABLE is
        // acknowledged (update_memory waits for seen_gen), so check its
        // generation every iteration (one load of a rarely written line).
        if iter % 64 == 0 || ctx.mem_gen.load(Ordering::Acquire) != p.map_gen {
            p.refresh(engine);
        }
        let mut work = 0usize;
        if p.slots[RX].active {
            work += match engine.mode {
                ModeState::Gen(_) => p.gen_burst(engine),
                ModeState::Tap(_) => p.tap_rx_burst(engine),
                _ => 0,
            };
        }
        if p.slots[TX].active {
            work += p.tx_burst(engine);
        }
        p.publish();
        p.local.polls += 1;
        if work > 0 {
            p.local.flush(&engine.shared);
            engine.publish_verify_stats();
            idle_since = None;
            continue;
        }
        p.local.idle_polls += 1;
        if p.local.idle_polls % IDLE_CLOCK_EVERY != 0 {
            // Read the clock every few idle polls only: on a virtual machine clock_gettime
            // costs as much as a burst of frames (a third of the poll thread's time).
            std::hint::spin_loop();
            continue;
        }
        let now = Instant::now();
        let since = *idle_since.get_or_insert(now);
        if now.duration_since(since) < engine.spin {
            std::hint::spin_loop();
            continue;
        }
        p.sleep(engine, now);
        p.local.flush(&engine.shared);
        idle_since = None;
        p.refresh(engine);
    }
    p.finish();
    p.local.flush(&engine.shared);
    engine.publish_verify_stats();
}

impl Poller<'_> {
    fn ring_fault(&mut self, engine: &mut Engine, i: usize, e: RingError) {
        let name = if i == RX { "rx" } else { "tx" };
        if let Some(q) = self.slots[i].q.as_mut() {
            q.publish();
        }
        self.slots[i] = Slot {
            q: None,
            active: false,
            broken: true,
        };
        if i == RX {
            self.rx.clear();
        }
        self.local.bad_rings += 1;
        engine.ring_err.report(
            &engine.shared,
            format_args!("{name} queue stopped: {e} (until the frontend restarts the ring)"),
        );
    }

    /// Re-read vring readiness/enable state and the memory table generation;
    /// map newly ready rings.
    fn refresh(&mut self, engine: &mut Engine) {
        let g = self.ctx.mem_gen.load(Ordering::Acquire);
        if g != self.map_gen {
            // New memory table: drop reservations (their pointers belong to
            // the old mapping) and re-map the rings, keeping our indices.
            let mut keep = [None, None];
            for (i, s) in self.slots.iter_mut().enumerate() {
                if let Some(mut q) = s.q.take() {
                    if i == RX {
                        q.unpop(self.rx.chains.len() as u16);
                        self.rx.clear();
                    }
                    q.publish();
                    keep[i] = Some((q.next_avail, q.next_used));
                }
                s.broken = false;
                s.active = false;
            }
            self.map = GuestMap::new(self.ctx.mem.memory().into_inner());
            self.map_gen = g;
            self.ctx.seen_gen.store(g, Ordering::Release);
            for (i, k) in keep.into_iter().enumerate() {
                if let Some(k) = k {
                    self.setup(engine, i, Some(k));
                }
            }
        }
        for i in 0..2 {
            let (ready, enabled) = {
                let st = self.ctx.vrings[i].get_ref();
                (st.get_queue().ready(), st.is_enabled())
            };
            let want = ready && enabled;
            if want && self.slots[i].q.is_none() && !self.slots[i].broken {
                self.setup(engine, i, None);
            }
            let was = self.slots[i].active;
            self.slots[i].active = want && self.slots[i].q.is_some();
            if self.slots[i].active && !was {
                self.slots[i].q.as_mut().unwrap().suppress_kicks();
            }
        }
    }

    fn setup(&mut self, engine: &mut Engine, i: usize, indices: Option<(u16, u16)>) {
        if self.map.is_empty() {
            return;
        }
        let r = {
            let st = self.ctx.vrings[i].get_ref();
            let q = st.get_queue();
            let (na, nu) = indices.unwrap_or((q.next_avail(), q.next_used()));
            RawQueue::new(
                &self.map,
                q.size(),
                q.desc_table(),
                q.avail_ring(),
                q.used_ring(),
                na,
                nu,
                q.event_idx_enabled(),
            )
        };
        match r {
            Ok(q) => {
                let cap = 2 * q.size as usize;
                let v = if i == RX {
                    &mut self.rx.segs
                } else {
                    &mut self.txsegs
                };
                if v.capacity() < cap {
                    v.reserve_exact(cap - v.len());
                }
                if i == RX && self.rx.chains.capacity() < cap {
                    self.rx.chains.reserve_exact(cap);
                }
                if let ModeState::Tap(t) = &mut engine.mode {
                    if t.iov.0.capacity() < cap {
                        t.iov.0.reserve_exact(cap);
                    }
                }
                self.slots[i].q = Some(q);
            }
            Err(e) => self.ring_fault(engine, i, e),
        }
    }

    fn publish(&mut self) {
        for i in 0..2 {
            if let Some(q) = self.slots[i].q.as_mut() {
                if q.publish() && q.needs_notification() {
                    if let Err(e) = self.ctx.vrings[i].signal_used_queue() {
                        tracing::debug!("signal_used_queue: {e}");
                    }
                    self.local.notifications += 1;
                }
            }
        }
    }

    /// Stop: return reserved rx chains to the avail side, publish, and hand
    /// our ring indices back to the vring so GET_VRING_BASE reports them.
    fn finish(&mut self) {
        for i in 0..2 {
            if let Some(q) = self.slots[i].q.as_mut() {
                if i == RX {
                    q.unpop(self.rx.chains.len() as u16);
                    self.rx.clear();
                }
                q.publish();
                self.ctx.vrings[i].set_queue_next_avail(q.next_avail);
                self.ctx.vrings[i].set_queue_next_used(q.next_used);
            }
        }
    }

    fn gen_burst(&mut self, engine: &mut Engine) -> usize {
        let ModeState::Gen(g) = &mut engine.mode else {
            return 0;
        };
        if g.done() {
            return 0;
        }
        let allowed = g.allowed(Instant::now);
        let q = self.slots[RX].q.as_mut().unwrap();
        q.prefetch_used(allowed.min(BURST) as u16);
        let mut errs = Errs {
            shared: &engine.shared,
            rep: &mut engine.desc_err,
        };
        let mut n = 0usize;
        let mut fault = None;
        while n < allowed {
            q.prefetch_ahead(&self.map, PREFETCH_AHEAD, true);
            let seq = g.gen.next_seq();
            let gen = &g.gen;
            // The next template by a wrapping index: `seq % len` would divide per frame.
            let template = g.templates.as_ref().map(|t| &t[g.next_template]);
            let flen = template.map_or_else(|| gen.len_for(seq), |t| t.len());
            match self
                .rx
                .deliver(q, &self.map, flen, &mut self.local, &mut errs, |b| match template {
                    Some(t) => b.copy_from_slice(t),
                    None => {
                        let _ = gen.write(seq, b);
                    }
                }) {
                Ok(Deliver::Done) | Ok(Deliver::Dropped) => {
                    g.gen.set_next_seq(seq + 1);
                    if let Some(t) = &g.templates {
                        g.next_template = if g.next_template + 1 == t.len() { 0 } else { g.next_template + 1 };
                    }
                    n += 1;
                }
                Ok(Deliver::NoBuffers) => break,
                Err(e) => {
                    fault = Some(e);
                    break;
                }
            }
        }
        g.sent(n as u64);
        if let Some(e) = fault {
            self.ring_fault(engine, RX, e);
        }
        n
    }

    fn tap_rx_burst(&mut self, engine: &mut Engine) -> usize {
        let ModeState::Tap(t) = &mut engine.mode else {
            return 0;
        };
        let q = self.slots[RX].q.as_mut().unwrap();
        let mut errs = Errs {
            shared: &engine.shared,
            rep: &mut engine.desc_err,
        };
        let mut n = 0;
        let mut fault = None;
        while n < BURST {
            let len = match t.held {
                Some(l) => l,
                None => {
                    match q.available() {
                        Ok(0) if self.rx.cap == 0 => break,
                        Ok(_) => {}
                        Err(e) => {
                            fault = Some(e);
                            break;
                        }
                    }
                    match rustix::io::read(&*t.fd, &mut t.buf[..]) {
                        Ok(0) => break,
                        Ok(l) => {
                            t.held = Some(l);
                            l
                        }
                        Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => break,
                        Err(e) => {
                            engine
                                .io_err
                                .report(&engine.shared, format_args!("tap read: {e}"));
                            break;
                        }
                    }
                }
            };
            let buf = &t.buf[..len];
            match self
                .rx
                .deliver(q, &self.map, len, &mut self.local, &mut errs, |b| {
                    b.copy_from_slice(buf)
                }) {
                Ok(Deliver::Done) | Ok(Deliver::Dropped) => {
                    t.held = None;
                    n += 1;
                }
                Ok(Deliver::NoBuffers) => break,
                Err(e) => {
                    fault = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = fault {
            self.ring_fault(engine, RX, e);
        }
        n
    }

    fn tx_burst(&mut self, engine: &mut Engine) -> usize {
        let avail = match self.slots[TX].q.as_mut().unwrap().available() {
            Ok(a) => a as usize,
            Err(e) => {
                self.ring_fault(engine, TX, e);
                return 0;
            }
        };
        let n = avail.min(BURST);
        let hdr = self.rx.hdr_len;
        let mut rx_fault = None;
        for _ in 0..n {
            let txq = self.slots[TX].q.as_mut().unwrap();
            let head = txq.pop();
            self.txsegs.clear();
            let total = match txq.walk(&self.map, head, false, &mut self.txsegs) {
                Ok(t) if t as usize >= hdr => t as usize,
                Ok(_) => {
                    self.local.bad_descriptors += 1;
                    engine.desc_err.report(
                        &engine.shared,
                        format_args!(
                            "tx chain shorter than the {hdr}-byte virtio-net header; chain skipped"
                        ),
                    );
                    txq.push_used(head, 0);
                    continue;
                }
                Err(e) => {
                    Errs {
                        shared: &engine.shared,
                        rep: &mut engine.desc_err,
                    }
                    .bad(&mut self.local, "tx", e);
                    if head < txq.size {
                        txq.push_used(head, 0);
                    }
                    continue;
                }
            };
            let flen = total - hdr;
            self.local.tx_frames += 1;
            self.local.tx_bytes += flen as u64;
            let segs = &self.txsegs[..];
            match &mut engine.mode {
                ModeState::Sink { verifier } => {
                    if let Some(v) = verifier {
                        verify(v, segs, hdr, flen, &mut engine.frame_buf);
                    }
                }
                ModeState::Gen(g) => {
                    if let Some(v) = g.verifier.as_mut() {
                        verify(v, segs, hdr, flen, &mut engine.frame_buf);
                    }
                }
                ModeState::Reflect => {
                    if rx_fault.is_none() && self.slots[RX].active {
                        let rxq = self.slots[RX].q.as_mut().unwrap();
                        let mut errs = Errs {
                            shared: &engine.shared,
                            rep: &mut engine.desc_err,
                        };
                        match self.rx.deliver(
                            rxq,
                            &self.map,
                            flen,
                            &mut self.local,
                            &mut errs,
                            |b| {
                                gather(segs, hdr, b);
                            },
                        ) {
                            Ok(Deliver::Done) | Ok(Deliver::Dropped) => {}
                            Ok(Deliver::NoBuffers) => self.local.rx_dropped += 1,
                            Err(e) => {
                                self.local.rx_dropped += 1;
                                rx_fault = Some(e);
                            }
                        }
                    } else {
                        self.local.rx_dropped += 1;
                    }
                }
                ModeState::Tap(t) => {
                    let iov = &mut t.iov.0;
                    iov.clear();
                    let mut off = hdr;
                    for s in segs {
                        let l = s.len as usize;
                        if off >= l {
                            off -= l;
                            continue;
                        }
                        if iov.len() == iov.capacity() {
                            break;
                        }
                        iov.push(libc::iovec {
                            // SAFETY: off < l inside the checked segment.
                            iov_base: unsafe { s.ptr.add(off) } as *mut libc::c_void,
                            iov_len: l - off,
                        });
                        off = 0;
                    }
                    // SAFETY: the iovecs point into bounds-checked guest buffers.
                    let r = unsafe {
                        libc::writev(t.fd.as_fd().as_raw_fd(), iov.as_ptr(), iov.len() as i32)
                    };
                    if r < 0 {
                        self.local.tx_dropped += 1;
                        let e = std::io::Error::last_os_error();
                        if e.kind() != std::io::ErrorKind::WouldBlock {
                            engine
                                .io_err
                                .report(&engine.shared, format_args!("tap write: {e}"));
                        }
                    }
                }
            }
            // Tx buffers are device-readable: nothing written, used length 0.
            self.slots[TX].q.as_mut().unwrap().push_used(head, 0);
        }
        if let Some(e) = rx_fault {
            self.ring_fault(engine, RX, e);
        }
        n
    }

    /// Ask for kicks on the queues that can bring work, then sleep.
    fn sleep(&mut self, engine: &mut Engine, now: Instant) {
        let ctx = self.ctx;
        ctx.sleeping.store(true, Ordering::SeqCst);
        let mut more = false;
        let mut timeout = Duration::from_millis(100);
        let mut tap_fd = None;
        // tx always brings work.
        if self.slots[TX].active {
            more |= self.slots[TX].q.as_mut().unwrap().request_kicks();
        }
        if self.slots[RX].active {
            let q = self.slots[RX].q.as_mut().unwrap();
            match &engine.mode {
                ModeState::Gen(g) if !g.done() => {
                    if let Some(due) = g.next_due() {
                        if due > now {
                            timeout = timeout.min(due - now);
                        }
                    }
                    // New rx buffers are work if the generator may send.
                    let avail = q.request_kicks();
                    more |= avail && g.next_due().is_none_or(|d| d <= now);
                }
                ModeState::Tap(t) => {
                    let avail = q.request_kicks();
                    if t.held.is_some() {
                        more |= avail;
                    } else if avail || self.rx.cap > 0 {
                        tap_fd = Some(t.fd.clone());
                    }
                }
                _ => {}
            }
        }
        if !more && !ctx.stop.load(Ordering::SeqCst) {
            // Wake on: our eventfd (kicks relayed by the vring epoll thread,
            // stop, memory changes), the kick eventfds themselves (saves the
            // relay hop; the epoll thread still consumes them), the tap.
            let kicks: [Option<vmm_sys_util::event::EventConsumer>; 2] = [RX, TX].map(|i| {
                if !self.slots[i].active {
                    return None;
                }
                let st = ctx.vrings[i].get_ref();
                st.get_kick().as_ref().and_then(|k| k.try_clone().ok())
            });
            // SAFETY: the fds outlive this call (ctx.wake, kicks, tap_fd).
            let b = |fd: i32| unsafe { BorrowedFd::borrow_raw(fd) };
            let mut raw = [ctx.wake.as_raw_fd(); 4];
            let mut nfds = 1;
            for k in kicks.iter().flatten() {
                raw[nfds] = k.as_raw_fd();
                nfds += 1;
            }
            if let Some(fd) = tap_fd.as_ref() {
                raw[nfds] = fd.as_raw_fd();
                nfds += 1;
            }
            let bfds = raw.map(b);
            let mut fds = bfds.each_ref().map(|f| PollFd::new(f, PollFlags::IN));
            let ts = rustix::event::Timespec {
                tv_sec: timeout.as_secs() as i64,
                tv_nsec: timeout.subsec_nanos() as i64,
            };
            let _ = rustix::event::poll(&mut fds[..nfds], Some(&ts));
            self.local.sleeps += 1;
        }
        ctx.sleeping.store(false, Ordering::SeqCst);
        let _ = ctx.wake.read();
        for s in self.slots.iter_mut() {
            if s.active {
                s.q.as_mut().unwrap().suppress_kicks();
            }
        }
    }
}

#[inline]
fn verify(v: &mut FrameVerifier, segs: &[Seg], off: usize, flen: usize, buf: &mut [u8]) {
    if let Some(p) = contiguous(segs, off, flen) {
        // SAFETY: bounds-checked device-readable buffer handed over by the
        // frontend; only read while we own the chain.
        let f = unsafe { std::slice::from_raw_parts(p, flen) };
        let _ = v.check(f);
    } else if flen <= buf.len() {
        gather(segs, off, &mut buf[..flen]);
        let _ = v.check(&buf[..flen]);
    } else {
        // Longer than any generated frame: counted as corrupted.
        let _ = v.check(&[]);
    }
}

//! Shared by the receive-path tests: a counting allocator armed per thread, a fake transport
//! whose DMA context maps identity (IOVA = process address), and the device side of the rx
//! queue played by the test thread right on the split rings the driver gave to `setup_queue`.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use driver::transport::{QueueAddrs, Transport, TransportError};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use zcrx::{DmaError, DmaMap, DmaSegment};

// ---------------------------------------------------------------------------------------------
// Counting allocator, armed per thread.

pub struct Counting;

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
pub fn counted<R>(f: impl FnOnce() -> R) -> (R, u64, u64) {
    let (a, d) = (ALLOCS.load(Ordering::Relaxed), FREES.load(Ordering::Relaxed));
    ARMED.with(|x| x.set(true));
    let r = f();
    ARMED.with(|x| x.set(false));
    (r, ALLOCS.load(Ordering::Relaxed) - a, FREES.load(Ordering::Relaxed) - d)
}

/// One receive turn with the counter armed: poll (reaps), the application takes and returns
/// buffers, poll again (refills with what it returned). Returns (allocations, frees).
pub fn counted_turn(rx: &mut driver::NetRx, app: impl FnOnce()) -> (u64, u64) {
    let (_, a, f) = counted(|| {
        rx.poll().expect("poll");
        app();
        rx.poll().expect("poll");
    });
    (a, f)
}

// ---------------------------------------------------------------------------------------------
// The fake transport: identity DMA, records the queues, counts kicks (without allocating).

pub const HDR: usize = 12;

#[derive(Default)]
pub struct State {
    pub queues: [Option<QueueAddrs>; 2],
    /// (vaddr, len) mapped now.
    pub mapped: Vec<(u64, usize)>,
    pub started: bool,
}

pub struct Fake {
    pub offer: u64,
    pub s: Arc<Mutex<State>>,
    pub kicks: Arc<AtomicU64>,
    pub dma: Arc<IdentityDma>,
}

pub struct IdentityDma(pub Arc<Mutex<State>>);

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
        let dev = Device::new(rx, self.offer & (1 << VIRTIO_RING_F_EVENT_IDX) != 0, 0);
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

pub struct Device {
    pub q: QueueAddrs,
    pub event_idx: bool,
    pub last_avail: u16,
    pub used_idx: u16,
    pub suppress: bool,
    /// Length of every rx descriptor the driver posts (checked on each one taken).
    pub buf: usize,
}

// SAFETY (every helper below): the addresses come from `setup_queue` and stay mapped while the
// NetRx lives; offsets are inside the layout for `q.size` entries and naturally aligned; the
// driver accesses the same words atomically.
pub fn a16(addr: u64) -> &'static AtomicU16 {
    unsafe { AtomicU16::from_ptr(addr as *mut u16) }
}
pub fn a32(addr: u64) -> &'static AtomicU32 {
    unsafe { AtomicU32::from_ptr(addr as *mut u32) }
}
pub fn a64(addr: u64) -> &'static AtomicU64 {
    unsafe { AtomicU64::from_ptr(addr as *mut u64) }
}

/// The payload byte fragment `frag` of frame `seq` is filled with.
pub fn fill(seq: u32, frag: usize) -> u8 {
    (seq as u8) ^ (frag as u8).wrapping_mul(0x55) ^ 0xa5
}

/// Payload bytes in fragment `frag` of a frame of `len` payload bytes in buffers of `buf`.
pub fn frag_len(len: usize, frag: usize, buf: usize) -> usize {
    let total = HDR + len;
    let end = total.min((frag + 1) * buf);
    end - (frag * buf).max(HDR)
}

/// Buffers of `buf` bytes a frame of `len` payload bytes takes.
pub fn bufs_for(len: usize, buf: usize) -> usize {
    (HDR + len).div_ceil(buf)
}

impl Device {
    pub fn new(q: QueueAddrs, event_idx: bool, buf: usize) -> Self {
        Self { q, event_idx, last_avail: 0, used_idx: 0, suppress: true, buf }
    }
    pub fn size(&self) -> u16 {
        self.q.size
    }
    pub fn avail_ready(&self) -> u16 {
        u16::from_le(a16(self.q.avail.0 + 2).load(Ordering::Acquire)).wrapping_sub(self.last_avail)
    }
    /// Say whether we want to be kicked on new avail buffers.
    pub fn want_kicks(&self, on: bool) {
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
    /// Write frame `seq` of `len` payload bytes into as many avail buffers as it needs and stage
    /// their used entries; false (nothing taken) when not enough buffers are posted.
    pub fn deliver(&mut self, seq: u32, len: usize) -> bool {
        let nbufs = bufs_for(len, self.buf);
        self.deliver_as(seq, len, nbufs as u16)
    }
    /// [`Device::deliver`] with `num_buffers` written into the header (a lying device when it is
    /// not the real count).
    pub fn deliver_as(&mut self, seq: u32, len: usize, num_buffers: u16) -> bool {
        let buf = self.buf;
        let nbufs = bufs_for(len, buf);
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
            assert_eq!((dlen, flags), (buf, VRING_DESC_F_WRITE as u16), "rx descriptor {head}");
            let p = addr as *mut u8;
            let start = if frag == 0 { HDR } else { 0 };
            let n = frag_len(len, frag, buf);
            // SAFETY: identity mapping: `addr` is a posted buffer of `buf` bytes the driver does
            // not touch while it is posted.
            unsafe {
                if frag == 0 {
                    std::ptr::write_bytes(p, 0, HDR);
                    p.add(10).cast::<u16>().write_unaligned(num_buffers.to_le());
                }
                std::ptr::write_bytes(p.add(start), fill(seq, frag), n);
                if frag == 0 && n >= 4 {
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
    pub fn publish(&self) {
        a16(self.q.used.0 + 2).store(self.used_idx.to_le(), Ordering::Release);
    }
}

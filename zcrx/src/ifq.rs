//! Interface queues: one area, one refill queue and one completion ring bound to a receive
//! queue of a device, or to no device (NODEV).
//!
//! Registration hands back two ends that may live on different threads:
//! - [`Ifq`], the receive side (what the kernel is in io_uring zcrx): owns buffer state, takes
//!   free buffers, completes them, drains the refill queue;
//! - [`IfqUser`], the application side: reads completions, reads data in place, returns buffers.
//!
//! Every buffer (niov) is in exactly one state — free, posted (to a device or a copy in flight)
//! or held by the user — and only the receive side changes it, so no lock is needed.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_utils::CachePadded;

use crate::area::{Area, AreaError, AreaMemory, AreaReg, Step};
use crate::dma::DmaMap;
use crate::ring::{self, Consumer, Producer, RingError};
use crate::uapi::*;

/// Registration rejected before anything was allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegError {
    #[error("unknown flags {0:#x}")]
    UnknownFlags(u32),
    #[error("reserved fields must be zero")]
    Reserved,
    #[error("NODEV registration must not name a device (if_idx {if_idx}, if_rxq {if_rxq})")]
    NodevWithDevice { if_idx: u32, if_rxq: u32 },
    #[error("NODEV registration must not bring a DMA context")]
    NodevWithDma,
    #[error("registration without NODEV needs a device; use the driver's registration helper")]
    NoDevice,
    #[error("rq_entries must not be 0")]
    ZeroRqEntries,
    #[error("rq_entries {got} exceeds {max} (set ZCRX_REG_CLAMP to round down)")]
    TooManyRqEntries { got: u32, max: u32 },
    #[error("cq_entries {got} exceeds {max}")]
    TooManyCqEntries { got: u32, max: u32 },
    #[error("rx_buf_len {0} must be a power of two between the page size and 1 GiB")]
    BadBufLen(u32),
}

/// Anything registration can fail with; all of it unwinds.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid registration: {0}")]
    Reg(#[from] RegError),
    #[error("area: {0}")]
    Area(#[from] AreaError),
    #[error("{which} ring: {source}")]
    Ring { which: &'static str, source: RingError },
}

/// Counters; `copy_*` for bytes that came through the copy fallback, `zc_*` for bytes a device
/// wrote in place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfqStats {
    pub copy_count: u64,
    pub copy_bytes: u64,
    pub zc_count: u64,
    pub zc_bytes: u64,
    /// Refill entries rejected: bad area token, offset out of range or not buffer aligned,
    /// non-zero padding, buffer not held by the user (or returned twice).
    pub invalid_rqes: u64,
    /// Receives that found no free buffer (the data waited in its source).
    pub no_buffer: u64,
    /// Receives that found the completion ring full (the data waited in its source).
    pub cq_full: u64,
    /// Buffers returned through the refill queue.
    pub refilled: u64,
    /// Times the refill queue was drained.
    pub flushes: u64,
    /// Datagrams longer than the buffers set aside for one (`CopyLimits::max_datagram_len`):
    /// the kernel dropped their tail.
    pub truncated: u64,
}

const NSTATS: usize = 10;

impl IfqStats {
    fn to_array(self) -> [u64; NSTATS] {
        [
            self.copy_count,
            self.copy_bytes,
            self.zc_count,
            self.zc_bytes,
            self.invalid_rqes,
            self.no_buffer,
            self.cq_full,
            self.refilled,
            self.flushes,
            self.truncated,
        ]
    }
    fn from_array(a: [u64; NSTATS]) -> Self {
        let [copy_count, copy_bytes, zc_count, zc_bytes, invalid_rqes, no_buffer, cq_full, refilled, flushes, truncated] = a;
        Self { copy_count, copy_bytes, zc_count, zc_bytes, invalid_rqes, no_buffer, cq_full, refilled, flushes, truncated }
    }
}

/// What both ends see: published counters, events, flush requests.
struct Shared {
    stats: CachePadded<[AtomicU64; NSTATS]>,
    events: CachePadded<AtomicU32>,
    flush_req: CachePadded<AtomicU64>,
    closed: AtomicBool,
}

/// Where a buffer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum NiovState {
    Free,
    /// Given to a device or to a copy in flight.
    Posted,
    /// Completed to the user, not yet returned.
    User,
}

/// What a registration step was; for fault injection in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegStep {
    Area(Step),
    RqRing,
    CqRing,
}

/// The receive side of an interface queue.
pub struct Ifq {
    area: Area,
    state: Vec<NiovState>,
    /// Free buffers, used as a stack so the most recently returned (cache-warm) goes out first.
    free: Vec<u32>,
    /// Buffers held by the user; posted ones are what is neither free nor held.
    user: u32,
    rq: Consumer<Rqe>,
    cq: Producer<Cqe>,
    token: u64,
    stats: IfqStats,
    shared: Arc<Shared>,
    flush_seen: u64,
    reg: IfqReg,
    pub(crate) scratch: crate::copy::Scratch,
}

impl std::fmt::Debug for Ifq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ifq")
            .field("reg", &self.reg)
            .field("area", &self.area)
            .field("free", &self.free.len())
            .field("posted", &self.posted_count())
            .field("user", &self.user)
            .finish()
    }
}

/// Check a registration; returns it with `rq_entries`/`cq_entries` rounded as they will be used.
pub fn validate(reg: &IfqReg, has_dma: bool) -> Result<IfqReg, RegError> {
    let mut r = *reg;
    if r.flags & !ZCRX_REG_KNOWN != 0 {
        return Err(RegError::UnknownFlags(r.flags & !ZCRX_REG_KNOWN));
    }
    if r.resv != [0; 2] {
        return Err(RegError::Reserved);
    }
    let nodev = r.flags & ZCRX_REG_NODEV != 0;
    if nodev && (r.if_idx != 0 || r.if_rxq != 0) {
        return Err(RegError::NodevWithDevice { if_idx: r.if_idx, if_rxq: r.if_rxq });
    }
    if nodev && has_dma {
        return Err(RegError::NodevWithDma);
    }
    if !nodev && !has_dma {
        return Err(RegError::NoDevice);
    }
    if r.rq_entries == 0 {
        return Err(RegError::ZeroRqEntries);
    }
    if r.rq_entries > MAX_RQ_ENTRIES {
        if r.flags & ZCRX_REG_CLAMP == 0 {
            return Err(RegError::TooManyRqEntries { got: r.rq_entries, max: MAX_RQ_ENTRIES });
        }
        r.rq_entries = MAX_RQ_ENTRIES;
    }
    r.rq_entries = r.rq_entries.next_power_of_two();
    if r.cq_entries == 0 {
        r.cq_entries = (r.rq_entries * 2).min(MAX_CQ_ENTRIES);
    }
    if r.cq_entries > MAX_CQ_ENTRIES {
        return Err(RegError::TooManyCqEntries { got: r.cq_entries, max: MAX_CQ_ENTRIES });
    }
    r.cq_entries = r.cq_entries.next_power_of_two();
    let page = crate::mem::page_size() as u32;
    if !r.rx_buf_len.is_power_of_two() || r.rx_buf_len < page || r.rx_buf_len > 1 << 30 {
        return Err(RegError::BadBufLen(r.rx_buf_len));
    }
    Ok(r)
}

impl Ifq {
    /// Register an interface queue: validate, create the area (DMA mapped through `dma` when
    /// there is a device), create the rings. All or nothing.
    pub fn register(
        reg: IfqReg,
        area: AreaReg,
        dma: Option<Arc<dyn DmaMap>>,
    ) -> Result<(Ifq, IfqUser), Error> {
        Self::register_with_faults(reg, area, dma, &mut |_| Ok(()))
    }

    /// [`Ifq::register`] with a hook that can fail any step; for tests.
    #[doc(hidden)]
    pub fn register_with_faults(
        reg: IfqReg,
        area: AreaReg,
        dma: Option<Arc<dyn DmaMap>>,
        inject: &mut dyn FnMut(RegStep) -> std::io::Result<()>,
    ) -> Result<(Ifq, IfqUser), Error> {
        let reg = validate(&reg, dma.is_some())?;
        let area = Area::create_with_faults(area, reg.rx_buf_len, dma, &mut |s| inject(RegStep::Area(s)))?;
        let ring_err = |which| move |source| Error::Ring { which, source };
        let ring_fault = |which, e: std::io::Error| Error::Ring {
            which,
            source: RingError::Alloc { bytes: 0, source: e },
        };
        inject(RegStep::RqRing).map_err(|e| ring_fault("refill", e))?;
        let (rq_p, rq_c) = ring::ring::<Rqe>(reg.rq_entries).map_err(ring_err("refill"))?;
        inject(RegStep::CqRing).map_err(|e| ring_fault("completion", e))?;
        let (cq_p, cq_c) = ring::ring::<Cqe>(reg.cq_entries).map_err(ring_err("completion"))?;

        let n = area.num_niovs();
        let shared = Arc::new(Shared {
            stats: CachePadded::new(Default::default()),
            events: CachePadded::new(AtomicU32::new(0)),
            flush_req: CachePadded::new(AtomicU64::new(0)),
            closed: AtomicBool::new(false),
        });
        let token = area_token(area.id());
        let user = IfqUser {
            rq: rq_p,
            cq: cq_c,
            mem: area.memory().clone(),
            held: vec![0; (n as usize).div_ceil(64)],
            token,
            niov_shift: area.niov_shift(),
            num_niovs: n,
            shared: shared.clone(),
        };
        // Pop order 0, 1, 2...: lowest addresses first, which makes traces easy to read.
        let free = (0..n).rev().collect();
        let ifq = Ifq {
            state: vec![NiovState::Free; n as usize],
            free,
            user: 0,
            rq: rq_c,
            cq: cq_p,
            token,
            stats: IfqStats::default(),
            shared,
            flush_seen: 0,
            reg,
            area,
            scratch: Default::default(),
        };
        Ok((ifq, user))
    }

    /// The registration as used (entries rounded).
    pub fn reg(&self) -> &IfqReg {
        &self.reg
    }
    pub fn area(&self) -> &Area {
        &self.area
    }
    pub fn is_nodev(&self) -> bool {
        self.reg.flags & ZCRX_REG_NODEV != 0
    }
    pub fn free_count(&self) -> u32 {
        self.free.len() as u32
    }
    pub fn posted_count(&self) -> u32 {
        self.area.num_niovs() - self.free.len() as u32 - self.user
    }
    pub fn user_count(&self) -> u32 {
        self.user
    }
    pub fn niov_state(&self, i: u32) -> NiovState {
        self.state[i as usize]
    }
    /// Counters as of now (the receive side's own view, always current).
    pub fn stats(&self) -> IfqStats {
        self.stats
    }

    /// Take a free buffer for a device or a copy.
    #[inline]
    pub fn take_free(&mut self) -> Option<u32> {
        let i = self.free.pop()?;
        self.state[i as usize] = NiovState::Posted;
        Some(i)
    }

    /// Give back a posted buffer that received nothing.
    #[inline]
    pub fn put_back(&mut self, i: u32) {
        debug_assert_eq!(self.state[i as usize], NiovState::Posted);
        self.state[i as usize] = NiovState::Free;
        self.free.push(i);
    }

    /// Completion slots free right now (one acquire load of the user's head).
    #[inline]
    pub fn cq_space(&mut self) -> u32 {
        self.cq.free_for(u32::MAX)
    }

    /// Hand `len` bytes at `offset` inside posted buffer `i` to the user. The caller has checked
    /// [`Ifq::cq_space`]; when the ring is full anyway the buffer goes back to the free list and
    /// `Err` says so.
    #[inline(always)] // the device driver's per-buffer path
    pub fn complete(&mut self, i: u32, offset: u32, len: u32, flags: u32, copied: bool) -> Result<(), CqFull> {
        debug_assert_eq!(self.state[i as usize], NiovState::Posted);
        debug_assert!(offset as u64 + len as u64 <= self.area.rx_buf_len() as u64);
        let off = self.token | (((i as u64) << self.area.niov_shift()) + offset as u64);
        if self.cq.push(Cqe { off, len, flags }).is_err() {
            self.stats.cq_full += 1;
            self.put_back(i);
            return Err(CqFull);
        }
        self.state[i as usize] = NiovState::User;
        self.user += 1;
        if copied {
            self.stats.copy_count += 1;
            self.stats.copy_bytes += len as u64;
        } else {
            self.stats.zc_count += 1;
            self.stats.zc_bytes += len as u64;
        }
        Ok(())
    }

    /// Publish staged completions and counters (one release store each; once per batch).
    pub fn commit(&mut self) {
        self.cq.commit();
        for (a, v) in self.shared.stats.iter().zip(self.stats.to_array()) {
            a.store(v, Ordering::Relaxed);
        }
    }

    /// Raise an event for the user; cheap when it is already pending.
    pub fn post_event(&self, ev: u32) {
        if self.shared.events.load(Ordering::Relaxed) & ev != ev {
            self.shared.events.fetch_or(ev, Ordering::Release);
        }
    }

    /// Note that a receive found no buffer (or no completion slot); the data stays in its source.
    pub(crate) fn note_no_buffer(&mut self, cq_full: bool) {
        if cq_full {
            self.stats.cq_full += 1;
        } else {
            self.stats.no_buffer += 1;
        }
        self.post_event(ZCRX_EVENT_ALLOC_FAIL);
    }

    pub(crate) fn note_truncated(&mut self) {
        self.stats.truncated += 1;
    }

    /// Drain the refill queue into the free list (ZCRX_CTRL_FLUSH_RQ). Invalid entries are
    /// skipped and counted. Returns the number of buffers returned.
    pub fn flush_rq(&mut self) -> u32 {
        let mut returned = 0;
        // At most one ring's worth per call, so a producer that keeps publishing cannot hold us.
        let mut budget = self.rq.entries();
        while let Some(i) = self.pop_returned(&mut budget) {
            self.state[i as usize] = NiovState::Free;
            self.free.push(i);
            returned += 1;
        }
        self.rq.release();
        // The first returned goes out first (the stack's top is its end): a user returning in
        // completion order gets each buffer posted again in the order it was used.
        let n = self.free.len();
        self.free[n - returned as usize..].reverse();
        self.stats.flushes += 1;
        self.commit();
        returned
    }

    /// The next buffer the user returned on the refill queue, handed straight to the caller as
    /// posted (it skips the free list): what a device driver does on every refill, like the
    /// kernel's page pool consuming the RQ, so a buffer goes back to the device while still in
    /// cache and in the order it was returned. Invalid entries are skipped and
    /// counted as in [`Ifq::flush_rq`]. `None` when the queue is empty. Call
    /// [`Ifq::release_rq`] after the batch.
    #[inline]
    pub fn take_returned(&mut self) -> Option<u32> {
        let mut budget = self.rq.available();
        let i = self.pop_returned(&mut budget)?;
        self.state[i as usize] = NiovState::Posted;
        Some(i)
    }

    /// The next valid entry of the refill queue, reading at most `budget` entries (each read
    /// counts, so a producer that keeps writing garbage cannot hold us); the buffer stops being
    /// the user's and the caller says where it goes. Invalid entries are skipped and counted.
    #[inline]
    fn pop_returned(&mut self, budget: &mut u32) -> Option<u32> {
        while *budget > 0 {
            let rqe = self.rq.pop()?;
            *budget -= 1;
            if let Some(i) = self.check_rqe(&rqe) {
                self.user -= 1;
                self.stats.refilled += 1;
                return Some(i);
            }
            self.stats.invalid_rqes += 1;
            self.post_event(ZCRX_EVENT_INVALID_RQE);
        }
        None
    }

    /// Hand the refill-queue slots read by [`Ifq::take_returned`] back to the user.
    #[inline]
    pub fn release_rq(&mut self) {
        self.rq.release();
    }

    /// Serve a flush the user asked for with [`IfqUser::flush_rq`] (one relaxed load when there
    /// is none). Returns the buffers returned.
    #[inline]
    pub fn poll_flush_request(&mut self) -> u32 {
        let req = self.shared.flush_req.load(Ordering::Acquire);
        if req == self.flush_seen {
            return 0;
        }
        self.flush_seen = req;
        self.flush_rq()
    }

    /// The buffer an entry returns, if the entry is valid and the buffer is the user's.
    fn check_rqe(&self, rqe: &Rqe) -> Option<u32> {
        if rqe.off & !AREA_MASK != self.token || rqe.pad != 0 {
            return None;
        }
        let off = rqe.off & AREA_MASK;
        let shift = self.area.niov_shift();
        if off & ((1u64 << shift) - 1) != 0 || off >= self.area.len() as u64 {
            return None;
        }
        let i = (off >> shift) as u32;
        (self.state[i as usize] == NiovState::User).then_some(i)
    }

    /// Stop: every buffer is accounted for and the area is unmapped, unlocked and un-accounted.
    /// The user's end keeps the memory (completions already delivered stay readable).
    pub fn close(self) -> IfqStats {
        let s = self.stats;
        drop(self);
        s
    }
}

impl Drop for Ifq {
    fn drop(&mut self) {
        self.commit();
        self.shared.closed.store(true, Ordering::Release);
        // The area (a field) drops after this: DMA unmap, munlock, un-account, in that order.
    }
}

/// The completion ring was full; the buffer went back to the free list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("completion ring full")]
pub struct CqFull;

/// Why a buffer could not be read or returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BufError {
    #[error("completion names another area (offset {0:#x})")]
    BadToken(u64),
    #[error("completion offset {off:#x} + length {len} is outside the area")]
    OutOfRange { off: u64, len: u32 },
    #[error("buffer {0} is not held by the user")]
    NotHeld(u32),
    #[error("refill queue full: call flush_rq (the buffer is still yours)")]
    RqFull,
}

/// Why [`IfqUser::consume`] stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConsumeError<E> {
    /// A completion the receive side should not have written; it is still in the ring.
    #[error("{0}")]
    Buf(BufError),
    /// The callback failed (its buffer was returned).
    #[error("{0}")]
    Sink(E),
}

/// The application side of an interface queue.
pub struct IfqUser {
    rq: Producer<Rqe>,
    cq: Consumer<Cqe>,
    mem: Arc<AreaMemory>,
    /// One bit per buffer: completed to us and not yet returned.
    held: Vec<u64>,
    token: u64,
    niov_shift: u32,
    num_niovs: u32,
    shared: Arc<Shared>,
}

impl IfqUser {
    /// Take up to `out.len()` completions; the buffers they name are ours until returned.
    pub fn recv(&mut self, out: &mut [Cqe]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(c) = self.cq.pop() else { break };
            if let Some(i) = self.niov_of(c.off, c.len) {
                self.held[i as usize / 64] |= 1 << (i % 64);
            }
            out[n] = c;
            n += 1;
        }
        if n != 0 {
            self.cq.release();
        }
        n
    }

    fn niov_of(&self, off: u64, len: u32) -> Option<u32> {
        if off & !AREA_MASK != self.token {
            return None;
        }
        let o = off & AREA_MASK;
        let i = o >> self.niov_shift;
        let end_in_niov = (o & ((1 << self.niov_shift) - 1)) + len as u64;
        (i < self.num_niovs as u64 && end_in_niov <= 1 << self.niov_shift).then_some(i as u32)
    }

    /// The refill entry that returns buffer `i`.
    #[inline]
    fn rqe_for(&self, i: u32) -> Rqe {
        Rqe { off: self.token | (u64::from(i) << self.niov_shift), len: 1 << self.niov_shift, pad: 0 }
    }

    /// The buffer a completion names, if it names one of this area (not checked: held).
    #[inline]
    fn locate(&self, c: &Cqe) -> Result<u32, BufError> {
        if c.off & !AREA_MASK != self.token {
            return Err(BufError::BadToken(c.off));
        }
        self.niov_of(c.off, c.len).ok_or(BufError::OutOfRange { off: c.off, len: c.len })
    }

    fn check_held(&self, c: &Cqe) -> Result<u32, BufError> {
        let i = self.locate(c)?;
        if self.held[i as usize / 64] & (1 << (i % 64)) == 0 {
            return Err(BufError::NotHeld(i));
        }
        Ok(i)
    }

    /// The bytes of a completion, read in place. Only for buffers we hold.
    pub fn data(&self, c: &Cqe) -> Result<&[u8], BufError> {
        self.check_held(c)?;
        // SAFETY: the range is inside the area (checked) and the buffer is held by us: the
        // receive side does not write it until we return it, which needs `&mut self` and so
        // ends this borrow first. The completion's release/acquire pair made the bytes visible.
        Ok(unsafe {
            std::slice::from_raw_parts(self.mem.ptr().as_ptr().add(c.area_offset() as usize), c.len as usize)
        })
    }

    /// Stage the buffer of `c` for return. Visible to the receive side after
    /// [`IfqUser::commit_rq`] or [`IfqUser::flush_rq`]. A full queue keeps the buffer ours.
    pub fn refill(&mut self, c: &Cqe) -> Result<(), BufError> {
        let i = self.check_held(c)?;
        self.rq.push(self.rqe_for(i)).map_err(|_| BufError::RqFull)?;
        self.held[i as usize / 64] &= !(1 << (i % 64));
        Ok(())
    }

    /// Take up to `max` completions and give each one's bytes to `f` in place, then its buffer
    /// straight back (staged on the refill queue; publish with [`IfqUser::commit_rq`] or
    /// [`IfqUser::flush_rq`]): the process-then-return loop of most receivers, with each
    /// completion checked once and no buffer ever counted as held. No more are taken than the
    /// refill queue has room for: `Ok(0)` with completions waiting means it is full (flush).
    ///
    /// `f` failing stops the batch after that buffer was returned; a completion naming no
    /// buffer of this area stops it before, left unread. Nothing is lost either way.
    pub fn consume<E>(
        &mut self,
        max: usize,
        mut f: impl FnMut(&[u8], &Cqe) -> Result<(), E>,
    ) -> Result<usize, ConsumeError<E>> {
        let ready = self.cq.available() as usize;
        if ready == 0 {
            return Ok(0);
        }
        let n = max.min(ready).min(self.rq.free_for(ready.min(max) as u32) as usize);
        let base = self.mem.ptr().as_ptr();
        let mut done = 0;
        let mut result = Ok(());
        while done < n {
            let Some(c) = self.cq.pop() else { break };
            let i = match self.locate(&c) {
                Ok(i) => i,
                Err(e) => {
                    // Leave it in the ring; nothing was taken.
                    self.cq.unpop();
                    result = Err(ConsumeError::Buf(e));
                    break;
                }
            };
            // SAFETY: niov_of checked the range is inside the area and one niov; the receive
            // side completed the buffer to us and will not write it before we return it, which
            // happens below, after `f` is done with the slice.
            let bytes = unsafe { std::slice::from_raw_parts(base.add(c.area_offset() as usize), c.len as usize) };
            let r = f(bytes, &c);
            // Room was reserved above: this cannot fail.
            let _ = self.rq.push(self.rqe_for(i));
            done += 1;
            if let Err(e) = r {
                result = Err(ConsumeError::Sink(e));
                break;
            }
        }
        if done != 0 {
            self.cq.release();
        }
        result.map(|()| done)
    }

    /// Completions ready to take.
    pub fn cq_ready(&mut self) -> u32 {
        self.cq.available()
    }

    /// Publish staged refill entries.
    pub fn commit_rq(&mut self) {
        self.rq.commit();
    }

    /// Publish staged refills and ask the receive side to drain the refill queue
    /// (ZCRX_CTRL_FLUSH_RQ). In NODEV mode nobody drains it otherwise.
    pub fn flush_rq(&mut self) {
        self.rq.commit();
        self.shared.flush_req.fetch_add(1, Ordering::Release);
    }

    /// Refill-queue slots free (refreshes the receive side's head when it looks full).
    pub fn rq_space(&mut self) -> u32 {
        self.rq.free()
    }

    /// The refill queue itself, for callers that write raw entries as the uapi allows. Entries
    /// are validated on the receive side; bad ones are counted in `invalid_rqes`.
    pub fn rq_raw(&mut self) -> &mut Producer<Rqe> {
        &mut self.rq
    }

    /// Events raised since the last call (`ZCRX_EVENT_*`), cleared.
    pub fn take_events(&self) -> u32 {
        self.shared.events.swap(0, Ordering::Acquire)
    }

    /// Counters as last published by the receive side.
    pub fn stats(&self) -> IfqStats {
        IfqStats::from_array(std::array::from_fn(|k| self.shared.stats[k].load(Ordering::Relaxed)))
    }

    /// Whether the receive side has been closed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Buffers we hold.
    pub fn held_count(&self) -> u32 {
        self.held.iter().map(|w| w.count_ones()).sum()
    }

    /// The area token completions carry.
    pub fn area_token(&self) -> u64 {
        self.token
    }
    pub fn rx_buf_len(&self) -> u32 {
        1 << self.niov_shift
    }
    /// The area memory (kept alive as long as this end lives).
    pub fn memory(&self) -> &Arc<AreaMemory> {
        &self.mem
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AreaReg, MemoryKind};

    const BUF: usize = 4096;

    /// A NODEV ifq of `n` buffers with `k` of them completed to the user: buffer `j` holds
    /// `j + 1` bytes of value `j`.
    /// Holds the memlock test's lock while the area lives (drop it last).
    type Serial = std::sync::MutexGuard<'static, ()>;

    fn setup(n: usize, rq: u32, k: u32) -> (Serial, Ifq, IfqUser) {
        let serial = crate::memlock::TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let reg = IfqReg { rq_entries: rq, cq_entries: 16, ..IfqReg::default() };
        let (mut ifq, user) = Ifq::register(reg, AreaReg::new(MemoryKind::Anonymous, n * BUF), None).unwrap();
        for j in 0..k {
            let i = ifq.take_free().unwrap();
            // SAFETY: niov i was just taken from the free list; nobody else touches it.
            unsafe { std::ptr::write_bytes(ifq.area().niov_ptr(i), j as u8, j as usize + 1) };
            ifq.complete(i, 0, j + 1, 0, true).unwrap();
        }
        ifq.commit();
        (serial, ifq, user)
    }

    #[test]
    fn consume_reads_in_place_and_returns_every_buffer() {
        let (_serial, mut ifq, mut user) = setup(8, 8, 5);
        let mut seen = Vec::new();
        let n = user.consume(64, |d, _| {
            seen.push(d.to_vec());
            Ok::<(), ()>(())
        });
        assert_eq!(n, Ok(5));
        assert_eq!(seen, (0..5u8).map(|j| vec![j; j as usize + 1]).collect::<Vec<_>>());
        assert_eq!((user.held_count(), ifq.user_count()), (0, 5), "returned, not yet flushed");
        user.flush_rq();
        assert_eq!(ifq.poll_flush_request(), 5);
        assert_eq!((ifq.free_count(), ifq.user_count(), ifq.stats().invalid_rqes), (8, 0, 0));
        assert_eq!(user.consume(64, |_, _| Ok::<(), ()>(())), Ok(0), "nothing left");
    }

    #[test]
    fn consume_takes_no_more_than_the_refill_queue_holds() {
        let (_serial, mut ifq, mut user) = setup(8, 2, 5);
        let ok = |_: &[u8], _: &Cqe| Ok::<(), ()>(());
        assert_eq!(user.consume(64, ok), Ok(2));
        assert_eq!(user.consume(64, ok), Ok(0), "refill queue full");
        assert_eq!(user.cq_ready(), 3, "the rest waits in the completion ring");
        user.flush_rq();
        ifq.poll_flush_request();
        assert_eq!(user.consume(64, ok), Ok(2));
        user.flush_rq();
        ifq.poll_flush_request();
        assert_eq!(user.consume(64, ok), Ok(1));
        user.flush_rq();
        ifq.poll_flush_request();
        assert_eq!((ifq.free_count(), ifq.user_count(), user.cq_ready()), (8, 0, 0));
    }

    #[test]
    fn consume_stops_at_a_failing_sink_and_loses_nothing() {
        let (_serial, mut ifq, mut user) = setup(8, 8, 4);
        let mut calls = 0;
        let r = user.consume(64, |d, _| {
            calls += 1;
            if d.len() == 2 { Err("disk full") } else { Ok(()) }
        });
        assert_eq!((r, calls), (Err(ConsumeError::Sink("disk full")), 2));
        assert_eq!(user.cq_ready(), 2, "the rest still in the ring");
        assert_eq!(user.consume(64, |d, _| if d.len() > 2 { Ok::<(), ()>(()) } else { Err(()) }), Ok(2));
        user.flush_rq();
        ifq.poll_flush_request();
        assert_eq!((ifq.free_count(), ifq.user_count()), (8, 0), "the failed one was returned too");
    }

    #[test]
    fn consume_refuses_a_completion_outside_the_area() {
        let (_serial, mut ifq, mut user) = setup(8, 8, 1);
        let end = ifq.area().len() as u64;
        for bad in [Cqe { off: area_token(3), len: 1, flags: 0 }, Cqe { off: ifq.token | end, len: 1, flags: 0 }] {
            ifq.cq.push(bad).unwrap();
        }
        ifq.commit();
        let ok = |_: &[u8], _: &Cqe| Ok::<(), ()>(());
        assert_eq!(user.consume(64, ok), Err(ConsumeError::Buf(BufError::BadToken(area_token(3)))), "the good one first, then stop");
        assert_eq!((user.cq_ready(), ifq.user_count(), user.held_count()), (2, 1, 0), "the bad one stays, unread");
        // `recv` reports the same entries without marking anything held.
        let mut c = [Cqe::default(); 4];
        assert_eq!(user.recv(&mut c), 2);
        assert_eq!(user.data(&c[1]), Err(BufError::OutOfRange { off: ifq.token | end, len: 1 }));
        assert_eq!(user.held_count(), 0);
    }
}

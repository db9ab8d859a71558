//! Raw, bounds-checked access to split virtqueues in the frontend's memory.
//!
//! The vhost-user crates are used for the control plane; the per-frame path
//! works on pointers that are translated once per (re)start and checked here:
//! every address and length the frontend writes into a descriptor is
//! untrusted and is translated through [`GuestMap::translate`], which only
//! returns a pointer when the whole range lies inside one mapped region.

use std::ptr;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

pub(crate) const VRING_DESC_F_NEXT: u16 = 1;
pub(crate) const VRING_DESC_F_WRITE: u16 = 2;
pub(crate) const VRING_DESC_F_INDIRECT: u16 = 4;
pub(crate) const VRING_USED_F_NO_NOTIFY: u16 = 1;
pub(crate) const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

#[derive(Clone, Copy)]
struct Region {
    gpa: u64,
    end: u64,
    host: *mut u8,
}

/// A snapshot of the frontend's memory table: guest-physical ranges and where
/// they are mapped here. Holds the `Arc` of the mapping so the pointers stay
/// valid while the snapshot lives, even if the frontend replaces the table.
pub(crate) struct GuestMap {
    regions: Vec<Region>,
    /// Region of the last translation.
    hint: std::cell::Cell<usize>,
    _mem: Arc<GuestMemoryMmap<()>>,
}

// SAFETY: the raw pointers point into mappings owned by `_mem`, which is Send+Sync.
unsafe impl Send for GuestMap {}

impl GuestMap {
    pub(crate) fn new(mem: Arc<GuestMemoryMmap<()>>) -> Self {
        let regions = mem
            .iter()
            .map(|r| Region {
                gpa: r.start_addr().0,
                end: r.start_addr().0.saturating_add(r.len()),
                host: r.as_ptr(),
            })
            .collect();
        GuestMap { regions, hint: std::cell::Cell::new(0), _mem: mem }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Host pointer for `[gpa, gpa + len)`, or `None` unless the whole range
    /// lies inside a single mapped region (overflow-checked).
    #[inline]
    pub(crate) fn translate(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let end = gpa.checked_add(len)?;
        // SAFETY: in bounds of the mapping: offset < region length.
        let inside = |r: &Region| (gpa >= r.gpa && end <= r.end).then(|| unsafe { r.host.add((gpa - r.gpa) as usize) });
        // Buffers come from one region almost always: look where the last one was first.
        if let Some(p) = self.regions.get(self.hint.get()).and_then(inside) {
            return Some(p);
        }
        let (k, p) = self.regions.iter().enumerate().find_map(|(k, r)| Some((k, inside(r)?)))?;
        self.hint.set(k);
        Some(p)
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// Why a descriptor chain was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChainError {
    HeadOutOfRange { head: u16, size: u16 },
    NextOutOfRange { next: u16, size: u16 },
    TooLong { size: u16 },
    Indirect,
    Direction { writable_expected: bool },
    Address { addr: u64, len: u32 },
    TooBig,
}

impl std::fmt::Display for ChainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ChainError::HeadOutOfRange { head, size } => {
                write!(f, "descriptor head index {head} >= queue size {size}")
            }
            ChainError::NextOutOfRange { next, size } => {
                write!(f, "descriptor next index {next} >= queue size {size}")
            }
            ChainError::TooLong { size } => {
                write!(
                    f,
                    "descriptor chain longer than the queue size {size} (a loop)"
                )
            }
            ChainError::Indirect => {
                write!(f, "indirect descriptor, but INDIRECT_DESC was not offered")
            }
            ChainError::Direction {
                writable_expected: true,
            } => {
                write!(
                    f,
                    "device-readable descriptor in an rx (device-writable) chain"
                )
            }
            ChainError::Direction {
                writable_expected: false,
            } => {
                write!(
                    f,
                    "device-writable descriptor in a tx (device-readable) chain"
                )
            }
            ChainError::Address { addr, len } => write!(
                f,
                "descriptor [{addr:#x}, +{len:#x}) is not inside the frontend's memory table"
            ),
            ChainError::TooBig => write!(f, "descriptor chain longer than 4 GiB"),
        }
    }
}

/// One translated, bounds-checked buffer segment.
#[derive(Clone, Copy)]
pub(crate) struct Seg {
    pub ptr: *mut u8,
    pub len: u32,
}

/// Why a queue could not be set up or had to be stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RingError {
    Size(u16),
    Layout { what: &'static str, addr: u64 },
    AvailJump { from: u16, to: u16, size: u16 },
}

impl std::fmt::Display for RingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            RingError::Size(s) => write!(f, "queue size {s} is not a power of two in 1..=32768"),
            RingError::Layout { what, addr } => write!(
                f,
                "{what} at guest address {addr:#x} is misaligned or not inside the memory table"
            ),
            RingError::AvailJump { from, to, size } => write!(
                f,
                "avail index moved from {from} to {to}, more than the queue size {size}"
            ),
        }
    }
}

/// A split virtqueue mapped into this process. All pointers were
/// bounds-checked against the [`GuestMap`] they came from, which must outlive
/// this value (the engine keeps both together).
pub(crate) struct RawQueue {
    pub size: u16,
    mask: u16,
    desc: *const Desc,
    avail: *mut u8,
    used: *mut u8,
    pub next_avail: u16,
    pub next_used: u16,
    /// Used index as last stored into the ring.
    published: u16,
    /// Used index at the last notification decision.
    signalled: u16,
    pub event_idx: bool,
    /// Cached avail index (avoids re-reading the shared line per entry).
    avail_cache: u16,
}

// SAFETY: pointers into shared guest memory kept alive by the GuestMap that is
// moved together with the queue.
unsafe impl Send for RawQueue {}

impl RawQueue {
    /// Translate and check the three ring areas.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        map: &GuestMap,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        next_avail: u16,
        next_used: u16,
        event_idx: bool,
    ) -> Result<RawQueue, RingError> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(RingError::Size(size));
        }
        let n = size as u64;
        let check = |what: &'static str, addr: u64, len: u64, align: u64| {
            if addr % align != 0 {
                return Err(RingError::Layout { what, addr });
            }
            map.translate(addr, len)
                .ok_or(RingError::Layout { what, addr })
        };
        let d = check("descriptor table", desc, 16 * n, 16)?;
        let a = check("avail ring", avail, 6 + 2 * n, 2)?;
        let u = check("used ring", used, 6 + 8 * n, 4)?;
        Ok(RawQueue {
            size,
            mask: size - 1,
            desc: d as *const Desc,
            avail: a,
            used: u,
            next_avail,
            next_used,
            published: next_used,
            signalled: next_used,
            event_idx,
            avail_cache: next_avail,
        })
    }

    #[inline]
    fn avail_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: avail+2 is inside the checked avail area and 2-aligned.
        unsafe { &*(self.avail.add(2) as *const AtomicU16) }
    }

    #[inline]
    fn used_flags_atomic(&self) -> &AtomicU16 {
        // SAFETY: used+0 is inside the checked used area and 4-aligned.
        unsafe { &*(self.used as *const AtomicU16) }
    }

    #[inline]
    fn used_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: used+2 is inside the checked used area and 2-aligned.
        unsafe { &*(self.used.add(2) as *const AtomicU16) }
    }

    /// Number of chains the frontend has made available and we have not
    /// taken; re-reads the avail index when the cached one is used up.
    #[inline]
    pub(crate) fn available(&mut self) -> Result<u16, RingError> {
        let mut n = self.avail_cache.wrapping_sub(self.next_avail);
        if n == 0 {
            let idx = u16::from_le(self.avail_idx_atomic().load(Ordering::Acquire));
            n = idx.wrapping_sub(self.next_avail);
            if n > self.size {
                return Err(RingError::AvailJump {
                    from: self.next_avail,
                    to: idx,
                    size: self.size,
                });
            }
            self.avail_cache = idx;
        }
        Ok(n)
    }

    /// Take the next available head index (caller checked `available() > 0`).
    #[inline]
    pub(crate) fn pop(&mut self) -> u16 {
        let slot = (self.next_avail & self.mask) as usize;
        // SAFETY: slot < size, ring entries lie within the checked avail area.
        let head = unsafe { ptr::read_volatile(self.avail.add(4 + 2 * slot) as *const u16) };
        self.next_avail = self.next_avail.wrapping_add(1);
        u16::from_le(head)
    }

    /// Prefetch for what is `ahead` avail entries away: the descriptor of
    /// entry `2 * ahead` and the first 128 bytes of the buffer of entry
    /// `ahead` (for writing), so the cache misses on memory the frontend's
    /// core wrote last overlap with the work on the current frame. Only
    /// entries already known available and translated (bounds-checked)
    /// addresses are touched; prefetches never fault.
    #[inline]
    pub(crate) fn prefetch_ahead(&self, map: &GuestMap, ahead: u16, write: bool) {
        let avail = self.avail_cache.wrapping_sub(self.next_avail);
        let far = ahead.wrapping_mul(2);
        if avail > far {
            let slot = (self.next_avail.wrapping_add(far) & self.mask) as usize;
            // SAFETY: slot < size, inside the checked avail area.
            let head = u16::from_le(unsafe {
                ptr::read_volatile(self.avail.add(4 + 2 * slot) as *const u16)
            });
            if head < self.size {
                // SAFETY: head < size: inside the checked descriptor table.
                prefetch(unsafe { self.desc.add(head as usize) } as *const u8, false);
            }
        }
        if avail > ahead {
            let slot = (self.next_avail.wrapping_add(ahead) & self.mask) as usize;
            // SAFETY: as above.
            let head = u16::from_le(unsafe {
                ptr::read_volatile(self.avail.add(4 + 2 * slot) as *const u16)
            });
            if head < self.size {
                // SAFETY: head < size.
                let d = unsafe { ptr::read_volatile(self.desc.add(head as usize)) };
                let len = u32::from_le(d.len).min(128) as u64;
                if let Some(p) = map.translate(u64::from_le(d.addr), len) {
                    prefetch(p, write);
                    if len > 64 {
                        // SAFETY: len > 64 bytes were translated.
                        prefetch(unsafe { p.add(64) }, write);
                    }
                }
            }
        }
    }

    /// The next available chain, if it is one device-writable descriptor of at least `need`
    /// bytes inside guest memory: its head and where it is mapped. Nothing is taken: on `None`
    /// the caller pops and walks the chain the general way (which also reports what is wrong
    /// with it). The caller checked `available() > 0`.
    #[inline]
    pub(crate) fn peek_single_writable(&self, map: &GuestMap, need: u32) -> Option<(u16, *mut u8)> {
        let slot = (self.next_avail & self.mask) as usize;
        // SAFETY: slot < size, inside the checked avail area.
        let head = u16::from_le(unsafe { ptr::read_volatile(self.avail.add(4 + 2 * slot) as *const u16) });
        if head >= self.size {
            return None;
        }
        // SAFETY: head < size: inside the checked descriptor table.
        let d = unsafe { ptr::read_volatile(self.desc.add(head as usize)) };
        let (len, flags) = (u32::from_le(d.len), u16::from_le(d.flags));
        if flags != VRING_DESC_F_WRITE || len < need {
            return None;
        }
        Some((head, map.translate(u64::from_le(d.addr), len as u64)?))
    }

    /// Give back the last `n` popped entries (they will be popped again).
    pub(crate) fn unpop(&mut self, n: u16) {
        self.next_avail = self.next_avail.wrapping_sub(n);
    }

    /// Walk the chain at `head`, checking every descriptor, and append its
    /// segments to `segs`. Returns the total length. On error `segs` is
    /// truncated back to its length on entry.
    #[inline]
    pub(crate) fn walk(
        &self,
        map: &GuestMap,
        head: u16,
        writable: bool,
        segs: &mut Vec<Seg>,
    ) -> Result<u32, ChainError> {
        let start = segs.len();
        let r = self.walk_inner(map, head, writable, segs);
        if r.is_err() {
            segs.truncate(start);
        }
        r
    }

    #[inline]
    fn walk_inner(
        &self,
        map: &GuestMap,
        head: u16,
        writable: bool,
        segs: &mut Vec<Seg>,
    ) -> Result<u32, ChainError> {
        if head >= self.size {
            return Err(ChainError::HeadOutOfRange {
                head,
                size: self.size,
            });
        }
        let mut idx = head;
        let mut total: u32 = 0;
        let mut count = 0u32;
        loop {
            // SAFETY: idx < size, the descriptor table area was checked.
            let d = unsafe { ptr::read_volatile(self.desc.add(idx as usize)) };
            let (addr, len, flags, next) = (
                u64::from_le(d.addr),
                u32::from_le(d.len),
                u16::from_le(d.flags),
                u16::from_le(d.next),
            );
            count += 1;
            if count > self.size as u32 {
                return Err(ChainError::TooLong { size: self.size });
            }
            if flags & VRING_DESC_F_INDIRECT != 0 {
                return Err(ChainError::Indirect);
            }
            if (flags & VRING_DESC_F_WRITE != 0) != writable {
                return Err(ChainError::Direction {
                    writable_expected: writable,
                });
            }
            if len > 0 {
                let p = map
                    .translate(addr, len as u64)
                    .ok_or(ChainError::Address { addr, len })?;
                total = total.checked_add(len).ok_or(ChainError::TooBig)?;
                if segs.len() == segs.capacity() {
                    // Cannot happen (capacity >= queue size >= count), but never
                    // allocate or overflow on the hot path.
                    return Err(ChainError::TooLong { size: self.size });
                }
                segs.push(Seg { ptr: p, len });
            }
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(total);
            }
            if next >= self.size {
                return Err(ChainError::NextOutOfRange {
                    next,
                    size: self.size,
                });
            }
            idx = next;
        }
    }

    /// Ask for the lines of the next `n` used elements, for writing, before a burst: the
    /// frontend's core read them last, and a store that has to fetch its line first holds up
    /// everything behind it.
    #[inline]
    pub(crate) fn prefetch_used(&self, n: u16) {
        let mut k = 0;
        while k < n {
            let slot = (self.next_used.wrapping_add(k) & self.mask) as usize;
            // SAFETY: slot < size, inside the checked used area; prefetches never fault.
            prefetch(unsafe { self.used.add(4 + 8 * slot) }, true);
            k += 8;
        }
    }

    /// Write a used element (not yet visible: see [`publish`](Self::publish)).
    #[inline]
    pub(crate) fn push_used(&mut self, id: u16, len: u32) {
        let slot = (self.next_used & self.mask) as usize;
        // SAFETY: slot < size, inside the checked used area (4-aligned elements).
        unsafe {
            let e = self.used.add(4 + 8 * slot) as *mut u32;
            ptr::write_volatile(e, (id as u32).to_le());
            ptr::write_volatile(e.add(1), len.to_le());
        }
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// Make all pushed used elements visible with one index store.
    /// Returns whether anything was published.
    #[inline]
    pub(crate) fn publish(&mut self) -> bool {
        if self.published == self.next_used {
            return false;
        }
        self.used_idx_atomic()
            .store(self.next_used.to_le(), Ordering::Release);
        self.published = self.next_used;
        true
    }

    /// Whether the frontend wants an interrupt for what was published since
    /// the last call (EVENT_IDX: used_event; else VRING_AVAIL_F_NO_INTERRUPT).
    #[inline]
    pub(crate) fn needs_notification(&mut self) -> bool {
        let old = self.signalled;
        let new = self.published;
        if old == new {
            return false;
        }
        self.signalled = new;
        // Order the used index store before reading the frontend's flags.
        fence(Ordering::SeqCst);
        if self.event_idx {
            // SAFETY: used_event (avail + 4 + 2*size) lies within the checked avail area.
            let ev = u16::from_le(unsafe {
                ptr::read_volatile(self.avail.add(4 + 2 * self.size as usize) as *const u16)
            });
            new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            // SAFETY: avail flags at avail + 0.
            let flags = u16::from_le(unsafe { ptr::read_volatile(self.avail as *const u16) });
            flags & VRING_AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Ask the frontend not to kick (we are polling).
    pub(crate) fn suppress_kicks(&mut self) {
        if !self.event_idx {
            self.used_flags_atomic()
                .store(VRING_USED_F_NO_NOTIFY.to_le(), Ordering::Relaxed);
        }
        // With EVENT_IDX the frontend kicks only when it crosses avail_event,
        // which we leave behind while polling.
    }

    /// Ask the frontend to kick on new buffers; returns true if buffers
    /// arrived meanwhile (then do not sleep).
    pub(crate) fn request_kicks(&mut self) -> bool {
        if self.event_idx {
            // SAFETY: avail_event (used + 4 + 8*size) lies within the checked used area.
            unsafe {
                ptr::write_volatile(
                    self.used.add(4 + 8 * self.size as usize) as *mut u16,
                    self.next_avail.to_le(),
                )
            };
        } else {
            self.used_flags_atomic().store(0, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        let idx = u16::from_le(self.avail_idx_atomic().load(Ordering::Acquire));
        idx != self.next_avail
    }
}

#[inline(always)]
fn prefetch(p: *const u8, write: bool) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch instructions never fault and do not change memory.
    unsafe {
        if write {
            // PREFETCHW (0F 0D /1): a NOP hint on x86-64 CPUs without it.
            std::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, readonly, preserves_flags));
        } else {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, write);
}

/// Copy `src` into the segments starting at byte `off` of their
/// concatenation; returns bytes copied (stops at the end of the segments).
#[inline]
pub(crate) fn scatter(segs: &[Seg], mut off: usize, src: &[u8]) -> usize {
    let mut done = 0;
    for s in segs {
        let l = s.len as usize;
        if off >= l {
            off -= l;
            continue;
        }
        let n = (l - off).min(src.len() - done);
        // SAFETY: s.ptr..s.ptr+l was bounds-checked; src is a local buffer.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr().add(done), s.ptr.add(off), n) };
        done += n;
        off = 0;
        if done == src.len() {
            break;
        }
    }
    done
}

/// Copy bytes `[off, off + dst.len())` of the segments' concatenation into
/// `dst`; returns bytes copied.
#[inline]
pub(crate) fn gather(segs: &[Seg], mut off: usize, dst: &mut [u8]) -> usize {
    let mut done = 0;
    for s in segs {
        let l = s.len as usize;
        if off >= l {
            off -= l;
            continue;
        }
        let n = (l - off).min(dst.len() - done);
        // SAFETY: s.ptr..s.ptr+l was bounds-checked; dst is a local buffer.
        unsafe { ptr::copy_nonoverlapping(s.ptr.add(off), dst.as_mut_ptr().add(done), n) };
        done += n;
        off = 0;
        if done == dst.len() {
            break;
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn map() -> GuestMap {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0x1_0000), 0x1_0000),
            (GuestAddress(0x10_0000), 0x1000),
        ])
        .unwrap();
        GuestMap::new(Arc::new(mem))
    }

    #[test]
    fn translate_checks_whole_range_and_overflow() {
        let m = map();
        assert!(m.translate(0x1_0000, 0x1_0000).is_some());
        assert!(m.translate(0x1_0000, 0x1_0001).is_none());
        assert!(m.translate(0x1_FFFF, 1).is_some());
        assert!(m.translate(0x1_FFFF, 2).is_none());
        assert!(m.translate(0xFFFF, 2).is_none());
        assert!(m.translate(0, 1).is_none());
        assert!(m.translate(u64::MAX, 2).is_none());
        assert!(m.translate(u64::MAX - 1, 1).is_none());
        // Spanning two regions (not contiguous here anyway) is rejected.
        assert!(m.translate(0x1_F000, 0x10_0000).is_none());
        assert!(m.translate(0x10_0800, 0x800).is_some());
    }

    fn region_bounds(m: &GuestMap) -> Vec<(usize, usize)> {
        m.regions
            .iter()
            .map(|r| (r.host as usize, r.host as usize + (r.end - r.gpa) as usize))
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// translate() agrees with a reference model, edges included.
        #[test]
        fn translate_matches_model(
            gpa in proptest::prop_oneof![
                0u64..0x20_0000,
                proptest::prelude::any::<u64>(),
                (u64::MAX - 0x1000)..=u64::MAX,
            ],
            len in proptest::prop_oneof![0u64..0x2_0000, proptest::prelude::any::<u64>()],
        ) {
            let m = map();
            let inside = |s: u64, e: u64| {
                gpa.checked_add(len).is_some_and(|end| gpa >= s && end <= e)
            };
            let want = inside(0x1_0000, 0x2_0000) || inside(0x10_0000, 0x10_1000);
            let got = m.translate(gpa, len);
            proptest::prop_assert_eq!(got.is_some(), want);
            if let Some(p) = got {
                let p = p as usize;
                let ok = region_bounds(&m)
                    .iter()
                    .any(|&(s, e)| p >= s && p + len as usize <= e);
                proptest::prop_assert!(ok);
            }
        }

        /// walk() over arbitrary descriptor tables never yields a segment
        /// outside the mapping, never loops, and leaves `segs` untouched on error.
        #[test]
        fn walk_only_yields_mapped_segments(
            descs in proptest::collection::vec(
                (
                    proptest::prop_oneof![
                        0x1_0000u64..0x2_0100,
                        0x10_0000u64..0x10_1100,
                        proptest::prelude::any::<u64>(),
                    ],
                    proptest::prop_oneof![0u32..0x1100, proptest::prelude::any::<u32>()],
                    0u16..8,
                    0u16..20,
                ),
                16,
            ),
            head in 0u16..20,
            writable in proptest::prelude::any::<bool>(),
        ) {
            let m = map();
            // Descriptor table at 0x1_0000 (16 entries), rings after it.
            let q = RawQueue::new(&m, 16, 0x1_0000, 0x1_0100, 0x1_0200, 0, 0, false).unwrap();
            let table = m.translate(0x1_0000, 256).unwrap();
            for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                let d = Desc { addr, len, flags, next };
                unsafe { ptr::write(table.add(16 * i) as *mut Desc, d) };
            }
            let mut segs = Vec::with_capacity(32);
            segs.push(Seg { ptr: std::ptr::null_mut(), len: 7 });
            match q.walk(&m, head, writable, &mut segs) {
                Ok(total) => {
                    let bounds = region_bounds(&m);
                    let mut sum = 0u64;
                    for s in &segs[1..] {
                        let p = s.ptr as usize;
                        proptest::prop_assert!(bounds.iter().any(|&(a, e)| p >= a && p + s.len as usize <= e));
                        sum += s.len as u64;
                    }
                    proptest::prop_assert_eq!(sum, total as u64);
                    proptest::prop_assert!(segs.len() <= 17);
                }
                Err(_) => proptest::prop_assert_eq!(segs.len(), 1),
            }
        }

        /// scatter/gather round-trip across arbitrary segment splits.
        #[test]
        fn scatter_gather_round_trip(
            lens in proptest::collection::vec(1u32..64, 1..8),
            off in 0usize..64,
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        ) {
            let mut backing = vec![0u8; lens.iter().map(|&l| l as usize).sum()];
            let mut segs = Vec::new();
            let mut p = backing.as_mut_ptr();
            for &l in &lens {
                segs.push(Seg { ptr: p, len: l });
                p = unsafe { p.add(l as usize) };
            }
            let n = scatter(&segs, off, &data);
            proptest::prop_assert_eq!(n, data.len().min(backing.len().saturating_sub(off)));
            let mut back = vec![0u8; n];
            proptest::prop_assert_eq!(gather(&segs, off, &mut back), n);
            proptest::prop_assert_eq!(&back[..], &data[..n]);
        }
    }

    #[test]
    fn ring_layout_is_checked() {
        let m = map();
        assert!(RawQueue::new(&m, 256, 0x1_0000, 0x1_1000, 0x1_2000, 0, 0, false).is_ok());
        assert_eq!(
            RawQueue::new(&m, 100, 0x1_0000, 0x1_1000, 0x1_2000, 0, 0, false).err(),
            Some(RingError::Size(100))
        );
        // Misaligned descriptor table.
        assert!(RawQueue::new(&m, 256, 0x1_0008, 0x1_1000, 0x1_2000, 0, 0, false).is_err());
        // Used ring running off the end of the region.
        assert!(RawQueue::new(&m, 256, 0x1_0000, 0x1_1000, 0x1_F800, 0, 0, false).is_err());
        // Outside any region.
        assert!(RawQueue::new(&m, 256, 0x9000, 0x1_1000, 0x1_2000, 0, 0, false).is_err());
    }
}

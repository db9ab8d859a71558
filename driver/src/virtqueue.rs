//! Driver side of a virtio 1.x split virtqueue.
//!
//! The queue memory (descriptor table, avail ring, used ring) lives in a region that the device
//! sees too: memory shared with a vhost-user backend, or IOMMU-mapped memory for VFIO. The
//! device is **untrusted**. Everything it can write is read once, validated, and never used to
//! index our own state before the check:
//!
//! - the driver keeps a private shadow of every chain (the `next` links, the head's token, chain
//!   length and device-writable byte count), so freeing a chain never reads the shared
//!   descriptor table back: a device scribbling on `next` cannot corrupt the free list;
//! - `used.idx` may not run ahead of what was published, a used entry must name a published head
//!   that is still in flight, and its length may not exceed what the chain lets the device write;
//! - the first violation stops the queue ([`SplitQueue::is_broken`]), is counted
//!   ([`SplitQueue::errors`]), and every buffer still in flight can be taken back exactly once
//!   with [`SplitQueue::drain_in_flight`] after the device is reset.
//!
//! All accesses to the shared memory are atomic (`AtomicU16/32/64` views created from raw
//! pointers; no `&`/`&mut` to plain data in it). Descriptor and avail-entry writes are relaxed
//! and made visible by one release store of `avail.idx` in [`SplitQueue::publish`]; `used.idx` is
//! loaded with acquire before the used entries are read. No allocation after
//! [`SplitQueue::new`]. Indirect descriptors and the packed ring are not supported.
//!
//! Every line the driver writes and the device reads moves between cores (or over PCIe), so
//! the driver skips stores that would not change anything: descriptors are written only where
//! they differ from a private copy, and with [`SplitQueue::use_fixed_slots`] (one-buffer chains,
//! as an rx queue posts) avail slot `i` always names descriptor `i`, so the avail entries are
//! written once. A device completing in order then gets the same buffer back in the same slot:
//! in steady state the driver writes only `avail.idx`. (DPDK's virtio rx does the same.)
//! [`SplitQueue::post_fixed`] is the rx refill loop for such a queue: the buffer and the queue
//! are checked once per batch instead of once per buffer, as [`SplitQueue::add`] must.
//!
//! Typical use:
//!
//! ```text
//! let l = layout(256, event_idx);                     // allocate >= l.total_len, page aligned
//! let mut q = unsafe { SplitQueue::new(256, QueueMemory { vaddr, device_addr, len }, event_idx)? };
//! // tell the device q.desc_addr()/avail_addr()/used_addr() (or the *_vaddr()s for vhost-user)
//! q.add(&[Buf { addr, len, device_writable: true }], token)?;   // ... many
//! q.publish();
//! if q.needs_kick() { /* notify the device */ }
//! q.poll_used(64, |u| consume(u.token, u.len))?;
//! ```

use std::fmt;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, Ordering};

use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};

/// Largest split-queue size the virtio spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Alignment of the region and of the used ring's offset: the used ring (device-written) gets its
/// own page so it never shares a cache line with the driver-written avail ring.
pub const QUEUE_ALIGN: usize = 4096;

const DESC_SIZE: usize = 16;
/// With interrupts off, `used_event` is moved after this many completions (a quarter of the
/// index space: the device, at most a queue of 32768 ahead, stays clear of it).
const USED_EVENT_REFRESH: u16 = 0x4000;
/// `flags` and `idx` at the start of both rings.
const RING_HEADER: usize = 4;
const AVAIL_ELEM_SIZE: usize = 2;
const USED_ELEM_SIZE: usize = 8;
/// `used_event` (end of the avail ring) / `avail_event` (end of the used ring), EVENT_IDX only.
const EVENT_FIELD_SIZE: usize = 2;

/// Chains may not be longer than 2^32 bytes in total (virtio 1.2, 2.7.5.2).
const MAX_CHAIN_BYTES: u64 = 1 << 32;


const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
const F_NO_INTERRUPT: u16 = VRING_AVAIL_F_NO_INTERRUPT as u16;
const F_NO_NOTIFY: u16 = VRING_USED_F_NO_NOTIFY as u16;

/// Where the three parts of a queue sit in its region (byte offsets from the region start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    /// Descriptor table, 16 bytes per descriptor; offset 0 (16-aligned).
    pub desc_offset: usize,
    /// Avail ring, right after the table (2-aligned; in fact 16-aligned).
    pub avail_offset: usize,
    /// Used ring, on its own 4 KiB-aligned offset (4-aligned required).
    pub used_offset: usize,
    /// Bytes the region needs, rounded up to 4 KiB.
    pub total_len: usize,
}

const fn align_up(x: usize, a: usize) -> usize {
    (x + a - 1) & !(a - 1)
}

/// Layout of a split queue of `size` entries; `event_idx` adds the trailing `used_event` and
/// `avail_event` fields. Pure arithmetic: the size is validated by [`SplitQueue::new`].
pub fn layout(size: u16, event_idx: bool) -> QueueLayout {
    let n = usize::from(size);
    let ev = if event_idx { EVENT_FIELD_SIZE } else { 0 };
    let desc_offset = 0;
    let avail_offset = desc_offset + DESC_SIZE * n;
    let avail_end = avail_offset + RING_HEADER + AVAIL_ELEM_SIZE * n + ev;
    let used_offset = align_up(avail_end, QUEUE_ALIGN);
    let used_end = used_offset + RING_HEADER + USED_ELEM_SIZE * n + ev;
    QueueLayout { desc_offset, avail_offset, used_offset, total_len: align_up(used_end, QUEUE_ALIGN) }
}

/// The memory a queue lives in, as both sides see it.
#[derive(Debug, Clone, Copy)]
pub struct QueueMemory {
    /// Start of the region in this process, [`QUEUE_ALIGN`]-aligned.
    pub vaddr: *mut u8,
    /// The same start as the device addresses it (guest physical / IOVA / backend's view of the
    /// shared memory), [`QUEUE_ALIGN`]-aligned.
    pub device_addr: u64,
    /// Length in bytes; at least [`layout`]`(size, event_idx).total_len`.
    pub len: usize,
}

/// Why a queue could not be set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("queue size {0} is not a power of two in 1..=32768")]
    InvalidSize(u16),
    #[error("queue memory has {have} bytes, a queue of this size needs {need}")]
    RegionTooSmall { need: usize, have: usize },
    #[error("queue memory must be 4 KiB aligned (vaddr {vaddr:#x}, device address {device_addr:#x})")]
    Misaligned { vaddr: usize, device_addr: u64 },
    #[error("queue memory has a null virtual address")]
    NullAddress,
    #[error("queue memory device address {0:#x} + length overflows")]
    DeviceAddrOverflow(u64),
}

/// Why [`SplitQueue::add`] refused a chain. Nothing was changed in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    /// Not enough free descriptors now; retry after [`SplitQueue::poll_used`] freed some.
    #[error("queue full: {needed} descriptors needed, {free} free")]
    Full { needed: usize, free: u16 },
    #[error("empty descriptor chain")]
    EmptyChain,
    #[error("buffer {index} of the chain has length 0")]
    ZeroLength { index: usize },
    /// The spec wants all device-readable buffers before the device-writable ones.
    #[error("buffer {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable { index: usize },
    /// Can never fit: a chain may not be longer than the queue.
    #[error("chain of {len} buffers is longer than the queue ({size})")]
    ChainTooLong { len: usize, size: u16 },
    #[error("chain of {bytes} bytes exceeds 2^32 bytes")]
    ChainTooBig { bytes: u64 },
    #[error("queue is broken by a device error; reset the device and drain_in_flight")]
    Broken,
    /// Fixed slots: the next slot's descriptor is still in flight (the device completes out of
    /// order); retry after it comes back.
    #[error("avail slot {slot} is still in flight")]
    SlotBusy { slot: u16 },
    #[error("fixed slots take one-buffer chains, not {len}")]
    NotSingle { len: usize },
    #[error("the queue does not use fixed slots")]
    NotFixed,
}

/// What the device did wrong (or [`DeviceError::Broken`]: it did so earlier). `pos` is the
/// free-running used-ring index of the offending entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("used.idx {used_idx} runs ahead: last used {last_used}, only {in_flight} published buffers in flight")]
    UsedIdxJump { used_idx: u16, last_used: u16, in_flight: u16 },
    #[error("used entry {pos} names descriptor {id}, queue size is {size}")]
    BadId { pos: u16, id: u32, size: u16 },
    #[error("used entry {pos} names descriptor {id}, which is not the head of a published buffer in flight")]
    NotInFlight { pos: u16, id: u16 },
    #[error("used entry {pos} (descriptor {id}) says {len} bytes written, the chain has {writable} device-writable bytes")]
    LenTooLong { pos: u16, id: u16, len: u32, writable: u64 },
    #[error("queue is broken by an earlier device error; reset the device and drain_in_flight")]
    Broken,
}

/// One buffer of a chain, as the device addresses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// Device address (guest physical / IOVA / backend-visible address).
    pub addr: u64,
    pub len: u32,
    /// The device writes it (rx) rather than reads it (tx).
    pub device_writable: bool,
}

/// One completed chain, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// The token given to [`SplitQueue::add`].
    pub token: u32,
    /// The head descriptor id [`SplitQueue::add`] returned.
    pub head: u16,
    /// Bytes the device wrote, at most the chain's device-writable length.
    pub len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadState {
    /// Not the head of a chain in flight (free, or a non-head descriptor of a chain).
    Idle,
    /// Added, avail entry written, `avail.idx` not yet published: the device may not use it.
    Added,
    /// Published: the device owns it until it shows up in the used ring.
    Published,
}

/// Private record of a chain, indexed by its head id.
#[derive(Debug, Clone, Copy)]
struct Head {
    token: u32,
    /// Sum of the device-writable buffers' lengths.
    writable: u64,
    /// Descriptors in the chain, followed through our private `next` shadow.
    chain_len: u16,
    state: HeadState,
}

const IDLE_HEAD: Head = Head { token: 0, writable: 0, chain_len: 0, state: HeadState::Idle };

/// The driver side of one split virtqueue. See the module docs.
pub struct SplitQueue {
    base: *mut u8,
    device_addr: u64,
    layout: QueueLayout,
    size: u16,
    event_idx: bool,

    /// Private `next` of every descriptor: the free list's links for free descriptors, the chain's
    /// links for descriptors in flight. Always `< size`. Never read from shared memory.
    next: Box<[u16]>,
    /// Per head id.
    heads: Box<[Head]>,
    /// Private copy of the avail ring entries, so `publish` need not read shared memory.
    avail_shadow: Box<[u16]>,
    /// What we last stored in each descriptor (addr; len | flags << 32 | next << 48).
    desc_shadow: Box<[[u64; 2]]>,
    /// Avail slot `i` always names descriptor `i` ([`SplitQueue::use_fixed_slots`]).
    fixed_slots: bool,
    /// What we last stored in `used_event` (EVENT_IDX).
    used_event_written: u16,

    free_head: u16,
    num_free: u16,
    /// Chains added and not completed (published or not).
    in_flight: u16,
    /// Free-running index of the next avail entry to write.
    avail_idx: u16,
    /// Last value stored to `avail.idx`.
    published_idx: u16,
    /// `published_idx` at the last `needs_kick`.
    kick_idx: u16,
    /// Free-running index of the next used entry to read.
    last_used: u16,
    interrupts: bool,
    broken: bool,
    errors: u64,
}

// SAFETY: the queue is the only user of its region in this process (the contract of `new`), and
// all its state is owned; moving it to another thread moves that exclusive use with it.
unsafe impl Send for SplitQueue {}

impl fmt::Debug for SplitQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SplitQueue")
            .field("size", &self.size)
            .field("event_idx", &self.event_idx)
            .field("desc_addr", &format_args!("{:#x}", self.desc_addr()))
            .field("num_free", &self.num_free)
            .field("in_flight", &self.in_flight)
            .field("avail_idx", &self.avail_idx)
            .field("published_idx", &self.published_idx)
            .field("last_used", &self.last_used)
            .field("broken", &self.broken)
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

/// `vring_need_event` from the spec: has `new_idx` just passed `event_idx` (moving from `old`)?
#[inline]
fn vring_need_event(event_idx: u16, new_idx: u16, old: u16) -> bool {
    new_idx.wrapping_sub(event_idx).wrapping_sub(1) < new_idx.wrapping_sub(old)
}

impl SplitQueue {
    /// Set up a queue of `size` entries (a power of two, at most 32768) in `mem`: zero the
    /// layout's bytes and put every descriptor on the free list. Interrupts start enabled.
    ///
    /// # Safety
    /// `mem.vaddr .. mem.vaddr + mem.len` must be mapped readable and writable for as long as the
    /// returned queue lives, and nothing else in this process may access the first
    /// `layout(size, event_idx).total_len` bytes meanwhile (the device, another process or DMA,
    /// may: that is what all accesses are atomic for). `mem.device_addr` must be where the device
    /// finds the same bytes.
    pub unsafe fn new(size: u16, mem: QueueMemory, event_idx: bool) -> Result<Self, Error> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(Error::InvalidSize(size));
        }
        if mem.vaddr.is_null() {
            return Err(Error::NullAddress);
        }
        if mem.vaddr as usize % QUEUE_ALIGN != 0 || mem.device_addr % QUEUE_ALIGN as u64 != 0 {
            return Err(Error::Misaligned { vaddr: mem.vaddr as usize, device_addr: mem.device_addr });
        }
        let layout = layout(size, event_idx);
        if mem.len < layout.total_len {
            return Err(Error::RegionTooSmall { need: layout.total_len, have: mem.len });
        }
        if mem.device_addr.checked_add(layout.total_len as u64).is_none() {
            return Err(Error::DeviceAddrOverflow(mem.device_addr));
        }
        let n = usize::from(size);
        let mut q = SplitQueue {
            base: mem.vaddr,
            device_addr: mem.device_addr,
            layout,
            size,
            event_idx,
            next: vec![0; n].into_boxed_slice(),
            heads: vec![IDLE_HEAD; n].into_boxed_slice(),
            avail_shadow: vec![0; n].into_boxed_slice(),
            desc_shadow: vec![[0; 2]; n].into_boxed_slice(),
            fixed_slots: false,
            used_event_written: 0,
            free_head: 0,
            num_free: 0,
            in_flight: 0,
            avail_idx: 0,
            published_idx: 0,
            kick_idx: 0,
            last_used: 0,
            interrupts: true,
            broken: false,
            errors: 0,
        };
        q.reinit();
        Ok(q)
    }

    /// Back to the state `new` leaves: memory zeroed, all descriptors free, indices 0, not
    /// broken; the current interrupt setting is written again.
    fn reinit(&mut self) {
        for off in (0..self.layout.total_len).step_by(8) {
            self.u64_at(off).store(0, Ordering::Relaxed);
        }
        let n = self.next.len();
        for (i, next) in self.next.iter_mut().enumerate() {
            // The last one's link is never followed (num_free bounds every walk) but stays < size.
            *next = ((i + 1) % n) as u16;
        }
        self.heads.fill(IDLE_HEAD);
        self.avail_shadow.fill(0);
        self.desc_shadow.fill([0; 2]);
        if self.fixed_slots {
            for i in 0..self.size {
                self.avail_shadow[usize::from(i)] = i;
                self.avail_entry(i).store(i.to_le(), Ordering::Relaxed);
            }
        }
        self.free_head = 0;
        self.num_free = self.size;
        self.in_flight = 0;
        self.avail_idx = 0;
        self.published_idx = 0;
        self.kick_idx = 0;
        self.last_used = 0;
        self.broken = false;
        self.set_interrupts(self.interrupts);
        // The zeroes must be visible before the device is (re)started by whatever message follows.
        fence(Ordering::SeqCst);
    }

    // ---- shared-memory accessors -------------------------------------------------------------

    #[inline]
    fn u16_at(&self, off: usize) -> &AtomicU16 {
        debug_assert!(off % 2 == 0 && off + 2 <= self.layout.total_len);
        // SAFETY: every caller passes an offset computed from the layout (slots masked with
        // size - 1), so the two bytes are inside the region, which is valid for the queue's
        // lifetime (contract of `new`); the offset is 2-aligned and the region 4 KiB-aligned.
        // Other parties write this memory concurrently, which atomics allow.
        unsafe { AtomicU16::from_ptr(self.base.add(off).cast()) }
    }

    #[inline]
    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off % 4 == 0 && off + 4 <= self.layout.total_len);
        // SAFETY: as in `u16_at`, with a 4-aligned offset.
        unsafe { AtomicU32::from_ptr(self.base.add(off).cast()) }
    }

    #[inline]
    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off % 8 == 0 && off + 8 <= self.layout.total_len);
        // SAFETY: as in `u16_at`, with an 8-aligned offset.
        unsafe { AtomicU64::from_ptr(self.base.add(off).cast()) }
    }

    #[inline]
    fn mask(&self) -> u16 {
        self.size - 1
    }

    /// Store descriptor `i`, skipping the words that already hold these values. (The device
    /// may scribble on the table, but we never read it back, and a device that rewrites its own
    /// buffer addresses could as well write to those addresses directly.)
    #[inline]
    fn write_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let off = self.layout.desc_offset + DESC_SIZE * usize::from(i);
        let w = [addr, u64::from(len) | u64::from(flags) << 32 | u64::from(next) << 48];
        let old = self.desc_shadow[usize::from(i)];
        if old[0] != w[0] {
            self.u64_at(off).store(w[0].to_le(), Ordering::Relaxed);
        }
        if old[1] != w[1] {
            self.u64_at(off + 8).store(w[1].to_le(), Ordering::Relaxed);
        }
        self.desc_shadow[usize::from(i)] = w;
    }

    fn avail_flags(&self) -> &AtomicU16 {
        self.u16_at(self.layout.avail_offset)
    }
    fn avail_idx_field(&self) -> &AtomicU16 {
        self.u16_at(self.layout.avail_offset + 2)
    }
    fn avail_entry(&self, slot: u16) -> &AtomicU16 {
        self.u16_at(self.layout.avail_offset + RING_HEADER + AVAIL_ELEM_SIZE * usize::from(slot))
    }
    /// `used_event`, after the avail ring's entries (EVENT_IDX only).
    fn used_event(&self) -> &AtomicU16 {
        self.u16_at(self.layout.avail_offset + RING_HEADER + AVAIL_ELEM_SIZE * usize::from(self.size))
    }
    fn used_flags(&self) -> &AtomicU16 {
        self.u16_at(self.layout.used_offset)
    }
    fn used_idx_field(&self) -> &AtomicU16 {
        self.u16_at(self.layout.used_offset + 2)
    }
    /// (id, len) of a used entry.
    fn used_entry(&self, slot: u16) -> (&AtomicU32, &AtomicU32) {
        let off = self.layout.used_offset + RING_HEADER + USED_ELEM_SIZE * usize::from(slot);
        (self.u32_at(off), self.u32_at(off + 4))
    }
    /// `avail_event`, after the used ring's entries (EVENT_IDX only).
    fn avail_event(&self) -> &AtomicU16 {
        self.u16_at(self.layout.used_offset + RING_HEADER + USED_ELEM_SIZE * usize::from(self.size))
    }

    // ---- the driver's operations -------------------------------------------------------------

    /// From now on avail slot `i` names descriptor `i` and every chain is one buffer (an rx
    /// queue). Only on an idle queue (nothing in flight); survives [`Self::drain_in_flight`].
    /// A device completing out of order makes [`Self::add`] wait for the slot
    /// ([`AddError::SlotBusy`]): slower, but nothing is lost.
    pub fn use_fixed_slots(&mut self) -> Result<(), AddError> {
        if self.in_flight != 0 {
            return Err(AddError::Full { needed: usize::from(self.size), free: self.num_free });
        }
        self.fixed_slots = true;
        self.reinit();
        Ok(())
    }

    /// Put a chain in the next avail slot, not yet visible to the device (see [`Self::publish`]).
    /// Device-readable buffers must come first. Returns the head descriptor id. Takes exactly
    /// `bufs.len()` descriptors off the free list; on error nothing changes.
    pub fn add(&mut self, bufs: &[Buf], token: u32) -> Result<u16, AddError> {
        if self.broken {
            return Err(AddError::Broken);
        }
        if bufs.is_empty() {
            return Err(AddError::EmptyChain);
        }
        if bufs.len() > usize::from(self.size) {
            return Err(AddError::ChainTooLong { len: bufs.len(), size: self.size });
        }
        let (mut total, mut writable, mut seen_writable) = (0u64, 0u64, false);
        for (index, b) in bufs.iter().enumerate() {
            if b.len == 0 {
                return Err(AddError::ZeroLength { index });
            }
            if b.device_writable {
                seen_writable = true;
                writable += u64::from(b.len);
            } else if seen_writable {
                return Err(AddError::ReadableAfterWritable { index });
            }
            total += u64::from(b.len);
        }
        if total > MAX_CHAIN_BYTES {
            return Err(AddError::ChainTooBig { bytes: total });
        }
        if self.fixed_slots && bufs.len() != 1 {
            return Err(AddError::NotSingle { len: bufs.len() });
        }
        let n = bufs.len() as u16; // <= size <= 32768
        if n > self.num_free {
            return Err(AddError::Full { needed: bufs.len(), free: self.num_free });
        }
        if self.fixed_slots {
            return self.add_fixed(&bufs[0], token);
        }

        // The free list is already linked through `next`: the chain is its first n entries.
        let head = self.free_head;
        let mut d = head;
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags = if b.device_writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let next = if last { 0 } else { self.next[usize::from(d)] };
            self.write_desc(d, b.addr, b.len, flags, next);
            if !last {
                d = next;
            }
        }
        self.free_head = self.next[usize::from(d)];
        self.num_free -= n;
        self.heads[usize::from(head)] = Head { token, writable, chain_len: n, state: HeadState::Added };

        let slot = self.avail_idx & self.mask();
        self.avail_shadow[usize::from(slot)] = head;
        self.avail_entry(slot).store(head.to_le(), Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.in_flight += 1;
        Ok(head)
    }

    /// [`Self::add`] with fixed slots: the chain (checked by the caller) goes in the descriptor
    /// of its avail slot, whose entry already names it.
    fn add_fixed(&mut self, b: &Buf, token: u32) -> Result<u16, AddError> {
        let head = self.avail_idx & self.mask();
        let mut one = Some((b.addr, token));
        match self.fill_fixed(b.len, b.device_writable, HeadState::Added, || one.take()) {
            0 => Err(AddError::SlotBusy { slot: head }),
            _ => Ok(head),
        }
    }

    /// The refill loop of a fixed-slot queue (an rx queue): fill the free slots in ring order
    /// with one-buffer chains of `len` bytes, each buffer `(addr, token)` from `next`, and
    /// publish them (with anything [`Self::add`]ed before). Buffer and queue are checked once
    /// per batch, not per buffer as `add` must. `next` is asked only when the slot is free, so
    /// a buffer it hands out is always posted: the batch ends when `next` has none, or at a
    /// slot the device still holds (it completed out of order). Returns how many were posted.
    pub fn post_fixed(
        &mut self,
        len: u32,
        device_writable: bool,
        next: impl FnMut() -> Option<(u64, u32)>,
    ) -> Result<u16, AddError> {
        if self.broken {
            return Err(AddError::Broken);
        }
        if !self.fixed_slots {
            return Err(AddError::NotFixed);
        }
        if len == 0 {
            return Err(AddError::ZeroLength { index: 0 });
        }
        self.publish();
        // Published at once: the device cannot see them before the store below, and nothing of
        // ours looks in between.
        let added = self.fill_fixed(len, device_writable, HeadState::Published, next);
        if added != 0 {
            self.avail_idx_field().store(self.avail_idx.to_le(), Ordering::Release);
            self.published_idx = self.avail_idx;
        }
        Ok(added)
    }

    /// Fixed slots: write one-buffer chains from `next` into the slots from `avail_idx` on,
    /// marked `state`, until `next` has none or a slot is still the device's. Returns how many
    /// (`avail_idx` moves past them); publishes nothing.
    #[inline]
    fn fill_fixed(
        &mut self,
        len: u32,
        device_writable: bool,
        state: HeadState,
        mut next: impl FnMut() -> Option<(u64, u32)>,
    ) -> u16 {
        let flags = if device_writable { F_WRITE } else { 0 };
        let writable = if device_writable { u64::from(len) } else { 0 };
        let mask = self.mask();
        let mut added = 0;
        while added < self.num_free {
            let head = self.avail_idx.wrapping_add(added) & mask;
            if self.heads[usize::from(head)].state != HeadState::Idle {
                break;
            }
            let Some((addr, token)) = next() else { break };
            self.write_desc(head, addr, len, flags, 0);
            self.heads[usize::from(head)] = Head { token, writable, chain_len: 1, state };
            added += 1;
        }
        self.num_free -= added;
        self.in_flight += added;
        self.avail_idx = self.avail_idx.wrapping_add(added);
        added
    }

    /// Make every chain added since the last publish visible to the device: one release store of
    /// `avail.idx`, ordered after all their descriptor and avail-entry writes. No-op when broken.
    pub fn publish(&mut self) {
        if self.broken || self.published_idx == self.avail_idx {
            return;
        }
        let mut i = self.published_idx;
        while i != self.avail_idx {
            let head = self.avail_shadow[usize::from(i & self.mask())];
            self.heads[usize::from(head)].state = HeadState::Published;
            i = i.wrapping_add(1);
        }
        self.avail_idx_field().store(self.avail_idx.to_le(), Ordering::Release);
        self.published_idx = self.avail_idx;
    }

    /// After [`Self::publish`]: must the device be notified? False if nothing was published since
    /// the last call, or the device suppressed notifications (`avail_event` with EVENT_IDX,
    /// `VRING_USED_F_NO_NOTIFY` without). Call it after every publish: with EVENT_IDX it compares
    /// against the index at the previous call.
    pub fn needs_kick(&mut self) -> bool {
        if self.broken {
            return false;
        }
        let (old, new) = (self.kick_idx, self.published_idx);
        self.kick_idx = new;
        if old == new {
            return false;
        }
        // Our avail.idx store must be visible before we read the device's suppression state,
        // or both sides can miss each other (store -> load needs a full fence).
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event = u16::from_le(self.avail_event().load(Ordering::Relaxed));
            vring_need_event(event, new, old)
        } else {
            u16::from_le(self.used_flags().load(Ordering::Relaxed)) & F_NO_NOTIFY == 0
        }
    }

    /// Ask for used-buffer notifications (`on`) or not (polling mode). Without EVENT_IDX this is
    /// `VRING_AVAIL_F_NO_INTERRUPT`; with it, `used_event` is set to `last_used_idx` (interrupt on
    /// the next completion) or to `last_used_idx - 1`, as far behind the device as possible, and
    /// [`Self::poll_used`] keeps it there. Suppression is a hint the device may ignore.
    ///
    /// Before sleeping on interrupts: `set_interrupts(true)` (it ends with a full fence), then
    /// [`Self::has_used`]; if true, poll again, since the device may have completed before it
    /// saw the request.
    pub fn set_interrupts(&mut self, on: bool) {
        self.interrupts = on;
        if self.event_idx {
            let event = if on { self.last_used } else { self.last_used.wrapping_sub(1) };
            self.write_used_event(event);
        } else {
            let flags = if on { 0 } else { F_NO_INTERRUPT };
            self.avail_flags().store(flags.to_le(), Ordering::Relaxed);
        }
        if on {
            fence(Ordering::SeqCst);
        }
    }

    /// Is there something in the used ring we have not polled yet? (Not validated: a misbehaving
    /// device makes this true and the next `poll_used` fail.) False when broken.
    pub fn has_used(&self) -> bool {
        !self.broken && u16::from_le(self.used_idx_field().load(Ordering::Acquire)) != self.last_used
    }

    /// Take up to `max` completed chains from the used ring, validating each (module docs), free
    /// their descriptors and call `f` for each, in used-ring order. Returns how many.
    ///
    /// On a device violation the entries before it are delivered, the bad one is not, the
    /// queue becomes broken and the error is counted; every buffer not delivered is then
    /// returned by [`Self::drain_in_flight`].
    pub fn poll_used(&mut self, max: usize, mut f: impl FnMut(Used)) -> Result<usize, DeviceError> {
        if self.broken {
            return Err(DeviceError::Broken);
        }
        let used_idx = u16::from_le(self.used_idx_field().load(Ordering::Acquire));
        let ready = used_idx.wrapping_sub(self.last_used);
        let outstanding = self.published_idx.wrapping_sub(self.last_used);
        if ready > outstanding {
            return Err(self.fail(DeviceError::UsedIdxJump {
                used_idx,
                last_used: self.last_used,
                in_flight: outstanding,
            }));
        }
        let count = usize::from(ready).min(max);
        // The counters are kept in locals and stored once: the loop then keeps them in
        // registers instead of storing through `self` per entry.
        let mut pos = self.last_used;
        let mut freed = 0u16;
        let mut err = None;
        for _ in 0..count {
            let (id, len) = self.used_entry(pos & self.mask());
            let (id, len) = (u32::from_le(id.load(Ordering::Relaxed)), u32::from_le(len.load(Ordering::Relaxed)));
            // One head per descriptor: in range is `id < size`.
            let Some(h) = self.heads.get_mut(id as usize) else {
                err = Some(DeviceError::BadId { pos, id, size: self.size });
                break;
            };
            let head = id as u16;
            if h.state != HeadState::Published {
                err = Some(DeviceError::NotInFlight { pos, id: head });
                break;
            }
            if u64::from(len) > h.writable {
                err = Some(DeviceError::LenTooLong { pos, id: head, len, writable: h.writable });
                break;
            }
            h.state = HeadState::Idle;
            let (token, chain_len) = (h.token, h.chain_len);
            if !self.fixed_slots {
                self.unlink_chain(head, chain_len);
            }
            freed += chain_len;
            pos = pos.wrapping_add(1);
            f(Used { token, head, len });
        }
        let done = pos.wrapping_sub(self.last_used);
        self.last_used = pos;
        self.in_flight -= done;
        self.num_free += freed;
        if let Some(e) = err {
            return Err(self.fail(e));
        }
        if count > 0 && self.event_idx {
            if self.interrupts {
                // Interrupt on the next completion; the fence orders this store before the
                // caller's next used.idx read (as Linux's virtio_store_mb).
                self.write_used_event(self.last_used);
                fence(Ordering::SeqCst);
            } else if self.last_used.wrapping_sub(self.used_event_written) >= USED_EVENT_REFRESH {
                // Off: keep used_event behind the device, but move it only now and then. The
                // device reads it on every publish, so a store per poll would pull its line
                // from core to core twice a poll. The device, at most a queue (<= 32768)
                // ahead of us, never reaches it between two refreshes.
                self.write_used_event(self.last_used.wrapping_sub(1));
            }
        }
        Ok(count)
    }

    fn write_used_event(&mut self, v: u16) {
        self.used_event().store(v.to_le(), Ordering::Relaxed);
        self.used_event_written = v;
    }

    /// Put a chain back on the free list, walking our private links only (the caller counts
    /// it free). Fixed slots use no free list: a descriptor stays bound to its slot.
    fn unlink_chain(&mut self, head: u16, chain_len: u16) {
        let mut last = head;
        for _ in 1..chain_len {
            last = self.next[usize::from(last)];
        }
        self.next[usize::from(last)] = self.free_head;
        self.free_head = head;
    }

    fn fail(&mut self, e: DeviceError) -> DeviceError {
        self.broken = true;
        self.errors += 1;
        tracing::warn!(error = %e, "virtqueue: device misbehaved, queue stopped");
        e
    }

    /// Give back every chain still in flight (added, published or not, and not delivered by
    /// `poll_used`): `f` gets each token exactly once. Then the queue is as [`Self::new`] left it
    /// (memory zeroed, indices 0, all descriptors free, not broken; the interrupt setting and
    /// the error count are kept), ready to be set up on the device again.
    ///
    /// Call it only once the device no longer uses the queue (after a device reset or stop):
    /// the device could otherwise still write into the buffers handed back. Returns how many.
    pub fn drain_in_flight(&mut self, mut f: impl FnMut(u32)) -> usize {
        let mut n = 0;
        for i in 0..self.heads.len() {
            let h = self.heads[i];
            if h.state != HeadState::Idle {
                self.heads[i].state = HeadState::Idle;
                n += 1;
                f(h.token);
            }
        }
        self.reinit();
        n
    }

    // ---- getters -----------------------------------------------------------------------------

    /// Number of descriptors (and ring entries).
    pub fn size(&self) -> u16 {
        self.size
    }
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }
    pub fn layout(&self) -> QueueLayout {
        self.layout
    }
    /// Free descriptors.
    pub fn free_descriptors(&self) -> u16 {
        self.num_free
    }
    /// Chains added and not yet completed (including ones not published yet).
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }
    /// Chains added since the last publish.
    pub fn unpublished(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.published_idx)
    }
    /// Free-running index of the next used entry to read.
    pub fn last_used_idx(&self) -> u16 {
        self.last_used
    }
    /// Free-running index of the next avail entry to write (published or not).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }
    /// Device violations seen (cumulative, also across `drain_in_flight`).
    pub fn errors(&self) -> u64 {
        self.errors
    }
    pub fn is_broken(&self) -> bool {
        self.broken
    }
    pub fn interrupts_enabled(&self) -> bool {
        self.interrupts
    }

    /// Device address of the descriptor table (SET_VRING_ADDR for VFIO / PCI common config).
    pub fn desc_addr(&self) -> u64 {
        self.device_addr + self.layout.desc_offset as u64
    }
    pub fn avail_addr(&self) -> u64 {
        self.device_addr + self.layout.avail_offset as u64
    }
    pub fn used_addr(&self) -> u64 {
        self.device_addr + self.layout.used_offset as u64
    }
    /// Address of the descriptor table in this process (vhost-user SET_VRING_ADDR takes these).
    pub fn desc_vaddr(&self) -> *mut u8 {
        self.base.wrapping_add(self.layout.desc_offset)
    }
    pub fn avail_vaddr(&self) -> *mut u8 {
        self.base.wrapping_add(self.layout.avail_offset)
    }
    pub fn used_vaddr(&self) -> *mut u8 {
        self.base.wrapping_add(self.layout.used_offset)
    }
}

#[cfg(test)]
mod tests {
    //! The device side is rust-vmm's `virtio-queue` (an independent implementation) over a
    //! `vm-memory` guest memory: the queue's host address is our `vaddr`, its guest address our
    //! device address. Malicious devices write the used ring directly.

    use super::*;
    use std::collections::{HashMap, HashSet};
    use std::sync::atomic::Ordering::{Acquire, Release};
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    const BASE: u64 = 0x1_0000_0000;
    const DATA_LEN: usize = 1 << 20;

    /// Our queue (the driver), the rust-vmm queue (the device) and the memory they share.
    struct Harness {
        vq: SplitQueue,
        dq: Queue,
        mem: GuestMemoryMmap,
        /// Guest address of a DATA_LEN scratch area for buffers, after the queue.
        data: u64,
    }

    fn harness(size: u16, event_idx: bool) -> Harness {
        let l = layout(size, event_idx);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(BASE), l.total_len + DATA_LEN)]).unwrap();
        let host = mem.get_host_address(GuestAddress(BASE)).unwrap();
        // Dirty the memory: `new` must zero it.
        mem.write_slice(&vec![0xa5; l.total_len], GuestAddress(BASE)).unwrap();
        // SAFETY: the mapping lives in `mem`, dropped after `vq` (field order); only the test's
        // device side touches it otherwise, through atomics / GuestMemory.
        let vq = unsafe { SplitQueue::new(size, QueueMemory { vaddr: host, device_addr: BASE, len: l.total_len }, event_idx) }
            .unwrap();
        let mut dq = Queue::new(size).unwrap();
        dq.try_set_desc_table_address(GuestAddress(vq.desc_addr())).unwrap();
        dq.try_set_avail_ring_address(GuestAddress(vq.avail_addr())).unwrap();
        dq.try_set_used_ring_address(GuestAddress(vq.used_addr())).unwrap();
        dq.set_event_idx(event_idx);
        dq.set_ready(true);
        assert!(dq.is_valid(&mem));
        Harness { vq, dq, mem, data: BASE + l.total_len as u64 }
    }

    /// A chain as the device sees it.
    #[derive(Debug, Clone, PartialEq)]
    struct DevChain {
        head: u16,
        descs: Vec<(u64, u32, bool)>,
    }
    impl DevChain {
        fn writable(&self) -> u64 {
            self.descs.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum()
        }
    }

    impl Harness {
        fn pop(&mut self) -> Option<DevChain> {
            let chain = self.dq.pop_descriptor_chain(&self.mem)?;
            let head = chain.head_index();
            let descs = chain.map(|d| (d.addr().0, d.len(), d.is_write_only())).collect();
            Some(DevChain { head, descs })
        }

        /// Device: write `len` bytes of a pattern derived from `seed` across the writable
        /// buffers, then complete the chain.
        fn complete(&mut self, c: &DevChain, len: u32, seed: u8) {
            let mut left = len as usize;
            let mut k = 0usize;
            for &(addr, dlen, w) in &c.descs {
                if !w || left == 0 {
                    continue;
                }
                let n = left.min(dlen as usize);
                let bytes: Vec<u8> = (0..n).map(|i| seed.wrapping_add((k + i) as u8)).collect();
                self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
                left -= n;
                k += n;
            }
            self.dq.add_used(&self.mem, c.head, len).unwrap();
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }

        // Raw (malicious) device accesses.
        fn write_used_entry(&self, pos: u16, id: u32, len: u32) {
            let slot = u64::from(pos & (self.vq.size() - 1));
            let a = GuestAddress(self.vq.used_addr() + 4 + 8 * slot);
            self.mem.write_obj(id.to_le(), a).unwrap();
            self.mem.write_obj(len.to_le(), GuestAddress(a.0 + 4)).unwrap();
        }
        fn set_used_idx(&self, idx: u16) {
            self.mem.store(idx.to_le(), GuestAddress(self.vq.used_addr() + 2), Release).unwrap();
        }
        fn set_desc_next(&self, desc: u16, next: u16) {
            self.mem.write_obj(next.to_le(), GuestAddress(self.vq.desc_addr() + 16 * u64::from(desc) + 14)).unwrap();
        }
        fn avail_flags(&self) -> u16 {
            u16::from_le(self.mem.load(GuestAddress(self.vq.avail_addr()), Acquire).unwrap())
        }
    }

    fn drain(vq: &mut SplitQueue) -> Vec<u32> {
        let mut v = Vec::new();
        let n = vq.drain_in_flight(|t| v.push(t));
        assert_eq!(n, v.len());
        v.sort_unstable();
        v
    }

    fn w(addr: u64, len: u32) -> Buf {
        Buf { addr, len, device_writable: true }
    }
    fn r(addr: u64, len: u32) -> Buf {
        Buf { addr, len, device_writable: false }
    }

    // ---- fixed slots ---------------------------------------------------------------------------

    /// The queue's bytes the driver writes (descriptor table and avail ring), minus `avail.idx`.
    fn driver_bytes(h: &Harness) -> Vec<u8> {
        let l = h.vq.layout();
        let mut v = h.read(BASE, l.used_offset);
        v[l.avail_offset + 2..l.avail_offset + 4].fill(0);
        v
    }

    #[test]
    fn fixed_slots_steady_state_writes_only_avail_idx() {
        const N: u16 = 16;
        let mut h = harness(N, false);
        h.vq.use_fixed_slots().unwrap();
        let buf = |i: u16| w(h.data + 4096 * u64::from(i), 4096);
        let bufs: Vec<Buf> = (0..N).map(buf).collect();
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(h.vq.add(&[*b], i as u32).unwrap(), i as u16, "slot i uses descriptor i");
        }
        h.vq.publish();
        let before = driver_bytes(&h);
        for round in 0..3u8 {
            // The device completes in order; the driver posts each buffer again as it comes back.
            let mut got = Vec::new();
            for _ in 0..N {
                let c = h.pop().unwrap();
                assert_eq!(c.descs, vec![(bufs[usize::from(c.head)].addr, 4096, true)]);
                h.complete(&c, 100, round);
            }
            h.vq.poll_used(64, |u| got.push(u.token)).unwrap();
            assert_eq!(got, (0..u32::from(N)).collect::<Vec<_>>());
            for t in got {
                h.vq.add(&[bufs[t as usize]], t).unwrap();
            }
            h.vq.publish();
            assert_eq!(driver_bytes(&h), before, "round {round}: descriptors and avail entries untouched");
        }
        // A different buffer in a slot is written, and the device sees it.
        let c = h.pop().unwrap();
        h.complete(&c, 1, 9);
        let mut t = None;
        h.vq.poll_used(1, |u| t = Some(u.token)).unwrap();
        h.vq.add(&[w(h.data + 4096 * 100, 512)], 77).unwrap();
        h.vq.publish();
        for _ in 1..N {
            let c = h.pop().unwrap();
            assert_eq!(c.descs[0].0, bufs[usize::from(c.head)].addr);
        }
        assert_eq!(h.pop().unwrap().descs, vec![(h.data + 4096 * 100, 512, true)]);
        assert_eq!(t, Some(0));
    }

    #[test]
    fn fixed_slots_out_of_order_device_waits_and_loses_nothing() {
        let mut h = harness(4, false);
        h.vq.use_fixed_slots().unwrap();
        for i in 0..4u16 {
            h.vq.add(&[w(h.data + 4096 * u64::from(i), 64)], u32::from(i)).unwrap();
        }
        h.vq.publish();
        let chains: Vec<DevChain> = (0..4).map(|_| h.pop().unwrap()).collect();
        // The device completes slot 1 before slot 0.
        h.complete(&chains[1], 10, 0);
        let mut got = Vec::new();
        h.vq.poll_used(8, |u| got.push(u.token)).unwrap();
        assert_eq!(got, vec![1]);
        assert_eq!(h.vq.free_descriptors(), 1);
        // The next slot is 0, still the device's: nothing changes.
        assert_eq!(h.vq.add(&[w(h.data, 64)], 9), Err(AddError::SlotBusy { slot: 0 }));
        assert_eq!((h.vq.in_flight(), h.vq.unpublished()), (3, 0));
        h.complete(&chains[0], 10, 0);
        h.vq.poll_used(8, |u| got.push(u.token)).unwrap();
        assert_eq!(h.vq.add(&[w(h.data, 64)], 9).unwrap(), 0);
        assert_eq!(h.vq.add(&[w(h.data + 4096, 64)], 10).unwrap(), 1);
        // One-buffer chains only; refused without side effects.
        h.vq.poll_used(8, |_| {}).unwrap();
        assert_eq!(h.vq.add(&[r(h.data, 8), w(h.data + 64, 8)], 11), Err(AddError::NotSingle { len: 2 }));
        assert_eq!(drain(&mut h.vq), vec![2, 3, 9, 10]);
        // Still fixed after a drain: slot i names descriptor i again.
        let l = h.vq.layout();
        let entries = h.read(BASE + l.avail_offset as u64 + 4, 8);
        assert_eq!(entries, [0, 0, 1, 0, 2, 0, 3, 0]);
        assert_eq!(h.vq.add(&[w(h.data, 64)], 1).unwrap(), 0);
        assert_eq!(h.vq.add(&[w(h.data, 64)], 2).unwrap(), 1);
    }

    #[test]
    fn post_fixed_fills_free_slots_in_order_and_publishes() {
        const N: u16 = 8;
        let mut h = harness(N, false);
        let data = h.data;
        let addr = |t: u32| data + 4096 * u64::from(t);
        assert_eq!(h.vq.post_fixed(64, true, || Some((0, 0))), Err(AddError::NotFixed));
        h.vq.use_fixed_slots().unwrap();
        assert_eq!(h.vq.post_fixed(0, true, || Some((0, 0))), Err(AddError::ZeroLength { index: 0 }));
        // An `add` not yet published goes out with the batch.
        h.vq.add(&[w(addr(100), 4096)], 100).unwrap();
        let mut tokens = 0..5u32;
        assert_eq!(h.vq.post_fixed(4096, true, || tokens.next().map(|t| (addr(t), t))), Ok(5));
        assert_eq!((h.vq.in_flight(), h.vq.unpublished(), h.vq.free_descriptors()), (6, 0, 2));
        let chains: Vec<DevChain> = (0..6).map(|_| h.pop().unwrap()).collect();
        assert!(h.pop().is_none());
        for (k, c) in chains.iter().enumerate() {
            let t = if k == 0 { 100 } else { k as u64 - 1 };
            assert_eq!((c.head, c.descs.clone()), (k as u16, vec![(h.data + 4096 * t, 4096, true)]));
        }
        // The device completes slot 1 only. The next free slot (6) and the one after (7) are
        // filled; the batch stops at slot 0, still the device's, without taking a buffer.
        h.complete(&chains[1], 20, 0);
        let mut got = Vec::new();
        h.vq.poll_used(8, |u| got.push((u.token, u.len))).unwrap();
        assert_eq!(got, vec![(0, 20)]);
        let mut asked = 0;
        let mut tokens = 10..;
        let n = h.vq.post_fixed(4096, true, || {
            asked += 1;
            tokens.next().map(|t| (addr(t), t))
        });
        assert_eq!((n, asked), (Ok(2), 2));
        assert_eq!(h.pop().unwrap().head, 6);
        assert_eq!(h.pop().unwrap().head, 7);
        assert_eq!(h.vq.post_fixed(4096, true, || panic!("slot 0 is busy")), Ok(0));
        // Everything still in flight comes back exactly once.
        let mut back = drain(&mut h.vq);
        back.sort();
        assert_eq!(back, vec![1, 2, 3, 4, 10, 11, 100]);
    }

    /// The used-ring checks hold on a fixed-slot queue too: valid entries before a bad one are
    /// delivered, the bad one is not, and every other token comes back once from the drain.
    #[test]
    fn fixed_slots_device_violations_lose_nothing() {
        let bad: [(u32, u32, DeviceError); 3] = [
            (8, 0, DeviceError::BadId { pos: 1, id: 8, size: 8 }),
            (6, 0, DeviceError::NotInFlight { pos: 1, id: 6 }),
            (2, 4097, DeviceError::LenTooLong { pos: 1, id: 2, len: 4097, writable: 4096 }),
        ];
        for (id, len, err) in bad {
            let mut h = harness(8, false);
            h.vq.use_fixed_slots().unwrap();
            let data = h.data;
            let mut tokens = 10..16u32;
            assert_eq!(h.vq.post_fixed(4096, true, || tokens.next().map(|t| (data + 4096 * u64::from(t), t))), Ok(6));
            h.write_used_entry(0, 1, 64);
            h.write_used_entry(1, id, len);
            h.set_used_idx(2);
            let mut got = Vec::new();
            assert_eq!(h.vq.poll_used(usize::MAX, |u| got.push(u.token)), Err(err));
            assert_eq!(got, vec![11], "{err}");
            assert!(h.vq.is_broken());
            assert_eq!(h.vq.post_fixed(4096, true, || panic!("broken queue asked for a buffer")), Err(AddError::Broken));
            assert_eq!(drain(&mut h.vq), vec![10, 12, 13, 14, 15], "{err}");
            assert_eq!((h.vq.free_descriptors(), h.vq.in_flight()), (8, 0), "{err}");
        }
    }

    #[test]
    fn fixed_slots_only_on_an_idle_queue() {
        let mut h = harness(4, false);
        h.vq.add(&[w(h.data, 64)], 0).unwrap();
        assert!(h.vq.use_fixed_slots().is_err());
        assert_eq!(drain(&mut h.vq), vec![0]);
        h.vq.use_fixed_slots().unwrap();
    }

    // ---- layout and setup --------------------------------------------------------------------

    #[test]
    fn layout_alignment() {
        for event_idx in [false, true] {
            for shift in 0..=15 {
                let size = 1u16 << shift;
                let n = usize::from(size);
                let ev = if event_idx { 2 } else { 0 };
                let l = layout(size, event_idx);
                assert_eq!(l.desc_offset % 16, 0);
                assert_eq!(l.avail_offset, l.desc_offset + 16 * n, "avail right after the table");
                assert_eq!(l.avail_offset % 2, 0);
                assert!(l.avail_offset + 4 + 2 * n + ev <= l.used_offset, "no overlap");
                assert_eq!(l.used_offset % 4096, 0, "used ring on its own page");
                assert!(l.used_offset + 4 + 8 * n + ev <= l.total_len);
                assert_eq!(l.total_len % 4096, 0);
            }
        }
        assert_eq!(layout(256, true), QueueLayout { desc_offset: 0, avail_offset: 4096, used_offset: 8192, total_len: 12288 });
        // 256 * 16 + 4 + 2 * 256 exactly fits, the EVENT_IDX field does not change the page.
        assert_eq!(layout(8, false), QueueLayout { desc_offset: 0, avail_offset: 128, used_offset: 4096, total_len: 8192 });
    }

    #[test]
    fn new_validates_and_zeroes() {
        let l = layout(8, true);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(BASE), 2 * l.total_len)]).unwrap();
        let host = mem.get_host_address(GuestAddress(BASE)).unwrap();
        let m = |vaddr: *mut u8, device_addr: u64, len: usize| QueueMemory { vaddr, device_addr, len };
        // SAFETY (all calls): the region is inside `mem`, alive for the whole test.
        unsafe {
            for size in [0, 3, 12, 32769, 65535] {
                assert_eq!(SplitQueue::new(size, m(host, BASE, l.total_len), true).unwrap_err(), Error::InvalidSize(size));
            }
            assert_eq!(
                SplitQueue::new(8, m(host, BASE, l.total_len - 1), true).unwrap_err(),
                Error::RegionTooSmall { need: l.total_len, have: l.total_len - 1 }
            );
            assert!(matches!(SplitQueue::new(8, m(host.add(16), BASE, l.total_len), true), Err(Error::Misaligned { .. })));
            assert!(matches!(SplitQueue::new(8, m(host, BASE + 16, l.total_len), true), Err(Error::Misaligned { .. })));
            assert_eq!(SplitQueue::new(8, m(std::ptr::null_mut(), BASE, l.total_len), true).unwrap_err(), Error::NullAddress);
            assert_eq!(
                SplitQueue::new(8, m(host, u64::MAX - 4095, l.total_len), true).unwrap_err(),
                Error::DeviceAddrOverflow(u64::MAX - 4095)
            );
        }
        let h = harness(8, true);
        let q = &h.vq;
        assert_eq!((q.size(), q.free_descriptors(), q.in_flight(), q.last_used_idx(), q.avail_idx()), (8, 8, 0, 0, 0));
        assert!(!q.is_broken() && q.errors() == 0 && q.event_idx() && q.interrupts_enabled());
        let l = q.layout();
        assert_eq!((q.desc_addr(), q.avail_addr(), q.used_addr()), (BASE, BASE + l.avail_offset as u64, BASE + l.used_offset as u64));
        let host = h.mem.get_host_address(GuestAddress(BASE)).unwrap();
        assert_eq!(q.desc_vaddr(), host);
        assert_eq!(q.avail_vaddr(), host.wrapping_add(l.avail_offset));
        assert_eq!(q.used_vaddr(), host.wrapping_add(l.used_offset));
        assert_eq!(h.read(BASE, l.total_len), vec![0; l.total_len], "new zeroes the queue memory");
        assert_eq!(h.read(BASE + l.total_len as u64, 16), vec![0; 16], "and nothing after it");
    }

    #[test]
    fn add_rejects_bad_chains_without_side_effects() {
        let mut h = harness(4, false);
        let d = h.data;
        let q = &mut h.vq;
        assert_eq!(q.add(&[], 1), Err(AddError::EmptyChain));
        assert_eq!(q.add(&[r(d, 10), w(d, 0)], 1), Err(AddError::ZeroLength { index: 1 }));
        assert_eq!(q.add(&[w(d, 10), r(d, 10)], 1), Err(AddError::ReadableAfterWritable { index: 1 }));
        assert_eq!(q.add(&[w(d, 1); 5], 1), Err(AddError::ChainTooLong { len: 5, size: 4 }));
        assert_eq!(q.add(&[w(d, u32::MAX), w(d, 2)], 1), Err(AddError::ChainTooBig { bytes: u64::from(u32::MAX) + 2 }));
        // Exactly 2^32 bytes is allowed.
        assert_eq!(q.add(&[r(d, u32::MAX), w(d, 1)], 1), Ok(0));
        assert_eq!((q.free_descriptors(), q.in_flight(), q.avail_idx()), (2, 1, 1));
    }

    // ---- normal operation against virtio-queue ----------------------------------------------

    /// Many buffers, chains of 1..=4 descriptors (readable ones first), completed out of order
    /// with data; the device sees exactly what we posted and we get back exactly what it wrote.
    #[test]
    fn round_trip_multi_descriptor_chains() {
        for event_idx in [false, true] {
            let mut h = harness(16, event_idx);
            let mut posted: HashMap<u32, Vec<Buf>> = HashMap::new();
            let mut token = 0u32;
            let mut done = 0u32;
            let mut rng = 0x1234_5678u32;
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 17;
                rng ^= rng << 5;
                rng
            };
            for round in 0..300u32 {
                // Post chains until the queue is full.
                loop {
                    let ndesc = 1 + next() as usize % 4;
                    let nread = next() as usize % (ndesc + 1);
                    let bufs: Vec<Buf> = (0..ndesc)
                        .map(|i| {
                            let slot = u64::from(token % 64) * 4 + i as u64; // 256 slots of 4 KiB
                            Buf { addr: h.data + slot * 4096, len: 1 + next() % 4096, device_writable: i >= nread }
                        })
                        .collect();
                    match h.vq.add(&bufs, token) {
                        Ok(_) => {
                            posted.insert(token, bufs);
                            token += 1;
                        }
                        Err(AddError::Full { needed, free }) => {
                            assert!(needed > usize::from(free));
                            break;
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                h.vq.publish();
                let mut chains = Vec::new();
                while let Some(c) = h.pop() {
                    chains.push(c);
                }
                assert_eq!(chains.len(), usize::from(h.vq.in_flight()));
                if round % 2 == 1 {
                    chains.reverse();
                }
                let mut expect = HashMap::new();
                for c in &chains {
                    let len = next() % (c.writable() as u32 + 1);
                    h.complete(c, len, c.head as u8);
                    expect.insert(c.head, (len, c.clone()));
                }
                let mut got = Vec::new();
                let n = h.vq.poll_used(usize::MAX, |u| got.push(u)).unwrap();
                assert_eq!(n, chains.len());
                for u in got {
                    let (len, c) = expect.remove(&u.head).expect("head completed once");
                    assert_eq!(u.len, len);
                    let bufs = posted.remove(&u.token).expect("token delivered once");
                    let seen: Vec<_> = bufs.iter().map(|b| (b.addr, b.len, b.device_writable)).collect();
                    assert_eq!(c.descs, seen, "the device saw exactly our chain");
                    // The bytes the device wrote are there.
                    let mut left = len as usize;
                    let mut k = 0usize;
                    for b in bufs.iter().filter(|b| b.device_writable) {
                        let n = left.min(b.len as usize);
                        let want: Vec<u8> = (0..n).map(|i| (c.head as u8).wrapping_add((k + i) as u8)).collect();
                        assert_eq!(h.read(b.addr, n), want);
                        left -= n;
                        k += n;
                    }
                    done += 1;
                }
                assert_eq!((h.vq.in_flight(), h.vq.free_descriptors()), (0, 16));
            }
            assert_eq!(done, token);
            assert!(posted.is_empty());
            assert_eq!(h.vq.errors(), 0);
        }
    }

    #[test]
    fn batching_one_publish_for_many_adds() {
        let mut h = harness(16, true);
        for t in 0..10 {
            h.vq.add(&[w(h.data + t * 4096, 100)], t as u32).unwrap();
        }
        assert_eq!(h.vq.unpublished(), 10);
        assert_eq!(h.dq.avail_idx(&h.mem, Acquire).unwrap().0, 0, "nothing visible before publish");
        assert!(h.pop().is_none());
        assert!(!h.vq.needs_kick(), "nothing published, nothing to kick");
        h.vq.publish();
        assert_eq!(h.vq.unpublished(), 0);
        assert_eq!(h.dq.avail_idx(&h.mem, Acquire).unwrap().0, 10, "one store made all ten visible");
        let heads: Vec<u16> = std::iter::from_fn(|| h.pop()).map(|c| c.head).collect();
        assert_eq!(heads.len(), 10);
        assert!(h.vq.needs_kick());
        h.vq.publish();
        assert!(!h.vq.needs_kick(), "an empty publish needs no kick");
    }

    #[test]
    fn kick_suppression_event_idx() {
        let mut h = harness(16, true);
        let d = h.data;
        // Device wants a kick for the next buffer (avail_event = 0).
        assert!(!h.dq.enable_notification(&h.mem).unwrap());
        h.vq.add(&[w(d, 1)], 0).unwrap();
        h.vq.publish();
        assert!(h.vq.needs_kick(), "avail_event 0 crossed by 0 -> 1");
        h.vq.add(&[w(d, 1)], 1).unwrap();
        h.vq.publish();
        assert!(!h.vq.needs_kick(), "device has not asked again: no kick");
        // Device consumes both and re-arms at 2.
        assert!(h.pop().is_some() && h.pop().is_some());
        assert!(!h.dq.enable_notification(&h.mem).unwrap());
        for t in 2..5 {
            h.vq.add(&[w(d, 1)], t).unwrap();
        }
        h.vq.publish();
        assert!(h.vq.needs_kick(), "a batch of three crosses avail_event 2");
        // Device stops asking (disable is a no-op with EVENT_IDX: avail_event stays at 2).
        h.dq.disable_notification(&h.mem).unwrap();
        h.vq.add(&[w(d, 1)], 5).unwrap();
        h.vq.publish();
        assert!(!h.vq.needs_kick());
        // The device re-arms while not having consumed everything: enable says so, and the next
        // publish crosses its avail_event (= its next_avail 2).
        assert!(h.dq.enable_notification(&h.mem).unwrap());
        h.vq.add(&[w(d, 1)], 6).unwrap();
        h.vq.publish();
        assert!(!h.vq.needs_kick(), "avail_event 2 is behind 6 -> 7: the device knows there is work");
    }

    #[test]
    fn kick_suppression_flags() {
        let mut h = harness(16, false);
        let d = h.data;
        h.vq.add(&[w(d, 1)], 0).unwrap();
        h.vq.publish();
        assert!(h.vq.needs_kick());
        h.dq.disable_notification(&h.mem).unwrap(); // VRING_USED_F_NO_NOTIFY
        h.vq.add(&[w(d, 1)], 1).unwrap();
        h.vq.publish();
        assert!(!h.vq.needs_kick());
        h.dq.enable_notification(&h.mem).unwrap();
        h.vq.add(&[w(d, 1)], 2).unwrap();
        h.vq.publish();
        assert!(h.vq.needs_kick());
    }

    #[test]
    fn interrupt_suppression_event_idx() {
        let mut h = harness(8, true);
        for t in 0..8 {
            h.vq.add(&[w(h.data, 1)], t).unwrap();
        }
        h.vq.publish();
        let chains: Vec<DevChain> = std::iter::from_fn(|| h.pop()).collect();
        let mut chains = chains.into_iter();
        let mut complete = |h: &mut Harness| {
            let c = chains.next().unwrap();
            h.complete(&c, 1, 0);
            h.dq.needs_notification(&h.mem).unwrap()
        };
        h.vq.set_interrupts(true); // used_event = 0
        assert!(complete(&mut h), "first completion interrupts");
        assert!(!complete(&mut h), "driver has not polled: no second interrupt");
        assert!(h.vq.has_used());
        assert_eq!(h.vq.poll_used(usize::MAX, |_| {}).unwrap(), 2);
        assert!(!h.vq.has_used());
        assert!(complete(&mut h), "poll re-armed used_event at last_used");
        assert_eq!(h.vq.poll_used(usize::MAX, |_| {}).unwrap(), 1);
        h.vq.set_interrupts(false);
        assert!(!complete(&mut h));
        assert!(!complete(&mut h));
        assert_eq!(h.vq.poll_used(usize::MAX, |_| {}).unwrap(), 2);
        assert!(!complete(&mut h), "polling with interrupts off keeps them off");
        // Re-enable before sleeping: the pending completion is seen by has_used.
        h.vq.set_interrupts(true);
        assert!(h.vq.has_used());
        assert_eq!(h.vq.poll_used(usize::MAX, |_| {}).unwrap(), 1);
        assert!(complete(&mut h));
    }

    #[test]
    fn interrupts_off_stay_off_with_rare_used_event_stores() {
        let mut h = harness(8, true);
        h.vq.set_interrupts(false);
        let used_event = |h: &Harness| -> u16 {
            let a = h.vq.avail_addr() + 4 + 2 * 8;
            u16::from_le(h.mem.load(GuestAddress(a), Acquire).unwrap())
        };
        let mut values = vec![used_event(&h)];
        // Well past a wrap of the 16-bit indices, in bursts of up to 8.
        let mut done = 0u32;
        let mut k = 0u32;
        while done < 140_000 {
            let n = 1 + k % 8;
            k += 1;
            for t in 0..n {
                h.vq.add(&[w(h.data, 64)], t).unwrap();
            }
            h.vq.publish();
            for _ in 0..n {
                let c = h.pop().unwrap();
                h.complete(&c, 1, 0);
                assert!(!h.dq.needs_notification(&h.mem).unwrap(), "interrupt wanted after {done} completions");
            }
            assert_eq!(h.vq.poll_used(usize::MAX, |_| {}).unwrap(), n as usize);
            done += n;
            if *values.last().unwrap() != used_event(&h) {
                values.push(used_event(&h));
            }
        }
        assert!(values.len() <= 12, "used_event stored {} times in {done} completions", values.len());
        assert!(values.len() >= 8, "used_event never moved: {values:?}");
        // Turning them on still works.
        h.vq.set_interrupts(true);
        h.vq.add(&[w(h.data, 64)], 0).unwrap();
        h.vq.publish();
        let c = h.pop().unwrap();
        h.complete(&c, 1, 0);
        assert!(h.dq.needs_notification(&h.mem).unwrap());
    }

    #[test]
    fn interrupt_suppression_flags() {
        let mut h = harness(8, false);
        assert_eq!(h.avail_flags(), 0);
        h.vq.set_interrupts(false);
        assert_eq!(h.avail_flags(), VRING_AVAIL_F_NO_INTERRUPT as u16);
        assert!(!h.vq.interrupts_enabled());
        h.vq.set_interrupts(true);
        assert_eq!(h.avail_flags(), 0);
        // The setting survives a drain (reset).
        h.vq.set_interrupts(false);
        drain(&mut h.vq);
        assert_eq!(h.avail_flags(), VRING_AVAIL_F_NO_INTERRUPT as u16);
    }

    /// More than 2^16 buffers through a 4-entry queue: both free-running indices wrap, tokens
    /// come back in order, kicks and interrupts keep working across the wrap.
    #[test]
    fn wrap_around() {
        for event_idx in [false, true] {
            let mut h = harness(4, event_idx);
            h.vq.set_interrupts(true);
            let (mut sent, mut got) = (0u32, 0u32);
            while got < 70_000 {
                let batch = 1 + sent % 4;
                for _ in 0..batch {
                    // Two-descriptor chains while they fit, single ones for bigger batches.
                    let two = [r(h.data, 8), w(h.data + 4096, 64)];
                    h.vq.add(if batch <= 2 { &two } else { &two[1..] }, sent).unwrap();
                    sent += 1;
                }
                h.vq.publish();
                assert!(h.vq.needs_kick(), "device re-armed after emptying the ring");
                let chains: Vec<DevChain> = std::iter::from_fn(|| h.pop()).collect();
                assert_eq!(chains.len() as u32, batch);
                for (i, c) in chains.iter().enumerate() {
                    h.complete(c, 64, 0);
                    assert_eq!(h.dq.needs_notification(&h.mem).unwrap(), !event_idx || i == 0);
                }
                assert!(!h.dq.enable_notification(&h.mem).unwrap());
                h.vq
                    .poll_used(usize::MAX, |u| {
                        assert_eq!((u.token, u.len), (got, 64));
                        got += 1;
                    })
                    .unwrap();
                assert_eq!(h.vq.last_used_idx(), got as u16);
                assert_eq!(h.vq.avail_idx(), sent as u16);
            }
            assert_eq!(got, sent);
            assert_eq!((h.vq.free_descriptors(), h.vq.errors()), (4, 0));
        }
    }

    #[test]
    fn full_queue_loses_nothing() {
        let mut h = harness(8, true);
        let d = h.data;
        for t in 0..3 {
            h.vq.add(&[w(d, 10), w(d, 10)], t).unwrap(); // 6 descriptors
        }
        assert_eq!(h.vq.add(&[w(d, 1); 3], 99), Err(AddError::Full { needed: 3, free: 2 }));
        assert_eq!((h.vq.free_descriptors(), h.vq.in_flight(), h.vq.avail_idx()), (2, 3, 3), "nothing changed");
        h.vq.add(&[w(d, 1)], 3).unwrap();
        h.vq.add(&[w(d, 1)], 4).unwrap();
        assert_eq!(h.vq.add(&[w(d, 1)], 99), Err(AddError::Full { needed: 1, free: 0 }));
        h.vq.publish();
        let chains: Vec<DevChain> = std::iter::from_fn(|| h.pop()).collect();
        assert_eq!(chains.len(), 5);
        for c in &chains {
            h.complete(c, 1, 0);
        }
        let mut tokens = Vec::new();
        h.vq.poll_used(usize::MAX, |u| tokens.push(u.token)).unwrap();
        assert_eq!(tokens, vec![0, 1, 2, 3, 4]);
        assert_eq!(h.vq.free_descriptors(), 8);
        // All eight descriptors are usable again, each once.
        let heads: HashSet<u16> = (0..8).map(|t| h.vq.add(&[w(d, 1)], t).unwrap()).collect();
        assert_eq!(heads, (0..8).collect());
    }

    #[test]
    fn poll_respects_max() {
        let mut h = harness(8, false);
        for t in 0..5 {
            h.vq.add(&[w(h.data, 4)], t).unwrap();
        }
        h.vq.publish();
        while let Some(c) = h.pop() {
            h.complete(&c, 4, 0);
        }
        let mut tokens = Vec::new();
        assert_eq!(h.vq.poll_used(0, |u| tokens.push(u.token)).unwrap(), 0);
        assert_eq!(h.vq.poll_used(2, |u| tokens.push(u.token)).unwrap(), 2);
        assert_eq!(h.vq.poll_used(2, |u| tokens.push(u.token)).unwrap(), 2);
        assert_eq!(h.vq.poll_used(2, |u| tokens.push(u.token)).unwrap(), 1);
        assert_eq!(tokens, vec![0, 1, 2, 3, 4]);
    }

    // ---- malicious device --------------------------------------------------------------------

    /// Size 8: chain A (token 10) = [readable 8, writable 100] at heads 0,1; B (11) = [writable
    /// 200] at 2; C (12) = [writable 50, writable 50] at 3,4; published and popped by the device.
    /// D (13) = [writable 10] at 5, added but not published. Descriptors 6, 7 free.
    fn hostile() -> Harness {
        let mut h = harness(8, true);
        let d = h.data;
        assert_eq!(h.vq.add(&[r(d, 8), w(d + 4096, 100)], 10), Ok(0));
        assert_eq!(h.vq.add(&[w(d + 8192, 200)], 11), Ok(2));
        assert_eq!(h.vq.add(&[w(d + 3 * 4096, 50), w(d + 4 * 4096, 50)], 12), Ok(3));
        h.vq.publish();
        assert_eq!(h.vq.add(&[w(d + 5 * 4096, 10)], 13), Ok(5));
        let heads: Vec<u16> = std::iter::from_fn(|| h.pop()).map(|c| c.head).collect();
        assert_eq!(heads, vec![0, 2, 3]);
        h
    }

    /// Poll once; expect `delivered` tokens then `err`; then the queue is broken, counted, and
    /// `drain_in_flight` returns exactly `drained`, after which the queue is fresh.
    /// `earlier`: tokens delivered by earlier polls.
    fn expect_violation(h: &mut Harness, earlier: &[u32], delivered: &[u32], err: DeviceError, drained: &[u32]) {
        let mut got = Vec::new();
        assert_eq!(h.vq.poll_used(usize::MAX, |u| got.push(u.token)), Err(err));
        assert_eq!(got, delivered, "valid entries before the bad one are delivered");
        assert!(h.vq.is_broken());
        assert_eq!(h.vq.errors(), 1);
        assert_eq!(h.vq.add(&[w(h.data, 1)], 99), Err(AddError::Broken));
        assert_eq!(h.vq.poll_used(usize::MAX, |_| panic!("broken queue delivered")), Err(DeviceError::Broken));
        assert!(!h.vq.needs_kick() && !h.vq.has_used());
        assert_eq!(h.vq.errors(), 1, "only violations are counted");
        assert_eq!(drain(&mut h.vq), drained);
        // Every token comes back exactly once, one way or the other.
        let mut all: Vec<u32> = earlier.iter().chain(delivered).chain(drained).copied().collect();
        all.sort_unstable();
        assert_eq!(all, vec![10, 11, 12, 13]);
        assert_eq!(drain(&mut h.vq), Vec::<u32>::new(), "a second drain returns nothing");
        assert!(!h.vq.is_broken());
        assert_eq!((h.vq.free_descriptors(), h.vq.in_flight(), h.vq.last_used_idx(), h.vq.avail_idx()), (8, 0, 0, 0));
        let l = h.vq.layout();
        assert_eq!(h.read(BASE, l.used_offset), vec![0; l.used_offset], "descriptors and avail ring zeroed");
    }

    #[test]
    fn used_idx_jump() {
        for bogus in [4u16, 0x8000, 0xffff] {
            let mut h = hostile();
            h.write_used_entry(0, 0, 1); // a valid-looking entry does not make the jump acceptable
            h.set_used_idx(bogus);
            let err = DeviceError::UsedIdxJump { used_idx: bogus, last_used: 0, in_flight: 3 };
            expect_violation(&mut h, &[], &[], err, &[10, 11, 12, 13]);
        }
        // After some progress too: 3 published, 1 used, so at most 2 more.
        let mut h = hostile();
        h.write_used_entry(0, 2, 5);
        h.set_used_idx(1);
        assert_eq!(h.vq.poll_used(usize::MAX, |_| {}), Ok(1));
        h.set_used_idx(4);
        let mut got = Vec::new();
        assert_eq!(h.vq.poll_used(9, |u| got.push(u)), Err(DeviceError::UsedIdxJump { used_idx: 4, last_used: 1, in_flight: 2 }));
        assert!(got.is_empty());
        assert_eq!(drain(&mut h.vq), vec![10, 12, 13]);
    }

    #[test]
    fn id_out_of_range() {
        for id in [8u32, 0xffff, 0x1_0000, u32::MAX] {
            let mut h = hostile();
            h.write_used_entry(0, 2, 200);
            h.write_used_entry(1, id, 0);
            h.set_used_idx(2);
            expect_violation(&mut h, &[], &[11], DeviceError::BadId { pos: 1, id, size: 8 }, &[10, 12, 13]);
        }
    }

    #[test]
    fn id_not_in_flight() {
        // 1 and 4: second descriptors of chains A and C; 5: D's head, added but not published;
        // 6, 7: free.
        for id in [1u16, 4, 5, 6, 7] {
            let mut h = hostile();
            h.write_used_entry(0, u32::from(id), 0);
            h.set_used_idx(1);
            expect_violation(&mut h, &[], &[], DeviceError::NotInFlight { pos: 0, id }, &[10, 11, 12, 13]);
        }
    }

    #[test]
    fn id_completed_twice() {
        // In one poll.
        let mut h = hostile();
        h.write_used_entry(0, 3, 100);
        h.write_used_entry(1, 3, 100);
        h.set_used_idx(2);
        expect_violation(&mut h, &[], &[12], DeviceError::NotInFlight { pos: 1, id: 3 }, &[10, 11, 13]);
        // Across polls.
        let mut h = hostile();
        h.write_used_entry(0, 0, 100);
        h.set_used_idx(1);
        assert_eq!(h.vq.poll_used(usize::MAX, |_| {}), Ok(1));
        h.write_used_entry(1, 0, 100);
        h.set_used_idx(2);
        expect_violation(&mut h, &[10], &[], DeviceError::NotInFlight { pos: 1, id: 0 }, &[11, 12, 13]);
    }

    #[test]
    fn len_too_long() {
        // A: only the writable 100 bytes count, not the readable 8; C: the sum of its two.
        for (head, len) in [(0u16, 101u32), (3, 101), (3, u32::MAX)] {
            let mut h = hostile();
            h.write_used_entry(0, 2, 200); // B, exactly full: fine
            h.write_used_entry(1, u32::from(head), len);
            h.set_used_idx(2);
            let err = DeviceError::LenTooLong { pos: 1, id: head, len, writable: 100 };
            expect_violation(&mut h, &[], &[11], err, &[10, 12, 13]);
        }
        // A device-readable-only chain allows len 0 only.
        let mut h = harness(8, false);
        h.vq.add(&[r(h.data, 64)], 7).unwrap();
        h.vq.publish();
        h.write_used_entry(0, 0, 1);
        h.set_used_idx(1);
        assert_eq!(h.vq.poll_used(1, |_| {}), Err(DeviceError::LenTooLong { pos: 0, id: 0, len: 1, writable: 0 }));
        assert_eq!(drain(&mut h.vq), vec![7]);
    }

    /// The device scribbles `next` fields in the shared descriptor table. That is not detected
    /// (we never read the table back) and does no harm: chains are freed through the private
    /// shadow, so the free list stays exact.
    #[test]
    fn garbage_next_is_harmless() {
        let mut h = hostile();
        for (desc, next) in [(0u16, 0xffff), (1, 6), (2, 2), (3, 7), (4, 0x8000), (6, 0xfff0), (7, 0)] {
            h.set_desc_next(desc, next);
        }
        h.write_used_entry(0, 0, 100);
        h.write_used_entry(1, 3, 100);
        h.write_used_entry(2, 2, 0);
        h.set_used_idx(3);
        let mut got = Vec::new();
        assert_eq!(h.vq.poll_used(usize::MAX, |u| got.push(u.token)), Ok(3));
        assert_eq!(got, vec![10, 12, 11]);
        assert_eq!((h.vq.free_descriptors(), h.vq.in_flight(), h.vq.errors()), (7, 1, 0));
        // D is still in flight; every other descriptor can be taken exactly once.
        let heads: HashSet<u16> = (0..7).map(|t| h.vq.add(&[w(h.data, 1)], 100 + t).unwrap()).collect();
        assert_eq!(heads, (0..8).filter(|&i| i != 5).collect());
        assert!(matches!(h.vq.add(&[w(h.data, 1)], 0), Err(AddError::Full { .. })));
        // And the real device sees sane single-descriptor chains (we rewrote every field).
        h.vq.publish();
        let chains: Vec<DevChain> = std::iter::from_fn(|| h.pop()).collect();
        assert_eq!(chains.len(), 8);
        assert!(chains.iter().all(|c| c.descs.len() == 1));
        let mut all = drain(&mut h.vq);
        all.retain(|&t| t < 100);
        assert_eq!(all, vec![13]);
    }

    // ---- random valid device behaviour plus one corruption ----------------------------------

    mod random {
        use super::*;
        use proptest::prelude::*;

        const SIZE: u16 = 16;

        #[derive(Debug, Clone)]
        enum Op {
            /// (len, device_writable) per buffer, sorted readable first.
            Add(Vec<(u32, bool)>),
            Publish,
            DevicePop,
            DeviceComplete { pick: usize, len: u32 },
            Poll { max: usize },
        }

        #[derive(Debug, Clone)]
        enum Corruption {
            Jump { extra: u16 },
            BadId { id: u32 },
            NotInFlight { pick: usize },
            LenTooLong { pick: usize, extra: u32 },
            GarbageNext { desc: u16, next: u16 },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => proptest::collection::vec((1u32..=4096, any::<bool>()), 1..=4).prop_map(|mut v| {
                    v.sort_by_key(|b| b.1);
                    Op::Add(v)
                }),
                2 => Just(Op::Publish),
                2 => Just(Op::DevicePop),
                2 => (any::<usize>(), any::<u32>()).prop_map(|(pick, len)| Op::DeviceComplete { pick, len }),
                2 => (0usize..8).prop_map(|max| Op::Poll { max }),
            ]
        }

        fn corruption() -> impl Strategy<Value = Corruption> {
            prop_oneof![
                any::<u16>().prop_map(|extra| Corruption::Jump { extra }),
                prop_oneof![Just(u32::from(SIZE)), u32::from(SIZE)..=u32::MAX].prop_map(|id| Corruption::BadId { id }),
                any::<usize>().prop_map(|pick| Corruption::NotInFlight { pick }),
                (any::<usize>(), 0u32..100_000).prop_map(|(pick, extra)| Corruption::LenTooLong { pick, extra }),
                (0..SIZE, any::<u16>()).prop_map(|(desc, next)| Corruption::GarbageNext { desc, next }),
            ]
        }

        /// The test's view of the world.
        #[derive(Default)]
        struct Model {
            /// Added and not yet delivered: head -> (token, writable bytes, buffers).
            outstanding: HashMap<u16, (u32, u64, Vec<Buf>)>,
            unpublished: Vec<u16>,
            /// Published heads the device has not completed (popped or not).
            device_owned: HashSet<u16>,
            /// Popped by the device, not completed.
            popped: Vec<DevChain>,
            /// Completed by the device, not yet polled by the driver.
            unpolled: usize,
            added: Vec<u32>,
            delivered: Vec<u32>,
        }

        impl Model {
            fn deliver(&mut self, u: Used) {
                let (token, writable, _) = self.outstanding.remove(&u.head).expect("delivered head was outstanding");
                assert_eq!(u.token, token);
                assert!(u64::from(u.len) <= writable);
                assert!(!self.device_owned.contains(&u.head), "delivered before the device completed it");
                self.delivered.push(token);
                self.unpolled -= 1;
            }
        }

        fn step(h: &mut Harness, m: &mut Model, op: &Op, next_token: &mut u32) {
            match op {
                Op::Add(spec) => {
                    let bufs: Vec<Buf> = spec
                        .iter()
                        .enumerate()
                        .map(|(i, &(len, w))| Buf { addr: h.data + (u64::from(*next_token % 32) * 4 + i as u64) * 4096, len, device_writable: w })
                        .collect();
                    let free = h.vq.free_descriptors();
                    match h.vq.add(&bufs, *next_token) {
                        Ok(head) => {
                            let writable = bufs.iter().filter(|b| b.device_writable).map(|b| u64::from(b.len)).sum();
                            assert!(m.outstanding.insert(head, (*next_token, writable, bufs.clone())).is_none());
                            m.unpublished.push(head);
                            m.added.push(*next_token);
                            *next_token += 1;
                            assert_eq!(h.vq.free_descriptors(), free - bufs.len() as u16);
                        }
                        Err(AddError::Full { needed, free: f }) => {
                            assert_eq!((needed, f), (bufs.len(), free));
                            assert!(needed > usize::from(free));
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                Op::Publish => {
                    h.vq.publish();
                    m.device_owned.extend(m.unpublished.drain(..));
                }
                Op::DevicePop => {
                    if let Some(c) = h.pop() {
                        assert!(m.device_owned.contains(&c.head), "device popped only published chains");
                        let (_, writable, bufs) = &m.outstanding[&c.head];
                        assert_eq!(c.writable(), *writable);
                        let seen: Vec<_> = bufs.iter().map(|b| (b.addr, b.len, b.device_writable)).collect();
                        assert_eq!(c.descs, seen);
                        m.popped.push(c);
                    }
                }
                Op::DeviceComplete { pick, len } => {
                    if !m.popped.is_empty() {
                        let c = m.popped.swap_remove(pick % m.popped.len());
                        let len = (u64::from(*len) % (c.writable() + 1)) as u32;
                        h.dq.add_used(&h.mem, c.head, len).unwrap();
                        m.device_owned.remove(&c.head);
                        m.unpolled += 1;
                    }
                }
                Op::Poll { max } => {
                    let mut got = Vec::new();
                    let n = h.vq.poll_used(*max, |u| got.push(u)).unwrap();
                    assert_eq!(n, got.len());
                    assert_eq!(n, m.unpolled.min(*max));
                    for u in got {
                        m.deliver(u);
                    }
                }
            }
            let descs: u16 = m.outstanding.values().map(|o| o.2.len() as u16).sum();
            assert_eq!(h.vq.free_descriptors() + descs, SIZE, "no descriptor lost or duplicated");
            assert_eq!(usize::from(h.vq.in_flight()), m.outstanding.len());
        }

        /// Inject one corruption; returns the error the driver must report, or None for a
        /// harmless one.
        fn corrupt(h: &mut Harness, m: &mut Model, c: &Corruption) -> Option<DeviceError> {
            let last_used = h.vq.last_used_idx();
            let published = h.vq.avail_idx().wrapping_sub(h.vq.unpublished());
            let in_flight = published.wrapping_sub(last_used);
            let used_idx = h.dq.next_used();
            let jump = |extra: u16| {
                let bogus = last_used.wrapping_add(in_flight + 1 + extra % (u16::MAX - in_flight));
                h.set_used_idx(bogus);
                Some(DeviceError::UsedIdxJump { used_idx: bogus, last_used, in_flight })
            };
            // A bad entry appended after the device's valid ones needs room in the count.
            if m.device_owned.is_empty() && !matches!(c, Corruption::GarbageNext { .. }) {
                return jump(0);
            }
            let pos = used_idx;
            match *c {
                Corruption::Jump { extra } => jump(extra),
                Corruption::BadId { id } => {
                    h.write_used_entry(pos, id, 0);
                    h.set_used_idx(pos.wrapping_add(1));
                    Some(DeviceError::BadId { pos, id, size: SIZE })
                }
                Corruption::NotInFlight { pick } => {
                    let cands: Vec<u16> = (0..SIZE).filter(|i| !m.device_owned.contains(i)).collect();
                    if cands.is_empty() {
                        h.write_used_entry(pos, u32::from(SIZE), 0);
                        h.set_used_idx(pos.wrapping_add(1));
                        return Some(DeviceError::BadId { pos, id: u32::from(SIZE), size: SIZE });
                    }
                    let id = cands[pick % cands.len()];
                    h.write_used_entry(pos, u32::from(id), 0);
                    h.set_used_idx(pos.wrapping_add(1));
                    Some(DeviceError::NotInFlight { pos, id })
                }
                Corruption::LenTooLong { pick, extra } => {
                    if m.popped.is_empty() {
                        let c = h.pop().expect("device_owned is not empty, so something is poppable or popped");
                        m.popped.push(c);
                    }
                    let c = &m.popped[pick % m.popped.len()];
                    let writable = c.writable();
                    let len = (writable + 1 + u64::from(extra)) as u32;
                    h.dq.add_used(&h.mem, c.head, len).unwrap();
                    Some(DeviceError::LenTooLong { pos, id: c.head, len, writable })
                }
                Corruption::GarbageNext { desc, next } => {
                    h.set_desc_next(desc, next);
                    None
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
            #[test]
            fn random_device_with_one_corruption(
                event_idx in any::<bool>(),
                ops in proptest::collection::vec(op(), 0..150),
                at in 0usize..150,
                c in corruption(),
            ) {
                let mut h = harness(SIZE, event_idx);
                let mut m = Model::default();
                let mut token = 0;
                let at = at.min(ops.len());
                for op in &ops[..at] {
                    step(&mut h, &mut m, op, &mut token);
                }
                match corrupt(&mut h, &mut m, &c) {
                    Some(err) => {
                        let mut got = Vec::new();
                        prop_assert_eq!(h.vq.poll_used(usize::MAX, |u| got.push(u)), Err(err));
                        let expect_before = if matches!(err, DeviceError::UsedIdxJump { .. }) { 0 } else { m.unpolled };
                        prop_assert_eq!(got.len(), expect_before);
                        for u in got {
                            m.deliver(u);
                        }
                        prop_assert!(h.vq.is_broken());
                        prop_assert_eq!(h.vq.errors(), 1);
                        prop_assert_eq!(h.vq.add(&[w(h.data, 1)], 0), Err(AddError::Broken));
                        prop_assert_eq!(h.vq.poll_used(1, |_| {}), Err(DeviceError::Broken));
                    }
                    None => {
                        // Harmless: the device finishes everything (possibly walking a
                        // scribbled chain, so only the head counts), the driver stays exact.
                        for op in &ops[at..] {
                            if !matches!(op, Op::DevicePop) {
                                step(&mut h, &mut m, op, &mut token);
                            }
                        }
                        h.vq.publish();
                        m.device_owned.extend(m.unpublished.drain(..));
                        let mut heads: Vec<u16> = m.popped.drain(..).map(|c| c.head).collect();
                        heads.extend(std::iter::from_fn(|| h.dq.pop_descriptor_chain(&h.mem)).map(|c| c.head_index()));
                        for head in heads {
                            h.dq.add_used(&h.mem, head, 0).unwrap();
                            m.device_owned.remove(&head);
                            m.unpolled += 1;
                        }
                        let mut got = Vec::new();
                        h.vq.poll_used(usize::MAX, |u| got.push(u)).unwrap();
                        for u in got {
                            m.deliver(u);
                        }
                        prop_assert!(m.outstanding.is_empty());
                        prop_assert_eq!((h.vq.free_descriptors(), h.vq.in_flight(), h.vq.errors()), (SIZE, 0, 0));
                        // Every descriptor can be taken exactly once (these come back drained).
                        let mut heads = HashSet::new();
                        for _ in 0..SIZE {
                            heads.insert(h.vq.add(&[w(h.data, 1)], token).unwrap());
                            m.added.push(token);
                            token += 1;
                        }
                        prop_assert_eq!(heads.len(), usize::from(SIZE));
                    }
                }
                // Exactly every token added comes back once: delivered or drained.
                let drained = drain(&mut h.vq);
                let mut all: Vec<u32> = m.delivered.iter().chain(&drained).copied().collect();
                all.sort_unstable();
                let mut added = m.added.clone();
                added.sort_unstable();
                prop_assert_eq!(all, added);
                prop_assert!(!h.vq.is_broken());
                prop_assert_eq!(h.vq.free_descriptors(), SIZE);
            }
        }
    }
}

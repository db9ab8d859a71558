//! The shared single-producer / single-consumer ring used for the refill queue and the
//! completion ring, in the zcrx memory layout: `head` on the first cache line, `tail` on the
//! second, entries from the third, `entries` a power of two.
//!
//! Each side keeps its own index privately and only *publishes* it (store-release); it never
//! reads its own index back from shared memory. The other side's index is read with
//! load-acquire and clamped, so a producer (or consumer) that scribbles garbage over the shared
//! header can make the other side see stale entries, never read or write outside the ring.

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::mem::Mapping;
use crate::uapi::{RingOffsets, CACHE_LINE};

/// Where head, tail and the entries live inside the ring memory.
pub const RING_OFFSETS: RingOffsets =
    RingOffsets { head: 0, tail: CACHE_LINE, entries: 2 * CACHE_LINE };

/// Round `n` up to a power of two; `None` when that exceeds `max` or `n` is 0.
pub fn ring_size(n: u32, max: u32) -> Option<u32> {
    if n == 0 {
        return None;
    }
    n.checked_next_power_of_two().filter(|&p| p <= max)
}

struct Shared<T> {
    mem: Mapping,
    entries: u32,
    _t: PhantomData<T>,
}

// SAFETY: the ring memory is only accessed through atomics (head, tail) and through slots that
// the SPSC protocol hands to exactly one side at a time; `T: Copy + Send` carries no references.
unsafe impl<T: Copy + Send> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: Copy + Send> Sync for Shared<T> {}

impl<T: Copy> Shared<T> {
    fn base(&self) -> NonNull<u8> {
        self.mem.ptr()
    }
    fn head(&self) -> &AtomicU32 {
        // SAFETY: offset 0 of a page-aligned mapping at least 2 cache lines long; AtomicU32 has
        // the alignment of u32 and the mapping lives as long as `self`.
        unsafe { &*(self.base().as_ptr().add(RING_OFFSETS.head) as *const AtomicU32) }
    }
    fn tail(&self) -> &AtomicU32 {
        // SAFETY: as for `head`, one cache line further.
        unsafe { &*(self.base().as_ptr().add(RING_OFFSETS.tail) as *const AtomicU32) }
    }
    fn slot(&self, idx: u32) -> *mut T {
        let i = (idx & (self.entries - 1)) as usize;
        // SAFETY: `i < entries` and the mapping holds `entries` slots from RING_OFFSETS.entries,
        // which is a multiple of the alignment of any entry type used here (<= 64).
        unsafe { (self.base().as_ptr().add(RING_OFFSETS.entries) as *mut T).add(i) }
    }
}

/// Errors creating a ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("ring entries must be a power of two between 1 and {max}, got {got}")]
    BadSize { got: u32, max: u32 },
    #[error("cannot allocate ring memory ({bytes} bytes): {source}")]
    Alloc { bytes: usize, source: std::io::Error },
}

/// Create a ring of `entries` (a power of two) slots; returns its two ends.
pub fn ring<T: Copy + Send>(entries: u32) -> Result<(Producer<T>, Consumer<T>), RingError> {
    assert!(std::mem::align_of::<T>() <= CACHE_LINE);
    if entries == 0 || !entries.is_power_of_two() || entries > (1 << 30) {
        return Err(RingError::BadSize { got: entries, max: 1 << 30 });
    }
    let bytes = RING_OFFSETS.entries + entries as usize * std::mem::size_of::<T>();
    let mem = Mapping::anonymous(bytes, true).map_err(|source| RingError::Alloc { bytes, source })?;
    let shared = Arc::new(Shared { mem, entries, _t: PhantomData });
    Ok((
        Producer { shared: shared.clone(), tail: 0, cached_head: 0 },
        Consumer { shared, head: 0, cached_tail: 0 },
    ))
}

/// The writing end. Stage entries with [`Producer::push`], make them visible with
/// [`Producer::commit`] (one release store per batch).
pub struct Producer<T: Copy> {
    shared: Arc<Shared<T>>,
    tail: u32,
    cached_head: u32,
}

impl<T: Copy + Send> Producer<T> {
    /// Slot count.
    pub fn entries(&self) -> u32 {
        self.shared.entries
    }

    /// Free slots, refreshing the consumer's head only when the cached view says full.
    pub fn free(&mut self) -> u32 {
        let f = self.free_cached();
        if f != 0 {
            return f;
        }
        self.cached_head = self.shared.head().load(Ordering::Acquire);
        self.free_cached()
    }

    /// Free slots, re-reading the consumer's head unless the cached view already shows `want`.
    pub fn free_for(&mut self, want: u32) -> u32 {
        let f = self.free_cached();
        if f >= want {
            return f;
        }
        self.cached_head = self.shared.head().load(Ordering::Acquire);
        self.free_cached()
    }

    fn free_cached(&self) -> u32 {
        let used = self.tail.wrapping_sub(self.cached_head);
        // A head beyond our tail, or further back than a full ring, is garbage: treat as full.
        self.shared.entries.saturating_sub(used)
    }

    /// Stage one entry; `Err(v)` hands it back when the ring is full (nothing is lost).
    #[inline]
    pub fn push(&mut self, v: T) -> Result<(), T> {
        if self.free() == 0 {
            return Err(v);
        }
        // SAFETY: the slot at `tail` is free (not between head and tail), so the consumer does
        // not read it until we publish a tail past it.
        unsafe { self.shared.slot(self.tail).write(v) };
        self.tail = self.tail.wrapping_add(1);
        Ok(())
    }

    /// Publish every staged entry.
    #[inline]
    pub fn commit(&mut self) {
        self.shared.tail().store(self.tail, Ordering::Release);
    }

    /// Entries staged but not yet committed.
    pub fn staged(&self) -> u32 {
        self.tail.wrapping_sub(self.shared.tail().load(Ordering::Relaxed))
    }

    /// The shared head word, for code that drives the ring memory directly (as a user of the
    /// kernel uapi would) and for tests that scribble on it.
    pub fn raw_head(&self) -> &AtomicU32 {
        self.shared.head()
    }
    /// The shared tail word; see [`Producer::raw_head`].
    pub fn raw_tail(&self) -> &AtomicU32 {
        self.shared.tail()
    }
}

/// The reading end. Read entries with [`Consumer::pop`], hand the slots back with
/// [`Consumer::release`] (one release store per batch).
pub struct Consumer<T: Copy> {
    shared: Arc<Shared<T>>,
    head: u32,
    cached_tail: u32,
}

impl<T: Copy + Send> Consumer<T> {
    /// Slot count.
    pub fn entries(&self) -> u32 {
        self.shared.entries
    }

    /// Entries ready to read; refreshes the producer's tail when the cached view is empty.
    /// Never more than the ring holds, whatever the producer wrote into the tail word.
    #[inline]
    pub fn available(&mut self) -> u32 {
        let a = self.available_cached();
        if a != 0 {
            return a;
        }
        self.cached_tail = self.shared.tail().load(Ordering::Acquire);
        self.available_cached()
    }

    fn available_cached(&self) -> u32 {
        self.cached_tail.wrapping_sub(self.head).min(self.shared.entries)
    }

    /// Take the next entry, if one is ready. The slot goes back to the producer at
    /// [`Consumer::release`].
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        if self.available() == 0 {
            return None;
        }
        // SAFETY: the slot lies inside the ring (masked index). It was published by the
        // producer's release store that `available` acquired; a lying producer can only make us
        // read a stale value, which is why callers validate what they read. A volatile read
        // keeps the compiler from assuming the value cannot change under us.
        let v = unsafe { self.shared.slot(self.head).read_volatile() };
        self.head = self.head.wrapping_add(1);
        Some(v)
    }

    /// Put the last popped entry back (it was not consumed; not released yet).
    #[inline]
    pub fn unpop(&mut self) {
        self.head = self.head.wrapping_sub(1);
    }

    /// Hand consumed slots back to the producer.
    #[inline]
    pub fn release(&mut self) {
        self.shared.head().store(self.head, Ordering::Release);
    }

    /// Entries read but not yet released.
    pub fn unreleased(&self) -> u32 {
        self.head.wrapping_sub(self.shared.head().load(Ordering::Relaxed))
    }

    /// The shared head word; see [`Producer::raw_head`].
    pub fn raw_head(&self) -> &AtomicU32 {
        self.shared.head()
    }
    /// The shared tail word; see [`Producer::raw_head`].
    pub fn raw_tail(&self) -> &AtomicU32 {
        self.shared.tail()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_round_up_and_cap() {
        assert_eq!(ring_size(0, 32768), None);
        assert_eq!(ring_size(1, 32768), Some(1));
        assert_eq!(ring_size(3000, 32768), Some(4096));
        assert_eq!(ring_size(32768, 32768), Some(32768));
        assert_eq!(ring_size(32769, 32768), None);
        assert_eq!(ring_size(u32::MAX, 32768), None);
        assert!(matches!(ring::<u64>(3), Err(RingError::BadSize { .. })));
        assert!(matches!(ring::<u64>(0), Err(RingError::BadSize { .. })));
    }

    #[test]
    fn layout_is_the_zcrx_one() {
        let (p, _c) = ring::<crate::uapi::Rqe>(8).unwrap();
        let base = p.shared.base().as_ptr() as usize;
        assert_eq!(p.raw_head() as *const _ as usize - base, 0);
        assert_eq!(p.raw_tail() as *const _ as usize - base, 64);
        assert_eq!(p.shared.slot(0) as usize - base, 128);
        assert_eq!(p.shared.slot(9) as usize - base, 128 + 16);
        assert_eq!(base % 4096, 0);
    }

    #[test]
    fn full_and_empty() {
        let (mut p, mut c) = ring::<u32>(4).unwrap();
        for i in 0..4 {
            p.push(i).unwrap();
        }
        assert_eq!(p.push(9), Err(9));
        assert_eq!(c.pop(), None, "nothing visible before commit");
        p.commit();
        assert_eq!(c.pop(), Some(0));
        assert_eq!(p.push(9), Err(9), "slot not free before release");
        c.release();
        p.push(4).unwrap();
        p.commit();
        assert_eq!((1..=4).map(|_| c.pop().unwrap()).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(c.pop(), None);
    }

    #[test]
    fn garbage_tail_never_reads_outside() {
        let (mut p, mut c) = ring::<u64>(8).unwrap();
        p.push(1).unwrap();
        p.commit();
        for garbage in [u32::MAX, 1 << 31, 9, 12345, 7] {
            p.raw_tail().store(garbage, Ordering::Release);
            let n = c.available();
            assert!(n <= 8, "available {n} for tail {garbage}");
            for _ in 0..n {
                c.pop().unwrap(); // masked index: reads inside the ring, value is junk
            }
            c.release();
        }
    }

    #[test]
    fn garbage_head_never_overwrites_unconsumed() {
        let (mut p, _c) = ring::<u64>(8).unwrap();
        for garbage in [u32::MAX, 1 << 31, 100, 3] {
            p.raw_head().store(garbage, Ordering::Release);
            let f = p.free();
            assert!(f <= 8, "free {f} for head {garbage}");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u8),
        Commit,
        Pop(u8),
        Release,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u8..20).prop_map(Op::Push),
            Just(Op::Commit),
            (1u8..20).prop_map(Op::Pop),
            Just(Op::Release),
        ]
    }

    proptest! {
        /// Model test over interleavings of the two sides' steps: FIFO order, nothing lost or
        /// duplicated, uncommitted entries invisible, unreleased slots never reused.
        #[test]
        fn interleavings_match_a_queue_model(ops in proptest::collection::vec(op(), 1..200), shift in 0u32..4) {
            let size = 1u32 << shift;
            let (mut p, mut c) = ring::<u64>(size).unwrap();
            let mut next = 0u64;
            let mut expect_next = 0u64;
            let (mut committed, mut released) = (0u64, 0u64);
            for op in ops {
                match op {
                    Op::Push(n) => for _ in 0..n {
                        let in_flight = next - released;
                        match p.push(next) {
                            Ok(()) => { prop_assert!(in_flight < size as u64); next += 1; }
                            Err(v) => { prop_assert_eq!(v, next); prop_assert!(in_flight >= size as u64); break; }
                        }
                    },
                    Op::Commit => { p.commit(); committed = next; }
                    Op::Pop(n) => for _ in 0..n {
                        match c.pop() {
                            Some(v) => { prop_assert_eq!(v, expect_next); expect_next += 1; prop_assert!(expect_next <= committed); }
                            None => { prop_assert_eq!(expect_next, committed); break; }
                        }
                    },
                    Op::Release => { c.release(); released = expect_next; }
                }
            }
        }
    }

    /// Cross-thread stress: a producer and a consumer on two threads, batches of random sizes,
    /// every value arrives once and in order.
    #[test]
    fn cross_thread_stress() {
        const N: u64 = 2_000_000;
        let (mut p, mut c) = ring::<u64>(256).unwrap();
        let t = std::thread::spawn(move || {
            let mut i = 0u64;
            let mut batch = 1;
            while i < N {
                let mut staged = 0;
                while staged < batch && i < N && p.push(i).is_ok() {
                    i += 1;
                    staged += 1;
                }
                p.commit();
                batch = batch % 61 + 1;
                if staged == 0 {
                    std::hint::spin_loop();
                }
            }
        });
        let mut expect = 0u64;
        let mut spins = 0u64;
        while expect < N {
            let mut got = 0;
            while let Some(v) = c.pop() {
                assert_eq!(v, expect);
                expect += 1;
                got += 1;
                if got == 37 {
                    break;
                }
            }
            c.release();
            if got == 0 {
                spins += 1;
                std::thread::yield_now();
            }
        }
        t.join().unwrap();
        assert_eq!(c.pop(), None);
        let _ = spins;
    }
}

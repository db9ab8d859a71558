//! A small, exact IOVA allocator for the VFIO transport.
//!
//! The device addresses memory through the IOMMU at IOVAs we choose. The allocator hands out
//! ranges from a set of usable windows (the IOMMU's valid ranges minus reserved regions such as
//! the MSI window), aligned to a power of two, lowest address first, and takes them back exactly:
//! freeing a range that was not allocated (or with another length) is an error and changes
//! nothing; freed ranges coalesce with their free neighbours, so after everything is freed the
//! free set is again the initial windows.
//!
//! Lengths are rounded up to the granule (the IOMMU page size); `free` applies the same rounding,
//! so callers pass the length they asked for.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

/// Why an allocation, a free or a setup failed. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IovaError {
    #[error("granule {0:#x} is not a power of two")]
    BadGranule(u64),
    #[error("alignment {0:#x} is not a power of two")]
    BadAlign(u64),
    #[error("zero-length IOVA range")]
    ZeroLength,
    #[error("no free IOVA range of {len:#x} bytes aligned to {align:#x} ({free:#x} bytes free in {ranges} ranges)")]
    Exhausted { len: u64, align: u64, free: u64, ranges: usize },
    #[error("IOVA {iova:#x} (+{len:#x}) was not allocated with that length")]
    NotAllocated { iova: u64, len: u64 },
    #[error("no usable IOVA window (every range is empty after alignment and exclusions)")]
    NoWindow,
}

/// The allocator. See the module docs.
#[derive(Clone)]
pub struct IovaAllocator {
    granule: u64,
    /// Free ranges: start -> end (exclusive); disjoint, non-adjacent (coalesced), granule aligned.
    free: BTreeMap<u64, u64>,
    /// Allocated ranges: start -> rounded length.
    used: BTreeMap<u64, u64>,
    /// The windows we started from (normalized), for reporting.
    windows: Vec<Range<u64>>,
}

impl fmt::Debug for IovaAllocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IovaAllocator")
            .field("granule", &format_args!("{:#x}", self.granule))
            .field("windows", &self.windows.iter().map(|r| format!("{:#x}..{:#x}", r.start, r.end)).collect::<Vec<_>>())
            .field("free_bytes", &format_args!("{:#x}", self.free_bytes()))
            .field("allocations", &self.used.len())
            .finish()
    }
}

/// Sort, merge overlapping/adjacent ranges, drop empty ones.
fn normalize(mut r: Vec<Range<u64>>) -> Vec<Range<u64>> {
    r.retain(|x| x.start < x.end);
    r.sort_by_key(|x| x.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(r.len());
    for x in r {
        match out.last_mut() {
            Some(last) if x.start <= last.end => last.end = last.end.max(x.end),
            _ => out.push(x),
        }
    }
    out
}

/// `windows` minus `holes` (both arbitrary lists of half-open ranges).
pub fn subtract(windows: &[Range<u64>], holes: &[Range<u64>]) -> Vec<Range<u64>> {
    let holes = normalize(holes.to_vec());
    let mut out = Vec::new();
    for w in normalize(windows.to_vec()) {
        let mut start = w.start;
        for h in &holes {
            if h.end <= start || h.start >= w.end {
                continue;
            }
            if h.start > start {
                out.push(start..h.start);
            }
            start = start.max(h.end);
            if start >= w.end {
                break;
            }
        }
        if start < w.end {
            out.push(start..w.end);
        }
    }
    out
}

impl IovaAllocator {
    /// An allocator over `windows` (any order, may overlap), with `granule` (power of two) as
    /// the unit. Window edges are rounded inwards to the granule; IOVA 0's granule is never
    /// handed out (a zero device address is too easy to confuse with "none").
    pub fn new(windows: &[Range<u64>], granule: u64) -> Result<Self, IovaError> {
        if !granule.is_power_of_two() {
            return Err(IovaError::BadGranule(granule));
        }
        let windows = subtract(windows, std::slice::from_ref(&(0..granule)));
        let mut free = BTreeMap::new();
        let mut kept = Vec::new();
        for w in normalize(windows) {
            let Some(start) = w.start.checked_next_multiple_of(granule) else { continue };
            let end = w.end & !(granule - 1);
            if start < end {
                free.insert(start, end);
                kept.push(start..end);
            }
        }
        if free.is_empty() {
            return Err(IovaError::NoWindow);
        }
        Ok(Self { granule, free, used: BTreeMap::new(), windows: kept })
    }

    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// The usable windows the allocator started from.
    pub fn windows(&self) -> &[Range<u64>] {
        &self.windows
    }

    /// Free bytes in total.
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|(s, e)| e - s).sum()
    }

    /// The free ranges, lowest first.
    pub fn free_ranges(&self) -> Vec<Range<u64>> {
        self.free.iter().map(|(&s, &e)| s..e).collect()
    }

    /// Live allocations as (iova, rounded length), lowest first.
    pub fn allocations(&self) -> Vec<(u64, u64)> {
        self.used.iter().map(|(&s, &l)| (s, l)).collect()
    }

    fn round(&self, len: u64) -> Result<u64, IovaError> {
        if len == 0 {
            return Err(IovaError::ZeroLength);
        }
        len.checked_next_multiple_of(self.granule).ok_or(IovaError::Exhausted {
            len,
            align: self.granule,
            free: self.free_bytes(),
            ranges: self.free.len(),
        })
    }

    /// Allocate `len` bytes (rounded up to the granule) at an IOVA aligned to `align` (a power of
    /// two; the granule at least). First fit, lowest address.
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64, IovaError> {
        if !align.is_power_of_two() {
            return Err(IovaError::BadAlign(align));
        }
        let align = align.max(self.granule);
        let len = self.round(len)?;
        let found = self.free.iter().find_map(|(&s, &e)| {
            let a = s.checked_next_multiple_of(align)?;
            let end = a.checked_add(len)?;
            (end <= e).then_some((s, e, a, end))
        });
        let Some((s, e, a, end)) = found else {
            return Err(IovaError::Exhausted { len, align, free: self.free_bytes(), ranges: self.free.len() });
        };
        self.free.remove(&s);
        if s < a {
            self.free.insert(s, a);
        }
        if end < e {
            self.free.insert(end, e);
        }
        self.used.insert(a, len);
        Ok(a)
    }

    /// Give back an allocation: `iova` and `len` as passed to / returned by [`Self::alloc`].
    pub fn free(&mut self, iova: u64, len: u64) -> Result<(), IovaError> {
        let rounded = self.round(len).map_err(|_| IovaError::NotAllocated { iova, len })?;
        if self.used.get(&iova) != Some(&rounded) {
            return Err(IovaError::NotAllocated { iova, len });
        }
        self.used.remove(&iova);
        let mut start = iova;
        let mut end = iova + rounded;
        // Coalesce with the free range ending at `start` and the one starting at `end`.
        if let Some((&ps, &pe)) = self.free.range(..start).next_back() {
            debug_assert!(pe <= start, "free range overlaps an allocation");
            if pe == start {
                self.free.remove(&ps);
                start = ps;
            }
        }
        if let Some(ne) = self.free.remove(&end) {
            end = ne;
        }
        self.free.insert(start, end);
        Ok(())
    }

    /// Whether exactly this allocation (`iova`, `len` as given to [`Self::alloc`]) is live.
    pub fn is_allocated(&self, iova: u64, len: u64) -> bool {
        self.round(len).is_ok_and(|r| self.used.get(&iova) == Some(&r))
    }

    /// Whether `iova..iova+len` lies inside one live allocation (for checks and tests).
    pub fn contains(&self, iova: u64, len: u64) -> bool {
        match self.used.range(..=iova).next_back() {
            Some((&s, &l)) => iova.checked_add(len).is_some_and(|e| e <= s + l),
            None => false,
        }
    }
}

/// Parse an IOMMU group's `reserved_regions` file (sysfs): one region a line,
/// `0x00000000fee00000 0x00000000feefffff msi` (start and inclusive end, then the type).
/// Lines that do not parse are skipped (the file is informational; we only ever exclude more).
pub fn parse_reserved_regions(text: &str) -> Vec<Range<u64>> {
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x").trim_start_matches("0X"), 16).ok();
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let s = hex(it.next()?)?;
            let e = hex(it.next()?)?;
            (s <= e).then(|| s..e.saturating_add(1))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    const G: u64 = 4096;
    const M2: u64 = 2 << 20;

    #[test]
    fn rejects_bad_setup() {
        assert_eq!(IovaAllocator::new(&[0..1 << 30], 3000).unwrap_err(), IovaError::BadGranule(3000));
        assert_eq!(IovaAllocator::new(&[], G).unwrap_err(), IovaError::NoWindow);
        // Smaller than a granule after rounding inwards.
        assert_eq!(IovaAllocator::new(&[4097..8191], G).unwrap_err(), IovaError::NoWindow);
        // Only the zero page.
        assert_eq!(IovaAllocator::new(&[0..G], G).unwrap_err(), IovaError::NoWindow);
    }

    #[test]
    fn never_hands_out_zero() {
        let mut a = IovaAllocator::new(&[0..16 * G], G).unwrap();
        assert_eq!(a.windows(), &[G..16 * G]);
        let x = a.alloc(G, G).unwrap();
        assert_eq!(x, G);
    }

    #[test]
    fn first_fit_alignment_and_split() {
        let mut a = IovaAllocator::new(&[G..64 << 20], G).unwrap();
        let p = a.alloc(100, G).unwrap();
        assert_eq!(p, G);
        // Rounded to the granule.
        assert_eq!(a.allocations(), vec![(G, G)]);
        let h = a.alloc(4 << 20, M2).unwrap();
        assert_eq!(h % M2, 0);
        assert_eq!(h, M2);
        // The gap below the huge allocation is still used for small ones.
        let q = a.alloc(G, G).unwrap();
        assert_eq!(q, 2 * G);
        assert_eq!(a.free_bytes(), (64 << 20) - G - 2 * G - (4 << 20));
        assert!(a.contains(h + 100, 200));
        assert!(!a.contains(h + (4 << 20) - 1, 2));
    }

    #[test]
    fn free_is_exact_and_coalesces() {
        let mut a = IovaAllocator::new(&[G..1 << 20], G).unwrap();
        let x = a.alloc(G, G).unwrap();
        let y = a.alloc(3 * G, G).unwrap();
        let z = a.alloc(G, G).unwrap();
        assert_eq!(a.free(y, 2 * G), Err(IovaError::NotAllocated { iova: y, len: 2 * G }));
        assert_eq!(a.free(y + G, G), Err(IovaError::NotAllocated { iova: y + G, len: G }));
        assert_eq!(a.free(0, 0), Err(IovaError::NotAllocated { iova: 0, len: 0 }));
        // A length that rounds to the same size is the same allocation.
        a.free(y, 3 * G - 5).unwrap();
        assert_eq!(a.free(y, 3 * G), Err(IovaError::NotAllocated { iova: y, len: 3 * G }), "double free");
        a.free(x, G).unwrap();
        a.free(z, G).unwrap();
        assert_eq!(a.free_ranges(), vec![G..1 << 20]);
        assert!(a.allocations().is_empty());
    }

    #[test]
    fn exhaustion_is_reported_and_harmless() {
        let mut a = IovaAllocator::new(&[G..5 * G], G).unwrap();
        let e = a.alloc(5 * G, G).unwrap_err();
        assert!(matches!(e, IovaError::Exhausted { free, .. } if free == 4 * G), "{e}");
        let x = a.alloc(4 * G, G).unwrap();
        assert!(matches!(a.alloc(G, G), Err(IovaError::Exhausted { .. })));
        assert_eq!(a.alloc(0, G), Err(IovaError::ZeroLength));
        assert_eq!(a.alloc(G, 3 * G), Err(IovaError::BadAlign(3 * G)));
        // Overflowing lengths/alignments fail cleanly.
        assert!(a.alloc(u64::MAX, G).is_err());
        a.free(x, 4 * G).unwrap();
        assert!(a.alloc(G, 1 << 63).is_err());
        assert_eq!(a.free_ranges(), vec![G..5 * G]);
    }

    #[test]
    fn windows_with_holes() {
        // [1 GiB, 8 GiB) minus the x86 MSI window.
        let holes = parse_reserved_regions(
            "0x00000000fee00000 0x00000000feefffff msi\n\
             garbage line\n\
             0x0000000000000000 0x0000000000000fff direct\n",
        );
        assert_eq!(holes, vec![0xfee0_0000..0xfef0_0000, 0..0x1000]);
        let w = subtract(&[1 << 30..8 << 30], &holes);
        assert_eq!(w, vec![1 << 30..0xfee0_0000, 0xfef0_0000..8 << 30]);
        let mut a = IovaAllocator::new(&w, G).unwrap();
        // 3 GiB does not fit below the hole (1 GiB .. 0xfee00000 is ~2.98 GiB) and may not
        // straddle it: it goes above, at the first 2 MiB boundary past the hole.
        let big = 3u64 << 30;
        let x = a.alloc(big, M2).unwrap();
        assert_eq!(x, 0xff00_0000);
        // Small ones still start at the bottom.
        assert_eq!(a.alloc(G, G).unwrap(), 1 << 30);
    }

    #[test]
    fn subtract_edges() {
        assert_eq!(subtract(&[10..20], &[0..10, 20..30]), vec![10..20]);
        assert_eq!(subtract(&[10..20], &[0..30]), Vec::<Range<u64>>::new());
        assert_eq!(subtract(&[10..20, 15..25], &[12..13]), vec![10..12, 13..25]);
        assert_eq!(subtract(&[0..100], &[10..20, 15..30, 90..200]), vec![0..10, 30..90]);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Alloc { pages: u64, align_shift: u32 },
            Free(usize),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (1u64..600, 12u32..23).prop_map(|(pages, align_shift)| Op::Alloc { pages, align_shift }),
                any::<usize>().prop_map(Op::Free),
            ]
        }

        proptest! {
            /// Against a model: allocations never overlap, stay in the windows, are aligned;
            /// free bytes are conserved; freeing everything restores the initial windows.
            #[test]
            fn model(ops in proptest::collection::vec(op(), 1..200), hole in 0u64..1024) {
                let windows = subtract(&[0..(1 << 30)], &[(hole << 20)..((hole << 20) + (1 << 20))]);
                let mut a = IovaAllocator::new(&windows, G).unwrap();
                let initial = a.free_ranges();
                let total = a.free_bytes();
                let mut live: Vec<(u64, u64)> = Vec::new();
                for op in ops {
                    match op {
                        Op::Alloc { pages, align_shift } => {
                            let len = pages * G;
                            let align = 1u64 << align_shift;
                            if let Ok(x) = a.alloc(len, align) {
                                prop_assert_eq!(x % align, 0);
                                prop_assert!(x != 0);
                                prop_assert!(initial.iter().any(|w| w.start <= x && x + len <= w.end));
                                for &(s, l) in &live {
                                    prop_assert!(x + len <= s || s + l <= x, "overlap");
                                }
                                live.push((x, len));
                            }
                        }
                        Op::Free(k) if !live.is_empty() => {
                            let (s, l) = live.swap_remove(k % live.len());
                            prop_assert!(a.free(s, l).is_ok());
                            prop_assert!(a.free(s, l).is_err());
                        }
                        Op::Free(_) => {}
                    }
                    let used: u64 = live.iter().map(|&(_, l)| l).sum();
                    prop_assert_eq!(a.free_bytes() + used, total);
                    // Coalesced: no two free ranges touch.
                    let f = a.free_ranges();
                    for w in f.windows(2) {
                        prop_assert!(w[0].end < w[1].start);
                    }
                }
                for (s, l) in live.drain(..) {
                    prop_assert!(a.free(s, l).is_ok());
                }
                prop_assert_eq!(a.free_ranges(), initial);
            }
        }
    }
}

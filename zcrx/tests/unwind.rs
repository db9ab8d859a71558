//! All-or-nothing registration (patch 1/4 and 3/4 of the zcrx series): every step of area
//! creation and ifq registration is failed in turn, for every memory kind, with a recording DMA
//! mapper; after each failure nothing may be left behind — no DMA mapping, no locked memory, no
//! memlock charge, no file descriptor, no memory mapping. Teardown of a successful registration
//! releases the same resources, except that the user's end keeps the area memory readable.
//!
//! One #[test] only: the resources are process wide (VmLck, the memlock charge counter, the fd
//! table, the address space), so nothing else may run in this process at the same time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use zcrx::area::Step;
use zcrx::ifq::RegStep;
use zcrx::memlock::MemlockError;
use zcrx::uapi::{area_token, ZCRX_REG_NODEV};
use zcrx::{AreaError, AreaReg, Cqe, DmaError, DmaMap, DmaSegment, Error, Ifq, IfqReg, MemlockPolicy, MemoryKind};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const HUGE_2M: usize = 2 * MIB;

// ---------------------------------------------------------------------------------------------
// Process-wide resource snapshot.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snap {
    locked: u64,
    charged: u64,
    fds: usize,
    maps: usize,
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("read /proc/self/fd").count()
}

fn maps_count() -> usize {
    std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps").lines().count()
}

fn snap() -> Snap {
    Snap {
        locked: zcrx::mem::process_locked_bytes().expect("VmLck"),
        charged: zcrx::memlock::charged_bytes(),
        fds: fd_count(),
        maps: maps_count(),
    }
}

#[track_caller]
fn assert_clean(start: Snap, what: &str) {
    let now = snap();
    assert_eq!(now.locked, start.locked, "{what}: locked bytes (VmLck) left behind");
    assert_eq!(now.charged, start.charged, "{what}: memlock charge left behind");
    assert_eq!(now.fds, start.fds, "{what}: file descriptors left behind");
    assert_eq!(now.maps, start.maps, "{what}: memory mappings left behind");
}

// ---------------------------------------------------------------------------------------------
// A DMA mapper test double: hands out IOVAs with gaps between segments (so code that assumes
// one contiguous IOVA range is caught), records what is mapped, and can fail the k-th map().

#[derive(Default)]
struct Rec {
    /// iova -> (len, vaddr, fd offset)
    mapped: BTreeMap<u64, (usize, usize, Option<u64>)>,
    next_iova: u64,
    map_calls: usize,
    unmap_calls: usize,
    errors: Vec<String>,
}

struct RecordingDma {
    max_seg: usize,
    fail_at: Option<usize>,
    rec: Mutex<Rec>,
}

impl RecordingDma {
    fn new(max_seg: usize, fail_at: Option<usize>) -> Arc<Self> {
        Arc::new(Self { max_seg, fail_at, rec: Mutex::new(Rec { next_iova: 0x7_0000_0000, ..Default::default() }) })
    }
    fn mapped(&self) -> BTreeMap<u64, (usize, usize, Option<u64>)> {
        self.rec.lock().unwrap().mapped.clone()
    }
    fn map_calls(&self) -> usize {
        self.rec.lock().unwrap().map_calls
    }
    fn unmap_calls(&self) -> usize {
        self.rec.lock().unwrap().unmap_calls
    }
    #[track_caller]
    fn assert_no_errors(&self) {
        let r = self.rec.lock().unwrap();
        assert!(r.errors.is_empty(), "DMA mapper saw misuse: {:?}", r.errors);
    }
    #[track_caller]
    fn assert_nothing_mapped(&self, what: &str) {
        self.assert_no_errors();
        let r = self.rec.lock().unwrap();
        assert!(r.mapped.is_empty(), "{what}: DMA ranges still mapped: {:x?}", r.mapped);
        assert_eq!(
            r.map_calls - usize::from(self.fail_at.is_some_and(|k| r.map_calls > k)),
            r.unmap_calls,
            "{what}: every successful map() needs exactly one unmap()"
        );
    }
}

impl DmaMap for RecordingDma {
    fn map(&self, seg: DmaSegment<'_>) -> Result<u64, DmaError> {
        let mut r = self.rec.lock().unwrap();
        let k = r.map_calls;
        r.map_calls += 1;
        if seg.len == 0 || seg.len > self.max_seg {
            r.errors.push(format!("map of {} bytes, max segment {}", seg.len, self.max_seg));
        }
        if seg.vaddr.is_null() || seg.vaddr as usize % 4096 != 0 {
            r.errors.push(format!("map of unaligned vaddr {:p}", seg.vaddr));
        }
        if self.fail_at == Some(k) {
            return Err(DmaError::new(format!("injected failure of segment {k}")));
        }
        let iova = r.next_iova;
        // Leave a hole after every segment: IOVAs of consecutive segments are not contiguous.
        r.next_iova += (seg.len as u64).next_multiple_of(4096) + 0x10_3000;
        r.mapped.insert(iova, (seg.len, seg.vaddr as usize, seg.fd.map(|(_, off)| off)));
        Ok(iova)
    }

    fn unmap(&self, iova: u64, len: usize) -> Result<(), DmaError> {
        let mut r = self.rec.lock().unwrap();
        r.unmap_calls += 1;
        match r.mapped.remove(&iova) {
            Some((l, ..)) if l == len => Ok(()),
            Some((l, v, o)) => {
                r.errors.push(format!("unmap {iova:#x} with len {len}, mapped with {l}"));
                r.mapped.insert(iova, (l, v, o));
                Err(DmaError::new("length mismatch"))
            }
            None => {
                r.errors.push(format!("unmap of {iova:#x}+{len} that is not mapped"));
                Err(DmaError::new("not mapped"))
            }
        }
    }

    fn max_segment(&self) -> usize {
        self.max_seg
    }
}

// ---------------------------------------------------------------------------------------------

fn dev_reg() -> IfqReg {
    // A DMA context means a device: no NODEV; the device fields are free.
    IfqReg { if_idx: 3, if_rxq: 1, rq_entries: 64, cq_entries: 128, flags: 0, rx_buf_len: 4096, resv: [0; 2] }
}

fn nodev_reg() -> IfqReg {
    IfqReg { rq_entries: 64, cq_entries: 128, ..IfqReg::default() }
}

fn seg_len(max_seg: usize, len: usize, rx: usize) -> usize {
    max_seg.min(len) / rx * rx
}

/// Every step registration goes through, in order, for an area of `len` bytes mapped in
/// segments of at most `max_seg`.
fn all_steps(len: usize, max_seg: usize) -> Vec<RegStep> {
    let nsegs = len.div_ceil(seg_len(max_seg, len, 4096));
    let mut v = vec![
        RegStep::Area(Step::Allocate),
        RegStep::Area(Step::FaultIn),
        RegStep::Area(Step::Account),
        RegStep::Area(Step::Lock),
    ];
    v.extend((0..nsegs).map(|k| RegStep::Area(Step::Map(k))));
    v.push(RegStep::RqRing);
    v.push(RegStep::CqRing);
    v
}

fn injected(step: RegStep) -> std::io::Error {
    std::io::Error::other(format!("injected at {step:?}"))
}

/// Fail every step of registration in turn; after each failure nothing is left behind.
fn fail_every_step(kind: MemoryKind, len: usize, max_seg: usize) {
    let steps = all_steps(len, max_seg);
    let start = snap();
    for &target in &steps {
        let what = format!("{kind:?}, failing {target:?}");
        let dma = RecordingDma::new(max_seg, None);
        let mut seen = Vec::new();
        let r = Ifq::register_with_faults(dev_reg(), AreaReg::new(kind, len), Some(dma.clone()), &mut |s| {
            seen.push(s);
            if s == target {
                Err(injected(s))
            } else {
                Ok(())
            }
        });
        let err = match r {
            Ok(_) => panic!("{what}: registration succeeded"),
            Err(e) => e,
        };
        // The failure happened at the target step, after exactly the steps before it.
        let pos = steps.iter().position(|&s| s == target).unwrap();
        assert_eq!(seen, steps[..=pos], "{what}: steps run");
        match (target, &err) {
            (RegStep::Area(s), Error::Area(AreaError::Injected(got, _))) => assert_eq!(*got, s, "{what}: {err}"),
            (RegStep::RqRing, Error::Ring { which, .. }) => assert_eq!(*which, "refill", "{what}: {err}"),
            (RegStep::CqRing, Error::Ring { which, .. }) => assert_eq!(*which, "completion", "{what}: {err}"),
            _ => panic!("{what}: unexpected error {err:?}"),
        }
        // Segments before the failing one were mapped; all of them are unmapped again.
        let expect_maps = match target {
            RegStep::Area(Step::Map(k)) => k,
            RegStep::Area(_) => 0,
            _ => steps.iter().filter(|s| matches!(s, RegStep::Area(Step::Map(_)))).count(),
        };
        assert_eq!(dma.map_calls(), expect_maps, "{what}: map() calls");
        assert_eq!(dma.unmap_calls(), expect_maps, "{what}: unmap() calls");
        dma.assert_nothing_mapped(&what);
        drop(err);
        assert_clean(start, &what);
    }

    // A mapper whose map() itself fails at segment k.
    let sl = seg_len(max_seg, len, 4096);
    let nsegs = len.div_ceil(sl);
    for k in 0..nsegs {
        let what = format!("{kind:?}, map() failing at segment {k}/{nsegs}");
        let dma = RecordingDma::new(max_seg, Some(k));
        let err = match Ifq::register(dev_reg(), AreaReg::new(kind, len), Some(dma.clone())) {
            Ok(_) => panic!("{what}: registration succeeded"),
            Err(e) => e,
        };
        match &err {
            Error::Area(AreaError::Map { segment, offset, len: l, .. }) => {
                assert_eq!((*segment, *offset, *l), (k, k * sl, sl.min(len - k * sl)), "{what}: {err}");
            }
            _ => panic!("{what}: unexpected error {err:?}"),
        }
        assert_eq!(dma.map_calls(), k + 1, "{what}");
        assert_eq!(dma.unmap_calls(), k, "{what}");
        dma.assert_nothing_mapped(&what);
        drop(err);
        assert_clean(start, &what);
    }

    // A mapper that cannot take even one buffer.
    let dma = RecordingDma::new(2048, None);
    let err = Ifq::register(dev_reg(), AreaReg::new(kind, len), Some(dma.clone())).map(|_| ()).unwrap_err();
    assert!(
        matches!(err, Error::Area(AreaError::SegmentTooSmall { max: 2048, rx_buf_len: 4096 })),
        "{kind:?}: {err:?}"
    );
    dma.assert_nothing_mapped("segment too small");
    drop(err);
    assert_clean(start, &format!("{kind:?}, segment too small"));
}

/// Write `len` bytes of a pattern into a free buffer as a device would, complete it (zero-copy
/// path) and return the completion as the user receives it.
fn device_delivers(ifq: &mut Ifq, user: &mut zcrx::IfqUser, len: usize, seed: u8) -> Cqe {
    let i = ifq.take_free().expect("a free buffer");
    let p = ifq.area().niov_ptr(i);
    for k in 0..len {
        // SAFETY: buffer i is posted to us, inside the area, len <= rx_buf_len.
        unsafe { p.add(k).write(seed.wrapping_add((k * 7) as u8)) };
    }
    ifq.complete(i, 0, len as u32, 0, false).expect("cq space");
    ifq.commit();
    let mut c = [Cqe::default(); 4];
    assert_eq!(user.recv(&mut c), 1);
    c[0]
}

/// A successful registration maps every segment, gives every buffer a distinct IOVA inside a
/// mapped range that maps exactly that buffer's memory; teardown releases everything, in two
/// stages (the ifq, then the user's end which keeps the memory readable).
fn success_and_teardown(kind: MemoryKind, len: usize, max_seg: usize) {
    let what = format!("{kind:?}, max segment {max_seg}");
    let start = snap();
    let dma = RecordingDma::new(max_seg, None);
    let mut seen = Vec::new();
    let (mut ifq, mut user) =
        Ifq::register_with_faults(dev_reg(), AreaReg::new(kind, len), Some(dma.clone()), &mut |s| {
            seen.push(s);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(seen, all_steps(len, max_seg), "{what}: registration steps in order");

    let area = ifq.area();
    assert!(area.is_mapped());
    assert!(!ifq.is_nodev());
    let sl = seg_len(max_seg, len, 4096);
    let mapped = dma.mapped();
    assert_eq!(mapped.len(), len.div_ceil(sl), "{what}: every segment mapped");
    // The mapped segments cover the area exactly once, in pieces of at most max_seg.
    let base = area.memory().ptr().as_ptr() as usize;
    let mut by_vaddr: Vec<_> = mapped.iter().map(|(&iova, &(l, v, o))| (v, l, iova, o)).collect();
    by_vaddr.sort();
    let mut next = base;
    for &(v, l, _, fd_off) in &by_vaddr {
        assert_eq!(v, next, "{what}: segments contiguous and in order");
        assert!(l <= max_seg && l % 4096 == 0);
        match kind {
            MemoryKind::Anonymous => assert_eq!(fd_off, None, "{what}: anonymous memory has no fd"),
            _ => assert_eq!(fd_off, Some((v - base) as u64), "{what}: fd offset of segment"),
        }
        next += l;
    }
    assert_eq!(next, base + len, "{what}: whole area mapped");

    // Every niov: a distinct IOVA, inside one mapped range, naming that niov's memory.
    let mut iovas = std::collections::HashSet::new();
    for i in 0..area.num_niovs() {
        let iova = area.niov_dma(i).unwrap_or_else(|| panic!("{what}: niov {i} has no IOVA"));
        assert!(iovas.insert(iova), "{what}: IOVA {iova:#x} of niov {i} given twice");
        let (&seg_iova, &(l, v, _)) = mapped.range(..=iova).next_back().expect("IOVA below every segment");
        assert!(iova + 4096 <= seg_iova + l as u64, "{what}: niov {i} IOVA {iova:#x} outside its segment");
        assert_eq!(
            (iova - seg_iova) as usize,
            area.niov_ptr(i) as usize - v,
            "{what}: niov {i}'s IOVA does not map its own memory"
        );
    }
    assert_eq!(iovas.len(), len / 4096);
    // The area is locked and charged while it lives.
    let live = snap();
    // The kernel does not count mlock'ed hugetlb mappings in VmLck.
    let locked = if matches!(kind, MemoryKind::HugetlbMemfd { .. }) { 0 } else { len as u64 };
    assert_eq!(live.locked, start.locked + locked, "{what}: area locked");
    assert_eq!(live.charged, start.charged + len as u64, "{what}: area charged");

    // A buffer the user holds across teardown.
    let c = device_delivers(&mut ifq, &mut user, 3000, 0x5a);
    assert_eq!(c.off & !zcrx::uapi::AREA_MASK, area_token(0));
    assert_eq!(ifq.stats().zc_count, 1);
    assert_eq!(ifq.stats().zc_bytes, 3000);
    let expect: Vec<u8> = (0..3000).map(|k| 0x5au8.wrapping_add((k * 7) as u8)).collect();
    assert_eq!(user.data(&c).unwrap(), &expect[..]);

    drop(ifq);
    assert!(user.is_closed(), "{what}: user sees the close");
    dma.assert_nothing_mapped(&format!("{what}, after dropping the ifq"));
    let mid = snap();
    assert_eq!(mid.locked, start.locked, "{what}: unlocked when the ifq is gone");
    assert_eq!(mid.charged, start.charged, "{what}: uncharged when the ifq is gone");
    // Completions already delivered stay readable: the memory lives with the user's end.
    assert_eq!(user.data(&c).unwrap(), &expect[..], "{what}: data after teardown");
    drop(user);
    assert_clean(start, &format!("{what}, after dropping both ends"));
}

fn free_hugepages_2m() -> usize {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn registration_is_all_or_nothing() {
    // Warm up whatever the first registration allocates once per process (allocator arenas,
    // thread-locals), so the baseline below is the steady state.
    drop(Ifq::register(nodev_reg(), AreaReg::new(MemoryKind::Memfd, MIB), None).unwrap());
    drop(
        Ifq::register(dev_reg(), AreaReg::new(MemoryKind::Memfd, MIB), Some(RecordingDma::new(64 * KIB, None)))
            .unwrap(),
    );
    let start = snap();

    // NODEV: locked and charged while alive, nothing mapped.
    {
        let (ifq, user) = Ifq::register(nodev_reg(), AreaReg::new(MemoryKind::Anonymous, MIB), None).unwrap();
        assert!(!ifq.area().is_mapped());
        assert_eq!(ifq.area().niov_dma(0), None, "NODEV pretends nothing is mapped");
        assert_eq!(ifq.area().num_niovs(), 256);
        let s = snap();
        assert_eq!(s.locked, start.locked + MIB as u64);
        assert_eq!(s.charged, start.charged + MIB as u64);
        drop((ifq, user));
        assert_clean(start, "NODEV area");
    }

    for kind in [MemoryKind::Anonymous, MemoryKind::Memfd] {
        // 1 MiB in 64 KiB segments: 16 segments of 16 buffers.
        fail_every_step(kind, MIB, 64 * KIB);
        // A segment size that is not a multiple of the buffer size, and a short last segment.
        fail_every_step(kind, MIB, 100 * KIB);
        success_and_teardown(kind, MIB, 64 * KIB);
        success_and_teardown(kind, MIB, 100 * KIB);
        success_and_teardown(kind, MIB, usize::MAX);
        assert_clean(start, &format!("{kind:?}"));
    }

    let huge = MemoryKind::HugetlbMemfd { page_size: HUGE_2M };
    let free = free_hugepages_2m();
    if free >= 1 {
        fail_every_step(huge, HUGE_2M, 64 * KIB);
        success_and_teardown(huge, HUGE_2M, 64 * KIB);
    } else {
        let dma = RecordingDma::new(64 * KIB, None);
        let err = Ifq::register(dev_reg(), AreaReg::new(huge, HUGE_2M), Some(dma.clone())).map(|_| ()).unwrap_err();
        match &err {
            Error::Area(AreaError::NoHugepages { page_size, needed, free: f, dir }) => {
                assert_eq!((*page_size, *needed, *f), (HUGE_2M, 1, free), "{err}");
                assert!(err.to_string().contains(dir.as_str()), "error names where to raise the pool: {err}");
            }
            _ => panic!("hugetlb without free huge pages: unexpected {err:?}"),
        }
        assert_eq!(dma.map_calls(), 0);
        dma.assert_nothing_mapped("no hugepages");
        drop(err);
        assert_clean(start, "hugetlb without free huge pages");
    }

    // A memlock limit too small for the area: the error carries the numbers, nothing is kept.
    for kind in [MemoryKind::Anonymous, MemoryKind::Memfd] {
        let mut reg = AreaReg::new(kind, MIB);
        let limit = start.charged + 512 * KIB as u64;
        reg.memlock = MemlockPolicy::Limit(limit);
        let dma = RecordingDma::new(64 * KIB, None);
        let err = Ifq::register(dev_reg(), reg, Some(dma.clone())).map(|_| ()).unwrap_err();
        match err {
            Error::Area(AreaError::Memlock(e)) => assert_eq!(
                e,
                MemlockError {
                    needed: MIB as u64,
                    charged: start.charged,
                    limit,
                    suggest_kib: (start.charged + MIB as u64).div_ceil(1024)
                }
            ),
            e => panic!("{kind:?}: expected a memlock error, got {e:?}"),
        }
        assert_eq!(dma.map_calls(), 0);
        dma.assert_nothing_mapped("memlock");
        assert_clean(start, &format!("{kind:?}, memlock limit too small"));

        // With another area alive, its charge counts against the limit.
        let (a, au) = Ifq::register(nodev_reg(), AreaReg::new(kind, MIB), None).unwrap();
        let mut reg = AreaReg::new(kind, MIB);
        let limit = start.charged + MIB as u64 + 512 * KIB as u64;
        reg.memlock = MemlockPolicy::Limit(limit);
        match Ifq::register(nodev_reg(), reg, None).map(|_| ()).unwrap_err() {
            Error::Area(AreaError::Memlock(e)) => assert_eq!(
                e,
                MemlockError {
                    needed: MIB as u64,
                    charged: start.charged + MIB as u64,
                    limit,
                    suggest_kib: (start.charged + 2 * MIB as u64).div_ceil(1024)
                }
            ),
            e => panic!("{kind:?}: expected a memlock error, got {e:?}"),
        }
        assert_eq!(zcrx::memlock::charged_bytes(), start.charged + MIB as u64);
        drop((a, au));
        assert_clean(start, &format!("{kind:?}, memlock limit with another area"));
    }
    // Rejections at validation touch nothing either.
    let bad = IfqReg { flags: ZCRX_REG_NODEV, ..dev_reg() };
    assert!(matches!(
        Ifq::register(bad, AreaReg::new(MemoryKind::Memfd, MIB), None).map(|_| ()),
        Err(Error::Reg(zcrx::RegError::NodevWithDevice { .. }))
    ));
    assert_clean(start, "end");
}

//! Areas: the user memory split into `rx_buf_len` buffers (niovs), made ready for receive in
//! one step — faulted in, accounted, locked and DMA mapped — or not at all.
//!
//! Every step returns an owner (RAII guard) for what it took; the guards sit in [`Area`] in
//! reverse order of creation, so both a failure half-way and a normal drop release exactly what
//! was taken, newest first. The memory itself is shared ([`AreaMemory`] in an `Arc`) so that
//! completions already handed to the user stay readable after the queue is torn down.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::dma::{DmaError, DmaMap, DmaSegment};
use crate::mem::{self, Locked, Mapping};
use crate::memlock::{Charge, MemlockError, MemlockPolicy};

/// What backs an area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// Private anonymous memory ("umem"); cannot be shared with another process.
    Anonymous,
    /// A memfd, mapped shared: the fd can be handed to a vhost-user backend.
    Memfd,
    /// A hugetlb memfd with pages of this size (2 MiB or 1 GiB).
    HugetlbMemfd { page_size: usize },
}

/// The user memory of an area. Unmapped (and its fd closed) when the last owner goes.
#[derive(Debug)]
pub struct AreaMemory {
    map: Mapping,
    fd: Option<OwnedFd>,
    kind: MemoryKind,
}

impl AreaMemory {
    /// Allocate `len` bytes of `kind` memory; `len` must be a multiple of the kind's page size.
    pub fn new(kind: MemoryKind, len: usize) -> Result<Self, AreaError> {
        let page = match kind {
            MemoryKind::HugetlbMemfd { page_size } => page_size,
            _ => mem::page_size(),
        };
        if len == 0 || len % page != 0 {
            return Err(AreaError::BadLength { len, page });
        }
        match kind {
            MemoryKind::Anonymous => {
                let map = Mapping::anonymous(len, false).map_err(|e| AreaError::Alloc(kind, e))?;
                Ok(Self { map, fd: None, kind })
            }
            MemoryKind::Memfd | MemoryKind::HugetlbMemfd { .. } => {
                let huge = match kind {
                    MemoryKind::HugetlbMemfd { page_size } => {
                        check_hugepages(page_size, len)?;
                        Some(page_size)
                    }
                    _ => None,
                };
                let fd = mem::memfd("zcrx-area", len, huge).map_err(|e| AreaError::Alloc(kind, e))?;
                let map = Mapping::shared_fd(fd.as_fd(), len).map_err(|e| AreaError::Alloc(kind, e))?;
                Ok(Self { map, fd: Some(fd), kind })
            }
        }
    }

    pub fn kind(&self) -> MemoryKind {
        self.kind
    }
    pub fn ptr(&self) -> NonNull<u8> {
        self.map.ptr()
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// The backing fd (memfd kinds); the mapping starts at offset 0 of it.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }
}

/// Fail early, with the numbers, instead of SIGBUS on first touch.
fn check_hugepages(page_size: usize, len: usize) -> Result<(), AreaError> {
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page_size / 1024);
    let free = std::fs::read_to_string(format!("{dir}/free_hugepages"))
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok());
    let need = len / page_size;
    match free {
        Some(f) if f >= need => Ok(()),
        f => Err(AreaError::NoHugepages { page_size, needed: need, free: f.unwrap_or(0), dir }),
    }
}

/// Why an area could not be created. Whatever the step, nothing taken before it is kept.
#[derive(Debug, thiserror::Error)]
pub enum AreaError {
    #[error("area length {len} is not a non-zero multiple of the page size {page}")]
    BadLength { len: usize, page: usize },
    #[error("area is not page aligned (address {addr:#x})")]
    Misaligned { addr: usize },
    #[error("rx_buf_len {0} must be a power of two between the page size and 1 GiB")]
    BadBufLen(u32),
    #[error("area length {len} is not a multiple of rx_buf_len {rx_buf_len}")]
    NotBufMultiple { len: usize, rx_buf_len: u32 },
    #[error("area of {0} buffers is too large (at most 2^32 - 1 buffers)")]
    TooManyBuffers(usize),
    #[error("cannot allocate {0:?} area memory: {1}")]
    Alloc(MemoryKind, std::io::Error),
    #[error(
        "not enough free huge pages of {page_size} bytes: need {needed}, {free} free \
         (raise {dir}/nr_hugepages or /proc/sys/vm/nr_hugepages)"
    )]
    NoHugepages { page_size: usize, needed: usize, free: usize, dir: String },
    #[error("cannot fault the area in: {0}")]
    FaultIn(std::io::Error),
    #[error(transparent)]
    Memlock(#[from] MemlockError),
    #[error("cannot lock the area in memory (mlock): {0}")]
    Lock(std::io::Error),
    #[error("DMA mapping of segment {segment} (offset {offset:#x}, {len} bytes) failed: {source}")]
    Map { segment: usize, offset: usize, len: usize, source: DmaError },
    #[error("{0:?} failed (injected): {1}")]
    Injected(Step, std::io::Error),
    #[error("the DMA mapper's max segment {max} is smaller than rx_buf_len {rx_buf_len}")]
    SegmentTooSmall { max: usize, rx_buf_len: u32 },
}

/// The steps of area creation, named for fault injection in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Allocate,
    FaultIn,
    Account,
    Lock,
    /// Mapping the k-th DMA segment.
    Map(usize),
}

/// How to build an area.
#[derive(Debug)]
pub struct AreaReg {
    /// Memory to use: allocate a new one, or take memory the caller prepared.
    pub memory: AreaSource,
    pub memlock: MemlockPolicy,
}

/// Where area memory comes from.
#[derive(Debug)]
pub enum AreaSource {
    Allocate { kind: MemoryKind, len: usize },
    Existing(AreaMemory),
}

impl AreaReg {
    pub fn new(kind: MemoryKind, len: usize) -> Self {
        Self { memory: AreaSource::Allocate { kind, len }, memlock: MemlockPolicy::Rlimit }
    }
}

/// The DMA mappings of one area, unmapped on drop.
struct DmaMapping {
    dma: Arc<dyn DmaMap>,
    /// (iova, len) per segment; every segment but the last is `seg_len` long.
    segs: Vec<(u64, usize)>,
    seg_len: usize,
}

impl Drop for DmaMapping {
    fn drop(&mut self) {
        for &(iova, len) in self.segs.iter().rev() {
            if let Err(e) = self.dma.unmap(iova, len) {
                tracing::error!("DMA unmap of {len} bytes at iova {iova:#x} failed: {e}");
            }
        }
    }
}

/// A ready area: faulted in, accounted, locked, DMA mapped (when there is a device).
pub struct Area {
    // Field order is drop order: the reverse of creation.
    dma: Option<DmaMapping>,
    _locked: Locked,
    _charge: Charge,
    mem: Arc<AreaMemory>,
    id: u16,
    niov_shift: u32,
    num_niovs: u32,
}

impl std::fmt::Debug for Area {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Area")
            .field("len", &self.mem.len())
            .field("kind", &self.mem.kind())
            .field("rx_buf_len", &self.rx_buf_len())
            .field("num_niovs", &self.num_niovs)
            .field("mapped", &self.dma.is_some())
            .finish()
    }
}

impl Area {
    /// Create an area of `rx_buf_len` buffers; mapped through `dma` when there is a device.
    pub fn create(
        reg: AreaReg,
        rx_buf_len: u32,
        dma: Option<Arc<dyn DmaMap>>,
    ) -> Result<Self, AreaError> {
        Self::create_with_faults(reg, rx_buf_len, dma, &mut |_| Ok(()))
    }

    /// [`Area::create`] with a hook run before every step; an `Err` from it fails that step as
    /// if the step itself had failed. For tests of the all-or-nothing rule.
    #[doc(hidden)]
    pub fn create_with_faults(
        reg: AreaReg,
        rx_buf_len: u32,
        dma: Option<Arc<dyn DmaMap>>,
        inject: &mut dyn FnMut(Step) -> std::io::Result<()>,
    ) -> Result<Self, AreaError> {
        let page = mem::page_size();
        if !rx_buf_len.is_power_of_two() || (rx_buf_len as usize) < page || rx_buf_len > 1 << 30 {
            return Err(AreaError::BadBufLen(rx_buf_len));
        }
        if let AreaSource::Allocate { len, .. } = reg.memory {
            check_len(len, rx_buf_len)?;
        }
        let mem = match reg.memory {
            AreaSource::Allocate { kind, len } => {
                step(inject, Step::Allocate)?;
                AreaMemory::new(kind, len)?
            }
            AreaSource::Existing(m) => m,
        };
        let (ptr, len) = (mem.ptr(), mem.len());
        if ptr.as_ptr() as usize % page != 0 {
            return Err(AreaError::Misaligned { addr: ptr.as_ptr() as usize });
        }
        check_len(len, rx_buf_len)?;

        step(inject, Step::FaultIn)?;
        mem::populate_write(ptr, len).map_err(AreaError::FaultIn)?;

        step(inject, Step::Account)?;
        let charge = Charge::take(len as u64, reg.memlock)?;

        step(inject, Step::Lock)?;
        let locked = Locked::lock(ptr, len).map_err(AreaError::Lock)?;

        let dma = match dma {
            None => None,
            Some(dma) => Some(map_area(&mem, rx_buf_len, dma, inject)?),
        };
        Ok(Self {
            dma,
            _locked: locked,
            _charge: charge,
            mem: Arc::new(mem),
            id: 0,
            niov_shift: rx_buf_len.trailing_zeros(),
            num_niovs: (len >> rx_buf_len.trailing_zeros()) as u32,
        })
    }

    /// The memory, shared with whoever reads completions.
    pub fn memory(&self) -> &Arc<AreaMemory> {
        &self.mem
    }
    pub fn id(&self) -> u16 {
        self.id
    }
    pub fn len(&self) -> usize {
        self.mem.len()
    }
    pub fn is_empty(&self) -> bool {
        self.mem.is_empty()
    }
    pub fn rx_buf_len(&self) -> u32 {
        1 << self.niov_shift
    }
    pub fn niov_shift(&self) -> u32 {
        self.niov_shift
    }
    pub fn num_niovs(&self) -> u32 {
        self.num_niovs
    }
    /// Process address of niov `i`.
    #[inline]
    pub fn niov_ptr(&self, i: u32) -> *mut u8 {
        debug_assert!(i < self.num_niovs);
        // SAFETY: i < num_niovs, so the offset stays inside the mapping.
        unsafe { self.mem.ptr().as_ptr().add((i as usize) << self.niov_shift) }
    }
    /// The device's address (IOVA) of niov `i`; `None` when the area is not DMA mapped.
    #[inline]
    pub fn niov_dma(&self, i: u32) -> Option<u64> {
        self.dma_addr((i as usize) << self.niov_shift)
    }
    /// Process address of the byte at `offset` (not checked beyond a debug assertion).
    #[inline]
    pub fn ptr_at(&self, offset: usize) -> *mut u8 {
        debug_assert!(offset < self.mem.len());
        // SAFETY: callers stay inside the area (checked in debug builds).
        unsafe { self.mem.ptr().as_ptr().add(offset) }
    }
    /// The device's address of the byte at `offset`; `None` when unmapped or out of range.
    #[inline]
    pub fn dma_addr(&self, offset: usize) -> Option<u64> {
        if offset >= self.mem.len() {
            return None;
        }
        if let Some(iova) = self.contiguous_dma() {
            // One segment (the usual case): no division.
            return Some(iova + offset as u64);
        }
        let d = self.dma.as_ref()?;
        let (iova, _) = d.segs[offset / d.seg_len];
        Some(iova + (offset % d.seg_len) as u64)
    }
    /// The device's address of the area's first byte when the whole area is one mapping (the
    /// usual case): then niov `i` is at that plus `i << niov_shift`, with no lookup per buffer.
    #[inline]
    pub fn contiguous_dma(&self) -> Option<u64> {
        match self.dma.as_ref()?.segs[..] {
            [(iova, _)] => Some(iova),
            _ => None,
        }
    }
    /// Whether the area was DMA mapped for a device.
    pub fn is_mapped(&self) -> bool {
        self.dma.is_some()
    }
}

fn step(inject: &mut dyn FnMut(Step) -> std::io::Result<()>, s: Step) -> Result<(), AreaError> {
    inject(s).map_err(|e| AreaError::Injected(s, e))
}

fn check_len(len: usize, rx_buf_len: u32) -> Result<(), AreaError> {
    if len == 0 || len % rx_buf_len as usize != 0 {
        return Err(AreaError::NotBufMultiple { len, rx_buf_len });
    }
    let n = len / rx_buf_len as usize;
    if n >= u32::MAX as usize {
        return Err(AreaError::TooManyBuffers(n));
    }
    Ok(())
}

/// Map the whole area in segments of the mapper's size (rounded down to whole buffers, so no
/// buffer straddles two IOVA ranges). A failure unmaps the segments mapped so far.
fn map_area(
    mem: &AreaMemory,
    rx_buf_len: u32,
    dma: Arc<dyn DmaMap>,
    inject: &mut dyn FnMut(Step) -> std::io::Result<()>,
) -> Result<DmaMapping, AreaError> {
    let max = dma.max_segment();
    let seg_len = (max.min(mem.len()) / rx_buf_len as usize) * rx_buf_len as usize;
    if seg_len == 0 {
        return Err(AreaError::SegmentTooSmall { max, rx_buf_len });
    }
    let mut mapping = DmaMapping { dma, segs: Vec::with_capacity(mem.len().div_ceil(seg_len)), seg_len };
    let mut off = 0;
    while off < mem.len() {
        let k = mapping.segs.len();
        let len = seg_len.min(mem.len() - off);
        let fail = |source| AreaError::Map { segment: k, offset: off, len, source };
        step(inject, Step::Map(k))?;
        let seg = DmaSegment {
            // SAFETY: off < len of the mapping.
            vaddr: unsafe { mem.ptr().as_ptr().add(off) },
            len,
            fd: mem.fd().map(|fd| (fd, off as u64)),
        };
        let iova = mapping.dma.map(seg).map_err(fail)?;
        mapping.segs.push((iova, len));
        off += len;
    }
    Ok(mapping)
}

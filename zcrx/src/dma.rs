//! The boundary between an area and whatever device reads or writes it: a [`DmaMap`] makes
//! memory reachable by the device and says under which address (IOVA) the device sees it. VFIO
//! maps into an IOMMU, vhost-user shares the fd with the backend; NODEV has no mapper at all.

use std::os::fd::BorrowedFd;

/// One contiguous piece of area memory to map.
#[derive(Debug, Clone, Copy)]
pub struct DmaSegment<'a> {
    /// Process virtual address of the first byte.
    pub vaddr: *mut u8,
    pub len: usize,
    /// The file behind the memory and the offset of `vaddr` in it, when the memory is fd-backed
    /// (a transport that shares memory with another process needs it).
    pub fd: Option<(BorrowedFd<'a>, u64)>,
}

/// A mapping failed; the message comes from the device side.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DmaError(pub String);

impl DmaError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// Maps memory for a device. Implementations: the VFIO container, the vhost-user memory table,
/// test doubles that record or fail.
pub trait DmaMap: Send + Sync {
    /// Make the segment reachable by the device; return the IOVA of its first byte.
    fn map(&self, seg: DmaSegment<'_>) -> Result<u64, DmaError>;
    /// Undo one successful `map` (same IOVA and length).
    fn unmap(&self, iova: u64, len: usize) -> Result<(), DmaError>;
    /// The largest segment one `map` call takes; areas are mapped in pieces of at most this.
    fn max_segment(&self) -> usize {
        usize::MAX
    }
}

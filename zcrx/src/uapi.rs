//! Plain types mirroring the zcrx uapi (`include/uapi/linux/io_uring/zcrx.h`).
//!
//! The layouts are the kernel's so that code written against liburing's zcrx example maps
//! one to one; the values are ours where the kernel has no equivalent (marked below).

/// Offsets handed to the user carry the area id in the bits above this shift.
pub const AREA_SHIFT: u32 = 48;
/// Mask of the byte offset inside an area.
pub const AREA_MASK: u64 = (1 << AREA_SHIFT) - 1;
/// Largest refill queue the kernel accepts (bigger is an error unless clamping is asked for).
pub const MAX_RQ_ENTRIES: u32 = 32768;
/// Largest completion ring; ours (the kernel uses the io_uring CQ).
pub const MAX_CQ_ENTRIES: u32 = 1 << 20;
/// Cache line assumed by the ring layout: head, tail and entries each start on their own line.
pub const CACHE_LINE: usize = 64;

/// Registration flag: no device; every byte comes through the copy fallback (`ZCRX_REG_NODEV`).
pub const ZCRX_REG_NODEV: u32 = 1 << 1;
/// Registration flag (ours): round an oversized `rq_entries` down to the maximum instead of
/// failing, like `IORING_SETUP_CLAMP`.
pub const ZCRX_REG_CLAMP: u32 = 1 << 16;
/// Every flag this implementation knows; anything else is rejected.
pub const ZCRX_REG_KNOWN: u32 = ZCRX_REG_NODEV | ZCRX_REG_CLAMP;

/// Completion flag (ours, like AF_XDP's `XDP_PKT_CONTD`): more fragments of the same frame or
/// datagram follow in the next completion.
pub const ZCRX_CQE_F_CONTD: u32 = 1 << 0;

/// Event (mirrors `ZCRX_EVENT_COPY`): the copy fallback delivered data.
pub const ZCRX_EVENT_COPY: u32 = 1 << 0;
/// Event (mirrors `ZCRX_EVENT_ALLOC_FAIL`): a receive found no free buffer; data waited.
pub const ZCRX_EVENT_ALLOC_FAIL: u32 = 1 << 1;
/// Event (ours): the refill queue held entries that were rejected (see `invalid_rqes`).
pub const ZCRX_EVENT_INVALID_RQE: u32 = 1 << 2;

/// A refill queue entry: the user returns the buffer at `off` (area token | byte offset).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rqe {
    pub off: u64,
    pub len: u32,
    pub pad: u32,
}

/// A completion: `len` bytes at `off` (area token | byte offset) belong to the user now.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    pub off: u64,
    pub len: u32,
    pub flags: u32,
}

impl Cqe {
    /// Byte offset inside the area (the area token stripped).
    pub fn area_offset(&self) -> u64 {
        self.off & AREA_MASK
    }
    /// The area id carried in the top bits.
    pub fn area_id(&self) -> u16 {
        (self.off >> AREA_SHIFT) as u16
    }
    /// Another fragment of the same frame follows.
    pub fn is_continued(&self) -> bool {
        self.flags & ZCRX_CQE_F_CONTD != 0
    }
}

/// The token a user adds to a byte offset to name a buffer of area `id`.
pub fn area_token(id: u16) -> u64 {
    (id as u64) << AREA_SHIFT
}

/// Where the pieces of a ring live inside its memory (the `io_uring_zcrx_offsets` analog).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingOffsets {
    pub head: usize,
    pub tail: usize,
    pub entries: usize,
}

/// Interface queue registration (`io_uring_zcrx_ifq_reg` analog). Everything is validated
/// before any memory is touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfqReg {
    /// Device index; must be 0 with `ZCRX_REG_NODEV`.
    pub if_idx: u32,
    /// Device receive queue; must be 0 with `ZCRX_REG_NODEV`.
    pub if_rxq: u32,
    /// Refill queue entries, rounded up to a power of two.
    pub rq_entries: u32,
    /// Completion ring entries (0: twice `rq_entries`), rounded up to a power of two.
    pub cq_entries: u32,
    pub flags: u32,
    /// Buffer (niov) size: a power of two, at least the page size.
    pub rx_buf_len: u32,
    /// Must be zero.
    pub resv: [u64; 2],
}

impl Default for IfqReg {
    fn default() -> Self {
        Self {
            if_idx: 0,
            if_rxq: 0,
            rq_entries: 4096,
            cq_entries: 0,
            flags: ZCRX_REG_NODEV,
            rx_buf_len: 4096,
            resv: [0; 2],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<Rqe>(), 16);
        assert_eq!(std::mem::size_of::<Cqe>(), 16);
    }

    #[test]
    fn token_round_trip() {
        let c = Cqe { off: area_token(3) | 0x1000, len: 5, flags: ZCRX_CQE_F_CONTD };
        assert_eq!(c.area_id(), 3);
        assert_eq!(c.area_offset(), 0x1000);
        assert!(c.is_continued());
    }
}

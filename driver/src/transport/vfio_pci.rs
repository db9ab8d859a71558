//! The vfio-pci transport: a modern virtio-pci device (virtio 1.x, §4.1) bound to vfio-pci,
//! driven from userspace. The device DMAs through the IOMMU: "DMA mapping" an area means
//! `VFIO_IOMMU_MAP_DMA` of its virtual range at an IOVA from our allocator ([`crate::iova`]);
//! descriptors and the queue registers carry IOVAs.
//!
//! Everything VFIO goes through the `vfio-ioctls` crate (container, group, device fd, region
//! info with its sparse-mmap capability, DMA map/unmap, MSI-X eventfds). On top of it:
//!
//! - [`parse_virtio_caps`]: a pure parser of the PCI capability list that finds the virtio
//!   vendor capabilities (common, notify, ISR, device config). The device is untrusted: every
//!   pointer, length and BAR window is bounds-checked, loops in the list are detected;
//! - BAR access: the BARs holding those structures are mmapped where the region allows it (the
//!   sparse-mmap areas, or the whole region); a structure outside every mmappable area is reached
//!   with `pread`/`pwrite` on the region's part of the device fd. All accesses are volatile (or one
//!   syscall each) with the widths virtio requires; 64-bit registers as two 32-bit halves;
//! - the virtio-pci initialisation sequence: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK,
//!   queues, DRIVER_OK; polling by default (`queue_msix_vector = NO_VECTOR`), MSI-X through
//!   eventfds on request ([`VfioPci::enable_msix`]).
//!
//! Teardown: the device is reset (and bus mastering switched off) before anything is unmapped.
//! The DMA context ([`VfioDma`]) keeps the VFIO device (hence the group, hence the container's
//! IOMMU domain) alive, so areas that outlive the transport can still unmap their IOVAs.

use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioOps, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;
use zcrx::{DmaError, DmaMap, DmaSegment};

use super::{QueueAddrs, Transport, TransportError};
use crate::iova::{parse_reserved_regions, subtract, IovaAllocator};

/// Red Hat / virtio PCI vendor id.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern (virtio 1.x only) device ids are 0x1040 + the virtio device type.
pub const VIRTIO_PCI_MODERN_BASE: u16 = 0x1040;
/// virtio-net, modern.
pub const VIRTIO_NET_MODERN_ID: u16 = 0x1041;

/// Where the IOVAs come from when nothing better is known: above 1 GiB (IOVA 0 and the low
/// window some platforms reserve stay unused) and below 256 GiB, which every IOMMU we target
/// translates (QEMU's intel-iommu defaults to a 39-bit address width, 512 GiB). The group's
/// reserved regions (the MSI window at 0xfee00000 on x86) are cut out of it.
pub const DEFAULT_IOVA_WINDOW: Range<u64> = (1 << 30)..(256 << 30);
/// Mappings of at least this size get an IOVA aligned to it (huge IOMMU pages possible).
const LARGE_MAP_ALIGN: u64 = 2 << 20;
/// One VFIO mapping at most this long (the area maps bigger areas in pieces).
const MAX_SEGMENT: usize = 1 << 30;
/// virtio-pci: "no MSI-X vector".
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// Queues whose notify address we keep (virtio-net rx/tx and room to spare).
const MAX_QUEUES: usize = 64;
/// How long a reset may take before we call the device dead.
const RESET_TIMEOUT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// PCI capability list (pure)
// ---------------------------------------------------------------------------------------------

/// PCI config space header offsets and bits.
mod pci {
    pub const VENDOR_ID: usize = 0x00;
    pub const DEVICE_ID: usize = 0x02;
    pub const COMMAND: usize = 0x04;
    pub const STATUS: usize = 0x06;
    pub const CAP_PTR: usize = 0x34;
    /// First byte after the standard header: capabilities live at or above it.
    pub const HEADER_END: usize = 0x40;
    /// Standard (non-extended) config space size.
    pub const CFG_SPACE: usize = 256;
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
    pub const COMMAND_MEMORY: u16 = 1 << 1;
    pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
    pub const CAP_ID_VENDOR: u8 = 0x09;
}

/// virtio-pci capability types (virtio 1.x, 4.1.4).
pub mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI: u8 = 5;
}

/// `struct virtio_pci_cap` is 16 bytes; the notify capability adds `notify_off_multiplier`.
const VIRTIO_CAP_LEN: usize = 16;
const VIRTIO_NOTIFY_CAP_LEN: usize = 20;
/// The virtio 1.0 common configuration structure is 56 bytes (up to `queue_device`).
pub const COMMON_CFG_MIN_LEN: u32 = 0x38;

/// One virtio structure: `length` bytes at `offset` in BAR `bar`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapWindow {
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
}

/// The virtio structures of a modern virtio-pci function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioPciCaps {
    pub common: CapWindow,
    pub notify: CapWindow,
    pub notify_off_multiplier: u32,
    pub isr: CapWindow,
    /// Device-specific configuration; optional (devices without config space).
    pub device: Option<CapWindow>,
}

/// Why the capability list does not describe a usable modern virtio device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapError {
    #[error("config space of {0} bytes is shorter than the 64-byte header")]
    ShortHeader(usize),
    #[error("the device has no capability list (status bit 4 clear)")]
    NoCapList,
    #[error("capability pointer {ptr:#x} points into the header (below 0x40)")]
    PointerInHeader { ptr: usize },
    #[error("capability at {ptr:#x} ({need} bytes) runs past the end of config space ({len} bytes)")]
    Truncated { ptr: usize, need: usize, len: usize },
    #[error("the capability list loops (capability {ptr:#x} visited twice)")]
    Loop { ptr: usize },
    #[error("no usable virtio {what} capability{}", if .rejected.is_empty() { String::new() } else { format!(" (rejected: {})", .rejected.join("; ")) })]
    Missing { what: &'static str, rejected: Vec<String> },
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Check one candidate window against its BAR and the type's needs; `Err` says why not.
fn check_window(kind: u8, w: CapWindow, bar_sizes: &[u64; 6]) -> Result<(), String> {
    let bar = w.bar as usize;
    if bar > 5 {
        return Err(format!("BAR {bar} does not exist"));
    }
    let size = bar_sizes[bar];
    if size == 0 {
        return Err(format!("BAR {bar} is not implemented"));
    }
    let end = w.offset as u64 + w.length as u64;
    if end > size {
        return Err(format!("{:#x}+{:#x} is outside BAR {bar} ({size:#x} bytes)", w.offset, w.length));
    }
    let (min_len, align) = match kind {
        cfg_type::COMMON => (COMMON_CFG_MIN_LEN, 4),
        cfg_type::NOTIFY => (2, 2),
        cfg_type::ISR => (1, 1),
        _ => (0, 4),
    };
    if w.length < min_len {
        return Err(format!("length {:#x} is below the minimum {min_len:#x}", w.length));
    }
    if w.offset % align != 0 {
        return Err(format!("offset {:#x} is not {align}-byte aligned", w.offset));
    }
    Ok(())
}

/// Walk the capability list of `cfg` (a copy of the function's config space, at least the 64-byte
/// header; normally 256 bytes) and return the virtio structures, each the first usable instance of
/// its type. `bar_sizes` are the sizes of BARs 0-5 (0: not implemented); a structure must lie
/// inside its BAR. Nothing in `cfg` is trusted: pointers below the header, past the end, or
/// revisited, and lengths that overflow, are errors or skipped candidates, never panics.
pub fn parse_virtio_caps(cfg: &[u8], bar_sizes: &[u64; 6]) -> Result<VirtioPciCaps, CapError> {
    if cfg.len() < pci::HEADER_END {
        return Err(CapError::ShortHeader(cfg.len()));
    }
    let cfg = &cfg[..cfg.len().min(pci::CFG_SPACE)];
    if le16(cfg, pci::STATUS) & pci::STATUS_CAP_LIST == 0 {
        return Err(CapError::NoCapList);
    }
    let mut common = None;
    let mut notify: Option<(CapWindow, u32)> = None;
    let mut isr = None;
    let mut device = None;
    let mut rejected: [Vec<String>; 4] = Default::default();

    // Capabilities are dword aligned: 64 possible positions, each visited at most once.
    let mut visited = 0u64;
    let mut ptr = (cfg[pci::CAP_PTR] & 0xfc) as usize;
    while ptr != 0 {
        if ptr < pci::HEADER_END {
            return Err(CapError::PointerInHeader { ptr });
        }
        if ptr + 2 > cfg.len() {
            return Err(CapError::Truncated { ptr, need: 2, len: cfg.len() });
        }
        let bit = 1u64 << (ptr / 4);
        if visited & bit != 0 {
            return Err(CapError::Loop { ptr });
        }
        visited |= bit;
        let id = cfg[ptr];
        let next = (cfg[ptr + 1] & 0xfc) as usize;
        if id == pci::CAP_ID_VENDOR {
            if ptr + VIRTIO_CAP_LEN > cfg.len() {
                return Err(CapError::Truncated { ptr, need: VIRTIO_CAP_LEN, len: cfg.len() });
            }
            let cap_len = cfg[ptr + 2] as usize;
            let kind = cfg[ptr + 3];
            let w = CapWindow { bar: cfg[ptr + 4], offset: le32(cfg, ptr + 8), length: le32(cfg, ptr + 12) };
            let slot = match kind {
                cfg_type::COMMON => Some(0),
                cfg_type::NOTIFY => Some(1),
                cfg_type::ISR => Some(2),
                cfg_type::DEVICE => Some(3),
                _ => None, // PCI cfg access, shared memory, vendor-specific: not used.
            };
            if let Some(slot) = slot {
                let need = if kind == cfg_type::NOTIFY { VIRTIO_NOTIFY_CAP_LEN } else { VIRTIO_CAP_LEN };
                let verdict = if cap_len < need {
                    Err(format!("cap_len {cap_len} < {need}"))
                } else if ptr + need > cfg.len() {
                    Err(format!("ends past config space ({:#x} + {need})", ptr))
                } else {
                    check_window(kind, w, bar_sizes).and_then(|()| {
                        if kind == cfg_type::NOTIFY && le32(cfg, ptr + 16) % 2 != 0 {
                            Err(format!("odd notify_off_multiplier {}", le32(cfg, ptr + 16)))
                        } else {
                            Ok(())
                        }
                    })
                };
                match verdict {
                    Ok(()) => match kind {
                        cfg_type::COMMON if common.is_none() => common = Some(w),
                        cfg_type::NOTIFY if notify.is_none() => notify = Some((w, le32(cfg, ptr + 16))),
                        cfg_type::ISR if isr.is_none() => isr = Some(w),
                        cfg_type::DEVICE if device.is_none() => device = Some(w),
                        _ => {} // Later instances of a type we have: ignored (spec: use the first).
                    },
                    Err(why) => rejected[slot].push(format!("at {ptr:#x}: {why}")),
                }
            }
        }
        ptr = next;
    }
    let [rc, rn, ri, _] = rejected;
    let common = common.ok_or(CapError::Missing { what: "common configuration", rejected: rc })?;
    let (notify, notify_off_multiplier) = notify.ok_or(CapError::Missing { what: "notification", rejected: rn })?;
    let isr = isr.ok_or(CapError::Missing { what: "ISR", rejected: ri })?;
    Ok(VirtioPciCaps { common, notify, notify_off_multiplier, isr, device })
}

/// `0000:00:03.0` or `00:03.0` (domain 0 assumed); anything else, or a path, is refused.
pub fn normalize_bdf(s: &str) -> Result<String, TransportError> {
    let bad = || {
        TransportError::Unsupported(format!(
            "{s:?} is not a PCI address (expected domain:bus:device.function, e.g. 0000:00:03.0)"
        ))
    };
    let full = if s.matches(':').count() == 1 { format!("0000:{s}") } else { s.to_string() };
    let (dom_bus, devfn) = full.rsplit_once(':').ok_or_else(bad)?;
    let (dom, bus) = dom_bus.split_once(':').ok_or_else(bad)?;
    let (dev, func) = devfn.split_once('.').ok_or_else(bad)?;
    let hex =
        |p: &str, n: std::ops::RangeInclusive<usize>| n.contains(&p.len()) && p.bytes().all(|c| c.is_ascii_hexdigit());
    if !hex(dom, 4..=8) || !hex(bus, 2..=2) || !hex(dev, 2..=2) || !hex(func, 1..=1) {
        return Err(bad());
    }
    let d = u8::from_str_radix(dev, 16).map_err(|_| bad())?;
    let f = u8::from_str_radix(func, 16).map_err(|_| bad())?;
    if d > 0x1f || f > 7 {
        return Err(bad());
    }
    Ok(full.to_ascii_lowercase())
}

/// PCI functions with this vendor and device id, from sysfs (`0000:00:03.0`, ...), sorted.
pub fn find_pci_devices(vendor: u16, device: u16) -> Vec<String> {
    let read_id = |p: PathBuf| {
        std::fs::read_to_string(p).ok().and_then(|s| u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
    };
    let mut out: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            read_id(e.path().join("vendor")) == Some(vendor) && read_id(e.path().join("device")) == Some(device)
        })
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------------
// DMA: the container plus our IOVA allocator
// ---------------------------------------------------------------------------------------------

/// The DMA context of a [`VfioPci`]: maps areas into the container's IOMMU domain.
pub struct VfioDma {
    container: Arc<VfioContainer>,
    /// Holds the group in the container (the IOMMU domain lives as long as a group is attached),
    /// so unmapping keeps working after the transport is gone.
    _device: Arc<VfioDevice>,
    iova: Mutex<IovaAllocator>,
    page: usize,
}

impl std::fmt::Debug for VfioDma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioDma").field("iova", &*self.iova.lock().expect("iova lock")).finish()
    }
}

impl VfioDma {
    /// The IOVA allocator's state (windows, free bytes, live mappings), for diagnostics.
    pub fn iova_state(&self) -> IovaAllocator {
        self.iova.lock().expect("iova lock").clone()
    }
}

impl DmaMap for VfioDma {
    fn map(&self, seg: DmaSegment<'_>) -> Result<u64, DmaError> {
        let vaddr = seg.vaddr as usize;
        if seg.len == 0 || vaddr % self.page != 0 || seg.len % self.page != 0 {
            return Err(DmaError::new(format!(
                "VFIO maps whole pages: segment at {vaddr:#x} of {} bytes is not page aligned",
                seg.len
            )));
        }
        let len = seg.len as u64;
        let align = if len >= LARGE_MAP_ALIGN { LARGE_MAP_ALIGN } else { self.page as u64 };
        let mut iova_alloc = self.iova.lock().expect("iova lock");
        let iova = iova_alloc.alloc(len, align).map_err(|e| DmaError::new(format!("IOVA allocation: {e}")))?;
        // SAFETY: the memory belongs to a zcrx area (or the driver's queue memory), which only
        // ever accesses it through raw pointers (atomics, volatile, copies into user-visible
        // slices of completed buffers the device no longer owns) and unmaps it (DmaMapping's
        // drop) before the memory itself is unmapped.
        match unsafe { self.container.vfio_dma_map(iova, seg.len, seg.vaddr) } {
            Ok(()) => Ok(iova),
            Err(e) => {
                let _ = iova_alloc.free(iova, len);
                Err(DmaError::new(format!(
                    "VFIO_IOMMU_MAP_DMA of {len:#x} bytes at IOVA {iova:#x}: {}",
                    explain_map_error(&e)
                )))
            }
        }
    }

    fn unmap(&self, iova: u64, len: usize) -> Result<(), DmaError> {
        let mut iova_alloc = self.iova.lock().expect("iova lock");
        if !iova_alloc.is_allocated(iova, len as u64) {
            return Err(DmaError::new(format!("IOVA {iova:#x} (+{len:#x}) is not mapped")));
        }
        self.container
            .vfio_dma_unmap(iova, len)
            // On failure the range may still be mapped: keep its IOVAs out of circulation.
            .map_err(|e| DmaError::new(format!("VFIO_IOMMU_UNMAP_DMA at IOVA {iova:#x}: {e}")))?;
        iova_alloc.free(iova, len as u64).map_err(|e| DmaError::new(e.to_string()))
    }

    fn max_segment(&self) -> usize {
        MAX_SEGMENT
    }
}

fn explain_map_error(e: &VfioError) -> String {
    let errno = match e {
        VfioError::IommuDmaMap(s) => s.errno(),
        _ => 0,
    };
    let hint = match errno {
        libc::ENOMEM => " (pinned memory is charged to RLIMIT_MEMLOCK: raise it or run with CAP_IPC_LOCK)",
        libc::EINVAL => " (IOVA outside the IOMMU's valid ranges, or an unaligned range)",
        libc::ENOSPC => " (too many DMA mappings: vfio_iommu_type1 dma_entry_limit)",
        libc::EEXIST => " (IOVA already mapped)",
        _ => "",
    };
    format!("{e}{hint}")
}

// ---------------------------------------------------------------------------------------------
// BAR access
// ---------------------------------------------------------------------------------------------

/// One mmapped piece of a BAR region.
struct BarMmap {
    bar: u8,
    /// Offset of the mapping in the BAR.
    offset: u64,
    len: usize,
    ptr: NonNull<u8>,
}

/// A virtio structure inside a BAR: mmapped, or reached through the device fd.
#[derive(Clone, Copy)]
struct Window {
    /// Start of the structure in our address space, when it lies inside an mmapped area.
    ptr: Option<NonNull<u8>>,
    /// Device fd and the file offset of the structure's first byte (region offset + offset).
    fd: RawFd,
    file_off: u64,
    len: u64,
}

macro_rules! access {
    ($read:ident, $write:ident, $t:ty) => {
        /// Volatile (or one pread) access at `off`, `size_of::<T>()` wide; outside the window
        /// it reads all-ones (like an aborted PCI read) and drops writes.
        fn $read(&self, off: u64) -> $t {
            const W: u64 = std::mem::size_of::<$t>() as u64;
            if off.checked_add(W).is_none_or(|e| e > self.len) {
                debug_assert!(false, "read of {W} bytes at {off:#x} outside a window of {:#x}", self.len);
                return <$t>::MAX;
            }
            match self.ptr {
                // SAFETY: inside the mapping (checked above), naturally aligned (windows are
                // aligned and callers use aligned register offsets), MMIO: volatile.
                Some(p) => <$t>::from_le(unsafe { std::ptr::read_volatile(p.as_ptr().add(off as usize) as *const $t) }),
                None => {
                    let mut b = [0u8; W as usize];
                    // SAFETY: the device fd outlives every Window (VfioPci owns the device).
                    let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
                    match rustix::io::pread(fd, &mut b, self.file_off + off) {
                        Ok(n) if n == b.len() => <$t>::from_le_bytes(b),
                        _ => <$t>::MAX,
                    }
                }
            }
        }
        fn $write(&self, off: u64, v: $t) {
            const W: u64 = std::mem::size_of::<$t>() as u64;
            if off.checked_add(W).is_none_or(|e| e > self.len) {
                debug_assert!(false, "write of {W} bytes at {off:#x} outside a window of {:#x}", self.len);
                return;
            }
            match self.ptr {
                // SAFETY: as for reads.
                Some(p) => unsafe { std::ptr::write_volatile(p.as_ptr().add(off as usize) as *mut $t, v.to_le()) },
                None => {
                    // SAFETY: as for reads.
                    let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
                    if let Err(e) = rustix::io::pwrite(fd, &v.to_le_bytes(), self.file_off + off) {
                        tracing::warn!("BAR write at {:#x}: {e}", self.file_off + off);
                    }
                }
            }
        }
    };
}

impl Window {
    access!(r8, w8, u8);
    access!(r16, w16, u16);
    access!(r32, w32, u32);
}

/// Register offsets of `struct virtio_pci_common_cfg`.
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    pub const FAILED: u8 = 128;
}

// ---------------------------------------------------------------------------------------------
// The transport
// ---------------------------------------------------------------------------------------------

/// How to open a [`VfioPci`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioOptions {
    /// Where IOVAs come from (the IOMMU group's reserved regions are cut out of it).
    pub iova_window: Range<u64>,
    /// mmap the BARs holding the virtio structures where the region allows it (default). Off:
    /// every register access is a `pread`/`pwrite` on the device fd (slower; for devices or
    /// kernels that refuse the mmap, and to test that path).
    pub mmap_bars: bool,
}

impl Default for VfioOptions {
    fn default() -> Self {
        Self { iova_window: DEFAULT_IOVA_WINDOW, mmap_bars: true }
    }
}

/// A modern virtio-pci function bound to vfio-pci, driven by polling (MSI-X on request).
pub struct VfioPci {
    bdf: String,
    // Field order = drop order for what has no explicit step in Drop: the windows point into
    // `bars` (unmapped in Drop) and use `device`'s fd.
    common: Window,
    notify: Window,
    isr: Window,
    device_cfg: Option<Window>,
    notify_off_multiplier: u32,
    caps: VirtioPciCaps,
    /// Notify offset (in the notify window) per queue, once the queue is set up.
    queue_notify: Vec<Option<u64>>,
    num_queues: u16,
    bars: Vec<BarMmap>,
    dma: Arc<VfioDma>,
    device: Arc<VfioDevice>,
    msix: Option<Vec<EventFd>>,
    device_features: u64,
    started: bool,
    config_ok: bool,
}

// SAFETY: the raw pointers are MMIO mappings owned by this value (unmapped in Drop) and the fd
// of the device it owns; moving the value to another thread moves that ownership with it.
unsafe impl Send for VfioPci {}

impl std::fmt::Debug for VfioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPci")
            .field("bdf", &self.bdf)
            .field("caps", &self.caps)
            .field("num_queues", &self.num_queues)
            .field("mmapped", &self.bars.iter().map(|b| (b.bar, b.offset, b.len)).collect::<Vec<_>>())
            .field("dma", &self.dma)
            .finish()
    }
}

fn sysfs_link_name(p: &Path) -> Option<String> {
    std::fs::read_link(p).ok()?.file_name()?.to_str().map(str::to_owned)
}

fn bind_help(bdf: &str) -> String {
    format!(
        "bind it with: echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; \
         echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind (if a driver holds it); \
         echo {bdf} > /sys/bus/pci/drivers_probe"
    )
}

/// Check what can be checked before VFIO is asked, so the error says what to do.
fn preflight(bdf: &str, sys: &Path) -> Result<u32, TransportError> {
    let step = "open";
    if !sys.exists() {
        return Err(TransportError::device(step, format!("no PCI device {bdf} ({} does not exist)", sys.display())));
    }
    if !Path::new("/dev/vfio/vfio").exists() {
        return Err(TransportError::device(
            step,
            "/dev/vfio/vfio does not exist: load the vfio, vfio_iommu_type1 and vfio-pci modules \
             (VFIO also needs an IOMMU: intel_iommu=on / amd_iommu=on on the kernel command line)",
        ));
    }
    let group = sysfs_link_name(&sys.join("iommu_group")).and_then(|g| g.parse::<u32>().ok()).ok_or_else(|| {
        TransportError::device(
            step,
            format!("{bdf} has no IOMMU group: the IOMMU is off or absent (intel_iommu=on; in QEMU add -device intel-iommu)"),
        )
    })?;
    match sysfs_link_name(&sys.join("driver")) {
        Some(d) if d == "vfio-pci" => {}
        other => {
            let now = other.map(|d| format!("bound to {d}")).unwrap_or_else(|| "not bound to any driver".into());
            return Err(TransportError::device(step, format!("{bdf} is {now}, not vfio-pci; {}", bind_help(bdf))));
        }
    }
    if !Path::new(&format!("/dev/vfio/{group}")).exists() {
        return Err(TransportError::device(step, format!("/dev/vfio/{group} (IOMMU group of {bdf}) does not exist")));
    }
    Ok(group)
}

/// The devices of an IOMMU group and their drivers, for the "group not viable" message.
fn group_members(group: u32) -> String {
    let dir = format!("/sys/kernel/iommu_groups/{group}/devices");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let drv = sysfs_link_name(&e.path().join("driver")).unwrap_or_else(|| "no driver".into());
            format!("{name} ({drv})")
        })
        .collect();
    v.sort();
    v.join(", ")
}

fn open_error(bdf: &str, group: u32, e: VfioError) -> TransportError {
    let msg = match &e {
        VfioError::GroupViable => format!(
            "IOMMU group {group} is not viable: every device in it must be bound to vfio-pci or to no driver \
             (members: {}); {}",
            group_members(group),
            bind_help(bdf)
        ),
        VfioError::OpenGroup(io, _) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            format!("{e}: permission denied (run as root, or chown /dev/vfio/{group})")
        }
        VfioError::OpenGroup(io, _) if io.raw_os_error() == Some(libc::EBUSY) => {
            format!("{e}: the group is already open (by another process, or by an earlier VfioPci whose areas are still alive)")
        }
        VfioError::GroupGetDeviceFD(s) if s.errno() == libc::EBUSY => {
            format!("{e}: the device is in use")
        }
        VfioError::OpenContainer(_) => format!("{e} (is the vfio module loaded?)"),
        _ => e.to_string(),
    };
    TransportError::device("VFIO open", msg)
}

impl VfioPci {
    /// Open the virtio-pci function at `bdf` (`0000:00:03.0`), which must be bound to vfio-pci
    /// and alone in its viable IOMMU group; reset it and bring it to DRIVER (features next).
    pub fn open(bdf: &str) -> Result<Self, TransportError> {
        Self::open_with(bdf, &VfioOptions::default())
    }

    /// [`VfioPci::open`] with options (IOVA window, BAR mmap on/off).
    pub fn open_with(bdf: &str, opts: &VfioOptions) -> Result<Self, TransportError> {
        let window = opts.iova_window.clone();
        let bdf = normalize_bdf(bdf)?;
        let sys = PathBuf::from(format!("/sys/bus/pci/devices/{bdf}"));
        let group = preflight(&bdf, &sys)?;

        let container = Arc::new(VfioContainer::new(None).map_err(|e| open_error(&bdf, group, e))?);
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = Arc::new(VfioDevice::new(&sys, ops, false).map_err(|e| open_error(&bdf, group, e))?);
        let fd = device.as_raw_fd();

        // Config space, through the config region of the device fd.
        let cfg_size = device.get_region_size(VFIO_PCI_CONFIG_REGION_INDEX);
        let cfg_off = device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX);
        if cfg_size < pci::HEADER_END as u64 {
            return Err(TransportError::device("config space", format!("config region of {cfg_size} bytes")));
        }
        let mut cfg = vec![0u8; (cfg_size as usize).min(pci::CFG_SPACE)];
        // SAFETY: `device` owns the fd and outlives this borrow.
        let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
        let n = rustix::io::pread(bfd, &mut cfg[..], cfg_off)
            .map_err(|e| TransportError::device("config space read", e))?;
        cfg.truncate(n);
        if cfg.len() < pci::HEADER_END {
            return Err(TransportError::device("config space read", format!("only {n} bytes")));
        }
        let vendor = le16(&cfg, pci::VENDOR_ID);
        let devid = le16(&cfg, pci::DEVICE_ID);
        let virtio =
            vendor == VIRTIO_PCI_VENDOR && ((0x1000..=0x103f).contains(&devid) || (0x1040..=0x107f).contains(&devid));
        if !virtio {
            return Err(TransportError::Unsupported(format!(
                "{bdf} ({vendor:04x}:{devid:04x}) is not a virtio PCI device (vendor 1af4, device 1000-107f)"
            )));
        }

        let mut bar_sizes = [0u64; 6];
        for (i, s) in bar_sizes.iter_mut().enumerate() {
            *s = device.get_region_size(i as u32);
        }
        let caps = parse_virtio_caps(&cfg, &bar_sizes).map_err(|e| {
            TransportError::device("virtio capabilities", format!("{bdf} ({vendor:04x}:{devid:04x}): {e}"))
        })?;

        // Map what can be mapped of the BARs the structures live in.
        let mut wanted: Vec<CapWindow> = vec![caps.common, caps.notify, caps.isr];
        wanted.extend(caps.device);
        let mut bars = Vec::new();
        let mut seen = [false; 6];
        for w in &wanted {
            if opts.mmap_bars && !std::mem::replace(&mut seen[w.bar as usize], true) {
                map_bar(&device, w.bar, &mut bars);
            }
        }
        let window_of = |w: CapWindow| -> Result<Window, TransportError> {
            let flags = device.get_region_flags(w.bar as u32);
            let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
            let (start, end) = (w.offset as u64, w.offset as u64 + w.length as u64);
            let ptr =
                bars.iter().find(|m| m.bar == w.bar && m.offset <= start && end <= m.offset + m.len as u64).map(|m| {
                    // SAFETY: start - m.offset < m.len (checked just above).
                    unsafe { NonNull::new_unchecked(m.ptr.as_ptr().add((start - m.offset) as usize)) }
                });
            if ptr.is_none() && flags & rw != rw {
                return Err(TransportError::device(
                    "BAR access",
                    format!("BAR {} is neither mmappable there nor readable+writable (flags {flags:#x})", w.bar),
                ));
            }
            Ok(Window { ptr, fd, file_off: device.get_region_offset(w.bar as u32) + start, len: w.length as u64 })
        };
        let common = window_of(caps.common);
        let notify = window_of(caps.notify);
        let isr = window_of(caps.isr);
        let device_cfg = caps.device.map(window_of).transpose();
        let (common, notify, isr, device_cfg) = match (common, notify, isr, device_cfg) {
            (Ok(c), Ok(n), Ok(i), Ok(d)) => (c, n, i, d),
            (c, n, i, d) => {
                unmap_bars(&mut bars);
                return Err(c.err().or(n.err()).or(i.err()).or(d.err()).expect("one failed"));
            }
        };
        for m in &bars {
            tracing::debug!("{bdf}: BAR {} +{:#x} ({:#x} bytes) mmapped", m.bar, m.offset, m.len);
        }

        // Memory decoding and bus mastering on (the kernel driver's pci_set_master()).
        let cmd_off = cfg_off + pci::COMMAND as u64;
        let mut cmd = [0u8; 2];
        if rustix::io::pread(bfd, &mut cmd, cmd_off).map(|n| n == 2) != Ok(true) {
            unmap_bars(&mut bars);
            return Err(TransportError::device("PCI command", "cannot read the command register"));
        }
        let c = u16::from_le_bytes(cmd) | pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER;
        if let Err(e) = rustix::io::pwrite(bfd, &c.to_le_bytes(), cmd_off) {
            unmap_bars(&mut bars);
            return Err(TransportError::device("PCI command", e));
        }

        // IOVAs: the window minus what the IOMMU group reserves.
        let reserved = std::fs::read_to_string(format!("/sys/kernel/iommu_groups/{group}/reserved_regions"))
            .map(|t| parse_reserved_regions(&t))
            .unwrap_or_default();
        let page = zcrx::mem::page_size();
        let iova = match IovaAllocator::new(&subtract(std::slice::from_ref(&window), &reserved), page as u64) {
            Ok(a) => a,
            Err(e) => {
                unmap_bars(&mut bars);
                return Err(TransportError::device(
                    "IOVA window",
                    format!("{:#x}..{:#x}: {e}", window.start, window.end),
                ));
            }
        };
        tracing::debug!("{bdf}: IOMMU group {group}, reserved {reserved:x?}, IOVA windows {:x?}", iova.windows());
        let dma = Arc::new(VfioDma { container, _device: device.clone(), iova: Mutex::new(iova), page });

        let mut me = Self {
            bdf,
            common,
            notify,
            isr,
            device_cfg,
            notify_off_multiplier: caps.notify_off_multiplier,
            caps,
            queue_notify: Vec::new(),
            num_queues: 0,
            bars,
            dma,
            device,
            msix: None,
            device_features: 0,
            started: false,
            config_ok: false,
        };
        // From here on Drop cleans up.
        me.init()?;
        Ok(me)
    }

    /// Reset and announce ourselves: ACKNOWLEDGE, DRIVER.
    fn init(&mut self) -> Result<(), TransportError> {
        self.reset()?;
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::DRIVER);
        self.num_queues = self.common.r16(common::NUM_QUEUES);
        self.queue_notify = vec![None; (self.num_queues as usize).min(MAX_QUEUES)];
        // Polling: no config-change interrupt.
        self.common.w16(common::MSIX_CONFIG, VIRTIO_MSI_NO_VECTOR);
        let s = self.status();
        if s == 0xff || s & status::DEVICE_NEEDS_RESET != 0 {
            return Err(TransportError::device("init", format!("device status {s:#x} after ACKNOWLEDGE|DRIVER")));
        }
        Ok(())
    }

    /// The PCI address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// The virtio structures found in config space.
    pub fn caps(&self) -> &VirtioPciCaps {
        &self.caps
    }

    /// Queues the device has (`num_queues`).
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Which structures are reached through mmap (`true`) or pread/pwrite (`false`):
    /// (common, notify, isr, device).
    pub fn mmapped(&self) -> (bool, bool, bool, Option<bool>) {
        (
            self.common.ptr.is_some(),
            self.notify.ptr.is_some(),
            self.isr.ptr.is_some(),
            self.device_cfg.map(|w| w.ptr.is_some()),
        )
    }

    /// The DMA context with its concrete type (IOVA state for diagnostics).
    pub fn vfio_dma(&self) -> &Arc<VfioDma> {
        &self.dma
    }

    /// The raw device status byte.
    pub fn status(&self) -> u8 {
        self.common.r8(common::DEVICE_STATUS)
    }

    fn set_status(&self, bit: u8) {
        let s = self.status();
        self.common.w8(common::DEVICE_STATUS, s | bit);
    }

    /// Read the ISR status (clears it). Only meaningful with INTx; polling never needs it.
    pub fn read_isr(&self) -> u8 {
        self.isr.r8(0)
    }

    /// Write 0 to device_status and wait until the device reads back 0: from then on it does
    /// not touch queue or buffer memory.
    fn reset(&mut self) -> Result<(), TransportError> {
        self.started = false;
        self.config_ok = false;
        self.queue_notify.iter_mut().for_each(|q| *q = None);
        self.common.w8(common::DEVICE_STATUS, 0);
        let t0 = Instant::now();
        loop {
            let s = self.status();
            if s == 0 {
                return Ok(());
            }
            if t0.elapsed() > RESET_TIMEOUT {
                return Err(TransportError::Disconnected(format!(
                    "{}: device status {s:#x} still not 0 {RESET_TIMEOUT:?} after reset",
                    self.bdf
                )));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Deliver queue interrupts through MSI-X to eventfds (one per queue, vector q for queue q)
    /// instead of polling. Call before the queues are set up (i.e. before
    /// [`crate::register_ifq`]/[`crate::VirtioNet::start`]); the eventfds are [`Self::irq_fd`].
    pub fn enable_msix(&mut self, queues: u16) -> Result<(), TransportError> {
        if self.queue_notify.iter().any(Option::is_some) {
            return Err(TransportError::Unsupported("enable MSI-X before the queues are set up".into()));
        }
        let have = self.device.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX).map_or(0, |i| i.count);
        if queues == 0 || queues as u32 > have {
            return Err(TransportError::Unsupported(format!("{queues} MSI-X vectors wanted, the device has {have}")));
        }
        let fds = (0..queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(|e| TransportError::device("eventfd", e)))
            .collect::<Result<Vec<_>, _>>()?;
        self.device.enable_msix(fds.iter().collect()).map_err(|e| TransportError::device("VFIO MSI-X", e))?;
        self.msix = Some(fds);
        Ok(())
    }

    /// The eventfd signalled for queue `q` once MSI-X is enabled.
    pub fn irq_fd(&self, q: u16) -> Option<&EventFd> {
        self.msix.as_ref()?.get(q as usize)
    }

    fn select_queue(&mut self, q: u16) -> Result<(), TransportError> {
        if q >= self.num_queues || q as usize >= self.queue_notify.len() {
            return Err(TransportError::Unsupported(format!("queue {q}: the device has {} queues", self.num_queues)));
        }
        self.common.w16(common::QUEUE_SELECT, q);
        Ok(())
    }

    fn write64(&self, off: u64, v: u64) {
        self.common.w32(off, v as u32);
        self.common.w32(off + 4, (v >> 32) as u32);
    }
}

/// mmap the parts of BAR `bar` the region allows (sparse areas, or all of it); nothing on failure
/// (accesses then go through pread/pwrite).
fn map_bar(device: &VfioDevice, bar: u8, out: &mut Vec<BarMmap>) {
    let idx = bar as u32;
    let flags = device.get_region_flags(idx);
    let size = device.get_region_size(idx);
    if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || size == 0 {
        return;
    }
    let page = zcrx::mem::page_size() as u64;
    let sparse = device.get_region_caps(idx).into_iter().find_map(|c| match c {
        VfioRegionInfoCap::SparseMmap(s) => Some(s.areas),
        _ => None,
    });
    let areas: Vec<(u64, u64)> = match sparse {
        Some(a) => a.into_iter().map(|a| (a.offset, a.size)).collect(),
        None => vec![(0, size)],
    };
    let region_off = device.get_region_offset(idx);
    let mut prot = rustix::mm::ProtFlags::empty();
    if flags & VFIO_REGION_INFO_FLAG_READ != 0 {
        prot |= rustix::mm::ProtFlags::READ;
    }
    if flags & VFIO_REGION_INFO_FLAG_WRITE != 0 {
        prot |= rustix::mm::ProtFlags::WRITE;
    }
    // SAFETY: the device owns the fd for the duration of this call.
    let fd = unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) };
    for (off, len) in areas {
        let ok = len > 0
            && off % page == 0
            && off.checked_add(len).is_some_and(|e| e <= size)
            && usize::try_from(len).is_ok();
        if !ok {
            tracing::warn!("BAR {bar}: ignoring sparse mmap area {off:#x}+{len:#x} (region {size:#x})");
            continue;
        }
        // SAFETY: a fresh shared mapping of device memory; nothing else is at that address.
        let r = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len as usize,
                prot,
                rustix::mm::MapFlags::SHARED,
                fd,
                region_off + off,
            )
        };
        match r {
            Ok(p) => out.push(BarMmap {
                bar,
                offset: off,
                len: len as usize,
                ptr: NonNull::new(p as *mut u8).expect("mmap != NULL"),
            }),
            Err(e) => tracing::warn!("BAR {bar}: mmap of {off:#x}+{len:#x} failed ({e}); using pread/pwrite"),
        }
    }
}

fn unmap_bars(bars: &mut Vec<BarMmap>) {
    for m in bars.drain(..) {
        // SAFETY: our own mapping, no Window using it survives (callers drop them first or
        // never use them again).
        if let Err(e) = unsafe { rustix::mm::munmap(m.ptr.as_ptr().cast(), m.len) } {
            tracing::warn!("munmap of BAR {}: {e}", m.bar);
        }
    }
}

impl Transport for VfioPci {
    fn describe(&self) -> String {
        format!("vfio-pci {}", self.bdf)
    }

    fn device_features(&mut self) -> Result<u64, TransportError> {
        self.common.w32(common::DEVICE_FEATURE_SELECT, 0);
        let lo = self.common.r32(common::DEVICE_FEATURE);
        self.common.w32(common::DEVICE_FEATURE_SELECT, 1);
        let hi = self.common.r32(common::DEVICE_FEATURE);
        if lo == u32::MAX && hi == u32::MAX && self.status() == 0xff {
            return Err(TransportError::Disconnected(format!("{}: reads all-ones", self.bdf)));
        }
        self.device_features = (hi as u64) << 32 | lo as u64;
        Ok(self.device_features)
    }

    fn set_features(&mut self, features: u64) -> Result<(), TransportError> {
        let offered = self.device_features()?;
        if features & !offered != 0 {
            return Err(TransportError::Unsupported(format!(
                "features {:#x} were not offered (offer {offered:#x})",
                features & !offered
            )));
        }
        if self.status() & status::FEATURES_OK != 0 {
            // Negotiated before (e.g. after a reconnect without reset): start over.
            self.reset()?;
            self.set_status(status::ACKNOWLEDGE);
            self.set_status(status::DRIVER);
        }
        self.common.w32(common::DRIVER_FEATURE_SELECT, 0);
        self.common.w32(common::DRIVER_FEATURE, features as u32);
        self.common.w32(common::DRIVER_FEATURE_SELECT, 1);
        self.common.w32(common::DRIVER_FEATURE, (features >> 32) as u32);
        self.set_status(status::FEATURES_OK);
        let s = self.status();
        if s & status::FEATURES_OK == 0 {
            self.set_status(status::FAILED);
            return Err(TransportError::device(
                "FEATURES_OK",
                format!("the device refused features {features:#x} (status {s:#x})"),
            ));
        }
        self.config_ok = true;
        Ok(())
    }

    fn dma(&self) -> Arc<dyn DmaMap> {
        self.dma.clone()
    }

    fn translates_addresses(&self) -> bool {
        true
    }

    fn max_queue_size(&mut self, q: u16) -> Result<u16, TransportError> {
        self.select_queue(q)?;
        match self.common.r16(common::QUEUE_SIZE) {
            0 => Err(TransportError::device("queue_size", format!("queue {q} is not available (size 0)"))),
            n => Ok(n),
        }
    }

    fn setup_queue(&mut self, q: u16, a: &QueueAddrs) -> Result<(), TransportError> {
        if !self.config_ok {
            return Err(TransportError::Unsupported("set up queues after feature negotiation".into()));
        }
        self.select_queue(q)?;
        let max = self.common.r16(common::QUEUE_SIZE);
        if a.size == 0 || !a.size.is_power_of_two() || a.size > max {
            return Err(TransportError::device(
                "queue_size",
                format!("queue {q}: size {} (device maximum {max})", a.size),
            ));
        }
        if self.common.r16(common::QUEUE_ENABLE) != 0 {
            return Err(TransportError::device(
                "queue_enable",
                format!("queue {q} is already enabled (no reset since?)"),
            ));
        }
        let (desc, avail, used) = (a.desc.1, a.avail.1, a.used.1);
        if desc % 16 != 0 || avail % 2 != 0 || used % 4 != 0 {
            return Err(TransportError::device(
                "queue addresses",
                format!("misaligned: {desc:#x} {avail:#x} {used:#x}"),
            ));
        }
        // The notify address must lie inside the notify structure (2 bytes written there).
        let off = self.common.r16(common::QUEUE_NOTIFY_OFF) as u64 * self.notify_off_multiplier as u64;
        if off + 2 > self.notify.len {
            return Err(TransportError::device(
                "queue_notify_off",
                format!(
                    "queue {q}: notify offset {off:#x} is outside the notify structure ({:#x} bytes)",
                    self.notify.len
                ),
            ));
        }
        self.common.w16(common::QUEUE_SIZE, a.size);
        let vector = match &self.msix {
            Some(fds) if (q as usize) < fds.len() => q,
            _ => VIRTIO_MSI_NO_VECTOR,
        };
        self.common.w16(common::QUEUE_MSIX_VECTOR, vector);
        if vector != VIRTIO_MSI_NO_VECTOR && self.common.r16(common::QUEUE_MSIX_VECTOR) != vector {
            return Err(TransportError::device(
                "queue_msix_vector",
                format!("queue {q}: the device refused vector {vector}"),
            ));
        }
        self.write64(common::QUEUE_DESC, desc);
        self.write64(common::QUEUE_DRIVER, avail);
        self.write64(common::QUEUE_DEVICE, used);
        self.common.w16(common::QUEUE_ENABLE, 1);
        self.queue_notify[q as usize] = Some(off);
        Ok(())
    }

    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), TransportError> {
        let w = self.device_cfg.ok_or_else(|| {
            TransportError::Unsupported(format!("{} has no device configuration structure", self.bdf))
        })?;
        let off = offset as u64;
        if off + buf.len() as u64 > w.len {
            return Err(TransportError::device(
                "config read",
                format!("{}+{} is outside the device configuration ({} bytes)", offset, buf.len(), w.len),
            ));
        }
        // Single fields are read with their own width (2, 4; 8 as two aligned 4-byte halves),
        // anything else (byte arrays like the MAC) byte by byte. Retry while the generation moves.
        for _ in 0..16 {
            let gen = self.common.r8(common::CONFIG_GENERATION);
            match buf.len() {
                2 if off % 2 == 0 => buf.copy_from_slice(&w.r16(off).to_le_bytes()),
                4 if off % 4 == 0 => buf.copy_from_slice(&w.r32(off).to_le_bytes()),
                8 if off % 4 == 0 => {
                    buf[..4].copy_from_slice(&w.r32(off).to_le_bytes());
                    buf[4..].copy_from_slice(&w.r32(off + 4).to_le_bytes());
                }
                _ => buf.iter_mut().enumerate().for_each(|(i, b)| *b = w.r8(off + i as u64)),
            }
            if self.common.r8(common::CONFIG_GENERATION) == gen {
                return Ok(());
            }
        }
        Err(TransportError::device("config read", "config_generation kept changing"))
    }

    fn start(&mut self) -> Result<(), TransportError> {
        if !self.config_ok {
            return Err(TransportError::Unsupported("start before feature negotiation".into()));
        }
        self.set_status(status::DRIVER_OK);
        self.started = true;
        let s = self.status();
        if s == 0xff || s & (status::DEVICE_NEEDS_RESET | status::FAILED) != 0 || s & status::DRIVER_OK == 0 {
            return Err(TransportError::device("DRIVER_OK", format!("device status {s:#x}")));
        }
        Ok(())
    }

    fn notify(&self, q: u16) {
        if let Some(Some(off)) = self.queue_notify.get(q as usize) {
            self.notify.w16(*off, q);
        }
    }

    fn is_alive(&self) -> bool {
        let s = self.status();
        s != 0xff && s & status::DEVICE_NEEDS_RESET == 0 && (!self.started || s & status::DRIVER_OK != 0)
    }

    fn stop(&mut self) {
        if let Err(e) = self.reset() {
            // Keep it from DMAing at least: bus mastering off.
            tracing::error!("{e}; switching bus mastering off");
            self.bus_master(false);
        }
    }

    /// After the device asked for a reset (DEVICE_NEEDS_RESET) or was reset behind our back:
    /// reset it and start over at DRIVER; mappings stay.
    fn reconnect(&mut self) -> Result<(), TransportError> {
        self.bus_master(true);
        self.init()
    }
}

impl VfioPci {
    fn bus_master(&self, on: bool) {
        let off = self.device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX) + pci::COMMAND as u64;
        // SAFETY: `device` owns the fd.
        let fd = unsafe { BorrowedFd::borrow_raw(self.device.as_raw_fd()) };
        let mut b = [0u8; 2];
        if rustix::io::pread(fd, &mut b, off) != Ok(2) {
            return;
        }
        let c = u16::from_le_bytes(b);
        let c = if on { c | pci::COMMAND_BUS_MASTER | pci::COMMAND_MEMORY } else { c & !pci::COMMAND_BUS_MASTER };
        let _ = rustix::io::pwrite(fd, &c.to_le_bytes(), off);
    }
}

impl Drop for VfioPci {
    fn drop(&mut self) {
        // Device quiet first, then no DMA at all, then the MMIO mappings go. DMA mappings go
        // with the areas (VfioDma keeps the device and container for them).
        self.stop();
        self.bus_master(false);
        if self.msix.take().is_some() {
            let _ = self.device.disable_msix();
        }
        unmap_bars(&mut self.bars);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    /// A config space builder: header with the cap-list bit, caps appended at given offsets.
    struct Cfg(Vec<u8>);

    impl Cfg {
        fn new() -> Self {
            let mut c = vec![0u8; 256];
            c[0..2].copy_from_slice(&VIRTIO_PCI_VENDOR.to_le_bytes());
            c[2..4].copy_from_slice(&VIRTIO_NET_MODERN_ID.to_le_bytes());
            c[6..8].copy_from_slice(&pci::STATUS_CAP_LIST.to_le_bytes());
            Self(c)
        }
        fn first(mut self, at: u8) -> Self {
            self.0[pci::CAP_PTR] = at;
            self
        }
        /// A virtio cap at `at`, linked to `next`.
        #[allow(clippy::too_many_arguments)]
        fn vcap(mut self, at: usize, next: u8, kind: u8, bar: u8, off: u32, len: u32, mult: Option<u32>) -> Self {
            let c = &mut self.0;
            c[at] = pci::CAP_ID_VENDOR;
            c[at + 1] = next;
            c[at + 2] = if mult.is_some() { 20 } else { 16 };
            c[at + 3] = kind;
            c[at + 4] = bar;
            c[at + 8..at + 12].copy_from_slice(&off.to_le_bytes());
            c[at + 12..at + 16].copy_from_slice(&len.to_le_bytes());
            if let Some(m) = mult {
                c[at + 16..at + 20].copy_from_slice(&m.to_le_bytes());
            }
            self
        }
        /// Some other capability (MSI-X, id 0x11) at `at`.
        fn other(mut self, at: usize, next: u8) -> Self {
            self.0[at] = 0x11;
            self.0[at + 1] = next;
            self
        }
    }

    /// What QEMU's virtio-net-pci (modern) looks like: MSI-X first, then the virtio caps, all
    /// in BAR 4 (16 KiB), 4 KiB apart.
    fn qemu_like() -> Cfg {
        Cfg::new()
            .first(0x98)
            .other(0x98, 0x84)
            .vcap(0x84, 0x70, cfg_type::PCI, 0, 0, 0, None)
            .vcap(0x70, 0x60, cfg_type::NOTIFY, 4, 0x3000, 0x1000, Some(4))
            .vcap(0x60, 0x50, cfg_type::DEVICE, 4, 0x2000, 0x1000, None)
            .vcap(0x50, 0x40, cfg_type::ISR, 4, 0x1000, 0x1000, None)
            .vcap(0x40, 0x00, cfg_type::COMMON, 4, 0x0000, 0x1000, None)
    }

    const BARS: [u64; 6] = [0, 0x1000, 0, 0, 0x4000, 0];

    #[test]
    fn parses_a_qemu_like_device() {
        let caps = parse_virtio_caps(&qemu_like().0, &BARS).unwrap();
        assert_eq!(caps.common, CapWindow { bar: 4, offset: 0, length: 0x1000 });
        assert_eq!(caps.isr, CapWindow { bar: 4, offset: 0x1000, length: 0x1000 });
        assert_eq!(caps.device, Some(CapWindow { bar: 4, offset: 0x2000, length: 0x1000 }));
        assert_eq!(caps.notify, CapWindow { bar: 4, offset: 0x3000, length: 0x1000 });
        assert_eq!(caps.notify_off_multiplier, 4);
    }

    #[test]
    fn device_config_is_optional() {
        let c = Cfg::new()
            .first(0x40)
            .vcap(0x40, 0x50, cfg_type::COMMON, 0, 0, 0x38, None)
            .vcap(0x50, 0x60, cfg_type::ISR, 0, 0x40, 1, None)
            .vcap(0x60, 0, cfg_type::NOTIFY, 0, 0x80, 2, Some(0));
        let caps = parse_virtio_caps(&c.0, &[0x100, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(caps.device, None);
        assert_eq!(caps.notify_off_multiplier, 0);
    }

    #[test]
    fn first_usable_instance_wins() {
        // Two common caps: the first points outside its BAR and is skipped, the second is used;
        // a third (valid) one is ignored.
        let c = Cfg::new()
            .first(0x40)
            .vcap(0x40, 0x50, cfg_type::COMMON, 4, 0x3f00, 0x1000, None)
            .vcap(0x50, 0x60, cfg_type::COMMON, 4, 0x0000, 0x1000, None)
            .vcap(0x60, 0x70, cfg_type::COMMON, 4, 0x2000, 0x1000, None)
            .vcap(0x70, 0x80, cfg_type::ISR, 4, 0x1000, 0x1000, None)
            .vcap(0x80, 0, cfg_type::NOTIFY, 4, 0x3000, 0x1000, Some(4));
        let caps = parse_virtio_caps(&c.0, &BARS).unwrap();
        assert_eq!(caps.common.offset, 0);
    }

    #[test]
    fn header_and_list_problems() {
        assert_eq!(parse_virtio_caps(&[0u8; 63], &BARS), Err(CapError::ShortHeader(63)));
        let mut c = qemu_like();
        c.0[6] = 0;
        assert_eq!(parse_virtio_caps(&c.0, &BARS), Err(CapError::NoCapList));
        // Pointer into the header.
        assert_eq!(parse_virtio_caps(&Cfg::new().first(0x20).0, &BARS), Err(CapError::PointerInHeader { ptr: 0x20 }));
        // Empty list: nothing found.
        assert!(matches!(
            parse_virtio_caps(&Cfg::new().0, &BARS),
            Err(CapError::Missing { what: "common configuration", .. })
        ));
        // Low two bits of pointers are ignored (reserved).
        let c = qemu_like().first(0x9b);
        assert!(parse_virtio_caps(&c.0, &BARS).is_ok());
    }

    #[test]
    fn truncated_config_space() {
        let full = qemu_like().0;
        // Cut in the middle of a virtio cap.
        let c = Cfg::new().first(0x40).vcap(0x40, 0, cfg_type::COMMON, 4, 0, 0x1000, None);
        let e = parse_virtio_caps(&c.0[..0x48], &BARS).unwrap_err();
        assert_eq!(e, CapError::Truncated { ptr: 0x40, need: 16, len: 0x48 });
        // Cut before the first cap's header: the pointer runs past the end.
        let e = parse_virtio_caps(&full[..0x90], &BARS).unwrap_err();
        assert_eq!(e, CapError::Truncated { ptr: 0x98, need: 2, len: 0x90 });
        // A notify cap at the very end without room for its multiplier: rejected, not read.
        let c = Cfg::new()
            .first(0x40)
            .vcap(0x40, 0x50, cfg_type::COMMON, 4, 0, 0x1000, None)
            .vcap(0x50, 0xf0, cfg_type::ISR, 4, 0x1000, 0x1000, None)
            .vcap(0xf0, 0, cfg_type::NOTIFY, 4, 0x3000, 0x1000, None);
        let mut b = c.0;
        b[0xf2] = 20; // claims 20 bytes, but only 16 remain
        match parse_virtio_caps(&b, &BARS) {
            Err(CapError::Missing { what: "notification", rejected }) => {
                assert!(rejected[0].contains("past config space"), "{rejected:?}")
            }
            other => panic!("{other:?}"),
        }
        // Longer config spaces (PCIe, 4 KiB) are fine: only the first 256 bytes are walked.
        let mut big = qemu_like().0;
        big.resize(4096, 0xff);
        assert!(parse_virtio_caps(&big, &BARS).is_ok());
    }

    #[test]
    fn looping_lists_terminate() {
        // Self loop.
        let c = Cfg::new().first(0x40).other(0x40, 0x40);
        assert_eq!(parse_virtio_caps(&c.0, &BARS), Err(CapError::Loop { ptr: 0x40 }));
        // Longer cycle through valid virtio caps.
        let c = qemu_like();
        let mut b = c.0;
        b[0x41] = 0x84; // common -> back to the PCI cap
        assert_eq!(parse_virtio_caps(&b, &BARS), Err(CapError::Loop { ptr: 0x84 }));
        // Every possible cycle: each byte pattern makes it end (no hang, no panic).
        for start in (0x40..0x100).step_by(4) {
            let mut c = Cfg::new().first(start as u8);
            for p in (0x40..0x100).step_by(4) {
                c = c.other(p, ((p + 0x1c) % 0xc0 + 0x40) as u8);
            }
            assert!(matches!(parse_virtio_caps(&c.0, &BARS), Err(CapError::Loop { .. })));
        }
    }

    #[test]
    fn caps_outside_their_bar_are_rejected() {
        let cases: &[(u8, u32, u32, &str)] = &[
            (4, 0x3800, 0x1000, "outside BAR 4"),
            (4, 0xffff_ff00, 0x1000, "outside BAR 4"), // offset + length overflows u32
            (4, 0x0000, 0xffff_ffff, "outside BAR 4"),
            (2, 0x0000, 0x1000, "BAR 2 is not implemented"),
            (6, 0x0000, 0x1000, "BAR 6 does not exist"),
            (0xff, 0x0000, 0x1000, "BAR 255 does not exist"),
            (4, 0x0002, 0x1000, "not 4-byte aligned"),
            (4, 0x0000, 0x10, "below the minimum"),
        ];
        for &(bar, off, len, why) in cases {
            let c = Cfg::new()
                .first(0x40)
                .vcap(0x40, 0x50, cfg_type::COMMON, bar, off, len, None)
                .vcap(0x50, 0x60, cfg_type::ISR, 4, 0x1000, 0x1000, None)
                .vcap(0x60, 0, cfg_type::NOTIFY, 4, 0x3000, 0x1000, Some(4));
            match parse_virtio_caps(&c.0, &BARS) {
                Err(CapError::Missing { what: "common configuration", rejected }) => {
                    assert_eq!(rejected.len(), 1);
                    assert!(rejected[0].contains(why), "{why}: {rejected:?}");
                }
                other => panic!("{bar} {off:#x} {len:#x}: {other:?}"),
            }
        }
        // A notify structure with an odd multiplier or short cap_len is not usable.
        for (mult, cap_len) in [(3u32, 20u8), (4, 16)] {
            let mut c = Cfg::new()
                .first(0x40)
                .vcap(0x40, 0x50, cfg_type::COMMON, 4, 0, 0x1000, None)
                .vcap(0x50, 0x60, cfg_type::ISR, 4, 0x1000, 0x1000, None)
                .vcap(0x60, 0, cfg_type::NOTIFY, 4, 0x3000, 0x1000, Some(mult));
            c.0[0x62] = cap_len;
            assert!(
                matches!(parse_virtio_caps(&c.0, &BARS), Err(CapError::Missing { what: "notification", .. })),
                "{mult} {cap_len}"
            );
        }
        // The message names the reasons.
        let c = Cfg::new().first(0x40).vcap(0x40, 0, cfg_type::COMMON, 4, 0x3800, 0x1000, None);
        let msg = parse_virtio_caps(&c.0, &BARS).unwrap_err().to_string();
        assert!(msg.contains("rejected") && msg.contains("0x40"), "{msg}");
    }

    #[test]
    fn random_config_spaces_never_panic() {
        // A cheap fuzz: xorshift bytes with the cap-list bit set.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut c = vec![0u8; 256];
            for b in c.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            c[6] |= 0x10;
            // Bias towards vendor caps so the virtio path is exercised.
            for p in (0x40..0x100).step_by(4) {
                if c[p] & 1 == 0 {
                    c[p] = pci::CAP_ID_VENDOR;
                }
            }
            let sizes = [0x4000, MB, 0, 0x100, 0x4000, 1];
            if let Ok(caps) = parse_virtio_caps(&c, &sizes) {
                for w in [caps.common, caps.notify, caps.isr].into_iter().chain(caps.device) {
                    assert!(w.offset as u64 + w.length as u64 <= sizes[w.bar as usize]);
                }
                assert!(caps.common.length >= COMMON_CFG_MIN_LEN);
            }
        }
    }

    #[test]
    fn bdf_forms() {
        assert_eq!(normalize_bdf("0000:00:03.0").unwrap(), "0000:00:03.0");
        assert_eq!(normalize_bdf("00:1F.7").unwrap(), "0000:00:1f.7");
        assert_eq!(normalize_bdf("10000:af:00.1").unwrap(), "10000:af:00.1");
        for bad in [
            "",
            "0000:00:03",
            "0000:00:20.0",
            "0000:00:03.8",
            "../../x:00:03.0",
            "0000:00:03.0/..",
            "00:3.0",
            "0000/00:03.0",
        ] {
            assert!(normalize_bdf(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn open_explains_a_missing_device() {
        let e = VfioPci::open("0000:ff:1f.7").unwrap_err().to_string();
        assert!(e.contains("no PCI device 0000:ff:1f.7") || e.contains("/dev/vfio"), "{e}");
        let e = VfioPci::open("not-a-bdf").unwrap_err().to_string();
        assert!(e.contains("not a PCI address"), "{e}");
    }
}

//! Memory mappings: the one place that calls mmap/munmap, so every other module holds memory
//! through an owner that unmaps it exactly once.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use rustix::mm::{self, MapFlags, ProtFlags};

/// The system page size.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// An owned `mmap` region, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is plain memory; who may touch which bytes is decided by its users.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Private anonymous read-write memory, optionally populated up front (`MAP_POPULATE`) so
    /// the first touch on the data path does not fault.
    pub fn anonymous(len: usize, populate: bool) -> io::Result<Self> {
        let mut flags = MapFlags::PRIVATE;
        if populate {
            flags |= MapFlags::POPULATE;
        }
        // SAFETY: a fresh anonymous mapping aliases nothing.
        let ptr = unsafe {
            mm::mmap_anonymous(std::ptr::null_mut(), len, ProtFlags::READ | ProtFlags::WRITE, flags)
        }?;
        Ok(Self { ptr: NonNull::new(ptr.cast()).expect("mmap returned null"), len })
    }

    /// A shared read-write mapping of `len` bytes of `fd` from offset 0.
    pub fn shared_fd(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh mapping of a file we own; nothing else in this process aliases it.
        let ptr = unsafe {
            mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }?;
        Ok(Self { ptr: NonNull::new(ptr.cast()).expect("mmap returned null"), len })
    }

    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range and nobody can use it after the owner is gone.
        if let Err(e) = unsafe { mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            tracing::error!("munmap({:p}, {}) failed: {e}", self.ptr, self.len);
        }
    }
}

/// An fd-backed memory object (memfd), kept open so it can be shared with a device process.
pub(crate) fn memfd(name: &str, len: usize, hugetlb: Option<usize>) -> io::Result<OwnedFd> {
    use rustix::fs::MemfdFlags;
    let mut flags = MemfdFlags::CLOEXEC;
    if let Some(huge) = hugetlb {
        flags |= MemfdFlags::HUGETLB;
        flags |= match huge {
            0x20_0000 => MemfdFlags::HUGE_2MB,
            0x4000_0000 => MemfdFlags::HUGE_1GB,
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "huge page size must be 2 MiB or 1 GiB")),
        };
    }
    let fd = rustix::fs::memfd_create(name, flags)?;
    rustix::fs::ftruncate(fd.as_fd(), len as u64)?;
    Ok(fd)
}

/// Fault every page of `[ptr, ptr + len)` in for writing now, returning an error (never a
/// SIGBUS) when the memory cannot be had, e.g. hugetlb pages that ran out.
pub(crate) fn populate_write(ptr: NonNull<u8>, len: usize) -> io::Result<()> {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    // SAFETY: the range is a mapping we own; populating does not change its contents.
    let r = unsafe { libc::madvise(ptr.as_ptr().cast(), len, MADV_POPULATE_WRITE) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Locked (mlock'ed) pages, unlocked on drop.
#[derive(Debug)]
pub(crate) struct Locked {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: only the address range is kept, to unlock it.
unsafe impl Send for Locked {}
// SAFETY: as above.
unsafe impl Sync for Locked {}

impl Locked {
    pub(crate) fn lock(ptr: NonNull<u8>, len: usize) -> io::Result<Self> {
        // SAFETY: mlock only changes residency of a range we own.
        unsafe { mm::mlock(ptr.as_ptr().cast(), len) }?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: the range was locked by us and is still mapped (the mapping outlives this).
        if let Err(e) = unsafe { mm::munlock(self.ptr.as_ptr().cast(), self.len) } {
            tracing::error!("munlock failed: {e}");
        }
    }
}

/// Bytes of this process's memory that are mlock'ed (`VmLck` in /proc/self/status).
pub fn process_locked_bytes() -> io::Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| io::Error::other("no VmLck in /proc/self/status"))
}

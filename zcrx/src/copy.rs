//! The copy fallback: bytes from a kernel socket (or any byte source) land in free buffers and
//! are completed exactly like zero-copy data. This is all of NODEV mode.
//!
//! Back pressure never loses data: buffers and completion slots are reserved *before* the
//! source is read, so when either runs out the bytes simply stay in the socket.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::ifq::Ifq;
use crate::uapi::{ZCRX_CQE_F_CONTD, ZCRX_EVENT_COPY};

/// What one copy call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOutcome {
    /// Data was completed.
    Data { completions: u32, bytes: usize },
    /// The source had nothing (non-blocking source).
    WouldBlock,
    /// The source is at end of stream.
    Eof,
    /// No free buffer: return buffers and `flush_rq`. The data waits in the source.
    NoBuffer,
    /// The completion ring is full: consume completions. The data waits in the source.
    NoCqSpace,
}

/// Preallocated syscall arguments, so a copy does not allocate in steady state.
#[derive(Default)]
pub(crate) struct Scratch {
    iov: Vec<libc::iovec>,
    niovs: Vec<u32>,
    msgs: Vec<libc::mmsghdr>,
    addrs: Vec<libc::sockaddr_storage>,
}

// SAFETY: the raw pointers in the iovecs point into the ifq's own area and are only used by the
// thread that owns the ifq, during one call.
unsafe impl Send for Scratch {}

/// Limits of one copy call.
#[derive(Debug, Clone, Copy)]
pub struct CopyLimits {
    /// Buffers filled by one stream read (readv); 16 x 4 KiB = 64 KiB per syscall by default.
    pub max_bufs: usize,
    /// Datagrams taken by one recvmmsg.
    pub max_datagrams: usize,
    /// Largest datagram expected; each datagram gets enough buffers for this many bytes.
    pub max_datagram_len: usize,
}

impl Default for CopyLimits {
    fn default() -> Self {
        Self { max_bufs: 16, max_datagrams: 32, max_datagram_len: 65535 }
    }
}

impl Ifq {
    /// Buffers we may fill now: limited by free buffers and completion slots. Zero means back
    /// pressure, which is counted and signalled.
    fn reserve(&mut self, want: usize) -> Result<usize, CopyOutcome> {
        self.poll_flush_request();
        let free = self.free_count() as usize;
        let space = self.cq_space() as usize;
        if free == 0 {
            self.note_no_buffer(false);
            return Err(CopyOutcome::NoBuffer);
        }
        if space == 0 {
            self.note_no_buffer(true);
            return Err(CopyOutcome::NoCqSpace);
        }
        Ok(want.min(free).min(space))
    }

    /// One `readv` from a stream (TCP socket, pipe, file) into up to `max_bufs` free buffers;
    /// one completion per buffer filled.
    pub fn copy_stream(&mut self, fd: BorrowedFd<'_>, limits: &CopyLimits) -> io::Result<CopyOutcome> {
        let n = match self.reserve(limits.max_bufs.clamp(1, 1024)) {
            Ok(n) => n,
            Err(o) => return Ok(o),
        };
        let buf_len = self.area().rx_buf_len() as usize;
        let mut s = std::mem::take(&mut self.scratch);
        self.take_iovs(&mut s, n);
        // SAFETY: every iovec names a whole posted buffer inside the area; posted buffers are
        // written by nobody else.
        let r = unsafe { libc::readv(fd.as_raw_fd(), s.iov.as_ptr(), n as libc::c_int) };
        let res = if r < 0 {
            self.read_failed(&s.niovs, io::Error::last_os_error())
        } else {
            let bytes = r as usize;
            let mut left = bytes;
            let mut completions = 0;
            for &i in &s.niovs {
                if left == 0 {
                    self.put_back(i);
                    continue;
                }
                let len = left.min(buf_len);
                left -= len;
                // Cannot fail: slots were reserved.
                let _ = self.complete(i, 0, len as u32, 0, true);
                completions += 1;
            }
            self.finish_copy(completions);
            Ok(if bytes == 0 { CopyOutcome::Eof } else { CopyOutcome::Data { completions, bytes } })
        };
        self.scratch = s;
        res
    }

    /// One `recvmmsg` from a datagram socket: each datagram becomes one completion, or several
    /// marked `ZCRX_CQE_F_CONTD` when it is longer than a buffer. `on_datagram` sees each
    /// datagram's source address and real length, in completion order; a datagram longer than
    /// `max_datagram_len` loses its tail in the kernel and is counted in `truncated`.
    pub fn copy_datagrams(
        &mut self,
        fd: BorrowedFd<'_>,
        limits: &CopyLimits,
        mut on_datagram: impl FnMut(Option<SocketAddr>, usize),
    ) -> io::Result<CopyOutcome> {
        let buf_len = self.area().rx_buf_len() as usize;
        let frags = limits.max_datagram_len.div_ceil(buf_len).max(1);
        let want = limits.max_datagrams.clamp(1, 1024) * frags;
        let n = match self.reserve(want) {
            Ok(n) => n,
            Err(o) => return Ok(o),
        };
        if n < frags {
            // Not enough for one whole datagram: waiting beats truncating.
            let cq_short = self.free_count() as usize >= frags;
            self.note_no_buffer(cq_short);
            return Ok(if cq_short { CopyOutcome::NoCqSpace } else { CopyOutcome::NoBuffer });
        }
        let nmsgs = n / frags;
        let mut s = std::mem::take(&mut self.scratch);
        self.take_iovs(&mut s, nmsgs * frags);
        // SAFETY: zeroed mmsghdr and sockaddr_storage are valid values (plain C structs).
        s.msgs.resize_with(nmsgs, || unsafe { std::mem::zeroed() });
        // SAFETY: as above.
        s.addrs.resize_with(nmsgs, || unsafe { std::mem::zeroed() });
        for m in 0..nmsgs {
            let h = &mut s.msgs[m].msg_hdr;
            // SAFETY: m * frags + frags <= iov.len(), so the pointer stays in the vector.
            h.msg_iov = unsafe { s.iov.as_mut_ptr().add(m * frags) };
            h.msg_iovlen = frags;
            h.msg_name = (&mut s.addrs[m] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            h.msg_flags = 0;
            s.msgs[m].msg_len = 0;
        }
        // SAFETY: every header points at iovecs naming posted buffers and at its own address
        // slot; all live in `s` for the duration of the call.
        let r = unsafe {
            // MSG_TRUNC: msg_len reports a datagram's real length even when it did not fit.
            libc::recvmmsg(fd.as_raw_fd(), s.msgs.as_mut_ptr(), nmsgs as u32, libc::MSG_DONTWAIT | libc::MSG_TRUNC, std::ptr::null_mut())
        };
        let res = if r < 0 {
            self.read_failed(&s.niovs, io::Error::last_os_error())
        } else {
            let got = r as usize;
            let (mut completions, mut bytes) = (0, 0);
            for m in 0..nmsgs {
                let bufs = &s.niovs[m * frags..(m + 1) * frags];
                if m >= got {
                    bufs.iter().for_each(|&i| self.put_back(i));
                    continue;
                }
                let real = s.msgs[m].msg_len as usize;
                let len = real.min(frags * buf_len);
                if len < real {
                    self.note_truncated();
                }
                bytes += len;
                on_datagram(sockaddr_to_std(&s.addrs[m], s.msgs[m].msg_hdr.msg_namelen), real);
                let used = len.div_ceil(buf_len).max(1);
                let mut left = len;
                for (k, &i) in bufs.iter().enumerate() {
                    if k >= used {
                        self.put_back(i);
                        continue;
                    }
                    let l = left.min(buf_len);
                    left -= l;
                    let flags = if k + 1 < used { ZCRX_CQE_F_CONTD } else { 0 };
                    let _ = self.complete(i, 0, l as u32, flags, true);
                    completions += 1;
                }
            }
            self.finish_copy(completions);
            Ok(CopyOutcome::Data { completions, bytes })
        };
        self.scratch = s;
        res
    }

    /// One `read` from any byte source into one free buffer. The generic (and slowest) path.
    pub fn copy_from_reader<R: Read + ?Sized>(&mut self, r: &mut R) -> io::Result<CopyOutcome> {
        if let Err(o) = self.reserve(1) {
            return Ok(o);
        }
        let i = self.take_free().expect("reserved");
        let len = self.area().rx_buf_len() as usize;
        // SAFETY: buffer `i` is posted: inside the area and written by nobody else.
        let buf = unsafe { std::slice::from_raw_parts_mut(self.area().niov_ptr(i), len) };
        match r.read(buf) {
            Ok(0) => {
                self.put_back(i);
                Ok(CopyOutcome::Eof)
            }
            Ok(n) => {
                let _ = self.complete(i, 0, n as u32, 0, true);
                self.finish_copy(1);
                Ok(CopyOutcome::Data { completions: 1, bytes: n })
            }
            Err(e) => self.read_failed(&[i], e),
        }
    }

    /// Take `n` free buffers into the scratch iovecs (the caller reserved them).
    fn take_iovs(&mut self, s: &mut Scratch, n: usize) {
        let buf_len = self.area().rx_buf_len() as usize;
        s.iov.clear();
        s.niovs.clear();
        for _ in 0..n {
            let i = self.take_free().expect("reserved");
            s.niovs.push(i);
            s.iov.push(libc::iovec { iov_base: self.area().niov_ptr(i).cast(), iov_len: buf_len });
        }
    }

    /// A read into `bufs` failed: they go back unused; would-block and EINTR are not errors.
    fn read_failed(&mut self, bufs: &[u32], e: io::Error) -> io::Result<CopyOutcome> {
        for &i in bufs {
            self.put_back(i);
        }
        match e.kind() {
            io::ErrorKind::WouldBlock => Ok(CopyOutcome::WouldBlock),
            io::ErrorKind::Interrupted => Ok(CopyOutcome::Data { completions: 0, bytes: 0 }),
            _ => Err(e),
        }
    }

    pub(crate) fn finish_copy(&mut self, completions: u32) {
        if completions != 0 {
            self.post_event(ZCRX_EVENT_COPY);
        }
        self.commit();
    }
}

fn sockaddr_to_std(a: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    match a.ss_family as libc::c_int {
        libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let v4 = unsafe { &*(a as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::from((u32::from_be(v4.sin_addr.s_addr).to_be_bytes(), u16::from_be(v4.sin_port))))
        }
        libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let v6 = unsafe { &*(a as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::from((v6.sin6_addr.s6_addr, u16::from_be(v6.sin6_port))))
        }
        _ => None,
    }
}

/// The copy fallback through io_uring: recv bundles (streams) or multishot recv into a
/// provided-buffer ring whose buffers are the area's free niovs, so the kernel's one copy lands
/// in the area and one syscall can complete many buffers.
///
/// Buffers in the provided ring are *posted* (the kernel is the device here). Never more are
/// posted than there are free completion slots, so whatever the kernel fills can be completed.
pub struct UringCopy {
    // Field order is drop order: the ring (and the kernel's hold on the buffers) goes first,
    // then our hold on the memory, so the kernel never writes into unmapped memory.
    pr: crate::uring::ProvidedRecv,
    _mem: std::sync::Arc<crate::area::AreaMemory>,
}

impl UringCopy {
    /// Receive from `fd` (a connected stream or a bound datagram socket) into `ifq`'s area.
    pub fn new(ifq: &Ifq, fd: BorrowedFd<'_>, kind: crate::uring::SocketKind, ring_entries: u32) -> io::Result<Self> {
        Ok(Self {
            pr: crate::uring::ProvidedRecv::new(fd, kind, ring_entries)?,
            _mem: ifq.area().memory().clone(),
        })
    }

    /// Streams: a multishot bundle recv instead of one armed per fill (see
    /// [`crate::uring::ProvidedRecv::set_stream_multishot`]).
    pub fn set_stream_multishot(&mut self, on: bool) {
        self.pr.set_stream_multishot(on);
    }

    /// Buffers currently in the provided ring.
    pub fn posted(&self) -> u32 {
        self.pr.posted()
    }

    /// Top the provided ring up from the free list, wait for data when `wait`, complete every
    /// filled buffer.
    pub fn fill(&mut self, ifq: &mut Ifq, wait: bool) -> io::Result<CopyOutcome> {
        ifq.poll_flush_request();
        let space = ifq.cq_space();
        let mut budget = space.saturating_sub(self.pr.posted()).min(self.pr.space());
        let len = ifq.area().rx_buf_len();
        while budget > 0 {
            let Some(i) = ifq.take_free() else { break };
            // SAFETY: buffer `i` is posted: inside the area, written by nobody but the kernel
            // until it comes back filled or drained.
            unsafe { self.pr.post(ifq.area().niov_ptr(i), len, i) }.expect("space checked");
            budget -= 1;
        }
        if self.pr.posted() == 0 {
            let cq_full = space == 0;
            ifq.note_no_buffer(cq_full);
            return Ok(if cq_full { CopyOutcome::NoCqSpace } else { CopyOutcome::NoBuffer });
        }
        let (mut completions, mut bytes) = (0u32, 0usize);
        let out = self.pr.poll(wait && !self.pr.is_eof(), |f| {
            // Cannot fail: never more posted than free completion slots.
            let _ = ifq.complete(f.cookie, 0, f.len, 0, true);
            completions += 1;
            bytes += f.len as usize;
        });
        ifq.finish_copy(completions);
        let out = out?;
        if completions != 0 {
            return Ok(CopyOutcome::Data { completions, bytes });
        }
        if out.eof {
            return Ok(CopyOutcome::Eof);
        }
        if out.no_buffers {
            ifq.note_no_buffer(false);
            return Ok(CopyOutcome::NoBuffer);
        }
        Ok(CopyOutcome::WouldBlock)
    }

    /// Take every buffer back from the kernel into the free list (before closing the ifq, or to
    /// switch methods).
    pub fn detach(mut self, ifq: &mut Ifq) -> io::Result<()> {
        self.pr.drain_posted(|i| ifq.put_back(i))
    }
}

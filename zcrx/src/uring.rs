//! io_uring provided-buffer receive: recv bundles (streams) or multishot recv (datagrams)
//! into a provided-buffer ring whose buffers belong to the caller.
//!
//! This is the single-copy baseline of the zcrx model: the kernel copies socket data
//! straight into buffers that live in the caller's memory area (one niov-sized slot per
//! buffer), so the only copy is the one the kernel does out of the socket queue.
//!
//! # How the pieces fit
//!
//! * The caller stages buffers with [`ProvidedRecv::post`] and makes them visible with
//!   [`ProvidedRecv::publish`] (one release store of the ring tail for a whole batch).
//! * [`ProvidedRecv::poll`] arms one `IORING_OP_RECV` (a bundle for [`SocketKind::Stream`],
//!   plain multishot for [`SocketKind::Datagram`] so that one datagram is one buffer is one
//!   completion), makes exactly one `io_uring_enter`, and reaps every completion that is
//!   ready, handing each filled buffer back through a callback.
//! * A stream's bundle recv is one-shot by default, armed again by each poll in the same
//!   `io_uring_enter` that waits for it: it sits on the socket's wait queue only while the
//!   receiver waits, as a blocking `read()` does. A multishot recv
//!   ([`ProvidedRecv::set_stream_multishot`]) stays there, so every write of the sender runs
//!   io_uring's wake-up callback, also while the receiver is busy; with 1500-byte writes that
//!   costs the sender about 5% here (`zcrx bench copy`: 0.94-0.96x of a `read()` loop
//!   multishot, 1.05-1.07x one-shot).
//! * Buffers are identified by the caller's 32-bit cookie (the niov index, which may not fit
//!   the kernel's 16-bit buffer id). The kernel's buffer id is only used as the ring *slot*:
//!   a shadow array indexed by slot remembers the cookie and length posted there, and a
//!   bundle consumes consecutive ring slots starting at the one the completion names.
//!
//! Everything is preallocated in [`ProvidedRecv::new`]; posting, publishing and polling do
//! not allocate.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// Largest provided ring the kernel accepts (`ring_entries` must be a power of two up to 2^15).
pub const MAX_RING_ENTRIES: u32 = 1 << 15;

/// Buffer group id of our ring. Each [`ProvidedRecv`] owns its io_uring instance, so one
/// group per instance is all there is.
const BGID: u16 = 0;
/// `user_data` of the multishot recv request.
const RECV_UD: u64 = 1;
/// `user_data` of the cancel request used on teardown.
const CANCEL_UD: u64 = 2;
/// Submission queue size: at most a recv and a cancel are ever queued together.
const SQ_ENTRIES: u32 = 8;
/// How long teardown waits for the kernel to retire the multishot request.
const CANCEL_DEADLINE: Duration = Duration::from_secs(5);

/// One entry of the kernel's `struct io_uring_buf_ring` (`struct io_uring_buf`).
///
/// Mirrored here instead of using `io_uring::types::BufRingEntry` because the kernel reads
/// entry 0's `resv` field as the ring tail while we fill other entries; writing individual
/// fields through raw pointers avoids ever forming a Rust reference that covers the tail.
#[repr(C)]
struct KernelBuf {
    addr: u64,
    len: u32,
    bid: u16,
    /// In entry 0 this is the ring tail, written by us and read by the kernel.
    resv: u16,
}

const _: () = assert!(size_of::<KernelBuf>() == 16);
const _: () = assert!(size_of::<KernelBuf>() == size_of::<types::BufRingEntry>());

/// What kind of socket is being received from; decides the recv flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// `SOCK_STREAM`: recv bundles, a completion may fill many buffers and a zero-byte
    /// completion is end of stream.
    Stream,
    /// `SOCK_DGRAM`: plain multishot recv, one datagram fills exactly one buffer (datagrams
    /// longer than the buffer are silently truncated by `recv`). An empty datagram consumes no
    /// buffer (the kernel recycles it) and is only counted in
    /// [`PollOutcome::empty_datagrams`].
    Datagram,
}

/// One buffer handed back to the caller, filled by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filled {
    /// The cookie the buffer was posted with.
    pub cookie: u32,
    /// Bytes the kernel wrote at the start of the buffer (may be less than the buffer length
    /// for the last buffer of a completion).
    pub len: u32,
    /// More buffers of the same completion (bundle) follow this one.
    pub more_in_bundle: bool,
}

/// What one [`ProvidedRecv::poll`] observed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollOutcome {
    /// Payload bytes delivered through the callback.
    pub bytes: u64,
    /// Buffers delivered through the callback.
    pub buffers: u32,
    /// Completions of the recv request reaped.
    pub completions: u32,
    /// Most buffers carried by a single completion (> 1 means a bundle was received).
    pub max_bundle: u32,
    /// Zero-length datagrams received ([`SocketKind::Datagram`] only); they use no buffer.
    pub empty_datagrams: u32,
    /// The kernel found the provided ring empty (`ENOBUFS`): the data is still queued in the
    /// socket; post and publish buffers, then poll again (the request is re-armed then).
    pub no_buffers: bool,
    /// The stream reached end of file (sticky: stays set on every later poll; the request is
    /// not re-armed after it). Never set for datagram sockets.
    pub eof: bool,
    /// This poll (re)armed the recv request.
    pub rearmed: bool,
}

/// [`ProvidedRecv::post`] found no free ring slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("provided buffer ring is full")]
pub struct Full;

/// How long a poll may block.
#[derive(Clone, Copy)]
enum Wait {
    No,
    Forever,
    Timeout(Duration),
}

/// Shadow of one ring slot: what we posted there.
#[derive(Clone, Copy, Default)]
struct Slot {
    cookie: u32,
    len: u32,
}

/// The mmap'd provided-buffer ring and our view of its positions.
///
/// Positions are free-running `u16` counters like the kernel's; slot = position & mask.
/// Invariant: `head <= published <= tail` (mod 2^16) and `tail - head <= entries`.
struct BufRing {
    base: NonNull<KernelBuf>,
    map_len: usize,
    entries: u32,
    mask: u32,
    shadow: Box<[Slot]>,
    /// Next position the kernel will consume, as learnt from completions.
    head: u16,
    /// Tail value last stored for the kernel.
    published: u16,
    /// Next position to stage into.
    tail: u16,
}

impl BufRing {
    fn slot(&self, pos: u16) -> usize {
        (u32::from(pos) & self.mask) as usize
    }

    /// Buffers staged or published and not yet handed back.
    fn outstanding(&self) -> u32 {
        u32::from(self.tail.wrapping_sub(self.head))
    }

    /// The tail field of the shared ring (entry 0's `resv`).
    fn tail_atomic(&self) -> &AtomicU16 {
        // SAFETY: `base` points at our live, page-aligned mapping whose first 16 bytes are
        // entry 0; `resv` is a 2-byte aligned u16 inside it. Only atomics (ours, and the
        // kernel's smp_load_acquire) ever access that field, and the mapping outlives `&self`.
        unsafe { AtomicU16::from_ptr(ptr::addr_of_mut!((*self.base.as_ptr()).resv)) }
    }

    fn store_tail(&mut self, tail: u16) {
        self.tail_atomic().store(tail, Ordering::Release);
        self.published = tail;
    }

    /// Capacity the kernel used for the buffer in `slot`.
    ///
    /// The kernel may shrink an entry's `len` in place (when it caps the first buffer of a
    /// bundle to the bytes queued in the socket), and keeps the shrunk length if the buffer is
    /// recycled rather than consumed. So the length that decides how a completion's bytes
    /// spread over buffers is the one now in the ring, not necessarily the one posted.
    fn capacity_of(&self, slot: usize) -> io::Result<u32> {
        // SAFETY: slot < entries, so the entry is inside our mapping. The kernel has finished
        // with this entry (it was consumed by a completion we have already reaped with acquire
        // ordering), and `len` does not overlap the tail field.
        let ring_len =
            unsafe { ptr::addr_of!((*self.base.as_ptr().add(slot)).len).read_volatile() };
        let posted = self.shadow[slot].len;
        if ring_len == 0 || ring_len > posted {
            return Err(invalid(format!(
                "ring slot {slot}: kernel-side length {ring_len} does not fit the posted length {posted}"
            )));
        }
        Ok(ring_len)
    }

    /// Accounts one successful recv completion of `res` bytes naming buffer id `bid`; hands
    /// the consumed buffers to `f` in order and returns how many there were.
    ///
    /// Everything is validated before the first callback, so a bad completion delivers
    /// nothing.
    fn complete(
        &mut self,
        kind: SocketKind,
        res: u32,
        bid: Option<u16>,
        f: &mut dyn FnMut(Filled),
    ) -> io::Result<u32> {
        // A 0-byte recv (end of stream, or an empty datagram) normally hands its buffer back to
        // the ring (no IORING_CQE_F_BUFFER); and should a stream EOF still name a buffer, the
        // bundle code consumes none for zero bytes.
        if res == 0 && (kind == SocketKind::Stream || bid.is_none()) {
            return Ok(0);
        }
        let Some(bid) = bid else {
            return Err(invalid(format!(
                "recv completion of {res} bytes without IORING_CQE_F_BUFFER"
            )));
        };
        let head_slot = self.slot(self.head);
        if usize::from(bid) != head_slot {
            return Err(invalid(format!(
                "kernel reported buffer id {bid} but the ring head is at slot {head_slot}"
            )));
        }
        let avail = u32::from(self.published.wrapping_sub(self.head));
        let n = match kind {
            // Non-bundle ring selection consumes exactly the head buffer, even for an empty
            // datagram.
            SocketKind::Datagram => {
                if avail == 0 {
                    return Err(invalid("datagram completion but no buffer was published"));
                }
                let cap = self.capacity_of(head_slot)?;
                if res > cap {
                    return Err(invalid(format!(
                        "datagram of {res} bytes claimed for a {cap}-byte buffer"
                    )));
                }
                1
            }
            // A bundle fills consecutive buffers in ring order; the consumed count is the
            // shortest prefix that covers `res` (only the last may be partial).
            SocketKind::Stream => {
                let mut left = res;
                let mut n = 0u32;
                while left > 0 {
                    if n == avail {
                        return Err(invalid(format!(
                            "bundle of {res} bytes at slot {head_slot} exceeds the {avail} published buffers"
                        )));
                    }
                    let cap = self.capacity_of(self.slot(self.head.wrapping_add(n as u16)))?;
                    left -= left.min(cap);
                    n += 1;
                }
                n
            }
        };
        let mut left = res;
        for i in 0..n {
            let slot = self.slot(self.head.wrapping_add(i as u16));
            // Validated above; cannot fail now.
            let len = left.min(self.capacity_of(slot)?);
            left -= len;
            f(Filled {
                cookie: self.shadow[slot].cookie,
                len,
                more_in_bundle: i + 1 < n,
            });
        }
        self.head = self.head.wrapping_add(n as u16);
        Ok(n)
    }
}

/// Receive from one socket into a provided-buffer ring of caller-owned buffers.
///
/// Teardown (drop) cancels the request and waits for the kernel to retire it, unregisters
/// the ring and unmaps it; after drop the kernel no longer touches any posted buffer, so the
/// caller may reuse or free them (use [`drain_posted`](Self::drain_posted) first to learn
/// which ones were still posted).
pub struct ProvidedRecv {
    ring: IoUring,
    br: BufRing,
    kind: SocketKind,
    /// A recv is in flight (its terminating completion has not been reaped).
    armed: bool,
    /// Streams: arm a multishot bundle recv instead of a one-shot one per poll.
    stream_multishot: bool,
    eof: bool,
    /// The buffer ring is registered with the kernel.
    registered: bool,
    /// Ring accounting disagreed with the kernel; buffers can no longer be attributed.
    poisoned: bool,
    /// The ring is enabled (R_DISABLED lifted) by the first poll, on the polling thread.
    enabled: bool,
    /// Our own duplicate of the socket: the in-flight request can never outlive its file.
    sock: OwnedFd,
}

// SAFETY: the ring mapping and io_uring instance are exclusively owned by this value, the
// raw pointer is only dereferenced through `&mut self`/`&self` methods, and the posted
// buffers' validity is the caller's contract from `post`, independent of the thread.
unsafe impl Send for ProvidedRecv {}

impl fmt::Debug for ProvidedRecv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvidedRecv")
            .field("kind", &self.kind)
            .field("fd", &self.sock.as_raw_fd())
            .field("entries", &self.br.entries)
            .field("outstanding", &self.br.outstanding())
            .field("armed", &self.armed)
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn with_context(err: io::Error, what: &str) -> io::Error {
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

impl ProvidedRecv {
    /// Sets up an io_uring instance and a provided-buffer ring of `ring_entries` slots for
    /// receiving from `fd`.
    ///
    /// The socket is duplicated (close-on-exec), so the caller may close its own descriptor;
    /// the connection stays open until this value is dropped. `ring_entries` must be a power
    /// of two no larger than [`MAX_RING_ENTRIES`]. Errors name the missing kernel feature when
    /// the kernel is too old (bundles need Linux 6.10, provided rings 5.19).
    pub fn new(fd: BorrowedFd<'_>, kind: SocketKind, ring_entries: u32) -> io::Result<Self> {
        if !ring_entries.is_power_of_two() || ring_entries > MAX_RING_ENTRIES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "ring_entries must be a power of two <= {MAX_RING_ENTRIES}, got {ring_entries}"
                ),
            ));
        }
        let ty = rustix::net::sockopt::socket_type(fd)
            .map_err(|e| with_context(e.into(), "SO_TYPE of the receive socket"))?;
        let expected = match kind {
            SocketKind::Stream => rustix::net::SocketType::STREAM,
            SocketKind::Datagram => rustix::net::SocketType::DGRAM,
        };
        if ty != expected {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("SocketKind::{kind:?} needs a socket of type {expected:?}, got {ty:?}"),
            ));
        }
        let sock = fd.try_clone_to_owned()?;

        // Each data completion consumes at least one buffer, so twice the ring size cannot
        // overflow the completion queue (an overflow would terminate the multishot request).
        // DEFER_TASKRUN: the kernel's receive work runs when we enter the ring, not as task work
        // interrupting whatever we do on every arriving segment (cheaper for the sender's wake-ups
        // too). It needs SINGLE_ISSUER; R_DISABLED defers the choice of the issuing thread to
        // the first poll, so the receiver may be created on one thread and polled on another.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            // Pending deferred work shows in the SQ flags, so a non-waiting poll still enters
            // with GETEVENTS and runs it.
            .setup_taskrun_flag()
            .setup_r_disabled()
            .setup_cqsize((ring_entries * 2).max(64))
            .build(SQ_ENTRIES)
            .map_err(|e| {
                with_context(
                    e,
                    "io_uring_setup (io_uring missing, or disabled by kernel.io_uring_disabled)",
                )
            })?;
        let params = ring.params();
        if !params.is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "kernel lacks IORING_FEAT_EXT_ARG (Linux 5.11+), needed for timed waits",
            ));
        }
        if kind == SocketKind::Stream && !params.is_feature_recvsend_bundle() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "kernel lacks IORING_FEAT_RECVSEND_BUNDLE (recv bundles need Linux 6.10+)",
            ));
        }
        let mut probe = io_uring::Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| with_context(e, "IORING_REGISTER_PROBE"))?;
        if !probe.is_supported(opcode::RecvMulti::CODE) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "kernel lacks IORING_OP_RECV in io_uring (Linux 5.6+; multishot needs 6.0+)",
            ));
        }

        let page = rustix::param::page_size();
        let bytes = ring_entries as usize * size_of::<KernelBuf>();
        let map_len = bytes.div_ceil(page) * page;
        // SAFETY: a fresh private anonymous mapping; it aliases nothing.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                ptr::null_mut(),
                map_len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .map_err(|e| with_context(e.into(), "mmap of the provided buffer ring"))?;
        let br = BufRing {
            // mmap never returns null on success.
            base: NonNull::new(base.cast::<KernelBuf>()).expect("mmap returned null"),
            map_len,
            entries: ring_entries,
            mask: ring_entries - 1,
            shadow: vec![Slot::default(); ring_entries as usize].into_boxed_slice(),
            head: 0,
            published: 0,
            tail: 0,
        };
        // From here on Drop unmaps (and unregisters once `registered` is set).
        let mut this = ProvidedRecv {
            ring,
            br,
            kind,
            armed: false,
            stream_multishot: false,
            eof: false,
            registered: false,
            poisoned: false,
            enabled: false,
            sock,
        };
        this.register_ring()?;
        Ok(this)
    }

    fn register_ring(&mut self) -> io::Result<()> {
        // SAFETY: the mapping is page aligned, zero-filled or reset (tail 0), holds `entries`
        // entries, and stays mapped until after it is unregistered (Drop unregisters first).
        unsafe {
            self.ring.submitter().register_buf_ring_with_flags(
                self.br.base.as_ptr() as u64,
                self.br.entries as u16,
                BGID,
                0,
            )
        }
        .map_err(|e| {
            with_context(
                e,
                "IORING_REGISTER_PBUF_RING (provided buffer rings need Linux 5.19+)",
            )
        })?;
        self.registered = true;
        Ok(())
    }

    /// Streams: use a multishot bundle recv (armed once, kept by the kernel) instead of a
    /// one-shot one armed by every poll (the default; see the module docs for why). Takes
    /// effect the next time the request is armed.
    pub fn set_stream_multishot(&mut self, on: bool) {
        self.stream_multishot = on;
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> u32 {
        self.br.entries
    }

    /// Free slots left in the provided ring (staged buffers count as used).
    pub fn space(&self) -> u32 {
        self.br.entries - self.br.outstanding()
    }

    /// Buffers posted (staged or published) and not yet handed back.
    pub fn posted(&self) -> u32 {
        self.br.outstanding()
    }

    /// The peer closed the stream; no further data will arrive.
    pub fn is_eof(&self) -> bool {
        self.eof
    }

    /// Stages a buffer into the ring; the kernel sees it after [`publish`](Self::publish)
    /// (which [`poll`](Self::poll) also does).
    ///
    /// # Safety
    ///
    /// `addr..addr + len` must be valid for writes and must not be read or written by anyone
    /// else until the buffer comes back as a [`Filled`] with this `cookie`, is returned by
    /// [`drain_posted`](Self::drain_posted), or this `ProvidedRecv` is dropped.
    ///
    /// # Panics
    ///
    /// If `len` is 0: the kernel counts zero-length buffers as bundle segments, which would
    /// make the byte accounting ambiguous.
    pub unsafe fn post(&mut self, addr: *mut u8, len: u32, cookie: u32) -> Result<(), Full> {
        assert!(len != 0, "zero-length provided buffer");
        if self.space() == 0 {
            return Err(Full);
        }
        let slot = self.br.slot(self.br.tail);
        // SAFETY: slot < entries, so the entry is inside our mapping. The position is beyond
        // the published tail, so the kernel does not read it, and the previous use of the slot
        // (one ring lap ago) was consumed and reaped. The fields written do not include entry
        // 0's `resv` (the tail).
        unsafe {
            let e = self.br.base.as_ptr().add(slot);
            ptr::addr_of_mut!((*e).addr).write(addr as u64);
            ptr::addr_of_mut!((*e).len).write(len);
            ptr::addr_of_mut!((*e).bid).write(slot as u16);
        }
        self.br.shadow[slot] = Slot { cookie, len };
        self.br.tail = self.br.tail.wrapping_add(1);
        Ok(())
    }

    /// Makes every staged buffer visible to the kernel with one release store of the tail.
    pub fn publish(&mut self) {
        if self.br.published != self.br.tail {
            self.br.store_tail(self.br.tail);
        }
    }

    /// Publishes staged buffers, (re)arms the recv if needed, makes one
    /// `io_uring_enter` (blocking for at least one completion if `wait` and a request is in
    /// flight), then reaps every ready completion, calling `f` once per filled buffer in
    /// stream order.
    ///
    /// A request terminated by the kernel (completion without `IORING_CQE_F_MORE`: ENOBUFS,
    /// an error, CQ pressure) is re-armed on the next poll, except after end of stream. A
    /// socket error is returned as `Err` after all ready completions were delivered, so no
    /// data is lost. An `InvalidData` error means the ring accounting disagreed with the
    /// kernel; polling then keeps failing until [`drain_posted`](Self::drain_posted) (which
    /// returns every buffer not yet handed back and starts from an empty ring) or drop.
    pub fn poll(&mut self, wait: bool, mut f: impl FnMut(Filled)) -> io::Result<PollOutcome> {
        self.poll_inner(if wait { Wait::Forever } else { Wait::No }, &mut f)
    }

    /// Like [`poll`](Self::poll) with `wait`, but blocks at most `timeout`.
    pub fn poll_timeout(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(Filled),
    ) -> io::Result<PollOutcome> {
        self.poll_inner(Wait::Timeout(timeout), &mut f)
    }

    fn recv_sqe(&self) -> squeue::Entry {
        let fd = types::Fd(self.sock.as_raw_fd());
        match self.kind {
            SocketKind::Stream if self.stream_multishot => opcode::RecvMultiBundle::new(fd, BGID).build(),
            SocketKind::Stream => opcode::RecvBundle::new(fd, BGID).build(),
            SocketKind::Datagram => opcode::RecvMulti::new(fd, BGID).build(),
        }
        .user_data(RECV_UD)
    }

    fn poll_inner(&mut self, wait: Wait, f: &mut dyn FnMut(Filled)) -> io::Result<PollOutcome> {
        if self.poisoned {
            return Err(invalid(
                "provided ring accounting was lost earlier; drain_posted() or drop this receiver",
            ));
        }
        self.publish();
        if !self.enabled {
            // The polling thread becomes the ring's single issuer.
            self.ring.submitter().register_enable_rings().map_err(|e| with_context(e, "IORING_REGISTER_ENABLE_RINGS"))?;
            self.enabled = true;
        }
        let mut out = PollOutcome::default();
        if !self.armed && !self.eof {
            let sqe = self.recv_sqe();
            // SAFETY: the SQE points at no memory of ours; the buffers it may fill come from
            // the registered group, whose validity `post`'s contract guarantees.
            unsafe { self.ring.submission().push(&sqe) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            self.armed = true;
            out.rearmed = true;
        }
        self.enter(wait)?;
        let err = self.reap(&mut out, f);
        out.eof = self.eof;
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// The one syscall of a poll: submit whatever is queued and optionally wait.
    fn enter(&mut self, wait: Wait) -> io::Result<()> {
        // Waiting with nothing in flight would never return.
        let want = usize::from(self.armed && !matches!(wait, Wait::No));
        let submitter = self.ring.submitter();
        let res = match wait {
            Wait::Timeout(d) if want > 0 => {
                let ts = types::Timespec::from(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                submitter.submit_with_args(want, &args)
            }
            _ => submitter.submit_and_wait(want),
        };
        match res {
            Ok(_) => Ok(()),
            // Timed out, interrupted, or completions backed up: just reap what is there.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(with_context(e, "io_uring_enter")),
        }
    }

    /// Reaps every ready completion. Returns the first error to report (socket error or
    /// accounting failure); keeps reaping after it so `armed` stays truthful.
    fn reap(&mut self, out: &mut PollOutcome, f: &mut dyn FnMut(Filled)) -> Option<io::Error> {
        let mut first_err: Option<io::Error> = None;
        for cqe in self.ring.completion() {
            if cqe.user_data() != RECV_UD {
                continue; // cancel completions carry nothing we need
            }
            let flags = cqe.flags();
            let res = cqe.result();
            if !cqueue::more(flags) {
                self.armed = false;
            }
            out.completions += 1;
            if res < 0 {
                match -res {
                    libc::ENOBUFS => out.no_buffers = true,
                    // Our own cancel, or the arming thread exited: re-armed on next poll.
                    libc::ECANCELED => {}
                    libc::EINVAL => {
                        first_err.get_or_insert_with(|| {
                            io::Error::new(
                                io::ErrorKind::Unsupported,
                                "recv rejected with EINVAL (multishot needs Linux 6.0+, bundles 6.10+)",
                            )
                        });
                    }
                    errno => {
                        first_err.get_or_insert_with(|| io::Error::from_raw_os_error(errno));
                    }
                }
                continue;
            }
            if res == 0 {
                match self.kind {
                    SocketKind::Stream => self.eof = true,
                    SocketKind::Datagram if cqueue::buffer_select(flags).is_none() => {
                        out.empty_datagrams += 1;
                    }
                    SocketKind::Datagram => {}
                }
            }
            if self.poisoned {
                continue;
            }
            let res = res.unsigned_abs(); // res >= 0 here
            match self
                .br
                .complete(self.kind, res, cqueue::buffer_select(flags), f)
            {
                Ok(n) => {
                    out.bytes += u64::from(res);
                    out.buffers += n;
                    out.max_bundle = out.max_bundle.max(n);
                }
                Err(e) => {
                    self.poisoned = true;
                    tracing::error!(error = %e, "provided ring accounting failed");
                    // An accounting failure outranks a socket error.
                    first_err = Some(e);
                }
            }
        }
        first_err
    }

    /// Cancels the in-flight request (if any) and reaps until the kernel has retired it, so no
    /// buffer is written afterwards. Buffers filled meanwhile go to `f`.
    fn cancel_and_settle(&mut self, f: &mut dyn FnMut(Filled)) -> io::Result<()> {
        if !self.armed {
            return Ok(());
        }
        let sqe = opcode::AsyncCancel::new(RECV_UD)
            .build()
            .user_data(CANCEL_UD);
        // SAFETY: a cancel SQE references no memory.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        let deadline = Instant::now() + CANCEL_DEADLINE;
        let mut out = PollOutcome::default();
        while self.armed {
            self.enter(Wait::Timeout(Duration::from_millis(100)))?;
            // Socket errors do not matter any more; only whether the request ended.
            let _ = self.reap(&mut out, f);
            if self.armed && Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "multishot recv was not retired after cancellation",
                ));
            }
        }
        Ok(())
    }

    /// Stops receiving and hands back, through `f`, the cookie of every buffer still posted
    /// (staged or published), so none is lost at teardown. Buffers the kernel fills while the
    /// request is being cancelled are handed back here too; their data is discarded.
    ///
    /// Afterwards the ring is empty and re-registered, so the receiver can be reused: post
    /// buffers and poll again.
    pub fn drain_posted(&mut self, mut f: impl FnMut(u32)) -> io::Result<()> {
        self.cancel_and_settle(&mut |filled: Filled| f(filled.cookie))?;
        let mut pos = self.br.head;
        while pos != self.br.tail {
            f(self.br.shadow[self.br.slot(pos)].cookie);
            pos = pos.wrapping_add(1);
        }
        // The kernel still considers the published entries available: make it forget them by
        // re-registering an empty ring.
        if self.registered {
            self.ring
                .submitter()
                .unregister_buf_ring(BGID)
                .map_err(|e| with_context(e, "IORING_UNREGISTER_PBUF_RING"))?;
            self.registered = false;
        }
        self.br.store_tail(0);
        self.br.head = 0;
        self.br.tail = 0;
        self.poisoned = false;
        self.register_ring()
    }
}

impl Drop for ProvidedRecv {
    fn drop(&mut self) {
        if let Err(e) = self.cancel_and_settle(&mut |_| {}) {
            tracing::error!(error = %e, "could not retire the multishot recv on drop");
        }
        if self.registered {
            if let Err(e) = self.ring.submitter().unregister_buf_ring(BGID) {
                tracing::warn!(error = %e, "IORING_UNREGISTER_PBUF_RING failed on drop");
            }
        }
        // SAFETY: `base`/`map_len` describe the mapping made in `new`, which nothing uses any
        // more (the kernel pins its own reference to the pages while registered).
        if let Err(e) = unsafe { rustix::mm::munmap(self.br.base.as_ptr().cast(), self.br.map_len) }
        {
            tracing::warn!(error = %e, "munmap of the provided buffer ring failed");
        }
        // The io_uring fd and the socket duplicate close when the fields drop.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsFd;
    use std::sync::Mutex;

    /// Serializes this module's tests so the fd count in `eof_drain_and_no_fd_leak` is not
    /// disturbed by sockets the other tests open concurrently.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A caller-owned memory area cut into equal buffers; cookie = buffer index.
    struct Area {
        base: *mut u8,
        buf_size: u32,
        _storage: Vec<u8>,
    }

    impl Area {
        fn new(nbufs: u32, buf_size: u32) -> Self {
            let mut storage = vec![0u8; (nbufs * buf_size) as usize];
            let base = storage.as_mut_ptr();
            Area {
                base,
                buf_size,
                _storage: storage,
            }
        }

        fn post(&self, rx: &mut ProvidedRecv, cookie: u32) {
            // SAFETY: buffer `cookie` lies inside the area, which outlives `rx` in every test,
            // and the tests only read a buffer after it came back as Filled.
            unsafe {
                rx.post(
                    self.base.add((cookie * self.buf_size) as usize),
                    self.buf_size,
                    cookie,
                )
            }
            .unwrap();
        }

        fn filled(&self, f: Filled) -> &[u8] {
            assert!(f.len <= self.buf_size);
            // SAFETY: the buffer came back from the kernel, so nobody writes it now.
            unsafe {
                std::slice::from_raw_parts(
                    self.base.add((f.cookie * self.buf_size) as usize),
                    f.len as usize,
                )
            }
        }
    }

    fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            v.extend_from_slice(&seed.to_le_bytes());
        }
        v.truncate(len);
        v
    }

    fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    fn spawn_writer(mut client: TcpStream, data: Vec<u8>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            for chunk in data.chunks(1500) {
                client.write_all(chunk).unwrap();
            }
            // Dropping the stream closes it: the receiver sees EOF.
        })
    }

    /// Polls, reassembles and reposts until EOF; returns (stream, buffers in multi-buffer
    /// bundles, largest bundle).
    fn receive_to_eof(rx: &mut ProvidedRecv, area: &Area, expect: usize) -> (Vec<u8>, u64, u32) {
        let mut got = Vec::with_capacity(expect);
        let mut back = Vec::with_capacity(rx.capacity() as usize);
        let mut in_bundles = 0u64;
        let mut max_bundle = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = rx
                .poll_timeout(Duration::from_secs(2), |f| {
                    got.extend_from_slice(area.filled(f));
                    if f.more_in_bundle {
                        in_bundles += 1;
                    }
                    back.push(f.cookie);
                })
                .unwrap();
            max_bundle = max_bundle.max(out.max_bundle);
            for c in back.drain(..) {
                area.post(rx, c);
            }
            if out.eof {
                return (got, in_bundles, max_bundle);
            }
            assert!(
                Instant::now() < deadline,
                "no EOF after {} bytes",
                got.len()
            );
        }
    }

    fn tcp_bundles_reassemble_exact_stream(multishot: bool) {
        let _g = serial();
        const LEN: usize = 8 << 20;
        const NBUFS: u32 = 256;
        let data = pseudo_random(LEN, 0x9e37_79b9_7f4a_7c15);
        let (client, server) = tcp_pair();
        let area = Area::new(NBUFS, 4096);
        let mut rx = ProvidedRecv::new(server.as_fd(), SocketKind::Stream, NBUFS).unwrap();
        rx.set_stream_multishot(multishot);
        for c in 0..NBUFS {
            area.post(&mut rx, c);
        }
        assert_eq!(rx.space(), 0);
        let writer = spawn_writer(client, data.clone());
        let (got, in_bundles, max_bundle) = receive_to_eof(&mut rx, &area, LEN);
        writer.join().unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "reassembled stream differs from what was sent");
        assert!(
            in_bundles > 0 && max_bundle > 1,
            "no multi-buffer bundle observed (max {max_bundle})"
        );
        assert_eq!(rx.posted(), NBUFS, "every buffer was reposted");
    }

    #[test]
    fn uring_tcp_bundles_reassemble_exact_stream() {
        tcp_bundles_reassemble_exact_stream(false);
    }

    #[test]
    fn uring_tcp_bundles_reassemble_exact_stream_multishot() {
        tcp_bundles_reassemble_exact_stream(true);
    }

    fn enobufs_backpressure_loses_nothing(multishot: bool) {
        let _g = serial();
        const LEN: usize = 256 << 10;
        let data = pseudo_random(LEN, 42);
        let (client, server) = tcp_pair();
        let area = Area::new(16, 4096);
        let mut rx = ProvidedRecv::new(server.as_fd(), SocketKind::Stream, 16).unwrap();
        rx.set_stream_multishot(multishot);
        area.post(&mut rx, 0);
        area.post(&mut rx, 1);
        let writer = spawn_writer(client, data.clone());

        // Do not repost: the ring must run dry while data is still queued.
        let mut got = Vec::new();
        let mut back = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = rx
                .poll_timeout(Duration::from_secs(1), |f| {
                    got.extend_from_slice(area.filled(f));
                    back.push(f.cookie);
                })
                .unwrap();
            assert!(!out.eof);
            if out.no_buffers {
                break;
            }
            assert!(Instant::now() < deadline, "ENOBUFS never reported");
        }
        assert!(back.len() <= 2 && got.len() <= 2 * 4096);
        assert_eq!(rx.posted(), 0);
        // Still dry: re-arming reports ENOBUFS again and delivers nothing.
        let out = rx
            .poll_timeout(Duration::from_secs(1), |_| panic!("no buffer is posted"))
            .unwrap();
        assert!(out.rearmed && out.no_buffers && out.buffers == 0);

        for c in back.drain(..) {
            area.post(&mut rx, c);
        }
        for c in 2..16 {
            area.post(&mut rx, c);
        }
        let (rest, _, _) = receive_to_eof(&mut rx, &area, LEN);
        got.extend_from_slice(&rest);
        writer.join().unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "stream differs after ENOBUFS back pressure");
    }

    #[test]
    fn uring_enobufs_backpressure_loses_nothing() {
        enobufs_backpressure_loses_nothing(false);
    }

    #[test]
    fn uring_enobufs_backpressure_loses_nothing_multishot() {
        enobufs_backpressure_loses_nothing(true);
    }

    fn datagram(seq: u32) -> Vec<u8> {
        let size = 8 + (seq * 37 % 2041) as usize; // 8..=2048
        let mut d = Vec::with_capacity(size);
        d.extend_from_slice(&seq.to_le_bytes());
        d.extend_from_slice(&(size as u32).to_le_bytes());
        d.extend((8..size).map(|i| (seq as usize * 31 + i) as u8));
        d
    }

    #[test]
    fn non_waiting_polls_make_progress() {
        // With DEFER_TASKRUN the kernel's receive work runs only when we enter the ring with
        // GETEVENTS: a poll that does not wait must still run it.
        let _g = serial();
        let rx_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx_sock.local_addr().unwrap()).unwrap();
        let area = Area::new(64, 2048);
        let mut rx = ProvidedRecv::new(rx_sock.as_fd(), SocketKind::Datagram, 64).unwrap();
        for c in 0..64 {
            area.post(&mut rx, c);
        }
        for seq in 0..40 {
            tx.send(&datagram(seq)).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = 0;
        while got < 40 {
            assert!(Instant::now() < deadline, "non-waiting polls received only {got} of 40");
            got += rx.poll(false, |_| {}).unwrap().buffers;
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(got, 40);
    }

    #[test]
    fn uring_udp_one_datagram_per_buffer() {
        let _g = serial();
        const N: u32 = 1000;
        const BATCH: u32 = 50;
        const NBUFS: u32 = 128;
        let rx_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx_sock.local_addr().unwrap()).unwrap();
        let area = Area::new(NBUFS, 2048);
        let mut rx = ProvidedRecv::new(rx_sock.as_fd(), SocketKind::Datagram, NBUFS).unwrap();
        for c in 0..NBUFS {
            area.post(&mut rx, c);
        }
        let mut next = 0u32;
        let mut back = Vec::with_capacity(NBUFS as usize);
        let mut completions = 0;
        // Lock-step batches that fit the socket buffer, so loopback never drops a datagram.
        for batch in 0..N / BATCH {
            for seq in batch * BATCH..(batch + 1) * BATCH {
                tx.send(&datagram(seq)).unwrap();
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while next < (batch + 1) * BATCH {
                let out = rx
                    .poll_timeout(Duration::from_secs(1), |f| {
                        assert!(!f.more_in_bundle, "datagram receive must not bundle");
                        let want = datagram(next);
                        assert_eq!(f.len as usize, want.len(), "datagram {next} length");
                        assert!(area.filled(f) == &want[..], "datagram {next} content");
                        next += 1;
                        back.push(f.cookie);
                    })
                    .unwrap();
                assert!(!out.no_buffers && !out.eof);
                assert_eq!(out.buffers, out.completions);
                completions += out.completions;
                for c in back.drain(..) {
                    area.post(&mut rx, c);
                }
                assert!(Instant::now() < deadline, "stuck at datagram {next}");
            }
        }
        assert_eq!(next, N);
        assert_eq!(completions, N);

        // An empty datagram is not EOF: it is counted (no buffer is used; the kernel ends the
        // multishot request on it) and the receiver keeps going afterwards.
        let posted = rx.posted();
        tx.send(&[]).unwrap();
        tx.send(&datagram(7)).unwrap();
        let mut seen = Vec::new();
        let mut empty = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.is_empty() {
            let out = rx
                .poll_timeout(Duration::from_secs(1), |f| {
                    assert_eq!(empty, 1, "the empty datagram comes first");
                    seen.push(area.filled(f).to_vec());
                })
                .unwrap();
            assert!(!out.eof);
            empty += out.empty_datagrams;
            assert!(
                Instant::now() < deadline,
                "datagram after the empty one not delivered"
            );
        }
        assert_eq!(empty, 1);
        assert_eq!(seen, vec![datagram(7)]);
        assert_eq!(rx.posted(), posted - 1);
    }

    fn count_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    fn eof_drain_and_no_fd_leak(multishot: bool) {
        let _g = serial();
        const NBUFS: u32 = 64;
        let before = count_fds();
        {
            let (mut client, server) = tcp_pair();
            let area = Area::new(NBUFS, 1024);
            let mut rx = ProvidedRecv::new(server.as_fd(), SocketKind::Stream, NBUFS).unwrap();
            rx.set_stream_multishot(multishot);
            for c in 0..NBUFS {
                area.post(&mut rx, c);
            }
            client.write_all(b"hello, zcrx").unwrap();
            drop(client);
            let mut got = Vec::new();
            let mut filled = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let out = rx
                    .poll_timeout(Duration::from_secs(1), |f| {
                        got.extend_from_slice(area.filled(f));
                        filled.push(f.cookie);
                    })
                    .unwrap();
                if out.eof {
                    break;
                }
                assert!(Instant::now() < deadline, "EOF not reported");
            }
            assert_eq!(got, b"hello, zcrx");
            assert!(rx.is_eof());
            // After EOF nothing is in flight: a blocking poll must return at once.
            let out = rx.poll(true, |_| panic!("data after EOF")).unwrap();
            assert!(out.eof && !out.rearmed && out.completions == 0);

            // Every buffer comes back exactly once: filled ones through poll, the rest here.
            let mut drained = Vec::new();
            rx.drain_posted(|c| drained.push(c)).unwrap();
            assert_eq!(rx.posted(), 0);
            assert_eq!(rx.space(), NBUFS);
            let mut all: Vec<u32> = filled.iter().chain(&drained).copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..NBUFS).collect::<Vec<_>>());

            // Drop while armed, with buffers posted and published, must also clean up.
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            let uarea = Area::new(8, 512);
            let mut urx = ProvidedRecv::new(udp.as_fd(), SocketKind::Datagram, 8).unwrap();
            for c in 0..8 {
                uarea.post(&mut urx, c);
            }
            let out = urx.poll(false, |_| {}).unwrap();
            assert!(out.rearmed);
            drop(urx);
            drop(rx);
        }
        assert_eq!(count_fds(), before, "file descriptors leaked");
    }

    #[test]
    fn uring_eof_drain_and_no_fd_leak() {
        eof_drain_and_no_fd_leak(false);
    }

    #[test]
    fn uring_eof_drain_and_no_fd_leak_multishot() {
        eof_drain_and_no_fd_leak(true);
    }

    #[test]
    fn uring_drain_then_reuse_and_argument_checks() {
        let _g = serial();
        let (mut client, server) = tcp_pair();
        assert_eq!(
            ProvidedRecv::new(server.as_fd(), SocketKind::Stream, 100)
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            ProvidedRecv::new(server.as_fd(), SocketKind::Datagram, 8)
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidInput
        );
        let area = Area::new(4, 256);
        let mut rx = ProvidedRecv::new(server.as_fd(), SocketKind::Stream, 4).unwrap();
        for c in 0..4 {
            area.post(&mut rx, c);
        }
        // SAFETY: never published (the call fails), so the pointer is never used.
        assert_eq!(unsafe { rx.post(ptr::null_mut(), 1, 99) }, Err(Full));
        // Armed and idle; draining cancels the request and returns all four.
        rx.poll(false, |_| panic!("no data yet")).unwrap();
        let mut drained = Vec::new();
        rx.drain_posted(|c| drained.push(c)).unwrap();
        drained.sort_unstable();
        assert_eq!(drained, vec![0, 1, 2, 3]);

        // The receiver works again with a fresh set of buffers.
        area.post(&mut rx, 2);
        area.post(&mut rx, 3);
        client.write_all(b"again").unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < 5 {
            let out = rx
                .poll_timeout(Duration::from_secs(1), |f| {
                    assert!(f.cookie == 2 || f.cookie == 3);
                    got.extend_from_slice(area.filled(f));
                })
                .unwrap();
            assert!(!out.eof);
            assert!(Instant::now() < deadline);
        }
        assert_eq!(got, b"again");
    }
}

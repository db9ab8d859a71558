//! The virtio-net device: feature negotiation, the rx queue fed with the niovs of a zcrx ifq
//! (so the device writes frames straight into the user's area), and a copying tx path.
//!
//! Copy mode ([`NetConfig::rx_copy`]) is the kernel's copy fallback with a device attached: the
//! rx queue is fed with the driver's own bounce buffers and each fragment is copied into a free
//! niov, completed exactly like zero-copy data but counted in `copy_*`. Both modes share the
//! framing logic; they differ only in where a used buffer's bytes are and what completing it
//! means (`RxBufs`).
//!
//! The device is untrusted: every used-ring entry is validated by the virtqueue, and every
//! virtio-net header is checked here (`num_buffers` in range) before a completion is made.

use std::sync::Arc;

use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use zcrx::uapi::{ZCRX_CQE_F_CONTD, ZCRX_EVENT_ALLOC_FAIL, ZCRX_EVENT_COPY};
use zcrx::{Area, AreaReg, DmaMap, Ifq, MemoryKind};

use crate::transport::{QueueAddrs, Transport, TransportError};
use crate::virtqueue::{self, Buf, DeviceError, QueueMemory, SplitQueue};

/// The virtio_net_hdr_v1 in front of every frame (VERSION_1: always 12 bytes).
pub const NET_HDR_LEN: usize = 12;
pub const RXQ: u16 = 0;
pub const TXQ: u16 = 1;
/// Bytes per rx bounce buffer in copy mode (header included): a 1514-byte frame fits in one, and
/// any fragment fits in a niov (niovs are at least a page).
pub const RX_COPY_BUF_LEN: u32 = 2048;
/// Zero copy: where in a niov the device writes. The header goes just before the second cache
/// line, so the frame itself starts cache-line aligned, as in DPDK's mbufs (a sender copying
/// 1500 bytes to an address 12 bytes past a line splits every vector store in two).
pub const RX_HEADROOM: u32 = 64 - NET_HDR_LEN as u32;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Features this driver can use.
pub const SUPPORTED: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_MTU)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_RING_F_EVENT_IDX);

/// Device-side and setup errors.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the device does not offer VIRTIO_F_VERSION_1 (legacy devices are not supported)")]
    NotModern,
    #[error("the transport translates addresses but the device lacks VIRTIO_F_ACCESS_PLATFORM")]
    NoAccessPlatform,
    #[error("driver memory: {0}")]
    Memory(#[from] zcrx::AreaError),
    #[error("virtqueue: {0}")]
    Queue(#[from] virtqueue::Error),
    #[error("device error on the {queue} queue: {err}; the queue was stopped and every buffer taken back")]
    Device { queue: &'static str, err: DeviceError },
    #[error("the device wrote a bad virtio-net header ({0}); the queue was stopped and every buffer taken back")]
    BadHeader(String),
    #[error("the device came back with features {offered:#x}, without some of {had:#x} we use")]
    FeaturesChanged { had: u64, offered: u64 },
    #[error("the device is gone ({0}); every buffer was taken back, reconnect to go on")]
    Gone(String),
    #[error("frame of {len} bytes does not fit a tx buffer of {max}")]
    FrameTooLong { len: usize, max: usize },
}

/// Queue and buffer sizes.
#[derive(Debug, Clone, Copy)]
pub struct NetConfig {
    pub queue_size: u16,
    /// Frames in flight on tx.
    pub tx_buffers: u16,
    /// Bytes per tx buffer (header included).
    pub tx_buf_len: u32,
    /// Copy mode: feed the rx queue with queue-size bounce buffers of [`RX_COPY_BUF_LEN`] bytes
    /// in the driver's memory instead of the ifq's niovs, and copy every fragment into a free
    /// niov (completions count as `copy_*`). Off: zero copy.
    pub rx_copy: bool,
    /// The longest frame the device will deliver (Ethernet header and VLAN tag, no FCS), when
    /// the user knows it (the peer's MTU + 18). If it fits in one rx buffer, MRG_RXBUF is not
    /// negotiated: every frame is one buffer and the driver never reads the frame's header
    /// (on the polling path that read is a cache miss per frame, on a line the device wrote).
    /// `None`: frames may be of any length (MRG_RXBUF when the device offers it).
    pub max_frame: Option<u32>,
}

impl NetConfig {
    /// Whether a frame may need more than one rx buffer (niovs of `rx_buf_len` bytes, or
    /// bounce buffers in copy mode).
    pub fn frames_span(&self, rx_buf_len: u32) -> bool {
        let (room, buf) = match self.rx_copy {
            true => (0, RX_COPY_BUF_LEN),
            false => (RX_HEADROOM, rx_buf_len),
        };
        self.max_frame.is_none_or(|f| u64::from(f) + u64::from(room) + NET_HDR_LEN as u64 > u64::from(buf))
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        Self { queue_size: 1024, tx_buffers: 256, tx_buf_len: 2048, rx_copy: false, max_frame: None }
    }
}

/// Counters of the device side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames without payload (a bare header) that were recycled.
    pub rx_empty: u64,
    /// Protocol violations by the device (bad used entries, bad headers).
    pub device_errors: u64,
    pub kicks: u64,
    /// Rx polls, and those that found nothing: the receiver's idle fraction, a measure of its
    /// own cost that does not depend on the sender's speed.
    pub rx_polls: u64,
    pub rx_empty_polls: u64,
}

/// A started virtio-net device with its queues (memory shared with the device).
pub struct VirtioNet {
    rx: SplitQueue,
    tx: SplitQueue,
    tx_free: Vec<u16>,
    /// Queue rings, tx buffers and (copy mode) rx bounce buffers, mapped for the device like
    /// any area.
    mem: Area,
    tx_base: usize,
    /// Copy mode: where the rx bounce buffers start in `mem`, and those not posted (tokens are
    /// bounce indices; capacity for all of them, so pushing never allocates).
    rx_bounce_base: usize,
    rx_bounce_free: Vec<u16>,
    cfg: NetConfig,
    features: u64,
    mac: Option<[u8; 6]>,
    transport: Box<dyn Transport>,
    stats: NetStats,
}

impl std::fmt::Debug for VirtioNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNet")
            .field("device", &self.transport.describe())
            .field("features", &format_args!("{:#x}", self.features))
            .field("mac", &self.mac)
            .finish()
    }
}

/// Negotiate features; the first step of opening a device. `frames_span`: frames may be longer
/// than one rx buffer (MRG_RXBUF is then negotiated when offered).
pub fn negotiate(t: &mut dyn Transport, frames_span: bool) -> Result<u64, NetError> {
    let offered = t.device_features()?;
    if offered & bit(VIRTIO_F_VERSION_1) == 0 {
        return Err(NetError::NotModern);
    }
    let mut want = offered & SUPPORTED;
    if !frames_span {
        want &= !bit(VIRTIO_NET_F_MRG_RXBUF);
    }
    if t.translates_addresses() {
        if offered & bit(VIRTIO_F_ACCESS_PLATFORM) == 0 {
            return Err(NetError::NoAccessPlatform);
        }
        want |= bit(VIRTIO_F_ACCESS_PLATFORM);
    }
    t.set_features(want)?;
    Ok(want)
}

fn page_up(n: usize) -> usize {
    n.next_multiple_of(zcrx::mem::page_size())
}

impl VirtioNet {
    /// Allocate and map the queue memory, set the queues up and start the device. `features`
    /// come from [`negotiate`]; buffers are posted by the caller.
    pub fn start(mut transport: Box<dyn Transport>, features: u64, cfg: NetConfig) -> Result<Self, NetError> {
        let event_idx = features & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        let size = cfg.queue_size.min(transport.max_queue_size(RXQ)?).min(transport.max_queue_size(TXQ)?);
        let lay = virtqueue::layout(size, event_idx);
        let qlen = page_up(lay.total_len);
        let tx_base = 2 * qlen;
        let tx_end = tx_base + cfg.tx_buffers as usize * cfg.tx_buf_len as usize;
        // Bounce buffers aligned to their size: none straddles a page (a DMA segment boundary).
        let (rx_bounce_base, bounces) = match cfg.rx_copy {
            true => (tx_end.next_multiple_of(RX_COPY_BUF_LEN as usize), size),
            false => (tx_end, 0),
        };
        let len = page_up(rx_bounce_base + bounces as usize * RX_COPY_BUF_LEN as usize);
        let dma: Arc<dyn DmaMap> = transport.dma();
        let mut reg = AreaReg::new(MemoryKind::Memfd, len);
        reg.memlock = zcrx::MemlockPolicy::Rlimit;
        let mem = Area::create(reg, zcrx::mem::page_size() as u32, Some(dma))?;
        let qmem = |base: usize| QueueMemory {
            vaddr: mem.ptr_at(base),
            device_addr: mem.dma_addr(base).expect("mapped"),
            len: qlen,
        };
        // SAFETY: the two regions are disjoint, inside `mem`, which outlives the queues (field
        // order), and nobody else in this process touches them.
        let mut rx = unsafe { SplitQueue::new(size, qmem(0), event_idx)? };
        // Rx chains are one buffer: fixed slots, so a buffer coming back in order is posted in
        // the same slot and descriptor again, without a store the device would have to fetch.
        rx.use_fixed_slots().expect("a new queue is idle");
        // SAFETY: as above.
        let tx = unsafe { SplitQueue::new(size, qmem(qlen), event_idx)? };
        let mut dev = Self {
            rx,
            tx,
            tx_free: (0..cfg.tx_buffers).rev().collect(),
            mem,
            tx_base,
            rx_bounce_base,
            rx_bounce_free: (0..bounces).rev().collect(),
            cfg,
            features,
            mac: None,
            transport,
            stats: NetStats::default(),
        };
        dev.activate()?;
        Ok(dev)
    }

    /// Announce the (empty) queues, read the config, start the device.
    fn activate(&mut self) -> Result<(), NetError> {
        let r = self.try_activate();
        if r.is_err() {
            // A backend may use a ring as soon as it knows it: stop before anything is unmapped.
            self.transport.stop();
        }
        r
    }

    fn try_activate(&mut self) -> Result<(), NetError> {
        for (q, vq) in [(RXQ, &self.rx), (TXQ, &self.tx)] {
            self.transport.setup_queue(q, &queue_addrs(vq))?;
        }
        if self.features & bit(VIRTIO_NET_F_MAC) != 0 {
            let mut m = [0u8; 6];
            self.mac = match self.transport.read_config(0, &mut m) {
                Ok(()) => Some(m),
                // No config space (vhost-user without the CONFIG protocol feature).
                Err(TransportError::Unsupported(_)) => None,
                Err(e) => return Err(e.into()),
            };
        }
        self.transport.start()?;
        // We poll: no interrupts wanted.
        self.rx.set_interrupts(false);
        self.tx.set_interrupts(false);
        Ok(())
    }

    /// After the device went away: reach it again, renegotiate the same features, restart
    /// with empty queues (every buffer was taken back when it went away).
    fn reconnect(&mut self, on_rx: &mut dyn FnMut(u32)) -> Result<(), NetError> {
        self.stop_queues(on_rx);
        self.transport.reconnect()?;
        let offered = self.transport.device_features()?;
        if offered & self.features != self.features {
            return Err(NetError::FeaturesChanged { had: self.features, offered });
        }
        self.transport.set_features(self.features)?;
        self.activate()
    }

    pub fn features(&self) -> u64 {
        self.features
    }
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.mac
    }
    pub fn stats(&self) -> NetStats {
        self.stats
    }
    pub fn transport(&self) -> &dyn Transport {
        &*self.transport
    }
    fn mrg_rxbuf(&self) -> bool {
        self.features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    /// Copy `frame` into a tx buffer and queue it; [`VirtioNet::flush_tx`] hands the batch to
    /// the device. `Ok(false)`: every tx buffer is in flight, try again after a flush.
    pub fn send(&mut self, frame: &[u8]) -> Result<bool, NetError> {
        let max = self.cfg.tx_buf_len as usize - NET_HDR_LEN;
        if frame.len() > max {
            return Err(NetError::FrameTooLong { len: frame.len(), max });
        }
        if self.tx_free.is_empty() {
            self.reap_tx()?;
        }
        let Some(b) = self.tx_free.pop() else { return Ok(false) };
        let off = self.tx_base + b as usize * self.cfg.tx_buf_len as usize;
        // SAFETY: tx buffer `b` is free (not in flight), inside `mem`; the header and frame fit
        // (checked above).
        unsafe {
            let p = self.mem.ptr_at(off);
            std::ptr::write_bytes(p, 0, NET_HDR_LEN);
            std::ptr::copy_nonoverlapping(frame.as_ptr(), p.add(NET_HDR_LEN), frame.len());
        }
        let buf = Buf { addr: self.mem.dma_addr(off).expect("mapped"), len: (NET_HDR_LEN + frame.len()) as u32, device_writable: false };
        if self.tx.add(&[buf], b as u32).is_err() {
            self.tx_free.push(b);
            return Ok(false);
        }
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += frame.len() as u64;
        Ok(true)
    }

    /// Publish queued frames and kick the device if it wants kicks.
    pub fn flush_tx(&mut self) {
        self.tx.publish();
        if self.tx.needs_kick() {
            self.transport.notify(TXQ);
            self.stats.kicks += 1;
        }
    }

    /// Take finished tx buffers back.
    pub fn reap_tx(&mut self) -> Result<usize, NetError> {
        let free = &mut self.tx_free;
        match self.tx.poll_used(usize::MAX, |u| free.push(u.token as u16)) {
            Ok(n) => Ok(n),
            Err(err) => {
                // The tx queue is broken now; the rx side's owner stops the device and takes
                // its buffers back on its next poll (`NetRx::poll`), so none is lost.
                self.stats.device_errors += 1;
                Err(NetError::Device { queue: "tx", err })
            }
        }
    }

    /// Stop the device and take every in-flight buffer back (`on_rx` gets each rx token that
    /// is not ours: in copy mode the rx buffers are our bounce buffers and `on_rx` gets none).
    fn stop_queues(&mut self, on_rx: &mut dyn FnMut(u32)) {
        self.transport.stop();
        if self.cfg.rx_copy {
            let free = &mut self.rx_bounce_free;
            self.rx.drain_in_flight(|t| free.push(t as u16));
        } else {
            self.rx.drain_in_flight(on_rx);
        }
        let free = &mut self.tx_free;
        self.tx.drain_in_flight(|t| free.push(t as u16));
    }

    /// Copy mode: post free bounce buffers on the rx queue's free slots (published).
    fn post_bounce(&mut self) -> u32 {
        let Self { rx, mem, rx_bounce_base, rx_bounce_free, .. } = self;
        let added = rx.post_fixed(RX_COPY_BUF_LEN, true, || {
            let b = rx_bounce_free.pop()?;
            let addr = mem.dma_addr(*rx_bounce_base + usize::from(b) * RX_COPY_BUF_LEN as usize).expect("mapped");
            Some((addr, u32::from(b)))
        });
        // Only a broken queue refuses; see `NetRx::post_niovs`.
        u32::from(added.unwrap_or(0))
    }
}

/// The rx queue's buffers as the shared receive logic sees them: the ifq's niovs (zero copy) or
/// the driver's bounce buffers (copy mode). Tokens are niov indices or bounce indices.
struct RxBufs<'a> {
    ifq: &'a mut Ifq,
    /// Copy mode: the driver memory, the bounce buffers' offset in it, and their free list.
    bounce: Option<(&'a Area, usize, &'a mut Vec<u16>)>,
}

impl RxBufs<'_> {
    /// Where the device wrote the buffer of `token`.
    #[inline]
    fn ptr(&self, token: u32) -> *mut u8 {
        match &self.bounce {
            Some((mem, base, _)) => mem.ptr_at(base + token as usize * RX_COPY_BUF_LEN as usize),
            // SAFETY: the headroom is less than a niov (at least a page), inside the area.
            None => unsafe { self.ifq.area().niov_ptr(token).add(RX_HEADROOM as usize) },
        }
    }

    /// Take back a buffer the device returned without anything to complete.
    #[inline]
    fn recycle(&mut self, token: u32) {
        match &mut self.bounce {
            Some((_, _, free)) => free.push(token as u16),
            None => self.ifq.put_back(token),
        }
    }

    /// Complete `len` bytes at `off` of the used buffer `token`: in place, or copied into a
    /// free niov (the caller reaped no more entries than there are free niovs and completion
    /// slots) and the bounce buffer taken back.
    #[inline]
    fn deliver(&mut self, token: u32, off: u32, len: u32, flags: u32) {
        match &mut self.bounce {
            None => {
                // Cannot fail: at most `cq_space` entries are reaped.
                let _ = self.ifq.complete(token, off + RX_HEADROOM, len, flags, false);
            }
            Some((mem, base, free)) => {
                let n = self.ifq.take_free().expect("no more used entries are reaped than there are free niovs");
                debug_assert!(RX_COPY_BUF_LEN <= self.ifq.area().rx_buf_len());
                // SAFETY: the device returned bounce buffer `token` (validated by the
                // virtqueue: `off + len` is within its RX_COPY_BUF_LEN bytes, inside `mem`);
                // niov `n` was just taken from the free list, so nobody else writes it, and it is
                // at least a page >= RX_COPY_BUF_LEN long. The two never overlap (different
                // mappings).
                unsafe {
                    let src = mem.ptr_at(*base + token as usize * RX_COPY_BUF_LEN as usize).add(off as usize);
                    std::ptr::copy_nonoverlapping(src, self.ifq.area().niov_ptr(n), len as usize);
                }
                // Cannot fail: at most `cq_space` entries are reaped.
                let _ = self.ifq.complete(n, 0, len, flags, true);
                free.push(token as u16);
            }
        }
    }
}

/// The virtio-net framing of one used buffer of `used_len` bytes at `buf`, `pending` buffers
/// still to come of the frame (MRG_RXBUF). `Ok(Some((offset, len, flags)))`: the payload to
/// complete; `Ok(None)`: a frame without payload (recycle the buffer); `Err`: the device broke
/// the protocol.
#[inline]
fn frame_fragment(
    pending: &mut u16,
    used_len: u32,
    buf: *const u8,
    mrg: bool,
    max_bufs: u16,
    stats: &mut NetStats,
) -> Result<Option<(u32, u32, u32)>, String> {
    let (off, len) = if *pending == 0 {
        if (used_len as usize) < NET_HDR_LEN {
            return Err(format!("used length {used_len} is shorter than the virtio-net header"));
        }
        let nbufs = if mrg {
            // SAFETY: the device returned this buffer (validated by the virtqueue), so it is
            // ours and at least NET_HDR_LEN long; num_buffers is at offset 10.
            u16::from_le(unsafe { std::ptr::read_unaligned(buf.add(10) as *const u16) })
        } else {
            1
        };
        if nbufs == 0 || nbufs > max_bufs {
            return Err(format!("num_buffers {nbufs} (queue size {max_bufs})"));
        }
        *pending = nbufs;
        stats.rx_frames += 1;
        (NET_HDR_LEN as u32, used_len - NET_HDR_LEN as u32)
    } else {
        (0, used_len)
    };
    *pending -= 1;
    let flags = if *pending != 0 { ZCRX_CQE_F_CONTD } else { 0 };
    if len == 0 && flags == 0 && off != 0 {
        stats.rx_empty += 1;
        return Ok(None);
    }
    Ok(Some((off, len, flags)))
}

fn queue_addrs(vq: &SplitQueue) -> QueueAddrs {
    QueueAddrs {
        size: vq.size(),
        desc: (vq.desc_vaddr() as u64, vq.desc_addr()),
        avail: (vq.avail_vaddr() as u64, vq.avail_addr()),
        used: (vq.used_vaddr() as u64, vq.used_addr()),
    }
}

/// The receive side of an ifq with a device: a virtio-net device whose rx queue is fed with the
/// ifq's niovs (zero copy), or with the driver's bounce buffers copied into niovs
/// ([`NetConfig::rx_copy`]). What the kernel is in io_uring zcrx; may run on its own thread.
pub struct NetRx {
    // Drop: `Drop::drop` stops the device first; then the device's memory goes, then the area.
    dev: VirtioNet,
    ifq: Ifq,
    /// Buffers still to come of the frame being completed (MRG_RXBUF).
    pending: u16,
    /// Empty polls in a row; now and then they look whether the device is still there.
    idle: u32,
}

/// Empty polls between two liveness checks (each costs a syscall).
const IDLE_CHECK: u32 = 1 << 14;

impl std::fmt::Debug for NetRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetRx").field("dev", &self.dev).field("ifq", &self.ifq).finish()
    }
}

/// What one [`NetRx::poll`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxPoll {
    pub completions: u32,
    pub bytes: u64,
    /// The completion ring is full: the device holds the data until the user consumes.
    pub cq_full: bool,
    /// Copy mode: data waits in the device's used ring because no niov is free (the user holds
    /// them all); `ZCRX_EVENT_ALLOC_FAIL` is raised.
    pub no_buffer: bool,
}

impl NetRx {
    /// Bind `ifq` (its area mapped through `dev`'s DMA context) to `dev`'s rx queue and post
    /// buffers.
    pub fn new(dev: VirtioNet, ifq: Ifq) -> Self {
        let mut rx = Self { dev, ifq, pending: 0, idle: 0 };
        rx.refill();
        rx
    }

    pub fn ifq(&self) -> &Ifq {
        &self.ifq
    }
    pub fn device(&mut self) -> &mut VirtioNet {
        &mut self.dev
    }

    /// Post free niovs (copy mode: free bounce buffers) on the rx queue. With a device the
    /// refill queue is consumed here, as the kernel's page pool does: nobody has to call
    /// `flush_rq` unless the RQ overflows.
    pub fn refill(&mut self) {
        self.ifq.poll_flush_request();
        if self.dev.rx.free_descriptors() == 0 || self.dev.rx.is_broken() {
            return;
        }
        // Both post and publish (`SplitQueue::post_fixed`).
        let added = if self.dev.cfg.rx_copy { self.dev.post_bounce() } else { self.post_niovs() };
        if added != 0 && self.dev.rx.needs_kick() {
            self.dev.transport.notify(RXQ);
            self.dev.stats.kicks += 1;
        }
    }

    /// Zero copy: post free niovs on the rx queue's free slots (published).
    fn post_niovs(&mut self) -> u32 {
        // Returned buffers are posted first, straight from the refill queue, while still in
        // cache: the device writes into a working set of about one queue, not the whole area
        // (cold writes cut 1500-byte receive to a third here). They go in the order they were
        // returned, so a buffer returned in completion order lands in the slot (and
        // descriptor) it came from, which then needs no store. Then the free list.
        let area = self.ifq.area();
        let (len, shift, contiguous) = (area.rx_buf_len() - RX_HEADROOM, area.niov_shift(), area.contiguous_dma());
        let ifq = &mut self.ifq;
        let mut returned = true;
        let added = self.dev.rx.post_fixed(len, true, || {
            let next = if returned { ifq.take_returned() } else { None };
            returned = next.is_some();
            let i = next.or_else(|| ifq.take_free())?;
            let addr = match contiguous {
                Some(base) => base + (u64::from(i) << shift),
                None => ifq.area().niov_dma(i).expect("a device ifq's area is mapped"),
            };
            Some((addr + u64::from(RX_HEADROOM), i))
        });
        self.ifq.release_rq();
        // Only a broken queue refuses (the rx queue always has fixed slots and len > 0); its
        // buffers come back when the device is stopped.
        u32::from(added.unwrap_or(0))
    }

    /// Reap what the device wrote: one completion per buffer, `ZCRX_CQE_F_CONTD` on all but a
    /// frame's last. Zero copy: `{niov + RX_HEADROOM + header, len}` (offset 64, cache-line
    /// aligned) for a frame's first buffer, `{niov + RX_HEADROOM, len}` for the others. Copy
    /// mode: each buffer's payload copied to the start of a free niov. Refill comes first.
    ///
    /// Back pressure loses nothing: no more used entries are reaped than there are completion
    /// slots (and, copying, free niovs); the rest waits in the device's used ring.
    pub fn poll(&mut self) -> Result<RxPoll, NetError> {
        if self.dev.tx.is_broken() && !self.dev.rx.is_broken() {
            // The device misbehaved on tx: stop it, every rx buffer back to the free list.
            self.shutdown();
            self.pending = 0;
            return Err(NetError::Device { queue: "tx", err: crate::virtqueue::DeviceError::Broken });
        }
        // Post what the user returned since the last poll first, before reaping: the slots to
        // fill are the ones the last poll reaped, and a user returning in completion order
        // gives back the very buffers they held, so no descriptor changes (see `post_niovs`).
        self.refill();
        let copy = self.dev.cfg.rx_copy;
        let space = self.ifq.cq_space() as usize;
        let mut out = RxPoll { cq_full: space == 0, ..Default::default() };
        let mut max = space;
        if copy && space != 0 && self.dev.rx.has_used() {
            // One free niov per completion. (Checked only with data waiting: idle polls store
            // nothing to the lines the user side reads.)
            let want = space.min(self.dev.rx.size() as usize);
            if (self.ifq.free_count() as usize) < want {
                self.ifq.flush_rq();
            }
            max = want.min(self.ifq.free_count() as usize);
            if max == 0 {
                out.no_buffer = true;
                self.ifq.post_event(ZCRX_EVENT_ALLOC_FAIL);
            }
        }
        let mrg = self.dev.mrg_rxbuf();
        let max_bufs = self.dev.rx.size();
        let Self { dev, ifq, pending, .. } = self;
        let VirtioNet { rx, mem, rx_bounce_base, rx_bounce_free, stats, .. } = dev;
        let mut bufs = RxBufs { ifq, bounce: copy.then_some((&*mem, *rx_bounce_base, rx_bounce_free)) };
        let mut bad_header = None;
        let r = rx.poll_used(max, |u| {
            if bad_header.is_some() {
                // After a violation nothing more is trusted: hand the buffer back unused.
                bufs.recycle(u.token);
                return;
            }
            match frame_fragment(pending, u.len, bufs.ptr(u.token), mrg, max_bufs, stats) {
                Ok(Some((off, len, flags))) => {
                    bufs.deliver(u.token, off, len, flags);
                    stats.rx_bytes += len as u64;
                    out.completions += 1;
                    out.bytes += len as u64;
                }
                Ok(None) => bufs.recycle(u.token),
                Err(msg) => {
                    bad_header = Some(msg);
                    bufs.recycle(u.token);
                }
            }
        });
        if out.completions != 0 {
            if copy {
                self.ifq.post_event(ZCRX_EVENT_COPY);
            }
            // Idle polls publish nothing: no store to the lines the user side reads.
            self.ifq.commit();
        }
        let err = match (r, bad_header) {
            (Err(e), _) => Some(NetError::Device { queue: "rx", err: e }),
            (Ok(_), Some(msg)) => Some(NetError::BadHeader(msg)),
            (Ok(_), None) => None,
        };
        if let Some(e) = err {
            self.dev.stats.device_errors += 1;
            let ifq = &mut self.ifq;
            self.dev.stop_queues(&mut |t| ifq.put_back(t));
            self.pending = 0;
            return Err(e);
        }
        if copy {
            // The copied bounce buffers are the driver's own: back on the ring at once.
            self.refill();
        }
        self.dev.stats.rx_polls += 1;
        if out.completions == 0 {
            self.dev.stats.rx_empty_polls += 1;
            self.idle += 1;
            if self.idle >= IDLE_CHECK {
                self.idle = 0;
                if !self.dev.transport.is_alive() {
                    let ifq = &mut self.ifq;
                    self.dev.stop_queues(&mut |t| ifq.put_back(t));
                    self.pending = 0;
                    return Err(NetError::Gone(self.dev.transport.describe()));
                }
            }
        } else {
            self.idle = 0;
        }
        Ok(out)
    }

    /// Reach a device that went away again and resume receiving into the same area; buffers
    /// the user holds stay the user's.
    pub fn reconnect(&mut self) -> Result<(), NetError> {
        let ifq = &mut self.ifq;
        self.dev.reconnect(&mut |t| ifq.put_back(t))?;
        self.pending = 0;
        self.idle = 0;
        self.refill();
        Ok(())
    }

    /// Stop the device, take every buffer back, and close the ifq (unmap, unlock, un-account).
    pub fn close(mut self) -> zcrx::IfqStats {
        self.shutdown();
        self.ifq.commit();
        self.ifq.stats()
        // Drop unmaps: the device memory, then the area.
    }

    fn shutdown(&mut self) {
        let ifq = &mut self.ifq;
        self.dev.stop_queues(&mut |t| ifq.put_back(t));
    }
}

impl Drop for NetRx {
    fn drop(&mut self) {
        self.shutdown();
    }
}

//! The virtio-net device: feature negotiation, the rx queue fed with the niovs of a zcrx ifq
//! (so the device writes frames straight into the user's area), and a copying tx path.
//!
//! The device is untrusted: every used-ring entry is validated by the virtqueue, and every
//! virtio-net header is checked here (`num_buffers` in range) before a completion is made.

use std::sync::Arc;

use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use zcrx::uapi::ZCRX_CQE_F_CONTD;
use zcrx::{Area, AreaReg, DmaMap, Ifq, MemoryKind};

use crate::transport::{QueueAddrs, Transport, TransportError};
use crate::virtqueue::{self, Buf, DeviceError, QueueMemory, SplitQueue};

/// The virtio_net_hdr_v1 in front of every frame (VERSION_1: always 12 bytes).
pub const NET_HDR_LEN: usize = 12;
pub const RXQ: u16 = 0;
pub const TXQ: u16 = 1;

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
}

impl Default for NetConfig {
    fn default() -> Self {
        Self { queue_size: 256, tx_buffers: 256, tx_buf_len: 2048 }
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
    /// Queue rings and tx buffers, mapped for the device like any area.
    mem: Area,
    tx_base: usize,
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

/// Negotiate features; the first step of opening a device.
pub fn negotiate(t: &mut dyn Transport) -> Result<u64, NetError> {
    let offered = t.device_features()?;
    if offered & bit(VIRTIO_F_VERSION_1) == 0 {
        return Err(NetError::NotModern);
    }
    let mut want = offered & SUPPORTED;
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
        let len = page_up(tx_base + cfg.tx_buffers as usize * cfg.tx_buf_len as usize);
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
        let rx = unsafe { SplitQueue::new(size, qmem(0), event_idx)? };
        // SAFETY: as above.
        let tx = unsafe { SplitQueue::new(size, qmem(qlen), event_idx)? };
        let mut dev = Self {
            rx,
            tx,
            tx_free: (0..cfg.tx_buffers).rev().collect(),
            mem,
            tx_base,
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
                self.stats.device_errors += 1;
                self.stop_queues(&mut |_| {});
                Err(NetError::Device { queue: "tx", err })
            }
        }
    }

    /// Stop the device and take every in-flight buffer back (`on_rx` gets each rx token).
    fn stop_queues(&mut self, on_rx: &mut dyn FnMut(u32)) {
        self.transport.stop();
        self.rx.drain_in_flight(|t| on_rx(t));
        let free = &mut self.tx_free;
        self.tx.drain_in_flight(|t| free.push(t as u16));
    }
}

fn queue_addrs(vq: &SplitQueue) -> QueueAddrs {
    QueueAddrs {
        size: vq.size(),
        desc: (vq.desc_vaddr() as u64, vq.desc_addr()),
        avail: (vq.avail_vaddr() as u64, vq.avail_addr()),
        used: (vq.used_vaddr() as u64, vq.used_addr()),
    }
}

/// The receive side of a zero-copy ifq: a virtio-net device whose rx queue is fed with the
/// ifq's niovs. What the kernel is in io_uring zcrx; may run on its own thread.
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

    /// Post free niovs on the rx queue. With a device the refill queue is consumed here, as the
    /// kernel's page pool does: nobody has to call `flush_rq` unless the RQ overflows.
    pub fn refill(&mut self) {
        self.ifq.poll_flush_request();
        let want = self.dev.rx.free_descriptors() as u32;
        if want == 0 || self.dev.rx.is_broken() {
            return;
        }
        if self.ifq.free_count() < want {
            self.ifq.flush_rq();
        }
        let len = self.ifq.area().rx_buf_len();
        let mut added = 0;
        while added < want {
            let Some(i) = self.ifq.take_free() else { break };
            let addr = self.ifq.area().niov_dma(i).expect("a device ifq's area is mapped");
            if self.dev.rx.add(&[Buf { addr, len, device_writable: true }], i).is_err() {
                self.ifq.put_back(i);
                break;
            }
            added += 1;
        }
        if added != 0 {
            self.dev.rx.publish();
            if self.dev.rx.needs_kick() {
                self.dev.transport.notify(RXQ);
                self.dev.stats.kicks += 1;
            }
        }
    }

    /// Reap what the device wrote: one completion per buffer, `{niov offset past the header,
    /// len}` for a frame's first buffer, `ZCRX_CQE_F_CONTD` on all but its last. Then refill.
    pub fn poll(&mut self) -> Result<RxPoll, NetError> {
        let space = self.ifq.cq_space() as usize;
        let mut out = RxPoll { cq_full: space == 0, ..Default::default() };
        let mrg = self.dev.mrg_rxbuf();
        let max_bufs = self.dev.rx.size();
        let Self { dev, ifq, pending, .. } = self;
        let mut bad_header = None;
        let r = dev.rx.poll_used(space, |u| {
            let i = u.token;
            if bad_header.is_some() {
                // After a violation nothing more is trusted: hand the buffer back unused.
                ifq.put_back(i);
                return;
            }
            let (off, len) = if *pending == 0 {
                if (u.len as usize) < NET_HDR_LEN {
                    bad_header = Some(format!("used length {} is shorter than the virtio-net header", u.len));
                    ifq.put_back(i);
                    return;
                }
                let nbufs = if mrg {
                    let p = ifq.area().niov_ptr(i);
                    // SAFETY: the device returned buffer i (validated by the virtqueue), so it
                    // is ours and at least NET_HDR_LEN long; num_buffers is at offset 10.
                    u16::from_le(unsafe { std::ptr::read_unaligned(p.add(10) as *const u16) })
                } else {
                    1
                };
                if nbufs == 0 || nbufs > max_bufs {
                    bad_header = Some(format!("num_buffers {nbufs} (queue size {max_bufs})"));
                    ifq.put_back(i);
                    return;
                }
                *pending = nbufs;
                dev.stats.rx_frames += 1;
                (NET_HDR_LEN as u32, u.len - NET_HDR_LEN as u32)
            } else {
                (0, u.len)
            };
            *pending -= 1;
            let flags = if *pending != 0 { ZCRX_CQE_F_CONTD } else { 0 };
            if len == 0 && flags == 0 && off != 0 {
                dev.stats.rx_empty += 1;
                ifq.put_back(i);
                return;
            }
            // Cannot fail: at most `space` entries are reaped.
            let _ = ifq.complete(i, off, len, flags, false);
            dev.stats.rx_bytes += len as u64;
            out.completions += 1;
            out.bytes += len as u64;
        });
        if out.completions != 0 {
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
        self.refill();
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

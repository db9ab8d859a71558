//! The driver's registration helper is all or nothing (patch 3/4 of the zcrx series): it
//! negotiates with the device, gets its DMA context, creates the ifq (area mapped at creation),
//! allocates and maps the queue memory, sets the queues up, reads the config, starts the device
//! and posts buffers. Every step is failed in turn on a fake device; after each failure nothing
//! may be left behind: no DMA mapping, no locked memory, no memlock charge, no file descriptor,
//! no memory mapping, and no device call after the failing one (only teardown).
//!
//! A successful registration maps exactly the area and the queue memory, posts rx buffers whose
//! device addresses name the area's own niovs, and tears down in the right order: a started
//! device is stopped before any of its memory is unmapped (dropping the `NetRx`, or
//! `NetRx::close`). The user's end keeps the area memory readable for buffers it holds.
//!
//! One #[test] only: the resources are process wide (VmLck, the memlock charge counter, the fd
//! table, the address space), so nothing else may run in this process at the same time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use driver::transport::{QueueAddrs, Transport, TransportError};
use driver::{register_ifq, NetConfig, NetError, NetRx, RegisterError};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_WRITE};
use zcrx::uapi::{AREA_MASK, ZCRX_REG_NODEV};
use zcrx::{AreaError, AreaReg, Cqe, DmaError, DmaMap, DmaSegment, IfqReg, IfqUser, MemoryKind, RegError};

const MIB: usize = 1 << 20;
const AREA_LEN: usize = MIB;
const RX_BUF_LEN: u32 = 4096;
use driver::net::RX_HEADROOM;
const DEVICE: &str = "fake-virtio-net 0";
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const OFFER: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_NET_F_MRG_RXBUF
    | 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_RING_F_EVENT_IDX;

// ---------------------------------------------------------------------------------------------
// Process-wide resource snapshot (as in zcrx/tests/unwind.rs).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snap {
    locked: u64,
    charged: u64,
    fds: usize,
    maps: usize,
}

fn snap() -> Snap {
    Snap {
        locked: zcrx::mem::process_locked_bytes().expect("VmLck"),
        charged: zcrx::memlock::charged_bytes(),
        fds: std::fs::read_dir("/proc/self/fd").expect("read /proc/self/fd").count(),
        maps: std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps").lines().count(),
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
// The fake device: a transport and its DMA context sharing one state and one event log.

/// Where the fake device fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailAt {
    DeviceFeatures,
    SetFeatures,
    /// The k-th `DmaMap::map` call (0: the area, 1: the queue memory).
    Map(usize),
    MaxQueueSize,
    SetupQueue(u16),
    /// `read_config` fails with a device error (the device is there but broken).
    ReadConfig,
    /// `read_config` is not supported (like a vhost-user backend without the CONFIG feature).
    ReadConfigUnsupported,
    Start,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    DeviceFeatures,
    SetFeatures(u64),
    Map { iova: u64, len: usize },
    MaxQueueSize(u16),
    SetupQueue(u16),
    ReadConfig,
    Start,
    Notify(u16),
    Stop,
    Unmap { iova: u64, len: usize },
    Dropped,
    /// The injected failure happened here (the call it names is logged just before).
    Failed(FailAt),
}

impl Ev {
    /// Calls that move registration forward; none may follow a failure.
    fn is_forward(&self) -> bool {
        !matches!(self, Ev::Stop | Ev::Unmap { .. } | Ev::Dropped | Ev::Failed(_))
    }
}

#[derive(Debug, Clone, Copy)]
struct Mapped {
    len: usize,
    vaddr: usize,
    fd_off: u64,
}

#[derive(Default)]
struct State {
    fail: Option<FailAt>,
    log: Vec<Ev>,
    /// iova -> what is mapped there now.
    mapped: BTreeMap<u64, Mapped>,
    /// Every range ever mapped, in order (for the success checks).
    history: Vec<(u64, Mapped)>,
    next_iova: u64,
    map_calls: usize,
    features: Option<u64>,
    /// Started and not stopped since.
    running: bool,
    started_ever: bool,
    queues: BTreeMap<u16, QueueAddrs>,
    /// Misuse seen by the device (unmapping running memory, unknown ranges, bad addresses...).
    errors: Vec<String>,
}

impl State {
    /// Process address of `len` bytes at device address `iova`, if one mapping holds them all.
    fn translate(&self, iova: u64, len: usize) -> Option<usize> {
        let (&base, m) = self.mapped.range(..=iova).next_back()?;
        (iova + len as u64 <= base + m.len as u64).then(|| m.vaddr + (iova - base) as usize)
    }
    fn failed(&mut self, at: FailAt) -> bool {
        if self.fail == Some(at) {
            self.log.push(Ev::Failed(at));
            true
        } else {
            false
        }
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// The device's DMA context: shares memory by fd (like vhost-user), hands out IOVAs from a bump
/// allocator with holes between ranges, records what is mapped.
struct FakeDma(Shared);

impl DmaMap for FakeDma {
    fn map(&self, seg: DmaSegment<'_>) -> Result<u64, DmaError> {
        let mut s = lock(&self.0);
        let k = s.map_calls;
        s.map_calls += 1;
        let Some((_, fd_off)) = seg.fd else {
            return Err(DmaError::new(
                "the fake device shares memory by file descriptor: the area must be fd-backed \
                 (memfd or hugetlb memfd), not anonymous",
            ));
        };
        if s.failed(FailAt::Map(k)) {
            return Err(DmaError::new(format!("map call {k}: injected failure")));
        }
        if seg.len == 0 || seg.vaddr as usize % 4096 != 0 {
            s.errors.push(format!("map of {} bytes at {:p}", seg.len, seg.vaddr));
        }
        let iova = s.next_iova;
        s.next_iova += (seg.len as u64).next_multiple_of(2 * MIB as u64) + 2 * MIB as u64;
        let m = Mapped { len: seg.len, vaddr: seg.vaddr as usize, fd_off };
        s.mapped.insert(iova, m);
        s.history.push((iova, m));
        s.log.push(Ev::Map { iova, len: seg.len });
        Ok(iova)
    }

    fn unmap(&self, iova: u64, len: usize) -> Result<(), DmaError> {
        let mut s = lock(&self.0);
        s.log.push(Ev::Unmap { iova, len });
        if s.running {
            s.errors.push(format!("unmap of {iova:#x}+{len} while the device runs (stop() not called first)"));
        }
        match s.mapped.remove(&iova) {
            Some(m) if m.len == len => Ok(()),
            Some(m) => {
                s.errors.push(format!("unmap {iova:#x} with len {len}, mapped with {}", m.len));
                s.mapped.insert(iova, m);
                Err(DmaError::new("length mismatch"))
            }
            None => {
                s.errors.push(format!("unmap of {iova:#x}+{len} that is not mapped"));
                Err(DmaError::new("not mapped"))
            }
        }
    }
}

struct FakeDevice {
    s: Shared,
    dma: Arc<FakeDma>,
}

fn fake(fail: Option<FailAt>) -> (Box<dyn Transport>, Shared) {
    let s: Shared = Arc::new(Mutex::new(State { fail, next_iova: 1 << 32, ..Default::default() }));
    (Box::new(FakeDevice { s: s.clone(), dma: Arc::new(FakeDma(s.clone())) }), s)
}

fn injected(step: &'static str) -> TransportError {
    TransportError::device(step, "injected failure")
}

impl Transport for FakeDevice {
    fn describe(&self) -> String {
        DEVICE.into()
    }
    fn device_features(&mut self) -> Result<u64, TransportError> {
        let mut s = lock(&self.s);
        s.log.push(Ev::DeviceFeatures);
        if s.failed(FailAt::DeviceFeatures) {
            return Err(injected("device_features"));
        }
        Ok(OFFER)
    }
    fn set_features(&mut self, features: u64) -> Result<(), TransportError> {
        let mut s = lock(&self.s);
        s.log.push(Ev::SetFeatures(features));
        if s.failed(FailAt::SetFeatures) {
            return Err(injected("set_features"));
        }
        if features & !OFFER != 0 {
            s.errors.push(format!("accepted features {features:#x} not offered ({OFFER:#x})"));
        }
        s.features = Some(features);
        Ok(())
    }
    fn dma(&self) -> Arc<dyn DmaMap> {
        self.dma.clone()
    }
    fn translates_addresses(&self) -> bool {
        false
    }
    fn max_queue_size(&mut self, q: u16) -> Result<u16, TransportError> {
        let mut s = lock(&self.s);
        s.log.push(Ev::MaxQueueSize(q));
        if s.failed(FailAt::MaxQueueSize) {
            return Err(injected("max_queue_size"));
        }
        Ok(1024)
    }
    fn setup_queue(&mut self, q: u16, a: &QueueAddrs) -> Result<(), TransportError> {
        let mut s = lock(&self.s);
        s.log.push(Ev::SetupQueue(q));
        if s.failed(FailAt::SetupQueue(q)) {
            return Err(TransportError::device("setup_queue", format!("queue {q}: injected failure")));
        }
        if s.features.is_none() {
            s.errors.push(format!("queue {q} set up before features were accepted"));
        }
        // Every part of the queue must be mapped, and its device address must name the very
        // bytes the driver's virtual address names.
        let n = a.size as usize;
        for (part, (vaddr, iova), len) in [("desc", a.desc, 16 * n), ("avail", a.avail, 6 + 2 * n), ("used", a.used, 6 + 8 * n)] {
            match s.translate(iova, len) {
                Some(v) if v as u64 == vaddr => {}
                other => s.errors.push(format!(
                    "queue {q} {part}: device address {iova:#x} (+{len}) maps to {other:x?}, driver says {vaddr:#x}"
                )),
            }
        }
        s.queues.insert(q, *a);
        Ok(())
    }
    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), TransportError> {
        let mut s = lock(&self.s);
        s.log.push(Ev::ReadConfig);
        if s.failed(FailAt::ReadConfig) {
            return Err(injected("read_config"));
        }
        if s.failed(FailAt::ReadConfigUnsupported) {
            return Err(TransportError::Unsupported("the fake device has no config space".into()));
        }
        for (k, b) in buf.iter_mut().enumerate() {
            *b = MAC.get(offset as usize + k).copied().unwrap_or(0);
        }
        Ok(())
    }
    fn start(&mut self) -> Result<(), TransportError> {
        let mut s = lock(&self.s);
        s.log.push(Ev::Start);
        if s.failed(FailAt::Start) {
            return Err(injected("start"));
        }
        if !s.queues.contains_key(&0) || !s.queues.contains_key(&1) {
            let m = format!("started with queues {:?} set up", s.queues.keys().collect::<Vec<_>>());
            s.errors.push(m);
        }
        s.running = true;
        s.started_ever = true;
        Ok(())
    }
    fn notify(&self, q: u16) {
        let mut s = lock(&self.s);
        s.log.push(Ev::Notify(q));
        if !s.running {
            s.errors.push(format!("queue {q} kicked while the device is not running"));
        }
    }
    fn is_alive(&self) -> bool {
        true
    }
    fn stop(&mut self) {
        let mut s = lock(&self.s);
        s.log.push(Ev::Stop);
        s.running = false;
    }
}

impl Drop for FakeDevice {
    fn drop(&mut self) {
        let mut s = lock(&self.s);
        s.log.push(Ev::Dropped);
        if s.running {
            s.errors.push("transport dropped while the device runs (never stopped)".into());
        }
    }
}

/// After a registration attempt: the device saw no misuse and holds no mapping; a started
/// device was stopped before the first unmap after its start.
#[track_caller]
fn assert_device_clean(s: &Shared, what: &str) {
    let st = lock(s);
    assert!(st.errors.is_empty(), "{what}: the device saw misuse: {:#?}\nlog: {:?}", st.errors, st.log);
    assert!(st.mapped.is_empty(), "{what}: DMA ranges still mapped: {:x?}", st.mapped);
    assert!(!st.running, "{what}: device still running");
    let maps = st.log.iter().filter(|e| matches!(e, Ev::Map { .. })).count();
    let unmaps = st.log.iter().filter(|e| matches!(e, Ev::Unmap { .. })).count();
    assert_eq!(maps, unmaps, "{what}: every successful map() needs exactly one unmap(); log {:?}", st.log);
    // The first start() that succeeded (a failed one is followed by its Failed event).
    let started = (0..st.log.len()).find(|&k| st.log[k] == Ev::Start && st.log.get(k + 1) != Some(&Ev::Failed(FailAt::Start)));
    if let Some(start) = started {
        let stop = st.log[start..].iter().position(|e| *e == Ev::Stop).map(|k| k + start);
        let first_unmap = st.log[start..].iter().position(|e| matches!(e, Ev::Unmap { .. })).map(|k| k + start);
        match (stop, first_unmap) {
            (Some(a), Some(b)) => assert!(a < b, "{what}: stop() after the first unmap: {:?}", st.log),
            (None, Some(_)) => panic!("{what}: started device never stopped before unmapping: {:?}", st.log),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------

fn reg() -> IfqReg {
    IfqReg { if_idx: 0, if_rxq: 0, rq_entries: 256, cq_entries: 0, flags: 0, rx_buf_len: RX_BUF_LEN, resv: [0; 2] }
}

fn area() -> AreaReg {
    AreaReg::new(MemoryKind::Memfd, AREA_LEN)
}

fn cfg() -> NetConfig {
    NetConfig::default()
}

/// Queue memory the driver allocates for `cfg` (both rings plus tx buffers, page rounded).
fn queue_mem_len(cfg: NetConfig) -> usize {
    let l = driver::virtqueue::layout(cfg.queue_size, true);
    let page = zcrx::mem::page_size();
    (2 * l.total_len.next_multiple_of(page) + cfg.tx_buffers as usize * cfg.tx_buf_len as usize).next_multiple_of(page)
}

fn expect_failure(at: FailAt, err: &RegisterError) -> Result<(), String> {
    let msg = err.to_string();
    let ok = match at {
        FailAt::Map(0) => {
            matches!(err, RegisterError::Ifq(zcrx::Error::Area(AreaError::Map { segment: 0, .. })))
                && msg.contains("DMA mapping")
                && msg.contains("map call 0")
        }
        FailAt::Map(k) => {
            matches!(err, RegisterError::Device { source: NetError::Memory(AreaError::Map { segment: 0, .. }), .. })
                && msg.contains(DEVICE)
                && msg.contains("driver memory")
                && msg.contains(&format!("map call {k}"))
        }
        _ => {
            let step = match at {
                FailAt::DeviceFeatures => "device_features",
                FailAt::SetFeatures => "set_features",
                FailAt::MaxQueueSize => "max_queue_size",
                FailAt::SetupQueue(_) => "setup_queue",
                FailAt::ReadConfig | FailAt::ReadConfigUnsupported => "read_config",
                FailAt::Start => "start",
                FailAt::Map(_) => unreachable!(),
            };
            matches!(err, RegisterError::Device { source: NetError::Transport(TransportError::Device { step: s, .. }), .. } if *s == step)
                && msg.contains(DEVICE)
                && msg.contains(step)
                && !matches!(at, FailAt::SetupQueue(q) if !msg.contains(&format!("queue {q}")))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!("failing at {at:?}: unexpected error {err:?} ({msg})"))
    }
}

/// What the device did up to and including the failure, as far as the forward calls go.
fn assert_stopped_at(s: &Shared, at: FailAt, what: &str) {
    let st = lock(s);
    let pos = st
        .log
        .iter()
        .position(|e| *e == Ev::Failed(at))
        .unwrap_or_else(|| panic!("{what}: the failure was never reached; log {:?}", st.log));
    let after: Vec<_> = st.log[pos + 1..].iter().filter(|e| e.is_forward()).collect();
    assert!(after.is_empty(), "{what}: device calls after the failure: {after:?}; log {:?}", st.log);
    assert!(!st.started_ever, "{what}: the device was started");
}

/// The device side of one frame on the rx queue: take the next avail buffer, write a
/// virtio-net header (num_buffers 1) and `payload` into it, put it in the used ring.
fn device_delivers(s: &Shared, avail_pos: u16, payload: &[u8]) {
    let st = lock(s);
    let q = st.queues[&0];
    let size = q.size as usize;
    // SAFETY (all raw accesses): the queue memory is mapped for as long as the NetRx lives;
    // offsets are inside the split-ring layout of `size` entries, naturally aligned.
    unsafe {
        let at16 = |a: u64| AtomicU16::from_ptr(a as *mut u16);
        let at32 = |a: u64| AtomicU32::from_ptr(a as *mut u32);
        let avail_idx = at16(q.avail.0 + 2).load(Ordering::Acquire);
        assert_ne!(avail_idx, avail_pos, "no rx buffer posted");
        let head = at16(q.avail.0 + 4 + 2 * (avail_pos as usize % size) as u64).load(Ordering::Relaxed);
        let d = q.desc.0 + 16 * head as u64;
        let addr = AtomicU64::from_ptr(d as *mut u64).load(Ordering::Relaxed);
        let len = at32(d + 8).load(Ordering::Relaxed);
        let total = 12 + payload.len();
        assert!(total <= len as usize);
        let p = st.translate(addr, total).expect("rx buffer not mapped") as *mut u8;
        let mut hdr = [0u8; 12];
        hdr[10] = 1;
        std::ptr::copy_nonoverlapping(hdr.as_ptr(), p, 12);
        std::ptr::copy_nonoverlapping(payload.as_ptr(), p.add(12), payload.len());
        let used_idx = at16(q.used.0 + 2).load(Ordering::Relaxed);
        let e = q.used.0 + 4 + 8 * (used_idx as usize % size) as u64;
        at32(e).store(head as u32, Ordering::Relaxed);
        at32(e + 4).store(total as u32, Ordering::Relaxed);
        at16(q.used.0 + 2).store(used_idx.wrapping_add(1), Ordering::Release);
    }
}

/// Register successfully and check what the device was given: exactly the area and the queue
/// memory mapped, rx buffers posted whose device addresses name the area's own niovs. Then one
/// frame is received and held by the user.
fn register_ok(start: Snap, what: &str) -> (NetRx, IfqUser, Shared, Cqe, Vec<u8>) {
    let (t, s) = fake(None);
    let (mut rx, mut user) = register_ifq(t, reg(), area(), cfg()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let qlen = queue_mem_len(cfg());
    {
        let st = lock(&s);
        assert!(st.errors.is_empty(), "{what}: device saw misuse: {:?}", st.errors);
        assert!(st.running, "{what}: device not started");
        assert_eq!(st.features, Some(OFFER), "{what}: every offered feature is supported");
        // Exactly two ranges were mapped: the area, then the queue memory; both still are.
        let area_base = user.memory().ptr().as_ptr() as usize;
        let rxq = st.queues[&0];
        assert_eq!(st.history.len(), 2, "{what}: mapped ranges {:x?}", st.history);
        assert_eq!(st.mapped.len(), 2);
        let (area_iova, a) = st.history[0];
        assert_eq!((a.vaddr, a.len, a.fd_off), (area_base, AREA_LEN, 0), "{what}: first mapping is the area");
        let (_, m) = st.history[1];
        assert_eq!((m.vaddr as u64, m.len, m.fd_off), (rxq.desc.0, qlen, 0), "{what}: second mapping is the queue memory");
        for (iova, m) in &st.history {
            assert!(st.mapped.get(iova).is_some_and(|n| n.len == m.len && n.vaddr == m.vaddr));
        }

        // Every posted rx descriptor: device-writable, one whole niov, a distinct niov.
        let posted = rx.ifq().posted_count();
        assert!(posted > 0, "{what}: no rx buffer posted");
        // SAFETY: as in `device_delivers`; the device is ours and idle.
        let avail_idx = unsafe { AtomicU16::from_ptr((rxq.avail.0 + 2) as *mut u16).load(Ordering::Acquire) };
        assert_eq!(avail_idx as u32, posted, "{what}: every posted niov is published");
        let mut seen = std::collections::HashSet::new();
        for pos in 0..avail_idx as u64 {
            // SAFETY: as above.
            let (addr, len, flags) = unsafe {
                let head = AtomicU16::from_ptr((rxq.avail.0 + 4 + 2 * pos) as *mut u16).load(Ordering::Relaxed);
                let d = rxq.desc.0 + 16 * head as u64;
                (
                    AtomicU64::from_ptr(d as *mut u64).load(Ordering::Relaxed),
                    AtomicU32::from_ptr((d + 8) as *mut u32).load(Ordering::Relaxed),
                    AtomicU16::from_ptr((d + 12) as *mut u16).load(Ordering::Relaxed),
                )
            };
            assert_eq!((len, flags), (RX_BUF_LEN - RX_HEADROOM, VRING_DESC_F_WRITE as u16), "{what}: rx descriptor {pos}");
            assert!(addr >= area_iova && addr + len as u64 <= area_iova + AREA_LEN as u64, "{what}: rx buffer outside the area");
            assert_eq!((addr - area_iova) % RX_BUF_LEN as u64, RX_HEADROOM as u64, "{what}: rx buffer not a niov past the headroom");
            assert!(seen.insert(addr), "{what}: niov at {addr:#x} posted twice");
        }
        let notifies = st.log.iter().filter(|e| matches!(e, Ev::Notify(0))).count() as u64;
        drop(st);
        assert_eq!(rx.device().stats().kicks, notifies, "{what}: kicks counted");
        assert_eq!(rx.device().mac(), Some(MAC), "{what}: MAC read from config space");
    }
    let live = snap();
    assert_eq!(live.locked, start.locked + (AREA_LEN + qlen) as u64, "{what}: area and queue memory locked");
    assert_eq!(live.charged, start.charged + (AREA_LEN + qlen) as u64, "{what}: area and queue memory charged");

    // One frame, received and held by the user.
    let payload: Vec<u8> = (0..1500u32).map(|k| (k * 13 + 7) as u8).collect();
    device_delivers(&s, 0, &payload);
    let r = rx.poll().unwrap_or_else(|e| panic!("{what}: poll: {e}"));
    assert_eq!((r.completions, r.bytes), (1, payload.len() as u64), "{what}");
    let mut c = [Cqe::default(); 4];
    assert_eq!(user.recv(&mut c), 1, "{what}: one completion");
    assert_eq!(c[0].area_offset() % RX_BUF_LEN as u64, 64, "{what}: data after the headroom and the virtio-net header");
    assert_eq!(c[0].off & !AREA_MASK, user.area_token());
    assert_eq!(user.data(&c[0]).unwrap(), &payload[..], "{what}: data in place");
    (rx, user, s, c[0], payload)
}

/// Teardown of a registered queue: `close` (or drop) stops the device before unmapping and
/// releases every mapping, lock and charge; the user's held buffer stays readable until the
/// user's end goes too.
fn teardown(start: Snap, use_close: bool) {
    let what = if use_close { "NetRx::close" } else { "drop(NetRx)" };
    let (rx, user, s, c, payload) = register_ok(start, what);
    let log_len = lock(&s).log.len();
    if use_close {
        let stats = rx.close();
        assert_eq!((stats.zc_count, stats.zc_bytes), (1, payload.len() as u64), "{what}: stats");
    } else {
        drop(rx);
    }
    {
        let st = lock(&s);
        let tail = &st.log[log_len..];
        assert_eq!(tail.first(), Some(&Ev::Stop), "{what}: the device is stopped first: {tail:?}");
        assert!(tail.contains(&Ev::Dropped), "{what}: transport dropped: {tail:?}");
        assert_eq!(tail.iter().filter(|e| matches!(e, Ev::Unmap { .. })).count(), 2, "{what}: {tail:?}");
    }
    assert_device_clean(&s, what);
    assert!(user.is_closed(), "{what}: the user sees the close");
    let mid = snap();
    assert_eq!(mid.locked, start.locked, "{what}: unlocked once the NetRx is gone");
    assert_eq!(mid.charged, start.charged, "{what}: uncharged once the NetRx is gone");
    assert_eq!(user.data(&c).unwrap(), &payload[..], "{what}: a held buffer stays readable");
    drop(user);
    assert_clean(start, &format!("{what}, both ends dropped"));
}

#[test]
fn register_ifq_is_all_or_nothing() {
    // Warm up what the first registration allocates once per process (allocator arenas,
    // thread-locals), so the baseline below is the steady state.
    {
        let start = snap();
        drop(register_ok(start, "warm-up"));
        let (t, _) = fake(Some(FailAt::Start));
        assert!(register_ifq(t, reg(), area(), cfg()).is_err());
    }
    let start = snap();
    // Behaviour that differs from the design; collected so that every case runs.
    let mut bugs: Vec<String> = Vec::new();

    // ---- every step fails in turn ------------------------------------------------------------
    let points = [
        FailAt::DeviceFeatures,
        FailAt::SetFeatures,
        FailAt::Map(0),
        FailAt::MaxQueueSize,
        FailAt::Map(1),
        FailAt::SetupQueue(0),
        FailAt::SetupQueue(1),
        FailAt::ReadConfig,
        FailAt::Start,
    ];
    for at in points {
        let what = format!("failing at {at:?}");
        let (t, s) = fake(Some(at));
        match register_ifq(t, reg(), area(), cfg()) {
            Ok((rx, user)) => {
                bugs.push(format!("{what}: registration succeeded (the failure was ignored)"));
                drop((rx, user));
            }
            Err(e) => {
                if let Err(m) = expect_failure(at, &e) {
                    bugs.push(m);
                }
                assert_stopped_at(&s, at, &what);
            }
        }
        assert_device_clean(&s, &what);
        assert_clean(start, &what);
    }

    // A device without config space (vhost-user without CONFIG) is fine: no MAC, no error.
    {
        let what = "read_config unsupported";
        let (t, s) = fake(Some(FailAt::ReadConfigUnsupported));
        let (mut rx, user) = register_ifq(t, reg(), area(), cfg()).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(rx.device().mac(), None, "{what}");
        assert!(rx.ifq().posted_count() > 0);
        drop((rx, user));
        assert_device_clean(&s, what);
        assert_clean(start, what);
    }

    // ---- success and teardown ----------------------------------------------------------------
    teardown(start, false);
    teardown(start, true);

    // ---- rejections --------------------------------------------------------------------------
    // Anonymous memory cannot be shared by fd: a clear error, nothing kept.
    {
        let what = "anonymous area";
        let (t, s) = fake(None);
        let err = register_ifq(t, reg(), AreaReg::new(MemoryKind::Anonymous, AREA_LEN), cfg()).map(|_| ()).unwrap_err();
        assert!(
            matches!(err, RegisterError::Ifq(zcrx::Error::Area(AreaError::Map { segment: 0, .. }))),
            "{what}: {err:?}"
        );
        assert!(err.to_string().contains("fd-backed"), "{what}: error must name fd-backed memory: {err}");
        {
            let st = lock(&s);
            assert_eq!(st.map_calls, 1, "{what}");
            assert!(!st.log.iter().any(|e| matches!(e, Ev::SetupQueue(_) | Ev::Start | Ev::Map { .. })), "{what}: {:?}", st.log);
        }
        assert_device_clean(&s, what);
        assert_clean(start, what);
    }
    // The device has one rx queue.
    {
        let what = "if_rxq 1";
        let (t, s) = fake(None);
        let err = register_ifq(t, IfqReg { if_rxq: 1, ..reg() }, area(), cfg()).map(|_| ()).unwrap_err();
        assert!(matches!(err, RegisterError::NoSuchQueue(1)), "{what}: {err:?}");
        assert!(lock(&s).log.iter().all(|e| *e == Ev::Dropped), "{what}: device touched: {:?}", lock(&s).log);
        assert_eq!(lock(&s).map_calls, 0);
        assert_device_clean(&s, what);
        assert_clean(start, what);
    }
    // NODEV together with a device, and other invalid registrations: rejected before the device
    // is touched (validation first, as the kernel's io_register_zcrx_ifq does), nothing mapped.
    for (what, bad, expect) in [
        ("NODEV with a device", IfqReg { flags: ZCRX_REG_NODEV, ..reg() }, RegError::NodevWithDma),
        ("rq_entries 0", IfqReg { rq_entries: 0, ..reg() }, RegError::ZeroRqEntries),
        ("rx_buf_len 1000", IfqReg { rx_buf_len: 1000, ..reg() }, RegError::BadBufLen(1000)),
    ] {
        let (t, s) = fake(None);
        let err = register_ifq(t, bad, area(), cfg()).map(|_| ()).unwrap_err();
        match &err {
            RegisterError::Ifq(zcrx::Error::Reg(e)) if *e == expect => {}
            _ => panic!("{what}: expected {expect:?}, got {err:?}"),
        }
        {
            let st = lock(&s);
            assert_eq!(st.map_calls, 0, "{what}: memory mapped before validation");
            assert!(!st.log.iter().any(|e| matches!(e, Ev::SetupQueue(_) | Ev::Start)), "{what}: {:?}", st.log);
            let touched: Vec<_> = st.log.iter().filter(|e| e.is_forward()).collect();
            if !touched.is_empty() {
                bugs.push(format!("{what}: rejected only after talking to the device: {touched:?}"));
            }
        }
        assert_device_clean(&s, what);
        assert_clean(start, what);
    }

    assert_clean(start, "end");
    assert!(bugs.is_empty(), "registration deviates from the design:\n  {}", bugs.join("\n  "));
}

//! The control plane: a `VhostUserBackend` for one frontend connection.
//!
//! vhost-user-backend handles the protocol and the vrings; this type answers
//! features/config, refuses ACCESS_PLATFORM, and starts/stops the poll
//! thread: the first `handle_event` after a vring becomes ready and enabled
//! starts it (there is no "device started" callback), `stop_vring`
//! (GET_VRING_BASE) and `reset_device` stop it and hand the ring indices
//! back.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::EventFd;

use crate::engine::{self, Engine, RunCtx, F_MRG_RXBUF, F_VERSION_1};
use crate::stats::Shared;

pub(crate) const F_MAC: u64 = 1 << 5;
pub(crate) const F_EVENT_IDX: u64 = 1 << 29;
pub(crate) const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub(crate) const F_ACCESS_PLATFORM: u64 = 1 << 33;
pub(crate) const F_IN_ORDER: u64 = 1 << 35;

/// Offered virtio features. ACCESS_PLATFORM is offered only so that a
/// frontend asking for it gets a clear refusal instead of a generic
/// "invalid parameter" (see [`ACCESS_PLATFORM_ERROR`]). QEMU refuses at
/// init any backend that offers it without the REPLY_ACK and BACKEND_REQ
/// protocol features (even for iommu_platform=off devices), hence
/// BACKEND_REQ in [`protocol_features`]; frontends that do not want
/// ACCESS_PLATFORM (QEMU with iommu_platform=off, DPDK virtio_user) simply
/// do not acknowledge it.
pub(crate) const FEATURES: u64 = F_MAC
    | F_MRG_RXBUF
    | F_EVENT_IDX
    | F_PROTOCOL_FEATURES
    | F_VERSION_1
    | F_ACCESS_PLATFORM
    | F_IN_ORDER;

/// Offered protocol features: CONFIG (the MAC), REPLY_ACK, and BACKEND_REQ
/// (accepted, never used; see [`FEATURES`]).
pub(crate) fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
}

pub(crate) const ACCESS_PLATFORM_ERROR: &str = "the frontend negotiated VIRTIO_F_ACCESS_PLATFORM \
(iommu_platform=on, a guest behind a vIOMMU), but this backend cannot serve it: vhost-user-backend \
does not handle IOTLB messages (no VHOST_USER_PROTOCOL_F_IOTLB), so I/O virtual addresses cannot be \
translated; use iommu_platform=off for this device. Connection closed.";

struct Running {
    handle: JoinHandle<Engine>,
    stop: Arc<AtomicBool>,
}

#[derive(Default)]
struct PollerSlot {
    engine: Option<Engine>,
    running: Option<Running>,
    vrings: Option<Vec<VringRwLock>>,
}

pub(crate) struct NetDevice {
    mac: [u8; 6],
    queue_size: u16,
    shared: Arc<Shared>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    mem_gen: Arc<AtomicU64>,
    seen_gen: Arc<AtomicU64>,
    acked: AtomicU64,
    pub(crate) fatal: AtomicBool,
    poller: Mutex<PollerSlot>,
    wake: Arc<EventFd>,
    sleeping: Arc<AtomicBool>,
    pub(crate) shutdown: Mutex<Option<ShutdownHandle>>,
    backend_req: Mutex<Option<vhost::vhost_user::Backend>>,
}

impl NetDevice {
    pub(crate) fn new(
        mac: [u8; 6],
        queue_size: u16,
        shared: Arc<Shared>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        engine: Engine,
    ) -> io::Result<Self> {
        Ok(NetDevice {
            mac,
            queue_size,
            shared,
            mem,
            mem_gen: Arc::new(AtomicU64::new(0)),
            seen_gen: Arc::new(AtomicU64::new(0)),
            acked: AtomicU64::new(0),
            fatal: AtomicBool::new(false),
            poller: Mutex::new(PollerSlot {
                engine: Some(engine),
                ..Default::default()
            }),
            wake: Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?),
            sleeping: Arc::new(AtomicBool::new(false)),
            shutdown: Mutex::new(None),
            backend_req: Mutex::new(None),
        })
    }

    fn wake_poller(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            let _ = self.wake.write(1);
        }
    }

    fn ensure_running(&self, vrings: Option<&[VringRwLock]>) {
        let mut p = self.poller.lock().unwrap();
        if p.vrings.is_none() {
            if let Some(v) = vrings {
                p.vrings = Some(v.to_vec());
            }
        }
        self.start_locked(&mut p);
    }

    fn start_locked(&self, p: &mut MutexGuard<'_, PollerSlot>) {
        if self.fatal.load(Ordering::SeqCst) {
            return;
        }
        if p.running.is_some() {
            self.wake_poller();
            return;
        }
        let Some(vrings) = p.vrings.clone() else {
            return;
        };
        let any = vrings.iter().any(|v| {
            let st = v.get_ref();
            st.get_queue().ready() && st.is_enabled()
        });
        if !any {
            return;
        }
        let Some(mut engine) = p.engine.take() else {
            return;
        };
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = RunCtx {
            vrings,
            mem: self.mem.clone(),
            mem_gen: self.mem_gen.clone(),
            seen_gen: self.seen_gen.clone(),
            stop: stop.clone(),
            wake: self.wake.clone(),
            sleeping: self.sleeping.clone(),
            features: self.acked.load(Ordering::SeqCst),
        };
        let spawned = std::thread::Builder::new()
            .name("zcrx-nic-poll".into())
            .spawn(move || {
                engine::run(&mut engine, &ctx);
                engine
            });
        match spawned {
            Ok(handle) => p.running = Some(Running { handle, stop }),
            Err(e) => {
                self.shared
                    .set_error(format!("cannot start the poll thread: {e}"));
                tracing::error!("cannot start the poll thread: {e}");
            }
        }
    }

    fn stop_locked(&self, p: &mut MutexGuard<'_, PollerSlot>) {
        if let Some(r) = p.running.take() {
            r.stop.store(true, Ordering::SeqCst);
            let _ = self.wake.write(1);
            match r.handle.join() {
                Ok(e) => p.engine = Some(e),
                Err(_) => {
                    self.shared.set_error("the poll thread panicked".into());
                    tracing::error!("the poll thread panicked");
                }
            }
        }
    }

    /// Stop and join the poll thread (connection over, or device reset).
    pub(crate) fn stop_poller(&self) {
        let mut p = self.poller.lock().unwrap();
        self.stop_locked(&mut p);
    }

    /// Drop the vring handles held for restarts (end of connection).
    pub(crate) fn release(&self) {
        let mut p = self.poller.lock().unwrap();
        self.stop_locked(&mut p);
        p.vrings = None;
    }

    fn config_space(&self) -> [u8; 64] {
        let mut c = [0u8; 64];
        c[..6].copy_from_slice(&self.mac);
        // status: VIRTIO_NET_S_LINK_UP (only meaningful with F_STATUS).
        c[6..8].copy_from_slice(&1u16.to_le_bytes());
        // max_virtqueue_pairs
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        // mtu
        c[10..12].copy_from_slice(&1500u16.to_le_bytes());
        c
    }
}

impl VhostUserBackend for NetDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size as usize
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::SeqCst);
        self.shared.features.store(features, Ordering::Relaxed);
        if features & F_ACCESS_PLATFORM != 0 {
            self.fatal.store(true, Ordering::SeqCst);
            tracing::error!("{ACCESS_PLATFORM_ERROR}");
            self.shared.set_error(ACCESS_PLATFORM_ERROR.into());
            if let Some(h) = self.shutdown.lock().unwrap().as_ref() {
                h.shutdown();
            }
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn set_backend_req_fd(&self, backend: vhost::vhost_user::Backend) {
        // Keep the channel open (closing it makes QEMU tear its end down);
        // nothing is ever sent on it.
        *self.backend_req.lock().unwrap() = Some(backend);
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config_space();
        let (o, s) = (offset as usize, size as usize);
        match o.checked_add(s) {
            Some(end) if end <= 256 => {
                let mut v = vec![0u8; s];
                for (i, b) in v.iter_mut().enumerate() {
                    *b = c.get(o + i).copied().unwrap_or(0);
                }
                v
            }
            _ => Vec::new(),
        }
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // Do not acknowledge the new table while the poll thread may still
        // translate descriptors through the old one.
        let g = self.mem_gen.fetch_add(1, Ordering::SeqCst) + 1;
        if self.poller.lock().unwrap().running.is_some() {
            let _ = self.wake.write(1);
            let end = std::time::Instant::now() + std::time::Duration::from_secs(1);
            while self.seen_gen.load(Ordering::Acquire) < g {
                if std::time::Instant::now() > end {
                    tracing::warn!("poll thread did not switch to the new memory table within 1 s");
                    break;
                }
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        }
        Ok(())
    }

    fn reset_device(&self) {
        self.stop_poller();
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the vring is already marked not ready. Join the
        // poll thread (it writes our indices back into the vring), then keep
        // serving whatever other ring is still running.
        let mut p = self.poller.lock().unwrap();
        self.stop_locked(&mut p);
        self.start_locked(&mut p);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Called on kicks and when a vring becomes ready+enabled: the hook
        // that starts the poll thread. Never return an error: that would end
        // the vring worker thread.
        if (device_event as usize) < vrings.len() {
            self.ensure_running(Some(vrings));
        }
        Ok(())
    }
}

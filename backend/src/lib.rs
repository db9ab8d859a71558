//! A vhost-user-net backend: a software NIC for a vhost-user frontend.
//!
//! [`start`] listens on a Unix socket and serves one frontend at a time
//! (accepting the next one after a disconnect) as a virtio-net device with
//! two queues: **rx** (0) carries frames from this backend to the frontend,
//! **tx** (1) frames from the frontend to this backend. What the device does
//! with them is the [`Mode`]:
//!
//! * [`Mode::Gen`]: writes [`traffic::FrameGen`] frames (seq numbers,
//!   checksums; size range, optional rate and count) into rx as fast as the
//!   frontend posts buffers; frames coming back on tx are counted and, with
//!   `verify_tx`, verified (loopback through an echoing frontend).
//! * [`Mode::Sink`]: consumes tx, counts, optionally verifies.
//! * [`Mode::Reflect`]: every tx frame is sent back on rx (dropped and
//!   counted when the frontend has no rx buffer).
//! * [`Mode::Tap`]: bridges to a tap device.
//!
//! Features offered: VERSION_1, MAC, MRG_RXBUF, EVENT_IDX, IN_ORDER
//! (completions are always in order), PROTOCOL_FEATURES (protocol features
//! CONFIG, REPLY_ACK, BACKEND_REQ), and ACCESS_PLATFORM, which exists only to
//! be refused: vhost-user-backend has no IOTLB support, so a frontend that
//! acknowledges VIRTIO_F_ACCESS_PLATFORM (a guest with iommu_platform=on)
//! gets its connection closed with a clear error in the log and in
//! [`Stats::last_error`]. A frontend must therefore not blindly acknowledge
//! every offered feature. (QEMU refuses a backend that offers
//! ACCESS_PLATFORM without BACKEND_REQ, hence that protocol feature; its
//! channel is accepted and never used.) The config space holds the MAC.
//!
//! The frontend's connection reaches vhost-user-backend through a small
//! relay (src/proxy.rs) that fixes one incompatibility with QEMU: QEMU sends
//! SET_VRING_ENABLE before SET_FEATURES, which the vhost crate rejects by
//! dropping the connection (tests/qemu.rs checks QEMU 7.2's handshake).
//!
//! The control plane is vhost-user-backend/virtio-queue/vm-memory; the
//! per-frame path runs on a busy-polling thread over raw ring memory that is
//! translated once and bounds-checked per descriptor (every address and
//! length from the frontend is untrusted; malformed chains are counted,
//! returned with length 0 and skipped). Used indices are published once per
//! burst; interrupts are sent only when the frontend asks (EVENT_IDX
//! used_event, or !VRING_AVAIL_F_NO_INTERRUPT). No allocation per frame.
//!
//! By hand: `cargo run --release -p zcrx-backend --example nic -- SOCKET gen
//! --len 64` (see examples/nic.rs). Tests: tests/frontend.rs drives it with a
//! hand-written (also malicious) frontend, tests/dpdk.rs with DPDK testpmd's
//! virtio_user (install it with ci/install-dpdk.sh).

mod device;
mod engine;
mod proxy;
mod ring;
mod stats;
mod tap;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use traffic::{FrameGen, FrameVerifier};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub use stats::Stats;

use device::NetDevice;
use engine::{Engine, GenState, ModeState, TapState};
use stats::Shared;

/// The frontend's MAC address used when none is configured (locally
/// administered). Generated frames are addressed to it.
pub const DEFAULT_MAC: [u8; 6] = traffic::frame::DEFAULT_DST_MAC;
/// Source MAC of generated frames by default.
pub const DEFAULT_GEN_SRC_MAC: [u8; 6] = traffic::frame::DEFAULT_SRC_MAC;
/// The 12-byte `virtio_net_hdr_v1` that precedes every frame in the rings.
pub const VIRTIO_NET_HDR_LEN: usize = 12;
/// Virtio features this backend offers (see the crate docs).
pub const OFFERED_FEATURES: u64 = device::FEATURES;

/// Generator settings for [`Mode::Gen`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenConfig {
    /// Frame length range (Ethernet header included, no FCS), 60..=65535.
    pub min_frame_len: usize,
    pub max_frame_len: usize,
    /// Frames per second; `None` = as fast as the frontend posts buffers.
    pub rate: Option<u64>,
    /// Stop after this many frames (per connection); `None` = endless.
    pub count: Option<u64>,
    pub seed: u64,
    /// Source MAC of the frames (the destination is [`BackendConfig::mac`]).
    pub src_mac: [u8; 6],
    /// Verify frames the frontend sends back on tx with the same seed and
    /// length range (for a frontend that echoes, e.g. testpmd io mode).
    pub verify_tx: bool,
    /// Generate this many frames once and send them in a cycle (like testpmd
    /// txonly's template): the per-frame cost is a copy, not a generation.
    /// Receivers then see sequence numbers repeat, so they cannot verify.
    pub template: Option<usize>,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            min_frame_len: 64,
            max_frame_len: 64,
            rate: None,
            count: None,
            seed: 1,
            src_mac: DEFAULT_GEN_SRC_MAC,
            verify_tx: false,
            template: None,
        }
    }
}

/// Settings for [`Mode::Sink`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// Verify every frame with [`FrameVerifier`] (seed and length range must
    /// match the sender's generator); otherwise only count.
    pub verify: bool,
    pub seed: u64,
    pub min_frame_len: usize,
    pub max_frame_len: usize,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            verify: false,
            seed: 1,
            min_frame_len: 64,
            max_frame_len: 64,
        }
    }
}

/// What the device does with frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Gen(GenConfig),
    Sink(SinkConfig),
    Reflect,
    /// Bridge to this tap device (created if absent, brought up).
    Tap(String),
}

/// Backend settings; [`BackendConfig::new`] fills in defaults.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Unix socket to listen on (a stale file there is replaced).
    pub socket: PathBuf,
    pub mode: Mode,
    /// Largest queue size the frontend may choose (power of two, <= 32768).
    pub queue_size: u16,
    /// The device's (frontend's) MAC address, in the config space.
    pub mac: [u8; 6],
    /// How long the poll thread spins idle before asking for kicks and
    /// sleeping.
    pub idle_spin: Duration,
    /// Pin the poll thread to this CPU.
    pub cpu: Option<usize>,
}

impl BackendConfig {
    pub fn new(socket: impl Into<PathBuf>, mode: Mode) -> Self {
        BackendConfig {
            socket: socket.into(),
            mode,
            queue_size: 1024,
            mac: DEFAULT_MAC,
            idle_spin: Duration::from_micros(500),
            cpu: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("cannot open tap device {name}: {source}")]
    Tap { name: String, source: io::Error },
    #[error("cannot start the backend: {0}")]
    Start(io::Error),
}

struct Control {
    stop: AtomicBool,
    stop_efd: EventFd,
    current: Mutex<Option<ShutdownHandle>>,
    current_front: Mutex<Option<UnixStream>>,
}

/// A running backend. [`stop`](Backend::stop) or dropping it closes the
/// connection, joins all threads and removes the socket file.
pub struct Backend {
    socket: PathBuf,
    shared: Arc<Shared>,
    ctl: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Current counters.
    pub fn stats(&self) -> Stats {
        self.shared.snapshot()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Poll [`stats`](Self::stats) until `pred` holds (returns those stats)
    /// or `timeout` passes (returns `Err` with the last stats).
    #[allow(clippy::result_large_err)]
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Stats) -> bool,
    ) -> Result<Stats, Stats> {
        let end = Instant::now() + timeout;
        loop {
            let s = self.stats();
            if pred(&s) {
                return Ok(s);
            }
            if Instant::now() >= end {
                return Err(s);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stop serving, join all threads, return the final counters.
    pub fn stop(mut self) -> Stats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        let Some(t) = self.thread.take() else { return };
        self.ctl.stop.store(true, Ordering::SeqCst);
        let _ = self.ctl.stop_efd.write(1);
        if let Some(h) = self.ctl.current.lock().unwrap().as_ref() {
            h.shutdown();
        }
        if let Some(f) = self.ctl.current_front.lock().unwrap().as_ref() {
            let _ = f.shutdown(std::net::Shutdown::Both);
        }
        let _ = t.join();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn check_len_range(what: &str, min: usize, max: usize) -> Result<(), Error> {
    FrameVerifier::new(0, min, max)
        .map(|_| ())
        .map_err(|e| Error::Config(format!("{what} frame lengths {min}..={max}: {e}")))
}

/// Start a backend listening on `cfg.socket`; it serves frontends on its own
/// threads until stopped.
pub fn start(cfg: BackendConfig) -> Result<Backend, Error> {
    if cfg.queue_size == 0 || !cfg.queue_size.is_power_of_two() || cfg.queue_size > 32768 {
        return Err(Error::Config(format!(
            "queue size {} is not a power of two in 1..=32768",
            cfg.queue_size
        )));
    }
    let mut tap = None;
    match &cfg.mode {
        Mode::Gen(g) => {
            check_len_range("gen", g.min_frame_len, g.max_frame_len)?;
            if g.rate == Some(0) {
                return Err(Error::Config("gen rate 0 frames/s".into()));
            }
        }
        Mode::Sink(s) => check_len_range("sink", s.min_frame_len, s.max_frame_len)?,
        Mode::Reflect => {}
        Mode::Tap(name) => {
            tap = Some(Arc::new(tap::open_tap(name).map_err(|source| {
                Error::Tap {
                    name: name.clone(),
                    source,
                }
            })?));
        }
    }
    let _ = std::fs::remove_file(&cfg.socket);
    let listener = UnixListener::bind(&cfg.socket).map_err(|source| Error::Listen {
        path: cfg.socket.clone(),
        source,
    })?;
    let shared = Arc::new(Shared::default());
    let ctl = Arc::new(Control {
        stop: AtomicBool::new(false),
        stop_efd: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::Start)?,
        current: Mutex::new(None),
        current_front: Mutex::new(None),
    });
    let internal = Internal::new().map_err(Error::Start)?;
    let socket = cfg.socket.clone();
    let (sh, c) = (shared.clone(), ctl.clone());
    let thread = std::thread::Builder::new()
        .name("zcrx-nic".into())
        .spawn(move || serve(listener, internal, cfg, sh, c, tap))
        .map_err(Error::Start)?;
    Ok(Backend {
        socket,
        shared,
        ctl,
        thread: Some(thread),
    })
}

fn mode_state(cfg: &BackendConfig, tap: &Option<Arc<OwnedFd>>) -> ModeState {
    match &cfg.mode {
        Mode::Gen(g) => ModeState::Gen(GenState {
            gen: FrameGen::new(g.seed, cfg.mac, g.src_mac, g.min_frame_len, g.max_frame_len)
                .expect("validated in start()"),
            remaining: g.count,
            rate: g.rate,
            rate_start: None,
            rate_sent: 0,
            verifier: g.verify_tx.then(|| {
                FrameVerifier::new(g.seed, g.min_frame_len, g.max_frame_len)
                    .expect("validated in start()")
            }),
            templates: g.template.map(|k| {
                let gen = FrameGen::new(g.seed, cfg.mac, g.src_mac, g.min_frame_len, g.max_frame_len)
                    .expect("validated in start()");
                (0..k.max(1) as u64)
                    .map(|seq| {
                        let mut f = vec![0u8; gen.len_for(seq)];
                        let _ = gen.write(seq, &mut f);
                        f
                    })
                    .collect()
            }),
            next_template: 0,
        }),
        Mode::Sink(s) => ModeState::Sink {
            verifier: s.verify.then(|| {
                FrameVerifier::new(s.seed, s.min_frame_len, s.max_frame_len)
                    .expect("validated in start()")
            }),
        },
        Mode::Reflect => ModeState::Reflect,
        Mode::Tap(_) => ModeState::Tap(TapState::new(tap.clone().expect("opened in start()"))),
    }
}

/// The private listener vhost-user-backend accepts the relayed connection
/// on (see proxy.rs): a socket in a fresh 0700 directory.
struct Internal {
    dir: PathBuf,
    path: PathBuf,
    listener: Listener,
}

impl Internal {
    fn new() -> io::Result<Internal> {
        use std::os::unix::fs::DirBuilderExt;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "zcrx-nic-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let path = dir.join("vhost.sock");
        let listener = Listener::from(UnixListener::bind(&path)?);
        Ok(Internal {
            dir,
            path,
            listener,
        })
    }
}

impl Drop for Internal {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Accept loop: one frontend at a time, a fresh vhost-user daemon (and
/// generator/verifier state) per connection, reached through the relay in proxy.rs.
fn serve(
    listener: UnixListener,
    mut internal: Internal,
    cfg: BackendConfig,
    shared: Arc<Shared>,
    ctl: Arc<Control>,
    tap: Option<Arc<OwnedFd>>,
) {
    loop {
        {
            // SAFETY: both fds outlive this block.
            let (lfd, sfd) = unsafe {
                (
                    BorrowedFd::borrow_raw(listener.as_raw_fd()),
                    BorrowedFd::borrow_raw(ctl.stop_efd.as_raw_fd()),
                )
            };
            let mut fds = [
                PollFd::new(&lfd, PollFlags::IN),
                PollFd::new(&sfd, PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    shared.set_error(format!("poll on the listening socket: {e}"));
                    return;
                }
            }
            if ctl.stop.load(Ordering::SeqCst) {
                return;
            }
            if !fds[0].revents().contains(PollFlags::IN) {
                continue;
            }
        }
        let front = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("accepting a frontend: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let engine = Engine::new(
            mode_state(&cfg, &tap),
            shared.clone(),
            cfg.idle_spin,
            cfg.cpu,
        );
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let dev = match NetDevice::new(cfg.mac, cfg.queue_size, shared.clone(), mem.clone(), engine)
        {
            Ok(d) => Arc::new(d),
            Err(e) => {
                shared.set_error(format!("cannot create the device: {e}"));
                continue;
            }
        };
        let mut daemon = match VhostUserDaemon::new("zcrx-nic-vhost".into(), dev.clone(), mem) {
            Ok(d) => d,
            Err(e) => {
                shared.set_error(format!("cannot create the vhost-user daemon: {e}"));
                continue;
            }
        };
        // Relay the frontend to the daemon through the private socket.
        let back = match UnixStream::connect(&internal.path) {
            Ok(b) => b,
            Err(e) => {
                shared.set_error(format!("connecting the vhost-user relay: {e}"));
                continue;
            }
        };
        if let Err(e) = daemon.start(&mut internal.listener) {
            shared.set_error(format!("accepting the relayed frontend: {e}"));
            tracing::warn!("accepting the relayed frontend: {e}");
            continue;
        }
        let front_ctl = front.try_clone().ok();
        let relay = std::thread::Builder::new()
            .name("zcrx-nic-relay".into())
            .spawn(move || proxy::relay(front, back));
        shared.connections.fetch_add(1, Ordering::Relaxed);
        shared.connected.store(true, Ordering::Relaxed);
        tracing::info!("frontend connected on {}", cfg.socket.display());
        let handle = daemon.shutdown_handle();
        *dev.shutdown.lock().unwrap() = handle.clone();
        *ctl.current.lock().unwrap() = handle;
        *ctl.current_front.lock().unwrap() = front_ctl.as_ref().and_then(|f| f.try_clone().ok());
        if relay.is_err() || ctl.stop.load(Ordering::SeqCst) || dev.fatal.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        }
        let r = daemon.wait();
        *ctl.current.lock().unwrap() = None;
        *ctl.current_front.lock().unwrap() = None;
        if let Some(f) = &front_ctl {
            let _ = f.shutdown(std::net::Shutdown::Both);
        }
        if let Ok(t) = relay {
            let _ = t.join();
        }
        dev.release();
        shared.connected.store(false, Ordering::Relaxed);
        match r {
            Ok(()) => tracing::info!("frontend disconnected"),
            Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => tracing::info!("frontend disconnected"),
            Err(e) => {
                if !ctl.stop.load(Ordering::SeqCst) && !dev.fatal.load(Ordering::SeqCst) {
                    tracing::warn!("frontend connection ended: {e}");
                    shared.set_error(format!("frontend connection ended: {e}"));
                }
            }
        }
        *dev.shutdown.lock().unwrap() = None;
        drop(daemon);
        if ctl.stop.load(Ordering::SeqCst) {
            return;
        }
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn s<T: Send + Sync>() {}
    s::<Backend>();
}

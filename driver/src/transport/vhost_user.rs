//! The vhost-user transport: our driver is the *frontend* (like DPDK's virtio_user), a backend
//! process is the device. Memory is shared by fd: "DMA mapping" an area means adding its memfd
//! to the backend's memory table at a guest-physical address (GPA) we choose; descriptors carry
//! GPAs, while SET_VRING_ADDR takes our own virtual addresses.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;
use zcrx::{DmaError, DmaMap, DmaSegment};

use super::{QueueAddrs, Transport, TransportError};

/// Feature bit that says the backend speaks vhost-user protocol features.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Where our first memory region goes in the backend's view; regions follow, 2 MiB aligned.
const GPA_BASE: u64 = 1 << 32;
const GPA_ALIGN: u64 = 2 << 20;
/// The spec's (and DPDK's) limit of regions in SET_MEM_TABLE.
const MAX_REGIONS: usize = 8;
/// rx and tx.
const NUM_QUEUES: usize = 2;

fn err(step: &'static str) -> impl FnOnce(vhost::Error) -> TransportError {
    move |e| TransportError::device(step, e)
}

/// One shared memory region of the table.
struct Region {
    gpa: u64,
    len: u64,
    vaddr: u64,
    fd: OwnedFd,
    fd_offset: u64,
}

/// The backend's memory table, kept here so it can be re-sent whole (SET_MEM_TABLE replaces
/// the table) when a region comes or goes, or when we reconnect.
pub struct MemoryTable {
    /// The current connection (replaced on reconnect).
    fe: Mutex<Frontend>,
    regions: Mutex<Vec<Region>>,
    /// Once the device is stopped, unmapping only forgets regions (nobody to tell).
    stopped: std::sync::atomic::AtomicBool,
}

impl MemoryTable {
    fn send(&self, regions: &[Region]) -> Result<(), DmaError> {
        if regions.is_empty() {
            return Ok(());
        }
        let infos: Vec<VhostUserMemoryRegionInfo> = regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.gpa,
                memory_size: r.len,
                userspace_addr: r.vaddr,
                mmap_offset: r.fd_offset,
                mmap_handle: r.fd.as_raw_fd(),
            })
            .collect();
        let fe = self.fe.lock().expect("frontend lock").clone();
        fe.set_mem_table(&infos).map(|_| ()).map_err(|e| DmaError::new(format!("SET_MEM_TABLE: {e}")))
    }
}

impl DmaMap for MemoryTable {
    fn map(&self, seg: DmaSegment<'_>) -> Result<u64, DmaError> {
        let (fd, fd_offset) = seg.fd.ok_or_else(|| {
            DmaError::new(
                "vhost-user shares memory by file descriptor: the area must be fd-backed \
                 (memfd or hugetlb memfd), not anonymous",
            )
        })?;
        let mut regions = self.regions.lock().expect("memory table lock");
        if regions.len() >= MAX_REGIONS {
            return Err(DmaError::new(format!("the vhost-user memory table is full ({MAX_REGIONS} regions)")));
        }
        let gpa = regions.iter().map(|r| (r.gpa + r.len).next_multiple_of(GPA_ALIGN)).max().unwrap_or(GPA_BASE);
        let fd = fd.try_clone_to_owned().map_err(|e| DmaError::new(format!("dup memory fd: {e}")))?;
        regions.push(Region { gpa, len: seg.len as u64, vaddr: seg.vaddr as u64, fd, fd_offset });
        if let Err(e) = self.send(&regions) {
            regions.pop();
            return Err(e);
        }
        Ok(gpa)
    }

    fn unmap(&self, iova: u64, len: usize) -> Result<(), DmaError> {
        let mut regions = self.regions.lock().expect("memory table lock");
        let k = regions
            .iter()
            .position(|r| r.gpa == iova && r.len == len as u64)
            .ok_or_else(|| DmaError::new(format!("no region at GPA {iova:#x}")))?;
        regions.remove(k);
        if self.stopped.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        self.send(&regions)
    }
}

/// A connected vhost-user backend.
pub struct VhostUser {
    path: PathBuf,
    fe: Frontend,
    mem: Arc<MemoryTable>,
    kick: Vec<EventFd>,
    call: Vec<EventFd>,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    started: bool,
    queues_set: bool,
}

impl VhostUser {
    /// Connect to the backend listening on `path` and take ownership of it.
    pub fn connect(path: &Path) -> Result<Self, TransportError> {
        let fe = Self::open(path)?;
        let new_fd = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| TransportError::device("eventfd", e));
        let kick = (0..NUM_QUEUES).map(|_| new_fd()).collect::<Result<Vec<_>, _>>()?;
        let call = (0..NUM_QUEUES).map(|_| new_fd()).collect::<Result<Vec<_>, _>>()?;
        let mem = Arc::new(MemoryTable {
            fe: Mutex::new(fe.clone()),
            regions: Mutex::new(Vec::new()),
            stopped: std::sync::atomic::AtomicBool::new(false),
        });
        Ok(Self {
            path: path.to_owned(),
            fe,
            mem,
            kick,
            call,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            started: false,
            queues_set: false,
        })
    }

    fn open(path: &Path) -> Result<Frontend, TransportError> {
        let fe = Frontend::connect(path, NUM_QUEUES as u64)
            .map_err(|e| TransportError::device("connect", format!("{}: {e}", path.display())))?;
        fe.set_owner().map_err(err("SET_OWNER"))?;
        Ok(fe)
    }

    /// The eventfd the backend signals for queue `q` (interrupt mode).
    pub fn call_fd(&self, q: u16) -> &EventFd {
        &self.call[q as usize]
    }
}

impl Transport for VhostUser {
    fn describe(&self) -> String {
        format!("vhost-user {}", self.path.display())
    }

    fn device_features(&mut self) -> Result<u64, TransportError> {
        self.fe.get_features().map_err(err("GET_FEATURES"))
    }

    fn set_features(&mut self, features: u64) -> Result<(), TransportError> {
        let offered = self.device_features()?;
        let mut f = features;
        if offered & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            f |= VHOST_USER_F_PROTOCOL_FEATURES;
            // The crate wants GET_FEATURES before protocol features, SET_FEATURES after.
            let theirs = self.fe.get_protocol_features().map_err(err("GET_PROTOCOL_FEATURES"))?;
            let want = VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG;
            self.protocol = theirs & want;
            self.fe.set_protocol_features(self.protocol).map_err(err("SET_PROTOCOL_FEATURES"))?;
            if self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Acks only come back when every request asks for one.
                self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        self.fe.set_features(f).map_err(err("SET_FEATURES"))?;
        self.features = f;
        // After a reconnect the new backend gets the memory table we already have.
        let regions = self.mem.regions.lock().expect("memory table lock");
        self.mem.send(&regions).map_err(|e| TransportError::device("SET_MEM_TABLE", e))?;
        Ok(())
    }

    fn dma(&self) -> Arc<dyn DmaMap> {
        self.mem.clone()
    }

    fn translates_addresses(&self) -> bool {
        false
    }

    fn max_queue_size(&mut self, _q: u16) -> Result<u16, TransportError> {
        // vhost-user has no per-queue maximum; the virtio maximum for split rings.
        Ok(32768)
    }

    fn setup_queue(&mut self, q: u16, a: &QueueAddrs) -> Result<(), TransportError> {
        let qi = q as usize;
        if qi >= NUM_QUEUES {
            return Err(TransportError::Unsupported(format!("queue {q}: only rx 0 and tx 1 exist")));
        }
        self.queues_set = true;
        self.fe.set_vring_num(qi, a.size).map_err(err("SET_VRING_NUM"))?;
        // SET_VRING_ADDR takes the frontend's own virtual addresses.
        let cfg = VringConfigData {
            queue_max_size: a.size,
            queue_size: a.size,
            flags: 0,
            desc_table_addr: a.desc.0,
            used_ring_addr: a.used.0,
            avail_ring_addr: a.avail.0,
            log_addr: None,
        };
        self.fe.set_vring_addr(qi, &cfg).map_err(err("SET_VRING_ADDR"))?;
        self.fe.set_vring_base(qi, 0).map_err(err("SET_VRING_BASE"))?;
        self.fe.set_vring_kick(qi, &self.kick[qi]).map_err(err("SET_VRING_KICK"))?;
        self.fe.set_vring_call(qi, &self.call[qi]).map_err(err("SET_VRING_CALL"))?;
        Ok(())
    }

    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), TransportError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(TransportError::Unsupported("the backend has no config space (no CONFIG protocol feature)".into()));
        }
        let zero = vec![0u8; buf.len()];
        let (_, data) = self
            .fe
            .get_config(offset, buf.len() as u32, vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE, &zero)
            .map_err(err("GET_CONFIG"))?;
        if data.len() != buf.len() {
            return Err(TransportError::device("GET_CONFIG", format!("{} bytes instead of {}", data.len(), buf.len())));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    fn start(&mut self) -> Result<(), TransportError> {
        // Set first: a failure half-way still leaves rings to stop.
        self.started = true;
        if self.features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            for q in 0..NUM_QUEUES {
                self.fe.set_vring_enable(q, true).map_err(err("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    fn notify(&self, q: u16) {
        let _ = self.kick[q as usize].write(1);
    }

    fn is_alive(&self) -> bool {
        use rustix::event::{poll, PollFd, PollFlags};
        let fd = self.fe.as_raw_fd();
        // SAFETY: the frontend owns the socket and outlives this call.
        let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let mut pfd = [PollFd::new(&bfd, PollFlags::IN | PollFlags::RDHUP)];
        match poll(&mut pfd, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 })) {
            // The backend never talks first on the main socket: readable means closed.
            Ok(n) => n == 0 || pfd[0].revents().is_empty(),
            Err(_) => false,
        }
    }

    fn reconnect(&mut self) -> Result<(), TransportError> {
        self.stop();
        let fe = Self::open(&self.path)?;
        *self.mem.fe.lock().expect("frontend lock") = fe.clone();
        self.fe = fe;
        self.protocol = VhostUserProtocolFeatures::empty();
        self.features = 0;
        self.mem.stopped.store(false, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn stop(&mut self) {
        // Rings may run from SET_VRING_KICK on (without protocol features), so stop whenever
        // queues were announced, not only after start.
        if (self.started || self.queues_set) && self.is_alive() {
            for q in 0..NUM_QUEUES {
                if self.features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
                    let _ = self.fe.set_vring_enable(q, false);
                }
                // GET_VRING_BASE stops the ring in the backend.
                let _ = self.fe.get_vring_base(q);
            }
        }
        self.started = false;
        self.queues_set = false;
        self.mem.stopped.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for VhostUser {
    fn drop(&mut self) {
        self.stop();
    }
}

//! A small, hand-written vhost-user frontend for tests: memfd guest memory,
//! split rings written by hand (so tests can write malformed descriptors),
//! control plane through `vhost::vhost_user::Frontend`.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub const F_MAC: u64 = 1 << 5;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
pub const F_IN_ORDER: u64 = 1 << 35;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Guest-physical base of the test memory (4 GiB, like QEMU's high memory).
pub const GPA: u64 = 0x1_0000_0000;
pub const MEM_SIZE: usize = 4 << 20;
pub const QSIZE: u16 = 256;
pub const BUF_SIZE: usize = 2048;
/// Offset of the buffer area; buffers `0..512` at `BUF_BASE + i * BUF_SIZE`.
pub const BUF_BASE: usize = 1 << 20;
pub const HDR: usize = 12;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A fresh directory for sockets under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_dir(tag: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!(
        "zcrx-backend-{tag}-{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

/// A socket path inside its own [`TempDir`].
pub struct Sock {
    pub path: PathBuf,
    _dir: TempDir,
}

impl Sock {
    pub fn new(tag: &str) -> Sock {
        let dir = temp_dir(tag);
        Sock {
            path: dir.join("sock"),
            _dir: dir,
        }
    }
}

impl std::ops::Deref for Sock {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    f()
}

/// One split ring in the test memory.
pub struct Ring {
    pub desc: usize,
    pub avail: usize,
    pub used: usize,
    pub avail_idx: u16,
    pub last_used: u16,
}

pub struct Mem {
    pub ptr: *mut u8,
    pub file: File,
}

impl Mem {
    pub fn new() -> Mem {
        // SAFETY: plain memfd_create/ftruncate/mmap; results checked.
        unsafe {
            let fd = libc::memfd_create(c"zcrx-test-guest".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            let file = File::from_raw_fd(fd);
            file.set_len(MEM_SIZE as u64).unwrap();
            let p = libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            Mem {
                ptr: p as *mut u8,
                file,
            }
        }
    }
    pub fn at<T>(&self, off: usize) -> *mut T {
        assert!(off + std::mem::size_of::<T>() <= MEM_SIZE);
        unsafe { self.ptr.add(off) as *mut T }
    }
    /// Guest memory is shared with the backend anyway (like a real guest's).
    #[allow(clippy::mut_from_ref)]
    pub fn slice(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= MEM_SIZE);
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
    pub fn va(&self, off: usize) -> u64 {
        self.ptr as u64 + off as u64
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, MEM_SIZE) };
    }
}

pub struct TestFrontend {
    pub fe: Frontend,
    pub mem: Mem,
    pub rings: [Ring; 2],
    pub kick: [EventFd; 2],
    pub call: [EventFd; 2],
    pub features: u64,
    /// Our end of the backend request channel (kept open, like QEMU).
    pub backend_chan: Option<std::os::unix::net::UnixStream>,
}

pub const RX: usize = 0;
pub const TX: usize = 1;

impl TestFrontend {
    /// Connect (retrying while the backend starts listening).
    pub fn connect_raw(sock: &Path) -> Frontend {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            match Frontend::connect(sock, 2) {
                Ok(f) => return f,
                Err(e) if Instant::now() > end => panic!("connect {}: {e}", sock.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Full handshake with `want` features (masked by what is offered),
    /// both rings configured and enabled.
    pub fn connect(sock: &Path, want: u64) -> TestFrontend {
        Self::connect_with(sock, want, |_, _| {})
    }

    /// Like `connect`, with a hook to tamper with ring addresses:
    /// `tweak(queue, &mut VringConfigData)` before SET_VRING_ADDR.
    pub fn connect_with(
        sock: &Path,
        want: u64,
        tweak: impl FnMut(usize, &mut VringConfigData),
    ) -> TestFrontend {
        Self::handshake(Self::connect_raw(sock), want, tweak)
    }

    /// The handshake on an already connected `Frontend`.
    pub fn handshake(
        mut fe: Frontend,
        want: u64,
        mut tweak: impl FnMut(usize, &mut VringConfigData),
    ) -> TestFrontend {
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        let features = offered & want;
        fe.set_features(features).unwrap();
        let mut backend_chan = None;
        if features & F_PROTOCOL_FEATURES != 0 {
            let pf = fe.get_protocol_features().unwrap();
            // Like QEMU: CONFIG, REPLY_ACK and the backend request channel.
            fe.set_protocol_features(
                pf & (VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::BACKEND_REQ),
            )
            .unwrap();
            if pf.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
                let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
                fe.set_backend_request_fd(&theirs).unwrap();
                backend_chan = Some(ours);
            }
        }
        let mem = Mem::new();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: GPA,
            memory_size: MEM_SIZE as u64,
            userspace_addr: mem.ptr as u64,
            mmap_offset: 0,
            mmap_handle: mem.file.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).unwrap();
        let rings = [0usize, 1].map(|q| {
            let base = q * 0x4000;
            Ring {
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                avail_idx: 0,
                last_used: 0,
            }
        });
        let kick = [0, 1].map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let call = [0, 1].map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap());
        for q in 0..2 {
            let r = &rings[q];
            fe.set_vring_num(q, QSIZE).unwrap();
            let mut c = VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: mem.va(r.desc),
                used_ring_addr: mem.va(r.used),
                avail_ring_addr: mem.va(r.avail),
                log_addr: None,
            };
            tweak(q, &mut c);
            fe.set_vring_addr(q, &c).unwrap();
            fe.set_vring_base(q, 0).unwrap();
            fe.set_vring_call(q, &call[q]).unwrap();
            fe.set_vring_kick(q, &kick[q]).unwrap();
        }
        if features & F_PROTOCOL_FEATURES != 0 {
            for q in 0..2 {
                fe.set_vring_enable(q, true).unwrap();
            }
        }
        TestFrontend {
            fe,
            mem,
            rings,
            kick,
            call,
            features,
            backend_chan,
        }
    }

    pub fn get_config(&mut self, offset: u32, size: u32) -> Vec<u8> {
        let buf = vec![0u8; size as usize];
        let (_, payload) = self
            .fe
            .get_config(offset, size, VhostUserConfigFlags::WRITABLE, &buf)
            .unwrap();
        payload
    }

    pub fn buf_off(i: usize) -> usize {
        BUF_BASE + i * BUF_SIZE
    }

    pub fn buf_gpa(i: usize) -> u64 {
        GPA + Self::buf_off(i) as u64
    }

    /// Write descriptor `idx` of ring `q`.
    pub fn set_desc(&self, q: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.rings[q].desc + 16 * idx as usize;
        unsafe {
            std::ptr::write_volatile(self.mem.at::<u64>(d), addr);
            std::ptr::write_volatile(self.mem.at::<u32>(d + 8), len);
            std::ptr::write_volatile(self.mem.at::<u16>(d + 12), flags);
            std::ptr::write_volatile(self.mem.at::<u16>(d + 14), next);
        }
    }

    /// Put `head` into the avail ring (not yet visible).
    pub fn push_avail(&mut self, q: usize, head: u16) {
        let r = &mut self.rings[q];
        let slot = r.avail + 4 + 2 * (r.avail_idx % QSIZE) as usize;
        unsafe { std::ptr::write_volatile(self.mem.at::<u16>(slot), head) };
        r.avail_idx = r.avail_idx.wrapping_add(1);
    }

    /// Publish the avail index and kick.
    pub fn publish(&self, q: usize) {
        let r = &self.rings[q];
        unsafe { &*(self.mem.at::<AtomicU16>(r.avail + 2)) }.store(r.avail_idx, Ordering::Release);
        self.kick[q].write(1).unwrap();
    }

    /// Store an arbitrary avail index (for tests of malformed rings).
    pub fn set_avail_idx_raw(&self, q: usize, idx: u16) {
        let r = &self.rings[q];
        unsafe { &*(self.mem.at::<AtomicU16>(r.avail + 2)) }.store(idx, Ordering::Release);
        self.kick[q].write(1).unwrap();
    }

    pub fn set_avail_flags(&self, q: usize, flags: u16) {
        let r = &self.rings[q];
        unsafe { &*(self.mem.at::<AtomicU16>(r.avail)) }.store(flags, Ordering::Release);
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        let r = &self.rings[q];
        unsafe { &*(self.mem.at::<AtomicU16>(r.used + 2)) }.load(Ordering::Acquire)
    }

    pub fn used_flags(&self, q: usize) -> u16 {
        let r = &self.rings[q];
        unsafe { &*(self.mem.at::<AtomicU16>(r.used)) }.load(Ordering::Acquire)
    }

    /// Take the used entries published since the last call: (id, len).
    pub fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let idx = self.used_idx(q);
        let r = &mut self.rings[q];
        let mut v = Vec::new();
        while r.last_used != idx {
            let e = r.used + 4 + 8 * (r.last_used % QSIZE) as usize;
            let id = unsafe { std::ptr::read_volatile(self.mem.at::<u32>(e)) };
            let len = unsafe { std::ptr::read_volatile(self.mem.at::<u32>(e + 4)) };
            v.push((id, len));
            r.last_used = r.last_used.wrapping_add(1);
        }
        v
    }

    /// Wait until `n` more used entries are available on `q`; return them.
    pub fn wait_used(&mut self, q: usize, n: usize, timeout: Duration) -> Vec<(u32, u32)> {
        let mut v = Vec::new();
        let end = Instant::now() + timeout;
        while v.len() < n && Instant::now() < end {
            v.extend(self.take_used(q));
            if v.len() < n {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        v
    }

    /// Post tx frame (12-byte zero header + `frame`) in buffer `buf` as a
    /// single descriptor with index `desc`.
    pub fn post_tx(&mut self, desc: u16, buf: usize, frame: &[u8]) {
        let off = Self::buf_off(buf);
        let b = self.mem.slice(off, HDR + frame.len());
        b[..HDR].fill(0);
        b[HDR..].copy_from_slice(frame);
        self.set_desc(
            TX,
            desc,
            Self::buf_gpa(buf),
            (HDR + frame.len()) as u32,
            0,
            0,
        );
        self.push_avail(TX, desc);
    }

    /// Post a device-writable rx buffer of `len` bytes (buffer `buf`, desc `desc`).
    pub fn post_rx(&mut self, desc: u16, buf: usize, len: u32) {
        self.set_desc(RX, desc, Self::buf_gpa(buf), len, DESC_F_WRITE, 0);
        self.push_avail(RX, desc);
    }

    /// The frame in rx buffer `buf` given the used length; checks the header.
    pub fn rx_frame(&self, buf: usize, used_len: u32) -> (u16, Vec<u8>) {
        let b = self.mem.slice(Self::buf_off(buf), used_len as usize);
        assert!(
            b[..10].iter().all(|&x| x == 0),
            "virtio_net_hdr flags/gso must be 0"
        );
        let nbuf = u16::from_le_bytes([b[10], b[11]]);
        (nbuf, b[HDR..].to_vec())
    }
}

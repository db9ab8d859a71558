//! The host's end of the guest NIC's wire: QEMU's `-netdev dgram` over unix datagram sockets.
//!
//! QEMU binds `guest.sock` and sends every frame the guest transmits as one datagram to
//! `host.sock`; every datagram sent to `guest.sock` arrives at the guest NIC as one frame. No
//! headers, no length prefix: a datagram is exactly one Ethernet frame.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Largest frame QEMU passes (it uses a 68 KiB buffer); recv buffers of this size never truncate.
pub const MAX_FRAME: usize = 69632;

/// A host-side Ethernet port wired to the guest NIC. `Send + Sync`: share it with `Arc` and use it
/// from a thread while the VM runs. Dropping it removes its socket directory.
#[derive(Debug)]
pub struct HostPort {
    sock: UnixDatagram,
    dir: PathBuf,
    host: PathBuf,
    guest: PathBuf,
}

impl HostPort {
    /// Creates a private directory under the temp dir and binds `host.sock` in it. Create the port
    /// before starting the VM (pass it to [`crate::VmOpts::host_port`]) so no guest frame is lost.
    pub fn new() -> io::Result<HostPort> {
        static N: AtomicU32 = AtomicU32::new(0);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // Unix socket paths are limited to 108 bytes: keep the directory short.
        let dir = std::env::temp_dir().join(format!(
            "zcrx-vm-{}-{}-{:x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            stamp.subsec_nanos()
        ));
        std::fs::create_dir(&dir)?;
        let host = dir.join("host.sock");
        let guest = dir.join("guest.sock");
        let sock = match UnixDatagram::bind(&host) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        sock.set_nonblocking(true)?;
        // Room for bursts while the host is not reading.
        let size: libc::c_int = 4 << 20;
        // SAFETY: setsockopt with a valid fd and a c_int option value.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &size as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        Ok(HostPort {
            sock,
            dir,
            host,
            guest,
        })
    }

    /// The socket the host receives on (QEMU's `remote.path`).
    pub fn host_path(&self) -> &Path {
        &self.host
    }

    /// The socket QEMU binds (QEMU's `local.path`); frames sent here reach the guest NIC.
    pub fn guest_path(&self) -> &Path {
        &self.guest
    }

    /// The QEMU option for this port: `dgram,id=ID,local.type=unix,local.path=GUEST,remote.type=unix,remote.path=HOST`.
    pub fn netdev_arg(&self, id: &str) -> String {
        format!(
            "dgram,id={id},local.type=unix,local.path={},remote.type=unix,remote.path={}",
            self.guest.display(),
            self.host.display()
        )
    }

    /// True once QEMU has bound the guest socket.
    pub fn guest_attached(&self) -> bool {
        self.guest.exists()
    }

    /// Sends one frame to the guest NIC, waiting up to 1 s for socket space. Fails with
    /// `NotFound`/`ConnectionRefused` while QEMU is not (or no longer) running.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match self.sock.send_to(frame, &self.guest) {
                Ok(n) if n == frame.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "short send {n} of {}",
                        frame.len()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || !self.poll(libc::POLLOUT, left)? {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "guest socket full"));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Receives one frame the guest sent into `buf`, waiting up to `timeout`. `Ok(None)` on timeout.
    /// Frames longer than `buf` are truncated (use [`MAX_FRAME`] to be safe).
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.sock.recv(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || !self.poll(libc::POLLIN, left)? {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Receives one frame as a `Vec`, waiting up to `timeout`.
    pub fn recv_frame(&self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; MAX_FRAME];
        Ok(self.recv(&mut buf, timeout)?.map(|n| {
            buf.truncate(n);
            buf
        }))
    }

    /// Receives frames until one satisfies `pred` (returned) or `timeout` passes (`Ok(None)`);
    /// frames that do not match are dropped.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&[u8]) -> bool,
    ) -> io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(&mut buf, left)? {
                Some(n) if pred(&buf[..n]) => return Ok(Some(buf[..n].to_vec())),
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }

    fn poll(&self, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(r > 0)
    }
}

impl Drop for HostPort {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An Ethernet II frame `dst src ethertype payload`, zero-padded to the 60-byte minimum.
pub fn eth_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len().max(46));
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

/// The header fields and payload of an Ethernet II frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthView<'a> {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ethertype: u16,
    /// Everything after the 14-byte header (including any padding).
    pub payload: &'a [u8],
}

/// Splits an Ethernet II frame, or `None` if it is shorter than 14 bytes.
pub fn eth_parse(frame: &[u8]) -> Option<EthView<'_>> {
    if frame.len() < 14 {
        return None;
    }
    Some(EthView {
        dst: frame[0..6].try_into().ok()?,
        src: frame[6..12].try_into().ok()?,
        ethertype: u16::from_be_bytes([frame[12], frame[13]]),
        payload: &frame[14..],
    })
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_and_recv_through_a_fake_guest() {
        let port = HostPort::new().unwrap();
        // Stand in for QEMU: bind the guest path, send to the host path.
        let fake = UnixDatagram::bind(port.guest_path()).unwrap();
        let f = eth_frame([0xff; 6], [2, 0, 0, 0, 0, 1], 0x88b5, b"hello");
        port.send(&f).unwrap();
        let mut buf = [0u8; 128];
        let n = fake.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &f[..]);
        fake.send_to(&f, port.host_path()).unwrap();
        let got = port
            .recv_matching(Duration::from_secs(2), |fr| {
                eth_parse(fr).unwrap().ethertype == 0x88b5
            })
            .unwrap();
        assert_eq!(got.as_deref(), Some(&f[..]));
        assert_eq!(port.recv_frame(Duration::from_millis(20)).unwrap(), None);
        let dir = port.host_path().parent().unwrap().to_path_buf();
        drop(port);
        assert!(!dir.exists());
    }

    #[test]
    fn send_without_guest_fails() {
        let port = HostPort::new().unwrap();
        assert!(port.send(&[0u8; 60]).is_err());
    }
}

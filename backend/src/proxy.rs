//! A control-plane relay between the frontend's connection and
//! vhost-user-backend's request handler.
//!
//! QEMU (7.2 at least) sends `VHOST_USER_SET_VRING_ENABLE` for a
//! vhost-user-net device when virtio-net resets, which happens before the
//! guest driver has negotiated features and so before any
//! `VHOST_USER_SET_FEATURES`: QEMU treats VHOST_USER_F_PROTOCOL_FEATURES as
//! negotiated as soon as the backend offers it. The vhost crate's request
//! handler instead requires it acknowledged by SET_FEATURES, answers
//! "inactive feature" and drops the connection, so QEMU could not use this
//! backend at all. This relay forwards every message unchanged (file
//! descriptors included) and, when SET_VRING_ENABLE arrives before any
//! SET_FEATURES acknowledged PROTOCOL_FEATURES, first injects
//! `SET_FEATURES(VHOST_USER_F_PROTOCOL_FEATURES)` (without NEED_REPLY, so no
//! reply comes back): exactly the state QEMU assumes. The frontend's own
//! SET_FEATURES later replaces it. Only the control plane passes here.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use libc::iovec;
use rustix::event::{PollFd, PollFlags};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const HDR_VERSION_1: u32 = 0x1;
const MAX_FDS: usize = 32;
/// Larger than any vhost-user request payload.
const MAX_PAYLOAD: usize = 1 << 20;

fn recv_fds(s: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points into `buf`, which is ours to overwrite.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: recvmsg handed us ownership of these descriptors.
    let owned = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    Ok((n, owned))
}

fn send_all(s: &UnixStream, parts: &[&[u8]], fds: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let n = s
        .send_with_fds(parts, &raw)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if n < total {
        // The rest without descriptors (they went with the first bytes).
        let rest: Vec<u8> = parts.concat()[n..].to_vec();
        let mut off = 0;
        while off < rest.len() {
            off += s
                .send_with_fds(&[&rest[off..]], &[])
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        }
    }
    Ok(())
}

/// Frontend -> backend: one whole message, inspected. Ok(false) on EOF.
fn forward_request(
    front: &UnixStream,
    back: &UnixStream,
    protocol_acked: &mut bool,
) -> io::Result<bool> {
    let mut hdr = [0u8; 12];
    let (n, fds) = recv_fds(front, &mut hdr)?;
    if n == 0 {
        return Ok(false);
    }
    if n < hdr.len() {
        (&*front).read_exact(&mut hdr[n..])?;
    }
    let req = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user request {req} with a {size}-byte payload"),
        ));
    }
    let mut payload = vec![0u8; size];
    (&*front).read_exact(&mut payload)?;
    match req {
        SET_FEATURES if size >= 8 => {
            let f = u64::from_le_bytes(payload[..8].try_into().unwrap());
            *protocol_acked = f & PROTOCOL_FEATURES != 0;
        }
        SET_VRING_ENABLE if !*protocol_acked => {
            tracing::debug!("SET_VRING_ENABLE before SET_FEATURES (QEMU order): acknowledging PROTOCOL_FEATURES first");
            let mut inj = [0u8; 20];
            inj[0..4].copy_from_slice(&SET_FEATURES.to_le_bytes());
            inj[4..8].copy_from_slice(&HDR_VERSION_1.to_le_bytes());
            inj[8..12].copy_from_slice(&8u32.to_le_bytes());
            inj[12..20].copy_from_slice(&PROTOCOL_FEATURES.to_le_bytes());
            send_all(back, &[&inj], &[])?;
            *protocol_acked = true;
        }
        _ => {}
    }
    send_all(back, &[&hdr, &payload], &fds)?;
    Ok(true)
}

/// Backend -> frontend: bytes and descriptors as they come. Ok(false) on EOF.
fn forward_raw(from: &UnixStream, to: &UnixStream, buf: &mut [u8]) -> io::Result<bool> {
    let (n, fds) = recv_fds(from, buf)?;
    if n == 0 && fds.is_empty() {
        return Ok(false);
    }
    send_all(to, &[&buf[..n]], &fds)?;
    Ok(true)
}

/// Relay until either side closes; then close both.
pub(crate) fn relay(front: UnixStream, back: UnixStream) {
    let mut protocol_acked = false;
    let mut buf = vec![0u8; 64 * 1024];
    let r: io::Result<()> = (|| loop {
        let mut fds = [
            PollFd::new(&front, PollFlags::IN),
            PollFd::new(&back, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        let (fr, br) = (fds[0].revents(), fds[1].revents());
        let bad = PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL;
        if fr.contains(PollFlags::IN) {
            if !forward_request(&front, &back, &mut protocol_acked)? {
                return Ok(());
            }
        } else if fr.intersects(bad) {
            return Ok(());
        }
        if br.contains(PollFlags::IN) {
            if !forward_raw(&back, &front, &mut buf)? {
                return Ok(());
            }
        } else if br.intersects(bad) {
            return Ok(());
        }
    })();
    if let Err(e) = r {
        tracing::debug!("vhost-user relay ended: {e}");
    }
    let _ = front.shutdown(std::net::Shutdown::Both);
    let _ = back.shutdown(std::net::Shutdown::Both);
    let _ = (front.as_fd(), back.as_fd());
}

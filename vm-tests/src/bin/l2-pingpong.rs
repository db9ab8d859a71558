//! Guest side of the backend test: on the kernel's own virtio-net driver (NicMode::KernelNet),
//! send `N` generated frames (sequence numbers, checksums, lengths 60..=1514, addressed to our
//! own MAC) in windows of 32 through an AF_PACKET socket, and verify every frame that comes back
//! (the backend reflects them). Prints `ZCRX-VM: l2 pingpong sent N verified N` and exits 0, or
//! `ZCRX-VM: l2 error ...` and exits 1.
//!
//! Usage: `l2-pingpong N [TIMEOUT_S] [IFACE]` (default interface `$ZCRX_IFACE`, then eth0).

use std::ffi::CString;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use traffic::frame::{FrameGen, ETHERTYPE_ZCRX};
use traffic::FrameVerifier;

const SEED: u64 = 21;
const WINDOW: u64 = 32;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let timeout = Duration::from_secs(args.next().and_then(|s| s.parse().ok()).unwrap_or(60));
    let iface = args.next().or_else(|| std::env::var("ZCRX_IFACE").ok()).unwrap_or_else(|| "eth0".into());
    match run(&iface, n, timeout) {
        Ok(v) => {
            println!("ZCRX-VM: l2 pingpong sent {n} verified {v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("ZCRX-VM: l2 error {e}");
            ExitCode::FAILURE
        }
    }
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn run(iface: &str, n: u64, timeout: Duration) -> Result<u64, String> {
    let mac_text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).map_err(|e| e.to_string())?;
    let mut mac = [0u8; 6];
    for (i, p) in mac_text.trim().split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(p, 16).map_err(|e| e.to_string())?;
    }
    let cname = CString::new(iface).map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(os_err("if_nametoindex"));
    }
    // SAFETY: plain socket creation; the fd lives until the process exits.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, ETHERTYPE_ZCRX.to_be() as libc::c_int) };
    if fd < 0 {
        return Err(os_err("socket(AF_PACKET)"));
    }
    // SAFETY: a zeroed sockaddr_ll is valid; the fields set below make it a bind address.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETHERTYPE_ZCRX.to_be();
    sll.sll_ifindex = ifindex as i32;
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `sll` is a valid sockaddr_ll of `len` bytes.
    if unsafe { libc::bind(fd, &sll as *const _ as *const libc::sockaddr, len) } < 0 {
        return Err(os_err("bind"));
    }
    let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
    // SAFETY: a valid timeval for SO_RCVTIMEO.
    unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv as *const _ as *const libc::c_void, std::mem::size_of::<libc::timeval>() as u32)
    };
    let other = [0x02, 0, 0, 0, 0x88, 0xb5];
    let mut gen = FrameGen::new(SEED, mac, other, 60, 1514).map_err(|e| e.to_string())?;
    let mut verify = FrameVerifier::new(SEED, 60, 1514).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 2048];
    let start = Instant::now();
    let mut verified = 0u64;
    while verified < n {
        // Send a window, then take it back.
        let upto = (gen.next_seq() + WINDOW).min(n);
        while gen.next_seq() < upto {
            let l = gen.next_into(&mut buf).map_err(|e| e.to_string())?;
            // SAFETY: the first `l` bytes of `buf` are the frame.
            if unsafe { libc::send(fd, buf.as_ptr() as *const libc::c_void, l, 0) } != l as isize {
                return Err(os_err("send"));
            }
        }
        while verified < upto {
            if start.elapsed() > timeout {
                return Err(format!("{verified} of {n} frames came back within {timeout:?}"));
            }
            // SAFETY: `buf` is writable for its length.
            let r = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if r <= 0 {
                continue;
            }
            verify.check(&buf[..r as usize]).map_err(|e| format!("frame {verified}: {e}"))?;
            verified += 1;
        }
    }
    let s = verify.stats();
    if s.unique != n || s.lost != 0 || s.duplicates != 0 {
        return Err(format!("{s:?}"));
    }
    Ok(verified)
}

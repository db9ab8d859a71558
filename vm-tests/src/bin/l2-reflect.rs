//! Guest side of the backend test: on the kernel's own virtio-net driver (NicMode::KernelNet),
//! send every frame of ethertype 0x88b5 that arrives back out unchanged, until `N` frames were
//! reflected (prints `ZCRX-VM: l2 reflected N`, exits 0) or `TIMEOUT_S` seconds pass (exits 1).
//!
//! Usage: `l2-reflect N [TIMEOUT_S] [IFACE]` (default interface `$ZCRX_IFACE`, then eth0).

use std::ffi::CString;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const ETHERTYPE: u16 = 0x88b5;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let timeout = Duration::from_secs(args.next().and_then(|s| s.parse().ok()).unwrap_or(60));
    let iface = args.next().or_else(|| std::env::var("ZCRX_IFACE").ok()).unwrap_or_else(|| "eth0".into());
    match run(&iface, n, timeout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("ZCRX-VM: l2 error {e}");
            ExitCode::FAILURE
        }
    }
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn run(iface: &str, n: u64, timeout: Duration) -> Result<(), String> {
    let cname = CString::new(iface).map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(os_err("if_nametoindex"));
    }
    // SAFETY: plain socket creation; the fd lives until the process exits.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (ETHERTYPE.to_be()) as libc::c_int) };
    if fd < 0 {
        return Err(os_err("socket(AF_PACKET)"));
    }
    // SAFETY: a zeroed sockaddr_ll is valid; the fields set below make it a bind address.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETHERTYPE.to_be();
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
    println!("ZCRX-VM: l2 reflecting on {iface}");
    let start = Instant::now();
    let mut buf = vec![0u8; 65536];
    let mut done = 0u64;
    while done < n {
        if start.elapsed() > timeout {
            return Err(format!("only {done} of {n} frames within {timeout:?}"));
        }
        // SAFETY: `buf` is writable for its length.
        let r = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if r <= 0 {
            continue;
        }
        // SAFETY: the first `r` bytes were just received into `buf`.
        let s = unsafe { libc::send(fd, buf.as_ptr() as *const libc::c_void, r as usize, 0) };
        if s != r {
            return Err(os_err("send"));
        }
        done += 1;
    }
    println!("ZCRX-VM: l2 reflected {done}");
    Ok(())
}

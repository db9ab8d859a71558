//! Guest-side check of the host port in both directions, on the kernel's own virtio-net driver
//! (NicMode::KernelNet). Pure layer 2: an AF_PACKET socket on ethertype 0x88b5 (IEEE local
//! experimental), no IP anywhere.
//!
//! Sends `zcrx-vm hello <n>` broadcast frames every 200 ms until a frame whose payload starts with
//! `zcrx-host ` arrives, then prints `ZCRX-VM: l2 recv <payload text>` and exits 0; exits 1 after
//! `TIMEOUT_S` seconds (default 20).
//!
//! Usage: `l2-echo [IFACE] [TIMEOUT_S]` (default `$ZCRX_IFACE`).

use std::ffi::CString;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const ETHERTYPE: u16 = 0x88b5;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let iface = args
        .next()
        .or_else(|| std::env::var("ZCRX_IFACE").ok())
        .unwrap_or_else(|| "eth0".into());
    let timeout = Duration::from_secs(args.next().and_then(|s| s.parse().ok()).unwrap_or(20));
    match run(&iface, timeout) {
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

fn run(iface: &str, timeout: Duration) -> Result<(), String> {
    let mac_text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))
        .map_err(|e| e.to_string())?;
    let mut mac = [0u8; 6];
    for (i, p) in mac_text.trim().split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(p, 16).map_err(|e| e.to_string())?;
    }
    let cname = CString::new(iface).unwrap();
    // SAFETY: plain libc calls with valid arguments; the fd is closed at exit.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(os_err("if_nametoindex"));
    }
    let proto = ETHERTYPE.to_be() as libc::c_int;
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, proto) };
    if fd < 0 {
        return Err(os_err("socket(AF_PACKET)"));
    }
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETHERTYPE.to_be();
    sll.sll_ifindex = ifindex as i32;
    let sll_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    if unsafe { libc::bind(fd, &sll as *const _ as *const libc::sockaddr, sll_len) } < 0 {
        return Err(os_err("bind"));
    }

    let start = Instant::now();
    let mut sent = 0u32;
    let mut next_send = start;
    let mut buf = [0u8; 2048];
    loop {
        let now = Instant::now();
        if now >= start + timeout {
            return Err(format!(
                "no host frame within {timeout:?} ({sent} hellos sent)"
            ));
        }
        if now >= next_send {
            let mut f = Vec::with_capacity(64);
            f.extend_from_slice(&[0xff; 6]);
            f.extend_from_slice(&mac);
            f.extend_from_slice(&ETHERTYPE.to_be_bytes());
            f.extend_from_slice(format!("zcrx-vm hello {sent}").as_bytes());
            f.resize(60, 0);
            let n = unsafe { libc::send(fd, f.as_ptr() as *const libc::c_void, f.len(), 0) };
            if n < 0 {
                return Err(os_err("send"));
            }
            if sent == 0 {
                println!("ZCRX-VM: l2 sent hello from {}", mac_text.trim());
            }
            sent += 1;
            next_send = now + Duration::from_millis(200);
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        unsafe { libc::poll(&mut pfd, 1, 50) };
        loop {
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n < 0 {
                break;
            }
            let f = &buf[..n as usize];
            if f.len() < 14 || f[12..14] != ETHERTYPE.to_be_bytes() || f[6..12] == mac {
                continue;
            }
            let payload = &f[14..];
            if payload.starts_with(b"zcrx-host ") {
                let end = payload
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(payload.len());
                println!(
                    "ZCRX-VM: l2 recv {}",
                    String::from_utf8_lossy(&payload[..end])
                );
                return Ok(());
            }
        }
    }
}

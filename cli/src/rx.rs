//! `zcrx rx`: receive from any real peer (`nc`, `iperf3`, another host's program) and print what
//! arrived. NODEV for now: a TCP connection or UDP datagrams through the copy fallback.

use std::io::BufWriter;
use std::net::{SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use zcrx::copy::UringCopy;
use zcrx::uring::SocketKind;
use zcrx::{CopyLimits, CopyOutcome, Cqe, Ifq};

use crate::opts::{IfqArgs, Method};
use crate::receive::{self, Discard, Sink};

#[derive(Args, Debug)]
pub struct RxArgs {
    /// Device-less mode: data comes from a kernel socket through the copy fallback.
    #[arg(long, conflicts_with = "vhost_user")]
    pub nodev: bool,
    /// Zero copy from a vhost-user-net backend listening on this socket (our driver is the
    /// frontend; the backend writes frames straight into the area).
    #[arg(long, value_name = "SOCKET", conflicts_with = "vfio")]
    pub vhost_user: Option<std::path::PathBuf>,
    /// Zero copy from the virtio-net PCI function at this address, bound to vfio-pci (inside a
    /// VM with an IOMMU: the device DMAs into the area through it).
    #[arg(long, value_name = "BDF", conflicts_with = "nodev")]
    pub vfio: Option<String>,
    /// Verify frames made by `zcrx backend --mode gen` with this seed.
    #[arg(long)]
    pub verify_seed: Option<u64>,
    /// Frame length range of the generator being verified (as given to `zcrx backend`).
    #[arg(long, default_value_t = 64)]
    pub min_frame: usize,
    #[arg(long, default_value_t = 64)]
    pub max_frame: usize,
    /// The peer's MTU, when known (--vhost-user, --vfio): frames of up to MTU + 18 bytes then
    /// fit one buffer, so MRG_RXBUF is not negotiated and the driver does not read each frame's
    /// header. Without it frames may span buffers.
    #[arg(long, value_parser = clap::value_parser!(u32).range(68..=65535))]
    pub mtu: Option<u32>,
    /// Address to listen on (TCP: accept one connection; UDP: bind).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Receive UDP datagrams instead of a TCP stream.
    #[arg(long)]
    pub udp: bool,
    /// Write what was received to this pcap file (UDP).
    #[arg(long)]
    pub pcap: Option<std::path::PathBuf>,
    /// Stop after this many datagrams (UDP) or frames (--vhost-user).
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// How the receive side reads the socket.
    #[arg(long, value_enum, default_value_t = Method::Readv)]
    pub method: Method,
    #[command(flatten)]
    pub ifq: IfqArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Device settings from the command line: the longest frame is the MTU plus the Ethernet
/// header and a VLAN tag.
pub fn net_config(mtu: Option<u32>) -> driver::NetConfig {
    driver::NetConfig { max_frame: mtu.map(|m| m + 18), ..Default::default() }
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Ctrl-C or SIGTERM arrived.
pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Ctrl-C and SIGTERM end the run (the stats still print). No SA_RESTART, so a blocking read
/// returns EINTR and the loop sees the flag.
pub fn install_stop_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Writes whole datagrams (fragments joined) to a pcap file.
struct PcapSink<'a> {
    w: traffic::pcap::PcapWriter<BufWriter<std::fs::File>>,
    local: SocketAddrV4,
    /// Source of each datagram not yet written, in completion order.
    srcs: &'a Srcs,
    frame: Vec<u8>,
}

type Srcs = std::cell::RefCell<std::collections::VecDeque<Option<SocketAddr>>>;

impl Sink for PcapSink<'_> {
    fn data(&mut self, bytes: &[u8], c: &Cqe) -> Result<(), String> {
        self.frame.extend_from_slice(bytes);
        if c.is_continued() {
            return Ok(());
        }
        let src = match self.srcs.borrow_mut().pop_front().flatten() {
            Some(SocketAddr::V4(a)) => a,
            _ => SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0),
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let r = self.w.write_udp(src, self.local, &self.frame, now);
        self.frame.clear();
        r.map_err(|e| format!("pcap: {e}"))
    }
}

pub fn run(a: &RxArgs) -> Result<(), String> {
    if let Some(path) = &a.vhost_user {
        return rx_device(a, Device::VhostUser(path));
    }
    if let Some(bdf) = &a.vfio {
        return rx_device(a, Device::Vfio(bdf));
    }
    if !a.nodev {
        return Err("choose a mode: --nodev (copy from a kernel socket), --vhost-user SOCKET or --vfio BDF (zero copy)".into());
    }
    if a.verify_seed.is_some() {
        return Err("--verify-seed needs --vhost-user".into());
    }
    if a.mtu.is_some() {
        return Err("--mtu is for a device (--vhost-user, --vfio): it decides how frames fill buffers".into());
    }
    let listen = a.listen.ok_or("--listen ADDR is required with --nodev")?;
    if a.pcap.is_some() && !a.udp {
        return Err("--pcap needs --udp (a TCP stream has no packets to write)".into());
    }
    if a.pcap.is_some() && a.method == Method::Uring {
        return Err("--pcap needs --method readv (io_uring multishot recv does not report source addresses)".into());
    }
    if a.count.is_some() && !a.udp {
        return Err("--count needs --udp (it counts datagrams)".into());
    }
    if let Some(d) = a.duration {
        if !(d > 0.0 && d.is_finite()) {
            return Err(format!("--duration must be a positive number of seconds, got {d}"));
        }
    }
    if a.udp && a.method == Method::Uring && a.ifq.rx_buf_len < 65536 {
        return Err("--udp --method uring needs --rx-buf-len 64K or more (a datagram must fit one buffer)".into());
    }
    let (reg, area) = a.ifq.reg()?;
    let (ifq, user) = Ifq::register(reg, area, None).map_err(|e| e.to_string())?;
    install_stop_handler();
    let deadline = a.duration.map(|d| Instant::now() + Duration::from_secs_f64(d));
    let start = Instant::now();
    let (run, datagrams) = if a.udp { rx_udp(a, listen, ifq, user, deadline)? } else { (rx_tcp(a, listen, ifq, user, deadline)?, 0) };
    let secs = start.elapsed().as_secs_f64();
    let s = run.stats;
    let gbps = run.bytes as f64 * 8.0 / secs / 1e9;
    if a.json {
        println!(
            "{}",
            json!({
                "mode": "nodev-copy", "method": a.method.name(), "proto": if a.udp { "udp" } else { "tcp" },
                "bytes": run.bytes, "completions": run.completions, "datagrams": datagrams,
                "seconds": secs, "gbit_per_s": gbps,
                "copy_count": s.copy_count, "copy_bytes": s.copy_bytes, "invalid_rqes": s.invalid_rqes,
                "no_buffer": s.no_buffer, "cq_full": s.cq_full, "refilled": s.refilled,
            })
        );
    } else {
        println!("received {} bytes in {} completions{} in {:.2} s ({:.3} Gbit/s)", run.bytes, run.completions,
            if a.udp { format!(", {datagrams} datagrams") } else { String::new() }, secs, gbps);
        println!("copy_count {} copy_bytes {} refilled {} invalid_rqes {} no_buffer {} cq_full {}",
            s.copy_count, s.copy_bytes, s.refilled, s.invalid_rqes, s.no_buffer, s.cq_full);
    }
    Ok(())
}

fn rx_tcp(a: &RxArgs, listen: SocketAddr, ifq: Ifq, user: zcrx::IfqUser, deadline: Option<Instant>) -> Result<receive::RunStats, String> {
    let l = TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    eprintln!("listening on tcp {}", l.local_addr().map_err(|e| e.to_string())?);
    let (sock, peer) = l.accept().map_err(|e| if STOP.load(Ordering::Relaxed) { "interrupted".to_string() } else { format!("accept: {e}") })?;
    eprintln!("connection from {peer}");
    if deadline.is_some() {
        // Wake up now and then to look at the clock.
        sock.set_read_timeout(Some(Duration::from_millis(100))).map_err(|e| e.to_string())?;
    }
    let stop = AtomicBool::new(false);
    let mut check = |_: u64| {
        if STOP.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            stop.store(true, Ordering::Relaxed);
        }
    };
    let limits = CopyLimits::default();
    match a.method {
        Method::Readv => receive::run_inline(Box::new(receive::CopySide { ifq, fill: |q: &mut Ifq| q.copy_stream(sock.as_fd(), &limits) }), user, &mut Discard, &mut check, &stop),
        Method::Uring => {
            let mut uc = UringCopy::new(&ifq, sock.as_fd(), SocketKind::Stream, 4096).map_err(|e| e.to_string())?;
            let wait = deadline.is_none();
            receive::run_inline(Box::new(receive::CopySide { ifq, fill: |q: &mut Ifq| uc.fill(q, wait) }), user, &mut Discard, &mut check, &stop)
        }
    }
}

fn rx_udp(a: &RxArgs, listen: SocketAddr, ifq: Ifq, user: zcrx::IfqUser, deadline: Option<Instant>) -> Result<(receive::RunStats, u64), String> {
    let sock = UdpSocket::bind(listen).map_err(|e| format!("cannot bind udp {listen}: {e}"))?;
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    big_receive_buffer(&sock);
    eprintln!("listening on udp {local}");
    // The pcap sink needs each datagram's source; the copy reports them in completion order.
    let srcs = Srcs::default();
    let mut pcap = match &a.pcap {
        Some(path) => {
            let f = std::fs::File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            let w = traffic::pcap::PcapWriter::new(BufWriter::new(f), traffic::pcap::LINKTYPE_ETHERNET, traffic::pcap::DEFAULT_SNAPLEN)
                .map_err(|e| format!("pcap: {e}"))?;
            let local = match local { SocketAddr::V4(v) => v, SocketAddr::V6(_) => return Err("--pcap supports IPv4 only".into()) };
            Some(PcapSink { w, local, srcs: &srcs, frame: Vec::new() })
        }
        None => None,
    };
    let datagrams = std::cell::Cell::new(0u64);
    let stop = AtomicBool::new(false);
    let limits = CopyLimits::default();
    let mut uc = match a.method {
        Method::Uring => Some(UringCopy::new(&ifq, sock.as_fd(), SocketKind::Datagram, 4096).map_err(|e| e.to_string())?),
        Method::Readv => None,
    };
    let keep_srcs = pcap.is_some();
    let mut fill = |q: &mut Ifq| -> std::io::Result<CopyOutcome> {
        let out = match uc.as_mut() {
            Some(uc) => {
                let o = uc.fill(q, false)?;
                if let CopyOutcome::Data { completions, .. } = o {
                    datagrams.set(datagrams.get() + completions as u64);
                    if keep_srcs {
                        srcs.borrow_mut().extend(std::iter::repeat_n(None, completions as usize));
                    }
                }
                o
            }
            None => q.copy_datagrams(sock.as_fd(), &limits, |src, _| {
                datagrams.set(datagrams.get() + 1);
                if keep_srcs {
                    srcs.borrow_mut().push_back(src);
                }
            })?,
        };
        if out == CopyOutcome::WouldBlock {
            let mut pfd = [rustix::event::PollFd::new(&sock, rustix::event::PollFlags::IN)];
            let _ = rustix::event::poll(&mut pfd, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 50_000_000 }));
        }
        Ok(out)
    };
    let mut check = |_: u64| {
        let enough = a.count.is_some_and(|c| datagrams.get() >= c);
        if enough || STOP.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            stop.store(true, Ordering::Relaxed);
        }
    };
    let run = match pcap.as_mut() {
        Some(p) => receive::run_inline(Box::new(receive::CopySide { ifq, fill: &mut fill }), user, p, &mut check, &stop)?,
        None => receive::run_inline(Box::new(receive::CopySide { ifq, fill: &mut fill }), user, &mut Discard, &mut check, &stop)?,
    };
    if let Some(mut p) = pcap {
        p.w.flush().map_err(|e| format!("pcap: {e}"))?;
    }
    Ok((run, datagrams.get()))
}

/// A zero-copy device to receive from.
enum Device<'a> {
    VhostUser(&'a std::path::Path),
    Vfio(&'a str),
}

fn rx_device(a: &RxArgs, dev: Device<'_>) -> Result<(), String> {
    use crate::frames::FrameSink;
    if a.listen.is_some() || a.udp {
        return Err("--listen and --udp are for --nodev; a device delivers Ethernet frames".into());
    }
    if a.method != Method::Readv {
        return Err("--method chooses how NODEV reads a socket; it means nothing with a device".into());
    }
    if let Some(d) = a.duration {
        if !(d > 0.0 && d.is_finite()) {
            return Err(format!("--duration must be a positive number of seconds, got {d}"));
        }
    }
    let (mut reg, mut area) = a.ifq.reg()?;
    reg.flags &= !zcrx::uapi::ZCRX_REG_NODEV;
    if a.ifq.memory.is_none() && matches!(dev, Device::VhostUser(_)) {
        // Shared with the backend by fd.
        if let zcrx::AreaSource::Allocate { kind, .. } = &mut area.memory {
            *kind = zcrx::MemoryKind::Memfd;
        }
    }
    let pcap = match &a.pcap {
        Some(p) => {
            let f = std::fs::File::create(p).map_err(|e| format!("cannot create {}: {e}", p.display()))?;
            Some(traffic::pcap::PcapWriter::new(BufWriter::new(f), traffic::pcap::LINKTYPE_ETHERNET, traffic::pcap::DEFAULT_SNAPLEN)
                .map_err(|e| format!("pcap: {e}"))?)
        }
        None => None,
    };
    let verify = match a.verify_seed {
        Some(seed) => Some(traffic::FrameVerifier::new(seed, a.min_frame, a.max_frame).map_err(|e| format!("--min-frame/--max-frame: {e}"))?),
        None => None,
    };
    install_stop_handler();
    let frames = std::cell::Cell::new(0u64);
    let mut sink = FrameSink::new(verify, pcap, &frames);
    let deadline = a.duration.map(|d| Instant::now() + Duration::from_secs_f64(d));
    let transport: Box<dyn driver::transport::Transport> = match dev {
        Device::VhostUser(path) => crate::frames::vhost_user(path)?,
        Device::Vfio(bdf) => Box::new(driver::transport::vfio_pci::VfioPci::open(bdf).map_err(|e| e.to_string())?),
    };
    let mode = match dev {
        Device::VhostUser(_) => "vhost-user-zc",
        Device::Vfio(_) => "vfio-zc",
    };
    crate::frames::ANNOUNCE.store(true, Ordering::Relaxed);
    let (run, secs) = crate::frames::receive_device(transport, reg, area, net_config(a.mtu), &mut sink, a.count, deadline, &mut |_| {})?;
    if let Some(w) = sink.pcap.as_mut() {
        w.flush().map_err(|e| format!("pcap: {e}"))?;
    }
    let s = run.stats;
    let v = sink.verify.as_ref().map(|v| v.stats());
    if a.json {
        println!(
            "{}",
            json!({
                "mode": mode, "frames": frames.get(), "bytes": run.bytes, "completions": run.completions,
                "seconds": secs, "mpps": frames.get() as f64 / secs / 1e6, "gbit_per_s": run.bytes as f64 * 8.0 / secs / 1e9,
                "zc_count": s.zc_count, "zc_bytes": s.zc_bytes, "copy_count": s.copy_count,
                "invalid_rqes": s.invalid_rqes, "refilled": s.refilled,
                "polls": run.device.map(|d| d.rx_polls), "empty_polls": run.device.map(|d| d.rx_empty_polls),
                "verified": v.map(|v| v.unique), "corrupted": sink.corrupted, "lost": v.map(|v| v.lost),
                "first_error": sink.first_error,
            })
        );
    } else {
        println!("received {} frames, {} bytes zero-copy in {:.2} s ({:.3} Mpps, {:.3} Gbit/s)", frames.get(), run.bytes, secs,
            frames.get() as f64 / secs / 1e6, run.bytes as f64 * 8.0 / secs / 1e9);
        println!("zc_count {} zc_bytes {} copy_count {} refilled {} invalid_rqes {}", s.zc_count, s.zc_bytes, s.copy_count, s.refilled, s.invalid_rqes);
        if let Some(d) = run.device {
            println!("polls {} empty {} ({:.1}%), {:.1} frames per busy poll", d.rx_polls, d.rx_empty_polls,
                d.rx_empty_polls as f64 * 100.0 / d.rx_polls.max(1) as f64,
                d.rx_frames as f64 / (d.rx_polls - d.rx_empty_polls).max(1) as f64);
        }
        if let Some(v) = v {
            println!("verified {} frames, corrupted {}, lost {}, reordered {}", v.unique, sink.corrupted, v.lost, v.reordered);
        }
    }
    if let Some(e) = sink.first_error {
        return Err(format!("verification failed: {e}"));
    }
    Ok(())
}

/// Datagrams that find the socket buffer full are dropped by the kernel before we ever see
/// them: ask for 8 MiB (SO_RCVBUFFORCE as root, else up to net.core.rmem_max).
fn big_receive_buffer(sock: &UdpSocket) {
    const SIZE: usize = 8 << 20;
    if rustix::net::sockopt::set_socket_recv_buffer_size_force(sock, SIZE).is_err() {
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(sock, SIZE);
    }
}

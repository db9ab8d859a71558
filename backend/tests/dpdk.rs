//! The backend against an independent frontend: DPDK's testpmd with a
//! `net_virtio_user` port on our socket. Needs `dpdk-testpmd` (Debian
//! `dpdk-dev`): run `ci/install-dpdk.sh`. Without it these tests FAIL.
//!
//! testpmd is driven interactively through stdin; its port statistics
//! (`show port stats all`) are parsed from its output. The tests run one at a
//! time (each testpmd busy-polls a core).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backend::{Backend, BackendConfig, GenConfig, Mode, SinkConfig, Stats};

static SERIAL: Mutex<()> = Mutex::new(());

/// Counts heap allocations in this test process (for the hot-path test).
struct CountingAlloc;
static ALLOCS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { std::alloc::System.realloc(p, l, n) }
    }
}
#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;
static N: AtomicU32 = AtomicU32::new(0);

fn on_path(exe: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(exe))
        .find(|p| p.is_file())
}

struct Testpmd {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    prefix: String,
}

impl Testpmd {
    /// `dpdk-testpmd` with a virtio_user port on `sock` (queue size 256), in
    /// interactive mode, plus `app_args` after `--`.
    fn spawn(sock: &Path, app_args: &[&str]) -> Testpmd {
        let exe = on_path("dpdk-testpmd").unwrap_or_else(|| {
            panic!(
                "dpdk-testpmd is not installed (it is in Debian's dpdk-dev package): \
                 run ci/install-dpdk.sh, then re-run the tests"
            )
        });
        let prefix = format!(
            "zcrxbe{}n{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        // Line-buffered stdout so output can be followed live (stdbuf is in coreutils).
        let mut cmd = match on_path("stdbuf") {
            Some(sb) => {
                let mut c = Command::new(sb);
                c.arg("-oL").arg("-eL").arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let vdev = format!(
            "net_virtio_user0,path={},queues=1,queue_size=256",
            sock.display()
        );
        cmd.args([
            "--no-pci",
            "--no-huge",
            "-m",
            "256",
            "--file-prefix",
            &prefix,
        ])
        .args(["-l", "0-1", "--main-lcore", "0", "--vdev", &vdev, "--"])
        .args(["-i", "--total-num-mbufs=8192", "--no-flush-rx"])
        .args(app_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn dpdk-testpmd");
        let out = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        let so: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let se: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for r in [so, se] {
            let out = out.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    let mut o = out.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            }));
        }
        let stdin = child.stdin.take();
        Testpmd {
            child,
            stdin,
            out,
            readers,
            prefix,
        }
    }

    fn cmd(&mut self, c: &str) {
        let s = self.stdin.as_mut().expect("stdin open");
        writeln!(s, "{c}").expect("write to testpmd");
        s.flush().unwrap();
    }

    fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// `quit`, wait for exit (kill after 20 s), return the whole output.
    fn finish(mut self) -> String {
        self.cmd("quit");
        drop(self.stdin.take());
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        self.output()
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
struct PortStats {
    rx_packets: u64,
    rx_bytes: u64,
    tx_packets: u64,
    tx_bytes: u64,
}

fn field(block: &str, name: &str) -> u64 {
    let i = block
        .find(name)
        .unwrap_or_else(|| panic!("no {name} in {block}"));
    block[i + name.len()..]
        .split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("bad {name} in {block}"))
}

/// The last `show port stats all` block for port 0.
fn port_stats(out: &str) -> PortStats {
    let i = out
        .rfind("NIC statistics for port 0")
        .unwrap_or_else(|| panic!("no port statistics in testpmd output:\n{out}"));
    let b = &out[i..];
    let b = &b[..b.find("Throughput").unwrap_or(b.len())];
    PortStats {
        rx_packets: field(b, "RX-packets:"),
        rx_bytes: field(b, "RX-bytes:"),
        tx_packets: field(b, "TX-packets:"),
        tx_bytes: field(b, "TX-bytes:"),
    }
}

fn start_backend(tag: &str, mode: Mode) -> (Backend, common::Sock) {
    let sock = common::Sock::new(tag);
    (
        backend::start(BackendConfig::new(&sock.path, mode)).unwrap(),
        sock,
    )
}

fn wait(b: &Backend, t: &Testpmd, secs: u64, what: &str, f: impl FnMut(&Stats) -> bool) -> Stats {
    match b.wait_until(Duration::from_secs(secs), f) {
        Ok(s) => s,
        Err(s) => panic!(
            "timed out waiting for {what}\nbackend stats: {s:#?}\ntestpmd output:\n{}",
            t.output()
        ),
    }
}

/// Stop forwarding, let the rings settle, print stats, quit; parse.
fn stop_and_collect(mut t: Testpmd) -> (PortStats, String) {
    t.cmd("stop");
    std::thread::sleep(Duration::from_millis(300));
    t.cmd("show port stats all");
    let out = t.finish();
    (port_stats(&out), out)
}

#[test]
fn gen_to_testpmd_rxonly_delivers_exactly_count_frames() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const COUNT: u64 = 100_000;
    let (b, sock) = start_backend(
        "dpdk-gen",
        Mode::Gen(GenConfig {
            count: Some(COUNT),
            ..Default::default()
        }),
    );
    let mut t = Testpmd::spawn(&sock, &["--forward-mode=rxonly"]);
    t.cmd("start");
    let s = wait(&b, &t, 30, "all frames generated", |s| s.rx_frames == COUNT);
    assert_eq!(s.connections, 1);
    // DPDK does not negotiate EVENT_IDX; it takes MRG_RXBUF, IN_ORDER, VERSION_1.
    assert_eq!(
        s.features & (1 << 15 | 1 << 32 | 1 << 35),
        1 << 15 | 1 << 32 | 1 << 35
    );
    let (p, out) = stop_and_collect(t);
    assert_eq!(p.rx_packets, COUNT, "testpmd output:\n{out}");
    assert_eq!(p.rx_bytes, COUNT * 64);
    let s = b.stop();
    assert_eq!((s.rx_frames, s.rx_bytes), (COUNT, COUNT * 64));
    assert_eq!((s.rx_dropped, s.bad_descriptors, s.bad_rings), (0, 0, 0));
    assert_eq!(s.last_error, None);
}

#[test]
fn testpmd_txonly_to_sink_counts_exactly_what_testpmd_sent() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (b, sock) = start_backend("dpdk-sink", Mode::Sink(SinkConfig::default()));
    let mut t = Testpmd::spawn(&sock, &["--forward-mode=txonly"]);
    t.cmd("start");
    wait(&b, &t, 30, "traffic", |s| s.tx_frames >= 200_000);
    let (p, out) = stop_and_collect(t);
    assert!(p.tx_packets >= 200_000, "{p:?}\n{out}");
    // testpmd has exited; everything it enqueued was consumed before its
    // GET_VRING_BASE stopped the ring.
    let s = b.stop();
    assert_eq!(s.tx_frames, p.tx_packets, "testpmd output:\n{out}");
    assert_eq!(s.tx_bytes, p.tx_bytes);
    assert_eq!(s.tx_bytes, 64 * s.tx_frames, "txonly sends 64-byte frames");
    assert_eq!((s.bad_descriptors, s.bad_rings, s.rx_frames), (0, 0, 0));
}

#[test]
fn reflect_returns_testpmd_tx_first_bursts_exactly() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (b, sock) = start_backend("dpdk-reflect", Mode::Reflect);
    let mut t = Testpmd::spawn(&sock, &["--forward-mode=rxonly"]);
    // 4 bursts of 32 frames, then receive only.
    t.cmd("start tx_first 4");
    wait(&b, &t, 30, "128 frames reflected", |s| {
        s.tx_frames == 128 && s.rx_frames == 128
    });
    // The frames are in testpmd's rx ring now; its forwarding core counts them on its next
    // poll, which a loaded machine may delay past an immediate `stop`.
    std::thread::sleep(Duration::from_millis(500));
    let (p, out) = stop_and_collect(t);
    assert_eq!(
        (p.tx_packets, p.rx_packets),
        (128, 128),
        "testpmd output:\n{out}"
    );
    assert_eq!(p.rx_bytes, p.tx_bytes);
    let s = b.stop();
    assert_eq!((s.tx_frames, s.rx_frames, s.rx_dropped), (128, 128, 0));
    assert_eq!((s.tx_bytes, s.rx_bytes), (p.tx_bytes, p.rx_bytes));
}

#[test]
fn reflect_ping_pong_with_testpmd_io_forwarding_balances() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (b, sock) = start_backend("dpdk-pingpong", Mode::Reflect);
    let mut t = Testpmd::spawn(&sock, &["--forward-mode=io"]);
    // 64 frames circulate: testpmd echoes what we reflect, forever.
    t.cmd("start tx_first 2");
    wait(&b, &t, 30, "ping-pong traffic", |s| s.tx_frames >= 200_000);
    let (p, out) = stop_and_collect(t);
    let s = b.stop();
    // Everything testpmd sent reached us; everything we took was either
    // reflected or (no rx buffer) dropped; testpmd received what we
    // reflected except what was still in its rx ring when it stopped.
    assert_eq!(s.tx_frames, p.tx_packets, "testpmd output:\n{out}");
    assert_eq!(s.rx_frames + s.rx_dropped, s.tx_frames);
    assert!(
        p.rx_packets <= s.rx_frames && s.rx_frames <= p.rx_packets + 256,
        "testpmd rx {} vs reflected {}",
        p.rx_packets,
        s.rx_frames
    );
    assert_eq!(s.bad_descriptors, 0);
}

#[test]
fn gen_through_testpmd_io_loopback_verifies_every_frame() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const COUNT: u64 = 50_000;
    let (b, sock) = start_backend(
        "dpdk-loop",
        Mode::Gen(GenConfig {
            min_frame_len: 60,
            max_frame_len: 1514,
            count: Some(COUNT),
            seed: 42,
            verify_tx: true,
            ..Default::default()
        }),
    );
    let mut t = Testpmd::spawn(&sock, &[]);
    // testpmd echoes every frame; retry transmits for up to 100 ms while its
    // tx ring is full (this machine is shared: we may be descheduled).
    t.cmd("set fwd io retry");
    t.cmd("set burst tx delay 200 retry 500");
    t.cmd("start");
    wait(&b, &t, 30, "all frames generated", |s| s.rx_frames == COUNT);
    // Then until the returning stream has settled.
    let mut last = u64::MAX;
    wait(&b, &t, 30, "returning frames to settle", |s| {
        let settled = s.tx_frames == COUNT || s.tx_frames == last;
        last = s.tx_frames;
        if !settled {
            std::thread::sleep(Duration::from_millis(100));
        }
        settled
    });
    let (p, out) = stop_and_collect(t);
    let s = b.stop();
    let dropped = fwd_tx_dropped(&out);
    // Exact accounting: testpmd received every generated frame and sent each
    // back or counted it dropped; every frame that came back verified.
    assert_eq!(p.rx_packets, COUNT, "testpmd output:\n{out}");
    assert_eq!(p.tx_packets + dropped, COUNT, "testpmd output:\n{out}");
    assert_eq!(
        (s.tx_frames, s.verified, s.corrupted, s.duplicates),
        (p.tx_packets, p.tx_packets, 0, 0),
        "{s:#?}"
    );
    assert!(s.lost <= dropped, "{s:#?}");
    assert_eq!(p.rx_bytes, s.rx_bytes);
    assert_eq!(p.tx_bytes, s.tx_bytes);
    assert!(s.rx_bytes > COUNT * 600, "variable lengths 60..=1514");
    if dropped > 0 {
        println!("note: testpmd dropped {dropped} frames (tx ring full despite retries)");
    }
    assert!(
        dropped < COUNT / 100,
        "testpmd dropped {dropped} of {COUNT} frames"
    );
}

/// TX-dropped of the accumulated forward statistics.
fn fwd_tx_dropped(out: &str) -> u64 {
    let i = out
        .rfind("Accumulated forward statistics")
        .unwrap_or_else(|| panic!("no forward statistics in testpmd output:\n{out}"));
    field(&out[i..], "TX-dropped:")
}

#[test]
fn hot_paths_do_not_allocate_per_frame() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Only the backend's threads and this (sleeping) test thread run in this
    // process while testpmd moves frames, so the process-wide allocation
    // count over 300k frames bounds the backend's.
    let measure = |mode: Mode, fwd: &str, first: &str, frames: fn(&Stats) -> u64| {
        let (b, sock) = start_backend("dpdk-alloc", mode);
        let mut t = Testpmd::spawn(&sock, &[fwd]);
        t.cmd(first);
        let s0 = wait(&b, &t, 30, "warm-up", |s| frames(s) >= 100_000);
        let a0 = ALLOCS.load(Ordering::SeqCst);
        let s1 = wait(&b, &t, 60, "300k more frames", |s| {
            frames(s) >= frames(&s0) + 300_000
        });
        let a1 = ALLOCS.load(Ordering::SeqCst);
        let (_p, _out) = stop_and_collect(t);
        b.stop();
        (a1 - a0, frames(&s1) - frames(&s0))
    };
    let (allocs, n) = measure(
        Mode::Gen(GenConfig::default()),
        "--forward-mode=rxonly",
        "start",
        |s| s.rx_frames,
    );
    println!("gen: {allocs} allocations in the process while {n} frames were generated");
    assert!(allocs < 50, "gen: {allocs} allocations for {n} frames");
    let (allocs, n) = measure(
        Mode::Reflect,
        "--forward-mode=io",
        "start tx_first 2",
        |s| s.tx_frames,
    );
    println!("reflect: {allocs} allocations in the process while {n} frames were reflected");
    assert!(allocs < 50, "reflect: {allocs} allocations for {n} frames");
}

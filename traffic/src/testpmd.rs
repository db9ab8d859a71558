//! DPDK's `dpdk-testpmd` as a test peer: an independent vhost-user backend (`net_vhost`) or
//! frontend (`net_virtio_user`) to check our driver and our backend against. Driven in
//! interactive mode through its stdin; its output is collected for assertions and for the
//! failure message. Installed by `ci/install-dpdk.sh` (Debian's `dpdk-dev`).

use std::io::{self, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether `dpdk-testpmd` is on PATH.
pub fn available() -> bool {
    Command::new("dpdk-testpmd").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// Counters of `show port stats 0`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

/// A running testpmd with one virtual port.
pub struct Testpmd {
    child: Child,
    stdin: ChildStdin,
    log: Arc<Mutex<String>>,
    prefix: String,
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

impl Testpmd {
    /// Start testpmd with `vdev` (e.g. `net_vhost0,iface=/tmp/x.sock`) and `--forward-mode`
    /// `mode`, plus extra testpmd (after `--`) arguments. Forwarding starts with
    /// [`Testpmd::cmd`]`("start")`.
    pub fn spawn(vdev: &str, mode: &str, extra: &[&str]) -> io::Result<Self> {
        Self::spawn_on(vdev, mode, extra, 0)
    }

    /// [`Testpmd::spawn`] with the main lcore chosen (of cores 0-1); forwarding runs on the other.
    pub fn spawn_on(vdev: &str, mode: &str, extra: &[&str], main_lcore: u32) -> io::Result<Self> {
        let main = main_lcore.to_string();
        let prefix = format!("zcrx{}x{}", std::process::id(), INSTANCE.fetch_add(1, Ordering::Relaxed));
        // stdbuf: testpmd's printf output would sit in a block buffer on a pipe until exit.
        let mut child = Command::new("stdbuf")
            .args(["-o0", "-e0", "dpdk-testpmd"])
            .args(["--no-pci", "--no-huge", "-m", "256", "--file-prefix", &prefix, "-l", "0-1", "--main-lcore", &main, "--log-level", "lib.eal:error"])
            .args(["--vdev", vdev, "--", "-i", "--total-num-mbufs=8192", "--port-topology=loop"])
            .arg(format!("--forward-mode={mode}"))
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("dpdk-testpmd: {e} (run ci/install-dpdk.sh)")))?;
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [child.stdout.take().map(|s| Box::new(s) as Box<dyn io::Read + Send>), child.stderr.take().map(|s| Box::new(s) as Box<dyn io::Read + Send>)].into_iter().flatten() {
            let log = log.clone();
            // Raw chunks, not lines: the `testpmd> ` prompt has no newline.
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let stdin = child.stdin.take().expect("piped stdin");
        let me = Self { child, stdin, log, prefix };
        if !me.wait_for("testpmd>", Duration::from_secs(60)) {
            return Err(io::Error::other(format!("testpmd did not come up:\n{}", me.log())));
        }
        Ok(me)
    }

    /// Everything testpmd printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Wait until the output contains `needle` (counting from the start).
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_count(needle, 1, timeout)
    }

    /// Wait until the output contains `needle` at least `n` times.
    pub fn wait_for_count(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.log.lock().unwrap().matches(needle).count() >= n {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Send one interactive command.
    pub fn cmd(&mut self, line: &str) -> io::Result<()> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()
    }

    /// `show port stats 0`, parsed.
    pub fn port_stats(&mut self) -> io::Result<PortStats> {
        const HEAD: &str = "NIC statistics for port 0";
        let before = self.log.lock().unwrap().matches(HEAD).count();
        self.cmd("show port stats 0")?;
        // The block ends with the throughput lines; wait for the one after the counters.
        if !self.wait_for_count(HEAD, before + 1, Duration::from_secs(10)) {
            return Err(io::Error::other("testpmd printed no port stats"));
        }
        std::thread::sleep(Duration::from_millis(100));
        let log = self.log();
        let block = &log[log.rfind(HEAD).expect("seen")..];
        let field = |name: &str| -> u64 {
            block
                .find(name)
                .and_then(|i| block[i + name.len()..].split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(PortStats {
            rx_packets: field("RX-packets:"),
            rx_bytes: field("RX-bytes:"),
            tx_packets: field("TX-packets:"),
            tx_bytes: field("TX-bytes:"),
        })
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = self.cmd("quit");
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
    }
}

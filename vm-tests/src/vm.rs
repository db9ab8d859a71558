//! Booting a [`GuestImage`] under QEMU (TCG, q35, emulated intel-iommu) and collecting markers.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::assets::Assets;
use crate::hostport::{mac_string, HostPort};
use crate::image::GuestImage;
use crate::Error;

/// The prefix of marker lines on the guest's serial console.
pub const MARKER: &str = "ZCRX-VM: ";

/// The kernel command line (Intel IOMMU on, passthrough for host-owned DMA; reboot on panic,
/// which `-no-reboot` turns into QEMU exiting).
pub const KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 loglevel=4 intel_iommu=on iommu=pt";

/// The MAC address of the guest NIC unless [`VmOpts::mac`] says otherwise.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// What the guest NIC is connected to.
#[derive(Clone, Debug)]
pub enum Net {
    /// Nothing: frames the guest sends are dropped, nothing arrives.
    None,
    /// `-netdev dgram` over unix datagram sockets: QEMU binds `guest`, sends to `host`
    /// (see [`HostPort`]).
    Dgram { guest: PathBuf, host: PathBuf },
    /// Any other `-netdev` value; its `id` must be `n0`.
    Custom(String),
}

/// How to run a VM.
#[derive(Clone, Debug)]
pub struct VmOpts {
    /// Limit for boot-to-poweroff; QEMU is killed when it passes (default 120 s, or
    /// `ZCRX_VM_TIMEOUT` seconds).
    pub timeout: Duration,
    /// Guest memory (default 256 MiB).
    pub memory_mib: u32,
    /// What the NIC is wired to (default [`Net::None`]).
    pub net: Net,
    /// The NIC's MAC address.
    pub mac: [u8; 6],
    /// Extra `virtio-net-pci` properties, e.g. `vectors=0` or `mq=on,vectors=10` (comma-joined).
    pub nic_props: Vec<String>,
    /// Appended to [`KERNEL_CMDLINE`].
    pub append: String,
    /// Extra QEMU arguments.
    pub qemu_args: Vec<String>,
    /// Copy serial lines to stderr as they arrive (default: `ZCRX_VM_ECHO=1`).
    pub echo: bool,
    /// Put the NIC behind the emulated intel-iommu (`iommu_platform=on`, default). Off for
    /// vhost-user backends without IOTLB support (ours: `vhost-user-backend` has none).
    pub iommu: bool,
}

impl Default for VmOpts {
    fn default() -> Self {
        let timeout = std::env::var("ZCRX_VM_TIMEOUT")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(120));
        VmOpts {
            timeout,
            memory_mib: 256,
            net: Net::None,
            mac: GUEST_MAC,
            nic_props: Vec::new(),
            append: String::new(),
            qemu_args: Vec::new(),
            echo: std::env::var("ZCRX_VM_ECHO").is_ok_and(|v| v == "1"),
            iommu: true,
        }
    }
}

impl VmOpts {
    /// Wires the NIC to `port` (`-netdev dgram`).
    pub fn host_port(mut self, port: &HostPort) -> Self {
        self.net = Net::Dgram {
            guest: port.guest_path().to_path_buf(),
            host: port.host_path().to_path_buf(),
        };
        self
    }
    /// Sets the timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
}

/// What a finished (or killed) VM left.
#[derive(Clone, Debug)]
pub struct VmResult {
    /// The whole serial console (kernel messages and the guest's stdout/stderr), `\r` removed.
    pub serial: String,
    /// Marker lines, in order, with the `ZCRX-VM: ` prefix removed.
    pub markers: Vec<String>,
    /// The command's exit status from the last `ZCRX-VM: exit <code>` marker.
    pub exit: Option<i32>,
    /// Wall time from spawning QEMU to its exit.
    pub duration: Duration,
    /// True if QEMU was killed at the timeout.
    pub timed_out: bool,
    /// QEMU's own exit status.
    pub qemu_status: Option<ExitStatus>,
    /// QEMU's stderr.
    pub qemu_stderr: String,
    /// The QEMU command line.
    pub qemu_command: Vec<String>,
}

impl VmResult {
    /// The first marker starting with `prefix`.
    pub fn marker(&self, prefix: &str) -> Option<&str> {
        self.markers
            .iter()
            .map(|m| m.as_str())
            .find(|m| m.starts_with(prefix))
    }
    /// The `setup-failed ...` marker of `/init`, if setup failed.
    pub fn setup_error(&self) -> Option<&str> {
        self.marker("setup-failed ")
    }
    /// True if the command ran, exited 0, and QEMU powered off by itself.
    pub fn success(&self) -> bool {
        self.exit == Some(0) && !self.timed_out
    }
    /// A multi-line description for test failures: outcome, QEMU command and stderr, and the
    /// whole serial log.
    pub fn report(&self) -> String {
        format!(
            "VM: exit {:?}, timed_out {}, qemu {:?}, {:.1} s\nmarkers: {:?}\nqemu: {}\nqemu stderr:\n{}\n--- serial ---\n{}--- end serial ---",
            self.exit,
            self.timed_out,
            self.qemu_status,
            self.duration.as_secs_f64(),
            self.markers,
            self.qemu_command.join(" "),
            self.qemu_stderr,
            self.serial
        )
    }
}

#[derive(Default)]
struct Serial {
    text: String,
    markers: Vec<String>,
    partial: String,
    eof: bool,
}

type Shared = Arc<(Mutex<Serial>, Condvar)>;

/// A running QEMU. Dropping it kills QEMU.
pub struct RunningVm {
    child: Option<Child>,
    serial: Shared,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    start: Instant,
    deadline: Instant,
    command: Vec<String>,
    cleanup: Option<PathBuf>,
}

/// Boots VMs.
pub struct Vm;

impl Vm {
    /// The QEMU command line for `image` and `opts`.
    pub fn command_line(assets: &Assets, image: &GuestImage, opts: &VmOpts) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &str| a.push(s.to_string());
        push(&assets.qemu.to_string_lossy());
        for s in [
            "-M",
            "q35,accel=tcg,kernel-irqchip=split",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
        ] {
            push(s);
        }
        push("-m");
        push(&opts.memory_mib.to_string());
        push("-kernel");
        push(&image.kernel().to_string_lossy());
        push("-initrd");
        push(&image.initrd().to_string_lossy());
        push("-append");
        let mut cmdline = KERNEL_CMDLINE.to_string();
        if !opts.append.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&opts.append);
        }
        push(&cmdline);
        if opts.iommu {
            push("-device");
            push("intel-iommu,intremap=on,caching-mode=on");
        }
        let mut nic = format!(
            "virtio-net-pci,disable-legacy=on,iommu_platform={},romfile=,mac={}",
            if opts.iommu { "on" } else { "off" },
            mac_string(opts.mac)
        );
        match &opts.net {
            Net::None => {}
            Net::Dgram { guest, host } => {
                push("-netdev");
                push(&format!(
                    "dgram,id=n0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                    guest.display(),
                    host.display()
                ));
                nic.push_str(",netdev=n0");
            }
            Net::Custom(s) => {
                push("-netdev");
                push(s);
                nic.push_str(",netdev=n0");
            }
        }
        for p in &opts.nic_props {
            nic.push(',');
            nic.push_str(p);
        }
        push("-device");
        push(&nic);
        for s in &opts.qemu_args {
            push(s);
        }
        a
    }

    /// Starts QEMU; use the returned handle to watch markers, then [`RunningVm::wait`].
    pub fn spawn(image: &GuestImage, opts: &VmOpts) -> Result<RunningVm, Error> {
        let assets = Assets::locate()?;
        let command = Vm::command_line(&assets, image, opts);
        let cleanup = match &opts.net {
            Net::Dgram { guest, .. } => {
                // QEMU binds the guest socket and fails if a stale one is there.
                let _ = std::fs::remove_file(guest);
                Some(guest.clone())
            }
            _ => None,
        };
        let mut child = Command::new(&command[0])
            .args(&command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::new(format!("starting {}: {e}", command[0])))?;
        let start = Instant::now();
        let serial: Shared = Arc::new((Mutex::new(Serial::default()), Condvar::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        {
            let mut out = child.stdout.take().expect("piped stdout");
            let serial = serial.clone();
            let echo = opts.echo;
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    let n = match out.read(&mut buf) {
                        Ok(0) | Err(_) => 0,
                        Ok(n) => n,
                    };
                    let (lock, cv) = &*serial;
                    let mut s = lock.lock().unwrap();
                    if n == 0 {
                        let rest = std::mem::take(&mut s.partial);
                        if !rest.is_empty() {
                            s.text.push_str(&rest);
                            s.text.push('\n');
                            if let Some(m) = marker_of(&rest) {
                                s.markers.push(m);
                            }
                        }
                        s.eof = true;
                        cv.notify_all();
                        return;
                    }
                    let chunk = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                    s.partial.push_str(&chunk);
                    while let Some(i) = s.partial.find('\n') {
                        let line: String = s.partial.drain(..=i).collect();
                        let line = line.trim_end_matches('\n').to_string();
                        if echo {
                            eprintln!("[guest] {line}");
                        }
                        s.text.push_str(&line);
                        s.text.push('\n');
                        if let Some(m) = marker_of(&line) {
                            s.markers.push(m);
                        }
                    }
                    cv.notify_all();
                }
            }));
        }
        {
            let mut err = child.stderr.take().expect("piped stderr");
            let stderr = stderr.clone();
            readers.push(std::thread::spawn(move || {
                let mut s = String::new();
                let _ = err.read_to_string(&mut s);
                *stderr.lock().unwrap() = s;
            }));
        }
        Ok(RunningVm {
            child: Some(child),
            serial,
            stderr,
            readers,
            start,
            deadline: start + opts.timeout,
            command,
            cleanup,
        })
    }

    /// Boots `image`, waits for the guest to power off (or the timeout), and returns the log.
    pub fn run(image: &GuestImage, opts: &VmOpts) -> Result<VmResult, Error> {
        Ok(Vm::spawn(image, opts)?.wait())
    }
}

fn marker_of(line: &str) -> Option<String> {
    line.find(MARKER)
        .map(|i| line[i + MARKER.len()..].trim_end().to_string())
}

impl RunningVm {
    /// Waits until a marker starting with `prefix` appears (returns it), the console closes, or
    /// `timeout` (or the VM's own deadline) passes (returns `None`).
    pub fn wait_for_marker(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let until = (Instant::now() + timeout).min(self.deadline);
        let (lock, cv) = &*self.serial;
        let mut s = lock.lock().unwrap();
        loop {
            if let Some(m) = s.markers.iter().find(|m| m.starts_with(prefix)) {
                return Some(m.clone());
            }
            let now = Instant::now();
            if s.eof || now >= until {
                return None;
            }
            s = cv.wait_timeout(s, until - now).unwrap().0;
        }
    }

    /// The markers so far.
    pub fn markers(&self) -> Vec<String> {
        self.serial.0.lock().unwrap().markers.clone()
    }

    /// The serial log so far.
    pub fn serial(&self) -> String {
        self.serial.0.lock().unwrap().text.clone()
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Moves the deadline (at which [`RunningVm::wait`] kills QEMU) to `from_now` from now.
    pub fn set_deadline(&mut self, from_now: Duration) {
        self.deadline = Instant::now() + from_now;
    }

    /// Time since QEMU started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Waits for QEMU to exit (the guest powers off after its command), killing it at the
    /// deadline, and returns everything it printed.
    pub fn wait(mut self) -> VmResult {
        let mut child = self.child.take().expect("wait once");
        let mut timed_out = false;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) => {}
                Err(_) => break None,
            }
            if Instant::now() >= self.deadline {
                timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let duration = self.start.elapsed();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let s = self.serial.0.lock().unwrap();
        let exit = s.markers.iter().rev().find_map(|m| {
            m.strip_prefix("exit ")
                .and_then(|c| c.trim().parse::<i32>().ok())
        });
        VmResult {
            serial: s.text.clone(),
            markers: s.markers.clone(),
            exit,
            duration,
            timed_out,
            qemu_status: status,
            qemu_stderr: self.stderr.lock().unwrap().clone(),
            qemu_command: self.command.clone(),
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(p) = self.cleanup.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

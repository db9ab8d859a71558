//! `zcrx vm`: the VFIO scenario for a user, on the host. Builds a static `zcrx`, a guest image
//! (Debian's cloud kernel, busybox, the vfio modules), boots QEMU (TCG, q35, intel-iommu,
//! virtio-net-pci with iommu_platform=on), binds the NIC to vfio-pci and runs
//! `zcrx rx --vfio` in the guest while the host feeds it generated frames through the NIC's
//! netdev; prints what the guest received and verified.
//!
//! `zcrx vm --bench` runs `zcrx bench vfio` in the guest instead (zero copy against copy mode,
//! interleaved phases) while a host thread feeds frames as fast as the netdev takes them, for
//! the whole run; prints the guest's medians and the zero-copy / copy ratios.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use traffic::frame::{FrameGen, DEFAULT_SRC_MAC};
use vm_tests::{Assets, GuestImage, HostPort, NicMode, RunningVm, Vm, VmOpts, VmResult, GUEST_MAC};

#[derive(Args, Debug)]
pub struct VmArgs {
    /// Frames the host sends into the guest NIC.
    #[arg(long, default_value_t = 2000)]
    pub frames: u64,
    /// Frame length range.
    #[arg(long, default_value_t = 60)]
    pub min_frame: usize,
    #[arg(long, default_value_t = 1514)]
    pub max_frame: usize,
    /// Boot-to-poweroff limit, seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Print the guest's serial console as it runs.
    #[arg(long)]
    pub echo: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Benchmark zero copy against copy mode in the guest (`zcrx bench vfio`) while the host
    /// sends frames as fast as the NIC takes them; `--frames` is not used.
    #[arg(long)]
    pub bench: bool,
    /// With --bench: seconds each phase receives.
    #[arg(long, default_value_t = 5.0, requires = "bench")]
    pub seconds: f64,
    /// With --bench: runs of each mode (interleaved).
    #[arg(long, default_value_t = 3, requires = "bench")]
    pub runs: u32,
    /// With --bench: microseconds the guest's receiver sleeps after an empty poll (0: spin).
    #[arg(long, default_value_t = 50, requires = "bench")]
    pub idle_sleep_us: u64,
}

/// Generated frames: the seed `zcrx rx --verify-seed` checks against.
const SEED: u64 = 5;

pub fn run(a: &VmArgs) -> Result<(), String> {
    let gen = FrameGen::new(SEED, GUEST_MAC, DEFAULT_SRC_MAC, a.min_frame, a.max_frame)
        .map_err(|e| format!("--min-frame/--max-frame: {e}"))?;
    if a.bench {
        bench(a, gen)
    } else {
        receive(a, gen)
    }
}

/// A guest booted with its NIC bound to vfio-pci, running one `zcrx` command line, and the
/// host's end of the NIC's wire.
struct Guest {
    vm: RunningVm,
    port: Arc<HostPort>,
    dir: PathBuf,
    start: Instant,
}

impl Guest {
    /// Build a static `zcrx` and the guest image running `cmd`, and boot it.
    fn boot(a: &VmArgs, cmd: &str) -> Result<Guest, String> {
        let assets = Assets::locate().map_err(|e| e.to_string())?;
        eprintln!("zcrx vm: building a static zcrx (first time: a minute or two)");
        let bin = vm_tests::build_static("zcrx-cli", &["zcrx"]).map_err(|e| e.to_string())?;
        let dir = std::env::temp_dir().join(format!("zcrx-vm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let image = GuestImage::builder(&assets)
            .nic(NicMode::Vfio)
            .binary(&bin[0])
            .command(cmd)
            .write(dir.join("initrd"))
            .map_err(|e| e.to_string())?;
        let port = Arc::new(HostPort::new().map_err(|e| format!("host port: {e}"))?);
        let mut opts = VmOpts::default().host_port(&port).timeout(Duration::from_secs(a.timeout));
        opts.echo = a.echo;
        eprintln!("zcrx vm: booting the guest (TCG)");
        let start = Instant::now();
        let vm = Vm::spawn(&image, &opts).map_err(|e| e.to_string())?;
        Ok(Guest { vm, port, dir, start })
    }

    /// Wait until the guest's console shows `text` (what the command says on stderr when it is
    /// ready): the device's reset at open purges what QEMU queued before, so send after it.
    fn wait_for(self, text: &str, what: &str, timeout: Duration) -> Result<Guest, String> {
        let until = Instant::now() + timeout;
        while !self.vm.serial().contains(text) {
            if Instant::now() > until || self.vm.serial().contains("ZCRX-VM: exit") {
                let r = self.finish_raw();
                return Err(format!("{what} did not get ready in the guest:\n{}", r.report()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(self)
    }

    fn finish_raw(self) -> VmResult {
        let r = self.vm.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        r
    }

    /// Wait for the guest to power off; the JSON object its command printed, the run, and the
    /// seconds from boot to poweroff. Fails unless the command exited 0.
    fn finish(self, what: &str) -> Result<(serde_json::Value, VmResult, f64), String> {
        let start = self.start;
        let r = self.finish_raw();
        let secs = start.elapsed().as_secs_f64();
        let out = r
            .serial
            .lines()
            .find_map(|l| l.find('{').and_then(|i| serde_json::from_str::<serde_json::Value>(&l[i..]).ok()))
            .ok_or_else(|| format!("{what} printed no result in the guest:\n{}", r.report()))?;
        if r.exit != Some(0) {
            return Err(format!("the guest run failed:\n{}", r.report()));
        }
        Ok((out, r, secs))
    }
}

/// `zcrx rx --vfio` in the guest: send `--frames` frames once it is ready; it verifies each.
fn receive(a: &VmArgs, mut gen: FrameGen) -> Result<(), String> {
    let cmd = format!(
        "zcrx rx --vfio $ZCRX_NIC --count {} --verify-seed {SEED} --min-frame {} --max-frame {} --area-size 4M --duration {} --json",
        a.frames, a.min_frame, a.max_frame, a.timeout.saturating_sub(30).max(10)
    );
    let g = Guest::boot(a, &cmd)?.wait_for("zcrx: receiving zero-copy", "zcrx rx", Duration::from_secs(a.timeout))?;
    let mut buf = vec![0u8; a.max_frame];
    for _ in 0..a.frames {
        let len = gen.next_into(&mut buf).map_err(|e| e.to_string())?;
        g.port.send(&buf[..len]).map_err(|e| format!("sending into the guest NIC: {e}"))?;
    }
    let (out, r, secs) = g.finish("zcrx rx")?;
    if out["verified"] != a.frames || out["corrupted"] != 0 {
        return Err(format!("the guest run failed:\n{}", r.report()));
    }
    if a.json {
        println!("{}", json!({"sent": a.frames, "guest": out, "vm_seconds": secs}));
    } else {
        println!("zcrx vm: QEMU guest (TCG, intel-iommu), virtio-net bound to vfio-pci, our driver over VFIO");
        println!(
            "  sent {} frames from the host; the guest received {} zero-copy ({} bytes), verified {}, corrupted {}",
            a.frames, out["frames"], out["zc_bytes"], out["verified"], out["corrupted"]
        );
        println!("  copy_count {} (zero copy: the device DMAs into the area through the IOMMU); {:.1} s in all", out["copy_count"], secs);
    }
    Ok(())
}

/// Frames the sender cycles through (generated up front: sending is all it does).
const POOL: usize = 512;

/// `zcrx bench vfio` in the guest; a host thread keeps the NIC's netdev full for the whole run.
fn bench(a: &VmArgs, mut gen: FrameGen) -> Result<(), String> {
    if !(a.seconds > 0.0 && a.seconds.is_finite()) || a.runs == 0 {
        return Err("--seconds and --runs must be positive".into());
    }
    let mut pool = Vec::with_capacity(POOL);
    let mut buf = vec![0u8; a.max_frame];
    for _ in 0..POOL {
        let len = gen.next_into(&mut buf).map_err(|e| e.to_string())?;
        pool.push(buf[..len].to_vec());
    }
    let cmd = format!(
        "zcrx bench vfio --bdf $ZCRX_NIC --seconds {} --runs {} --idle-sleep-us {}",
        a.seconds, a.runs, a.idle_sleep_us
    );
    let phase = |k: u32| format!("zcrx: bench vfio phase {k} ");
    let g = Guest::boot(a, &cmd)?.wait_for(&phase(0), "zcrx bench vfio", Duration::from_secs(a.timeout))?;
    // Each phase resets the device, which purges what QEMU queued; sending continuously means
    // every phase finds frames waiting from its first moment.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (port, stop) = (g.port.clone(), stop.clone());
        std::thread::spawn(move || feed(&port, &pool, &stop))
    };
    for k in 0..2 * a.runs {
        if k > 0 && !g.vm.serial().contains(&phase(k)) {
            // Progress only: the sender does not wait for anything.
            let until = Instant::now() + Duration::from_secs_f64(a.seconds + 60.0);
            while !g.vm.serial().contains(&phase(k)) && !g.vm.serial().contains("ZCRX-VM: exit") && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if !a.json {
            eprintln!("zcrx vm: phase {k} ({}) running", if k % 2 == 0 { "zero copy" } else { "copy" });
        }
    }
    let result = g.finish("zcrx bench vfio");
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().map_err(|_| "the sender thread panicked".to_string())?;
    let (out, _, secs) = result?;
    if a.json {
        println!(
            "{}",
            json!({"bench": "vm-vfio", "sent": sent, "min_frame": a.min_frame, "max_frame": a.max_frame,
                   "guest": out, "vm_seconds": secs})
        );
    } else {
        let f = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.0}"));
        let r = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
        println!("zcrx vm --bench: QEMU guest (TCG, intel-iommu), virtio-net on vfio-pci, our driver over VFIO");
        println!(
            "  {} s per phase, {} runs of each mode interleaved, frames of {}..={} bytes, receiver sleeps {} us when idle; medians (TCG: only the ratio means something)",
            a.seconds, a.runs, a.min_frame, a.max_frame, a.idle_sleep_us
        );
        println!(
            "  {:<10} {:>16} {:>22} {:>27}   frames/s of each run",
            "mode", "frames/s (wall)", "frames per CPU-second", "frames per busy CPU-second"
        );
        for (m, name) in [("zc", "zero copy"), ("copy", "copy")] {
            let each: Vec<String> = out["phases"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["mode"] == m)
                .map(|p| f(&p["fps_wall"]))
                .collect();
            let med = &out["median"][m];
            println!(
                "  {:<10} {:>16} {:>22} {:>27}   {}",
                name, f(&med["fps_wall"]), f(&med["fps_cpu"]), f(&med["fps_busy_cpu"]), each.join(" ")
            );
        }
        let ratio = &out["ratio_zc_vs_copy"];
        println!(
            "  zero copy / copy: {} per wall-second, {} per CPU-second, {} per busy CPU-second of the receiving thread",
            r(&ratio["fps_wall"]), r(&ratio["fps_cpu"]), r(&ratio["fps_busy_cpu"])
        );
        println!("  the host sent {sent} frames; {secs:.1} s in all");
    }
    Ok(())
}

/// Send `pool` round and round until `stop`; returns the frames sent. A full socket (the guest
/// between phases, or slower than us) is waited out; other errors (QEMU gone, a transient
/// shortage) are retried a little later: the guest's phases end on their own clock.
fn feed(port: &HostPort, pool: &[Vec<u8>], stop: &AtomicBool) -> u64 {
    let mut sent = 0u64;
    let mut frames = pool.iter().cycle();
    let mut f = frames.next().expect("a non-empty pool");
    while !stop.load(Ordering::Relaxed) {
        match port.send(f) {
            Ok(()) => {
                sent += 1;
                f = frames.next().expect("cycle");
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    sent
}

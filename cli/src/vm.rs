//! `zcrx vm`: the VFIO scenario for a user, on the host. Builds a static `zcrx`, a guest image
//! (Debian's cloud kernel, busybox, the vfio modules), boots QEMU (TCG, q35, intel-iommu,
//! virtio-net-pci with iommu_platform=on), binds the NIC to vfio-pci and runs
//! `zcrx rx --vfio` in the guest while the host feeds it generated frames through the NIC's
//! netdev; prints what the guest received and verified.

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use traffic::frame::{FrameGen, DEFAULT_SRC_MAC};
use vm_tests::{Assets, GuestImage, HostPort, NicMode, Vm, VmOpts, GUEST_MAC};

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
}

pub fn run(a: &VmArgs) -> Result<(), String> {
    const SEED: u64 = 5;
    let mut gen = FrameGen::new(SEED, GUEST_MAC, DEFAULT_SRC_MAC, a.min_frame, a.max_frame)
        .map_err(|e| format!("--min-frame/--max-frame: {e}"))?;
    let assets = Assets::locate().map_err(|e| e.to_string())?;
    eprintln!("zcrx vm: building a static zcrx (first time: a minute or two)");
    let bin = vm_tests::build_static("zcrx-cli", &["zcrx"]).map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("zcrx-vm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let cmd = format!(
        "zcrx rx --vfio $ZCRX_NIC --count {} --verify-seed {SEED} --min-frame {} --max-frame {} --area-size 4M --duration {} --json",
        a.frames, a.min_frame, a.max_frame, a.timeout.saturating_sub(30).max(10)
    );
    let image = GuestImage::builder(&assets)
        .nic(NicMode::Vfio)
        .binary(&bin[0])
        .command(&cmd)
        .write(dir.join("initrd"))
        .map_err(|e| e.to_string())?;
    let port = HostPort::new().map_err(|e| format!("host port: {e}"))?;
    let mut opts = VmOpts::default().host_port(&port).timeout(Duration::from_secs(a.timeout));
    opts.echo = a.echo;
    eprintln!("zcrx vm: booting the guest (TCG)");
    let start = Instant::now();
    let vm = Vm::spawn(&image, &opts).map_err(|e| e.to_string())?;
    // The device's reset purges what QEMU queued before: send once the driver says it is ready.
    let ready = Instant::now() + Duration::from_secs(a.timeout);
    while !vm.serial().contains("zcrx: receiving zero-copy") {
        if Instant::now() > ready || vm.serial().contains("ZCRX-VM: exit") {
            let r = vm.wait();
            return Err(format!("zcrx rx did not get ready in the guest:\n{}", r.report()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut buf = vec![0u8; a.max_frame];
    for _ in 0..a.frames {
        let len = gen.next_into(&mut buf).map_err(|e| e.to_string())?;
        port.send(&buf[..len]).map_err(|e| format!("sending into the guest NIC: {e}"))?;
    }
    let r = vm.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let out = r
        .serial
        .lines()
        .find_map(|l| l.find('{').and_then(|i| serde_json::from_str::<serde_json::Value>(&l[i..]).ok()))
        .ok_or_else(|| format!("zcrx rx printed no result in the guest:\n{}", r.report()))?;
    if r.exit != Some(0) || out["verified"] != a.frames || out["corrupted"] != 0 {
        return Err(format!("the guest run failed:\n{}", r.report()));
    }
    let secs = start.elapsed().as_secs_f64();
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

//! Our userspace virtio-net driver over the vfio-pci transport, on a real (emulated) PCI function
//! behind an IOMMU: QEMU/TCG guest, q35 + intel-iommu, `virtio-net-pci` (1af4:1041,
//! `iommu_platform=on`) bound to vfio-pci by `/init`. The guest runs `driver/examples/vfio_rx.rs`
//! built static; the host feeds frames into the NIC's netdev through a [`HostPort`].
//!
//! What the tests prove:
//! - `zero_copy_receive_through_the_iommu`: `VfioPci::open` finds the virtio capabilities in real
//!   config space and mmaps them; feature negotiation includes VIRTIO_F_ACCESS_PLATFORM; the
//!   MAC read through the device-config structure is the NIC's; `register_ifq` maps an anonymous
//!   4 MiB area (and the queue memory) at IOVAs from our allocator (>= 1 GiB); the device reads
//!   our tx queue through the IOMMU (the host receives the guest's "ready" frame) and writes every
//!   frame the host sends into the area's niovs, byte-exact, including frames spanning up to 16
//!   buffers (MRG_RXBUF, `ZCRX_CQE_F_CONTD`); after `close` every IOVA is unmapped, and a second
//!   open of the same function in the same process works again (device reset, group released).
//! - `msix_through_eventfds`: the MSI-X option (VFIO SET_IRQS with eventfds, per-queue vectors
//!   accepted by the device) coexists with polled receive.
//! - `open_explains_an_unbound_nic`: with vfio loaded but the NIC left to the kernel's
//!   virtio-pci driver, `open` fails and says how to bind it (driver_override + drivers_probe).
//!
//! Needs `bash ci/install-vm.sh`; without it the tests fail with that message (nothing skipped).

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vm_tests::{
    eth_frame, eth_parse, is_static_elf, static_target_dir, workspace_root, Assets, GuestImage,
    HostPort, NicMode, Vm, VmOpts, VmResult, GUEST_MAC, STATIC_RUSTFLAGS, STATIC_TARGET,
    VFIO_MODULES,
};

const ETHERTYPE: u16 = 0x88b5;
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Frame lengths the host cycles through: minimum, odd, MTU, one byte past a 4 KiB buffer (the
/// device writes 4096 minus the 52-byte headroom: after the 12-byte virtio-net header exactly
/// 4032 bytes of frame fit), jumbo, and 17 buffers.
const LENS: &[usize] = &[
    60, 61, 100, 577, 1514, 1515, 2048, 4032, 4033, 8192, 9014, 16000, 65000,
];
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;

fn assets() -> Assets {
    Assets::locate().unwrap_or_else(|e| panic!("{e}"))
}

/// `driver/examples/vfio_rx.rs`, built static once per test process:
/// `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu
/// --target-dir target/vm -p zcrx-driver --example vfio_rx`.
fn vfio_rx() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let target_dir = static_target_dir();
        let out = Command::new(&cargo)
            .current_dir(workspace_root())
            .args([
                "build",
                "--release",
                "--target",
                STATIC_TARGET,
                "-p",
                "zcrx-driver",
                "--example",
                "vfio_rx",
            ])
            .arg("--target-dir")
            .arg(&target_dir)
            .env("RUSTFLAGS", STATIC_RUSTFLAGS)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .output()
            .unwrap_or_else(|e| panic!("running cargo: {e}"));
        assert!(
            out.status.success(),
            "static build of vfio_rx failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let p = target_dir
            .join(STATIC_TARGET)
            .join("release")
            .join("examples")
            .join("vfio_rx");
        assert!(
            is_static_elf(&p).unwrap_or_else(|e| panic!("{e}")),
            "{} is not static",
            p.display()
        );
        p
    })
}

fn image_path(name: &str) -> PathBuf {
    let dir = static_target_dir().join("images");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The pattern byte `i` of frame `seq` in `phase` (as `vfio_rx.rs` checks it).
fn pattern(seq: u32, phase: u32, i: usize) -> u8 {
    (seq.wrapping_mul(31).wrapping_add(phase.wrapping_mul(101)) as usize).wrapping_add(i * 7) as u8
}

/// Test frame `seq` of `phase`: `len` bytes including the Ethernet header.
fn test_frame(seq: u32, phase: u32, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(len);
    p.extend_from_slice(b"ZCRXVFIO");
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&phase.to_le_bytes());
    p.extend_from_slice(&(len as u32).to_le_bytes());
    let mut f = eth_frame(GUEST_MAC, HOST_MAC, ETHERTYPE, &p);
    f.truncate(14 + p.len());
    while f.len() < len {
        let i = f.len();
        f.push(pattern(seq, phase, i));
    }
    f
}

/// Send with retries while the guest is slow to take frames (the unix socket queue is short).
fn send_until(port: &HostPort, f: &[u8], deadline: Instant) -> Result<(), String> {
    loop {
        match port.send(f) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut && Instant::now() < deadline => {}
            Err(e) => return Err(format!("send of {} bytes: {e}", f.len())),
        }
    }
}

/// What the host side did.
#[derive(Debug, Default)]
struct HostLog {
    ready_frames: Vec<Vec<u8>>,
    fault_armed: Option<Vec<u8>>,
    sent: u64,
    error: Option<String>,
}

/// Wait for the guest's broadcast frame whose payload starts with `text`.
fn wait_hello(port: &HostPort, text: &str) -> Result<Vec<u8>, String> {
    port.recv_matching(Duration::from_secs(240), |f| {
        eth_parse(f)
            .is_some_and(|e| e.ethertype == ETHERTYPE && e.payload.starts_with(text.as_bytes()))
    })
    .map_err(|e| format!("recv: {e}"))?
    .ok_or_else(|| format!("no {text:?} frame from the guest"))
}

/// The host side: with `fault`, answer the guest's "fault-armed" frame with one frame (the
/// device fails on it); then per phase wait for "ready <phase>" and send `frames` test frames.
fn host_side(port: &HostPort, frames: u32, phases: &[u32], fault: bool) -> HostLog {
    let mut log = HostLog::default();
    let r = (|| {
        if fault {
            log.fault_armed = Some(wait_hello(port, "zcrx-vfio-rx fault-armed")?);
            let poke = eth_frame(GUEST_MAC, HOST_MAC, ETHERTYPE, b"zcrx-host poke");
            send_until(port, &poke, Instant::now() + Duration::from_secs(30))?;
        }
        for &phase in phases {
            log.ready_frames
                .push(wait_hello(port, &format!("zcrx-vfio-rx ready {phase}"))?);
            let deadline = Instant::now() + Duration::from_secs(240);
            for seq in 0..frames {
                let f = test_frame(seq, phase, LENS[seq as usize % LENS.len()]);
                send_until(port, &f, deadline)
                    .map_err(|e| format!("phase {phase} seq {seq}: {e}"))?;
                log.sent += 1;
            }
        }
        Ok::<(), String>(())
    })();
    log.error = r.err();
    log
}

/// Boot a guest running `vfio_rx ARGS --frames N --phases P` while the host side feeds it;
/// the guest and the host side must both succeed.
fn run_rx(
    image_name: &str,
    args: &str,
    frames: u32,
    phases: &[u32],
    fault: bool,
) -> (VmResult, HostLog) {
    let assets = assets();
    let image = GuestImage::builder(&assets)
        .nic(NicMode::Vfio)
        .binary(vfio_rx())
        .command(&format!(
            "vfio_rx --frames {frames} --phases {} --timeout 120 {args}",
            phases.len()
        ))
        .write(image_path(image_name))
        .unwrap_or_else(|e| panic!("{e}"));
    let port = Arc::new(HostPort::new().unwrap());
    let opts = VmOpts::default()
        .host_port(&port)
        .timeout(Duration::from_secs(400));
    let vm = Vm::spawn(&image, &opts).unwrap_or_else(|e| panic!("{e}"));
    let host = {
        let port = port.clone();
        let phases = phases.to_vec();
        std::thread::spawn(move || host_side(&port, frames, &phases, fault))
    };
    let r = vm.wait();
    let log = host.join().unwrap();
    eprintln!(
        "{image_name}: boot-to-poweroff {:.1} s, markers {:#?}",
        r.duration.as_secs_f64(),
        r.markers
    );
    assert!(r.setup_error().is_none(), "{}", r.report());
    assert!(log.error.is_none(), "host: {:?}\n{}", log.error, r.report());
    assert!(r.success(), "{}", r.report());
    (r, log)
}

/// The checks every successful receive phase must pass.
fn check_phase(r: &VmResult, log: &HostLog, k: usize, phase: u32, frames: u32) {
    let reg = marker(r, &format!("vfio-rx registered phase {phase} "));
    // The MAC came from the device-config structure.
    assert_eq!(field(reg, "mac"), "52:54:00:12:34:56", "{reg}");
    let features =
        u64::from_str_radix(field(reg, "features").trim_start_matches("0x"), 16).unwrap();
    assert_ne!(features & VIRTIO_F_VERSION_1, 0, "{reg}");
    assert_ne!(features & VIRTIO_F_ACCESS_PLATFORM, 0, "{reg}");
    assert_ne!(features & VIRTIO_NET_F_MRG_RXBUF, 0, "{reg}");
    // Every mapping has an IOVA from our window (>= 1 GiB), the 4 MiB area 2 MiB aligned.
    let iovas: Vec<(u64, u64)> = field(reg, "iova")
        .split(',')
        .map(|s| {
            let (a, l) = s.split_once('+').unwrap();
            (
                u64::from_str_radix(&a[2..], 16).unwrap(),
                u64::from_str_radix(&l[2..], 16).unwrap(),
            )
        })
        .collect();
    assert!(iovas.len() >= 2, "area and queue memory: {reg}");
    assert!(
        iovas
            .iter()
            .all(|&(a, _)| (1 << 30..256 << 30).contains(&a)),
        "{reg}"
    );
    assert!(
        iovas
            .iter()
            .any(|&(a, l)| l == 4 << 20 && a % (2 << 20) == 0),
        "the 4 MiB area: {reg}"
    );
    assert!(field(reg, "posted").parse::<u32>().unwrap() > 0, "{reg}");

    // The device read our tx queue: the host got the ready frame from the guest's MAC.
    let ready = eth_parse(&log.ready_frames[k]).unwrap();
    assert_eq!((ready.src, ready.dst), (GUEST_MAC, [0xff; 6]));

    // Every frame arrived intact, zero copy, the long ones spanning several buffers.
    let rx = marker(r, &format!("vfio-rx received phase {phase} "));
    assert_eq!(field(rx, "frames"), frames.to_string(), "{rx}");
    let lens = || (0..frames as usize).map(|s| LENS[s % LENS.len()]);
    assert_eq!(
        field(rx, "bytes"),
        lens().sum::<usize>().to_string(),
        "{rx}"
    );
    assert_eq!(
        field(rx, "multi"),
        lens().filter(|&l| l > 4032).count().to_string(),
        "{rx}"
    );
    assert_eq!(field(rx, "invalid"), "0", "{rx}");
    assert_eq!(field(rx, "device_errors"), "0", "{rx}");
    assert_eq!(field(rx, "zc"), field(rx, "completions"), "{rx}");
    // Teardown unmapped every IOVA (checked in the guest).
    marker(r, &format!("vfio-rx closed phase {phase}"));
}

fn field<'a>(marker: &'a str, key: &str) -> &'a str {
    let mut it = marker.split_whitespace();
    while let Some(w) = it.next() {
        if w == key {
            return it.next().unwrap_or("");
        }
    }
    panic!("no field {key} in {marker:?}")
}

fn marker<'a>(r: &'a VmResult, prefix: &str) -> &'a str {
    r.marker(prefix)
        .unwrap_or_else(|| panic!("no marker {prefix:?}\n{}", r.report()))
}

#[test]
fn zero_copy_receive_through_the_iommu() {
    let frames = 390; // 30 rounds of LENS: ~3.4 MB per phase
    let (r, log) = run_rx("driver-vfio-rx.cpio", "", frames, &[0, 1], false);
    assert_eq!(log.sent, 2 * frames as u64);

    // The transport found and mapped the virtio structures of the real device.
    let open = marker(&r, "vfio-rx open ");
    assert!(field(open, "queues").parse::<u16>().unwrap() >= 2, "{open}");
    // QEMU's modern BAR (4) is mmappable as a whole: no access needs the pread fallback.
    for k in ["mmap-common", "mmap-notify", "mmap-isr", "mmap-device"] {
        assert_eq!(field(open, k), "true", "{k}: {open}");
    }
    // Phase 1 opened the same function again in the same process after phase 0 was closed
    // and dropped: the device was reset and the group released.
    for (k, phase) in [0u32, 1].into_iter().enumerate() {
        check_phase(&r, &log, k, phase, frames);
    }
    marker(&r, "vfio-rx ok");
}

#[test]
fn bar_access_without_mmap() {
    let frames = 130;
    let (r, log) = run_rx("driver-vfio-nommap.cpio", "--no-mmap", frames, &[0], false);
    let open = marker(&r, "vfio-rx open ");
    for k in ["mmap-common", "mmap-notify", "mmap-isr", "mmap-device"] {
        assert_eq!(field(open, k), "false", "{k}: {open}");
    }
    check_phase(&r, &log, 0, 0, frames);
}

#[test]
fn msix_through_eventfds() {
    let frames = 130;
    let (r, log) = run_rx("driver-vfio-msix.cpio", "--msix", frames, &[0], false);
    marker(&r, "vfio-rx msix enabled 2 vectors");
    // QEMU signals each queue's first used-ring update regardless of suppression: both vectors
    // reached their eventfds through VFIO.
    let rx = marker(&r, "vfio-rx received phase 0 ");
    let irqs = &rx[rx.find("irqs [").expect("irqs") + 6..rx.len() - 1];
    let irqs: Vec<u64> = irqs.split(", ").map(|n| n.parse().unwrap()).collect();
    assert!(irqs.len() == 2 && irqs.iter().all(|&n| n >= 1), "{rx}");
    check_phase(&r, &log, 0, 0, frames);
}

#[test]
fn iommu_blocks_an_unmapped_buffer_and_reset_recovers() {
    let frames = 130;
    let (r, log) = run_rx("driver-vfio-fault.cpio", "--fault", frames, &[1], true);
    // The device could not write through the unmapped IOVA: the guest's IOMMU driver logged
    // the blocked DMA write at exactly that address, and the page kept its contents. (QEMU 7.2
    // completes the buffer after the IOMMU dropped the write instead of failing the device;
    // either is accepted, nothing may land.)
    let armed = marker(&r, "vfio-rx fault armed ");
    let dead = field(armed, "iova");
    let det = marker(&r, "vfio-rx fault detected ");
    assert_eq!(field(det, "victim-untouched"), "true", "{det}");
    assert_eq!(field(det, "alive-after-reset"), "true", "{det}");
    // The device failed, completed the buffer without data landing, or left it pending; the
    // DMAR line below proves the write was attempted and blocked.
    let status = u8::from_str_radix(field(det, "status").trim_start_matches("0x"), 16).unwrap();
    assert!(status & 0x40 != 0 || ["0", "1"].contains(&field(det, "used")), "{det}");
    let dmar = r
        .serial
        .lines()
        .find(|l| l.contains("DMAR") && l.contains(&format!("fault addr {dead}")));
    assert!(
        dmar.is_some_and(|l| l.contains("DMA Write")),
        "no DMAR write fault at {dead}\n{}",
        r.report()
    );
    // Same transport, reset and reconnected, then a normal zero-copy phase.
    marker(&r, "vfio-rx reconnected status 0x3");
    check_phase(&r, &log, 0, 1, frames);
    marker(&r, "vfio-rx ok");
}

#[test]
fn mapping_failure_part_way_unwinds_with_the_real_container() {
    // The area maps, the queue memory does not fit the IOVA window: registration fails, and
    // the IOMMU mappings, locked and charged memory are all back to where they were; then a
    // normal registration on the same device receives.
    let frames = 60;
    let (r, log) = run_rx("driver-vfio-unwind.cpio", "--unwind", frames, &[0], false);
    let u = marker(&r, "vfio-rx unwind ");
    assert_eq!(field(u, "mapped-after"), "0", "{u}");
    assert_eq!(field(u, "locked-delta"), "0", "{u}");
    assert_eq!(field(u, "charged-delta"), "0", "{u}");
    assert!(u.contains("DMA mapping") || u.contains("IOVA") || u.contains("iova"), "the error names the mapping: {u}");
    check_phase(&r, &log, 0, 0, frames);
}

#[test]
fn open_explains_an_unbound_nic() {
    let assets = assets();
    // vfio-pci is loaded, but the NIC stays with the kernel's virtio-pci driver.
    let mut b = GuestImage::builder(&assets)
        .nic(NicMode::Untouched)
        .binary(vfio_rx());
    for m in VFIO_MODULES {
        b = b.module(m);
    }
    let image = b
        .command("vfio_rx --frames 1 --timeout 5")
        .write(image_path("driver-vfio-unbound.cpio"))
        .unwrap_or_else(|e| panic!("{e}"));
    let r = Vm::run(&image, &VmOpts::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.setup_error().is_none(), "{}", r.report());
    assert_eq!(r.exit, Some(1), "{}", r.report());
    let e = marker(&r, "vfio-rx error ");
    assert!(e.contains("is bound to virtio-pci, not vfio-pci"), "{e}");
    assert!(
        e.contains("driver_override") && e.contains("drivers_probe"),
        "{e}"
    );
}

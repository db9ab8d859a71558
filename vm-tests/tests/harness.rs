//! Proves the VM harness: a static binary runs in a TCG guest against the vfio-pci-bound NIC,
//! and the host port carries real frames in both directions.
//!
//! Needs `bash ci/install-vm.sh` first; without it every test fails with that message (nothing is
//! skipped). One boot-to-poweroff takes a few seconds under TCG; the static build of the guest
//! binaries (release, `target/vm`) is done once per test process.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use vm_tests::{
    build_static, eth_frame, eth_parse, static_target_dir, Assets, GuestImage, HostPort, NicMode,
    Vm, VmOpts, GUEST_MAC,
};

const ETHERTYPE: u16 = 0x88b5;

fn assets() -> Assets {
    Assets::locate().unwrap_or_else(|e| panic!("{e}"))
}

/// The guest binaries of this crate, built static once.
fn guest_bins() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        let v = build_static("zcrx-vm-tests", &["vfio-probe", "l2-echo"])
            .unwrap_or_else(|e| panic!("{e}"));
        (v[0].clone(), v[1].clone())
    })
}

/// Initramfs images go next to the static builds (overwritten by each run).
fn image_path(name: &str) -> PathBuf {
    let dir = static_target_dir().join("images");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn vfio_probe_sees_the_bound_nic() {
    let assets = assets();
    let (probe, _) = guest_bins();
    let image = GuestImage::builder(&assets)
        .nic(NicMode::Vfio)
        .binary(probe)
        .command("vfio-probe \"$ZCRX_NIC_SYSFS\"")
        .write(image_path("vfio.cpio"))
        .unwrap_or_else(|e| panic!("{e}"));
    // Frames from the host while no driver owns the NIC are dropped by QEMU, harmlessly.
    let port = Arc::new(HostPort::new().unwrap());
    let vm =
        Vm::spawn(&image, &VmOpts::default().host_port(&port)).unwrap_or_else(|e| panic!("{e}"));
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (port, stop) = (port.clone(), stop.clone());
        std::thread::spawn(move || {
            let frame = eth_frame(
                GUEST_MAC,
                [0x02, 0, 0, 0, 0, 0x01],
                ETHERTYPE,
                b"zcrx-host noise",
            );
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) {
                if port.send(&frame).is_ok() {
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            sent
        })
    };
    let r = vm.wait();
    stop.store(true, Ordering::Relaxed);
    let sent = feeder.join().unwrap();
    assert!(
        sent > 0,
        "QEMU never bound the guest socket\n{}",
        r.report()
    );
    eprintln!(
        "vfio boot-to-poweroff {:.1} s, initramfs {} KiB",
        r.duration.as_secs_f64(),
        image.size() / 1024
    );
    assert!(r.setup_error().is_none(), "{}", r.report());
    let bound = r
        .marker("bound ")
        .unwrap_or_else(|| panic!("no bound marker\n{}", r.report()));
    assert!(
        bound.starts_with("bound 0000:") && bound.contains(" group "),
        "{bound}\n{}",
        r.report()
    );
    let probe = r
        .marker("vfio-probe vendor")
        .unwrap_or_else(|| panic!("no probe marker\n{}", r.report()));
    assert!(
        probe.starts_with("vfio-probe vendor 1af4 device 1041 regions "),
        "{probe}\n{}",
        r.report()
    );
    assert!(r.success(), "{}", r.report());
}

#[test]
fn host_port_carries_frames_both_ways() {
    let assets = assets();
    let (_, echo) = guest_bins();
    let image = GuestImage::builder(&assets)
        .nic(NicMode::KernelNet)
        .binary(echo)
        .command("l2-echo \"$ZCRX_IFACE\" 60")
        .write(image_path("kernel-net.cpio"))
        .unwrap_or_else(|e| panic!("{e}"));
    let port = Arc::new(HostPort::new().unwrap());
    let opts = VmOpts::default().host_port(&port);
    let vm = Vm::spawn(&image, &opts).unwrap_or_else(|e| panic!("{e}"));

    // Host side: wait for the guest's hello, answer it with a frame addressed to the guest MAC.
    let host = {
        let port = port.clone();
        std::thread::spawn(move || {
            let hello = port
                .recv_matching(Duration::from_secs(90), |f| {
                    eth_parse(f).is_some_and(|e| {
                        e.src == GUEST_MAC
                            && e.ethertype == ETHERTYPE
                            && e.payload.starts_with(b"zcrx-vm hello")
                    })
                })
                .unwrap()?;
            let reply = eth_frame(
                GUEST_MAC,
                [0x02, 0, 0, 0, 0, 0x01],
                ETHERTYPE,
                b"zcrx-host 7f3a",
            );
            port.send(&reply).unwrap();
            Some(hello)
        })
    };
    let r = vm.wait();
    let hello = host.join().unwrap();
    eprintln!(
        "kernel-net boot-to-poweroff {:.1} s",
        r.duration.as_secs_f64()
    );
    assert!(r.setup_error().is_none(), "{}", r.report());
    let hello = hello.unwrap_or_else(|| panic!("host got no hello frame\n{}", r.report()));
    assert_eq!(eth_parse(&hello).unwrap().dst, [0xff; 6]);
    assert_eq!(
        r.marker("l2 recv"),
        Some("l2 recv zcrx-host 7f3a"),
        "{}",
        r.report()
    );
    assert!(r.success(), "{}", r.report());
}

#[test]
fn exit_code_and_timeout_are_reported() {
    let assets = assets();
    // No NIC setup beyond virtio-pci; the command fails with 3 after printing a marker.
    let image = GuestImage::builder(&assets)
        .nic(NicMode::Untouched)
        .env("GREETING", "it's here")
        .command("echo \"ZCRX-VM: greeting $GREETING\"; exit 3")
        .write(image_path("untouched.cpio"))
        .unwrap_or_else(|e| panic!("{e}"));
    let r = Vm::run(&image, &VmOpts::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        r.marker("greeting"),
        Some("greeting it's here"),
        "{}",
        r.report()
    );
    assert_eq!(r.exit, Some(3), "{}", r.report());
    assert!(!r.timed_out && !r.success());

    // A guest that never powers off is killed at the timeout, and the log so far is kept.
    let image = GuestImage::builder(&assets)
        .nic(NicMode::Untouched)
        .command("echo 'ZCRX-VM: sleeping'; sleep 1000")
        .write(image_path("hang.cpio"))
        .unwrap_or_else(|e| panic!("{e}"));
    let vm = Vm::spawn(&image, &VmOpts::default().timeout(Duration::from_secs(60))).unwrap();
    assert_eq!(
        vm.wait_for_marker("sleeping", Duration::from_secs(50))
            .as_deref(),
        Some("sleeping")
    );
    let r = {
        // Shorten: kill as soon as the marker is there by waiting with a tiny remaining deadline.
        let mut vm = vm;
        vm.set_deadline(Duration::from_millis(100));
        vm.wait()
    };
    assert!(r.timed_out, "{}", r.report());
    assert_eq!(r.exit, None);
    assert!(r.marker("sleeping").is_some());
}

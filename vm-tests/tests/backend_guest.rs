//! Our vhost-user-net backend serving a QEMU guest driven by Linux's own virtio-net driver (an
//! independent driver): the guest sends sequence-numbered, checksummed frames, our backend
//! reflects each one, the guest verifies every frame that comes back. QEMU 7.2 under TCG needs
//! `vectors=0` with vhost-user (MSI-X crashes it), shared guest memory (memfd), and no vIOMMU
//! (vhost-user-backend has no IOTLB support).

use std::path::PathBuf;
use std::time::Duration;

use backend::{BackendConfig, Mode};
use vm_tests::{build_static, static_target_dir, Assets, GuestImage, Net, NicMode, Vm, VmOpts};

#[test]
fn linux_guest_reflects_verified_frames_through_our_backend() {
    const N: u64 = 2000;
    let assets = Assets::locate().unwrap_or_else(|e| panic!("{e}"));
    let bin = build_static("zcrx-vm-tests", &["l2-pingpong"]).unwrap_or_else(|e| panic!("{e}"));
    let dir = static_target_dir().join("images");
    std::fs::create_dir_all(&dir).unwrap();
    let image = GuestImage::builder(&assets)
        .nic(NicMode::KernelNet)
        .binary(&bin[0])
        .command(&format!("l2-pingpong {N} 120 \"$ZCRX_IFACE\""))
        .write(dir.join("backend-guest.cpio"))
        .unwrap_or_else(|e| panic!("{e}"));

    let sock: PathBuf = std::env::temp_dir().join(format!("zcrx-backend-guest-{}.sock", std::process::id()));
    let cfg = BackendConfig::new(&sock, Mode::Reflect);
    let b = backend::start(cfg).unwrap();

    let mut opts = VmOpts::default().timeout(Duration::from_secs(200));
    opts.iommu = false;
    opts.net = Net::Custom("vhost-user,id=n0,chardev=c0".into());
    opts.nic_props = vec!["vectors=0".into()];
    opts.qemu_args = ["-chardev", &format!("socket,id=c0,path={}", sock.display()), "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let r = Vm::run(&image, &opts).unwrap_or_else(|e| panic!("{e}"));
    let s = b.stop();
    assert!(r.success(), "{}\nbackend: {s:?}", r.report());
    assert_eq!(r.marker("l2 pingpong"), Some(format!("l2 pingpong sent {N} verified {N}").as_str()), "{}", r.report());
    assert_eq!((s.tx_frames, s.rx_frames), (N, N), "the backend took N frames from the guest and gave N back: {s:?}");
    assert_eq!((s.rx_dropped, s.tx_dropped), (0, 0), "{s:?}");
    assert_eq!((s.bad_descriptors, s.bad_rings), (0, 0), "Linux's driver gave nothing malformed: {s:?}");
}

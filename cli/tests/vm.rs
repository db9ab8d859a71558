//! `zcrx vm` end to end: a QEMU guest (TCG, intel-iommu) with the virtio-net NIC bound to
//! vfio-pci runs `zcrx rx --vfio`; the host feeds generated frames through the NIC's netdev and
//! the guest verifies each one. Needs `ci/install-vm.sh` (CI runs it).

use std::process::Command;

#[test]
fn zcrx_vm_receives_host_frames_zero_copy_over_vfio() {
    let o = Command::new(env!("CARGO_BIN_EXE_zcrx"))
        .args(["vm", "--frames", "400", "--json", "--timeout", "240"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {err}"));
    let g = &j["guest"];
    assert_eq!(j["sent"], 400);
    assert_eq!(g["mode"], "vfio-zc");
    assert_eq!(g["frames"], 400, "{j}");
    assert_eq!(g["verified"], 400);
    assert_eq!((g["corrupted"].as_u64(), g["lost"].as_u64()), (Some(0), Some(0)));
    assert_eq!(g["copy_count"], 0, "the device DMAs into the area: no copy");
    assert_eq!(g["zc_count"], 400, "one buffer per frame (frames fit 4 KiB)");
}

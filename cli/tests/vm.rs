//! `zcrx vm` end to end: a QEMU guest (TCG, intel-iommu) with the virtio-net NIC bound to
//! vfio-pci runs `zcrx rx --vfio`; the host feeds generated frames through the NIC's netdev and
//! the guest verifies each one. `zcrx vm --bench` runs `zcrx bench vfio` there instead (zero
//! copy against copy mode). Needs `ci/install-vm.sh` (CI runs it).

use std::process::Command;

/// `zcrx vm ARGS --json`: must succeed; its JSON output.
fn vm_json(args: &[&str]) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_zcrx")).arg("vm").args(args).arg("--json").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {err}"))
}

#[test]
fn zcrx_vm_receives_host_frames_zero_copy_over_vfio() {
    let j = vm_json(&["--frames", "400", "--timeout", "240"]);
    let g = &j["guest"];
    assert_eq!(j["sent"], 400);
    assert_eq!(g["mode"], "vfio-zc");
    assert_eq!(g["frames"], 400, "{j}");
    assert_eq!(g["verified"], 400);
    assert_eq!((g["corrupted"].as_u64(), g["lost"].as_u64()), (Some(0), Some(0)));
    assert_eq!(g["copy_count"], 0, "the device DMAs into the area: no copy");
    assert_eq!(g["zc_count"], 400, "one buffer per frame (frames fit 4 KiB)");
}

/// `zcrx vm --bench`: the guest runs `zcrx bench vfio` (a zero-copy phase, then a copy-mode
/// phase on the same function), the host keeps the NIC's netdev fed for the whole run.
#[test]
fn zcrx_vm_bench_compares_zero_copy_with_copy_mode() {
    let j = vm_json(&["--bench", "--seconds", "2", "--runs", "1", "--timeout", "120"]);
    let g = &j["guest"];
    assert_eq!(g["bench"], "vfio", "{j}");
    assert!(j["sent"].as_u64().unwrap() > 0, "{j}");
    let phases = g["phases"].as_array().unwrap_or_else(|| panic!("{j}"));
    assert_eq!(phases.len(), 2, "one run of each mode: {j}");
    let mode = |m: &str| phases.iter().find(|p| p["mode"] == m).unwrap_or_else(|| panic!("no {m} phase: {j}"));
    let (zc, copy) = (mode("zc"), mode("copy"));
    let n = |p: &serde_json::Value, k: &str| p[k].as_u64().unwrap_or_else(|| panic!("{k}: {p}"));
    for p in [zc, copy] {
        assert!(n(p, "frames") > 0 && n(p, "bytes") > 0, "received frames: {p}");
        for k in ["fps_wall", "fps_cpu", "fps_busy_cpu"] {
            assert!(p[k].as_f64().is_some_and(|x| x > 0.0 && x.is_finite()), "{k}: {p}");
        }
        assert_eq!(n(p, "device_errors"), 0, "{p}");
    }
    assert_eq!((n(zc, "copy_count"), n(zc, "copy_bytes")), (0, 0), "zero copy copies nothing: {zc}");
    assert!(n(zc, "zc_count") >= n(zc, "frames"), "{zc}");
    assert_eq!((n(copy, "zc_count"), n(copy, "zc_bytes")), (0, 0), "copy mode places nothing in place: {copy}");
    assert!(n(copy, "copy_count") >= n(copy, "frames") && n(copy, "copy_bytes") >= n(copy, "bytes"), "every frame copied: {copy}");
    for k in ["fps_wall", "fps_cpu", "fps_busy_cpu"] {
        let r = g["ratio_zc_vs_copy"][k].as_f64().unwrap_or_else(|| panic!("ratio {k}: {j}"));
        assert!(r.is_finite() && r > 0.0, "ratio {k}: {j}");
    }
}

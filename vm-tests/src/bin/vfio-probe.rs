//! Guest-side probe of the harness: opens the VFIO container, group and device of the NIC that
//! `/init` bound to vfio-pci, reads the PCI IDs from config space, and prints markers:
//!
//! `ZCRX-VM: vfio-probe vendor 1af4 device 1041 regions N irqs M`
//!
//! Usage: `vfio-probe [SYSFS_PATH]` (default `$ZCRX_NIC_SYSFS`). Exits 0 on success.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR5_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice};

fn main() -> ExitCode {
    let path = std::env::args_os()
        .nth(1)
        .or_else(|| std::env::var_os("ZCRX_NIC_SYSFS"))
        .map(PathBuf::from);
    let Some(path) = path else {
        eprintln!("usage: vfio-probe SYSFS_PATH (or set ZCRX_NIC_SYSFS)");
        return ExitCode::from(2);
    };
    match probe(&path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("ZCRX-VM: vfio-probe error {e}");
            ExitCode::FAILURE
        }
    }
}

fn probe(path: &std::path::Path) -> Result<(), String> {
    let container = Arc::new(VfioContainer::new(None).map_err(|e| format!("container: {e}"))?);
    let device =
        VfioDevice::new(path, container.clone(), false).map_err(|e| format!("device: {e}"))?;

    let mut cfg = [0u8; 64];
    device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut cfg, 0);
    let vendor = u16::from_le_bytes([cfg[0], cfg[1]]);
    let dev = u16::from_le_bytes([cfg[2], cfg[3]]);
    if vendor == 0 && dev == 0 {
        return Err("config space read returned zeros".into());
    }

    // Regions with a size: the BARs the device implements, plus ROM/config.
    let mut regions = 0;
    for i in 0..=VFIO_PCI_CONFIG_REGION_INDEX {
        let size = device.get_region_size(i);
        if size > 0 {
            regions += 1;
        }
        if i <= VFIO_PCI_BAR5_REGION_INDEX && size > 0 {
            let mmap = device.get_region_flags(i) & VFIO_REGION_INFO_FLAG_MMAP != 0;
            println!("ZCRX-VM: vfio-probe bar{i} size {size:#x} mmap {mmap}");
        }
    }
    let msix = device
        .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
        .map(|i| i.count)
        .unwrap_or(0);
    println!(
        "ZCRX-VM: vfio-probe vendor {vendor:04x} device {dev:04x} regions {regions} msix {msix}"
    );
    Ok(())
}

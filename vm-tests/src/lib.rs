//! Runs static workspace binaries inside a QEMU guest whose virtio-net NIC is bound to vfio-pci.
//!
//! The host has no VFIO (see `shared/notes/machine.md`), so VFIO code is tested inside a guest:
//! QEMU 7.2 under TCG, machine q35 with an emulated intel-iommu, Debian's cloud kernel, and a
//! modern-only `virtio-net-pci` (1af4:1041, `iommu_platform=on`). One boot-to-poweroff takes a
//! few seconds.
//!
//! Setup: `bash ci/install-vm.sh` (QEMU, busybox-static, the guest kernel in
//! `/var/cache/zcrx-vm`). Without it [`Assets::locate`] fails and says so; nothing is skipped.
//!
//! A test:
//! 1. builds static binaries: [`build_static`] runs
//!    `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu
//!    --target-dir target/vm -p PKG --bin BIN` (the explicit `--target` keeps the flag off build
//!    scripts and proc-macros; the separate target dir keeps the normal build cache);
//! 2. builds a [`GuestImage`] (an initramfs: busybox, the kernel modules, the binaries, a generated
//!    `/init`) with a [`NicMode`] and a shell command line, e.g. `zcrx rx --vfio $ZCRX_NIC`;
//! 3. optionally creates a [`HostPort`] (a unix datagram socket wired to the guest NIC through
//!    QEMU's `-netdev dgram`) to feed frames to the guest and receive the frames it sends;
//! 4. boots with [`Vm::run`] (or [`Vm::spawn`] + [`RunningVm::wait_for_marker`] +
//!    [`RunningVm::wait`] to interact while it runs) and checks [`VmResult`]: the markers
//!    (`ZCRX-VM: ...` lines on the serial console) and the command's exit code.
//!
//! ```no_run
//! use vm_tests::*;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let assets = Assets::locate()?; // fails with "run `bash ci/install-vm.sh`" if missing
//! let bins = build_static("zcrx-cli", &["zcrx"])?;
//! let image = GuestImage::builder(&assets)
//!     .nic(NicMode::Vfio)
//!     .binary(&bins[0])
//!     .command("zcrx rx --vfio $ZCRX_NIC")
//!     .write(static_target_dir().join("images/rx.cpio"))?;
//! let port = HostPort::new()?;
//! let vm = Vm::spawn(&image, &VmOpts::default().host_port(&port))?;
//! vm.wait_for_marker("bound ", std::time::Duration::from_secs(30));
//! port.send(&eth_frame(GUEST_MAC, [2, 0, 0, 0, 0, 1], 0x88b5, b"payload"))?;
//! let r = vm.wait();
//! assert!(r.success(), "{}", r.report());
//! # Ok(()) }
//! ```
//!
//! `/init` prints `ZCRX-VM: init ...`, then `bound <bdf> group <n>` (vfio mode) or
//! `netdev <if> mac <mac>` (kernel-net mode), `run ...`, whatever the command prints, `done ...`,
//! `exit <code>`, and powers off. A failed setup step prints `setup-failed <what>` and powers
//! off without running the command. Binaries can print their own `ZCRX-VM: ` lines.
//!
//! Environment: `ZCRX_VM_CACHE` (kernel cache dir), `ZCRX_VM_QEMU`, `ZCRX_VM_BUSYBOX`,
//! `ZCRX_VM_TIMEOUT` (seconds per boot, default 120), `ZCRX_VM_ECHO=1` (copy the serial console
//! to stderr live).

mod assets;
mod cpio;
mod hostport;
mod image;
mod vm;

pub use assets::{
    build_static, build_static_examples, is_static_elf, static_target_dir, workspace_root, Assets,
    DEFAULT_CACHE, INSTALL_HINT, STATIC_RUSTFLAGS, STATIC_TARGET,
};
pub use cpio::Cpio;
pub use hostport::{eth_frame, eth_parse, mac_string, EthView, HostPort, MAX_FRAME};
pub use image::{
    shell_quote, GuestImage, GuestImageBuilder, NicMode, KERNEL_NET_MODULES, NIC_DEVICE,
    NIC_VENDOR, VFIO_MODULES, VIRTIO_MODULES,
};
pub use vm::{Net, RunningVm, Vm, VmOpts, VmResult, GUEST_MAC, KERNEL_CMDLINE, MARKER};

use std::fmt;
use std::path::Path;

/// An error of the harness (missing assets, a failed build, an I/O error), as a message.
#[derive(Debug, Clone)]
pub struct Error(String);

impl Error {
    pub fn new(msg: impl Into<String>) -> Error {
        Error(msg.into())
    }
    fn io(path: &Path, e: std::io::Error) -> Error {
        Error(format!("{}: {e}", path.display()))
    }
    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

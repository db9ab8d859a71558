//! The guest's initramfs: busybox, kernel modules, static binaries, and a generated `/init`.

use std::path::{Path, PathBuf};

use crate::assets::Assets;
use crate::cpio::Cpio;
use crate::Error;

/// PCI IDs of the guest NIC: a modern-only virtio-net function (`disable-legacy=on`).
pub const NIC_VENDOR: u16 = 0x1af4;
pub const NIC_DEVICE: u16 = 0x1041;

/// The virtio PCI transport, loaded in every mode (in order).
pub const VIRTIO_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
];
/// VFIO for PCI with the type1 IOMMU backend (in order; `?` = absent in newer kernels).
pub const VFIO_MODULES: &[&str] = &[
    "vfio",
    "vfio_iommu_type1",
    "vfio_virqfd?",
    "irqbypass",
    "vfio-pci-core",
    "vfio-pci",
];
/// The kernel's own virtio-net driver (in order).
pub const KERNEL_NET_MODULES: &[&str] = &["failover", "net_failover", "virtio_net"];

/// What `/init` does with the guest NIC before running the command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NicMode {
    /// Bind the NIC to vfio-pci (`driver_override` + `drivers_probe`); prints
    /// `ZCRX-VM: bound <bdf> group <n>` and exports `ZCRX_NIC`, `ZCRX_NIC_SYSFS`, `ZCRX_VFIO_GROUP`.
    Vfio,
    /// Load virtio_net, bring the interface up (IPv6 off so the link stays quiet); prints
    /// `ZCRX-VM: netdev <if> mac <mac>` and exports `ZCRX_NIC`, `ZCRX_NIC_SYSFS`, `ZCRX_IFACE`.
    KernelNet,
    /// Only the virtio PCI transport; the NIC is left as the kernel binds it.
    Untouched,
}

/// A built initramfs plus the kernel it is for.
#[derive(Clone, Debug)]
pub struct GuestImage {
    kernel: PathBuf,
    initrd: PathBuf,
    init: String,
    size: u64,
}

impl GuestImage {
    /// Starts describing an image (NIC bound to vfio-pci, command `true`).
    pub fn builder(assets: &Assets) -> GuestImageBuilder {
        GuestImageBuilder {
            assets: assets.clone(),
            nic: NicMode::Vfio,
            binaries: Vec::new(),
            files: Vec::new(),
            modules: Vec::new(),
            env: Vec::new(),
            command: "true".to_string(),
        }
    }
    /// The kernel image to boot with this initramfs.
    pub fn kernel(&self) -> &Path {
        &self.kernel
    }
    /// The initramfs (uncompressed newc cpio).
    pub fn initrd(&self) -> &Path {
        &self.initrd
    }
    /// The generated `/init` script.
    pub fn init_script(&self) -> &str {
        &self.init
    }
    /// Size of the initramfs in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// Describes a [`GuestImage`]; [`GuestImageBuilder::write`] builds it.
#[derive(Clone, Debug)]
pub struct GuestImageBuilder {
    assets: Assets,
    nic: NicMode,
    binaries: Vec<(String, PathBuf)>,
    files: Vec<(String, Vec<u8>, u32)>,
    modules: Vec<String>,
    env: Vec<(String, String)>,
    command: String,
}

impl GuestImageBuilder {
    /// What `/init` does with the NIC (default [`NicMode::Vfio`]).
    pub fn nic(mut self, mode: NicMode) -> Self {
        self.nic = mode;
        self
    }
    /// Copies a host binary (should be static, see [`crate::build_static`]) to `/bin/<its file name>`.
    pub fn binary(self, host_path: impl AsRef<Path>) -> Self {
        let p = host_path.as_ref();
        let name = p
            .file_name()
            .expect("binary path has a file name")
            .to_string_lossy()
            .into_owned();
        self.binary_as(p, &name)
    }
    /// Copies a host binary to `/bin/<guest_name>`.
    pub fn binary_as(mut self, host_path: impl AsRef<Path>, guest_name: &str) -> Self {
        self.binaries
            .push((guest_name.to_string(), host_path.as_ref().to_path_buf()));
        self
    }
    /// Adds a file with the given contents and permission bits at an absolute guest path.
    pub fn file(mut self, guest_path: &str, data: impl Into<Vec<u8>>, perm: u32) -> Self {
        self.files.push((guest_path.to_string(), data.into(), perm));
        self
    }
    /// Loads one more kernel module (after the mode's modules); a trailing `?` makes it optional.
    pub fn module(mut self, name: &str) -> Self {
        self.modules.push(name.to_string());
        self
    }
    /// Exports an environment variable to the command.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }
    /// The shell command line `/init` runs (busybox `sh`, `PATH=/bin`, cwd `/tmp`) once the NIC is
    /// set up; it can use `$ZCRX_NIC` etc. Its exit status is reported as `ZCRX-VM: exit <code>`.
    pub fn command(mut self, cmd: &str) -> Self {
        self.command = cmd.to_string();
        self
    }

    fn module_names(&self) -> Vec<String> {
        let mut names: Vec<String> = VIRTIO_MODULES.iter().map(|s| s.to_string()).collect();
        match self.nic {
            NicMode::Vfio => names.extend(VFIO_MODULES.iter().map(|s| s.to_string())),
            NicMode::KernelNet => names.extend(KERNEL_NET_MODULES.iter().map(|s| s.to_string())),
            NicMode::Untouched => {}
        }
        names.extend(self.modules.iter().cloned());
        names
    }

    /// Writes the initramfs to `out` (an uncompressed newc cpio) and returns the image.
    pub fn write(self, out: impl AsRef<Path>) -> Result<GuestImage, Error> {
        let out = out.as_ref();
        let names = self.module_names();
        let name_refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        let modules = self.assets.find_modules(&name_refs)?;

        let mut c = Cpio::new();
        for d in [
            "bin",
            "dev",
            "proc",
            "sys",
            "tmp",
            "run",
            "etc/zcrx",
            "lib/modules/zcrx",
        ] {
            c.dir(d, 0o755);
        }
        c.chardev("dev/console", 0o600, 5, 1);
        c.chardev("dev/null", 0o666, 1, 3);
        let bb =
            std::fs::read(&self.assets.busybox).map_err(|e| Error::io(&self.assets.busybox, e))?;
        c.file("bin/busybox", 0o755, &bb);
        for (name, path) in &modules {
            let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            c.file(&format!("lib/modules/zcrx/{name}.ko"), 0o644, &data);
        }
        for (name, path) in &self.binaries {
            let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            c.file(&format!("bin/{name}"), 0o755, &data);
        }
        for (path, data, perm) in &self.files {
            c.file(path, *perm, data);
        }
        let env: String = self
            .env
            .iter()
            .map(|(k, v)| format!("export {k}={}\n", shell_quote(v)))
            .collect();
        c.file("etc/zcrx/env.sh", 0o644, env.as_bytes());
        c.file(
            "etc/zcrx/cmd.sh",
            0o755,
            format!("{}\n", self.command).as_bytes(),
        );
        let module_list: Vec<String> = modules.iter().map(|(n, _)| n.clone()).collect();
        let init = init_script(self.nic, &module_list);
        c.file("init", 0o755, init.as_bytes());

        let bytes = c.finish();
        std::fs::write(out, &bytes).map_err(|e| Error::io(out, e))?;
        Ok(GuestImage {
            kernel: self.assets.kernel.clone(),
            initrd: out.to_path_buf(),
            init,
            size: bytes.len() as u64,
        })
    }
}

/// Single-quotes a string for sh.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn init_script(nic: NicMode, modules: &[String]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        r#"#!/bin/busybox sh
# Generated by zcrx-vm-tests. Markers: lines "ZCRX-VM: ..." on the serial console.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
say() {{ echo "ZCRX-VM: $*"; }}
off() {{ sync; poweroff -f; sleep 5; echo o > /proc/sysrq-trigger; }}
die() {{ say "setup-failed $*"; off; }}
say "init kernel $(uname -r) uptime $(cut -d' ' -f1 /proc/uptime)"

NIC=
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = 0x{NIC_VENDOR:04x} ] && [ "$(cat $d/device)" = 0x{NIC_DEVICE:04x} ]; then
    NIC=${{d##*/}}; break
  fi
done
D=/sys/bus/pci/devices/$NIC
"#
    ));
    match nic {
        NicMode::Vfio => s.push_str(
            "[ -n \"$NIC\" ] || die \"no virtio-net PCI function\"\n\
             # Claim the NIC for vfio-pci before any driver module can bind it.\n\
             echo vfio-pci > $D/driver_override || die \"driver_override $NIC\"\n",
        ),
        NicMode::KernelNet => s.push_str(
            "[ -n \"$NIC\" ] || die \"no virtio-net PCI function\"\n\
             # No IPv6 autoconfiguration: the link carries only what the command sends.\n\
             [ -e /proc/sys/net/ipv6/conf/default/disable_ipv6 ] && echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6\n",
        ),
        NicMode::Untouched => {}
    }
    for m in modules {
        s.push_str(&format!(
            "insmod /lib/modules/zcrx/{m}.ko || die \"insmod {m}\"\n"
        ));
    }
    match nic {
        NicMode::Vfio => s.push_str(
            r#"drv=
[ -e $D/driver ] && drv=$(basename $(readlink $D/driver))
if [ -n "$drv" ] && [ "$drv" != vfio-pci ]; then echo $NIC > $D/driver/unbind; drv=; fi
[ -n "$drv" ] || echo $NIC > /sys/bus/pci/drivers_probe
[ -e $D/driver ] && drv=$(basename $(readlink $D/driver))
[ "$drv" = vfio-pci ] || die "$NIC bound to '$drv', not vfio-pci"
[ -e $D/iommu_group ] || die "$NIC has no iommu_group"
G=$(basename $(readlink $D/iommu_group))
i=0; while [ ! -e /dev/vfio/$G ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
[ -e /dev/vfio/$G ] || die "no /dev/vfio/$G"
export ZCRX_NIC=$NIC ZCRX_NIC_SYSFS=$D ZCRX_VFIO_GROUP=$G
say "bound $NIC group $G"
"#,
        ),
        NicMode::KernelNet => s.push_str(
            r#"IF=
i=0; while [ $i -lt 50 ]; do
  for n in $D/virtio*/net/*; do [ -e "$n" ] && IF=${n##*/}; done
  [ -n "$IF" ] && break; sleep 0.1; i=$((i+1))
done
[ -n "$IF" ] || die "no network interface for $NIC"
ip link set $IF up || die "ip link set $IF up"
export ZCRX_NIC=$NIC ZCRX_NIC_SYSFS=$D ZCRX_IFACE=$IF
say "netdev $IF mac $(cat /sys/class/net/$IF/address)"
"#,
        ),
        NicMode::Untouched => {
            s.push_str("[ -n \"$NIC\" ] && export ZCRX_NIC=$NIC ZCRX_NIC_SYSFS=$D\n")
        }
    }
    s.push_str(
        r#". /etc/zcrx/env.sh
cd /tmp
say "run uptime $(cut -d' ' -f1 /proc/uptime)"
sh /etc/zcrx/cmd.sh
rc=$?
say "done uptime $(cut -d' ' -f1 /proc/uptime)"
say "exit $rc"
off
"#,
    );
    s
}

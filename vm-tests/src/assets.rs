//! Host-side things a guest needs: QEMU, the guest kernel and its modules (unpacked by
//! `ci/install-vm.sh`), busybox-static, and static builds of workspace binaries.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;

/// Where `ci/install-vm.sh` leaves the guest kernel unless `ZCRX_VM_CACHE` says otherwise.
pub const DEFAULT_CACHE: &str = "/var/cache/zcrx-vm";

/// What to run to get the assets.
pub const INSTALL_HINT: &str = "run `bash ci/install-vm.sh` (as root; installs qemu-system-x86, busybox-static, cpio and unpacks Debian's cloud kernel into /var/cache/zcrx-vm)";

/// Paths of everything a guest boot needs from the host.
#[derive(Clone, Debug)]
pub struct Assets {
    /// `qemu-system-x86_64` (from PATH, or `ZCRX_VM_QEMU`).
    pub qemu: PathBuf,
    /// The guest kernel image (`$CACHE/vmlinuz`).
    pub kernel: PathBuf,
    /// The guest kernel's `lib/modules/<version>` directory (`$CACHE/modules`).
    pub modules: PathBuf,
    /// The guest kernel version (`$CACHE/kernel-version`).
    pub kernel_version: String,
    /// A statically linked busybox (`/bin/busybox` from busybox-static, or `ZCRX_VM_BUSYBOX`).
    pub busybox: PathBuf,
}

impl Assets {
    /// Finds the assets, or fails with a message naming what is missing and `ci/install-vm.sh`.
    pub fn locate() -> Result<Assets, Error> {
        let cache = PathBuf::from(
            std::env::var_os("ZCRX_VM_CACHE").unwrap_or_else(|| DEFAULT_CACHE.into()),
        );
        let mut missing = Vec::new();

        let qemu = match std::env::var_os("ZCRX_VM_QEMU") {
            Some(q) => PathBuf::from(q),
            None => find_in_path("qemu-system-x86_64")
                .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
        };
        if !qemu.is_file() {
            missing.push("qemu-system-x86_64 (package qemu-system-x86)".to_string());
        }
        let kernel = cache.join("vmlinuz");
        if !kernel.is_file() {
            missing.push(format!("guest kernel {}", kernel.display()));
        }
        let modules = cache.join("modules");
        if !modules.join("kernel").is_dir() {
            missing.push(format!("guest kernel modules {}/kernel", modules.display()));
        }
        let kernel_version = std::fs::read_to_string(cache.join("kernel-version"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let busybox = PathBuf::from(
            std::env::var_os("ZCRX_VM_BUSYBOX").unwrap_or_else(|| "/bin/busybox".into()),
        );
        match is_static_elf(&busybox) {
            Ok(true) => {}
            Ok(false) => missing.push(format!(
                "{} is not statically linked (package busybox-static)",
                busybox.display()
            )),
            Err(_) => missing.push(format!("{} (package busybox-static)", busybox.display())),
        }
        if !missing.is_empty() {
            return Err(Error::new(format!(
                "VM test assets missing: {}; {INSTALL_HINT}",
                missing.join(", ")
            )));
        }
        Ok(Assets {
            qemu,
            kernel,
            modules,
            kernel_version,
            busybox,
        })
    }

    /// Finds kernel modules by name (`-` and `_` are the same) under `modules/kernel`.
    /// Returns the paths in the order asked; a name ending in `?` is optional (skipped if absent).
    pub fn find_modules(&self, names: &[&str]) -> Result<Vec<(String, PathBuf)>, Error> {
        let mut index: HashMap<String, PathBuf> = HashMap::new();
        let mut stack = vec![self.modules.join("kernel")];
        while let Some(dir) = stack.pop() {
            let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
            for ent in rd.flatten() {
                let p = ent.path();
                let ft = ent.file_type().map_err(|e| Error::io(&p, e))?;
                if ft.is_dir() {
                    stack.push(p);
                } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                    if let Some(stem) = n.strip_suffix(".ko") {
                        index.insert(stem.replace('-', "_"), p.clone());
                    } else if n.ends_with(".ko.xz")
                        || n.ends_with(".ko.zst")
                        || n.ends_with(".ko.gz")
                    {
                        let stem = n.split(".ko.").next().unwrap_or(n);
                        index.entry(stem.replace('-', "_")).or_insert(p.clone());
                    }
                }
            }
        }
        let mut out = Vec::new();
        for name in names {
            let (name, optional) = match name.strip_suffix('?') {
                Some(n) => (n, true),
                None => (*name, false),
            };
            match index.get(&name.replace('-', "_")) {
                Some(p) if p.extension().is_some_and(|e| e == "ko") => {
                    out.push((name.to_string(), p.clone()))
                }
                Some(p) => {
                    return Err(Error::new(format!(
                    "module {name} is compressed ({}); this harness expects uncompressed .ko files",
                    p.display()
                )))
                }
                None if optional => {}
                None => {
                    return Err(Error::new(format!(
                        "kernel module {name} not found under {}/kernel; {INSTALL_HINT}",
                        self.modules.display()
                    )))
                }
            }
        }
        Ok(out)
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// True if `path` is an ELF executable without a program interpreter (PT_INTERP), i.e. it runs
/// without a dynamic loader. Errors if it is not a 64-bit little-endian ELF file.
pub fn is_static_elf(path: &Path) -> Result<bool, Error> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = || {
        Error::new(format!(
            "{} is not a 64-bit little-endian ELF file",
            path.display()
        ))
    };
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return Err(bad());
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap());
    let phoff = u64_at(0x20) as usize;
    let phentsize = u16_at(0x36) as usize;
    let phnum = u16_at(0x38) as usize;
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > data.len() {
            return Err(bad());
        }
        if u32_at(o) == 3 {
            return Ok(false); // PT_INTERP
        }
    }
    Ok(true)
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vm-tests lives in the workspace")
        .to_path_buf()
}

/// The rustc flags of a static build: glibc linked statically.
pub const STATIC_RUSTFLAGS: &str = "-C target-feature=+crt-static";
/// The explicit target of a static build. Naming it keeps `RUSTFLAGS` off build scripts and
/// proc-macros (which must stay dynamic host binaries).
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The target directory of static builds: `$CARGO_TARGET_DIR/vm` or `<workspace>/target/vm`, apart
/// from the normal build so that the different RUSTFLAGS don't invalidate its cache.
pub fn static_target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d).join("vm"),
        None => workspace_root().join("target").join("vm"),
    }
}

/// Builds workspace binaries as static executables and returns their paths (in `bins` order):
///
/// ```text
/// RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
///     --target x86_64-unknown-linux-gnu --target-dir target/vm -p PACKAGE --bin BIN...
/// ```
///
/// Output lands in `target/vm/x86_64-unknown-linux-gnu/release/BIN`. Every result is checked to
/// have no ELF interpreter. Uses `$CARGO` (set by cargo for tests) or `cargo`.
pub fn build_static(package: &str, bins: &[&str]) -> Result<Vec<PathBuf>, Error> {
    build_static_kind(package, "--bin", bins)
}

/// Like [`build_static`] for examples (`--example NAME`); output in
/// `target/vm/x86_64-unknown-linux-gnu/release/examples/NAME`.
pub fn build_static_examples(package: &str, examples: &[&str]) -> Result<Vec<PathBuf>, Error> {
    build_static_kind(package, "--example", examples)
}

fn build_static_kind(package: &str, flag: &str, bins: &[&str]) -> Result<Vec<PathBuf>, Error> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = static_target_dir();
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "--target",
            STATIC_TARGET,
            "-p",
            package,
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    for b in bins {
        cmd.args([flag, b]);
    }
    cmd.env("RUSTFLAGS", STATIC_RUSTFLAGS)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    let out = cmd
        .output()
        .map_err(|e| Error::new(format!("running {}: {e}", Path::new(&cargo).display())))?;
    if !out.status.success() {
        return Err(Error::new(format!(
            "static build of {package} {bins:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let mut dir = target_dir.join(STATIC_TARGET).join("release");
    if flag == "--example" {
        dir.push("examples");
    }
    let mut paths = Vec::new();
    for b in bins {
        let p = dir.join(b);
        if !is_static_elf(&p)? {
            return Err(Error::new(format!(
                "{} is not static (has an ELF interpreter)",
                p.display()
            )));
        }
        paths.push(p);
    }
    Ok(paths)
}

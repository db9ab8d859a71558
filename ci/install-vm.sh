#!/usr/bin/env bash
# Installs what the QEMU guest tests (crate zcrx-vm-tests) need, from Debian's packages:
#   - qemu-system-x86 (qemu-system-x86_64, 7.2 on bookworm), busybox-static, cpio;
#   - the guest kernel: Debian's current cloud kernel package (linux-image-X-cloud-amd64), fetched
#     with `apt-get download` and unpacked with `dpkg -x` into a cache outside the repo.
# Leaves stable paths (the vm-tests crate reads them; override the directory with ZCRX_VM_CACHE):
#   $CACHE/vmlinuz                  the kernel image
#   $CACHE/modules                  -> lib/modules/<version> of the unpacked package
#   $CACHE/kernel-version           <version>, e.g. 6.1.0-56-cloud-amd64
# Idempotent, non-interactive, and fast when everything is already there (no network then).
set -euo pipefail

CACHE="${ZCRX_VM_CACHE:-/var/cache/zcrx-vm}"
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
log() { echo "ci/install-vm.sh: $*"; }

updated=0
apt_update() {
  if [ "$updated" -eq 0 ]; then
    log "apt-get update"
    $SUDO apt-get update -qq
    updated=1
  fi
}

# --- host packages ---------------------------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
need=()
for p in qemu-system-x86 busybox-static cpio; do
  installed "$p" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  # Refresh the package lists first only when they do not know the packages.
  for p in "${need[@]}"; do
    apt-cache show "$p" >/dev/null 2>&1 || { apt_update; break; }
  done
  if ! $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; then
    # Stale lists (404s) are the usual cause: refresh and retry once.
    updated=0; apt_update
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
else
  log "qemu-system-x86, busybox-static, cpio already installed"
fi
command -v qemu-system-x86_64 >/dev/null || { log "qemu-system-x86_64 missing after install" >&2; exit 1; }
log "$(qemu-system-x86_64 --version | head -n1)"

# --- guest kernel ----------------------------------------------------------------------------
# Fast path: an unpacked kernel is already there. Re-resolve the package name only when asked
# (ZCRX_VM_REFRESH=1), so a warm run needs no apt lists and no network.
if [ "${ZCRX_VM_REFRESH:-0}" != 1 ] && [ -f "$CACHE/kernel-version" ] && [ -f "$CACHE/vmlinuz" ] \
   && [ -d "$CACHE/modules/kernel" ]; then
  log "guest kernel $(cat "$CACHE/kernel-version") already in $CACHE"
  exit 0
fi

resolve_pkg() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1
}
pkg="$(resolve_pkg)"
if [ -z "$pkg" ]; then apt_update; pkg="$(resolve_pkg)"; fi
[ -n "$pkg" ] || { log "cannot resolve linux-image-cloud-amd64 to a kernel package" >&2; exit 1; }
ver="${pkg#linux-image-}"
log "guest kernel package: $pkg"

$SUDO mkdir -p "$CACHE/debs"
deb="$(ls "$CACHE"/debs/"${pkg}"_*.deb 2>/dev/null | head -n1 || true)"
if [ -z "$deb" ]; then
  log "apt-get download $pkg -> $CACHE/debs"
  # apt-get download writes into the current directory (as root it warns that the download is
  # unsandboxed; harmless).
  if ! (cd "$CACHE/debs" && $SUDO apt-get download -qq "$pkg" 2>/dev/null); then
    # Stale lists (404s) are the usual cause: refresh and retry once.
    updated=0; apt_update
    (cd "$CACHE/debs" && $SUDO apt-get download -qq "$pkg")
  fi
  deb="$(ls "$CACHE"/debs/"${pkg}"_*.deb | head -n1)"
fi
log "unpacking $(basename "$deb")"
$SUDO rm -rf "$CACHE/root.new"
$SUDO dpkg -x "$deb" "$CACHE/root.new"
$SUDO rm -rf "$CACHE/root-$ver"
$SUDO mv "$CACHE/root.new" "$CACHE/root-$ver"
[ -f "$CACHE/root-$ver/boot/vmlinuz-$ver" ] || { log "no boot/vmlinuz-$ver in $deb" >&2; exit 1; }
[ -d "$CACHE/root-$ver/lib/modules/$ver/kernel" ] || { log "no lib/modules/$ver in $deb" >&2; exit 1; }

$SUDO ln -sfn "root-$ver/boot/vmlinuz-$ver" "$CACHE/vmlinuz"
$SUDO ln -sfn "root-$ver/lib/modules/$ver" "$CACHE/modules"
echo "$ver" | $SUDO tee "$CACHE/kernel-version.new" >/dev/null
$SUDO mv "$CACHE/kernel-version.new" "$CACHE/kernel-version"
# Drop older unpacked kernels and packages.
for d in "$CACHE"/root-*; do
  [ "$d" = "$CACHE/root-$ver" ] || $SUDO rm -rf "$d"
done
for f in "$CACHE"/debs/*.deb; do
  [ "$f" = "$deb" ] || $SUDO rm -f "$f"
done
log "guest kernel $ver: $CACHE/vmlinuz, modules in $CACHE/modules"

#!/usr/bin/env bash
# Installs what the tests use from Debian's packages. Idempotent: installs only what is missing.
# Required peers (DPDK's testpmd) fail the run when they cannot be installed; optional tools
# (a missing one only skips its cross-check) do not.
set -euo pipefail
cd "$(dirname "$0")"

bash ./install-dpdk.sh
bash ./install-vm.sh

need=()
command -v tcpdump >/dev/null 2>&1 || need+=(tcpdump)

if [ ${#need[@]} -gt 0 ]; then
  echo "ci/install-deps.sh: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }; then
    echo "ci/install-deps.sh: could not install ${need[*]}; the checks that use them are skipped" >&2
  fi
fi

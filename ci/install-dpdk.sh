#!/usr/bin/env bash
# Installs DPDK's testpmd (Debian package dpdk-dev), the independent vhost-user frontend/backend
# the zcrx-backend integration tests talk to. Idempotent: does nothing if dpdk-testpmd is on PATH.
set -euo pipefail

if command -v dpdk-testpmd >/dev/null 2>&1; then
  echo "ci/install-dpdk.sh: dpdk-testpmd already installed ($(command -v dpdk-testpmd))"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

echo "ci/install-dpdk.sh: installing dpdk-dev (provides dpdk-testpmd, ~170 MB, ~1 minute)"
# Install straight away if the package lists already know dpdk-dev; else refresh them first.
if ! apt-cache show dpdk-dev >/dev/null 2>&1; then
  $SUDO apt-get update -qq
fi
if ! $SUDO apt-get install -y -qq --no-install-recommends dpdk-dev; then
  # Stale package lists (404s) are the usual cause: refresh and retry once.
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends dpdk-dev
fi

command -v dpdk-testpmd >/dev/null 2>&1 || {
  echo "ci/install-dpdk.sh: dpdk-dev installed but dpdk-testpmd is not on PATH" >&2
  exit 1
}
echo "ci/install-dpdk.sh: dpdk-testpmd installed ($(command -v dpdk-testpmd))"

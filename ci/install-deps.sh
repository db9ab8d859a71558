#!/usr/bin/env bash
# Installs what the tests use from Debian's packages. Idempotent: installs only what is missing.
# Optional tools (a missing one only skips its cross-check) do not fail the run.
set -euo pipefail

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

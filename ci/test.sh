#!/usr/bin/env bash
# The test command: everything CI runs, on a fresh machine, with nothing set up by hand.
# Slow suites (soak, long fuzzing) are not here; see README.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/install-deps.sh

# Unit, property, integration and end-to-end (CLI) tests.
cargo test --workspace --locked

# The benchmarks compile and run once each (criterion's quick mode; no timing is asserted).
cargo bench -p zcrx --bench rings --locked -- --test

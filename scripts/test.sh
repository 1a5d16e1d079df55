#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the pinned Azurite (npm),
# checks the systemd unit when systemd-analyze exists and the Prometheus rules when
# promtool exists, then runs every Rust test of the workspace (leadsync, the test
# kit, and the benchmark harness in bench/, which is built by this too).
# Tests start their own Azurite on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

npm ci --prefix tools/azurite --no-audit --no-fund --loglevel=error
bash deploy/systemd/verify.sh
bash deploy/prometheus/verify.sh
cargo build --locked --examples
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --workspace --lib --bins --tests "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "total: %d passed, %d failed\n", p, f }' "$log"
exit "$status"

#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the pinned Azurite (npm),
# then runs every Rust test. Tests start their own Azurite on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

npm ci --prefix tools/azurite --no-audit --no-fund --loglevel=error
bash deploy/systemd/verify.sh
cargo test --locked --all-targets "$@"

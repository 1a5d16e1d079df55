#!/usr/bin/env bash
# leadsync benchmarks, in one run on one machine:
#   bench/run.sh [--rows 10000|100000|1000000] [--idle-seconds 60] [leadsync-bench suite options]
# Installs the pinned Azurite (npm ci) and the baseline's Python packages (a venv under
# bench/.venv, versions pinned in bench/requirements.txt), builds leadsync-bench in release
# mode, then runs `leadsync-bench suite`: it starts Azurite on a free loopback port, seeds
# the table through entity-group transactions, measures the raw read, leadsync's backfills
# (JSONL and an in-process fake Salesforce), the Python baseline, end-to-end latency and the
# idle cost, prints the report and writes bench/results/latest.md (and rows-N.md).
# `target/release/leadsync-bench suite --help` lists every option.
set -euo pipefail
cd "$(dirname "$0")/.."

# The pinned Azurite: installed with `npm ci` unless that exact version is already there
# (npm ci empties node_modules first, which would pull Azurite from under running tests).
pinned=$(node -p "require('./tools/azurite/package-lock.json').packages['node_modules/azurite'].version")
installed=$(node -p "try { require('./tools/azurite/node_modules/azurite/package.json').version } catch (e) { '' }")
if [ "$pinned" != "$installed" ]; then
  npm ci --prefix tools/azurite --no-audit --no-fund --loglevel=error
fi
if [ ! -x bench/.venv/bin/python ]; then
  python3 -m venv bench/.venv
fi
bench/.venv/bin/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
cargo build --release --locked -p leadsync-bench
exec target/release/leadsync-bench suite --command-line "bench/run.sh${*:+ $*}" "$@"

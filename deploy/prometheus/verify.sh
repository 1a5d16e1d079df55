#!/usr/bin/env bash
# Checks deploy/prometheus/leadsync-rules.yml with `promtool check rules` (syntax,
# PromQL, templates, duplicate rules) and runs its unit tests,
# leadsync-rules.test.yml, with `promtool test rules`.
#
# promtool is optional: where it is missing this prints "promtool not available;
# skipped" and exits 0 (CI installs nothing from GitHub; Debian's `prometheus`
# package ships promtool). The metric names the rules and the dashboard use are
# checked without promtool by `cargo test --test ops_alerts`.
#
# Exit status: 0 when the rules are clean and every test passes (or promtool is
# missing), 1 otherwise.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"

if ! command -v promtool >/dev/null 2>&1; then
    echo "promtool not available; skipped"
    exit 0
fi

echo "promtool check rules and test rules ($(promtool --version 2>&1 | head -n1))"
cd "$here"
if ! promtool check rules leadsync-rules.yml || ! promtool test rules leadsync-rules.test.yml; then
    echo "FAILED"
    exit 1
fi
echo "OK"

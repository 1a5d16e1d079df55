#!/usr/bin/env bash
# Checks deploy/systemd/leadsync.service with `systemd-analyze verify` (directive
# names and values, sections, ExecStart executable) and prints its
# `systemd-analyze security` exposure score.
#
# The unit's ExecStart binary (/usr/local/bin/leadsync) need not exist: a temporary
# copy of the unit points ExecStart at a dummy executable. No root needed, nothing
# outside a temporary directory is touched.
#
# Exit status: 0 when the unit is clean (or systemd-analyze is missing: "skipped"),
# 1 when systemd-analyze reports anything (it exits 0 on unknown keys or bad values,
# which it only prints; any output fails this check).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
unit="$here/leadsync.service"

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "systemd-analyze not available; skipped"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

printf '#!/bin/sh\nexit 0\n' >"$tmp/leadsync"
chmod 0755 "$tmp/leadsync"
sed "s|^ExecStart=/usr/local/bin/leadsync |ExecStart=$tmp/leadsync |" "$unit" >"$tmp/leadsync.service"
if ! grep -q "^ExecStart=$tmp/leadsync " "$tmp/leadsync.service"; then
    echo "verify.sh: no 'ExecStart=/usr/local/bin/leadsync ' line in $unit" >&2
    exit 1
fi

echo "systemd-analyze verify $unit ($(systemd-analyze --version | head -n1))"
status=0
out="$(systemd-analyze verify "$tmp/leadsync.service" 2>&1)" || status=$?
if [ -n "$out" ] || [ "$status" -ne 0 ]; then
    printf '%s\n' "$out" | sed "s|$tmp/leadsync.service|$unit|g"
    echo "FAILED (exit $status)"
    exit 1
fi
echo "OK: no warnings"

# Informational: the hardening score (`--offline` needs systemd 252 or later).
if score="$(systemd-analyze security --offline=yes --no-pager "$tmp/leadsync.service" 2>/dev/null | grep 'Overall exposure level')"; then
    echo "${score/$tmp\//}"
fi

#!/usr/bin/env bash
# One command, fresh machine: installs the pinned Azurite, starts it on a free
# loopback port, writes sample marketplace leads, runs leadsync once with the
# local JSONL sink, and shows what came out. Needs Node.js 20 + npm and Rust.
set -euo pipefail
cd "$(dirname "$0")/.."

npm ci --prefix tools/azurite --no-audit --no-fund --loglevel=error >/dev/null
cargo build --quiet --bin leadsync --example seed

rm -rf .demo && mkdir -p .demo/azurite
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
node tools/azurite/node_modules/azurite/dist/src/table/main.js \
  --tableHost 127.0.0.1 --tablePort "$port" --location .demo/azurite \
  --skipApiVersionCheck --disableProductStyleUrl --disableTelemetry --silent &
azurite=$!
trap 'kill $azurite 2>/dev/null || true' EXIT
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done

key='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='
conn="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=$key;TableEndpoint=http://127.0.0.1:$port/devstoreaccount1;"
target/debug/examples/seed "$conn" examples/sample-leads.json

export LEADSYNC__SOURCE__CONNECTION_STRING__VALUE="$conn"
set +e
target/debug/leadsync --config config/local.toml run --once
code=$?
set -e
echo
echo "== exit code: $code (0 = every row settled)"
echo "== delivered leads (.demo/leads.jsonl):"
python3 - <<'PY'
import json
for line in open(".demo/leads.jsonl"):
    l = json.loads(line)
    c = l["customer"]; email = (c.get("email") or {}).get("original")
    rows = ",".join(h["row"]["row_key"] for h in l["history"])
    print(f'  {l["external_key"]}  {email or "-":<28} stage={l["stage"]:<16} rows={rows}')
    print("    " + l["summary"].replace("\n", "\n    "))
PY
echo "== rejected rows (leadsync rows rejected):"
target/debug/leadsync --config config/local.toml rows rejected | cut -c1-200
echo "== held as unidentifiable (leadsync rows unidentifiable):"
target/debug/leadsync --config config/local.toml rows unidentifiable | python3 -c '
import json,sys
for line in sys.stdin:
    r = json.loads(line); print("  ", r["row"]["id"]["row_key"], r["outcome"]["reason"])'
echo "== skipped by policy (leadsync rows skipped):"
target/debug/leadsync --config config/local.toml rows skipped | python3 -c '
import json,sys
for line in sys.stdin:
    r = json.loads(line); print("  ", r["row"]["id"]["row_key"], r["outcome"]["policy"])'

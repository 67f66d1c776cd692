#!/usr/bin/env bash
# Memory per call in flight, imagegate against nginx in front of a provider stand-in that
# holds every call (bench/held_calls.py; see bench/README.md).
#
# Usage: bench/held_calls.sh [--calls 2000,4000] [--hold 20]
# Needs: cargo, python3, nginx (Debian: apt-get install nginx-light), psql and a Postgres
# server (IMAGEGATE_BENCH_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing=()
for tool in cargo python3 nginx psql; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "error: missing ${missing[*]}; on Debian: sudo apt-get install nginx-light postgresql-client" >&2
    exit 2
fi
scripts/ensure-postgres >/dev/null

# The profiling profile: the release build's code, with the symbols callgrind and perf name
# functions by (the release profile strips them).
echo "building imagegate (release code, with symbols: --profile profiling)..."
cargo build --profile profiling --locked
bin="${CARGO_TARGET_DIR:-target}/profiling/imagegate"
exec python3 bench/held_calls.py --binary "$bin" "$@"

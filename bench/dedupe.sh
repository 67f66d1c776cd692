#!/usr/bin/env bash
# Duplicate protection under load (issue 12): imagegate's throughput on an empty table of
# remembered calls, then again after 155,000 requests, with distinct and with repeated
# bodies. Builds imagegate in release mode unless --binary names one. See bench/README.md.
#
# Usage: bench/dedupe.sh [--binary PATH] [--requests N] [--seconds S] [--max-fill-seconds S] [--kinds distinct,repeated]
# Needs: cargo, python3 and wrk (Debian: apt-get install wrk).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

for tool in python3 wrk; do
    command -v "$tool" >/dev/null || { echo "error: missing $tool; on Debian: sudo apt-get install $tool" >&2; exit 2; }
done
args=("$@")
if [[ " $* " != *" --binary "* ]]; then
    echo "building imagegate (release)..."
    cargo build --release --locked
    args+=(--binary "${CARGO_TARGET_DIR:-target}/release/imagegate")
fi
exec python3 bench/dedupe.py "${args[@]}"

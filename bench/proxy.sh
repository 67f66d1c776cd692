#!/usr/bin/env bash
# imagegate against a plain nginx reverse proxy (issue 5): builds imagegate (release code,
# with symbols), starts an nginx upstream stand-in, nginx as a reverse proxy and imagegate (on a
# throwaway Postgres database), runs every scenario against each in alternation with wrk,
# and prints medians and ratios against nginx. See bench/README.md.
#
# Then counts instructions per proxied request for both under callgrind (bench/instructions.py;
# BENCH_INSTRUCTIONS=N requests, default 2000, 0 to skip). A run in which any answer is not
# a 2xx is void: the script says so and exits non-zero.
#
# Usage: bench/proxy.sh [--rounds N] [--seconds S] [--usage-off] [--scenarios c1,c64,c256,large16]
# Needs: cargo, python3, nginx, wrk and valgrind (Debian: apt-get install nginx-light wrk
# valgrind), psql and a Postgres server (IMAGEGATE_BENCH_DATABASE_URL, default
# postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing=()
for tool in cargo python3 nginx wrk psql valgrind; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "error: missing ${missing[*]}; on Debian: sudo apt-get install nginx-light wrk valgrind postgresql-client" >&2
    exit 2
fi
scripts/ensure-postgres >/dev/null

# The profiling profile: the release build's code, with the symbols callgrind and perf name
# functions by (the release profile strips them).
echo "building imagegate (release code, with symbols: --profile profiling)..."
cargo build --profile profiling --locked
bin="${CARGO_TARGET_DIR:-target}/profiling/imagegate"
python3 bench/proxy_bench.py --binary "$bin" "$@"
requests="${BENCH_INSTRUCTIONS:-2000}"
if [[ "$requests" != 0 ]]; then
    echo
    echo "counting instructions per request under callgrind ($requests requests each; takes a few minutes)..."
    python3 bench/instructions.py --binary "$bin" --requests "$requests"
fi

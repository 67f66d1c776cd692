#!/usr/bin/env bash
# A valid key's requests while another client floods imagegate with random keys (issue 12,
# point 6): builds imagegate in release mode, serves the built-in mock provider on a
# throwaway Postgres database, and measures the valid key alone and under the flood, in
# alternation, with wrk. Prints medians and the ratio. See bench/README.md.
#
# Usage: bench/keyflood.sh [--rounds N] [--seconds S] [--valid-connections C] [--flood-connections C]
# Needs: cargo, python3, wrk (Debian: apt-get install wrk), psql and a Postgres server
# (IMAGEGATE_BENCH_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing=()
for tool in cargo python3 wrk psql; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "error: missing ${missing[*]}; on Debian: sudo apt-get install wrk postgresql-client" >&2
    exit 2
fi
scripts/ensure-postgres >/dev/null

echo "building imagegate (release)..."
cargo build --release --locked
bin="${CARGO_TARGET_DIR:-target}/release/imagegate"
exec python3 bench/keyflood.py --binary "$bin" "$@"

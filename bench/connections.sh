#!/usr/bin/env bash
# Health checks under 2,000 silent connections (issue 12, point 2): GET /healthz latency
# (new connection per probe, median and p99 over 200) with no other connection open, then
# with 2,000 TCP connections open that send nothing, in the same run.
# imagegate is started with a soft open-files limit of 1024 (the usual default), so that
# a build that does not raise its limit, or that keeps silent connections forever, shows.
#
# Usage: bench/connections.sh [--binary PATH] [--soft-limit N|keep]
#                             [extra options for bench/connections.py, e.g. --silent 4000]
#   --binary PATH     measure this imagegate binary instead of building the tree's
#   --soft-limit N    soft RLIMIT_NOFILE imagegate starts with (default 1024; keep: as is)
# Environment: CARGO_TARGET_DIR (where cargo builds), BENCH_KEEP=1 (keep the temp dir).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bin=""
soft_limit=1024
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --binary) bin="$2"; shift 2 ;;
        --soft-limit) soft_limit="$2"; shift 2 ;;
        *) extra+=("$1"); shift ;;
    esac
done

command -v python3 >/dev/null || { echo "error: python3 is required" >&2; exit 2; }
if [[ -z "$bin" ]]; then
    command -v cargo >/dev/null || { echo "error: cargo is required" >&2; exit 2; }
    echo "building imagegate (release)..."
    cargo build --release --locked
    bin="${CARGO_TARGET_DIR:-target}/release/imagegate"
fi
[[ -x "$bin" ]] || { echo "error: no binary at $bin" >&2; exit 2; }

work="$(mktemp -d "${TMPDIR:-/tmp}/imagegate-bench.XXXXXX")"
gateway_pid=""
cleanup() {
    local status=$?
    if [[ -n "$gateway_pid" ]] && kill -0 "$gateway_pid" 2>/dev/null; then
        kill -TERM "$gateway_pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$gateway_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$gateway_pid" 2>/dev/null || true
        wait "$gateway_pid" 2>/dev/null || true
    fi
    if [[ $status -ne 0 && -s "$work/imagegate.log" ]]; then
        echo "--- last lines of imagegate's stderr ---" >&2
        tail -n 10 "$work/imagegate.log" >&2
    fi
    if [[ "${BENCH_KEEP:-}" == 1 ]]; then
        echo "kept $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The environment must not reconfigure the gateway under test.
while read -r var; do unset "$var"; done < <(compgen -e | grep '^IMAGEGATE_' || true)
export BENCH_PROVIDER_KEY="bench-provider-key-$RANDOM$RANDOM"
export RUST_LOG="${RUST_LOG:-info}"

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

# Only keys every build knows: the same file serves the old binary and the new.
config="$work/imagegate.toml"
cat >"$config" <<EOF
# Throwaway configuration written by bench/connections.sh.
default_model = "gpt-image-1"

[server]
listen = "127.0.0.1:$port"
spool_dir = "$work/spool"
journal_dir = "$work/journal"

[database]
url = "sqlite://$work/imagegate.db"

[providers.mock]
kind = "mock"

[models."gpt-image-1"]
routes = [{ provider = "mock", model = "gpt-image-1" }]

[pricing.mock."gpt-image-1"]
per_image = 0.04
EOF

"$bin" --config "$config" config check >"$work/config-check.txt" || {
    echo "error: imagegate config check refused the bench configuration" >&2
    exit 2
}

if [[ "$soft_limit" == keep ]]; then
    "$bin" --config "$config" serve 2>"$work/imagegate.log" &
else
    (ulimit -Sn "$soft_limit" && exec "$bin" --config "$config" serve) 2>"$work/imagegate.log" &
fi
gateway_pid=$!
for _ in $(seq 100); do
    grep -q "listening on" "$work/imagegate.log" 2>/dev/null && break
    kill -0 "$gateway_pid" 2>/dev/null || { echo "error: imagegate exited" >&2; exit 2; }
    sleep 0.1
done
limits="$(awk '/Max open files/ {print "soft " $4 ", hard " $5}' "/proc/$gateway_pid/limits")"
echo "imagegate $("$bin" --version | awk '{print $2}') ($bin) pid $gateway_pid on 127.0.0.1:$port;" \
    "started with soft limit $soft_limit, open files limit now: $limits; $(nproc) CPUs"

python3 bench/connections.py --gateway "127.0.0.1:$port" --pid "$gateway_pid" "${extra[@]}"

#!/usr/bin/env bash
# Memory and timing of POST /v1/images/edits through imagegate (issue 3, point 7):
#   - 8 concurrent 50 MiB uploads: imagegate's peak RSS within 16 MiB of its idle RSS;
#   - with `model` first, the provider receives its first byte before the client has
#     sent its last.
# Builds imagegate (release), runs it against a provider stand-in on 127.0.0.1 with a
# throwaway configuration, database and spool directory, and prints a summary. Exits 1
# when a requirement is missed or a request fails. See bench/README.md.
#
# Usage: bench/edits_memory.sh [extra options for bench/edits_memory.py, e.g. --rounds 5]
# Environment: CARGO_TARGET_DIR (where cargo builds), BENCH_KEEP=1 (keep the temp dir).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

for tool in cargo python3; do
    command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 2; }
done
[[ -r /proc/self/status ]] || { echo "error: needs Linux /proc to read RSS" >&2; exit 2; }

echo "building imagegate (release)..."
cargo build --release --locked
bin="${CARGO_TARGET_DIR:-target}/release/imagegate"
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
        tail -n 30 "$work/imagegate.log" >&2
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
export RUST_LOG="${RUST_LOG:-warn}"

# Two free ports: imagegate's and the stand-in's.
read -r gateway_port provider_port < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)

config="$work/imagegate.toml"
cat >"$config" <<EOF
# Throwaway configuration written by bench/edits_memory.sh.
default_model = "gpt-image-1"

[server]
listen = "127.0.0.1:$gateway_port"
spool_dir = "$work/spool"

[database]
url = "sqlite://$work/imagegate.db"

[providers.standin]
base_url = "http://127.0.0.1:$provider_port/v1"
api_key_env = "BENCH_PROVIDER_KEY"

[models."gpt-image-1"]
routes = [{ provider = "standin", model = "gpt-image-1" }]

[pricing.standin."gpt-image-1"]
text_input = 5.00
cached_text_input = 1.25
image_input = 10.00
cached_image_input = 1.25
image_output = 40.00
EOF

"$bin" --config "$config" config check >"$work/config-check.txt" || {
    echo "error: imagegate config check refused the bench configuration" >&2
    exit 2
}
key="$("$bin" --config "$config" keys create --name bench 2>/dev/null | head -n 1)"
[[ -n "$key" ]] || { echo "error: imagegate keys create printed no key" >&2; exit 2; }

"$bin" --config "$config" serve 2>"$work/imagegate.log" &
gateway_pid=$!
echo "imagegate $("$bin" --version | awk '{print $2}') pid $gateway_pid on 127.0.0.1:$gateway_port," \
    "stand-in on 127.0.0.1:$provider_port"

python3 bench/edits_memory.py \
    --gateway "127.0.0.1:$gateway_port" \
    --pid "$gateway_pid" \
    --key "$key" \
    --provider-port "$provider_port" \
    --provider-key "$BENCH_PROVIDER_KEY" \
    --workdir "$work" \
    --spool-dir "$work/spool" \
    "$@"

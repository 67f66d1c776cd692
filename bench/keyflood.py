#!/usr/bin/env python3
"""A valid key's requests alone and while another client floods random keys.

imagegate serves the built-in mock provider (no delay) on a throwaway Postgres database.
Each round runs, in alternating order:
  alone    wrk with one valid key, POST /v1/images/generations
  flooded  the same, while a second wrk sends the same request with a new random,
           well-formed key on every request (each one is unknown to imagegate)
and the summary prints the medians of the valid key's req/s and p50 latency, and their
ratio flooded/alone from the same run.

Started by bench/keyflood.sh, which builds imagegate and checks the tools; see bench/README.md.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

REQUEST = json.dumps({"model": "gpt-image-1", "prompt": "a red fox", "size": "1024x1024", "quality": "low"})

# A new well-formed key (ig- and 40 letters and digits) on every request.
FLOOD_LUA = """
local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
local counter = 0
local threads = {}
function setup(thread)
  counter = counter + 1
  thread:set("seed", counter)
  table.insert(threads, thread)
end
function init(args)
  math.randomseed(os.time() * 1000 + seed)
  statuses = {}
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + n
    end
  end
  for status, n in pairs(total) do
    io.write(string.format("status %d: %d\\n", status, n))
  end
end
request = function()
  local t = {}
  for i = 1, 40 do
    local n = math.random(1, 62)
    t[i] = chars:sub(n, n)
  end
  return wrk.format("POST", "/v1/images/generations",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer ig-" .. table.concat(t)},
    BODY)
end
"""

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on port {port}")


def parse_wrk(out):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"\s50%\s+([\d.]+)(us|ms|s|m)\b", out)
    p50 = float(m.group(1)) * UNITS[m.group(2)]
    m = re.search(r"\s99%\s+([\d.]+)(us|ms|s|m)\b", out)
    p99 = float(m.group(1)) * UNITS[m.group(2)]
    total = int(re.search(r"(\d+) requests in", out).group(1))
    statuses = {int(s): int(n) for s, n in re.findall(r"^status (\d+): (\d+)$", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "requests": total, "statuses": statuses,
            "non2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def wrk(script, url, connections, seconds):
    run = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script, url],
                         check=True, capture_output=True, text=True)
    # wrk reports a broken script on stderr and then runs without it: a wrong load.
    if run.stderr.strip():
        sys.exit(f"wrk {script}: {run.stderr.strip()}")
    return parse_wrk(run.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--valid-connections", type=int, default=8)
    ap.add_argument("--flood-connections", type=int, default=64)
    ap.add_argument("--database", default=os.environ.get("IMAGEGATE_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = tempfile.mkdtemp(prefix="imagegate-keyflood-bench.")
    dbname = f"imagegate_bench_{uuid.uuid4().hex[:12]}"
    proc = None
    try:
        subprocess.run(["psql", args.database, "-qc", f'create database "{dbname}"'], check=True, capture_output=True)
        db_url = args.database.rsplit("/", 1)[0] + "/" + dbname
        port = free_port()
        conf = os.path.join(work, "imagegate.toml")
        with open(conf, "w") as f:
            f.write(f"""
default_model = "gpt-image-1"
[server]
listen = "127.0.0.1:{port}"
spool_dir = "{work}/spool"
journal_dir = "{work}/journal"
[database]
url = "{db_url}"
[limits]
max_in_flight_per_key = 1000
[providers.mock]
kind = "mock"
delay = "0s"
[models."gpt-image-1"]
routes = [{{ provider = "mock", model = "gpt-image-1" }}]
[pricing.mock."gpt-image-1"]
text_input = 5.0
cached_text_input = 1.25
image_input = 10.0
cached_image_input = 1.25
image_output = 40.0
""")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        for k in list(env):
            if k.startswith("IMAGEGATE_"):
                del env[k]
        check = subprocess.run([args.binary, "--config", conf, "config", "check"], capture_output=True, text=True, env=env)
        if check.returncode != 0 and "limits" in check.stdout + check.stderr:
            # A build from before [limits] refuses the section (before/after runs): drop it.
            text = open(conf).read().replace("[limits]\nmax_in_flight_per_key = 1000\n", "")
            open(conf, "w").write(text)
        key = subprocess.run([args.binary, "--config", conf, "keys", "create", "--name", "bench-valid"],
                             check=True, capture_output=True, text=True, env=env).stdout.strip()
        log = open(os.path.join(work, "imagegate.log"), "w")
        proc = subprocess.Popen([args.binary, "--config", conf, "serve"], env=env, stdout=log, stderr=log)
        wait_port(port)
        url = f"http://127.0.0.1:{port}/v1/images/generations"

        valid_lua = os.path.join(work, "valid.lua")
        with open(valid_lua, "w") as f:
            f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(REQUEST)}\n')
            f.write('wrk.headers["Content-Type"] = "application/json"\n')
            f.write(f'wrk.headers["Authorization"] = "Bearer {key}"\n')
        flood_lua = os.path.join(work, "flood.lua")
        with open(flood_lua, "w") as f:
            f.write(f"BODY = {json.dumps(REQUEST)}\n" + FLOOD_LUA)

        wrk(valid_lua, url, args.valid_connections, 1)  # warm-up
        results = {"alone": [], "flooded": []}
        floods = []
        for rnd in range(args.rounds):
            order = ["alone", "flooded"] if rnd % 2 == 0 else ["flooded", "alone"]
            for phase in order:
                if phase == "alone":
                    r = wrk(valid_lua, url, args.valid_connections, args.seconds)
                else:
                    flood = {}
                    # The flood starts first and outlasts the valid client's run.
                    t = threading.Thread(target=lambda: flood.update(
                        wrk(flood_lua, url, args.flood_connections, args.seconds + 2)))
                    t.start()
                    time.sleep(1)
                    r = wrk(valid_lua, url, args.valid_connections, args.seconds)
                    t.join()
                    floods.append(flood)
                    if set(flood["statuses"]) - {401, 503}:
                        sys.exit(f"the flood got answers other than 401 and 503: {flood['statuses']}")
                    split = ", ".join(f"{n} got {s}" for s, n in sorted(flood["statuses"].items()))
                    print(f"round {rnd + 1} flood   {flood['rps']:10.0f} random keys/s ({split}), "
                          f"p50 {flood['p50_ms']:.3f} ms", flush=True)
                if r["non2xx"] or r["socket_errors"]:
                    print(f"  warning: valid key {phase}: non-2xx {r['non2xx']}, socket errors {r['socket_errors']}", file=sys.stderr)
                results[phase].append(r)
                print(f"round {rnd + 1} {phase:7} {r['rps']:10.0f} req/s  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms", flush=True)

        med = lambda phase, k: statistics.median(r[k] for r in results[phase])
        print()
        print(f"valid key (c={args.valid_connections}), medians of {args.rounds} rounds; flood c={args.flood_connections}")
        print(f"{'':24} {'alone':>10} {'flooded':>10} {'flooded/alone':>14}")
        for k, label in [("rps", "req/s"), ("p50_ms", "p50 latency (ms)"), ("p99_ms", "p99 latency (ms)")]:
            a, b = med("alone", k), med("flooded", k)
            print(f"{label:24} {a:>10.3f} {b:>10.3f} {b / a:>13.2f}x")
        print(f"flood: median {statistics.median(f['rps'] for f in floods):.0f} random keys/s")
        print(f"valid key slowed down {med('alone', 'rps') / med('flooded', 'rps'):.2f}x (target: at most 2x)")
    finally:
        if proc:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        subprocess.run(["psql", args.database, "-qc", f'drop database if exists "{dbname}" with (force)'], capture_output=True)
        if os.environ.get("BENCH_KEEP") == "1":
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

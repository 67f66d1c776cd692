"""Drives bench/dedupe.sh: one imagegate on the built-in mock provider (no delay, SQLite in
a temp dir), wrk with a Lua script that gives each request a distinct prompt (or the same
one), and req/s measured on an empty table and after --requests requests."""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

LUA = r"""
local counter = 0
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function request()
  counter = counter + 1
  local prompt = "same fox"
  if os.getenv("BENCH_DISTINCT") == "1" then
    prompt = string.format("fox %d-%d-%s", tid, counter, os.getenv("BENCH_PHASE") or "")
  end
  local body = string.format('{"model":"gpt-image-1","prompt":"%s"}', prompt)
  return wrk.format("POST", "/v1/images/generations", {
    ["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY"),
    ["Content-Type"] = "application/json",
    ["X-Stainless-Retry-Count"] = "0",
  }, body)
end
"""

CONFIG = """
default_model = "gpt-image-1"
[server]
listen = "127.0.0.1:{port}"
spool_dir = "{dir}/spool"
journal_dir = "{dir}/journal"
[database]
url = "sqlite://{dir}/imagegate.db"
[providers.mock]
kind = "mock"
delay = "0ms"
[models."gpt-image-1"]
routes = [{{ provider = "mock", model = "gpt-image-1" }}]
[pricing.mock."gpt-image-1"]
per_image = 0.01
"""


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrk(port, key, seconds, distinct, phase):
    env = dict(os.environ, BENCH_KEY=key, BENCH_DISTINCT="1" if distinct else "0", BENCH_PHASE=phase)
    out = subprocess.run(
        ["wrk", "-t2", "-c32", f"-d{seconds}s", "-s", LUA_PATH, f"http://127.0.0.1:{port}/"],
        env=env, capture_output=True, text=True, check=True).stdout
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        sys.exit(f"error: {non2xx.group(1)} failed responses:\n{out}")
    return reqs, rate


def start_server(binary, env):
    """A fresh imagegate (own temp dir, SQLite, mock provider) and a key for it."""
    tmp = tempfile.mkdtemp(prefix="imagegate-dedupe-")
    port = free_port()
    config = os.path.join(tmp, "imagegate.toml")
    with open(config, "w") as f:
        f.write(CONFIG.format(port=port, dir=tmp))
    key = subprocess.run([binary, "keys", "create", "--name", "bench", "--config", config],
                         env=env, capture_output=True, text=True, check=True).stdout
    key = re.search(r"ig-[A-Za-z0-9]{40}", key).group(0)
    server = subprocess.Popen([binary, "serve", "--config", config], env=env,
                              stderr=open(os.path.join(tmp, "stderr.log"), "w"))
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    return tmp, port, key, server


def stop_server(tmp, server):
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)
    if os.environ.get("BENCH_KEEP") != "1":
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}", file=sys.stderr)


def main():
    global LUA_PATH
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--requests", type=int, default=155_000)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--max-fill-seconds", type=int, default=300,
                    help="stop filling after this long (a build that slows down as it fills)")
    ap.add_argument("--kinds", default="distinct,repeated",
                    help="comma-separated: distinct, repeated")
    a = ap.parse_args()
    scratch = tempfile.mkdtemp(prefix="imagegate-dedupe-lua-")
    LUA_PATH = os.path.join(scratch, "bench.lua")
    with open(LUA_PATH, "w") as f:
        f.write(LUA)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGATE_")}
    env["RUST_LOG"] = "warn"
    results = []
    try:
        for kind in a.kinds.split(","):
            distinct = kind == "distinct"
            label = "distinct bodies" if distinct else "one body repeated"
            # Each kind on a fresh imagegate: "empty" means an empty table.
            tmp, port, key, server = start_server(a.binary, env)
            try:
                _, empty = wrk(port, key, a.seconds, distinct, "warm")
                sent, began = 0, time.monotonic()
                while sent < a.requests and time.monotonic() - began < a.max_fill_seconds:
                    n, _ = wrk(port, key, 10, distinct, f"fill{sent}")
                    sent += n
                    print(f"  {label}: {sent:,} requests sent", file=sys.stderr, flush=True)
                _, after = wrk(port, key, a.seconds, distinct, "after")
                results.append((label, empty, sent, after))
            finally:
                stop_server(tmp, server)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{'bodies':<20} {'req/s empty':>12} {'requests':>10} {'req/s after':>12} {'after/empty':>12}")
    for label, empty, sent, after in results:
        print(f"{label:<20} {empty:>12,.0f} {sent:>10,} {after:>12,.0f} {after / empty:>11.2f}x")


if __name__ == "__main__":
    main()

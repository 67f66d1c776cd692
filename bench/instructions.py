#!/usr/bin/env python3
"""Instructions per proxied request, imagegate against nginx, counted by callgrind.

Wall-clock figures move with whatever else the machine does; the number of instructions a
process executes for the same requests does not. Each proxy runs under
`valgrind --tool=callgrind` in front of the same nginx stand-in (small ImagesResponse
bodies); one client sends warm-up requests, then callgrind's counters are zeroed
(`callgrind_control --zero`), the client sends exactly N requests on one keep-alive
connection, imagegate's usage writer is given time to write their rows to Postgres, and the
counters are dumped (`callgrind_control --dump`). The dump holds only those N requests
(plus whatever timers ran meanwhile, which this script reports as the idle count over the
same wall time, measured the same way with no requests).

Started by bench/proxy.sh --instructions, or by hand:
  python3 bench/instructions.py --binary target/release/imagegate [--requests 2000] [--top 25]
"""

import argparse
import glob
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proxy_bench import (PNG_B64, REQUEST, create_key, free_port, gateway_env, images_response,  # noqa: E402
                         nginx_conf, start_nginx, tear_down, wait_port, write_gateway_config)


def send(port, headers, count):
    """`count` sequential generations on one keep-alive connection; every answer must be 200."""
    body = REQUEST.replace("MODEL", "bench-small").encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    hdrs = dict(headers, **{"Content-Type": "application/json"})
    for _ in range(count):
        conn.request("POST", "/v1/images/generations", body=body, headers=hdrs)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200 or b'"usage"' not in data:
            sys.exit(f"port {port}: answer {response.status} {data[:300]!r}: the count would be void")
    conn.close()


def valgrind_pid(out_file, timeout=30):
    """The process callgrind runs in: Debian's `valgrind` is a wrapper that starts
    `valgrind.bin` as its child, so the pid Popen returns is not the one to control."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", f"valgrind.*--callgrind-out-file={out_file} "],
                               capture_output=True, text=True).stdout.split()
        for pid in found:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[0].endswith(b"valgrind.bin") or len(found) == 1:
                    return int(pid)
        time.sleep(0.2)
    sys.exit(f"no valgrind process writes {out_file}")


def control(pid, option):
    """callgrind_control exits 0 even when it finds no such process: read what it says."""
    out = subprocess.run(["callgrind_control", option, str(pid)], capture_output=True, text=True)
    if out.returncode != 0 or "Error" in out.stdout + out.stderr:
        sys.exit(f"callgrind_control {option} {pid}: {(out.stdout + out.stderr).strip()}")


def measure(pid, out_prefix, action):
    """Zeroes the counters, runs `action`, dumps; returns (instructions, dump file, seconds)."""
    before = set(glob.glob(f"{out_prefix}*"))
    control(pid, "--zero")
    started = time.monotonic()
    action()
    seconds = time.monotonic() - started
    control(pid, "--dump")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = [f for f in set(glob.glob(f"{out_prefix}*")) - before if not f.endswith(".tmp")]
        if new:
            path = new[0]
            time.sleep(0.5)
            with open(path) as f:
                for line in f:
                    if line.startswith("summary:") or line.startswith("totals:"):
                        return int(line.split()[1]), path, seconds
        time.sleep(0.2)
    sys.exit(f"no callgrind dump from process {pid}")


def profile(path):
    """A callgrind dump read into per-function costs: (own instructions, instructions
    including what the function called, calls to the C allocator). A cost line after
    `calls=` is the callee's inclusive cost, charged to the caller's inclusive figure;
    every other cost line is the current function's own. Names are compressed in the
    format: `(id) name` the first time, `(id)` after."""
    names, own, inclusive = {}, {}, {}
    allocations, fn, callee, call_line = 0, None, None, False
    with open(path) as f:
        for line in f:
            if line.startswith(("fn=", "cfn=")):
                m = re.match(r"(c?fn)=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
                if m.group(3):
                    names[m.group(2)] = m.group(3)
                name = names.get(m.group(2), "?")
                if m.group(1) == "fn":
                    fn = name
                else:
                    callee = name
            elif line.startswith("calls="):
                call_line = True
                if callee.split("'")[0] in ALLOCATORS and not is_allocator(fn):
                    allocations += int(line[6:].split()[0])
            elif line[:1].isdigit() or line[:1] in "+-*":
                cost = int(line.split()[-1])
                inclusive[fn] = inclusive.get(fn, 0) + cost
                if not call_line:
                    own[fn] = own.get(fn, 0) + cost
                call_line = False
    return own, inclusive, allocations


# The C allocator's entry points (Rust's global allocator is glibc's malloc). A call counts
# when its caller is not the allocator itself.
ALLOCATORS = {"malloc", "calloc", "realloc", "posix_memalign", "aligned_alloc", "memalign"}


def is_allocator(name):
    """An allocator's own function (its internal calls are not the program's allocations)."""
    name = name.split("'")[0]
    return name in ALLOCATORS or name.startswith("_int_")


# The usage shipper's inserts into the database, inclusive.
INSERTS = "imagegate::usage::writer::insert::{{closure}}"


def top_functions(own, inclusive, top):
    """The profile's two views: the `top` largest inclusive costs of imagegate's own
    functions (what a request's work splits into; the runtime's frames above them hold
    everything and say nothing), and the `top` largest exclusive costs of any function
    (where the instructions are spent: allocator, copies, parsers, hashing)."""
    ours = sorted(((c, n) for n, c in inclusive.items() if n.startswith(("imagegate::", "<imagegate::"))), reverse=True)
    spent = sorted(((c, n) for n, c in own.items()), reverse=True)
    return ours[:top], spent[:top]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--top", type=int, default=25, help="imagegate's largest inclusive costs to print")
    ap.add_argument("--database", default=os.environ.get("IMAGEGATE_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--settle", type=float, default=3.0, help="seconds after the last answer for usage rows to be written")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for tool in ["valgrind", "callgrind_control", "callgrind_annotate", "nginx", "psql"]:
        if not shutil.which(tool):
            sys.exit(f"error: {tool} is missing (Debian: apt-get install valgrind nginx-light postgresql-client)")

    work = tempfile.mkdtemp(prefix="imagegate-instructions.")
    os.chmod(work, 0o755)
    procs = []
    dbname = f"imagegate_bench_{uuid.uuid4().hex[:12]}"
    db_url = args.database.rsplit("/", 1)[0] + "/" + dbname
    nginx_started = []
    try:
        with open(os.path.join(work, "small.json"), "w") as f:
            f.write(images_response(len(PNG_B64)))
        ports = {k: free_port() for k in ["small", "large", "proxy_small", "proxy_large", "gateway"]}
        static = f"""
    server {{
        listen 127.0.0.1:{ports['small']};
        root {work};
        keepalive_requests 1000000;
        location / {{ default_type application/json; rewrite ^ /small.json break; error_page 405 =200 /small.json; }}
    }}"""
        proxy = f"""
    server {{
        listen 127.0.0.1:{ports['proxy_small']};
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://small;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}"""
        fill = lambda conf, name: conf.replace("{workers}", "1").replace("{name}", name) \
            .replace("{small}", str(ports["small"])).replace("{large}", str(ports["small"]))
        start_nginx(work, "upstream", fill(nginx_conf(work, [static]), "upstream"))
        nginx_started.append("upstream")
        wait_port(ports["small"])

        # nginx as the proxy: one process (no master), in the foreground, under callgrind.
        proxy_conf = os.path.join(work, "nginx-proxy.conf")
        with open(proxy_conf, "w") as f:
            f.write("daemon off;\nmaster_process off;\n" + fill(nginx_conf(work, [proxy]), "proxy"))
        nginx_out = os.path.join(work, "callgrind.nginx")
        nginx = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={nginx_out}",
                                  "nginx", "-c", proxy_conf, "-p", work, "-e", os.path.join(work, "nginx-proxy.startup.log")],
                                 stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "nginx-valgrind.log"), "w"))
        procs.append(nginx)
        wait_port(ports["proxy_small"], timeout=120)

        subprocess.run(["psql", args.database, "-qc", f'create database "{dbname}"'], check=True, capture_output=True)
        conf = write_gateway_config(work, "gateway", ports["gateway"], db_url, ports)
        env = gateway_env()
        key = create_key(args.binary, conf, "gateway", env)
        gw_out = os.path.join(work, "callgrind.imagegate")
        gw = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={gw_out}",
                               args.binary, "--config", conf, "serve"],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "imagegate.log"), "w"))
        procs.append(gw)
        wait_port(ports["gateway"], timeout=180)

        targets = {"nginx": (valgrind_pid(nginx_out), nginx_out, ports["proxy_small"], {}),
                   "imagegate": (valgrind_pid(gw_out), gw_out, ports["gateway"], {"Authorization": f"Bearer {key}"})}
        results = {}
        for name, (pid, out, port, headers) in targets.items():
            print(f"{name}: {args.warmup} warm-up requests...", flush=True)
            send(port, headers, args.warmup)
            time.sleep(args.settle)
            print(f"{name}: counting {args.requests} requests...", flush=True)
            busy, busy_path, seconds = measure(pid, out, lambda: (send(port, headers, args.requests), time.sleep(args.settle)))
            print(f"{name}: counting the same {seconds:.1f} s with no request (timers, background work)...", flush=True)
            idle, idle_path, _ = measure(pid, out, lambda: time.sleep(seconds))
            results[name] = (busy, idle, busy_path, idle_path)
            print(f"{name}: {busy:,} instructions, {idle:,} of them idle work; "
                  f"{(busy - idle) / args.requests:,.0f} per request", flush=True)

        rows = subprocess.run(["psql", db_url, "-Atc", "select count(*) from usage"], capture_output=True, text=True).stdout.strip()
        expected = args.warmup + args.requests + 1
        print()
        print(f"instructions per proxied request ({args.requests} sequential requests on one connection, "
              f"callgrind, idle work over the same time subtracted):")
        per = {name: (busy - idle) / args.requests for name, (busy, idle, _, _) in results.items()}
        # Each dump read once: (own, inclusive, allocations) while busy and while idle.
        profiles = {name: (profile(busy_path), profile(idle_path))
                    for name, (_, _, busy_path, idle_path) in results.items()}
        own, inclusive, _ = profiles["imagegate"][0]
        for name, value in per.items():
            print(f"  {name:10} {value:>12,.0f}")
        print(f"  ratio imagegate / nginx: {per['imagegate'] / per['nginx']:.2f}x")
        # The usage shipper inserts rows into Postgres in batches whose size depends on timing
        # (at c=1 under valgrind, one to a few rows): that share moves from run to run by more
        # than most changes to the request path, so it is shown apart.
        inserts = inclusive.get(INSERTS, 0) / args.requests
        print(f"  of imagegate's: inserting rows into Postgres (batch sizes vary run to run) {inserts:,.0f}, "
              f"the rest {per['imagegate'] - inserts:,.0f} ({(per['imagegate'] - inserts) / per['nginx']:.2f}x nginx)")
        print(f"usage rows recorded by imagegate: {rows} (requests sent to it: {expected - 1})")
        print()
        print("allocations per request (calls into the C allocator, in the same counts, idle subtracted):")
        for name, (busy_profile, idle_profile) in profiles.items():
            print(f"  {name:10} {(busy_profile[2] - idle_profile[2]) / args.requests:>12,.1f}")
        print()
        ours, spent = top_functions(own, inclusive, args.top)
        busy = results["imagegate"][0]
        print(f"imagegate's own functions by inclusive cost over the {args.requests} requests:")
        for instr, name in ours:
            print(f"  {instr / args.requests:>10,.0f}/req {100 * instr / busy:5.1f}%  {name[:150]}")
        print()
        print("all functions by exclusive cost (the function's own instructions):")
        for instr, name in spent:
            print(f"  {instr / args.requests:>10,.0f}/req {100 * instr / busy:5.1f}%  {name[:150]}")
    finally:
        tear_down(procs, work, nginx_started, args.database, dbname)


if __name__ == "__main__":
    main()

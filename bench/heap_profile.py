#!/usr/bin/env python3
"""Where a call in flight keeps its memory: imagegate's heap at the peak of N held calls,
by the code that allocated it, per call.

held_calls.py says how much RSS each call in flight costs; this says what it is. imagegate
runs under heaptrack (Debian: apt-get install heaptrack), the provider stand-in of
held_calls.py holds each of --calls generations for --hold seconds, and after imagegate
stops, heaptrack's peak consumers are read back: each allocation site's bytes live at the
heap's peak, divided by the number of calls, under the first frame outside the standard
library and the allocation helpers (bytes, hashbrown). Every answer must be a 200, or the
run is void.

  python3 bench/heap_profile.py --binary target/profiling/imagegate [--calls 1000] [--hold 15]
"""

import argparse
import asyncio
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
from held_calls import burst, raise_fd_limit  # noqa: E402
from proxy_bench import create_key, free_port, gateway_env, tear_down, wait_port, write_gateway_config  # noqa: E402

# Frames that say how, not who: the allocator, collections, the standard library.
HOW = ("/rustc/", "/bytes-", "/hashbrown-", "/alloc/src/", "/core/src/", "/std/src/")
UNITS = {"B": 1, "K": 1e3, "M": 1e6, "G": 1e9}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def frame_place(path):
    """`crate path` for a frame worth naming, or None: a dependency's file (its path in
    cargo's registry), or imagegate's own (a relative path that is a file of this crate:
    some dependencies' debug info names their files relatively too, and those are skipped,
    like the standard library's and the allocation helpers')."""
    if any(h in path for h in HOW):
        return None
    crate = re.search(r"registry/src/[^/]+/([^/]+)/(.*)", path)
    if crate:
        return f"{crate.group(1)} {crate.group(2)}"
    if not path.startswith("/") and os.path.isfile(os.path.join(ROOT, path)):
        return f"imagegate {path}"
    return None


def peak_sites(profile, top):
    """heaptrack's peak consumers as (bytes, site), one site per allocating backtrace's
    first frame that is not in HOW, sites merged, largest first."""
    text = subprocess.run(["heaptrack_print", "-f", profile, "--print-peaks", "yes", "--print-allocators", "no",
                           "--print-temporary", "no", "--print-leaks", "no", "--merge-backtraces", "no",
                           "--peak-limit", str(top * 4)], capture_output=True, text=True, check=True).stdout
    total = re.search(r"peak heap memory consumption: ([\d.]+)([BKMG])", text)
    sites, size, site, function = {}, None, None, None
    for line in text.splitlines():
        m = re.match(r"([\d.]+)([BKMG]) peak memory consumed over \d+ calls from", line)
        if m:
            if size is not None:
                sites[site] = sites.get(site, 0) + size
            size, site, function = float(m.group(1)) * UNITS[m.group(2)], "(no frame outside the library)", None
            continue
        if size is None:
            continue
        if line.startswith("  ") and not line.startswith("    "):
            function = line.strip()
        m = re.match(r"\s+at (\S+):(\d+)$", line)
        if m and site == "(no frame outside the library)":
            where = frame_place(m.group(1))
            if where:
                site = f"{where}:{m.group(2)} {function}"
    if size is not None:
        sites[site] = sites.get(site, 0) + size
    peak = float(total.group(1)) * UNITS[total.group(2)] if total else 0
    return peak, sorted(((b, s) for s, b in sites.items()), reverse=True)[:top]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--hold", type=float, default=15.0)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--database", default=os.environ.get("IMAGEGATE_BENCH_DATABASE_URL",
                                                         "postgres://postgres@127.0.0.1:5432/postgres"))
    args = ap.parse_args()
    if not shutil.which("heaptrack"):
        sys.exit("heaptrack is not installed (Debian: apt-get install heaptrack)")
    if 2 * args.calls + 100 > raise_fd_limit():
        sys.exit(f"the open-file limit is too low for {args.calls} calls")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = tempfile.mkdtemp(prefix="imagegate-heap.")
    procs = []
    dbname = f"imagegate_bench_{uuid.uuid4().hex[:12]}"
    db_url = args.database.rsplit("/", 1)[0] + "/" + dbname
    try:
        ports = {k: free_port() for k in ["small", "large", "gateway"]}
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "held_calls.py")
        standin = subprocess.Popen([sys.executable, here, "--serve", str(ports["small"]), "--hold", str(args.hold)])
        procs.append(standin)
        wait_port(ports["small"])
        subprocess.run(["psql", args.database, "-qc", f'create database "{dbname}"'], check=True, capture_output=True)
        conf = write_gateway_config(work, "gateway", ports["gateway"], db_url, ports)
        env = gateway_env()
        key = create_key(args.binary, conf, "gateway", env)
        profile = os.path.join(work, "imagegate")
        print(f"imagegate under heaptrack; {args.calls} calls held {args.hold:.0f} s each...", flush=True)
        gw = subprocess.Popen(["heaptrack", "-o", profile, args.binary, "--config", conf, "serve"], env=env,
                              stdout=open(os.path.join(work, "heaptrack.log"), "w"), stderr=subprocess.STDOUT)
        procs.append(gw)
        wait_port(ports["gateway"], timeout=60)
        headers = {"Authorization": f"Bearer {key}"}
        asyncio.run(burst(ports["gateway"], headers, 20))
        ok, failures = asyncio.run(burst(ports["gateway"], headers, args.calls))
        # Stopped as an operator would, so that heaptrack writes its file out.
        subprocess.run(["pkill", "-TERM", "-f", f"{re.escape(args.binary)} --config {re.escape(conf)}"])
        gw.wait(timeout=120)
        if ok != args.calls:
            sys.exit(f"VOID: {ok}/{args.calls} calls answered 200, e.g. {failures}")
        files = [f for f in os.listdir(work) if f.startswith("imagegate.") and f.endswith((".zst", ".gz"))]
        if not files:
            sys.exit("heaptrack wrote no profile; see heaptrack.log")
        path = os.path.join(work, files[0])
        # heaptrack's compressor may still be writing when the program has ended.
        size = -1
        while size != os.path.getsize(path):
            size = os.path.getsize(path)
            time.sleep(2)
        peak, sites = peak_sites(path, args.top)
        if not sites:
            sys.exit(f"no peak consumers read from {path}")
        print(f"\nheap at its peak: {peak / 1e6:.1f} MB, {peak / args.calls / 1024:.1f} KiB per call held "
              f"(idle heap included); the largest sites, per call:")
        for size, site in sites:
            print(f"  {size / args.calls / 1024:7.2f} KiB  {site[:110]}")
    finally:
        time.sleep(1)
        tear_down(procs, work, [], args.database, dbname)


if __name__ == "__main__":
    main()

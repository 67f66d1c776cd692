#!/usr/bin/env python3
"""Memory per call in flight, in the shape of real image traffic: imagegate against nginx.

Image calls last 40-100 s at the provider, so a gateway holds thousands of them at once.
A provider stand-in (its own process, asyncio) holds every call for --hold seconds before
it answers a small ImagesResponse with usage. For each of --calls (e.g. 2000,4000), N
clients start one generation each at once; a sampler reads the proxy's RSS (VmRSS of every
process of it) every 50 ms. The figure is (peak RSS - idle RSS after warm-up) / N, for imagegate and for
nginx in front of the same stand-in, measured in the same run. Every answer must be a 200
and imagegate must have written one usage row per call, or the run is void.

Started by bench/held_calls.sh, which builds imagegate; or by hand:
  python3 bench/held_calls.py --binary target/release/imagegate [--calls 2000,4000] [--hold 20]
"""

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proxy_bench import (PNG_B64, REQUEST, create_key, free_port, gateway_env, images_response,  # noqa: E402
                         nginx_conf, rss_kib, start_nginx, tear_down, wait_port, write_gateway_config)


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def serve_holding(port, hold):
    """The provider stand-in: answers every request after `hold` seconds."""
    body = images_response(len(PNG_B64)).encode()
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n")

    async def handle(reader, writer):
        try:
            while True:
                headers = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in headers.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                await asyncio.sleep(hold)
                writer.write(head + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=8192)
    async with server:
        await server.serve_forever()


async def one_call(port, headers, body):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [b"POST /v1/images/generations HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json",
                 b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
        lines += [f"{k}: {v}".encode() for k, v in headers.items()]
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        await writer.drain()
        status_line = await reader.readline()
        rest = await reader.read()
        status = int(status_line.split()[1]) if status_line else 0
        return status, b'"usage"' in rest
    finally:
        writer.close()


async def burst(port, headers, calls):
    body = REQUEST.replace("MODEL", "bench-small").encode()
    results = await asyncio.gather(*(one_call(port, headers, body) for _ in range(calls)), return_exceptions=True)
    ok = sum(1 for r in results if not isinstance(r, BaseException) and r[0] == 200 and r[1])
    return ok, [r for r in results if isinstance(r, BaseException) or r[0] != 200][:3]


class Sampler(threading.Thread):
    def __init__(self, pids):
        super().__init__(daemon=True)
        self.pids, self.peak, self.stop = pids, 0, False

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, sum(rss_kib(p) for p in self.pids()))
            time.sleep(0.05)


def idle_rss(pids):
    samples = []
    for _ in range(20):
        samples.append(sum(rss_kib(p) for p in pids()))
        time.sleep(0.05)
    return sorted(samples)[len(samples) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary")
    ap.add_argument("--calls", default="2000,4000")
    ap.add_argument("--hold", type=float, default=20.0)
    ap.add_argument("--database", default=os.environ.get("IMAGEGATE_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    limit = raise_fd_limit()
    if args.serve:
        asyncio.run(serve_holding(args.serve, args.hold))
        return
    if not args.binary:
        sys.exit("--binary is required")
    counts = [int(c) for c in args.calls.split(",")]
    if 2 * max(counts) + 100 > limit:
        sys.exit(f"open-file limit {limit} is too low for {max(counts)} calls")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = tempfile.mkdtemp(prefix="imagegate-held.")
    os.chmod(work, 0o755)
    procs = []
    nginx_started = []
    dbname = f"imagegate_bench_{uuid.uuid4().hex[:12]}"
    db_url = args.database.rsplit("/", 1)[0] + "/" + dbname
    void = []
    try:
        ports = {k: free_port() for k in ["small", "large", "proxy_small", "gateway"]}
        standin = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(ports["small"]),
                                    "--hold", str(args.hold)])
        procs.append(standin)
        wait_port(ports["small"])

        proxy = f"""
    server {{
        listen 127.0.0.1:{ports['proxy_small']} backlog=8192;
        location / {{
            proxy_pass http://small;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}"""
        conf = nginx_conf(work, [proxy]).replace("{workers}", "2").replace("{name}", "proxy") \
            .replace("{small}", str(ports["small"])).replace("{large}", str(ports["small"])) \
            .replace("worker_connections 8192;", f"worker_connections {2 * max(counts) + 100};")
        conf = f"worker_rlimit_nofile {limit};\n" + conf
        proxy_pid, _ = start_nginx(work, "proxy", conf)
        nginx_started.append("proxy")
        wait_port(ports["proxy_small"])
        nginx_pids = lambda: [proxy_pid] + [int(w) for w in subprocess.run(
            ["pgrep", "-P", str(proxy_pid)], capture_output=True, text=True).stdout.split()]

        subprocess.run(["psql", args.database, "-qc", f'create database "{dbname}"'], check=True, capture_output=True)
        conf = write_gateway_config(work, "gateway", ports["gateway"], db_url, ports)
        env = gateway_env()
        key = create_key(args.binary, conf, "gateway", env)
        gw = subprocess.Popen([args.binary, "--config", conf, "serve"], env=env,
                              stdout=open(os.path.join(work, "imagegate.log"), "w"), stderr=subprocess.STDOUT)
        procs.append(gw)
        wait_port(ports["gateway"])

        targets = {"nginx": (ports["proxy_small"], {}, nginx_pids),
                   "imagegate": (ports["gateway"], {"Authorization": f"Bearer {key}"}, lambda: [gw.pid])}
        base = {}
        for name, (port, headers, pids) in targets.items():
            asyncio.run(burst(port, headers, 20))  # warm-up: connections, caches
            # Idle once, after warm-up and before any burst: a later burst reuses what the
            # allocator kept from an earlier one, so measuring it against the RSS left behind
            # would under-report.
            base[name] = idle_rss(pids)

        table = []
        sent_to_gateway = 20
        for calls in counts:
            for name, (port, headers, pids) in targets.items():
                idle = base[name]
                sampler = Sampler(pids)
                sampler.start()
                started = time.monotonic()
                ok, failures = asyncio.run(burst(port, headers, calls))
                seconds = time.monotonic() - started
                sampler.stop = True
                sampler.join()
                if name == "imagegate":
                    sent_to_gateway += calls
                if ok != calls:
                    void.append(f"{name} {calls} calls: {ok} answered 200, e.g. {failures}")
                per_call = (sampler.peak - idle) / calls
                table.append((calls, name, idle / 1024, sampler.peak / 1024, per_call, seconds, ok))
                print(f"{calls:>6} calls {name:10} idle {idle / 1024:7.1f} MiB peak {sampler.peak / 1024:7.1f} MiB "
                      f"+{per_call:6.1f} KiB per call, {ok}/{calls} answered 200 in {seconds:.1f} s", flush=True)
                time.sleep(2)

        time.sleep(3)
        rows = int(subprocess.run(["psql", db_url, "-Atc", "select count(*) from usage"], capture_output=True,
                                  text=True).stdout.strip() or 0)
        print()
        print(f"peak RSS over idle per call in flight (calls held {args.hold:.0f} s by the provider stand-in):")
        for calls in counts:
            cells = {name: per for c, name, _, _, per, _, _ in table if c == calls}
            print(f"  {calls:>6} calls: imagegate +{cells['imagegate']:.1f} KiB, nginx +{cells['nginx']:.1f} KiB")
        print(f"usage rows: {rows} for {sent_to_gateway} calls sent to imagegate")
        if rows != sent_to_gateway:
            void.append(f"usage rows {rows} != calls {sent_to_gateway}")
        if void:
            print("VOID:")
            for v in void:
                print(f"  {v}")
            sys.exit(1)
    finally:
        tear_down(procs, work, nginx_started, args.database, dbname)


if __name__ == "__main__":
    main()

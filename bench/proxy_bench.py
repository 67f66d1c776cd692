#!/usr/bin/env python3
"""imagegate against a plain nginx reverse proxy, on one machine.

Runs every scenario against three targets in alternation, for several rounds:
  direct     the upstream stand-in itself (nginx answering fixed ImagesResponse bodies)
  nginx      nginx as a plain reverse proxy in front of it (buffering off)
  imagegate  imagegate in front of it, with key auth and usage recording on (Postgres)
and prints the medians and the ratios against nginx measured in the same run.

Started by bench/proxy.sh, which builds imagegate and checks the tools; see bench/README.md.
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
import time
import uuid

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
USAGE = {"total_tokens": 1889, "input_tokens": 1124, "output_tokens": 765,
         "input_tokens_details": {"text_tokens": 19, "image_tokens": 1105}}
REQUEST = json.dumps({"model": "MODEL", "prompt": "a red fox", "size": "1024x1024", "quality": "low"})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images_response(b64_len):
    image = (PNG_B64 * (b64_len // len(PNG_B64) + 1))[:b64_len] if b64_len > len(PNG_B64) else PNG_B64
    return json.dumps({"created": 1795251252, "background": "opaque", "data": [{"b64_json": image}],
                       "output_format": "png", "quality": "low", "size": "1024x1024", "usage": USAGE})


def wait_port(port, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on port {port} after {timeout}s")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def write_gateway_config(work, name, port, db_url, ports, record_usage=True):
    """imagegate's configuration for the bench: one model per stand-in, usage on Postgres, and
    its own result store in `work` (by default it would be `data/results` in the working
    folder, shared by every bench run: results kept for retries piled up there, and listing
    them, every few seconds, was counted as request work when it fell in a measured window)."""
    conf = os.path.join(work, f"{name}.toml")
    with open(conf, "w") as f:
        f.write(f"""
default_model = "bench-small"
[server]
listen = "127.0.0.1:{port}"
spool_dir = "{work}/spool-{name}"
journal_dir = "{work}/journal-{name}"
{"" if record_usage else "record_usage = false"}
[database]
url = "{db_url}"
[results]
url = "file://{work}/results-{name}"
[providers.small]
base_url = "http://127.0.0.1:{ports['small']}/v1"
api_key_env = "BENCH_PROVIDER_KEY"
[providers.large]
base_url = "http://127.0.0.1:{ports['large']}/v1"
api_key_env = "BENCH_PROVIDER_KEY"
[models.bench-small]
routes = [{{ provider = "small", model = "m" }}]
[models.bench-large]
routes = [{{ provider = "large", model = "m" }}]
[pricing.small.m]
text_input = 5.0
cached_text_input = 1.25
image_input = 10.0
cached_image_input = 1.25
image_output = 40.0
[pricing.large.m]
per_image = 0.04
""")
    return conf


def gateway_env():
    env = dict(os.environ, BENCH_PROVIDER_KEY="bench-provider-key", RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    for k in list(env):
        if k.startswith("IMAGEGATE_"):
            del env[k]
    return env


def create_key(binary, conf, name, env):
    """A key whose in-flight limit cannot refuse the bench's connections: a refusal is a cheap
    429, and a throughput that counts them is not a throughput."""
    return subprocess.run([binary, "--config", conf, "keys", "create", "--name", f"bench-{name}-{uuid.uuid4().hex[:6]}",
                           "--max-in-flight", "100000"],
                          check=True, capture_output=True, text=True, env=env).stdout.strip()


def cpu_seconds(pids):
    """User + system CPU seconds used so far by these processes (/proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def nginx_conf(work, servers):
    blocks = "\n".join(servers)
    return f"""
worker_processes {{workers}};
pid {work}/nginx-{{name}}.pid;
error_log {work}/nginx-{{name}}.error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {work}/body-{{name}};
    proxy_temp_path {work}/proxy-{{name}};
    upstream small {{ server 127.0.0.1:{{small}}; keepalive 512; }}
    upstream large {{ server 127.0.0.1:{{large}}; keepalive 512; }}
{blocks}
}}
"""


def start_nginx(work, name, conf):
    path = os.path.join(work, f"nginx-{name}.conf")
    with open(path, "w") as f:
        f.write(conf)
    subprocess.run(["nginx", "-c", path, "-p", work, "-e", os.path.join(work, f"nginx-{name}.startup.log")], check=True)
    with open(os.path.join(work, f"nginx-{name}.pid")) as f:
        return int(f.read().strip()), path


def stop_nginx(work, name):
    path = os.path.join(work, f"nginx-{name}.conf")
    subprocess.run(["nginx", "-c", path, "-p", work, "-e", os.path.join(work, f"nginx-{name}.startup.log"), "-s", "stop"],
                   check=False, stderr=subprocess.DEVNULL)


def tear_down(procs, work, nginx_names, admin_url, dbname, wait=60):
    """What a bench started, gone: its processes (SIGTERM, then SIGKILL after `wait` s), its
    nginx instances, its throwaway database, and its folder unless `BENCH_KEEP=1`."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            p.kill()
    for name in nginx_names:
        stop_nginx(work, name)
    subprocess.run(["psql", admin_url, "-qc", f'drop database if exists "{dbname}" with (force)'], capture_output=True)
    if os.environ.get("BENCH_KEEP") == "1":
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def drained(port, timeout=120.0):
    """Waits until the imagegate on `port` has shipped its journal's backlog to Postgres
    (`imagegate_usage_journal_backlog_rows` 0 on its /metrics); returns the seconds waited.
    Without the wait, the rows one target wrote in its run are still being inserted during
    the next target's, and Postgres's CPU goes to the wrong account."""
    import urllib.request
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        m = re.search(r"^imagegate_usage_journal_backlog_rows(?:\{[^}]*\})? (\S+)$", text, re.M)
        if m is None or float(m.group(1)) == 0:
            return time.monotonic() - started
        time.sleep(0.1)
    sys.exit(f"127.0.0.1:{port}: the usage backlog did not drain in {timeout:.0f} s")


def check(url, body, headers):
    """One request before the load: a target that answers an error would be measured as fast."""
    import urllib.request
    request = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            data = response.read()
            if b'"usage"' not in data:
                sys.exit(f"{url}: answer without usage: {data[:200]!r}")
    except urllib.error.HTTPError as err:
        sys.exit(f"{url}: {err.code} {err.read()[:300]!r}")


def wrk(url, body, headers, connections, seconds, work):
    script = os.path.join(work, f"wrk-{uuid.uuid4().hex}.lua")
    with open(script, "w") as f:
        f.write('wrk.method = "POST"\n')
        f.write(f"wrk.body = {json.dumps(body)}\n")
        for k, v in headers.items():
            f.write(f'wrk.headers["{k}"] = "{v}"\n')
    threads = min(2, connections)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script, url],
                         check=True, capture_output=True, text=True).stdout
    os.unlink(script)
    return parse_wrk(out)


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}
BYTES = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}


def parse_wrk(out):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    mbps = float(m.group(1)) * BYTES[m.group(2)] / 1024 ** 2
    m = re.search(r"\s50%\s+([\d.]+)(us|ms|s|m)\b", out)
    p50 = float(m.group(1)) * UNITS[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": rps, "mbps": mbps, "p50_ms": p50, "requests": requests,
            "non2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--database", default=os.environ.get("IMAGEGATE_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--usage-off", action="store_true", help="also run imagegate with usage recording off")
    ap.add_argument("--baseline", metavar="BINARY", action="append", default=[],
                    help="also run this imagegate binary (an earlier build) in the same rounds, as a target named "
                         "after its file; may be given more than once")
    ap.add_argument("--scenarios", default="c1,c64,c256,large16")
    ap.add_argument("--hold", action="store_true",
                    help="set everything up, print the targets, and wait (for profiling by hand)")
    args = ap.parse_args()
    # SIGTERM cleans up like Ctrl-C does: nginx, imagegate and the database go away.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = tempfile.mkdtemp(prefix="imagegate-proxy-bench.")
    # nginx's workers run as an unprivileged user when it is started as root.
    os.chmod(work, 0o755)
    procs = []
    dbname = f"imagegate_bench_{uuid.uuid4().hex[:12]}"
    try:
        with open(os.path.join(work, "small.json"), "w") as f:
            f.write(images_response(len(PNG_B64)))
        with open(os.path.join(work, "large.json"), "w") as f:
            f.write(images_response(3 * 1024 * 1024))

        ports = {k: free_port() for k in ["small", "large", "proxy_small", "proxy_large", "gateway", "gateway_off"]}
        # Each earlier build is a target named after its file (made unique, and never one of ours).
        baselines = {}
        for binary in args.baseline:
            name = os.path.basename(binary)
            while name in baselines or name in ("direct", "nginx", "imagegate", "imagegate-usage-off"):
                name += "-2"
            baselines[name] = binary
            ports[name] = free_port()
        static = lambda port, body: f"""
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        root {work};
        client_max_body_size 0;
        keepalive_requests 1000000;
        location / {{ default_type application/json; rewrite ^ /{body} break; error_page 405 =200 /{body}; }}
    }}"""
        proxy = lambda port, up: f"""
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        client_max_body_size 0;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://{up};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}"""
        fill = lambda conf, name, workers: conf.replace("{workers}", str(workers)).replace("{name}", name) \
            .replace("{small}", str(ports["small"])).replace("{large}", str(ports["large"]))
        upstream_conf = fill(nginx_conf(work, [static(ports["small"], "small.json"), static(ports["large"], "large.json")]), "upstream", 1)
        proxy_conf = fill(nginx_conf(work, [proxy(ports["proxy_small"], "small"), proxy(ports["proxy_large"], "large")]), "proxy", 2)
        start_nginx(work, "upstream", upstream_conf)
        proxy_pid, _ = start_nginx(work, "proxy", proxy_conf)
        for p in ["small", "large", "proxy_small", "proxy_large"]:
            wait_port(ports[p])

        subprocess.run(["psql", args.database, "-qc", f'create database "{dbname}"'], check=True, capture_output=True)
        db_url = args.database.rsplit("/", 1)[0] + "/" + dbname

        def gateway(name, port, record_usage, binary=args.binary):
            conf = write_gateway_config(work, name, port, db_url, ports, record_usage)
            env = gateway_env()
            key = create_key(binary, conf, name, env)
            log = open(os.path.join(work, f"{name}.log"), "w")
            proc = subprocess.Popen([binary, "--config", conf, "serve"], env=env, stdout=log, stderr=log)
            procs.append(proc)
            wait_port(port)
            return proc, key

        gw, key = gateway("gateway", ports["gateway"], True)
        targets = {"direct": ("small", "large", {}), "nginx": ("proxy_small", "proxy_large", {}),
                   "imagegate": ("gateway", "gateway", {"Authorization": f"Bearer {key}"})}
        nginx_pids = [proxy_pid] + [int(w) for w in subprocess.run(["pgrep", "-P", str(proxy_pid)], capture_output=True,
                                                                   text=True).stdout.split()]
        pids = {"nginx": nginx_pids, "imagegate": [gw.pid]}
        for name, binary in baselines.items():
            # The same database (its migrations must be the same as the binary's, or older).
            base, key_base = gateway(name, ports[name], True, binary)
            targets[name] = (name, name, {"Authorization": f"Bearer {key_base}"})
            pids[name] = [base.pid]
        if args.usage_off:
            gw_off, key_off = gateway("gateway_off", ports["gateway_off"], False)
            targets["imagegate-usage-off"] = ("gateway_off", "gateway_off", {"Authorization": f"Bearer {key_off}"})
            pids["imagegate-usage-off"] = [gw_off.pid]

        if args.hold:
            body = REQUEST.replace("MODEL", "bench-small")
            script = os.path.join(work, "hold.lua")
            with open(script, "w") as f:
                f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n')
                f.write('wrk.headers["Content-Type"] = "application/json"\n')
                f.write(f'wrk.headers["Authorization"] = "Bearer {key}"\n')
            print(f"imagegate pid {gw.pid}")
            for t, (small_port, _, _) in targets.items():
                print(f"  {t:10} wrk -t2 -c64 -d10s --latency -s {script} http://127.0.0.1:{ports[small_port]}/v1/images/generations")
            print("holding; Ctrl-C to stop", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                return
        time.sleep(1)
        idle = {t: rss_kib(p[0]) / 1024 for t, p in pids.items() if t != "nginx"}
        workers = subprocess.run(["pgrep", "-P", str(proxy_pid)], capture_output=True, text=True).stdout.split()
        idle["nginx"] = (rss_kib(proxy_pid) + sum(rss_kib(int(w)) for w in workers)) / 1024

        scenarios = {
            "c1": (1, "small", "p50_ms"),
            "c64": (64, "small", "rps"),
            "c256": (256, "small", "rps"),
            "large16": (16, "large", "mbps"),
        }
        chosen = [s for s in args.scenarios.split(",") if s]
        results = {(s, t): [] for s in chosen for t in targets}
        void = []
        for rnd in range(args.rounds):
            for s in chosen:
                conns, size, _ = scenarios[s]
                order = list(targets)
                if rnd % 2:
                    order.reverse()
                for t in order:
                    small_port, large_port, headers = targets[t]
                    port = ports[small_port if size == "small" else large_port]
                    model = "bench-small" if size == "small" else "bench-large"
                    body = REQUEST.replace("MODEL", model)
                    hdrs = dict(headers, **{"Content-Type": "application/json"})
                    url = f"http://127.0.0.1:{port}/v1/images/generations"
                    if rnd == 0:
                        check(url, body, hdrs)
                    wrk(url, body, hdrs, conns, 1, work)  # warm-up
                    cpu_before = cpu_seconds(pids[t]) if t in pids else None
                    r = wrk(url, body, hdrs, conns, args.seconds, work)
                    if cpu_before is not None:
                        r["cpu_per_10k"] = (cpu_seconds(pids[t]) - cpu_before) / r["requests"] * 10000
                    if r["non2xx"] or r["socket_errors"]:
                        void.append(f"{s} {t} round {rnd + 1}: non-2xx {r['non2xx']}, socket errors {r['socket_errors'] or 0}")
                        print(f"  VOID: {void[-1]}", file=sys.stderr)
                    results[(s, t)].append(r)
                    if t in pids and t != "nginx":
                        drained(port)
                    print(f"round {rnd + 1} {s:8} {t:20} {r['rps']:10.0f} req/s {r['mbps']:9.1f} MB/s p50 {r['p50_ms']:.3f} ms", flush=True)

        print()
        print("medians of all rounds; ratios against nginx from the same run")
        print(f"{'scenario':34} {'direct':>10} {'nginx':>10} " + " ".join(f"{t:>20}" for t in targets if t not in ('direct', 'nginx')) + "   ratio")
        med = lambda s, t, k: statistics.median(r[k] for r in results[(s, t)])
        for s in chosen:
            conns, size, metric = scenarios[s]
            d, n = med(s, "direct", metric), med(s, "nginx", metric)
            others = [t for t in targets if t not in ("direct", "nginx")]
            if metric == "p50_ms":
                label = f"c={conns} p50 latency (ms), added"
                cells = " ".join(f"{med(s, t, metric):>10.3f}+{med(s, t, metric) - d:>9.3f}" for t in others)
                print(f"{label:34} {d:>10.3f} {n:>10.3f} {cells}   nginx added {n - d:.3f} ms")
            else:
                unit = "req/s" if metric == "rps" else "MB/s"
                label = f"c={conns} {size} ({unit})"
                cells = " ".join(f"{med(s, t, metric):>20.1f}" for t in others)
                ratios = ", ".join(f"{t} {med(s, t, metric) / n:.2f}x" for t in others)
                print(f"{label:34} {d:>10.1f} {n:>10.1f} {cells}   {ratios}")
        print(f"{'idle RSS (MiB)':34} {'':>10} {idle['nginx']:>10.1f} "
              + " ".join(f"{idle[t]:>20.1f}" for t in targets if t not in ("direct", "nginx")))
        print("CPU seconds per 10,000 requests (user + system, /proc/PID/stat), medians:")
        for s in chosen:
            cells = ", ".join(f"{t} {statistics.median(r['cpu_per_10k'] for r in results[(s, t)]):.3f} s"
                              for t in targets if t in pids)
            print(f"  {s:8} {cells}")
        rows = subprocess.run(["psql", db_url, "-Atc", "select count(*) from usage"], capture_output=True, text=True).stdout.strip()
        print(f"usage rows recorded by imagegate: {rows}")
        if void:
            print("VOID: some answers were not 2xx; these figures count refusals or errors and are not a throughput:")
            for v in void:
                print(f"  {v}")
            sys.exit(1)
    finally:
        tear_down(procs, work, ["proxy", "upstream"], args.database, dbname, wait=30)


if __name__ == "__main__":
    main()

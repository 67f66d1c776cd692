#!/usr/bin/env python3
"""Memory and timing of streamed multipart edits through imagegate (issue 3, point 7).

Run by bench/edits_memory.sh, which builds imagegate, writes a temporary configuration
routing gpt-image-1 to the provider stand-in below, and starts `imagegate serve`. This
process is both ends of the pipe, so one clock (time.monotonic) times both:

  clients ──multipart upload──▶ imagegate ──re-encoded, chunked──▶ stand-in provider

Each round runs the same burst of concurrent uploads three ways:
  direct       the clients upload straight to the stand-in (baseline: no imagegate)
  model-first  parts model, prompt, image: imagegate streams, nothing touches disk
  model-last   parts image, prompt, model: imagegate spools the image to disk first
while a thread samples imagegate's VmRSS every ~20 ms (and VmHWM is reset per run).

Standard library only. Exit status: 0 when every request got 200 and the requirements
hold, 1 otherwise, 2 on a setup error.
"""

import argparse
import http.client
import http.server
import json
import os
import re
import socketserver
import statistics
import sys
import threading
import time
import uuid

MIB = 1024 * 1024
CHUNK = 64 * 1024
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A valid 1x1 PNG: what the stand-in "generates".
TINY_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
# Every upload carries a token (in the image's filename and in the prompt) that lets the
# stand-in tell which client request a provider request belongs to.
TOKEN_RE = re.compile(rb"benchreq([0-9a-f]{12})")
HEAD_SCAN_BYTES = 64 * 1024


# --- The provider stand-in -------------------------------------------------------------


class Records:
    """What the stand-in saw, by request token."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_token = {}
        self.untagged = 0
        self.errors = []

    def put(self, token, record):
        with self.lock:
            if token is None:
                self.untagged += 1
            else:
                self.by_token[token] = record

    def get(self, token):
        with self.lock:
            return self.by_token.get(token)

    def error(self, text):
        with self.lock:
            self.errors.append(text)


class StandinHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "bench-standin/1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def do_POST(self):  # noqa: N802 - http.server's naming
        records = self.server.records
        if self.path.rstrip("/") != "/v1/images/edits":
            self.reply(404, {"error": {"message": "not found", "type": "invalid_request_error",
                                       "param": None, "code": None}})
            return
        state = {"first": None, "total": 0, "head": bytearray()}
        te = self.headers.get("Transfer-Encoding", "").lower()
        try:
            if "chunked" in te:
                self.read_chunked(state)
            else:
                self.read_length(state, int(self.headers.get("Content-Length", "0")))
        except Exception as err:  # a cut upload: note it, drop the connection
            records.error(f"stand-in: body read failed after {state['total']} bytes: {err!r}")
            self.close_connection = True
            return
        last = time.monotonic()
        match = TOKEN_RE.search(bytes(state["head"]))
        token = match.group(1).decode() if match else None
        records.put(token, {
            "first": state["first"],
            "last": last,
            "bytes": state["total"],
            "chunked": "chunked" in te,
            "auth": self.headers.get("Authorization", ""),
        })
        self.reply(200, {
            "created": 1,
            "data": [{"b64_json": TINY_PNG_B64}],
            "usage": {
                "input_tokens": 1050,
                "input_tokens_details": {"text_tokens": 50, "image_tokens": 1000},
                "output_tokens": 272,
                "total_tokens": 1322,
            },
        })

    def take(self, state, data):
        if not data:
            raise ConnectionError("connection closed before the body ended")
        if state["first"] is None:
            state["first"] = time.monotonic()
        state["total"] += len(data)
        if len(state["head"]) < HEAD_SCAN_BYTES:
            state["head"] += data[: HEAD_SCAN_BYTES - len(state["head"])]

    def read_length(self, state, remaining):
        while remaining > 0:
            data = self.rfile.read1(min(CHUNK, remaining))
            self.take(state, data)
            remaining -= len(data)

    def read_chunked(self, state):
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise ConnectionError("connection closed inside the chunked body")
            if state["first"] is None:
                state["first"] = time.monotonic()  # the chunk header is the body's first byte
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            remaining = size
            while remaining > 0:
                data = self.rfile.read1(min(CHUNK, remaining))
                self.take(state, data)
                remaining -= len(data)
            if self.rfile.readline(16) not in (b"\r\n", b"\n"):
                raise ValueError("chunk not followed by CRLF")

    def reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Standin(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 64
    allow_reuse_address = True

    def __init__(self, port):
        super().__init__(("127.0.0.1", port), StandinHandler)
        self.records = Records()


# --- imagegate's memory ----------------------------------------------------------------


def proc_status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_hwm(pid):
    """Resets VmHWM (peak RSS) to the current RSS; False where the kernel refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler(threading.Thread):
    def __init__(self, pid, interval):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.stop_event = threading.Event()
        self.peak_kib = 0
        self.samples = 0

    def run(self):
        while not self.stop_event.is_set():
            try:
                rss = proc_status_kib(self.pid, "VmRSS")
            except (OSError, KeyError):
                return
            self.samples += 1
            self.peak_kib = max(self.peak_kib, rss)
            self.stop_event.wait(self.interval)

    def stop(self):
        self.stop_event.set()
        self.join()


def idle_rss_kib(pid, seconds=1.0, interval=0.05):
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(proc_status_kib(pid, "VmRSS"))
        time.sleep(interval)
    return int(statistics.median(samples))


# --- The clients -----------------------------------------------------------------------


def multipart_parts(boundary, model_first, token, image_path, image_size):
    """(preamble, epilogue) around the image bytes, and the whole body's length."""

    def text(name, value):
        return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                f"{value}\r\n").encode()

    model = text("model", "gpt-image-1")
    prompt = text("prompt", f"add a small red hat (benchreq{token})")
    image_head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
                  f"filename=\"benchreq{token}.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    end = f"--{boundary}--\r\n".encode()
    if model_first:
        pre, post = model + prompt + image_head, b"\r\n" + end
    else:
        pre, post = image_head, b"\r\n" + prompt + model + end
    return pre, post, len(pre) + image_size + len(post)


def upload(host, port, key, model_first, image_path, image_size, timeout, rate=0.0):
    """One edit upload, the image streamed from disk (at most `rate` bytes/s when set).
    Returns the client's timings."""
    token = uuid.uuid4().hex[:12]
    boundary = "bench" + uuid.uuid4().hex
    pre, post, length = multipart_parts(boundary, model_first, token, image_path, image_size)
    result = {"token": token, "status": None, "error": None}
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        result["start"] = time.monotonic()
        conn.putrequest("POST", "/v1/images/edits", skip_accept_encoding=True)
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(length))
        conn.putheader("Authorization", f"Bearer {key}")
        conn.putheader("Accept", "application/json")
        conn.endheaders()
        conn.send(pre)
        sent = 0
        with open(image_path, "rb", buffering=0) as f:
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                conn.send(chunk)
                sent += len(chunk)
                if rate:
                    ahead = result["start"] + sent / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
        conn.send(post)
        result["last_sent"] = time.monotonic()
        response = conn.getresponse()
        body = response.read()
        result["end"] = time.monotonic()
        result["status"] = response.status
        if response.status == 200:
            data = json.loads(body)
            if not data.get("data") or "usage" not in data:
                result["error"] = f"200 without data/usage: {body[:200]!r}"
        else:
            result["error"] = f"HTTP {response.status}: {body[:300].decode(errors='replace')}"
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
        result.setdefault("end", time.monotonic())
    finally:
        conn.close()
    return result


def burst(host, port, key, model_first, image_path, image_size, clients, timeout, rate):
    results = [None] * clients
    barrier = threading.Barrier(clients)

    def run(i):
        barrier.wait()
        results[i] = upload(host, port, key, model_first, image_path, image_size, timeout,
                            rate)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.monotonic() - started


def make_image(path, size):
    """PNG magic, then random bytes: the stand-in never decodes it, imagegate only sniffs."""
    with open(path, "wb") as f:
        f.write(PNG_MAGIC)
        left = size - len(PNG_MAGIC)
        while left > 0:
            n = min(MIB, left)
            f.write(os.urandom(n))
            left -= n


def wait_ready(host, port, pid, seconds=30):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not os.path.exists(f"/proc/{pid}"):
            raise SystemExit(f"imagegate (pid {pid}) exited before it was ready")
        try:
            conn = http.client.HTTPConnection(host, port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"imagegate did not answer /healthz on {host}:{port} within {seconds} s")


# --- The run ---------------------------------------------------------------------------


def mib(kib):
    return kib / 1024


def fmt_ms(seconds):
    return f"{seconds * 1000:.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gateway", required=True, help="imagegate's HOST:PORT")
    ap.add_argument("--pid", type=int, required=True, help="imagegate's process id")
    ap.add_argument("--key", required=True, help="an imagegate client key")
    ap.add_argument("--provider-port", type=int, required=True, help="port for the stand-in")
    ap.add_argument("--provider-key", required=True, help="the key imagegate sends upstream")
    ap.add_argument("--workdir", required=True, help="scratch directory (the image goes here)")
    ap.add_argument("--spool-dir", help="imagegate's spool_dir, checked empty at the end")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--image-mib", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--limit-mib", type=float, default=16.0,
                    help="allowed peak RSS above idle RSS")
    ap.add_argument("--interval", type=float, default=0.02, help="RSS sampling period (s)")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--client-mibps", type=float, default=0.0,
                    help="pace each client's upload to this rate (MiB/s); 0: as fast as it can")
    args = ap.parse_args()

    host, port = args.gateway.rsplit(":", 1)
    port = int(port)
    pid = args.pid
    image_size = args.image_mib * MIB
    image_path = os.path.join(args.workdir, "image.png")

    try:
        standin = Standin(args.provider_port)
    except OSError as err:
        print(f"cannot start the provider stand-in on port {args.provider_port}: {err}",
              file=sys.stderr)
        return 2
    threading.Thread(target=standin.serve_forever, daemon=True).start()
    wait_ready(host, port, pid)

    print(f"generating a {args.image_mib} MiB image (PNG magic + random bytes)...", flush=True)
    make_image(image_path, image_size)
    small_path = os.path.join(args.workdir, "small.png")
    make_image(small_path, 256 * 1024)

    # Warm-up: both code paths, so idle RSS includes what one request leaves behind
    # (connection pools, the SQLite pool, lazily initialised state).
    print("warming up...", flush=True)
    for i in range(6):
        r = upload(host, port, args.key, i % 2 == 0, small_path, 256 * 1024, args.timeout)
        if r["status"] != 200:
            print(f"warm-up request failed: {r['error']}", file=sys.stderr)
            return 1
    time.sleep(1.0)
    idle_kib = idle_rss_kib(pid)
    hwm_resettable = reset_hwm(pid)
    print(f"idle RSS after warm-up: {mib(idle_kib):.1f} MiB"
          f"{'' if hwm_resettable else ' (VmHWM cannot be reset here: sampled peak only)'}",
          flush=True)

    scenarios = [("direct", None), ("model-first", True), ("model-last", False)]
    runs = {name: [] for name, _ in scenarios}
    failures = []
    for rnd in range(1, args.rounds + 1):
        for name, model_first in scenarios:
            via_gateway = model_first is not None
            target = (host, port) if via_gateway else ("127.0.0.1", args.provider_port)
            before_kib = proc_status_kib(pid, "VmRSS")
            if via_gateway:
                reset_hwm(pid)
            sampler = RssSampler(pid, args.interval)
            sampler.start()
            # Straight to the stand-in the clients send model first too, with the key
            # imagegate would send.
            key = args.key if via_gateway else args.provider_key
            results, wall = burst(target[0], target[1], key, model_first is not False,
                                  image_path, image_size, args.clients, args.timeout,
                                  args.client_mibps * MIB)
            sampler.stop()
            hwm_kib = proc_status_kib(pid, "VmHWM")
            after_kib = proc_status_kib(pid, "VmRSS")
            peak_kib = max(sampler.peak_kib, hwm_kib if hwm_resettable else 0)
            leads, provider_bytes = [], []
            for r in results:
                rec = standin.records.get(r["token"])
                r["provider"] = rec
                if r["status"] != 200 or r["error"]:
                    failures.append(f"round {rnd} {name}: {r['error'] or r['status']}")
                if rec is None:
                    if r["status"] == 200:
                        failures.append(f"round {rnd} {name}: the stand-in has no record of "
                                        f"request {r['token']}")
                    continue
                provider_bytes.append(rec["bytes"])
                if via_gateway and rec["auth"] != f"Bearer {args.provider_key}":
                    failures.append(f"round {rnd} {name}: the stand-in got Authorization "
                                    f"{rec['auth'][:16]!r}..., not imagegate's provider key")
                if "last_sent" in r and rec["first"] is not None:
                    leads.append(r["last_sent"] - rec["first"])
            run = {
                "round": rnd, "wall": wall, "results": results, "leads": leads,
                "before_kib": before_kib, "after_kib": after_kib,
                "sampled_peak_kib": sampler.peak_kib, "hwm_kib": hwm_kib,
                "peak_kib": peak_kib, "samples": sampler.samples,
                "provider_bytes": provider_bytes,
                "chunked": sorted({str(r["provider"]["chunked"]) for r in results
                                   if r.get("provider")}),
            }
            runs[name].append(run)
            ok = sum(1 for r in results if r["status"] == 200 and not r["error"])
            line = (f"round {rnd} {name:<11} {ok}/{args.clients} ok  {wall:6.2f} s"
                    f"  {args.clients * image_size / MIB / wall:7.1f} MiB/s")
            if via_gateway:
                line += (f"  RSS before {mib(before_kib):.1f}  peak {mib(peak_kib):.1f}"
                         f" [sampled {mib(sampler.peak_kib):.1f}/{sampler.samples}, HWM {mib(hwm_kib):.1f}]"
                         f" (+{mib(peak_kib - idle_kib):.1f} over idle)  after {mib(after_kib):.1f} MiB")
            print(line, flush=True)

    # --- Summary -----------------------------------------------------------------------
    def med(values):
        return statistics.median(values) if values else float("nan")

    time.sleep(1.0)
    final_idle_kib = idle_rss_kib(pid)
    direct_wall = med([r["wall"] for r in runs["direct"]])
    print()
    print("=" * 78)
    pace = f", each paced to {args.client_mibps:g} MiB/s" if args.client_mibps else ""
    print(f"imagegate edits: {args.clients} concurrent uploads of {args.image_mib} MiB each{pace}, "
          f"{args.rounds} round(s); medians over rounds")
    print(f"idle RSS: {mib(idle_kib):.1f} MiB after warm-up (the reference), "
          f"{mib(final_idle_kib):.1f} MiB idle again after all runs")
    print(f"RSS sampled every {args.interval * 1000:.0f} ms; peak = max(samples, VmHWM reset "
          f"before each run); peak-idle against the reference")
    print("-" * 78)
    header = (f"{'scenario':<12} {'ok':>7} {'wall s':>7} {'x direct':>8} {'MiB/s':>7} "
              f"{'peak RSS':>9} {'peak-idle':>9} {'worst':>7}")
    print(header)
    print(f"{'':<12} {'':>7} {'':>7} {'':>8} {'':>7} {'MiB':>9} {'MiB':>9} {'MiB':>7}")
    summary = {}
    for name, model_first in scenarios:
        rs = runs[name]
        total = sum(len(r["results"]) for r in rs)
        ok = sum(1 for r in rs for x in r["results"] if x["status"] == 200 and not x["error"])
        wall = med([r["wall"] for r in rs])
        ratio = wall / direct_wall if direct_wall else float("nan")
        rate = args.clients * image_size / MIB / wall
        if model_first is None:
            print(f"{name:<12} {f'{ok}/{total}':>7} {wall:>7.2f} {ratio:>8.2f} {rate:>7.1f} "
                  f"{'-':>9} {'-':>9} {'-':>7}")
            continue
        peak = med([r["peak_kib"] for r in rs])
        over = [r["peak_kib"] - idle_kib for r in rs]
        summary[name] = {"median_over": med(over), "worst_over": max(over)}
        print(f"{name:<12} {f'{ok}/{total}':>7} {wall:>7.2f} {ratio:>8.2f} {rate:>7.1f} "
              f"{mib(peak):>9.1f} {mib(med(over)):>9.1f} {mib(max(over)):>7.1f}")
    print("-" * 78)

    # Timing: with model first, the provider's first byte against the client's last.
    mf = runs["model-first"]
    all_leads = [lead for r in mf for lead in r["leads"]]
    n_req = sum(len(r["results"]) for r in mf)
    ahead = sum(1 for lead in all_leads if lead > 0)
    print("model-first timing (same clock): lead = client's last byte sent - provider's "
          "first byte received")
    for r in mf:
        cells = " ".join(f"{lead * 1000:+.0f}" for lead in r["leads"])
        print(f"  round {r['round']}: leads ms [{cells}]")
    if all_leads:
        print(f"  provider's first byte came first in {ahead}/{n_req} requests; "
              f"median lead {med(all_leads) * 1000:.0f} ms, min {min(all_leads) * 1000:.0f} ms "
              f"(median upload time {med([x['last_sent'] - x['start'] for r in mf for x in r['results'] if 'last_sent' in x]) * 1000:.0f} ms)")
    delays = [x["provider"]["first"] - x["start"] for r in mf for x in r["results"]
              if x.get("provider") and x["provider"]["first"] is not None]
    if delays:
        print(f"  the provider's first byte arrived a median {med(delays) * 1000:.1f} ms "
              f"after the client began sending (max {max(delays) * 1000:.1f} ms)")
    ml = runs["model-last"]
    ml_leads = [lead for r in ml for lead in r["leads"]]
    if ml_leads:
        print(f"model-last (spooled, for comparison): median lead {med(ml_leads) * 1000:.0f} ms "
              f"(negative: the provider hears nothing until the whole upload has arrived)")
    sizes = sorted({b for name in ("model-first", "model-last") for r in runs[name]
                    for b in r["provider_bytes"]})
    if sizes:
        print(f"bytes received by the provider per request: {sizes[0]}..{sizes[-1]} "
              f"(image {image_size}); upstream bodies chunked: "
              f"{sorted({c for name in ('model-first', 'model-last') for r in runs[name] for c in r['chunked']})}")
    if standin.records.untagged:
        print(f"stand-in requests without a token: {standin.records.untagged}")
    for err in standin.records.errors:
        print(err)
    if args.spool_dir and os.path.isdir(args.spool_dir):
        # Upload spool files are upload-*.part.
        left = [n for n in os.listdir(args.spool_dir)
                if n.startswith("upload-") and n.endswith(".part")]
        print(f"upload spool files left in spool_dir after the runs: {len(left)}")
        if left:
            failures.append(f"{len(left)} spool file(s) left behind: {left[:4]}")

    print("-" * 78)
    limit_kib = args.limit_mib * 1024
    rss_ok = summary["model-first"]["worst_over"] <= limit_kib
    timing_ok = bool(all_leads) and ahead == n_req
    print(f"requirement: peak RSS <= idle + {args.limit_mib:g} MiB with model first: "
          f"worst +{mib(summary['model-first']['worst_over']):.1f} MiB -> "
          f"{'PASS' if rss_ok else 'FAIL'}")
    print(f"requirement: with model first the provider gets its first byte before the "
          f"client sends its last: {ahead}/{n_req} -> {'PASS' if timing_ok else 'FAIL'}")
    print(f"(informational) model last, spooled: worst +"
          f"{mib(summary['model-last']['worst_over']):.1f} MiB over idle")
    print(f"failed requests: {len(failures)}")
    for f in failures[:20]:
        print(f"  {f}")
    print("=" * 78)
    standin.shutdown()
    return 0 if (rss_ok and timing_ok and not failures) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Health-check latency of imagegate with and without many silent connections.

Run by bench/connections.sh, which starts imagegate. In one run:

1. `baseline`: --requests GET /healthz, one new connection each (as an orchestrator's
   probe does), with no other connection open;
2. opens --silent TCP connections that send nothing and keeps them open;
3. `silent`: the same requests again, while the silent connections are open;
4. with --wait-closed S: S seconds after they were opened, counts how many of the silent
   connections imagegate has closed (server.header_read_timeout, 30 s by default);
5. closes the silent connections.

Prints median, p99 and max latency of each phase, the same-run ratio of the medians, how
many requests failed or timed out, and how many files imagegate had open (its accepted
connections among them). Standard library only.
"""

import argparse
import os
import resource
import socket
import statistics
import sys
import time


def health(addr, timeout):
    """One GET /healthz on a new connection; returns (seconds, status or error)."""
    started = time.perf_counter()
    try:
        with socket.create_connection(addr, timeout=timeout) as sock:
            sock.settimeout(max(timeout - (time.perf_counter() - started), 0.001))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        took = time.perf_counter() - started
        status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "no answer"
        return took, status
    except socket.timeout:
        return time.perf_counter() - started, "timeout"
    except OSError as err:
        return time.perf_counter() - started, type(err).__name__


def run(addr, requests, timeout, give_up):
    """`requests` probes; stops after `give_up` timeouts in a row (the server is stuck)."""
    latencies, failures, timeouts_in_a_row = [], {}, 0
    for _ in range(requests):
        took, status = health(addr, timeout)
        if status == "200":
            latencies.append(took)
            timeouts_in_a_row = 0
        else:
            failures[status] = failures.get(status, 0) + 1
            timeouts_in_a_row = timeouts_in_a_row + 1 if status == "timeout" else 0
            if timeouts_in_a_row >= give_up:
                break
    return latencies, failures


def is_closed(sock):
    """Whether the peer has closed `sock` (end of stream or reset), without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def open_files(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def p99(values):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def show(name, latencies, failures, requests):
    if latencies:
        line = (
            f"{name:<9} ok {len(latencies):>4}/{requests}  median {statistics.median(latencies) * 1000:8.2f} ms"
            f"  p99 {p99(latencies) * 1000:8.2f} ms  max {max(latencies) * 1000:8.2f} ms"
        )
    else:
        line = f"{name:<9} ok    0/{requests}"
    if failures:
        line += "  failed: " + ", ".join(f"{k} x{v}" for k, v in sorted(failures.items()))
    print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", required=True, help="host:port of imagegate")
    parser.add_argument("--pid", type=int, required=True, help="imagegate's process id")
    parser.add_argument("--silent", type=int, default=2000, help="silent connections")
    parser.add_argument("--requests", type=int, default=200, help="probes per phase")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per probe")
    parser.add_argument(
        "--wait-closed",
        type=float,
        default=0,
        help="seconds after opening to count the silent connections imagegate closed (0: skip)",
    )
    parser.add_argument(
        "--give-up", type=int, default=3, help="stop a phase after this many timeouts in a row"
    )
    args = parser.parse_args()
    host, port = args.gateway.rsplit(":", 1)
    addr = (host, int(port))

    # This process holds one end of every silent connection.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.silent + 64
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            sys.exit(f"error: the hard limit on open files ({hard}) is below {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))

    for _ in range(20):  # warm-up
        health(addr, args.timeout)
    idle_files = open_files(args.pid)
    baseline, base_failures = run(addr, args.requests, args.timeout, args.give_up)

    silent = []
    started = time.perf_counter()
    for _ in range(args.silent):
        sock = socket.socket()
        sock.settimeout(args.timeout)
        sock.connect(addr)
        silent.append(sock)
    opening = time.perf_counter() - started
    time.sleep(0.5)  # let the workers take what they will off the backlog
    held_files = open_files(args.pid)
    loaded, loaded_failures = run(addr, args.requests, args.timeout, args.give_up)
    loaded_time = time.perf_counter() - started
    closed = None
    if args.wait_closed > 0:
        time.sleep(max(0.0, args.wait_closed - (time.perf_counter() - started)))
        closed = sum(1 for sock in silent if is_closed(sock))
    for sock in silent:
        sock.close()

    print(
        f"{args.silent} silent connections opened in {opening:.2f} s (their client end);"
        f" imagegate's open files: {idle_files} before, {held_files} with them open"
    )
    show("baseline", baseline, base_failures, args.requests)
    show("silent", loaded, loaded_failures, args.requests)
    if baseline and loaded:
        ratio = statistics.median(loaded) / statistics.median(baseline)
        print(f"median with {args.silent} silent / baseline: {ratio:.2f}x")
    print(f"(the silent phase ended {loaded_time:.1f} s after the first silent connection)")
    if closed is not None:
        print(
            f"{closed}/{args.silent} silent connections closed by imagegate"
            f" {args.wait_closed:.0f} s after they were opened"
        )
    if loaded_failures or not loaded or base_failures:
        sys.exit(1)


if __name__ == "__main__":
    main()

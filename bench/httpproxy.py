#!/usr/bin/env python
"""The plain HTTP proxy benchmark: zillatw's http server -> http client next to nginx, both
proxying the SAME upstream, as ratios.

    .venv/bin/python bench/httpproxy.py [--seconds N] [--rounds N] [--warmup N] [--size BYTES ...]

Against one upstream (an asyncio HTTP/1.1 server in its own process that answers each POST
with its body, keep-alive; uvloop when installed):
  direct    load generator -> upstream                 (context: the ceiling)
  nginx     load generator -> nginx -> upstream        (Debian's nginx, worker_processes 1,
                                                        keepalive to the upstream)
  zillatw   load generator -> zillatw -> upstream      (tcp -> http server -> http client -> tcp)
  twisted floor  load generator -> bench/httpfloor.py -> upstream  (at 1 KiB: the least an
                                                        HTTP/1.1 proxy on Twisted does, keep-alive
                                                        and a pool, no checks; not a proxy to use)
  bare python  load generator -> bench/relay.py -> upstream   (a byte relay: no HTTP at all, one
                                                        upstream connection per client; the
                                                        floor of any CPython proxy)
at 1 KiB and 1 MiB request bodies (echoed back), keep-alive on both legs, with 50 connections
over 2 load processes (asyncio + uvloop when installed), each with 1 request in flight (send,
read the whole response, send again). After a warm-up the requests completed in a fixed
window are counted: req/s, MB/s (body bytes each way, 1 MB = 10^6 bytes), p50/p99 latency,
the proxy's CPU. Goals (issue 15): zillatw/nginx >= 0.5x at 1 KiB and >= 1.0x at 1 MiB.
The load generator is Python too: at 1 KiB its own limit may be what `direct` shows.
bench/suite.py runs this as its `http-proxy` scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import load  # noqa: E402 - bench/load.py: the window, tally, CPU and percentile machinery
from proxy import Procs, free_port, install_nginx, start_zillatw, wait_listening  # noqa: E402

KIB, MIB = 1024, 1024 * 1024
SIZES = (KIB, MIB)
GOALS = {KIB: 0.5, MIB: 1.0}
SERVERS = ("zillatw", "nginx", "twisted floor", "bare python", "direct")
FLOOR_SIZES = (KIB,)  # bench/httpfloor.py takes each message in one read: small bodies only

ZILLATW_CONF = """\
name: bench-httpproxy
bindings:
  north_tcp_server:
    type: tcp
    kind: server
    options:
      host: 127.0.0.1
      port: ${{env.ZILLATW_BENCH_PORT}}
    exit: north_http_server
  north_http_server:
    type: http
    kind: server
    exit: south_http_client
  south_http_client:
    type: http
    kind: client
    options:
      max-connections: 64
    exit: south_tcp_client
  south_tcp_client:
    type: tcp
    kind: client
    options:
      host: 127.0.0.1
      port: ${{env.ZILLATW_BENCH_UPSTREAM_PORT}}
"""

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        keepalive_requests 100000000;  # nginx closes a connection after 1000 requests by default
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;   # stream both ways, as zillatw does (no temp files)
            proxy_buffering off;
        }}
    }}
}}
"""


def _run_loop(main: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# ---------------------------------------------------------------- the upstream (own process)

class _EchoUpstream(asyncio.Protocol):
    """Each request's body back, 200, Content-Length; keep-alive. Bodies are held at most one
    at a time (the load sends one request per connection at a time)."""

    def connection_made(self, transport: Any) -> None:
        self.transport, self.buffer, self.need = transport, bytearray(), -1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.need < 0:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buffer[:end]).lower()
                at = head.find(b"content-length:")
                self.need = int(head[at + 15:head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None]) \
                    if at >= 0 else 0
                del self.buffer[:end + 4]
            if len(self.buffer) < self.need:
                return
            body = bytes(self.buffer[:self.need])
            del self.buffer[:self.need]
            self.need = -1
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                                 b"content-length: %d\r\n\r\n" % len(body) + body)


def run_upstream(port: int) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_EchoUpstream, "127.0.0.1", port, backlog=1024)
        await server.serve_forever()
    _run_loop(main())


# ---------------------------------------------------------------- the load (own processes)

def http_worker(port: int, conns: int, size: int, warmup: float, seconds: float, barrier: Any, results: Any) -> None:
    """`conns` keep-alive connections, each POSTing `size` random bytes and reading the echo,
    one request at a time; reports its result tuple on `results` (load._report's)."""
    payload = os.urandom(size)
    request = (f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\ncontent-type: application/octet-stream\r\n"
               f"content-length: {size}\r\n\r\n").encode() + payload
    tally = load._Tally()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while tally.phase != load.Phase.DONE:
                started = time.perf_counter()
                writer.write(request)
                head = (await reader.readuntil(b"\r\n\r\n")).lower()
                at = head.find(b"content-length:")
                length = int(head[at + 15:head.find(b"\r\n", at)]) if at >= 0 else -1
                body = await reader.readexactly(length) if length >= 0 else b""
                if not head.startswith(b"http/1.1 200") or len(body) != size:
                    tally.errors += 1
                tally.completed(time.perf_counter() - started)
        except (ConnectionError, asyncio.IncompleteReadError):
            tally.closed += 1

    async def main() -> tuple[int, float]:
        streams = []
        for _ in range(conns):
            streams.append(await load._connect_retrying(
                lambda: asyncio.open_connection("127.0.0.1", port, limit=4 * MIB), OSError))
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        tasks = [asyncio.ensure_future(one(r, w)) for r, w in streams]
        count, elapsed = await load._warm_up_and_measure(tally, warmup, seconds)
        for task in tasks:
            task.cancel()
        for _, writer in streams:
            writer.close()
        await asyncio.sleep(0.1)
        return count, elapsed

    load._report(results, barrier, tally, lambda: _run_loop(main()))


def measure(port: int, size: int, warmup: float, seconds: float, watch: dict[str, int]) -> dict:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(load.PROCESSES + 1), ctx.Queue()
    share = [load.CONNECTIONS // load.PROCESSES + (i < load.CONNECTIONS % load.PROCESSES)
             for i in range(load.PROCESSES)]
    workers = [ctx.Process(target=http_worker, daemon=True, args=(port, n, size, warmup, seconds, barrier, results))
               for n in share]
    got, cpu, _ = load.run_window(workers, barrier, results,
                                  lambda: {name: load.family(pid) for name, pid in watch.items()},
                                  warmup, seconds, f"http load against port {port}")
    problems = [g[4] for g in got if g[4]]
    if problems:
        raise RuntimeError("; ".join(problems))
    rate = sum(count / elapsed for count, elapsed, *_ in got)
    histogram = [sum(column) for column in zip(*(g[5] for g in got), strict=True)]
    return {"msgs": rate, "mbs": rate * size / 1e6, "cpu": cpu, "errors": sum(g[2] for g in got),
            "closed": sum(g[3] for g in got), "latency": histogram,
            "p50": load.percentile(histogram, 0.5), "p99": load.percentile(histogram, 0.99)}


# ---------------------------------------------------------------- servers, rounds, report

def start_nginx(procs: Procs, tmp: Path, upstream: int) -> tuple[int, Any]:
    nginx = install_nginx()
    port = free_port()
    prefix = tmp / f"nginx-http-{port}"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, upstream=upstream))
    proc = procs.start("nginx http proxy", [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                       prefix / "nginx.out")
    wait_listening(port, proc)
    return port, proc


def run(tmp: Path, seconds: float, rounds: int, warmup: float, sizes: tuple[int, ...] = SIZES) -> dict:
    """Start the upstream, nginx and zillatw, measure them round after round (interleaved)
    -> {(server, size): the median round, with every round's rates under "rounds"}."""
    procs = Procs()
    runs: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    try:
        up_port = free_port()
        upstream = procs.start("http upstream", [sys.executable, __file__, "--upstream", str(up_port)],
                               tmp / "http-upstream.log")
        wait_listening(up_port, upstream)
        config = tmp / "httpproxy.yaml"
        config.write_text(ZILLATW_CONF)
        ports = {"direct": up_port}
        ports["nginx"], nginx = start_nginx(procs, tmp, up_port)
        ports["zillatw"], zillatw = start_zillatw(procs, tmp, "zillatw http proxy", config, up_port)
        ports["bare python"] = free_port()  # bench/relay.py: bytes both ways, the floor of any CPython proxy
        relay = procs.start("bare python relay", [sys.executable, str(HERE / "relay.py"), str(ports["bare python"]),
                                                  str(up_port)], tmp / "relay.log")
        wait_listening(ports["bare python"], relay)
        ports["twisted floor"] = free_port()  # bench/httpfloor.py: the least an HTTP proxy on Twisted does
        floor = procs.start("twisted floor", [sys.executable, str(HERE / "httpfloor.py"), str(ports["twisted floor"]),
                                              str(up_port)], tmp / "floor.log",
                            dict(os.environ, PYTHONPATH=str(HERE.parent)))
        wait_listening(ports["twisted floor"], floor)
        watch = {"direct": {"upstream": upstream.pid}, "nginx": {"proxy": nginx.pid, "upstream": upstream.pid},
                 "twisted floor": {"proxy": floor.pid, "upstream": upstream.pid},
                 "zillatw": {"proxy": zillatw.pid, "upstream": upstream.pid},
                 "bare python": {"proxy": relay.pid, "upstream": upstream.pid}}
        for rnd in range(rounds):
            for size in sizes:
                for name in SERVERS:
                    if name == "twisted floor" and size not in FLOOR_SIZES:
                        continue
                    print(f"  round {rnd + 1}/{rounds} http-proxy {name:>8} {human(size):>7} ...", end="",
                          flush=True, file=sys.stderr)
                    r = measure(ports[name], size, warmup, seconds, watch[name])
                    runs[name, size].append(r)
                    print(f" {r['msgs']:9.0f} req/s {r['mbs']:8.2f} MB/s  p99 {r['p99']:7.0f} µs", file=sys.stderr)
    finally:
        procs.stop()
    results = {}
    for key, rs in runs.items():
        rates = sorted(r["msgs"] for r in rs)
        histogram = [sum(column) for column in zip(*(r["latency"] for r in rs), strict=True)]
        results[key] = {"msgs": statistics.median(rates), "mbs": statistics.median(rates) * key[1] / 1e6,
                        "min": rates[0], "max": rates[-1], "rounds": [r["msgs"] for r in rs],
                        "p50": load.percentile(histogram, 0.5), "p99": load.percentile(histogram, 0.99),
                        "cpu": {k: statistics.median(r["cpu"].get(k, 0) for r in rs) for k in rs[0]["cpu"]},
                        "errors": sum(r["errors"] for r in rs), "closed": sum(r["closed"] for r in rs)}
    return results


def human(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB" if size >= KIB else f"{size} B"


def report(results: dict, seconds: float, rounds: int, warmup: float) -> None:
    sizes = sorted({size for _, size in results})
    print(f"http-proxy: POST bodies echoed by the upstream, keep-alive both legs, {load.CONNECTIONS} connections over "
          f"{load.PROCESSES} load processes, 1 request in flight each, {seconds:g} s window after {warmup:g} s "
          f"warm-up, median of {rounds} interleaved rounds; p50/p99 over all rounds; CPU in % of one core")
    print(f"{'server':<14}{'size':>8}{'req/s':>10}{'MB/s':>9}{'min-max req/s':>17}{'p50 µs':>9}{'p99 µs':>9}"
          f"{'proxy CPU':>11}{'vs nginx':>10}{'p99 z/nginx':>13}")
    for size in sizes:
        nginx = results.get(("nginx", size))
        for name in SERVERS:
            r = results.get((name, size))
            if r is None:
                continue
            ratio = p99 = ""
            if nginx is not None and name != "nginx" and name != "direct" and nginx["msgs"] > 0:
                ratio, p99 = f"{r['msgs'] / nginx['msgs']:.2f}x", f"{r['p99'] / nginx['p99']:.2f}x"
            note = f"  ({r['errors']} bad, {r['closed']} closed)" if r["errors"] or r["closed"] else ""
            cpu = f"{r['cpu'].get('proxy', 0):.0f}%" if "proxy" in r["cpu"] else "-"
            print(f"{name:<14}{human(size):>8}{r['msgs']:>10.0f}{r['mbs']:>9.2f}{r['min']:>9.0f}-{r['max']:<7.0f}"
                  f"{r['p50']:>9.0f}{r['p99']:>9.0f}{cpu:>11}{ratio:>10}{p99:>13}{note}")
    for size in sizes:
        z, n = results.get(("zillatw", size)), results.get(("nginx", size))
        if z and n and n["msgs"] > 0 and size in GOALS:
            ratio = z["msgs"] / n["msgs"]
            per_round = ", ".join(f"{a / b:.2f}x" if b else "-" for a, b in zip(z["rounds"], n["rounds"], strict=True))
            print(f"goal at {human(size)}: zillatw/nginx req/s >= {GOALS[size]:.1f}x: {ratio:.2f}x -> "
                  f"{'met' if ratio >= GOALS[size] else 'NOT met'}  (round by round: {per_round})")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="measuring window per measurement (default 4)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, interleaved; the median is reported (default 3)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up before each window (default 1)")
    ap.add_argument("--size", type=int, action="append", metavar="BYTES",
                    help="request body size (repeatable; default 1 KiB and 1 MiB)")
    ap.add_argument("--upstream", type=int, help=argparse.SUPPRESS)  # internal: be the upstream
    args = ap.parse_args()
    if args.upstream:
        run_upstream(args.upstream)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="zillatw-bench-http-") as tmp:
        results = run(Path(tmp), args.seconds, args.rounds, args.warmup, tuple(args.size or SIZES))
    print()
    print(f"zillatw http proxy benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}; {os.cpu_count()} cores shared with "
          f"other work; load average before {'/'.join(f'{x:.2f}' for x in load_before)}, after "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    report(results, args.seconds, args.rounds, args.warmup)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)

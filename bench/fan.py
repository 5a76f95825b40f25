#!/usr/bin/env python
"""The fan benchmark: fan delivery rate to 100 members, in-process next to Redis-backed.

    .venv/bin/python bench/fan.py [--seconds N] [--rounds N] [--warmup N] [--size BYTES] [--publishers N] [--window N]

Scenarios, each with 100 WebSocket members (picows + uvloop, spread over 2 load processes):
  in-process        one gateway, bench/fan.yaml (tcp -> http -> ws -> fan -> echo)
  redis, 1 gateway  one gateway, bench/fan.redis.yaml: the same group published to Redis
  redis, 2 gateways two gateways (twistd processes) on one Redis, 50 members each
Some members publish (4 by default, spread over the gateways), each keeping `window`
messages in flight: a publisher sends again once one of its messages has reached an
observer member on the *other* gateway (the same one with one gateway) in *every* load
process, so the slowest path paces the load and no member falls behind far enough to be
evicted. Every member
counts what it receives in the window and checks each publisher's sequence (a gap or a
repeat is counted as an error). Delivery rate = messages received per second summed over
all 100 members; publish rate = that / 100.

Processes started here (twistd, redis-server from scripts/install-redis.sh, the load
generators) are ended when it ends. Reuses bench/proxy.py's process handling.
"""

from __future__ import annotations

import argparse
import collections
import functools
import multiprocessing
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/proxy.py's process handling and CPU accounting
from proxy import (
    HERE,
    ROOT,
    Procs,
    family,
    free_port,
    human,
    run_window,
    start_zillatw,
    wait_listening,
    window_arguments,
)

MEMBERS = 100
PROCESSES = 2
HEAD = struct.Struct("!HI")  # publisher id, sequence number


# ---------------------------------------------------------------- load generator (worker processes)

# The nested listener class and coroutines run in the child process (picows is imported
# there only) and share its counters; mccabe adds their small bodies up into this one.
def fan_worker(members: list[tuple[str, str, int]], index: int, acked, size: int,  # noqa: C901
               window: int, warmup: float, seconds: float, barrier, results) -> None:
    """members: (url, role, publisher) with role "pub" (publishes), "obs" (paces that
    publisher) or "rcv" (only receives). acked[worker * publishers + p]: the last sequence
    number of publisher p that worker's observer got (shared memory); the worker holding
    the publishers sends while every worker's observer is less than `window` behind."""
    import asyncio
    import logging

    import uvloop
    from picows import WSCloseCode, WSListener, WSMsgType, ws_connect
    logging.getLogger("picows").setLevel(logging.CRITICAL)

    padding = os.urandom(max(0, size - HEAD.size))
    state = {"phase": 0, "count": 0, "errors": 0, "closed": 0}
    publishers: dict[int, "Member"] = {}
    sent: dict[int, int] = collections.defaultdict(int)
    count = len(acked) // PROCESSES  # publishers

    def pump() -> None:
        """Publish what the slowest worker's observers allow."""
        if state["phase"] >= 2:
            return
        for p, pub in publishers.items():
            low = min(acked[w * count + p] for w in range(PROCESSES))
            while sent[p] - low - 1 < window:
                pub.send_next()

    class Member(WSListener):
        def __init__(self, role: str, publisher: int):
            self.role, self.publisher = role, publisher
            self.last: dict[int, int] = {}
            self.lost = False

        def on_ws_connected(self, transport):
            self.transport = transport

        def send_next(self):
            seq = sent[self.publisher]
            sent[self.publisher] = seq + 1
            self.transport.send(WSMsgType.BINARY, HEAD.pack(self.publisher, seq) + padding)

        def on_ws_frame(self, transport, frame):
            if frame.msg_type == WSMsgType.CLOSE:
                if state["phase"] < 2:
                    self.lost = True
                return
            if frame.msg_type != WSMsgType.BINARY:
                return
            publisher, seq = HEAD.unpack_from(frame.get_payload_as_bytes())
            if self.last.get(publisher, -1) + 1 != seq:
                state["errors"] += 1
            self.last[publisher] = seq
            if state["phase"] == 1:
                state["count"] += 1
            if self.role == "obs" and publisher == self.publisher:
                acked[index * count + publisher] = seq
                if publishers:
                    pump()

        def on_ws_disconnected(self, transport):
            if state["phase"] < 2:
                self.lost = True

    async def main():
        clients = []
        for url, role, publisher in members:
            for attempt in range(5):
                try:
                    _, client = await ws_connect(functools.partial(Member, role, publisher), url)
                    break
                except Exception:
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.2)
            clients.append(client)
            if role == "pub":
                publishers[publisher] = client
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        await asyncio.sleep(0.2)  # every worker's members have joined before anyone publishes
        if publishers:
            async def poll():  # other workers' observers move on without telling us
                while state["phase"] < 2:
                    pump()
                    await asyncio.sleep(0.001)
            poller = asyncio.ensure_future(poll())
        await asyncio.sleep(warmup)
        state["phase"] = 1
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        state["phase"] = 2
        elapsed = time.perf_counter() - t0
        if publishers:
            await poller
        count = state["count"]
        state["closed"] = sum(client.lost for client in clients)
        await asyncio.sleep(0.3)
        for client in clients:
            client.transport.send_close(WSCloseCode.OK)  # picows defaults to 0, not a valid code
        await asyncio.sleep(0.1)
        for client in clients:
            client.transport.disconnect()
        return count, elapsed

    try:
        count, elapsed = uvloop.run(main())
        results.put((count, elapsed, state["errors"], state["closed"], None))
    except BaseException as exc:
        barrier.abort()
        results.put((0, 1.0, 0, 0, f"{type(exc).__name__}: {exc}"))


def plan(urls: list[str], publishers: int) -> list[list[tuple[str, str, int]]]:
    """MEMBERS members over the gateways (round robin) and PROCESSES workers: the first
    worker holds the publishers; every worker has one observer per publisher, on the next
    gateway (the same one if there is one); receivers fill up to MEMBERS//PROCESSES each."""
    g = len(urls)
    workers = [[(urls[p % g], "pub", p) for p in range(publishers)]] + [[] for _ in range(PROCESSES - 1)]
    for members in workers:
        members += [(urls[(p + 1) % g], "obs", p) for p in range(publishers)]
    left = MEMBERS - sum(map(len, workers))
    for w, members in enumerate(workers):
        share = left // (PROCESSES - w)
        members += [(urls[i % g], "rcv", -1) for i in range(share)]
        left -= share
    return workers


def measure(urls: list[str], size: int, publishers: int, window: int, warmup: float, seconds: float,
            watch: dict[str, list[int]]) -> dict:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(PROCESSES + 1), ctx.Queue()
    acked = ctx.RawArray("q", [-1] * (PROCESSES * publishers))
    workers = [ctx.Process(target=fan_worker, daemon=True,
                           args=(members, index, acked, size, window, warmup, seconds, barrier, results))
               for index, members in enumerate(plan(urls, publishers))]
    got, cpu, _ = run_window(
        workers, barrier, results,
        lambda: {**{name: [p for pid in pids for p in family(pid)] for name, pids in watch.items()},
                 "load": [w.pid for w in workers if w.pid is not None]},  # all started by now
        0.2 + warmup, seconds, "fan load generator")
    problems = [g[4] for g in got if g[4]]
    if problems:
        raise RuntimeError("; ".join(problems))
    rate = sum(count / elapsed for count, elapsed, *_ in got)
    return {"rate": rate, "cpu": cpu, "errors": sum(g[2] for g in got), "closed": sum(g[3] for g in got)}


# ---------------------------------------------------------------- main

def start_redis(procs: Procs, tmp: Path) -> tuple[int, subprocess.Popen]:
    binary = subprocess.run(["sh", str(ROOT / "scripts" / "install-redis.sh")], check=True, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL).stdout.strip().splitlines()[-1]
    port = free_port()
    proc = procs.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--daemonize", "no"], tmp / "redis.log")
    wait_listening(port, proc)
    return port, proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    window_arguments(ap)
    ap.add_argument("--size", type=int, default=64, help="message size in bytes (default 64)")
    ap.add_argument("--publishers", type=int, default=4, help="members that publish (default 4)")
    ap.add_argument("--window", type=int, default=16, help="messages in flight per publisher (default 16)")
    args = ap.parse_args()

    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_before = os.getloadavg()[0]
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="zillatw-bench-fan-"))
    runs: dict[str, list[dict]] = collections.defaultdict(list)
    try:
        redis_port, redis = start_redis(procs, tmp)
        os.environ["ZILLATW_BENCH_REDIS_PORT"] = str(redis_port)  # start_zillatw passes os.environ on
        port, inproc = start_zillatw(procs, tmp, "in-process", HERE / "fan.yaml", None)
        os.environ["ZILLATW_BENCH_CHANNEL"] = "bench-fan-1"  # one channel per scenario
        port1, redis1 = start_zillatw(procs, tmp, "redis 1", HERE / "fan.redis.yaml", None)
        os.environ["ZILLATW_BENCH_CHANNEL"] = "bench-fan-2"
        port2a, redis2a = start_zillatw(procs, tmp, "redis 2a", HERE / "fan.redis.yaml", None)
        port2b, redis2b = start_zillatw(procs, tmp, "redis 2b", HERE / "fan.redis.yaml", None)
        scenarios = {
            "in-process": ([port], {"gateways": [inproc.pid]}),
            "redis, 1 gateway": ([port1], {"gateways": [redis1.pid], "redis": [redis.pid]}),
            "redis, 2 gateways": ([port2a, port2b], {"gateways": [redis2a.pid, redis2b.pid], "redis": [redis.pid]}),
        }
        time.sleep(1)  # the Redis-backed gateways connect and subscribe
        for rnd in range(args.rounds):
            for name, (ports, watch) in scenarios.items():
                print(f"  round {rnd + 1}/{args.rounds} {name:>18} ...", end="", flush=True, file=sys.stderr)
                r = measure([f"ws://127.0.0.1:{p}/" for p in ports], args.size, args.publishers, args.window,
                            args.warmup, args.seconds, watch)
                runs[name].append(r)
                print(f" {r['rate']:10.0f} deliveries/s", file=sys.stderr)
    finally:
        procs.stop()

    print()
    print(f"zillatw fan benchmark: {MEMBERS} members over {PROCESSES} load processes, {args.publishers} publishers "
          f"with {args.window} messages in flight each, {human(args.size)} binary messages, {args.seconds:g} s window "
          f"after {args.warmup:g} s warm-up, median of {args.rounds} interleaved rounds; {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}; load average before {load_before:.2f}, "
          f"after {os.getloadavg()[0]:.2f}")
    print(f"{'scenario':<20}{'deliveries/s':>14}{'publishes/s':>13}{'vs in-process':>15}{'min-max':>18}"
          f"{'gateway CPU':>13}{'µs/delivery':>13}{'redis CPU':>11}{'load CPU':>10}{'gaps':>6}{'evicted':>9}")
    base = statistics.median(r["rate"] for r in runs["in-process"])
    for name, rs in runs.items():
        rates = sorted(r["rate"] for r in rs)
        rate = statistics.median(rates)
        gw = statistics.median(r["cpu"].get("gateways", 0) for r in rs)
        rd = statistics.median(r["cpu"]["redis"] for r in rs) if "redis" in rs[0]["cpu"] else None
        load = statistics.median(r["cpu"]["load"] for r in rs)
        gaps, closed = sum(r["errors"] for r in rs), sum(r["closed"] for r in rs)
        redis_cpu = f"{rd:.0f}%" if rd is not None else "-"
        print(f"{name:<20}{rate:>14.0f}{rate / MEMBERS:>13.0f}{rate / base:>14.2f}x{rates[0]:>9.0f}-{rates[-1]:<8.0f}"
              f"{gw:>12.0f}%{gw * 1e4 / rate:>13.2f}{redis_cpu:>11}{load:>9.0f}%{gaps:>6}{closed:>9}")
    print("(CPU: % of one core; gateway: all gateway processes together; µs/delivery: gateway CPU per message "
          "delivered to a member; load: the load generators; gaps: a publisher's sequence broken (a "
          "message missing, repeated or out of order) as seen by a member, summed over rounds; evicted: members "
          "closed mid-run (1013: fell 4 MiB behind))")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)

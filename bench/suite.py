#!/usr/bin/env python
"""The benchmark suite (issue 9): zillatw side by side with its peers, in one run, as ratios.

    .venv/bin/python bench/suite.py [--seconds N] [--rounds N] [--warmup N] [--only SCENARIO ...] [--plot FILE]

Servers, each started here in its own process on a free loopback port:
  zillatw echo   twistd -n zillaws -c bench/echo.yaml (tcp -> http -> ws -> echo, the full chain)
  autobahn       bare Autobahn/Twisted echo (a WebSocketServerProtocol whose onMessage sends the
                 message back; Twisted's default reactor, Autobahn's defaults)
  websockets     websockets' asyncio echo (websockets.asyncio.server.serve, asyncio's own loop)
  picows         picows + uvloop echo (bench/proxy.py's upstream; also the proxies' upstream)
  zillatw proxy  twistd -n zillaws -c bench/proxy.yaml -> picows
  nginx proxy    Debian's nginx, worker_processes 1, -> picows (bench/proxy.py's configuration)
Scenarios (--only picks some; all by default):
  echo   the echo servers at 64 B, 16 KiB and 1 MiB binary messages
  proxy  zillatw proxy and nginx at the same sizes, same upstream
         (both: bench/proxy.py's load generator, 50 connections over 2 picows + uvloop
         processes, 1 message in flight each; rounds interleaved, the median reported)
  fan    bench/fan.py's in-process measurement: 100 members of one zillatw fan (bench/fan.yaml),
         4 publishers with 16 messages in flight, 64 B
  idle   10,000 idle WebSocket connections (handshake done, nothing sent) to zillatw echo,
         autobahn, websockets and picows, each server fresh in its own process: RSS per connection
         = (VmRSS with the connections open - VmRSS before) / 10,000, from /proc/PID/status;
         the clients are raw asyncio sockets doing the handshake, over 4 processes
Goals (issue 9): zillatw echo >= 1.5x bare Autobahn at 64 B; >= 1.0x websockets at 64 B and
16 KiB; zillatw proxy >= 1.0x nginx at 16 KiB; idle connections <= 10 KiB RSS each.
--plot FILE draws throughput (MB/s) against message size for each server (needs matplotlib,
imported only then). Every process started here is ended when the suite ends.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import proxy  # noqa: E402 - bench/proxy.py: processes, nginx, zillatw, upstream, load generator
from proxy import Procs, free_port, wait_listening  # noqa: E402

SIZES = (64, 16 * 1024, 1024 * 1024)
ECHO = ("zillatw echo", "autobahn", "websockets", "picows")
PROXIES = ("zillatw proxy", "nginx proxy")
SCENARIOS = ("echo", "proxy", "fan", "idle")
IDLE_CONNECTIONS = 10_000
IDLE_PROCESSES = 4
IDLE_CONCURRENCY = 16  # handshakes in progress per client process (the servers' backlogs are 50-100)
IDLE_SERVERS = ("zillatw echo", "autobahn", "websockets", "picows")
GOAL_IDLE_KIB = 10.0
# (zillatw server, peer, size, goal ratio of msgs/s)
GOALS = [("zillatw echo", "autobahn", 64, 1.5),
         ("zillatw echo", "websockets", 64, 1.0),
         ("zillatw echo", "websockets", 16 * 1024, 1.0),
         ("zillatw proxy", "nginx proxy", 16 * 1024, 1.0)]


def human(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else proxy.human(size)


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by the processes started afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ---------------------------------------------------------------- peer servers (own processes)

def serve_autobahn(port: int) -> None:
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor

    class Echo(WebSocketServerProtocol):
        def onMessage(self, payload, isBinary):
            self.sendMessage(payload, isBinary)

    factory = WebSocketServerFactory(f"ws://127.0.0.1:{port}")
    factory.protocol = Echo
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    reactor.run()


def serve_websockets(port: int) -> None:
    import asyncio

    from websockets.asyncio.server import serve

    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async def main():
        async with serve(echo, "127.0.0.1", port, max_size=None) as server:  # else 1 MiB is the limit
            await server.serve_forever()

    asyncio.run(main())


def start_peer(procs: Procs, tmp: Path, name: str) -> tuple[int, proxy.BenchProcess]:
    port = free_port()
    argv = ([sys.executable, str(HERE / "proxy.py"), "--upstream", str(port)] if name == "picows"
            else [sys.executable, __file__, "--serve", name, str(port)])
    proc = procs.start(name, argv, tmp / f"{name}-{port}.log")
    wait_listening(port, proc)
    return port, proc


def start_server(procs: Procs, tmp: Path, name: str, upstream: int | None = None) -> tuple[int, proxy.BenchProcess]:
    if name == "zillatw echo":
        return proxy.start_zillatw(procs, tmp, f"zillatw-echo-{free_port()}", HERE / "echo.yaml", None)
    if name == "zillatw proxy":
        return proxy.start_zillatw(procs, tmp, "zillatw-proxy", HERE / "proxy.yaml", upstream)
    if name == "nginx proxy":
        if upstream is None:
            raise ValueError("nginx proxy: no upstream port")
        return proxy.start_nginx(procs, tmp, upstream, None)
    return start_peer(procs, tmp, name)


# ---------------------------------------------------------------- idle connections

HANDSHAKE = ("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


# The nested coroutines run in the child process and share its lists; mccabe adds their
# small bodies up into this one.
def idle_worker(port: int, n: int, opened, release, results) -> None:  # noqa: C901
    """Opens n WebSocket connections (raw asyncio streams: the handshake, then nothing but
    answering the server's keepalive pings, as zillatw and websockets drop a peer that does not),
    reports, holds them until `release` is set, reports how many are still open, then resets them
    (SO_LINGER 0: no TIME_WAIT)."""
    import asyncio
    import socket
    import struct
    raise_nofile()
    request = HANDSHAKE.format(port=port).encode()

    async def main():
        writers, errors = [], []
        gate = asyncio.Semaphore(IDLE_CONCURRENCY)
        lost = []

        async def keepalive(reader, writer):
            """Answers pings (a masked pong, mask 0); anything else from the server is skipped."""
            try:
                while True:
                    b0, b1 = await reader.readexactly(2)
                    length = b1 & 0x7F
                    if length >= 126:
                        length = int.from_bytes(await reader.readexactly(2 if length == 126 else 8), "big")
                    payload = await reader.readexactly(length)
                    if b0 & 0x0F == 0x9 and length < 126:
                        writer.write(bytes((0x8A, 0x80 | length)) + b"\0\0\0\0" + payload)
                    elif b0 & 0x0F == 0x8:
                        break
            except (OSError, asyncio.IncompleteReadError):
                pass
            lost.append(1)

        async def one():
            async with gate:
                for attempt in range(5):
                    try:
                        reader, writer = await asyncio.open_connection("127.0.0.1", port)
                        writer.write(request)
                        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                        if not head.startswith(b"HTTP/1.1 101"):
                            raise RuntimeError(head.split(b"\r\n")[0].decode(errors="replace"))
                        writers.append(writer)
                        tasks.append(asyncio.ensure_future(keepalive(reader, writer)))
                        return
                    except Exception as exc:
                        if attempt == 4:
                            errors.append(f"{type(exc).__name__}: {exc}")
                        await asyncio.sleep(0.2)

        tasks = []
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        results.put((len(writers), time.perf_counter() - t0, errors[:3]))
        opened.release()
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 600)
        results.put(len(writers) - len(lost))  # still open
        for task in tasks:
            task.cancel()
        for writer in writers:
            try:
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                           struct.pack("ii", 1, 0))
            except OSError:
                pass
            writer.transport.abort()
        await asyncio.sleep(0.1)

    asyncio.run(main())


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def open_idle(port: int, count: int, procs_n: int, hold) -> tuple[int, float, list[str], int]:
    """Opens `count` idle connections over procs_n processes; calls hold() while they are open."""
    ctx = multiprocessing.get_context("spawn")
    opened, release, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    share = [count // procs_n + (i < count % procs_n) for i in range(procs_n)]
    workers = [ctx.Process(target=idle_worker, daemon=True, args=(port, n, opened, release, results)) for n in share]
    for w in workers:
        w.start()
    try:
        got = []
        for _ in workers:
            got.append(results.get(timeout=300))
        for _ in workers:
            opened.acquire(timeout=10)
        hold()
        release.set()
        still = sum(results.get(timeout=30) for _ in workers)  # connections still open at the release
    finally:
        release.set()
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
                w.join()
    return sum(g[0] for g in got), max(g[1] for g in got), [e for g in got for e in g[2]], still


def measure_idle(tmp: Path, name: str) -> dict:
    procs = Procs()
    try:
        port, server = start_server(procs, tmp, name)
        pids = proxy.family(server.pid)
        open_idle(port, 200, 1, lambda: time.sleep(0.5))  # warm-up: first connections, lazy imports
        time.sleep(1.0)
        before = rss_kib(pids)
        sample = {}

        def hold():
            time.sleep(2.0)  # let the server settle (timers, buffers)
            sample["after"] = rss_kib(pids)
            sample["alive"] = server.poll() is None

        opened, seconds, errors, still = open_idle(port, IDLE_CONNECTIONS, IDLE_PROCESSES, hold)
    finally:
        procs.stop()
    after = sample.get("after", before)
    return {"opened": opened, "seconds": seconds, "errors": errors, "before": before, "after": after,
            "per_conn": (after - before) / max(1, opened), "alive": sample.get("alive", False), "still": still}


# ---------------------------------------------------------------- main

def median_result(rs: list[dict], size: int) -> dict:
    rates = sorted(r["msgs"] for r in rs)
    rate = statistics.median(rates)
    return {"msgs": rate, "mbs": rate * size / 1e6, "min": rates[0], "max": rates[-1],
            "cpu": {k: statistics.median(r["cpu"].get(k, 0) for r in rs) for k in rs[0]["cpu"]},
            "errors": sum(r["errors"] for r in rs), "closed": sum(r["closed"] for r in rs)}


def plot(path: str, results: dict, servers: list[str], sizes: list[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in servers:
        xs = [s for s in sizes if (name, s) in results]
        if xs:
            ax.plot(xs, [results[name, s]["mbs"] for s in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [human(s) for s in sizes])
    ax.set_xlabel("message size")
    ax.set_ylabel("MB/s each way (median)")
    ax.set_title(f"echo/proxy throughput, 50 connections x 1 in flight ({time.strftime('%Y-%m-%d %H:%M %Z')})",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def summarize_idle(idle_runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per server, the round with the median RSS per connection, with the spread over rounds."""
    idle = {}
    for name, rs in idle_runs.items():
        per = sorted(r["per_conn"] for r in rs)
        idle[name] = dict(min(rs, key=lambda r: abs(r["per_conn"] - statistics.median(per))),
                          per_conn=statistics.median(per), min=per[0], max=per[-1],
                          opened=min(r["opened"] for r in rs), alive=all(r["alive"] for r in rs),
                          errors=[e for r in rs for e in r["errors"]][:3])
    return idle


def print_tables(args: argparse.Namespace, servers: list[str], results: dict[tuple[str, int], dict],
                 fan_runs: list[dict], idle: dict[str, dict]) -> None:
    if results:
        print(f"echo/proxy: {proxy.CONNECTIONS} connections over {proxy.PROCESSES} load processes (picows + uvloop), "
              f"1 message in flight each, {args.seconds:g} s window after {args.warmup:g} s warm-up, median of "
              f"{args.rounds} interleaved rounds; msgs/s = round trips/s, MB/s = payload each way")
        print(f"{'server':<15}{'size':>8}{'msgs/s':>10}{'MB/s':>10}{'min-max msgs/s':>20}{'CPU':>6}{'µs/msg':>8}"
              f"{'  zillatw/this':>14}")
        for size in SIZES:
            for name in servers:
                r = results.get((name, size))
                if not r:
                    continue
                mine = "zillatw proxy" if name in PROXIES else "zillatw echo"
                ratio = (f"{results[mine, size]['msgs'] / r['msgs']:.2f}x"
                         if name != mine and (mine, size) in results else "")
                server_cpu = r["cpu"].get("server", 0)
                note = f"  ({r['errors']} bad echoes, {r['closed']} closed)" if r["errors"] or r["closed"] else ""
                print(f"{name:<15}{human(size):>8}{r['msgs']:>10.0f}{r['mbs']:>10.2f}"
                      f"{r['min']:>11.0f}-{r['max']:<8.0f}{server_cpu:>5.0f}%{server_cpu * 1e4 / r['msgs']:>8.1f}"
                      f"{ratio:>14}{note}")
            print()
        print("(CPU: the server process in % of one core (nginx: master + worker; the proxies' upstream not "
              "included); µs/msg: that CPU per round trip; zillatw/this: zillatw echo's (proxies: zillatw proxy's) "
              "msgs/s / this server's)")
    if fan_runs:
        rates = sorted(r["rate"] for r in fan_runs)
        rate = statistics.median(rates)
        gw = statistics.median(r["cpu"].get("gateway", 0) for r in fan_runs)
        gaps = sum(r["errors"] for r in fan_runs)
        evicted = sum(r["closed"] for r in fan_runs)
        print(f"fan (bench/fan.py's in-process measurement, 100 members, 4 publishers x 16 in flight, 64 B): "
              f"{rate:.0f} deliveries/s ({rates[0]:.0f}-{rates[-1]:.0f}), {rate / 100:.0f} publishes/s, "
              f"gateway CPU {gw:.0f}%, {gw * 1e4 / rate:.2f} µs/delivery, {gaps} gaps, {evicted} evicted "
              "(no peer: no goal)")
        print()
    if idle:
        print(f"idle: {IDLE_CONNECTIONS} WebSocket connections (handshake, then nothing) from {IDLE_PROCESSES} "
              f"client processes to a fresh server process, median of {args.rounds} rounds; RSS = the server's VmRSS "
              "before (after 200 warm-up connections) and with all open (those two: the median round); "
              "zillatw/this: KiB/conn ratio (lower is better for zillatw)")
        print(f"{'server':<15}{'open':>7}{'open in':>9}{'RSS before':>12}{'RSS open':>11}{'KiB/conn':>10}"
              f"{'min-max':>14}{'  zillatw/this':>14}")
        ours = idle.get("zillatw echo")
        for name, r in idle.items():
            ratio = (f"{ours['per_conn'] / r['per_conn']:.2f}x"
                     if ours and name != "zillatw echo" and r["per_conn"] > 0 else "")
            note = ("" if r["alive"] else "  (server died)") + (
                f"  ({r['opened'] - r['still']} closed by the server while held)" if r["still"] != r["opened"] else ""
            ) + (f"  errors: {'; '.join(r['errors'])}" if r["errors"] else "")
            print(f"{name:<15}{r['opened']:>7}{r['seconds']:>8.1f}s"
                  f"{r['before'] / 1024:>10.1f}Mi{r['after'] / 1024:>9.1f}Mi"
                  f"{r['per_conn']:>10.2f}{r['min']:>8.2f}-{r['max']:<5.2f}{ratio:>14}{note}")
        print()


def print_goals(results: dict[tuple[str, int], dict], runs: dict[tuple[str, int], list[dict]], idle: dict[str, dict],
                idle_runs: dict[str, list[dict]]) -> None:
    print("goals (issue 9):")
    for mine, peer, size, goal in GOALS:
        if (mine, size) not in results or (peer, size) not in results:
            continue
        a, b = results[mine, size], results[peer, size]
        ratio = a["msgs"] / b["msgs"]
        per_round = ", ".join(f"{x['msgs'] / y['msgs']:.2f}x"
                              for x, y in zip(runs[mine, size], runs[peer, size], strict=True))
        unit = "MB/s" if size >= 1024 else "msgs/s"
        va, vb = (f"{a['mbs']:.1f}", f"{b['mbs']:.1f}") if size >= 1024 else (f"{a['msgs']:.0f}", f"{b['msgs']:.0f}")
        print(f"  {mine} vs {peer} at {human(size)}: {va} vs {vb} {unit} = {ratio:.2f}x, goal >= {goal:.1f}x -> "
              f"{'met' if ratio >= goal else 'NOT met'}  (round by round: {per_round})")
    if "zillatw echo" in idle:
        per = idle["zillatw echo"]["per_conn"]
        per_round = ", ".join(f"{r['per_conn']:.2f}" for r in idle_runs["zillatw echo"])
        print(f"  zillatw echo, {IDLE_CONNECTIONS} idle connections: {per:.2f} KiB RSS each "
              f"(round by round: {per_round}), goal <= "
              f"{GOAL_IDLE_KIB:.0f} KiB -> {'met' if per <= GOAL_IDLE_KIB else 'NOT met'}"
              + ("" if idle["zillatw echo"]["opened"] == IDLE_CONNECTIONS else
                 f"  (only {idle['zillatw echo']['opened']} opened)"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="measuring window per scenario (default 4)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds over the echo/proxy/fan measurements, interleaved; the median is reported (default 3)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up before each window (default 1)")
    ap.add_argument("--only", action="append", choices=SCENARIOS, metavar="SCENARIO",
                    help=f"run only this scenario ({', '.join(SCENARIOS)}); repeatable")
    ap.add_argument("--plot", metavar="FILE", help="throughput against message size per server (matplotlib)")
    ap.add_argument("--serve", nargs=2, metavar=("SERVER", "PORT"), help=argparse.SUPPRESS)  # internal
    args = ap.parse_args()
    if args.serve:
        {"autobahn": serve_autobahn, "websockets": serve_websockets}[args.serve[0]](int(args.serve[1]))
        return 0
    only = args.only or list(SCENARIOS)
    if args.plot:
        import matplotlib  # noqa: F401 - fail now rather than after the run

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    nofile = raise_nofile()
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    tmp = Path(tempfile.mkdtemp(prefix="zillatw-bench-suite-"))
    servers = [s for s in ECHO if "echo" in only] + [s for s in PROXIES if "proxy" in only]
    runs: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    fan_runs: list[dict] = []
    idle_runs: dict[str, list[dict]] = collections.defaultdict(list)
    procs = Procs()
    try:
        ports, watch = {}, {}
        if servers or "fan" in only:
            up_port, upstream = start_server(procs, tmp, "picows")
            for name in servers:
                if name == "picows":
                    ports[name], proc = up_port, upstream
                else:
                    ports[name], proc = start_server(procs, tmp, name, up_port)
                watch[name] = {"server": proc.pid}
                if name in PROXIES:
                    watch[name]["upstream"] = upstream.pid
            if "fan" in only:
                import fan  # bench/fan.py
                fan_port, fan_proc = proxy.start_zillatw(procs, tmp, "zillatw-fan", HERE / "fan.yaml", None)
        for rnd in range(args.rounds if servers or "fan" in only else 0):
            for size in SIZES:
                for name in servers:
                    print(f"  round {rnd + 1}/{args.rounds} {name:>14} {human(size):>7} ...", end="", flush=True,
                          file=sys.stderr)
                    r = proxy.measure(f"ws://127.0.0.1:{ports[name]}/", size, args.warmup, args.seconds, watch[name])
                    runs[name, size].append(r)
                    print(f" {r['msgs']:9.0f} msgs/s {r['mbs']:9.2f} MB/s", file=sys.stderr)
            if "fan" in only:
                print(f"  round {rnd + 1}/{args.rounds}     zillatw fan    64 B ...", end="", flush=True,
                      file=sys.stderr)
                r = fan.measure([f"ws://127.0.0.1:{fan_port}/"], 64, 4, 16, args.warmup, args.seconds,
                                {"gateway": [fan_proc.pid]})
                fan_runs.append(r)
                print(f" {r['rate']:9.0f} deliveries/s", file=sys.stderr)
    finally:
        procs.stop()
    try:
        for rnd in range(args.rounds if "idle" in only else 0):
            for name in IDLE_SERVERS:
                print(f"  round {rnd + 1}/{args.rounds} idle {IDLE_CONNECTIONS} connections {name:>14} ...", end="",
                      flush=True, file=sys.stderr)
                idle_runs[name].append(r := measure_idle(tmp, name))
                print(f" {r['opened']} open, {r['per_conn']:.1f} KiB each", file=sys.stderr)
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)

    results = {key: median_result(rs, key[1]) for key, rs in runs.items()}
    idle = summarize_idle(idle_runs)
    load_after = os.getloadavg()
    print()
    print(f"zillatw benchmark suite (issue 9): started {started}, ended {time.strftime('%H:%M %Z')}; "
          f"{os.cpu_count()} cores shared with other work, load average (1/5/15 min) before "
          f"{'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in load_after)}; "
          f"RLIMIT_NOFILE {nofile}")
    print_tables(args, servers, results, fan_runs, idle)
    print_goals(results, runs, idle, idle_runs)
    if args.plot and results:
        plot(args.plot, results, servers, list(SIZES))
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything started has been stopped by main's finally blocks
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)

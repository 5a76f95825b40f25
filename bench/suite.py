#!/usr/bin/env python
"""The benchmark suite: zillatw side by side with its peers, in one run, as ratios.

    .venv/bin/python bench/suite.py [--seconds N] [--rounds N] [--warmup N] [--only SCENARIO ...]
                                    [--plot FILE] [--idle-connections N] [--idle-server NAME ...]
                                    [--idle-workers N]

Every server runs in its own process on a free loopback port, started here and ended when the
suite ends. Scenarios (--only picks some; all by default), each one's first server being
zillatw's and the others its peers in that scenario (bench/README.md has the details):
  echo       zillatw echo (bench/echo.yaml), bare Autobahn, websockets, picows + uvloop
  proxy      zillatw proxy (bench/proxy.yaml), nginx with its defaults and nginx with 64 KiB
             proxy buffers, and a bare Python byte relay (bench/relay.py: the floor of any
             CPython proxy), all in front of the same picows upstream
  wss-echo   zillatw echo behind its tls server binding (bench/echo.tls.yaml), websockets with
             an ssl context
  wss-proxy  zillatw proxy terminating TLS (bench/proxy.tls.yaml), nginx terminating TLS
  deflate    zillatw echo and websockets, a websockets client offering permessage-deflate,
             1 KiB and 64 KiB JSON text messages
  workers    zillatw echo with twistd zillaws -w 2, and in one process
  admission  zillatw echo with every admission limit on (bench/echo.admission.yaml, limits that
             never trip), and without (docs/admission.md: the checks' cost)
  http-proxy bench/httpproxy.py: plain HTTP through zillatw's http server and client next to
             nginx, the same upstream, 1 KiB and 1 MiB bodies, keep-alive (req/s, p50/p99)
  fan        bench/fan.py's in-process fan measurement (100 members), for the record
  idle       --idle-connections (10,000) idle connections to each fresh server process: RSS
             per connection and the time to open them (bench/idle.py); --idle-workers N runs
             zillatw's with -w N where one process may not hold that many descriptors
The round-trip scenarios use bench/load.py's load generator (50 connections over 2 processes,
1 message in flight each; rounds interleaved, medians reported) and report msgs/s, MB/s, the
p50 and p99 round-trip time, the server's CPU and the ratios of zillatw's figures to each peer's.
--plot FILE draws throughput against message size, one panel per scenario (matplotlib,
imported only then).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import certs  # noqa: E402 - bench/certs.py: the wss scenarios' certificates
import idle  # noqa: E402 - bench/idle.py: the idle-connections scenario
import load  # noqa: E402 - bench/load.py: the load generator
import payloads  # noqa: E402 - bench/payloads.py: JSON for the deflate scenario
import proxy  # noqa: E402 - bench/proxy.py: processes, nginx, zillatw, the upstream
from proxy import BenchProcess, Procs, free_port, wait_listening  # noqa: E402

KIB, MIB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Scenario:
    name: str
    servers: tuple[str, ...]  # the first is zillatw's, the ratios are to it
    sizes: tuple[int, ...]
    tls: bool = False
    deflate: bool = False  # the websockets client offering permessage-deflate, JSON text


ROUND_TRIPS = (
    Scenario("echo", ("zillatw echo", "autobahn", "websockets", "picows"), (64, 16 * KIB, MIB)),
    Scenario("proxy", ("zillatw proxy", "nginx proxy", "nginx proxy 64k", "bare python proxy"), (64, 16 * KIB, MIB)),
    Scenario("wss-echo", ("zillatw wss echo", "websockets wss"), (64, 16 * KIB, MIB), tls=True),
    Scenario("wss-proxy", ("zillatw wss proxy", "nginx wss proxy"), (64, 16 * KIB, MIB), tls=True),
    Scenario("deflate", ("zillatw echo", "websockets"), (KIB, 64 * KIB), deflate=True),
    Scenario("workers", ("zillatw echo -w 2", "zillatw echo"), (64, 16 * KIB)),
    Scenario("admission", ("zillatw echo admission", "zillatw echo"), (64,)),
)
SCENARIOS = tuple(s.name for s in ROUND_TRIPS) + ("http-proxy", "fan", "idle")
UPSTREAM = "picows"  # every proxy's upstream
IDLE_SERVERS = ("zillatw echo", "autobahn", "websockets", "picows")
GOAL_IDLE_KIB = 6.0  # issue 13: at most 6 KiB of RSS per idle connection
# (scenario, zillatw server, peer, size, goal ratio of msgs/s)
GOALS = [("echo", "zillatw echo", "autobahn", 64, 1.5),
         ("echo", "zillatw echo", "websockets", 64, 1.0),
         ("echo", "zillatw echo", "websockets", 16 * KIB, 1.0),
         ("proxy", "zillatw proxy", "nginx proxy", 16 * KIB, 1.0),
         ("admission", "zillatw echo admission", "zillatw echo", 64, 0.9),
         # issue 13; with 2 websockets load processes the client is the bottleneck on a small box,
         # so the line also gives each server's CPU per round trip
         ("deflate", "zillatw echo", "websockets", KIB, 1.5),
         ("deflate", "zillatw echo", "websockets", 64 * KIB, 1.5)]


def human(size: int) -> str:
    return f"{size >> 20} MiB" if size >= MIB else proxy.human(size)


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


def serve_websockets(port: int, certificate: str | None = None, key: str | None = None) -> None:
    """websockets' asyncio echo; its default compression="deflate" accepts permessage-deflate when
    a client offers it (the picows load generator does not)."""
    import asyncio
    import ssl

    from websockets.asyncio.server import serve

    context = None
    if certificate:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, key)

    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async def main():
        async with serve(echo, "127.0.0.1", port, max_size=None, ssl=context) as server:  # else 1 MiB is the limit
            await server.serve_forever()

    asyncio.run(main())


class Servers:
    """Starts the servers by name (each at most once) and keeps their ports and processes."""

    def __init__(self, procs: Procs, tmp: Path) -> None:
        self.procs, self.tmp = procs, tmp
        self.ports: dict[str, int] = {}
        self.processes: dict[str, BenchProcess] = {}
        self._tls: certs.ServerFiles | None = None

    @property
    def tls(self) -> certs.ServerFiles:
        if self._tls is None:
            self._tls = certs.make(self.tmp / "tls")
        return self._tls

    def start(self, name: str) -> tuple[int, BenchProcess]:
        if name not in self.ports:
            self.ports[name], self.processes[name] = self._start(name)
        return self.ports[name], self.processes[name]

    def _start(self, name: str) -> tuple[int, BenchProcess]:
        procs, tmp = self.procs, self.tmp
        upstream = lambda: self.start(UPSTREAM)[0]  # noqa: E731 - started on first need
        zillatw = {"zillatw echo": ("echo.yaml", False, 1), "zillatw proxy": ("proxy.yaml", False, 1),
                   "zillatw wss echo": ("echo.tls.yaml", True, 1), "zillatw wss proxy": ("proxy.tls.yaml", True, 1),
                   "zillatw echo admission": ("echo.admission.yaml", False, 1)}
        if name.startswith("zillatw echo -w "):  # twistd zillaws -w N
            zillatw[name] = ("echo.yaml", False, int(name.rsplit(" ", 1)[1]))
        if name in zillatw:
            config, tls, workers = zillatw[name]
            return proxy.start_zillatw(procs, tmp, name, HERE / config, upstream() if "proxy" in name else None,
                                       self.tls.zillatw_env() if tls else None, workers)
        if name.startswith("nginx"):
            return proxy.start_nginx(procs, tmp, upstream(), "64k" if name.endswith("64k") else None,
                                     (self.tls.certificate, self.tls.key) if "wss" in name else None)
        port = free_port()
        if name == "bare python proxy":  # bench/relay.py: a byte relay, the floor of any CPython proxy
            argv = [sys.executable, str(HERE / "relay.py"), str(port), str(upstream())]
        elif name == "picows":
            argv = [sys.executable, str(HERE / "proxy.py"), "--upstream", str(port)]
        elif name == "websockets wss":
            argv = [sys.executable, __file__, "--serve", "websockets", str(port),
                    str(self.tls.certificate), str(self.tls.key)]
        else:
            argv = [sys.executable, __file__, "--serve", name, str(port)]
        proc = procs.start(name, argv, tmp / f"{name.replace(' ', '-')}-{port}.log")
        wait_listening(port, proc)
        return port, proc

    def watch(self, name: str) -> dict[str, int]:
        watch = {"server": self.processes[name].pid}
        if " -w " in name:  # each worker's share too: the kernel may give one worker most connections
            for index, pid in enumerate(proxy.family(watch["server"])[1:], 1):
                watch[f"worker {index}"] = pid
        if "proxy" in name:
            watch["upstream"] = self.processes[UPSTREAM].pid
        return watch


def run_idle(tmp: Path, name: str, count: int) -> dict:
    procs = Procs()

    def start() -> tuple[int, Callable[[], list[int]], Callable[[], bool]]:
        port, proc = Servers(procs, tmp).start(name)
        return port, lambda: proxy.family(proc.pid), lambda: proc.poll() is None

    return idle.measure_idle(start, procs.stop, count)


# ---------------------------------------------------------------- results

def combine(rs: list[dict], size: int) -> dict:
    """The median round's rate; latency percentiles over all rounds' round trips."""
    rates = sorted(r["msgs"] for r in rs)
    rate = statistics.median(rates)
    histogram = [sum(column) for column in zip(*(r["latency"] for r in rs), strict=True)]  # LATENCY_BUCKETS each
    return {"msgs": rate, "mbs": rate * size / 1e6, "min": rates[0], "max": rates[-1],
            "p50": load.percentile(histogram, 0.5), "p99": load.percentile(histogram, 0.99),
            "cpu": {k: statistics.median(r["cpu"].get(k, 0) for r in rs) for k in rs[0]["cpu"]},
            "errors": sum(r["errors"] for r in rs), "closed": sum(r["closed"] for r in rs)}


def print_round_trips(scenario: Scenario, results: dict, extensions: dict[str, str]) -> None:
    if scenario.deflate:
        ratios = ", ".join(f"{human(s)} deflates to "
                           f"{100 * payloads.deflate_ratio(payloads.json_payload(s)):.0f} %" for s in scenario.sizes)
        offer = "; ".join(f"{name} answers {extensions[name]!r}" for name in scenario.servers if name in extensions)
        print(f"{scenario.name}: the websockets client offers permessage-deflate (client_max_window_bits), sends "
              f"JSON text ({ratios} with zlib's default level); {offer}")
    else:
        print(f"{scenario.name}:")
    print(f"{'server':<19}{'size':>7}{'msgs/s':>9}{'MB/s':>9}{'min-max msgs/s':>17}{'p50 µs':>8}{'p99 µs':>8}"
          f"{'CPU':>6}{'µs/msg':>8}{'  zillatw/this':>14}{'  p99 z/this':>12}")
    mine_name = scenario.servers[0]
    for size in scenario.sizes:
        mine = results.get((scenario.name, mine_name, size))
        for name in scenario.servers:
            r = results.get((scenario.name, name, size))
            if not r:
                continue
            ratio = f"{mine['msgs'] / r['msgs']:.2f}x" if mine and name != mine_name else ""
            p99 = f"{mine['p99'] / r['p99']:.2f}x" if mine and name != mine_name else ""
            cpu = r["cpu"].get("server", 0)
            note = f"  ({r['errors']} bad echoes, {r['closed']} closed)" if r["errors"] or r["closed"] else ""
            workers = [f"{v:.0f}%" for k, v in sorted(r["cpu"].items()) if k.startswith("worker ") and "wait" not in k]
            note += f"  (workers' CPU: {' + '.join(workers)})" if workers else ""
            print(f"{name:<19}{human(size):>7}{r['msgs']:>9.0f}{r['mbs']:>9.2f}{r['min']:>9.0f}-{r['max']:<7.0f}"
                  f"{r['p50']:>8.0f}{r['p99']:>8.0f}{cpu:>5.0f}%{cpu * 1e4 / r['msgs']:>8.1f}{ratio:>14}{p99:>12}"
                  f"{note}")
    print()


def print_idle(idle_runs: dict[str, list[dict]], count: int, rounds: int) -> dict:
    summary = {}
    for name, rs in idle_runs.items():  # the round with the median RSS per connection
        per = sorted(r["per_conn"] for r in rs)
        summary[name] = dict(min(rs, key=lambda r: abs(r["per_conn"] - statistics.median(per))),
                             per_conn=statistics.median(per), min=per[0], max=per[-1],
                             opened=min(r["opened"] for r in rs), alive=all(r["alive"] for r in rs),
                             errors=[e for r in rs for e in r["errors"]][:3])
    print(f"idle: {count} WebSocket connections (handshake, then nothing) from {idle.client_processes(count)} client "
          f"processes (source addresses 127.0.0.2 on) to a fresh server process (-w N: a supervisor and N workers, RSS "
          f"summed), median of {rounds} rounds; RSS = the server's VmRSS before (after 200 warm-up connections) "
          "and with all open (those two: the median round); clients: the client processes' RSS together; "
          "zillatw/this: KiB/conn ratio (lower is better for zillatw)")
    print(f"{'server':<15}{'open':>8}{'open in':>9}{'RSS before':>12}{'RSS open':>11}{'KiB/conn':>10}"
          f"{'min-max':>14}{'clients':>10}{'  zillatw/this':>14}")
    mine_name = next((name for name in summary if name.startswith("zillatw")), None)
    mine = summary[mine_name] if mine_name else None
    for name, r in summary.items():
        ratio = f"{mine['per_conn'] / r['per_conn']:.2f}x" if mine and name != mine_name and r["per_conn"] > 0 else ""
        note = ("" if r["alive"] else "  (server died)") + (
            f"  ({r['opened'] - r['still']} closed by the server while held)" if r["still"] != r["opened"] else "") + (
            f"  errors: {'; '.join(r['errors'])}" if r["errors"] else "")
        print(f"{name:<15}{r['opened']:>8}{r['seconds']:>8.1f}s{r['before'] / 1024:>10.1f}Mi{r['after'] / 1024:>9.1f}Mi"
              f"{r['per_conn']:>10.2f}{r['min']:>8.2f}-{r['max']:<5.2f}{r['clients'] / 1024:>8.0f}Mi{ratio:>14}{note}")
    print()
    return summary


def print_goals(results: dict, runs: dict, idle_summary: dict, idle_runs: dict, count: int) -> None:
    lines = []
    for scenario, mine, peer, size, goal in GOALS:
        a, b = results.get((scenario, mine, size)), results.get((scenario, peer, size))
        if not (a and b):
            continue
        ratio = a["msgs"] / b["msgs"]
        per_round = ", ".join(f"{x['msgs'] / y['msgs']:.2f}x"
                              for x, y in zip(runs[scenario, mine, size], runs[scenario, peer, size], strict=True))
        unit = "MB/s" if size >= KIB else "msgs/s"
        va, vb = (f"{a['mbs']:.1f}", f"{b['mbs']:.1f}") if size >= KIB else (f"{a['msgs']:.0f}", f"{b['msgs']:.0f}")
        cpu_a, cpu_b = (r["cpu"].get("server", 0) * 1e4 / r["msgs"] for r in (a, b))
        lines.append(f"  {mine} vs {peer} at {human(size)}: {va} vs {vb} {unit} = {ratio:.2f}x, goal >= {goal:.1f}x -> "
                     f"{'met' if ratio >= goal else 'NOT met'}  (round by round: {per_round}; server CPU per round "
                     f"trip {cpu_a:.1f} vs {cpu_b:.1f} µs)")
    idle_mine = next((name for name in idle_summary if name.startswith("zillatw")), None)
    if idle_mine:
        r = idle_summary[idle_mine]
        per_round = ", ".join(f"{x['per_conn']:.2f}" for x in idle_runs[idle_mine])
        met = "met" if r["per_conn"] <= GOAL_IDLE_KIB else "NOT met"
        lines.append(f"  {idle_mine}, {count} idle connections: {r['per_conn']:.2f} KiB RSS each (round by round: "
                     f"{per_round}), goal <= {GOAL_IDLE_KIB:.0f} KiB -> {met}"
                     + ("" if r["opened"] == count else f"  (only {r['opened']} opened)"))
    if lines:
        print("goals:", *lines, sep="\n")


def plot(path: str, results: dict, scenarios: list[Scenario]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [s for s in scenarios if any((s.name, n, z) in results for n in s.servers for z in s.sizes)]
    columns = min(2, len(shown)) or 1
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4 * rows), squeeze=False)
    for ax, scenario in zip(axes.flat, shown, strict=False):  # the grid may have a spare panel
        for name in scenario.servers:
            xs = [z for z in scenario.sizes if (scenario.name, name, z) in results]
            if xs:
                ax.plot(xs, [results[scenario.name, name, z]["mbs"] for z in xs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(scenario.sizes, [human(z) for z in scenario.sizes])
        ax.set_xlabel("message size")
        ax.set_ylabel("MB/s each way (median)")
        ax.set_title(scenario.name, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    fig.suptitle(f"zillatw bench suite, 50 connections x 1 in flight ({time.strftime('%Y-%m-%d %H:%M %Z')})",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="measuring window per measurement (default 4)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds over the round-trip and fan measurements, interleaved; idle: repetitions; "
                         "the median is reported (default 3)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up before each window (default 1)")
    ap.add_argument("--only", action="append", choices=SCENARIOS, metavar="SCENARIO",
                    help=f"run only this scenario ({', '.join(SCENARIOS)}); repeatable")
    ap.add_argument("--plot", metavar="FILE", help="throughput against message size, a panel per scenario (matplotlib)")
    ap.add_argument("--idle-connections", type=int, default=10_000, metavar="N",
                    help="idle connections per server in the idle scenario (default 10000; 100000 takes minutes)")
    ap.add_argument("--idle-server", action="append", choices=IDLE_SERVERS, metavar="NAME",
                    help=f"idle scenario: only this server ({', '.join(IDLE_SERVERS)}); repeatable")
    ap.add_argument("--idle-workers", type=int, default=1, metavar="N",
                    help="idle scenario: zillatw echo with twistd zillaws -w N (default 1: one process); for "
                         "machines whose RLIMIT_NOFILE hard limit is below --idle-connections")
    ap.add_argument("--serve", nargs="+", metavar="ARG", help=argparse.SUPPRESS)  # internal: SERVER PORT [CERT KEY]
    return ap.parse_args()


def serve_peer(serve: list[str]) -> None:
    """--serve SERVER PORT [CERT KEY]: be one of the peer servers (this is its own process)."""
    server, port, *tls = serve
    {"autobahn": serve_autobahn, "websockets": serve_websockets}[server](int(port), *tls)


def raise_nofile_for_idle(args: argparse.Namespace, idle_servers: list[str], only: list[str]) -> int:
    """Before anything starts, so that every process inherits it. An idle server process holds a
    descriptor per connection (zillatw -w N: each worker its share); the idle clients make do
    with the same limit (idle.per_process). -> RLIMIT_NOFILE now."""
    if "idle" not in only:
        return idle.raise_nofile(0)
    per_server = [-(-args.idle_connections // args.idle_workers) if name.startswith("zillatw")
                  else args.idle_connections for name in idle_servers]
    return idle.raise_nofile(max(per_server) + idle.NOFILE_MARGIN)


@dataclass
class Measured:
    """Every round's results, by (scenario, server, size); the fan rounds; the idle rounds by
    server; the deflate scenario's servers' answers to the client's offer."""
    runs: dict[tuple[str, str, int], list[dict]] = field(default_factory=lambda: collections.defaultdict(list))
    fan: list[dict] = field(default_factory=list)
    idle: dict[str, list[dict]] = field(default_factory=lambda: collections.defaultdict(list))
    extensions: dict[str, str] = field(default_factory=dict)


def measure_scenario(args: argparse.Namespace, rnd: int, scenario: Scenario, servers: Servers,
                     measured: Measured) -> None:
    """One round of a round-trip scenario: every size, every server."""
    for size in scenario.sizes:
        payload = payloads.json_payload(size) if scenario.deflate else None
        for name in scenario.servers:
            print(f"  round {rnd + 1}/{args.rounds} {scenario.name:>9} {name:>17} {human(size):>7} ...",
                  end="", flush=True, file=sys.stderr)
            r = load.measure(f"{'wss' if scenario.tls else 'ws'}://127.0.0.1:{servers.ports[name]}/", size,
                             args.warmup, args.seconds, servers.watch(name), payload,
                             str(servers.tls.ca) if scenario.tls else None,
                             "websockets" if scenario.deflate else "picows")
            measured.runs[scenario.name, name, size].append(r)
            print(f" {r['msgs']:9.0f} msgs/s {r['mbs']:9.2f} MB/s  p99 {r['p99']:7.0f} µs", file=sys.stderr)


def run_round_trips(args: argparse.Namespace, scenarios: list[Scenario], with_fan: bool, tmp: Path,
                    measured: Measured) -> None:
    """Starts every scenario's servers (and the fan gateway), then measures them round after round."""
    procs = Procs()
    try:
        servers = Servers(procs, tmp)
        for scenario in scenarios:
            for name in scenario.servers:
                servers.start(name)
                if scenario.deflate:
                    measured.extensions[name] = load.negotiated_extensions(f"ws://127.0.0.1:{servers.ports[name]}/")
        if with_fan:
            import fan  # bench/fan.py
            fan_port, fan_proc = proxy.start_zillatw(procs, tmp, "zillatw-fan", HERE / "fan.yaml", None)
        for rnd in range(args.rounds if scenarios or with_fan else 0):
            for scenario in scenarios:
                measure_scenario(args, rnd, scenario, servers, measured)
            if with_fan:
                print(f"  round {rnd + 1}/{args.rounds}       fan       zillatw fan    64 B ...", end="", flush=True,
                      file=sys.stderr)
                r = fan.measure([f"ws://127.0.0.1:{fan_port}/"], 64, 4, 16, args.warmup, args.seconds,
                                {"gateway": [fan_proc.pid]})
                measured.fan.append(r)
                print(f" {r['rate']:9.0f} deliveries/s", file=sys.stderr)
    finally:
        procs.stop()


def run_idle_rounds(args: argparse.Namespace, idle_servers: list[str], tmp: Path, measured: Measured) -> None:
    for rnd in range(args.rounds):
        for name in idle_servers:
            print(f"  round {rnd + 1}/{args.rounds} idle {args.idle_connections} connections {name:>14} ...",
                  end="", flush=True, file=sys.stderr)
            measured.idle[name].append(r := run_idle(tmp, name, args.idle_connections))
            print(f" {r['opened']} open in {r['seconds']:.1f} s, {r['per_conn']:.2f} KiB each", file=sys.stderr)


def print_conditions(started: str, load_before: tuple[float, float, float], nofile: int) -> None:
    load_after = os.getloadavg()
    print()
    print(f"zillatw benchmark suite: started {started}, ended {time.strftime('%H:%M %Z')}; "
          f"{os.cpu_count()} cores shared with other work, load average (1/5/15 min) before "
          f"{'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in load_after)}; "
          f"RLIMIT_NOFILE {nofile}")


def print_round_trip_method(args: argparse.Namespace) -> None:
    print(f"round trips: {load.CONNECTIONS} connections over {load.PROCESSES} load processes (picows + uvloop; "
          f"deflate: websockets), 1 message in flight each, {args.seconds:g} s window after {args.warmup:g} s "
          f"warm-up, median of {args.rounds} interleaved rounds; msgs/s = round trips/s, MB/s = payload each way; "
          "p50/p99: round-trip time over all rounds; CPU: the server process(es) in % of one core (nginx: master "
          "+ worker; -w 2: supervisor + workers; not the proxies' upstream); µs/msg: that CPU per round trip; "
          "zillatw/this: the scenario's zillatw server's msgs/s / this one's; p99 z/this: its p99 / this one's")
    print()


def print_fan(fan_runs: list[dict]) -> None:
    rates = sorted(r["rate"] for r in fan_runs)
    rate = statistics.median(rates)
    gw = statistics.median(r["cpu"].get("gateway", 0) for r in fan_runs)
    print(f"fan (bench/fan.py's in-process measurement, 100 members, 4 publishers x 16 in flight, 64 B): "
          f"{rate:.0f} deliveries/s ({rates[0]:.0f}-{rates[-1]:.0f}), {rate / 100:.0f} publishes/s, "
          f"gateway CPU {gw:.0f}%, {gw * 1e4 / rate:.2f} µs/delivery, {sum(r['errors'] for r in fan_runs)} gaps, "
          f"{sum(r['closed'] for r in fan_runs)} evicted (no peer: no goal)")
    print()


def main() -> int:
    args = parse_args()
    if args.serve:
        serve_peer(args.serve)
        return 0
    only = args.only or list(SCENARIOS)
    scenarios = [s for s in ROUND_TRIPS if s.name in only]
    if args.plot:
        import matplotlib  # noqa: F401 - fail now rather than after the run

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    idle_servers = [f"zillatw echo -w {args.idle_workers}" if name == "zillatw echo" and args.idle_workers > 1 else name
                    for name in args.idle_server or IDLE_SERVERS]
    nofile = raise_nofile_for_idle(args, idle_servers, only)
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    tmp = Path(tempfile.mkdtemp(prefix="zillatw-bench-suite-"))
    measured = Measured()
    run_round_trips(args, scenarios, "fan" in only, tmp, measured)
    http_results = None
    try:
        if "http-proxy" in only:
            import httpproxy  # bench/httpproxy.py
            http_results = httpproxy.run(tmp, args.seconds, args.rounds, args.warmup)
        if "idle" in only:
            run_idle_rounds(args, idle_servers, tmp, measured)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # (the deflate scenario's JSON payloads are exactly the size too)
    results = {key: combine(rs, key[2]) for key, rs in measured.runs.items()}
    print_conditions(started, load_before, nofile)
    if results:
        print_round_trip_method(args)
        for scenario in scenarios:
            print_round_trips(scenario, results, measured.extensions)
    if http_results:
        httpproxy.report(http_results, args.seconds, args.rounds, args.warmup)
    if measured.fan:
        print_fan(measured.fan)
    idle_summary = print_idle(measured.idle, args.idle_connections, args.rounds) if measured.idle else {}
    print_goals(results, measured.runs, idle_summary, measured.idle, args.idle_connections)
    if args.plot and results:
        plot(args.plot, results, scenarios)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything started has been stopped by main's finally blocks
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)

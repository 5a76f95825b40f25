#!/usr/bin/env python
"""The proxy benchmark: zillatw's proxy throughput next to nginx's, as ratios.

    .venv/bin/python bench/proxy.py [--seconds N] [--rounds N] [--warmup N] [--profile] [--nginx-buffer SIZE]

One run measures, against the SAME upstream echo server (picows + uvloop, its own process):
  direct       load generator -> upstream                       (context: the ceiling)
  nginx        load generator -> nginx -> upstream              (Debian's nginx, worker_processes 1)
  zillatw      load generator -> zillatw proxy -> upstream      (bench/proxy.yaml)
  zillatw echo load generator -> zillatw echo                   (bench/echo.yaml; no upstream)
at 64 B and 16 KiB binary messages, with 50 connections spread over 2 load-generator
processes (picows + uvloop), each connection with 1 message in flight (send, wait for the
whole echo, send again). After a warm-up, round trips completed in a fixed window are
counted: msgs/s = round trips per second, MB/s = payload bytes per second each way
(1 MB = 10^6 bytes). Goals: zillatw/nginx >= 1.0x at 16 KiB (MB/s), >= 0.5x at 64 B (msgs/s).

Needs `pip install -e ".[bench]"`; gets nginx by running bench/install-nginx.sh.
--profile also records zillatw's proxy with py-spy in one more 64 B run (not counted) and
prints its hot spots (the flame graph goes to bench/profile-proxy-64B.svg).
--nginx-buffer 64k sets nginx's proxy_buffer_size/proxy_buffers (nginx relays an upgraded
connection through one proxy_buffer_size buffer, 4 KiB by default, which caps its 16 KiB figure).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
# bench/load.py: the load generator (re-exported: fan.py, validation.py and ab.py take it from here)
from load import CONNECTIONS, PROCESSES, cpu_seconds, family, measure, run_window  # noqa: E402,F401

SIZES = (64, 16 * 1024)
GOALS = {64: 0.5, 16 * 1024: 1.0}


# ---------------------------------------------------------------- processes

def _die_with_parent() -> None:
    """Child processes get SIGTERM when this script dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class BenchProcess(subprocess.Popen[bytes]):
    """A benchmark's child process with the name its errors are reported under and the log its
    output goes to (quoted when it fails)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.bench_name, self.bench_log = name, log
        with open(log, "wb") as out:  # the child holds its own copy of the descriptor
            super().__init__(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, preexec_fn=_die_with_parent)


class Procs:
    """Every subprocess started here; stop() ends them all (terminate, then kill)."""

    def __init__(self) -> None:
        self.procs: list[BenchProcess] = []

    def start(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> BenchProcess:
        proc = BenchProcess(name, argv, log, env)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: BenchProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.bench_name} exited ({proc.returncode}) before listening; "
                             f"its log:\n{proc.bench_log.read_text(errors='replace')[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{proc.bench_name} is not listening on {port} after {timeout:.0f} s")


# ---------------------------------------------------------------- upstream echo server (own process)

def run_upstream(port: int) -> None:
    import uvloop
    from picows import WSListener, WSMsgType, ws_create_server

    class Echo(WSListener):
        def on_ws_frame(self, transport, frame):
            if frame.msg_type == WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code(), frame.get_close_message())
                transport.disconnect()
            elif frame.msg_type == WSMsgType.PING:
                transport.send_pong(frame.get_payload_as_bytes())
            elif frame.msg_type != WSMsgType.PONG:
                # fragment by fragment, same opcode and fin: a proxy that relays fragments
                # gets its fragments back
                transport.send(frame.msg_type, frame.get_payload_as_memoryview(), frame.fin)

    async def main():
        server = await ws_create_server(lambda request: Echo(), "127.0.0.1", port,
                                        max_frame_size=64 * 1024 * 1024)
        await server.serve_forever()

    uvloop.run(main())


# ---------------------------------------------------------------- nginx, zillatw

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
    server {{
        listen 127.0.0.1:{port}{tls};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
            proxy_buffering off;{extra}
        }}
    }}
}}
"""


def install_nginx() -> str:
    out = subprocess.run(["sh", str(HERE / "install-nginx.sh")], check=True,
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def start_nginx(procs: Procs, tmp: Path, upstream: int, buffer: str | None,
                tls: tuple[Path, Path] | None = None) -> tuple[int, BenchProcess]:
    """nginx proxying to the upstream; `tls` = (certificate, key) PEM files: it terminates TLS."""
    nginx = install_nginx()
    port = free_port()
    prefix = tmp / f"nginx-{port}"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    # nginx relays an upgraded connection through buffers of proxy_buffer_size (one page,
    # 4 KiB, by default)
    extra = f"\n            proxy_buffer_size {buffer};\n            proxy_buffers 8 {buffer};" if buffer else ""
    listen = (f" ssl;\n        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};\n"
              "        ssl_protocols TLSv1.2 TLSv1.3") if tls else ""
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, upstream=upstream, extra=extra, tls=listen))
    proc = procs.start("nginx", [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                       prefix / "nginx.out")
    wait_listening(port, proc)
    return port, proc


def twistd() -> str:
    local = Path(sys.executable).with_name("twistd")
    return str(local) if local.exists() else (shutil.which("twistd") or "twistd")


def start_zillatw(procs: Procs, tmp: Path, name: str, config: Path, upstream: int | None,
                  extra_env: dict[str, str] | None = None, workers: int = 1) -> tuple[int, BenchProcess]:
    """twistd -n zillaws -c config (with -w workers if more than one), listening on a free port
    (ZILLATW_BENCH_PORT); extra_env: more variables the configuration reads."""
    port = free_port()
    env = dict(os.environ, ZILLATW_BENCH_PORT=str(port), **(extra_env or {}))
    # With an editable install (pip install -e), twistd finds the zillaws plugin only when the
    # repo root is on sys.path (twisted/plugins/zillaws.py is found by scanning sys.path).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if upstream is not None:
        env["ZILLATW_BENCH_UPSTREAM_PORT"] = str(upstream)
    ready = tmp / f"{name.replace(' ', '-')}-{port}.ready"  # -w N: written once every worker listens
    argv = [twistd(), "-n", "--pidfile=", "zillaws", "-c", str(config)]
    argv += ["-w", str(workers), "--ready-file", str(ready)] if workers > 1 else []
    proc = procs.start(name, argv, tmp / f"{name.replace(' ', '-')}-{port}.log", env=env)
    wait_listening(port, proc)
    deadline = time.monotonic() + 30
    while workers > 1 and not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name}: its {workers} workers are not ready after 30 s; its log:\n"
                             f"{proc.bench_log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    return port, proc


# ---------------------------------------------------------------- profiling

def start_profile(pid: int, seconds: float, out: Path, raw: Path) -> list[subprocess.Popen]:
    local = Path(sys.executable).with_name("py-spy")
    pyspy = str(local) if local.exists() else (shutil.which("py-spy") or "")
    if not pyspy:
        print("py-spy not found: pip install -e '.[bench]'", file=sys.stderr)
        return []
    common = ["--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250", "--nonblocking"]
    return [subprocess.Popen([pyspy, "record", "-o", str(out), *common], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent),
            subprocess.Popen([pyspy, "record", "-f", "raw", "-o", str(raw), *common],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)]


def hot_spots(raw: Path, top: int = 20) -> str:
    """Self and inclusive share of samples per function, from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack:
            continue
        n = int(samples)
        total += n
        # "func (file.py:line)" -> "func (file.py)": one entry per function, whatever the line
        frames = [re.sub(r":\d+\)$", ")", f.strip()) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "(no samples)"
    by_pkg: collections.Counter[str] = collections.Counter()
    for f, n in own.items():
        where = f[f.find("(") + 1:]
        pkg = next((p for p in ("zillatw", "autobahn", "twisted", "txaio", "zope") if where.startswith(p + "/")),
                   "other (stdlib, ...)")
        by_pkg[pkg] += n
    lines = [f"{total} samples. Self time by package: "
             + ", ".join(f"{p} {100 * n / total:.1f}%" for p, n in by_pkg.most_common())]
    lines.append(f"Self time (% of samples), top {top}:")
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append(f"Inclusive (% of samples with the function on the stack), top {top} below the reactor loop:")
    skip = ("twistd", "twisted/scripts/", "twisted/application/", "twisted/internet/base.py")
    inner = [(f, n) for f, n in incl.most_common() if not any(k in f for k in skip)]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inner[:top]]
    zil = [(f, n) for f, n in inner if "(zillatw/" in f]
    lines.append("zillatw's own functions, inclusive:")
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in zil[:top]]
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def cpu(result: dict, name: str) -> str:
    return f"{result['cpu'][name]:.0f}%" if name in result["cpu"] else "-"


def human(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


def window_arguments(ap: argparse.ArgumentParser, seconds: float = 5.0) -> None:
    """The measuring options the bench scripts share: --seconds, --rounds, --warmup."""
    ap.add_argument("--seconds", type=float, default=seconds,
                    help=f"measuring window per scenario (default {seconds:g})")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (default 3)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up before each window (default 1)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    window_arguments(ap)
    ap.add_argument("--profile", action="store_true",
                    help="after the rounds, py-spy zillatw's proxy in one more 64 B run")
    ap.add_argument("--nginx-buffer", metavar="SIZE",
                    help="set nginx's proxy_buffer_size (e.g. 64k); default: nginx's own (4k)")
    ap.add_argument("--upstream", type=int, help=argparse.SUPPRESS)  # internal: be the echo server
    args = ap.parse_args()
    if args.upstream:
        run_upstream(args.upstream)
        return 0

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_before = os.getloadavg()[0]
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="zillatw-bench-"))
    results: dict[tuple[str, int], dict] = {}
    runs: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    try:
        up_port = free_port()
        upstream = procs.start("upstream", [sys.executable, __file__, "--upstream", str(up_port)], tmp / "upstream.log")
        wait_listening(up_port, upstream)
        ports, watch = {"direct": up_port}, {"direct": {"upstream": upstream.pid}}
        ports["nginx"], nginx = start_nginx(procs, tmp, up_port, args.nginx_buffer)
        ports["zillatw"], zproxy = start_zillatw(procs, tmp, "zillatw", HERE / "proxy.yaml", up_port)
        ports["zillatw echo"], zecho = start_zillatw(procs, tmp, "zillatw echo", HERE / "echo.yaml", None)
        for name, proc in (("nginx", nginx), ("zillatw", zproxy), ("zillatw echo", zecho)):
            watch[name] = {"proxy": proc.pid, "upstream": upstream.pid}

        for rnd in range(args.rounds):
            for size in SIZES:
                for scenario, port in ports.items():
                    print(f"  round {rnd + 1}/{args.rounds} {scenario:>12} {human(size):>6} ...",
                          end="", flush=True, file=sys.stderr)
                    r = measure(f"ws://127.0.0.1:{port}/", size, args.warmup, args.seconds, watch[scenario])
                    runs[scenario, size].append(r)
                    print(f" {r['msgs']:10.0f} msgs/s {r['mbs']:8.2f} MB/s", file=sys.stderr)
        if args.profile:  # an extra run, not counted: py-spy takes CPU from the rest
            print("  profiling zillatw 64 B with py-spy ...", file=sys.stderr)
            spies = start_profile(zproxy.pid, args.warmup + args.seconds,
                                  HERE / "profile-proxy-64B.svg", tmp / "profile.raw")
            measure(f"ws://127.0.0.1:{ports['zillatw']}/", 64, args.warmup, args.seconds, {})
            for spy in spies:
                spy.wait(30)
        for key, rs in runs.items():
            rates = sorted(r["msgs"] for r in rs)
            rate = statistics.median(rates)
            results[key] = {"msgs": rate, "mbs": rate * key[1] / 1e6, "min": rates[0], "max": rates[-1],
                            "cpu": {k: statistics.median(r["cpu"].get(k, 0) for r in rs) for k in rs[0]["cpu"]},
                            "errors": sum(r["errors"] for r in rs), "closed": sum(r["closed"] for r in rs)}
    finally:
        procs.stop()

    print()
    print(f"zillatw proxy benchmark: {CONNECTIONS} connections over {PROCESSES} load processes, "
          f"1 message in flight each, {args.seconds:g} s window after {args.warmup:g} s warm-up, "
          f"median of {args.rounds} interleaved rounds; {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}; load average before {load_before:.2f}, "
          f"after {os.getloadavg()[0]:.2f} (other work on the machine skews the figures)")
    print(f"{'scenario':<14}{'size':>8}{'msgs/s':>12}{'MB/s':>10}{'vs nginx':>10}{'vs direct':>11}"
          f"{'msgs/s min-max':>18}{'proxy CPU':>11}{'(waiting)':>11}{'upstream CPU':>14}")
    for size in SIZES:
        by_nginx, direct = results["nginx", size], results["direct", size]
        for scenario in ports:
            r = results[scenario, size]
            vs_nginx = "" if scenario in ("direct", "nginx") else f"{r['msgs'] / by_nginx['msgs']:.2f}x"
            note = "" if not (r["errors"] or r["closed"]) else f"  ({r['errors']} bad echoes, {r['closed']} closed)"
            print(f"{scenario:<14}{human(size):>8}{r['msgs']:>12.0f}{r['mbs']:>10.2f}{vs_nginx:>10}"
                  f"{r['msgs'] / direct['msgs']:>10.2f}x{r['min']:>9.0f}-{r['max']:<8.0f}"
                  f"{cpu(r, 'proxy'):>11}{cpu(r, 'proxy wait'):>11}{cpu(r, 'upstream'):>14}{note}")
    print()
    for size in SIZES:
        ratio = results["zillatw", size]["msgs"] / results["nginx", size]["msgs"]
        met = ratio >= GOALS[size]
        unit = "MB/s" if size >= 1024 else "msgs/s"
        per_round = ", ".join(f"{z['msgs'] / n['msgs']:.2f}x"
                              for z, n in zip(runs["zillatw", size], runs["nginx", size], strict=True))
        print(f"goal at {human(size)}: zillatw/nginx {unit} >= {GOALS[size]:.1f}x: "
              f"{ratio:.2f}x -> {'met' if met else 'NOT met'}  (round by round: {per_round})")
    print("(zillatw echo, the gateway's own echo without an upstream, for the other path: "
          + ", ".join(f"{results['zillatw echo', s]['msgs'] / results['nginx', s]['msgs']:.2f}x nginx at {human(s)}"
                      for s in SIZES) + ")")
    if args.profile:
        raw = tmp / "profile.raw"
        if raw.exists():
            shutil.copy(raw, HERE / "profile-proxy-64B.txt")
        print()
        print("py-spy, zillatw proxy under the 64 B load "
              "(flame graph: bench/profile-proxy-64B.svg, collapsed stacks: bench/profile-proxy-64B.txt; "
              "% of the samples in which zillatw was not idle in epoll):")
        print(hot_spots(raw) if raw.exists() else "(py-spy wrote no profile; it needs ptrace permission)")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything started has been stopped by main's finally
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)

#!/usr/bin/env python
"""A/B: two zillatw checkouts (proxy and echo) and nginx under the same load, in one run.

    .venv/bin/python bench/ab.py BEFORE_ROOT [OTHER_ROOT...] [--seconds N] [--rounds N] [--sizes 64,16384]

Each ROOT is a directory holding another copy of `zillatw/` and `twisted/plugins/` (for
instance `git archive <commit> | tar -x -C /tmp/before`), named by its folder's name; "after"
is this checkout. Rounds are interleaved like bench/proxy.py's, so the ratios to the first
ROOT and to nginx come from the same minutes of a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the load workers are spawned: they import proxy by name
import proxy  # noqa: E402


def start(procs, tmp: Path, name: str, root: Path, config: Path, upstream: int | None):
    port = proxy.free_port()
    env = dict(os.environ, ZILLATW_BENCH_PORT=str(port), PYTHONPATH=str(root))
    if upstream is not None:
        env["ZILLATW_BENCH_UPSTREAM_PORT"] = str(upstream)
    proc = procs.start(name, [proxy.twistd(), "-n", "--pidfile=", "zillaws", "-c", str(config)],
                       tmp / f"{name.replace(' ', '-')}.log", env=env)
    proxy.wait_listening(port, proc)
    return port, proc


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("roots", type=Path, nargs="+")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="64,16384")
    ap.add_argument("--no-nginx", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    procs, tmp = proxy.Procs(), Path(tempfile.mkdtemp(prefix="zillatw-ab-"))
    runs = collections.defaultdict(list)
    try:
        up = proxy.free_port()
        upstream = procs.start("upstream", [sys.executable, str(HERE / "proxy.py"), "--upstream", str(up)],
                               tmp / "upstream.log")
        proxy.wait_listening(up, upstream)
        ports = {}
        if not args.no_nginx:
            ports["nginx"] = proxy.start_nginx(procs, tmp, up, None)
        labels = [(root.resolve().name, root.resolve()) for root in args.roots] + [("after", HERE.parent)]
        for label, root in labels:
            ports[f"proxy {label}"] = start(procs, tmp, f"proxy {label}", root, HERE / "proxy.yaml", up)
            ports[f"echo {label}"] = start(procs, tmp, f"echo {label}", root, HERE / "echo.yaml", None)
        for rnd in range(args.rounds):
            for size in sizes:
                for name, (port, proc) in ports.items():
                    r = proxy.measure(f"ws://127.0.0.1:{port}/", size, args.warmup, args.seconds,
                                      {"proxy": proc.pid})
                    runs[name, size].append(r)
                    print(f"  round {rnd + 1} {name:>13} {proxy.human(size):>6} {r['msgs']:9.0f} msgs/s"
                          f"  CPU {r['cpu']['proxy']:3.0f}%  errors {r['errors']} closed {r['closed']}",
                          file=sys.stderr)
    finally:
        procs.stop()
    print(f"A/B ({', '.join(label for label, _ in labels)}) {args.rounds} interleaved rounds of {args.seconds:g} s, "
          f"load average {os.getloadavg()[0]:.2f}")
    for size in sizes:
        med = {name: statistics.median(r["msgs"] for r in runs[name, size]) for name, _ in ports.items()}
        cpu = {name: statistics.median(r["cpu"]["proxy"] for r in runs[name, size]) for name in ports}
        for name in ports:
            extra = f"  {med[name] / med['nginx']:.2f}x nginx" if "nginx" in med and name != "nginx" else ""
            print(f"{proxy.human(size):>7} {name:>13} {med[name]:9.0f} msgs/s  CPU {cpu[name]:3.0f}%"
                  f"  {1e6 * cpu[name] / 100 / med[name]:6.1f} us CPU/msg{extra}")
        first = labels[0][0]
        for kind in ("proxy", "echo"):
            for label, _ in labels[1:]:
                this, baseline = f"{kind} {label}", f"{kind} {first}"
                cpu_per_msg_ratio = cpu[baseline] / med[baseline] / (cpu[this] / med[this])
                print(f"{proxy.human(size):>7} {kind}: {label}/{first} {med[this] / med[baseline]:.2f}x"
                      f" msgs/s, {cpu_per_msg_ratio:.2f}x less CPU per msg")
    return 0


if __name__ == "__main__":
    sys.exit(main())

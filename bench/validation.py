#!/usr/bin/env python
"""The validation benchmark: validated-message throughput as a ratio of unvalidated
echo, in the same run.

    .venv/bin/python bench/validation.py [--seconds N] [--rounds N] [--warmup N] [--size N]

Two gateways, each `twistd -n zillaws` in its own process: bench/echo.yaml (tcp -> http -> ws
-> echo) and bench/validation.yaml (the same, whose ws server validates every client message:
JSON Schema on /json, Avro on /avro, inline catalog). The load is bench/proxy.py's (50
connections over 2 picows + uvloop processes, one message in flight each, round trips
counted in a fixed window after a warm-up); every message is the same valid ~200-byte JSON
document (or Avro datum), sent as a binary message to both gateways. Goal: validated/echo
>= 0.7 for the 200-byte JSON message.

Needs `pip install -e ".[bench]"` (picows, uvloop), like bench/proxy.py.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import proxy  # noqa: E402 - bench/proxy.py: processes, zillatw start-up, load generator

GOAL = 0.7


def json_message(size: int) -> bytes:
    """A valid `order` (bench/validation.yaml) of exactly `size` bytes."""
    document = {"id": 123456, "status": "open", "tags": ["priority", "web", "eu-west"], "price": 249.99, "note": ""}
    base = len(json.dumps(document, separators=(",", ":")))
    document["note"] = "n" * max(0, size - base)
    data = json.dumps(document, separators=(",", ":")).encode()
    assert len(data) == size or size < base, (len(data), size)
    return data


def avro_message(size: int) -> bytes:
    """A valid `reading` Avro datum of about `size` bytes."""
    import fastavro
    text = (HERE / "validation.yaml").read_text()
    import yaml
    subjects = yaml.safe_load(text)["catalogs"]["bench_catalog"]["options"]["subjects"]
    schema = fastavro.parse_schema(json.loads(subjects["reading"]["schema"]))
    values = [20.0 + i / 8 for i in range(max(1, (size - 40) // 8))]
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, {"sensor": "greenhouse-7/north", "seq": 987654321,
                                             "values": values, "unit": "C", "note": "calibrated"})
    return out.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    proxy.window_arguments(ap)
    ap.add_argument("--size", type=int, default=200, help="message size in bytes (default 200)")
    args = ap.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_before = os.getloadavg()[0]
    messages = {"json": json_message(args.size), "avro": avro_message(args.size)}
    procs = proxy.Procs()
    tmp = Path(tempfile.mkdtemp(prefix="zillatw-bench-validation-"))
    runs: dict[str, list[dict]] = collections.defaultdict(list)
    try:
        echo_port, echo = proxy.start_zillatw(procs, tmp, "echo", HERE / "echo.yaml", None)
        valid_port, valid = proxy.start_zillatw(procs, tmp, "validation", HERE / "validation.yaml", None)
        scenarios = {  # name: (url, payload, process)
            "echo json": (f"ws://127.0.0.1:{echo_port}/json", messages["json"], echo),
            "validated json": (f"ws://127.0.0.1:{valid_port}/json", messages["json"], valid),
            "echo avro": (f"ws://127.0.0.1:{echo_port}/avro", messages["avro"], echo),
            "validated avro": (f"ws://127.0.0.1:{valid_port}/avro", messages["avro"], valid),
        }
        for rnd in range(args.rounds):
            for name, (url, payload, proc) in scenarios.items():
                print(f"  round {rnd + 1}/{args.rounds} {name:>15} ...", end="", flush=True, file=sys.stderr)
                r = proxy.measure(url, len(payload), args.warmup, args.seconds, {"gateway": proc.pid}, payload)
                if r["errors"] or r["closed"]:
                    raise SystemExit(f"{name}: {r['errors']} bad echoes, {r['closed']} connections closed "
                                     f"(an invalid benchmark message?); logs in {tmp}")
                runs[name].append(r)
                print(f" {r['msgs']:10.0f} msgs/s", file=sys.stderr)
    finally:
        procs.stop()

    median = {name: statistics.median(r["msgs"] for r in rs) for name, rs in runs.items()}
    cpu = {name: statistics.median(r["cpu"]["gateway"] for r in rs) for name, rs in runs.items()}
    print()
    print(f"zillatw validation benchmark: {proxy.CONNECTIONS} connections over {proxy.PROCESSES} load processes, "
          f"1 message in flight each, {args.seconds:g} s window after {args.warmup:g} s warm-up, median of "
          f"{args.rounds} interleaved rounds; {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M %Z')}; "
          f"load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
    per_msg = {name: 1e4 * cpu[name] / median[name] for name in runs}  # µs of gateway CPU per round trip
    print(f"{'scenario':<16}{'bytes':>7}{'msgs/s':>11}{'min-max':>17}{'gateway CPU':>13}{'vs echo':>9}"
          f"{'CPU µs/msg':>12}")
    for name, rs in runs.items():
        model = name.split()[1]
        rates = sorted(r["msgs"] for r in rs)
        ratio = "" if name.startswith("echo") else f"{median[name] / median['echo ' + model]:.2f}x"
        print(f"{name:<16}{len(messages[model]):>7}{median[name]:>11.0f}{rates[0]:>9.0f}-{rates[-1]:<7.0f}"
              f"{cpu[name]:>12.0f}%{ratio:>9}{per_msg[name]:>12.1f}")
    print()
    for model in ("json", "avro"):
        per_round = ", ".join(f"{v['msgs'] / e['msgs']:.2f}x" for v, e in zip(runs["validated " + model],
                                                                             runs["echo " + model], strict=True))
        ratio = median["validated " + model] / median["echo " + model]
        goal = f" (goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'})" if model == "json" else ""
        print(f"validated/echo {model} ({len(messages[model])} B): {ratio:.2f}x{goal}  (round by round: {per_round})")
        capacity = per_msg["echo " + model] / per_msg["validated " + model]
        print(f"  by gateway CPU per message (what a saturated gateway would do): {capacity:.2f}x "
              f"({per_msg['echo ' + model]:.1f} µs echo, {per_msg['validated ' + model]:.1f} µs validated)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)

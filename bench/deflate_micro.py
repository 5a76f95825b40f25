#!/usr/bin/env python
"""Micro-benchmark of a permessage-deflate echo in the core alone, in one process, no sockets:
the server side of bench/suite.py's deflate scenario without Twisted, per message.

    .venv/bin/python bench/deflate_micro.py [--messages 3000] [--profile]

A client compressor as the websockets client's (zlib level 6, memLevel 5, context takeover,
the window the ws server asks for) makes the masked frames of the scenario's JSON payload
(bench/payloads.py) at 1 KiB and 64 KiB; a server Connection reads them and sends each message
back, once as the ws server does for an echo (a mirror: inflated and checked, sent back as it
came) and once compressing it again (what it does when the parameters do not allow a mirror).
The CPU time per message is printed; a client inflater then reads every answer back, so a run
whose answers are wrong fails. --profile prints cProfile's top entries for each case.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import payloads  # noqa: E402 - bench/payloads.py

from zillatw.bindings.ws.binding import CLIENT_WINDOW_BITS  # noqa: E402
from zillatw.wire import Connection, Fragment, Role, server_accept  # noqa: E402
from zillatw.wire.frames import encode_frame, parse_head  # noqa: E402

OFFER = "permessage-deflate; client_max_window_bits"  # the websockets client's


def run(size: int, messages: int, mirror: bool, profile: bool) -> float:
    agreed = server_accept(OFFER, client_window_bits=CLIENT_WINDOW_BITS)
    assert agreed is not None
    params = agreed[0]
    payload = payloads.json_payload(size)
    client = zlib.compressobj(6, zlib.DEFLATED, -params.client_max_window_bits, 5)
    frames = []
    for _ in range(messages):
        data = client.compress(payload) + client.flush(zlib.Z_SYNC_FLUSH)
        head, body = encode_frame(1, data[:-4], True, True, True)
        frames.append(head + body)
    server = Connection(Role.SERVER, deflate=params, max_message_size=16 << 20, gather=64 * 1024,
                        answer_close=False, defer_failure=True, auto_pong=False, mirror=mirror)
    out: list[bytes] = []

    def echo() -> None:
        for frame in frames:
            server.receive_data(frame)
            for event in server.events_received():
                assert type(event) is Fragment  # nothing else is sent
                out.extend(server.encode_fragment(event.opcode, event.data, event.fin,
                                                  event.compressed and event.opcode != 0))

    started = time.process_time()
    if profile:
        profiler = cProfile.Profile()
        profiler.runcall(echo)
    else:
        echo()
    per_message = (time.process_time() - started) / messages
    if profile:
        print(f"--- {size} B, {'mirror' if mirror else 'compressed again'}")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(8)
    inflater = zlib.decompressobj(-params.server_max_window_bits)
    data, pos, good = b"".join(out), 0, 0
    while pos < len(data):
        parsed = parse_head(data, pos, False, True)
        assert parsed is not None
        first, length, start, _ = parsed
        body, pos = data[start:start + length], start + length
        good += (inflater.decompress(body + b"\x00\x00\xff\xff") if first & 0x40 else body) == payload
    if good != messages:
        raise SystemExit(f"{size} B: {messages - good} of {messages} answers did not read back as the payload")
    return per_message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="messages per case (default 3000)")
    parser.add_argument("--profile", action="store_true", help="cProfile's top entries for each case")
    args = parser.parse_args()
    print(f"µs CPU per echoed message, {args.messages} messages, offer {OFFER!r} "
          f"(client window {CLIENT_WINDOW_BITS} bits)")
    for size in (1024, 64 * 1024):
        mirrored = run(size, args.messages, True, args.profile)
        again = run(size, args.messages, False, args.profile)
        print(f"{size:>6} B  mirror {1e6 * mirrored:8.1f}   compressed again {1e6 * again:8.1f}")


if __name__ == "__main__":
    main()

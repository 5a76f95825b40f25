#!/usr/bin/env python
"""Micro-benchmark of WebSocket framing alone, in one process, no sockets: zillatw.wire
next to Autobahn's framing and wsproto's (when installed), per frame.

    .venv/bin/python bench/wire_micro.py [--seconds 0.5] [--rounds 5]

For each payload size (64 B, 16 KiB, 1 MiB; binary) it measures:
  parse      a masked client frame in, its payload out (the server's read side)
  serialize  one unmasked server frame out (the server's write side)
  echo       parse + serialize (64 B only): the protocol's share of a relayed message
The median per-frame time of --rounds rounds of about --seconds each is printed.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zillatw.wire import Connection, Fragment, Opcode, Role  # noqa: E402

SIZES = {"64 B": 64, "16 KiB": 16 * 1024, "1 MiB": 1 << 20}


def client_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = bytes([0x82, 0x80 | size])
    elif size < 0x10000:
        head = bytes([0x82, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([0x82, 0x80 | 127]) + size.to_bytes(8, "big")
    from websockets.speedups import apply_mask
    return head + mask + apply_mask(payload, mask)


# ---- zillatw.wire

def wire_parse(frame: bytes) -> Callable[[], Any]:
    conn = Connection(Role.SERVER, max_message_size=None)

    def run() -> Any:
        conn.receive_data(frame)
        return conn.events_received()
    return run


def wire_serialize(payload: bytes) -> Callable[[], Any]:
    conn = Connection(Role.SERVER)
    return lambda: conn.encode_fragment(Opcode.BINARY, payload)


def wire_echo(frame: bytes) -> Callable[[], Any]:
    conn = Connection(Role.SERVER)

    def run() -> Any:
        conn.receive_data(frame)
        for event in conn.events_received():
            if isinstance(event, Fragment):  # the frames measured are all data frames
                conn.send_fragment(event.opcode, event.data, event.fin)
        return conn.data_to_send()
    return run


# ---- Autobahn: a server protocol past its handshake on a StringTransport

def autobahn_protocol() -> Any:
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet.testing import StringTransport

    class Echo(WebSocketServerProtocol):
        echo = False
        transport_: Any = None  # the StringTransport, for the measurements to read and clear

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            if self.echo:
                self.sendMessage(payload, isBinary)

    factory = WebSocketServerFactory("ws://127.0.0.1:9000")
    factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0, autoPingInterval=0,
                               openHandshakeTimeout=0, closeHandshakeTimeout=0)
    factory.protocol = Echo
    protocol = factory.buildProtocol(None)
    assert isinstance(protocol, Echo)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:9000\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert protocol.state == protocol.STATE_OPEN, "Autobahn did not open"
    transport.clear()
    protocol.transport_ = transport
    return protocol


def autobahn_parse(frame: bytes) -> Callable[[], Any]:
    protocol = autobahn_protocol()
    return lambda: protocol.dataReceived(frame)


def autobahn_serialize(payload: bytes) -> Callable[[], Any]:
    protocol = autobahn_protocol()
    transport = protocol.transport_

    def run() -> Any:
        protocol.sendMessage(payload, True)
        transport.clear()
    return run


def autobahn_echo(frame: bytes) -> Callable[[], Any]:
    protocol = autobahn_protocol()
    protocol.echo = True
    transport = protocol.transport_

    def run() -> Any:
        protocol.dataReceived(frame)
        transport.clear()
    return run


# ---- wsproto's frame layer

def wsproto_parse(frame: bytes) -> Callable[[], Any]:
    from wsproto.frame_protocol import FrameProtocol
    protocol = FrameProtocol(client=False, extensions=[])

    def run() -> Any:
        protocol.receive_bytes(frame)
        return list(protocol.received_frames())
    return run


def wsproto_serialize(payload: bytes) -> Callable[[], Any]:
    from wsproto.frame_protocol import FrameProtocol
    protocol = FrameProtocol(client=False, extensions=[])
    return lambda: protocol.send_data(payload, fin=True)


def wsproto_echo(frame: bytes) -> Callable[[], Any]:
    from wsproto.frame_protocol import FrameProtocol
    protocol = FrameProtocol(client=False, extensions=[])

    def run() -> Any:
        protocol.receive_bytes(frame)
        return [protocol.send_data(f.payload, fin=f.message_finished) for f in protocol.received_frames()]
    return run


def per_call(make: Callable[[], Callable[[], Any]], seconds: float, rounds: int) -> float:
    run = make()
    run()
    results = []
    for _ in range(rounds):
        count, start = 0, time.perf_counter()
        while True:
            for _ in range(50):
                run()
            count += 50
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        results.append(elapsed / count)
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    try:
        import wsproto  # noqa: F401
        impls = {"zillatw.wire": "wire", "autobahn": "autobahn", "wsproto": "wsproto"}
    except ImportError:
        impls = {"zillatw.wire": "wire", "autobahn": "autobahn"}
        print("(wsproto is not installed: not measured)")
    table = globals()
    print(f"{'operation':<20}" + "".join(f"{name:>15}" for name in impls) + "   (µs per frame, median)")
    for label, size in SIZES.items():
        payload = os.urandom(size)
        frame = client_frame(payload)
        operations = [("parse", frame), ("serialize", payload)] + ([("echo", frame)] if size == 64 else [])
        for operation, argument in operations:
            cells = []
            for prefix in impls.values():
                seconds = per_call(functools.partial(table[f"{prefix}_{operation}"], argument),
                                   args.seconds, args.rounds)
                cells.append(f"{seconds * 1e6:15.2f}")
            print(f"{operation + ' ' + label:<20}" + "".join(cells), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The floor of an HTTP/1.1 proxy on Twisted and zillatw's reactor, for the http-proxy table.

    python bench/httpfloor.py PORT UPSTREAM_PORT

Keep-alive on both legs, a pool of upstream connections, hop-by-hop headers dropped, `Host`
written first: what zillatw's http server and client do for the benchmark's requests, and
nothing else. It is NOT a proxy to use: Content-Length bodies only, each request and each
response must arrive in one read, no header validation, no limits, no timers, no errors
answered. bench/httpproxy.py puts it beside nginx and zillatw in the same run, so the gap
between it and zillatw is what zillatw's layers (validation, routing, timers, metrics,
streaming, back-pressure) cost a request, and the gap between it and nginx what no Python
code on Twisted can close.
"""

from __future__ import annotations

import sys
from typing import Any

HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host", b"te",
                        b"upgrade", b"trailer", b"proxy-connection", b"proxy-authorization", b"proxy-authenticate"))


def split_head(buffer: bytes) -> tuple[list[bytes], int, bytes, int] | None:
    """(the start line and the end-to-end header lines, Content-Length, Host, where the body
    starts), or None while the head is not whole."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buffer[:end].split(b"\r\n")
    kept, length, host = [lines[0]], 0, b""
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        lowered = name.strip().lower()
        if lowered == b"content-length":
            length = int(value)
        elif lowered == b"host":
            host = value.strip()
        elif lowered not in HOP_BY_HOP:
            kept.append(line)
    return kept, length, host, end + 4


def main(port: int, upstream_port: int) -> None:
    from zillatw.runtime import reactor as zillatw_reactor
    zillatw_reactor.install()
    from twisted.internet import protocol, reactor

    from zillatw.twistedcompat import write

    idle: list[Any] = []

    class Upstream(protocol.Protocol):
        transport: Any

        def __init__(self, client: Any, request: bytes):
            self.client, self.first = client, request

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            write(self.transport, self.first)

        def send(self, client: Any, request: bytes) -> None:
            self.client = client
            write(self.transport, request)

        def dataReceived(self, data: bytes) -> None:
            head = split_head(data)
            if head is None:
                raise ValueError("a response head not in one read: not for this floor")
            lines, length, _, at = head
            lines.append(b"content-length: %d" % length)
            client, self.client = self.client, None
            write(client.transport, b"\r\n".join(lines) + b"\r\n\r\n" + data[at:at + length])
            idle.append(self)

    class Client(protocol.Protocol):
        transport: Any

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)

        def dataReceived(self, data: bytes) -> None:
            head = split_head(data)
            if head is None:
                raise ValueError("a request head not in one read: not for this floor")
            lines, length, host, at = head
            method, target, _ = lines[0].split(b" ")
            lines[0] = b"%s %s HTTP/1.1" % (method, target)
            lines.insert(1, b"host: " + host)
            lines.append(b"content-length: %d" % length)
            request = b"\r\n".join(lines) + b"\r\n\r\n" + data[at:at + length]
            if idle:
                idle.pop().send(self, request)
            else:
                protocol.ClientCreator(reactor, Upstream, self, request).connectTCP("127.0.0.1", upstream_port)

    factory = protocol.ServerFactory.forProtocol(Client)
    reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))

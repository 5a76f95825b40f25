"""Test-only: an echo server driving zillatw.wire over a real socket. Its handshake is
the least that lets real clients in (no routing, no checks a gateway would make); every
fragment read is written back as it came, opcode and fin kept, through the same core.
Also runnable for the Autobahn testsuite: `python -m zillatw.test.wire_echo PORT`."""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol, ServerFactory

from zillatw.wire import Connection, Fragment, Role, State, server_accept
from zillatw.wire.handshake import accept_key

MAX_HEAD = 16 * 1024
CLOSE_TIMEOUT = 2.0


class CoreEcho(Protocol):
    transport: ITCPTransport  # listenTCP's: abortConnection for the close timeout

    def __init__(self, reactor: Any, deflate: bool = True, max_message_size: int | None = None) -> None:
        self.reactor = reactor
        self.deflate = deflate
        self.max_message_size = max_message_size
        self.conn: Connection | None = None
        self.head = b""
        self.close_timer: Any = None
        self.fragments_read = 0  # fragments that did not end their message: proof of fragmentation

    def dataReceived(self, data: bytes) -> None:
        if self.conn is None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                if len(self.head) > MAX_HEAD:
                    self.transport.loseConnection()
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            self.head = b""
            self.conn = self._upgrade(head)
        self.conn.receive_data(data)
        self._drain(self.conn)

    def _upgrade(self, head: bytes) -> Connection:
        lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
        agreed = server_accept(headers.get("sec-websocket-extensions")) if self.deflate else None
        response = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
                    "Sec-WebSocket-Accept: " + accept_key(headers.get("sec-websocket-key", ""))]
        if agreed is not None:
            response.append("Sec-WebSocket-Extensions: " + agreed[1])
        self.transport.write("\r\n".join(response).encode("latin-1") + b"\r\n\r\n")
        return Connection(Role.SERVER, deflate=agreed[0] if agreed else None, max_message_size=self.max_message_size)

    def _drain(self, conn: Connection) -> None:
        for event in conn.events_received():
            if type(event) is Fragment and conn.may_send:
                self.fragments_read += not event.fin
                conn.send_fragment(event.opcode, event.data, event.fin)
        out = conn.data_to_send()
        if out:
            self.transport.writeSequence(out)
        if conn.state is State.CLOSED:
            self.transport.loseConnection()  # the server closes TCP first (RFC 6455 §7.1.1)
        elif conn.state is State.CLOSE_SENT and self.close_timer is None:
            self.close_timer = self.reactor.callLater(CLOSE_TIMEOUT, self.transport.abortConnection)

    def connectionLost(self, reason: Any = None) -> None:
        if self.conn is not None:
            self.conn.receive_eof()
        if self.close_timer is not None and self.close_timer.active():
            self.close_timer.cancel()


class CoreEchoFactory(ServerFactory):
    noisy = False

    def __init__(self, reactor: Any, **options: Any) -> None:
        self.reactor = reactor
        self.options = options
        self.connections: list[CoreEcho] = []

    def buildProtocol(self, addr: Any) -> CoreEcho:
        protocol = CoreEcho(self.reactor, **self.options)
        self.connections.append(protocol)
        return protocol


if __name__ == "__main__":  # pragma: no cover - for conformance runs by hand
    from twisted.internet import reactor
    reactor.listenTCP(int(sys.argv[1]), CoreEchoFactory(reactor, max_message_size=64 << 20), interface="127.0.0.1")
    reactor.run()

"""Drive wstest's fuzzingserver through the gateway: for every case, an echoing WebSocket
client connects to the gateway, whose ws client proxies to the fuzzingserver. What the
fuzzingserver judges is therefore the gateway's ws client (and the relay behind it).

    python conformance/echo-client.py ws://127.0.0.1:FUZZINGSERVER_PORT AGENT 127.0.0.1:GATEWAY_PORT

Requests name the fuzzingserver (its URL, so its Host header) but go to the gateway's socket,
as to a proxy: the gateway's ws client forwards the authority it received, as Zilla's does,
and wstest 0.8 refuses a Host whose port is not its own.
"""

from __future__ import annotations

import sys
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from twisted.internet import defer, reactor


class Echo(WebSocketClientProtocol):
    factory: EchoFactory

    def onMessage(self, payload, isBinary):
        self.factory.last = payload
        if self.factory.echo:
            self.sendMessage(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        if not self.factory.done.called:
            self.factory.done.callback(None)


class EchoFactory(WebSocketClientFactory):
    """One visit: echoes if `echo`, keeps the `last` message; `done` fires when it closes."""
    def __init__(self, url: str, echo: bool) -> None:
        super().__init__(url)
        self.protocol = Echo
        self.echo = echo
        self.last: bytes | None = None
        self.done: defer.Deferred[None] = defer.Deferred()

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self.done.called:
            self.done.errback(reason)


def visit(url: str, via: tuple[str, int], echo: bool = True) -> defer.Deferred:
    factory = EchoFactory(url, echo)
    factory.setProtocolOptions(
        maxMessagePayloadSize=0, maxFramePayloadSize=0, autoFragmentSize=0, failByDrop=False,
        openHandshakeTimeout=10, closeHandshakeTimeout=5,
        perMessageCompressionOffers=[PerMessageDeflateOffer()],
        perMessageCompressionAccept=lambda r: PerMessageDeflateResponseAccept(r)
        if isinstance(r, PerMessageDeflateResponse) else None)
    reactor.connectTCP(via[0], via[1], factory)
    return factory.done.addCallback(lambda _: factory.last)


@defer.inlineCallbacks
def main(base: str, agent: str, via: tuple[str, int]):
    count = yield visit(f"{base}/getCaseCount", via, echo=False)
    if count is None:
        raise SystemExit("no case count: the gateway or the fuzzingserver refused getCaseCount")
    count = int(count)
    print(f"fuzzingserver has {count} cases", flush=True)
    for case in range(1, count + 1):
        yield visit(f"{base}/runCase?case={case}&agent={agent}", via)
        if case % 50 == 0:
            print(f"  {case}/{count}", flush=True)
    yield visit(f"{base}/updateReports?agent={agent}", via, echo=False)


def run(base: str, agent: str, via: str) -> int:
    host, _, port = via.rpartition(":")
    outcome = []

    def finished(result):
        outcome.append(result)
        reactor.stop()

    def failed(failure):
        failure.printTraceback(file=sys.stderr)
        finished(failure)

    reactor.callWhenRunning(lambda: main(base, agent, (host, int(port))).addCallbacks(finished, failed))
    reactor.run()
    return 0 if outcome and outcome[0] is None else 1


if __name__ == "__main__":
    sys.exit(run(*sys.argv[1:4]))

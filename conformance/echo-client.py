"""Drive wstest's fuzzingserver through the gateway: for every case, an echoing WebSocket
client connects to the gateway, whose ws client proxies to the fuzzingserver. What the
fuzzingserver judges is therefore the gateway's ws client (and the relay behind it).

    python conformance/echo-client.py ws://127.0.0.1:GATEWAY_PORT AGENT
"""

from __future__ import annotations

import sys

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from autobahn.websocket.compress import (PerMessageDeflateOffer, PerMessageDeflateResponse,
                                         PerMessageDeflateResponseAccept)
from twisted.internet import defer, reactor


class Echo(WebSocketClientProtocol):
    def onMessage(self, payload, isBinary):
        self.factory.last = payload
        if self.factory.echo:
            self.sendMessage(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        if not self.factory.done.called:
            self.factory.done.callback(None)


def visit(url: str, echo: bool = True) -> defer.Deferred:
    factory = WebSocketClientFactory(url)
    factory.protocol = Echo
    factory.echo, factory.last, factory.done = echo, None, defer.Deferred()
    factory.setProtocolOptions(
        maxMessagePayloadSize=0, maxFramePayloadSize=0, autoFragmentSize=0, failByDrop=False,
        openHandshakeTimeout=10, closeHandshakeTimeout=5,
        perMessageCompressionOffers=[PerMessageDeflateOffer()],
        perMessageCompressionAccept=lambda r: PerMessageDeflateResponseAccept(r)
        if isinstance(r, PerMessageDeflateResponse) else None)
    connector = connectWS(factory)
    factory.clientConnectionFailed = lambda c, reason: factory.done.called or factory.done.callback(None)
    return factory.done.addCallback(lambda _: (connector, factory.last))


@defer.inlineCallbacks
def main(base: str, agent: str):
    _, count = yield visit(f"{base}/getCaseCount", echo=False)
    count = int(count)
    print(f"fuzzingserver has {count} cases", flush=True)
    for case in range(1, count + 1):
        yield visit(f"{base}/runCase?case={case}&agent={agent}")
        if case % 50 == 0:
            print(f"  {case}/{count}", flush=True)
    yield visit(f"{base}/updateReports?agent={agent}", echo=False)
    reactor.stop()


if __name__ == "__main__":
    reactor.callWhenRunning(lambda: main(sys.argv[1], sys.argv[2]).addErrback(lambda f: (f.printTraceback(), reactor.stop())))
    reactor.run()

"""The upstream for conformance runs through the proxy: Autobahn's own echo server (Python 3,
Twisted), which passes the testsuite on its own, with permessage-deflate and no size limits.

    python conformance/upstream-echo.py PORT
"""

from __future__ import annotations

import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from twisted.internet import reactor


class Echo(WebSocketServerProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


def accept_deflate(offers):
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


if __name__ == "__main__":
    port = int(sys.argv[1])
    factory = WebSocketServerFactory(f"ws://127.0.0.1:{port}")
    factory.protocol = Echo
    factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0, autoFragmentSize=0,
                               failByDrop=False, perMessageCompressionAccept=accept_deflate)
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    reactor.run()

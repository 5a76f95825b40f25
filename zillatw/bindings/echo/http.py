"""echo behind an http server (Zilla's http.echo): each plain request is answered 200 with
its own body and content-type, streamed as it arrives (the response's first bytes leave
before the request's last come in). The response has the request's length when it had one,
else it is chunked. Pausing echo pauses its source, the client's request body."""

from __future__ import annotations

from zope.interface import implementer

from zillatw.stream import HttpHead, IHttpExchangeEnd


@implementer(IHttpExchangeEnd)
class EchoExchange:
    """The request's body, handed straight back as the response's (bound once: no extra
    call per piece)."""

    __slots__ = ("exchange_data", "exchange_end", "pauseProducing", "resumeProducing")

    def __init__(self, peer: IHttpExchangeEnd):
        self.exchange_data = peer.exchange_data
        self.exchange_end = peer.exchange_end
        self.pauseProducing = peer.pauseProducing
        self.resumeProducing = peer.resumeProducing

    def exchange_head(self, head: HttpHead) -> None:
        """Only a server's end takes a response head."""

    def exchange_abort(self, status: int, reason: str, detail: str) -> None:
        """The client went away or its request broke: echo holds nothing."""

    def stopProducing(self) -> None:
        """The client's connection is gone; echo holds nothing."""


def open_request(head: HttpHead, peer: IHttpExchangeEnd) -> EchoExchange:
    """Answer the request with its own body: 200, its content-type, its length."""
    response = {":status": "200"}
    content_type = head.headers.get("content-type")
    if content_type is not None:
        response["content-type"] = content_type
    peer.exchange_head(HttpHead(response, head.length))
    exchange = EchoExchange(peer)
    if head.length == 0:
        peer.exchange_end()
    return exchange

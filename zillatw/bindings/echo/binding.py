"""echo server: returns every message to its sender, fragment by fragment, same opcode;
behind an http server, answers each plain request with its body (zillatw.bindings.echo.http)."""

from __future__ import annotations

from zope.interface import implementer

from zillatw.config import BindingConfig
from zillatw.config.plugins import BindingType
from zillatw.bindings.echo import http as echo_http
from zillatw.config.schema import FORBIDDEN
from zillatw.stream import HttpHead, IHttpExchangeEnd, IHttpRequestExit, IStreamEnd, IStreamExit, StreamInfo

SCHEMA_PATCH = {
    "properties": {
        "kind": {"enum": ["server"]},
        "options": FORBIDDEN, "routes": FORBIDDEN, "exit": FORBIDDEN, "vault": FORBIDDEN, "catalog": FORBIDDEN,
    },
}
STREAMS = {"server": (("messages", "http"), None)}


@implementer(IStreamEnd)
class EchoEnd:
    """Hands each call straight back to the peer: bound once, so echo costs no extra call
    per fragment. Pausing echo pauses its source, which is the peer itself."""

    __slots__ = ("stream_data", "stream_end", "pauseProducing", "resumeProducing")

    def __init__(self, peer: IStreamEnd):
        self.stream_data = peer.stream_data
        self.stream_end = peer.stream_end
        self.pauseProducing = peer.pauseProducing
        self.resumeProducing = peer.resumeProducing

    def stopProducing(self) -> None:
        """The peer's connection is gone; echo holds nothing else."""


@implementer(IStreamExit, IHttpRequestExit)
class EchoServer:
    def __init__(self, name: str = "echo_server"):
        self.name = name

    def open(self, info: StreamInfo, peer: IStreamEnd) -> EchoEnd:
        return EchoEnd(peer)

    def open_request(self, head: HttpHead, peer: IHttpExchangeEnd, trace_id: int) -> IHttpExchangeEnd:
        return echo_http.open_request(head, peer)


def build(binding: BindingConfig, graph: object) -> EchoServer:
    return EchoServer(binding.name)


PLUGIN = BindingType("echo", SCHEMA_PATCH, STREAMS, build)

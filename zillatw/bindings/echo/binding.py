"""echo server: returns every message to its sender, fragment by fragment, same opcode; on
a byte stream (a tcp or tls server's connection, Zilla's tcp.echo and tls.echo), every chunk
as it was read (see zillatw.bytestream); behind an http server, answers each plain request
with its body (zillatw.bindings.echo.http)."""

from __future__ import annotations

from zope.interface import implementer

from zillatw.bindings.echo import http as echo_http
from zillatw.bytestream import ByteStreams
from zillatw.config import BindingConfig
from zillatw.config.plugins import BindingType, IDrainsGracefully
from zillatw.config.schema import FORBIDDEN
from zillatw.stream import (
    HttpHead,
    IBytesEnd,
    IBytesExit,
    IHttpExchangeEnd,
    IHttpRequestExit,
    IMirrorEnd,
    IStreamEnd,
    IStreamExit,
    StreamInfo,
)

SCHEMA_PATCH = {
    "properties": {
        "kind": {"enum": ["server"]},
        "options": FORBIDDEN, "routes": FORBIDDEN, "exit": FORBIDDEN, "vault": FORBIDDEN, "catalog": FORBIDDEN,
    },
}
STREAMS = {"server": (("messages", "bytes", "http"), None)}


@implementer(IMirrorEnd)
class EchoEnd:
    """Hands each call straight back to the peer: bound once, so echo costs no extra call
    per fragment. Pausing echo pauses its source, which is the peer itself. A mirror
    (IMirrorEnd): a ws server sends compressed messages back as they came."""

    __slots__ = ("stream_data", "stream_end", "pauseProducing", "resumeProducing", "_peer")

    def __init__(self, peer: IStreamEnd):
        self.stream_data = peer.stream_data
        self.stream_end = peer.stream_end
        self.pauseProducing = peer.pauseProducing
        self.resumeProducing = peer.resumeProducing
        self._peer = peer

    def stream_deflated(self, opcode: int, payload: bytes, fin: bool) -> None:
        """Only a ws server that found us a mirror sends these: its end takes them back."""
        self._peer.stream_deflated(opcode, payload, fin)  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        """The peer's connection is gone; echo holds nothing else."""


@implementer(IBytesEnd)
class EchoBytesEnd:
    """A byte stream's chunks straight back to the peer, as EchoEnd does with messages."""

    __slots__ = ("bytes_data", "pauseProducing", "resumeProducing", "stopProducing", "_peer", "_streams")

    def __init__(self, peer: IBytesEnd, streams: ByteStreams):
        self.bytes_data = peer.bytes_data
        self.pauseProducing = peer.pauseProducing
        self.resumeProducing = peer.resumeProducing
        self.stopProducing = peer.stopProducing
        self._peer = peer
        self._streams = streams

    def bytes_end(self, reason: str) -> None:
        self._streams.remove(self._peer)
        self._peer.bytes_end(reason)


@implementer(IStreamExit, IBytesExit, IHttpRequestExit, IDrainsGracefully)
class EchoServer:
    def __init__(self, name: str = "echo_server"):
        self.name = name
        # the byte connections it serves (a ws server holds its own WebSockets)
        self.byte_streams = ByteStreams()

    def open(self, info: StreamInfo, peer: IStreamEnd) -> EchoEnd:
        return EchoEnd(peer)

    def open_bytes(self, info: StreamInfo, peer: IBytesEnd) -> EchoBytesEnd:
        self.byte_streams.add(peer)
        return EchoBytesEnd(peer, self.byte_streams)

    # the gateway's stop (IDrainsGracefully), for its byte connections
    def open_count(self) -> int:
        return self.byte_streams.open_count()

    def going_away(self) -> None:
        self.byte_streams.going_away()

    def drop_all(self) -> None:
        self.byte_streams.drop_all()

    def open_request(self, head: HttpHead, peer: IHttpExchangeEnd, trace_id: int) -> IHttpExchangeEnd:
        return echo_http.open_request(head, peer)


def build(binding: BindingConfig, graph: object) -> EchoServer:
    return EchoServer(binding.name)


PLUGIN = BindingType("echo", SCHEMA_PATCH, STREAMS, build)

"""The ws server's admission control (docs/admission.md), on zillatw.bindings.ws.ratelimits's sans-IO
rules: per client address, open connections (`max-connections-per-client`, beyond: 503) and
handshakes (`handshake-rate`, beyond: 429 with Retry-After); per connection, messages
(`message-rate`, beyond: close 1008).

The client address is the one the http server decided (zillatw.bindings.http.clientaddress) and handed
the ws server with the request. A refusal is an HttpError the ws server answers with
http1.render_response and reports as its REJECTED event, naming the client. The message
rate is a stream end put between the connection and its exit only when it is configured:
without it the per-message path is what it was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from zope.interface import implementer

from zillatw.bindings.ws import ratelimits as rules
from zillatw.bindings.ws.ratelimits import Admission, Refusal, TokenBucket
from zillatw.stream import IStreamEnd
from zillatw.wire.http1 import HttpError

POLICY_VIOLATION = 1008  # RFC 6455 §7.4.1
UNKNOWN_CLIENT = "-"  # the client address when the ws server was not told one
MESSAGE_RATE_EXCEEDED = "BINDING_WS_MESSAGE_RATE_EXCEEDED"

_RATE = {"type": "number", "exclusiveMinimum": 0}
_BURST = {"type": "integer", "minimum": 1}
# the ws server's options these add (zillatw's extensions)
OPTIONS = {
    "max-connections-per-client": {"type": "integer", "minimum": 1},
    "handshake-rate": {"type": "object", "additionalProperties": False, "required": ["per-client"],
                       "properties": {"per-client": _RATE, "burst": _BURST}},
    "message-rate": {"type": "object", "additionalProperties": False, "required": ["rate"],
                     "properties": {"rate": _RATE, "burst": _BURST}},
}


def _burst(rate: float, burst: int | None) -> int:
    """A bucket's burst: as configured, else one second's worth (at least 1)."""
    return burst if burst is not None else max(1, math.ceil(rate))


def from_options(options: Mapping[str, Any], reactor: Any, observer: Any = None) -> WsAdmission | None:
    """The admission control a ws server's options ask for, or None when they set none."""
    handshakes = options.get("handshake-rate")
    messages = options.get("message-rate")
    per_client = options.get("max-connections-per-client", 0)
    if not (per_client or handshakes or messages):
        return None
    admission = None
    if per_client or handshakes:
        rate = handshakes["per-client"] if handshakes else 0.0
        admission = Admission(per_client, rate, _burst(rate, handshakes.get("burst")) if handshakes else 1,
                              rules.MAX_CLIENTS)
    message_rate = (messages["rate"], _burst(messages["rate"], messages.get("burst"))) if messages else None
    return WsAdmission(admission, message_rate, reactor, observer)


class WsAdmission:
    """One ws server's admission: the per-client table (or None) and the message rate."""

    def __init__(self, admission: Admission | None, message_rate: tuple[float, int] | None, reactor: Any,
                 observer: Any = None) -> None:
        self.admission = admission
        self.message_rate = message_rate  # (rate, burst) per connection, or None
        self.reactor = reactor
        self.observer = observer  # zillatw.telemetry.instrument.WsServerObserver, for the message-rate event
        self.rate_closes = 0  # connections closed for their message rate

    def admit(self, client_address: str | None) -> str | None:
        """The client's key for opened()/closed() if its handshake may go on (None when no
        per-client limit is set); raises HttpError 429 (with Retry-After) or 503."""
        admission = self.admission
        if admission is None:
            return None
        client = client_address or UNKNOWN_CLIENT
        verdict = admission.admit(client, self.reactor.seconds())
        refusal = verdict.refusal
        if refusal is None:
            return client
        if refusal is Refusal.HANDSHAKE_RATE:
            raise HttpError(429, f"too many WebSocket handshakes from {client} (limit {admission.handshake_rate:g} "
                                 f"per second); retry after {verdict.retry_after} s",
                            (("Retry-After", str(verdict.retry_after)),))
        if refusal is Refusal.CONNECTIONS:
            raise HttpError(503, f"too many WebSocket connections from {client} (limit {admission.max_connections})")
        raise HttpError(503, f"too many clients (limit {admission.max_clients} addresses)")

    def opened(self, client: str) -> str | None:
        """Count an admitted connection of `client`: the key for closed(), or None if not counted."""
        admission = self.admission
        return client if admission is not None and admission.opened(client) else None

    def closed(self, client: str) -> None:
        if self.admission is not None:
            self.admission.closed(client)

    def limit_messages(self, connection: Any, peer: Any) -> Any:
        """The stream end `connection` (a WsServerProtocol) sends its client's messages to:
        `peer` itself without a message rate, else `peer` behind the rate's bucket."""
        if self.message_rate is None:
            return peer
        rate, burst = self.message_rate
        return MessageRateLimit(self, connection, peer, rate, burst)

    def exceeded(self, connection: Any, end: Any) -> None:
        """`connection`'s client sent faster than its message rate: close 1008, tell the
        exit the same, and say so in an event."""
        self.rate_closes += 1
        rate, burst = self.message_rate or (0.0, 0)
        reason = "message rate exceeded"
        connection.stream_peer = None
        connection.stream_end(POLICY_VIOLATION, reason)
        end.stream_end(POLICY_VIOLATION, reason)
        events = self.observer.events if self.observer is not None else None
        if events is not None:
            client = connection.client_address or UNKNOWN_CLIENT
            events.emit(connection.trace_id, MESSAGE_RATE_EXCEEDED,
                        f"{connection.info.identity or '-'} {client} 1008 more than {rate:g} messages per second "
                        f"(burst {burst})")


@implementer(IStreamEnd)
class MessageRateLimit(TokenBucket):
    """The exit's stream end as a connection with a message rate sees it, and that
    connection's bucket: each message's first fragment takes a token (continuations, opcode
    0, are part of a message counted); without one the connection is closed (1008). Once it
    is, the connection no longer calls it (its stream peer is gone)."""

    __slots__ = ("_owner", "_connection", "_end", "_seconds", "stream_end", "pauseProducing", "resumeProducing",
                 "stopProducing")

    def __init__(self, owner: WsAdmission, connection: Any, end: Any, rate: float, burst: int) -> None:
        super().__init__(rate, burst, owner.reactor.seconds())
        self._owner = owner
        self._connection = connection
        self._end = end
        self._seconds = owner.reactor.seconds
        self.stream_end = end.stream_end
        self.pauseProducing, self.resumeProducing = end.pauseProducing, end.resumeProducing
        self.stopProducing = end.stopProducing

    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        if opcode and not self.take(self._seconds()):
            self._owner.exceeded(self._connection, self._end)
            return
        self._end.stream_data(opcode, payload, fin)

    def stream_deflated(self, opcode: int, payload: bytes, fin: bool) -> None:
        if opcode and not self.take(self._seconds()):
            self._owner.exceeded(self._connection, self._end)
            return
        self._end.stream_deflated(opcode, payload, fin)

"""An http client with `options.versions: [http/1.1, h2]`: which version it speaks to an
upstream, as Zilla's HttpClientFactory decides it when its network stream begins.

- Over a tls client: the protocol ALPN negotiated (the tls client offers its `options.alpn`,
  e.g. `[h2, http/1.1]`): `h2` is spoken as HTTP/2, anything else (`http/1.1`, or no ALPN)
  as HTTP/1.1.
- Over a tcp client (cleartext): the first request goes as HTTP/1.1 with `Upgrade: h2c`
  (RFC 7540 §3.2, Zilla's H2C encoder). An upstream that answers 101 is HTTP/2 from then on,
  that request its stream 1; any other answer is an HTTP/1.1 one (an HTTP/1.1-only server,
  Zilla's example's nginx, ignores the offer) and the upstream is HTTP/1.1. The requests
  that came meanwhile wait for that answer.

Per upstream (exit and authority) the version is learnt from its first connection (a
VersionProbe) and kept (not when the first request ended without an answer): later
requests go straight to its HTTP/1.1 pool or its HTTP/2 connection
(zillatw.bindings.http.client, h2client). A later connection that negotiates the
other one (the upstream changed) fails its request with 502, and the version is learnt anew.

The probe's connection is not wasted: its protocol is _Undecided until the version is known,
then becomes the pool's connection (the transport's calls are passed on to that protocol:
one call more per read, on that one connection). Requests that arrive while the probe
connects wait as a NegotiatingExchange: the http server's side is paused, what it sends
anyway is held (at most MAX_EARLY_BODY), then handed to the real exchange, to which the http
server's calls are passed on from then. Neither rebinds methods on a live object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
from twisted.internet import error
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.bindings.http import h2client
from zillatw.bindings.http.clientlimits import MAX_EARLY_BODY, MAX_POOLS, MAX_WAITING
from zillatw.stream import HttpHead, IHttpExchangeEnd, ISpliceSink, SpliceSink, StreamRefused, splice_sink_of
from zillatw.twistedcompat import PASS_THROUGH
from zillatw.wire.http1 import Response

if TYPE_CHECKING:
    from zillatw.bindings.http.client import Forwarder

MAX_HELD = 1 << 16  # bytes an upstream may send before its connection's version is known (h2's SETTINGS)


def negotiating(forwarder: "Forwarder", key: tuple[int, str], exit_: Any, authority: str, head: HttpHead,
                peer: IHttpExchangeEnd, trace_id: int) -> "NegotiatingExchange":
    """A request to an upstream whose version is not known yet: it waits for the probe."""
    probe = forwarder.probes.get(key)
    if probe is None:
        if len(forwarder.probes) >= MAX_POOLS:
            raise StreamRefused(503, "too many upstreams in use")
        probe = forwarder.probes[key] = VersionProbe(forwarder, key, exit_, authority)
    elif len(probe.waiting) >= MAX_WAITING:
        raise StreamRefused(503, "too many requests waiting for the upstream")
    exchange = NegotiatingExchange(forwarder, key, exit_, authority, head, peer, trace_id)
    probe.waiting.append(exchange)
    probe.start()
    return exchange


class _Undecided(Protocol):
    """A connection whose version is not known yet: it holds what the upstream sends."""

    def __init__(self) -> None:
        self.held = bytearray()
        self.lost = False
        self.reason: Failure | None = None
        self.taken_by: Protocol = self

    def dataReceived(self, data: bytes) -> None:
        taken_by = self.taken_by
        if taken_by is not self:
            taken_by.dataReceived(data)
            return
        self.held += data
        if len(self.held) > MAX_HELD:  # more than a greeting before any request: not an upstream
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        taken_by = self.taken_by
        if taken_by is not self:
            taken_by.connectionLost(reason)  # type: ignore[arg-type]  # Twisted always passes one
            return
        self.lost, self.reason = True, reason

    def become(self, protocol: Protocol) -> None:
        """From now on the connection is `protocol`'s: the transport's calls are passed on."""
        self.taken_by = protocol
        protocol.makeConnection(self.transport)

    def replay(self) -> None:
        """What the upstream sent before, to its protocol (once that is ready for it)."""
        held, self.held = bytes(self.held), bytearray()
        if held:
            self.taken_by.dataReceived(held)


PASS_THROUGH[_Undecided] = lambda wrapper: (wrapper.taken_by, None)


class _ProbeFactory(Factory):
    noisy = False

    def __init__(self) -> None:
        self.connection: _Undecided | None = None

    def buildProtocol(self, addr: Any) -> _Undecided:
        self.connection = _Undecided()
        return self.connection


class VersionProbe:
    """An upstream's first connection, and the requests waiting for it to say its version."""

    def __init__(self, forwarder: "Forwarder", key: tuple[int, str], exit_: Any, authority: str):
        self.forwarder, self.key, self.exit, self.authority = forwarder, key, exit_, authority
        self.waiting: list[NegotiatingExchange] = []
        self.factory = _ProbeFactory()
        self.connecting: Any = None
        self.started = False

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        self.connecting = self.exit.connect(self.factory, self.authority, self.forwarder.limits.connect_timeout)
        self.connecting.addCallbacks(self._connected, self._failed)

    def cancel(self) -> None:
        """Shutdown: the connection attempt ends (its requests are answered 502)."""
        if self.connecting is not None:
            self.connecting.cancel()

    def _settle(self, version: str | None, remember: bool = True,
                failure: tuple[int, str, str] | None = None) -> None:
        """The version is known (or the upstream is not reachable): the waiting requests go on."""
        self.connecting = None
        if self.forwarder.probes.get(self.key) is self:
            del self.forwarder.probes[self.key]
        waiting, self.waiting = self.waiting, []
        if version is not None and remember:
            self.forwarder.spoken[self.key] = version
        for exchange in waiting:
            if exchange.aborted:
                continue
            if failure is not None or version is None:
                exchange.failed(*(failure or (502, "the upstream went away", "")))
            else:
                exchange.decided(version)

    def _connected(self, _: Any) -> None:
        self.connecting = None
        shim = self.factory.connection
        if shim is None or shim.lost:
            self._settle(None, failure=(502, "the upstream went away", "closed while connecting"))
            return
        negotiated = getattr(shim.transport, "negotiatedProtocol", None)
        version = "h2" if negotiated == b"h2" else "http/1.1"
        forwarder = self.forwarder
        try:
            pool: Any = h2client.pool_of(forwarder, self.key, self.exit, self.authority) if version == "h2" \
                else forwarder.pool(self.key, self.exit, self.authority)
            pool.adopt(shim)  # the pool's own kind of connection takes it over
        except StreamRefused as e:  # too many upstreams in use
            shim.transport.loseConnection()  # type: ignore[union-attr]
            self._settle(None, failure=(e.status, e.reason, e.detail))
            return
        if version == "http/1.1" and not ISSLTransport.providedBy(shim.transport):
            self._offer_h2c(shim)
            return
        self._settle(version)

    # ---- cleartext: the first request offers the upgrade to h2c (RFC 7540 §3.2), as Zilla's

    def _offer_h2c(self, shim: _Undecided) -> None:
        """The first request goes as HTTP/1.1 with `Upgrade: h2c`; the others wait for its
        answer: a 101 makes the connection HTTP/2 (that request its stream 1), any other
        answer says HTTP/1.1 (an HTTP/1.1 server ignores the offer)."""
        first = next((exchange for exchange in self.waiting if not exchange.aborted), None)
        if first is None:
            self._settle("http/1.1", remember=False)
            return
        self.waiting.remove(first)
        self.shim, self.first = shim, first
        self.prepared = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        settings = (self.prepared.initiate_upgrade_connection() or b"").decode("ascii")  # a client's: never None
        first.decided("http/1.1", {"connection": "Upgrade, HTTP2-Settings", "upgrade": "h2c",
                                   "http2-settings": settings})
        if first.target is None:  # refused at once: no answer will come
            self._settle("http/1.1", remember=False)
        else:
            first.target.h2c = self

    def answered(self, exchange: Any, response: Response | None, rest: bytes) -> bool:
        """The first request's answer (None: it ended without one); True if the upstream
        switched to HTTP/2 and the request is now stream 1 of it."""
        exchange.h2c = None
        if response is None or response.status != 101 or response.headers.get("upgrade", "").lower() != "h2c":
            self._settle("http/1.1", remember=response is not None)
            return False
        if not exchange.request_done:  # RFC 7540 §3.2: the request is sent whole first
            exchange.upstream_failed(502, "the upstream's response was not valid HTTP",
                                     "switched to h2c before the request was sent")
            self._settle("http/1.1", remember=False)
            return True
        connection, pool = exchange.connection, exchange.pool
        connection.exchange, connection.lost = None, True  # it leaves the HTTP/1.1 pool, its socket kept
        connection._cancel_idle_timer()
        pool.connections.discard(connection)
        pool.total -= 1
        exchange.connection = None
        exchange._finish(reusable=False)  # timers only: it holds no connection now
        if exchange._client_paused:
            connection.transport.resumeProducing()
        try:
            h2_pool = h2client.pool_of(self.forwarder, self.key, self.exit, self.authority)
        except StreamRefused as e:
            connection.transport.abortConnection()
            exchange.peer.exchange_abort(e.status, e.reason, e.detail)
            self._settle("http/1.1", remember=False)
            return True
        stream = h2_pool.adopt_upgraded(self.shim, self.prepared, exchange.head, exchange.peer, b"")
        if exchange.validated:  # an invalid response resets stream 1
            exchange.peer.upstream = stream
            stream.validated = True
        self.first.hand_to(stream)  # the http server's calls reach stream 1 now
        if exchange._client_paused:
            stream.pauseProducing()
        self._settle("h2")
        if rest:
            h2_pool.connection.dataReceived(rest)  # type: ignore[union-attr]
        return True

    def _failed(self, failure: Failure) -> None:
        timed_out = failure.check(TimeoutError, error.TimeoutError) is not None
        detail = "shutting down" if failure.check(CancelledError) else failure.getErrorMessage()
        self._settle(None, failure=(504 if timed_out else 502, "the upstream did not answer in time" if timed_out
                                    else "the upstream could not be reached", detail))


@implementer(IHttpExchangeEnd, ISpliceSink)
class NegotiatingExchange:
    """A request waiting for its upstream's version; then the end of the real exchange."""

    def __init__(self, forwarder: "Forwarder", key: tuple[int, str], exit_: Any, authority: str,
                 head: HttpHead, peer: IHttpExchangeEnd, trace_id: int):
        self.forwarder, self.key, self.exit, self.authority = forwarder, key, exit_, authority
        self.head, self.peer, self.trace_id = head, peer, trace_id
        self.target: Any = None
        self.early: list[bytes] = []
        self.early_size = 0
        self.ended = self.aborted = self.client_paused = False
        peer.pauseProducing()  # until there is an upstream to send the body to

    def decided(self, version: str, extra: dict[str, str] | None = None) -> None:
        """Sent on in `version` (with `extra` headers: an h2c offer)."""
        if self.aborted:
            return
        self.peer.resumeProducing()  # the real exchange pauses it again if it must wait
        head = HttpHead({**self.head.headers, **extra}, self.head.length) if extra else self.head
        try:
            target = self.forwarder.open_on(version, self.key, self.exit, self.authority, head, self.peer,
                                            self.trace_id)
        except StreamRefused as e:
            self.failed(e.status, e.reason, e.detail)
            return
        self.hand_to(target)
        early, self.early = self.early, []
        for piece in early:
            target.exchange_data(piece)
        if self.ended:
            target.exchange_end()
        if self.client_paused:
            target.pauseProducing()

    def hand_to(self, target: Any) -> None:
        """From now on the http server's calls are passed on to `target`."""
        self.target = target

    def failed(self, status: int, reason: str, detail: str) -> None:
        if not self.aborted:
            self.aborted = True
            self.peer.exchange_abort(status, reason, detail)

    # ---- IHttpExchangeEnd: held until decided, then passed on to the real exchange

    def exchange_head(self, head: HttpHead) -> None:
        """Only a server's end takes a response head."""

    def splice_sink(self) -> SpliceSink | None:
        """The real exchange's, once there is one (ISpliceSink)."""
        return splice_sink_of(self.target) if self.target is not None else None

    def exchange_data(self, data: bytes) -> None:
        if self.target is not None:
            self.target.exchange_data(data)
            return
        if self.aborted:
            return
        self.early.append(data)
        self.early_size += len(data)
        if self.early_size > MAX_EARLY_BODY:  # the peer ignored its pause: not ours to hold
            self.failed(502, "the request body could not be held", "over the early-body bound")

    def exchange_end(self) -> None:
        if self.target is not None:
            self.target.exchange_end()
            return
        self.ended = True

    def exchange_abort(self, status: int, reason: str, detail: str) -> None:
        if self.target is not None:
            self.target.exchange_abort(status, reason, detail)
            return
        self.aborted = True  # the client went away: the probe goes on for the others

    def pauseProducing(self) -> None:
        if self.target is not None:
            self.target.pauseProducing()
            return
        self.client_paused = True

    def resumeProducing(self) -> None:
        if self.target is not None:
            self.target.resumeProducing()
            return
        self.client_paused = False

    def stopProducing(self) -> None:
        if self.target is not None:
            self.target.stopProducing()
            return
        self.aborted = True

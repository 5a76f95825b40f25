"""A fan group across gateways: the fan server's `options.redis` (ours), Redis pub/sub.

Each fan binding with `options.redis` keeps two Redis connections (txredisapi): one that
PUBLISHes what the group's exit sends back (with an echo exit: every member's message),
one SUBSCRIBEd to the channel, whose messages go to this gateway's members.

Exactly once, no echo storm: a gateway delivers its own group's messages to its own members
at once, then publishes each once, prefixed with `zw`, a version byte, its instance id (8 random bytes per
binding per process, so two workers on one host differ) and the opcode. On receipt a
gateway skips messages carrying its own id and delivers the others to its local members
only; it never publishes what it received. Per-publisher order is kept: a member's
messages are delivered locally and published in the order the exit returns them, on one
connection, and Redis hands one connection's PUBLISHes to every subscriber in that order.
Delivering local messages at once (rather than only when they come back from Redis) is
what keeps local members talking while Redis is down, with no mode switch that could
duplicate or reorder messages.

`rediss://` speaks TLS to Redis, verifying its certificate for the URL's host against the
fan's vault `trust` entries (`options.redis.trust`) or the system's CAs; a user and password
in the URL are sent with AUTH (Redis 6 ACLs). Neither is ever written to an event or log
line: those show `shown_url`, scheme, host and port only.

Redis down: local members keep talking; what is published meanwhile is dropped, not
queued (counted in `dropped`), so remote members miss it; the connections are retried with
exponential backoff (0.1 s up to `max-reconnect-delay`), and BINDING_FAN_REDIS_DISCONNECTED
/ BINDING_FAN_REDIS_CONNECTED event lines say when it went and came back. Pub/sub is
at most once: nothing is ever retried, so nothing is ever delivered twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.telemetry.events import BindingEvents

if TYPE_CHECKING:
    from zillatw.bindings.fan.redisproto import _Factory, _Publisher, _Subscriber

MAGIC = b"zw\x01"         # ours, version 1: magic, instance id, opcode, payload
ID_SIZE = 8
HEAD_SIZE = len(MAGIC) + ID_SIZE + 1
TEXT, BINARY = 0x1, 0x2
DEFAULT_PORT = 6379
MAX_DELAY = 10.0          # default `max-reconnect-delay`
CONNECT_TIMEOUT = 5.0


def parse_url(url: str) -> dict[str, Any]:
    """`redis[s]://[[user]:password@]host[:port][/db]` -> host, port, username, password,
    tls (rediss: TLS, the host's name verified). Raises ValueError with what is wrong, never
    naming the password. (The db number is accepted and ignored: Redis pub/sub channels are
    the same in every db.)"""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"expected a redis:// or rediss:// URL, got scheme '{parts.scheme or ''}'")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port in '{_without_credentials(url)}'") from None
    if not parts.hostname:
        raise ValueError(f"no host in '{_without_credentials(url)}'")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"expected a db number after the port, got '/{db}'")
    if parts.query or parts.fragment:
        raise ValueError("query and fragment are not supported")
    return {"host": parts.hostname, "port": port, "tls": parts.scheme == "rediss",
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password is not None else None}


def _without_credentials(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}" if "@" in rest.partition("/")[0] else url


def shown_url(url: str) -> str:
    """The URL without its credentials (user and password), for event and log lines."""
    parts = parse_url(url)
    return f"{'rediss' if parts['tls'] else 'redis'}://{parts['host']}:{parts['port']}"


def tls_creator(host: str, trust: Sequence[x509.Certificate] | None) -> Any:
    """rediss: TLS to `host`, its certificate verified for that name (service-identity)
    against `trust` (the fan's vault entries), or the system's CAs when none are given."""
    from twisted.internet import ssl
    root = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in trust]) \
        if trust else ssl.platformTrust()
    return ssl.optionsForClientTLS(host, trustRoot=root)


@implementer(IPushProducer)
class _PublisherFlow:
    """Registered on the publisher connection: Twisted pauses it when Redis does not read
    what we publish as fast as we write it."""

    def __init__(self, link: "RedisLink"):
        self.link = link

    def pauseProducing(self) -> None:
        self.link._set_full(True)

    def resumeProducing(self) -> None:
        self.link._set_full(False)

    def stopProducing(self) -> None:
        self.link._set_full(False)


class RedisLink:
    """One fan binding's Redis connections. `deliver(opcode, payload)` is called with the
    messages other gateways published; `on_full(bool)` when publishing has to wait."""

    log = Logger()

    def __init__(self, url: str, channel: str, max_delay: float = MAX_DELAY,
                 events: BindingEvents | None = None, *, reactor: Any,
                 trust: Sequence[x509.Certificate] | None = None):
        self.url = url
        self.parts = parse_url(url)
        # rediss: made once, shared by both connections and every reconnection
        self.tls = tls_creator(self.parts["host"], trust) if self.parts["tls"] else None
        self.channel = channel.encode()
        self.max_delay = max_delay
        self.events = events
        self.reactor = reactor
        self.instance = os.urandom(ID_SIZE)
        self._own = MAGIC + self.instance
        self._prefixes = {opcode: self._own + bytes([opcode]) for opcode in range(16)}
        self.deliver: Callable[[int, bytes], None] = lambda opcode, payload: None
        self.on_full: Callable[[bool], None] = lambda full: None
        self.publisher: "_Publisher | None" = None
        self.subscriber: "_Subscriber | None" = None
        self.up = False           # both connections ready (and subscribed)
        self.full = False         # the publisher's socket is full
        self.receiving = True     # the subscriber's socket is read
        self._reported_down = False
        self._stopping = False
        self._last_failure: str | None = None  # why a connection that never got ready was lost
        self._factories: list[_Factory] = []
        self._connection_error: type[Exception] = Exception  # txredisapi's, once started
        # counters, read by metrics (see `samples`)
        self.published = self.received = self.dropped = self.disconnects = self.foreign = 0

    # ---- lifecycle (the gateway's startService / stopService)

    def start(self) -> None:
        if self._factories:
            return
        self._stopping = False
        # txredisapi imports the global reactor when it is imported: only now, once the
        # gateway runs (twistd zillaws has installed zillatw's reactor by then).
        from zillatw.bindings.fan import redisproto
        self._connection_error = redisproto.ConnectionError
        for protocol in (redisproto._Publisher, redisproto._Subscriber):
            factory = redisproto._Factory(self, protocol, self.parts)
            self._factories.append(factory)
            endpoint: Any = HostnameEndpoint(self.reactor, self.parts["host"], self.parts["port"],
                                             timeout=CONNECT_TIMEOUT)
            if self.tls is not None:
                endpoint = wrapClientTLS(self.tls, endpoint)
            factory.startConnecting(endpoint)

    def stop(self) -> defer.Deferred:
        self._stopping = True
        publisher = self.publisher
        if publisher is not None and publisher.transport is not None:
            # TLS (rediss) holds its close_notify until no producer is registered
            publisher.transport.unregisterProducer()
        factories, self._factories = self._factories, []
        self.publisher = self.subscriber = None
        self.up = False
        return defer.gatherResults([f.disconnect() for f in factories], consumeErrors=True) \
            .addErrback(lambda failure: None)

    # ---- data

    def publish(self, opcode: int, payload: bytes) -> None:
        publisher = self.publisher
        if publisher is None:
            self.dropped += 1
            return
        try:
            sent = publisher.publish(self.channel, self._prefixes[opcode] + payload)
        except self._connection_error:  # lost in this very turn, before we were told
            self.dropped += 1
            return
        self.published += 1
        sent.addErrback(_ignore)

    def _received(self, message: bytes) -> None:
        if message.startswith(self._own):
            return  # ours, delivered locally when published
        opcode = message[HEAD_SIZE - 1] if len(message) >= HEAD_SIZE else 0
        if not message.startswith(MAGIC) or opcode not in (TEXT, BINARY):
            self.foreign += 1  # not a zillatw fan's message: never handed to members
            return
        self.received += 1
        self.deliver(opcode, message[HEAD_SIZE:])

    def pause_receiving(self, paused: bool) -> None:
        """Stop reading the subscription while no local member can take more (Redis then
        buffers for us, up to its client-output-buffer-limit for pubsub, then drops us)."""
        self.receiving = not paused
        subscriber = self.subscriber
        if subscriber is not None and subscriber.transport is not None:
            if paused:
                subscriber.transport.pauseProducing()
            else:
                subscriber.transport.resumeProducing()

    def _set_full(self, full: bool) -> None:
        if full != self.full:
            self.full = full
            self.on_full(full)

    # ---- connection state

    def _ready(self, protocol: Any) -> None:
        if self._stopping:
            return
        if protocol.is_publisher:  # a PING proves it may publish (no NOAUTH)
            protocol.ping().addCallbacks(lambda _: self._publishing(protocol),
                                         lambda failure: self._refused(protocol, failure))
        else:
            protocol.subscribe([self.channel]).addCallbacks(lambda _: self._subscribed(protocol),
                                                            lambda failure: self._refused(protocol, failure))

    def _refused(self, protocol: Any, failure: Any) -> None:
        """Redis answered with an error (NOAUTH, an ACL refusing the channel): drop the
        connection and try again after the backoff."""
        if not self._stopping and protocol.connected:
            self._down(f"refused: {failure.getErrorMessage()}")
            protocol.transport.loseConnection()

    def _publishing(self, protocol: "_Publisher") -> None:
        if self._stopping or not protocol.connected:
            return
        self.publisher = protocol
        protocol.transport.registerProducer(_PublisherFlow(self), True)
        self._check_up()

    def _subscribed(self, protocol: "_Subscriber") -> None:
        if self._stopping or not protocol.connected:
            return
        self.subscriber = protocol
        if not self.receiving:
            protocol.transport.pauseProducing()
        self._check_up()

    def _check_up(self) -> None:
        if not self.up and self.publisher is not None and self.subscriber is not None:
            self.up = True
            self._reported_down = False
            if self.events is not None:
                self.events.emit(0, "BINDING_FAN_REDIS_CONNECTED",
                                 f"- {shown_url(self.url)} {self.channel.decode()}")

    def _lost(self, protocol: Any, why: Any) -> None:
        if protocol is self.publisher:
            self.publisher = None
            self._set_full(False)
        elif protocol is self.subscriber:
            self.subscriber = None
        else:  # one that never got ready (a TLS handshake refused): its factory's retryDelay reports it
            self._last_failure = why.getErrorMessage() if isinstance(why, Failure) else str(why)
            return
        if not self._stopping:
            reason = why.getErrorMessage() if isinstance(why, Failure) else str(why)
            self._down(f"connection lost ({reason})")

    def _down(self, reason: str) -> None:
        if self._stopping:
            return
        password = self.parts["password"]
        if password:  # whatever a library or Redis put in its message, the password stays out
            reason = reason.replace(password, "***")
        if self.up:
            self.up = False
            self.disconnects += 1
        elif self._reported_down:
            return
        self._reported_down = True
        self.log.warn("zillatw: fan {channel}: Redis at {url} unavailable ({reason}); reconnecting",
                      channel=self.channel.decode(), url=shown_url(self.url), reason=reason)
        if self.events is not None:
            self.events.emit(0, "BINDING_FAN_REDIS_DISCONNECTED",
                             f"- {shown_url(self.url)} {self.channel.decode()} {reason}; reconnecting")

    def samples(self) -> Iterator[tuple[str, str, str, float]]:
        """(metric, type, help, value) for the prometheus exporter."""
        yield "zillatw_fan_redis_connected", "gauge", "1 while both Redis connections are up", float(self.up)
        yield ("zillatw_fan_redis_disconnects", "counter", "times the Redis connections went down",
               self.disconnects)
        yield ("zillatw_fan_redis_messages_published", "counter", "messages published to Redis",
               self.published)
        yield ("zillatw_fan_redis_messages_received", "counter",
               "messages received from other gateways through Redis", self.received)
        yield ("zillatw_fan_redis_messages_dropped", "counter",
               "messages not published because Redis was down (local members got them)", self.dropped)
        yield ("zillatw_fan_redis_messages_foreign", "counter",
               "messages on the channel not from a zillatw fan, ignored", self.foreign)


def _ignore(failure: Any) -> None:
    """A publish or subscribe whose connection went away: the connection's loss is reported."""

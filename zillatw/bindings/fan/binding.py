"""fan server: every connection routed here joins one group per fan binding. The group opens
one stream to the exit (echo, for reflect); what comes back goes to every member, the
sender included.

Members' messages are forwarded whole, so two members' fragments never interleave.

Flow: the group goes at the pace of its fastest member. While every member's socket is full,
the publishers are the ones too fast, so the group stops reading from all members. A member
that falls behind the others is not allowed to hold them back: once its socket is full, at
most `max-lag` more bytes and `max-lag-messages` more messages are queued for it, then it is
evicted: closed with 1013 (try again later) behind that bounded backlog, which it has
`drain-timeout` seconds to read before its socket is aborted (see docs/fan.md).

Byte streams (issue 15: Zilla's tcp.reflect and tls.reflect): a tcp or tls server's
connection joins the same group (IBytesExit). A byte stream has no message boundaries: each
chunk as it was read is one unit, published as one BINARY message (to the exit, to Redis, to
every member); a byte member is sent each unit's payload, with nothing added. The flow and
eviction rules are the ws members': an evicted byte member's connection is closed behind its
bounded backlog, and aborted if not read within `drain-timeout`.

Scale-out (ours): with `options.redis` the group spans every gateway on the same Redis
channel. What the exit sends back is delivered to the local members at once and published
once to Redis; what other gateways publish is delivered to the local members (see
zillatw.bindings.fan.redis). While Redis cannot take what we publish, or while every local member is
congested, the group stops reading its members (and the subscription).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from zillatw.bindings.fan.redis import MAX_DELAY, RedisLink, parse_url
from zillatw.bytestream import ByteStreams
from zillatw.config import BindingConfig
from zillatw.config.plugins import BindingType, IDrainsGracefully, IRunsInBackground
from zillatw.config.schema import FORBIDDEN
from zillatw.errors import ConfigError
from zillatw.stream import (
    BINARY,
    CONTINUATION,
    IBytesEnd,
    IBytesExit,
    IEvictableEnd,
    IStreamEnd,
    IStreamExit,
    StreamInfo,
)

MAX_LAG = 4 * 1024 * 1024  # bytes queued for a member whose socket is full
MAX_LAG_MESSAGES = 4096    # ... and messages (each a Python object in the transport's buffer)
DRAIN_TIMEOUT = 10.0       # seconds an evicted member has to read its backlog and the 1013
SLOW = 1013                # close code: try again later (RFC 6455 §7.4.1, IANA registry)

SCHEMA_PATCH = {
    "required": ["exit"],
    "properties": {
        "kind": {"enum": ["server"]},
        # ours: the group across gateways, through Redis pub/sub
        "options": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "max-lag": {"type": "integer", "minimum": 0},
                "max-lag-messages": {"type": "integer", "minimum": 0},
                "drain-timeout": {"type": "number", "exclusiveMinimum": 0},
                "redis": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["url"],
                    "properties": {
                        "url": {"type": "string"},             # redis[s]://[[user]:password@]host[:port][/db]
                        "channel": {"type": "string", "minLength": 1},  # default zillatw:fan:<ns>:<binding>
                        "max-reconnect-delay": {"type": "number", "exclusiveMinimum": 0},
                        # rediss: trust entries of the binding's vault (default: the system's CAs)
                        "trust": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    },
                },
            },
        },
        "vault": {"type": "string"},  # ours: the trust for options.redis (rediss)
        "routes": FORBIDDEN, "catalog": FORBIDDEN,
    },
}
STREAMS = {"server": (("messages", "bytes"), "messages")}


@implementer(IStreamEnd)
class FanMember:
    """A member's stream end: receives what its connection sends, delivers the group's."""

    __slots__ = ("group", "peer", "_parts", "_opcode", "_paused", "_lag", "_lag_messages", "__weakref__")

    def __init__(self, group: "FanGroup", peer: IStreamEnd):
        self.group = group
        self.peer = peer
        self._parts: list[bytes] = []
        self._opcode = 0
        self._paused = False
        self._lag = 0            # bytes and messages queued since its socket filled up
        self._lag_messages = 0

    # from the member's connection
    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        if opcode != CONTINUATION:
            self._opcode = opcode
            if fin:
                self.group.publish(opcode, payload)
                return
            self._parts = [payload]
            return
        self._parts.append(payload)
        if fin:
            parts, self._parts = self._parts, []
            self.group.publish(self._opcode, b"".join(parts))

    def stream_end(self, code: int, reason: str) -> None:
        self.group.leave(self)

    # to the member's connection
    def deliver(self, opcode: int, payload: bytes, fin: bool) -> None:
        if self._paused:
            self._lag += len(payload)
            self._lag_messages += 1
            server = self.group.server
            if self._lag > server.max_lag or self._lag_messages > server.max_lag_messages:
                self.group.evict(self)
                return
        self.peer.stream_data(opcode, payload, fin)

    # the member's socket is full / drained
    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            self.group.congestion(+1)

    def resumeProducing(self) -> None:
        self._lag = self._lag_messages = 0
        if self._paused:
            self._paused = False
            self.group.congestion(-1)

    def stopProducing(self) -> None:
        self.group.leave(self)


@implementer(IStreamEnd)
class FanGroup:
    """The group's stream end toward the exit: what the exit sends is fanned out."""

    def __init__(self, server: "FanServer"):
        self.server = server
        self.members: dict[FanMember, None] = {}  # insertion order, O(1) leave
        self.upstream: IStreamEnd | None = None
        self.waiting: list[Deferred] | None = None
        self.congested = 0      # members whose socket is full
        self.reading = True     # whether members' sockets are being read
        self._opcode = 0        # a fragmented message from the exit, to publish whole
        self._parts: list[bytes] = []

    def congestion(self, change: int) -> None:
        self.congested += change
        self._pace()

    def _pace(self) -> None:
        """Stop reading publishers while every member is congested (or Redis cannot take what
        we publish); read again once one is not."""
        all_congested = bool(self.members) and self.congested >= len(self.members)
        redis = self.server.redis
        if redis is not None:
            if all_congested == redis.receiving:
                redis.pause_receiving(all_congested)
            all_congested = all_congested or redis.full
        if all_congested == self.reading:
            self.reading = not all_congested
            for member in self.members:
                if all_congested:
                    member.peer.pauseProducing()
                else:
                    member.peer.resumeProducing()

    def publish(self, opcode: int, payload: bytes) -> None:
        if self.upstream is not None:
            self.upstream.stream_data(opcode, payload, True)

    def leave(self, member: FanMember) -> None:
        if self.members.pop(member, False) is None:
            if member._paused:
                self.congested -= 1
            self._pace()

    def evict(self, member: FanMember) -> None:
        self.leave(member)
        reason = "fan member too slow: messages were not read in time"
        # A ws connection lets the member read its backlog and the 1013 before it closes;
        # any other stream end just ends.
        if IEvictableEnd.providedBy(member.peer):
            member.peer.stream_evicted(SLOW, reason, self.server.drain_timeout)
        else:
            member.peer.stream_end(SLOW, reason)

    # from the exit
    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        for member in list(self.members):
            member.deliver(opcode, payload, fin)
        redis = self.server.redis
        if redis is not None:  # published whole, once
            if opcode != CONTINUATION:
                if fin:
                    redis.publish(opcode, payload)
                    return
                self._opcode, self._parts = opcode, [payload]
                return
            self._parts.append(payload)
            if fin:
                parts, self._parts = self._parts, []
                redis.publish(self._opcode, b"".join(parts))

    def remote(self, opcode: int, payload: bytes) -> None:
        """A message another gateway's group published: to the local members only."""
        for member in list(self.members):
            member.deliver(opcode, payload, True)

    def stream_end(self, code: int, reason: str) -> None:
        members, self.members = self.members, {}
        self.upstream = None
        if self.server.group is self:
            self.server.group = None
        for member in members:
            member.peer.stream_end(code, reason)

    def pauseProducing(self) -> None:
        for member in self.members:
            member.peer.pauseProducing()

    def resumeProducing(self) -> None:
        for member in self.members:
            member.peer.resumeProducing()

    def stopProducing(self) -> None:
        self.stream_end(1001, "fan group's exit went away")


@implementer(IEvictableEnd)
class _BytesPeer:
    """A byte member's connection as the group sees it: each unit goes out as its bytes."""

    __slots__ = ("peer", "server", "deadline", "pauseProducing", "resumeProducing", "stopProducing")

    def __init__(self, peer: IBytesEnd, server: "FanServer"):
        self.peer = peer
        self.server = server
        self.deadline: Any = None  # an evicted member's drain-timeout
        self.pauseProducing = peer.pauseProducing
        self.resumeProducing = peer.resumeProducing
        self.stopProducing = peer.stopProducing

    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        self.peer.bytes_data(payload)

    def stream_end(self, code: int, reason: str) -> None:
        self.server.byte_streams.remove(self.peer)
        self.peer.bytes_end(reason)

    def stream_evicted(self, code: int, reason: str, drain_timeout: float) -> None:
        """Closed behind its backlog (bounded by max-lag); aborted if not read in time."""
        self.stream_end(code, reason)
        if self.server.reactor is not None:
            self.deadline = self.server.reactor.callLater(drain_timeout, self.peer.stopProducing)

    def gone(self) -> None:
        """Its connection is closed: no deadline left to keep."""
        deadline, self.deadline = self.deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()


@implementer(IBytesEnd)
class _BytesMember:
    """A byte member's end, which its connection calls: each chunk is one unit."""

    __slots__ = ("member", "peer", "server")

    def __init__(self, member: FanMember, peer: IBytesEnd, server: "FanServer"):
        self.member = member
        self.peer = peer
        self.server = server

    def bytes_data(self, data: bytes) -> None:
        self.member.stream_data(BINARY, data, True)

    def bytes_end(self, reason: str) -> None:
        self.server.byte_streams.remove(self.peer)
        group_side = self.member.peer
        if isinstance(group_side, _BytesPeer):
            group_side.gone()
        self.member.stream_end(1000, reason)

    def pauseProducing(self) -> None:
        self.member.pauseProducing()

    def resumeProducing(self) -> None:
        self.member.resumeProducing()

    def stopProducing(self) -> None:
        self.member.stopProducing()


@implementer(IStreamExit, IBytesExit, IRunsInBackground, IDrainsGracefully)
class FanServer:
    def __init__(self, name: str, exit_: Any, max_lag: int = MAX_LAG, redis: RedisLink | None = None,
                 max_lag_messages: int = MAX_LAG_MESSAGES, drain_timeout: float = DRAIN_TIMEOUT,
                 reactor: Any = None):
        self.name = name
        self.reactor = reactor  # for an evicted byte member's deadline
        self.byte_streams = ByteStreams()  # its byte members' connections (ws members are their server's)
        self.exit = exit_
        self.max_lag = max_lag
        self.max_lag_messages = max_lag_messages
        self.drain_timeout = drain_timeout
        self.group: FanGroup | None = None
        self.redis = redis
        if redis is not None:
            redis.deliver = self._remote
            redis.on_full = self._redis_full

    def _remote(self, opcode: int, payload: bytes) -> None:
        group = self.group
        if group is not None and group.waiting is None:
            group.remote(opcode, payload)

    def _redis_full(self, full: bool) -> None:
        if self.group is not None:
            self.group._pace()

    # the gateway's startService/stopService
    def start_service(self) -> None:
        if self.redis is not None:
            self.redis.start()

    def stop_service(self) -> Deferred | None:
        return self.redis.stop() if self.redis is not None else None

    def open(self, info: StreamInfo, peer: IStreamEnd) -> FanMember | Deferred:
        group = self.group
        if group is None:
            group = self.group = FanGroup(self)
            opened = self.exit.open(info, group)  # StreamRefused propagates to this member
            if isinstance(opened, Deferred):
                group.waiting = []
                opened.addCallbacks(lambda upstream: self._ready(group, upstream),
                                    lambda failure: self._failed(group, failure))
            else:
                group.upstream = opened
        member = FanMember(group, peer)
        if group.waiting is not None:
            waiter: Deferred = Deferred()
            group.waiting.append(waiter)
            return waiter.addCallback(lambda _: self._join(group, member))
        return self._join(group, member)

    def open_bytes(self, info: StreamInfo, peer: IBytesEnd) -> "_BytesMember | Deferred":
        joined = self.open(info, _BytesPeer(peer, self))
        self.byte_streams.add(peer)
        if isinstance(joined, Deferred):
            def failed(failure: Any) -> Any:
                self.byte_streams.remove(peer)
                return failure
            return joined.addCallbacks(lambda member: _BytesMember(member, peer, self), failed)
        return _BytesMember(joined, peer, self)

    # the gateway's stop (IDrainsGracefully), for its byte members
    def open_count(self) -> int:
        return self.byte_streams.open_count()

    def going_away(self) -> None:
        self.byte_streams.going_away()

    def drop_all(self) -> None:
        self.byte_streams.drop_all()

    def _join(self, group: FanGroup, member: FanMember) -> FanMember:
        group.members[member] = None
        reading = group.reading
        group._pace()
        if not reading and not group.reading:  # still held back (Redis full): so is the newcomer
            member.peer.pauseProducing()
        return member

    def _ready(self, group: FanGroup, upstream: IStreamEnd) -> None:
        group.upstream = upstream
        waiting, group.waiting = group.waiting or [], None
        for waiter in waiting:
            waiter.callback(None)

    def _failed(self, group: FanGroup, failure: Any) -> None:
        if self.group is group:
            self.group = None
        waiting, group.waiting = group.waiting or [], None
        for waiter in waiting:
            waiter.errback(failure)

    def members(self) -> int:
        return len(self.group.members) if self.group else 0


def check(binding: BindingConfig) -> Any:
    redis = binding.options.get("redis")
    if redis is None:
        if binding.vault:
            yield "vault", "a fan's vault holds the trust for options.redis (rediss://), which it has not"
        return
    try:
        tls = parse_url(redis["url"])["tls"]
    except ValueError as e:
        yield "options.redis.url", str(e)
        return
    if "trust" in redis:
        if not tls:
            yield "options.redis.trust", "trust is for a rediss:// URL (TLS); this one is redis://"
        elif not binding.vault:
            yield "options.redis.trust", "names trust entries of the binding's vault, and it has no 'vault'"
    elif binding.vault:
        yield "vault", "unused: give options.redis.trust (the aliases of its trust entries to verify Redis with)"


def _redis_trust(binding: BindingConfig, graph: Any) -> list[Any] | None:
    """The certificates options.redis.trust names in the fan's vault (None: the system's)."""
    aliases = binding.options["redis"].get("trust")
    if not aliases:
        return None
    vault = graph.vault(binding.namespace, binding.vault)
    where = (f"{binding.namespace}: " if len(graph.config.namespaces) > 1 else "") + f"bindings.{binding.name}"
    problems, certificates = [], []
    for index, alias in enumerate(aliases):
        if alias not in vault.aliases("trust"):
            problems.append(f"{where}.options.redis.trust[{index}]: no trust entry '{alias}' in vault "
                            f"'{binding.vault}' (it has: {', '.join(vault.aliases('trust')) or 'none'})")
        else:
            certificates.extend(vault.certificates("trust", alias))
    if problems:
        raise ConfigError(problems)
    return certificates


def default_channel(binding: BindingConfig) -> str:
    return f"zillatw:fan:{binding.namespace}:{binding.name}"


def build(binding: BindingConfig, graph: Any) -> FanServer:
    redis = None
    options = binding.options.get("redis")
    if options is not None:
        events = graph.events(binding.namespace)
        redis = RedisLink(options["url"], options.get("channel") or default_channel(binding),
                          options.get("max-reconnect-delay", MAX_DELAY),
                          events.binding(binding.namespace, binding.name, "fan") if events.enabled else None,
                          reactor=graph.reactor, trust=_redis_trust(binding, graph))
        if graph.metrics is not None:  # its prometheus exporter serves the link's counters
            graph.metrics.add_samples(binding.namespace, binding.name, redis)
    return FanServer(binding.name, graph.exit(binding.exit, binding), redis=redis,
                     max_lag=binding.options.get("max-lag", MAX_LAG),
                     max_lag_messages=binding.options.get("max-lag-messages", MAX_LAG_MESSAGES),
                     drain_timeout=binding.options.get("drain-timeout", DRAIN_TIMEOUT), reactor=graph.reactor)


PLUGIN = BindingType("fan", SCHEMA_PATCH, STREAMS, build, check=check)

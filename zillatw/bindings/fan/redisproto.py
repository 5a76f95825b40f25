"""txredisapi's protocols and factory for a fan's Redis link (zillatw.bindings.fan.redis).

Apart from redis.py because txredisapi does `from twisted.internet import reactor` when it is
imported, which installs Twisted's default reactor: importing it with the rest of the fan
binding made every `twistd zillaws` run on that reactor instead of zillatw's
(zillatw.runtime.reactor). `RedisLink.start` imports this module, once the reactor runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import txredisapi
from twisted.internet import defer

if TYPE_CHECKING:
    from zillatw.bindings.fan.redis import RedisLink

ConnectionError = txredisapi.ConnectionError
INITIAL_DELAY = 0.1  # seconds before the first reconnection attempt


def _ignore(failure: Any) -> None:
    """txredisapi's own Deferreds fail when a connection goes: the link reports that itself."""


class _Publisher(txredisapi.RedisProtocol):
    link: "RedisLink"
    is_publisher = True

    def connectionLost(self, why: Any) -> None:
        super().connectionLost(why)
        self.link._lost(self, why)


class _Subscriber(txredisapi.SubscriberProtocol):
    link: "RedisLink"
    is_publisher = False

    def messageReceived(self, pattern: Any, channel: Any, message: bytes) -> None:
        self.link._received(message)

    def connectionLost(self, why: Any) -> None:
        super().connectionLost(why)
        self.link._lost(self, why)


class _Factory(txredisapi.RedisFactory):
    initialDelay = INITIAL_DELAY

    def __init__(self, link: "RedisLink", protocol: type, parts: Mapping[str, Any]):
        super().__init__(None, None, 1, isLazy=True, charset=None, password=parts["password"],
                         convertNumbers=True, username=parts["username"])
        self.link = link
        self.protocol = protocol
        self.maxDelay = link.max_delay
        self.deferred.addErrback(_ignore)  # fired by txredisapi for its "connect once" users

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        protocol.link = self.link
        protocol.whenConnected().addCallback(self.link._ready)
        return protocol

    def retryDelay(self, attempt: int) -> float:
        failure, self.link._last_failure = self.link._last_failure, None  # a failed attempt (reported once per outage)
        self.link._down(f"cannot connect ({failure})" if failure else "cannot connect")
        return super().retryDelay(attempt)

    def connectionError(self, why: str) -> None:  # e.g. AUTH refused
        self.link._down(why)
        super().connectionError(why)

    def stopTrying(self) -> defer.Deferred:
        """txredisapi gives up for good when AUTH is refused; we keep retrying with the
        backoff (a password or ACL fixed on the Redis side then just works)."""
        if self.link._stopping:
            return super().stopTrying()
        return defer.succeed(None)

"""An http client's limits (`max-connections`, `idle-timeout`, `response-timeout`) and the
bounds of its pools, shared by its HTTP/1.1 (client) and HTTP/2 (h2client) upstreams."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_CONNECTIONS = 32     # per upstream (exit and authority) of one http client
IDLE_TIMEOUT = 30.0      # seconds a pooled connection stays open unused
RESPONSE_TIMEOUT = 30.0  # seconds from a request's arrival to its response head; and of body silence
CONNECT_TIMEOUT = 10.0   # seconds to connect upstream (and finish TLS)
MAX_WAITING = 1024       # requests waiting for a pooled connection, per upstream
MAX_POOLS = 256          # upstreams (authorities) one http client keeps pools for
MAX_EARLY_BODY = 1 << 20  # request body bytes held before the upstream connects (one read's worth)

CLIENT_OPTIONS: dict[str, Any] = {
    "max-connections": {"type": "integer", "minimum": 1},
    "response-timeout": {"type": "number", "exclusiveMinimum": 0},
}


@dataclass(frozen=True)
class ClientLimits:
    max_connections: int = MAX_CONNECTIONS
    idle_timeout: float = IDLE_TIMEOUT
    response_timeout: float = RESPONSE_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> "ClientLimits":
        return cls(options.get("max-connections", MAX_CONNECTIONS), options.get("idle-timeout", IDLE_TIMEOUT),
                   options.get("response-timeout", RESPONSE_TIMEOUT))


"""The http server's routes: a request as Zilla sees it (pseudo-headers and lower-cased
headers), matched against each route's `when` headers, guards checked in route order."""

from __future__ import annotations

from typing import Any

from zillatw.bindings.http import admission
from zillatw.config import Route
from zillatw.guards import Session, permits
from zillatw.matching import Matcher, matcher
from zillatw.wire.http1 import Request

# Header values that HTTP defines as case-insensitive tokens (RFC 6455 §4.2.1: `Upgrade:
# WebSocket` is a valid upgrade, and Autobahn clients send it). Zilla matches every value
# case-sensitively, so its `upgrade: websocket` route would refuse them; we do not.
CASELESS_HEADERS = frozenset({"upgrade", "connection"})


def _header_matcher(name: str, pattern: str) -> Matcher:
    if name in CASELESS_HEADERS:
        match = matcher(pattern.lower(), named_groups=True)
        return lambda value: value is not None and match(value.lower())
    return matcher(pattern, named_groups=True, query_tail=name == ":path")


def pseudo_headers(request: Request, secure: bool) -> dict[str, str]:
    """Zilla's view of a request: pseudo-headers plus the lower-cased headers."""
    scheme = "https" if secure else "http"
    headers = dict(request.headers)
    host = headers.get("host")
    if host is not None:
        headers[":authority"] = admission.authority_with_port(host, secure)
    headers[":method"] = request.method
    headers[":scheme"] = scheme
    headers[":path"] = request.target
    return headers


class HeaderRoutes:
    """Routes on headers (pseudo-headers included): all of a `when` entry's must match."""

    def __init__(self, routes: list[tuple[Route, Any]], namespace: str = "default"):
        self._routes: list[tuple[list[list[tuple[str, Matcher]]], Any, Any]] = []
        self._namespace = namespace
        for route, exit_ in routes:
            alternatives = [[(name.lower(), _header_matcher(name.lower(), pattern))
                             for name, pattern in (w.get("headers") or {}).items()] for w in route.when]
            self._routes.append((alternatives, exit_, route.guarded))

    def unconditional(self) -> Any | None:
        """The exit every request goes to, when the first route has no conditions and no
        guard; else None (the request decides)."""
        if self._routes and not self._routes[0][0] and not self._routes[0][2]:
            return self._routes[0][1]
        return None

    def route(self, headers: dict[str, str], session: Session | None = None) -> Any | None:
        """The first route's exit whose headers match and whose guards the session satisfies."""
        for alternatives, exit_, guarded in self._routes:
            if guarded and not permits(guarded, session, self._namespace, headers):
                continue  # Zilla: a failing guard falls through to the next route
            if not alternatives or any(all(match(headers.get(name)) for name, match in conditions)
                                       for conditions in alternatives):
                return exit_
        return None

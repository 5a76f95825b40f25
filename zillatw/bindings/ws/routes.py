"""Zilla's ws route resolution (by subprotocol, scheme, authority and path, then guards),
shared by the ws server and the ws client (zillatw.bindings.ws.binding)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zillatw.config import Route
from zillatw.guards import Session, permits
from zillatw.matching import matcher

FIELDS = ("protocol", "scheme", "authority", "path")  # what a ws route's `when` matches, in order


class WsRoutes:
    """Zilla's ws route resolution, shared by server and client."""

    def __init__(self, routes: list[tuple[Route, Any]], namespace: str = "default"):
        self._routes = []
        self._namespace = namespace
        # whether a route names the subprotocol: one that does not lets the exit choose (issue 15)
        self.fixes_protocol: list[bool] = []
        for route, exit_ in routes:
            alternatives = [tuple(matcher(w.get(k)) for k in FIELDS) for w in route.when]
            self._routes.append((alternatives, exit_, route.guarded))
            self.fixes_protocol.append(any(w.get("protocol") is not None for w in route.when))

    def resolve(self, protocol: str | None, scheme: str | None, authority: str | None,
                path: str | None, session: Session | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, Any] | None:
        """The first route (index, exit) whose conditions match and whose guards the session
        satisfies, as Zilla's resolve(); dynamic roles are resolved against the request's
        `headers` (Zilla's ws binding leaves them as written)."""
        for index, (alternatives, exit_, guarded) in enumerate(self._routes):
            if guarded and not permits(guarded, session, self._namespace, headers):
                continue
            if not alternatives or any(p(protocol) and s(scheme) and a(authority) and q(path)
                                       for p, s, a, q in alternatives):
                return index, exit_
        return None

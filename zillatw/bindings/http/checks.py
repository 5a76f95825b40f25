"""The http binding's configuration checks beyond its schema: overrides, the server's and
the client's options, the guard an authorization names (zillatw.bindings.http.binding
registers them)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from zillatw.bindings.http import accesscontrol, clientaddress
from zillatw.bindings.http.auth import PLACEHOLDER
from zillatw.bindings.http.clientlimits import CLIENT_OPTIONS
from zillatw.config import BindingConfig

UNSERVED_OPTIONS: dict[str, str] = {}  # Zilla's, refused by name

# What an override may set. On the server, after routing, only what its exit (a ws server)
# reads of the request: a header nothing reads would be accepted and ignored. On the client,
# the upstream upgrade request's target, authority and extra headers.
SERVER_OVERRIDES = frozenset({":scheme", ":authority", ":path", "origin"})
CLIENT_PSEUDO_OVERRIDES = frozenset({":authority", ":path"})
HANDSHAKE_HEADERS = frozenset({"host", "upgrade", "connection", "content-length", "transfer-encoding",
                               "sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol",
                               "sec-websocket-extensions", "sec-websocket-accept"})
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _check_overrides(binding: BindingConfig) -> Iterator[tuple[str, str]]:
    for name, value in (binding.options.get("overrides") or {}).items():
        where, lowered = f"options.overrides.{name}", name.lower()
        if any(c in value for c in "\r\n\0"):
            yield where, "a header value cannot hold CR, LF or NUL"
        if lowered in HANDSHAKE_HEADERS:
            yield where, ("override ':authority' instead" if lowered == "host"
                          else "a header of the WebSocket handshake itself cannot be overridden")
        elif binding.kind == "server" and lowered not in SERVER_OVERRIDES:
            yield where, (f"an http server's overrides reach its exit, a ws server, which reads only "
                          f"{', '.join(sorted(SERVER_OVERRIDES))} of a request (as Zilla's ws server, it passes "
                          "no other header on)")
        elif binding.kind == "client" and lowered.startswith(":") and lowered not in CLIENT_PSEUDO_OVERRIDES:
            yield where, (f"an upstream upgrade request takes {' and '.join(sorted(CLIENT_PSEUDO_OVERRIDES))} "
                          "of the pseudo-headers (its method is GET, its scheme the tls binding's)")
        elif not lowered.startswith(":") and not _TOKEN.match(name):
            yield where, f"'{name}' is not a valid header name"


def check(binding: BindingConfig) -> Iterator[tuple[str, str]]:
    yield from _check_overrides(binding)
    if binding.kind == "client":
        yield from _check_client(binding)
        return
    for key, feature in UNSERVED_OPTIONS.items():
        if key in binding.options:
            yield f"options.{key}", f"not supported by this zillatw yet ({feature})"
    for key in CLIENT_OPTIONS:
        if key in binding.options:
            yield f"options.{key}", "an http client's option (the server's are head-timeout, idle-timeout, ...)"
    yield from accesscontrol.check(binding.options.get("access-control"))
    yield from clientaddress.check(binding.options.get("trusted-proxies"))
    if not binding.routes:
        yield "routes", "an http server needs 'exit' or routes with an exit"
    yield from _check_authorization(binding.options.get("authorization") or {})


def _check_client(binding: BindingConfig) -> Iterator[tuple[str, str]]:
    if binding.options.get("versions") == ["h2"] and "max-connections" in binding.options:
        yield "options.max-connections", "an h2 client keeps one connection per upstream (its streams multiplex)"
    for key in binding.options:
        if key not in ("versions", "overrides", "idle-timeout", "requests", *CLIENT_OPTIONS):
            yield f"options.{key}", "not supported on an http client by this zillatw yet"
    if not binding.routes:
        yield "routes", "an http client needs 'exit' or routes with an exit"


def _check_authorization(authorizations: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    if len(authorizations) > 1:
        yield "options.authorization", f"one guard only, got {len(authorizations)}: {', '.join(authorizations)}"
    for guard, authorization in authorizations.items():
        for where, patterns in authorization["credentials"].items():
            for name, pattern in patterns.items():
                if pattern.count(PLACEHOLDER) != 1:
                    yield (f"options.authorization.{guard}.credentials.{where}.{name}",
                           f"'{pattern}' must contain {PLACEHOLDER} once")


def guard_references(binding: BindingConfig) -> Iterator[tuple[str, str]]:
    """The guards an http server's authorization names (config checks they exist)."""
    for guard in binding.options.get("authorization") or {}:
        yield f"options.authorization.{guard}", guard

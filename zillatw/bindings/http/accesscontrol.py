"""Zilla's `access-control` of an http server: which pages may send requests (the `Origin`
header browsers add), and the CORS headers their answers carry. Sans-IO: headers in
(zillatw's dict of lower-cased names plus `:method :scheme :authority :path`), decisions
and header lists out.

Why it matters for WebSockets: a browser lets any page open a WebSocket to any host and
sends that host's cookies with it; only the `Origin` header says which page asked. With
`same-origin` (Zilla's default) a request from another origin gets 403, so a page
elsewhere cannot use a visitor's cookies to talk to the gateway (cross-site WebSocket
hijacking). A request without `Origin` is not from a page and is not affected.

Where we differ from Zilla (docs/access-control.md): origins compare case-insensitively
with default ports made explicit, `*` in an `allow.origins` entry is a wildcard, a preflight
must be allowed for every header it names, a preflight under same-origin is answered only
for the request's own origin, and a credentialed preflight answer says so.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from zillatw.matching import Matcher, matcher

DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}
MAX_ORIGIN_SHOWN = 200  # characters of a refused Origin in the 403 body and the event

# Response headers a page may always read (Fetch: CORS-safelisted response header names),
# plus the two Zilla adds; they are never listed in Access-Control-Expose-Headers.
SAFELISTED_RESPONSE_HEADERS = frozenset({"cache-control", "content-language", "content-length", "content-type",
                                         "expires", "last-modified", "pragma", "server", "date"})

_NAMES = {"type": "array", "items": {"type": "string", "minLength": 1}}
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "policy": {"enum": ["same-origin", "cross-origin"]},
        "allow": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"origins": _NAMES, "methods": _NAMES, "headers": _NAMES,
                           "credentials": {"type": "boolean"}},
        },
        "max-age": {"type": "integer", "minimum": 0},  # seconds a browser may cache a preflight answer
        "expose": {"type": "object", "additionalProperties": False, "properties": {"headers": _NAMES}},
    },
}


class Policy(str, enum.Enum):
    SAME_ORIGIN = "same-origin"
    CROSS_ORIGIN = "cross-origin"


def normalise_origin(origin: str) -> str:
    """An origin (or an `allow.origins` pattern) as we compare it: lower-cased, with the
    scheme's default port made explicit (`https://A.example` -> `https://a.example:443`).
    What is not `scheme://host[:port]` (`null`, a path) is only lower-cased."""
    value = origin.strip().lower()
    scheme, separator, authority = value.partition("://")
    if not separator or not scheme or not authority or "/" in authority:
        return value
    bracket = authority.rfind("]")
    colon = authority.rfind(":")
    if colon > bracket:
        host, port = authority[:colon], authority[colon + 1:]
    else:
        host, port = authority, ""
    if port.isdigit():
        port = str(int(port))  # `:0443` is `:443`
    elif port == "":
        port = DEFAULT_PORTS.get(scheme, "")
    return f"{scheme}://{host}:{port}" if port else f"{scheme}://{host}"


def origin_problem(origin: str) -> str | None:
    """Why a configured `allow.origins` entry can never match a browser's Origin, if it cannot."""
    if origin == "null" or origin == "*":
        return None
    scheme, separator, authority = origin.partition("://")
    if not separator or not scheme or not authority:
        return f"'{origin}' is not an origin: expected scheme://host[:port] (as https://app.example.com) or null"
    if "/" in authority or "?" in authority or "#" in authority:
        return f"'{origin}' has a path: an Origin header is scheme://host[:port] only"
    if "@" in authority:
        return f"'{origin}' has user information: an Origin header never carries it"
    return None


def check(options: Mapping[str, Any] | None) -> Iterator[tuple[str, str]]:
    """Problems the schema cannot see, as (path under the binding, message)."""
    if options is None:
        return
    policy = options.get("policy", Policy.SAME_ORIGIN.value)
    if policy == Policy.SAME_ORIGIN.value:
        for key in ("allow", "max-age", "expose"):
            if key in options:
                yield (f"options.access-control.{key}",
                       "only with policy: cross-origin (same-origin lets no other origin in)")
        return
    for index, origin in enumerate((options.get("allow") or {}).get("origins") or ()):
        problem = origin_problem(origin)
        if problem is not None:
            yield f"options.access-control.allow.origins[{index}]", problem


class AccessControl:
    """The decisions of one http server's `options.access-control` (absent: same-origin)."""

    def __init__(self, options: Mapping[str, Any] | None = None):
        options = options or {}
        self.policy = Policy(options.get("policy", Policy.SAME_ORIGIN.value))
        allow = options.get("allow") if self.policy is Policy.CROSS_ORIGIN else None
        allow = allow or {}
        origins = allow.get("origins")
        # None: every origin (Zilla: omitted means all); else patterns over normalised origins
        self._origins: list[Matcher] | None = (None if origins is None
                                               else [matcher(normalise_origin(o)) for o in origins])
        methods = allow.get("methods")
        self._methods = None if methods is None else frozenset(methods)  # methods are case-sensitive
        headers = allow.get("headers")
        self._headers = None if headers is None else frozenset(h.lower() for h in headers)
        self.credentials = bool(allow.get("credentials", False))
        self.max_age: int | None = options.get("max-age") if self.policy is Policy.CROSS_ORIGIN else None
        expose = (options.get("expose") or {}).get("headers") if self.policy is Policy.CROSS_ORIGIN else None
        self._expose = None if expose is None else frozenset(h.lower() for h in expose)
        # Zilla names the origin (not `*`) once origins are listed or credentials allowed: a
        # browser refuses `*` on a credentialed response.
        self._explicit_origin = self.credentials or self._origins is not None

    # ---- the request's Origin

    def is_same_origin(self, headers: Mapping[str, str]) -> bool:
        """The request's Origin is its own scheme and authority (Host, default port added)."""
        origin, scheme, authority = headers.get("origin"), headers.get(":scheme"), headers.get(":authority")
        if origin is None or scheme is None or authority is None:
            return False
        return normalise_origin(origin) == normalise_origin(f"{scheme}://{authority}")

    def _origin_listed(self, origin: str) -> bool:
        if self._origins is None:
            return True
        if "," in origin or " " in origin.strip():
            return False  # two Origin headers (joined) or a list: not one origin a pattern could name
        normalised = normalise_origin(origin)
        return any(allowed(normalised) for allowed in self._origins)

    def allows(self, headers: Mapping[str, str]) -> bool:
        """Whether the request may proceed: no Origin, its own origin, or (cross-origin
        policy) an origin `allow.origins` lets in. `Origin: null` is an origin like others."""
        origin = headers.get("origin")
        if origin is None or self.is_same_origin(headers):
            return True
        return self.policy is Policy.CROSS_ORIGIN and self._origin_listed(origin)

    def refusal(self, headers: Mapping[str, str]) -> str | None:
        """The 403's reason when the request's Origin is not allowed, else None."""
        if self.allows(headers):
            return None
        origin = headers["origin"]
        shown = origin if len(origin) <= MAX_ORIGIN_SHOWN else origin[:MAX_ORIGIN_SHOWN] + "..."
        return f"origin {shown} is not allowed (access-control policy {self.policy.value})"

    def cross_origin(self, headers: Mapping[str, str]) -> bool:
        """An allowed request from another origin: its answer carries CORS headers."""
        return "origin" in headers and not self.is_same_origin(headers) and self.allows(headers)

    # ---- a CORS preflight: OPTIONS asking whether a method or headers may be sent

    @staticmethod
    def is_preflight(headers: Mapping[str, str]) -> bool:
        return (headers.get(":method") == "OPTIONS" and "origin" in headers
                and ("access-control-request-method" in headers or "access-control-request-headers" in headers))

    def preflight(self, headers: Mapping[str, str]) -> tuple[int, list[tuple[str, str]]]:
        """The answer to a preflight: 204 with what it may send, or 403 with no CORS headers."""
        method = headers.get("access-control-request-method")
        requested = headers.get("access-control-request-headers")
        names = [name.strip().lower() for name in (requested or "").split(",") if name.strip()]
        if not self.allows(headers) \
                or (method is not None and self._methods is not None and method not in self._methods) \
                or (self._headers is not None and any(name not in self._headers for name in names)):
            return 403, []
        explicit = self._explicit_origin or self.policy is Policy.SAME_ORIGIN
        answer = [("Access-Control-Allow-Origin", headers["origin"] if explicit else "*")]
        if self.credentials:
            answer.append(("Access-Control-Allow-Credentials", "true"))
        if method is not None:
            explicit_methods = self.credentials or self._methods is not None
            answer.append(("Access-Control-Allow-Methods", method if explicit_methods else "*"))
        if requested is not None:
            explicit_headers = self.credentials or self._headers is not None
            answer.append(("Access-Control-Allow-Headers", ", ".join(names) if explicit_headers else "*"))
        if self.max_age is not None:
            answer.append(("Access-Control-Max-Age", str(self.max_age)))
        if explicit:
            answer.append(("Vary", "Origin"))
        return 204, answer

    # ---- an allowed cross-origin request's answer

    def response_headers(self, headers: Mapping[str, str],
                         response_names: Iterable[str] = ()) -> list[tuple[str, str]]:
        """The Access-Control-* headers (and Vary) for the answer to an allowed request with
        these request headers, whose own header names are `response_names`; none for a
        same-origin request or one without Origin."""
        if not self.cross_origin(headers):
            return []
        explicit = self._explicit_origin
        answer = [("Access-Control-Allow-Origin", headers["origin"] if explicit else "*")]
        if self.credentials:
            answer.append(("Access-Control-Allow-Credentials", "true"))
        exposable = [name for name in (n.lower() for n in response_names)
                     if not name.startswith(":") and name not in SAFELISTED_RESPONSE_HEADERS
                     and (self._expose is None or name in self._expose)]
        if exposable:
            # `*` does not expose anything on a credentialed response: name them then.
            explicit_expose = self.credentials or self._expose is not None
            answer.append(("Access-Control-Expose-Headers", ", ".join(exposable) if explicit_expose else "*"))
        if explicit:
            answer.append(("Vary", "Origin"))
        return answer

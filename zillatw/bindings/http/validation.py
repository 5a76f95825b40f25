"""Zilla's http `requests` validation: typed requests on an http server, typed responses on
an http client, against the models and catalogs of zillatw.catalogs.

    north_http_server:
      options:
        requests:
          - path: /items/{id}           # Zilla's template: {name} is a path parameter
            method: POST                # optional; so is content-type
            content-type: [application/json]
            headers: {x-trace: string}  # header -> model
            params: {path: {id: {model: json, ...}}, query: {page: string}}
            content: {model: json, catalog: {my_catalog: [{subject: item}]}}
    south_http_client:
      options:
        requests:
          - path: /items/{id}
            responses:                  # the upstream's answers to such a request
              - status: [200]
                content-type: [application/json]
                content: {model: json, catalog: ...}

A request is typed by the first entry whose method, content-type (a request without one
matches any) and path match, as Zilla resolves it (HttpBindingConfig.resolveRequestType); a
response by the *last* entry of its request's `responses` whose status and content-type
match (Zilla's resolveResponse has no break). Untyped ones pass untouched, at no cost.

- Server: headers and path/query parameters are checked on the head; the body as it
  streams when the model can be checked piecewise (`string`: an incremental decoder),
  otherwise held (at most `max-request-body`, default MAX_HELD_BODY) and checked whole before
  the exit is opened. Invalid: 400 with the gateway's own body and a
  MODEL_<MODEL>_VALIDATION_FAILED event (the reason, as the ws server's validation gives it).
- Client: an invalid response head is a 502 to the client; a body is checked as above: the
  head goes to the client at once, a held body is sent once valid and otherwise the client's
  connection is cut mid-response, which is what Zilla's http.json.schema example shows
  (`curl: (18) transfer closed with N bytes remaining to read`). Held at most MAX_HELD_BODY.

Schemas named by subject or id are fetched when the binding is built; until one arrives a
request needing it gets 503 `schema unavailable`. `strategy: encoded` is refused by name
(an HTTP body carries no registry framing in Zilla's examples; nothing to read the id from).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator, Mapping
from typing import Any

from zope.interface import directlyProvides, implementer, providedBy

from zillatw.bindings.http.auth import CONVENTIONAL_SECRETS
from zillatw.catalogs import Unavailable
from zillatw.catalogs.models import ENCODINGS
from zillatw.catalogs.validation import MODEL, Spec, check_model, model_of
from zillatw.stream import HttpHead, IHttpExchangeEnd, IHttpRequestExit, StreamRefused

MAX_HELD_BODY = 1 << 20  # bytes of a body held to be checked whole (requests: unless max-request-body)
BAD_REQUEST = "invalid request"          # what the client reads; the event says why
BAD_RESPONSE = "invalid response from the upstream"
_NAMED = {"type": "object", "propertyNames": {"pattern": r"^[a-zA-Z]+[a-zA-Z0-9\._\-]*$"},
          "additionalProperties": MODEL}
RESPONSE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "status": {"oneOf": [{"type": "integer"}, {"type": "array", "items": {"type": "integer"}}]},
        "content-type": {"type": "array", "items": {"type": "string"}},
        "headers": _NAMED,
        "content": MODEL,
    },
    "anyOf": [{"required": ["content"]}, {"required": ["headers"]}],
}
REQUESTS = {
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["path"],
        "properties": {
            "path": {"type": "string"},
            "method": {"enum": ["GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"]},
            "content-type": {"type": "array", "items": {"type": "string"}},
            "headers": _NAMED,
            "params": {"type": "object", "additionalProperties": False,
                       "properties": {"path": _NAMED, "query": _NAMED}},
            "content": MODEL,
            "responses": {"type": "array", "items": RESPONSE},
        },
    },
}
SERVER_ONLY = ("headers", "params", "content")
NO_BODY = frozenset({"204", "304", "100", "101", "102", "103"})  # statuses whose responses have no body
_PARAM = re.compile(r"\{([a-zA-Z0-9_-]+)\}")
_QUERY = re.compile(r"(?<=[?&])([^&=]+)=([^&]+)(?=&|$)")


# ---------------------------------------------------------------------------- config checks

def check(binding: Any, namespace: Any, types: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(sub-path, problem) for an http binding's `options.requests`."""
    for index, entry in enumerate(binding.options.get("requests") or ()):
        base = f"options.requests[{index}]"
        if binding.kind == "server" and "responses" in entry:
            yield f"{base}.responses", "responses are checked by an http client (Zilla's server ignores them)"
        if binding.kind == "client":
            for key in SERVER_ONLY:
                if key in entry:
                    yield f"{base}.{key}", "checked by an http server; an http client checks responses"
        elif not any(key in entry for key in SERVER_ONLY):
            yield base, "a request type needs headers, params or content to check"
        for where, model in _models(entry):
            yield from _check_one(f"{base}.{where}", model, namespace, types)
        for r, response in enumerate(entry.get("responses") or ()):
            for where, model in _models(response):
                yield from _check_one(f"{base}.responses[{r}].{where}", model, namespace, types)


def _check_one(where: str, model: Any, namespace: Any, types: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    for ref in (model_of(model).get("catalog") or {}).values():
        if any(r.get("strategy") == "encoded" for r in ref):
            yield where, "strategy 'encoded' is not supported on http bodies by this zillatw"
            return
    yield from check_model(where, model, namespace, types)


def _models(entry: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for name, model in (entry.get("headers") or {}).items():
        yield f"headers.{name}", model
    for where in ("path", "query"):
        for name, model in ((entry.get("params") or {}).get(where) or {}).items():
            yield f"params.{where}.{name}", model
    if "content" in entry:
        yield "content", entry["content"]


# ---------------------------------------------------------------------------- built types

class Typed:
    """Headers and a content model: what a request type or a response type checks."""

    def __init__(self, entry: Mapping[str, Any], catalogs: Mapping[str, Any]):
        self.content_types = frozenset(entry["content-type"]) if "content-type" in entry else None
        self.headers = {name.lower(): Spec(model_of(m), catalogs) for name, m in (entry.get("headers") or {}).items()}
        self.content = Spec(model_of(entry["content"]), catalogs) if "content" in entry else None
        self.streams = self.content is not None and self.content.model == "string"
        self.encoding = ENCODINGS[model_of(entry["content"]).get("encoding", "utf_8")] if self.streams else ""

    def specs(self) -> Iterator[Spec]:
        yield from self.headers.values()
        if self.content is not None:
            yield self.content

    def content_type_matches(self, headers: Mapping[str, str]) -> bool:
        value = headers.get("content-type")
        return value is None or self.content_types is None or value in self.content_types

    def check_headers(self, headers: Mapping[str, str]) -> tuple[str, str] | None:
        for name, spec in self.headers.items():
            value = headers.get(name)
            if value is not None:
                reason = spec.check(value.encode("utf-8", "surrogateescape"))
                if reason is not None:
                    return spec.event_model, f"header {name}: {_shown(reason, name in SECRET_HEADERS)}"
        return None


# Headers whose values are credentials: a schema's complaint may quote the value, so the
# event says only that it was invalid.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


def _shown(reason: str, secret: bool) -> str:
    return "invalid (the value is a credential: not shown)" if secret else reason


class ResponseType(Typed):
    def __init__(self, entry: Mapping[str, Any], catalogs: Mapping[str, Any]):
        super().__init__(entry, catalogs)
        status = entry.get("status")
        listed = status if isinstance(status, list) else [status]
        self.statuses = None if status is None else frozenset(map(str, listed))


class RequestType(Typed):
    def __init__(self, entry: Mapping[str, Any], catalogs: Mapping[str, Any]):
        super().__init__(entry, catalogs)
        self.method = entry.get("method")
        template, pattern, last = entry["path"], [], 0
        for found in _PARAM.finditer(template):  # literal text is literal (Zilla's is a regex)
            pattern += [re.escape(template[last:found.start()]), f"(?P<{found.group(1).replace('-', '_')}>.+?)"]
            last = found.end()
        pattern.append(re.escape(template[last:]))
        self.path = re.compile("^" + "".join(pattern) + r"/?(?:\?.*)?$")
        params = entry.get("params") or {}
        self.path_params = {name.replace("-", "_"): Spec(model_of(m), catalogs)
                            for name, m in (params.get("path") or {}).items()}
        self.query_params = {name: Spec(model_of(m), catalogs) for name, m in (params.get("query") or {}).items()}
        self.responses = [ResponseType(r, catalogs) for r in entry.get("responses") or ()]
        self.checks_head = bool(self.headers or self.path_params or self.query_params)

    def specs(self) -> Iterator[Spec]:
        yield from super().specs()
        yield from self.path_params.values()
        yield from self.query_params.values()
        for response in self.responses:
            yield from response.specs()

    def matches(self, headers: Mapping[str, str]) -> re.Match[str] | None:
        method = headers.get(":method")
        if self.method is not None and method is not None and method != self.method:
            return None
        if not self.content_type_matches(headers):
            return None
        return self.path.match(headers.get(":path", "/"))

    def check_head(self, headers: Mapping[str, str], found: re.Match[str]) -> tuple[str, str] | None:
        """(model, reason) of the first invalid header or parameter (values Zilla's way: raw)."""
        for name, spec in self.path_params.items():
            value = found.group(name) if name in self.path.groupindex else None
            if value is not None and (reason := spec.check(value.encode())) is not None:
                return spec.event_model, f"path parameter {name}: {reason}"
        if self.query_params:
            for query in _QUERY.finditer(headers.get(":path", "")):
                qspec = self.query_params.get(query.group(1))
                if qspec is not None and (reason := qspec.check(query.group(2).encode())) is not None:
                    secret = query.group(1).lower() in CONVENTIONAL_SECRETS
                    return qspec.event_model, f"query parameter {query.group(1)}: {_shown(reason, secret)}"
        return self.check_headers(headers)

    def response(self, headers: Mapping[str, str]) -> ResponseType | None:
        chosen = None
        status = headers.get(":status")
        for response in self.responses:
            if (status is None or response.statuses is None or status in response.statuses) \
                    and response.content_type_matches(headers):
                chosen = response  # the last that matches, as Zilla
        return chosen


class RequestTypes:
    """One http binding's request types, and what it reports invalid ones to."""

    def __init__(self, entries: list[Mapping[str, Any]], catalogs: Mapping[str, Any], events: Any,
                 max_body: int):
        self.types = [RequestType(entry, catalogs) for entry in entries]
        self.events = events
        self.max_body = max_body
        for rtype in self.types:  # fetch registry schemas now: a request cannot wait for one
            for spec in rtype.specs():
                if spec.handle is not None:
                    spec.handle.ensure()

    def find(self, headers: Mapping[str, str]) -> tuple[RequestType, re.Match[str]] | None:
        for rtype in self.types:
            found = rtype.matches(headers)
            if found is not None:
                return rtype, found
        return None

    def invalid(self, trace_id: int, model: str, head: HttpHead, details: str) -> None:
        if self.events.enabled:
            path = head.headers.get(":path", "/").partition("?")[0]
            self.events.validation_failed(trace_id, model, f"- {head.headers.get(':method', '-')} {path} {details}")


def _ready(typed: Typed) -> bool:
    return all(spec.handle is None or spec.handle.current() is not None for spec in typed.specs())


class BodyCheck:
    """A body's check: `feed(data)` -> the pieces to pass on now, or None when invalid
    (`reason` then says why); `end()` -> the held rest, or None. A streaming model passes
    every piece on as it is checked; another holds them (at most `bound` bytes)."""

    def __init__(self, typed: Typed, bound: int):
        assert typed.content is not None
        self.spec = typed.content
        self.bound = bound
        self.reason = ""
        self.held: list[bytes] = []
        self.size = 0
        self.encoding = typed.encoding
        self.decoder = codecs.getincrementaldecoder(typed.encoding)() if typed.streams else None

    def feed(self, data: bytes) -> list[bytes] | None:
        if self.decoder is not None:
            try:
                self.decoder.decode(data)
            except UnicodeDecodeError as e:
                self.reason = f"not {self.encoding} ({e.reason})"
                return None
            return [data]
        self.size += len(data)
        if self.size > self.bound:
            self.reason = f"body over the {self.bound} bytes held for validation"
            return None
        self.held.append(data)
        return []

    def end(self) -> list[bytes] | None:
        if self.decoder is not None:
            try:
                self.decoder.decode(b"", True)
            except UnicodeDecodeError as e:
                self.reason = f"text ends mid-character ({e.reason})"
                return None
            return []
        body = b"".join(self.held)
        self.held = []
        if not body:
            return []  # no body, nothing to check (Zilla's models see no data)
        reason = self.spec.check(body)
        if reason is not None:
            self.reason = reason if isinstance(reason, str) else "schema unavailable"
            return None
        return [body] if body else []


# ---------------------------------------------------------------------------- the server side

@implementer(IHttpRequestExit)
class ValidatingRequestExit:
    """An http server route's exit behind which typed requests are checked."""

    def __init__(self, exit_: Any, types: RequestTypes):
        self.exit = exit_
        self.types = types
        directlyProvides(self, providedBy(exit_))  # an echo is a stream exit too

    def __getattr__(self, name: str) -> Any:  # what else callers ask of the exit (name, going_away)
        return getattr(self.exit, name)

    def open_request(self, head: HttpHead, peer: IHttpExchangeEnd, trace_id: int) -> IHttpExchangeEnd:
        found = self.types.find(head.headers)
        if found is None:
            return self.exit.open_request(head, peer, trace_id)
        rtype, match = found
        if not _ready(rtype):
            raise StreamRefused(503, "schema unavailable")
        if rtype.checks_head:
            invalid = rtype.check_head(head.headers, match)
            if invalid is not None:
                self.types.invalid(trace_id, invalid[0], head, invalid[1])
                raise StreamRefused(400, BAD_REQUEST, invalid[1])
        if rtype.content is None or head.length == 0:
            return self.exit.open_request(head, peer, trace_id)
        if not rtype.streams and head.length is not None and head.length > self.types.max_body:
            raise StreamRefused(413, "request body too large to validate")
        return CheckedRequest(self, rtype, head, peer, trace_id)


@implementer(IHttpExchangeEnd)
class CheckedRequest:
    """The exit's end of a typed request with a body: checked as it streams (the exit is
    opened at once) or held and checked whole (the exit is opened after)."""

    def __init__(self, owner: ValidatingRequestExit, rtype: RequestType, head: HttpHead, peer: IHttpExchangeEnd,
                 trace_id: int):
        self.owner, self.head, self.peer, self.trace_id = owner, head, peer, trace_id
        self.check = BodyCheck(rtype, owner.types.max_body)
        self.failed = False
        self.inner: Any = owner.exit.open_request(head, peer, trace_id) if rtype.streams else None

    def exchange_head(self, head: HttpHead) -> None:
        """Only a server's end takes a response head."""

    def exchange_data(self, data: bytes) -> None:
        if self.failed:
            return
        pieces = self.check.feed(data)
        if pieces is None:
            self._invalid()
            return
        for piece in pieces:
            self.inner.exchange_data(piece)

    def exchange_end(self) -> None:
        if self.failed:
            return
        pieces = self.check.end()
        if pieces is None:
            self._invalid()
            return
        if self.inner is None:  # held: the exit hears of the request now, its length known
            try:
                self.inner = self.owner.exit.open_request(HttpHead(self.head.headers, sum(map(len, pieces))),
                                                          self.peer, self.trace_id)
            except StreamRefused as e:
                self.failed = True
                self.peer.exchange_abort(e.status, e.reason, e.detail)
                return
        for piece in pieces:
            self.inner.exchange_data(piece)
        self.inner.exchange_end()

    def _invalid(self) -> None:
        self.failed = True
        reason = self.check.reason
        self.owner.types.invalid(self.trace_id, self.check.spec.event_model, self.head, f"content: {reason}")
        if self.inner is not None:
            self.inner.exchange_abort(400, BAD_REQUEST, "")
        self.peer.exchange_abort(400, BAD_REQUEST, f"content: {reason}")

    def exchange_abort(self, status: int, reason: str, detail: str) -> None:
        self.failed = True
        if self.inner is not None:
            self.inner.exchange_abort(status, reason, detail)

    def pauseProducing(self) -> None:
        if self.inner is not None:
            self.inner.pauseProducing()

    def resumeProducing(self) -> None:
        if self.inner is not None:
            self.inner.resumeProducing()

    def stopProducing(self) -> None:
        if self.inner is not None:
            self.inner.stopProducing()


# ---------------------------------------------------------------------------- the client side

class ResponseChecks:
    """An http client's request types with responses: `checked(head, peer, trace_id)` is the
    end its upstream exchange writes the response to (the client's end when untyped)."""

    def __init__(self, types: RequestTypes):
        self.types = types

    def checked(self, head: HttpHead, peer: IHttpExchangeEnd, trace_id: int) -> "CheckedResponse | None":
        found = self.types.find(head.headers)
        if found is None or not found[0].responses:
            return None
        return CheckedResponse(self.types, found[0], head, peer, trace_id)


@implementer(IHttpExchangeEnd)
class CheckedResponse:
    """The client's end of a response to a typed request, as the upstream exchange sees it."""

    upstream: Any = None  # the upstream exchange, set once it exists: an invalid response ends it

    def __init__(self, types: RequestTypes, rtype: RequestType, request: HttpHead, peer: IHttpExchangeEnd,
                 trace_id: int):
        self.types, self.rtype, self.request, self.peer, self.trace_id = types, rtype, request, peer, trace_id
        self.check: BodyCheck | None = None
        self.failed = False

    def exchange_head(self, head: HttpHead) -> None:
        response = self.rtype.response(head.headers)
        if response is not None:
            if not _ready(response):
                self._fail("schema unavailable", response.content.event_model if response.content else "core")
                return
            invalid = response.check_headers(head.headers)
            if invalid is not None:
                self._fail(invalid[1], invalid[0])
                return
            bodiless = self.request.headers.get(":method") == "HEAD" or head.headers.get(":status") in NO_BODY
            if response.content is not None and head.length != 0 and not bodiless:
                self.check = BodyCheck(response, MAX_HELD_BODY)
        self.peer.exchange_head(head)

    def exchange_data(self, data: bytes) -> None:
        if self.failed:
            return
        if self.check is None:
            self.peer.exchange_data(data)
            return
        pieces = self.check.feed(data)
        if pieces is None:
            self._fail(f"content: {self.check.reason}", self.check.spec.event_model)
            return
        for piece in pieces:
            self.peer.exchange_data(piece)

    def exchange_end(self) -> None:
        if self.failed:
            return
        if self.check is not None:
            pieces = self.check.end()
            if pieces is None:
                self._fail(f"content: {self.check.reason}", self.check.spec.event_model)
                return
            for piece in pieces:
                self.peer.exchange_data(piece)
        self.peer.exchange_end()

    def _fail(self, reason: str, model: str) -> None:
        """The client gets a 502, or its connection cut if the head has gone; the upstream
        exchange ends (its connection is not reused)."""
        self.failed = True
        self.types.invalid(self.trace_id, model, self.request, f"response {reason}")
        if self.upstream is not None:
            self.upstream.exchange_abort(502, BAD_RESPONSE, reason)
        self.peer.exchange_abort(502, BAD_RESPONSE, reason)

    def exchange_abort(self, status: int, reason: str, detail: str) -> None:
        self.failed = True
        self.peer.exchange_abort(status, reason, detail)

    def pauseProducing(self) -> None:
        self.peer.pauseProducing()

    def resumeProducing(self) -> None:
        self.peer.resumeProducing()

    def stopProducing(self) -> None:
        self.peer.stopProducing()


# ---------------------------------------------------------------------------- building

def request_types(binding: Any, graph: Any) -> RequestTypes | None:
    """The binding's `options.requests`, built (None without them)."""
    entries = binding.options.get("requests") or ()
    if not entries:
        return None
    names = {name for entry in entries for _, model in _all_models(entry)
             for name in (model_of(model).get("catalog") or {})}
    try:
        catalogs = {name: graph.catalog(binding.namespace, name) for name in names}
    except Unavailable as e:
        from zillatw.errors import ConfigError
        raise ConfigError(f"bindings.{binding.name}.options.requests: {e}") from None
    events = graph.events(binding.namespace).binding(binding.namespace, binding.name, "http")
    return RequestTypes(list(entries), catalogs, events, binding.options.get("max-request-body", MAX_HELD_BODY))


def _all_models(entry: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    yield from _models(entry)
    for response in entry.get("responses") or ():
        yield from _models(response)


def validating_routes(types: RequestTypes | None, routes: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """An http server's routes with each plain-request exit behind the request checks."""
    if types is None:
        return routes
    return [(route, ValidatingRequestExit(exit_, types) if IHttpRequestExit.providedBy(exit_) else exit_)
            for route, exit_ in routes]

"""Validating WebSocket messages against catalog schemas: the ws server's `messages` option.

    north_ws_server:
      type: ws
      kind: server
      options:
        messages:
          - path: /orders*              # optional, as in routes; so is `protocol`
            content:                    # messages from the client
              model: json
              catalog:
                my_catalog:
                  - subject: order      # or {id: 7}, or {strategy: encoded}
            server-content: string      # messages to the client (optional)
            invalid: close              # close 1007 (the default) or drop
      routes: ...

The first rule whose `path` and `protocol` match a new stream applies to it; a stream that no
rule matches is not touched. A stream with a rule gets a filter between the ws server and the
route's exit (both directions are IStreamEnds, see zillatw.stream): a message in one fragment
is checked and passed on as it is; a fragmented one is held until its last fragment (at most
the ws server's `max-message-size`), checked whole, then passed on fragment by fragment, so
its boundaries survive. An invalid message gets, as the rule says, a close (1007 with a short
reason to the client for its own messages; 1011 for the server's, whose exit gets 1007) or is
dropped; either way a MODEL_<MODEL>_VALIDATION_FAILED event says why (at most one a second
per connection; the next one counts those left out).

Schemas named by subject or id are fetched before the stream opens (the 101 waits; a schema
the catalog cannot provide refuses the upgrade with 503). `strategy: encoded` reads the
schema id from each message's registry framing; an id not yet known pauses the connection
while it is fetched. The filter's `needs_contents` is true: message relays that bypass the
stream interface must not be used for a stream that has one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from zillatw.catalogs import Schema, Unavailable
from zillatw.catalogs.models import CATALOGED, EVENT_NAMES, MODELS, NOT_YET, SchemaError, compile_schema, string_check
from zillatw.errors import did_you_mean
from zillatw.matching import matcher
from zillatw.stream import CONTINUATION, IStreamEnd, IStreamExit, StreamInfo, StreamRefused
from zillatw.telemetry import next_trace_id

INVALID_CLOSE = 1007      # RFC 6455: data inconsistent with the message's type
SERVER_FAILED = 1011      # the client's view of a server message that was invalid
EVENT_INTERVAL = 1.0      # seconds between two validation events of one connection

log = Logger()

SCHEMA_REF = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "subject": {"type": "string"},
        "version": {"type": ["string", "integer"]},
        "strategy": {"enum": ["topic", "encoded"]},
        "record": {"type": "string"},
    },
}
MODEL = {
    "x-expect": "a model name or a mapping with 'model'",
    "anyOf": [
        {"type": "string"},
        {
            "type": "object",
            "required": ["model"],
            "additionalProperties": False,
            "properties": {
                "model": {"type": "string"},
                "catalog": {"type": "object", "additionalProperties": {"type": "array", "items": SCHEMA_REF}},
                "view": {"type": "string"},
                "encoding": {"enum": ["utf_8", "utf_16"]},
            },
        },
    ],
}
MESSAGES = {
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "path": {"type": "string"},
            "protocol": {"type": "string"},
            "content": MODEL,
            "server-content": MODEL,
            "invalid": {"enum": ["close", "drop"]},
        },
    },
}
DIRECTIONS = ("content", "server-content")


# ---------------------------------------------------------------------------- config checks

def _model(value: Any) -> Mapping[str, Any]:
    return {"model": value} if isinstance(value, str) else value


model_of = _model  # `string` or `{model: ...}`, as a mapping (the http binding's requests too)


def check_models(binding: Any, namespace: Any, types: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(sub-path, problem) for the `messages` rules of a ws server binding; `types`: the
    catalog types served (zillatw.config.plugins.CatalogType, by name)."""
    for index, rule in enumerate(binding.options.get("messages") or ()):
        base = f"options.messages[{index}]"
        if not any(d in rule for d in DIRECTIONS):
            yield base, "a rule needs 'content' (messages from the client) or 'server-content' (to it), or both"
        for direction in DIRECTIONS:
            if direction in rule:
                yield from check_model(f"{base}.{direction}", rule[direction], namespace, types)


def check_model(where: str, value: Any, namespace: Any, types: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(sub-path, problem) for one model (`string` or `{model, catalog, ...}`) at `where`:
    the model is served, given the catalog it needs, one schema that compiles (the ws
    server's `messages` and the http binding's `requests`)."""
    model = _model(value)
    name = model["model"]
    if name not in MODELS:
        yield (f"{where}.model", f"model '{name}' is not supported by this zillatw yet (supported: "
               f"{', '.join(MODELS)})" if name in NOT_YET else
               f"unknown model '{name}'{did_you_mean(name, MODELS)} (supported: {', '.join(MODELS)})")
        return
    catalogs = model.get("catalog") or {}
    if name not in CATALOGED:
        if catalogs:
            yield f"{where}.catalog", f"model '{name}' takes no catalog"
        return
    if "encoding" in model:
        yield f"{where}.encoding", "only for model 'string'"
    if len(catalogs) != 1 or any(len(refs) != 1 for refs in catalogs.values()):
        yield (f"{where}.catalog", f"model '{name}' needs one catalog with one schema "
               "(e.g. my_catalog: [{subject: my_subject}])")
        return
    catalog_name, refs = next(iter(catalogs.items()))
    yield from _check_reference(where, name, catalog_name, refs[0], namespace, types)


def _check_reference(where: str, name: str, catalog_name: str, ref: Mapping[str, Any], namespace: Any,
                     types: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """The problems of a model's one schema reference: its shape, its catalog, the schema itself
    when the catalog holds it (inline); a registry's schema is fetched and checked at run time."""
    rpath = f"{where}.catalog.{catalog_name}[0]"
    if sum(k in ref for k in ("id", "subject", "strategy")) != 1:
        yield rpath, "give one of 'subject' (with 'version'), 'id' or 'strategy'"
        return
    item = namespace.catalogs.get(catalog_name)
    if item is None:
        yield f"{where}.catalog", (f"no catalog named '{catalog_name}'"
                                   f"{did_you_mean(catalog_name, namespace.catalogs)}")
        return
    module = types.get(item["type"])
    if module is None:
        return  # the catalog's own entry says it is not supported
    problem = module.check_reference(item.get("options") or {}, ref)
    if problem:
        yield rpath, problem
        return
    text = module.schema_text(item.get("options") or {}, ref)
    if text is not None:
        try:
            compile_schema(name, text)
        except SchemaError as e:
            yield rpath, f"the {name} schema of subject '{ref.get('subject')}' is {e}"


# ---------------------------------------------------------------------------- built rules

class Spec:
    """How one direction's messages are checked: `check(payload)` -> None (valid), a reason
    (invalid), or a Deferred while the schema an encoded message names is fetched."""

    __slots__ = ("model", "event_model", "catalog", "handle", "framing", "_value", "_check", "_fixed")

    def __init__(self, model: Mapping[str, Any], catalogs: Mapping[str, Any]):
        self.model = model["model"]
        self.event_model = EVENT_NAMES[self.model]
        self.catalog: Any = None
        self.handle: Schema | None = None
        self.framing: Any = None
        self._value: Any = None
        self._check: Any = None
        self._fixed: Any = None
        if self.model not in CATALOGED:
            self._fixed = string_check(model)
            return
        catalog_name, refs = next(iter(model["catalog"].items()))
        self.catalog = catalogs[catalog_name]
        ref = refs[0]
        if ref.get("strategy") == "encoded":
            self.framing = self.catalog.framing
        else:
            self.handle = self.catalog.schema(ref)

    def compiled(self, value: Any) -> Any:
        """The check for a schema value (cached: the same value gives the same check)."""
        if value is not self._value:
            self._check = compile_schema(self.model, value.text)
            self._value = value
        return self._check

    def check(self, payload: bytes) -> Any:
        if self._fixed is not None:
            return self._fixed(payload)
        if self.handle is not None:
            value = self.handle.current()
            try:
                return (self._check if value is self._value else self.compiled(value))(payload)
            except SchemaError as e:
                return f"{self.handle.describe}: {e}"
        framed = self.framing.split(payload)
        if framed is None:
            return f"not framed with a schema id (a zero byte, then {self.framing.size} bytes)"
        schema_id, body = framed
        handle = self.catalog.by_id(schema_id)
        value = handle.current()
        if value is None:
            fetching = handle.ensure()
            if not fetching.called:
                return fetching
            value = handle.value
            if value is None:
                return f"schema id {schema_id} unavailable ({handle.error or 'not found'})"
        try:
            return compile_schema(self.model, value.text)(body)
        except SchemaError as e:
            return f"schema id {schema_id}: {e}"


class Rule:
    __slots__ = ("matches", "client", "server", "drop")

    def __init__(self, rule: Mapping[str, Any], catalogs: Mapping[str, Any]):
        path, protocol = matcher(rule.get("path")), matcher(rule.get("protocol"))
        self.matches = lambda info: path(info.path) and protocol(info.protocol)
        self.client = Spec(_model(rule["content"]), catalogs) if "content" in rule else None
        self.server = Spec(_model(rule["server-content"]), catalogs) if "server-content" in rule else None
        self.drop = rule.get("invalid", "close") == "drop"

    def handles(self) -> list[Schema]:
        return [s.handle for s in (self.client, self.server) if s is not None and s.handle is not None]


@implementer(IStreamExit)
class ValidatingExit:
    """A route's exit, behind which streams that a rule matches are validated."""

    def __init__(self, exit_: Any, rules: list[Rule], *, events: Any, max_message_size: int, reactor: Any):
        self.exit = exit_
        self.rules = rules
        self.events = events
        self.max_message_size = max_message_size
        self.reactor = reactor

    def __getattr__(self, name: str) -> Any:  # what else callers ask of the exit (open_count, ...)
        return getattr(self.exit, name)

    def open(self, info: StreamInfo, peer: IStreamEnd) -> Any:
        rule = next((r for r in self.rules if r.matches(info)), None)
        if rule is None:
            return self.exit.open(info, peer)
        handles = rule.handles()
        if any(h.value is None for h in handles):
            waiting = gatherResults([h.ensure() for h in handles])
            return waiting.addCallback(lambda _: self._open(rule, info, peer))
        return self._open(rule, info, peer)

    def _open(self, rule: Rule, info: StreamInfo, peer: IStreamEnd) -> Any:
        for spec in (rule.client, rule.server):
            if spec is None or spec.handle is None:
                continue
            handle = spec.handle
            value = handle.current()
            # The client gets a short reason; the catalog's event has the registry's answer.
            if value is None:
                raise StreamRefused(503, "schema unavailable")
            try:
                spec.compiled(value)
            except SchemaError as e:
                log.error("zillatw: catalog {catalog} {schema}: {error}", catalog=spec.catalog.name,
                          schema=handle.describe, error=e)
                raise StreamRefused(503, "schema unavailable") from None
        stream = ValidatedStream(rule, peer, self, info)
        opened = self.exit.open(info, stream.server_end)
        if isinstance(opened, Deferred):
            return opened.addCallback(stream.attach)
        return stream.attach(opened)


# ---------------------------------------------------------------------------- the filter

class ValidatedStream:
    """One stream's filter: `client_end` is what the ws server writes to, `server_end` what
    the exit writes to."""

    __slots__ = ("rule", "client", "inner", "client_end", "server_end", "closed", "exit", "info",
                 "_trace_id", "_event_at", "_suppressed")

    def __init__(self, rule: Rule, client: IStreamEnd, exit_: ValidatingExit, info: StreamInfo):
        self.rule = rule
        self.client = client          # the ws server's connection
        self.inner: Any = None        # the exit's end, once opened
        self.exit = exit_
        self.info = info
        self.closed = False
        self._trace_id = 0
        self._event_at = -EVENT_INTERVAL
        self._suppressed = 0
        limit = exit_.max_message_size
        self.client_end = Pipe(self, rule.client, "client", limit)  # client -> exit
        self.server_end = Pipe(self, rule.server, "server", limit)  # exit -> client
        self.server_end.sink = client
        self.server_end.source = None  # the exit: set by attach
        self.client_end.source = client

    def attach(self, inner: IStreamEnd) -> "Pipe":
        self.inner = inner
        self.client_end.sink = inner
        self.server_end.source = inner
        return self.client_end

    def invalid(self, pipe: "Pipe", reason: str) -> None:
        spec = pipe.spec
        assert spec is not None  # only a pipe with a rule checks messages, so only it refuses one
        drop = self.rule.drop
        self._event(spec.event_model, f"{pipe.direction} message {'dropped' if drop else 'closes the connection'}: "
                                      f"{reason}")
        if drop or self.closed:
            return
        self.closed = True
        short = _clip(f"invalid message: {reason}")
        if pipe.direction == "client":
            self.client.stream_end(INVALID_CLOSE, short)
        else:
            self.client.stream_end(SERVER_FAILED, "the server sent an invalid message")
        if self.inner is not None:
            self.inner.stream_end(INVALID_CLOSE, short)

    def _event(self, model: str, details: str) -> None:
        events = self.exit.events
        if not events.enabled:
            return
        now = self.exit.reactor.seconds()
        if now - self._event_at < EVENT_INTERVAL:
            self._suppressed += 1
            return
        if self._suppressed:
            details += f" ({self._suppressed} more since the last event)"
            self._suppressed = 0
        self._event_at = now
        if not self._trace_id:  # the upgrade request's (the ws server keeps it), so lines tie together
            self._trace_id = getattr(self.client, "trace_id", 0) or next_trace_id()
        events.validation_failed(self._trace_id, model, f"- {self.info.path or '/'} {details}")


@implementer(IStreamEnd)
class Pipe:
    """One direction of a ValidatedStream. Its stream_data receives that direction's
    fragments; pause/resume/stop come from the other direction's sink (its socket or exit
    being full), so they act on this pipe's opposite number's source."""

    __slots__ = ("stream", "spec", "direction", "limit", "sink", "source", "_opcode", "_parts", "_size",
                 "_queue", "_paused", "needs_contents")

    def __init__(self, stream: ValidatedStream, spec: Spec | None, direction: str, limit: int):
        self.stream = stream
        self.spec = spec
        self.direction = direction
        self.limit = limit
        self.sink: Any = None
        self.source: Any = None
        self._opcode = 0
        self._parts: list[bytes] | None = []
        self._size = 0
        self._queue: list[tuple[int, list[bytes]]] | None = None
        self._paused: set[str] = set()
        self.needs_contents = spec is not None

    # ---- data

    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        stream = self.stream
        if stream.closed:
            return
        spec = self.spec
        if spec is None:
            self.sink.stream_data(opcode, payload, fin)
            return
        if opcode != CONTINUATION:
            if fin and self._queue is None:  # a whole message: the common case
                result = spec.check(payload)
                if result is None:
                    self.sink.stream_data(opcode, payload, True)
                elif type(result) is str:
                    stream.invalid(self, result)
                else:
                    self._wait(result, [(opcode, [payload])])
                return
            self._opcode, self._parts, self._size = opcode, [], 0
        if self._parts is not None:
            self._size += len(payload)
            if self._size > self.limit:
                self._parts = None  # skip the rest of it
            else:
                self._parts.append(payload)
        if not fin:
            return
        parts, self._parts, self._size = self._parts, [], 0
        if parts is None:
            stream.invalid(self, f"larger than {self.limit} bytes, the most a message may have to be validated")
            return
        if self._queue is not None:
            self._queue.append((self._opcode, parts))
            return
        self._check(self._opcode, parts)

    def _check(self, opcode: int, parts: list[bytes]) -> bool:
        """Check and pass on (or refuse) one message; False when it waits for a schema."""
        payload = parts[0] if len(parts) == 1 else b"".join(parts)
        spec = self.spec
        assert spec is not None  # a pipe without a rule passes messages on before they get here
        result = spec.check(payload)
        if result is None:
            sink = self.sink
            last = len(parts) - 1
            for index, part in enumerate(parts):
                sink.stream_data(opcode if index == 0 else CONTINUATION, part, index == last)
        elif type(result) is str:
            self.stream.invalid(self, result)
        else:
            self._wait(result, [(opcode, parts)])
            return False
        return True

    def _wait(self, fetching: Deferred, queue: list[tuple[int, list[bytes]]]) -> None:
        """A message names a schema being fetched: hold it (and what follows) and pause its source."""
        self._queue = queue
        self._pause_source("fetch")
        fetching.addBoth(self._fetched)

    def _hold(self, rest: list[tuple[int, list[bytes]]]) -> None:
        assert self._queue is not None  # _check has just queued the message that waits
        self._queue.extend(rest)

    def _fetched(self, _: Any) -> None:
        queue, self._queue = self._queue or [], None
        while queue and not self.stream.closed:
            opcode, parts = queue.pop(0)
            if not self._check(opcode, parts):
                self._hold(queue)  # behind the message now waiting for its schema
                return
        self._resume_source("fetch")

    # ---- flow control: a pipe's sink pausing it means "stop sending to my sink"

    def _pause_source(self, reason: str) -> None:
        first = not self._paused
        self._paused.add(reason)
        if first and self.source is not None:
            self.source.pauseProducing()

    def _resume_source(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and self.source is not None:
                self.source.resumeProducing()

    def stream_end(self, code: int, reason: str) -> None:
        stream = self.stream
        if stream.closed:
            return
        stream.closed = True
        other = self.sink
        if other is not None:
            other.stream_end(code, reason)

    # IPushProducer, called by the side this pipe delivers *from*: the client end is the ws
    # connection's producer (its socket full: stop what goes to it, i.e. the server pipe).
    def pauseProducing(self) -> None:
        self._opposite()._pause_source("sink")

    def resumeProducing(self) -> None:
        self._opposite()._resume_source("sink")

    def stopProducing(self) -> None:
        source = self._opposite().source
        if source is not None:
            source.stopProducing()

    def _opposite(self) -> "Pipe":
        stream = self.stream
        return stream.server_end if self is stream.client_end else stream.client_end


def _clip(reason: str, limit: int = 123) -> str:
    """A close reason fits 123 bytes of UTF-8."""
    data = reason.encode("utf-8")
    if len(data) <= limit:
        return reason
    return data[:limit - 3].decode("utf-8", "ignore") + "..."


def validating_routes(binding: Any, graph: Any, routes: list[tuple[Any, Any]],
                      max_message_size: int) -> list[tuple[Any, Any]]:
    """The ws server's routes with each exit wrapped, when it has `messages` rules."""
    rules_config = binding.options.get("messages") or ()
    if not rules_config:
        return routes
    names = {name for rule in rules_config for d in DIRECTIONS if d in rule
             for name in (_model(rule[d]).get("catalog") or {})}
    try:
        catalogs = {name: graph.catalog(binding.namespace, name) for name in names}
        rules = [Rule(rule, catalogs) for rule in rules_config]
    except Unavailable as e:
        from zillatw.errors import ConfigError
        raise ConfigError(f"bindings.{binding.name}.options.messages: {e}") from None
    events = graph.events(binding.namespace).binding(binding.namespace, binding.name, "ws")
    return [(route, ValidatingExit(exit_, rules, events=events, max_message_size=max_message_size,
                                   reactor=graph.reactor))
            for route, exit_ in routes]

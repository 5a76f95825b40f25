"""Events: Zilla's stdout exporter lines, written once per connection event,
never per message. Format of Zilla's current code (`"%s [%s] [%016xd] %s %s"`):

    example:north_http_server [24/Nov/2026:12:00:00 +0000] [0000000000000001d] BINDING_HTTP_REQUEST_ACCEPTED - GET http://localhost:7114/
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

_trace_ids = itertools.count(1)


def next_trace_id() -> int:
    """A per-connection id that ties a connection's events together."""
    return next(_trace_ids)


def format_event(namespace: str, binding: str, trace_id: int, event: str, details: str,
                 now: float | None = None) -> str:
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(time.time() if now is None else now))
    return f"{namespace}:{binding} [{stamp}] [{trace_id:016x}d] {event} {details}"


class Events:
    """Where bindings report events; a no-op when no exporter is configured."""

    def __init__(self, writers: list[Callable[[str], None]] | None = None):
        self._writers = writers or []
        self.enabled = bool(self._writers)

    @classmethod
    def from_telemetry(cls, telemetry: Mapping[str, Any], stream: TextIO | None = None) -> "Events":
        writers = []
        for exporter in (telemetry.get("exporters") or {}).values():
            if exporter["type"] == "stdout":
                writers.append(_line_writer(stream))
        return cls(writers)

    def emit(self, namespace: str, binding: str, trace_id: int, event: str, details: str = "-") -> None:
        if not self.enabled:
            return
        line = format_event(namespace, binding, trace_id, event, details)
        for write in self._writers:
            write(line)

    def binding(self, namespace: str, name: str, type_: str) -> "BindingEvents":
        """The events of one binding, bound once at build time (see BindingEvents)."""
        return BindingEvents(self, namespace, name, type_)


class BindingEvents:
    """One binding's events, for bindings to call without repeating who they are:

        events = graph.events(ns).binding(ns, name, "ws")     # once, at build time
        events.accepted(trace_id, "- GET ws://host/path echo")  # BINDING_WS_REQUEST_ACCEPTED
        events.rejected(trace_id, 404, "no route")              # BINDING_WS_REQUEST_REJECTED - 404 no route
        events.guard_failed(trace_id, "jwt", "alice expired")   # GUARD_JWT_AUTHORIZATION_FAILED
        events.validation_failed(trace_id, "json", "line 1")    # MODEL_JSON_VALIDATION_FAILED
        events.engine("ENGINE_RELOADED", "Engine Reloaded.")    # engine-wide, trace id 0

    `enabled` is false when the namespace has no stdout exporter: test it before building
    an expensive details string. Every call is one line, once per connection, never per message.
    """

    __slots__ = ("_events", "namespace", "name", "_prefix", "enabled")

    def __init__(self, events: Events, namespace: str, name: str, type_: str):
        self._events = events
        self.namespace = namespace
        self.name = name
        self._prefix = f"BINDING_{type_.upper().replace('-', '_')}_"
        self.enabled = events.enabled

    def emit(self, trace_id: int, event: str, details: str = "-") -> None:
        self._events.emit(self.namespace, self.name, trace_id, event, details)

    def accepted(self, trace_id: int, details: str) -> None:
        self.emit(trace_id, self._prefix + "REQUEST_ACCEPTED", details)

    def rejected(self, trace_id: int, status: int, reason: str, identity: str | None = None) -> None:
        self.emit(trace_id, self._prefix + "REQUEST_REJECTED", f"{identity or '-'} {status} {reason}")

    def guard_failed(self, trace_id: int, guard_type: str, details: str) -> None:
        self.emit(trace_id, f"GUARD_{guard_type.upper()}_AUTHORIZATION_FAILED", details)

    def validation_failed(self, trace_id: int, model: str, details: str) -> None:
        self.emit(trace_id, f"MODEL_{model.upper()}_VALIDATION_FAILED", details)

    def engine(self, event: str, details: str = "-") -> None:
        self._events.emit(self.namespace, "engine", 0, event, details)


def _line_writer(stream: TextIO | None) -> Callable[[str], None]:
    def write(line: str) -> None:
        # The process's own stdout: twistd replaces sys.stdout with its log, which would
        # wrap each line in a log record.
        out = stream or sys.__stdout__
        if out is None:  # no stdout at all (a daemon with its streams closed): nowhere to write
            return
        out.write(line + "\n")
        out.flush()
    return write

"""Telemetry events: Zilla's stdout exporter lines, written once per connection event,
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


def _line_writer(stream: TextIO | None) -> Callable[[str], None]:
    def write(line: str) -> None:
        # The process's own stdout: twistd replaces sys.stdout with its log, which would
        # wrap each line in a log record.
        out = stream or sys.__stdout__
        out.write(line + "\n")
        out.flush()
    return write

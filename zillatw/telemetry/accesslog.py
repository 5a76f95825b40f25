"""Access logs: what an event becomes on its way out of the gateway.

An event (zillatw.telemetry.events) is one `EventRecord`: when, where (namespace, binding), the
connection's trace id, Zilla's event name, the details line Zilla's stdout exporter prints
and, for the events that have them, the same facts as separate fields (identity, status,
reason, the session's counts...). The stdout exporter writes each record as

- `text` (the default): Zilla's line, `ns:binding [time] [trace] EVENT details`;
- `json` (`options.format: json`, ours): one JSON object per line, with `time` (RFC 3339,
  UTC), `namespace`, `binding`, `trace`, `event`, `level` and the event's fields as keys of
  their own (`details` when an event has no fields), for log shippers that want no parsing.

Both forms carry only what the event carries: credentials in a request target are redacted
before an event is made (zillatw.bindings.http.auth.redact_target), and no event has a field for a
token, a password or a key. A `RecordQueue` holds records for an exporter that sends them
in batches (the otlp exporter's logs): bounded, the oldest dropped (and counted) when full.
"""

from __future__ import annotations

import enum
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import orjson

FORMATS = ("text", "json")
STDOUT_OPTIONS = ("format",)
RECORD_QUEUE_LIMIT = 10_000  # records an exporter holds between its exports; older ones are dropped


class EventLevel(str, enum.Enum):
    """How much an event matters, for log shippers (Zilla's events carry no level)."""

    INFO = "info"
    WARNING = "warning"


# Event name endings that say something was refused or went wrong.
_WARNING_ENDINGS = ("_REJECTED", "_FAILED", "_DISCONNECTED", "_DROPPED")


def level_of(event: str) -> EventLevel:
    return EventLevel.WARNING if event.endswith(_WARNING_ENDINGS) else EventLevel.INFO


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One event, as every exporter receives it."""

    time: float  # seconds since the epoch
    namespace: str
    binding: str
    trace_id: int
    event: str
    details: str
    fields: Mapping[str, Any] | None = None  # str, int, float or None values

    @property
    def level(self) -> EventLevel:
        return level_of(self.event)


def format_text(record: EventRecord) -> str:
    """Zilla's stdout line (`"%s [%s] [%016xd] %s %s"`, the time as dd/MMM/yyyy:HH:mm:ss Z)."""
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(record.time))
    return f"{record.namespace}:{record.binding} [{stamp}] [{record.trace_id:016x}d] {record.event} {record.details}"


def rfc3339(seconds: float) -> str:
    """UTC, to the millisecond: 2026-12-01T12:00:00.123Z."""
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((seconds - whole) * 1000):03d}Z"


# The keys every json line has; an event's field of the same name cannot replace one.
_HEAD = ("time", "namespace", "binding", "trace", "event", "level")


def format_json(record: EventRecord) -> str:
    line: dict[str, Any] = {}
    if record.fields is None:
        line["details"] = record.details
    else:
        line.update(record.fields)
    line.update(time=rfc3339(record.time), namespace=record.namespace, binding=record.binding,
                trace=f"{record.trace_id:016x}", event=record.event, level=record.level.value)
    ordered = {key: line.pop(key) for key in _HEAD}
    ordered.update(line)
    return orjson.dumps(ordered, default=str).decode()


FORMATTERS: dict[str, Callable[[EventRecord], str]] = {"text": format_text, "json": format_json}


def stdout_writer(options: Mapping[str, Any] | None, stream: TextIO | None = None) -> Callable[[EventRecord], None]:
    """The stdout exporter: each record as one line of its `options.format`."""
    formatter = FORMATTERS[(options or {}).get("format", "text")]

    def write(record: EventRecord) -> None:
        # The process's own stdout: twistd replaces sys.stdout with its log, which would
        # wrap each line in a log record.
        out = stream or sys.__stdout__
        if out is None:  # no stdout at all (a daemon with its streams closed): nowhere to write
            return
        out.write(formatter(record) + "\n")
        out.flush()
    return write


def check_stdout(path: str, options: Any) -> Iterator[str]:
    """Problems in a stdout exporter's `options` (Zilla's takes none; `format` is ours)."""
    if options is None:
        return
    if not isinstance(options, Mapping):
        yield f"{path}: expected a mapping (format: text or json)"
        return
    for key in options:
        if key not in STDOUT_OPTIONS:
            yield f"{path}.{key}: not allowed here (expected: {', '.join(STDOUT_OPTIONS)})"
    if "format" in options and options["format"] not in FORMATS:
        yield f"{path}.format: expected one of {', '.join(FORMATS)}, got {options['format']!r}"


class RecordQueue:
    """Records waiting for an exporter's next batch: at most `limit`, then the oldest go."""

    __slots__ = ("_records", "dropped")

    def __init__(self, limit: int = RECORD_QUEUE_LIMIT):
        self._records: deque[EventRecord] = deque(maxlen=limit)
        self.dropped = 0  # records pushed out unsent, since the start

    def __call__(self, record: EventRecord) -> None:
        records = self._records
        if len(records) == records.maxlen:
            self.dropped += 1
        records.append(record)

    def __len__(self) -> int:
        return len(self._records)

    def take(self, count: int) -> list[EventRecord]:
        """Up to `count` of the oldest records, removed from the queue."""
        records = self._records
        return [records.popleft() for _ in range(min(count, len(records)))]


OTLP_SIGNALS = ("metrics", "logs")  # Zilla's default: both


def otlp_signals(options: Any) -> tuple[str, ...]:
    """The signals an otlp exporter's options ask for (options already checked)."""
    signals = options.get("signals") if isinstance(options, Mapping) else None
    return tuple(signals) if isinstance(signals, list) else OTLP_SIGNALS

"""The old name of zillatw.telemetry.events (Zilla's stdout exporter lines), kept for embedders that
import it; zillatw.telemetry.metrics is the metrics."""

from zillatw.telemetry.events import BindingEvents, Events, format_event, next_trace_id

__all__ = ["BindingEvents", "Events", "format_event", "next_trace_id"]

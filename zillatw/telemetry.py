"""The old name of zillatw.events (Zilla's stdout exporter lines), kept for embedders that
import it; zillatw.metrics is the metrics."""

from zillatw.events import BindingEvents, Events, format_event, next_trace_id

__all__ = ["BindingEvents", "Events", "format_event", "next_trace_id"]

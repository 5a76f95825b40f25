"""Moved to zillatw.bindings.http (kept for the embedding imports of zillatw 0.1)."""

from zillatw.bindings.http.binding import HttpClient, HttpServer

__all__ = ["HttpClient", "HttpServer"]

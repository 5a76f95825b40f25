"""Moved to zillatw.bindings.ws (kept for the embedding imports of zillatw 0.1)."""

from zillatw.bindings.ws.binding import WsClient, WsServer

__all__ = ["WsClient", "WsServer"]

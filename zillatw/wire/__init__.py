"""zillatw's own WebSocket protocol core (RFC 6455, RFC 7692), sans-IO: no sockets, no
timers, no Twisted. See docs/wire.md."""

from zillatw.wire.codes import CloseCode, LocalProtocolError, Opcode, clip_reason, is_wire_code
from zillatw.wire.connection import Connection, Delivery, Role
from zillatw.wire.deflate import DeflateParams, NegotiationError, client_accept, client_offer, server_accept
from zillatw.wire.events import CloseReceived, Event, Failed, Fragment, Ping, Pong
from zillatw.wire.frames import apply_mask, encode_frame
from zillatw.wire.state import State

__all__ = ["CloseCode", "CloseReceived", "Connection", "DeflateParams", "Delivery", "Event", "Failed",
           "Fragment", "LocalProtocolError", "NegotiationError", "Opcode", "Ping", "Pong", "Role", "State",
           "apply_mask", "clip_reason", "client_accept", "client_offer", "encode_frame", "is_wire_code",
           "server_accept"]

"""HTTP/2 flow control as the server's streams (plain and WebSocket) and the client's share
it: what a stream may send now."""

from __future__ import annotations

import h2.connection


def send_allowed(conn: h2.connection.H2Connection, stream_id: int, outbound: bytearray) -> None:
    """As much of `outbound` as the stream's and the connection's windows and the peer's
    frame size allow, sent as DATA and taken off it; the rest waits for a WINDOW_UPDATE.
    h2's ProtocolError (the stream or the connection closed) is the caller's."""
    while outbound:
        size = min(len(outbound), conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
        if size <= 0:
            return
        conn.send_data(stream_id, bytes(outbound[:size]))
        del outbound[:size]

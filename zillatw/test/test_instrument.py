"""zillatw.telemetry.instrument: metering keeps what the metered ends can do."""

from __future__ import annotations

from typing import Any

from twisted.trial import unittest
from zope.interface import implementer

from zillatw.stream import IEvictableEnd, IStreamEnd, StreamInfo
from zillatw.telemetry.instrument import BindingMetrics, metered_open


@implementer(IStreamEnd)
class _End:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        self.calls.append(("data", payload))

    def stream_end(self, code: int, reason: str) -> None:
        self.calls.append(("end", code))

    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...


@implementer(IEvictableEnd)
class _Evictable(_End):
    def stream_evicted(self, code: int, reason: str, drain_timeout: float) -> None:
        self.calls.append(("evicted", code, drain_timeout))


class MeteredPeerTests(unittest.TestCase):
    def open_with(self, peer: _End) -> tuple[Any, BindingMetrics]:
        m = BindingMetrics("ns", "fan0", ("stream.closes.sent",))
        seen: list[Any] = []

        def exit_open(info: StreamInfo, given: Any) -> _End:
            seen.append(given)
            return _End()
        metered_open(exit_open, m)(StreamInfo(), peer)
        return seen[0], m

    def test_a_ws_member_stays_evictable_behind_the_meter(self):
        """A fan evicting a metered ws member lets it drain its backlog (not a plain close)."""
        peer = _Evictable()
        given, m = self.open_with(peer)
        self.assertTrue(IEvictableEnd.providedBy(given))
        given.stream_evicted(1013, "slow", 10.0)
        self.assertEqual(peer.calls, [("evicted", 1013, 10.0)])
        self.assertEqual(m.closes_sent, 1)

    def test_a_plain_end_is_not_claimed_evictable(self):
        given, _ = self.open_with(_End())
        self.assertFalse(IEvictableEnd.providedBy(given))
        given.stream_data(2, b"x", True)

"""Compressible payloads for the permessage-deflate scenario: JSON as an API would send it
(order events with nested users, items, timestamps and tags), deterministic for a given size
so every server gets the same bytes, and exactly `size` bytes long."""

from __future__ import annotations

import json
import random
import zlib
from typing import TypedDict

FIRST = ("Alice", "Bruno", "Chen", "Dana", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Julia", "Kenji", "Lena")
LAST = ("Martin", "Okafor", "Schmidt", "Tanaka", "Rossi", "Novak", "Silva", "Kowalski", "Dubois", "Haddad")
COUNTRIES = ("FR", "DE", "JP", "BR", "NG", "US", "IT", "PL", "CZ", "LB")
EVENTS = ("order.created", "order.paid", "order.shipped", "order.cancelled", "cart.updated")
TAGS = ("web", "mobile", "promo", "returning", "gift", "express", "b2b", "newsletter")
WORDS = ("please", "leave", "at", "the", "door", "ring", "twice", "fragile", "call", "before", "delivery")


class _Item(TypedDict):
    sku: str
    qty: int
    price: float


def _event(rnd: random.Random, n: int) -> dict:
    items = [_Item(sku=f"SKU-{rnd.randrange(10000, 99999)}", qty=rnd.randint(1, 4),
                   price=round(rnd.uniform(2, 200), 2)) for _ in range(rnd.randint(1, 3))]
    return {"id": 100000 + n, "type": rnd.choice(EVENTS),
            "ts": f"2026-11-25T{rnd.randrange(24):02d}:{rnd.randrange(60):02d}:{rnd.randrange(60):02d}."
                  f"{rnd.randrange(1000):03d}Z",
            "user": {"id": f"u-{rnd.randrange(100000)}", "name": f"{rnd.choice(FIRST)} {rnd.choice(LAST)}",
                     "country": rnd.choice(COUNTRIES)},
            "items": items, "total": round(sum(i["qty"] * i["price"] for i in items), 2),
            "currency": rnd.choice(("EUR", "USD", "JPY")), "tags": rnd.sample(TAGS, rnd.randint(0, 3))}


def json_payload(size: int) -> bytes:
    """A JSON document of exactly `size` bytes (at least 64): {"events": [...], "note": "..."};
    the note pads the last bytes with words."""
    rnd = random.Random(size)
    events: list[dict] = []
    doc = {"events": events, "note": ""}
    while True:
        events.append(_event(rnd, len(events)))
        if len(json.dumps(doc, separators=(",", ":"))) > size:
            events.pop()
            break
    note = []
    while len(json.dumps(doc, separators=(",", ":"))) < size:
        note.append(rnd.choice(WORDS))
        doc["note"] = " ".join(note)
    data = json.dumps(doc, separators=(",", ":")).encode()
    if len(data) > size:  # the last word overshot: cut the note to fit
        doc["note"] = doc["note"][:len(doc["note"]) - (len(data) - size)]
        data = json.dumps(doc, separators=(",", ":")).encode()
    return data


def deflate_ratio(data: bytes) -> float:
    """Compressed / original size with raw deflate at zlib's default level (what permessage-deflate sends)."""
    compressor = zlib.compressobj(wbits=-15)
    return len(compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)) / len(data)

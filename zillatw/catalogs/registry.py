"""What the registry catalogs (apicurio-registry, schema-registry) share: fetching (zillatw.fetch),
the schema handles' cache, the id framing of messages, and Zilla's catalog events.

Schemas by id never change in a registry, so they are cached for good; a subject's version
(`latest` above all) is looked up again once it is older than `max-age`. A failed fetch is
retried after 1 s, doubling up to `max-age`; meanwhile a cached schema keeps serving (event
`..._STALE_SCHEMA`), and without one the streams that need it are refused (event
`..._UNRETRIEVABLE_...`). Recovery is reported with `..._RETRIEVED_...`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from zillatw import fetch
from zillatw.catalogs import Resolved, SchemaHandle, Unavailable

FETCH_TIMEOUT = 10.0            # seconds for a registry to answer
MAX_SCHEMA_BYTES = 1024 * 1024
MAX_IDS = 4096                  # id handles kept; ids a message names that the registry lacks are not
MAGIC_BYTE = 0

log = Logger()

MAX_AGE = {"type": "number", "minimum": 0}


class Framing:
    """The prefix registry serializers put in front of a message: a zero magic byte, then the
    schema id, big-endian, in `size` bytes (Confluent: 4; Apicurio: 8, or 4 when legacy)."""

    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size

    def split(self, payload: bytes) -> tuple[int, bytes] | None:
        """(schema id, body), or None when the message is not framed so."""
        end = 1 + self.size
        if len(payload) < end or payload[0] != MAGIC_BYTE:
            return None
        return int.from_bytes(payload[1:end], "big", signed=True), payload[end:]

    def frame(self, schema_id: int, body: bytes) -> bytes:
        return bytes([MAGIC_BYTE]) + schema_id.to_bytes(self.size, "big", signed=True) + body


class RegistryError(Exception):
    pass


class RegistryCatalog:
    """A catalog backed by a registry's REST API. Subclasses give the paths and parsing."""

    EVENT_PREFIX = "CATALOG_SCHEMA_REGISTRY_"
    WORD = "SCHEMA"          # Zilla's apicurio events say ARTIFACT
    framing: Framing

    def __init__(self, namespace: str, name: str, options: Mapping[str, Any], *, events: Any = None,
                 reactor: Any, agent: Any = None, timeout: float = FETCH_TIMEOUT):
        self.namespace = namespace
        self.local_name = name
        self.name = f"{namespace}:{name}"
        self.url = options["url"].rstrip("/")
        self.max_age = float(options.get("max-age", 300))
        self.reactor = reactor
        self.timeout = timeout
        self.events = events
        self.headers: dict[bytes, list[bytes]] = {b"Accept": [b"application/json"]}
        self.agent = agent or fetch.agent(reactor)
        self.requests = 0     # HTTP requests sent, for tests and curiosity
        self._subjects: dict[tuple[str, str], SchemaHandle] = {}
        self._ids: dict[int, SchemaHandle] = {}
        self._failing: set[str] = set()

    # ---- handles

    def schema(self, ref: Mapping[str, Any]) -> SchemaHandle:
        """The handle for a model's reference: {id} or {subject, version}."""
        if "id" in ref:
            return self.by_id(int(ref["id"]))
        if "subject" not in ref:
            raise Unavailable(f"catalog {self.name}: a reference needs 'subject' or 'id'")
        key = (str(ref["subject"]), str(ref.get("version", "latest")))
        known = self._subjects.get(key)
        if known is not None:
            return known
        subject, version = key
        handle = self._subjects[key] = SchemaHandle(
            f"subject {subject} version {version}", lambda: self._subject_fetch(subject, version, handle),
            self.reactor.seconds, self.max_age)
        return handle

    def by_id(self, schema_id: int) -> SchemaHandle:
        handle = self._ids.get(schema_id)
        if handle is None:
            if len(self._ids) >= MAX_IDS:  # ids messages named that never resolved go first
                for key in [k for k, h in self._ids.items() if h.value is None]:
                    del self._ids[key]
            handle = self._ids[schema_id] = SchemaHandle(f"id {schema_id}", lambda: self._id_fetch(schema_id),
                                                   self.reactor.seconds, math.inf)
        return handle

    def _known(self, schema_id: int, text: str) -> None:
        """A schema learned on the way (a subject lookup that returned the text too)."""
        handle = self.by_id(schema_id)
        if handle.value is None:
            handle._fetched(Resolved(schema_id, text))

    # ---- fetching, with Zilla's events

    def _subject_fetch(self, subject: str, version: str, handle: SchemaHandle) -> Deferred:
        fetching = self.fetch_subject(subject, version)
        word, key = self.WORD, f"subject {subject}@{version}"

        def ok(value: Resolved) -> Resolved:
            if key in self._failing:
                self._failing.discard(key)
                self._emit(f"RETRIEVED_{word}_SUBJECT_VERSION",
                           f"Successfully fetched {word.lower()} for subject {subject} with version {version}.")
            return value

        def failed(failure: Any) -> Any:
            reason = failure.getErrorMessage() or failure.type.__name__
            if key not in self._failing:
                self._failing.add(key)
                self._emit(f"UNRETRIEVABLE_{word}_SUBJECT_VERSION",
                           f"Unable to fetch {word.lower()} for subject {subject} with version {version} ({reason}).")
                if handle.value is not None:
                    self._emit(f"UNRETRIEVABLE_{word}_SUBJECT_VERSION_STALE_{word}",
                               f"Unable to fetch {word.lower()} for subject {subject} with version {version}; "
                               f"using stale {word.lower()} with id {handle.value.id}.")
            return failure

        return fetching.addCallbacks(ok, failed)

    def _id_fetch(self, schema_id: int) -> Deferred:
        fetching = self.fetch_id(schema_id)
        word, key = self.WORD, f"id {schema_id}"

        def ok(text: str) -> Resolved:
            if key in self._failing:
                self._failing.discard(key)
                self._emit(f"RETRIEVED_{word}_ID", f"Successfully fetched {word.lower()} id {schema_id}.")
            return Resolved(schema_id, text)

        def failed(failure: Any) -> Any:
            if key not in self._failing:
                self._failing.add(key)
                reason = failure.getErrorMessage() or failure.type.__name__
                self._emit(f"UNRETRIEVABLE_{word}_ID", f"Unable to fetch {word.lower()} id {schema_id} ({reason}).")
            return failure

        return fetching.addCallbacks(ok, failed)

    def _emit(self, event: str, details: str) -> None:
        log.info("zillatw: catalog {name}: {details}", name=self.name, details=details)
        if self.events is not None:
            self.events.emit(self.namespace, self.local_name, 0, self.EVENT_PREFIX + event, details)

    # ---- HTTP

    def get(self, path: str, parse_json: bool = True) -> Deferred:
        """GET url+path: the JSON document (or text) of a 200, else a RegistryError."""
        self.requests += 1
        fetching = fetch.get(self.agent, self.url + path, headers=self.headers, max_bytes=MAX_SCHEMA_BYTES,
                             timeout=self.timeout, reactor=self.reactor)
        return fetching.addCallbacks(self._parse, self._refused, callbackArgs=(path, parse_json), errbackArgs=(path,))

    @staticmethod
    def _parse(content: bytes, path: str, parse_json: bool) -> Any:
        try:
            text = content.decode("utf-8")
            return json.loads(text) if parse_json else text
        except ValueError:
            raise RegistryError(f"{path}: not {'JSON' if parse_json else 'UTF-8'}") from None

    @staticmethod
    def _refused(failure: Any, path: str) -> Any:
        failure.trap(fetch.FetchError)
        raise RegistryError(f"{failure.getErrorMessage()} for {path}")

    @staticmethod
    def quote(segment: Any) -> str:
        return quote(str(segment), safe="")

    # subclasses
    def fetch_subject(self, subject: str, version: str) -> Deferred:  # -> Resolved
        raise NotImplementedError

    def fetch_id(self, schema_id: int) -> Deferred:  # -> schema text
        raise NotImplementedError


def check_reference(options: Mapping[str, Any], ref: Mapping[str, Any]) -> str | None:
    if ref.get("strategy") == "topic":
        return "strategy 'topic' names a Kafka topic; a WebSocket message has none (use 'subject' or 'id')"
    return None


def schema_text(options: Mapping[str, Any], ref: Mapping[str, Any]) -> None:
    return None  # fetched at run time

"""Hot reload: when to reload. A gateway serving a file takes a changed configuration
without a restart; `Gateway.reload` (zillatw.runtime.gateway) does it, this module says when.

`Gateway.reload()` validates the file as startup does (load, then build every vault and
binding) and, if it is valid, switches to it (`Gateway.switch_to`). Reading, parsing,
validating and modelling the file run in a thread of the reactor's pool, within the
gateway's limits (zillatw.config.yamlload), so that traffic flows while a large file loads; only
building the bindings and switching run in the reactor thread. One reload runs at a time:
one asked for meanwhile (SIGHUP, a call) runs once it is done, and the watcher looks again
after it.
Switching:
- listeners whose address (host and port, or endpoint string) is unchanged keep their
  socket: its factory routes to the new tcp server binding from then on, so no connection
  is refused meanwhile; new addresses are listened on, those that disappeared are closed;
- connections already open keep the bindings they were accepted by (the old graph stays
  whole until they close; nothing of it is changed), new connections get the new bindings;
- the prometheus exporters restart with the new bindings' metrics (counters from zero).
An invalid file, or a new listener that cannot listen, changes nothing: the gateway keeps
serving the old configuration and says why (CONFIG_RELOAD_FAILED, and a log line).

`ConfigWatcher` polls the file and the vault stores it names (mtime, size) and reloads on a
change of their contents; `install_sighup` reloads on SIGHUP.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from twisted.internet import defer, task
from twisted.logger import Logger

from zillatw.config import Config

log = Logger()
WATCH_INTERVAL = 1.0  # seconds between two looks at the files


def watched_files(config: Config) -> list[Path]:
    """The configuration file and the filesystem vault stores it references."""
    files = [Path(config.source).resolve()]
    for ns in config.namespaces:
        for vault in ns.vaults.values():
            options = vault.get("options") or {}
            for store in ("keys", "trust", "signers"):
                spec = options.get(store)
                if isinstance(spec, Mapping) and isinstance(spec.get("store"), str):
                    location = (config.base_dir / spec["store"]).resolve()
                    files.extend(sorted(location.glob("*.pem")) if location.is_dir() else [location])
    return files


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"\0missing\0")
        digest.update(b"\0" + str(path).encode() + b"\0")
    return digest.hexdigest()


class Reloadable(Protocol):
    """What the watcher needs of a gateway (zillatw.runtime.gateway.Gateway)."""

    config: Config
    reloading: bool

    def reload(self) -> defer.Deferred: ...

    def prune_retired(self) -> None: ...


class ConfigWatcher:
    """Polls the configuration file and its vault stores; reloads when their contents change."""

    def __init__(self, gateway: Reloadable, interval: float, reactor: Any):
        self.gateway = gateway
        self.interval = interval
        self._loop = task.LoopingCall(self.look)
        self._loop.clock = reactor
        self._remember()

    def _remember(self) -> None:
        self.files = watched_files(self.gateway.config)
        self.stats = [_stat(path) for path in self.files]
        self.digest = _digest(self.files)

    def start(self) -> None:
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def look(self) -> defer.Deferred | None:
        self.gateway.prune_retired()  # a previous configuration whose last connection closed
        stats = [_stat(path) for path in self.files]
        if stats == self.stats or self.gateway.reloading:
            return None
        self.stats = stats
        digest = _digest(self.files)
        if digest == self.digest:  # touched, not changed
            return None
        self.digest = digest
        d = self.gateway.reload()
        # Whatever happened, the files to watch are the current configuration's.
        return d.addCallback(lambda _: self._after_reload())

    def _after_reload(self) -> None:
        files = watched_files(self.gateway.config)
        if files != self.files:
            self._remember()


def install_sighup(reactor: Any, gateway: Reloadable) -> None:
    """`kill -HUP` reloads (with or without the watcher), once the reactor runs."""
    def received(number: int, frame: Any) -> None:
        log.info("zillatw: SIGHUP received: reloading {source}", source=gateway.config.source)
        reactor.callFromThread(gateway.reload)

    reactor.callWhenRunning(signal.signal, signal.SIGHUP, received)

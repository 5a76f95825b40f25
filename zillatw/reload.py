"""Hot reload: a gateway serving a file takes a changed configuration without a restart.

`reload(gateway)` validates the file as startup does (load, then build every vault and
binding) and, if it is valid, switches to it. Reading, parsing, validating and modelling the
file run in a thread of the reactor's pool, within the gateway's limits (zillatw.yamlload),
so that traffic flows while a large file loads; only building the bindings and switching run
in the reactor thread. One reload runs at a time: one asked for meanwhile (SIGHUP, a call)
runs once it is done, and the watcher looks again after it.
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
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.internet import defer, task, threads
from twisted.logger import Logger

from zillatw.config import Config
from zillatw.errors import ConfigError

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


def _emit(gateway: Any, event: str, details: str) -> None:
    for ns in gateway.config.namespaces:
        gateway.events[ns.name].emit(ns.name, "engine", 0, event, details)


def _failed(gateway: Any, problems: list[str]) -> None:
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    log.error("zillatw: {source}: reload failed, still serving the previous configuration:\n  {problems}",
              source=gateway.config.source, problems="\n  ".join(problems))
    _emit(gateway, "CONFIG_RELOAD_FAILED", shown)


def reload(gateway: Any) -> defer.Deferred:
    """Reload the gateway's configuration file; fires with True if it switched to it. While
    a reload runs, this asks for one more, run after it (one for every request meanwhile)."""
    if gateway.reloading:
        waiter: defer.Deferred = defer.Deferred()
        gateway.reload_waiters.append(waiter)
        return waiter
    d = _reload(gateway)

    def next_one(result: Any) -> Any:
        waiters, gateway.reload_waiters = gateway.reload_waiters, []
        if waiters:
            again = reload(gateway)  # the file as it is now, which they may have changed
            again.addCallback(lambda switched: [waiter.callback(switched) for waiter in waiters])
        return result
    return d.addBoth(next_one)


def _load_off_reactor(gateway: Any) -> defer.Deferred:
    """load_config in a thread of the reactor's pool (in the reactor's own thread if it has none,
    as a test's fake reactor)."""
    from zillatw.service import load_config  # service imports this module
    reactor = gateway.reactor
    if not hasattr(reactor, "getThreadPool"):
        return defer.maybeDeferred(load_config, gateway.source, gateway.env, gateway.limits)
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), load_config,
                                     gateway.source, gateway.env, gateway.limits)


@defer.inlineCallbacks
def _reload(gateway: Any) -> Any:
    from zillatw.service import Gateway

    gateway.reloading = True
    try:
        try:
            if gateway.source is None:
                raise ConfigError("the configuration was not read from a file: nothing to reload")
            config = yield _load_off_reactor(gateway)
            if not gateway.running:  # stopped while the file loaded: nothing to switch
                return False
            new = Gateway(config, gateway.reactor, gateway.event_stream, gateway.drain_timeout)
        except ConfigError as e:
            _failed(gateway, list(e.problems))
            return False
        except Exception as e:  # a bug in building must not take the running gateway down
            log.failure("zillatw: reload failed")
            _failed(gateway, [f"{type(e).__name__}: {e}"])
            return False
        try:
            switched = yield _switch(gateway, new)
        except Exception as e:
            log.failure("zillatw: reload failed")
            _failed(gateway, [f"{type(e).__name__}: {e}"])
            return False
        return switched
    finally:
        gateway.reloading = False


@defer.inlineCallbacks
def _switch(gateway: Any, new: Any) -> Any:
    from zillatw.protocols import tcp
    old_servers = gateway.servers()
    old_listeners = {listener.address: listener for server in old_servers for listener in server.listeners}
    new_servers = new.servers()
    wanted = {address for server in new_servers for address in server.addresses()}
    if tcp.INHERITED and wanted != set(old_listeners):
        _failed(gateway, ["tcp listeners: with workers (-w), the supervisor holds the listening sockets, so "
                          "a reload cannot add or remove listener addresses; restart to change them"])
        return False
    # 1. Open the new addresses (and the metrics endpoints); a failure undoes it all.
    yield gateway.telemetry.stop()
    opened = []
    try:
        for server in new_servers:
            yield server.listen(gateway.reactor, skip=old_listeners)
            opened.append(server)
        yield new.telemetry.listen(gateway.reactor)
    except Exception as e:
        error = e.subFailure.value if hasattr(e, "subFailure") else e
        yield defer.gatherResults([server.stop() for server in opened], consumeErrors=True)
        yield gateway.telemetry.listen(gateway.reactor)
        _failed(gateway, [f"cannot listen: {error}"])
        return False
    # 2. Start the new bindings, then hand the kept sockets over: from here on, new
    #    connections get the new bindings.
    for binding in new.bindings.values():
        if hasattr(binding, "start_service"):
            binding.start_service()
    for server in new_servers:
        server.hand_over(old_listeners.pop(address) for address in server.addresses() if address in old_listeners)
    for server in old_servers:  # they no longer own any socket: nothing of theirs can close one
        server.listeners = []
    retired = gateway.bindings
    gateway.config, gateway.events, gateway.telemetry = new.config, new.events, new.telemetry
    gateway.graph, gateway.bindings = new.graph, new.bindings
    # 3. Close the listeners that are gone; their connections, like every open one, stay on
    #    the old bindings until they close.
    yield defer.gatherResults([defer.maybeDeferred(listener.port.stopListening) for listener in old_listeners.values()],
                              consumeErrors=True)
    gateway.retired.append(retired)
    gateway.prune_retired()
    log.info("zillatw: {source}: configuration reloaded", source=new.config.source)
    if getattr(gateway, "verbose", False):  # as at startup with -v, and as Zilla prints a reloaded configuration
        sys.stdout.write(new.config.dump())
        sys.stdout.flush()
    _emit(gateway, "CONFIG_RELOADED", str(new.config.source))
    return True


class ConfigWatcher:
    """Polls the configuration file and its vault stores; reloads when their contents change."""

    def __init__(self, gateway: Any, interval: float = WATCH_INTERVAL):
        self.gateway = gateway
        self.interval = interval
        self._loop = task.LoopingCall(self.look)
        self._loop.clock = gateway.reactor
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
        d = reload(self.gateway)
        # Whatever happened, the files to watch are the current configuration's.
        return d.addCallback(lambda _: self._after_reload())

    def _after_reload(self) -> None:
        files = watched_files(self.gateway.config)
        if files != self.files:
            self._remember()


def install_sighup(reactor: Any, gateway: Any) -> None:
    """`kill -HUP` reloads (with or without the watcher), once the reactor runs."""
    def received(number: int, frame: Any) -> None:
        log.info("zillatw: SIGHUP received: reloading {source}", source=gateway.config.source)
        reactor.callFromThread(reload, gateway)

    reactor.callWhenRunning(signal.signal, signal.SIGHUP, received)

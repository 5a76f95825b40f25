"""Zilla's examples on their own ports: a private network namespace for one test (issue 15).

An example test runs conf/<example>.yaml exactly as shipped, listeners on 0.0.0.0 and the
ports as written (7114, 7143, 12345, 80 ...), inside a network namespace of its own: nothing
else on the machine, trial's other -j workers included, can hold those ports there.

    network = ExampleNetwork(self)          # first thing in setUp (or the test)
    path = network.config("tcp.echo.yaml")  # conf/tcp.echo.yaml itself
    client = yield connect_raw(network.port(12345))

How: `unshare(CLONE_NEWNET)` on the main thread (the one trial runs tests and the reactor on),
then `lo` brought up (ioctl SIOCSIFFLAGS). A namespace belongs to a thread, and what the thread
makes afterwards inherits it: its sockets, the processes it forks (twistd, curl, redis-server)
and the threads it starts. Sockets made before (the reactor's waker, trial's -j pipes: neither
is network) and sockets made inside keep working after the switch back. The thread goes back
with `setns()` on an fd of the original namespace opened before, in a cleanup (registered
first, so it runs last: after the gateways, clients and children are gone), and checks it is
back. The reactor's thread pool (deferToThread, name resolution, config loads) is swapped for
one made inside for the test: threads made earlier would connect in the old namespace, and
threads made inside must not serve later tests. /etc/hosts is shared: localhost is still
127.0.0.1. Host names an example gives its upstreams (`backend`, `nginx`) are resolved by
support.resolve_locally, as before.

Where the namespace cannot be made (not Linux, no CAP_SYS_ADMIN), or $ZILLATW_TEST_NO_NETNS is
set: with $CI set the test fails with the reason (CI runs as root and must test the files
unchanged), else it falls back to free ports and a rewritten copy of the file (0.0.0.0 made
127.0.0.1, each written port replaced), and says so in the test log.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import socket
import struct
import sys
import threading
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.python import log
from twisted.python.threadpool import ThreadPool

from zillatw.test.support import CONF, free_port

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP = 0x1
FORCE_FALLBACK = "ZILLATW_TEST_NO_NETNS"
THREAD_NAMESPACE = "/proc/thread-self/ns/net"
POOL_STOP_TIMEOUT = 10.0  # seconds the test's thread pool has to finish once the test is over


class NamespaceUnavailable(Exception):
    """Why a private network namespace could not be made here."""


def namespace_inode() -> int:
    """Which network namespace the calling thread is in."""
    return os.stat(THREAD_NAMESPACE).st_ino


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _set_namespace(fd: int) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns(CLONE_NEWNET): {os.strerror(code)}")


def _loopback_up() -> None:
    """`ip link set lo up`, without a child: the interface's flags, IFF_UP added."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def enter_private_namespace(case: Any) -> None:
    """Move the calling (main) thread into a new network namespace with `lo` up until `case`
    ends; NamespaceUnavailable (nothing changed) if that cannot be done here."""
    if not sys.platform.startswith("linux"):
        raise NamespaceUnavailable(f"network namespaces are Linux's; this is {sys.platform}")
    if threading.current_thread() is not threading.main_thread():
        raise NamespaceUnavailable("only the main thread (the reactor's) can be moved")
    try:
        original = os.open(THREAD_NAMESPACE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NamespaceUnavailable(f"cannot open {THREAD_NAMESPACE}: {e}") from e
    before = namespace_inode()
    if _libc().unshare(CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        os.close(original)
        hint = " (needs root or CAP_SYS_ADMIN)" if code in (errno.EPERM, errno.EACCES) else ""
        raise NamespaceUnavailable(f"unshare(CLONE_NEWNET): {os.strerror(code)}{hint}")

    def leave() -> None:
        try:
            _set_namespace(original)
        finally:
            os.close(original)
        if namespace_inode() != before:
            raise AssertionError("the test thread did not get back to its network namespace")
    try:
        _loopback_up()
    except OSError as e:
        leave()
        raise NamespaceUnavailable(f"cannot bring lo up in the new namespace: {e}") from e
    case.addCleanup(leave)
    _own_thread_pool(case)


def _own_thread_pool(case: Any) -> None:
    """The reactor's thread pool, for this test, is one whose threads start in the namespace;
    it is stopped (its threads joined) before the thread leaves it."""
    the_reactor: Any = reactor
    saved = the_reactor.threadpool
    pool = ThreadPool(0, 10, "netns-test")
    pool.start()
    the_reactor.threadpool = pool

    def restore() -> None:
        the_reactor.threadpool = saved
        # stop() joins the pool's threads: bounded here, so a thread stuck in the test's work
        # fails the test (the pool takes no more work) instead of hanging the run
        stopper = threading.Thread(target=pool.stop, name="netns-test-pool-stop", daemon=True)
        stopper.start()
        stopper.join(POOL_STOP_TIMEOUT)
        if stopper.is_alive():
            raise AssertionError(f"a thread of the test's pool was still busy {POOL_STOP_TIMEOUT:g} s after it")
    case.addCleanup(restore)


def rewritten(text: str, ports: dict[int, int]) -> str:
    """The fallback's copy of an example: 0.0.0.0 made 127.0.0.1, each written port (a whole
    number, not part of another) replaced by its free one."""
    text = text.replace("0.0.0.0", "127.0.0.1")
    for written, free in ports.items():
        text = re.sub(rf"(?<![\d.]){written}(?!\d)", str(free), text)
    return text


class ExampleNetwork:
    """Where one test runs Zilla's examples: its own namespace (`isolated`), the ports as
    written; or, where that cannot be, free ports on 127.0.0.1 (see the module's doc)."""

    def __init__(self, case: Any) -> None:
        self.case = case
        self.ports: dict[int, int] = {}
        reason = None
        if os.environ.get(FORCE_FALLBACK):
            reason = f"${FORCE_FALLBACK} is set"
        else:
            try:
                enter_private_namespace(case)
            except NamespaceUnavailable as e:
                reason = str(e)
        self.isolated = reason is None
        if reason is not None:
            if os.environ.get("CI"):
                case.fail(f"no private network namespace for the examples' own ports: {reason}")
            log.msg(f"netns: {case.id()} runs the examples on free ports, their files rewritten: {reason}")

    def port(self, written: int) -> int:
        """The port to use for what the example writes as `written`."""
        if self.isolated:
            return written
        if written not in self.ports:
            self.ports[written] = free_port()
        return self.ports[written]

    def config(self, name: str, folder: Path | None = None) -> str:
        """The (absolute) path to load for conf/<name>: the shipped file itself, or, given the `folder`
        its relative paths (tls/localhost.p12 ...) are to be found in, a hard link to it there
        (the same file: a symlink would not do, the loader resolves it back to conf/). In the
        fallback, the file rewritten onto free ports, in `folder` or a temporary one."""
        shipped = Path(CONF, name)
        if self.isolated and folder is None:
            return str(shipped)
        folder = self._folder(folder)
        if not self.isolated:
            return self.write(shipped.read_text(), folder, name)
        target = folder / name
        try:
            os.link(shipped, target)
        except OSError as e:
            self.case.fail(f"cannot link {shipped} into {folder} (same file system needed): {e}")
        return str(target)

    def write(self, text: str, folder: Path | None = None, name: str = "zilla.yaml") -> str:
        """An example's text that is not in conf/ (Zilla's own, quoted in a test) written
        into `folder` as `name`: as it is, or in the fallback rewritten onto free ports."""
        folder = self._folder(folder)
        if not self.isolated:
            written = {int(n) for n in re.findall(r"(?<![\d.])(\d{2,5})(?!\d)", text)} & KNOWN_PORTS
            text = rewritten(text, {port: self.port(port) for port in sorted(written)})
        (folder / name).write_text(text)
        return str(folder / name)

    def _folder(self, folder: Path | None) -> Path:
        folder = (Path(self.case.mktemp()) if folder is None else folder).absolute()  # for children too
        folder.mkdir(parents=True, exist_ok=True)
        return folder


# The ports Zilla's examples (conf/*.yaml) write; test_netns checks every one is listed.
KNOWN_PORTS = frozenset({80, 443, 4318, 6379, 7114, 7143, 7190, 8080, 8443, 9090, 12345, 23456})

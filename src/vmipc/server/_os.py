"""The operating-system side of the server: the listening socket, peer credentials, fds."""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import grp
import os
import select
import socket
import stat
import struct
import tempfile
import termios
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from vmipc.errors import VmipcError

#: the longest path an AF_UNIX socket address can hold on Linux
MAX_SOCKET_PATH = 107
_UCRED = struct.Struct("3i")


class SocketPathError(OSError, VmipcError):
    """The socket path cannot be used (in use by a live server, not a socket, too long)."""


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def resolve_group(group: int | str) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise SocketPathError(errno.EINVAL, f"no such group: {group}") from None


def _check_existing(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return  # a stale socket from a server that died: replace it
    except OSError:
        return
    finally:
        probe.close()
    raise SocketPathError(errno.EADDRINUSE, f"another server is listening on {path}")


def create_listener(
    path: str, *, mode: int, gid: int | None, backlog: int
) -> tuple[socket.socket, tuple[int, int]]:
    """Bind and listen on ``path`` with ``mode`` (and group ``gid``) from the first instant.

    The socket is bound in a fresh private directory beside ``path``, given its mode and
    group there, and then renamed into place, so it is never reachable with looser
    permissions. A stale socket at ``path`` is replaced; a live one is an error.
    Returns the listening socket and the (st_dev, st_ino) of the socket file.
    """
    path = os.path.abspath(path)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise SocketPathError(
            errno.ENAMETOOLONG, f"socket path is over {MAX_SOCKET_PATH} bytes: {path}"
        )
    _check_existing(path)
    tmpdir = tempfile.mkdtemp(prefix=".vmipc-", dir=os.path.dirname(path))
    dirfd = os.open(tmpdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    tmp = os.path.join(tmpdir, "s")
    try:
        sock.bind(f"/proc/self/fd/{dirfd}/s")  # short, whatever the directory's path
        os.chmod(tmp, mode)
        if gid is not None:
            os.chown(tmp, -1, gid)
        sock.listen(backlog)
        os.rename(tmp, path)
        st = os.stat(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dirfd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)
    sock.setblocking(False)
    return sock, (st.st_dev, st.st_ino)


def remove_socket_file(path: str, identity: tuple[int, int]) -> None:
    """Unlink ``path`` if it is still the socket file we created."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)


class _HasSockopt(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...


def peer_credentials(sock: _HasSockopt) -> PeerCredentials:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(data)
    return PeerCredentials(pid, uid, gid)


def fds_from_ancdata(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """The fds of every SCM_RIGHTS message in ``recvmsg()``'s ancillary data."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints = array.array("i")
            ints.frombytes(data[: len(data) - len(data) % ints.itemsize])
            fds.extend(ints)
    return fds


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def check_fd(fd: int, direction: str) -> str | None:
    """Why ``fd`` cannot serve as an ``in`` (read) or ``out`` (write) fd, or None if it can."""
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        return f"is unusable ({exc.strerror})"
    if flags & os.O_PATH:
        return "is an O_PATH fd, which cannot be read or written"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    access = flags & os.O_ACCMODE
    if direction == "in" and access == os.O_WRONLY:
        return "is not open for reading"
    if direction == "out" and access == os.O_RDONLY:
        return "is not open for writing"
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLOUT)
        ready = poller.poll(0)
        revents = ready[0][1] if ready else 0
        if revents & (select.POLLERR | select.POLLNVAL):
            return "has its other end closed" if stat.S_ISFIFO(st.st_mode) else "is a broken socket"
        if revents & select.POLLHUP:
            if direction == "out":
                return "has its other end closed"
            if _readable_bytes(fd) == 0:
                return "has its other end closed and nothing left to read"
    return None


def _readable_bytes(fd: int) -> int:
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    except OSError:
        return 0
    return buf[0]


def peer_hung_up(fd: int) -> bool:
    """True when the peer closed both directions (not just shut its writing side)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    events = poller.poll(0)
    return bool(events and events[0][1] & (select.POLLHUP | select.POLLERR))

"""What the async and the blocking client share (no I/O of its own)."""

from __future__ import annotations

import array
import collections
import os
import reprlib
import socket
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from vmipc import __version__
from vmipc.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    ErrorCode,
    Event,
    ProtocolError,
    RemoteProtocolError,
    UntrustedServer,
    pack,
)

#: what ``hello`` says the client is, unless told otherwise
DEFAULT_CLIENT_NAME = f"vmipc-python/{__version__}"
#: after a send fails because the server closed (EPIPE, ECONNRESET): read what it sent
#: before closing, for its connection-level error, until the end of the stream but for
#: at most this many seconds...
LAST_WORDS_TIMEOUT = 1.0
#: ...and about this many bytes
LAST_WORDS_LIMIT = 1 << 20
#: the largest frame a client accepts unless it is told otherwise. A server's announced
#: ``limits.max_frame_size`` is adopted only when it is smaller: the server decides what
#: it sends, never how much the client takes in.
CLIENT_MAX_FRAME_SIZE = DEFAULT_MAX_FRAME_SIZE
#: events kept for ``next_event`` before the oldest are dropped: at most this many...
EVENT_BUFFER = 4096
#: ...and about this many bytes (of their data as msgpack)
EVENT_BUFFER_BYTES = 16 << 20


class HasFileno(Protocol):
    def fileno(self) -> int: ...


#: an fd to pass: a number or anything with ``fileno()`` (a file, a socket). The client
#: never closes it; the kernel gives the server its own copy.
FdLike = int | HasFileno
#: called with each ``progress`` event of one request
ProgressCallback = Callable[[Event], None]


_UCRED = struct.Struct("3i")


def trusted_server_uids(extra: Iterable[int] = ()) -> frozenset[int]:
    """The uids a client passes fds to: its own effective uid, root, and ``extra``."""
    return frozenset({os.geteuid(), 0, *extra})


class HasSockopt(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


def check_server(sock: HasSockopt, path: str, trusted: frozenset[int]) -> None:
    """Refuse (UntrustedServer) a server whose process runs as none of ``trusted``, before
    anything is sent: whoever got a listening socket at the path first (a shared sticky
    directory, a VMM that is not running or restarting) would receive the caller's fds."""
    pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    if uid not in trusted:
        raise UntrustedServer(path, uid, pid, trusted)


def check_frame_size(size: int) -> int:
    """A client's own frame limit (its ``max_frame_size`` argument), checked."""
    if type(size) is not int or size < 1:
        raise ValueError(f"max_frame_size must be a positive integer, not {size!r}")
    return size


def adopted_frame_size(hello: Any, own: int) -> int:
    """The frame limit for the rest of a connection, from the ``hello`` result: the
    server's, but never more than the client's own (``own``). RemoteProtocolError when
    the announcement is not a positive integer."""
    limits = hello.get("limits") if isinstance(hello, Mapping) else None
    announced = limits.get("max_frame_size") if isinstance(limits, Mapping) else None
    if type(announced) is not int or announced < 1:
        raise RemoteProtocolError(
            ErrorCode.INVALID_MESSAGE,
            "hello: limits.max_frame_size must be a positive integer, not "
            + reprlib.repr(announced),  # bounded: the value is the server's
        )
    return min(announced, own)


def requested_events(args: Mapping[str, Any]) -> frozenset[str]:
    """The event names a ``subscribe`` request asks for."""
    events = args.get("events")
    if not isinstance(events, list | tuple | set | frozenset):
        return frozenset()
    return frozenset(e for e in events if isinstance(e, str))


class EventBuffer:
    """Events waiting for ``next_event``. Only those the client subscribed to are kept (a
    server sends no others; a hostile one could send any amount), at most EVENT_BUFFER of
    them and about EVENT_BUFFER_BYTES; the oldest are dropped first."""

    def __init__(self) -> None:
        self._events: collections.deque[tuple[Event, int]] = collections.deque()
        self._bytes = 0
        #: the names kept: those subscribed to (and, while a ``subscribe`` is in flight,
        #: those it asks for, since the server may send them before its answer)
        self.subscribed: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self._events)

    def add(self, event: Event) -> bool:
        """Keep ``event`` if it was subscribed to; True if it was."""
        if event.event not in self.subscribed:
            return False
        try:
            size = len(pack(dict(event.data)))
        except ProtocolError:  # cannot happen to what msgpack decoded; count it large
            size = EVENT_BUFFER_BYTES
        self._events.append((event, size))
        self._bytes += size
        while len(self._events) > EVENT_BUFFER or (
            self._bytes > EVENT_BUFFER_BYTES and len(self._events) > 1
        ):
            _, dropped = self._events.popleft()
            self._bytes -= dropped
        return True

    def popleft(self) -> Event:
        event, size = self._events.popleft()
        self._bytes -= size
        return event


def fd_number(fd: FdLike) -> int:
    return fd if isinstance(fd, int) else fd.fileno()


def split_fds(fds: Mapping[str, FdLike] | None) -> tuple[list[str], list[int]]:
    if not fds:
        return [], []
    return list(fds), [fd_number(f) for f in fds.values()]


def scm_rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def progress_request(event: Event) -> int | None:
    """The request a ``progress`` event reports on, or None for other events."""
    if event.event != "progress":
        return None
    rid: Any = event.data.get("request")
    return rid if isinstance(rid, int) else None

"""What the async and the blocking client share (no I/O of its own)."""

from __future__ import annotations

import array
import collections
import contextlib
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
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    ServerTiming,
    UntrustedServer,
    pack,
    parse_version,
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


# --- protocol 1.8: server timings and ordered chains ---------------------------------------

#: the minor version of major 1 this client speaks (``hello``'s ``minor``)
CLIENT_MINOR = 10
#: a reply observer: called with the command and the server's timing of each reply
ReplyObserver = Callable[[str, ServerTiming], None]


class Reply(dict[str, Any]):
    """A command's result: the result map itself (callers use it as before), and
    :attr:`server`, what the server says the request took (protocol 1.8), or None."""

    __slots__ = ("server",)

    def __init__(self, result: Mapping[str, Any], server: ServerTiming | None) -> None:
        super().__init__(result)
        self.server = server

    def __repr__(self) -> str:
        return f"Reply({dict.__repr__(self)}, server={self.server!r})"


def server_timing(reply: Any) -> ServerTiming | None:
    """What the server says a call took: from a :class:`Reply` or a CommandError (protocol
    1.8), else None. For callers holding a result typed as the command's TypedDict."""
    timing = getattr(reply, "server", None)
    return timing if isinstance(timing, ServerTiming) else None


def make_reply(result: Any, took: ServerTiming | None) -> Any:
    """What a call returns: a map result as a :class:`Reply` (anything else as it is)."""
    return Reply(result, took) if isinstance(result, dict) else result


class Call:
    """One request of an ordered chain (``send_ordered``, ``call_ordered``):
    ``Call("pause", lease=5)``, ``Call("dump-state", fds={"out": f})``."""

    __slots__ = ("args", "command", "fds")

    def __init__(
        self, command: str, /, *, fds: Mapping[str, FdLike] | None = None, **args: Any
    ) -> None:
        self.command = command
        self.args: dict[str, Any] = args
        self.fds: Mapping[str, FdLike] = dict(fds or {})

    def __repr__(self) -> str:
        parts = [repr(self.command), *(f"{k}={v!r}" for k, v in self.args.items())]
        if self.fds:
            parts.append(f"fds={self.fds!r}")
        return f"Call({', '.join(parts)})"


class ReplyObservers:
    """The observers of a client's replies (``add_reply_observer``)."""

    def __init__(self) -> None:
        self._observers: list[ReplyObserver] = []

    def add(self, observer: ReplyObserver) -> Callable[[], None]:
        self._observers.append(observer)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._observers.remove(observer)

        return remove

    def notify(self, command: str, took: ServerTiming | None) -> None:
        if took is None:
            return
        for observer in list(self._observers):
            try:
                observer(command, took)
            except Exception:
                # an observer's bug must not break the connection's reader. logging is
                # imported here, on that bug only: at import it costs `vmipc call` ~5 ms
                import logging

                logging.getLogger("vmipc.client").exception("a reply observer failed")


def minor_of(hello: Any) -> int:
    """The minor version the ``hello`` result names (0 when unreadable)."""
    version = hello.get("protocol") if isinstance(hello, Mapping) else None
    try:
        return parse_version(version)[1] if isinstance(version, str) else 0
    except ValueError:
        return 0


def chain_unsupported(version: str) -> LocalProtocolError:
    return LocalProtocolError(
        ErrorCode.INVALID_MESSAGE,
        f"ordered chains need protocol 1.8; this connection speaks {version}",
    )

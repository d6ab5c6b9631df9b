"""What the async and the blocking client share (no I/O of its own)."""

from __future__ import annotations

import array
import socket
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from vmipc import __version__
from vmipc.protocol import Event

#: what ``hello`` says the client is, unless told otherwise
DEFAULT_CLIENT_NAME = f"vmipc-python/{__version__}"
#: after a send fails because the server closed (EPIPE, ECONNRESET): read what it sent
#: before closing, for its connection-level error, until the end of the stream but for
#: at most this many seconds...
LAST_WORDS_TIMEOUT = 1.0
#: ...and about this many bytes
LAST_WORDS_LIMIT = 1 << 20


class HasFileno(Protocol):
    def fileno(self) -> int: ...


#: an fd to pass: a number or anything with ``fileno()`` (a file, a socket). The client
#: never closes it; the kernel gives the server its own copy.
FdLike = int | HasFileno
#: called with each ``progress`` event of one request
ProgressCallback = Callable[[Event], None]


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

"""Socket I/O that never blocks, for small transfers done on the control server's event
loop instead of in a worker thread (the state blob: a few kilobytes, where the two thread
hops cost more than the work).

``MSG_DONTWAIT`` makes one call non-blocking without touching the fd's file status flags:
the client may share the file description, and the blocking data plane (transfer.py)
relies on them. Sockets only; the caller waits for readiness itself and passes anything
else to the worker-thread path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket

from vmipc.formats import NEED_DATA, FormatError, PageStreamDecoder, StreamEnd
from vmipc.vmm.persist.transfer import PeerClosed, Transfer

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_send = _libc.send
_send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_send.restype = ctypes.c_ssize_t
_recv = _libc.recv
_recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_recv.restype = ctypes.c_ssize_t

_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)


def _outcome(result: int, what: str) -> int | None:
    if result >= 0:
        return result
    err = ctypes.get_errno()
    if err in (errno.EAGAIN, errno.EINTR):
        return None
    if err in _GONE:
        raise PeerClosed(f"{what}: the other end went away ({os.strerror(err)})")
    raise OSError(err, f"{what}: {os.strerror(err)}")


def send_nowait(fd: int, data: bytes) -> int | None:
    """Send what the socket ``fd`` takes now of ``data``: the bytes sent, or None when it
    takes nothing now. PeerClosed when its reader is gone, OSError else."""
    return _outcome(_send(fd, data, len(data), _SEND_FLAGS), "send")


def recv_nowait(
    fd: int, buffer: bytearray, offset: int, size: int, *, peek: bool = False
) -> int | None:
    """Receive at most ``size`` bytes from the socket ``fd`` into ``buffer[offset:]`` (which
    holds them): the bytes received (0 at the end of input), or None when none are there
    now. ``peek``: leave them in the socket. PeerClosed when the sender reset the
    connection, OSError else."""
    if offset + size > len(buffer):
        raise ValueError("the buffer is too small")
    base = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
    flags = socket.MSG_DONTWAIT | (socket.MSG_PEEK if peek else 0)
    return _outcome(_recv(fd, base + offset, size, flags), "recv")


def whole_page_stream(data: bytes | bytearray | memoryview) -> int | None:
    """The length of the page stream ``data`` begins with, when all of it is there (its
    end record included); None when it is not (or the bytes are no page stream: the
    reader that takes the fd says what is wrong with them). Reads nothing into RAM; a
    stream whose payloads are not hashed is measured too (its reader decides whether to
    take it)."""
    decoder = PageStreamDecoder(accept_unhashed=True)
    decoder.feed(data)
    try:
        while True:
            event = decoder.next_event()
            if event is NEED_DATA:
                return None
            if isinstance(event, StreamEnd):
                return len(data) - decoder.buffered
    except FormatError:
        return None


class BufferTransfer(Transfer):
    """A transfer into memory: what a dump would write to its fd is gathered in
    :attr:`data` (guest pages copied with ``preadv`` where the fd path would ``sendfile``
    them), for the caller to send without blocking. For small dumps only: ``limit`` bytes
    at most (OverflowError beyond)."""

    def __init__(self, limit: int) -> None:
        super().__init__(None)
        self.limit = limit
        self.data = bytearray()

    def _room(self, count: int) -> None:
        if len(self.data) + count > self.limit:
            raise OverflowError(f"a dump into memory of more than {self.limit} bytes")

    def write(self, out_fd: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._room(len(view))
        self.data += view
        self.advance(len(view))

    def sendfile(self, out_fd: int, in_fd: int, offset: int, count: int) -> None:
        self._room(count)
        start = len(self.data)
        self.data += bytes(count)
        got = 0
        with memoryview(self.data) as view:
            while got < count:
                moved = os.preadv(in_fd, [view[start + got : start + count]], offset + got)
                if not moved:
                    raise OSError(errno.EIO, "guest RAM ended early")
                got += moved
        self.advance(count)


class BufferedInput(Transfer):
    """A transfer out of memory: a load's reads served from bytes already received (a
    whole page stream, read off a socket by the event loop); the end of the bytes is the
    end of input."""

    def __init__(self, data: bytes | bytearray) -> None:
        super().__init__(None)
        self._data = memoryview(data).cast("B")
        self._pos = 0

    def read_into(self, in_fd: int, view: memoryview) -> int:
        count = min(len(view), len(self._data) - self._pos)
        view[:count] = self._data[self._pos : self._pos + count]
        self._pos += count
        if count:
            self.advance(count)
        return count

    def readinto(self, in_fd: int, view: memoryview) -> None:
        if self.read_into(in_fd, view) < len(view):
            raise PeerClosed("the input ended early")

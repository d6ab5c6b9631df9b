"""Bulk I/O between guest RAM and client-passed fds, cancellable from another thread.

Bulk transfers run in a worker thread with blocking fds: the VMM must not switch a passed
fd to non-blocking mode, since the client may share its file description (a CLI's stdout).
A reader that stops reading would then block the worker forever, so cancellation kicks
the worker with the same no-op signal that stops vCPUs; the raw libc calls here (unlike
``os.write`` and friends, which retry on EINTR) return EINTR to us and we stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import select
import signal
import stat
import threading
import time
from collections.abc import Callable

from vmipc.errors import VmipcError
from vmipc.vmm.kick import KICK_SIGNAL, install_kick_handler

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_sendfile = _libc.sendfile
_sendfile.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t]
_sendfile.restype = ctypes.c_ssize_t
_write = _libc.write
_write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_write.restype = ctypes.c_ssize_t
_pwrite = _libc.pwrite
_pwrite.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
_pwrite.restype = ctypes.c_ssize_t
_pread = _libc.pread
_pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
_pread.restype = ctypes.c_ssize_t
_read = _libc.read
_read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_read.restype = ctypes.c_ssize_t

#: Largest piece moved by one system call: bounds how long a cancel waits on a fast fd.
CHUNK = 4 << 20


class TransferCancelled(VmipcError):
    """The transfer was cancelled; the fd may hold a partial stream."""


class PeerClosed(VmipcError):
    """The other end of the fd went away (EPIPE, ECONNRESET) or the input ended early."""


class Transfer:
    """One cancellable bulk operation, run by one worker thread.

    Built in the worker thread it is bound to that thread; built elsewhere (so a canceller
    holds it before the worker starts), the worker calls :meth:`bind` first.
    """

    def __init__(self, progress: Callable[[int], None] | None = None) -> None:
        install_kick_handler()
        self._worker: int | None = threading.get_ident()
        self._cancelled = threading.Event()
        self._finished = threading.Event()
        self._progress = progress
        #: bytes moved so far
        self.done = 0
        #: what progress reports count up to, when known: bytes moved, or (after
        #: :meth:`count_ram`) bytes of guest RAM gone through
        self.total: int | None = None
        #: bytes of guest RAM gone through, holes and zero pages included (:meth:`cover`)
        self.ram_done = 0
        self._counts_ram = False

    @classmethod
    def unbound(cls, progress: Callable[[int], None] | None = None) -> Transfer:
        """A transfer whose worker will call :meth:`bind`."""
        transfer = cls(progress)
        transfer._worker = None
        return transfer

    def bind(self) -> None:
        """Make the calling thread the worker (the one cancel kicks)."""
        self._worker = threading.get_ident()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        if self._cancelled.is_set():
            raise TransferCancelled("cancelled")

    def advance(self, count: int) -> None:
        self.done += count
        if self._progress is not None and not self._counts_ram:
            self._progress(self.done)

    def count_ram(self) -> None:
        """Progress counts bytes of guest RAM gone through (:meth:`cover`) from now on, not
        bytes moved: a stream says a zero page in a few bytes, a sparse file skips it."""
        self._counts_ram = True

    def cover(self, count: int) -> None:
        """``count`` more bytes of guest RAM were sent, written, skipped or received."""
        self.ram_done += count
        if self._progress is not None and self._counts_ram:
            self._progress(self.ram_done)

    def finish(self) -> None:
        self._finished.set()

    def cancel(self, wait: float = 5.0) -> bool:
        """Stop the worker at its next system call, kicking it out of a blocked one.

        Kicks again every few milliseconds: a kick that lands just before the worker enters
        a blocking call is lost, the next one is not. Returns whether the worker finished.
        """
        self._cancelled.set()
        deadline = time.monotonic() + wait
        while not self._finished.is_set() and time.monotonic() < deadline:
            if self._worker is not None:
                try:
                    signal.pthread_kill(self._worker, KICK_SIGNAL)
                except ProcessLookupError:
                    break
            self._finished.wait(0.005)
        return self._finished.is_set()

    # --- the system calls -----------------------------------------------------------

    def _result(self, result: int, what: str, fd: int = -1, events: int = 0) -> int:
        if result >= 0:
            return result
        err = ctypes.get_errno()
        if err == errno.EINTR:
            self.check()
            return 0
        if err == errno.EAGAIN:
            # A client passed a non-blocking fd: wait until it is ready instead of spinning
            # (a kick still interrupts the poll, and the timeout re-checks for a cancel).
            self.check()
            if fd < 0:
                return 0
            poller = select.poll()
            poller.register(fd, events)
            with contextlib.suppress(InterruptedError):
                poller.poll(100)
            self.check()
            return 0
        if err in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
            raise PeerClosed(f"{what}: the reader went away ({os.strerror(err)})")
        raise OSError(err, f"{what}: {os.strerror(err)}")

    def sendfile(self, out_fd: int, in_fd: int, offset: int, count: int) -> None:
        """Copy ``count`` bytes at ``offset`` of ``in_fd`` (a memfd) to ``out_fd`` in the
        kernel (pages go by reference into a pipe)."""
        position = ctypes.c_int64(offset)
        remaining = count
        while remaining:
            self.check()
            moved = self._result(
                _sendfile(out_fd, in_fd, ctypes.byref(position), min(remaining, CHUNK)),
                "sendfile",
                out_fd,
                select.POLLOUT,
            )
            remaining -= moved
            self.advance(moved)

    def write(self, out_fd: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        buffer = (ctypes.c_char * len(view)).from_buffer_copy(view) if view.readonly else None
        base = ctypes.addressof(buffer) if buffer is not None else _address_of(view)
        sent = 0
        while sent < len(view):
            self.check()
            moved = self._result(
                _write(out_fd, base + sent, min(len(view) - sent, CHUNK)),
                "write",
                out_fd,
                select.POLLOUT,
            )
            sent += moved
            self.advance(moved)

    def pwrite(self, out_fd: int, view: memoryview, file_offset: int) -> None:
        """Write ``view`` (writable memory, e.g. a slice of guest RAM) at ``file_offset``."""
        base = _address_of(view)
        sent = 0
        while sent < len(view):
            self.check()
            moved = self._result(
                _pwrite(out_fd, base + sent, min(len(view) - sent, CHUNK), file_offset + sent),
                "pwrite",
            )
            sent += moved
            self.advance(moved)

    def write_at(self, out_fd: int, data: bytes | bytearray | memoryview, file_offset: int) -> None:
        """Write (small, possibly read-only) ``data`` at ``file_offset`` of a file."""
        self.pwrite(out_fd, memoryview(bytearray(data)), file_offset)

    def preadinto(self, in_fd: int, view: memoryview, file_offset: int) -> None:
        """Fill ``view`` (writable) from ``in_fd`` at ``file_offset``."""
        base = _address_of(view)
        got = 0
        while got < len(view):
            self.check()
            result = _pread(in_fd, base + got, min(len(view) - got, CHUNK), file_offset + got)
            if result == 0:
                raise PeerClosed(f"the file ends {len(view) - got} bytes early")
            moved = self._result(result, "pread")
            got += moved
            self.advance(moved)

    def readinto(self, in_fd: int, view: memoryview) -> None:
        """Fill ``view`` (writable) from ``in_fd``; PeerClosed if the input ends first."""
        base = _address_of(view)
        got = 0
        while got < len(view):
            self.check()
            result = _read(in_fd, base + got, min(len(view) - got, CHUNK))
            if result == 0:
                raise PeerClosed(f"the input ended {len(view) - got} bytes early")
            moved = self._result(result, "read", in_fd, select.POLLIN)
            got += moved
            self.advance(moved)

    def read_into(self, in_fd: int, view: memoryview) -> int:
        """One read of up to ``len(view)`` bytes into ``view`` (writable: guest RAM or a
        caller's reusable buffer, so no read allocates); 0 at end of input."""
        base = _address_of(view)
        size = min(len(view), CHUNK)
        while True:
            self.check()
            result = _read(in_fd, base, size)
            if result == 0:
                return 0
            moved = self._result(result, "read", in_fd, select.POLLIN)
            if moved:
                self.advance(moved)
                return moved


def _address_of(view: memoryview) -> int:
    if view.readonly:
        raise ValueError("needs writable memory")
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def fd_kind(fd: int) -> str:
    """ "file", "pipe", "socket", "char" or "other" — dumps pick their copy path by it."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode):
        return "pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "char"
    return "other"

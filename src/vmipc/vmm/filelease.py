"""A read lease on the snapshot file that a lazy restore maps as guest RAM.

Guest RAM mapped ``MAP_PRIVATE`` from a file reads through to the file wherever the guest
has not written yet. So a writer would change guest RAM under the guest, and a truncation
(``> FILE``, ``cp small FILE``, any open with ``O_TRUNC``) would make those pages raise
SIGBUS — and discards even the pages the guest already wrote (the kernel unmaps private
copies beyond the new end of file too). Nothing in the mapping protects against that.

A read lease does: with ``fcntl(F_SETLEASE, F_RDLCK)`` held on the file, the kernel makes
anyone who opens it for writing or truncates it wait (up to ``fs.lease-break-time``
seconds, 45 by default) and signals the lease holder first. The VMM then copies guest RAM
off the file and closes the lease's fd, which lets the writer go on.

The kernel grants a read lease only on a file opened read-only that nobody has open for
writing, to its owner or to a process with ``CAP_LEASE``, on a filesystem that supports
leases; :meth:`ReadLease.take` says which of these failed. Everything that needs a
privilege or a say over signals happens in :meth:`ReadLease.take`, on the main thread
before capability mode: afterwards the lease needs only ``fcntl(F_GETLEASE)``,
``rt_sigtimedwait``, ``rt_sigprocmask``, ``tgkill`` (this process) and ``close`` —
releasing by closing the fd needs neither ownership nor ``CAP_LEASE``, unlike ``F_UNLCK``.
The capability-mode filter allows just these (``vmm/sandbox.py``); it refuses
``F_SETOWN_EX``, and ``F_SETOWN`` to anything but this process, with which a compromised
VMM could have the kernel signal other processes.

A restore into a VMM that is already running (``load-memory format=snapshot`` of a passed
fd, in capability mode) cannot open the file again: :meth:`ReadLease.take_passed` leases
the passed fd's own open file description (on a duplicate of it, which shares it). Then
the lease is taken after the capabilities are dropped, so the kernel grants it only on a
file of the VMM's own user; and it is released with ``F_SETLEASE F_UNLCK`` rather than by
closing the fd, since the client's fd and the mapping hold the same description. The
capability-mode filter allows exactly these: ``F_SETLEASE`` to ``F_RDLCK``/``F_UNLCK``,
``F_SETSIG`` to :data:`LEASE_SIGNAL` and ``F_SETOWN`` to this process. The signal is held
on the main thread when the VMM starts (:func:`hold_lease_signal`, from
``vmm/builder.py``'s ``build_incoming``), before any thread exists.

The break is announced with :data:`LEASE_SIGNAL` (``F_SETSIG``) to this process
(``F_SETOWN``, both set in :meth:`ReadLease.take`). The main thread blocks the signal
before any other thread exists, so every thread inherits it blocked: it stays pending
until the watcher thread takes it with ``sigtimedwait``, and it can kill nothing whenever
it comes (it is also ignored, should a thread unblock it). The watcher also looks at the
lease every :data:`POLL_SECONDS`, so a lost signal only delays the copy.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from vmipc.errors import VmipcError

__all__ = [
    "LEASE_SIGNAL",
    "MIN_BREAK_SECONDS",
    "POLL_SECONDS",
    "LeaseUnavailable",
    "ReadLease",
    "hold_lease_signal",
    "lease_break_time",
]

log = logging.getLogger("vmipc.vmm")

#: the signal the kernel sends when a writer breaks the lease (not the vCPU kick, SIGUSR1)
LEASE_SIGNAL = signal.SIGRTMIN + 2
#: how often the watcher looks at the lease even without a signal
POLL_SECONDS = 1.0
#: a shorter fs.lease-break-time leaves no time to copy guest RAM off the file: no lease
MIN_BREAK_SECONDS = 5

# <fcntl.h>: not all of these are in Python's fcntl module
_F_SETSIG = 10


class LeaseUnavailable(VmipcError):
    """The kernel refused a read lease (one line: why)."""


def _why(exc: OSError) -> str:
    if exc.errno == errno.EAGAIN:
        return "it is open for writing (or leased) elsewhere"
    if exc.errno == errno.EACCES:
        return "this user does not own it and has no CAP_LEASE"
    if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return "its filesystem (or fs.leases-enable) allows no leases"
    return f"no read lease: {exc.strerror}"


def lease_break_time() -> int:
    """How long the kernel holds a writer back for a lease holder (fs.lease-break-time)."""
    try:
        with open("/proc/sys/fs/lease-break-time", "rb") as file:
            return int(file.read())
    except (OSError, ValueError):
        return 45  # the kernel's default


def hold_lease_signal() -> None:
    """Block the lease signal on the main thread, which every thread started later
    inherits, so that it waits, pending, for the watcher's ``sigtimedwait``; and ignore it,
    so that it can never kill the process (a real-time signal's default)."""
    if threading.current_thread() is not threading.main_thread():
        raise LeaseUnavailable("a lease can only be taken on the main thread")
    signal.pthread_sigmask(signal.SIG_BLOCK, {LEASE_SIGNAL})
    if signal.getsignal(LEASE_SIGNAL) is not signal.SIG_IGN:
        signal.signal(LEASE_SIGNAL, signal.SIG_IGN)


class ReadLease:
    """A read lease on a file, held on an fd of its own; see the module docstring."""

    def __init__(self, fd: int, break_time: int, *, unlock: bool = False) -> None:
        self._fd = fd
        #: release with F_UNLCK before closing: the fd shares its open file description
        #: with other holders (a passed fd), so closing it would not end the lease
        self._unlock = unlock
        #: fs.lease-break-time when the lease was taken (capability mode cannot read it)
        self.break_time = break_time
        self._lock = threading.Lock()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._watching = False

    @classmethod
    def take(cls, path: str, opened: int) -> ReadLease:
        """A read lease on the file ``opened`` (an fd open on ``path``). Raises
        :class:`LeaseUnavailable`. Call it on the main thread, before capability mode."""
        break_time = lease_break_time()
        if break_time < MIN_BREAK_SECONDS:
            raise LeaseUnavailable(
                f"fs.lease-break-time is {break_time} s: too short to copy guest RAM off it"
            )
        hold_lease_signal()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise LeaseUnavailable(f"cannot open it again for a lease: {exc.strerror}") from None
        try:
            ours, theirs = os.fstat(opened), os.fstat(fd)
            if (ours.st_dev, ours.st_ino) != (theirs.st_dev, theirs.st_ino):
                raise LeaseUnavailable("the file was replaced while it was being opened")
            fcntl.fcntl(fd, _F_SETSIG, LEASE_SIGNAL)
            fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            os.close(fd)
            raise LeaseUnavailable(_why(exc)) from None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, break_time)

    @classmethod
    def take_passed(cls, fd: int, break_time: int) -> ReadLease:
        """A read lease on the open file description of ``fd`` (a regular file passed to
        the VMM), for a VMM in capability mode: no path is opened. ``break_time``:
        fs.lease-break-time, read before capability mode. The lease signal must be held
        already (:func:`hold_lease_signal` on the main thread, before any thread).
        Raises :class:`LeaseUnavailable`."""
        if break_time < MIN_BREAK_SECONDS:
            raise LeaseUnavailable(
                f"fs.lease-break-time is {break_time} s: too short to copy guest RAM off it"
            )
        if LEASE_SIGNAL not in signal.pthread_sigmask(signal.SIG_BLOCK, set()):
            raise LeaseUnavailable("the lease signal is not held in this VMM")
        try:
            ours = os.dup(fd)
        except OSError as exc:
            raise LeaseUnavailable(f"cannot duplicate the fd: {exc.strerror}") from None
        try:
            fcntl.fcntl(ours, _F_SETSIG, LEASE_SIGNAL)
            fcntl.fcntl(ours, fcntl.F_SETOWN, os.getpid())
            fcntl.fcntl(ours, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            os.close(ours)
            if exc.errno == errno.EPERM:  # a sandbox without the lease calls
                raise LeaseUnavailable("this VMM's sandbox allows no leases") from None
            raise LeaseUnavailable(_why(exc)) from None
        except BaseException:
            os.close(ours)
            raise
        return cls(ours, break_time, unlock=True)

    @property
    def held(self) -> bool:
        """True until the lease is released (after a break, or by :meth:`close`)."""
        return self._fd >= 0

    def watch(self, on_break: Callable[[float], None]) -> None:
        """Start the watcher thread: when a writer breaks the lease, it calls ``on_break``
        with a deadline (``time.monotonic()``) before which it must have made guest RAM
        independent of the file — the kernel lets the writer go at ``fs.lease-break-time``
        whatever we do — then releases the lease so the writer goes on. Once only."""
        with self._lock:
            if self._thread is not None or self._fd < 0:
                return
            self._thread = threading.Thread(
                target=self._watch, args=(on_break,), name="snapshot-lease", daemon=True
            )
            self._watching = True
        self._thread.start()

    def _watch(self, on_break: Callable[[float], None]) -> None:
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, {LEASE_SIGNAL})  # inherited already
            while not self._closing and not self._broken():
                signal.sigtimedwait({LEASE_SIGNAL}, POLL_SECONDS)
            if not self._closing:
                # the writer may have waited since the last poll when no signal came
                deadline = time.monotonic() + 0.75 * self.break_time - POLL_SECONDS
                try:
                    on_break(deadline)
                except Exception:  # the callback reports its own failures; never hang
                    log.exception("copying guest RAM off the snapshot file failed")
        finally:
            with self._lock:
                self._watching = False
            self.release()

    def _broken(self) -> bool:
        with self._lock:
            if self._fd < 0:
                return True
            try:
                return fcntl.fcntl(self._fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK
            except OSError:
                return True

    def release(self) -> None:
        """Let go of the lease (a held writer goes on). Idempotent."""
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            if self._unlock:
                try:
                    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
                except OSError as exc:  # the kernel ends it at fs.lease-break-time anyway
                    log.warning("cannot release the snapshot file's lease: %s", exc.strerror)
            os.close(fd)

    def close(self) -> None:
        """Stop the watcher (it calls nothing more) and release the lease. Idempotent."""
        self._closing = True
        with self._lock:
            thread = self._thread
            if thread is not None and self._watching and thread.ident is not None:
                # it cannot exit while we hold the lock, so the id is still its own
                signal.pthread_kill(thread.ident, LEASE_SIGNAL)
        started = thread is not None and thread.ident is not None
        if started and thread is not threading.current_thread():
            assert thread is not None
            thread.join()
        self.release()

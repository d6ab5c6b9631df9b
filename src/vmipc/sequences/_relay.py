"""The bulk relay of the migration channel over TLS (protocol/migration-channel.md#bulk-data).

A VMM's building blocks read and write a plain fd, and these machines have no kernel TLS,
so each client relays its VMM's bulk data through Python's ``ssl``: the VMM gets one end
of a socket pair, a thread copies between the other end and the TLS connection in chunks
(encrypting on the sender, decrypting on the receiver), and trio runs the VMM's building
block meanwhile. :func:`relay` is that one orchestration, for both directions; the thread
runs :func:`send_chunks` on the sender and :func:`receive_chunks` on the receiver.

The relay is on the stop-and-copy's path (the last dirty pages and the state go through
it, where plain TCP hands the socket to the VMMs), so it is built for latency as much as
for throughput (measured with benchmarks/bench_tls.py):

- the sender's thread sends the control frame that announces the transfer, the chunks
  and the end mark, and then reads the receiver's reply: no hop through trio in between;
- the sender's thread closes its copy of the VMM's end as soon as the VMM has written
  (the VMM holds its own copy by then), so the end of the stream is seen as soon as the
  VMM closes its fd, which it does before it replies, not once its reply went through
  trio back to this process;
- both threads move at most 256 KiB at a time (the sender reads that much into a chunk,
  the receiver hands on what it decrypted every 256 KiB): the bytes stay in the CPU's
  cache between the copy and the cipher, and the receiver's VMM works on the start of a
  chunk while the rest is decrypted. A socket pair with the kernel's default buffer
  (about 200 KiB) measured as cheap as a pipe (into which a paused VMM ``sendfile``s
  pages by reference) and cheaper than either with megabytes of buffer.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

from vmipc.sequences._tls import ControlError, hard_shutdown

#: a bulk chunk: u32 little-endian length, then that many bytes; 0 ends the stream
#: and ABORT says the sender's dump failed (the stream is cut short on purpose)
MAX_CHUNK = 1 << 20
CHUNK_END = 0
CHUNK_ABORT = 0xFFFFFFFF
_LENGTH = struct.Struct("<I")
#: the most bytes either thread moves at a time: the sender's chunks (up to MAX_CHUNK
#: accepted), the receiver's writes to its VMM
STEP = 256 << 10

T = TypeVar("T")


class Aborted(ControlError):
    """The sender said its dump failed: the stream was cut short on purpose."""


class End:
    """One end of the socket pair to a VMM, which either of two threads may close, once."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    @property
    def fd(self) -> int:
        """The fd, or -1 once closed."""
        return self._fd

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def vmm_channel() -> tuple[End, End]:
    """A fresh socket pair as (our end, the VMM's end)."""
    ours, theirs = socket.socketpair()
    return End(ours.detach()), End(theirs.detach())


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ControlError("the connection closed")
        got += n


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


# --- the thread's two loops ------------------------------------------------------------------


def send_chunks(
    tls: socket.socket, source: End, vmm_end: End, failed: threading.Event, first: bytes
) -> int:
    """Sender: ``first`` (the control frame that announces the transfer), then everything
    the VMM writes into the socket pair until it closed its end, as chunks, then the end
    mark (ABORT if ``failed`` is set by then). ``vmm_end`` (the end passed to the VMM) is
    closed once the VMM has written. Closes ``source``. Returns the bytes relayed."""
    buffer = bytearray(_LENGTH.size + STEP)
    view = memoryview(buffer)
    data = [view[_LENGTH.size :]]
    total = 0
    try:
        tls.sendall(first)
        while True:
            n = os.readv(source.fd, data)
            if n == 0:
                break
            # the VMM wrote, so it holds the fd: from now on end of input means it closed it
            vmm_end.close()
            _LENGTH.pack_into(buffer, 0, n)
            tls.sendall(view[: _LENGTH.size + n])
            total += n
        tls.sendall(_LENGTH.pack(CHUNK_ABORT if failed.is_set() else CHUNK_END))
        return total
    finally:
        source.close()  # the VMM's writes fail at once if this stopped early


def receive_chunks(tls: socket.socket, sink: End) -> int:
    """Receiver: chunks from ``tls`` into the socket pair whose other end the VMM reads,
    written on every STEP bytes, up to the end mark; never reads past it. Closes ``sink``
    (the VMM sees end of input). Returns the bytes relayed."""
    buffer = bytearray(STEP)
    view = memoryview(buffer)
    header = memoryview(bytearray(_LENGTH.size))
    total = 0
    try:
        while True:
            recv_exact_into(tls, header)
            (n,) = _LENGTH.unpack(header)
            if n == CHUNK_END:
                return total
            if n == CHUNK_ABORT:
                raise Aborted("the sender's dump failed (it cut the stream short)")
            if n > MAX_CHUNK:
                raise ControlError(f"a bulk chunk of {n} bytes (limit {MAX_CHUNK})")
            while n:
                piece = view[: min(n, STEP)]
                recv_exact_into(tls, piece)
                _write_all(sink.fd, piece)
                n -= len(piece)
                total += len(piece)
    finally:
        sink.close()


# --- the orchestration -------------------------------------------------------------------------


@dataclass
class Outcome(Generic[T]):
    """How one side of a relay ended: its value, or its error (neither: it was given up)."""

    value: T | None = None
    error: BaseException | None = None


async def in_thread(sock: socket.socket, work: Callable[[], T]) -> T:
    """Blocking socket work in a thread; a cancelled wait shuts the connection down so
    the thread returns (the connection is unusable afterwards anyway)."""
    try:
        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    except trio.Cancelled:
        hard_shutdown(sock)
        raise


async def relay(
    tls: socket.socket,
    *,
    vmm_call: Callable[[int], Awaitable[Any]],
    copy: Callable[[End, End], T],
    failed: threading.Event,
    grace: float,
    after: float | None = None,
) -> tuple[Outcome[Any], Outcome[T]]:
    """One bulk transfer: ``vmm_call`` gets the VMM's end of a fresh socket pair (its fd)
    while a thread runs ``copy(our end, the VMM's end)`` between the other end and ``tls``.

    When ``vmm_call`` fails, ``failed`` is set and ``copy`` gets ``grace`` more seconds;
    when it succeeds, ``after`` more seconds (None: no limit). A copy given up shuts
    ``tls`` down (its Outcome has neither value nor error). Never raises but Cancelled."""
    ours, theirs = vmm_channel()
    vmm: Outcome[Any] = Outcome()
    copied: Outcome[T] = Outcome()

    async def run_copy() -> None:
        try:
            copied.value = await in_thread(tls, lambda: copy(ours, theirs))
        except Exception as exc:
            copied.error = exc

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_copy)
            limit: float | None = after
            try:
                vmm.value = await vmm_call(theirs.fd)
            except Exception as exc:
                vmm.error = exc
                failed.set()
                limit = grace
            finally:
                # with the VMM's copy closed too: a dump's end of input, or a load's reader
                # gone (the thread's writes fail at once)
                theirs.close()
            if limit is not None:
                nursery.cancel_scope.deadline = trio.current_time() + limit
    finally:
        ours.close()
        theirs.close()
    return vmm, copied

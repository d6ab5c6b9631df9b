"""What a vCPU exited for: one small type per exit, as rust-vmm kvm-ioctls' ``VcpuExit``.

:meth:`Vcpu.run` returns one of these instead of leaving its caller to read the
``struct kvm_run`` union. :func:`decode_exit` reads them from the vCPU's shared
``kvm_run`` page and is pure, so it is tested with hand-made pages.

A read the guest made — :class:`IoIn`, :class:`MmioRead` — is answered with
:meth:`Vcpu.complete_io_in` / :meth:`Vcpu.complete_mmio_read` before the next ``KVM_RUN``,
which finishes the instruction. Writes carry their bytes. The exits without fields are
singletons (:data:`HLT`, :data:`SHUTDOWN`, :data:`INTR`): the hot path allocates nothing
for them.

They are values: treat them as read-only. They are plain slotted dataclasses rather than
frozen ones because one is made per exit, and a frozen one costs three times as much to
build (~450 ns against ~150 ns here).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from vmipc.kvm._numbers import ExitReason
from vmipc.kvm.structs import KVM_EXIT_IO_OUT


@dataclass(slots=True)
class IoIn:
    """The guest reads ``count`` items of ``size`` bytes (1, 2 or 4) from ``port``;
    ``count`` > 1 is a string instruction (``rep insb``). Answer with
    ``Vcpu.complete_io_in(data)``, ``size * count`` bytes, little-endian items in order."""

    port: int
    size: int
    count: int


@dataclass(slots=True)
class IoOut:
    """The guest writes ``data`` to ``port``: ``len(data) // size`` items of ``size``
    bytes, little-endian (more than one for ``rep outsb``)."""

    port: int
    size: int
    data: bytes


@dataclass(slots=True)
class MmioRead:
    """The guest reads ``size`` bytes (1..8) at guest-physical ``addr``, which no memory
    slot backs. Answer with ``Vcpu.complete_mmio_read(data)``."""

    addr: int
    size: int


@dataclass(slots=True)
class MmioWrite:
    """The guest writes ``data`` (1..8 bytes) at guest-physical ``addr``."""

    addr: int
    data: bytes


@dataclass(slots=True)
class Hlt:
    """The guest halted (only without an in-kernel LAPIC, which waits by itself)."""


@dataclass(slots=True)
class Shutdown:
    """A triple fault: the vCPU cannot go on."""


@dataclass(slots=True)
class Intr:
    """``KVM_RUN`` returned before the guest exited: a signal (a pause kick) or
    ``immediate_exit``. Not an exit of the guest: just run again, or park."""


@dataclass(slots=True)
class InternalError:
    """KVM could not go on (e.g. its instruction emulator failed); ``data`` as KVM gave
    it (at most 16 words)."""

    suberror: int
    data: tuple[int, ...]


@dataclass(slots=True)
class FailEntry:
    """Entering the guest failed; ``reason`` is the hardware's."""

    reason: int
    cpu: int


@dataclass(slots=True)
class SystemEvent:
    """The guest asked for a shutdown (``kind`` 1), a reset (2) or reported a crash (3)."""

    kind: int
    data: tuple[int, ...]


@dataclass(slots=True)
class Unsupported:
    """An exit the VMM does not expect (``reason`` is KVM's number, see ExitReason)."""

    reason: int

    @property
    def name(self) -> str:
        try:
            return ExitReason(self.reason).name
        except ValueError:
            return str(self.reason)


VcpuExit: TypeAlias = (
    IoIn
    | IoOut
    | MmioRead
    | MmioWrite
    | Hlt
    | Shutdown
    | Intr
    | InternalError
    | FailEntry
    | SystemEvent
    | Unsupported
)

HLT = Hlt()
SHUTDOWN = Shutdown()
INTR = Intr()

SYSTEM_EVENT_SHUTDOWN = 1
SYSTEM_EVENT_RESET = 2
SYSTEM_EVENT_CRASH = 3

# struct kvm_run: exit_reason at 8, the exit union at 32 (checked in structs.py)
_REASON = struct.Struct("<I")
_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data[8], len, is_write
_FAIL_ENTRY = struct.Struct("<QI")  # hardware_entry_failure_reason, cpu
_WORDS = struct.Struct("<II")  # suberror / type, ndata; then u64 data[16] at 40
_UNION = 32
_EXIT_IO = int(ExitReason.IO)
_DATA = 40
_MAX_WORDS = 16


def _words(run: mmap.mmap) -> tuple[int, tuple[int, ...]]:
    first, count = _WORDS.unpack_from(run, _UNION)
    count = min(count, _MAX_WORDS)
    return first, struct.unpack_from(f"<{count}Q", run, _DATA)


def _mmio(run: mmap.mmap) -> MmioRead | MmioWrite:
    addr, data, length, is_write = _MMIO.unpack_from(run, _UNION)
    length = min(length, 8)
    if is_write:
        return MmioWrite(addr, data[:length])
    return MmioRead(addr, length)


def _internal(run: mmap.mmap) -> InternalError:
    suberror, data = _words(run)
    return InternalError(suberror, data)


def _system_event(run: mmap.mmap) -> SystemEvent:
    kind, data = _words(run)
    return SystemEvent(kind, data)


def _fail_entry(run: mmap.mmap) -> FailEntry:
    reason, cpu = _FAIL_ENTRY.unpack_from(run, _UNION)
    return FailEntry(reason, cpu)


_DECODERS: dict[int, Callable[[mmap.mmap], VcpuExit]] = {
    ExitReason.MMIO: _mmio,
    ExitReason.HLT: lambda run: HLT,
    ExitReason.SHUTDOWN: lambda run: SHUTDOWN,
    ExitReason.INTR: lambda run: INTR,
    ExitReason.INTERNAL_ERROR: _internal,
    ExitReason.FAIL_ENTRY: _fail_entry,
    ExitReason.SYSTEM_EVENT: _system_event,
}


def decode_exit(run: mmap.mmap) -> VcpuExit:
    """The exit a ``struct kvm_run`` page describes (after a ``KVM_RUN`` that returned 0)."""
    (reason,) = _REASON.unpack_from(run, 8)
    if reason == _EXIT_IO:  # the hot path: no table, one unpack
        direction, size, port, count, offset = _IO.unpack_from(run, _UNION)
        if direction == KVM_EXIT_IO_OUT:
            return IoOut(port, size, run[offset : offset + size * count])
        return IoIn(port, size, count)
    decoder = _DECODERS.get(reason)
    return Unsupported(reason) if decoder is None else decoder(run)


def io_data_span(run: mmap.mmap) -> tuple[int, int]:
    """Where in the kvm_run page the current IO exit's data is: (offset, length)."""
    _direction, size, _port, count, offset = _IO.unpack_from(run, _UNION)
    return offset, size * count


def mmio_data_span(run: mmap.mmap) -> tuple[int, int]:
    """Where in the kvm_run page the current MMIO exit's data is: (offset, length)."""
    _addr, _data, length, _is_write = _MMIO.unpack_from(run, _UNION)
    return _DATA, min(length, 8)

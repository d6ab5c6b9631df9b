"""The surface of a machine that the layers above (server, commands) may use.

In roles, as Cloud Hypervisor's ``Pausable`` / ``Snapshottable`` / ``Migratable``:
:class:`Pausable` is the run state, :class:`Snapshottable` a whole machine out to fds and
back in, :class:`Migratable` the increments (the dirty log and the pages it names).
:class:`MachineApi` is all three: the control server and the command handlers are written
against it, so they never reach into VMM internals (guest memory, the data plane). The
concrete class is :class:`vmipc.vmm.host.MachineHost` (the VMM's machine slot, which
forwards the run state to :class:`vmipc.vmm.machine.Machine`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from vmipc.errors import VmipcError
from vmipc.vmm.runstate import RunState

if TYPE_CHECKING:
    from vmipc.formats import SectionEntry
    from vmipc.vmm.dirtylog import DirtyCount, DirtyPages
    from vmipc.vmm.machine import MachineConfig, MachineState
    from vmipc.vmm.persist import DiskStats, Stats, Transfer

#: guest RAM as a page stream, a flat image, or a snapshot file's memory section
MemoryFormat = Literal["stream", "raw", "snapshot"]
#: the non-RAM state as a state blob, or a snapshot file's state sections
StateFormat = Literal["blob", "snapshot"]


@dataclass(frozen=True)
class StateChange:
    """A run-state transition. ``reason`` explains stops (e.g. "triple fault on vcpu 1")."""

    old: RunState
    new: RunState
    reason: str | None = None


class InvalidStateError(VmipcError):
    """The operation is not allowed in the machine's current run state."""

    def __init__(self, operation: str, state: RunState) -> None:
        super().__init__(f"cannot {operation} while {state.value}")
        self.operation = operation
        self.state = state


class NoDisk(VmipcError):
    """The machine has no block device (``dump-disk``)."""


class DiskPresent(VmipcError):
    """``attach-disk`` to a VMM that has a disk already (``vmm --disk``, or an earlier
    ``attach-disk``): one disk per machine, and a disk is never swapped silently."""


class Pausable(Protocol):
    """The run state: start, pause, resume, close, and who hears of the changes."""

    @property
    def state(self) -> RunState: ...

    @property
    def vcpu_count(self) -> int: ...

    @property
    def memory_size(self) -> int: ...

    @property
    def stop_reason(self) -> str | None:
        """Why the machine stopped (shutdown / crashed), else None."""
        ...

    def start(self) -> None:
        """CREATED -> RUNNING: start the vCPU threads."""

    def pause(self) -> None:
        """RUNNING -> PAUSED. Blocks until every vCPU is parked outside KVM_RUN.

        Raises InvalidStateError unless RUNNING. Call it from a worker thread.
        """

    def begin_pause(self, wake: Callable[[], None], *, within: float = 0.0) -> bool:
        """RUNNING -> PAUSED without blocking for long (for an event loop): close the
        gate, kick the vCPUs, wait at most ``within`` seconds for them to park. True when
        PAUSED already; else ``wake`` is called once, from another thread and without
        blocking, when :meth:`finish_pause` can tell the outcome. Raises
        InvalidStateError unless RUNNING."""
        ...

    def finish_pause(self, wake: Callable[[], None]) -> bool:
        """The pause :meth:`begin_pause` began: True once PAUSED; False while a vCPU is not
        parked yet (``wake`` is called once when it is). Raises InvalidStateError when
        the guest stopped meanwhile."""
        ...

    def resume(self, *, wake: bool = True) -> None:
        """PAUSED -> RUNNING without blocking: every vCPU is let go (it does not wait for
        them to re-enter KVM_RUN). ``wake=False``: RUNNING at once, but the vCPU threads
        are let go by :meth:`wake_vcpus` — for a caller that answers first (a woken vCPU
        may take the caller's core before its answer is out). Raises InvalidStateError
        unless PAUSED."""

    def wake_vcpus(self) -> None:
        """Let the vCPU threads of a RUNNING machine go (after ``resume(wake=False)``);
        nothing in any other state (a pause that came first keeps them parked)."""

    def close(self) -> None:
        """Stop every vCPU thread and release KVM resources (-> DESTROYED). Idempotent."""

    def add_listener(self, callback: Callable[[StateChange], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) on every state change; returns an unsubscribe."""
        ...


@dataclass(frozen=True)
class MemoryDump:
    """What :meth:`Snapshottable.dump_memory` wrote."""

    stats: Stats
    #: the guest was paused: the pages are one consistent moment
    consistent: bool
    #: the snapshot memory section's table entry (format ``snapshot``), else None
    section: SectionEntry | None = None


@dataclass(frozen=True)
class StateDump:
    """What :meth:`Snapshottable.dump_state` wrote: its bytes, and the snapshot sections'
    table entries (format ``snapshot``; none for a blob)."""

    bytes: int
    sections: tuple[SectionEntry, ...] = ()


@dataclass(frozen=True)
class DiskDump:
    """What :meth:`Snapshottable.dump_disk` wrote: the ``disk`` section's table entry."""

    stats: DiskStats
    section: SectionEntry


@dataclass(frozen=True)
class DirtyDump:
    """What :meth:`Migratable.dump_dirty` wrote, and the dirty log's new epoch."""

    stats: Stats
    consistent: bool
    epoch: str


class Snapshottable(Protocol):
    """A whole machine out to passed fds and back in: all of RAM, and the state that is
    not RAM. Each call blocks (run it in a worker thread), moves its data with
    ``transfer`` (a cancel stops it there) and raises :class:`vmipc.vmm.persist.BulkError`
    (with a stable code), :class:`vmipc.vmm.persist.PeerClosed`,
    :class:`vmipc.vmm.persist.TransferCancelled`, OSError, or :class:`InvalidStateError`."""

    def dump_memory(
        self, fd: int, fmt: MemoryFormat, transfer: Transfer, *, hash_payload: bool = True
    ) -> MemoryDump:
        """All of RAM to ``fd`` (running or paused); ``hash_payload=False``: a page stream
        whose round checksums cover its record headers only (format 1.1)."""
        ...

    def load_memory(self, fd: int, fmt: MemoryFormat, transfer: Transfer) -> Stats:
        """All of RAM from ``fd`` into a received machine (one that has not run yet),
        built first from a snapshot file's configuration if there is none. A load that
        fails half-way leaves the machine damaged: it does not resume until a load
        replaces every page."""
        ...

    def dump_state(self, fd: int, fmt: StateFormat, transfer: Transfer) -> StateDump:
        """The non-RAM state to ``fd`` (paused only)."""
        ...

    def state_blob(self) -> bytes:
        """The non-RAM state as the blob :meth:`dump_state` writes (paused only): a few
        KVM ioctls per vCPU, no I/O, so a caller may write it without a worker thread."""
        ...

    def flush_devices(self) -> None:
        """Make what the guest wrote to writable disks durable (blocking; OSError)."""
        ...

    def dump_disk(self, fd: int, transfer: Transfer) -> DiskDump:
        """The block device's image, sparsely, as a snapshot ``disk`` section appended to
        file ``fd`` (paused only: the device is drained). :class:`NoDisk` without one."""
        ...

    @property
    def has_disk(self) -> bool:
        """Whether the machine has (or, incoming, will have) a block device's image:
        saving or restoring its state then reads the disk (the identity's fingerprint)."""
        ...

    @property
    def flush_needed(self) -> bool:
        """Whether :meth:`flush_devices` has anything to do (a writable disk)."""
        ...

    def load_state(
        self, fd: int, fmt: StateFormat, transfer: Transfer, *, accept_disk: bool = False
    ) -> MachineConfig:
        """The non-RAM state from ``fd`` into the incoming machine (built first if needed),
        which is paused from then on; returns its configuration. The machine's disk must
        be the state's (size and fingerprint) unless ``accept_disk``."""
        ...

    def attach_disk(self, fd: int, *, readonly: bool) -> int:
        """Give the incoming machine (or the one it will build) its block device's image:
        ``fd``, a duplicate of which it keeps. Returns the disk's size in bytes.
        :class:`vmipc.vmm.devices.DiskImageError` for an fd that cannot be a disk,
        :class:`DiskPresent` when the VMM has one already, InvalidStateError when not
        incoming."""
        ...

    def restore_state(self, state: MachineState, *, accept_disk: bool = False) -> MachineConfig:
        """:meth:`load_state` of a state already read and decoded (BulkError
        ``bad-state`` for one that does not fit, another disk among them unless
        ``accept_disk``); no I/O."""
        ...

    def rehearse_load_state(self) -> None:
        """While an incoming VMM waits for its state: run a state's decode and restore
        once on the incoming machine's own state (nothing changes), so that the real
        one, moments later, runs from warm caches. Never raises; nothing without a
        built incoming machine. No I/O (the caller makes sure there is no disk)."""
        ...

    def configure_incoming(self, memory_size: int, vcpus: int) -> MachineConfig:
        """Build the incoming machine of this shape (paused, nothing booted) before any
        load, or accept the same shape again. ValueError for a shape it cannot build or
        that does not fit the machine already there; InvalidStateError when not incoming."""
        ...


class Migratable(Protocol):
    """Increments of RAM: the dirty log, and the pages it names out and back in. Blocking,
    with the errors of :class:`Snapshottable`, and :class:`vmipc.vmm.dirtylog.DirtyLogOff`
    and :class:`vmipc.vmm.dirtylog.DirtyLogMoved` from the dirty log."""

    def dirty_log_start(self) -> str:
        """Start the dirty log (or keep it running); returns its epoch."""
        ...

    def dirty_log_stop(self) -> None: ...

    def query_dirty(self) -> DirtyCount:
        """How many pages are dirty now, without taking them."""
        ...

    def dump_dirty(
        self,
        fd: int,
        transfer: Transfer,
        *,
        epoch: str | None,
        section: int | None,
        hash_payload: bool = True,
    ) -> DirtyDump:
        """Take the dirty pages (only if the dirty log's epoch is still ``epoch``, unless
        None) and write them to ``fd``: as a page stream, or (``section``: its file offset)
        into the snapshot memory section there, checked before anything is taken."""
        ...

    def take_dirty(self, epoch: str | None) -> DirtyPages:
        """Take the dirty pages (as :meth:`dump_dirty`, without writing them): a quick
        ioctl and a bitmap walk, no I/O."""
        ...

    def send_dirty(
        self, fd: int, transfer: Transfer, taken: DirtyPages, *, hash_payload: bool = True
    ) -> DirtyDump:
        """Write pages :meth:`take_dirty` took to ``fd`` as a page stream (``hash_payload``
        as for :meth:`dump_memory`)."""
        ...

    def apply_pages(self, fd: int, transfer: Transfer, *, accept_unhashed: bool = False) -> Stats:
        """A page stream from ``fd`` into a received machine (as :meth:`load_memory`); a
        stream whose payloads are not hashed (format 1.1) only with ``accept_unhashed``,
        else refused before any page is written."""
        ...


class MachineApi(Pausable, Snapshottable, Migratable, Protocol):
    """Every role: what the control server and the command handlers may do to a machine."""

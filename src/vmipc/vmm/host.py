"""The VMM's one machine slot: what the control server serves.

A VMM either boots a guest (the slot holds a machine from the start) or waits to receive
one (``--incoming``): then the slot is empty, its state is ``incoming``, and the machine is
built when its configuration arrives — from ``--memory``/``--vcpus`` at start-up, or from
the first ``load-state``. A received machine stays ``incoming`` until its state is
loaded; then it is ``paused`` and ``resume`` runs it.

The host implements every role of :class:`vmipc.vmm.machine_api.MachineApi`: the run
state forwarded to the machine, and the bulk operations (dumps and loads of memory and
state, the dirty log) over the data plane in :mod:`vmipc.vmm.persist`. It keeps what only
the slot knows: whether a received machine may still be loaded, and whether a failed load
damaged its memory.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from vmipc.memory_layout import PAGE_SIZE, MemoryConfigError, layout_for
from vmipc.vmm.config import MAX_VCPUS
from vmipc.vmm.devices import DiskImage
from vmipc.vmm.dirtylog import DirtyCount, DirtyPages
from vmipc.vmm.filelease import LeaseUnavailable, ReadLease
from vmipc.vmm.machine import Machine, MachineConfig, MachineState
from vmipc.vmm.machine_api import (
    DirtyDump,
    DiskDump,
    DiskPresent,
    InvalidStateError,
    MemoryDump,
    MemoryFormat,
    NoDisk,
    StateChange,
    StateDump,
    StateFormat,
)
from vmipc.vmm.memory import GuestMemory
from vmipc.vmm.persist import (
    STATE_HEADER_SIZE,
    BulkError,
    PeerClosed,
    Stats,
    Transfer,
    TransferCancelled,
    can_map_snapshot,
    check_config,
    encode_state_blob,
    map_snapshot_memory,
    memory_section_at,
    read_raw_image,
    read_snapshot_memory,
    read_state_blob,
    read_state_sections,
    receive_page_stream,
    send_page_stream,
    state_blob_header,
    state_from_payload,
    update_memory_section,
    write_disk_section,
    write_memory_section,
    write_raw_image,
    write_state_sections,
)
from vmipc.vmm.runstate import RunState

log = logging.getLogger("vmipc.vmm")

#: a damage reason is cut to this many characters: it quotes an error about hostile data
MAX_DAMAGE_REASON = 240


class MachineDamaged(InvalidStateError):
    """``resume`` of a received machine whose memory failed a load and has not been loaded
    completely since; ``reason`` says which load failed and why."""

    def __init__(self, reason: str, state: RunState) -> None:
        super().__init__(
            f"resume a guest whose incoming memory failed its checks ({reason})", state
        )
        self.reason = reason


#: how each format of load-memory fills RAM
_MEMORY_READERS: dict[str, Callable[[GuestMemory, int, Transfer], Stats]] = {
    "snapshot": read_snapshot_memory,
    "raw": read_raw_image,
    "stream": receive_page_stream,
}


#: builds a machine: (configuration, console, disk)
MachineFactory = Callable[[MachineConfig, Callable[[bytes], None], DiskImage | None], Machine]


def _new_machine(
    config: MachineConfig, console: Callable[[bytes], None], disk: DiskImage | None
) -> Machine:
    return Machine(config, console, disk=disk)


class MachineHost:
    """Holds the VMM's machine (or its absence) and serves the machine API for it."""

    def __init__(
        self,
        console: Callable[[bytes], None],
        machine: Machine | None = None,
        *,
        machine_factory: MachineFactory = _new_machine,
        lease_break_time: int | None = None,
        disk: DiskImage | None = None,
    ) -> None:
        """``lease_break_time``: fs.lease-break-time, read at start-up, when the lease
        signal is held (``filelease.hold_lease_signal``): then ``load-memory
        format=snapshot`` of a regular file maps it lazily, under a read lease; None: it
        reads the file into RAM. ``disk``: the image a machine built here gets (``vmm
        --incoming --disk``; the caller keeps owning it); else ``attach-disk`` may give
        one (then the host owns it)."""
        self._console = console
        self._disk = disk
        #: a disk passed by attach-disk: closed after the machine
        self._attached: DiskImage | None = None
        self._lease_break_time = lease_break_time
        self._factory = machine_factory
        self._lock = threading.RLock()
        self._listeners: list[Callable[[StateChange], None]] = []
        self._machine: Machine | None = None
        #: True while a received machine waits for its state (reported as ``incoming``)
        self._awaiting_state = machine is None
        #: True for a received machine until it first runs: memory may still be loaded
        self._receiving = machine is None
        #: why the received memory cannot be trusted (a load failed half-way), until a
        #: load replaces all of it
        self._damaged: str | None = None
        self._closed = False
        if machine is not None:
            self._adopt(machine)

    # --- the slot -----------------------------------------------------------------------

    @property
    def machine(self) -> Machine | None:
        return self._machine

    @property
    def incoming(self) -> bool:
        """The machine waits for its state (``incoming``)."""
        return self._awaiting_state

    @property
    def receiving(self) -> bool:
        """A received machine that has not run yet: loads are allowed."""
        return self._receiving and not self._closed

    @property
    def damaged(self) -> str | None:
        """Why the received memory cannot be run (a load failed), or None."""
        return self._damaged

    def _mark_damaged(self, reason: str) -> None:
        """Refuse to resume until a complete load succeeds."""
        if len(reason) > MAX_DAMAGE_REASON:
            reason = reason[: MAX_DAMAGE_REASON - 1] + "\u2026"
        self._damaged = reason

    def require_machine(self, operation: str) -> Machine:
        machine = self._machine
        if machine is None:
            raise InvalidStateError(operation, RunState.INCOMING)
        return machine

    def configure(self, config: MachineConfig) -> Machine:
        """Build the incoming machine from ``config`` (paused, no guest booted).

        If a machine is already there, ``config`` must fit it (same memory and vCPUs).
        """
        with self._lock:
            if self._machine is not None:
                mismatch = config.mismatch(self._machine.config)
                if mismatch:
                    raise ValueError(f"incoming configuration does not fit this VMM: {mismatch}")
                return self._machine
            if not self._awaiting_state:
                raise InvalidStateError("configure a machine", self.state)
            machine = self._factory(config.without_guest(), self._console, self._disk)
            try:
                machine.start(paused=True)
            except BaseException:
                machine.close()
                raise
            self._adopt(machine)
            return machine

    def _restore(self, state: MachineState, *, accept_disk: bool = False) -> None:
        """Restore ``state`` into the incoming machine (building it first if needed)."""
        with self._lock:
            if not self._awaiting_state:
                raise InvalidStateError("load state", self.state)
            machine = self.configure(state.config)
            machine.restore_state(state, accept_disk=accept_disk)
            self._awaiting_state = False
        self._notify(StateChange(RunState.INCOMING, RunState.PAUSED, None))

    def _incoming_machine(self, operation: str) -> Machine:
        """The received machine a load goes into."""
        if not self.receiving:
            raise InvalidStateError(operation, self.state)
        machine = self._machine
        if machine is None:
            raise BulkError(
                "not-configured",
                "this incoming VMM has no machine yet: start it with --memory/--vcpus, or "
                "send load-state first",
            )
        return machine

    def _load(self, operation: str, work: Callable[[], Stats]) -> Stats:
        """Run a load of memory. While it runs, and if it fails half-way, the guest must
        not run from that memory until a load replaces all of it. A load that replaced
        every page of RAM clears the mark: whatever a failed load left is gone. A load of
        some pages only, after a failure, leaves it: the other pages may still hold what
        failed its checks (an empty stream would otherwise clear it)."""
        before = self._damaged
        # marked first: a cancelled load's worker may still write RAM after the request
        self._mark_damaged(f"{operation} did not finish (Cancelled)")
        try:
            stats = work()
        except BaseException as exc:
            self._mark_damaged(_damage(operation, exc))
            raise
        self._damaged = None if stats.complete else before
        return stats

    def _adopt(self, machine: Machine) -> None:
        self._machine = machine
        machine.add_listener(self._forward)

    def _forward(self, change: StateChange) -> None:
        if self._awaiting_state:
            return  # a received machine's own start-up transitions are not news
        self._notify(change)

    def _notify(self, change: StateChange) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for callback in listeners:
            callback(change)

    # --- Pausable -------------------------------------------------------------------------

    @property
    def state(self) -> RunState:
        if self._closed:
            return RunState.DESTROYED
        if self._awaiting_state:
            return RunState.INCOMING
        assert self._machine is not None
        return self._machine.state

    @property
    def vcpu_count(self) -> int:
        return self._machine.vcpu_count if self._machine is not None else 0

    @property
    def memory_size(self) -> int:
        return self._machine.memory_size if self._machine is not None else 0

    @property
    def stop_reason(self) -> str | None:
        return self._machine.stop_reason if self._machine is not None else None

    def start(self) -> None:
        self.require_machine("start").start()

    def pause(self) -> None:
        if self._awaiting_state:
            raise InvalidStateError("pause", RunState.INCOMING)
        self.require_machine("pause").pause()

    def begin_pause(self, wake: Callable[[], None], *, within: float = 0.0) -> bool:
        if self._awaiting_state:
            raise InvalidStateError("pause", RunState.INCOMING)
        return self.require_machine("pause").begin_pause(wake, within=within)

    def finish_pause(self, wake: Callable[[], None]) -> bool:
        return self.require_machine("pause").finish_pause(wake)

    def resume(self, *, wake: bool = True) -> None:
        if self._awaiting_state:
            raise InvalidStateError("resume", RunState.INCOMING)
        if self._damaged is not None:
            raise MachineDamaged(self._damaged, self.state)
        self.require_machine("resume").resume(wake=wake)
        self._receiving = False

    def wake_vcpus(self) -> None:
        machine = self._machine
        if machine is not None:
            machine.wake_vcpus()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            old = self.state
            self._closed = True
            machine = self._machine
        if machine is not None:
            machine.close()
        if self._attached is not None:
            self._attached.close()
        if old is RunState.INCOMING:
            self._notify(StateChange(old, RunState.DESTROYED, None))

    def add_listener(self, callback: Callable[[StateChange], None]) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return unsubscribe

    # --- Snapshottable ----------------------------------------------------------------------

    def dump_memory(
        self, fd: int, fmt: MemoryFormat, transfer: Transfer, *, hash_payload: bool = True
    ) -> MemoryDump:
        machine = self.require_machine("dump-memory")
        memory = _ram(machine)
        consistent = machine.state is not RunState.RUNNING
        # progress counts bytes of RAM gone through, whatever the format makes of them
        transfer.total = memory.size
        if fmt == "snapshot":
            entry, stats = write_memory_section(memory, fd, transfer, consistent=consistent)
            return MemoryDump(stats, consistent, entry)
        if fmt == "raw":
            return MemoryDump(write_raw_image(memory, fd, transfer), consistent)
        stats = send_page_stream(
            memory, fd, transfer, consistent=consistent, hash_payload=hash_payload
        )
        return MemoryDump(stats, consistent)

    def load_memory(self, fd: int, fmt: MemoryFormat, transfer: Transfer) -> Stats:
        if fmt == "snapshot" and self._machine is None:
            state = read_state_sections(fd)
            check_config(state.config)  # a file's config that builds no machine
            self.configure(state.config)
        machine = self._incoming_machine("load-memory")
        memory = _ram(machine)
        transfer.total = memory.size
        if fmt == "snapshot" and self._lease_break_time is not None and can_map_snapshot(fd):
            stats = self._load("load-memory", lambda: self._map_snapshot(memory, fd, transfer))
            machine.watch_file_lease()
            return stats
        read = _MEMORY_READERS[fmt]
        return self._load("load-memory", lambda: read(memory, fd, transfer))

    def _map_snapshot(self, memory: GuestMemory, fd: int, transfer: Transfer) -> Stats:
        """The snapshot file ``fd`` mapped as RAM under a read lease, as ``vmm --restore``
        maps it; read into RAM (verified) when the kernel refuses the lease."""
        assert self._lease_break_time is not None
        # RAM mapped from a file before lets go of it (and its lease) first: the same
        # file, passed again, must not lose the new lease when the old one is released
        memory.drop_file()
        try:
            lease = ReadLease.take_passed(fd, self._lease_break_time)
        except LeaseUnavailable as exc:
            log.warning(
                "warning: no read lease on the snapshot file (%s): guest RAM read at once", exc
            )
            return read_snapshot_memory(memory, fd, transfer)
        return map_snapshot_memory(memory, fd, lease)

    def dump_state(self, fd: int, fmt: StateFormat, transfer: Transfer) -> StateDump:
        if fmt == "snapshot":
            state = self.require_machine("dump-state").save_state()
            entries = write_state_sections(state, fd, transfer)
            return StateDump(sum(entry.length for entry in entries), tuple(entries))
        blob = self.state_blob()
        transfer.total = len(blob)
        transfer.write(fd, blob)
        return StateDump(len(blob))

    def load_state(
        self, fd: int, fmt: StateFormat, transfer: Transfer, *, accept_disk: bool = False
    ) -> MachineConfig:
        if not self.incoming:
            raise InvalidStateError("load-state", self.state)
        state = read_state_sections(fd) if fmt == "snapshot" else read_state_blob(fd, transfer)
        return self.restore_state(state, accept_disk=accept_disk)

    def state_blob(self) -> bytes:
        return encode_state_blob(self.require_machine("dump-state").save_state())

    def rehearse_load_state(self) -> None:
        # On these machines code and data idle for a while run 2-3x slower than the
        # same code run a moment ago (cold caches after the CPU idled): a 1-vCPU decode
        # and restore take ~0.7 ms cold, ~0.25 ms warm. The incoming VMM has that time
        # while the source pauses and saves, and would only wait in it.
        machine = self._machine
        if machine is None or not self._awaiting_state:
            return
        try:
            blob = encode_state_blob(machine.save_state())
            _, stored = state_blob_header(blob[:STATE_HEADER_SIZE])
            machine.restore_state(state_from_payload(blob[STATE_HEADER_SIZE:], stored))
        except Exception:  # only a rehearsal: the real load says what is wrong, if anything
            log.debug("rehearsing load-state failed", exc_info=True)

    def restore_state(self, state: MachineState, *, accept_disk: bool = False) -> MachineConfig:
        if not self.incoming:
            raise InvalidStateError("load-state", self.state)
        try:
            self._restore(state, accept_disk=accept_disk)
        except ValueError as exc:  # a record KVM refused, a machine that does not fit
            raise BulkError("bad-state", str(exc)) from None
        return state.config

    def flush_devices(self) -> None:
        self.require_machine("flush-devices").flush_devices()

    def dump_disk(self, fd: int, transfer: Transfer) -> DiskDump:
        machine = self.require_machine("dump-disk")
        if machine.state is not RunState.PAUSED:
            # the server checks the state too; a drained device is what makes the image
            # one moment, so the data plane never reads it from a running guest
            raise InvalidStateError("dump-disk", machine.state)
        disk = machine.disk
        if disk is None or disk.fd < 0:
            raise NoDisk("this VMM has no block device")
        entry, stats = write_disk_section(disk, fd, transfer)
        return DiskDump(stats, entry)

    def attach_disk(self, fd: int, *, readonly: bool) -> int:
        with self._lock:
            if not self._awaiting_state or self._closed:
                raise InvalidStateError("attach-disk", self.state)
            if self._disk is not None:
                raise DiskPresent(
                    f"this VMM has a disk already ({self._disk.size} bytes, "
                    f"{'read-only' if self._disk.readonly else 'writable'})"
                )
            # the request's fd is closed after the reply: the disk keeps its own
            own = os.dup(fd)
            try:
                disk = DiskImage.from_passed_fd(own, readonly=readonly)
            except BaseException:
                os.close(own)
                raise
            try:
                if self._machine is not None:  # configured, or memory loaded: not yet run
                    self._machine.attach_disk(disk)
            except BaseException:
                disk.close()
                raise
            self._disk = self._attached = disk
            return disk.size

    @property
    def has_disk(self) -> bool:
        machine = self._machine
        return (machine is not None and machine.disk is not None) or self._disk is not None

    @property
    def flush_needed(self) -> bool:
        # the block device's disk is what flush_devices makes durable (read-only: never)
        machine = self._machine
        return machine is not None and machine.disk is not None and not machine.disk.readonly

    def configure_incoming(self, memory_size: int, vcpus: int) -> MachineConfig:
        if not self.incoming:
            raise InvalidStateError("configure", self.state)
        if not 1 <= vcpus <= MAX_VCPUS:
            raise ValueError(f"{vcpus} vCPUs (1 .. {MAX_VCPUS} allowed)")
        try:
            layout_for(memory_size)
        except MemoryConfigError as exc:
            raise ValueError(str(exc)) from None
        return self.configure(MachineConfig(memory_size, vcpus)).config

    # --- Migratable -------------------------------------------------------------------------

    def dirty_log_start(self) -> str:
        return self.require_machine("dirty-log-start").dirty_log.start()

    def dirty_log_stop(self) -> None:
        self.require_machine("dirty-log-stop").dirty_log.stop()

    def query_dirty(self) -> DirtyCount:
        return self.require_machine("query-dirty").dirty_log.query()

    def dump_dirty(
        self,
        fd: int,
        transfer: Transfer,
        *,
        epoch: str | None,
        section: int | None,
        hash_payload: bool = True,
    ) -> DirtyDump:
        machine = self.require_machine("dump-dirty")
        memory = _ram(machine)
        # before any page is taken: a wrong file or offset must not lose the dirty pages
        writer = None if section is None else memory_section_at(memory, fd, section)
        taken = machine.dirty_log.take(epoch)
        if writer is None:
            return self.send_dirty(fd, transfer, taken, hash_payload=hash_payload)
        consistent = machine.state is not RunState.RUNNING
        transfer.total = PAGE_SIZE * taken.pages
        stats = update_memory_section(
            memory, fd, transfer, writer, taken.slots, consistent=consistent
        )
        return DirtyDump(stats, consistent, taken.epoch)

    def take_dirty(self, epoch: str | None) -> DirtyPages:
        return self.require_machine("dump-dirty").dirty_log.take(epoch)

    def send_dirty(
        self, fd: int, transfer: Transfer, taken: DirtyPages, *, hash_payload: bool = True
    ) -> DirtyDump:
        machine = self.require_machine("dump-dirty")
        consistent = machine.state is not RunState.RUNNING
        transfer.total = PAGE_SIZE * taken.pages
        stats = send_page_stream(
            _ram(machine),
            fd,
            transfer,
            consistent=consistent,
            runs=taken.slots,
            hash_payload=hash_payload,
        )
        return DirtyDump(stats, consistent, taken.epoch)

    def apply_pages(self, fd: int, transfer: Transfer, *, accept_unhashed: bool = False) -> Stats:
        memory = _ram(self._incoming_machine("apply-pages"))
        return self._load(
            "apply-pages",
            lambda: receive_page_stream(memory, fd, transfer, accept_unhashed=accept_unhashed),
        )


def _ram(machine: Machine) -> GuestMemory:
    assert machine.memory is not None  # None once the machine is closed
    return machine.memory


def _damage(operation: str, exc: BaseException) -> str:
    """Why a load that raised ``exc`` left RAM damaged: what the client heard of it."""
    if isinstance(exc, BulkError | PeerClosed):
        return f"{operation}: {exc}"
    if isinstance(exc, TransferCancelled):
        return f"{operation} did not finish (Cancelled)"
    if isinstance(exc, OSError):
        return f"{operation}: {exc.strerror or exc}"
    return f"{operation} did not finish ({type(exc).__name__})"

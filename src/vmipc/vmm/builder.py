"""Building the VMM's machine, as Firecracker's ``builder.rs``: for a boot, for a guest
that arrives later (``--incoming``), or from a snapshot file (``--restore``).

Each builder opens everything that needs a path — ``/dev/kvm``, the guest image, the
snapshot — and returns the machine host with the step that starts it. That step needs no
path: it runs once the VMM is in capability mode, and may start threads (the vCPUs).
What the builders open is closed by the ``cleanup`` stack the caller passes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from vmipc.errors import VmipcError
from vmipc.formats import FormatError, SnapshotReader
from vmipc.kvm import Kvm
from vmipc.vmm.devices import DiskImage
from vmipc.vmm.filelease import (
    LeaseUnavailable,
    ReadLease,
    hold_lease_signal,
    lease_break_time,
)
from vmipc.vmm.host import MachineHost
from vmipc.vmm.kick import install_kick_handler
from vmipc.vmm.machine import Machine, MachineConfig, MachineState
from vmipc.vmm.memory import GuestMemory
from vmipc.vmm.persist import (
    BulkError,
    Restorable,
    Transfer,
    check_restorable,
    read_snapshot_memory,
)
from vmipc.vmm.state import StateRecordError

log = logging.getLogger("vmipc.vmm")

#: where the guest's console output goes
Console = Callable[[bytes], None]


class RestoreError(VmipcError):
    """The snapshot cannot be restored (one line: the section and the problem)."""


@dataclass(frozen=True)
class RestoreOptions:
    """How to restore a snapshot (``vmipc vmm --restore``)."""

    #: copy all of RAM into a memfd before running, instead of mapping the file lazily
    eager: bool = False
    #: check the memory section's checksum first (reads all of it)
    verify: bool = False
    #: leave the restored machine paused
    paused: bool = False
    #: the block device's image (the snapshot's state must have been taken with this
    #: disk: its size, mode and fingerprint), or None; the caller keeps owning it
    disk: DiskImage | None = None
    #: restore with ``disk`` even if its size or fingerprint is not the snapshot's
    #: (``vmm --restore --force-disk``)
    accept_disk: bool = False


@dataclass(frozen=True)
class Built:
    """A machine host, and the step that starts it in capability mode."""

    host: MachineHost
    start: Callable[[], None]


def build_for_boot(
    config: MachineConfig,
    console: Console,
    cleanup: contextlib.ExitStack,
    disk: DiskImage | None = None,
) -> Built:
    """A machine that boots ``config``'s guest (loaded now; the caller starts it), with
    ``disk`` behind its block device (the caller keeps owning it)."""
    host = MachineHost(console, Machine(config, console, disk=disk))
    cleanup.callback(host.close)
    return Built(host, lambda: None)


def build_incoming(
    console: Console,
    cleanup: contextlib.ExitStack,
    config: MachineConfig | None = None,
    disk: DiskImage | None = None,
) -> Built:
    """An empty slot that waits for a guest. ``config``: build its machine (paused, with
    no guest) when it starts, else the first ``load-state`` does. ``disk``: its block
    device's image (the caller keeps owning it); without one, ``attach-disk`` may pass
    one."""
    kvm = Kvm()  # kept open: in capability mode /dev/kvm cannot be opened again
    cleanup.callback(kvm.close)
    # the machine may be built later, by a request, in a worker thread
    install_kick_handler()

    def factory(config: MachineConfig, console: Console, disk: DiskImage | None) -> Machine:
        return Machine(config, console, kvm=kvm.dup(), disk=disk)

    # a snapshot file passed to load-memory is mapped under a read lease, taken in
    # capability mode: its signal is held now, on the main thread before any other thread,
    # and fs.lease-break-time read while /proc can still be opened
    break_time: int | None = lease_break_time()
    try:
        hold_lease_signal()
    except LeaseUnavailable as exc:
        log.warning("warning: snapshots will be read into RAM, not mapped: %s", exc)
        break_time = None
    host = MachineHost(console, machine_factory=factory, lease_break_time=break_time, disk=disk)
    cleanup.callback(host.close)

    def start() -> None:
        if config is not None:
            host.configure(config)  # starts the vCPU threads, paused

    return Built(host, start)


def build_from_snapshot(
    path: str, console: Console, options: RestoreOptions, cleanup: contextlib.ExitStack
) -> Built:
    """A machine restored from the snapshot file at ``path``: its start restores the
    state, and runs it unless ``options.paused``."""
    machine, state = open_snapshot(path, console, options)
    host = MachineHost(console, machine)
    cleanup.callback(host.close)
    return Built(
        host,
        lambda: start_restored(
            machine, state, paused=options.paused, accept_disk=options.accept_disk
        ),
    )


def restore_machine(path: str, console: Console, options: RestoreOptions) -> Machine:
    """Build a machine from a snapshot file: small sections read and verified, RAM mapped
    from the memory section (lazy) or copied into a memfd (``options.eager``), state
    restored. The machine is paused, or running unless ``options.paused``."""
    machine, state = open_snapshot(path, console, options)
    start_restored(machine, state, paused=options.paused, accept_disk=options.accept_disk)
    return machine


def open_snapshot(
    path: str, console: Console, options: RestoreOptions
) -> tuple[Machine, MachineState]:
    """The first half of :func:`restore_machine`, everything that reads the file: the
    machine built with its RAM (not started), and the state to restore into it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise RestoreError(exc.strerror) from None
    # the lease first: what is checked below is then what the guest runs on
    lease, no_lease = (None, None) if options.eager else _take_lease(path, fd)
    try:
        restorable = _check_snapshot(fd, verify=options.verify)
        if lease is not None:
            machine = _map_lazily(restorable, fd, lease, console, options.disk)
        else:
            if no_lease:
                log.warning(
                    "warning: no read lease on %s (%s): guest RAM loaded at once, as with --eager",
                    path,
                    no_lease,
                )
            machine = _load_eagerly(restorable, fd, console, options.disk)
    except BaseException:
        if lease is not None:
            lease.close()
        raise
    finally:
        os.close(fd)
    return machine, restorable.state


def _check_snapshot(fd: int, *, verify: bool) -> Restorable:
    """Everything ``vmipc snapshot verify`` checks too, before any RAM is mapped; with
    ``verify``, the memory section's checksum as well. RestoreError if it fails."""
    try:
        reader = SnapshotReader(functools.partial(os.pread, fd), os.fstat(fd).st_size)
        reader.check_complete()
        if reader.header.incremental:
            raise RestoreError("an incremental snapshot: merge its chain first")
        restorable = check_restorable(reader, fd)
        if verify:
            reader.verify("memory")
    except (FormatError, BulkError) as exc:
        raise RestoreError(str(exc)) from None
    except OSError as exc:  # not a file that can be read (a directory, an I/O error)
        raise RestoreError(exc.strerror or str(exc)) from None
    return restorable


def _load_eagerly(
    restorable: Restorable, fd: int, console: Console, disk: DiskImage | None
) -> Machine:
    """A machine whose RAM (a memfd) holds the memory section's image, read and checked."""
    machine = Machine(restorable.state.config.without_guest(), console, disk=disk)
    assert machine.memory is not None
    try:
        read_snapshot_memory(machine.memory, fd, Transfer())
    except BulkError as exc:
        machine.close()
        raise RestoreError(str(exc)) from None
    return machine


def _map_lazily(
    restorable: Restorable,
    fd: int,
    lease: ReadLease,
    console: Console,
    disk: DiskImage | None,
) -> Machine:
    """A machine whose RAM is the memory section's image mapped copy-on-write; the
    memory owns ``lease`` from now on."""
    config = restorable.state.config
    # the layout was checked: the section's image holds all of this RAM
    memory = GuestMemory(
        config.memory_size,
        fd=os.dup(fd),
        private_file_offset=restorable.memory.data_offset,
        lease=lease,
    )
    return Machine(config.without_guest(), console, memory=memory, disk=disk)


def _take_lease(path: str, fd: int) -> tuple[ReadLease | None, str | None]:
    """A read lease on the snapshot file, so that a lazy restore can map it: a writer then
    waits until guest RAM is copied off the file. Else (None, why): guest RAM is then
    loaded at once, as with --eager, so that no writer can change it or cut it off under
    the guest (docs/vmm.md, "Lazy restore")."""
    try:
        return ReadLease.take(path, fd), None
    except LeaseUnavailable as exc:
        return None, str(exc)


def start_restored(
    machine: Machine, state: MachineState, *, paused: bool, accept_disk: bool = False
) -> None:
    """The second half of :func:`restore_machine`: start the vCPU threads (paused), restore
    the state (into the snapshot's disk, or any of the same mode with ``accept_disk``),
    and run unless ``paused``. Needs no file (it may run in capability mode)."""
    try:
        machine.start(paused=True)
        try:
            machine.restore_state(state, accept_disk=accept_disk)
        except StateRecordError as exc:  # KVM refused a value of the file's records
            raise RestoreError(str(exc)) from None
        if not paused:
            machine.resume()
    except BaseException:
        machine.close()
        raise

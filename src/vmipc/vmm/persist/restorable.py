"""What a snapshot file must hold for a restore, checked without KVM.

One function, shared by the restores (``vmipc vmm --restore``, ``load-memory
format=snapshot`` on a VMM without a machine) and by ``vmipc snapshot verify``, so that
verify cannot say ok to a file a restore refuses (except for what only KVM can judge: a
register or MSR value it does not take).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from vmipc.formats import MissingSection, SnapshotReader
from vmipc.formats.disksection import SECTION_DISK, read_disk_header, walk_disk_section
from vmipc.formats.snapshot import (
    MEMORY_ENCODING_IMAGE,
    MEMORY_ENCODING_PAGE_STREAM,
    MemorySection,
)
from vmipc.memory_layout import (
    PAGE_SIZE,
    MemoryConfigError,
    describe_layout,
    layout_for,
)
from vmipc.vmm.devices import VirtioBlkState
from vmipc.vmm.devices.disk import SECTOR_SIZE
from vmipc.vmm.machine import MAX_VCPUS, MachineConfig, MachineState
from vmipc.vmm.persist.errors import BulkError
from vmipc.vmm.persist.statecodec import read_state_sections


@dataclass(frozen=True)
class Restorable:
    """A snapshot that passed :func:`check_restorable`: its state and memory section."""

    state: MachineState
    memory: MemorySection


def check_config(config: MachineConfig) -> None:
    """BulkError("bad-snapshot") unless a machine can be built from ``config``."""
    if not 1 <= config.vcpus <= MAX_VCPUS:
        raise BulkError(
            "bad-snapshot", f"section 'config': {config.vcpus} vcpus (1 .. {MAX_VCPUS} allowed)"
        )
    try:
        layout_for(config.memory_size)
    except MemoryConfigError as exc:
        raise BulkError("bad-snapshot", f"section 'config': {exc}") from None


def check_restorable(reader: SnapshotReader, fd: int) -> Restorable:
    """Check that the snapshot file ``fd`` (read by ``reader``) can be restored, as far as
    that can be known without KVM: the sections a restore needs are there, the state
    sections decode into a machine state whose vCPU records match its configuration, the
    configuration builds a machine, and the memory section's descriptor describes exactly
    that machine's RAM layout, with the encoding of its kind of snapshot (an image for a
    full one, a page stream for an increment). Section checksums are not read here
    (``reader.verify``); the state sections' are.

    Raises FormatError or BulkError("bad-snapshot" / "bad-state"), each with one line.
    """
    reader.check_complete()
    state = read_state_sections(fd)
    config = state.config
    check_config(config)
    memory = reader.memory()
    descriptor = memory.descriptor
    # a full snapshot's image is mapped as RAM as it is: any other bytes would be run
    if reader.header.incremental and descriptor.encoding != MEMORY_ENCODING_PAGE_STREAM:
        raise BulkError(
            "bad-snapshot",
            "section 'memory': holds an image, but an incremental snapshot's memory is a "
            "page stream",
        )
    if not reader.header.incremental and descriptor.encoding != MEMORY_ENCODING_IMAGE:
        raise BulkError(
            "bad-snapshot",
            "section 'memory': holds a page stream, but a full snapshot's memory is an image",
        )
    if descriptor.page_size != PAGE_SIZE:
        raise BulkError(
            "bad-snapshot", f"section 'memory': page size {descriptor.page_size}, not {PAGE_SIZE}"
        )
    stored = descriptor.regions
    expected = layout_for(config.memory_size)
    if stored != expected:
        raise BulkError(
            "bad-snapshot",
            f"section 'memory': its layout {describe_layout(stored)} is not the layout of the "
            f"configuration's {config.memory_size >> 20} MiB of RAM ({describe_layout(expected)})",
        )
    _check_disk_section(reader, fd, state)
    return Restorable(state, memory)


def _check_disk_section(reader: SnapshotReader, fd: int, state: MachineState) -> None:
    """An optional ``disk`` section must be well formed (every extent inside the disk, in
    order, not overlapping, the end record where the section ends) and be the disk of the
    block device's record (size and mode), whether or not this restore uses it: a file
    with a malformed part is refused whole. Its checksum is read where it is copied out
    (``vmipc.snapshots.extract_disk``) and by ``vmipc snapshot verify``."""
    try:
        entry = reader.entry(SECTION_DISK)
    except MissingSection:
        return
    pread = functools.partial(os.pread, fd)
    header = read_disk_header(pread, entry)
    for _ in walk_disk_section(pread, entry):
        pass
    record = state.devices.get("virtio-blk")
    sectors = record.disk_sectors if isinstance(record, VirtioBlkState) else 0
    readonly = record.readonly if isinstance(record, VirtioBlkState) else False
    if sectors * SECTOR_SIZE != header.disk_size or readonly != header.readonly:
        mode = "read-only" if header.readonly else "writable"
        raise BulkError(
            "bad-snapshot",
            f"section '{SECTION_DISK}': a {mode} disk of {header.disk_size} bytes, but the "
            f"block device's record has {sectors} sectors" + (" (read-only)" if readonly else ""),
        )

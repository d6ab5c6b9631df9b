"""Checking a snapshot file: complete (header, table, trailer), every checksum, and what a
restore checks before it needs KVM."""

from __future__ import annotations

from vmipc.formats import SectionEntry, SnapshotReader
from vmipc.snapshots._ranges import reader_of


def verify_file(fd: int, *, full: bool = True) -> None:
    """Raise FormatError unless the file is a complete snapshot (every checksum if full)."""
    reader = reader_of(fd)
    reader.check_complete()
    if full:
        reader.verify()


def verify_section(reader: SnapshotReader, name: str) -> SectionEntry:
    """Check the checksum of section ``name``; returns its entry. Raises FormatError."""
    reader.verify(name)
    return reader.entry(name)


def verify_restorable(reader: SnapshotReader, fd: int) -> None:
    """Every checksum, the sections a restore needs, and everything a restore checks
    before it needs KVM (the very function ``vmipc vmm --restore`` runs): state records
    that decode and match the configuration, a memory section in the configuration's RAM
    layout. Only register values KVM alone can judge are left. Raises FormatError, or
    ``BulkError`` (``bad-snapshot`` / ``bad-state``) from the restore's own check."""
    # the restore's check lives beside the restore (it knows the machine); imported here
    # only when asked, so that the file tools do not load the VMM
    from vmipc.vmm.persist import check_restorable

    reader.verify()
    reader.check_complete()
    check_restorable(reader, fd)

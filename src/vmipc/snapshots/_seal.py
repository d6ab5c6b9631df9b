"""Sealing: a snapshot whose sections were written (by building blocks, or by the client)
becomes complete once the header is at 0 and, last, the section table and trailer follow
the sections. Until then every reader refuses it."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from vmipc import __version__
from vmipc.formats import SectionEntry, SnapshotHeader, encode_table, new_snapshot_id
from vmipc.snapshots._ranges import pwrite_all

#: the producer string vmipc writes into the snapshots it makes
PRODUCER = f"vmipc {__version__}"


def new_header(producer: str = PRODUCER) -> SnapshotHeader:
    """The header of a new full snapshot, made now."""
    return SnapshotHeader(new_snapshot_id(), producer, created_ns=time.time_ns())


def entries_of(result: Mapping[str, Any]) -> list[SectionEntry]:
    """The section entries in a ``dump-* format=snapshot`` result: ``sections``
    (dump-state), then ``section`` (dump-memory, dump-dirty); [] when it has none.
    Raises ValueError for an entry that is not one."""
    found = list(result.get("sections") or [])
    if result.get("section"):
        found.append(result["section"])
    return [SectionEntry.from_dict(item) for item in found]


def seal(fd: int, entries: list[SectionEntry], header: SnapshotHeader, *, sync: bool = True) -> int:
    """Finish a snapshot written by building blocks: the header at 0 and, last, the section
    table and trailer after the sections (``entries`` in file order); then fsync unless
    ``sync`` is False. Returns the table checksum. Raises ValueError (nothing written) when
    the entries are not placed as the format requires."""
    table = encode_table(entries, header.snapshot_id, os.fstat(fd).st_size)
    pwrite_all(fd, header.encode(), 0)
    pwrite_all(fd, table.data, table.offset)
    if sync:
        os.fsync(fd)
    return table.table_checksum

"""A snapshot's ``disk`` section out to a new image file: the disk a restored VM runs on.

The new file is created with ``O_EXCL`` (never an existing image), given the disk's size
with ``ftruncate`` (a hole), and only the section's extents are written into it, so the
image's holes stay holes. The section is checked before the file is created (its
structure: every extent inside the disk, in order, not overlapping; the end record) and
its checksum as it is copied; on any failure the new file is removed, so no guest ever
runs on an image that failed a check.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

from vmipc.formats import Checksum, MissingSection, SnapshotError, SnapshotReader
from vmipc.formats.disksection import (
    DISK_HEADER_SIZE,
    SECTION_DISK,
    DiskExtent,
    DiskSectionHeader,
    read_disk_header,
    walk_disk_section,
)
from vmipc.snapshots._ranges import reader_of

#: bytes copied per system call
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DiskExtraction:
    """What :func:`extract_disk` wrote."""

    path: str
    disk_size: int
    readonly: bool
    #: bytes of image data written (the rest of the file is holes)
    data_bytes: int
    extents: int


def disk_section(reader: SnapshotReader, fd: int) -> tuple[DiskSectionHeader, int]:
    """The disk section's header and number of extents, its structure checked (not its
    checksum); MissingSection when the snapshot has none, SnapshotError when it is
    malformed. The extents are walked, never collected: their number is the file's."""
    entry = reader.entry(SECTION_DISK)
    pread = functools.partial(os.pread, fd)
    header = read_disk_header(pread, entry)
    return header, sum(1 for _ in walk_disk_section(pread, entry))


def has_disk(reader: SnapshotReader) -> bool:
    try:
        reader.entry(SECTION_DISK)
    except MissingSection:
        return False
    return True


def extract_disk(snapshot: str, out_path: str) -> DiskExtraction:
    """Write the disk section of the snapshot file ``snapshot`` to a new image file
    ``out_path`` (created, never overwritten: FileExistsError), sparse, fsynced. Raises
    FormatError (MissingSection without a disk section) or OSError; ``out_path`` exists
    afterwards only if this returned."""
    fd = os.open(snapshot, os.O_RDONLY | os.O_CLOEXEC)
    try:
        reader = reader_of(fd)
        header, count = disk_section(reader, fd)
        entry = reader.entry(SECTION_DISK)
        extents = walk_disk_section(functools.partial(os.pread, fd), entry)
        out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            data_bytes = _copy(fd, out, header, extents, entry.checksum, entry.offset)
            os.fsync(out)
        except BaseException:
            os.close(out)
            with contextlib.suppress(OSError):
                os.unlink(out_path)
            raise
        os.close(out)
    finally:
        os.close(fd)
    return DiskExtraction(out_path, header.disk_size, header.readonly, data_bytes, count)


def _copy(
    src: int,
    out: int,
    header: DiskSectionHeader,
    extents: Iterator[DiskExtent],
    stored: int,
    offset: int,
) -> int:
    """The extents into ``out`` (the disk's size, holes elsewhere), hashing the section's
    bytes in order; SnapshotError unless they hash to ``stored``."""
    os.ftruncate(out, header.disk_size)
    digest = Checksum()
    digest.update(_pread_exact(src, DISK_HEADER_SIZE, offset))
    written = 0
    end = offset + DISK_HEADER_SIZE  # where the end record is
    for extent in extents:
        digest.update(_pread_exact(src, 16, extent.file_offset - 16))
        for done in range(0, extent.length, _CHUNK):
            size = min(_CHUNK, extent.length - done)
            data = _pread_exact(src, size, extent.file_offset + done)
            digest.update(data)
            if data.count(0) != size:  # all-zero pieces stay holes
                _pwrite_all(out, data, extent.disk_offset + done)
            written += size
        end = extent.file_offset + extent.length
    digest.update(_pread_exact(src, 16, end))
    computed = digest.digest()
    if computed != stored:
        raise SnapshotError(
            f"section '{SECTION_DISK}'",
            f"checksum mismatch (stored {stored:#018x}, computed {computed:#018x})",
        )
    return written


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.pread(fd, size - len(data), offset + len(data))
        if not chunk:
            raise SnapshotError(f"section '{SECTION_DISK}'", "the file ends inside it")
        data += chunk
    return data


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done

"""File ranges: exact reads and writes, zeros, and hashing a range without reading its
holes. Blocking file work on plain fds."""

from __future__ import annotations

import errno
import functools
import os

from vmipc.formats import Checksum, SectionEntry, SnapshotReader
from vmipc.vmm.persist import data_extents

#: bytes moved per read or write when copying or hashing file ranges
CHUNK = 4 << 20
_ZEROS = bytes(1 << 20)


def reader_of(fd: int) -> SnapshotReader:
    """A snapshot reader over the whole of file ``fd`` (positional reads)."""
    return SnapshotReader(functools.partial(os.pread, fd), os.fstat(fd).st_size)


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(errno.EIO, f"short read at {offset:#x} (the file changed?)")
    return data


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def write_zeros(fd: int, offset: int, length: int) -> None:
    for piece in range(offset, offset + length, len(_ZEROS)):
        pwrite_all(fd, _ZEROS[: min(len(_ZEROS), offset + length - piece)], piece)


def hash_range(fd: int, start: int, length: int, digest: Checksum) -> None:
    """Feed ``fd[start:start+length]`` to ``digest``, holes as zeros, without reading them."""
    position = start
    for offset, size in data_extents(fd, start, length):
        digest.update_zeros(offset - position)
        for chunk_at in range(offset, offset + size, CHUNK):
            digest.update(pread_exact(fd, min(CHUNK, offset + size - chunk_at), chunk_at))
        position = offset + size
    digest.update_zeros(start + length - position)


def rehashed(fd: int, entry: SectionEntry) -> SectionEntry:
    """``entry`` with the checksum of what its section holds now (a section changed in
    place after its writer hashed it: a live checkpoint's memory)."""
    digest = Checksum()
    hash_range(fd, entry.offset, entry.length, digest)
    return SectionEntry(entry.name, entry.version, entry.offset, entry.length, digest.digest())

"""The snapshot file's optional ``disk`` section: a block device's image, sparse (sans-I/O).

Specified in ``protocol/snapshot-file.md`` (the disk section); in short::

    header (64 bytes)   "VMIPCDSK", header size 64, flags (bit 0: read-only disk),
                        disk size (bytes, whole 512-byte sectors), reserved zeros
    extents             each: disk offset (u64), length (u64), then that many bytes of
                        the image; ascending, never overlapping, inside the disk,
                        offsets and lengths whole sectors
    end (16 bytes)      offset 2**64-1, length = the sum of the extents' lengths

Everything not in an extent reads as zeros: a restore writes only the extents into a new
file of the disk's size, so the image's holes (and blocks that were all zeros) stay
holes. The section is self-delimiting (the end record), so a truncated or padded section
is refused even before its checksum is.

Every number is checked before it is used, and nothing is allocated from one:
:func:`walk_disk_section` reads one 16-byte record header at a time and yields where each
extent's bytes are, for the caller to copy in pieces of its own size.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from vmipc.formats._common import BytesLike, Checksum
from vmipc.formats.errors import SnapshotError
from vmipc.formats.snapshot import SectionEntry

__all__ = [
    "DISK_FLAG_READONLY",
    "DISK_HEADER_SIZE",
    "DISK_MAGIC",
    "DISK_RECORD_SIZE",
    "DISK_SECTION_VERSION",
    "DISK_SECTOR",
    "MAX_DISK_SIZE",
    "SECTION_DISK",
    "DiskExtent",
    "DiskSectionHeader",
    "DiskSectionWriter",
    "read_disk_header",
    "walk_disk_section",
]

SECTION_DISK: Final = "disk"
DISK_SECTION_VERSION: Final = 1
DISK_MAGIC: Final = b"VMIPCDSK"
DISK_HEADER_SIZE: Final = 64
DISK_RECORD_SIZE: Final = 16
#: offsets and lengths are whole sectors
DISK_SECTOR: Final = 512
#: a disk larger than this (1 PiB) is refused as absurd: a restore creates a file this big
MAX_DISK_SIZE: Final = 1 << 50
DISK_FLAG_READONLY: Final = 1
_KNOWN_FLAGS = DISK_FLAG_READONLY
#: the end record's offset
_END: Final = (1 << 64) - 1

_HEADER = struct.Struct("<8sIIQ")  # magic, header size, flags, disk size; then 40 zeros
_RECORD = struct.Struct("<QQ")  # disk offset (or _END), length (or the data total)
_WHERE = f"section '{SECTION_DISK}'"


@dataclass(frozen=True)
class DiskSectionHeader:
    """The section's first 64 bytes: the disk's size and mode."""

    disk_size: int
    readonly: bool

    def problem(self) -> str | None:
        if not 0 < self.disk_size <= MAX_DISK_SIZE or self.disk_size % DISK_SECTOR:
            return (
                f"disk size {self.disk_size} is not a whole number of {DISK_SECTOR}-byte "
                f"sectors in 1 .. {MAX_DISK_SIZE >> 40} TiB"
            )
        return None

    def encode(self) -> bytes:
        problem = self.problem()
        if problem:
            raise ValueError(problem)
        flags = DISK_FLAG_READONLY if self.readonly else 0
        head = _HEADER.pack(DISK_MAGIC, DISK_HEADER_SIZE, flags, self.disk_size)
        return head.ljust(DISK_HEADER_SIZE, b"\0")

    @classmethod
    def decode(cls, raw: bytes) -> DiskSectionHeader | str:
        """The header, or why ``raw`` (DISK_HEADER_SIZE bytes) is not one."""
        if len(raw) != DISK_HEADER_SIZE:
            return f"header is {len(raw)} bytes, not {DISK_HEADER_SIZE}"
        magic, size, flags, disk_size = _HEADER.unpack_from(raw)
        if magic != DISK_MAGIC:
            return "not a disk section (bad magic)"
        if size != DISK_HEADER_SIZE:
            return f"header size {size}, expected {DISK_HEADER_SIZE}"
        if flags & ~_KNOWN_FLAGS:
            return f"unknown flags {flags:#x}"
        if any(raw[_HEADER.size :]):
            return "reserved bytes are not zero"
        header = cls(disk_size, bool(flags & DISK_FLAG_READONLY))
        return header.problem() or header


@dataclass(frozen=True)
class DiskExtent:
    """One extent of the image: ``length`` bytes at disk offset ``disk_offset``, stored at
    file offset ``file_offset``."""

    disk_offset: int
    length: int
    file_offset: int


class DiskSectionWriter:
    """Accounting for one disk section written at file offset ``offset``: where each record
    goes, and the section's checksum over what was written, in order.

    ``header`` goes at ``offset``; for each extent, in ascending order,
    :meth:`extent` gives the record header and where to write it (its data follows it
    directly), and :meth:`data` hashes the extent's bytes as they are written;
    :meth:`finish` gives the end record, where it goes, and the table entry.
    """

    def __init__(self, offset: int, disk_size: int, readonly: bool) -> None:
        self.offset = offset
        self.header = DiskSectionHeader(disk_size, readonly).encode()
        self.disk_size = disk_size
        self._hash = Checksum()
        self._hash.update(self.header)
        self._position = offset + DISK_HEADER_SIZE  # where the next record goes
        self._disk_end = 0  # end of the previous extent on the disk
        self._owed = 0  # data bytes of the current extent not yet hashed
        self._total = 0
        self._finished = False

    def extent(self, disk_offset: int, length: int) -> tuple[bytes, int]:
        """The record header of an extent and its file offset; the data goes right after."""
        if self._finished or self._owed:
            raise ValueError("the previous extent's data is incomplete, or finish() was called")
        if (
            disk_offset < self._disk_end
            or length <= 0
            or (disk_offset | length) % DISK_SECTOR
            or disk_offset + length > self.disk_size
        ):
            raise ValueError(f"extent {disk_offset:#x}+{length:#x} is out of order or range")
        record = _RECORD.pack(disk_offset, length)
        self._hash.update(record)
        at = self._position
        self._position += DISK_RECORD_SIZE + length
        self._disk_end = disk_offset + length
        self._owed = length
        self._total += length
        return record, at

    def data(self, data: BytesLike) -> None:
        """Account for the next bytes of the current extent's data."""
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if size > self._owed:
            raise ValueError("more data than the extent holds")
        self._hash.update(data)
        self._owed -= size

    def finish(self) -> tuple[bytes, int, SectionEntry]:
        """The end record, its file offset, and the section's table entry."""
        if self._owed:
            raise ValueError("the last extent's data is incomplete")
        record = _RECORD.pack(_END, self._total)
        if not self._finished:
            self._hash.update(record)
            self._finished = True
        end = self._position + DISK_RECORD_SIZE
        entry = SectionEntry(
            SECTION_DISK, DISK_SECTION_VERSION, self.offset, end - self.offset, self._hash.digest()
        )
        return record, self._position, entry


#: ``pread(size, offset) -> bytes``; short reads allowed
Pread = Callable[[int, int], bytes]


def _read_exact(pread: Pread, offset: int, size: int) -> bytes:
    parts = []
    while size > 0:
        chunk = pread(size, offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
        size -= len(chunk)
    return b"".join(parts)


def read_disk_header(pread: Pread, entry: SectionEntry) -> DiskSectionHeader:
    """The header of the disk section ``entry``; SnapshotError if it is not a valid one."""
    if entry.version != DISK_SECTION_VERSION:
        raise SnapshotError(
            _WHERE, f"version {entry.version} is not supported (this reader reads 1)"
        )
    if entry.length < DISK_HEADER_SIZE + DISK_RECORD_SIZE:
        raise SnapshotError(_WHERE, f"{entry.length} bytes is too short for a disk section")
    raw = _read_exact(pread, entry.offset, DISK_HEADER_SIZE)
    header = DiskSectionHeader.decode(raw)
    if isinstance(header, str):
        raise SnapshotError(_WHERE, header)
    return header


def walk_disk_section(pread: Pread, entry: SectionEntry) -> Iterator[DiskExtent]:
    """Every extent of the disk section ``entry``, in order, each checked (inside the
    disk, after the previous one, whole sectors, its data inside the section) before it is
    yielded; then the end record is checked (the data total, the section's exact end).
    Raises SnapshotError. The data itself (and the checksum) is the caller's to read."""
    header = read_disk_header(pread, entry)
    position = entry.offset + DISK_HEADER_SIZE
    end = entry.end
    disk_end = total = index = 0
    while True:
        if position + DISK_RECORD_SIZE > end:
            raise SnapshotError(_WHERE, f"ends inside record {index} (no end record)")
        raw = _read_exact(pread, position, DISK_RECORD_SIZE)
        if len(raw) != DISK_RECORD_SIZE:
            raise SnapshotError(_WHERE, f"the file ends inside record {index}")
        disk_offset, length = _RECORD.unpack(raw)
        where = f"record {index} ({disk_offset:#x}+{length:#x})"
        if disk_offset == _END:
            if length != total:
                raise SnapshotError(
                    _WHERE, f"end record says {length} bytes of data, the extents hold {total}"
                )
            if position + DISK_RECORD_SIZE != end:
                extra = end - position - DISK_RECORD_SIZE
                raise SnapshotError(_WHERE, f"{extra} bytes follow the end record")
            return
        if length == 0 or (disk_offset | length) % DISK_SECTOR:
            raise SnapshotError(_WHERE, f"{where}: empty or not whole {DISK_SECTOR}-byte sectors")
        if disk_offset < disk_end:
            raise SnapshotError(_WHERE, f"{where}: overlaps or precedes the previous extent")
        if disk_offset + length > header.disk_size:
            raise SnapshotError(_WHERE, f"{where}: outside the disk of {header.disk_size:#x} bytes")
        data_at = position + DISK_RECORD_SIZE
        if data_at + length + DISK_RECORD_SIZE > end:
            raise SnapshotError(_WHERE, f"{where}: its data runs past the section's end")
        yield DiskExtent(disk_offset, length, data_at)
        disk_end = disk_offset + length
        total += length
        position = data_at + length
        index += 1

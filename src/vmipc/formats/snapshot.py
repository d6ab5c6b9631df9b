"""The snapshot file: one self-describing file holding a whole VM (sans-I/O).

The byte layout is specified in ``protocol/snapshot-file.md``; in short::

    [0, 4096)        header: magic "VMIPCSNP", major.minor, producer, flags, snapshot id,
                     parent id + parent checksum, checksum of the header
    4096 ...         sections, each starting at the first 4096-aligned offset at or after
                     the end of the previous one (padding between them is zero):
                     config, vcpus, devices, memory (descriptor page + RAM image with
                     holes for zero pages), ...
    8-aligned        section table: 64 bytes per section (name, version, offset, length,
                     xxh3_64 checksum)
    end - 64         trailer: magic "VMIPCEND", table offset and count, snapshot id,
                     table checksum, its own checksum; it ends the file

Nothing is ever rewritten: several writers append to the same plain file in turn, each
putting its section at :func:`section_offset` (``fstat().st_size``) and returning a
:class:`SectionEntry`; whoever finishes the file appends :func:`encode_table` at the end.
The header may be written at any time (its page is never used by a section).

This module does no I/O: writers get bytes and offsets to write, the reader gets a pread
callable (``functools.partial(os.pread, fd)``) or a file object.
"""

from __future__ import annotations

import re
import secrets
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from vmipc.formats._common import (
    ZERO_CHUNK_SIZE,
    BytesLike,
    Checksum,
    align_up,
    checksum,
    is_power_of_two,
    version_problem,
)
from vmipc.formats.errors import MissingSection, SnapshotError
from vmipc.memory_layout import MemoryRegion

__all__ = [
    "DIRTY_LOG_SECTION_VERSION",
    "ENTRY_SIZE",
    "FLAG_INCREMENTAL",
    "HEADER_SIZE",
    "MAGIC",
    "MAJOR",
    "MEMORY_DESCRIPTOR_SIZE",
    "MEMORY_ENCODING_IMAGE",
    "MEMORY_ENCODING_PAGE_STREAM",
    "MEMORY_SECTION_VERSION",
    "MINOR",
    "NO_PARENT",
    "REQUIRED_SECTIONS",
    "SECTION_ALIGN",
    "SECTION_CONFIG",
    "SECTION_DEVICES",
    "SECTION_DIRTY_LOG",
    "SECTION_MEMORY",
    "SECTION_VCPUS",
    "TABLE_ALIGN",
    "TRAILER_MAGIC",
    "TRAILER_SIZE",
    "MemoryDescriptor",
    "MemoryRegion",
    "MemorySection",
    "MemorySectionWriter",
    "SectionEntry",
    "SnapshotHeader",
    "SnapshotReader",
    "TableBlock",
    "build_snapshot",
    "encode_memory_section",
    "encode_table",
    "new_snapshot_id",
    "section_entry",
    "section_offset",
]

MAGIC: Final = b"VMIPCSNP"
TRAILER_MAGIC: Final = b"VMIPCEND"
#: the format version this module writes and the newest it reads
MAJOR: Final = 1
MINOR: Final = 0

HEADER_SIZE: Final = 4096
SECTION_ALIGN: Final = 4096
TABLE_ALIGN: Final = 8
ENTRY_SIZE: Final = 64
TRAILER_SIZE: Final = 64
MAX_SECTIONS: Final = 256
ID_SIZE: Final = 16
PRODUCER_SIZE: Final = 64
NAME_SIZE: Final = 16
NO_PARENT: Final = bytes(ID_SIZE)

#: header flag: the memory section holds only the pages changed since the parent snapshot
FLAG_INCREMENTAL: Final = 1
_KNOWN_FLAGS = FLAG_INCREMENTAL

SECTION_CONFIG: Final = "config"
SECTION_VCPUS: Final = "vcpus"
SECTION_DEVICES: Final = "devices"
SECTION_MEMORY: Final = "memory"
#: the sections a restore needs
REQUIRED_SECTIONS: Final = (SECTION_CONFIG, SECTION_VCPUS, SECTION_DEVICES, SECTION_MEMORY)
#: optional: the VMM's dirty-log epoch at the snapshot's moment (ASCII), which an
#: incremental child checks so that it cannot miss pages (see protocol/snapshot-file.md)
SECTION_DIRTY_LOG: Final = "dirty-log"
DIRTY_LOG_SECTION_VERSION: Final = 1

MEMORY_SECTION_VERSION: Final = 1
MEMORY_DESCRIPTOR_SIZE: Final = 4096
MEMORY_ENCODING_IMAGE: Final = 0
MEMORY_ENCODING_PAGE_STREAM: Final = 1
_MEMORY_ENCODINGS = {MEMORY_ENCODING_IMAGE: "image", MEMORY_ENCODING_PAGE_STREAM: "page-stream"}
MAX_REGIONS: Final = 64

#: read_section() refuses sections larger than this by default
DEFAULT_MAX_READ: Final = 256 << 20
_VERIFY_CHUNK = ZERO_CHUNK_SIZE

# The first 16 bytes of the header and its last 8 (the checksum) are frozen across majors.
_PREFIX = struct.Struct("<8sHHI")  # magic, major, minor, header size
_HEADER = struct.Struct("<8sHHIQ16s16sQQ8x64s")
_U64 = struct.Struct("<Q")
_ENTRY = struct.Struct("<16sIIQQQ16x")  # name, version, flags, offset, length, checksum
_TRAILER = struct.Struct("<8sQI4x16sQQQ")  # magic, table off, count, id, table sum, at, sum
_DESCRIPTOR = struct.Struct("<IIII16x")  # page size, encoding, region count, reserved
_REGION = struct.Struct("<QQQ")  # gpa, size, offset in the image

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,15}")


def new_snapshot_id() -> bytes:
    """A fresh random 16-byte snapshot id."""
    return secrets.token_bytes(ID_SIZE)


# -- header -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotHeader:
    """The file header. ``parent_id`` / ``parent_checksum`` chain an incremental snapshot to
    its parent (the parent's id and its table checksum); NO_PARENT / 0 when there is none.
    ``created_ns`` is the creation time in Unix nanoseconds, 0 when unknown."""

    snapshot_id: bytes
    producer: str
    flags: int = 0
    parent_id: bytes = NO_PARENT
    parent_checksum: int = 0
    created_ns: int = 0
    major: int = MAJOR
    minor: int = MINOR

    @property
    def has_parent(self) -> bool:
        return self.parent_id != NO_PARENT

    @property
    def incremental(self) -> bool:
        return bool(self.flags & FLAG_INCREMENTAL)

    def problem(self) -> str | None:
        """Why this header is not valid, or None."""
        if len(self.snapshot_id) != ID_SIZE or self.snapshot_id == NO_PARENT:
            return "snapshot id must be 16 bytes, not all zero"
        if len(self.parent_id) != ID_SIZE:
            return "parent id must be 16 bytes"
        if self.flags & ~_KNOWN_FLAGS:
            return f"unknown flags {self.flags:#x}"
        if not self.has_parent and (self.parent_checksum or self.incremental):
            return "a parent checksum or the incremental flag without a parent id"
        try:
            producer = self.producer.encode()
        except UnicodeEncodeError:
            return "producer is not valid text"
        if len(producer) > PRODUCER_SIZE or b"\0" in producer:
            return f"producer must be at most {PRODUCER_SIZE} UTF-8 bytes without NUL"
        if not 0 <= self.created_ns < 1 << 64 or not 0 <= self.parent_checksum < 1 << 64:
            return "created_ns and parent_checksum are unsigned 64-bit"
        return None

    def encode(self) -> bytes:
        """The HEADER_SIZE bytes to write at offset 0."""
        problem = self.problem()
        if problem:
            raise ValueError(problem)
        body = _HEADER.pack(
            MAGIC,
            self.major,
            self.minor,
            HEADER_SIZE,
            self.flags,
            self.snapshot_id,
            self.parent_id,
            self.parent_checksum,
            self.created_ns,
            self.producer.encode(),
        ).ljust(HEADER_SIZE - 8, b"\0")
        return body + _U64.pack(checksum(body))


# -- sections and table -------------------------------------------------------------------


@dataclass(frozen=True)
class SectionEntry:
    """One row of the section table. ``checksum`` is xxh3_64 of the section's bytes."""

    name: str
    version: int
    offset: int
    length: int
    checksum: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    def to_dict(self) -> dict[str, Any]:
        """The entry as a msgpack-friendly map (for a command's reply)."""
        return {
            "name": self.name,
            "version": self.version,
            "offset": self.offset,
            "length": self.length,
            "checksum": self.checksum,
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> SectionEntry:
        """Inverse of :meth:`to_dict`; raises ValueError on a malformed map."""
        try:
            entry = cls(
                str(value["name"]),
                int(value["version"]),
                int(value["offset"]),
                int(value["length"]),
                int(value["checksum"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a section entry: {value!r}") from exc
        problem = entry.problem()
        if problem:
            raise ValueError(problem)
        return entry

    def problem(self) -> str | None:
        if not _NAME.fullmatch(self.name):
            return f"bad section name {self.name!r} (1-16 of a-z 0-9 . _ -)"
        if not 0 <= self.version < 1 << 32:
            return f"section {self.name!r}: version {self.version} out of range"
        if self.offset < 0 or self.length < 0 or self.end >= 1 << 64:
            return f"section {self.name!r}: offset/length out of range"
        if not 0 <= self.checksum < 1 << 64:
            return f"section {self.name!r}: checksum out of range"
        return None

    def encode(self) -> bytes:
        return _ENTRY.pack(
            self.name.encode("ascii"), self.version, 0, self.offset, self.length, self.checksum
        )


def section_offset(file_size: int) -> int:
    """Where the next section goes in a file that is ``file_size`` bytes long now."""
    return align_up(max(file_size, HEADER_SIZE), SECTION_ALIGN)


def section_entry(name: str, version: int, offset: int, data: BytesLike) -> SectionEntry:
    """The table entry of a small section ``data`` written at ``offset``."""
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    entry = SectionEntry(name, version, offset, size, checksum(data))
    problem = entry.problem()
    if problem:
        raise ValueError(problem)
    return entry


def _placement_problem(
    entries: Sequence[SectionEntry], table_offset: int
) -> tuple[str, str] | None:
    """(where, problem) if the sections are not laid out as the format requires."""
    expected = HEADER_SIZE
    names: set[str] = set()
    for entry in entries:
        where = f"section '{entry.name}'"
        if entry.name in names:
            return where, "appears twice in the section table"
        names.add(entry.name)
        start = align_up(expected, SECTION_ALIGN)
        if entry.offset != start:
            return where, (
                f"starts at {entry.offset:#x}, expected {start:#x} (sections follow each "
                f"other in table order at {SECTION_ALIGN}-byte boundaries)"
            )
        expected = entry.end
    start = align_up(expected, TABLE_ALIGN)
    if table_offset != start:
        return "section table", f"starts at {table_offset:#x}, expected {start:#x}"
    return None


def _table_bytes(entries: Sequence[SectionEntry]) -> bytes:
    return b"".join(entry.encode() for entry in entries)


@dataclass(frozen=True)
class TableBlock:
    """The end of a snapshot file: write ``data`` (table + trailer) at ``offset``.

    ``table_checksum`` identifies the snapshot's contents; an incremental child records it
    as its ``parent_checksum``."""

    offset: int
    data: bytes
    table_checksum: int


def encode_table(entries: Sequence[SectionEntry], snapshot_id: bytes, file_size: int) -> TableBlock:
    """Finish a snapshot whose sections (``entries``, in file order) end at ``file_size``.

    Raises ValueError when the entries are not laid out as the format requires, so a
    writer cannot produce a file the reader refuses.
    """
    if len(snapshot_id) != ID_SIZE or snapshot_id == NO_PARENT:
        raise ValueError("snapshot id must be 16 bytes, not all zero")
    if len(entries) > MAX_SECTIONS:
        raise ValueError(f"more than {MAX_SECTIONS} sections")
    for entry in entries:
        problem = entry.problem()
        if problem:
            raise ValueError(problem)
    end = max([HEADER_SIZE, *(entry.end for entry in entries)])
    if file_size < end:
        raise ValueError(f"file size {file_size} is short of the sections' end {end}")
    table_offset = align_up(file_size, TABLE_ALIGN)
    placement = _placement_problem(entries, table_offset)
    if placement:
        raise ValueError(f"{placement[0]}: {placement[1]}")
    table = _table_bytes(entries)
    table_checksum = checksum(table)
    trailer_offset = table_offset + len(table)
    body = _TRAILER.pack(
        TRAILER_MAGIC, table_offset, len(entries), snapshot_id, table_checksum, trailer_offset, 0
    )[:-8]
    trailer = body + _U64.pack(checksum(body))
    return TableBlock(table_offset, table + trailer, table_checksum)


# -- memory section -----------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryDescriptor:
    """The first MEMORY_DESCRIPTOR_SIZE bytes of the memory section."""

    page_size: int
    encoding: int
    regions: tuple[MemoryRegion, ...]

    @property
    def encoding_name(self) -> str:
        return _MEMORY_ENCODINGS.get(self.encoding, f"unknown ({self.encoding})")

    @property
    def image_size(self) -> int:
        """The smallest image that holds every region."""
        return max(region.offset + region.size for region in self.regions)

    def problem(self, data_size: int | None = None) -> str | None:
        """Why this descriptor is invalid (with ``data_size`` bytes after it), or None."""
        page = self.page_size
        if not (is_power_of_two(page) and 4096 <= page <= 1 << 30):
            return f"page size {page} is not a power of two in 4096 .. 1 GiB"
        if self.encoding not in _MEMORY_ENCODINGS:
            return f"unknown memory encoding {self.encoding}"
        if not 1 <= len(self.regions) <= MAX_REGIONS:
            return f"{len(self.regions)} regions (1 .. {MAX_REGIONS} allowed)"
        previous_gpa_end = previous_image_end = 0
        for region in self.regions:
            text = f"region {region.gpa:#x}+{region.size:#x}"
            if region.size <= 0 or (region.gpa | region.size | region.offset) % page:
                return f"{text} is empty or not aligned to {page}"
            if region.gpa < previous_gpa_end or region.offset < previous_image_end:
                return f"{text} overlaps or is out of order"
            previous_gpa_end = region.gpa + region.size
            previous_image_end = region.offset + region.size
            if previous_gpa_end > 1 << 64:
                return f"{text} ends above 2**64"
        if data_size is not None and self.encoding == MEMORY_ENCODING_IMAGE:
            if data_size % page:
                return f"image size {data_size:#x} is not a multiple of the page size"
            if data_size < self.image_size:
                return f"image size {data_size:#x} does not hold the regions"
        return None

    def encode(self) -> bytes:
        problem = self.problem()
        if problem:
            raise ValueError(problem)
        head = _DESCRIPTOR.pack(self.page_size, self.encoding, len(self.regions), 0)
        body = b"".join(_REGION.pack(r.gpa, r.size, r.offset) for r in self.regions)
        return (head + body).ljust(MEMORY_DESCRIPTOR_SIZE, b"\0")

    @classmethod
    def decode(cls, raw: bytes) -> MemoryDescriptor | str:
        """The descriptor in ``raw`` (MEMORY_DESCRIPTOR_SIZE bytes), or why it is invalid."""
        page_size, encoding, count, reserved = _DESCRIPTOR.unpack_from(raw)
        end = _DESCRIPTOR.size + _REGION.size * count
        if count > MAX_REGIONS or reserved or any(raw[16 : _DESCRIPTOR.size]) or any(raw[end:]):
            return "malformed descriptor (region count or reserved bytes)"
        regions = tuple(
            MemoryRegion(*_REGION.unpack_from(raw, _DESCRIPTOR.size + i * _REGION.size))
            for i in range(count)
        )
        return cls(page_size, encoding, regions)


@dataclass(frozen=True)
class MemorySection:
    """Where guest memory is in the file. For the image encoding, guest RAM region ``r``
    is the file range ``[data_offset + r.offset, ... + r.size)``: map the whole image with
    ``mmap(fd, data_size, MAP_PRIVATE, offset=data_offset)``."""

    entry: SectionEntry
    descriptor: MemoryDescriptor

    @property
    def data_offset(self) -> int:
        """File offset of the image (or page stream) after the descriptor; page-aligned."""
        return self.entry.offset + MEMORY_DESCRIPTOR_SIZE

    @property
    def data_size(self) -> int:
        return self.entry.length - MEMORY_DESCRIPTOR_SIZE

    def layout_problem(
        self, regions: Iterable[tuple[int, int, int] | MemoryRegion], page_size: int = 4096
    ) -> str | None:
        """Why this memory cannot be loaded as the RAM of a VM with ``regions`` ((gpa, size,
        memfd offset) triples) and ``page_size``, or None when it can (image encoding, same
        page size, same regions)."""
        desc = self.descriptor
        if desc.encoding != MEMORY_ENCODING_IMAGE:
            return (
                f"section '{self.entry.name}': memory is a {desc.encoding_name} "
                "(incremental), not a full image"
            )
        if desc.page_size != page_size:
            return (
                f"section '{self.entry.name}': page size {desc.page_size}, "
                f"but this VM uses {page_size}"
            )
        wanted = _descriptor_for(regions, page_size, MEMORY_ENCODING_IMAGE).regions
        if desc.regions != wanted:
            return (
                f"section '{self.entry.name}': memory layout {_format_regions(desc.regions)} "
                f"differs from this VM's {_format_regions(wanted)}"
            )
        return None

    def file_offset(self, gpa: int, length: int = 1) -> int:
        """File offset of guest-physical ``gpa`` (image encoding)."""
        for region in self.descriptor.regions:
            if region.gpa <= gpa and gpa + length <= region.gpa + region.size:
                return self.data_offset + region.offset + gpa - region.gpa
        raise ValueError(f"guest-physical range {gpa:#x}+{length:#x} is not RAM")


def _format_regions(regions: Iterable[MemoryRegion]) -> str:
    return ", ".join(f"{r.gpa:#x}+{r.size:#x}@{r.offset:#x}" for r in regions)


def _descriptor_for(
    regions: Iterable[tuple[int, int, int] | MemoryRegion], page_size: int, encoding: int
) -> MemoryDescriptor:
    items = tuple(r if isinstance(r, MemoryRegion) else MemoryRegion(*r) for r in regions)
    return MemoryDescriptor(page_size, encoding, items)


class MemorySectionWriter:
    """Lays out and checksums a memory section (image encoding) while the VMM writes it.

    The VMM writes :attr:`descriptor` at :attr:`offset`, then, in ascending order, only the
    non-zero parts of the image: ``file_offset = w.data(image_offset, view)`` for each, then
    ``os.pwrite(fd, view, file_offset)``. Everything not written is a hole and reads as zero;
    the checksum covers it as zeros. Finally it extends the file to :attr:`end` (ftruncate)
    and returns :meth:`finish` as the section's table entry.

    ``regions`` are (gpa, size, memfd offset) triples; the image is the memfd's contents, so
    ``image_offset`` is a memfd offset. ``image_size`` defaults to the end of the last region.
    """

    def __init__(
        self,
        offset: int,
        regions: Iterable[tuple[int, int, int] | MemoryRegion],
        *,
        page_size: int = 4096,
        image_size: int | None = None,
    ) -> None:
        if offset % SECTION_ALIGN or offset < HEADER_SIZE:
            raise ValueError(f"section offset {offset:#x} is not a section boundary")
        desc = _descriptor_for(regions, page_size, MEMORY_ENCODING_IMAGE)
        size = desc.image_size if image_size is None else image_size
        problem = desc.problem(size)
        if problem:
            raise ValueError(problem)
        self.offset = offset
        self.image_size = size
        self.descriptor = desc.encode()
        self._hash = Checksum()
        self._hash.update(self.descriptor)
        self._position = 0  # image bytes accounted for
        self._finished = False

    @property
    def data_offset(self) -> int:
        """File offset of image byte 0."""
        return self.offset + MEMORY_DESCRIPTOR_SIZE

    @property
    def end(self) -> int:
        """File offset of the section's end: the file must be at least this long."""
        return self.data_offset + self.image_size

    def data(self, image_offset: int, data: BytesLike) -> int:
        """Account for non-zero image bytes at ``image_offset``; returns the file offset to
        write them at. Calls must be in ascending, non-overlapping order."""
        if self._finished:
            raise ValueError("finish() was already called")
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if image_offset < self._position or image_offset + size > self.image_size:
            raise ValueError(
                f"image range {image_offset:#x}+{size:#x} is out of order or outside the image"
            )
        self._hash.update_zeros(image_offset - self._position)
        self._hash.update(data)
        self._position = image_offset + size
        return self.data_offset + image_offset

    def finish(self) -> SectionEntry:
        """The section's table entry (the rest of the image counts as zeros)."""
        if not self._finished:
            self._hash.update_zeros(self.image_size - self._position)
            self._position = self.image_size
            self._finished = True
        return SectionEntry(
            SECTION_MEMORY,
            MEMORY_SECTION_VERSION,
            self.offset,
            MEMORY_DESCRIPTOR_SIZE + self.image_size,
            self._hash.digest(),
        )


def encode_memory_section(
    regions: Iterable[tuple[int, int, int] | MemoryRegion],
    image: BytesLike,
    *,
    page_size: int = 4096,
    encoding: int = MEMORY_ENCODING_IMAGE,
) -> bytes:
    """A whole memory section in memory (small guests and tests): descriptor + ``image``
    (or + a page stream with ``encoding=MEMORY_ENCODING_PAGE_STREAM``)."""
    desc = _descriptor_for(regions, page_size, encoding)
    size = image.nbytes if isinstance(image, memoryview) else len(image)
    problem = desc.problem(size)
    if problem:
        raise ValueError(problem)
    return desc.encode() + bytes(image)


def build_snapshot(header: SnapshotHeader, sections: Iterable[tuple[str, int, bytes]]) -> bytes:
    """A whole snapshot file in memory from (name, version, data) sections, in order
    (small snapshots and tests; the VMM writes sections into the file instead)."""
    out = bytearray(header.encode())
    entries = []
    for name, version, data in sections:
        offset = section_offset(len(out))
        out += bytes(offset - len(out))
        entries.append(section_entry(name, version, offset, data))
        out += data
    block = encode_table(entries, header.snapshot_id, len(out))
    out += bytes(block.offset - len(out))
    out += block.data
    return bytes(out)


# -- reading ------------------------------------------------------------------------------


class ReadableFile(Protocol):
    def seek(self, offset: int, whence: int = ..., /) -> int: ...
    def read(self, size: int = ..., /) -> bytes: ...


#: ``pread(size, offset) -> bytes`` (``functools.partial(os.pread, fd)``); short reads allowed
Pread = Callable[[int, int], bytes]


class SnapshotReader:
    """Reads and checks a snapshot file through ``pread(size, offset)``.

    The constructor reads the header, the trailer and the section table, checks the format
    version (same major, minor not newer than ``supported``) and the header, table and
    trailer checksums, and the placement of every section; it raises
    :class:`~vmipc.formats.errors.SnapshotError` with a one-line message if any of
    that is wrong. Section checksums are checked on demand: :meth:`verify`,
    :meth:`read_section`.
    """

    def __init__(
        self,
        pread: Pread,
        size: int,
        *,
        supported: tuple[int, int] = (MAJOR, MINOR),
        max_read: int = DEFAULT_MAX_READ,
    ) -> None:
        self._pread = pread
        #: the file's size in bytes
        self.size = size
        self.max_read = max_read
        self.header = self._read_header(supported)
        trailer = self._read_trailer()
        self.table_offset: int = trailer[0]
        #: xxh3_64 of the section table: the snapshot's identity for a child's parent_checksum
        self.table_checksum: int = trailer[2]
        self.entries: tuple[SectionEntry, ...] = self._read_table(*trailer)

    @classmethod
    def from_file(cls, file: ReadableFile, **kwargs: Any) -> SnapshotReader:
        """A reader over a seekable binary file object."""

        def pread(size: int, offset: int) -> bytes:
            file.seek(offset)
            return file.read(size)

        end = file.seek(0, 2)
        return cls(pread, end, **kwargs)

    # -- low level ------------------------------------------------------------------------

    def _read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer only at end of file)."""
        parts = []
        while size > 0:
            chunk = self._pread(size, offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
        return b"".join(parts)

    def _read_exact(self, offset: int, size: int, where: str) -> bytes:
        data = self._read(offset, size)
        if len(data) != size:
            raise SnapshotError(
                where, f"file ends at {offset + len(data):#x}, inside {offset:#x}+{size:#x}"
            )
        return data

    # -- structure ------------------------------------------------------------------------

    def _read_header(self, supported: tuple[int, int]) -> SnapshotHeader:
        where = "header"
        prefix = self._read(0, _PREFIX.size)
        if len(prefix) < len(MAGIC) or not prefix.startswith(MAGIC):
            if MAGIC.startswith(prefix):
                raise SnapshotError(where, f"file is only {self.size} bytes")
            raise SnapshotError(where, "not a vmipc snapshot (bad magic)")
        if len(prefix) < _PREFIX.size:
            raise SnapshotError(where, f"file is only {self.size} bytes")
        _, major, minor, header_size = _PREFIX.unpack(prefix)
        if header_size < _HEADER.size + 8 or header_size % SECTION_ALIGN or header_size > 1 << 20:
            raise SnapshotError(where, f"impossible header size {header_size}")
        raw = self._read(0, header_size)
        if len(raw) < header_size:
            raise SnapshotError(where, f"file is only {self.size} bytes")
        (stored,) = _U64.unpack_from(raw, header_size - 8)
        computed = checksum(raw[:-8])
        if stored != computed:
            raise SnapshotError(where, _mismatch(stored, computed))
        problem = version_problem((major, minor), supported)
        if problem:
            raise SnapshotError(where, problem)
        if header_size != HEADER_SIZE:
            raise SnapshotError(where, f"header size {header_size}, expected {HEADER_SIZE}")
        fields = _HEADER.unpack_from(raw)
        flags, snapshot_id, parent_id, parent_checksum, created_ns, producer = fields[4:]
        if any(raw[72:80]) or any(raw[_HEADER.size : header_size - 8]):
            raise SnapshotError(where, "reserved bytes are not zero")
        try:
            producer_text = producer.rstrip(b"\0").decode()
        except UnicodeDecodeError:
            raise SnapshotError(where, "producer is not UTF-8") from None
        header = SnapshotHeader(
            snapshot_id, producer_text, flags, parent_id, parent_checksum, created_ns, major, minor
        )
        problem = header.problem()
        if problem:
            raise SnapshotError(where, problem)
        return header

    def _read_trailer(self) -> tuple[int, int, int]:
        where = "trailer"
        trailer_offset = self.size - TRAILER_SIZE
        if trailer_offset < HEADER_SIZE:
            raise SnapshotError(
                where, f"missing: file is only {self.size} bytes (truncated or not finished)"
            )
        raw = self._read_exact(trailer_offset, TRAILER_SIZE, where)
        magic, table_offset, count, snapshot_id, table_sum, at, stored = _TRAILER.unpack(raw)
        if magic != TRAILER_MAGIC:
            raise SnapshotError(where, "missing at the end of the file (truncated or not finished)")
        computed = checksum(raw[:-8])
        if stored != computed:
            raise SnapshotError(where, _mismatch(stored, computed))
        if at != trailer_offset:
            raise SnapshotError(
                where,
                f"written for a file ending at {at + TRAILER_SIZE:#x}, but the file ends at "
                f"{self.size:#x} (truncated or extended)",
            )
        if snapshot_id != self.header.snapshot_id:
            raise SnapshotError(where, "belongs to another snapshot (snapshot id differs)")
        if count > MAX_SECTIONS or table_offset + count * ENTRY_SIZE != trailer_offset:
            raise SnapshotError(where, f"impossible section table {table_offset:#x} x{count}")
        return table_offset, count, table_sum

    def _read_table(self, offset: int, count: int, stored: int) -> tuple[SectionEntry, ...]:
        where = "section table"
        raw = self._read_exact(offset, count * ENTRY_SIZE, where)
        computed = checksum(raw)
        if stored != computed:
            raise SnapshotError(where, _mismatch(stored, computed))
        entries = []
        for i in range(count):
            raw_name, version, flags, sec_offset, length, sec_sum = _ENTRY.unpack_from(
                raw, i * ENTRY_SIZE
            )
            name = raw_name.rstrip(b"\0")
            text = name.decode("ascii", "replace")
            entry = SectionEntry(text, version, sec_offset, length, sec_sum)
            problem = entry.problem()
            if problem is None and (flags or b"\0" in name or any(raw[i * 64 + 48 : i * 64 + 64])):
                problem = "reserved bytes are not zero"
            if problem:
                raise SnapshotError(f"{where} entry {i}", problem)
            entries.append(entry)
        placement = _placement_problem(entries, offset)
        if placement:
            raise SnapshotError(*placement)
        return tuple(entries)

    # -- access ---------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(entry.name for entry in self.entries)

    def entry(self, name: str) -> SectionEntry:
        """The table entry of section ``name``; MissingSection if there is none."""
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise MissingSection(f"section '{name}'", "missing from the snapshot")

    def check_complete(self, required: Iterable[str] = REQUIRED_SECTIONS) -> None:
        """Raise MissingSection unless every ``required`` section is present."""
        for name in required:
            self.entry(name)

    def read_section(self, name: str, *, verify: bool = True) -> bytes:
        """The bytes of a (small) section, checksum-verified unless ``verify=False``."""
        entry = self.entry(name)
        where = f"section '{name}'"
        if entry.length > self.max_read:
            raise ValueError(f"{where}: {entry.length} bytes is too large to read whole")
        data = self._read_exact(entry.offset, entry.length, where)
        if verify:
            computed = checksum(data)
            if computed != entry.checksum:
                raise SnapshotError(where, _mismatch(entry.checksum, computed))
        return data

    def memory(self, *, versions: Iterable[int] = (MEMORY_SECTION_VERSION,)) -> MemorySection:
        """The memory section's descriptor and place in the file (no checksum check: call
        ``verify("memory")`` for that, which reads the whole section)."""
        entry = self.entry(SECTION_MEMORY)
        where = f"section '{SECTION_MEMORY}'"
        if entry.version not in tuple(versions):
            raise SnapshotError(
                where, f"version {entry.version} is not supported (this reader reads 1)"
            )
        if entry.length < MEMORY_DESCRIPTOR_SIZE:
            raise SnapshotError(where, f"{entry.length} bytes is shorter than its descriptor")
        raw = self._read_exact(entry.offset, MEMORY_DESCRIPTOR_SIZE, where)
        desc = MemoryDescriptor.decode(raw)
        if isinstance(desc, str):
            raise SnapshotError(where, desc)
        problem = desc.problem(entry.length - MEMORY_DESCRIPTOR_SIZE)
        if problem:
            raise SnapshotError(where, problem)
        return MemorySection(entry, desc)

    def iter_section(self, name: str, chunk: int = _VERIFY_CHUNK) -> Iterator[bytes]:
        """A section's bytes in chunks (unverified), e.g. to copy a large section."""
        entry = self.entry(name)
        position, end = entry.offset, entry.end
        while position < end:
            size = min(chunk, end - position)
            yield self._read_exact(position, size, f"section '{name}'")
            position += size

    def verify(self, section: str | None = None) -> None:
        """Check the checksum of ``section``, or of every section plus the zero padding
        between them (so every byte of the file is covered) when None."""
        entries = self.entries if section is None else (self.entry(section),)
        for entry in entries:
            if entry.name == SECTION_MEMORY:
                self.memory()
            digest = Checksum()
            for chunk in self.iter_section(entry.name):
                digest.update(chunk)
            computed = digest.digest()
            if computed != entry.checksum:
                raise SnapshotError(f"section '{entry.name}'", _mismatch(entry.checksum, computed))
        if section is None:
            self._verify_padding()

    def _verify_padding(self) -> None:
        previous = "header"
        position = HEADER_SIZE
        for entry in [*self.entries, None]:
            start = self.table_offset if entry is None else entry.offset
            if start > position:
                pad = self._read_exact(position, start - position, f"padding after {previous}")
                if any(pad):
                    raise SnapshotError(f"padding after {previous}", "bytes are not zero")
            if entry is not None:
                previous = f"section '{entry.name}'"
                position = entry.end


def _mismatch(stored: int, computed: int) -> str:
    return f"checksum mismatch (stored {stored:#018x}, computed {computed:#018x})"

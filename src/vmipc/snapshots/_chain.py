"""Incremental snapshot chains: find a file's parents and check every link, and the
sections a chain relies on that the client writes: an increment's memory section (around
a ``dump-dirty`` page stream) and the ``dirty-log`` section (the dirty-log epoch).

A chain is a full snapshot (the *base*, memory as an image) followed by increments, each
with ``FLAG_INCREMENTAL``, its parent's ``snapshot_id`` and table checksum in its header,
and as memory a page stream of the pages written since its parent (memory encoding 1).
Everything here is blocking file work (run it in a thread from trio); it never talks to a
VMM.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from vmipc.errors import VmipcError
from vmipc.formats import (
    NEED_DATA,
    Checksum,
    DataRun,
    FormatError,
    MemoryDescriptor,
    MemoryRegion,
    MemorySection,
    PageStreamDecoder,
    SectionEntry,
    SnapshotHeader,
    SnapshotReader,
    StreamEnd,
    ZeroRun,
    section_entry,
    section_offset,
)
from vmipc.formats.snapshot import (
    DIRTY_LOG_SECTION_VERSION,
    MEMORY_DESCRIPTOR_SIZE,
    MEMORY_ENCODING_IMAGE,
    MEMORY_ENCODING_PAGE_STREAM,
    MEMORY_SECTION_VERSION,
    SECTION_DIRTY_LOG,
    SECTION_MEMORY,
)
from vmipc.snapshots._ranges import CHUNK, hash_range, pwrite_all, reader_of

#: longest chain followed (a guard against a loop of files naming each other)
MAX_CHAIN = 10_000


class ChainError(VmipcError):
    """A chain cannot be used: a parent is missing or is not the one its child recorded,
    a file is not a snapshot, links disagree about the memory layout. One line."""


@dataclass(frozen=True)
class ChainLink:
    """One snapshot file of a chain, its structure checked (not its section checksums)."""

    path: str
    header: SnapshotHeader
    table_checksum: int
    memory: MemorySection
    size: int

    @property
    def incremental(self) -> bool:
        return self.header.incremental

    @property
    def snapshot_id(self) -> str:
        return self.header.snapshot_id.hex()

    @property
    def memory_size(self) -> int:
        return sum(region.size for region in self.memory.descriptor.regions)


def read_link(path: str) -> ChainLink:
    """Open ``path`` as a snapshot of a chain: header, table and trailer checked, the
    sections a restore needs present, the memory encoding agreeing with the header."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ChainError(f"{path}: {exc.strerror}") from None
    try:
        reader = reader_of(fd)
        reader.check_complete()
        memory = reader.memory()
    except FormatError as exc:
        raise ChainError(f"{path}: {exc}") from None
    finally:
        os.close(fd)
    link = ChainLink(path, reader.header, reader.table_checksum, memory, reader.size)
    encoding = memory.descriptor.encoding
    if link.incremental and encoding != MEMORY_ENCODING_PAGE_STREAM:
        raise ChainError(f"{path}: an incremental snapshot whose memory is not a page stream")
    if not link.incremental and encoding != MEMORY_ENCODING_IMAGE:
        raise ChainError(f"{path}: a full snapshot whose memory is not an image")
    return link


def _candidates(chain_dir: str, skip: set[str]) -> Iterator[str]:
    try:
        names = sorted(os.listdir(chain_dir))
    except OSError as exc:
        raise ChainError(f"--chain-dir {chain_dir}: {exc.strerror}") from None
    for name in names:
        path = os.path.join(chain_dir, name)
        if name.endswith(".partial") or os.path.realpath(path) in skip:
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.stat(path).st_mode):
                yield path


class _Finder:
    """Snapshots by id: the files named first (each must be a snapshot), then every
    snapshot in the chain directory (other files are skipped), read only when needed."""

    def __init__(self, newest: str, parents: Sequence[str], chain_dir: str | None) -> None:
        self._named = [read_link(path) for path in parents]
        self._chain_dir = chain_dir
        self._scanned: list[ChainLink] | None = None
        self._newest = os.path.realpath(newest)

    def _in_dir(self) -> list[ChainLink]:
        if self._scanned is None:
            self._scanned = []
            if self._chain_dir is not None:
                for path in _candidates(self._chain_dir, {self._newest}):
                    with contextlib.suppress(ChainError):
                        self._scanned.append(read_link(path))
        return self._scanned

    def where(self) -> str:
        places = []
        if self._named:
            places.append(f"{len(self._named)} --parent file(s)")
        if self._chain_dir is not None:
            places.append(f"the snapshots in {self._chain_dir}")
        return " and ".join(places) or "nowhere: pass --parent FILE or --chain-dir DIR"

    def find(self, child: ChainLink) -> ChainLink:
        wanted = child.header.parent_id
        found = [link for link in self._named if link.header.snapshot_id == wanted]
        if not found:
            found = [link for link in self._in_dir() if link.header.snapshot_id == wanted]
        if not found:
            raise ChainError(
                f"{child.path}: its parent snapshot {wanted.hex()} was not found "
                f"(searched {self.where()})"
            )
        for link in found:
            if link.table_checksum == child.header.parent_checksum:
                return link
        link = found[0]
        raise ChainError(
            f"{child.path}: its parent {link.path} has table checksum "
            f"{link.table_checksum:#018x}, not the {child.header.parent_checksum:#018x} "
            "recorded (the parent changed since, or is another snapshot with its id)"
        )


def check_link(parent: ChainLink, child: ChainLink) -> None:
    """Raise ChainError unless ``child`` continues ``parent`` (same id, checksum, RAM)."""
    if child.header.parent_id != parent.header.snapshot_id:
        raise ChainError(
            f"{child.path}: its parent is snapshot {child.header.parent_id.hex()}, "
            f"not {parent.path} ({parent.snapshot_id})"
        )
    if child.header.parent_checksum != parent.table_checksum:
        raise ChainError(
            f"{child.path}: its parent {parent.path} has table checksum "
            f"{parent.table_checksum:#018x}, not the {child.header.parent_checksum:#018x} "
            "recorded (the parent changed since, or is another snapshot with its id)"
        )
    ours, theirs = child.memory.descriptor, parent.memory.descriptor
    if (ours.page_size, ours.regions) != (theirs.page_size, theirs.regions):
        raise ChainError(f"{child.path}: its memory layout differs from its parent {parent.path}")


def resolve_chain(
    newest: str, *, parents: Sequence[str] = (), chain_dir: str | None = None
) -> list[ChainLink]:
    """The chain ending in ``newest``, base first. Parents are looked for among ``parents``
    (files) and then the snapshots in ``chain_dir``; each link's parent id and table
    checksum are checked. A full snapshot is a chain of one. Raises ChainError."""
    link = read_link(newest)
    chain = [link]
    if not link.incremental:
        return chain
    finder = _Finder(newest, parents, chain_dir)
    seen = {link.header.snapshot_id}
    while link.incremental:
        parent = finder.find(link)
        check_link(parent, link)
        if parent.header.snapshot_id in seen or len(chain) >= MAX_CHAIN:
            raise ChainError(f"{parent.path}: the chain loops back on itself")
        seen.add(parent.header.snapshot_id)
        chain.append(parent)
        link = parent
    chain.reverse()
    return chain


def verify_links(chain: Sequence[ChainLink], *, base: bool = False) -> None:
    """Check every checksum of the increments (small files), and of the base too if
    ``base``. Raises ChainError naming the file."""
    for link in chain if base else chain[1:]:
        try:
            fd = os.open(link.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ChainError(f"{link.path}: {exc.strerror}") from None
        try:
            reader_of(fd).verify()
        except FormatError as exc:
            raise ChainError(f"{link.path}: {exc}") from None
        finally:
            os.close(fd)


# --- an increment's memory section ------------------------------------------------------------


def increment_descriptor(base: MemoryDescriptor) -> bytes:
    """The memory descriptor of an increment on top of memory laid out as ``base``."""
    return MemoryDescriptor(base.page_size, MEMORY_ENCODING_PAGE_STREAM, base.regions).encode()


def _stream_layout(regions: Sequence[MemoryRegion]) -> list[tuple[int, int]]:
    return [(region.gpa, region.size) for region in regions]


def decode_stream(
    fd: int, offset: int, length: int, desc: MemoryDescriptor, where: str
) -> Iterator[DataRun | ZeroRun]:
    """The data and zero runs of the one page stream that fills ``fd[offset:+length]``;
    raises ChainError when it is damaged, for other RAM, or does not fill the range."""
    decoder = PageStreamDecoder(
        expect_page_size=desc.page_size, expect_layout=_stream_layout(desc.regions)
    )
    position, end = offset, offset + length
    try:
        while True:
            event = decoder.next_event()
            if event is NEED_DATA:
                size = min(decoder.wanted, CHUNK, end - position)
                data = os.pread(fd, size, position) if size > 0 else b""
                position += len(data)
                decoder.feed(data)
            elif isinstance(event, DataRun | ZeroRun):
                yield event
            elif isinstance(event, StreamEnd):
                break
    except FormatError as exc:
        raise ChainError(f"{where}: {exc}") from None
    if position != end:
        raise ChainError(f"{where}: {end - position} bytes after the end of its page stream")


def increment_entry(fd: int, offset: int, desc: MemoryDescriptor) -> tuple[SectionEntry, int]:
    """After ``dump-dirty`` wrote its page stream into file ``fd`` right after the
    descriptor at ``offset``: read the section back, check the stream (complete, for this
    RAM, nothing after it) and return its table entry and the number of data pages."""
    length = os.fstat(fd).st_size - offset
    digest = Checksum()
    hash_range(fd, offset, length, digest)
    pages = 0
    data_offset = offset + MEMORY_DESCRIPTOR_SIZE
    for run in decode_stream(fd, data_offset, length - MEMORY_DESCRIPTOR_SIZE, desc, "dump-dirty"):
        if isinstance(run, DataRun):
            pages += len(run.data)
    entry = SectionEntry(SECTION_MEMORY, MEMORY_SECTION_VERSION, offset, length, digest.digest())
    return entry, pages // desc.page_size


# --- the dirty-log section --------------------------------------------------------------------


def append_dirty_log(fd: int, epoch: str) -> SectionEntry:
    """Write the ``dirty-log`` section (the dirty-log epoch the snapshot was taken in)
    after the others; returns its entry. An increment may follow a snapshot only while the
    VMM is still in that epoch."""
    data = epoch.encode("ascii")
    offset = section_offset(os.fstat(fd).st_size)
    pwrite_all(fd, data, offset)
    return section_entry(SECTION_DIRTY_LOG, DIRTY_LOG_SECTION_VERSION, offset, data)


def read_dirty_epoch(path: str) -> str | None:
    """The dirty-log epoch a snapshot file records (its ``dirty-log`` section, checksum
    checked), or None when it has none (taken while dirty logging was off, or by a vmipc
    older than protocol 1.5). Raises ChainError when the section is damaged or unknown."""
    try:
        with open(path, "rb") as file:
            reader = SnapshotReader.from_file(file)
            if SECTION_DIRTY_LOG not in reader.names:
                return None
            version = reader.entry(SECTION_DIRTY_LOG).version
            if version != DIRTY_LOG_SECTION_VERSION:
                raise ChainError(
                    f"{path}: section '{SECTION_DIRTY_LOG}': version {version} is not supported"
                )
            return reader.read_section(SECTION_DIRTY_LOG).decode("ascii")
    except (OSError, FormatError, UnicodeDecodeError) as exc:
        raise ChainError(f"{path}: {exc}") from None


__all__ = [
    "ChainError",
    "ChainLink",
    "append_dirty_log",
    "check_link",
    "decode_stream",
    "increment_descriptor",
    "increment_entry",
    "read_dirty_epoch",
    "read_link",
    "resolve_chain",
    "verify_links",
]

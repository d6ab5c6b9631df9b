"""Incremental snapshot chains, client side: find a file's parents and check every link,
build the memory section of an increment from a ``dump-dirty`` stream, and merge a chain
into one full snapshot.

A chain is a full snapshot (the *base*, memory as an image) followed by increments, each
with ``FLAG_INCREMENTAL``, its parent's ``snapshot_id`` and table checksum in its header,
and as memory a page stream of the pages written since its parent (memory encoding 1).
Everything here is blocking file work (run it in a thread from trio); it never talks to a
VMM.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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
    encode_table,
    new_snapshot_id,
    section_entry,
    section_offset,
)
from vmipc.formats.snapshot import (
    MEMORY_DESCRIPTOR_SIZE,
    MEMORY_ENCODING_IMAGE,
    MEMORY_ENCODING_PAGE_STREAM,
    MEMORY_SECTION_VERSION,
    SECTION_MEMORY,
)
from vmipc.sequences._common import fsync_dir, unlink_quietly
from vmipc.vmm.persist import data_extents, punch_hole

#: bytes moved per read or write when copying or hashing file ranges
CHUNK = 4 << 20
#: longest chain followed (a guard against a loop of files naming each other)
MAX_CHAIN = 10_000
_ZEROS = bytes(1 << 20)


class ChainError(Exception):
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


def _reader(fd: int) -> SnapshotReader:
    return SnapshotReader(functools.partial(os.pread, fd), os.fstat(fd).st_size)


def read_link(path: str) -> ChainLink:
    """Open ``path`` as a snapshot of a chain: header, table and trailer checked, the
    sections a restore needs present, the memory encoding agreeing with the header."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ChainError(f"{path}: {exc.strerror}") from None
    try:
        reader = _reader(fd)
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
            _reader(fd).verify()
        except FormatError as exc:
            raise ChainError(f"{link.path}: {exc}") from None
        finally:
            os.close(fd)


# --- file ranges ----------------------------------------------------------------------------


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(errno.EIO, f"short read at {offset:#x} (the file changed?)")
    return data


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _write_zeros(fd: int, offset: int, length: int) -> None:
    for piece in range(offset, offset + length, len(_ZEROS)):
        _pwrite_all(fd, _ZEROS[: min(len(_ZEROS), offset + length - piece)], piece)


def hash_range(fd: int, start: int, length: int, digest: Checksum) -> None:
    """Feed ``fd[start:start+length]`` to ``digest``, holes as zeros, without reading them."""
    position = start
    for offset, size in data_extents(fd, start, length):
        digest.update_zeros(offset - position)
        for chunk_at in range(offset, offset + size, CHUNK):
            digest.update(_pread_exact(fd, min(CHUNK, offset + size - chunk_at), chunk_at))
        position = offset + size
    digest.update_zeros(start + length - position)


# --- an increment's memory section ------------------------------------------------------------


def increment_descriptor(base: MemoryDescriptor) -> bytes:
    """The memory descriptor of an increment on top of memory laid out as ``base``."""
    return MemoryDescriptor(base.page_size, MEMORY_ENCODING_PAGE_STREAM, base.regions).encode()


def _stream_layout(regions: Sequence[MemoryRegion]) -> list[tuple[int, int]]:
    return [(region.gpa, region.size) for region in regions]


def _decode_stream(
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
    for run in _decode_stream(fd, data_offset, length - MEMORY_DESCRIPTOR_SIZE, desc, "dump-dirty"):
        if isinstance(run, DataRun):
            pages += len(run.data)
    entry = SectionEntry(SECTION_MEMORY, MEMORY_SECTION_VERSION, offset, length, digest.digest())
    return entry, pages // desc.page_size


# --- merge ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeReport:
    """What ``merge_chain`` wrote."""

    path: str
    snapshot_id: str
    table_checksum: int
    size: int
    #: the files merged, base first
    chain: list[str]
    #: pages taken from the increments' streams (data, zero)
    data_pages: int
    zero_pages: int


def _image_offset(regions: Sequence[MemoryRegion], gpa: int, length: int) -> int:
    for region in regions:
        if region.gpa <= gpa and gpa + length <= region.gpa + region.size:
            return region.offset + gpa - region.gpa
    raise ValueError(f"guest-physical range {gpa:#x}+{length:#x} is not RAM")


def merge_chain(chain: Sequence[ChainLink], out: str, *, producer: str, temp: str) -> MergeReport:
    """Write one full snapshot at ``out`` holding the memory of the whole ``chain`` (the base
    image with every increment's pages applied in order) and the newest link's other
    sections. The image keeps the base's holes, and pages an increment zeroes become holes
    too (punched; written as zeros where the filesystem cannot punch). Written at ``temp``
    (same directory), fsynced, verified, then renamed: ``out`` is never a part of a file.
    Raises ChainError (bad links) or OSError."""
    base, newest = chain[0], chain[-1]
    if base.incremental:
        raise ChainError(f"{base.path}: the chain does not start with a full snapshot")
    for parent, child in itertools.pairwise(chain):
        check_link(parent, child)
    verify_links(chain)
    desc = base.memory.descriptor
    fds = {}
    out_fd = -1
    created = renamed = False
    try:
        for link in chain:
            fds[link.path] = os.open(link.path, os.O_RDONLY | os.O_CLOEXEC)
        out_fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        created = True
        header = SnapshotHeader(new_snapshot_id(), producer, created_ns=newest.header.created_ns)
        entries = []
        newest_reader = _reader(fds[newest.path])
        for entry in newest_reader.entries:
            if entry.name == SECTION_MEMORY:
                continue
            try:
                data = newest_reader.read_section(entry.name)
            except FormatError as exc:
                raise ChainError(f"{newest.path}: {exc}") from None
            offset = section_offset(os.fstat(out_fd).st_size)
            _pwrite_all(out_fd, data, offset)
            entries.append(section_entry(entry.name, entry.version, offset, data))

        # memory: the base's image (its holes stay holes), checked against its checksum
        offset = section_offset(os.fstat(out_fd).st_size)
        image = MemoryDescriptor(desc.page_size, MEMORY_ENCODING_IMAGE, desc.regions)
        _pwrite_all(out_fd, image.encode(), offset)
        data_offset = offset + MEMORY_DESCRIPTOR_SIZE
        base_fd = fds[base.path]
        base_digest = Checksum()
        base_digest.update(_pread_exact(base_fd, MEMORY_DESCRIPTOR_SIZE, base.memory.entry.offset))
        position = base.memory.data_offset
        for start, size in data_extents(base_fd, base.memory.data_offset, base.memory.data_size):
            base_digest.update_zeros(start - position)
            for at in range(start, start + size, CHUNK):
                chunk = _pread_exact(base_fd, min(CHUNK, start + size - at), at)
                base_digest.update(chunk)
                _pwrite_all(out_fd, chunk, data_offset + at - base.memory.data_offset)
            position = start + size
        base_digest.update_zeros(base.memory.entry.end - position)
        if base_digest.digest() != base.memory.entry.checksum:
            raise ChainError(f"{base.path}: section 'memory': checksum mismatch")
        image_size = base.memory.data_size
        if os.fstat(out_fd).st_size < data_offset + image_size:
            os.ftruncate(out_fd, data_offset + image_size)

        # every increment's pages, in order (a later page wins); zero runs become holes
        data_pages = zero_pages = 0
        can_punch = True
        for link in chain[1:]:
            runs = _decode_stream(
                fds[link.path], link.memory.data_offset, link.memory.data_size, desc, link.path
            )
            for run in runs:
                if isinstance(run, DataRun):
                    at = _image_offset(desc.regions, run.gpa, len(run.data))
                    _pwrite_all(out_fd, run.data, data_offset + at)
                    data_pages += len(run.data)
                else:
                    length = run.npages * desc.page_size
                    at = data_offset + _image_offset(desc.regions, run.gpa, length)
                    can_punch = can_punch and punch_hole(out_fd, at, length)
                    if not can_punch:
                        _write_zeros(out_fd, at, length)
                    zero_pages += run.npages

        digest = Checksum()
        hash_range(out_fd, offset, MEMORY_DESCRIPTOR_SIZE + image_size, digest)
        entries.append(
            SectionEntry(
                SECTION_MEMORY,
                MEMORY_SECTION_VERSION,
                offset,
                MEMORY_DESCRIPTOR_SIZE + image_size,
                digest.digest(),
            )
        )
        table = encode_table(entries, header.snapshot_id, os.fstat(out_fd).st_size)
        _pwrite_all(out_fd, header.encode(), 0)
        _pwrite_all(out_fd, table.data, table.offset)
        os.fsync(out_fd)
        _reader(out_fd).check_complete()
        size = os.fstat(out_fd).st_size
        os.close(out_fd)
        out_fd = -1
        os.rename(temp, out)
        renamed = True
        fsync_dir(os.path.dirname(os.path.abspath(out)))
    except BaseException:
        if out_fd >= 0:
            os.close(out_fd)
        if created and not renamed:
            unlink_quietly(temp)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)
    return MergeReport(
        path=out,
        snapshot_id=header.snapshot_id.hex(),
        table_checksum=table.table_checksum,
        size=size,
        chain=[link.path for link in chain],
        data_pages=data_pages // desc.page_size,
        zero_pages=zero_pages,
    )


__all__ = [
    "ChainError",
    "ChainLink",
    "MergeReport",
    "check_link",
    "increment_descriptor",
    "increment_entry",
    "merge_chain",
    "punch_hole",
    "read_link",
    "resolve_chain",
    "verify_links",
]

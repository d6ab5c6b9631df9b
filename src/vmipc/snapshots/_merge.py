"""Merging a chain into one full snapshot: the base's memory image with every increment's
pages applied in order, and the newest link's other sections; sealed and published like a
checkpoint. Blocking file work, no VMM."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

from vmipc.formats import (
    Checksum,
    DataRun,
    FormatError,
    MemoryDescriptor,
    MemoryRegion,
    SectionEntry,
    SnapshotHeader,
    new_snapshot_id,
    section_entry,
    section_offset,
)
from vmipc.formats.snapshot import (
    MEMORY_DESCRIPTOR_SIZE,
    MEMORY_ENCODING_IMAGE,
    MEMORY_SECTION_VERSION,
    SECTION_MEMORY,
)
from vmipc.snapshots._chain import (
    ChainError,
    ChainLink,
    check_link,
    decode_stream,
    resolve_chain,
    verify_links,
)
from vmipc.snapshots._publish import PendingFile
from vmipc.snapshots._ranges import (
    CHUNK,
    hash_range,
    pread_exact,
    pwrite_all,
    reader_of,
    write_zeros,
)
from vmipc.snapshots._seal import PRODUCER, seal
from vmipc.vmm.persist import data_extents, punch_hole


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


def merge(
    newest: str,
    out: str,
    *,
    parents: Sequence[str] = (),
    chain_dir: str | None = None,
    producer: str = PRODUCER,
) -> MergeReport:
    """Flatten the chain ending in ``newest`` into one full snapshot at ``out`` (blocking
    file work, no VMM): the base's memory with every increment's pages applied in order,
    and the newest's state. Parents are looked for among ``parents`` (files) and the
    snapshots in ``chain_dir``, as for a restore. ``out`` appears only complete (written
    beside it, fsynced, renamed). Raises ChainError or OSError."""
    chain = resolve_chain(newest, parents=parents, chain_dir=chain_dir)
    return merge_chain(chain, out, producer=producer)


def _image_offset(regions: Sequence[MemoryRegion], gpa: int, length: int) -> int:
    for region in regions:
        if region.gpa <= gpa and gpa + length <= region.gpa + region.size:
            return region.offset + gpa - region.gpa
    raise ValueError(f"guest-physical range {gpa:#x}+{length:#x} is not RAM")


def merge_chain(
    chain: Sequence[ChainLink], out: str, *, producer: str = PRODUCER, temp: str | None = None
) -> MergeReport:
    """Write one full snapshot at ``out`` holding the memory of the whole ``chain`` (the base
    image with every increment's pages applied in order) and the newest link's other
    sections. The image keeps the base's holes, and pages an increment zeroes become holes
    too (punched; written as zeros where the filesystem cannot punch). Written at ``temp``
    (same directory; a fresh name by default), sealed, checked, then published (fsync,
    rename): ``out`` is never a part of a file. Raises ChainError (bad links) or OSError."""
    base, newest = chain[0], chain[-1]
    if base.incremental:
        raise ChainError(f"{base.path}: the chain does not start with a full snapshot")
    for parent, child in itertools.pairwise(chain):
        check_link(parent, child)
    verify_links(chain)
    target = PendingFile(out, temp)
    with contextlib.ExitStack() as stack:
        fds = {}
        for link in chain:
            fds[link.path] = os.open(link.path, os.O_RDONLY | os.O_CLOEXEC)
            stack.callback(os.close, fds[link.path])
        try:
            out_fd = target.create()
            header = SnapshotHeader(
                new_snapshot_id(), producer, created_ns=newest.header.created_ns
            )
            entries = _copy_state(fds[newest.path], newest, out_fd)
            memory, data_pages, zero_pages = _merged_memory(chain, fds, out_fd)
            entries.append(memory)
            table_checksum = seal(out_fd, entries, header, sync=False)
            reader_of(out_fd).check_complete()
            size = target.publish()
        finally:
            target.discard()  # closes; removes the file only if it was not published
    return MergeReport(
        path=out,
        snapshot_id=header.snapshot_id.hex(),
        table_checksum=table_checksum,
        size=size,
        chain=[link.path for link in chain],
        data_pages=data_pages // base.memory.descriptor.page_size,
        zero_pages=zero_pages,
    )


def _copy_state(newest_fd: int, newest: ChainLink, out_fd: int) -> list[SectionEntry]:
    """The newest link's sections but ``memory``, copied as they are, in its table order."""
    entries = []
    newest_reader = reader_of(newest_fd)
    for entry in newest_reader.entries:
        if entry.name == SECTION_MEMORY:
            continue
        try:
            data = newest_reader.read_section(entry.name)
        except FormatError as exc:
            raise ChainError(f"{newest.path}: {exc}") from None
        offset = section_offset(os.fstat(out_fd).st_size)
        pwrite_all(out_fd, data, offset)
        entries.append(section_entry(entry.name, entry.version, offset, data))
    return entries


def _merged_memory(
    chain: Sequence[ChainLink], fds: dict[str, int], out_fd: int
) -> tuple[SectionEntry, int, int]:
    """The memory section: the base's image (its holes stay holes), checked against its
    checksum, then every increment's pages in order (a later page wins; zero runs become
    holes). Returns its entry and the bytes of data and the pages of zeros applied."""
    base = chain[0]
    desc = base.memory.descriptor
    offset = section_offset(os.fstat(out_fd).st_size)
    image = MemoryDescriptor(desc.page_size, MEMORY_ENCODING_IMAGE, desc.regions)
    pwrite_all(out_fd, image.encode(), offset)
    data_offset = offset + MEMORY_DESCRIPTOR_SIZE
    _copy_base_image(base, fds[base.path], out_fd, data_offset)
    image_size = base.memory.data_size
    if os.fstat(out_fd).st_size < data_offset + image_size:
        os.ftruncate(out_fd, data_offset + image_size)

    data_bytes = zero_pages = 0
    can_punch = True
    for link in chain[1:]:
        runs = decode_stream(
            fds[link.path], link.memory.data_offset, link.memory.data_size, desc, link.path
        )
        for run in runs:
            if isinstance(run, DataRun):
                at = _image_offset(desc.regions, run.gpa, len(run.data))
                pwrite_all(out_fd, run.data, data_offset + at)
                data_bytes += len(run.data)
            else:
                length = run.npages * desc.page_size
                at = data_offset + _image_offset(desc.regions, run.gpa, length)
                can_punch = can_punch and punch_hole(out_fd, at, length)
                if not can_punch:
                    write_zeros(out_fd, at, length)
                zero_pages += run.npages

    length = MEMORY_DESCRIPTOR_SIZE + image_size
    digest = Checksum()
    hash_range(out_fd, offset, length, digest)
    entry = SectionEntry(SECTION_MEMORY, MEMORY_SECTION_VERSION, offset, length, digest.digest())
    return entry, data_bytes, zero_pages


def _copy_base_image(base: ChainLink, base_fd: int, out_fd: int, data_offset: int) -> None:
    """Copy the base's memory image's data extents to ``data_offset``, hashing the section
    as it goes; raise ChainError when it does not match the base's checksum."""
    digest = Checksum()
    digest.update(pread_exact(base_fd, MEMORY_DESCRIPTOR_SIZE, base.memory.entry.offset))
    position = base.memory.data_offset
    for start, size in data_extents(base_fd, base.memory.data_offset, base.memory.data_size):
        digest.update_zeros(start - position)
        for at in range(start, start + size, CHUNK):
            chunk = pread_exact(base_fd, min(CHUNK, start + size - at), at)
            digest.update(chunk)
            pwrite_all(out_fd, chunk, data_offset + at - base.memory.data_offset)
        position = start + size
    digest.update_zeros(base.memory.entry.end - position)
    if digest.digest() != base.memory.entry.checksum:
        raise ChainError(f"{base.path}: section 'memory': checksum mismatch")


__all__ = ["MergeReport", "merge", "merge_chain"]

"""Guest RAM in and out through passed fds: page streams (dump-memory, dump-dirty,
load-memory, apply-pages), the snapshot file's memory section (written whole, brought up
to date in place, read back) and raw images.

Everything here is blocking and runs in a worker thread with a :class:`Transfer`, which a
cancelled request uses to stop it. Guest RAM goes straight from the memfd to the passed fd
(``sendfile`` to pipes and sockets, ``pwrite`` from the mapping to files, which is faster
there) and never through the client.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from vmipc.formats import (
    NEED_DATA,
    DataRun,
    FormatError,
    MemorySectionWriter,
    PageStreamDecoder,
    PageStreamEncoder,
    RoundEnd,
    SectionEntry,
    SnapshotReader,
    StreamEnd,
    ZeroRun,
    section_offset,
    split_zero_runs,
)
from vmipc.formats.snapshot import MEMORY_ENCODING_IMAGE, MemorySection
from vmipc.memory_layout import PAGE_SIZE, MemoryRegion, describe_layout
from vmipc.vmm.filelease import ReadLease
from vmipc.vmm.memory import GuestMemory
from vmipc.vmm.persist.errors import BulkError
from vmipc.vmm.persist.extents import data_extents, punch_hole
from vmipc.vmm.persist.restorable import check_restorable
from vmipc.vmm.persist.transfer import PeerClosed, Transfer, fd_kind

#: pages per DATA record: bounds the copy made for a running guest and the progress step
RUN_PAGES = 1024
#: written where a hole cannot be punched (writable: the transfer takes its address)
_ZEROS = bytearray(1 << 20)


@dataclass
class Stats:
    """What a dump or load of RAM moved."""

    #: pages sent or received as data
    data_pages: int = 0
    #: pages sent or received as zero runs (never as data)
    zero_pages: int = 0
    #: bytes written to or read from the fd
    bytes: int = 0
    #: page-stream rounds received (a load of a stream), else None
    rounds: int | None = None
    #: a load replaced every page of RAM
    complete: bool = False


# --- which pages to send ---------------------------------------------------------------


def _region_pieces(
    memory: GuestMemory, region: MemoryRegion, runs: Sequence[tuple[int, int]] | None
) -> Iterator[tuple[int, int, bool]]:
    """(first_page, npages, is_zero) covering ``runs`` of the region (all of it if None),
    in order; holes and all-zero pages are zero pieces."""
    view = memory.view[region.offset : region.offset + region.size]
    if runs is None and not memory.fd_is_ram:
        # RAM mapped privately from a snapshot: the file's holes say nothing of the
        # guest's writes since, so every page is looked at
        runs = [(0, region.size // PAGE_SIZE)]
    if runs is None:
        cursor = 0
        for offset, length in data_extents(memory.fd, region.offset, region.size):
            first = (offset - region.offset) // PAGE_SIZE
            last = -(-(offset - region.offset + length) // PAGE_SIZE)
            if first > cursor:
                yield cursor, first - cursor, True
            for piece in split_zero_runs(view, [(first, last - first)]):
                yield piece.first_page, piece.npages, piece.zero
            cursor = last
        total = region.size // PAGE_SIZE
        if cursor < total:
            yield cursor, total - cursor, True
    else:
        for piece in split_zero_runs(view, runs):
            yield piece.first_page, piece.npages, piece.zero
    view.release()


# --- page streams --------------------------------------------------------------------------


#: record bytes (zero records, data record headers) are gathered up to this size and go
#: out in one write, with the payload that follows them where it is copied anyway
_RECORDS_FLUSH = 64 << 10


def send_page_stream(
    memory: GuestMemory,
    fd: int,
    transfer: Transfer,
    *,
    consistent: bool,
    runs: Sequence[Sequence[tuple[int, int]]] | None = None,
    hash_payload: bool = True,
) -> Stats:
    """Write one complete page stream (header, one round, end) of guest RAM to ``fd``.

    ``runs`` limits it to those (first_page, npages) runs per memory region (dirty pages);
    None sends everything. ``consistent`` means the guest is paused: pages then go
    zero-copy; from a running guest each run is copied first (into one buffer reused for
    every run, behind the records that precede it, so that they go in one write) so that
    the round checksum covers exactly the bytes sent.

    ``hash_payload=False`` writes a format 1.1 stream whose round checksums cover the
    record headers only: nothing hashes the pages, so a running guest's pages go
    zero-copy too (what the guest writes after the dirty log was taken is sent again in
    a later round, whatever bytes of it went now).
    """
    kind = fd_kind(fd)
    encoder = PageStreamEncoder(list(memory.ram_ranges()), hash_payload=hash_payload)
    # the copy only exists so that the hash matches the bytes sent
    copy = not consistent and hash_payload
    stats = Stats()
    transfer.count_ram()
    records = bytearray(encoder.header())
    staging: memoryview | None = None  # the running guest's copies
    for index, region in enumerate(memory.regions):
        region_runs = None if runs is None else runs[index]
        for first, npages, zero in _region_pieces(memory, region, region_runs):
            gpa = region.gpa + first * PAGE_SIZE
            if zero:
                records += encoder.zero(gpa, npages)
                stats.zero_pages += npages
                if len(records) >= _RECORDS_FLUSH:
                    transfer.write(fd, records)
                    records.clear()
                transfer.cover(npages * PAGE_SIZE)
                continue
            for start in range(first, first + npages, RUN_PAGES):
                count = min(RUN_PAGES, first + npages - start)
                offset = region.offset + start * PAGE_SIZE
                length = count * PAGE_SIZE
                records += encoder.data(region.gpa + start * PAGE_SIZE, count)
                view = memory.view[offset : offset + length]
                if copy:
                    head = len(records)
                    if staging is None or len(staging) < head + length:
                        # records are flushed before they reach _RECORDS_FLUSH, then a
                        # header: twice that always holds them
                        size = max(head + length, 2 * _RECORDS_FLUSH + RUN_PAGES * PAGE_SIZE)
                        staging = memoryview(bytearray(size))
                    staging[:head] = records
                    staging[head : head + length] = view
                    encoder.payload(staging[head : head + length])
                    transfer.write(fd, staging[: head + length])
                else:
                    if hash_payload:
                        encoder.payload(view)
                    else:
                        encoder.skip_payload(length)
                    transfer.write(fd, records)
                    if kind == "file" or not memory.fd_is_ram:
                        transfer.write(fd, view)
                    else:
                        transfer.sendfile(fd, memory.fd, offset, length)
                records.clear()
                view.release()
                stats.data_pages += count
                transfer.cover(length)
    records += encoder.end_round()
    records += encoder.end_stream()
    transfer.write(fd, records)
    stats.bytes = transfer.done
    return stats


def _zero_range(memory: GuestMemory, offset: int, length: int) -> None:
    """Make RAM zero by punching a hole (no memory is touched or allocated)."""
    punched = False
    if memory.fd_is_ram:  # else the fd is a snapshot file mapped privately: never punch it
        try:
            punched = punch_hole(memory.fd, offset, length)
        except OSError:
            punched = False
    if not punched:
        memory.view[offset : offset + length] = bytes(length)


class PageCoverage:
    """Which pages of RAM a load wrote: a bit per page (2 MiB for 64 GiB of RAM)."""

    def __init__(self, size: int) -> None:
        self.pages = size // PAGE_SIZE
        self._bits = bytearray(-(-self.pages // 8))

    def add(self, offset: int, length: int) -> None:
        """Bytes ``[offset, offset + length)`` of RAM (memfd offsets) were written: every
        page they touch counts (a data run arrives in pieces; the stream's success says
        that all of it did)."""
        first, end = offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE)
        bits = self._bits
        while first < end and first % 8:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1
        whole = (end - first) >> 3
        if whole > 0:
            bits[first >> 3 : (first >> 3) + whole] = b"\xff" * whole
            first += whole << 3
        while first < end:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1

    def complete(self) -> bool:
        full, rest = divmod(self.pages, 8)
        if self._bits.count(0xFF, 0, full) != full:
            return False
        return not rest or self._bits[full] == (1 << rest) - 1


#: record headers and the stream header are read through a reusable buffer of this size
#: (a read never asks for more than the decoder still wants, so never past the stream)
_RECORD_READ = 64 << 10
#: a data run's payload is read straight into guest RAM at most this much a call (then
#: hashed there while it is still in the cache)
_PAYLOAD_READ = 1 << 20


def receive_page_stream(
    memory: GuestMemory, fd: int, transfer: Transfer, *, accept_unhashed: bool = False
) -> Stats:
    """Apply one page stream from ``fd`` to guest RAM as it arrives.

    Reads exactly the stream's bytes, never past its end (the fd may carry more after it).
    A data run's payload goes from the fd into its place in RAM with one copy (the
    ``read``) and no allocation; the decoder checks the round checksum over those bytes
    where they landed. Raises :class:`BulkError` ("bad-stream") when the stream is corrupt,
    truncated or for other RAM: the memory then holds a partial update (pages that may
    have failed the checksum) and must not be run. The stats say ``complete`` when the
    stream wrote every page of RAM (as a full dump does).

    ``accept_unhashed``: take a format 1.1 stream whose payloads are not hashed (only for
    a channel the caller trusts); without it such a stream is refused at its header,
    before any page is written.
    """
    decoder = PageStreamDecoder(
        expect_layout=list(memory.ram_ranges()), accept_unhashed=accept_unhashed
    )
    stats = Stats()
    coverage = PageCoverage(memory.size)
    rounds = data_bytes = 0
    small = memoryview(bytearray(_RECORD_READ))
    ram = memory.view
    transfer.count_ram()
    try:
        while True:
            left = decoder.payload_left
            if left and not decoder.buffered:
                # the decoder validated the run (inside one RAM range): read into place
                count = min(left, _PAYLOAD_READ)
                offset = memory.offset_of(decoder.payload_gpa, count)
                got = transfer.read_into(fd, ram[offset : offset + count])
                if not got:
                    decoder.feed(b"")  # the next event says where the stream was cut
                    decoder.next_event()
                    raise BulkError("bad-stream", "page stream truncated")  # not reached
                decoder.feed_payload(ram[offset : offset + got])
                coverage.add(offset, got)
                data_bytes += got
                stats.bytes += got
                transfer.cover(got)
                continue
            event = decoder.next_event()
            if event is NEED_DATA:
                got = transfer.read_into(fd, small[: max(1, min(decoder.wanted, _RECORD_READ))])
                decoder.feed(small[:got])  # copied into the decoder; empty: end of input
                stats.bytes += got
            elif isinstance(event, DataRun):
                # payload bytes that came with a header read (not with this loop's reads,
                # which stop where the decoder's wants do; kept for any feeding)
                offset = memory.offset_of(event.gpa, len(event.data))
                ram[offset : offset + len(event.data)] = event.data
                coverage.add(offset, len(event.data))
                data_bytes += len(event.data)  # a run may arrive in unaligned pieces
                transfer.cover(len(event.data))
            elif isinstance(event, ZeroRun):
                length = event.npages * PAGE_SIZE
                offset = memory.offset_of(event.gpa, length)
                _zero_range(memory, offset, length)
                coverage.add(offset, length)
                stats.zero_pages += event.npages
                transfer.cover(length)
            elif isinstance(event, RoundEnd):
                rounds += 1
            elif isinstance(event, StreamEnd):
                break
    except FormatError as exc:
        raise BulkError("bad-stream", str(exc)) from None
    except PeerClosed as exc:
        raise BulkError("bad-stream", f"page stream truncated: {exc}") from None
    stats.data_pages = data_bytes // PAGE_SIZE
    stats.rounds = rounds
    stats.complete = coverage.complete()
    return stats


# --- raw images and snapshot memory sections ---------------------------------------------


def write_memory_section(
    memory: GuestMemory, fd: int, transfer: Transfer, *, consistent: bool
) -> tuple[SectionEntry, Stats]:
    """Append the snapshot memory section (descriptor + sparse RAM image) to file ``fd``."""
    offset = section_offset(os.fstat(fd).st_size)
    regions = [(r.gpa, r.size, r.offset) for r in memory.regions]
    writer = MemorySectionWriter(offset, regions)
    transfer.write_at(fd, writer.descriptor, writer.offset)
    stats = Stats()
    transfer.count_ram()
    for region in memory.regions:
        for first, npages, zero in _region_pieces(memory, region, None):
            if zero:
                stats.zero_pages += npages
                transfer.cover(npages * PAGE_SIZE)
                continue
            stats.data_pages += npages
            _write_pages(memory, region, first, npages, fd, transfer, consistent, writer.data)
    if os.fstat(fd).st_size < writer.end:
        os.ftruncate(fd, writer.end)
    entry = writer.finish()
    stats.bytes = transfer.done
    return entry, stats


def _write_pages(
    memory: GuestMemory,
    region: MemoryRegion,
    first: int,
    npages: int,
    fd: int,
    transfer: Transfer,
    consistent: bool,
    place: Callable[[int, memoryview], int],
) -> None:
    """Write pages ``[first, first + npages)`` of ``region`` into file ``fd``, RUN_PAGES at
    a time, each piece at ``place(image_offset, data)``; from a running guest (not
    ``consistent``) each piece is copied first, so that what is hashed is what is written."""
    for start in range(first, first + npages, RUN_PAGES):
        count = min(RUN_PAGES, first + npages - start)
        image_offset = region.offset + start * PAGE_SIZE
        view = memory.view[image_offset : image_offset + count * PAGE_SIZE]
        data = view if consistent else memoryview(bytearray(view))
        transfer.pwrite(fd, data, place(image_offset, data))
        view.release()
        transfer.cover(count * PAGE_SIZE)


def memory_section_at(memory: GuestMemory, fd: int, section: int) -> MemorySectionWriter:
    """The memory section at file offset ``section`` of file ``fd``, which must be the one
    :func:`write_memory_section` writes for this RAM (its descriptor, its whole image
    within the file); else BulkError("bad-snapshot")."""
    regions = [(r.gpa, r.size, r.offset) for r in memory.regions]
    try:
        writer = MemorySectionWriter(section, regions)
    except ValueError as exc:
        raise BulkError("bad-snapshot", f"section {section:#x}: {exc}") from None
    found = os.pread(fd, len(writer.descriptor), section)
    if found != writer.descriptor or os.fstat(fd).st_size < writer.end:
        raise BulkError(
            "bad-snapshot",
            f"no memory section of this VMM's layout ({describe_layout(memory.regions)}) at offset "
            f"{section:#x} of the file",
        )
    return writer


def update_memory_section(
    memory: GuestMemory,
    fd: int,
    transfer: Transfer,
    writer: MemorySectionWriter,
    runs: Sequence[Sequence[tuple[int, int]]],
    *,
    consistent: bool,
) -> Stats:
    """Write the pages of ``runs`` (per memory region: the dirty pages) into the image of
    the snapshot memory section ``writer`` (see :func:`memory_section_at`) of file ``fd``,
    in place: data at its image offset, all-zero pages punched as holes (zeros where the
    filesystem cannot). The section's checksum is left to the caller (it covers the
    whole section)."""
    stats = Stats()
    can_punch = True
    transfer.count_ram()
    for region, region_runs in zip(memory.regions, runs, strict=True):
        for first, npages, zero in _region_pieces(memory, region, region_runs):
            image_offset = region.offset + first * PAGE_SIZE
            length = npages * PAGE_SIZE
            file_offset = writer.data_offset + image_offset
            if zero:
                stats.zero_pages += npages
                if can_punch:
                    can_punch = punch_hole(fd, file_offset, length)
                if not can_punch:
                    for piece in range(file_offset, file_offset + length, len(_ZEROS)):
                        size = min(len(_ZEROS), file_offset + length - piece)
                        transfer.pwrite(fd, memoryview(_ZEROS)[:size], piece)
                transfer.cover(length)
                continue
            stats.data_pages += npages
            _write_pages(
                memory,
                region,
                first,
                npages,
                fd,
                transfer,
                consistent,
                lambda image_offset, _: writer.data_offset + image_offset,
            )
    stats.bytes = transfer.done
    return stats


def write_raw_image(memory: GuestMemory, fd: int, transfer: Transfer) -> Stats:
    """RAM as one flat image in memfd order; a regular file keeps holes for zero pages.

    Into a regular file the image goes from the fd's position to the end of the file: it
    must read back as RAM byte for byte, so what the file held there goes first (zero
    pages are not written, and old bytes would stand in for them or trail the image)."""
    stats = Stats()
    if fd_kind(fd) == "file":
        base = os.lseek(fd, 0, os.SEEK_CUR)
        if os.fstat(fd).st_size > base:
            os.ftruncate(fd, base)
        transfer.count_ram()
        for region in memory.regions:
            for first, npages, zero in _region_pieces(memory, region, None):
                if zero:
                    stats.zero_pages += npages
                    transfer.cover(npages * PAGE_SIZE)
                    continue
                # the image is RAM in memfd order from ``base``; never copied first (a
                # raw dump of a running guest is as inconsistent as the guest makes it)
                _write_pages(
                    memory, region, first, npages, fd, transfer, True, lambda at, _: base + at
                )
                stats.data_pages += npages
        if os.fstat(fd).st_size < base + memory.size:
            os.ftruncate(fd, base + memory.size)
        os.lseek(fd, base + memory.size, os.SEEK_SET)
    elif memory.fd_is_ram:
        transfer.sendfile(fd, memory.fd, 0, memory.size)
        stats.data_pages = memory.size // PAGE_SIZE
    else:
        transfer.write(fd, memory.view)
        stats.data_pages = memory.size // PAGE_SIZE
    stats.bytes = memory.size
    return stats


def read_raw_image(memory: GuestMemory, fd: int, transfer: Transfer) -> Stats:
    """Fill RAM from a flat image (as written by :func:`write_raw_image`)."""
    transfer.readinto(fd, memory.view)
    return Stats(data_pages=memory.size // PAGE_SIZE, bytes=memory.size, complete=True)


def _snapshot_image(memory: GuestMemory, fd: int, *, verify: bool) -> MemorySection:
    """The memory section of the full snapshot file ``fd``, an image of exactly this RAM;
    with ``verify``, its checksum checked too (which reads all of it). Else BulkError
    ("bad-snapshot")."""
    try:
        reader = SnapshotReader(functools.partial(os.pread, fd), os.fstat(fd).st_size)
        section = reader.memory()
        if verify:
            reader.verify(section.entry.name)
    except FormatError as exc:
        raise BulkError("bad-snapshot", str(exc)) from None
    if reader.header.incremental or section.descriptor.encoding != MEMORY_ENCODING_IMAGE:
        raise BulkError(
            "bad-snapshot",
            "an incremental snapshot (its memory is a page stream): load the base of its "
            "chain, then apply-pages each increment's stream",
        )
    stored = [(r.gpa, r.size) for r in section.descriptor.regions]
    if stored != list(memory.ram_ranges()) or section.descriptor.page_size != PAGE_SIZE:
        raise BulkError("bad-snapshot", f"the snapshot's RAM layout {stored} is not this machine's")
    if not verify:
        # what `vmm --restore` checks before it maps a file: every section a restore
        # needs, the state sections (checksums included) and a configuration of this RAM
        try:
            check_restorable(reader, fd)
        except FormatError as exc:
            raise BulkError("bad-snapshot", str(exc)) from None
    return section


def can_map_snapshot(fd: int) -> bool:
    """Whether ``fd`` is a regular file, which :func:`map_snapshot_memory` may map."""
    return fd_kind(fd) == "file"


def map_snapshot_memory(memory: GuestMemory, fd: int, lease: ReadLease) -> Stats:
    """Make RAM the memory section of the full snapshot file ``fd`` mapped copy-on-write
    (lazily: nothing is read), as ``vmm --restore`` does: checked as that checks a file
    (the structure, the small sections' checksums, the layout; not the memory section's
    checksum, which reads every byte: ``vmipc snapshot verify``), under ``lease``, a read
    lease on it taken before anything was read (owned from now on). The image's holes
    read as zeros. BulkError("bad-snapshot") when the file fails a check: nothing is
    mapped then (RAM is a memfd), and the caller treats RAM as damaged."""
    try:
        section = _snapshot_image(memory, fd, verify=False)
        offset = section.file_offset(memory.regions[0].gpa, memory.regions[0].size)
        contiguous = all(
            section.file_offset(region.gpa, region.size) == offset + region.offset
            for region in memory.regions
        )
        if not contiguous or offset % PAGE_SIZE:
            raise BulkError("bad-snapshot", "the memory section's image cannot be mapped")
    except BaseException:
        lease.close()
        memory.drop_file()
        raise
    memory.map_file(os.dup(fd), offset, lease)
    return Stats(complete=True)


def read_snapshot_memory(memory: GuestMemory, fd: int, transfer: Transfer) -> Stats:
    """Fill RAM from the memory section of the snapshot file ``fd`` (eagerly, verified):
    all of it, the image's holes as zeros (RAM may hold what a failed load left)."""
    section = _snapshot_image(memory, fd, verify=True)
    memory.drop_file()  # RAM mapped from another snapshot before: now a memfd again
    stats = Stats()
    transfer.count_ram()
    for region in memory.regions:
        start = section.file_offset(region.gpa, region.size)
        cursor = region.offset
        for offset, length in data_extents(fd, start, region.size):
            target = region.offset + (offset - start)
            if target > cursor:
                _zero_range(memory, cursor, target - cursor)
                transfer.cover(target - cursor)
            for done in range(0, length, RUN_PAGES * PAGE_SIZE):  # progress as it goes
                size = min(RUN_PAGES * PAGE_SIZE, length - done)
                view = memory.view[target + done : target + done + size]
                transfer.preadinto(fd, view, offset + done)
                view.release()
                transfer.cover(size)
            stats.data_pages += length // PAGE_SIZE
            cursor = target + length
        if cursor < region.offset + region.size:
            _zero_range(memory, cursor, region.offset + region.size - cursor)
            transfer.cover(region.offset + region.size - cursor)
    stats.bytes = memory.size
    stats.complete = True
    return stats

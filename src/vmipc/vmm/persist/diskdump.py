"""A block device's image into a snapshot file's ``disk`` section, sparsely (dump-disk).

Only the image's data extents are read (``SEEK_DATA``/``SEEK_HOLE``; a block device, or a
file system without them, is read whole), and within them every all-zero 4 KiB block is
left out: the section holds only extents of non-zero blocks, and a restore writes only
those, so holes stay holes. The bytes are read once into a buffer (to find zero blocks
and to hash them: the VMM computes the section's checksum as it writes, as for memory),
then go into the file with ``copy_file_range`` where the kernel takes it (same file
system: no second copy through user space), else ``pwrite`` from the buffer.

The guest is paused and its block device drained when this runs: the image does not
change underneath, and reading it through the device's own fd sees every completed
write (the page cache), flushed or not.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from vmipc.formats import SectionEntry, section_offset, split_zero_runs
from vmipc.formats.disksection import DiskSectionWriter
from vmipc.vmm.devices import DiskImage
from vmipc.vmm.persist.extents import data_extents
from vmipc.vmm.persist.transfer import Transfer

#: zero blocks are found at this granularity (the guest's, and the page cache's, unit)
BLOCK = 4096
#: bytes read per system call (the buffer; also bounds how long a cancel waits)
CHUNK = 1 << 20
#: copy_file_range errors that mean "not between these two files": pwrite instead
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


@dataclass
class DiskStats:
    """What a disk dump wrote."""

    #: the disk's size in bytes
    disk_size: int = 0
    #: bytes of the image stored as extents
    data_bytes: int = 0
    #: extents stored
    extents: int = 0
    #: bytes written to the fd (the section's length)
    bytes: int = 0


def _image_extents(disk: DiskImage) -> list[tuple[int, int]]:
    """Where the image may hold data, in BLOCK-aligned pieces inside the disk."""
    size = disk.size
    if not stat.S_ISREG(os.fstat(disk.fd).st_mode):
        return [(0, size)]
    try:
        found = list(data_extents(disk.fd, 0, size))
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return [(0, size)]  # no SEEK_DATA here: everything may be data
    merged: list[tuple[int, int]] = []
    for offset, length in found:
        start = offset - offset % BLOCK
        end = min(-(-(offset + length) // BLOCK) * BLOCK, size)
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return [(start, end - start) for start, end in merged if end > start]


def _nonzero_runs(view: memoryview) -> list[tuple[int, int]]:
    """(offset, length) of the runs of non-zero BLOCKs of ``view`` (its last block may be
    short: whole sectors)."""
    whole = len(view) // BLOCK
    runs = [
        (piece.first_page * BLOCK, piece.npages * BLOCK)
        for piece in split_zero_runs(view[: whole * BLOCK], [(0, whole)], BLOCK)
        if not piece.zero
    ]
    tail = view[whole * BLOCK :]
    if len(tail) and any(tail):
        if runs and runs[-1][0] + runs[-1][1] == whole * BLOCK:
            runs[-1] = (runs[-1][0], runs[-1][1] + len(tail))
        else:
            runs.append((whole * BLOCK, len(tail)))
    return runs


class _Copier:
    """Image bytes into the section: copy_file_range while the kernel takes it."""

    def __init__(self, src: int, dst: int, transfer: Transfer) -> None:
        self.src, self.dst, self.transfer = src, dst, transfer
        self.in_kernel = True

    def copy(self, view: memoryview, disk_offset: int, file_offset: int) -> None:
        done = 0
        while self.in_kernel and done < len(view):
            self.transfer.check()
            try:
                moved = os.copy_file_range(
                    self.src, self.dst, len(view) - done, disk_offset + done, file_offset + done
                )
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE:
                    raise
                self.in_kernel = False
                break
            if moved <= 0:  # the image ended early: cannot be while paused; copy it over
                self.in_kernel = False
                break
            done += moved
            self.transfer.advance(moved)
        if done < len(view):
            self.transfer.pwrite(self.dst, view[done:], file_offset + done)


def write_disk_section(
    disk: DiskImage, fd: int, transfer: Transfer
) -> tuple[SectionEntry, DiskStats]:
    """Append the ``disk`` section of ``disk``'s image to snapshot file ``fd`` (at
    ``section_offset`` of its size); returns its table entry. Progress counts bytes of the
    disk gone through (holes included) up to its size."""
    offset = section_offset(os.fstat(fd).st_size)
    writer = DiskSectionWriter(offset, disk.size, disk.readonly)
    stats = DiskStats(disk_size=disk.size)
    transfer.total = disk.size
    transfer.count_ram()  # "ram": bytes of the disk gone through, whatever is stored
    transfer.write_at(fd, writer.header, offset)
    buffer = memoryview(bytearray(CHUNK))
    copier = _Copier(disk.fd, fd, transfer)
    covered = 0
    for start, length in _image_extents(disk):
        transfer.cover(start - covered)
        for piece in range(start, start + length, CHUNK):
            size = min(CHUNK, start + length - piece)
            view = buffer[:size]
            transfer.preadinto(disk.fd, view, piece)
            for run_offset, run_length in _nonzero_runs(view):
                data = view[run_offset : run_offset + run_length]
                record, at = writer.extent(piece + run_offset, run_length)
                transfer.write_at(fd, record, at)
                writer.data(data)
                copier.copy(data, piece + run_offset, at + len(record))
                stats.extents += 1
                stats.data_bytes += run_length
            transfer.cover(size)
        covered = start + length
    transfer.cover(disk.size - covered)
    record, at, entry = writer.finish()
    transfer.write_at(fd, record, at)
    stats.bytes = entry.length
    return entry, stats

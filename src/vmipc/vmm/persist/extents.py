"""Holes in files: where a file holds data (its extents, from lseek(SEEK_DATA/SEEK_HOLE)),
and punching a hole where it should hold none.

Used by the VMM (never-touched or zeroed guest RAM in the memfd is a hole) and by
client-side file tools (a snapshot's memory image keeps holes for zero pages).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from vmipc.vmm.devices.disk import fallocate

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Make ``fd[offset:offset+length]`` a hole (it reads as zeros and holds no blocks),
    keeping the file's size. False when the filesystem cannot punch holes (EOPNOTSUPP);
    other failures raise OSError."""
    return fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)


def data_extents(fd: int, start: int, length: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the parts of ``fd[start:start+length]`` that hold data; the rest
    are holes (zeros). Moves the fd's file position."""
    position, end = start, start + length
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        position = hole

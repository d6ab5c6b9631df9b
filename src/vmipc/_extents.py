"""Where a file holds data: its extents, from lseek(SEEK_DATA/SEEK_HOLE).

Used by the VMM (never-touched guest RAM in the memfd is a hole) and by client-side file
tools (a snapshot's memory image keeps holes for zero pages).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator


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

"""A disk image a block device is backed by: an fd opened before the sandbox, its size
and whether the guest may write it.

In capability mode the VMM opens nothing itself: ``vmipc vmm --disk FILE`` opens the
image at start-up, before the sandbox, and the device only ever uses the fd (pread,
pwrite, fdatasync).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from vmipc.errors import VmipcError

#: a virtio-blk sector, whatever the image's own block size
SECTOR_SIZE = 512


class DiskImageError(VmipcError):
    """A disk image that cannot be used (one line: the path and why)."""


@dataclass
class DiskImage:
    """An open disk image. The fd is owned: :meth:`close` closes it."""

    fd: int
    #: bytes the guest sees (a whole number of sectors: a tail is not visible)
    size: int
    readonly: bool
    #: the path it was opened from, for messages only
    path: str = ""

    @property
    def sectors(self) -> int:
        return self.size // SECTOR_SIZE

    @classmethod
    def open(cls, path: str, *, readonly: bool = False) -> DiskImage:
        """Open a regular file (or a block device) as a disk. DiskImageError if it cannot
        be opened, is not a file or block device, or is smaller than one sector."""
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise DiskImageError(f"cannot open disk {path}: {exc.strerror}") from None
        try:
            return cls.from_fd(fd, readonly=readonly, path=path)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int, *, readonly: bool, path: str = "") -> DiskImage:
        """A disk over an fd already open (owned from now on unless this raises)."""
        try:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode):
                size = info.st_size
            elif stat.S_ISBLK(info.st_mode):
                size = os.lseek(fd, 0, os.SEEK_END)
            else:
                raise DiskImageError(f"disk {path or fd}: not a regular file or block device")
        except OSError as exc:
            raise DiskImageError(f"disk {path or fd}: {exc.strerror}") from None
        size -= size % SECTOR_SIZE
        if size <= 0:
            raise DiskImageError(f"disk {path or fd}: smaller than one {SECTOR_SIZE}-byte sector")
        return cls(fd, size, readonly, path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse_disk_option(text: str) -> tuple[str, bool]:
    """``FILE`` or ``FILE,readonly`` (also ``ro``): the path and whether it is read-only.
    ValueError for any other option."""
    path, _, options = text.partition(",")
    readonly = False
    for option in filter(None, options.split(",")):
        if option in ("readonly", "ro"):
            readonly = True
        else:
            raise ValueError(f"unknown --disk option {option!r} (known: readonly)")
    if not path:
        raise ValueError("--disk wants FILE[,readonly]")
    return path, readonly

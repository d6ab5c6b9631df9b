"""A disk image a block device is backed by: an fd opened before the sandbox, its size
and whether the guest may write it.

In capability mode the VMM opens nothing itself: ``vmipc vmm --disk FILE`` opens the
image at start-up, before the sandbox, and the device only ever uses the fd (pread,
pwrite, fdatasync).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

from vmipc.errors import VmipcError

#: a virtio-blk sector, whatever the image's own block size
SECTOR_SIZE = 512
#: how many blocks the fingerprint samples (the first, the last, evenly spaced between)
FINGERPRINT_SAMPLES = 16
#: the size of each sampled block (a page: what a guest file system writes at least)
FINGERPRINT_BLOCK = 4096


class DiskImageError(VmipcError):
    """A disk image that cannot be used (one line: the path and why). ``problem``: the
    why alone, short (for a protocol error's details)."""

    def __init__(self, message: str, problem: str = "") -> None:
        super().__init__(message)
        self.problem = problem or message


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
        size = _image_size(fd, f"disk {path or fd}")
        size -= size % SECTOR_SIZE
        if size <= 0:
            raise DiskImageError(f"disk {path or fd}: smaller than one {SECTOR_SIZE}-byte sector")
        return cls(fd, size, readonly, path)

    @classmethod
    def from_passed_fd(cls, fd: int, *, readonly: bool) -> DiskImage:
        """A disk over an fd a client passed (``attach-disk``): stricter than
        :meth:`from_fd`, which trusts the VMM's own ``open``. The fd must be a regular
        file or block device open for reading, and for writing too unless ``readonly``;
        not O_APPEND (Linux's pwrite would append: the guest's writes would land at the
        end of the file, not at their sectors); and its size a whole number of sectors
        (a tail the guest cannot see is a sign of the wrong file). Owned from now on
        unless this raises (then the caller still owns it)."""
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError as exc:
            raise DiskImageError(f"disk fd: {exc.strerror}", "not an open fd") from None
        access = flags & os.O_ACCMODE
        if access == os.O_WRONLY:
            raise DiskImageError("disk fd: not open for reading", "not open for reading")
        if not readonly and access != os.O_RDWR:
            raise DiskImageError(
                "disk fd: a writable disk needs an fd open for reading and writing "
                "(or pass readonly)",
                "not open for writing",
            )
        if flags & os.O_APPEND:
            raise DiskImageError(
                "disk fd: opened with O_APPEND (writes would land at the end of the file)",
                "opened with O_APPEND",
            )
        size = _image_size(fd, "disk fd")
        if size <= 0 or size % SECTOR_SIZE:
            problem = f"size {size} is not a positive multiple of {SECTOR_SIZE}"
            raise DiskImageError(f"disk fd: {problem}", problem)
        return cls(fd, size, readonly, "")

    def fingerprint(self) -> int:
        """A cheap identity of the image's content: xxh3_64 of its size and of
        :data:`FINGERPRINT_SAMPLES` blocks of :data:`FINGERPRINT_BLOCK` bytes (the first,
        the last, evenly spaced between), each with its offset.

        At most 64 KiB is read whatever the image's size, and a hole reads as zeros
        without I/O, so a large sparse image costs as little as a small one. It tells
        another disk (or one written since) from the one a state was taken with when the
        difference falls in a sampled block — a guest's superblock, its first and last
        blocks — not a change elsewhere: a check against mistakes, not a proof.
        OSError if the image cannot be read."""
        digest = xxhash.xxh3_64()
        digest.update(struct.pack("<Q", self.size))
        for offset in fingerprint_offsets(self.size):
            length = min(FINGERPRINT_BLOCK, self.size - offset)
            data = b""
            while len(data) < length:
                piece = os.pread(self.fd, length - len(data), offset + len(data))
                if not piece:
                    break  # the image shrank under us: what is missing reads as 0
                data += piece
            digest.update(struct.pack("<Q", offset))
            digest.update(data.ljust(length, b"\0"))
        return digest.intdigest()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def fingerprint_offsets(size: int) -> list[int]:
    """Where :meth:`DiskImage.fingerprint` samples an image of ``size`` bytes: block-aligned
    offsets of the first block, the last, and evenly spaced ones between (fewer for a
    small image: each block once)."""
    blocks = max(1, -(-size // FINGERPRINT_BLOCK))
    if blocks <= FINGERPRINT_SAMPLES:
        return [n * FINGERPRINT_BLOCK for n in range(blocks)]
    last = blocks - 1
    picks = {last * n // (FINGERPRINT_SAMPLES - 1) for n in range(FINGERPRINT_SAMPLES)}
    return [n * FINGERPRINT_BLOCK for n in sorted(picks)]


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


def _image_size(fd: int, label: str) -> int:
    """The size of a regular file or block device; DiskImageError (with the problem as
    its reason) for anything else, or when the host cannot tell."""
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            return info.st_size
        if stat.S_ISBLK(info.st_mode):
            return os.lseek(fd, 0, os.SEEK_END)
    except OSError as exc:
        raise DiskImageError(f"{label}: {exc.strerror}", str(exc.strerror)) from None
    problem = "not a regular file or block device"
    raise DiskImageError(f"{label}: {problem}", problem)


def _libc_fallocate() -> Callable[[int, int, int, int], int]:
    # os has posix_fallocate only; the modes (punch a hole, zero a range) come from libc
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    function = libc.fallocate
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_libc = _libc_fallocate()
#: errors of fallocate that mean "this file system (or kernel) cannot do that mode"
_CANNOT = frozenset({errno.EOPNOTSUPP, errno.ENOSYS})


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with ``mode`` on ``fd[offset:offset+length]``: False when the file
    system cannot (EOPNOTSUPP, ENOSYS: the caller falls back, e.g. writes zeros); OSError
    for other failures."""
    if _libc(fd, mode, offset, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in _CANNOT:
        return False
    raise OSError(code, f"fallocate({mode:#x}) at {offset:#x}+{length:#x}: {os.strerror(code)}")

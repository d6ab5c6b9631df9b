"""Guest RAM: one memfd, mapped once, registered with KVM as one or two memory slots.

Guest-physical layout: :func:`vmipc.memory_layout.layout_for` (see docs/vmm.md); region
*i* is KVM memory slot *i*, and its ``offset`` is its memfd offset.

The memfd is the single copy of guest RAM: loaders write into it in place, dumps read
from it with sendfile/splice, and nothing copies RAM to build or to run a guest.

A lazy restore maps a snapshot file's memory section instead (``MAP_PRIVATE``), under a
read lease (vmm/filelease.py): from the start (``vmm --restore``), or over the memfd of a
machine that exists already (:meth:`GuestMemory.map_file`, ``load-memory format=snapshot``
into an incoming VMM). When somebody is about to write the file,
:meth:`GuestMemory.detach_from_file` copies RAM into a memfd mapped at the same address.
Every replacement maps over the same host addresses (``MAP_FIXED``), so KVM's memory slots
stay registered and valid (docs/kvm-notes.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from vmipc.formats import split_zero_runs
from vmipc.memory_layout import PAGE_SIZE, MemoryConfigError, layout_for

if TYPE_CHECKING:
    from vmipc.vmm.filelease import ReadLease

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_memcmp = _libc.memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value
#: a copy made while the guest ran is compared with RAM in pieces this large
_COMPARE = 64 << 10

#: RAM is looked at in blocks this large for all-zero pages (they stay holes in a copy)
_ZERO_BLOCK = 256 << 10


def parse_size(text: str) -> int:
    """'64M', '1G', '4096', '512K' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip()
    suffix = text[-1:].upper()
    if suffix == "B" and len(text) > 1 and text[-2:-1].upper() in units:
        text, suffix = text[:-1], text[-2:-1].upper()
    try:
        if suffix in units:
            return int(text[:-1]) * units[suffix]
        return int(text, 0)
    except ValueError:
        raise MemoryConfigError(f"not a size: {text!r} (use e.g. 64M, 1G)") from None


class GuestMemory:
    """Guest RAM in a memfd, mapped once into this process."""

    def __init__(
        self,
        size: int,
        *,
        fd: int | None = None,
        private_file_offset: int | None = None,
        lease: ReadLease | None = None,
    ) -> None:
        """RAM in a new memfd, or (``private_file_offset``) a copy-on-write mapping of
        ``size`` bytes of the file ``fd`` from that offset: a snapshot's memory section mapped
        as guest RAM, read lazily as the guest touches it. ``lease``: a read lease on that
        file, owned from now on; whoever watches it calls :meth:`detach_from_file` when it
        breaks."""
        self.regions = layout_for(size)
        self.size = size
        #: whether the fd holds the guest's RAM (a memfd); False for a private mapping of a
        #: file, where the guest's writes live only in the mapping
        self.fd_is_ram = private_file_offset is None
        self.file_lease = lease
        #: held while RAM is copied off its file, so that close() cannot unmap it meanwhile
        self._lock = threading.Lock()
        #: RAM mapped from a file was replaced by zeros (abandon_file)
        self._abandoned = False
        if fd is None:
            fd = os.memfd_create("vmipc-guest-ram", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            except OSError as exc:
                os.close(fd)
                raise MemoryConfigError(f"cannot allocate {size} bytes: {exc.strerror}") from None
        self.fd = fd
        read_write = mmap.PROT_READ | mmap.PROT_WRITE
        try:
            if private_file_offset is None:
                self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, read_write)
            else:
                # the file goes over an anonymous placeholder, so that Python's mmap keeps
                # no fd of it: once RAM is copied off the file, nothing holds it open
                anonymous = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
                self._map = mmap.mmap(-1, size, anonymous, read_write)
        except OSError as exc:
            os.close(fd)
            if lease is not None:
                lease.close()
            raise MemoryConfigError(f"cannot map {size} bytes: {exc.strerror}") from None
        self._anchor = ctypes.c_char.from_buffer(self._map)
        #: host virtual address of memfd offset 0
        self.host_address = ctypes.addressof(self._anchor)
        self.view = memoryview(self._map)
        if private_file_offset is not None:
            try:
                self._map_over(fd, mmap.MAP_PRIVATE, private_file_offset)
            except OSError as exc:
                self.close()
                raise MemoryConfigError(f"cannot map {size} bytes: {exc.strerror}") from None
        self._tracking = False
        self._written: dict[int, set[int]] = {}
        #: a device's worker notes pages while the dirty log takes them: a note that fell
        #: between a take's swap and its reading would be lost to the migration
        self._written_lock = threading.Lock()

    def close(self) -> None:
        if self.file_lease is not None:
            self.file_lease.close()  # waits for a copy off the file that is under way
        with self._lock:
            if self.fd < 0:
                return
            self.view.release()
            del self._anchor
            self._map.close()
            os.close(self.fd)
            self.fd = -1

    # --- RAM mapped from a file ---------------------------------------------------------

    def map_file(self, fd: int, offset: int, lease: ReadLease) -> None:
        """Make RAM a copy-on-write mapping of ``size`` bytes of the file ``fd`` from
        ``offset`` (page-aligned), in place of whatever backed it: a lazy restore into a
        machine that exists already. The mapping goes over the same addresses, so KVM's
        memory slots and every view of RAM stay valid; the file's holes read as zeros, and
        nothing RAM held before shows through. Owns ``fd`` and ``lease`` from now on (they
        are closed if this fails); whoever watches the lease calls :meth:`detach_from_file`
        when it breaks. RAM must not be in use (the vCPUs parked, no dump running).
        Raises OSError; RAM is then an empty memfd (all zeros)."""
        self.drop_file()
        try:
            with self._lock:
                if self.fd < 0:
                    raise OSError(errno.EBADF, "guest memory is closed")
                self._map_over(fd, mmap.MAP_PRIVATE, offset)
                # fd before fd_is_ram: a dump that sees the file's fd never punches it
                ram, self.fd = self.fd, fd
                self.fd_is_ram = False
                self._abandoned = False
                self.file_lease = lease
            os.close(ram)
        except BaseException:
            os.close(fd)
            lease.close()
            raise

    def drop_file(self) -> None:
        """If RAM is mapped from a file, let go of it (and of its lease): an empty memfd
        (all zeros) is mapped over RAM instead. Raises OSError when no memfd can be had:
        RAM is then zero pages, which no guest may run on (as :meth:`abandon_file`)."""
        lease, self.file_lease = self.file_lease, None
        if lease is not None:
            lease.close()  # outside the lock: it waits for a copy off the file under way
        with self._lock:
            if self.fd < 0 or self.fd_is_ram:
                return
            try:
                memfd = os.memfd_create("vmipc-guest-ram", os.MFD_CLOEXEC)
            except OSError:
                self._map_over(-1, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
                self._abandoned = True
                raise
            try:
                os.ftruncate(memfd, self.size)
                self._map_over(memfd, mmap.MAP_SHARED)
            except BaseException:
                os.close(memfd)
                self._map_over(-1, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
                self._abandoned = True
                raise
            file_fd, self.fd = self.fd, memfd
            self.fd_is_ram = True
            self._abandoned = False
            os.close(file_fd)

    def detach_from_file(
        self,
        hold: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
        deadline: float = math.inf,
    ) -> None:
        """Make RAM mapped privately from a file independent of that file, in place: copy
        it into a new memfd (all-zero pages stay holes) and map the memfd over the same
        addresses, so KVM's memory slots and every view of RAM stay valid. After this a
        writer may change or truncate the file.

        Most of the copy is made while the guest runs; ``hold`` is entered for the end,
        and must stop every writer of RAM (the vCPUs): under it what changed meanwhile is
        copied again and the memfd replaces the mapping. The guest is held from half-way
        to ``deadline`` (``time.monotonic()``) at the latest; past it, the copy gives up.
        Raises OSError (ETIMEDOUT past the deadline); RAM is then unchanged."""
        with self._lock:
            if self.fd < 0 or self.fd_is_ram or self._abandoned:
                return
            memfd = os.memfd_create("vmipc-guest-ram", os.MFD_CLOEXEC)
            try:
                os.ftruncate(memfd, self.size)
                with _mapped(memfd, self.size) as address:
                    copy = _Copy(self.view, self.host_address, address)
                    now = time.monotonic()
                    copied = copy.new_data(0, self.size, now + (deadline - now) / 2)
                    with hold():
                        copy.make_equal(copied, deadline)
                        if copy.new_data(copied, self.size, deadline) < self.size:
                            raise OSError(errno.ETIMEDOUT, "the copy took too long")
                        self._map_over(memfd, mmap.MAP_SHARED)
            except BaseException:
                os.close(memfd)
                raise
            # fd before fd_is_ram: a dump that sees fd_is_ram also sees the memfd
            file_fd, self.fd = self.fd, memfd
            self.fd_is_ram = True
            os.close(file_fd)

    def abandon_file(self) -> None:
        """The last resort when :meth:`detach_from_file` failed: map zero pages over RAM,
        so that reading it after the file is truncated gives zeros instead of SIGBUS. The
        guest must not run again."""
        with self._lock:
            if self.fd >= 0 and not self.fd_is_ram:
                self._map_over(-1, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
                self._abandoned = True

    def _map_over(self, fd: int, flags: int, offset: int = 0) -> None:
        """Replace the mapping of RAM, at the same address and size, atomically."""
        address = _mmap(
            self.host_address,
            self.size,
            mmap.PROT_READ | mmap.PROT_WRITE,
            flags | _MAP_FIXED,
            fd,
            offset,
        )
        if address == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        assert address == self.host_address

    def offset_of(self, gpa: int, length: int = 1) -> int:
        """memfd offset of guest-physical ``gpa``; the range must lie inside one region."""
        for region in self.regions:
            if region.gpa <= gpa and gpa + length <= region.end:
                return region.offset + gpa - region.gpa
        raise ValueError(f"guest-physical range {gpa:#x}+{length:#x} is not RAM")

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """A VMM-side write (loaders, devices); counted as dirty while tracking is on."""
        offset = self.offset_of(gpa, len(data))
        self.view[offset : offset + len(data)] = data
        if self._tracking and len(data):
            self.note_written(gpa, len(data))

    def note_written(self, gpa: int, length: int) -> None:
        """Record that the VMM wrote ``[gpa, gpa+length)`` behind KVM's back."""
        if not self._tracking:
            return
        for slot, region in enumerate(self.regions):
            start, end = max(gpa, region.gpa), min(gpa + length, region.end)
            if start < end:
                first = (start - region.gpa) // PAGE_SIZE
                last = (end - 1 - region.gpa) // PAGE_SIZE
                with self._written_lock:
                    self._written.setdefault(slot, set()).update(range(first, last + 1))

    def track_writes(self, enabled: bool) -> None:
        with self._written_lock:
            self._tracking = enabled
            self._written = {}

    def take_written_pages(self) -> dict[int, set[int]]:
        """Pages the VMM wrote since the last call, per slot (page index within the slot)."""
        with self._written_lock:
            written, self._written = self._written, {}
        return written

    def read(self, gpa: int, length: int) -> bytes:
        offset = self.offset_of(gpa, length)
        return bytes(self.view[offset : offset + length])

    def ram_ranges(self) -> Iterator[tuple[int, int]]:
        """(gpa, size) of each RAM region."""
        for region in self.regions:
            yield region.gpa, region.size


class _Copy:
    """A copy of RAM (``ram``, at ``ram_address``) at address ``copy`` that is made while
    RAM may change, then made equal to it once nothing writes RAM any more."""

    def __init__(self, ram: memoryview, ram_address: int, copy: int) -> None:
        self.ram = ram
        self.ram_address = ram_address
        self.copy = copy
        #: (offset, length) of the page runs copied so far; every other page of the copy
        #: is a hole, which is never read (reading would allocate it)
        self.runs: list[tuple[int, int]] = []

    def new_data(self, start: int, end: int, deadline: float) -> int:
        """Copy the pages of ``ram[start:end]`` that hold data, block by block, until
        ``deadline``; returns the offset reached (``end`` when done)."""
        for block in range(start, end, _ZERO_BLOCK):
            if time.monotonic() > deadline:
                return block
            piece = self.ram[block : min(block + _ZERO_BLOCK, end)]
            for run in split_zero_runs(piece, [(0, len(piece) // PAGE_SIZE)]):
                if run.zero:
                    continue
                offset, length = run.first_page * PAGE_SIZE, run.npages * PAGE_SIZE
                self._copy(block + offset, length)
                if self.runs and sum(self.runs[-1]) == block + offset:
                    self.runs[-1] = (self.runs[-1][0], self.runs[-1][1] + length)
                else:
                    self.runs.append((block + offset, length))
        return end

    def make_equal(self, end: int, deadline: float) -> None:
        """Make ``copy[:end]`` equal to ``ram[:end]``: compare the runs copied, copy again
        those that differ, and copy the data that appeared where there was none. Raises
        OSError (ETIMEDOUT) past ``deadline``."""
        runs, self.runs = self.runs, []
        position = 0
        for offset, length in [*runs, (end, 0)]:
            if self.new_data(position, offset, deadline) < offset:
                raise OSError(errno.ETIMEDOUT, "the copy took too long")
            for start in range(offset, offset + length, _COMPARE):
                if time.monotonic() > deadline:
                    raise OSError(errno.ETIMEDOUT, "the copy took too long")
                size = min(_COMPARE, offset + length - start)
                if _memcmp(self.ram_address + start, self.copy + start, size):
                    self._copy(start, size)
            if length:
                self.runs.append((offset, length))
            position = offset + length

    def _copy(self, offset: int, length: int) -> None:
        ctypes.memmove(self.copy + offset, self.ram_address + offset, length)


@contextlib.contextmanager
def _mapped(fd: int, size: int) -> Iterator[int]:
    """The address of ``fd`` mapped shared, for the time of the block."""
    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        anchor = ctypes.c_char.from_buffer(mapping)
        try:
            yield ctypes.addressof(anchor)
        finally:
            del anchor
    finally:
        mapping.close()

"""Guest RAM: one memfd, mapped once, registered with KVM as one or two memory slots.

Guest-physical layout (see docs/vmm.md)::

    0              .. min(ram, 3 GiB)     RAM, slot 0 (memfd offset 0)
    3 GiB          .. 4 GiB               hole: IOAPIC 0xfec00000, LAPIC 0xfee00000, ...
    4 GiB          .. 4 GiB + (ram - 3 GiB)  RAM above the hole, slot 1 (memfd offset 3 GiB)

The memfd is the single copy of guest RAM: loaders write into it in place, dumps read
from it with sendfile/splice, and nothing copies RAM to build or to run a guest.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass

PAGE_SIZE = 4096
MIB = 1 << 20
GIB = 1 << 30
#: RAM below the 4 GiB boundary ends here; the rest of RAM is placed above 4 GiB.
LOW_RAM_END = 3 * GIB
HIGH_RAM_START = 4 * GIB
MIN_MEMORY = 16 * MIB
MAX_MEMORY = 64 * GIB


class MemoryConfigError(ValueError):
    """A memory size that cannot be used."""


@dataclass(frozen=True)
class MemoryRegion:
    """A guest-physical RAM range backed by ``memfd[offset : offset + size]``."""

    slot: int
    guest_phys_addr: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.guest_phys_addr + self.size


def layout_for(size: int) -> tuple[MemoryRegion, ...]:
    """The RAM regions of a guest with ``size`` bytes of RAM (pure; table-tested)."""
    if size % PAGE_SIZE:
        raise MemoryConfigError(f"memory size {size} is not a multiple of {PAGE_SIZE}")
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise MemoryConfigError(
            f"memory size {size // MIB} MiB is outside {MIN_MEMORY // MIB} MiB .. "
            f"{MAX_MEMORY // GIB} GiB"
        )
    low = min(size, LOW_RAM_END)
    regions = [MemoryRegion(slot=0, guest_phys_addr=0, size=low, offset=0)]
    if size > low:
        regions.append(
            MemoryRegion(slot=1, guest_phys_addr=HIGH_RAM_START, size=size - low, offset=low)
        )
    return tuple(regions)


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
        self, size: int, *, fd: int | None = None, private_file_offset: int | None = None
    ) -> None:
        """RAM in a new memfd, or (``private_file_offset``) a copy-on-write mapping of
        ``size`` bytes of the file ``fd`` from that offset: a snapshot's memory section mapped
        as guest RAM, read lazily as the guest touches it."""
        self.regions = layout_for(size)
        self.size = size
        #: whether the fd holds the guest's RAM (a memfd); False for a private mapping of a
        #: file, where the guest's writes live only in the mapping
        self.fd_is_ram = private_file_offset is None
        if fd is None:
            fd = os.memfd_create("vmipc-guest-ram", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            except OSError as exc:
                os.close(fd)
                raise MemoryConfigError(f"cannot allocate {size} bytes: {exc.strerror}") from None
        self.fd = fd
        try:
            if private_file_offset is None:
                flags, offset = mmap.MAP_SHARED, 0
            else:
                flags, offset = mmap.MAP_PRIVATE, private_file_offset
            self._map = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except OSError as exc:
            os.close(fd)
            raise MemoryConfigError(f"cannot map {size} bytes: {exc.strerror}") from None
        self._anchor = ctypes.c_char.from_buffer(self._map)
        #: host virtual address of memfd offset 0
        self.host_address = ctypes.addressof(self._anchor)
        self.view = memoryview(self._map)
        self._tracking = False
        self._written: dict[int, set[int]] = {}

    def close(self) -> None:
        if self.fd < 0:
            return
        self.view.release()
        del self._anchor
        self._map.close()
        os.close(self.fd)
        self.fd = -1

    def offset_of(self, gpa: int, length: int = 1) -> int:
        """memfd offset of guest-physical ``gpa``; the range must lie inside one region."""
        for region in self.regions:
            if region.guest_phys_addr <= gpa and gpa + length <= region.end:
                return region.offset + gpa - region.guest_phys_addr
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
        for region in self.regions:
            start, end = max(gpa, region.guest_phys_addr), min(gpa + length, region.end)
            if start < end:
                pages = self._written.setdefault(region.slot, set())
                first = (start - region.guest_phys_addr) // PAGE_SIZE
                last = (end - 1 - region.guest_phys_addr) // PAGE_SIZE
                pages.update(range(first, last + 1))

    def track_writes(self, enabled: bool) -> None:
        self._tracking = enabled
        self._written = {}

    def take_written_pages(self) -> dict[int, set[int]]:
        """Pages the VMM wrote since the last call, per slot (page index within the slot)."""
        written, self._written = self._written, {}
        return written

    def read(self, gpa: int, length: int) -> bytes:
        offset = self.offset_of(gpa, length)
        return bytes(self.view[offset : offset + length])

    def ram_ranges(self) -> Iterator[tuple[int, int]]:
        """(guest_phys_addr, size) of each RAM region."""
        for region in self.regions:
            yield region.guest_phys_addr, region.size

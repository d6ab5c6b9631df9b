"""Where guest RAM is: the one vocabulary of memory ranges that ``vmm/`` and ``formats/``
share. Pure: no I/O, nothing imported from the rest of vmipc.

A guest's RAM is one image (the VMM's memfd; a snapshot file's memory section holds the
same image) laid out over guest-physical addresses as one or two :class:`MemoryRegion`\\ s::

    0              .. min(ram, 3 GiB)        region 0, image offset 0
    3 GiB          .. 4 GiB                  hole: IOAPIC 0xfec00000, LAPIC 0xfee00000, ...
    4 GiB          .. 4 GiB + (ram - 3 GiB)  region 1, image offset 3 GiB

The VMM registers region *i* as KVM memory slot *i*; a snapshot's memory descriptor lists
the same regions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vmipc.errors import VmipcError

PAGE_SIZE = 4096
MIB = 1 << 20
GIB = 1 << 30
#: RAM below the 4 GiB boundary ends here; the rest of RAM is placed above 4 GiB.
LOW_RAM_END = 3 * GIB
HIGH_RAM_START = 4 * GIB
MIN_MEMORY = 16 * MIB
MAX_MEMORY = 64 * GIB


class MemoryConfigError(ValueError, VmipcError):
    """A memory size that cannot be used."""


@dataclass(frozen=True)
class MemoryRegion:
    """Guest-physical RAM ``[gpa, gpa + size)``, stored at ``offset`` in the RAM image
    (the VMM's memfd, a snapshot's memory image)."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        """The first guest-physical address after the region."""
        return self.gpa + self.size


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
    regions = [MemoryRegion(gpa=0, size=low, offset=0)]
    if size > low:
        regions.append(MemoryRegion(gpa=HIGH_RAM_START, size=size - low, offset=low))
    return tuple(regions)


def describe_layout(regions: Iterable[MemoryRegion]) -> str:
    """One line for messages: "256 MiB at 0x0, ..." (or "empty")."""
    return ", ".join(f"{r.size >> 20} MiB at {r.gpa:#x}" for r in regions) or "empty"

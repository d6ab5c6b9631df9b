"""What a loader hands to the machine: where and how the boot vCPU starts."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from vmipc.errors import VmipcError


class GuestImageError(ValueError, VmipcError):
    """A guest file that cannot be booted (wrong format, does not fit in RAM, ...)."""


class CpuMode(enum.Enum):
    #: 16-bit real mode, as a PC BIOS hands over to a boot sector
    REAL = "real"
    #: 32-bit protected mode with flat segments and paging off (multiboot)
    PROTECTED_FLAT = "protected-flat"


@dataclass(frozen=True)
class BootPlan:
    """The boot vCPU's starting mode and register values after a loader ran."""

    mode: CpuMode
    rip: int
    registers: dict[str, int] = field(default_factory=dict)
    description: str = ""

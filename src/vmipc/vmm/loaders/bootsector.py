"""A raw 512-byte boot sector, loaded at 0x7c00 and entered in real mode at 0000:7C00."""

from __future__ import annotations

from pathlib import Path

from vmipc.vmm.loaders._common import BootPlan, CpuMode, GuestImageError
from vmipc.vmm.memory import GuestMemory

LOAD_ADDRESS = 0x7C00
SECTOR_SIZE = 512
BOOT_DRIVE = 0x80


def load_bootsector(
    memory: GuestMemory, image: bytes, *, require_signature: bool = True
) -> BootPlan:
    """Place ``image`` at 0x7c00 as a BIOS does; DL holds the boot drive (0x80).

    There is no BIOS behind it: the sector talks to devices by port I/O (COM1 at 0x3f8).
    """
    if len(image) != SECTOR_SIZE:
        raise GuestImageError(f"a boot sector is {SECTOR_SIZE} bytes, this one is {len(image)}")
    if require_signature and image[510:512] != b"\x55\xaa":
        raise GuestImageError("not a boot sector: bytes 510-511 are not the 55 AA signature")
    memory.write(LOAD_ADDRESS, image)
    return BootPlan(
        mode=CpuMode.REAL,
        rip=LOAD_ADDRESS,
        registers={"rdx": BOOT_DRIVE, "rsp": LOAD_ADDRESS},
        description="boot sector at 0000:7c00",
    )


def load_bootsector_file(memory: GuestMemory, path: str | Path) -> BootPlan:
    try:
        image = Path(path).read_bytes()
    except OSError as exc:
        raise GuestImageError(f"cannot read boot sector {path}: {exc.strerror}") from None
    return load_bootsector(memory, image)

"""Boot loaders: parsing and placement (pure, on a GuestMemory without KVM)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmipc.memory_layout import MIB
from vmipc.vmm.loaders import (
    CpuMode,
    GuestImageError,
    load_bootsector,
    load_multiboot,
    parse_multiboot,
)
from vmipc.vmm.loaders.multiboot import BOOTLOADER_MAGIC, INFO_BASE
from vmipc.vmm.memory import GuestMemory


@pytest.fixture
def memory() -> GuestMemory:
    mem = GuestMemory(16 * MIB)
    yield mem  # type: ignore[misc]
    mem.close()


def test_bootsector_lands_at_7c00(memory: GuestMemory, guests: Path) -> None:
    image = (guests / "hello-bootsector.bin").read_bytes()
    plan = load_bootsector(memory, image)
    assert plan.mode is CpuMode.REAL
    assert plan.rip == 0x7C00
    assert plan.registers["rdx"] == 0x80
    assert memory.read(0x7C00, 512) == image


@pytest.mark.parametrize(
    ("image", "message"),
    [(b"\0" * 511, "512 bytes"), (b"\0" * 512, "55 AA signature")],
)
def test_bad_bootsectors(memory: GuestMemory, image: bytes, message: str) -> None:
    with pytest.raises(GuestImageError, match=message):
        load_bootsector(memory, image)


def test_multiboot_elf_is_loaded_with_its_information(memory: GuestMemory, guests: Path) -> None:
    image = (guests / "multiboot-echo.elf").read_bytes()
    plan = load_multiboot(memory, image, "a b=c")
    assert plan.mode is CpuMode.PROTECTED_FLAT
    assert plan.registers == {"rax": BOOTLOADER_MAGIC, "rbx": INFO_BASE}
    kernel = parse_multiboot(image)
    for segment in kernel.segments:
        assert memory.read(segment.paddr, len(segment.data)) == segment.data
    flags, mem_lower, mem_upper = struct.unpack("<III", memory.read(INFO_BASE, 12))
    assert flags & 0x245 == 0x245  # mem, cmdline, mmap, loader name
    assert mem_lower == 639
    assert mem_upper == (16 * MIB - MIB) // 1024
    (cmdline_addr,) = struct.unpack("<I", memory.read(INFO_BASE + 16, 4))
    assert memory.read(cmdline_addr, 6) == b"a b=c\0"
    mmap_length, mmap_addr = struct.unpack("<II", memory.read(INFO_BASE + 44, 8))
    entries = [
        struct.unpack_from("<IQQI", memory.read(mmap_addr, mmap_length), offset)
        for offset in range(0, mmap_length, 24)
    ]
    assert (20, 0x100000, 15 * MIB, 1) in entries


def _aout_kludge_image(entry_offset: int = 0x20) -> bytes:
    load_addr = 0x200000
    body = bytearray(0x100)
    flags = 0x00010003
    header = struct.pack(
        "<IIIIIIII",
        0x1BADB002,
        flags,
        (-(0x1BADB002 + flags)) & 0xFFFFFFFF,
        load_addr,  # header_addr: header at file offset 0
        load_addr,
        load_addr + len(body),
        load_addr + 0x1000,
        load_addr + entry_offset,
    )
    body[: len(header)] = header
    body[0x20:0x22] = b"\xeb\xfe"  # jmp $
    return bytes(body)


def test_multiboot_aout_kludge(memory: GuestMemory) -> None:
    image = _aout_kludge_image()
    plan = load_multiboot(memory, image)
    assert plan.rip == 0x200020
    assert memory.read(0x200000, len(image)) == image


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"\0" * 9000, "no multiboot header"),
        (
            struct.pack("<III", 0x1BADB002, 0, (-0x1BADB002) & 0xFFFFFFFF) + b"\0" * 64,
            "neither ELF nor",
        ),
        (
            struct.pack("<III", 0x1BADB002, 0x8, (-(0x1BADB002 + 8)) & 0xFFFFFFFF),
            "unsupported features",
        ),
    ],
)
def test_malformed_multiboot(memory: GuestMemory, image: bytes, message: str) -> None:
    with pytest.raises(GuestImageError, match=message):
        load_multiboot(memory, image)


def test_kernel_larger_than_ram_is_refused(memory: GuestMemory) -> None:
    image = bytearray(_aout_kludge_image())
    struct.pack_into("<I", image, 24, 0x200000 + 64 * MIB)  # bss_end far beyond RAM
    with pytest.raises(GuestImageError, match="does not fit"):
        load_multiboot(memory, bytes(image))

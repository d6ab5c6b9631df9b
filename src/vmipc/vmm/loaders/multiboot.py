"""Multiboot (v1) kernels: ELF32/ELF64 or a.out-kludge images, with a multiboot
information structure (memory map, command line, boot loader name)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from vmipc.vmm.loaders._common import BootPlan, CpuMode, GuestImageError
from vmipc.vmm.memory import GuestMemory

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
HEADER_SEARCH = 8192

_FLAG_AOUT_KLUDGE = 1 << 16
_SUPPORTED_REQUIRED_FLAGS = 0x3  # bit 0 page-align modules, bit 1 memory info

MBI_MEM = 1 << 0
MBI_CMDLINE = 1 << 2
MBI_MMAP = 1 << 6
MBI_LOADER_NAME = 1 << 9

#: Where the loader puts the information structure and what it points to (below the
#: EBDA, away from 0x7c00 and the usual real-mode trampoline pages).
INFO_BASE = 0x10000
INFO_LIMIT = 0x20000
_MMAP_OFFSET = 0x200
_NAME_OFFSET = 0x100
_CMDLINE_OFFSET = 0x1000

LOW_MEMORY_END = 0x9FC00
BIOS_AREA = (0xF0000, 0x10000)
E820_RAM = 1
E820_RESERVED = 2


@dataclass(frozen=True)
class Segment:
    paddr: int
    data: bytes
    memsize: int


@dataclass(frozen=True)
class MultibootImage:
    entry: int
    segments: tuple[Segment, ...]
    header_flags: int


def _find_header(image: bytes) -> tuple[int, int]:
    for offset in range(0, min(len(image), HEADER_SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, offset)
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return offset, flags
    raise GuestImageError(
        "not a multiboot kernel: no multiboot header (magic 0x1BADB002 with a valid checksum) "
        "in its first 8 KiB"
    )


def _parse_aout_kludge(image: bytes, header_offset: int) -> MultibootImage:
    if header_offset + 32 > len(image):
        raise GuestImageError("multiboot header is truncated")
    header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from(
        "<IIIII", image, header_offset + 12
    )
    if load_addr > header_addr:
        raise GuestImageError("multiboot header: load_addr is above header_addr")
    file_start = header_offset - (header_addr - load_addr)
    if file_start < 0:
        raise GuestImageError("multiboot header: load_addr lies before the start of the file")
    length = (load_end - load_addr) if load_end else len(image) - file_start
    if length < 0 or file_start + length > len(image):
        raise GuestImageError("multiboot header: load_end_addr lies past the end of the file")
    memsize = max(length, (bss_end - load_addr) if bss_end else 0)
    data = image[file_start : file_start + length]
    return MultibootImage(entry, (Segment(load_addr, data, memsize),), _FLAG_AOUT_KLUDGE)


def _parse_elf(image: bytes, flags: int) -> MultibootImage:
    if image[:4] != b"\x7fELF":
        raise GuestImageError("multiboot kernel is neither ELF nor an a.out-kludge image")
    elf_class = image[4]
    if image[5] != 1:
        raise GuestImageError("multiboot ELF is not little-endian")
    segments: list[Segment] = []
    try:
        if elf_class == 1:
            (entry, phoff) = struct.unpack_from("<II", image, 24)
            phentsize, phnum = struct.unpack_from("<HH", image, 42)
            header_fmt = "<IIIIIIII"
        elif elf_class == 2:
            (entry, phoff) = struct.unpack_from("<QQ", image, 24)
            phentsize, phnum = struct.unpack_from("<HH", image, 54)
            header_fmt = "<IIQQQQQQ"
        else:
            raise GuestImageError(f"multiboot ELF has an unknown class {elf_class}")
        for index in range(phnum):
            fields = struct.unpack_from(header_fmt, image, phoff + index * phentsize)
            if elf_class == 1:
                p_type, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _flags, _align = fields
            else:
                p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = fields
            if p_type != 1 or p_memsz == 0:  # PT_LOAD only
                continue
            if p_offset + p_filesz > len(image):
                raise GuestImageError(f"ELF segment {index} runs past the end of the file")
            segments.append(Segment(p_paddr, image[p_offset : p_offset + p_filesz], p_memsz))
    except struct.error:
        raise GuestImageError("multiboot ELF is truncated") from None
    if not segments:
        raise GuestImageError("multiboot ELF has no loadable segments")
    return MultibootImage(entry & 0xFFFFFFFF, tuple(segments), flags)


def parse_multiboot(image: bytes) -> MultibootImage:
    """Parse a multiboot v1 kernel image (pure)."""
    offset, flags = _find_header(image)
    unsupported = flags & 0xFFFF & ~_SUPPORTED_REQUIRED_FLAGS
    if unsupported & 0x4:
        pass  # a video mode request is optional to honour: we have no display
    elif unsupported:
        raise GuestImageError(f"multiboot header requires unsupported features {unsupported:#x}")
    if flags & _FLAG_AOUT_KLUDGE:
        return _parse_aout_kludge(image, offset)
    return _parse_elf(image, flags)


def memory_map(memory: GuestMemory) -> list[tuple[int, int, int]]:
    """(base, length, type) entries describing the guest's physical memory."""
    entries = [
        (0, LOW_MEMORY_END, E820_RAM),
        (LOW_MEMORY_END, 0xA0000 - LOW_MEMORY_END, E820_RESERVED),
    ]
    entries.append((BIOS_AREA[0], BIOS_AREA[1], E820_RESERVED))
    for base, size in memory.ram_ranges():
        if base == 0:
            entries.append((0x100000, size - 0x100000, E820_RAM))
        else:
            entries.append((base, size, E820_RAM))
    return entries


def load_multiboot(memory: GuestMemory, image: bytes, cmdline: str = "") -> BootPlan:
    """Load a multiboot kernel and its information structure into guest memory."""
    kernel = parse_multiboot(image)
    for segment in kernel.segments:
        if segment.paddr < INFO_LIMIT and segment.paddr + segment.memsize > INFO_BASE:
            raise GuestImageError(
                f"kernel segment at {segment.paddr:#x} overlaps the boot information area"
            )
        try:
            memory.offset_of(segment.paddr, segment.memsize)
        except ValueError:
            raise GuestImageError(
                f"kernel segment {segment.paddr:#x}+{segment.memsize:#x} does not fit in "
                f"{memory.size >> 20} MiB of RAM"
            ) from None
        memory.write(segment.paddr, segment.data)
        # The rest of memsz is .bss: guest RAM starts zeroed, so nothing to write.

    cmdline_bytes = cmdline.encode() + b"\0"
    if len(cmdline_bytes) > INFO_LIMIT - INFO_BASE - _CMDLINE_OFFSET:
        raise GuestImageError("kernel command line is too long")
    name = b"vmipc\0"
    mmap_entries = memory_map(memory)
    mmap_blob = b"".join(
        struct.pack("<IQQI", 20, base, length, kind) for base, length, kind in mmap_entries
    )
    low_ram = memory.regions[0].size
    info = bytearray(120)
    struct.pack_into(
        "<III",
        info,
        0,
        MBI_MEM | MBI_CMDLINE | MBI_MMAP | MBI_LOADER_NAME,
        LOW_MEMORY_END // 1024,
        (low_ram - 0x100000) // 1024,
    )
    struct.pack_into("<I", info, 16, INFO_BASE + _CMDLINE_OFFSET)
    struct.pack_into("<II", info, 44, len(mmap_blob), INFO_BASE + _MMAP_OFFSET)
    struct.pack_into("<I", info, 64, INFO_BASE + _NAME_OFFSET)
    memory.write(INFO_BASE, bytes(info))
    memory.write(INFO_BASE + _NAME_OFFSET, name)
    memory.write(INFO_BASE + _MMAP_OFFSET, mmap_blob)
    memory.write(INFO_BASE + _CMDLINE_OFFSET, cmdline_bytes)
    return BootPlan(
        mode=CpuMode.PROTECTED_FLAT,
        rip=kernel.entry,
        registers={"rax": BOOTLOADER_MAGIC, "rbx": INFO_BASE},
        description=f"multiboot kernel, entry {kernel.entry:#x}",
    )


def load_multiboot_file(memory: GuestMemory, path: str | Path, cmdline: str = "") -> BootPlan:
    try:
        image = Path(path).read_bytes()
    except OSError as exc:
        raise GuestImageError(f"cannot read kernel {path}: {exc.strerror}") from None
    return load_multiboot(memory, image, cmdline)

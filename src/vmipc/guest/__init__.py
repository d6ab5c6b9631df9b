"""The built-in deterministic test guest and a Python twin of what it prints.

``BUILTIN_GUEST_PATH`` is the committed multiboot image (source in ``guest/`` at the top of
the repository, rebuilt with ``make -C guest``). Each vCPU of the guest rewrites its working
set pass after pass and prints ``vcpu=<i> pass=<n> sum=<16 hex digits>`` lines whose values
are a pure function of (seed, vcpu, pass, working-set size); :func:`expected_lines` computes
exactly those lines, so a test can compare a console against them. ``guest/README.md``
describes the options and the format.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

__all__ = [
    "BUILTIN_GUEST_PATH",
    "DISK_BLOCK_SIZE",
    "PAGE_SIZE",
    "DiskImageCheck",
    "banner",
    "beat_line",
    "check_disk_image",
    "disk_bad_lines",
    "disk_block",
    "disk_pass_sums",
    "expected_disk_lines",
    "expected_lines",
    "pass_sums",
    "working_set_bytes",
]

BUILTIN_GUEST_PATH: Path = Path(__file__).resolve().with_name("builtin.elf")
"""The committed guest image (an ELF32 multiboot v1 kernel, loaded at 1 MiB)."""

PAGE_SIZE = 4096

_M64 = (1 << 64) - 1
_WORDS = PAGE_SIZE // 8


def _mix64(z: int) -> int:
    """SplitMix64's finalizer on z + golden ratio (``mix64`` in guest/main.c)."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _rotl13(x: int) -> int:
    return ((x << 13) | (x >> 51)) & _M64


@lru_cache(maxsize=1)
def _page_tables() -> tuple[int, int]:
    """(T, R): T holds the page's fixed words T[j] little-endian, R has a 1 in every word."""
    t = b"".join(_mix64(0xA5A5A5A5A5A5A5A5 ^ j).to_bytes(8, "little") for j in range(_WORDS))
    r = (b"\x01" + b"\x00" * 7) * _WORDS
    return int.from_bytes(t, "little"), int.from_bytes(r, "little")


def _page_crc(h: int) -> int:
    """CRC-32 (zlib) of a page whose word j is h ^ T[j]."""
    t, r = _page_tables()
    return zlib.crc32((t ^ (h * r)).to_bytes(PAGE_SIZE, "little"))


def working_set_bytes(ws: int) -> int:
    """The working-set size the guest uses for ``ws=``: rounded up to whole pages."""
    if ws < 1:
        raise ValueError("ws must be at least 1 byte")
    return -(-ws // PAGE_SIZE) * PAGE_SIZE


def pass_sums(vcpu: int, ws: int = 1 << 20, seed: int = 0) -> Iterator[int]:
    """The sums vCPU ``vcpu`` computes for passes 1, 2, 3, ... (an endless iterator)."""
    if not 0 <= vcpu < 64:
        raise ValueError("vcpu must be 0..63")
    npages = working_set_bytes(ws) // PAGE_SIZE
    vbase = _mix64(_mix64(seed & _M64) ^ vcpu)
    # xmm8 = (a, b), the running mix; xmm9 = (k0, k1), constants for the whole run
    a = _mix64(vbase ^ 0x1111111111111111)
    b = _mix64(vbase ^ 0x2222222222222222)
    k0 = _mix64(vbase ^ 0x3333333333333333)
    k1 = _mix64(vbase ^ 0x4444444444444444)

    def update(a: int, b: int, v: int) -> tuple[int, int]:
        # per lane: rotl(((lane + v) ^ k), 13), then the two lanes swap
        return _rotl13(((b + v) & _M64) ^ k1), _rotl13(((a + v) & _M64) ^ k0)

    pass_no = 0
    while True:
        pass_no += 1
        hpass = _mix64(vbase ^ pass_no)
        hashes = [_mix64(hpass ^ p) for p in range(npages)]
        for h in hashes:  # the write phase: each page's hash, in page order
            a, b = update(a, b, h)
        for p, h in enumerate(hashes):  # the read-back phase: each page's CRC
            a, b = update(a, b, (p << 32) | _page_crc(h))
        yield a ^ b


def expected_lines(
    vcpu: int, passes: int, ws: int = 1 << 20, seed: int = 0, *, every: int = 1
) -> list[str]:
    """The lines (without newlines) vCPU ``vcpu`` prints for ``passes=N`` (N >= 1).

    ``ws`` and ``seed`` are the guest options of the same names (``ws`` in bytes), ``every``
    likewise (0: no pass lines). The banner, printed by vCPU 0 before everything else, is not
    part of the list: see :func:`banner`. Lines of different vCPUs interleave arbitrarily.
    """
    if passes < 1:
        raise ValueError("passes must be at least 1 (passes=0 runs forever: use pass_sums)")
    lines = []
    sums = pass_sums(vcpu, ws, seed)
    for n in range(1, passes + 1):
        total = next(sums)
        if every and n % every == 0:
            lines.append(f"vcpu={vcpu} pass={n} sum={total:016x}")
    lines.append(f"vcpu={vcpu} done")
    return lines


def banner(
    *,
    vcpus: int = 1,
    ws: int = 1 << 20,
    rate: int = 4096,
    passes: int = 0,
    seed: int = 0,
    hz: int = 100,
    every: int = 1,
    clock: str = "kvmclock",
    beat: int = 0,
    beatonly: bool = False,
) -> str:
    """The first line the guest prints (``clock`` is "kvmclock", "tsc" or "tsc-uncalibrated";
    ``beat=`` and ``beatonly=1`` appear only when the heartbeat is on)."""
    line = (
        f"vmipc-guest 1 vcpus={vcpus} ws={working_set_bytes(ws)} rate={rate} passes={passes}"
        f" seed={seed} hz={hz} every={every} clock={clock}"
    )
    if beat:
        line += f" beat={beat}" + (" beatonly=1" if beatonly else "")
    return line


def beat_line(number: int) -> str:
    """Heartbeat line ``number`` (from 1) of ``beat=N``, printed by vCPU 0 every N µs of guest
    time between its own lines (with ``beatonly=1``: instead of any work of its own). The
    beats are numbered as printed: a guest that continued exactly prints 1, 2, 3, ...
    without a gap or a repeat, whatever paused or moved it."""
    if number < 1:
        raise ValueError("beats count from 1")
    return f"vcpu=0 beat={number}"


# --- the disk workload (guest/virtio_blk.c; guest/README.md, "The disk workload") -----------

#: the guest writes the disk in blocks of this size; block b is at byte b * 4096
DISK_BLOCK_SIZE = 4096
DISK_MAGIC = b"VMIPCBLK"
_DISK_KEY = 0x6B736964  # "disk"
_DISK_WORDS = 507  # payload words, at bytes 32 .. 4087


def _block_key(seed: int, pass_no: int, block: int) -> int:
    return _mix64(_mix64(_mix64((seed ^ _DISK_KEY) & _M64) ^ pass_no) ^ block)


def disk_block(seed: int, pass_no: int, block: int) -> bytes:
    """The 4096 bytes the guest writes to ``block`` in pass ``pass_no``."""
    h = _block_key(seed, pass_no, block)
    head = DISK_MAGIC + struct.pack("<QQQ", pass_no, block, seed & _M64)
    words = struct.pack(f"<{_DISK_WORDS}Q", *(_mix64(h ^ j) for j in range(_DISK_WORDS)))
    body = head + words + bytes(4)
    return body + struct.pack("<I", zlib.crc32(body))


def disk_pass_sums(blocks: int = 64, seed: int = 0) -> Iterator[int]:
    """The sums the disk workload prints for passes 1, 2, 3, ... (endless)."""
    pass_no = 0
    while True:
        pass_no += 1
        total = _mix64((seed ^ pass_no) & _M64)
        for block in range(blocks):
            crc = int.from_bytes(disk_block(seed, pass_no, block)[4092:], "little")
            total = (total + _mix64((block << 32) | crc)) & _M64
        yield total


def disk_bad_lines() -> list[str]:
    """What ``disk=2`` prints before its passes: each bad request and what became of it
    (1 = VIRTIO_BLK_S_IOERR, 2 = UNSUPP, reset = the device asked for a reset)."""
    return [
        "vcpu=0 disk bad=outside-ram status=1",
        "vcpu=0 disk bad=length status=1",
        "vcpu=0 disk bad=past-end status=1",
        "vcpu=0 disk bad=type status=2",
        "vcpu=0 disk bad=loop status=reset",
    ]


def expected_disk_lines(
    passes: int, blocks: int = 64, seed: int = 0, *, every: int = 1, bad: bool = False
) -> list[str]:
    """The lines vCPU 0 prints with ``disk=1`` (``disk=2``: ``bad``) and ``passes=N``."""
    if passes < 1:
        raise ValueError("passes must be at least 1")
    lines = disk_bad_lines() if bad else []
    sums = disk_pass_sums(blocks, seed)
    for n in range(1, passes + 1):
        total = next(sums)
        if every and n % every == 0:
            lines.append(f"vcpu=0 disk pass={n} sum={total:016x}")
    lines.append("vcpu=0 done")
    return lines


@dataclass
class DiskImageCheck:
    """What :func:`check_disk_image` found."""

    #: the pass each stamped block holds, by block number
    passes: dict[int, int] = field(default_factory=dict)
    #: blocks still all zero (never written)
    blank: list[int] = field(default_factory=list)
    #: (block, why) of every block that is neither blank nor whole
    torn: list[tuple[int, str]] = field(default_factory=list)

    def consistent_with(self, last_printed: int) -> bool:
        """No torn block, and every stamped block is from the last pass printed or the one
        after it (the pass in progress)."""
        return not self.torn and all(
            last_printed <= p <= last_printed + 1 for p in self.passes.values()
        )


def check_disk_image(image: bytes, blocks: int = 64, seed: int = 0) -> DiskImageCheck:
    """Check the first ``blocks`` blocks of a disk image the workload wrote: each is blank
    or whole (magic, its own number, the seed, the checksum and the content of its pass)."""
    result = DiskImageCheck()
    for block in range(blocks):
        data = image[block * DISK_BLOCK_SIZE : (block + 1) * DISK_BLOCK_SIZE]
        if data == bytes(DISK_BLOCK_SIZE):
            result.blank.append(block)
            continue
        if len(data) != DISK_BLOCK_SIZE or data[:8] != DISK_MAGIC:
            result.torn.append((block, "no magic"))
            continue
        pass_no, number, _seed = struct.unpack_from("<QQQ", data, 8)
        if number != block or pass_no < 1 or data != disk_block(seed, pass_no, block):
            result.torn.append((block, f"not whole (says block {number}, pass {pass_no})"))
            continue
        result.passes[block] = pass_no
    return result

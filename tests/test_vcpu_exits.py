"""Typed vCPU exits: the pure decoder on hand-made kvm_run pages (table-driven), and a
real vCPU that makes every kind of I/O exit and takes the answers to its reads."""

from __future__ import annotations

import ctypes
import mmap
import struct

import pytest

from vmipc.kvm import (
    HLT,
    INTR,
    SHUTDOWN,
    FailEntry,
    Hlt,
    InternalError,
    Intr,
    IoIn,
    IoOut,
    Kvm,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    Unsupported,
    VcpuExit,
    decode_exit,
)
from vmipc.kvm.structs import KvmRun
from vmipc.vmm.iobus import MmioBus
from vmipc.vmm.vcpu import guest_stop

PAGE = 4096


def page(reason: int, union: bytes = b"", tail: tuple[int, bytes] | None = None) -> mmap.mmap:
    """A kvm_run page: ``reason`` at 8, ``union`` at 32, ``tail`` bytes at an offset."""
    run = mmap.mmap(-1, PAGE)
    struct.pack_into("<I", run, 8, reason)
    run[32 : 32 + len(union)] = union
    if tail is not None:
        offset, data = tail
        run[offset : offset + len(data)] = data
    return run


def words(first: int, data: list[int], ndata: int | None = None) -> bytes:
    count = len(data) if ndata is None else ndata
    return struct.pack("<II", first, count) + struct.pack(f"<{len(data)}Q", *data)


CASES: list[tuple[str, mmap.mmap, VcpuExit]] = [
    # IO: direction, size, port, count, data_offset
    (
        "out byte",
        page(2, struct.pack("<BBHIQ", 1, 1, 0x3F8, 1, 0x1000 - 64), None),
        IoOut(0x3F8, 1, b"\0"),
    ),
    (
        "rep outsw",
        page(2, struct.pack("<BBHIQ", 1, 2, 0x80, 3, 512), (512, b"abcdef")),
        IoOut(0x80, 2, b"abcdef"),
    ),
    ("in dword", page(2, struct.pack("<BBHIQ", 0, 4, 0xCFC, 1, 512)), IoIn(0xCFC, 4, 1)),
    ("rep insb", page(2, struct.pack("<BBHIQ", 0, 1, 0x60, 9, 512)), IoIn(0x60, 1, 9)),
    # MMIO: phys_addr, data[8], len, is_write
    (
        "mmio read",
        page(6, struct.pack("<Q8sIB", 0xFEB0_0010, b"\0" * 8, 4, 0)),
        MmioRead(0xFEB0_0010, 4),
    ),
    (
        "mmio write",
        page(6, struct.pack("<Q8sIB", 0xD000_0000, b"12345678", 2, 1)),
        MmioWrite(0xD000_0000, b"12"),
    ),
    ("mmio length beyond 8", page(6, struct.pack("<Q8sIB", 1, b"\0" * 8, 99, 0)), MmioRead(1, 8)),
    ("hlt", page(5), HLT),
    ("shutdown", page(8), SHUTDOWN),
    ("intr", page(10), INTR),
    ("internal error", page(17, words(1, [0x10, 0x20])), InternalError(1, (0x10, 0x20))),
    (
        "internal error, ndata too big",
        page(17, words(3, [0] * 16, ndata=1000)),
        InternalError(3, (0,) * 16),
    ),
    ("fail entry", page(9, struct.pack("<QI", 0x80000021, 1)), FailEntry(0x80000021, 1)),
    ("system event shutdown", page(24, words(1, [7])), SystemEvent(1, (7,))),
    ("system event, no data", page(24, words(2, [])), SystemEvent(2, ())),
    ("debug", page(4), Unsupported(4)),
    ("unknown number", page(9999), Unsupported(9999)),
]


@pytest.mark.parametrize(("run", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decode_exit(run: mmap.mmap, expected: VcpuExit) -> None:
    assert decode_exit(run) == expected
    assert type(decode_exit(run)) is type(expected)


def test_the_decoder_reads_the_kernels_layout() -> None:
    """The offsets the decoder unpacks are the ctypes mirror's (checked against the
    kernel's sizes elsewhere)."""
    run = mmap.mmap(-1, PAGE)
    mirror = KvmRun.from_buffer(run)
    mirror.exit_reason = 2
    mirror.exit.io.direction, mirror.exit.io.size, mirror.exit.io.port = 1, 2, 0x1234
    mirror.exit.io.count, mirror.exit.io.data_offset = 2, 256
    run[256:260] = b"\x01\x02\x03\x04"
    assert decode_exit(run) == IoOut(0x1234, 2, b"\x01\x02\x03\x04")
    mirror.exit_reason = 6
    mirror.exit.mmio.phys_addr, mirror.exit.mmio.len, mirror.exit.mmio.is_write = 0xABC, 1, 1
    mirror.exit.mmio.data[0] = 0x5A
    assert decode_exit(run) == MmioWrite(0xABC, b"\x5a")
    del mirror
    run.close()


def test_exits_without_fields_are_distinct_values() -> None:
    """Equality looks at the kind: a halt is not an interrupted run."""
    assert HLT != INTR and HLT != SHUTDOWN and INTR != SHUTDOWN
    assert Hlt() == HLT and Intr() == INTR and Shutdown() == SHUTDOWN
    assert MmioRead(1, 2) != FailEntry(1, 2)
    assert Unsupported(4).name == "DEBUG" and Unsupported(9999).name == "9999"


def test_mmio_bus_dispatches_ranges_and_refuses_overlaps() -> None:
    bus = MmioBus()
    seen: list[tuple[str, int, bytes]] = []
    bus.register(
        0x1000, 0x100, lambda o, n: bytes([o]) * n, lambda o, d: seen.append(("a", o, d)), "a"
    )
    bus.register(0x3000, 0x10, lambda o, n: b"\x01" * n, lambda o, d: seen.append(("b", o, d)), "b")
    assert bus.read(0x1010, 2) == b"\x10\x10"
    assert bus.read(0x3008, 8) == b"\x01" * 8
    assert bus.read(0x2000, 4) == b"\xff" * 4  # unclaimed
    assert bus.read(0x30FC, 8) == b"\xff" * 8  # past the end of b
    bus.write(0x10FF, b"z")
    bus.write(0x0FFF, b"y")  # unclaimed: dropped
    assert seen == [("a", 0xFF, b"z")]
    for base, length in ((0x10F0, 0x20), (0x0F00, 0x101), (0x2FFF, 2), (0x0, 0x10000)):
        with pytest.raises(ValueError, match="overlaps"):
            bus.register(base, length, lambda o, n: b"", lambda o, d: None, "c")
    bus.register(0x1100, 0x1F00, lambda o, n: b"\x02" * n, lambda o, d: None, "between")
    assert bus.read(0x1100, 1) == b"\x02"
    bad = MmioBus()
    bad.register(0, 8, lambda o, n: b"", lambda o, d: None, "short")
    with pytest.raises(ValueError, match="short answered a 4-byte read with 0 bytes"):
        bad.read(0, 4)


#: real mode at 0x1000: a port read and write, an MMIO read and write, a halt
PROGRAM = bytes.fromhex(
    "ba8000"  # mov dx, 0x80
    "ec"  # in al, dx
    "ba8100"  # mov dx, 0x81
    "ee"  # out dx, al
    "bb0020"  # mov bx, 0x2000
    "8edb"  # mov ds, bx          -> ds base 0x20000, outside the only memory slot
    "a00000"  # mov al, [0]      -> MMIO read at 0x20000
    "a20400"  # mov [4], al      -> MMIO write at 0x20004
    "ee"  # out dx, al
    "f4"  # hlt                   -> no in-kernel irqchip: a HLT exit
)


@pytest.mark.kvm
def test_a_real_vcpu_makes_typed_exits_and_takes_answers() -> None:
    ram = mmap.mmap(-1, 0x10000)
    ram[0x1000 : 0x1000 + len(PROGRAM)] = PROGRAM
    address = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    with Kvm() as kvm:
        vm = kvm.create_vm()
        vcpu = None
        try:
            vm.set_user_memory_region(0, 0, len(ram), address)
            vcpu = vm.create_vcpu(0)
            sregs = vcpu.get_sregs()
            sregs.cs.base, sregs.cs.selector = 0, 0
            vcpu.set_sregs(sregs)
            regs = vcpu.get_regs()
            regs.rip, regs.rflags = 0x1000, 0x2
            vcpu.set_regs(regs)

            def run() -> VcpuExit:
                assert vcpu is not None
                exit = vcpu.run()
                while exit is INTR:
                    exit = vcpu.run()
                return exit

            assert run() == IoIn(0x80, 1, 1)
            with pytest.raises(ValueError, match="a port read of 1 bytes cannot take 2"):
                vcpu.complete_io_in(b"\x41\x42")
            vcpu.complete_io_in(b"\x41")
            assert run() == IoOut(0x81, 1, b"\x41")
            assert run() == MmioRead(0x20000, 1)
            vcpu.complete_mmio_read(b"\x5a")
            assert run() == MmioWrite(0x20004, b"\x5a")
            assert run() == IoOut(0x81, 1, b"\x5a")
            assert run() is HLT
        finally:
            if vcpu is not None:
                vcpu.close()
            vm.close()
    ram.close()


@pytest.mark.parametrize(
    ("exit", "crashed", "reason"),
    [
        (SHUTDOWN, True, "triple fault (shutdown) on vcpu 3"),
        (
            InternalError(1, (0x10, 0x20)),
            True,
            "KVM internal error on vcpu 3: suberror 1 (instruction emulation failed) "
            "data 0x10 0x20",
        ),
        (InternalError(9, ()), True, "KVM internal error on vcpu 3: suberror 9 (unknown)"),
        (FailEntry(0x21, 0), True, "VM entry failed on vcpu 3: hardware reason 0x21"),
        (SystemEvent(1, ()), False, "guest shut down (system event) on vcpu 3"),
        (SystemEvent(2, ()), False, "guest asked for a reset on vcpu 3"),
        (SystemEvent(3, ()), True, "guest system event 3 on vcpu 3"),
        (Unsupported(1), True, "unhandled KVM exit EXCEPTION on vcpu 3"),
    ],
)
def test_exits_the_guest_cannot_go_on_from(exit: VcpuExit, crashed: bool, reason: str) -> None:
    stop = guest_stop(exit, 3)
    assert (stop.crashed, stop.reason) == (crashed, reason)

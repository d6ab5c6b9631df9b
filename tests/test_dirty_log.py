"""The dirty log without KVM: the bitmap -> page-range function (table-driven), and
DirtyLog's epochs, takes and queries over a scripted KVM log and real guest RAM."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest

from vmipc.memory_layout import GIB, MIB, PAGE_SIZE
from vmipc.vmm.dirtylog import (
    DirtyCount,
    DirtyLog,
    DirtyLogMoved,
    DirtyLogOff,
    DirtyPages,
    PageRange,
    page_ranges,
)
from vmipc.vmm.memory import GuestMemory

R = PageRange


def bits(*pages: int, nbytes: int = 8) -> bytes:
    value = 0
    for page in pages:
        value |= 1 << page
    return value.to_bytes(nbytes, "little")


@pytest.mark.parametrize(
    ("bitmap", "npages", "ranges"),
    [
        (b"", 0, ()),
        (bytes(8), 64, ()),
        (bits(0), 64, (R(0, 1),)),
        (bits(63), 64, (R(63, 1),)),
        (bits(0, 1, 2, 5), 64, (R(0, 3), R(5, 1))),
        (b"\xff" * 8, 64, (R(0, 64),)),
        # only the first npages bits count: a slot's last word may be longer than it
        (b"\xff" * 8, 10, (R(0, 10),)),
        (bits(3, 9), 8, (R(3, 1),)),
        (bits(9), 9, ()),
        # across a 64-bit word
        (bits(62, 63, 64, 65, nbytes=16), 128, (R(62, 4),)),
        (bits(0, 127, nbytes=16), 128, (R(0, 1), R(127, 1))),
        # across the 512-byte blocks the fast paths look at
        (bits(4095, 4096, nbytes=1024), 8192, (R(4095, 2),)),
        (bytes(512) + b"\xff" * 512, 8192, (R(4096, 4096),)),
        (b"\xaa" * 8, 64, tuple(R(i, 1) for i in range(1, 64, 2))),
    ],
)
def test_page_ranges(bitmap: bytes, npages: int, ranges: tuple[PageRange, ...]) -> None:
    found = page_ranges(bitmap, npages)
    assert found == ranges
    assert all(type(item) is PageRange for item in found)


def test_page_ranges_refuses_more_pages_than_bits() -> None:
    with pytest.raises(ValueError):
        page_ranges(bytes(8), 65)


class ScriptedKvmLog:
    """Stands in for Vm.get_dirty_log: reports the pages :meth:`dirty` marked, once."""

    def __init__(self) -> None:
        self.pending: dict[int, set[int]] = {}
        self.logging: list[bool] = []

    def dirty(self, slot: int, *pages: int) -> None:
        self.pending.setdefault(slot, set()).update(pages)

    def get_dirty_log(self, slot: int, words: ctypes.Array[ctypes.c_uint64]) -> None:
        for page in self.pending.pop(slot, ()):
            words[page // 64] |= 1 << (page % 64)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    # two slots: 3 GiB below the hole and 16 MiB above it (a sparse memfd)
    ram = GuestMemory(3 * GIB + 16 * MIB)
    yield ram
    ram.close()


@pytest.fixture
def kvm() -> ScriptedKvmLog:
    return ScriptedKvmLog()


@pytest.fixture
def log(memory: GuestMemory, kvm: ScriptedKvmLog) -> DirtyLog:
    return DirtyLog(memory, kvm.get_dirty_log, kvm.logging.append)


def test_off_until_started(log: DirtyLog) -> None:
    assert not log.running
    for call in (log.query, log.take, log.fetch):
        with pytest.raises(DirtyLogOff, match="dirty logging is off"):
            call()


def test_start_is_idempotent_and_stop_turns_slot_logging_off(
    log: DirtyLog, kvm: ScriptedKvmLog
) -> None:
    epoch = log.start()
    assert log.start() == epoch
    assert kvm.logging == [True]
    log.stop()
    log.stop()
    assert kvm.logging == [True, False]
    assert not log.running
    assert log.start() != epoch  # a restart counts afresh


def test_a_take_returns_kvm_and_vmm_writes_per_slot_and_resets(
    log: DirtyLog, kvm: ScriptedKvmLog, memory: GuestMemory
) -> None:
    first = log.start()
    kvm.dirty(0, 0, 1, 2, 10)
    kvm.dirty(1, 4095)  # the last page of the 16 MiB slot
    memory.write(3 * PAGE_SIZE, b"x")  # the VMM's own write, which KVM cannot see
    memory.write(4 * GIB, b"y" * (PAGE_SIZE + 1))  # two pages of slot 1
    taken = log.take()
    assert taken == DirtyPages(
        slots=((R(0, 4), R(10, 1)), (R(0, 2), R(4095, 1))), epoch=taken.epoch
    )
    assert taken.pages == 8
    assert taken.epoch != first
    again = log.take()
    assert again.slots == ((), ())
    assert again.epoch not in (first, taken.epoch)


def test_a_query_counts_without_taking(log: DirtyLog, kvm: ScriptedKvmLog) -> None:
    epoch = log.start()
    kvm.dirty(0, 5, 6)
    assert log.query() == DirtyCount(2, epoch)
    kvm.dirty(0, 6, 7)  # what KVM reports after a query adds to what it reported before
    assert log.query() == DirtyCount(3, epoch)
    assert log.take(epoch).slots == ((R(5, 3),), ())


def test_a_take_for_another_epoch_takes_nothing(log: DirtyLog, kvm: ScriptedKvmLog) -> None:
    epoch = log.start()
    kvm.dirty(0, 1)
    with pytest.raises(DirtyLogMoved) as info:
        log.take("0123456789abcdef")
    assert (info.value.expected, info.value.current) == ("0123456789abcdef", epoch)
    assert "nothing" not in str(info.value)  # the command adds what it did (nothing)
    assert log.take(epoch).slots == ((R(1, 1),), ())


def test_fetch_returns_the_raw_bitmaps(log: DirtyLog, kvm: ScriptedKvmLog) -> None:
    log.start()
    kvm.dirty(0, 64)
    low, high = log.fetch()
    assert len(low) == 3 * GIB // PAGE_SIZE // 8
    assert len(high) == 16 * MIB // PAGE_SIZE // 8
    assert low[:9] == bits(64, nbytes=9) and not any(low[9:]) and not any(high)
    assert log.take().slots == ((), ())  # a fetch resets what it fetched

"""The virtio-blk device model driven from Python through its registers and a split
virtqueue in guest RAM (no vCPU needed): requests, hostile descriptors, quiesce, and its
state record. The guest's own driver is tested on real KVM in test_virtio_blk_guest.py."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest

from vmipc.memory_layout import MIN_MEMORY
from vmipc.vmm.devices import DiskImage, VirtioBlk, VirtioBlkState
from vmipc.vmm.devices.virtio_blk import (
    D_NEXT,
    D_WRITE,
    F_DISCARD,
    F_FLUSH,
    F_RO,
    F_VERSION_1,
    F_WRITE_ZEROES,
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG,
    QUEUE_SIZE_MAX,
    RANGE_UNMAP,
    S_NEEDS_RESET,
    ST_IOERR,
    ST_OK,
    ST_UNSUPP,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
)
from vmipc.vmm.memory import GuestMemory

DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000
DATA = 0x20000
SECTORS = 64


class Irq:
    def __init__(self) -> None:
        self.levels: list[int] = []

    def __call__(self, level: int) -> None:
        self.levels.append(level)


class Driver:
    """A minimal virtio-mmio driver over a VirtioBlk, with RAM as its DMA space."""

    def __init__(self, dev: VirtioBlk, memory: GuestMemory, num: int = 8) -> None:
        self.dev, self.mem, self.num = dev, memory, num
        self.avail_idx = 0
        self.used_seen = 0

    def r32(self, offset: int) -> int:
        return int.from_bytes(self.dev.mmio_read(offset, 4), "little")

    def w32(self, offset: int, value: int) -> None:
        self.dev.mmio_write(offset, value.to_bytes(4, "little"))

    def setup(self, features: int = F_VERSION_1 | F_FLUSH) -> None:
        assert self.r32(0) == 0x74726976 and self.r32(4) == 2 and self.r32(8) == 2
        self.w32(0x70, 0)
        self.w32(0x70, 1 | 2)
        self.w32(0x24, 1)
        self.w32(0x20, features >> 32)
        self.w32(0x24, 0)
        self.w32(0x20, features & 0xFFFFFFFF)
        self.w32(0x70, 1 | 2 | 8)
        assert self.r32(0x70) & 8
        self.w32(0x30, 0)
        assert self.r32(0x34) == QUEUE_SIZE_MAX
        self.w32(0x38, self.num)
        for reg, addr in ((0x80, DESC), (0x90, AVAIL), (0xA0, USED)):
            self.w32(reg, addr)
            self.w32(reg + 4, 0)
        self.w32(0x44, 1)
        self.w32(0x70, 1 | 2 | 8 | 4)
        self.avail_idx = 0
        self.used_seen = 0

    def desc(self, index: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.mem.write(DESC + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def offer(self, head: int) -> None:
        slot = AVAIL + 4 + 2 * (self.avail_idx % self.num)
        self.mem.write(slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def notify(self) -> None:
        self.w32(0x50, 0)

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.mem.read(USED + 2, 2))[0])

    def wait_used(self, count: int = 1) -> list[tuple[int, int]]:
        deadline = time.monotonic() + 10
        while (self.used_idx() - self.used_seen) & 0xFFFF < count:
            assert time.monotonic() < deadline, "the device never completed the request"
            time.sleep(0.001)
        out = []
        for _ in range(count):
            slot = USED + 4 + 8 * (self.used_seen % self.num)
            out.append(struct.unpack("<II", self.mem.read(slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def request(
        self, kind: int, sector: int, data_len: int, *, write_data: bytes | None = None
    ) -> tuple[int, int]:
        """One request in descriptors 0 (header), 1 (data), 2 (status); its status and
        used length."""
        header = DATA
        buffer = DATA + 0x1000
        status = DATA + 0x800
        self.mem.write(header, struct.pack("<IIQ", kind, 0, sector))
        self.mem.write(status, b"\xee")
        if write_data is not None:
            self.mem.write(buffer, write_data)
        self.desc(0, header, 16, D_NEXT, 1)
        if data_len:
            flags = D_NEXT | (0 if kind == T_OUT else D_WRITE)
            self.desc(1, buffer, data_len, flags, 2)
            self.desc(2, status, 1, D_WRITE)
        else:
            self.desc(0, header, 16, D_NEXT, 2)
            self.desc(2, status, 1, D_WRITE)
        self.offer(0)
        self.notify()
        ((_head, length),) = self.wait_used()
        return self.mem.read(status, 1)[0], length


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory(MIN_MEMORY)
    try:
        yield ram
    finally:
        ram.close()


def make_disk(tmp_path: Path, *, readonly: bool = False, sectors: int = SECTORS) -> DiskImage:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (sectors * 2))
    return DiskImage.open(str(path), readonly=readonly)


@pytest.fixture
def rig(tmp_path: Path, memory: GuestMemory) -> Iterator[tuple[VirtioBlk, Driver, DiskImage, Irq]]:
    disk = make_disk(tmp_path)
    irq = Irq()
    dev = VirtioBlk(memory, disk, irq)
    try:
        driver = Driver(dev, memory)
        driver.setup()
        yield dev, driver, disk, irq
    finally:
        dev.close()
        disk.close()


def test_read_write_flush_get_id(rig: tuple[VirtioBlk, Driver, DiskImage, Irq]) -> None:
    _dev, driver, disk, irq = rig
    assert driver.r32(0x100) == SECTORS  # capacity, low word
    assert driver.request(T_IN, 1, 512) == (ST_OK, 513)
    assert driver.mem.read(DATA + 0x1000, 512) == os.pread(disk.fd, 512, 512)
    assert irq.levels == [1] and driver.r32(0x60) == 1
    driver.w32(0x64, 1)  # ack lowers the line
    assert irq.levels == [1, 0]
    payload = bytes([7]) * 1024
    assert driver.request(T_OUT, SECTORS - 2, 1024, write_data=payload) == (ST_OK, 1)
    assert os.pread(disk.fd, 1024, (SECTORS - 2) * 512) == payload
    assert driver.request(T_FLUSH, 0, 0) == (ST_OK, 1)
    assert driver.request(T_GET_ID, 0, 20)[0] == ST_OK
    assert driver.mem.read(DATA + 0x1000, 20).rstrip(b"\0") == b"vmipc-virtio-blk"


@pytest.mark.parametrize(
    ("kind", "sector", "length", "status"),
    [
        (T_IN, SECTORS, 512, ST_IOERR),  # the sector past the end
        (T_IN, SECTORS - 1, 1024, ST_IOERR),  # runs past the end
        (T_IN, 2**64 - 1, 512, ST_IOERR),  # wraps around
        (T_IN, 0, 100, ST_IOERR),  # not whole sectors
        (T_OUT, 0, 513, ST_IOERR),
        (T_IN, 0, 64 << 20, ST_IOERR),  # more than a request may move (and than RAM)
        (99, 0, 512, ST_UNSUPP),
    ],
)
def test_bad_requests_get_an_error_status(
    rig: tuple[VirtioBlk, Driver, DiskImage, Irq], kind: int, sector: int, length: int, status: int
) -> None:
    _dev, driver, _disk, _irq = rig
    assert driver.request(kind, sector, length, write_data=None)[0] == status
    assert driver.request(T_IN, 0, 512) == (ST_OK, 513)  # and the device goes on


def test_buffers_outside_ram_get_an_error_status(
    rig: tuple[VirtioBlk, Driver, DiskImage, Irq],
) -> None:
    dev, driver, _disk, _irq = rig
    for addr in (MIN_MEMORY - 256, 0xFEE00000, 2**64 - 512):
        driver.mem.write(DATA, struct.pack("<IIQ", T_IN, 0, 0))
        driver.desc(0, DATA, 16, D_NEXT, 1)
        driver.desc(1, addr, 512, D_NEXT | D_WRITE, 2)
        driver.desc(2, DATA + 0x800, 1, D_WRITE)
        driver.offer(0)
        driver.notify()
        driver.wait_used()
        assert driver.mem.read(DATA + 0x800, 1)[0] == ST_IOERR
    # a header outside RAM, and a header that is device-writable
    for addr, flags in ((2**63, D_NEXT), (DATA, D_NEXT | D_WRITE)):
        driver.desc(0, addr, 16, flags, 2)
        driver.desc(2, DATA + 0x800, 1, D_WRITE)
        driver.offer(0)
        driver.notify()
        driver.wait_used()
        assert driver.mem.read(DATA + 0x800, 1)[0] == ST_IOERR
    assert dev.refused == 5
    assert not driver.r32(0x70) & S_NEEDS_RESET


def test_a_readonly_disk_refuses_writes_and_is_never_flushed(
    tmp_path: Path, memory: GuestMemory
) -> None:
    disk = make_disk(tmp_path, readonly=True)
    dev = VirtioBlk(memory, disk, Irq())
    try:
        driver = Driver(dev, memory)
        driver.w32(0x14, 0)
        assert driver.r32(0x10) & F_RO
        driver.setup(F_VERSION_1 | F_RO)
        before = os.pread(disk.fd, 512, 0)
        assert driver.request(T_OUT, 0, 512, write_data=bytes(512))[0] == ST_IOERR
        assert os.pread(disk.fd, 512, 0) == before
        assert driver.request(T_FLUSH, 0, 0)[0] == ST_OK
        dev.flush()  # no fdatasync on an O_RDONLY fd: it would not fail, but nothing to do
    finally:
        dev.close()
        disk.close()


@pytest.mark.parametrize("breakage", ["loop", "next", "head", "ahead", "nostatus", "ring"])
def test_a_broken_queue_needs_a_reset_and_nothing_escapes(
    rig: tuple[VirtioBlk, Driver, DiskImage, Irq], breakage: str
) -> None:
    dev, driver, _disk, irq = rig
    driver.mem.write(DATA, struct.pack("<IIQ", T_IN, 0, 0))
    if breakage == "loop":
        driver.desc(0, DATA, 16, D_NEXT, 1)
        driver.desc(1, DATA + 0x1000, 512, D_NEXT | D_WRITE, 0)
        driver.offer(0)
    elif breakage == "next":
        driver.desc(0, DATA, 16, D_NEXT, 200)
        driver.offer(0)
    elif breakage == "head":
        driver.offer(9)
    elif breakage == "ahead":
        driver.mem.write(AVAIL + 2, struct.pack("<H", 100))
    elif breakage == "nostatus":
        driver.desc(0, DATA, 16, D_NEXT, 1)
        driver.desc(1, DATA + 0x1000, 512, 0)  # the last one is not writable
        driver.offer(0)
    else:
        driver.w32(0x70, 0)
        driver.setup()
        dev.mmio_write(0x44, (0).to_bytes(4, "little"))
        driver.w32(0xA0, MIN_MEMORY - 8)  # the used ring runs off RAM
        driver.w32(0x44, 1)
        driver.offer(0)
    driver.notify()
    deadline = time.monotonic() + 10
    while not driver.r32(0x70) & S_NEEDS_RESET:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert driver.r32(0x60) & 2 and irq.levels[-1] == 1  # a configuration-change interrupt
    driver.w32(0x64, 3)
    driver.setup()  # a reset brings it back
    assert driver.request(T_IN, 0, 512) == (ST_OK, 513)


def test_quiesce_completes_every_request_taken_and_takes_no_more(
    rig: tuple[VirtioBlk, Driver, DiskImage, Irq],
) -> None:
    dev, driver, _disk, _irq = rig
    driver.mem.write(DATA, struct.pack("<IIQ", T_IN, 0, 0))
    for head in range(0, 8, 2):
        driver.desc(head, DATA, 16, D_NEXT, head + 1)
        driver.desc(head + 1, DATA + 0x800 + head, 1, D_WRITE)
    stop = threading.Event()

    def guest() -> None:
        while not stop.is_set():
            if (driver.avail_idx - driver.used_idx()) & 0xFFFF < 4:
                driver.offer(2 * (driver.avail_idx % 4))
                driver.notify()

    thread = threading.Thread(target=guest)
    thread.start()
    try:
        for _ in range(20):
            time.sleep(0.005)
            dev.quiesce()
            used = driver.used_idx()
            state = dev.save()
            assert state.used_idx == used == state.last_avail  # nothing half done
            time.sleep(0.005)
            assert driver.used_idx() == used  # and nothing taken while quiesced
            dev.resume()
    finally:
        stop.set()
        thread.join()


def test_the_record_round_trips_and_restores(
    rig: tuple[VirtioBlk, Driver, DiskImage, Irq], memory: GuestMemory
) -> None:
    dev, driver, disk, _irq = rig
    driver.request(T_IN, 0, 512)
    dev.quiesce()
    state = dev.save()
    record = msgpack.unpackb(msgpack.packb(state.to_dict()), raw=False)
    assert VirtioBlkState.from_dict(record) == state
    assert state.disk_sectors == SECTORS and state.queue_ready and state.used_idx == 1
    again = VirtioBlk.restore(state, memory, disk, Irq())
    try:
        assert again.save() == state
        again.resume()
        driver.dev = again
        assert driver.request(T_IN, 2, 512) == (ST_OK, 513)
    finally:
        again.close()


def test_hostile_records_are_refused(
    rig: tuple[VirtioBlk, Driver, DiskImage, Irq], tmp_path: Path, memory: GuestMemory
) -> None:
    dev, driver, _disk, _irq = rig
    driver.request(T_IN, 0, 512)
    dev.quiesce()
    record = dev.save().to_dict()
    for key, value in [
        ("queue_num", 3),  # not a power of two
        ("queue_num", 512),
        ("used_idx", 7),  # requests in flight
        ("status", 0x30),
        ("driver_features", 1 << 40),
        ("last_avail", 1 << 16),
        ("queue_desc", -1),
        ("readonly", 2),
        ("disk_sectors", "64"),
        ("version", 3),
        ("disk_fingerprint", -1),
        ("disk_fingerprint", 1 << 64),
        ("disk_fingerprint", b"12345678"),
    ]:
        bad = dict(record, **{key: value})
        with pytest.raises(ValueError):
            VirtioBlkState.from_dict(bad)
    with pytest.raises(ValueError):
        VirtioBlkState.from_dict({**record, "extra": 1})
    state = VirtioBlkState.from_dict(record)
    other = make_disk(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path, sectors=8)
    try:
        assert "bytes" in (state.disk_mismatch(other) or "")
        assert state.disk_mismatch(other, accept_disk=True) is None
        # the same disk is the machine's check (which may be told to accept another);
        # the restore constructor refuses what can never fit: no disk, another mode
        with pytest.raises(ValueError, match="sectors"):
            VirtioBlk.restore(state, memory, None, Irq())
        assert state.disk_mismatch(None) is not None
    finally:
        other.close()


# --- discard and write-zeroes ---------------------------------------------------------------

DISCARD_SECTORS = 2048  # 1 MiB: whole file-system blocks to give back
RANGES = DATA + 0x3000


def _ranges_request(
    driver: Driver, kind: int, ranges: list[tuple[int, int, int]], *, writable: bool = False
) -> int:
    """A discard or write-zeroes request with ``ranges`` (sector, count, flags) in one
    buffer; its status."""
    header, status = DATA, DATA + 0x800
    raw = b"".join(struct.pack("<QII", *r) for r in ranges)
    driver.mem.write(header, struct.pack("<IIQ", kind, 0, 0))
    driver.mem.write(status, b"\xee")
    driver.mem.write(RANGES, raw)
    driver.desc(0, header, 16, D_NEXT, 1)
    driver.desc(1, RANGES, len(raw), D_NEXT | (D_WRITE if writable else 0), 2)
    driver.desc(2, status, 1, D_WRITE)
    driver.offer(0)
    driver.notify()
    driver.wait_used()
    return driver.mem.read(status, 1)[0]


def _holes(fd: int, offset: int, length: int) -> bool:
    """Whether fd[offset:offset+length] is all hole (no data extent starts before its end)."""
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError:
        return True  # ENXIO: only a hole up to the end
    return data >= offset + length


@pytest.fixture
def discard_rig(
    tmp_path: Path, memory: GuestMemory
) -> Iterator[tuple[VirtioBlk, Driver, DiskImage, Path]]:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(DISCARD_SECTORS * 512))
    os.sync()
    disk = DiskImage.open(str(path))
    dev = VirtioBlk(memory, disk, Irq())
    try:
        driver = Driver(dev, memory)
        driver.setup(F_VERSION_1 | F_FLUSH | F_DISCARD | F_WRITE_ZEROES)
        yield dev, driver, disk, path
    finally:
        dev.close()
        disk.close()


def test_discard_and_write_zeroes_read_back_as_zeros_and_punch_holes(
    discard_rig: tuple[VirtioBlk, Driver, DiskImage, Path],
) -> None:
    _dev, driver, disk, path = discard_rig
    # the config space: max_discard_sectors, max_discard_seg, alignment, max_write_zeroes
    # sectors and segments, write_zeroes_may_unmap
    config = b"".join(driver.dev.mmio_read(0x100 + at, 4) for at in range(0, 60, 4))
    assert struct.unpack_from("<IIIIIB", config, 36) == (
        MAX_DISCARD_SECTORS,
        MAX_DISCARD_SEG,
        8,
        MAX_DISCARD_SECTORS,
        MAX_DISCARD_SEG,
        1,
    )
    before = path.read_bytes()
    blocks_before = os.stat(path).st_blocks
    # discard two ranges of 128 KiB (one request), write-zeroes (unmap) and (keep) another
    ranges = [(256, 256, 0), (1024, 256, 0)]
    assert _ranges_request(driver, T_DISCARD, ranges) == ST_OK
    assert _ranges_request(driver, T_WRITE_ZEROES, [(1536, 256, RANGE_UNMAP)]) == ST_OK
    assert _ranges_request(driver, T_WRITE_ZEROES, [(1792, 128, 0)]) == ST_OK
    after = path.read_bytes()
    zeroed = {(256, 256), (1024, 256), (1536, 256), (1792, 128)}
    for sector in range(0, DISCARD_SECTORS, 128):
        chunk = slice(sector * 512, (sector + 128) * 512)
        inside = any(s <= sector < s + n for s, n in zeroed)
        assert after[chunk] == (bytes(128 * 512) if inside else before[chunk]), sector
    # the guest reads zeros too
    assert driver.request(T_IN, 300, 4096) == (ST_OK, 4097)
    assert driver.mem.read(DATA + 0x1000, 4096) == bytes(4096)
    # the discarded ranges (and write-zeroes with unmap) are holes now
    for sector, count in ((256, 256), (1024, 256), (1536, 256)):
        assert _holes(disk.fd, sector * 512, count * 512), sector
    assert not _holes(disk.fd, 0, 256 * 512)
    # 3 x 128 KiB given back (in 512-byte st_blocks), less what the extent tree took
    assert os.stat(path).st_blocks <= blocks_before - 3 * 256 + 32


@pytest.mark.parametrize(
    ("kind", "ranges", "writable", "status"),
    [
        (T_DISCARD, [(DISCARD_SECTORS - 8, 16, 0)], False, ST_IOERR),  # past the end
        (T_DISCARD, [(2**64 - 8, 16, 0)], False, ST_IOERR),  # wraps around
        (T_DISCARD, [(0, 8, 0), (DISCARD_SECTORS, 8, 0)], False, ST_IOERR),  # 2nd is bad
        (T_DISCARD, [(0, MAX_DISCARD_SECTORS + 1, 0)], False, ST_IOERR),
        (T_DISCARD, [(0, 8, 0)] * (MAX_DISCARD_SEG + 1), False, ST_IOERR),
        (T_DISCARD, [(0, 8, 0)], True, ST_IOERR),  # ranges the device would write
        (T_DISCARD, [(0, 8, RANGE_UNMAP)], False, ST_UNSUPP),  # unmap is for write-zeroes
        (T_WRITE_ZEROES, [(0, 8, 2)], False, ST_UNSUPP),  # an unknown flag
        (T_WRITE_ZEROES, [(0, 8, 0), (0, 8, 4)], False, ST_UNSUPP),
    ],
)
def test_bad_discards_get_an_error_status_and_change_nothing(
    discard_rig: tuple[VirtioBlk, Driver, DiskImage, Path],
    kind: int,
    ranges: list[tuple[int, int, int]],
    writable: bool,
    status: int,
) -> None:
    _dev, driver, _disk, path = discard_rig
    before = path.read_bytes()
    assert _ranges_request(driver, kind, ranges, writable=writable) == status
    assert path.read_bytes() == before
    assert driver.request(T_IN, 0, 512) == (ST_OK, 513)  # and the device goes on


def test_a_range_buffer_of_odd_length_or_outside_ram_is_refused(
    discard_rig: tuple[VirtioBlk, Driver, DiskImage, Path],
) -> None:
    _dev, driver, _disk, path = discard_rig
    before = path.read_bytes()
    header, status = DATA, DATA + 0x800
    driver.mem.write(header, struct.pack("<IIQ", T_DISCARD, 0, 0))
    for addr, length in ((RANGES, 15), (RANGES, 0), (0xF000_0000, 16)):
        driver.mem.write(status, b"\xee")
        driver.desc(0, header, 16, D_NEXT, 1)
        driver.desc(1, addr, length, D_NEXT, 2)
        driver.desc(2, status, 1, D_WRITE)
        driver.offer(0)
        driver.notify()
        driver.wait_used()
        assert driver.mem.read(status, 1)[0] == ST_IOERR, (addr, length)
    assert path.read_bytes() == before


def test_discard_is_not_offered_nor_done_on_a_readonly_disk_nor_unnegotiated(
    tmp_path: Path, memory: GuestMemory
) -> None:
    disk = make_disk(tmp_path, readonly=True)
    dev = VirtioBlk(memory, disk, Irq())
    try:
        driver = Driver(dev, memory)
        offered = driver.r32(0x10)
        assert not offered & (F_DISCARD | F_WRITE_ZEROES)
        driver.setup()
        before = Path(tmp_path / "disk.img").read_bytes()
        assert _ranges_request(driver, T_DISCARD, [(0, 8, 0)]) == ST_IOERR
        assert _ranges_request(driver, T_WRITE_ZEROES, [(0, 8, 0)]) == ST_IOERR
        assert Path(tmp_path / "disk.img").read_bytes() == before
    finally:
        dev.close()
        disk.close()
    disk = make_disk(tmp_path)
    dev = VirtioBlk(memory, disk, Irq())
    try:
        memory.write(USED, bytes(4096))  # the first device's used entries
        driver = Driver(dev, memory)
        assert driver.r32(0x10) & (F_DISCARD | F_WRITE_ZEROES)
        driver.setup()  # VERSION_1 and FLUSH only
        assert _ranges_request(driver, T_DISCARD, [(0, 8, 0)]) == ST_UNSUPP
        assert _ranges_request(driver, T_WRITE_ZEROES, [(0, 8, 0)]) == ST_UNSUPP
    finally:
        dev.close()
        disk.close()


@pytest.mark.kvm
def test_discard_and_write_zeroes_work_in_the_sandbox(tmp_path: Path) -> None:
    """The worker's fallocate calls are allowed in capability mode (the VMM's sandbox):
    the device, built before it as the VMM builds it, discards and zeroes inside it."""
    from tests.test_sandbox import in_sandboxed_child

    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(DISCARD_SECTORS * 512))
    parts: dict[str, object] = {}

    def before() -> None:
        memory = GuestMemory(MIN_MEMORY)
        disk = DiskImage.open(str(path))
        dev = VirtioBlk(memory, disk, Irq())
        driver = Driver(dev, memory)
        driver.setup(F_VERSION_1 | F_FLUSH | F_DISCARD | F_WRITE_ZEROES)
        parts.update(driver=driver, disk=disk)

    def body() -> list[int]:
        driver = parts["driver"]
        disk = parts["disk"]
        assert isinstance(driver, Driver) and isinstance(disk, DiskImage)
        return [
            _ranges_request(driver, T_DISCARD, [(256, 256, 0)]),
            _ranges_request(driver, T_WRITE_ZEROES, [(1024, 256, 0)]),
            _ranges_request(driver, T_WRITE_ZEROES, [(1536, 256, RANGE_UNMAP)]),
            int(_holes(disk.fd, 256 * 512, 256 * 512)),
        ]

    assert in_sandboxed_child(body, before=before) == [ST_OK, ST_OK, ST_OK, 1]
    after = path.read_bytes()
    for sector in (256, 1024, 1536):
        assert after[sector * 512 : (sector + 256) * 512] == bytes(256 * 512)

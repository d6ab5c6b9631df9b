"""A virtio block device over virtio-mmio (virtio 1.x, "modern" transport, version 2),
with one split virtqueue, backed by a :class:`~vmipc.vmm.devices.disk.DiskImage`.

Where it sits: registers at :data:`VIRTIO_BLK_MMIO_BASE` (4 KiB, in the hole below
4 GiB, where Firecracker puts its first virtio-mmio device) and interrupt
:data:`VIRTIO_BLK_IRQ` (ISA line 5, driven with ``KVM_IRQ_LINE`` on the in-kernel PIC and
IOAPIC, level-triggered: high while InterruptStatus is not zero). A machine without a disk
still has the registers, with DeviceID 0 ("no device": virtio-mmio's placeholder), so the
machine's device set — and its state record — do not depend on the disk.

Threads: the vCPU threads only touch registers; a notify (QueueNotify) wakes the
device's worker thread, which takes requests from the available ring, runs them with
pread/pwrite/fdatasync on the image fd, writes the used ring and raises the interrupt.
:meth:`VirtioBlk.quiesce` stops the worker taking requests and returns once every request
it took has completed and its used entry is written (pause drains);
:meth:`VirtioBlk.resume` lets it go on, and it looks at the available ring again then
(requests the guest queued before a pause or a snapshot).

Every value the guest gives is hostile: a request whose buffers lie outside RAM, with
wrong lengths, past the end of the disk, of an unknown type, or writing a read-only disk
completes with an error status (IOERR or UNSUPP); a broken queue — a ring outside RAM, an
index out of range, a descriptor chain longer than the queue (a loop), an available index
that ran ahead by more than the queue size, a request with nowhere to put its status —
sets DEVICE_NEEDS_RESET and the device does nothing more until the driver resets it.
Nothing the guest does raises out of the device.

Discard and write-zeroes (VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES; writable disks
only): every range of a request is checked before any is touched; a discard punches a
hole (``fallocate(PUNCH_HOLE|KEEP_SIZE)``), so the range reads as zeros and the image
gives its blocks back; write-zeroes zeroes the range in place (``FALLOC_FL_ZERO_RANGE``),
or punches a hole when the driver allows unmapping. Where the image's file system cannot,
a discard does nothing (it is a hint) and write-zeroes writes zeros.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

from vmipc.errors import VmipcError
from vmipc.vmm.devices.disk import SECTOR_SIZE, DiskImage, fallocate

if TYPE_CHECKING:
    from vmipc.vmm.memory import GuestMemory

__all__ = [
    "QUEUE_SIZE_MAX",
    "VIRTIO_BLK_IRQ",
    "VIRTIO_BLK_MMIO_BASE",
    "VIRTIO_BLK_MMIO_SIZE",
    "VirtioBlk",
    "VirtioBlkState",
]

log = logging.getLogger("vmipc.vmm")

#: guest-physical address of the registers, and their size (4 KiB)
VIRTIO_BLK_MMIO_BASE = 0xD000_0000
VIRTIO_BLK_MMIO_SIZE = 0x1000
#: the ISA interrupt line (PIC and IOAPIC input) of the device
VIRTIO_BLK_IRQ = 5
#: the largest queue the device offers (QueueNumMax)
QUEUE_SIZE_MAX = 256
#: the most data descriptors one request may have (config seg_max)
SEG_MAX = 126
#: the most bytes one data buffer may hold (config size_max)
SIZE_MAX = 1 << 20
#: the most bytes one request may move
MAX_REQUEST_BYTES = 4 << 20
#: discard and write-zeroes: the most sectors one range may cover, the most ranges one
#: request may hold (config max_discard_sectors/max_write_zeroes_sectors, .._seg), and the
#: alignment that gives whole blocks back (discard_sector_alignment: 4 KiB)
MAX_DISCARD_SECTORS = (1 << 22) - 1
MAX_DISCARD_SEG = 16
DISCARD_ALIGNMENT = 8

MAGIC = 0x74726976  # "virt"
VERSION = 2
DEVICE_ID_BLOCK = 2
VENDOR_ID = 0x50494D56  # "VMIP"

# registers (offsets from the base)
R_MAGIC = 0x000
R_VERSION = 0x004
R_DEVICE_ID = 0x008
R_VENDOR_ID = 0x00C
R_DEVICE_FEATURES = 0x010
R_DEVICE_FEATURES_SEL = 0x014
R_DRIVER_FEATURES = 0x020
R_DRIVER_FEATURES_SEL = 0x024
R_QUEUE_SEL = 0x030
R_QUEUE_NUM_MAX = 0x034
R_QUEUE_NUM = 0x038
R_QUEUE_READY = 0x044
R_QUEUE_NOTIFY = 0x050
R_INTERRUPT_STATUS = 0x060
R_INTERRUPT_ACK = 0x064
R_STATUS = 0x070
R_QUEUE_DESC_LOW = 0x080
R_QUEUE_DESC_HIGH = 0x084
R_QUEUE_AVAIL_LOW = 0x090
R_QUEUE_AVAIL_HIGH = 0x094
R_QUEUE_USED_LOW = 0x0A0
R_QUEUE_USED_HIGH = 0x0A4
R_CONFIG_GENERATION = 0x0FC
R_CONFIG = 0x100

# device status bits
S_ACKNOWLEDGE = 1
S_DRIVER = 2
S_DRIVER_OK = 4
S_FEATURES_OK = 8
S_NEEDS_RESET = 64
S_FAILED = 128
STATUS_MASK = 0xFF & ~0x30  # bits 4 and 5 are reserved

# interrupt status bits
INT_USED_RING = 1
INT_CONFIG = 2

# feature bits
F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14
F_VERSION_1 = 1 << 32

# descriptor flags
D_NEXT = 1
D_WRITE = 2
D_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1

# request types and statuses
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
#: the flags of a discard/write-zeroes range: the driver lets the device unmap
RANGE_UNMAP = 1
ST_OK = 0
ST_IOERR = 1
ST_UNSUPP = 2
ID_BYTES = 20

_DESC = struct.Struct("<QIHH")
_HEADER = struct.Struct("<IIQ")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_RANGE = struct.Struct("<QII")  # sector, num_sectors, flags
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_U64 = (1 << 64) - 1
_ZEROS = bytes(64 << 10)


class _NeedsReset(VmipcError):
    """The queue is broken beyond one request: the device stops until a reset."""


class _BadRequest(VmipcError):
    """One request is wrong: it completes with ``status``."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass(frozen=True)
class VirtioBlkState:
    """The device's transport and queue state, between two requests (a paused machine
    has drained the queue: no request is half done, so none is saved).

    ``disk_sectors`` and ``readonly`` describe the disk the state was taken with (0 and
    False: no disk), and ``disk_fingerprint`` its content when the state was taken
    (:meth:`DiskImage.fingerprint`; None: no disk, or a version-1 record, which predates
    it); a machine restores the record only with a disk of that mode, and — unless told
    to accept another disk — of that size and fingerprint. ``last_avail`` is the next
    available-ring index the device takes, ``used_idx`` the next used-ring index it
    writes (both free-running 16-bit counters).
    """

    VERSION: ClassVar[int] = 2
    #: the versions :meth:`from_dict` reads (1: without ``disk_fingerprint``)
    READABLE_VERSIONS: ClassVar[tuple[int, ...]] = (1, 2)

    disk_sectors: int
    readonly: bool
    status: int
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    queue_sel: int
    queue_num: int
    queue_ready: bool
    queue_desc: int
    queue_avail: int
    queue_used: int
    last_avail: int
    used_idx: int
    interrupt_status: int
    config_generation: int
    disk_fingerprint: int | None = None

    def __post_init__(self) -> None:
        limits = {
            "disk_sectors": _U64 // SECTOR_SIZE,
            "status": 0xFF,
            "device_features_sel": 0xFFFF_FFFF,
            "driver_features_sel": 0xFFFF_FFFF,
            "driver_features": _U64,
            "queue_sel": 0xFFFF_FFFF,
            "queue_num": QUEUE_SIZE_MAX,
            "queue_desc": _U64,
            "queue_avail": _U64,
            "queue_used": _U64,
            "last_avail": 0xFFFF,
            "used_idx": 0xFFFF,
            "interrupt_status": INT_USED_RING | INT_CONFIG,
            "config_generation": 0xFFFF_FFFF,
        }
        for name, top in limits.items():
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= top:
                raise ValueError(f"VirtioBlkState.{name} must be an int in 0..{top:#x}")
        for name in ("readonly", "queue_ready"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"VirtioBlkState.{name} must be a bool")
        fingerprint = self.disk_fingerprint
        if fingerprint is not None and (
            type(fingerprint) is not int or not 0 <= fingerprint <= _U64
        ):
            raise ValueError(
                f"VirtioBlkState.disk_fingerprint must be None or an int in 0..{_U64:#x}"
            )

        def bad(why: str) -> ValueError:
            return ValueError(f"inconsistent VirtioBlkState: {why}")

        if self.status & ~STATUS_MASK:
            raise bad(f"status {self.status:#x} has reserved bits set")
        if self.readonly and not self.disk_sectors:
            raise bad("a read-only disk of no sectors")
        if fingerprint is not None and not self.disk_sectors:
            raise bad("the fingerprint of no disk")
        if not self.disk_sectors and (self.status or self.queue_ready or self.interrupt_status):
            raise bad("a device without a disk was driven")
        if self.driver_features & ~_offered(self.readonly):
            raise bad("the driver accepted features the device never offers")
        if self.queue_num and not _valid_queue_num(self.queue_num):
            raise bad(f"a queue of {self.queue_num} entries (not a power of two)")
        if self.queue_ready:
            if not _valid_queue_num(self.queue_num):
                raise bad(f"a ready queue of {self.queue_num} entries")
            if (self.used_idx - self.last_avail) & 0xFFFF:
                raise bad("requests are in flight (a drained device has used every one)")

    def to_dict(self) -> dict[str, int | None]:
        record: dict[str, int | None] = {"version": self.VERSION}
        for item in fields(self):
            value = getattr(self, item.name)
            record[item.name] = int(value) if type(value) is bool else value
        return record

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> VirtioBlkState:
        """The record :meth:`to_dict` wrote (this version or version 1); ValueError for
        anything else."""
        if not isinstance(d, Mapping):
            raise ValueError(f"VirtioBlkState record must be a mapping, not {type(d).__name__}")
        version = d.get("version")
        if type(version) is not int or version not in cls.READABLE_VERSIONS:
            raise ValueError(f"unsupported VirtioBlkState record version {version!r}")
        names = [item.name for item in fields(cls)]
        if version == 1:  # before the disk's identity
            names.remove("disk_fingerprint")
        expected = {"version", *names}
        if set(d) != expected:
            missing = sorted(expected - set(d))
            extra = sorted(map(str, set(d) - expected))
            raise ValueError(f"VirtioBlkState record keys: missing {missing}, unexpected {extra}")
        values: dict[str, int | bool | None] = {}
        for name in names:
            value = d[name]
            if name == "disk_fingerprint" and value is None:
                values[name] = None
            elif type(value) is not int:
                raise ValueError(f"VirtioBlkState record {name!r} must be an int")
            elif name in ("readonly", "queue_ready"):
                if value not in (0, 1):
                    raise ValueError(f"VirtioBlkState record {name!r} must be 0 or 1")
                values[name] = bool(value)
            else:
                values[name] = value
        return cls(**values)  # type: ignore[arg-type]

    def disk_mismatch(self, disk: DiskImage | None, *, accept_disk: bool = False) -> str | None:
        """Why this record cannot go to a machine with ``disk``, or None.

        A disk must be there if and only if the record had one, in the same mode; and it
        must be the same disk: of the same size, and of the same fingerprint when the
        record has one (a version-1 record has not: only its size is checked). With
        ``accept_disk`` the size and fingerprint are not checked (the operator knows the
        disk is the right one, or accepts what the guest will find on it). OSError if
        the disk cannot be read for its fingerprint."""
        sectors = disk.sectors if disk is not None else 0
        readonly = disk.readonly if disk is not None else False
        if not sectors or not self.disk_sectors:
            if sectors != self.disk_sectors:
                return (
                    f"the state's disk has {self.disk_sectors} sectors, this machine's "
                    f"{sectors}" + ("" if sectors else " (it has no disk)")
                )
            return None
        if readonly != self.readonly:
            mode = "read-only" if self.readonly else "writable"
            return f"the state's disk is {mode}, this machine's is not"
        if accept_disk:
            return None
        assert disk is not None
        hint = " (accept_disk / --force-disk restores it anyway)"
        if sectors != self.disk_sectors:
            return (
                f"another disk: the state's has {self.disk_sectors * SECTOR_SIZE} bytes, "
                f"this machine's {disk.size}{hint}"
            )
        if self.disk_fingerprint is not None:
            fingerprint = disk.fingerprint()
            if fingerprint != self.disk_fingerprint:
                return (
                    f"another disk, or one written since the state was taken: its "
                    f"fingerprint is {fingerprint:016x}, the state's {self.disk_fingerprint:016x}"
                    f" (same size, {disk.size} bytes){hint}"
                )
        return None


def _offered(readonly: bool) -> int:
    features = F_VERSION_1 | F_SEG_MAX | F_SIZE_MAX | F_BLK_SIZE | F_FLUSH
    return features | F_RO if readonly else features | F_DISCARD | F_WRITE_ZEROES


def _valid_queue_num(num: int) -> bool:
    return 1 <= num <= QUEUE_SIZE_MAX and num & (num - 1) == 0


def _lo(value: int, data: int) -> int:
    return (value & ~0xFFFF_FFFF) | data


def _hi(value: int, data: int) -> int:
    return (value & 0xFFFF_FFFF) | (data << 32)


class VirtioBlk:
    """The device. ``disk`` None: the placeholder (DeviceID 0). ``irq(level)`` drives its
    interrupt line. Call :meth:`close` to stop its worker thread."""

    def __init__(
        self,
        memory: GuestMemory,
        disk: DiskImage | None,
        irq: Callable[[int], None],
        state: VirtioBlkState | None = None,
        *,
        quiesced: bool = False,
    ) -> None:
        self._memory = memory
        self._disk = disk
        self._irq = irq
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._notified = False
        self._quiesced = quiesced
        self._busy = False
        #: who waits, without blocking, for the request in flight to complete
        self._on_idle: Callable[[], None] | None = None
        self._closing = False
        self._irq_level = 0
        self._config_generation = 0
        #: requests completed and refused since built (not saved): for tests and logs
        self.completed = 0
        self.refused = 0
        self._reset_locked()
        if state is not None:
            self._load(state)
        #: started on the first notify or resume: the VMM enters its sandbox with one
        #: thread only, after the machine is built
        self._thread: threading.Thread | None = None

    # --- state ---------------------------------------------------------------------------

    def _reset_locked(self) -> None:
        self._status = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._driver_features = 0
        self._queue_sel = 0
        self._queue_num = QUEUE_SIZE_MAX
        self._queue_ready = False
        self._queue_desc = 0
        self._queue_avail = 0
        self._queue_used = 0
        self._last_avail = 0
        self._used_idx = 0
        self._interrupt_status = 0
        self._features_refused = False

    def _load(self, state: VirtioBlkState) -> None:
        self._status = state.status
        self._device_features_sel = state.device_features_sel
        self._driver_features_sel = state.driver_features_sel
        self._driver_features = state.driver_features
        self._queue_sel = state.queue_sel
        self._queue_num = state.queue_num
        self._queue_ready = state.queue_ready
        self._queue_desc = state.queue_desc
        self._queue_avail = state.queue_avail
        self._queue_used = state.queue_used
        self._last_avail = state.last_avail
        self._used_idx = state.used_idx
        self._interrupt_status = state.interrupt_status
        self._config_generation = state.config_generation
        # the irqchip's restored state already holds the line's level
        self._irq_level = 1 if state.interrupt_status else 0

    def save(self) -> VirtioBlkState:
        """The device between two requests: the caller has quiesced it (a paused machine);
        otherwise what is in flight is not in the record. The disk's fingerprint is taken
        now, drained: what the guest wrote is in the image. OSError if the disk cannot be
        read (the only way a save fails)."""
        disk = self._disk
        fingerprint = disk.fingerprint() if disk is not None else None
        with self._lock:
            return VirtioBlkState(
                disk_sectors=disk.sectors if disk is not None else 0,
                readonly=disk.readonly if disk is not None else False,
                status=self._status,
                device_features_sel=self._device_features_sel,
                driver_features_sel=self._driver_features_sel,
                driver_features=self._driver_features,
                queue_sel=self._queue_sel,
                queue_num=self._queue_num,
                queue_ready=self._queue_ready,
                queue_desc=self._queue_desc,
                queue_avail=self._queue_avail,
                queue_used=self._queue_used,
                last_avail=self._last_avail,
                used_idx=self._used_idx,
                interrupt_status=self._interrupt_status,
                config_generation=self._config_generation,
                disk_fingerprint=fingerprint,
            )

    @staticmethod
    def empty_state() -> VirtioBlkState:
        """The record of a device without a disk, never touched: what a machine state from
        before the block device (version 1) stands for."""
        return VirtioBlkState(
            disk_sectors=0,
            readonly=False,
            status=0,
            device_features_sel=0,
            driver_features_sel=0,
            driver_features=0,
            queue_sel=0,
            queue_num=QUEUE_SIZE_MAX,
            queue_ready=False,
            queue_desc=0,
            queue_avail=0,
            queue_used=0,
            last_avail=0,
            used_idx=0,
            interrupt_status=0,
            config_generation=0,
        )

    @classmethod
    def restore(
        cls,
        state: VirtioBlkState,
        memory: GuestMemory,
        disk: DiskImage | None,
        irq: Callable[[int], None],
    ) -> VirtioBlk:
        """A device that continues from ``state``, quiesced (the machine is paused):
        :meth:`resume` lets it take the requests the guest queued meanwhile. ValueError if
        ``disk`` cannot be the state's (missing, or of another mode); whether it is the
        same disk (size, fingerprint) is the machine's check, before any restore
        (:meth:`VirtioBlkState.disk_mismatch`), which may have been told to accept it."""
        mismatch = state.disk_mismatch(disk, accept_disk=True)
        if mismatch:
            raise ValueError(mismatch)
        return cls(memory, disk, irq, state, quiesced=True)

    # --- pause, resume, flush, close -----------------------------------------------------

    def quiesce(self) -> None:
        """Take no more requests; return once every request taken has completed and its
        used entry is written."""
        with self._wake:
            self._quiesced = True
            while self._busy:
                self._wake.wait()

    def quiesce_nowait(self, on_idle: Callable[[], None]) -> bool:
        """Take no more requests, without waiting for the ones taken: True when none is in
        flight; else False, and ``on_idle`` is called once, from the worker and with no
        lock of this device held, when the last one has completed. For a caller that must
        not block for the length of a disk I/O (a pause on the control server's loop)."""
        with self._wake:
            self._quiesced = True
            if not self._busy:
                return True
            self._on_idle = on_idle
            return False

    def resume(self) -> None:
        """Take requests again, looking at the available ring at once."""
        with self._wake:
            self._quiesced = False
            self._notified = True
            self._start_worker_locked()
            self._wake.notify_all()

    def flush(self) -> None:
        """Make what the guest wrote durable (fdatasync); never for a read-only disk.
        OSError if the host cannot."""
        disk = self._disk
        if disk is not None and not disk.readonly and disk.fd >= 0:
            os.fdatasync(disk.fd)

    def close(self) -> None:
        """Stop the worker (after the request it is running). The disk stays open: it
        belongs to the machine."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    @property
    def irq_level(self) -> int:
        return self._irq_level

    # --- registers (vCPU threads) --------------------------------------------------------

    def mmio_read(self, offset: int, size: int) -> bytes:
        try:
            value = self._read_register(offset, size)
        except Exception:  # never out of a vCPU's exit handler
            log.exception("virtio-blk: register read at %#x failed", offset)
            value = 0
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def mmio_write(self, offset: int, data: bytes) -> None:
        try:
            self._write_register(offset, data)
        except Exception:
            log.exception("virtio-blk: register write at %#x failed", offset)

    def _config_space(self) -> bytes:
        disk = self._disk
        sectors = disk.sectors if disk is not None else 0
        # capacity, size_max, seg_max, geometry (c, h, s), blk_size; topology (4 fields),
        # writeback, unused, num_queues; max_discard_sectors, max_discard_seg,
        # discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
        # write_zeroes_may_unmap (virtio 1.1 5.2.4)
        return struct.pack(
            "<QIIHBBIBBHIBBHIIIIIB3x",
            sectors,
            SIZE_MAX,
            SEG_MAX,
            0,
            0,
            0,
            SECTOR_SIZE,
            0,
            0,
            0,
            0,
            0,
            0,
            1,
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            DISCARD_ALIGNMENT,
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            1,
        )

    def _read_register(self, offset: int, size: int) -> int:
        if offset >= R_CONFIG:
            config = self._config_space()
            start = offset - R_CONFIG
            return int.from_bytes(config[start : start + size].ljust(size, b"\0"), "little")
        if size != 4 or offset & 3:
            return 0  # the spec wants 32-bit accesses to the transport registers
        with self._lock:
            if offset == R_MAGIC:
                return MAGIC
            if offset == R_VERSION:
                return VERSION
            if offset == R_DEVICE_ID:
                return DEVICE_ID_BLOCK if self._disk is not None else 0
            if offset == R_VENDOR_ID:
                return VENDOR_ID
            if self._disk is None:
                return 0
            if offset == R_DEVICE_FEATURES:
                offered = _offered(self._disk.readonly)
                return (
                    (offered >> (32 * self._device_features_sel)) & 0xFFFF_FFFF
                    if (self._device_features_sel < 2)
                    else 0
                )
            if offset == R_QUEUE_NUM_MAX:
                return QUEUE_SIZE_MAX if self._queue_sel == 0 else 0
            if offset == R_QUEUE_READY:
                return int(self._queue_ready) if self._queue_sel == 0 else 0
            if offset == R_INTERRUPT_STATUS:
                return self._interrupt_status
            if offset == R_STATUS:
                return self._status
            if offset == R_CONFIG_GENERATION:
                return self._config_generation
            if self._queue_sel == 0:
                queue = {
                    R_QUEUE_NUM: self._queue_num,
                    R_QUEUE_DESC_LOW: self._queue_desc & 0xFFFF_FFFF,
                    R_QUEUE_DESC_HIGH: self._queue_desc >> 32,
                    R_QUEUE_AVAIL_LOW: self._queue_avail & 0xFFFF_FFFF,
                    R_QUEUE_AVAIL_HIGH: self._queue_avail >> 32,
                    R_QUEUE_USED_LOW: self._queue_used & 0xFFFF_FFFF,
                    R_QUEUE_USED_HIGH: self._queue_used >> 32,
                }
                return queue.get(offset, 0)
            return 0

    def _write_register(self, offset: int, data: bytes) -> None:
        if self._disk is None or offset >= R_CONFIG or len(data) != 4 or offset & 3:
            return  # the config space is read-only; transport registers are 32-bit
        value = int.from_bytes(data, "little")
        if offset == R_QUEUE_NOTIFY:
            if value == 0:
                with self._wake:
                    self._notified = True
                    self._start_worker_locked()
                    self._wake.notify_all()
            return
        if offset == R_STATUS:
            self._write_status(value & 0xFF)
            return
        with self._lock:
            if offset == R_INTERRUPT_ACK:
                self._interrupt_status &= ~value
                self._update_irq_locked()
            elif offset == R_DEVICE_FEATURES_SEL:
                self._device_features_sel = value
            elif offset == R_DRIVER_FEATURES_SEL:
                self._driver_features_sel = value
            elif offset == R_DRIVER_FEATURES:
                self._write_driver_features(value)
            elif offset == R_QUEUE_SEL:
                self._queue_sel = value
            elif self._queue_sel != 0 or (self._queue_ready and offset != R_QUEUE_READY):
                pass  # one queue; its layout cannot change while it is live
            elif offset == R_QUEUE_READY:
                self._write_queue_ready(value)
            elif offset == R_QUEUE_NUM:
                self._queue_num = value if _valid_queue_num(value) else 0
            elif offset == R_QUEUE_DESC_LOW:
                self._queue_desc = _lo(self._queue_desc, value)
            elif offset == R_QUEUE_DESC_HIGH:
                self._queue_desc = _hi(self._queue_desc, value)
            elif offset == R_QUEUE_AVAIL_LOW:
                self._queue_avail = _lo(self._queue_avail, value)
            elif offset == R_QUEUE_AVAIL_HIGH:
                self._queue_avail = _hi(self._queue_avail, value)
            elif offset == R_QUEUE_USED_LOW:
                self._queue_used = _lo(self._queue_used, value)
            elif offset == R_QUEUE_USED_HIGH:
                self._queue_used = _hi(self._queue_used, value)

    def _write_driver_features(self, value: int) -> None:
        if self._status & (S_FEATURES_OK | S_DRIVER_OK) or self._driver_features_sel > 1:
            return
        shift = 32 * self._driver_features_sel
        features = (self._driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
        assert self._disk is not None
        # what was never offered is not taken: FEATURES_OK then fails for it
        self._driver_features = features & _offered(self._disk.readonly)
        self._features_refused = features != self._driver_features

    def _write_queue_ready(self, value: int) -> None:
        if not value & 1:
            self._queue_ready = False
            return
        if not _valid_queue_num(self._queue_num):
            return  # stays not ready: the driver sees it
        self._queue_ready = True

    def _write_status(self, value: int) -> None:
        if value == 0:  # reset: after the request the worker runs, if any
            with self._wake:
                while self._busy:
                    self._wake.wait()
                self._reset_locked()
                self._config_generation = (self._config_generation + 1) & 0xFFFF_FFFF
                self._update_irq_locked()
            return
        with self._lock:
            refused = self._features_refused or not self._driver_features & F_VERSION_1
            if value & S_FEATURES_OK and not self._status & S_FEATURES_OK and refused:
                value &= ~S_FEATURES_OK  # a legacy driver, or one that wants too much
            # the driver sets bits; it cannot clear them (except by a reset), nor set
            # NEEDS_RESET
            self._status = (self._status | value) & STATUS_MASK & ~S_NEEDS_RESET | (
                self._status & S_NEEDS_RESET
            )

    def _update_irq_locked(self) -> None:
        level = 1 if self._interrupt_status else 0
        if level != self._irq_level:
            self._irq_level = level
            try:
                self._irq(level)
            except Exception:  # e.g. the VM is closing
                log.debug("virtio-blk: interrupt line not driven", exc_info=True)

    # --- the worker ----------------------------------------------------------------------

    def _start_worker_locked(self) -> None:
        if self._thread is None and self._disk is not None and not self._closing:
            self._thread = threading.Thread(target=self._work, name="vmipc-virtio-blk", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._closing and (self._quiesced or not self._notified):
                    self._wake.wait()
                if self._closing:
                    return
                self._notified = False
                self._busy = True
            try:
                self._drain_queue()
            except Exception:  # a bug: the device stops rather than the VMM
                log.exception("virtio-blk: the worker failed")
                with self._lock:
                    self._needs_reset_locked("internal error")
            finally:
                with self._wake:
                    self._busy = False
                    self._wake.notify_all()
                    on_idle, self._on_idle = self._on_idle, None
                if on_idle is not None:  # outside the lock: the callee takes the machine's
                    on_idle()

    def _live_queue(self) -> tuple[int, int, int, int] | None:
        """(num, desc, avail, used) of a queue the device may work on now, else None."""
        with self._lock:
            if (
                self._quiesced
                or self._closing
                or not self._queue_ready
                or self._status & (S_NEEDS_RESET | S_FAILED)
                or not self._status & S_DRIVER_OK
            ):
                return None
            return self._queue_num, self._queue_desc, self._queue_avail, self._queue_used

    def _drain_queue(self) -> None:
        completed = False
        while True:
            queue = self._live_queue()
            if queue is None:
                break
            num, desc, avail, used = queue
            try:
                self._check_rings(num, desc, avail, used)
                avail_idx = self._u16(avail + 2)
                pending = (avail_idx - self._last_avail) & 0xFFFF
                if pending > num:
                    raise _NeedsReset(f"the available index ran {pending} ahead of {num} entries")
                if not pending:
                    break
                head = self._u16(avail + 4 + 2 * (self._last_avail % num))
                if head >= num:
                    raise _NeedsReset(f"head descriptor {head} of a {num}-entry queue")
                length = self._run_request(head, num, desc)
                self._put_used(num, used, head, length)
                completed = True
            except _NeedsReset as exc:
                with self._lock:
                    self._needs_reset_locked(str(exc))
                return
        if completed and not self._interrupt_suppressed():
            with self._lock:
                self._interrupt_status |= INT_USED_RING
                self._update_irq_locked()

    def _needs_reset_locked(self, why: str) -> None:
        log.warning("virtio-blk: the guest's queue is broken (%s): device needs reset", why)
        self._status |= S_NEEDS_RESET
        self._interrupt_status |= INT_CONFIG
        self._update_irq_locked()

    def _interrupt_suppressed(self) -> bool:
        with self._lock:
            avail = self._queue_avail
        try:
            return bool(self._u16(avail) & AVAIL_F_NO_INTERRUPT)
        except _NeedsReset:
            return False

    def _check_rings(self, num: int, desc: int, avail: int, used: int) -> None:
        for name, base, length, align in (
            ("descriptor table", desc, 16 * num, 16),
            ("available ring", avail, 6 + 2 * num, 2),
            ("used ring", used, 6 + 8 * num, 4),
        ):
            if base % align:
                raise _NeedsReset(f"the {name} at {base:#x} is not {align}-byte aligned")
            self._offset(base, length, name)

    def _offset(self, gpa: int, length: int, what: str) -> int:
        try:
            return self._memory.offset_of(gpa, length)
        except ValueError:
            raise _NeedsReset(f"the {what} at {gpa:#x}+{length:#x} is not RAM") from None

    def _u16(self, gpa: int) -> int:
        offset = self._offset(gpa, 2, "ring")
        value: int = _U16.unpack_from(self._memory.view, offset)[0]
        return value

    def _put_used(self, num: int, used: int, head: int, length: int) -> None:
        memory = self._memory
        slot = used + 4 + 8 * (self._used_idx % num)
        _USED_ELEM.pack_into(memory.view, self._offset(slot, 8, "used ring"), head, length)
        self._used_idx = (self._used_idx + 1) & 0xFFFF
        self._last_avail = (self._last_avail + 1) & 0xFFFF
        # the element before the index: the guest reads the index, then the element
        _U16.pack_into(memory.view, self._offset(used + 2, 2, "used ring"), self._used_idx)
        memory.note_written(slot, 8)
        memory.note_written(used + 2, 2)

    def _chain(self, head: int, num: int, desc: int) -> list[tuple[int, int, int]]:
        """The descriptors of a chain: (addr, len, flags). _NeedsReset for a chain that
        leaves the table or is longer than the queue (a loop)."""
        chain = []
        index = head
        view = self._memory.view
        table = self._offset(desc, 16 * num, "descriptor table")
        while True:
            addr, length, flags, nxt = _DESC.unpack_from(view, table + 16 * index)
            chain.append((addr, length, flags))
            if not flags & D_NEXT:
                return chain
            if len(chain) >= num:
                raise _NeedsReset(f"the chain from descriptor {head} loops")
            if nxt >= num:
                raise _NeedsReset(f"descriptor {index} chains to {nxt}, beyond {num}")
            index = nxt

    def _run_request(self, head: int, num: int, desc: int) -> int:
        """Run one request; returns the used length (bytes written into the guest)."""
        chain = self._chain(head, num, desc)
        status_addr, status_len, status_flags = chain[-1]
        if len(chain) < 2 or not status_flags & D_WRITE or status_len < 1:
            raise _NeedsReset(f"request {head} has no status byte")
        try:
            status_at = self._memory.offset_of(status_addr + status_len - 1, 1)
        except ValueError:
            raise _NeedsReset(f"request {head}'s status byte is not RAM") from None
        written = 0
        try:
            written = self._execute(chain[0], chain[1:-1])
            status = ST_OK
        except _BadRequest as exc:
            log.debug("virtio-blk: request %d refused: %s", head, exc)
            self.refused += 1
            status = exc.status
            written = 0
        self._memory.view[status_at] = status
        self._memory.note_written(status_addr + status_len - 1, 1)
        self.completed += 1
        return written + 1

    def _buffer(self, addr: int, length: int) -> memoryview:
        try:
            offset = self._memory.offset_of(addr, length)
        except ValueError:
            raise _BadRequest(ST_IOERR, f"buffer {addr:#x}+{length:#x} is not RAM") from None
        return self._memory.view[offset : offset + length]

    def _execute(self, header: tuple[int, int, int], data: list[tuple[int, int, int]]) -> int:
        addr, length, flags = header
        if flags & (D_WRITE | D_INDIRECT) or length < _HEADER.size:
            raise _BadRequest(ST_IOERR, "the header is not a readable 16-byte buffer")
        kind, _reserved, sector = _HEADER.unpack(self._buffer(addr, _HEADER.size))
        if any(item[2] & D_INDIRECT for item in data):
            raise _BadRequest(ST_UNSUPP, "indirect descriptors were not offered")
        if len(data) > SEG_MAX:
            raise _BadRequest(ST_IOERR, f"{len(data)} data buffers, at most {SEG_MAX}")
        disk = self._disk
        assert disk is not None
        if kind in (T_IN, T_OUT):
            writable = kind == T_IN
            if any(bool(item[2] & D_WRITE) != writable for item in data):
                raise _BadRequest(ST_IOERR, "a data buffer of the wrong direction")
            total = sum(item[1] for item in data)
            if not data or total % SECTOR_SIZE or total > MAX_REQUEST_BYTES:
                raise _BadRequest(
                    ST_IOERR, f"{total} bytes: not 1 .. {MAX_REQUEST_BYTES >> 9} whole sectors"
                )
            if sector > disk.sectors or total // SECTOR_SIZE > disk.sectors - sector:
                raise _BadRequest(
                    ST_IOERR, f"sector {sector}+{total // SECTOR_SIZE} is past the end"
                )
            if kind == T_OUT and disk.readonly:
                raise _BadRequest(ST_IOERR, "a write to a read-only disk")
            buffers = [self._buffer(a, n) for a, n, _f in data]
            self._transfer(disk, buffers, sector * SECTOR_SIZE, writable)
            if writable:
                for a, n, _f in data:
                    self._memory.note_written(a, n)
                return total
            return 0
        if kind == T_FLUSH:
            try:
                self.flush()
            except OSError as exc:
                raise _BadRequest(ST_IOERR, f"fdatasync: {exc.strerror}") from None
            return 0
        if kind in (T_DISCARD, T_WRITE_ZEROES):
            return self._discard(disk, kind, data)
        if kind == T_GET_ID:
            if not data or not data[0][2] & D_WRITE:
                raise _BadRequest(ST_IOERR, "get-id needs a writable buffer")
            a, n, _f = data[0]
            n = min(n, ID_BYTES)
            ident = b"vmipc-virtio-blk".ljust(ID_BYTES, b"\0")[:n]
            self._buffer(a, n)[:] = ident
            self._memory.note_written(a, n)
            return n
        raise _BadRequest(ST_UNSUPP, f"request type {kind}")

    def _discard(self, disk: DiskImage, kind: int, data: list[tuple[int, int, int]]) -> int:
        """Discard or write-zeroes: every range is checked before any is done."""
        name = "discard" if kind == T_DISCARD else "write-zeroes"
        if disk.readonly:
            raise _BadRequest(ST_IOERR, f"a {name} on a read-only disk")
        feature = F_DISCARD if kind == T_DISCARD else F_WRITE_ZEROES
        with self._lock:
            negotiated = bool(self._driver_features & feature)
        if not negotiated:
            raise _BadRequest(ST_UNSUPP, f"{name} was not negotiated")
        if any(item[2] & D_WRITE for item in data):
            raise _BadRequest(ST_IOERR, f"a {name} range in a device-writable buffer")
        total = sum(item[1] for item in data)
        if not total or total % _RANGE.size or total > MAX_DISCARD_SEG * _RANGE.size:
            raise _BadRequest(
                ST_IOERR, f"{total} bytes of ranges: not 1 .. {MAX_DISCARD_SEG} of {_RANGE.size}"
            )
        # copied out of guest RAM at once: the guest cannot change a range once checked
        raw = b"".join(bytes(self._buffer(a, n)) for a, n, _f in data)
        ranges = [_RANGE.unpack_from(raw, at) for at in range(0, total, _RANGE.size)]
        for sector, count, flags in ranges:
            if flags & ~RANGE_UNMAP or (kind == T_DISCARD and flags):
                raise _BadRequest(ST_UNSUPP, f"{name} flags {flags:#x}")
            if count > MAX_DISCARD_SECTORS:
                raise _BadRequest(ST_IOERR, f"{count} sectors, at most {MAX_DISCARD_SECTORS}")
            if sector > disk.sectors or count > disk.sectors - sector:
                raise _BadRequest(ST_IOERR, f"sector {sector}+{count} is past the end")
        for sector, count, flags in ranges:
            if count:
                self._zero(disk, kind, flags, sector * SECTOR_SIZE, count * SECTOR_SIZE)
        return 0

    def _zero(self, disk: DiskImage, kind: int, flags: int, offset: int, length: int) -> None:
        punch = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        try:
            if kind == T_DISCARD:
                fallocate(disk.fd, punch, offset, length)  # a hint: may do nothing
                return
            if flags & RANGE_UNMAP and fallocate(disk.fd, punch, offset, length):
                return
            if fallocate(disk.fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length):
                return
        except OSError as exc:
            raise _BadRequest(ST_IOERR, f"fallocate: {exc.strerror}") from None
        for start in range(offset, offset + length, len(_ZEROS)):
            chunk = memoryview(_ZEROS)[: min(len(_ZEROS), offset + length - start)]
            self._transfer(disk, [chunk], start, False)

    def _transfer(
        self, disk: DiskImage, buffers: list[memoryview], offset: int, into_guest: bool
    ) -> None:
        for buffer in buffers:
            done = 0
            while done < len(buffer):
                try:
                    if into_guest:
                        n = os.preadv(disk.fd, [buffer[done:]], offset + done)
                    else:
                        n = os.pwrite(disk.fd, buffer[done:], offset + done)
                except OSError as exc:
                    raise _BadRequest(ST_IOERR, f"disk I/O: {exc.strerror}") from None
                if n <= 0:
                    if into_guest:  # the image shrank under us: what is missing reads as 0
                        for start in range(done, len(buffer), len(_ZEROS)):
                            chunk = buffer[start : start + len(_ZEROS)]
                            chunk[:] = _ZEROS[: len(chunk)]
                        break
                    raise _BadRequest(ST_IOERR, "disk I/O: nothing written")
                done += n
            offset += len(buffer)

"""The dirty log: which pages of guest RAM were written since a moment, its epoch.

KVM's dirty bitmaps (``KVM_GET_DIRTY_LOG``, one per memory slot) merged with the pages
the VMM wrote itself through :meth:`GuestMemory.write` (loaders, devices), which KVM
cannot see, accumulated between takes. A take returns a table of page ranges per slot,
made from each bitmap by a pure function (:func:`page_ranges`), as Cloud Hypervisor's
``dirty_log()`` returns a ``MemoryRangeTable``.

The log's **epoch** changes whenever the pages start counting afresh (a start, a take), so
a client that remembers the epoch of its last take can tell whether somebody else took
dirty pages since.
"""

from __future__ import annotations

import ctypes
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from vmipc.errors import VmipcError
from vmipc.formats import bitmap_to_runs
from vmipc.memory_layout import PAGE_SIZE
from vmipc.vmm.memory import GuestMemory

#: fills the bitmap of one slot (bit n = page n) with its dirty pages and resets them:
#: ``Vm.get_dirty_log``
GetDirtyLog = Callable[[int, "ctypes.Array[ctypes.c_uint64]"], None]


class DirtyLogOff(VmipcError):
    """A dirty-page query or take while dirty logging is off."""


class DirtyLogMoved(VmipcError):
    """A take that expected one dirty-log epoch found another: somebody took the dirty
    pages (or restarted the log) since the caller's last take."""

    def __init__(self, expected: str, current: str) -> None:
        super().__init__(
            f"the dirty log's epoch is {current}, not {expected}: dirty pages were taken, "
            "or dirty logging restarted, since"
        )
        self.expected = expected
        self.current = current


class DirtyCount(NamedTuple):
    pages: int
    #: the epoch the count belongs to (see DirtyLog.take)
    epoch: str


class PageRange(NamedTuple):
    """``npages`` pages from page ``start`` of a memory slot."""

    start: int
    npages: int


@dataclass(frozen=True)
class DirtyPages:
    """What a take found: per memory slot (in the order of ``GuestMemory.regions``) the
    ranges of pages written, ascending, and the epoch the next take counts from."""

    slots: tuple[tuple[PageRange, ...], ...]
    epoch: str

    @property
    def pages(self) -> int:
        return sum(item.npages for ranges in self.slots for item in ranges)


def page_ranges(bitmap: bytes, npages: int) -> tuple[PageRange, ...]:
    """The ranges of set bits among the first ``npages`` bits of a dirty bitmap (bit n =
    page n, little-endian 64-bit words, as ``KVM_GET_DIRTY_LOG`` fills it), ascending and
    maximal (two ranges never touch). Pure."""
    return tuple(map(PageRange._make, bitmap_to_runs(bitmap, npages)))


def _new_epoch() -> str:
    return secrets.token_hex(8)


class DirtyLog:
    """The dirty log of one machine's RAM. Thread-safe.

    ``get_dirty_log``: KVM's log of one slot (``Vm.get_dirty_log``); ``log_slots``:
    re-registers every memory slot with dirty logging on (True) or off (False)."""

    def __init__(
        self,
        memory: GuestMemory,
        get_dirty_log: GetDirtyLog,
        log_slots: Callable[[bool], None],
    ) -> None:
        self._memory = memory
        self._get_dirty_log = get_dirty_log
        self._log_slots = log_slots
        self._lock = threading.Lock()
        #: per region, the pages written since the last take (bit n = page n)
        self._pending: list[int] = []
        #: names the moment the dirty pages count from (None while logging is off)
        self._epoch: str | None = None

    @property
    def running(self) -> bool:
        return self._epoch is not None

    def start(self) -> str:
        """Start counting written pages; the first take reports pages written since now.
        Returns the epoch; when logging runs already, nothing changes and the current
        epoch is returned."""
        with self._lock:
            if self._epoch is not None:
                return self._epoch
            self._log_slots(True)
            self._pending = []
            self._epoch = _new_epoch()
            self._memory.track_writes(True)
            return self._epoch

    def stop(self) -> None:
        with self._lock:
            if self._epoch is None:
                return
            self._log_slots(False)
            self._epoch = None
            self._memory.track_writes(False)

    def query(self) -> DirtyCount:
        """How many pages are dirty now (since the last :meth:`take`), without resetting:
        what KVM reports is kept for the next take. Raises :class:`DirtyLogOff`."""
        with self._lock:
            epoch = self._require_epoch()
            self._accumulate()
            return DirtyCount(sum(bits.bit_count() for bits in self._pending), epoch)

    def take(self, expect_epoch: str | None = None) -> DirtyPages:
        """The pages written since the previous take (or since logging started), per
        slot, and reset; with the new epoch, which names the moment the next take counts
        from. ``expect_epoch``: take only if the epoch is still this one, else raise
        :class:`DirtyLogMoved` and take nothing. Raises :class:`DirtyLogOff`."""
        with self._lock:
            epoch = self._require_epoch()
            if expect_epoch is not None and expect_epoch != epoch:
                raise DirtyLogMoved(expect_epoch, epoch)
            self._accumulate()
            pending, self._pending = self._pending, []
            self._epoch = new = _new_epoch()
        slots = []
        for bits, region in zip(pending, self._memory.regions, strict=True):
            npages = region.size // PAGE_SIZE
            slots.append(page_ranges(bits.to_bytes(-(-npages // 8), "little"), npages))
        return DirtyPages(tuple(slots), new)

    def fetch(self) -> list[bytes]:
        """Per memory slot, a bitmap (bit n = page n of the slot, 64-bit little-endian
        words) of the pages written since the previous fetch — by the guest (KVM's dirty
        log) or by the VMM itself — and reset the log. A take or query fetches too: this
        is for measuring the log alone. Raises :class:`DirtyLogOff`."""
        with self._lock:
            self._require_epoch()
            return self._fetch()

    def _require_epoch(self) -> str:
        if self._epoch is None:
            raise DirtyLogOff("dirty logging is off")
        return self._epoch

    def _accumulate(self) -> None:
        fetched = self._fetch()
        if not self._pending:
            self._pending = [0] * len(fetched)
        self._pending = [
            old | int.from_bytes(new, "little")
            for old, new in zip(self._pending, fetched, strict=True)
        ]

    def _fetch(self) -> list[bytes]:
        bitmaps = []
        vmm_written = self._memory.take_written_pages()
        for slot, region in enumerate(self._memory.regions):  # region i is KVM slot i
            pages = region.size // PAGE_SIZE
            words = (ctypes.c_uint64 * ((pages + 63) // 64))()
            self._get_dirty_log(slot, words)
            bitmap = bytearray(memoryview(words).cast("B"))
            for page in vmm_written.get(slot, ()):
                bitmap[page >> 3] |= 1 << (page & 7)
            bitmaps.append(bytes(bitmap))
        return bitmaps

"""Pages the VMM writes behind KVM's back (the block device's DMA, loaders) are noted for
the dirty log from a device's worker thread while the migration's thread takes them: no
note may fall between two takes and be lost (a page the destination would never get)."""

from __future__ import annotations

import sys
import threading

from vmipc.vmm.memory import GuestMemory

PAGES = 16000


def test_no_written_page_is_lost_between_a_note_and_a_take() -> None:
    memory = GuestMemory(64 << 20)
    memory.track_writes(True)
    taken: set[int] = set()
    done = threading.Event()

    def device() -> None:
        for page in range(PAGES):
            memory.note_written(page * 4096, 1)
        done.set()

    def migration() -> None:
        while not done.is_set():
            for pages in memory.take_written_pages().values():
                taken.update(pages)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: every race shows
    try:
        threads = [threading.Thread(target=device), threading.Thread(target=migration)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for pages in memory.take_written_pages().values():
            taken.update(pages)
    finally:
        sys.setswitchinterval(interval)
        memory.close()
    assert set(range(PAGES)) - taken == set()

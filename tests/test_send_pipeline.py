"""The page-stream sender writes a data run in pieces, each copied (from a running guest)
and hashed between two writes: the round checksum must still cover exactly the bytes
sent, in order, whatever the guest writes meanwhile and whatever the run sizes."""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from vmipc.memory_layout import MIB, PAGE_SIZE
from vmipc.vmm.kick import install_kick_handler
from vmipc.vmm.memory import GuestMemory
from vmipc.vmm.persist import Transfer, receive_page_stream, send_page_stream

SIZE = 16 * MIB
PAGES = SIZE // PAGE_SIZE


@pytest.fixture
def memories() -> Iterator[tuple[GuestMemory, GuestMemory]]:
    install_kick_handler()
    source, dest = GuestMemory(SIZE), GuestMemory(SIZE)
    yield source, dest
    source.close()
    dest.close()


def _runs(rng: random.Random) -> list[tuple[int, int]]:
    """Dirty runs of every size: single pages, runs just under and over one piece, runs
    longer than one data record, zero pages among them."""
    runs, page = [], 0
    while page < PAGES:
        count = min(PAGES - page, rng.choice([1, 2, 31, 32, 33, 300, 1024, 1500]))
        runs.append((page, count))
        page += count + rng.choice([0, 1, 7])
    return runs


@pytest.mark.parametrize("consistent", [False, True])
def test_a_stream_verifies_while_the_guest_writes(
    memories: tuple[GuestMemory, GuestMemory], consistent: bool
) -> None:
    source, dest = memories
    rng = random.Random(5)
    source.view[:] = rng.randbytes(SIZE)
    for page in range(0, PAGES, 9):  # zero pages among the data
        source.view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
    stop = threading.Event()
    steps_written: list[int] = []

    def guest() -> None:  # a running guest: rewrites its pages all the time
        pattern, step = 0, 0
        while not stop.is_set():
            at = (step * 37 % (PAGES - 4)) * PAGE_SIZE
            source.view[at : at + 4 * PAGE_SIZE] = bytes([pattern]) * (4 * PAGE_SIZE)
            pattern, step = pattern % 255 + 1, step + 1
        steps_written.append(step)

    writer = threading.Thread(target=guest) if not consistent else None
    if writer is not None:
        writer.start()
    try:
        for attempt in range(4):
            runs = _runs(random.Random(attempt))
            left, right = socket.socketpair()
            received: list[Any] = []

            def receive(into: int = right.fileno(), out: list[Any] = received) -> None:
                try:
                    out.append(receive_page_stream(dest, into, Transfer()))
                except BaseException as exc:  # reported below
                    out.append(exc)

            reader = threading.Thread(target=receive)
            reader.start()
            try:
                stats = send_page_stream(
                    source, left.fileno(), Transfer(), consistent=consistent, runs=[runs]
                )
            finally:
                left.shutdown(socket.SHUT_WR)
                reader.join(60)
                left.close()
                right.close()
            assert not isinstance(received[0], BaseException), received[0]
            assert received[0].data_pages == stats.data_pages
            assert received[0].zero_pages == stats.zero_pages
            assert stats.data_pages + stats.zero_pages == sum(n for _, n in runs)
            if consistent:
                for first, count in runs:
                    span = slice(first * PAGE_SIZE, (first + count) * PAGE_SIZE)
                    assert dest.view[span] == source.view[span]
    finally:
        stop.set()
        if writer is not None:
            writer.join()
    assert steps_written or consistent  # the guest did write during the sends

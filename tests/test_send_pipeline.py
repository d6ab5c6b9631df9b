"""The page-stream sender's round checksum must cover exactly the bytes it sent, in
order, whatever a running guest writes meanwhile and whatever the run sizes (a sender
that hashes or copies anywhere but in the bytes it writes fails here: ways of
overlapping the hash with the send were tried against this test)."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vmipc.memory_layout import MIB, PAGE_SIZE
from vmipc.vmm.kick import install_kick_handler
from vmipc.vmm.memory import GuestMemory
from vmipc.vmm.persist import BulkError, Transfer, receive_page_stream, send_page_stream

SIZE = 16 * MIB
PAGES = SIZE // PAGE_SIZE
#: the running guest: rewrites 4 pages at a time all over RAM until killed
GUEST = r"""
import os, sys
fd, pages = os.open(sys.argv[1], os.O_RDWR), int(sys.argv[2])
step = 0
while True:
    os.pwrite(fd, bytes([step % 255 + 1]) * 16384, (step * 37 % (pages - 4)) * 4096)
    step += 1
"""


@pytest.fixture
def memories() -> Iterator[tuple[GuestMemory, GuestMemory]]:
    install_kick_handler()
    source, dest = GuestMemory(SIZE), GuestMemory(SIZE)
    yield source, dest
    source.close()
    dest.close()


def _runs(rng: random.Random) -> list[tuple[int, int]]:
    """Dirty runs of every size: single pages, short and long runs, runs longer than one
    data record (RUN_PAGES), zero pages among them."""
    runs, page = [], 0
    while page < PAGES:
        count = min(PAGES - page, rng.choice([1, 2, 31, 32, 33, 300, 1024, 1500]))
        runs.append((page, count))
        page += count + rng.choice([0, 1, 7])
    return runs


@pytest.mark.parametrize("hashed", [True, False], ids=["hashed", "unhashed"])
@pytest.mark.parametrize("consistent", [False, True])
def test_a_stream_verifies_while_the_guest_writes(
    memories: tuple[GuestMemory, GuestMemory], consistent: bool, hashed: bool
) -> None:
    """(Unhashed, format 1.1: the pages go zero-copy even from a running guest, and
    every check but the pages' hash still holds: record headers, runs, round order.)"""
    source, dest = memories
    rng = random.Random(5)
    source.view[:] = rng.randbytes(SIZE)
    for page in range(0, PAGES, 9):  # zero pages among the data
        source.view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
    # a running guest: another process rewrites pages of the same memfd all the time
    # (no GIL between its writes and the sender's copies and hashes)
    guest = None
    if not consistent:
        guest = subprocess.Popen(
            [sys.executable, "-c", GUEST, f"/proc/{os.getpid()}/fd/{source.fd}", str(PAGES)]
        )
        time.sleep(0.3)  # it is writing
    try:
        for attempt in range(4):
            runs = _runs(random.Random(attempt))
            left, right = socket.socketpair()
            received: list[Any] = []

            def receive(into: int = right.fileno(), out: list[Any] = received) -> None:
                try:
                    out.append(
                        receive_page_stream(dest, into, Transfer(), accept_unhashed=not hashed)
                    )
                except BaseException as exc:  # reported below
                    out.append(exc)

            reader = threading.Thread(target=receive)
            reader.start()
            try:
                stats = send_page_stream(
                    source,
                    left.fileno(),
                    Transfer(),
                    consistent=consistent,
                    runs=[runs],
                    hash_payload=hashed,
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
        if guest is not None:
            alive = guest.poll() is None
            guest.kill()
            guest.wait()
            assert alive, "the guest process stopped writing"


def test_an_unhashed_stream_is_refused_by_a_receiver_not_told_to_take_it(
    memories: tuple[GuestMemory, GuestMemory],
) -> None:
    source, dest = memories
    source.view[:] = b"\x77" * SIZE
    dest.view[:] = b"\x11" * SIZE
    left, right = socket.socketpair()
    received: list[Any] = []

    def receive() -> None:
        try:
            out = receive_page_stream(dest, right.fileno(), Transfer())
            received.append(out)
        except BaseException as exc:
            received.append(exc)
        right.shutdown(socket.SHUT_RD)  # the refusal: the sender sees it go away

    reader = threading.Thread(target=receive)
    reader.start()
    try:
        with contextlib.suppress(Exception):  # the receiver went away: a broken pipe
            send_page_stream(source, left.fileno(), Transfer(), consistent=True, hash_payload=False)
    finally:
        left.close()
        reader.join(60)
        right.close()
    assert isinstance(received[0], BulkError) and received[0].code == "bad-stream"
    assert "not hashed" in str(received[0])
    assert dest.view == b"\x11" * SIZE  # not a page written

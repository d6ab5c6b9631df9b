"""The read lease on a lazily mapped snapshot file, and copying RAM off the file, without
KVM: a writer waits until RAM is copied, and the copy equals RAM even when RAM changed
while it was made (the vCPUs run meanwhile; see tests/test_lazy_restore_writers.py for
the real VMM)."""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmipc.memory_layout import MIB, PAGE_SIZE
from vmipc.vmm.filelease import LeaseUnavailable, ReadLease
from vmipc.vmm.memory import GuestMemory

SIZE = 16 * MIB


def snapshot_like_file(path: Path) -> bytes:
    """A file of SIZE bytes behind one page of header: data pages, and holes for zeros."""
    rng = random.Random(7)
    content = bytearray(SIZE)
    for page in rng.sample(range(SIZE // PAGE_SIZE), 1000):
        content[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = rng.randbytes(PAGE_SIZE)
    content[5 * MIB : 7 * MIB] = rng.randbytes(2 * MIB)
    with open(path, "wb") as file:
        file.write(b"H" * PAGE_SIZE)
        for offset in range(0, SIZE, PAGE_SIZE):
            page = content[offset : offset + PAGE_SIZE]
            if any(page):
                file.seek(PAGE_SIZE + offset)
                file.write(page)
        file.truncate(PAGE_SIZE + SIZE)
    return bytes(content)


def open_files() -> list[str]:
    files = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            files.append(os.readlink(f"/proc/self/fd/{fd}"))
    return files


def mapped(path: Path, lease: ReadLease | None = None) -> GuestMemory:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return GuestMemory(SIZE, fd=fd, private_file_offset=PAGE_SIZE, lease=lease)


def test_a_writer_or_a_missing_lease_right_is_named(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    snapshot_like_file(path)
    fd = os.open(path, os.O_RDONLY)
    writer = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(LeaseUnavailable, match="open for writing"):
            ReadLease.take(str(path), fd)
        os.close(writer)
        writer = -1
        other = tmp_path / "other"
        other.write_bytes(b"x")
        with pytest.raises(LeaseUnavailable, match="replaced"):
            ReadLease.take(str(other), fd)
    finally:
        os.close(fd)
        if writer >= 0:
            os.close(writer)


def test_a_writer_waits_for_the_copy_then_ram_is_independent_of_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "snap"
    content = snapshot_like_file(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        lease = ReadLease.take(str(path), fd)
    finally:
        os.close(fd)
    memory = mapped(path, lease)
    copied = threading.Event()
    deadlines: list[float] = []

    def on_break(deadline: float) -> None:
        deadlines.append(deadline)
        time.sleep(0.2)  # the writer must still be waiting when the copy ends
        memory.detach_from_file(deadline=deadline)
        copied.set()

    try:
        lease.watch(on_break)
        truncate = threading.Thread(target=lambda: open(path, "w").close())
        truncate.start()
        truncate.join(30)
        assert not truncate.is_alive()
        assert copied.is_set()  # the truncation came only after the copy
        assert deadlines[0] > time.monotonic()  # with time to spare (45 s by default)
        assert memory.fd_is_ram and not lease.held
        assert os.path.getsize(path) == 0
        assert bytes(memory.view) == content  # no SIGBUS, nothing lost
        assert str(path) not in open_files()  # neither the lease's fd nor the mapping's
        assert os.open(path, os.O_WRONLY | os.O_NONBLOCK) >= 0  # no lease any more
    finally:
        memory.close()
    assert not [t for t in threading.enumerate() if t.name == "snapshot-lease"]


@contextlib.contextmanager
def scribbling(memory: GuestMemory) -> Iterator[threading.Event]:
    """A thread that writes random pages of RAM (zeros among them) until the event is set,
    like running vCPUs; it stops before the block's event is set returns."""
    stop = threading.Event()
    stopped = threading.Event()

    def scribble() -> None:
        rng = random.Random(11)
        while not stop.is_set():
            page = rng.randrange(SIZE // PAGE_SIZE) * PAGE_SIZE
            value = rng.choice([bytes(PAGE_SIZE), rng.randbytes(PAGE_SIZE)])
            memory.view[page : page + PAGE_SIZE] = value
        stopped.set()

    thread = threading.Thread(target=scribble)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join()


def test_the_copy_equals_ram_that_changed_while_it_was_made(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    snapshot_like_file(path)
    memory = mapped(path)
    try:
        with scribbling(memory) as stop:

            @contextlib.contextmanager
            def hold() -> Iterator[None]:
                stop.set()  # the "vCPUs" stop writing
                time.sleep(0.05)
                yield

            time.sleep(0.05)
            memory.detach_from_file(hold)
        expected = bytes(memory.view)
        assert memory.fd_is_ram
        assert os.pread(memory.fd, SIZE, 0) == expected  # the memfd is RAM now
        with open(path, "r+b") as file:  # the file no longer matters
            file.write(b"\xff" * SIZE)
        assert bytes(memory.view) == expected
    finally:
        memory.close()


def test_a_copy_past_its_deadline_gives_up_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    content = snapshot_like_file(path)
    memory = mapped(path)
    try:
        with pytest.raises(OSError, match="too long"):
            memory.detach_from_file(deadline=time.monotonic() - 1)
        assert not memory.fd_is_ram
        assert bytes(memory.view) == content
        memory.abandon_file()
        open(path, "w").close()
        assert bytes(memory.view) == bytes(SIZE)  # zeros, not SIGBUS
    finally:
        memory.close()

"""Bulk transfers from guest RAM to passed fds: complete, cancellable, peer-aware."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from vmipc.memory_layout import MIB
from vmipc.vmm.kick import install_kick_handler
from vmipc.vmm.memory import GuestMemory
from vmipc.vmm.persist import PeerClosed, Transfer, TransferCancelled, fd_kind


@pytest.fixture
def memory() -> GuestMemory:
    install_kick_handler()
    mem = GuestMemory(16 * MIB)
    mem.view[:] = bytes(range(256)) * (16 * MIB // 256)
    yield mem  # type: ignore[misc]
    mem.close()


def test_sendfile_to_a_socket_delivers_every_byte(memory: GuestMemory) -> None:
    left, right = socket.socketpair()
    received = bytearray()

    def drain() -> None:
        while chunk := right.recv(1 << 20):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    transfer = Transfer()
    transfer.sendfile(left.fileno(), memory.fd, 4096, memory.size - 4096)
    left.close()
    reader.join()
    right.close()
    assert received == memory.view[4096:]
    assert transfer.done == memory.size - 4096


def test_a_reader_that_stops_reading_does_not_hang_the_writer(memory: GuestMemory) -> None:
    read_end, write_end = os.pipe()
    outcome: list[str] = []
    started = threading.Event()
    box: dict[str, Transfer] = {}

    def worker() -> None:
        transfer = box["transfer"] = Transfer()
        started.set()
        try:
            transfer.sendfile(write_end, memory.fd, 0, memory.size)
            outcome.append("finished")
        except TransferCancelled:
            outcome.append("cancelled")
        finally:
            transfer.finish()

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait()
    assert box["transfer"].cancel(wait=5)
    thread.join(5)
    assert outcome == ["cancelled"]
    assert 0 < box["transfer"].done < memory.size  # the pipe took what fits, then blocked
    os.close(read_end)
    os.close(write_end)


def test_a_reader_that_goes_away_is_reported(memory: GuestMemory) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    with pytest.raises(PeerClosed, match="went away"):
        Transfer().sendfile(write_end, memory.fd, 0, memory.size)
    os.close(write_end)


def test_readinto_reports_input_that_ends_early() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"abc")
    os.close(write_end)
    target = bytearray(10)
    with pytest.raises(PeerClosed, match="7 bytes early"):
        Transfer().readinto(read_end, memoryview(target))
    assert target[:3] == b"abc"
    os.close(read_end)


def test_fd_kinds(tmp_path: object) -> None:
    read_end, write_end = os.pipe()
    left, right = socket.socketpair()
    with open(__file__, "rb") as handle:
        assert fd_kind(handle.fileno()) == "file"
        assert fd_kind(read_end) == "pipe"
        assert fd_kind(left.fileno()) == "socket"
    for fd in (read_end, write_end):
        os.close(fd)
    left.close()
    right.close()


def test_a_non_blocking_fd_is_waited_on_not_spun(
    memory: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmipc.vmm.persist import transfer as transfer_module

    calls = 0
    real_sendfile = transfer_module._sendfile

    def counting_sendfile(*args: object) -> int:
        nonlocal calls
        calls += 1
        return int(real_sendfile(*args))

    monkeypatch.setattr(transfer_module, "_sendfile", counting_sendfile)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    received = bytearray()

    def slow_reader() -> None:
        while chunk := os.read(read_end, 65536):
            received.extend(chunk)
            time.sleep(0.002)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    Transfer().sendfile(write_end, memory.fd, 0, 4 * MIB)
    os.close(write_end)
    reader.join()
    os.close(read_end)
    assert received == memory.view[: 4 * MIB]
    # each call waits for room in the pipe: about one per 64 KiB the reader takes, not
    # thousands of EAGAIN retries
    assert calls < 4 * MIB // 65536 * 4

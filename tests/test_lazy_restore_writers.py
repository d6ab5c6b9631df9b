"""A lazily restored guest survives whoever writes or truncates its snapshot file.

``vmipc vmm --restore FILE`` maps the memory section ``MAP_PRIVATE``: pages the guest has
not written yet read through to the file. Truncating the file (``> FILE``, a copy over it,
``dump-memory format=snapshot`` into it: all open with ``O_TRUNC``) would turn those reads
into SIGBUS, and discards even the pages the guest already wrote; rewriting it in place
would change guest RAM under the guest. The VMM holds a read lease on the file: a writer's
open waits until guest RAM is copied off the file (docs/vmm.md, "Lazy restore").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.builtin_guest import LINE, Console
from tests.seq_support import VCPUS, VMIPC, VmmProcess, Vmms, check_continuation, vmm_processes
from tests.test_restore import restore_options, snapshot_of_a_running_guest
from vmipc.formats import SnapshotReader
from vmipc.vmm.builder import restore_machine
from vmipc.vmm.runstate import RunState

pytestmark = pytest.mark.kvm


class Snapshot:
    def __init__(self, data: bytes, console: str, reached: int) -> None:
        self.data = data
        self.console = console
        self.reached = reached


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    """One snapshot of a running built-in guest (2 vCPUs), shared by the tests here."""
    path = tmp_path_factory.mktemp("lazy") / "snap.vmipc"
    console, reached = snapshot_of_a_running_guest(path)
    return Snapshot(path.read_bytes(), console, reached)


def memory_section(path: Path) -> tuple[int, int]:
    """(file offset, size) of the snapshot's memory section data."""
    with open(path, "rb") as file:
        reader = SnapshotReader(
            lambda size, offset: os.pread(file.fileno(), size, offset),
            os.fstat(file.fileno()).st_size,
        )
        section = reader.memory()
        return section.data_offset, section.data_size


def truncate(path: Path) -> None:
    open(path, "w").close()  # what `> FILE` does


def copy_smaller_over(path: Path) -> None:
    small = path.with_name("small")
    small.write_bytes(b"not a snapshot\n" * 300)
    shutil.copyfile(small, path)  # opens the target with O_TRUNC, like cp


def rewrite_in_place(path: Path) -> None:
    offset, size = memory_section(path)
    with open(path, "r+b") as file:
        file.seek(offset)
        for _ in range(0, size, 1 << 20):
            file.write(b"\xa5" * (1 << 20))


WRITERS: dict[str, Callable[[Path], None]] = {
    "truncate": truncate,
    "copy-smaller": copy_smaller_over,
    "rewrite-in-place": rewrite_in_place,
}


def restore(vmms: Vmms, path: Path, *extra: str) -> VmmProcess:
    vmm = VmmProcess(vmms.tmp, "restored", ["--restore", str(path), *extra], [])
    vmms.made.append(vmm)
    return vmm


def raw_ram(vmm: VmmProcess, target: Path) -> bytes:
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with vmm.client() as client:
            client.dump_memory(format="raw", out=fd)
    finally:
        os.close(fd)
    return target.read_bytes()


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_writer_neither_kills_nor_changes_a_running_restored_guest(
    tmp_path: Path, snapshot: Snapshot, writer: str
) -> None:
    path = tmp_path / "snap.vmipc"
    path.write_bytes(snapshot.data)
    with vmm_processes() as vmms:
        vmm = restore(vmms, path)
        vmm.wait_for_passes(snapshot.reached + 1)
        at_write = vmm.passes()
        WRITERS[writer](path)  # waits while the VMM copies guest RAM off the file
        vmm.wait_for_passes(max(at_write.values()) + 2)
        with vmm.client() as client:
            assert client.query_status()["state"] == "running"
            client.pause()
            client.quit()
        assert vmm.wait_exit() == 0
        after = vmm.text()
        assert "guest RAM copied off it" in vmm.stderr.read_text()
    counts = check_continuation(snapshot.console, after)  # no ERROR line, no pass lost
    assert all(counts[vcpu] >= done + 2 for vcpu, done in at_write.items()), (at_write, counts)


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_writer_leaves_a_paused_restored_guest_ram_byte_for_byte(
    tmp_path: Path, snapshot: Snapshot, writer: str
) -> None:
    path = tmp_path / "snap.vmipc"
    path.write_bytes(snapshot.data)
    with vmm_processes() as vmms:
        vmm = restore(vmms, path, "--paused")
        before = raw_ram(vmm, tmp_path / "before.raw")
        WRITERS[writer](path)
        assert raw_ram(vmm, tmp_path / "after.raw") == before
        with vmm.client() as client:
            client.resume()
        vmm.wait_for_passes(snapshot.reached + 2)
        with vmm.client() as client:
            client.pause()
            client.quit()
        assert vmm.wait_exit() == 0
        after = vmm.text()
        assert "guest RAM copied off it" in vmm.stderr.read_text()
    check_continuation(snapshot.console, after)


def test_a_file_open_for_writing_is_copied_at_once_and_may_then_be_truncated(
    tmp_path: Path, snapshot: Snapshot
) -> None:
    """No lease while a writer has the file open: RAM is loaded eagerly (one log line),
    and the VMM — here without a control socket — no longer depends on the file."""
    path = tmp_path / "snap.vmipc"
    path.write_bytes(snapshot.data)
    console = tmp_path / "console"
    stderr = tmp_path / "stderr"
    argv = [*VMIPC, "vmm", "--restore", str(path), "--console", str(console)]
    writer = os.open(path, os.O_WRONLY)
    try:
        with open(stderr, "wb") as err:
            process = subprocess.Popen(
                [*argv, "--no-console-input"],
                stdin=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            deadline = time.monotonic() + 30

            def passes() -> dict[int, int]:
                done: dict[int, int] = {}
                text = console.read_text(errors="replace") if console.exists() else ""
                for line in text.split("\n")[:-1]:
                    match = LINE.fullmatch(line)
                    if match and match.group(2):
                        done[int(match.group(1))] = int(match.group(2))
                return done

            def wait_for(target: int) -> int:
                while True:
                    done = passes()
                    if len(done) == VCPUS and min(done.values()) >= target:
                        return max(done.values())
                    assert process.poll() is None, f"VMM died: {stderr.read_text()}"
                    assert time.monotonic() < deadline, f"no pass {target}: {done}"
                    time.sleep(0.02)

            reached = wait_for(snapshot.reached + 1)
            os.ftruncate(writer, 0)
            os.pwrite(writer, b"\xa5" * 4096, 0)
            wait_for(reached + 2)
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    finally:
        os.close(writer)
    log = stderr.read_text()
    assert "open for writing" in log and "loaded" in log, log
    assert len(log.strip().splitlines()) == 1, log
    check_continuation(snapshot.console, console.read_text())


def test_the_writer_is_not_held_once_ram_is_copied(tmp_path: Path, snapshot: Snapshot) -> None:
    """After the first writer, the file is the user's again: the next open for writing and
    a removal are not held, and the guest keeps running."""
    path = tmp_path / "snap.vmipc"
    path.write_bytes(snapshot.data)
    with vmm_processes() as vmms:
        vmm = restore(vmms, path)
        vmm.wait_for_passes(snapshot.reached + 1)
        truncate(path)
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # EWOULDBLOCK if a lease were held
        os.close(fd)
        path.unlink()
        vmm.wait_for_passes(max(vmm.passes().values()) + 1)
        assert vmm.alive()


def test_a_copy_that_cannot_end_in_time_stops_the_guest_rather_than_the_vmm(
    tmp_path: Path, snapshot: Snapshot
) -> None:
    """The kernel lets a writer go after fs.lease-break-time whatever the VMM does: a copy
    that cannot end before stops the guest for good, and RAM reads as zeros (no SIGBUS)."""
    path = tmp_path / "snap.vmipc"
    path.write_bytes(snapshot.data)
    machine = restore_machine(str(path), Console(), restore_options())
    try:
        assert machine.memory is not None and machine.memory.file_lease is not None
        machine.memory.file_lease.break_time = 1  # a deadline already past when it breaks
        truncate(path)
        assert machine.wait_stopped(30) is RunState.CRASHED
        assert "could not be copied off the snapshot file" in (machine.stop_reason or "")
        assert not machine.memory.file_lease.held
        assert bytes(machine.memory.view[: 1 << 20]) == bytes(1 << 20)
    finally:
        machine.close()


def test_a_sandboxed_lazy_restore_stays_lazy_until_a_writer_comes(
    tmp_path: Path, snapshot: Snapshot
) -> None:
    """In capability mode (the default) the lease's watcher can still wait for the break
    and look at the lease: guest RAM stays mapped from the file, with nothing copied and
    nothing logged, until somebody writes the file."""
    path = tmp_path / "snap.vmipc"
    path.write_bytes(snapshot.data)
    with vmm_processes() as vmms:
        vmm = restore(vmms, path)
        vmm.wait_for_passes(snapshot.reached + 2)
        time.sleep(2 * 1.0)  # two of the watcher's polls of the lease
        held = [os.readlink(f"/proc/{vmm.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{vmm.pid}/fd")]
        assert str(path) in held, "the VMM no longer holds its snapshot file"
        assert vmm.stderr.read_text() == ""
        truncate(path)
        wait_for_text = time.monotonic() + 30
        while "guest RAM copied off it" not in vmm.stderr.read_text():
            assert time.monotonic() < wait_for_text, vmm.stderr.read_text()
            time.sleep(0.05)
        assert vmm.state() == "running"

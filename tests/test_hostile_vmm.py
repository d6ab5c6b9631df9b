"""The hostile-input campaign on real sizes, against a real VMM process.

Each class of hostile input a peer can send is thrown at a live ``vmipc vmm`` process (a
running built-in guest, or an incoming VMM), at the sizes that hurt: megabyte frames and
blobs, thousands of fds, dozens of connections. What is measured is the process itself,
from /proc: its resident memory (the peak is reset before each attack through
``clear_refs``), its open fds, and whether it and its guest are still alive and
answering. Each attack is bounded in time. The unit-level fuzzing of the parsers is in
tests/test_fuzz_targets.py and tests/test_server_fuzz.py; this is the campaign the
tracemalloc bound of the parsers' fuzzing could not see (allocations made on behalf of a
whole process, over a whole connection).
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped, unused-ignore]
import pytest

from tests.control_support import RawConnection, short_tmpdir
from tests.seq_support import VMIPC, VmmProcess, vmipc, wait_for
from tests.test_state_limits import restore_peak
from vmipc.formats import SnapshotReader
from vmipc.formats import snapshot as sn
from vmipc.protocol import encode_frame

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/kvm"), reason="needs /dev/kvm to run a real VMM"
)

MIB = 1 << 20


# --- measuring a process -------------------------------------------------------------------


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for pid {pid}")


def rss(pid: int) -> int:
    return _status(pid, "VmRSS")


def peak(pid: int) -> int:
    return _status(pid, "VmHWM")


def reset_peak(pid: int) -> None:
    """Make VmHWM start again from the current RSS (Linux ≥ 4.0, root or the owner)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def fd_count(pid: int) -> int:
    """The open fds, less the machine's own (KVM and guest RAM), which an incoming VMM
    creates when its first load arrives: what is left is what a peer can make it hold."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            count += not ("kvm" in target or target.startswith("/memfd:"))
    return count


class Watch:
    """The growth of a process's peak memory and fds over an attack."""

    def __init__(self, vmm: VmmProcess) -> None:
        self.vmm = vmm
        self.pid = vmm.pid
        self.fds_before = fd_count(self.pid)
        self.names_before = self.fd_names()
        reset_peak(self.pid)
        self.rss_before = rss(self.pid)
        self.max_fds = self.fds_before

    def sample(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.max_fds = max(self.max_fds, fd_count(self.pid))

    @property
    def growth(self) -> int:
        return peak(self.pid) - self.rss_before

    def check(self, *, max_growth: int, max_extra_fds: int = 16) -> None:
        assert self.vmm.alive(), f"the VMM died: {self.vmm.stderr.read_text()[-2000:]}"
        self.sample()
        assert self.growth <= max_growth, (
            f"peak memory grew by {self.growth / MIB:.1f} MiB (bound {max_growth / MIB:.0f})"
        )
        assert self.max_fds - self.fds_before <= max_extra_fds, (
            f"open fds went from {self.fds_before} to {self.max_fds}"
        )
        try:
            wait_for(lambda: fd_count(self.pid) <= self.fds_before + 2, what="closed fds")
        except AssertionError:
            raise AssertionError(
                f"fds before: {self.names_before}, now {self.fd_names()}"
            ) from None

    def fd_names(self) -> list[str]:
        names = []
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):
                names.append(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
        return names


# --- the VMMs ------------------------------------------------------------------------------


class Vmm(VmmProcess):
    @property
    def readonly(self) -> str:
        return self.socket + ".ro"


@pytest.fixture(scope="module")
def tmp() -> Iterator[str]:
    with short_tmpdir() as path:
        yield path


@pytest.fixture
def running(tmp: str) -> Iterator[Vmm]:
    """A running built-in guest, with a read-only socket beside its control socket."""
    sock = os.path.join(tmp, "run.sock")
    vmm = Vmm(
        tmp,
        "run",
        ["--vcpus", "1", "--memory", "64M", "--readonly-socket", sock + ".ro"],
        [],
    )
    try:
        vmm.wait_for_passes(1, vcpus=1)
        assert vmm.state() == "running"  # the server's loop is up (and holds its fds)
        yield vmm
    finally:
        vmm.stop()


@pytest.fixture
def incoming(tmp: str) -> Iterator[Vmm]:
    vmm = Vmm(tmp, "in", ["--incoming", "--memory", "64M", "--vcpus", "1"], [])
    try:
        assert vmm.state() == "incoming"
        yield vmm
    finally:
        vmm.stop()


def guest_runs_on(vmm: Vmm) -> None:
    """The VMM answers on its control socket and its guest makes progress."""
    before = max(vmm.passes().values(), default=0)
    with vmm.client(20) as client:
        assert client.query_status()["state"] == "running"
    vmm.wait_for_passes(before + 1, vcpus=1, timeout=30)


def hostile_client(path: str, timeout: float = 10.0) -> RawConnection:
    return RawConnection(path, timeout=timeout)


def nested_arrays(size: int) -> bytes:
    """msgpack for an array of ``size - 5`` empty arrays: one object per byte."""
    count = size - 5
    return b"\xdd" + struct.pack(">I", count) + b"\x90" * count


# --- the control sockets -------------------------------------------------------------------


@pytest.mark.parametrize("socket_kind", ["control", "read-only"])
def test_an_echoed_megabyte_cannot_kill_the_vmm(running: Vmm, socket_kind: str) -> None:
    path = running.socket if socket_kind == "control" else running.readonly
    watch = Watch(running)
    attacks: list[dict[str, Any]] = [
        {"type": "x" * 600_000},  # before hello: an unknown message type
        {
            "type": "request",
            "id": 1,
            "command": "hello",
            "args": {"versions": [2] * 400_000},
        },
        {"type": "request", "id": 2, "command": "y" * 600_000},
    ]
    for message in attacks:
        with hostile_client(path) as conn, contextlib.suppress(EOFError, OSError):
            conn.send(message)
            reply = conn.next_message()
            # what comes back is one line, not the input
            assert len(str(getattr(reply, "error", reply))) < 4096
    watch.check(max_growth=48 * MIB)
    guest_runs_on(running)


def test_fds_of_an_unfinished_frame_are_bounded(running: Vmm) -> None:
    watch = Watch(running)
    spare = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(8)]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", spare).tobytes())]
    try:
        with hostile_client(running.readonly, timeout=2.0) as conn:
            conn.send_raw(struct.pack(">I", MIB))  # a 1 MiB frame, sent a byte at a time
            with contextlib.suppress(OSError):
                for _ in range(2500):
                    conn.sock.sendmsg([b"\x00"], anc)
                    watch.sample()
            watch.sample()
    finally:
        for fd in spare:
            os.close(fd)
    watch.check(max_growth=16 * MIB, max_extra_fds=2 * 8 + 4)
    guest_runs_on(running)


def test_replies_nobody_reads_are_bounded_in_bytes(running: Vmm) -> None:
    watch = Watch(running)
    deadline = time.monotonic() + 20
    conns: list[RawConnection] = []
    try:
        # one client whose requests' errors are large, and who never reads
        greedy = hostile_client(running.socket, timeout=0.5)
        conns.append(greedy)
        greedy.hello()
        big = encode_frame(msgpack.packb({"type": "request", "id": 7, "command": "z" * 450_000}))
        with contextlib.suppress(OSError):
            for _ in range(500):
                greedy.send_raw(big)
                if time.monotonic() > deadline:
                    break
        # 32 monitors asking for the catalogue, never reading
        for _ in range(32):
            conn = hostile_client(running.readonly, timeout=0.5)
            conns.append(conn)
            with contextlib.suppress(OSError):
                conn.hello()
                for _ in range(100):
                    conn.request("query-commands")
                    if time.monotonic() > deadline:
                        break
        time.sleep(1.0)  # let the server queue what it will
        watch.sample()
    finally:
        for conn in conns:
            conn.close()
    # 32 monitors x 256 KiB (the read-only socket's queue bound) + 2 MiB of the greedy one
    watch.check(max_growth=32 * MIB, max_extra_fds=40)
    guest_runs_on(running)


def test_decoding_floods_do_not_exhaust_the_vmm(running: Vmm) -> None:
    watch = Watch(running)
    frame = encode_frame(nested_arrays(MIB - 16))
    stop = time.monotonic() + 5

    def flood() -> None:
        with contextlib.suppress(OSError), hostile_client(running.readonly, timeout=2) as conn:
            while time.monotonic() < stop:
                conn.send_raw(frame)

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        answered = 0
        while time.monotonic() < stop:
            with running.client(20) as client:
                client.query_status()
            answered += 1
        assert answered > 0
    finally:
        flooder.join(30)
    watch.check(max_growth=64 * MIB)
    guest_runs_on(running)


def test_monitors_cannot_lock_out_the_control_socket(running: Vmm) -> None:
    conns: list[RawConnection] = []
    try:
        for _ in range(140):
            try:
                conn = hostile_client(running.readonly, timeout=2)
            except OSError:
                break
            conns.append(conn)
            with contextlib.suppress(OSError, EOFError, AssertionError):
                conn.hello()
        with running.client(20) as client:
            assert client.query_status()["state"] == "running"
    finally:
        for conn in conns:
            conn.close()
    guest_runs_on(running)


# --- state blobs and snapshots -------------------------------------------------------------

_STATE_HEADER = struct.Struct("<8sIQ")


def state_blob(payload: bytes, length: int | None = None) -> bytes:
    from vmipc.formats import checksum

    size = len(payload) if length is None else length
    return _STATE_HEADER.pack(b"VMIPCST1", size, checksum(payload)) + payload


def load_state(vmm: Vmm) -> subprocess.Popen[bytes]:
    """``vmipc call load-state`` reading the blob from its stdin, which the test writes."""
    return subprocess.Popen(
        [*VMIPC, "call", "--socket", vmm.socket, "load-state", "--fd", "in=-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("size", [2 * MIB - 64, 4 * MIB], ids=["2MiB", "4MiB"])
def test_a_state_blob_of_nested_arrays_is_refused_cheaply(incoming: Vmm, size: int) -> None:
    def attack() -> None:
        call = load_state(incoming)
        try:
            out, err = call.communicate(state_blob(nested_arrays(size)), timeout=60)
        finally:
            call.kill()
            call.wait()
        assert call.returncode != 0
        assert b"bad-state" in out + err

    attack()  # the first load builds the incoming machine (its KVM fds, its threads)
    watch = Watch(incoming)
    attack()
    watch.check(max_growth=24 * MIB)


def test_a_state_header_allocates_nothing_before_its_bytes(incoming: Vmm) -> None:
    watch = Watch(incoming)
    call = load_state(incoming)
    try:
        assert call.stdin is not None
        # 64 MiB announced, then the sender stalls
        call.stdin.write(state_blob(b"\x80" * 16, length=64 * MIB - 64)[:36])
        call.stdin.flush()
        time.sleep(2.0)
        watch.sample()
        growth = watch.growth
        call.stdin.close()
        call.wait(30)
    finally:
        call.kill()
        call.wait()
    assert growth <= 16 * MIB, f"grew {growth / MIB:.1f} MiB on a header alone"
    watch.check(max_growth=16 * MIB)


def _hostile_config_snapshot(tmp: str, running: Vmm) -> Path:
    good = Path(tmp) / "good.vmipc"
    result = vmipc("checkpoint", "--socket", running.socket, str(good), timeout=120)
    assert result.returncode == 0, result.stderr
    with open(good, "rb") as file:
        reader = SnapshotReader.from_file(file, max_read=256 * MIB)
        sections = [
            (entry.name, entry.version, reader.read_section(entry.name)) for entry in reader.entries
        ]
        header = reader.header
    hostile = [
        (name, version, nested_arrays(4 * MIB) if name == sn.SECTION_CONFIG else data)
        for name, version, data in sections
    ]
    bad = Path(tmp) / "bad.vmipc"
    bad.write_bytes(sn.build_snapshot(header, hostile))
    return bad


def test_a_snapshot_of_nested_arrays_is_refused_cheaply(running: Vmm) -> None:
    with short_tmpdir() as tmp:
        bad = _hostile_config_snapshot(tmp, running)
        peak_bytes, done = restore_peak(bad)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    # a restore that refuses the file stays near a bare interpreter's size: the 4 MiB
    # section may not become hundreds of MiB of Python objects
    assert peak_bytes <= 100 * MIB, f"peaked at {peak_bytes // MIB} MiB"

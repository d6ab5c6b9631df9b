"""End to end on real KVM: ``vmipc vmm --socket`` with the built-in guest, driven by
``vmipc call`` from separate processes and by the Python clients."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from tests.control_support import short_tmpdir
from vmipc.client import CommandError, SyncClient, open_client
from vmipc.guest import banner, expected_lines

pytestmark = pytest.mark.kvm

VCPUS = 2
WS = 1 << 20
RATE = 1024
VMIPC = [sys.executable, "-m", "vmipc"]


def vmm_argv(passes: int, console: Path, socket_path: str | None) -> list[str]:
    argv = [*VMIPC, "vmm", "--guest", "builtin", "--vcpus", str(VCPUS), "--memory", "64M"]
    argv += ["--guest-opt", f"passes={passes}", "--guest-opt", f"ws={WS}"]
    # slow enough that a loaded machine's `vmipc call` processes still catch it running
    argv += ["--guest-opt", f"rate={RATE}"]
    argv += ["--console", str(console), "--no-console-input"]
    if socket_path:
        argv += ["--socket", socket_path]
    return argv


@contextmanager
def vmm(passes: int, tmp: str) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """A VMM process with a control socket; yields (process, socket path, console file)."""
    socket_path = os.path.join(tmp, "vm.sock")
    console = Path(tmp) / "console.txt"
    proc = subprocess.Popen(vmm_argv(passes, console, socket_path), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(socket_path):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the VMM did not create its socket"
            time.sleep(0.01)
        yield proc, socket_path, console
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def vmipc_call(socket_path: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VMIPC, "call", "--socket", socket_path, *argv],
        capture_output=True,
        text=True,
        timeout=30,
    )


def per_vcpu(text: str) -> dict[int, list[str]]:
    lines: dict[int, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("vcpu="):
            vcpu = int(line.split()[0].removeprefix("vcpu="))
            lines.setdefault(vcpu, []).append(line)
    return lines


def test_pause_and_resume_from_separate_processes_leave_the_guest_output_unchanged() -> None:
    passes = 24
    with short_tmpdir() as tmp, short_tmpdir() as ref_tmp:
        # an uninterrupted run of the same guest, alongside
        ref_console = Path(ref_tmp) / "console.txt"
        reference = subprocess.Popen(vmm_argv(passes, ref_console, None))
        with vmm(passes, tmp) as (proc, sock, console):
            paused_cycles = 0
            for _ in range(4):
                time.sleep(0.15)
                paused = vmipc_call(sock, "pause")  # one process pauses...
                if paused.returncode != 0:
                    assert "invalid-state" in paused.stderr  # the guest finished early
                    break
                size = console.stat().st_size
                status = vmipc_call(sock, "query-status", "--json")
                assert '"state": "paused"' in status.stdout
                time.sleep(0.1)
                assert console.stat().st_size == size, "the guest printed while paused"
                resumed = vmipc_call(sock, "resume")  # ...another resumes
                assert resumed.returncode == 0, resumed.stderr
                paused_cycles += 1
            assert paused_cycles >= 2, "the guest finished before it could be paused twice"
            deadline = time.monotonic() + 60
            while "shutdown" not in vmipc_call(sock, "query-status").stdout:
                assert time.monotonic() < deadline, "the guest did not finish"
                time.sleep(0.1)
            quit_ = vmipc_call(sock, "quit")
            assert quit_.returncode == 0, quit_.stderr
            assert proc.wait(timeout=15) == 0
            assert not os.path.exists(sock)
        assert reference.wait(timeout=60) == 0
        text = console.read_text()
        ref_text = ref_console.read_text()
    assert (
        text.splitlines()[0]
        == ref_text.splitlines()[0]
        == banner(vcpus=VCPUS, ws=WS, passes=passes, rate=RATE)
    )
    got, ref = per_vcpu(text), per_vcpu(ref_text)
    assert got == ref, "the paused run printed something else than the uninterrupted one"
    for vcpu in range(VCPUS):
        assert got[vcpu] == expected_lines(vcpu, passes, WS)


def test_clients_against_the_real_vmm() -> None:
    with short_tmpdir() as tmp, vmm(100_000, tmp) as (proc, sock, _):
        with SyncClient(sock, timeout=10) as client:
            status = client.query_status()
            assert status == {
                "state": "running",
                "vcpu_count": VCPUS,
                "memory_size": 64 << 20,
                "stop_reason": None,
                "lease": None,
                "first": [],
            }
            with pytest.raises(CommandError) as info:
                client.resume()
            assert info.value.code == "invalid-state"

        async def watch_and_toggle() -> list[tuple[str, str]]:
            async with (
                open_client(sock, events=["state-change"]) as watcher,
                open_client(sock) as actor,
            ):
                await actor.pause()
                await actor.resume()
                changes = []
                with trio.fail_after(5):
                    for _ in range(2):
                        event = await watcher.next_event()
                        changes.append((event.data["old"], event.data["new"]))
                return changes

        assert trio.run(watch_and_toggle) == [("running", "paused"), ("paused", "running")]
        done = vmipc_call(sock, "quit")
        assert done.returncode == 0, done.stderr
        assert proc.wait(timeout=15) == 0

"""Suspend, checkpoint and restore on real KVM with the built-in guest: the console goes on
exactly as an uninterrupted run, the file is published atomically, and a failure at a step
leaves the VM running and no file under the final name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.seq_support import (
    VMIPC,
    VmmProcess,
    check_continuation,
    vmipc,
    vmm_processes,
    wait_for,
)
from vmipc.client import Client, CommandError, open_client
from vmipc.formats import SnapshotReader
from vmipc.sequences import Full, Live, SequenceError, checkpoint, restore_into
from vmipc.snapshots import _publish

pytestmark = pytest.mark.kvm


def leftovers(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".partial"))


def verifies(path: Path) -> bool:
    result = vmipc("snapshot", "verify", str(path))
    return result.returncode == 0


def test_suspend_then_restore_continues_the_guest_exactly(tmp_path: Path) -> None:
    snap = tmp_path / "vm.snap"
    with vmm_processes() as vmms:
        src = vmms.guest()
        src.wait_for_passes(3)
        done = vmipc("suspend", "--socket", src.socket, str(snap), "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["vm"] == "quit" and report["size"] == snap.stat().st_size
        assert src.wait_exit() == 0, "suspend must quit the VMM"
        assert leftovers(tmp_path) == []
        assert verifies(snap)
        before = src.text()
        reached = max(src.passes().values())

        dst = vmms.incoming(memory=None)  # the machine comes from the file's config
        restored = vmipc("restore", "--socket", dst.socket, str(snap))
        assert restored.returncode == 0, restored.stderr
        assert dst.state() == "running"
        dst.wait_for_passes(reached + 3)
        with dst.client() as client:
            client.pause()
        counts = check_continuation(before, dst.text())
    assert min(counts.values()) >= reached + 3


def test_checkpoint_leaves_the_vm_running_and_restores_the_moment_it_was_taken(
    tmp_path: Path,
) -> None:
    snap = tmp_path / "vm.snap"
    with vmm_processes() as vmms:
        src = vmms.guest()
        src.wait_for_passes(2)
        # leave it paused so the console up to the checkpoint's moment can be read
        done = vmipc("checkpoint", "--socket", src.socket, str(snap), "--leave-paused")
        assert done.returncode == 0, done.stderr
        assert src.state() == "paused"
        before = src.text()
        with src.client() as client:
            client.resume()
        # the source runs on as if nothing happened
        reached = src.wait_for_passes(max(src.passes().values()) + 3)
        check_continuation(src.text(), "")
        # a plain checkpoint (resume) of the running VM: it keeps running
        second = tmp_path / "second.snap"
        done = vmipc("checkpoint", "--socket", src.socket, str(second), "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["vm"] == "running"
        assert src.state() == "running"
        assert verifies(second)

        dst = vmms.incoming()
        restored = vmipc("restore", "--socket", dst.socket, str(snap))
        assert restored.returncode == 0, restored.stderr
        dst.wait_for_passes(3)
        with dst.client() as client:
            client.pause()
        check_continuation(before, dst.text())
        check_continuation(src.text(), "")
    assert reached > 0


class FailingClient:
    """A real client that fails at one building block: ``fault(real_call)`` runs instead."""

    def __init__(self, client: Client, command: str, fault: Any) -> None:
        self._client = client
        self._command = command
        self._fault = fault

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name == self._command:

            async def failing(*args: Any, **kwargs: Any) -> Any:
                return await self._fault(attr, *args, **kwargs)

            return failing
        return attr


def kill_then_call(vmm: VmmProcess) -> Any:
    async def fault(real: Any, *args: Any, **kwargs: Any) -> Any:
        vmm.kill()
        return await real(*args, **kwargs)

    return fault


async def call_then_fail(real: Any, *args: Any, **kwargs: Any) -> Any:
    await real(*args, **kwargs)
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("command", ["dump_state", "dump_memory"])
def test_a_failed_checkpoint_resumes_the_vm_and_keeps_the_old_file(
    tmp_path: Path, command: str
) -> None:
    snap = tmp_path / "vm.snap"
    with vmm_processes() as vmms:
        src = vmms.guest()
        src.wait_for_passes(2)
        assert vmipc("checkpoint", "--socket", src.socket, str(snap)).returncode == 0
        old = snap.read_bytes()

        async def attempt() -> SequenceError:
            async with open_client(src.socket) as client:
                failing = FailingClient(client, command, call_then_fail)
                with pytest.raises(SequenceError) as info:
                    await checkpoint(failing, str(snap))  # type: ignore[arg-type]
                return info.value

        error = trio.run(attempt)
        assert error.step == command.replace("_", "-")
        assert "runs again" in error.outcome
        assert src.state() == "running"
        assert snap.read_bytes() == old, "the file under the final name changed"
        assert leftovers(tmp_path) == []
        passes = max(src.passes().values())
        src.wait_for_passes(passes + 2)
        check_continuation(src.text(), "")


@pytest.mark.parametrize("live", [False, True], ids=["plain", "live"])
def test_a_failed_checkpoint_removes_only_the_file_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, live: bool
) -> None:
    """The temporary name is taken (O_EXCL fails): the checkpoint fails and the file that
    was there, which it did not create, survives."""
    snap = tmp_path / "vm.snap"
    taken = tmp_path / ".vm.snap.taken.partial"
    taken.write_bytes(b"somebody else's")
    monkeypatch.setattr(_publish, "temp_path_for", lambda path: str(taken))
    with vmm_processes() as vmms:
        src = vmms.guest()
        src.wait_for_passes(1)

        async def attempt() -> SequenceError:
            async with open_client(src.socket) as client:
                with pytest.raises(SequenceError) as info:
                    await checkpoint(client, str(snap), mode=Live() if live else Full())
                return info.value

        error = trio.run(attempt)
        assert isinstance(error.__cause__, FileExistsError), error
        assert taken.read_bytes() == b"somebody else's"
        assert not snap.exists()
        assert src.state() == "running"


def test_a_source_vmm_that_dies_mid_checkpoint_leaves_no_file(tmp_path: Path) -> None:
    snap = tmp_path / "vm.snap"
    with vmm_processes() as vmms:
        src = vmms.guest()
        src.wait_for_passes(1)

        async def attempt() -> SequenceError:
            async with open_client(src.socket) as client:
                failing = FailingClient(client, "dump_memory", kill_then_call(src))
                with pytest.raises(SequenceError) as info:
                    await checkpoint(failing, str(snap))  # type: ignore[arg-type]
                return info.value

        error = trio.run(attempt)
        assert error.step == "dump-memory"
        assert "gone" in error.outcome
        assert not snap.exists()
        assert leftovers(tmp_path) == []


def test_a_killed_checkpoint_client_never_leaves_a_partial_file_under_the_final_name(
    tmp_path: Path,
) -> None:
    snap = tmp_path / "vm.snap"
    with vmm_processes() as vmms:
        src = vmms.guest(ws=8 << 20)
        src.wait_for_passes(1)
        for delay in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3):
            proc = subprocess.Popen(
                [*VMIPC, "checkpoint", "--socket", src.socket, str(snap), "--no-verify"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if snap.exists():
                assert verifies(snap), f"a partial file under the final name (kill at {delay})"
            # the checkpoint's pause lease: the VMM resumes the guest when its holder dies
            wait_for(lambda: src.state() == "running", what=f"the VM running (kill at {delay})")


def test_restore_refuses_a_damaged_file_and_nothing_runs(tmp_path: Path) -> None:
    """With --verify (as `vmm --restore --verify`) a flipped byte of RAM is found before
    anything is sent. Without it, the memory section is mapped lazily and its checksum not
    read, as `vmm --restore` does; a damaged structure is still refused then
    (tests/test_lazy_restore_incoming.py)."""
    snap = tmp_path / "vm.snap"
    with vmm_processes() as vmms:
        src = vmms.guest()
        src.wait_for_passes(1)
        assert vmipc("suspend", "--socket", src.socket, str(snap)).returncode == 0
        reader = SnapshotReader.from_file(open(snap, "rb"))  # noqa: SIM115
        memory = reader.entry("memory")
        with open(snap, "r+b") as f:  # flip a byte inside the RAM image
            f.seek(memory.offset + 4096 + 0x100000 + 7)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        dst = vmms.incoming(memory=None)
        refused = vmipc("restore", "--socket", dst.socket, str(snap), "--verify")
        assert refused.returncode == 1
        assert "checksum" in refused.stderr
        assert dst.state() == "incoming"

        async def library() -> None:
            async with open_client(dst.socket) as client:
                with pytest.raises(SequenceError):
                    await restore_into(client, str(snap), discard_on_failure=True, verify=True)

        trio.run(library)
        dst.wait_exit()


@pytest.mark.parametrize("eager", [False, True], ids=["lazy", "eager"])
def test_a_suspended_vm_restores_with_vmm_restore(tmp_path: Path, eager: bool) -> None:
    snap = tmp_path / "vm.snap"
    with vmm_processes() as vmms:
        src = vmms.guest()
        src.wait_for_passes(2)
        assert vmipc("suspend", "--socket", src.socket, str(snap)).returncode == 0
        assert src.wait_exit() == 0
        reached = max(src.passes().values())
        dst = vmms._start("restored", ["--restore", str(snap), *(["--eager"] if eager else [])], [])
        dst.wait_for_passes(reached + 2)
        with dst.client() as client:
            client.pause()
        check_continuation(src.text(), dst.text())


#: a guest that rewrites 8 MiB as fast as dirty tracking lets it (see test_seq_migrate)
LIVE_WS = 8 << 20
LIVE_RATE = 20000


def test_a_live_checkpoint_of_a_busy_guest_restores_its_moment_exactly(tmp_path: Path) -> None:
    """--live: RAM is copied while the guest runs and rewrites it, then brought up to date
    (rounds of dump-dirty format=snapshot, the last one paused): the file still holds one
    consistent moment, and dirty logging is as it was (off) afterwards — or left on, with
    --track, for an increment to follow."""
    snap, tracked, inc = (tmp_path / n for n in ("live.snap", "tracked.snap", "inc.snap"))
    with vmm_processes() as vmms:
        src = vmms.guest(ws=LIVE_WS, rate=LIVE_RATE)
        src.wait_for_passes(2)
        done = vmipc(
            "checkpoint", "--socket", src.socket, "--live", "--leave-paused", str(snap), "--json"
        )
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["vm"] == "paused" and not report["tracking"]
        assert report["dirty_epoch"] is None
        before = src.text()
        with src.client() as client, pytest.raises(CommandError) as off:
            client.query_dirty()
        assert off.value.code == "dirty-log-off"
        assert verifies(snap)
        with src.client() as client:
            client.resume()

        # --live --track: dirty logging stays on, and an increment may follow
        done = vmipc("checkpoint", "--socket", src.socket, "--live", "--track", str(tracked))
        assert done.returncode == 0, done.stderr
        src.wait_for_passes(max(src.passes().values()) + 1)
        done = vmipc(
            "checkpoint", "--socket", src.socket, "--incremental", "--parent", str(tracked),
            str(inc),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        usage = vmipc("checkpoint", "--socket", src.socket, "--live", "--incremental",
                      "--parent", str(tracked), str(tmp_path / "no.snap"))  # fmt: skip
        assert usage.returncode == 2
        reached = max(check_continuation(before, "", LIVE_WS).values())
        src.stop()

        restored = vmms._start("restored", ["--restore", str(snap)], [])
        restored.wait_for_passes(reached + 2)
        with restored.client() as client:
            client.pause()
        check_continuation(before, restored.text(), LIVE_WS)


@pytest.mark.parametrize("mode", ["plain", "live"])
def test_a_checkpoint_that_cannot_create_its_file_never_pauses_the_guest(
    tmp_path: Path, mode: str
) -> None:
    """What can be checked before the pause is: a file in a directory that does not exist
    fails before the guest is paused (it used to pause, fail, and resume)."""
    with vmm_processes() as vmms:
        src = vmms.guest()
        src.wait_for_passes(2)

        async def attempt() -> tuple[SequenceError, list[str]]:
            async with open_client(src.socket, events=["state-change"]) as watcher:
                async with open_client(src.socket) as client:
                    with pytest.raises(SequenceError) as info:
                        await checkpoint(
                            client,
                            str(tmp_path / "missing" / "vm.snap"),
                            mode=Live() if mode == "live" else Full(),
                        )
                changes: list[str] = []
                with trio.move_on_after(0.5):
                    async for event in watcher.events():
                        changes.append(str(event.data["new"]))
                return info.value, changes

        error, changes = trio.run(attempt)
        assert error.step == "create the file"
        assert "runs on" in error.outcome, error.outcome
        assert changes == [], f"the guest's state changed: {changes}"
        assert src.state() == "running"

"""Pause leases on real KVM: a pause tied to its connection — the VMM resumes the guest by
itself when the lease passes unrenewed or its holder dies; release-lease leaves it paused;
the checkpoint and migration sequences use them, so a killed client never leaves a VM
paused."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from tests.seq_support import (
    VmmProcess,
    check_continuation,
    running_count,
    vmm_processes,
    wait_for,
)
from tests.test_seq_migrate import KILL_CLIENT
from vmipc.client import CommandError, open_client

pytestmark = pytest.mark.kvm


def refused(vmm: VmmProcess, command: str, **args: object) -> str:
    with vmm.client() as client, pytest.raises(CommandError) as info:
        getattr(client, command)(**args)
    return info.value.code


def test_an_unrenewed_lease_resumes_the_guest_and_renewals_or_a_release_keep_it_paused() -> None:
    with vmm_processes() as vmms:
        src = vmms.guest()
        src.wait_for_passes(1)

        async def expiry() -> tuple[float, list[tuple[str, str]]]:
            async with open_client(src.socket) as watcher, open_client(src.socket) as holder:
                await watcher.subscribe(events=["state-change"])
                await holder.pause(lease=0.4)
                paused = time.monotonic()
                # renewals keep it paused well past the first lease
                for _ in range(4):
                    await trio.sleep(0.2)
                    assert (await holder.renew_lease())["expires_in"] == pytest.approx(0.4)
                assert (await watcher.query_status())["state"] == "paused"
                changes = []
                with trio.fail_after(5):
                    while len(changes) < 2:
                        event = await watcher.next_event()
                        changes.append((event.data["old"], event.data["new"]))
                resumed = time.monotonic() - paused
                with pytest.raises(CommandError) as info:
                    await holder.renew_lease()
                assert info.value.code == "no-lease"
                return resumed, changes

        resumed, changes = trio.run(expiry)
        assert changes == [("running", "paused"), ("paused", "running")]
        assert 1.0 < resumed < 3.0  # four renewals of 0.2 s, then the 0.4 s lease
        assert "pause lease of connection" in src.stderr.read_text()
        assert "expired" in src.stderr.read_text()

        # release: the VM stays paused, also once the holder's connection has closed
        with src.client() as client:
            client.pause(lease=0.3)
            client.release_lease()
        time.sleep(0.6)
        assert src.state() == "paused"
        assert refused(src, "release_lease") == "no-lease"
        # a plain pause outlives its connection too; anyone may resume
        with src.client() as client:
            client.resume()
            client.pause()
        time.sleep(0.2)
        assert src.state() == "paused"
        assert refused(src, "pause", lease=0.0) == "invalid-state"

        # a resume by another connection ends the lease
        with src.client() as holder, src.client() as other:
            other.resume()
            assert refused(src, "pause", lease=-1.0) == "invalid-arguments"
            assert refused(src, "pause", lease=1e9) == "invalid-arguments"
            holder.pause(lease=5.0)
            other.resume()
            with pytest.raises(CommandError) as info:
                holder.renew_lease()
            assert info.value.code == "no-lease"
        src.wait_for_passes(max(src.passes().values()) + 2)
        check_continuation(src.text(), "")


HOLD_LEASE = """
import sys, time
from vmipc.client import SyncClient
client = SyncClient(sys.argv[1])
client.pause(lease=60.0)
print("paused", flush=True)
time.sleep(600)
"""

CHECKPOINT_KILLED_IN_ITS_PAUSE = """
import os, signal, sys, trio
from vmipc.client import open_client
from vmipc.sequences import checkpoint

class Dies:
    def __init__(self, client):
        self._client = client
    def __getattr__(self, name):
        if name == "dump_memory":
            os.kill(os.getpid(), signal.SIGKILL)
        return getattr(self._client, name)

async def main():
    async with open_client(sys.argv[1]) as client:
        await checkpoint(Dies(client), sys.argv[2], lease=60.0)

trio.run(main)
"""


def test_a_killed_client_that_holds_a_lease_gets_its_vm_resumed(tmp_path: Path) -> None:
    with vmm_processes() as vmms:
        src = vmms.guest()
        src.wait_for_passes(1)
        # a bare client holding a 60 s lease, killed: the VMM resumes at once
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_LEASE, src.socket], stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout is not None and holder.stdout.readline() == "paused\n"
        assert src.state() == "paused"
        holder.kill()
        holder.wait()
        started = time.monotonic()
        wait_for(lambda: src.state() == "running", timeout=5, what="the VMM resuming")
        assert time.monotonic() - started < 5
        assert "its connection closed" in src.stderr.read_text()

        # a checkpoint killed while its VM is paused (between dump-state and dump-memory)
        snap = f"{tmp_path}/vm.snap"
        proc = subprocess.run(
            [sys.executable, "-c", CHECKPOINT_KILLED_IN_ITS_PAUSE, src.socket, snap], timeout=30
        )
        assert proc.returncode == -9
        wait_for(lambda: src.state() == "running", timeout=5, what="the VMM resuming")
        src.wait_for_passes(max(src.passes().values()) + 2)
        check_continuation(src.text(), "")


def test_a_migrating_client_killed_in_the_stop_and_copy_leaves_the_source_running() -> None:
    with vmm_processes() as vmms:
        src = vmms.guest()
        dst = vmms.incoming()
        src.wait_for_passes(2)
        proc = subprocess.run(
            [sys.executable, "-c", KILL_CLIENT, src.socket, dst.socket, "state"], timeout=30
        )
        assert proc.returncode == -9
        # the source was paused (with its lease) when the client died: it runs again
        wait_for(lambda: src.state() == "running", timeout=5, what="the source resuming")
        # incoming, or paused once its state was loaded: with ordered chains (1.8) its
        # loads run without waiting for the client. Never running: only a resume runs it
        assert dst.state() in ("incoming", "paused")
        assert running_count(src, dst) == 1
        src.wait_for_passes(max(src.passes().values()) + 2)
        check_continuation(src.text(), "")

"""``vmipc restore FILE`` into a waiting ``vmipc vmm --incoming`` maps the file lazily.

``load-memory format=snapshot`` of a regular file maps its memory section copy-on-write over
the machine's RAM, under a read lease on the file, as ``vmm --restore`` does (docs/vmm.md,
"Lazy restore"): nothing is read, so the VMM's memory does not grow with the snapshot's
data; a writer of the file waits until RAM is copied off it; the guest continues exactly,
and can be checkpointed and migrated on like any other. The file is checked as ``vmm
--restore`` checks it before anything can run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.seq_support import (
    VmmProcess,
    Vmms,
    check_continuation,
    check_structure,
    vmipc,
    vmm_processes,
    wait_for,
)
from vmipc.client import CommandError
from vmipc.formats import SnapshotReader

pytestmark = pytest.mark.kvm

#: a working set per vCPU that makes the snapshot's data far larger than a VMM's own memory
BIG_WS = 24 << 20


def rss_bytes(pid: int) -> int:
    """VmRSS of process ``pid`` (anonymous, file and shared memory pages mapped)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def suspended(
    vmms: Vmms, snap: Path, *, memory: str = "64M", ws: int | None = None
) -> tuple[str, int]:
    """A running built-in guest suspended into ``snap``: its console, the pass reached."""
    name = f"src-{snap.stem}"
    src = vmms.guest(name, memory=memory) if ws is None else vmms.guest(name, memory=memory, ws=ws)
    src.wait_for_passes(2, timeout=60)
    done = vmipc("suspend", "--socket", src.socket, str(snap))
    assert done.returncode == 0, done.stderr
    assert src.wait_exit() == 0
    return src.text(), max(src.passes().values())


def waiting(vmms: Vmms, name: str = "dst", memory: str | None = None) -> VmmProcess:
    dst = vmms.incoming(name, memory=memory)
    wait_for(lambda: dst.state() == "incoming", what="the incoming VMM answering")
    return dst


def mapped(pid: int, path: Path) -> bool:
    return str(path) in Path(f"/proc/{pid}/maps").read_text()


def test_restore_into_incoming_maps_the_file_and_rss_does_not_grow_with_the_data(
    tmp_path: Path,
) -> None:
    snap = tmp_path / "big.snap"
    with vmm_processes() as vmms:
        before, reached = suspended(vmms, snap, memory="256M", ws=BIG_WS)
        data = snap.stat().st_blocks * 512
        assert data >= 2 * BIG_WS
        dst = waiting(vmms)
        rss_before = rss_bytes(dst.pid)
        restored = vmipc("restore", "--socket", dst.socket, str(snap), "--paused")
        assert restored.returncode == 0, restored.stderr
        grown = rss_bytes(dst.pid) - rss_before
        # an eager load grows it by the data (48 MiB and more); the mapping by nothing much
        assert grown < 16 << 20, f"RSS grew by {grown >> 20} MiB for {data >> 20} MiB of data"
        assert mapped(dst.pid, snap), "the snapshot file is not mapped"
        with dst.client() as client:
            assert client.query_status()["state"] == "paused"
            client.resume()
        dst.wait_for_passes(reached + 2, timeout=60)
        with dst.client() as client:
            client.pause()
        last = check_structure(before + dst.text())
    assert min(last.values()) >= reached + 2


def test_restore_into_incoming_continues_the_guest_exactly(tmp_path: Path) -> None:
    snap = tmp_path / "vm.snap"
    with vmm_processes() as vmms:
        before, reached = suspended(vmms, snap)
        dst = waiting(vmms)
        restored = vmipc("restore", "--socket", dst.socket, str(snap))
        assert restored.returncode == 0, restored.stderr
        assert mapped(dst.pid, snap)
        dst.wait_for_passes(reached + 3)
        with dst.client() as client:
            client.pause()
        counts = check_continuation(before, dst.text())
    assert min(counts.values()) >= reached + 3


def test_a_writer_truncating_the_file_after_a_restore_into_incoming_does_not_kill_the_guest(
    tmp_path: Path,
) -> None:
    snap = tmp_path / "vm.snap"
    with vmm_processes() as vmms:
        before, reached = suspended(vmms, snap)
        dst = waiting(vmms)
        restored = vmipc("restore", "--socket", dst.socket, str(snap))
        assert restored.returncode == 0, restored.stderr
        dst.wait_for_passes(reached + 1)
        at_write = dst.passes()
        open(snap, "w").close()  # `> FILE`: waits while the VMM copies RAM off the file
        assert snap.stat().st_size == 0
        dst.wait_for_passes(max(at_write.values()) + 2)
        assert not mapped(dst.pid, snap)
        with dst.client() as client:
            assert client.query_status()["state"] == "running"
            client.pause()
        assert "guest RAM copied off it" in dst.stderr.read_text()
        counts = check_continuation(before, dst.text())
    assert all(counts[vcpu] >= done + 2 for vcpu, done in at_write.items()), (at_write, counts)


def test_a_vm_restored_into_incoming_checkpoints_and_migrates_on(tmp_path: Path) -> None:
    """Dirty logging, dumps and the migration's rounds read RAM mapped from the file."""
    snap = tmp_path / "vm.snap"
    again = tmp_path / "again.snap"
    with vmm_processes() as vmms:
        before, reached = suspended(vmms, snap)
        dst = waiting(vmms)
        restored = vmipc("restore", "--socket", dst.socket, str(snap))
        assert restored.returncode == 0, restored.stderr
        dst.wait_for_passes(reached + 1)
        done = vmipc("checkpoint", "--socket", dst.socket, str(again))
        assert done.returncode == 0, done.stderr
        verified = vmipc("snapshot", "verify", str(again))
        assert verified.returncode == 0, verified.stderr
        onward = waiting(vmms, "onward", memory="64M")
        migrated = vmipc("migrate", "--socket", dst.socket, "--to", onward.socket)
        assert migrated.returncode == 0, migrated.stderr
        assert onward.state() == "running"
        dst.wait_exit()
        middle = dst.text()
        onward.wait_for_passes(max(dst.passes().values()) + 2)
        with onward.client() as client:
            client.pause()
        counts = check_continuation(before + middle, onward.text())
        # the checkpoint of the lazily restored VM restores in turn
        third = waiting(vmms, "third")
        restored = vmipc("restore", "--socket", third.socket, str(again))
        assert restored.returncode == 0, restored.stderr
        third.wait_for_passes(reached + 2)
    assert min(counts.values()) >= reached + 2


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


def damage(path: Path, how: str) -> None:
    with open(path, "rb") as file:
        reader = SnapshotReader.from_file(file)
        memory, config = reader.entry("memory"), reader.entry("config")
    if how == "memory-descriptor":
        flip(path, memory.offset + 2048)  # the descriptor's zero padding
    elif how == "state-section":
        flip(path, config.offset + 1)
    else:
        os.truncate(path, path.stat().st_size - 1)


@pytest.mark.parametrize("how", ["memory-descriptor", "state-section", "truncated"])
def test_a_damaged_file_is_refused_before_the_guest_runs(tmp_path: Path, how: str) -> None:
    """The VMM's own checks (the sequence's client checks the structure first too)."""
    snap = tmp_path / "vm.snap"
    with vmm_processes() as vmms:
        suspended(vmms, snap)
        damage(snap, how)
        dst = waiting(vmms, memory="64M")  # the machine exists: load-memory comes first
        with dst.client() as client, open(snap, "rb") as file:
            with pytest.raises(CommandError) as refused:
                client.load_memory(format="snapshot", in_=file.fileno())
            assert refused.value.code == "bad-snapshot", refused.value
            assert not mapped(dst.pid, snap)
            assert client.query_status()["state"] == "incoming"
            with pytest.raises(CommandError):
                client.resume()
        failed = vmipc("restore", "--socket", dst.socket, str(snap))
        assert failed.returncode == 1, failed.stdout
        assert dst.state() == "incoming"


def test_a_second_snapshot_load_replaces_the_first_mapping_and_its_lease(
    tmp_path: Path,
) -> None:
    """load-memory twice: RAM is the second file's, and the first is no longer leased
    (its writer does not wait for a copy)."""
    first, second = tmp_path / "first.snap", tmp_path / "second.snap"
    with vmm_processes() as vmms:
        suspended(vmms, first)
        before, reached = suspended(vmms, second)
        dst = waiting(vmms)
        with dst.client() as client:
            for path in (first, second):
                with open(path, "rb") as file:
                    client.load_memory(format="snapshot", in_=file.fileno())
            assert mapped(dst.pid, second) and not mapped(dst.pid, first)
            open(first, "w").close()  # no lease: nothing to copy
            with open(second, "rb") as file:
                client.load_state(format="snapshot", in_=file.fileno())
            client.resume()
        dst.wait_for_passes(reached + 2)
        with dst.client() as client:
            client.pause()
        assert "copied off" not in dst.stderr.read_text()
        check_continuation(before, dst.text())

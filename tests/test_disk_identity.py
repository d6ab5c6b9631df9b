"""Sequences with a disk (#14), on real KVM: the block device's record names its disk (size
and a cheap fingerprint), restore and load-state refuse another disk (or the same one
written since) unless told to accept it, an incoming VMM gets its image as an fd
(attach-disk), and a live migration with shared storage continues the guest's disk
workload exactly."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest

from tests.builtin_guest import Console
from tests.disk_support import BLOCKS, DISK_SIZE, last_pass, make_image, opened
from tests.seq_support import VmmProcess, Vmms, vmipc, vmm_processes, wait_for
from tests.tls_support import Receiver
from vmipc.client import SyncClient
from vmipc.guest import check_disk_image, disk_pass_sums
from vmipc.memory_layout import MIB
from vmipc.protocol import CommandError
from vmipc.vmm.devices import DiskImage
from vmipc.vmm.machine import BootSource, Machine, MachineConfig, MachineState
from vmipc.vmm.persist import decode_state
from vmipc.vmm.runstate import RunState
from vmipc.vmm.state import StateRecordError

pytestmark = pytest.mark.kvm

MEMORY = 32 * MIB
WORKLOAD = ("disk=1", "depth=4", f"blocks={BLOCKS}", "passes=0")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img")


def assert_exact(text: str) -> None:
    """The disk workload's lines are the model's, from pass 1 on, none missing or twice."""
    lines = [line for line in text.split("\n")[:-1] if "vmipc-guest" not in line]
    assert lines, text
    model = itertools.islice(disk_pass_sums(BLOCKS), len(lines))
    assert lines == [f"vcpu=0 disk pass={n} sum={v:016x}" for n, v in enumerate(model, 1)]


def rchar() -> int:
    """Bytes this process read so far (all read-like system calls, cache hits too)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_the_fingerprint_is_cheap_on_a_large_sparse_image_and_sees_sampled_blocks(
    tmp_path: Path,
) -> None:
    big = tmp_path / "big.img"
    with open(big, "wb") as handle:
        handle.truncate(64 << 30)  # 64 GiB, all hole
    with opened(big) as disk:
        before = rchar()
        first = disk.fingerprint()
        read = rchar() - before
        assert first == disk.fingerprint()  # a pure function of the content
    # 16 blocks of 4 KiB, and /proc/self/io itself
    assert read <= (64 << 10) + 4096, f"the fingerprint read {read} bytes"
    assert os.stat(big).st_blocks == 0  # nothing was written, nothing allocated
    with open(big, "r+b") as handle:  # the last block is sampled
        handle.seek((64 << 30) - 100)
        handle.write(b"x")
    with opened(big) as disk:
        assert disk.fingerprint() != first
    small = tmp_path / "small.img"
    with open(small, "wb") as handle:
        handle.truncate(DISK_SIZE)
    copy = tmp_path / "copy.img"
    shutil.copy(small, copy)
    with opened(small) as a, opened(copy) as b:
        assert a.fingerprint() == b.fingerprint()  # content, not the path
    with open(copy, "r+b") as handle:
        handle.write(b"another disk")
    with open(small, "ab") as handle:
        handle.write(bytes(512))
    with opened(small) as a, opened(copy) as b, opened(tmp_path / "big.img") as c:
        assert len({a.fingerprint(), b.fingerprint(), c.fingerprint(), first}) == 4


def _workload_machine(console: Console, disk: DiskImage) -> Machine:
    options = tuple(tuple(opt.split("=")) for opt in WORKLOAD)
    return Machine(MachineConfig(MEMORY, 1, BootSource(guest_options=options)), console, disk=disk)


def test_restore_refuses_a_disk_written_since_the_state_unless_accepted(
    image: Path, tmp_path: Path
) -> None:
    """The state names its disk (version-2 record: size and fingerprint); the same image
    written after the state was taken is refused (the case that corrupts a guest's file
    system), a copy taken with the state is taken, and accept_disk takes any disk of the
    same mode. A version-1 record has no fingerprint: its size alone is checked."""
    console = Console()
    at_save = tmp_path / "at-save.img"
    with opened(image) as disk, _workload_machine(console, disk) as machine:
        machine.start()
        wait_for(lambda: last_pass(console.text) >= 2, 60, "pass 2")
        machine.pause()
        state = machine.save_state()
        machine.flush_devices()
        shutil.copy(image, at_save)
        assert machine.memory is not None
        reached = last_pass(console.text)
        machine.resume()  # the guest writes on after the state was taken
        wait_for(lambda: last_pass(console.text) >= reached + 2, 60, "two more passes")
        machine.pause()
    record = state.to_dict()["devices"]["virtio-blk"]
    assert record["version"] == 2 and isinstance(record["disk_fingerprint"], int)
    blob = decode_state(_payload(state))
    assert blob.devices["virtio-blk"] == state.devices["virtio-blk"]

    empty = MachineConfig(MEMORY, 1, BootSource("none"))
    with opened(image) as disk, Machine(empty, Console(), disk=disk) as target:
        target.start(paused=True)
        with pytest.raises(StateRecordError, match="fingerprint") as refused:
            target.restore_state(state)
        assert "virtio-blk" in str(refused.value) and "force-disk" in str(refused.value)
        assert target.state is RunState.PAUSED
        target.restore_state(state, accept_disk=True)
    with opened(at_save) as disk, Machine(empty, Console(), disk=disk) as target:
        target.start(paused=True)
        target.restore_state(state)
    old = state.to_dict()
    old["devices"]["virtio-blk"] = {**record, "version": 1}
    del old["devices"]["virtio-blk"]["disk_fingerprint"]
    with opened(image) as disk, Machine(empty, Console(), disk=disk) as target:
        target.start(paused=True)
        target.restore_state(MachineState.from_dict(old))  # no identity: accepted
    other = tmp_path / "bigger.img"
    with open(other, "wb") as handle:
        handle.truncate(2 * DISK_SIZE)
    with opened(other) as disk, Machine(empty, Console(), disk=disk) as target:
        target.start(paused=True)
        with pytest.raises(StateRecordError, match="bytes"):
            target.restore_state(state)
        target.restore_state(state, accept_disk=True)
    with opened(image, readonly=True) as disk, Machine(empty, Console(), disk=disk) as target:
        target.start(paused=True)
        with pytest.raises(StateRecordError, match="writable"):
            target.restore_state(state, accept_disk=True)  # the mode is never forced


def _payload(state: MachineState) -> bytes:
    return msgpack.packb(state.to_dict(), use_bin_type=True)  # type: ignore[no-any-return]


def test_attach_disk_checks_the_fd_and_never_replaces_a_disk(image: Path, tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1000))
    with vmm_processes() as vmms:
        dst = vmms.incoming("dst", memory=None)
        with dst.client() as client:
            bad: list[tuple[int, bool, str]] = []
            bad.append((os.open(image, os.O_RDWR | os.O_APPEND), False, "O_APPEND"))
            bad.append((os.open(image, os.O_RDONLY), False, "writing"))
            bad.append((os.open(odd, os.O_RDWR), False, "multiple of 512"))
            left, right = socket.socketpair()
            bad.append((left.detach(), False, "regular file or block device"))
            for fd, readonly, problem in bad:
                try:
                    with pytest.raises(CommandError) as refused:
                        client.call("attach-disk", fds={"disk": fd}, readonly=readonly)
                finally:
                    os.close(fd)
                assert refused.value.code == "invalid-fds", refused.value
                assert problem in str(refused.value), refused.value
            right.close()
            fd = os.open(image, os.O_RDONLY)
            try:
                assert client.attach_disk(disk=fd, readonly=True)["size"] == DISK_SIZE
                with pytest.raises(CommandError) as twice:
                    client.attach_disk(disk=fd, readonly=True)
                assert twice.value.code == "disk-present"
            finally:
                os.close(fd)
        started = vmms._start("with-disk", ["--incoming", "--disk", str(image)], [])
        with started.client() as client:
            fd = os.open(image, os.O_RDWR)
            try:
                with pytest.raises(CommandError) as present:
                    client.attach_disk(disk=fd)
            finally:
                os.close(fd)
        assert present.value.code == "disk-present"


def _disk_guest(vmms: Vmms, image: Path, name: str = "src") -> VmmProcess:
    args = ["--memory", "32M", "--disk", str(image)]
    for opt in WORKLOAD:
        args += ["--guest-opt", opt]
    return vmms._start(name, args, [])


def _run_on(vmm: VmmProcess, reached: int) -> str:
    """Wait until the guest at ``vmm`` printed three more passes, pause it; its text."""
    wait_for(lambda: last_pass(vmm.text()) >= reached + 3, 60, "three more passes")
    with vmm.client() as client:
        client.pause()
    return vmm.text()


def test_checkpoint_restore_with_the_disk_refuses_another_unless_forced(
    image: Path, tmp_path: Path
) -> None:
    """Suspend mid-workload (checkpoint, then the source quits: the disk stays as the
    snapshot has it). Restored into a VMM without --disk, the image passed as an fd:
    the workload continues exactly and the image checks. Another disk is refused by
    `vmipc restore` and `vmm --restore`, and accepted with --force-disk; so is the same
    image after a live checkpoint whose VM wrote on."""
    snap = tmp_path / "vm.snap"
    live = tmp_path / "live.snap"
    other = tmp_path / "other.img"
    with vmm_processes() as vmms:
        src = _disk_guest(vmms, image)
        wait_for(lambda: last_pass(src.text()) >= 2, 60, "pass 2")
        done = vmipc("checkpoint", "--socket", src.socket, str(live))
        assert done.returncode == 0, done.stderr
        moved_on = last_pass(src.text()) + 2
        wait_for(lambda: last_pass(src.text()) >= moved_on, 60, "two more passes")
        done = vmipc("suspend", "--socket", src.socket, str(snap))
        assert done.returncode == 0, done.stderr
        assert src.wait_exit() == 0
        before = src.text()
        shutil.copy(image, other)
        with open(other, "r+b") as handle:
            handle.write(b"not the same disk")

        dst = vmms.incoming("dst", memory=None)
        refused = vmipc("restore", "--socket", dst.socket, "--disk", str(other), str(snap))
        assert refused.returncode == 1, refused.stderr
        assert "fingerprint" in refused.stderr and "--force-disk" in refused.stderr
        assert "bad-state" in refused.stderr, refused.stderr
        assert dst.state() == "incoming"
        stale = vmms.incoming("stale", memory=None)
        refused = vmipc("restore", "--socket", stale.socket, "--disk", str(image), str(live))
        assert refused.returncode == 1 and "written since" in refused.stderr, refused.stderr

        lone = vmipc("vmm", "--restore", str(snap), "--disk", str(other), timeout=60)
        assert lone.returncode != 0 and "fingerprint" in lone.stderr, lone.stderr
        forced = vmms._start(
            "forced", ["--restore", str(snap), "--disk", str(other), "--force-disk"], []
        )
        assert forced.state() == "running"
        forced.stop()
        forced_fd = vmms.incoming("forced-fd", memory=None)
        accepted = vmipc(
            "restore", "--socket", forced_fd.socket, "--disk", str(other), "--force-disk",
            "--json", str(snap),
        )  # fmt: skip
        assert accepted.returncode == 0, accepted.stderr
        assert forced_fd.state() == "running"
        forced_fd.stop()

        target = vmms.incoming("target", memory=None)
        restored = vmipc(
            "restore", "--socket", target.socket, "--disk", str(image), "--json", str(snap)
        )
        assert restored.returncode == 0, restored.stderr
        steps = [step["name"] for step in json.loads(restored.stdout)["timeline"]]
        assert steps.index("attach-disk") < steps.index("load-state")
        after = _run_on(target, last_pass(before))
    assert_exact(before + after)
    check = check_disk_image(image.read_bytes(), BLOCKS)
    assert check.consistent_with(last_pass(before + after)), check


@pytest.mark.parametrize("how", ["disk-at-start", "disk-passed", "disk-passed-configured"])
def test_live_migration_with_shared_storage_continues_the_disk_workload(
    image: Path, how: str
) -> None:
    """The guest's disk workload (depth 4) migrates VMM to VMM, the destination opening
    the same image (--disk at its start, or passed by `vmipc migrate --disk`, before its
    machine is built or after --memory built it): its lines continue exactly and every
    block of the image checks afterwards."""
    with vmm_processes() as vmms:
        src = _disk_guest(vmms, image)
        extra: tuple[str, ...] = ("--disk", str(image))
        if how == "disk-at-start":
            dst = vmms._start("dst", ["--incoming", "--disk", str(image)], [])
            extra = ()
        elif how == "disk-passed":
            dst = vmms.incoming("dst", memory=None)
        else:
            dst = vmms._start("dst", ["--incoming", "--memory", "32M", "--vcpus", "1"], [])
        wait_for(lambda: last_pass(src.text()) >= 2, 60, "pass 2")
        done = vmipc("migrate", "--socket", src.socket, "--to", dst.socket, "--json", *extra)
        assert done.returncode == 0, done.stderr
        assert src.wait_exit() == 0
        before = src.text()
        after = _run_on(dst, last_pass(before))
        with SyncClient(dst.socket) as client:
            assert client.query_status()["state"] == "paused"
    assert_exact(before + after)
    check = check_disk_image(image.read_bytes(), BLOCKS)
    assert check.consistent_with(last_pass(before + after)), check


def test_a_migration_to_a_destination_with_another_disk_leaves_the_source_running(
    image: Path, tmp_path: Path
) -> None:
    """The destination's load-state refuses the state (another disk): the migration
    fails before the switch-over, the source runs on exactly, the destination is gone."""
    other = tmp_path / "other.img"
    with vmm_processes() as vmms:
        src = _disk_guest(vmms, image)
        wait_for(lambda: last_pass(src.text()) >= 2, 60, "pass 2")
        shutil.copy(image, other)
        with open(other, "r+b") as handle:
            handle.write(b"not the same disk")
        dst = vmms._start("dst", ["--incoming", "--disk", str(other)], [])
        done = vmipc("migrate", "--socket", src.socket, "--to", dst.socket)
        assert done.returncode == 1, done.stderr
        assert "fingerprint" in done.stderr and "source" in done.stderr, done.stderr
        assert src.state() == "running"
        dst.wait_exit()
        text = _run_on(src, last_pass(src.text()))
    assert_exact(text)
    assert check_disk_image(image.read_bytes(), BLOCKS).consistent_with(last_pass(text))


def test_a_migration_over_tcp_passes_the_disk_at_the_receiving_side(image: Path) -> None:
    """`vmipc receive --disk IMAGE` (plain TCP on loopback): the receiver starts the
    incoming VMM, opens the image and passes it (attach-disk); the workload continues
    exactly there."""
    report: dict = {}
    with vmm_processes() as vmms:
        src = _disk_guest(vmms, image)
        receiver = Receiver(vmms.tmp, ["--disk", str(image)])
        try:
            wait_for(lambda: last_pass(src.text()) >= 2, 60, "pass 2")
            to = f"tcp:127.0.0.1:{receiver.port}"
            done = vmipc("migrate", "--socket", src.socket, "--to", to, "--json")
            assert done.returncode == 0, done.stderr
            # plain TCP: nothing but the stream's own checksums guards the pages
            assert json.loads(done.stdout)["page_checksum"] == "full"
            code, report = receiver.result()
            assert code == 0 and report["outcome"] == "running", report
            assert src.wait_exit() == 0
            before = src.text()
            reached = last_pass(before)
            console = receiver.console
            wait_for(lambda: last_pass(console.read_text()) >= reached + 3, 60, "more passes")
            with SyncClient(report["socket"]) as client:
                client.pause()
            after = console.read_text()
        finally:
            receiver.stop()
            _stop_started(report)
    assert_exact(before + after)
    assert check_disk_image(image.read_bytes(), BLOCKS).consistent_with(last_pass(before + after))


def _stop_started(report: dict) -> None:
    """The VMM a receiver started outlives it: quit it, else kill it by its pid."""
    if report.get("socket"):
        with contextlib.suppress(Exception), SyncClient(report["socket"], timeout=5) as client:
            client.quit()
    pid = report.get("pid")
    if pid:
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

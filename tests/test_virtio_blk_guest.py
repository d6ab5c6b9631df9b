"""The virtio block device on real KVM, driven by the built-in guest's disk workload
(``disk=1``): its lines are the model's, its blocks check from outside (the test reads
the image), pause drains, save/restore and suspend/restore continue it exactly, bad
requests get an error status, and state records that do not fit are refused."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from tests.builtin_guest import Console
from tests.disk_support import BLOCKS, DISK_SIZE, last_pass, make_image, opened
from tests.seq_support import VMIPC, vmipc, vmm_processes, wait_for
from vmipc.guest import check_disk_image, disk_pass_sums, expected_disk_lines
from vmipc.memory_layout import MIB
from vmipc.vmm.devices import VirtioBlk
from vmipc.vmm.machine import BootSource, Machine, MachineConfig, MachineState
from vmipc.vmm.persist import decode_state
from vmipc.vmm.persist.errors import BulkError
from vmipc.vmm.runstate import RunState
from vmipc.vmm.state import StateRecordError

pytestmark = pytest.mark.kvm

MEMORY = 32 * MIB


def disk_config(passes: int, *, mode: int = 1, depth: int = 4) -> MachineConfig:
    options = (
        ("disk", str(mode)),
        ("depth", str(depth)),
        ("blocks", str(BLOCKS)),
        ("passes", str(passes)),
    )
    return MachineConfig(MEMORY, 1, BootSource(guest_options=options))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img")


def disk_lines(console: Console) -> list[str]:
    return [line for line in console.lines() if not line.startswith("vmipc-guest ")]


def test_the_disk_workload_runs_and_its_blocks_check_from_outside(image: Path) -> None:
    console = Console()
    with opened(image) as disk, Machine(disk_config(3, depth=8), console, disk=disk) as machine:
        machine.start()
        assert machine.wait_stopped(60) is RunState.SHUTDOWN, console.text
        assert machine.power_off_code == 0
    assert disk_lines(console) == expected_disk_lines(3, BLOCKS)
    check = check_disk_image(image.read_bytes(), BLOCKS)
    assert check.passes == dict.fromkeys(range(BLOCKS), 3) and not check.torn


def test_bad_requests_from_the_guest_get_an_error_status_never_a_crash(image: Path) -> None:
    """disk=2: a buffer outside RAM, a length that is not whole sectors, a sector past the
    end, an unknown type (error statuses), a descriptor loop (the device asks for a
    reset); then the workload runs as usual on the reset device."""
    console = Console()
    with opened(image) as disk, Machine(disk_config(2, mode=2), console, disk=disk) as machine:
        machine.start()
        assert machine.wait_stopped(60) is RunState.SHUTDOWN, console.text
    assert disk_lines(console) == expected_disk_lines(2, BLOCKS, bad=True)


def test_pause_drains_and_the_workload_continues_exactly(image: Path) -> None:
    """When pause returns, every request taken has completed and its used entry is
    written (the record has nothing in flight), and neither the image nor the guest's RAM
    changes while paused."""
    console = Console()
    passes = 40
    pauses = 0
    with opened(image) as disk, Machine(disk_config(passes), console, disk=disk) as machine:
        machine.start()
        assert machine.memory is not None
        while machine.state is RunState.RUNNING and pauses < 15:
            time.sleep(0.02 + 0.007 * pauses)
            try:
                machine.pause()
            except Exception:
                break  # the guest finished meanwhile
            pauses += 1
            record = machine.save_state().devices["virtio-blk"]
            assert record.used_idx == record.last_avail
            low_ram = hashlib.sha256(machine.memory.view[: 4 * MIB]).digest()
            on_disk = image.read_bytes()
            time.sleep(0.01)
            assert hashlib.sha256(machine.memory.view[: 4 * MIB]).digest() == low_ram
            assert image.read_bytes() == on_disk
            machine.resume()
        assert machine.wait_stopped(120) is RunState.SHUTDOWN, console.text
    assert pauses >= 3
    assert disk_lines(console) == expected_disk_lines(passes, BLOCKS)


def test_save_and_restore_into_a_fresh_machine_continues_the_disk_workload(image: Path) -> None:
    passes = 12
    first, second = Console(), Console()
    with opened(image) as disk:
        with Machine(disk_config(passes), first, disk=disk) as machine:
            machine.start()
            wait_for(lambda: last_pass(first.text) >= 2, 60, "pass 2")
            machine.pause()
            state = machine.save_state()
            machine.flush_devices()
            assert machine.memory is not None
            ram = bytes(machine.memory.view)
        reached = last_pass(first.text)
        record = msgpack.unpackb(msgpack.packb(state.to_dict()), raw=False)
        # the image as it was saved checks: whole blocks of the pass printed or the next
        check = check_disk_image(image.read_bytes(), BLOCKS)
        assert check.consistent_with(reached), check
        with Machine(MachineConfig(MEMORY, 1, BootSource("none")), second, disk=disk) as target:
            target.start(paused=True)
            assert target.memory is not None
            target.memory.view[:] = ram
            target.restore_state(MachineState.from_dict(record))
            target.resume()
            assert target.wait_stopped(60) is RunState.SHUTDOWN, second.text
    text = first.text + second.text
    lines = [line for line in text.split("\n")[:-1] if not line.startswith("vmipc-guest ")]
    assert lines == expected_disk_lines(passes, BLOCKS)
    assert check_disk_image(image.read_bytes(), BLOCKS).passes == dict.fromkeys(
        range(BLOCKS), passes
    )


def test_a_state_that_does_not_fit_the_disk_is_refused(image: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    with open(other, "wb") as handle:
        handle.truncate(2 * DISK_SIZE)
    with opened(image) as disk, Machine(disk_config(0), Console(), disk=disk) as machine:
        machine.start()
        time.sleep(0.1)
        machine.pause()
        state = machine.save_state()
    empty = MachineConfig(MEMORY, 1, BootSource("none"))
    for target_disk in (other, image, None):
        readonly = target_disk == image
        with (
            opened(target_disk, readonly) if target_disk else nothing() as disk,
            Machine(empty, Console(), disk=disk) as target,
        ):
            target.start(paused=True)
            with pytest.raises(StateRecordError, match="virtio-blk"):
                target.restore_state(state)
            assert target.state is RunState.PAUSED


@contextmanager
def nothing() -> Iterator[None]:
    yield None


def test_hostile_device_records_in_a_state_blob_are_refused() -> None:
    with Machine(MachineConfig(MEMORY, 1, BootSource("none")), Console()) as machine:
        machine.start(paused=True)
        good = machine.save_state().to_dict()
    assert decode_state(_blob(good)).devices["virtio-blk"] == VirtioBlk.empty_state()
    for change in (
        {"queue_num": 100},
        {"used_idx": 1, "queue_ready": 1, "disk_sectors": 8, "status": 15},  # in flight
        {"status": 4},  # driven without a disk
        {"disk_sectors": 1 << 60},
        {"queue_desc": b"\0" * 8},
        {"version": 9},
        {"extra": 1},
    ):
        record = {**good, "devices": {**good["devices"]}}
        record["devices"]["virtio-blk"] = {**good["devices"]["virtio-blk"], **change}
        with pytest.raises(BulkError, match="refused"):
            decode_state(_blob(record))
    for devices in ({"uart": good["devices"]["uart"]}, {**good["devices"], "disk2": {}}):
        with pytest.raises(BulkError, match="refused"):
            decode_state(_blob({**good, "devices": devices}))


def _blob(record: dict[str, object]) -> bytes:
    return msgpack.packb(record, use_bin_type=True)  # type: ignore[no-any-return]


def test_a_version_1_state_restores_into_a_machine_without_a_disk(image: Path) -> None:
    """Old (version 1) blobs and snapshots still restore: into a machine without a disk;
    a machine with one refuses them (the guest never saw a disk)."""
    console = Console()
    config = MachineConfig(MEMORY, 1, BootSource(guest_options=(("ws", "65536"),)))
    with Machine(config, console) as machine:
        machine.start()
        wait_for(lambda: "pass=2 " in console.text, 30, "pass 2")
        machine.pause()
        record = machine.save_state().to_dict()
        assert machine.memory is not None
        ram = bytes(machine.memory.view)
    record["version"] = 1
    del record["devices"]["virtio-blk"]
    old = decode_state(_blob(record))
    assert old.devices["virtio-blk"] == VirtioBlk.empty_state()
    empty = MachineConfig(MEMORY, 1, BootSource("none"))
    with opened(image) as disk, Machine(empty, Console(), disk=disk) as target:
        target.start(paused=True)
        with pytest.raises(StateRecordError, match=r"no disk|sectors"):
            target.restore_state(old)
    after = Console()
    with Machine(empty, after) as target:
        target.start(paused=True)
        assert target.memory is not None
        target.memory.view[:] = ram
        target.restore_state(old)
        target.resume()
        wait_for(lambda: after.text.count("\n") >= 3, 30, "three more lines")
        target.pause()
    assert "ERROR" not in after.text


def test_a_sandboxed_vmm_suspends_and_restores_with_its_disk(image: Path, tmp_path: Path) -> None:
    """vmipc vmm --disk in capability mode (the image opened before the sandbox, preadv,
    pwrite and fdatasync allowed), suspended mid-workload and restored with the same
    disk: the lines continue exactly and every block checks; another disk is refused."""
    snap = tmp_path / "vm.snap"
    args = ["--memory", "32M", "--disk", str(image)]
    for opt in ("disk=1", "depth=4", f"blocks={BLOCKS}", "passes=0"):
        args += ["--guest-opt", opt]
    with vmm_processes() as vmms:
        src = vmms._start("src", args, [])
        wait_for(lambda: last_pass(src.text()) >= 2, 60, "pass 2")
        done = vmipc("suspend", "--socket", src.socket, str(snap))
        assert done.returncode == 0, done.stderr
        assert src.wait_exit() == 0
        before = src.text()
        reached = last_pass(before)
        check = check_disk_image(image.read_bytes(), BLOCKS)
        assert check.consistent_with(reached), check
        other = tmp_path / "other.img"
        with open(other, "wb") as handle:
            handle.truncate(2 * DISK_SIZE)
        refused = vmipc("vmm", "--restore", str(snap), "--disk", str(other), timeout=60)
        assert refused.returncode != 0 and "virtio-blk" in refused.stderr, refused.stderr
        dst = vmms._start("dst", ["--restore", str(snap), "--disk", str(image)], [])
        wait_for(lambda: last_pass(dst.text()) >= reached + 3, 60, "three more passes")
        with dst.client() as client:
            client.pause()
        after = dst.text()
        check = check_disk_image(image.read_bytes(), BLOCKS)
        assert check.consistent_with(last_pass(before + after)), check
    lines = [line for line in (before + after).split("\n")[:-1] if "vmipc-guest" not in line]
    model = itertools.islice(disk_pass_sums(BLOCKS), len(lines))
    assert lines == [f"vcpu=0 disk pass={n} sum={v:016x}" for n, v in enumerate(model, 1)]


def test_flush_devices_makes_the_disk_durable_on_request_and_checkpoints_send_it(
    tmp_path: Path,
) -> None:
    """`flush-devices` (1.8): pause drains, it does not flush; a checkpoint flushes while
    the guest is paused, so that the image matches the snapshot. Without a disk, or with a
    read-only one, it does nothing and says so by succeeding."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    for n, spec in enumerate((str(image), f"{image},readonly")):
        sock = tmp_path / f"vm{n}.sock"
        proc = subprocess.Popen(
            [*VMIPC, "vmm", "--disk", spec, "--socket", str(sock), "--console", "/dev/null",
             "--no-console-input", "--memory", "64M"],
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while vmipc("call", "--socket", str(sock), "query-status").returncode != 0:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
            flushed = subprocess.run(
                [*VMIPC, "call", "--socket", str(sock), "--json", "flush-devices"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert flushed.returncode == 0 and json.loads(flushed.stdout) == {}, flushed.stderr
            snap = subprocess.run(
                [*VMIPC, "checkpoint", "--socket", str(sock), "--json", str(tmp_path / "s")],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert snap.returncode == 0, snap.stderr
            steps = [t["name"] for t in json.loads(snap.stdout)["timeline"]]
            assert steps.index("dump-memory") < steps.index("flush-devices") < steps.index("resume")
        finally:
            proc.kill()
            proc.wait(10)
            (tmp_path / "s").unlink(missing_ok=True)


def test_a_pause_waiting_for_a_slow_disk_request_does_not_block_its_caller(image: Path) -> None:
    """``begin_pause`` is what the control server's event loop calls: while the block
    device finishes a request it took (a slow disk, an fdatasync), it must return at once
    and call ``wake`` when the drain is done, not hold the loop (and every other client)
    for the length of the I/O. The pause still drains: it completes only after the
    request did."""
    console = Console()
    with opened(image) as disk, Machine(disk_config(0), console, disk=disk) as machine:
        device = machine.devices.get("virtio-blk", VirtioBlk)
        entered, release = threading.Event(), threading.Event()
        transfer = device._transfer

        def slow_transfer(*args: Any, **kwargs: Any) -> None:
            entered.set()
            release.wait(30)
            transfer(*args, **kwargs)

        device._transfer = slow_transfer  # type: ignore[method-assign]
        machine.start()
        assert entered.wait(60), console.text
        woken = threading.Event()
        outcome: list[bool] = []
        caller = threading.Thread(
            target=lambda: outcome.append(machine.begin_pause(woken.set, within=2.0)), daemon=True
        )
        caller.start()
        caller.join(10)
        try:
            assert not caller.is_alive(), "begin_pause blocked on the disk request"
            assert outcome == [False] and machine.state is RunState.RUNNING
            assert not woken.is_set()
        finally:
            release.set()
        assert woken.wait(30)
        assert machine.finish_pause(woken.set) is True
        assert machine.state is RunState.PAUSED
        record = machine.save_state().devices["virtio-blk"]
        assert record.used_idx == record.last_avail
        device._transfer = transfer  # type: ignore[method-assign]
        machine.resume()


def test_the_io_benchmark_mode_runs_its_four_tests(image: Path) -> None:
    """disk=3 (benchmarks/bench_blk.py): four tests, each line well formed, requests
    counted, and the writes reached the image. No timing is asserted."""
    options = (
        ("disk", "3"),
        ("depth", "4"),
        ("blocks", str(BLOCKS)),
        ("benchms", "20"),
        ("seqbs", "16K"),
    )
    console = Console()
    config = MachineConfig(MEMORY, 1, BootSource(guest_options=options))
    with opened(image) as disk, Machine(config, console, disk=disk) as machine:
        machine.start()
        assert machine.wait_stopped(60) is RunState.SHUTDOWN, console.text
        assert machine.power_off_code == 0
    lines = disk_lines(console)
    assert lines[-1] == "vcpu=0 done"
    tests = []
    for line in lines[:-1]:
        m = re.fullmatch(
            r"vcpu=0 disk bench=(\w+) bs=(\d+) depth=4 ops=(\d+) ns=(\d+) iops=\d+ kib_s=\d+", line
        )
        assert m, line
        tests.append((m.group(1), int(m.group(2))))
        assert int(m.group(3)) > 0 and int(m.group(4)) > 0
    assert tests == [
        ("randread", 4096),
        ("randwrite", 4096),
        ("seqread", 16384),
        ("seqwrite", 16384),
    ]
    assert image.read_bytes()[: BLOCKS * 4096] != bytes(BLOCKS * 4096)

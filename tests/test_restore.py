"""vmipc vmm --restore: a snapshot becomes a running guest, lazily mapped or loaded."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from tests.builtin_guest import Console, check_against_model
from tests.state_support import vcpu_record_v1
from tests.test_bulk_commands import WS, compose_snapshot, vmms
from vmipc.formats import SnapshotHeader, SnapshotReader, new_snapshot_id
from vmipc.formats.snapshot import MEMORY_ENCODING_PAGE_STREAM, build_snapshot
from vmipc.kvm import structs
from vmipc.memory_layout import MIB
from vmipc.protocol import CommandError
from vmipc.vmm.builder import RestoreError, RestoreOptions, restore_machine
from vmipc.vmm.runstate import RunState
from vmipc.vmm.state import MSR_ENTRY, VcpuState

pytestmark = pytest.mark.kvm

IGNORE_MSRS = "/sys/module/kvm/parameters/ignore_msrs"


def snapshot_of_a_running_guest(path: Path) -> tuple[str, int]:
    """Run the built-in guest, snapshot it; returns its console so far and the pass reached."""
    with vmms() as make:
        vmm = make()
        vmm.console.wait_for_passes(2, 2)
        with vmm.client() as client:
            client.pause()
            reached = max(vmm.console.passes().values())
            compose_snapshot(client, path)
        return vmm.console.text, reached


def restore_options(**overrides: bool) -> RestoreOptions:
    return RestoreOptions(**overrides)


@pytest.mark.parametrize("eager", [False, True], ids=["lazy", "eager"])
def test_restored_guest_continues_exactly(tmp_path: Path, eager: bool) -> None:
    path = tmp_path / "snap.vmipc"
    before, reached = snapshot_of_a_running_guest(path)
    console = Console()
    machine = restore_machine(str(path), console, restore_options(eager=eager, verify=True))
    try:
        assert machine.state is RunState.RUNNING
        assert machine.memory is not None
        assert machine.memory.fd_is_ram is eager
        console.wait_for_passes(2, reached + 2)
        machine.pause()
    finally:
        machine.close()
    check_against_model((before + console.text).split("\n")[:-1], 2, WS)


def test_restore_paused_runs_nothing_until_resumed(tmp_path: Path) -> None:
    path = tmp_path / "snap.vmipc"
    snapshot_of_a_running_guest(path)
    console = Console()
    machine = restore_machine(str(path), console, restore_options(paused=True))
    try:
        time.sleep(0.2)
        assert machine.state is RunState.PAUSED
        assert console.text == ""
        machine.resume()
        console.wait_for_passes(2, 1, timeout=30)
    finally:
        machine.close()


def test_lazy_restore_leaves_the_snapshot_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "snap.vmipc"
    snapshot_of_a_running_guest(path)
    original = path.read_bytes()
    console = Console()
    machine = restore_machine(str(path), console, restore_options())
    try:
        console.wait_for_passes(2, 1)
    finally:
        machine.close()
    assert path.read_bytes() == original  # the guest's writes stayed in its private mapping


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[:-100], "trailer"),
        (lambda data: data[:4096] + bytes([data[4096] ^ 1]) + data[4097:], "config"),
    ],
    ids=["truncated", "corrupt-config"],
)
def test_a_damaged_snapshot_is_refused_in_one_line(
    tmp_path: Path, damage: Callable[[bytes], bytes], message: str
) -> None:
    path = tmp_path / "snap.vmipc"
    snapshot_of_a_running_guest(path)
    bad = tmp_path / "bad.vmipc"
    bad.write_bytes(damage(path.read_bytes()))
    with pytest.raises(RestoreError, match=message):
        restore_machine(str(bad), Console(), restore_options())
    result = subprocess.run(
        [sys.executable, "-m", "vmipc", "vmm", "--restore", str(bad), "--no-console-input"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"vmipc vmm: cannot restore {bad}: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_restore_with_a_control_socket(tmp_path: Path) -> None:
    path = tmp_path / "snap.vmipc"
    before, reached = snapshot_of_a_running_guest(path)
    console = tmp_path / "console"
    sock = f"/tmp/vmipc-restore-{os.getpid()}.sock"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmipc",
            "vmm",
            "--restore",
            str(path),
            "--socket",
            sock,
            "--console",
            str(console),
            "--no-console-input",
        ],
        stdin=subprocess.DEVNULL,
    )
    try:
        from vmipc.client import SyncClient

        deadline = time.monotonic() + 20
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        with SyncClient(sock, timeout=20) as client:
            assert client.query_status()["state"] == "running"
            deadline = time.monotonic() + 20
            while console.read_text().count("\n") < 6 and time.monotonic() < deadline:
                time.sleep(0.05)
            client.pause()
            client.quit()
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    check_against_model((before + console.read_text()).split("\n")[:-1], 2, WS)
    assert reached >= 2


# --- files restore refuses: one line, exit 1, and `snapshot verify` agrees ---------------


@pytest.fixture(scope="module")
def real_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("real") / "snap.vmipc"
    snapshot_of_a_running_guest(path)
    return path


def rewritten(source: Path, target: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """A sealed copy of snapshot ``source`` whose records ``change`` edited: it gets
    ``{"config": map, "vcpus": map, "devices": map, "memory": bytearray}`` (the memory
    section whole: descriptor page, then the image)."""
    reader = SnapshotReader.from_file(open(source, "rb"), max_read=1 << 30)  # noqa: SIM115
    records: dict[str, Any] = {
        name: msgpack.unpackb(reader.read_section(name)) for name in ("config", "vcpus", "devices")
    }
    records["memory"] = bytearray(reader.read_section("memory"))
    change(records)
    sections = [(name, 1, msgpack.packb(records[name])) for name in ("config", "vcpus", "devices")]
    sections.append(("memory", 1, bytes(records["memory"])))
    header = SnapshotHeader(new_snapshot_id(), "vmipc-test")
    target.write_bytes(build_snapshot(header, sections))
    return target


def set_config(**values: Any) -> Callable[[dict[str, Any]], None]:
    def change(records: dict[str, Any]) -> None:
        records["config"].update(values)

    return change


def no_vcpus(records: dict[str, Any]) -> None:
    records["config"]["vcpus"] = 0
    records["vcpus"]["vcpus"] = []


def page_stream_encoding(records: dict[str, Any]) -> None:
    # a full snapshot's memory claims to be a page stream: mapped as RAM as it is, the
    # guest would run on the stream's bytes
    struct.pack_into("<I", records["memory"], 4, MEMORY_ENCODING_PAGE_STREAM)


def refused_msr(records: dict[str, Any]) -> None:
    vcpu = records["vcpus"]["vcpus"][0]  # MSRs packed (vcpu record version 2), TSC first
    vcpu["msrs"] = vcpu["msrs"][:12] + MSR_ENTRY.pack(0xDEADBEEF, 1) + vcpu["msrs"][12:]


def refused_sregs(records: dict[str, Any]) -> None:
    vcpu = records["vcpus"]["vcpus"][0]
    sregs = structs.KvmSregs.from_buffer_copy(vcpu["sregs"])
    sregs.efer = 0xFFFF_0000_0000  # reserved bits: KVM_SET_SREGS says EINVAL
    vcpu["sregs"] = bytes(sregs)


#: (change, what the one line says, whether `snapshot verify` can tell without KVM)
BAD_FILES: dict[str, tuple[Callable[[dict[str, Any]], None], str, bool]] = {
    "memory-section-smaller-than-ram": (set_config(memory_size=128 * MIB), "layout", True),
    "no-vcpus": (no_vcpus, "vcpus", True),
    "unusable-memory-size": (set_config(memory_size=8 * MIB), "memory size", True),
    "too-many-vcpus": (set_config(vcpus=10_000), "vcpu", True),
    "full-snapshot-with-a-page-stream": (page_stream_encoding, "page stream", True),
    "msr-kvm-refuses": (refused_msr, "MSR 0xdeadbeef", False),
    "sregs-kvm-refuses": (refused_sregs, "KVM_SET_SREGS", False),
}


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_files_restore_refuses_exit_1_in_one_line_and_verify_agrees(
    real_snapshot: Path, tmp_path: Path, case: str
) -> None:
    change, says, verify_sees_it = BAD_FILES[case]
    ignore_msrs = Path(IGNORE_MSRS)
    if case == "msr-kvm-refuses" and ignore_msrs.exists() and ignore_msrs.read_text()[:1] == "Y":
        pytest.skip("kvm.ignore_msrs=Y: KVM accepts any MSR")
    bad = rewritten(real_snapshot, tmp_path / "bad.vmipc", change)
    for extra in ([], ["--eager"]):
        result = subprocess.run(
            [sys.executable, "-m", "vmipc", "vmm", "--restore", str(bad), *extra],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        line = one_line(result.stderr)
        assert result.returncode == 1, (extra, line)
        assert line.startswith(f"vmipc vmm: cannot restore {bad}: "), (extra, line)
        assert says in line, (extra, line)
    verify = subprocess.run(
        [sys.executable, "-m", "vmipc", "snapshot", "verify", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if verify_sees_it:
        line = one_line(verify.stderr)
        assert verify.returncode == 1, line
        assert line.startswith(f"vmipc snapshot: {bad}: "), line
        assert says in line, line
    else:  # only KVM can tell
        assert verify.returncode == 0, verify.stderr


def verifies(path: Path) -> None:
    """``vmipc snapshot verify FILE`` accepts the file."""
    verify = subprocess.run(
        [sys.executable, "-m", "vmipc", "snapshot", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stderr


def test_verify_accepts_what_restore_accepts(real_snapshot: Path, tmp_path: Path) -> None:
    copy = rewritten(real_snapshot, tmp_path / "copy.vmipc", lambda records: None)
    for path in (real_snapshot, copy):
        verifies(path)
    console = Console()
    machine = restore_machine(str(copy), console, restore_options(verify=True))
    try:
        console.wait_for_passes(2, 1)
    finally:
        machine.close()


def vcpu_records_version_1(records: dict[str, Any]) -> None:
    vcpus = [VcpuState.from_dict(record) for record in records["vcpus"]["vcpus"]]
    assert vcpus and {record["version"] for record in records["vcpus"]["vcpus"]} == {2}
    records["vcpus"]["vcpus"] = [vcpu_record_v1(vcpu) for vcpu in vcpus]


def test_a_snapshot_of_version_1_vcpu_records_restores_and_the_guest_continues_exactly(
    tmp_path: Path,
) -> None:
    """A file written before the vCPU record's version 2 (CPUID and MSRs as arrays)."""
    path = tmp_path / "snap.vmipc"
    before, reached = snapshot_of_a_running_guest(path)
    old = rewritten(path, tmp_path / "old.vmipc", vcpu_records_version_1)
    verifies(old)
    console = Console()
    machine = restore_machine(str(old), console, restore_options(verify=True))
    try:
        console.wait_for_passes(2, reached + 2)
        machine.pause()
    finally:
        machine.close()
    check_against_model((before + console.text).split("\n")[:-1], 2, WS)


def test_restore_of_a_directory_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vmipc", "vmm", "--restore", "/"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert one_line(result.stderr) == "vmipc vmm: cannot restore /: Is a directory"
    assert result.returncode == 1


def test_load_memory_of_a_snapshot_whose_config_builds_no_machine_is_bad_snapshot(
    real_snapshot: Path, tmp_path: Path
) -> None:
    """On a VMM without a machine yet, load-memory builds it from the file's config: a
    config no machine can have is the file's fault (bad-snapshot), not an internal error."""
    with vmms() as make:
        target = make(incoming=True)
        with target.client() as client:
            for name in ("no-vcpus", "unusable-memory-size"):
                bad = rewritten(real_snapshot, tmp_path / f"{name}.vmipc", BAD_FILES[name][0])
                with open(bad, "rb") as handle, pytest.raises(CommandError) as info:
                    client.load_memory(format="snapshot", in_=handle.fileno())
                assert info.value.code == "bad-snapshot", info.value
                assert "section 'config'" in str(info.value)
                assert client.query_status()["state"] == "incoming"

"""vmipc vmm --restore: a snapshot becomes a running guest, lazily mapped or loaded."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.builtin_guest import Console, check_against_model
from tests.test_bulk_commands import WS, compose_snapshot, vmms
from vmipc.cli.vmm import RestoreError, restore_machine
from vmipc.vmm.runstate import RunState

pytestmark = pytest.mark.kvm


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


def restore_options(**overrides: bool) -> argparse.Namespace:
    return argparse.Namespace(**{"eager": False, "verify": False, "paused": False, **overrides})


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

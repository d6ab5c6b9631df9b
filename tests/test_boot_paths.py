"""Each boot path on real KVM, and guests that die: reported, the process stays up."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vmipc.guest import expected_lines
from vmipc.memory_layout import MIB
from vmipc.vmm.machine import BootSource, Machine, MachineConfig
from vmipc.vmm.runstate import RunState

pytestmark = pytest.mark.kvm


def boot(source: BootSource, vcpus: int = 1) -> tuple[Machine, list[bytes]]:
    output: list[bytes] = []
    machine = Machine(MachineConfig(32 * MIB, vcpus, source), output.append)
    machine.start()
    return machine, output


def test_bootsector_prints_and_powers_off(guests: Path) -> None:
    machine, output = boot(BootSource("bootsector", str(guests / "hello-bootsector.bin")))
    with machine:
        assert machine.wait_stopped(10) is RunState.SHUTDOWN
        assert b"".join(output) == b"hello from the boot sector\n"
        assert machine.power_off_code == 0


def test_multiboot_kernel_gets_magic_cmdline_and_memory_map(guests: Path) -> None:
    source = BootSource("multiboot", str(guests / "multiboot-echo.elf"), cmdline="console=ttyS0 x")
    machine, output = boot(source)
    with machine:
        assert machine.wait_stopped(10) is RunState.SHUTDOWN
        assert b"".join(output) == (
            b"multiboot magic=2badb002 cmdline=console=ttyS0 x mmap-entries=00000004\n"
        )


def test_triple_fault_is_a_crash_with_a_reason(guests: Path) -> None:
    source = BootSource("multiboot", str(guests / "multiboot-echo.elf"), cmdline="fault=trip")
    machine, _ = boot(source, vcpus=2)
    with machine:
        assert machine.wait_stopped(10) is RunState.CRASHED
        assert machine.stop_reason is not None
        assert "triple fault" in machine.stop_reason
        with pytest.raises(Exception, match="cannot pause while crashed"):
            machine.pause()
    assert machine.state is RunState.DESTROYED


def test_emulation_failure_is_a_crash_with_a_reason(guests: Path) -> None:
    source = BootSource("multiboot", str(guests / "multiboot-echo.elf"), cmdline="fault=hole")
    machine, _ = boot(source)
    with machine:
        assert machine.wait_stopped(10) is RunState.CRASHED
        assert "emulation failed" in (machine.stop_reason or "")


def vmipc(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmipc", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_cli_reports_a_crash_in_one_line_and_fails(guests: Path) -> None:
    result = vmipc(
        "vmm", "--multiboot", str(guests / "multiboot-echo.elf"), "--cmdline", "fault=trip"
    )
    assert result.returncode == 1
    assert "guest crashed: triple fault (shutdown) on vcpu 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_console_to_file(guests: Path, tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    result = vmipc(
        "vmm", "--bootsector", str(guests / "hello-bootsector.bin"), "--console", str(console)
    )
    assert result.returncode == 0, result.stderr
    assert console.read_text() == "hello from the boot sector\n"
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--multiboot", "/etc/hostname"], 2, "not a multiboot kernel"),
        (["--bootsector", "/nonexistent"], 2, "cannot read boot sector"),
        (["--memory", "1K"], 2, "not a multiple"),
        (["--memory", "lots"], 2, "not a size"),
        (["--vcpus", "0"], 2, "--vcpus must be"),
        (["--guest-opt", "novalue"], 2, "KEY=VALUE"),
        (["--guest-opt", "color=blue"], 2, "unknown guest option 'color'"),
    ],
)
def test_cli_bad_input_is_one_clear_line(args: list[str], code: int, message: str) -> None:
    result = vmipc("vmm", *args)
    assert result.returncode == code
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_builtin_guest_from_the_cli_with_long_option_names() -> None:
    result = vmipc(
        "vmm", "--vcpus", "2", "--guest-opt", "working-set=64K", "--guest-opt", "passes=2"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("vmipc-guest 1 vcpus=2 ws=65536 ")
    assert sorted(lines[1:]) == sorted(expected_lines(0, 2, 65536) + expected_lines(1, 2, 65536))


def test_console_input_reaches_the_guest(guests: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vmipc", "vmm", "--bootsector", str(guests / "echo-bootsector.bin")],
        input="typed into COM1.",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ">typed into COM1"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_the_vmm_cleanly(guests: Path, signum: int) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmipc",
            "vmm",
            "--bootsector",
            str(guests / "counter-bootsector.bin"),
            "--no-console-input",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    assert process.stdout.read(15) == b"count=00000000\n"  # the guest runs
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    assert b"Traceback" not in stderr

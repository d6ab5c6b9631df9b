"""The built-in guest on real KVM: all vCPUs run, output matches the model, pauses are
invisible to it."""

from __future__ import annotations

import random
import time

import pytest

from tests.builtin_guest import Console, check_against_model, check_beats
from vmipc.guest import banner, beat_line, expected_lines
from vmipc.memory_layout import MIB
from vmipc.vmm.machine import BootSource, Machine, MachineConfig
from vmipc.vmm.runstate import RunState

pytestmark = pytest.mark.kvm

WS = 256 * 1024


def builtin(vcpus: int, console: Console, **options: str) -> Machine:
    source = BootSource("builtin", guest_options=tuple(options.items()))
    return Machine(MachineConfig(64 * MIB, vcpus, source), console)


def test_four_vcpus_all_run_and_print_what_the_model_says() -> None:
    console = Console()
    with builtin(4, console, ws=str(WS), passes="3", rate="0") as machine:
        machine.start()
        assert machine.wait_stopped(60) is RunState.SHUTDOWN, console.text
        assert machine.power_off_code == 0
    lines = console.lines()
    assert lines[0] == banner(vcpus=4, ws=WS, rate=0, passes=3)
    for vcpu in range(4):
        mine = [line for line in lines if line.startswith(f"vcpu={vcpu} ")]
        assert mine == expected_lines(vcpu, 3, WS)


def test_two_hundred_pauses_at_random_moments_leave_every_vcpu_unchanged() -> None:
    console = Console()
    rng = random.Random(2026)
    with builtin(4, console, ws=str(WS), rate="4096") as machine:
        machine.start()
        console.wait_for_passes(4, 1)
        for _ in range(200):
            time.sleep(rng.uniform(0, 0.005))
            machine.pause()
            time.sleep(rng.uniform(0, 0.002))
            machine.resume()
        console.wait_for_passes(4, max(console.passes().values()) + 1)
        machine.pause()
    counts = check_against_model(console.lines(), 4, WS)
    assert min(counts.values()) >= 2


def test_state_restored_into_a_fresh_machine_continues_every_vcpu() -> None:
    before, after = Console(), Console()
    with builtin(2, before, ws=str(WS), rate="8192") as machine:
        machine.start()
        before.wait_for_passes(2, 2)
        machine.pause()
        state = machine.save_state()
        assert machine.memory is not None
        ram = bytes(machine.memory.view)
    target = Machine(MachineConfig(64 * MIB, 2, BootSource("none")), after)
    with target:
        target.start(paused=True)
        assert target.memory is not None
        target.memory.view[:] = ram
        target.restore_state(state)
        target.resume()
        after.wait_for_passes(2, max(before.passes().values()) + 2)
        target.pause()
    # the cut line (if any) completes on the other side
    counts = check_against_model((before.text + after.text).split("\n")[:-1], 2, WS)
    assert min(counts.values()) >= 4


def wait_for_beats(console: Console, beats: int, before: str = "", timeout: float = 30) -> None:
    """Until ``beats`` heartbeat lines in all (``before``: what an earlier console printed)."""
    deadline = time.monotonic() + timeout
    while check_beats((before + console.text).split("\n")[:-1]) < beats:
        assert time.monotonic() < deadline, f"fewer than {beats} beats: {console.text[-300:]}"
        assert "ERROR" not in console.text, console.text
        time.sleep(0.01)


@pytest.mark.parametrize("rate", ["0", "2048"])  # flat out, and paced (sleeping in hlt)
def test_heartbeat_beside_the_work_leaves_the_pass_lines_unchanged(rate: str) -> None:
    console = Console()
    with builtin(1, console, ws=str(WS), rate=rate, hz="1000", beat="2000") as machine:
        machine.start()
        console.wait_for_passes(1, 3)
        wait_for_beats(console, 20)
        machine.pause()
    lines = console.lines()
    assert lines[0] == banner(ws=WS, rate=int(rate), hz=1000, beat=2000)
    assert lines[1] == beat_line(1) or lines[1].startswith("vcpu=0 pass=")
    assert check_beats(lines) >= 20
    passes = [line for line in lines[1:] if " beat=" not in line]
    assert passes == expected_lines(0, len(passes), WS)[:-1]  # all but "done"


def test_a_heartbeat_vcpu_only_beats_and_the_others_work_and_power_off() -> None:
    console = Console()
    options = {"ws": str(WS), "rate": "8192", "passes": "3", "hz": "1000", "beat": "2000"}
    with builtin(2, console, **options, beatonly="1") as machine:
        machine.start()
        assert machine.wait_stopped(60) is RunState.SHUTDOWN, console.text
        assert machine.power_off_code == 0
    lines = console.lines()
    assert lines[0] == banner(
        vcpus=2, ws=WS, rate=8192, passes=3, hz=1000, beat=2000, beatonly=True
    )
    assert [line for line in lines if line.startswith("vcpu=1 ")] == expected_lines(1, 3, WS)
    vcpu0 = [line for line in lines if line.startswith("vcpu=0 ")]
    assert vcpu0 == [beat_line(n) for n in range(1, len(vcpu0) + 1)]
    assert len(lines) == 1 + 4 + len(vcpu0)


def test_heartbeat_continues_exactly_across_pauses_and_a_restore() -> None:
    before, after = Console(), Console()
    rng = random.Random(15)
    # vCPU 0 prints the beats: each console byte is a port I/O exit to the VMM, so its
    # passes are slower than vCPU 1's
    options = {"ws": str(WS), "rate": "8192", "hz": "1000", "beat": "1000"}
    with builtin(2, before, **options) as machine:
        machine.start()
        before.wait_for_passes(2, 1)
        for _ in range(50):
            time.sleep(rng.uniform(0, 0.004))
            machine.pause()
            time.sleep(rng.uniform(0, 0.002))
            machine.resume()
        wait_for_beats(before, 10)
        machine.pause()
        state = machine.save_state()
        assert machine.memory is not None
        ram = bytes(machine.memory.view)
    beats = check_beats(before.lines())
    target = Machine(MachineConfig(64 * MIB, 2, BootSource("none")), after)
    with target:
        target.start(paused=True)
        assert target.memory is not None
        target.memory.view[:] = ram
        target.restore_state(state)
        target.resume()
        wait_for_beats(after, beats + 10, before.text)
        reached = before.passes()
        deadline = time.monotonic() + 60
        while any(after.passes().get(v, 0) <= reached.get(v, 0) for v in (0, 1)):
            assert time.monotonic() < deadline, f"{after.passes()} after {reached}"
            time.sleep(0.01)
        target.pause()
    combined = (before.text + after.text).split("\n")[:-1]
    assert check_beats(combined) > beats
    assert min(check_against_model(combined, 2, WS).values()) >= 2


def test_heartbeat_refuses_a_period_under_100_us() -> None:
    console = Console()
    with builtin(1, console, beat="99") as machine:
        machine.start()
        assert machine.wait_stopped(60) is RunState.SHUTDOWN, console.text
        assert machine.power_off_code == 1
    assert console.lines()[1:] == ["vcpu=0 ERROR bad option 'beat=99'"]

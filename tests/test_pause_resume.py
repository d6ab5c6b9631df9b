"""Pause and resume as a VMM primitive on real KVM."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from tests.test_state_roundtrip import assert_consecutive, counter_lines
from vmipc.memory_layout import MIB
from vmipc.vmm.machine import BootSource, Machine, MachineConfig
from vmipc.vmm.machine_api import InvalidStateError, StateChange
from vmipc.vmm.runstate import RunState

pytestmark = pytest.mark.kvm


def counter_machine(guests: Path, output: list[bytes], vcpus: int = 1) -> Machine:
    source = BootSource("bootsector", str(guests / "counter-bootsector.bin"))
    return Machine(MachineConfig(32 * MIB, vcpus, source), output.append)


def test_two_hundred_pauses_at_random_moments_change_nothing(guests: Path) -> None:
    output: list[bytes] = []
    rng = random.Random(1234)
    with counter_machine(guests, output) as machine:
        machine.start()
        for _ in range(200):
            time.sleep(rng.uniform(0, 0.004))
            machine.pause()
            parked = len(b"".join(output))
            time.sleep(rng.uniform(0, 0.002))
            # nothing runs while paused: not one more console byte
            assert len(b"".join(output)) == parked
            machine.resume()
        machine.pause()
    assert_consecutive(counter_lines(b"".join(output)))


def test_pause_is_refused_twice_and_resume_needs_a_pause(guests: Path) -> None:
    with counter_machine(guests, []) as machine:
        with pytest.raises(InvalidStateError, match="cannot pause while created"):
            machine.pause()
        machine.start()
        with pytest.raises(InvalidStateError, match="cannot resume while running"):
            machine.resume()
        machine.pause()
        with pytest.raises(InvalidStateError, match="cannot pause while paused"):
            machine.pause()


def test_listeners_see_every_transition(guests: Path) -> None:
    changes: list[StateChange] = []
    with counter_machine(guests, []) as machine:
        unsubscribe = machine.add_listener(changes.append)
        machine.start()
        machine.pause()
        machine.resume()
        unsubscribe()
        machine.pause()
    assert [(c.old, c.new) for c in changes] == [
        (RunState.CREATED, RunState.RUNNING),
        (RunState.RUNNING, RunState.PAUSED),
        (RunState.PAUSED, RunState.RUNNING),
    ]


def test_start_paused_runs_nothing_until_resumed(guests: Path) -> None:
    output: list[bytes] = []
    with counter_machine(guests, output, vcpus=2) as machine:
        machine.start(paused=True)
        assert machine.state is RunState.PAUSED
        time.sleep(0.05)
        assert output == []
        machine.resume()
        deadline = time.monotonic() + 5
        while not output and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b"".join(output).startswith(b"count=00000000")


def test_concurrent_pause_callers_get_one_pause(guests: Path) -> None:
    outcomes: list[str] = []
    with counter_machine(guests, []) as machine:
        machine.start()

        def try_pause() -> None:
            try:
                machine.pause()
                outcomes.append("paused")
            except InvalidStateError:
                outcomes.append("refused")

        threads = [threading.Thread(target=try_pause) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == ["paused", "refused", "refused", "refused"]
        assert machine.state is RunState.PAUSED


def test_close_while_paused_and_while_running_returns(guests: Path) -> None:
    for paused in (True, False):
        machine = counter_machine(guests, [])
        machine.start()
        if paused:
            machine.pause()
        machine.close()
        assert machine.state is RunState.DESTROYED
        machine.close()  # idempotent


def test_a_resume_that_lets_the_vcpus_go_later_runs_the_guest_on_exactly(guests: Path) -> None:
    """``resume(wake=False)`` (the control server answers first, then wakes): RUNNING at
    once; the guest goes on only after ``wake_vcpus``. A pause in between keeps the vCPUs
    parked (the late wake does nothing), and the guest still continues exactly."""
    config = MachineConfig(
        32 * MIB, 2, BootSource("bootsector", str(guests / "counter-bootsector.bin"))
    )
    output = bytearray()
    with Machine(config, output.extend) as machine:
        machine.start()
        time.sleep(0.05)
        for _ in range(20):
            machine.pause()
            machine.resume(wake=False)
            assert machine.state is RunState.RUNNING
            if random.random() < 0.5:
                machine.pause()  # before the wake: the vCPUs never left their park
                machine.wake_vcpus()
                assert machine.state is RunState.PAUSED
                machine.resume(wake=False)
            machine.wake_vcpus()
            time.sleep(random.uniform(0.001, 0.005))
        seen = len(output)
        deadline = time.monotonic() + 10
        while len(output) == seen:  # the guest runs after the last wake
            assert time.monotonic() < deadline, "the guest never ran again"
            time.sleep(0.01)
        machine.pause()
    assert_consecutive(counter_lines(bytes(output)))

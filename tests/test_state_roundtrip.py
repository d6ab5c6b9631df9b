"""vCPU and device state records: save -> record -> restore on real KVM."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.state_support import with_v1_vcpus
from vmipc.memory_layout import MIB
from vmipc.vmm.host import MachineHost
from vmipc.vmm.machine import BootSource, Machine, MachineConfig, MachineState
from vmipc.vmm.persist import STATE_HEADER_SIZE, decode_state, encode_state_blob
from vmipc.vmm.runstate import RunState
from vmipc.vmm.state import CPUID_ENTRY, MSR_ENTRY, StateRecordError, VcpuState

pytestmark = pytest.mark.kvm


def counter_lines(output: bytes) -> list[int]:
    lines = output.decode().split("\n")
    tail = lines[-1]  # a line cut by the final pause: any prefix of "count=XXXXXXXX"
    assert "count=".startswith(tail) or (tail.startswith("count=") and len(tail) <= 14)
    return [int(line.removeprefix("count="), 16) for line in lines[:-1]]


def assert_consecutive(values: list[int]) -> None:
    assert values == list(range(len(values))), "counter lines lost, repeated or corrupted"


def counter_state(guests: Path) -> MachineState:
    """The state of the counting boot sector on 2 vCPUs, paused after 50 ms."""
    config = MachineConfig(
        32 * MIB, 2, BootSource("bootsector", str(guests / "counter-bootsector.bin"))
    )
    with Machine(config, lambda data: None) as machine:
        machine.start()
        time.sleep(0.05)
        machine.pause()
        return machine.save_state()


def test_machine_state_record_round_trips_through_msgpack(guests: Path) -> None:
    state = counter_state(guests)
    packed = msgpack.packb(state.to_dict())
    again = MachineState.from_dict(msgpack.unpackb(packed))
    assert again == state
    assert len(state.vcpus) == 2
    assert state.vcpus[1].vcpu_id == 1
    assert any(index == 0x10 for index, _ in state.vcpus[0].msrs)  # IA32_TSC saved
    # version 2: the tables as one bin each, 28 bytes a CPUID entry, 12 an MSR
    for vcpu, record in zip(state.vcpus, state.to_dict()["vcpus"], strict=True):
        assert record["version"] == 2
        assert record["cpuid"] == b"".join(CPUID_ENTRY.pack(*e) for e in vcpu.cpuid)
        assert record["msrs"] == b"".join(MSR_ENTRY.pack(*pair) for pair in vcpu.msrs)
        assert len(vcpu.cpuid) > 1 and len(vcpu.msrs) > 1


def test_the_vcpu_record_is_decoded_to_what_kvm_holds(guests: Path) -> None:
    """Through the state blob (its bounded decoder): the tables come back as KVM gave
    them, and a version-1 record of the same vCPUs decodes to the same state."""
    state = counter_state(guests)
    assert decode_state(encode_state_blob(state)[STATE_HEADER_SIZE:]) == state
    old = msgpack.packb(with_v1_vcpus(state.to_dict(), state.vcpus))
    assert decode_state(old) == state


def test_save_is_refused_unless_paused(guests: Path) -> None:
    config = MachineConfig(
        32 * MIB, 1, BootSource("bootsector", str(guests / "counter-bootsector.bin"))
    )
    with Machine(config, lambda data: None) as machine:
        machine.start()
        with pytest.raises(Exception, match="cannot save the state while running"):
            machine.save_state()


@pytest.mark.parametrize("vcpu_version", [2, 1])
def test_restore_into_a_fresh_machine_continues_the_guest_exactly(
    guests: Path, vcpu_version: int
) -> None:
    """Also from version-1 vCPU records (what VMMs before the packed tables wrote)."""
    source = BootSource("bootsector", str(guests / "counter-bootsector.bin"))
    config = MachineConfig(32 * MIB, 1, source)
    first: list[bytes] = []
    second: list[bytes] = []
    with Machine(config, first.append) as machine:
        machine.start()
        time.sleep(0.2)
        machine.pause()
        saved = machine.save_state()
        record = msgpack.packb(
            saved.to_dict() if vcpu_version == 2 else with_v1_vcpus(saved.to_dict(), saved.vcpus)
        )
        assert msgpack.unpackb(record)["vcpus"][0]["version"] == vcpu_version
        assert machine.memory is not None
        ram = bytes(machine.memory.view)
    incoming = MachineConfig(32 * MIB, 1, BootSource("none"))
    with Machine(incoming, second.append) as target:
        target.start(paused=True)
        assert target.memory is not None
        target.memory.view[:] = ram
        target.restore_state(MachineState.from_dict(msgpack.unpackb(record)))
        assert target.config.boot == source
        target.resume()
        time.sleep(0.2)
        target.pause()
        assert target.state is RunState.PAUSED
    before, after = b"".join(first), b"".join(second)
    assert before and after
    assert_consecutive(counter_lines(before + after))


def test_state_for_another_shape_of_machine_is_refused(guests: Path) -> None:
    config = MachineConfig(
        32 * MIB, 2, BootSource("bootsector", str(guests / "counter-bootsector.bin"))
    )
    with Machine(config, lambda data: None) as machine:
        machine.start(paused=True)
        state = machine.save_state()
    with Machine(MachineConfig(64 * MIB, 2, BootSource("none")), lambda data: None) as other:
        other.start(paused=True)
        with pytest.raises(StateRecordError, match="memory 32 MiB vs 64 MiB"):
            other.restore_state(state)


def test_bad_records_are_refused_with_a_reason(guests: Path) -> None:
    config = MachineConfig(
        32 * MIB, 1, BootSource("bootsector", str(guests / "counter-bootsector.bin"))
    )
    with Machine(config, lambda data: None) as machine:
        machine.start(paused=True)
        record = machine.save_state().vcpus[0].to_dict()
    with pytest.raises(StateRecordError, match=r"version 99 is not supported \(want 1 or 2\)"):
        VcpuState.from_dict({**record, "version": 99})
    with pytest.raises(StateRecordError, match="cpuid: 27 bytes, not a whole number"):
        VcpuState.from_dict({**record, "cpuid": record["cpuid"][:27]})
    with pytest.raises(StateRecordError, match="msrs: 0 entries"):
        VcpuState.from_dict({**record, "msrs": b""})
    with pytest.raises(StateRecordError, match="regs: 10 bytes"):
        VcpuState.from_dict({**record, "regs": b"0123456789"})
    with pytest.raises(StateRecordError, match="malformed"):
        VcpuState.from_dict({k: v for k, v in record.items() if k != "lapic"})


def test_restore_sets_the_cpuid_only_when_it_differs_from_the_one_set_at_start_up(
    guests: Path,
) -> None:
    """An incoming machine got its CPUID when it was built: a state from a VMM on the same
    host carries the same one, and load-state does not repeat KVM_SET_CPUID2 (the costliest
    ioctl of a restore); a different CPUID is still applied, and saved again."""
    source = BootSource("bootsector", str(guests / "counter-bootsector.bin"))
    with Machine(MachineConfig(32 * MIB, 2, source), lambda data: None) as machine:
        machine.start(paused=True)
        state = machine.save_state()
    changed_vcpu = state.vcpus[1]
    cpuid = list(changed_vcpu.cpuid)
    leaf = next(i for i, entry in enumerate(cpuid) if entry[0] == 1)
    function, index, flags, eax, ebx, ecx, edx = cpuid[leaf]
    cpuid[leaf] = (function, index, flags, eax, ebx, ecx ^ (1 << 0), edx)  # SSE3 off
    changed = dataclasses.replace(
        state, vcpus=(state.vcpus[0], dataclasses.replace(changed_vcpu, cpuid=tuple(cpuid)))
    )
    with Machine(MachineConfig(32 * MIB, 2, BootSource("none")), lambda data: None) as target:
        target.start(paused=True)
        calls: list[int] = []
        for vcpu in target.vcpus:
            original = vcpu.set_cpuid2

            def counted(value: Any, vcpu_id: int = vcpu.id, call: Any = original) -> None:
                calls.append(vcpu_id)
                call(value)

            vcpu.set_cpuid2 = counted  # type: ignore[method-assign]
        target.restore_state(state)
        assert calls == []
        target.restore_state(changed)
        assert calls == [1]
        assert target.save_state().vcpus[1].cpuid == tuple(cpuid)
        assert target.save_state().vcpus[0].cpuid == state.vcpus[0].cpuid


def test_rehearsing_a_load_state_leaves_the_incoming_machine_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An incoming VMM waiting for its state runs a decode and restore of its own state
    (to warm the path up): everything KVM holds is as before but what runs on with time
    anyway (the time stamp counter, the VM's clock, the PIT's load times); a rehearsal
    that fails says nothing and changes nothing either."""
    host = MachineHost(lambda data: None)
    try:
        host.configure(MachineConfig(32 * MIB, 2, BootSource("none")))
        machine = host.require_machine("test")

        def without_tsc(state: MachineState) -> MachineState:
            vcpus = tuple(
                dataclasses.replace(v, msrs=tuple(m for m in v.msrs if m[0] != 0x10))
                for v in state.vcpus
            )
            vm = dataclasses.replace(state.vm, pit=b"", clock=0)
            return dataclasses.replace(state, vcpus=vcpus, vm=vm)

        before = without_tsc(machine.save_state())
        restored: list[MachineState] = []
        restore = machine.restore_state

        def spied(state: MachineState, *, accept_disk: bool = False) -> None:
            restored.append(state)
            restore(state, accept_disk=accept_disk)

        monkeypatch.setattr(machine, "restore_state", spied)
        host.rehearse_load_state()
        assert len(restored) == 1  # it did decode and restore a state
        assert without_tsc(restored[0]) == before
        assert without_tsc(machine.save_state()) == before
        assert host.incoming  # still waiting for its state

        def refused(state: MachineState, *, accept_disk: bool = False) -> None:
            raise StateRecordError("KVM said no")

        monkeypatch.setattr(machine, "restore_state", refused)
        host.rehearse_load_state()  # no exception
        assert without_tsc(machine.save_state()) == before
    finally:
        host.close()

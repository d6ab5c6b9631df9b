"""Machine states and vCPU records for the tests that build them without KVM, and the
version-1 shape of a vCPU record (what VMMs before the packed tables wrote), for the tests
that check old states still load."""

from __future__ import annotations

import ctypes
from typing import Any

from vmipc.kvm import structs
from vmipc.memory_layout import MIN_MEMORY
from vmipc.vmm.devices import Uart16550, VirtioBlk
from vmipc.vmm.machine import BootSource, MachineConfig, MachineState
from vmipc.vmm.state import VcpuState, VmState

#: one CPUID entry and IA32_TSC: a version-2 record holds at least one of each
ONE_CPUID_ENTRY = ((0, 0, 0, 1, 2, 3, 4),)
TSC_ONLY = ((0x10, 0),)


def vcpu_state(
    vcpu_id: int,
    *,
    fill: int = 0,
    mp_state: int = 0,
    msrs: tuple[tuple[int, int], ...] = TSC_ONLY,
    cpuid: tuple[tuple[int, ...], ...] = ONE_CPUID_ENTRY,
) -> VcpuState:
    """A well-formed vCPU record whose kernel structs are all ``fill`` bytes (KVM might
    refuse their values; the decoders take them)."""

    def raw(kind: type[ctypes.Structure]) -> bytes:
        return bytes([fill]) * ctypes.sizeof(kind)

    return VcpuState(
        vcpu_id=vcpu_id,
        mp_state=mp_state,
        regs=raw(structs.KvmRegs),
        sregs=raw(structs.KvmSregs),
        xsave=raw(structs.KvmXsave),
        xcrs=raw(structs.KvmXcrs),
        debugregs=raw(structs.KvmDebugregs),
        lapic=raw(structs.KvmLapicState),
        msrs=msrs,
        vcpu_events=raw(structs.KvmVcpuEvents),
        cpuid=cpuid,
    )


def vcpu_record_v1(vcpu: VcpuState) -> dict[str, Any]:
    """``vcpu`` as a version-1 record: CPUID as arrays of 7 ints, MSRs as [index, value]
    pairs (built by hand, as the version-1 ``to_dict`` wrote them)."""
    return {
        **vcpu.to_dict(),
        "version": 1,
        "msrs": [list(pair) for pair in vcpu.msrs],
        "cpuid": [list(entry) for entry in vcpu.cpuid],
    }


def with_v1_vcpus(record: dict[str, Any], vcpus: tuple[VcpuState, ...]) -> dict[str, Any]:
    """A machine-state record (``MachineState.to_dict``) whose vCPU records are version 1."""
    return {**record, "vcpus": [vcpu_record_v1(vcpu) for vcpu in vcpus]}


def restorable_state(memory_size: int = MIN_MEMORY, vcpus: int = 1) -> MachineState:
    """A machine state a restore takes as far as can be told without KVM (registers and
    devices all zero: only KVM would refuse some of them)."""

    def zeros(kind: type[ctypes.Structure]) -> bytes:
        return bytes(ctypes.sizeof(kind))

    return MachineState(
        config=MachineConfig(memory_size, vcpus, BootSource("builtin")),
        vcpus=tuple(vcpu_state(index) for index in range(vcpus)),
        vm=VmState(
            pic_master=zeros(structs.KvmIrqchip),
            pic_slave=zeros(structs.KvmIrqchip),
            ioapic=zeros(structs.KvmIrqchip),
            pit=zeros(structs.KvmPitState2),
            clock=0,
        ),
        devices={
            "uart": Uart16550(lambda data: None).save(),
            "virtio-blk": VirtioBlk.empty_state(),
        },
    )

"""Versioned records of a machine's state — ``MachineState``, the record of everything
but RAM, and the vCPU and in-kernel device records it holds — with save/restore pairs.
The userspace devices' records are theirs (vmm/devices/); protocol/state-blob.md is the
wire format.

Each record is a frozen dataclass holding the kernel's structs as raw bytes (they are
stable kernel ABI) plus plain values. ``save_*`` cannot fail on a paused machine;
``restore_*`` applies a record to live KVM objects in the order that is known to work
(KVM-FACTS.md; Firecracker and QEMU do the same).
"""

from __future__ import annotations

import ctypes
import itertools
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

from vmipc.errors import VmipcError
from vmipc.kvm import Vcpu, Vm, structs
from vmipc.vmm.config import BootSource, MachineConfig
from vmipc.vmm.devices import (
    DEVICES,
    VERSION_1_DEVICES,
    DeviceState,
    VirtioBlk,
    device_record_keys,
)

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
#: KVM_SET_CPUID2 takes at most this many entries (the kernel's KVM_MAX_CPUID_ENTRIES)
MAX_CPUID_ENTRIES = 256
#: KVM_GET_MSRS / KVM_SET_MSRS take fewer than 256 MSRs at once (the kernel's MAX_IO_MSRS)
MAX_MSRS = 255
_CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1

_S = TypeVar("_S", bound=ctypes.Structure)


class StateRecordError(ValueError, VmipcError):
    """A state record that cannot be used (wrong version, wrong size, missing field)."""


def _raw(struct: ctypes.Structure) -> bytes:
    return bytes(memoryview(struct).cast("B"))


def _check_size(kind: type[ctypes.Structure], data: bytes, what: str) -> None:
    if len(data) != ctypes.sizeof(kind):
        raise StateRecordError(
            f"{what}: {len(data)} bytes, expected {ctypes.sizeof(kind)} for {kind.__name__}"
        )


def _from_raw(kind: type[_S], data: bytes, what: str) -> _S:
    _check_size(kind, data, what)
    return kind.from_buffer_copy(data)


def _bytes(value: Any, what: str) -> bytes:
    """A bytes field as it was saved. ``bytes(value)`` would also take an int and allocate
    that many zero bytes: a hostile record could ask for gigabytes."""
    if not isinstance(value, bytes | bytearray):
        raise StateRecordError(f"{what}: bytes expected, not {type(value).__name__}")
    return bytes(value)


def _items(value: Any, limit: int, what: str) -> list[Any] | tuple[Any, ...]:
    """A list field of at most ``limit`` items (what KVM itself would take)."""
    if not isinstance(value, list | tuple):
        raise StateRecordError(f"{what}: a list expected, not {type(value).__name__}")
    if len(value) > limit:
        raise StateRecordError(f"{what}: {len(value)} entries, at most {limit}")
    return value


def _uint(value: Any, top: int, what: str) -> int:
    """An unsigned field of a kernel struct: ctypes would silently truncate a bigger one."""
    if type(value) is not int or not 0 <= value <= top:
        raise StateRecordError(f"{what}: an integer in 0..{top:#x} expected")
    return value


def _msrs_v1(value: Any) -> tuple[tuple[int, int], ...]:
    pairs = []
    for pair in _items(value, MAX_MSRS, "msrs"):
        index, data = _items(pair, 2, "msr entry")
        pairs.append((_uint(index, _U32, "msr index"), _uint(data, _U64, "msr value")))
    return tuple(pairs)


def _cpuid_v1(value: Any) -> tuple[tuple[int, ...], ...]:
    width = len(_CPUID_FIELDS)
    entries = _items(value, MAX_CPUID_ENTRIES, "cpuid")
    # The common case checked in a few C-level passes over all the fields at once (decoding
    # the state is on a migration's critical path); anything else goes through the
    # entry-by-entry check below, which names what is wrong.
    if all(type(entry) in (list, tuple) and len(entry) == width for entry in entries):
        flat = [field for entry in entries for field in entry]
        if not flat or (set(map(type, flat)) == {int} and min(flat) >= 0 and max(flat) <= _U32):
            return tuple(map(tuple, entries))
    checked = []
    for entry in entries:
        fields = _items(entry, width, "cpuid entry")
        if len(fields) != width:
            raise StateRecordError(f"cpuid entry: {len(fields)} fields, {width} expected")
        checked.append(tuple(_uint(x, _U32, "cpuid field") for x in fields))
    return tuple(checked)


#: version 2 of the vCPU record packs its two tables as bin: a CPUID entry as its seven u32
#: fields, an MSR as u32 index + u64 value, little-endian without padding
CPUID_ENTRY = struct.Struct("<7I")
MSR_ENTRY = struct.Struct("<IQ")


def _packed(value: Any, entry: struct.Struct, limit: int, what: str) -> tuple[Any, ...]:
    """The entries of a packed table: a bin of 1 .. ``limit`` whole entries. Its length is
    checked before anything is unpacked (the tuples are built from bytes that are there,
    at most ``limit`` of them); every value fits its field by construction."""
    if not isinstance(value, bytes | bytearray):
        raise StateRecordError(f"{what}: bytes expected, not {type(value).__name__}")
    count, rest = divmod(len(value), entry.size)
    if rest:
        raise StateRecordError(
            f"{what}: {len(value)} bytes, not a whole number of {entry.size}-byte entries"
        )
    # a vCPU always has both: the VMM sets the host's CPUID, and IA32_TSC is always saved
    if not 0 < count <= limit:
        raise StateRecordError(f"{what}: {count} entries, 1 .. {limit} expected")
    return tuple(entry.iter_unpack(value))


def _pack(entry: struct.Struct, values: tuple[tuple[int, ...], ...]) -> bytes:
    """``values`` packed one ``entry`` after another, in one call (struct caches the
    format): about half of what version 1's lists cost to build and encode."""
    layout = entry.format.removeprefix("<") * len(values)
    return struct.pack(f"<{layout}", *itertools.chain.from_iterable(values))


def _check_version(data: dict[str, Any], readable: tuple[int, ...], what: str) -> int:
    """The record's version, one of ``readable``; the error names what this reader takes
    ("(want 1)", "(want 1 or 2)"), the form older readers use."""
    if not isinstance(data, dict):
        raise StateRecordError(f"{what} record is a {type(data).__name__}, not a map")
    version = data.get("version")
    if type(version) is not int or version not in readable:
        wanted = " or ".join(map(str, readable))
        raise StateRecordError(
            f"{what} record version {version!r} is not supported (want {wanted})"
        )
    return version


@dataclass(frozen=True)
class VcpuState:
    """Everything KVM holds for one vCPU, taken at a clean stop.

    Version 2 of the record packs ``cpuid`` and ``msrs`` as one bin each (``CPUID_ENTRY``,
    ``MSR_ENTRY``): version 1's ~60 arrays of 7 ints and ~40 pairs were most of what a
    state's decoder walked, object by object, on a migration's critical path. Version 1 is
    still read; a record is always written as version 2. In memory both are tuples.
    """

    VERSION: ClassVar[int] = 2
    #: the versions :meth:`from_dict` reads
    READABLE_VERSIONS: ClassVar[tuple[int, ...]] = (1, 2)

    vcpu_id: int
    mp_state: int
    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    debugregs: bytes
    lapic: bytes
    msrs: tuple[tuple[int, int], ...]
    vcpu_events: bytes
    cpuid: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "vcpu_id": self.vcpu_id,
            "mp_state": self.mp_state,
            "regs": self.regs,
            "sregs": self.sregs,
            "xsave": self.xsave,
            "xcrs": self.xcrs,
            "debugregs": self.debugregs,
            "lapic": self.lapic,
            "msrs": _pack(MSR_ENTRY, self.msrs),
            "vcpu_events": self.vcpu_events,
            "cpuid": _pack(CPUID_ENTRY, self.cpuid),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VcpuState:
        version = _check_version(data, cls.READABLE_VERSIONS, "vcpu")
        try:
            if version == 1:
                msrs, cpuid = _msrs_v1(data["msrs"]), _cpuid_v1(data["cpuid"])
            else:
                msrs = _packed(data["msrs"], MSR_ENTRY, MAX_MSRS, "msrs")
                cpuid = _packed(data["cpuid"], CPUID_ENTRY, MAX_CPUID_ENTRIES, "cpuid")
            state = cls(
                vcpu_id=int(data["vcpu_id"]),
                mp_state=int(data["mp_state"]),
                regs=_bytes(data["regs"], "regs"),
                sregs=_bytes(data["sregs"], "sregs"),
                xsave=_bytes(data["xsave"], "xsave"),
                xcrs=_bytes(data["xcrs"], "xcrs"),
                debugregs=_bytes(data["debugregs"], "debugregs"),
                lapic=_bytes(data["lapic"], "lapic"),
                msrs=msrs,
                vcpu_events=_bytes(data["vcpu_events"], "vcpu_events"),
                cpuid=cpuid,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateRecordError(f"vcpu record is malformed: {exc}") from None
        for name, kind in _VCPU_STRUCTS:
            # compared here, so that the message is built only for a record that is wrong
            if len(getattr(state, name)) != ctypes.sizeof(kind):
                _check_size(kind, getattr(state, name), f"vcpu {state.vcpu_id} {name}")
        return state


#: the kernel structs a vCPU record holds as bytes, by field
_VCPU_STRUCTS: tuple[tuple[str, type[ctypes.Structure]], ...] = (
    ("regs", structs.KvmRegs),
    ("sregs", structs.KvmSregs),
    ("xsave", structs.KvmXsave),
    ("xcrs", structs.KvmXcrs),
    ("debugregs", structs.KvmDebugregs),
    ("lapic", structs.KvmLapicState),
    ("vcpu_events", structs.KvmVcpuEvents),
)


def readable_msrs(vcpu: Vcpu, candidates: list[int]) -> list[int]:
    """The MSRs among ``candidates`` this vCPU can read (KVM_GET_MSRS stops at the first
    one it cannot, so each is probed alone), TSC first and TSC_DEADLINE last."""
    readable = [index for index in candidates if vcpu.get_msrs([index])]
    readable.sort(key=lambda i: (i != MSR_IA32_TSC, i == MSR_IA32_TSC_DEADLINE))
    return readable


def save_vcpu(vcpu: Vcpu, msr_indices: list[int], cpuid: ctypes.Structure) -> VcpuState:
    """Take a vCPU's state. MP_STATE first and VCPU_EVENTS last, as KVM expects."""
    mp_state = vcpu.get_mp_state()
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    xsave = vcpu.get_xsave()
    xcrs = vcpu.get_xcrs()
    debugregs = vcpu.get_debugregs()
    lapic = vcpu.get_lapic()
    msrs = vcpu.get_msrs(msr_indices)
    events = vcpu.get_vcpu_events()
    return VcpuState(
        vcpu_id=vcpu.id,
        mp_state=mp_state,
        regs=_raw(regs),
        sregs=_raw(sregs),
        xsave=_raw(xsave),
        xcrs=_raw(xcrs),
        debugregs=_raw(debugregs),
        lapic=_raw(lapic),
        msrs=tuple((index, msrs[index]) for index in msr_indices if index in msrs),
        vcpu_events=_raw(events),
        # unpacked from the raw entries at C speed: ~60 entries field by field through
        # ctypes cost a tenth of a millisecond of a migration's downtime
        cpuid=_cpuid_values(cpuid)[: int(cpuid.nent)],
    )


#: a KvmCpuidEntry2: its seven fields, then three words of padding (zeros)
_CPUID_ENTRY = struct.Struct("<7I12x")


def cpuid_from_state(state: VcpuState) -> ctypes.Structure:
    cpuid = structs.kvm_cpuid2(len(state.cpuid))
    data = b"".join(_CPUID_ENTRY.pack(*values) for values in state.cpuid)
    ctypes.memmove(ctypes.addressof(cpuid.entries), data, len(data))
    return cpuid


def _cpuid_values(cpuid: ctypes.Structure) -> tuple[tuple[int, ...], ...]:
    """The entries of a kvm_cpuid2 as a record holds them (padding aside)."""
    return tuple(_CPUID_ENTRY.iter_unpack(bytes(memoryview(cpuid.entries).cast("B"))))


def restore_vcpu(
    vcpu: Vcpu, state: VcpuState, current_cpuid: ctypes.Structure | None = None
) -> ctypes.Structure:
    """Apply ``state`` to a vCPU that is not in KVM_RUN, in the order KVM needs; returns
    the CPUID the vCPU now has.

    ``current_cpuid``: what the vCPU was given before (at start-up). When the state's is
    the same (a migration between VMMs on one host), ``KVM_SET_CPUID2`` — the costliest
    ioctl here — is not repeated, so that load-state only sets registers.
    """
    if state.vcpu_id != vcpu.id:
        raise StateRecordError(f"state of vcpu {state.vcpu_id} cannot go to vcpu {vcpu.id}")
    if current_cpuid is not None and _cpuid_values(current_cpuid) == state.cpuid:
        cpuid = current_cpuid
    else:
        cpuid = cpuid_from_state(state)
        vcpu.set_cpuid2(cpuid)
    vcpu.set_mp_state(state.mp_state)
    vcpu.set_regs(_from_raw(structs.KvmRegs, state.regs, "regs"))
    vcpu.set_sregs(_from_raw(structs.KvmSregs, state.sregs, "sregs"))
    vcpu.set_xsave(_from_raw(structs.KvmXsave, state.xsave, "xsave"))
    vcpu.set_xcrs(_from_raw(structs.KvmXcrs, state.xcrs, "xcrs"))
    vcpu.set_debugregs(_from_raw(structs.KvmDebugregs, state.debugregs, "debugregs"))
    vcpu.set_lapic(_from_raw(structs.KvmLapicState, state.lapic, "lapic"))
    accepted = vcpu.set_msrs(list(state.msrs))
    if accepted != len(state.msrs):
        failed = state.msrs[accepted][0]
        raise StateRecordError(f"vcpu {vcpu.id}: KVM refused MSR {failed:#x}")
    events = _from_raw(structs.KvmVcpuEvents, state.vcpu_events, "vcpu_events")
    events.flags |= (
        structs.KVM_VCPUEVENT_VALID_NMI_PENDING | structs.KVM_VCPUEVENT_VALID_SIPI_VECTOR
    )
    vcpu.set_vcpu_events(events)
    return cpuid


@dataclass(frozen=True)
class VmState:
    """In-kernel devices of the VM: the two PICs, the IOAPIC, the PIT and the clock."""

    VERSION: ClassVar[int] = 1

    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes
    clock: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "pic_master": self.pic_master,
            "pic_slave": self.pic_slave,
            "ioapic": self.ioapic,
            "pit": self.pit,
            "clock": self.clock,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VmState:
        _check_version(data, (cls.VERSION,), "vm")
        try:
            state = cls(
                pic_master=_bytes(data["pic_master"], "pic_master"),
                pic_slave=_bytes(data["pic_slave"], "pic_slave"),
                ioapic=_bytes(data["ioapic"], "ioapic"),
                pit=_bytes(data["pit"], "pit"),
                clock=int(data["clock"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateRecordError(f"vm record is malformed: {exc}") from None
        for name in ("pic_master", "pic_slave", "ioapic"):
            _check_size(structs.KvmIrqchip, getattr(state, name), name)
        _check_size(structs.KvmPitState2, state.pit, "pit")
        return state


def save_vm(vm: Vm, *, clock: int | None = None) -> VmState:
    """``clock``: kvmclock as it was when the guest stopped (default: now)."""
    return VmState(
        pic_master=_raw(vm.get_irqchip(structs.KVM_IRQCHIP_PIC_MASTER)),
        pic_slave=_raw(vm.get_irqchip(structs.KVM_IRQCHIP_PIC_SLAVE)),
        ioapic=_raw(vm.get_irqchip(structs.KVM_IRQCHIP_IOAPIC)),
        pit=_raw(vm.get_pit2()),
        clock=int(vm.get_clock().clock) if clock is None else clock,
    )


def restore_vm(vm: Vm, state: VmState) -> None:
    """Irqchips (PIC master, PIC slave, IOAPIC), then the PIT, then the clock."""
    for raw in (state.pic_master, state.pic_slave, state.ioapic):
        vm.set_irqchip(_from_raw(structs.KvmIrqchip, raw, "irqchip"))
    vm.set_pit2(_from_raw(structs.KvmPitState2, state.pit, "pit"))
    vm.set_clock(structs.KvmClockData(clock=state.clock))


@dataclass(frozen=True)
class MachineState:
    """All of a machine that is not RAM: configuration, vCPUs, in-kernel and user devices.

    ``devices`` holds one ``<Device>State`` record per registered device
    (vmm/devices/registry.py), by name; a new device there is a new ``VERSION`` here.
    Version 1 had the UART only; it is read as a state whose block device has no disk
    (so snapshots and blobs from before the block device still restore, into a machine
    without a disk). A state is always written as the current version.
    """

    VERSION: ClassVar[int] = 2
    #: the versions :meth:`from_dict` reads
    READABLE_VERSIONS: ClassVar[tuple[int, ...]] = (1, 2)

    config: MachineConfig
    vcpus: tuple[VcpuState, ...]
    vm: VmState
    devices: Mapping[str, DeviceState]

    def __post_init__(self) -> None:
        names = [kind.name for kind in DEVICES]
        if sorted(self.devices) != sorted(names):
            raise StateRecordError(
                f"machine state: device records {sorted(self.devices)}, expected {names}"
            )
        for kind in DEVICES:
            if not isinstance(self.devices[kind.name], kind.state):
                raise StateRecordError(
                    f"machine state: the {kind.name} record is not a {kind.state.__name__}"
                )
        # in registry order, and read-only like the rest of the record
        ordered = {name: self.devices[name] for name in names}
        object.__setattr__(self, "devices", MappingProxyType(ordered))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "config": self.config.to_dict(),
            "vcpus": [vcpu.to_dict() for vcpu in self.vcpus],
            "vm": self.vm.to_dict(),
            "devices": {name: record.to_dict() for name, record in self.devices.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MachineState:
        if not isinstance(data, dict):
            raise StateRecordError(f"machine state is a {type(data).__name__}, not a map")
        version = data.get("version")
        if type(version) is not int or version not in cls.READABLE_VERSIONS:
            raise StateRecordError(f"machine state version {version!r} unsupported")
        try:
            config = MachineConfig.from_dict(data["config"])
            records = data["vcpus"]
            # as many vCPU records as configured, counted before any is decoded: each may
            # unpack ~120 KB of tuples from its 10 KB of packed tables
            if not isinstance(records, list | tuple) or len(records) != config.vcpus:
                raise StateRecordError("machine state: vcpu records do not match the configuration")
            vcpus = tuple(VcpuState.from_dict(item) for item in records)
            vm = VmState.from_dict(data["vm"])
            section = data["devices"]
            if not isinstance(section, dict):
                raise StateRecordError("machine state: the devices record is not a map")
            names = VERSION_1_DEVICES if version == 1 else tuple(k.name for k in DEVICES)
            if sorted(section) != sorted(names):
                raise StateRecordError(
                    f"machine state version {version}: device records {sorted(map(str, section))}"
                    f", expected {sorted(names)}"
                )
            devices = {
                kind.name: kind.load(section[kind.name])
                if kind.name in section
                else _absent_device(kind.name)
                for kind in DEVICES
            }
        except (KeyError, TypeError) as exc:
            raise StateRecordError(f"machine state is malformed: missing {exc}") from None
        except ValueError as exc:
            raise StateRecordError(str(exc)) from None
        if len(vcpus) != config.vcpus or [v.vcpu_id for v in vcpus] != list(range(config.vcpus)):
            raise StateRecordError("machine state: vcpu records do not match the configuration")
        return cls(config, vcpus, vm, devices)


def _absent_device(name: str) -> DeviceState:
    """The record of a device a version-1 state predates: the block device without a
    disk."""
    if name == "virtio-blk":
        return VirtioBlk.empty_state()
    raise StateRecordError(f"machine state version 1 has no {name} record")


#: Every key a machine-state record's maps may hold: each record's ``version`` and field
#: names (a record's ``to_dict`` uses them), the device names. What a decoder allows.
STATE_RECORD_KEYS = frozenset(
    {"version"}
    | {
        item.name
        for record in (MachineState, MachineConfig, BootSource, VcpuState, VmState)
        for item in fields(record)
    }
    | device_record_keys()
)

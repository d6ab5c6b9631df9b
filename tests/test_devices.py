"""The userspace devices as one part: every registered device's record round-trips and
restores, the device set is pinned by the machine-state version, and a new device — here
an MMIO one — is its class, its record and one registration."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack  # type: ignore[import-untyped]
import pytest

from vmipc.memory_layout import MIN_MEMORY
from vmipc.vmm.devices import (
    DEVICES,
    POWER_OFF_PORT,
    DeviceManager,
    DeviceResources,
    DeviceType,
    Uart16550,
    device_record_keys,
)
from vmipc.vmm.iobus import IoBus, MmioBus
from vmipc.vmm.memory import GuestMemory
from vmipc.vmm.state import STATE_RECORD_KEYS, MachineState, StateRecordError
from vmipc.vmm.vcpu import GuestStopped

#: the devices each machine-state version holds: a new device is a new version
DEVICES_BY_STATE_VERSION = {1: ["uart"], 2: ["uart", "virtio-blk"]}


@pytest.fixture
def resources() -> Iterator[DeviceResources]:
    memory = GuestMemory(MIN_MEMORY)
    try:
        yield DeviceResources(lambda data: None, lambda irq, level: None, memory)
    finally:
        memory.close()


def test_the_device_set_is_pinned_by_the_machine_state_version() -> None:
    """Registering a device without a new MachineState.VERSION fails here: an older
    reader must refuse a state with a device it does not know, not drop it."""
    assert [kind.name for kind in DEVICES] == DEVICES_BY_STATE_VERSION[MachineState.VERSION]


@pytest.mark.parametrize("kind", DEVICES, ids=[kind.name for kind in DEVICES])
def test_every_device_record_round_trips(
    kind: DeviceType[Any, Any], resources: DeviceResources
) -> None:
    """save -> to_dict -> msgpack -> from_dict gives the same record, and the restore
    constructor builds a device that saves it again."""
    state = kind.create(resources).save()
    assert isinstance(state, kind.state)
    record = state.to_dict()
    assert record["version"] == kind.state.VERSION
    again = kind.load(msgpack.unpackb(msgpack.packb(record, use_bin_type=True), raw=False))
    assert again == state
    assert kind.restore(again, resources).save() == state
    assert set(record) <= device_record_keys() <= STATE_RECORD_KEYS


@pytest.mark.parametrize("kind", DEVICES, ids=[kind.name for kind in DEVICES])
def test_every_device_record_refuses_another_version(
    kind: DeviceType[Any, Any], resources: DeviceResources
) -> None:
    record = dict(kind.create(resources).save().to_dict())
    for version in (0, kind.state.VERSION + 1, "1", None):
        record["version"] = version
        with pytest.raises(ValueError):
            kind.load(record)


def test_machine_state_holds_exactly_the_registered_devices() -> None:
    from tests.test_state_limits import maximal_state

    state = maximal_state()
    with pytest.raises(
        StateRecordError, match=r"device records \[\], expected \['uart', 'virtio-blk'\]"
    ):
        MachineState(state.config, state.vcpus, state.vm, {})
    with pytest.raises(StateRecordError, match="the uart record is not a UartState"):
        MachineState(
            state.config,
            state.vcpus,
            state.vm,
            {"uart": state.vm, "virtio-blk": state.devices["virtio-blk"]},  # type: ignore[dict-item]
        )
    with pytest.raises(TypeError):
        state.devices["uart"] = state.devices["uart"]  # type: ignore[index]


def test_the_manager_restores_new_devices_behind_the_same_ports(
    resources: DeviceResources,
) -> None:
    pio, mmio = IoBus(), MmioBus()
    manager = DeviceManager(DEVICES, resources, pio, mmio)
    uart = manager.get("uart", Uart16550)
    pio.write(0x3F8 + 7, 1, 0x5A)  # the scratch register
    saved = manager.save()
    assert list(saved) == ["uart", "virtio-blk"] and saved["uart"].scr == 0x5A
    pio.write(0x3F8 + 7, 1, 0x00)
    manager.restore(saved)
    assert manager.get("uart", Uart16550) is not uart
    assert pio.read(0x3F8 + 7, 1) == 0x5A  # the bus reaches the restored device
    with pytest.raises(TypeError, match="'uart' is a Uart16550, not a int"):
        manager.get("uart", int)
    with pytest.raises(GuestStopped, match="powered off"):
        pio.write(POWER_OFF_PORT, 1, 3)
    assert manager.power_off_code == 3


# --- adding a device: its record, its class, one registration -------------------------


@dataclass(frozen=True)
class DoorbellState:
    VERSION: ClassVar[int] = 1

    value: int

    def to_dict(self) -> dict[str, int]:
        return {"version": self.VERSION, "value": self.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> DoorbellState:
        if d.get("version") != cls.VERSION or set(d) != {"version", "value"}:
            raise ValueError("not a doorbell record")
        value = d["value"]
        if type(value) is not int or not 0 <= value < 1 << 32:
            raise ValueError("doorbell value out of range")
        return cls(value)


class Doorbell:
    """A 32-bit register behind MMIO; a write rings interrupt 5."""

    def __init__(self, ring: Any, value: int = 0) -> None:
        self.ring, self.value = ring, value

    def mmio_read(self, offset: int, size: int) -> bytes:
        return self.value.to_bytes(4, "little")[offset : offset + size].ljust(size, b"\0")

    def mmio_write(self, offset: int, data: bytes) -> None:
        self.value = int.from_bytes(data[:4], "little")
        self.ring(1)

    def save(self) -> DoorbellState:
        return DoorbellState(self.value)


DOORBELL = DeviceType(
    "doorbell",
    DoorbellState,
    create=lambda r: Doorbell(r.irq(5)),
    restore=lambda state, r: Doorbell(r.irq(5), state.value),
    mmio=(0xD100_0000, 0x1000),
)


def test_an_mmio_device_is_a_class_a_record_and_a_registration() -> None:
    lines: list[tuple[int, int]] = []
    memory = GuestMemory(MIN_MEMORY)
    try:
        resources = DeviceResources(
            lambda d: None, lambda irq, lvl: lines.append((irq, lvl)), memory
        )
        pio, mmio = IoBus(), MmioBus()
        manager = DeviceManager((*DEVICES, DOORBELL), resources, pio, mmio)
        mmio.write(0xD100_0000, b"\x78\x56\x34\x12")
        assert lines == [(5, 1)]
        assert mmio.read(0xD100_0000, 4) == b"\x78\x56\x34\x12"
        saved = manager.save()
        assert list(saved) == ["uart", "virtio-blk", "doorbell"]
        record = msgpack.unpackb(msgpack.packb({k: v.to_dict() for k, v in saved.items()}))
        mmio.write(0xD100_0000, b"\0\0\0\0")
        manager.restore({kind.name: kind.load(record[kind.name]) for kind in (*DEVICES, DOORBELL)})
        assert mmio.read(0xD100_0002, 2) == b"\x34\x12"
    finally:
        memory.close()

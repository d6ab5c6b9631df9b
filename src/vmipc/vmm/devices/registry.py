"""The userspace devices every machine has: the one place a device is registered.

To add a device (as the virtio-blk over virtio-mmio was):

1. write the device and its ``<Device>State`` record (``persist.py`` says what each must
   do), with a round-trip test of the record;
2. add its :class:`DeviceType` to :data:`DEVICES` below;
3. bump ``MachineState.VERSION`` (vmm/state.py) and pin the new device set in
   ``tests/test_devices.py``: a new key in the state's ``devices`` map is a new version of
   the machine-state record, so that an older reader refuses the state instead of dropping
   the device (protocol/state-blob.md, "Versioning").

The machine builds, wires, saves and restores what is listed here, in this order (its
``DeviceManager``); the state's ``devices`` map has one record per entry, under its name.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from vmipc.vmm.devices.persist import DeviceType
from vmipc.vmm.devices.uart import COM1_BASE, COM1_IRQ, PORT_COUNT, Uart16550, UartState
from vmipc.vmm.devices.virtio_blk import (
    VIRTIO_BLK_IRQ,
    VIRTIO_BLK_MMIO_BASE,
    VIRTIO_BLK_MMIO_SIZE,
    VirtioBlk,
    VirtioBlkState,
)

#: every userspace device, in the order they are built and restored
DEVICES: tuple[DeviceType[Any, Any], ...] = (
    DeviceType(
        "uart",
        UartState,
        create=lambda r: Uart16550(r.console, r.irq(COM1_IRQ)),
        restore=lambda state, r: Uart16550.restore(state, r.console, r.irq(COM1_IRQ)),
        ports=(COM1_BASE, PORT_COUNT),
    ),
    DeviceType(
        "virtio-blk",
        VirtioBlkState,
        create=lambda r: VirtioBlk(r.memory, r.disk, r.irq(VIRTIO_BLK_IRQ)),
        restore=lambda state, r: VirtioBlk.restore(state, r.memory, r.disk, r.irq(VIRTIO_BLK_IRQ)),
        mmio=(VIRTIO_BLK_MMIO_BASE, VIRTIO_BLK_MMIO_SIZE),
        check=lambda state, r, accept: state.disk_mismatch(r.disk, accept_disk=accept),
    ),
)

#: the devices of a version-1 machine state (before the block device): a reader takes
#: such a state as one whose block device has no disk (protocol/state-blob.md)
VERSION_1_DEVICES = ("uart",)


def device_record_keys() -> frozenset[str]:
    """Every key the ``devices`` map and the device records may hold: the names, and each
    record's ``version`` and fields (a record's ``to_dict`` uses its field names)."""
    keys = {"version"}
    for kind in DEVICES:
        keys.add(kind.name)
        keys.update(item.name for item in fields(kind.state))
    return frozenset(keys)

"""Userspace device models of the VMM, their ``Persist`` protocol (``persist.py``), the
registry of the devices a machine has (``registry.py``) and the machine's part that
holds them (``manager.py``)."""

from vmipc.vmm.devices.disk import DiskImage, DiskImageError, parse_disk_option
from vmipc.vmm.devices.manager import POST_CODE_PORT, POWER_OFF_PORT, DeviceManager
from vmipc.vmm.devices.persist import (
    DeviceResources,
    DeviceState,
    DeviceType,
    MmioDevice,
    Persist,
    PioDevice,
)
from vmipc.vmm.devices.registry import DEVICES, VERSION_1_DEVICES, device_record_keys
from vmipc.vmm.devices.uart import (
    COM1_BASE,
    COM1_IRQ,
    DEFAULT_RX_BACKLOG,
    FIFO_SIZE,
    PORT_COUNT,
    Uart16550,
    UartState,
)
from vmipc.vmm.devices.virtio_blk import (
    VIRTIO_BLK_IRQ,
    VIRTIO_BLK_MMIO_BASE,
    VIRTIO_BLK_MMIO_SIZE,
    VirtioBlk,
    VirtioBlkState,
)

__all__ = [
    "COM1_BASE",
    "COM1_IRQ",
    "DEFAULT_RX_BACKLOG",
    "DEVICES",
    "FIFO_SIZE",
    "PORT_COUNT",
    "POST_CODE_PORT",
    "POWER_OFF_PORT",
    "VERSION_1_DEVICES",
    "VIRTIO_BLK_IRQ",
    "VIRTIO_BLK_MMIO_BASE",
    "VIRTIO_BLK_MMIO_SIZE",
    "DeviceManager",
    "DeviceResources",
    "DeviceState",
    "DeviceType",
    "DiskImage",
    "DiskImageError",
    "MmioDevice",
    "Persist",
    "PioDevice",
    "Uart16550",
    "UartState",
    "VirtioBlk",
    "VirtioBlkState",
    "device_record_keys",
    "parse_disk_option",
]

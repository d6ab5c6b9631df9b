"""Userspace device models of the VMM."""

from vmipc.vmm.devices.uart import (
    COM1_BASE,
    COM1_IRQ,
    DEFAULT_RX_BACKLOG,
    FIFO_SIZE,
    PORT_COUNT,
    Uart16550,
    UartState,
)

__all__ = [
    "COM1_BASE",
    "COM1_IRQ",
    "DEFAULT_RX_BACKLOG",
    "FIFO_SIZE",
    "PORT_COUNT",
    "Uart16550",
    "UartState",
]

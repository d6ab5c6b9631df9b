"""Port-I/O dispatch for devices emulated in userspace."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("vmipc.vmm")


@dataclass(frozen=True)
class PortRange:
    base: int
    length: int
    read: Callable[[int], int]
    write: Callable[[int, int], None]
    name: str


class IoBus:
    """Maps guest I/O ports to device handlers. Unclaimed ports read as all ones."""

    def __init__(self) -> None:
        self._ports: dict[int, PortRange] = {}
        self._warned: set[int] = set()

    def register(
        self,
        base: int,
        length: int,
        read: Callable[[int], int],
        write: Callable[[int, int], None],
        name: str,
    ) -> None:
        entry = PortRange(base, length, read, write, name)
        for port in range(base, base + length):
            if port in self._ports:
                raise ValueError(f"port {port:#x} already belongs to {self._ports[port].name}")
            self._ports[port] = entry

    def read(self, port: int, size: int) -> int:
        entry = self._ports.get(port)
        if entry is None:
            self._note_unclaimed(port)
            return (1 << (8 * size)) - 1
        return entry.read(port - entry.base) & ((1 << (8 * size)) - 1)

    def write(self, port: int, size: int, value: int) -> None:
        entry = self._ports.get(port)
        if entry is None:
            self._note_unclaimed(port)
            return
        entry.write(port - entry.base, value)

    def _note_unclaimed(self, port: int) -> None:
        if port not in self._warned:
            self._warned.add(port)
            log.debug("guest touched unclaimed I/O port %#x", port)

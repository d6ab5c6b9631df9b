"""Port-I/O and MMIO dispatch for devices emulated in userspace."""

from __future__ import annotations

import bisect
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


@dataclass(frozen=True)
class MmioRange:
    base: int
    length: int
    read: Callable[[int, int], bytes]
    write: Callable[[int, bytes], None]
    name: str


class MmioBus:
    """Maps guest-physical ranges that no memory slot backs to device handlers (a
    virtio-mmio device's registers). ``read(offset, size)`` returns ``size`` bytes,
    ``write(offset, data)`` takes them; offsets are from the range's base. Unclaimed
    addresses read as all ones and drop writes."""

    def __init__(self) -> None:
        self._bases: list[int] = []
        self._ranges: list[MmioRange] = []

    def register(
        self,
        base: int,
        length: int,
        read: Callable[[int, int], bytes],
        write: Callable[[int, bytes], None],
        name: str,
    ) -> None:
        if length <= 0:
            raise ValueError(f"MMIO range {name} is empty")
        entry = MmioRange(base, length, read, write, name)
        at = bisect.bisect(self._bases, base)
        for neighbour in self._ranges[max(at - 1, 0) : at + 1]:
            if base < neighbour.base + neighbour.length and neighbour.base < base + length:
                raise ValueError(
                    f"MMIO {base:#x}+{length:#x} overlaps {neighbour.name} "
                    f"({neighbour.base:#x}+{neighbour.length:#x})"
                )
        self._bases.insert(at, base)
        self._ranges.insert(at, entry)

    def _find(self, addr: int, size: int) -> MmioRange | None:
        at = bisect.bisect(self._bases, addr) - 1
        if at >= 0:
            entry = self._ranges[at]
            if addr + size <= entry.base + entry.length:
                return entry
        return None

    def read(self, addr: int, size: int) -> bytes:
        entry = self._find(addr, size)
        if entry is None:
            # per access, not once per address: a guest can touch 2**64 of them
            log.debug("guest read unclaimed MMIO at %#x", addr)
            return b"\xff" * size
        data = entry.read(addr - entry.base, size)
        if len(data) != size:
            raise ValueError(f"{entry.name} answered a {size}-byte read with {len(data)} bytes")
        return data

    def write(self, addr: int, data: bytes) -> None:
        entry = self._find(addr, len(data))
        if entry is None:
            log.debug("guest wrote unclaimed MMIO at %#x", addr)
            return
        entry.write(addr - entry.base, data)

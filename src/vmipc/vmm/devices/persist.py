"""How a userspace device is saved, restored and placed: the ``Persist`` protocol.

As in Firecracker's ``persist.rs``, a device and its state are two things:

* ``<Device>State`` — a plain, frozen dataclass with a ``VERSION``, ``to_dict()`` (ints,
  bytes, str, lists and maps only: what msgpack carries) and ``from_dict()``, which refuses
  any other version and any impossible value with :class:`ValueError`. It is the device's
  record in a state blob or snapshot (protocol/state-blob.md).
* the device — it implements :class:`Persist`: ``save()`` returns its record and cannot
  fail (it runs on a paused machine) but for an I/O error reading what the record names
  (the block device's disk, for its fingerprint), and a *restore constructor* builds a
  live device from a record plus the live resources of this process
  (:class:`DeviceResources`): nothing of the old device object is reused.

A :class:`DeviceType` ties the two together with where the device sits on the buses; the
registry (``vmm/devices/registry.py``) lists them, and the machine's
:class:`~vmipc.vmm.devices.manager.DeviceManager` builds, wires, saves and restores what it
lists. Adding a device is writing the device and its record, and one entry there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, Self, TypeVar

if TYPE_CHECKING:
    from vmipc.vmm.devices.disk import DiskImage
    from vmipc.vmm.memory import GuestMemory


class DeviceState(Protocol):
    """A device's saved state: a frozen dataclass with a version (see the module)."""

    VERSION: ClassVar[int]

    def to_dict(self) -> Mapping[str, object]:
        """The record as it is written: ``{"version": VERSION, <field>: value, ...}``."""
        ...

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Self:
        """The record ``to_dict`` wrote; :class:`ValueError` for another version, a key
        more or less, a value of another type or a state the device can never be in."""
        ...


S = TypeVar("S", bound=DeviceState)
S_co = TypeVar("S_co", bound=DeviceState, covariant=True)


class Persist(Protocol[S_co]):
    """A device that can be saved; its restore constructor is its :class:`DeviceType`'s."""

    def save(self) -> S_co:
        """The device's state, between two operations. Never fails, but for OSError from
        reading the device's backing (a disk's fingerprint)."""
        ...


class PioDevice(Protocol):
    """A device behind I/O ports: ``offset`` is from its first port."""

    def io_read(self, offset: int) -> int: ...

    def io_write(self, offset: int, value: int) -> None: ...


class MmioDevice(Protocol):
    """A device behind a guest-physical range no RAM backs (e.g. virtio-mmio registers):
    ``offset`` is from the range's base; a read returns exactly ``size`` bytes."""

    def mmio_read(self, offset: int, size: int) -> bytes: ...

    def mmio_write(self, offset: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class DeviceResources:
    """The live things of this process a device is built with — never saved: a restored
    device gets the restoring machine's."""

    #: where console output goes (the UART's transmitter)
    console: Callable[[bytes], None]
    #: drive an interrupt line of the in-kernel irqchip: ``irq_line(irq, level)``
    irq_line: Callable[[int, int], None]
    #: guest RAM, for devices that reach it (virtio rings, DMA)
    memory: GuestMemory
    #: the block device's image (opened before the sandbox), or None: no disk
    disk: DiskImage | None = None

    def irq(self, line: int) -> Callable[[int], None]:
        """A callable that drives interrupt ``line`` to the level it is given."""
        irq_line = self.irq_line
        return lambda level: irq_line(line, level)


D = TypeVar("D", bound=Persist[Any])


@dataclass(frozen=True)
class DeviceType(Generic[S, D]):
    """One kind of userspace device: its record, how to build it new and from a record,
    and where it sits. ``name`` is its key in the state's ``devices`` map (wire-visible)."""

    name: str
    #: the ``<Device>State`` class; ``state.from_dict`` validates a record
    state: type[S]
    #: a new device, as the machine boots
    create: Callable[[DeviceResources], D]
    #: the restore constructor: a device that continues exactly from the record
    restore: Callable[[S, DeviceResources], D]
    #: ``(first port, count)`` on the port bus (the device is a :class:`PioDevice`)
    ports: tuple[int, int] | None = None
    #: ``(base, length)`` on the MMIO bus (the device is an :class:`MmioDevice`)
    mmio: tuple[int, int] | None = None
    #: why a (valid) record cannot go to a machine with these resources (a disk of
    #: another size, say), or None: asked before any of a state is restored. Its third
    #: argument: accept another disk than the record's (``load-state accept_disk``)
    check: Callable[[S, DeviceResources, bool], str | None] | None = None

    def load(self, record: Any) -> S:
        """The state record in ``record`` (decoded msgpack); :class:`ValueError` if it is
        not a valid record of this device's version."""
        return self.state.from_dict(record)

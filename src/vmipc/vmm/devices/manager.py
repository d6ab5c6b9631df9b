"""The machine's userspace devices as one part: built from the registry, placed on the
port and MMIO buses, saved and restored as a map of ``<Device>State`` records.

Besides the registered devices it owns two fixed platform ports with no state: the
power-off port 0x501 (a byte written there powers the guest off, like QEMU's
isa-debug-exit) and the POST port 0x80 (ignored).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from vmipc.vmm.devices.persist import (
    DeviceResources,
    DeviceState,
    DeviceType,
)
from vmipc.vmm.iobus import IoBus, MmioBus
from vmipc.vmm.vcpu import GuestStopped

if TYPE_CHECKING:
    from vmipc.vmm.devices.disk import DiskImage

#: Writing a byte here powers the guest off (QEMU's isa-debug-exit uses the same port).
POWER_OFF_PORT = 0x501
POST_CODE_PORT = 0x80

T = TypeVar("T")


class DeviceManager:
    """The userspace devices of one machine.

    The buses reach a device through its name at each access, so a restore — which builds
    new device objects — needs no new bus entries. :meth:`save` and :meth:`restore` run on
    a paused machine: no vCPU is inside a device meanwhile.
    """

    def __init__(
        self,
        kinds: Sequence[DeviceType[Any, Any]],
        resources: DeviceResources,
        pio: IoBus,
        mmio: MmioBus,
    ) -> None:
        self._kinds = tuple(kinds)
        self._resources = resources
        self._devices: dict[str, Any] = {}
        #: whether the machine is paused: devices with a worker take no request meanwhile
        self._quiesced = False
        #: the byte the guest wrote to the power-off port, once it has
        self.power_off_code: int | None = None
        for kind in self._kinds:
            self._devices[kind.name] = kind.create(resources)
            self._attach(kind, pio, mmio)
        pio.register(POWER_OFF_PORT, 1, lambda _o: 0xFF, self._power_off, "power-off")
        pio.register(POST_CODE_PORT, 1, lambda _o: 0xFF, lambda _o, _v: None, "post")

    def _attach(self, kind: DeviceType[Any, Any], pio: IoBus, mmio: MmioBus) -> None:
        # the device is looked up on each access (a restore replaces it), without a
        # typing.cast: this is the vCPU's exit path
        devices, name = self._devices, kind.name
        if kind.ports is not None:
            base, count = kind.ports

            def io_read(offset: int) -> int:
                value: int = devices[name].io_read(offset)
                return value

            def io_write(offset: int, value: int) -> None:
                devices[name].io_write(offset, value)

            pio.register(base, count, io_read, io_write, name)
        if kind.mmio is not None:
            base, length = kind.mmio

            def mmio_read(offset: int, size: int) -> bytes:
                data: bytes = devices[name].mmio_read(offset, size)
                return data

            def mmio_write(offset: int, data: bytes) -> None:
                devices[name].mmio_write(offset, data)

            mmio.register(base, length, mmio_read, mmio_write, name)

    def get(self, name: str, kind: type[T]) -> T:
        """The live device registered as ``name``, which must be a ``kind``."""
        device = self._devices[name]
        if not isinstance(device, kind):
            raise TypeError(f"device {name!r} is a {type(device).__name__}, not a {kind.__name__}")
        return device

    def save(self) -> dict[str, DeviceState]:
        """Every device's record, by name, in registry order. Fails only if a disk cannot
        be read for its fingerprint (OSError)."""
        return {kind.name: self._devices[kind.name].save() for kind in self._kinds}

    def check(self, states: Mapping[str, DeviceState], *, accept_disk: bool = False) -> str | None:
        """Why ``states`` cannot be restored into these devices (a record made with
        another disk, say), or None. Asked before anything is restored. ``accept_disk``:
        a disk of another size or content is taken (its mode must still match)."""
        for kind in self._kinds:
            if kind.check is not None:
                why = kind.check(states[kind.name], self._resources, accept_disk)
                if why:
                    return f"{kind.name}: {why}"
        return None

    def restore(self, states: Mapping[str, DeviceState]) -> None:
        """Replace every device by one built from its record (its type's restore
        constructor) with this machine's resources. ``states`` holds a record for every
        registered device (``MachineState`` checks that). Restored devices start
        quiesced, as the machine is paused; :meth:`resume` lets them go."""
        restored = {
            kind.name: kind.restore(states[kind.name], self._resources) for kind in self._kinds
        }
        old = dict(self._devices)
        self._devices.update(restored)  # in place: the buses hold this very map
        for device in old.values():
            _call(device, "close")
        if not self._quiesced:
            self.resume()

    def attach_disk(self, disk: DiskImage) -> None:
        """Build every device anew with ``disk`` among the resources: only for a machine
        that has not run yet (an incoming one, before its state), whose devices hold
        nothing a guest did."""
        self._resources = dataclasses.replace(self._resources, disk=disk)
        fresh = {kind.name: kind.create(self._resources) for kind in self._kinds}
        old = dict(self._devices)
        self._devices.update(fresh)  # in place: the buses hold this very map
        for device in old.values():
            _call(device, "close")
        if self._quiesced:
            for device in fresh.values():
                _call(device, "quiesce")

    def quiesce(self) -> None:
        """Every device with requests of its own (the block device) takes no more and has
        completed the ones it took: what pause calls once the vCPUs are parked."""
        self._quiesced = True
        for device in self._devices.values():
            _call(device, "quiesce")

    def quiesce_nowait(self, on_idle: Callable[[], None]) -> bool:
        """As :meth:`quiesce`, without waiting: True when no device has a request in
        flight; else False, and ``on_idle`` is called (from a device's worker, perhaps
        more than once) as they complete: call this again to know whether all have."""
        self._quiesced = True
        idle = True
        for device in self._devices.values():
            nowait = getattr(device, "quiesce_nowait", None)
            if nowait is not None:
                idle = nowait(on_idle) and idle
            else:
                _call(device, "quiesce")
        return idle

    def resume(self) -> None:
        """Devices take requests again (and look at what the guest queued meanwhile)."""
        self._quiesced = False
        for device in self._devices.values():
            _call(device, "resume")

    def flush(self) -> None:
        """Make what the guest wrote to writable disks durable (fdatasync); read-only
        disks are never flushed. OSError if the host cannot."""
        for device in self._devices.values():
            _call(device, "flush")

    def close(self) -> None:
        """Stop the devices' worker threads. Idempotent."""
        for device in self._devices.values():
            _call(device, "close")

    def _power_off(self, _offset: int, value: int) -> None:
        self.power_off_code = value
        raise GuestStopped(False, f"guest powered off (code {value})")


def _call(device: object, name: str) -> None:
    """Call ``device.name()`` if the device has that hook (only some devices do)."""
    hook = getattr(device, name, None)
    if hook is not None:
        hook()

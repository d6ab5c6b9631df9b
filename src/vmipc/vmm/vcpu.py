"""vCPU setup (CPUID, boot registers) and the per-vCPU thread that runs KVM_RUN."""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from vmipc.errors import VmipcError
from vmipc.kvm import (
    INTR,
    SYSTEM_EVENT_RESET,
    SYSTEM_EVENT_SHUTDOWN,
    FailEntry,
    Hlt,
    InternalError,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    Unsupported,
    Vcpu,
    VcpuExit,
    structs,
)
from vmipc.vmm.loaders import BootPlan, CpuMode

if TYPE_CHECKING:
    from vmipc.vmm.iobus import IoBus, MmioBus

log = logging.getLogger("vmipc.vmm")

_CPUID_HYPERVISOR_BIT = 1 << 31


def configure_cpuid(vcpu: Vcpu, supported: ctypes.Structure, vcpu_count: int) -> ctypes.Structure:
    """Give ``vcpu`` the host-supported CPUID with its own APIC ID and topology."""
    count = int(supported.nent)
    cpuid = structs.kvm_cpuid2(count)
    ctypes.memmove(
        ctypes.addressof(cpuid.entries),
        ctypes.addressof(supported.entries),
        count * ctypes.sizeof(structs.KvmCpuidEntry2),
    )
    for index in range(count):
        entry = cpuid.entries[index]
        if entry.function == 1:
            entry.ebx = (entry.ebx & 0x0000FFFF) | (vcpu.id << 24) | (max(vcpu_count, 1) << 16)
            entry.ecx |= _CPUID_HYPERVISOR_BIT
        elif entry.function in (0xB, 0x1F):
            entry.edx = vcpu.id
    vcpu.set_cpuid2(cpuid)
    return cpuid


def _flat_segment(selector: int, code: bool) -> structs.KvmSegment:
    return structs.KvmSegment(
        base=0,
        limit=0xFFFFFFFF,
        selector=selector,
        type=0xB if code else 0x3,
        present=1,
        dpl=0,
        db=1,
        s=1,
        l=0,
        g=1,
    )


def apply_boot_plan(vcpu: Vcpu, plan: BootPlan) -> None:
    """Put the boot vCPU in the mode and registers a loader asked for."""
    sregs = vcpu.get_sregs()
    if plan.mode is CpuMode.REAL:
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            segment = getattr(sregs, name)
            segment.base = 0
            segment.selector = 0
    else:
        sregs.cs = _flat_segment(0x10, code=True)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, _flat_segment(0x18, code=False))
        sregs.cr0 = (sregs.cr0 | 0x1) & ~0x80000000  # PE on, PG off
    vcpu.set_sregs(sregs)
    regs = structs.KvmRegs()
    regs.rflags = 0x2
    regs.rip = plan.rip
    for name, value in plan.registers.items():
        setattr(regs, name, value)
    vcpu.set_regs(regs)


_APIC_SVR = 0xF0
_APIC_LVT_LINT0 = 0x350
_APIC_LVT_LINT1 = 0x360
_APIC_SVR_ENABLE = 0x100
_APIC_DELIVERY_EXTINT = 0x700
_APIC_DELIVERY_NMI = 0x400


def apply_bios_lapic_setup(vcpu: Vcpu) -> None:
    """Leave the boot vCPU's LAPIC as a PC BIOS does before it hands over: software
    enabled, LINT0 in ExtINT mode (the PIC's output), LINT1 as NMI. Guests that were
    written for real firmware (and QEMU's, which runs SeaBIOS) rely on it."""
    lapic = vcpu.get_lapic()
    raw = bytearray(memoryview(lapic).cast("B"))

    def update(offset: int, value: int) -> None:
        raw[offset : offset + 4] = value.to_bytes(4, "little")

    svr = int.from_bytes(raw[_APIC_SVR : _APIC_SVR + 4], "little")
    update(_APIC_SVR, svr | _APIC_SVR_ENABLE)
    update(_APIC_LVT_LINT0, _APIC_DELIVERY_EXTINT)
    update(_APIC_LVT_LINT1, _APIC_DELIVERY_NMI)
    vcpu.set_lapic(structs.KvmLapicState.from_buffer_copy(bytes(raw)))


def describe_registers(vcpu: Vcpu) -> str:
    """A one-line register dump for the log when a guest dies."""
    try:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
    except OSError as exc:
        return f"(registers unavailable: {exc})"
    names = ["rip", "rsp", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rflags"]
    parts = [f"{name}={getattr(regs, name):#x}" for name in names]
    parts += [
        f"cs={sregs.cs.selector:#x}",
        f"cr0={sregs.cr0:#x}",
        f"cr3={sregs.cr3:#x}",
        f"cr4={sregs.cr4:#x}",
        f"efer={sregs.efer:#x}",
    ]
    return " ".join(parts)


class GuestStopped(VmipcError):
    """Raised from exit handling when the guest powers off or dies."""

    def __init__(self, crashed: bool, reason: str) -> None:
        super().__init__(reason)
        self.crashed = crashed
        self.reason = reason


class VcpuThread:
    """Runs one vCPU in its own thread and parks it outside KVM_RUN on request.

    The machine owns the gate (``gate_closed``) and the lock; ``cond`` is this thread's own
    condition over that lock, which :meth:`wake` notifies when the gate may have opened
    (one wakeup per vCPU, none when another vCPU parks or the run state changes). This
    class only runs the loop. A pending I/O or MMIO exit is always completed by one more KVM_RUN
    (which returns at once with ``immediate_exit`` set) before the vCPU parks, so a
    parked vCPU's state is complete.
    """

    def __init__(
        self,
        vcpu: Vcpu,
        iobus: IoBus,
        mmio: MmioBus,
        cond: threading.Condition,
        gate_closed: Callable[[], bool],
        stopping: Callable[[], bool],
        on_park: Callable[[VcpuThread, bool], None],
        on_guest_stop: Callable[[VcpuThread, GuestStopped], None],
    ) -> None:
        self.vcpu = vcpu
        self._iobus = iobus
        self._mmio = mmio
        self._cond = cond
        self._gate_closed = gate_closed
        self._stopping = stopping
        self._on_park = on_park
        self._on_guest_stop = on_guest_stop
        self.exits = 0
        self.thread = threading.Thread(target=self._main, name=f"vcpu{vcpu.id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        """Let a parked thread look at the gate again (the caller holds the lock)."""
        self._cond.notify()

    def _main(self) -> None:
        try:
            self._loop()
        except GuestStopped as stop:
            self._on_guest_stop(self, stop)
        except Exception as exc:  # a VMM bug must stop the VM, not kill the process silently
            log.exception("vcpu%d: unexpected error", self.vcpu.id)
            self._on_guest_stop(
                self, GuestStopped(True, f"VMM error on vcpu {self.vcpu.id}: {exc}")
            )

    def _loop(self) -> None:
        vcpu = self.vcpu
        needs_completion = False
        while True:
            if self._gate_closed() and not needs_completion:
                if not self._park():
                    return
                continue
            exit = vcpu.run()
            needs_completion = False
            if exit is INTR:
                continue
            self.exits += 1
            needs_completion = self._handle_exit(exit)

    def _park(self) -> bool:
        """Wait at the closed gate. Returns False when the machine is stopping."""
        with self._cond:
            self._on_park(self, True)
            while self._gate_closed() and not self._stopping():
                self._cond.wait()
            self._on_park(self, False)
            return not self._stopping()

    def _handle_exit(self, exit: VcpuExit) -> bool:
        """Handle one exit; returns True when KVM must be re-entered to complete it."""
        match exit:
            case IoOut(port, size, data):
                if len(data) == size:
                    self._iobus.write(port, size, int.from_bytes(data, "little"))
                else:  # rep outs: one write per item
                    for start in range(0, len(data), size):
                        value = int.from_bytes(data[start : start + size], "little")
                        self._iobus.write(port, size, value)
                return True
            case IoIn(port, size, count):
                if count == 1:
                    self.vcpu.complete_io_in(self._iobus.read(port, size).to_bytes(size, "little"))
                else:  # rep ins
                    self.vcpu.complete_io_in(
                        b"".join(
                            self._iobus.read(port, size).to_bytes(size, "little")
                            for _ in range(count)
                        )
                    )
                return True
            case MmioRead(addr, size):
                self.vcpu.complete_mmio_read(self._mmio.read(addr, size))
                return True
            case MmioWrite(addr, data):
                self._mmio.write(addr, data)
                return True
            case Hlt():
                return False  # in-kernel LAPIC: KVM waits for interrupts itself; re-enter
        raise guest_stop(exit, self.vcpu.id)


def guest_stop(exit: VcpuExit, vcpu_id: int) -> GuestStopped:
    """Why an exit the vCPU cannot go on from stops the guest: powered off (a shutdown or
    reset event) or crashed (everything else)."""
    match exit:
        case Shutdown():
            return GuestStopped(True, f"triple fault (shutdown) on vcpu {vcpu_id}")
        case InternalError(suberror, data):
            detail = " ".join(f"{word:#x}" for word in data)
            return GuestStopped(
                True,
                f"KVM internal error on vcpu {vcpu_id}: suberror {suberror}"
                f" ({_INTERNAL_SUBERRORS.get(suberror, 'unknown')})"
                + (f" data {detail}" if detail else ""),
            )
        case FailEntry(reason):
            return GuestStopped(
                True, f"VM entry failed on vcpu {vcpu_id}: hardware reason {reason:#x}"
            )
        case SystemEvent(kind) if kind == SYSTEM_EVENT_SHUTDOWN:
            return GuestStopped(False, f"guest shut down (system event) on vcpu {vcpu_id}")
        case SystemEvent(kind) if kind == SYSTEM_EVENT_RESET:
            return GuestStopped(False, f"guest asked for a reset on vcpu {vcpu_id}")
        case SystemEvent(kind):
            return GuestStopped(True, f"guest system event {kind} on vcpu {vcpu_id}")
        case Unsupported():
            return GuestStopped(True, f"unhandled KVM exit {exit.name} on vcpu {vcpu_id}")
    # Intr never gets here: the loop runs again
    return GuestStopped(True, f"VMM error on vcpu {vcpu_id}: {exit!r} is not handled")


_INTERNAL_SUBERRORS = {
    1: "instruction emulation failed",
    2: "simultaneous exceptions",
    3: "delivery event",
    4: "unexpected exit reason",
}

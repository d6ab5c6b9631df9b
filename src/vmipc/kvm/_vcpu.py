"""``Vcpu``: a vCPU fd from KVM_CREATE_VCPU, with its mmap'd ``struct kvm_run``."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from vmipc.kvm import _numbers as n
from vmipc.kvm import structs as s
from vmipc.kvm._errors import KvmError
from vmipc.kvm._exits import INTR, VcpuExit, decode_exit, io_data_span, mmio_data_span
from vmipc.kvm._ioctl import ioctl


class Vcpu:
    """One vCPU. Methods are named after the vCPU-fd ioctls."""

    def __init__(self, fd: int, vcpu_id: int, run_map: mmap.mmap) -> None:
        self.fd = fd
        self.id = vcpu_id
        self._run_map = run_map
        #: the shared ``struct kvm_run`` (for ``immediate_exit``; :meth:`run` decodes exits)
        self.kvm_run = s.KvmRun.from_buffer(run_map)

    def close(self) -> None:
        if self.fd >= 0:
            del self.kvm_run
            self._run_map.close()
            os.close(self.fd)
            self.fd = -1

    def run(self) -> VcpuExit:
        """KVM_RUN; returns what the vCPU exited for (vmipc.kvm._exits), :data:`INTR`
        when it was interrupted before (EINTR: a pause kick, or ``immediate_exit``).

        An :class:`IoIn` or :class:`MmioRead` must be answered (:meth:`complete_io_in`,
        :meth:`complete_mmio_read`) before the next run, which finishes the instruction."""
        try:
            ioctl(self.fd, "KVM_RUN", n.KVM_RUN, 0)
        except KvmError as exc:
            if exc.errno in (errno.EINTR, errno.EAGAIN):
                return INTR
            raise
        return decode_exit(self._run_map)

    def complete_io_in(self, data: bytes) -> None:
        """The bytes the guest's pending port read gets (``size * count`` of them)."""
        offset, length = io_data_span(self._run_map)
        if len(data) != length:
            raise ValueError(f"a port read of {length} bytes cannot take {len(data)}")
        self._run_map[offset : offset + length] = data

    def complete_mmio_read(self, data: bytes) -> None:
        """The bytes the guest's pending MMIO read gets (as many as it reads)."""
        offset, length = mmio_data_span(self._run_map)
        if len(data) != length:
            raise ValueError(f"an MMIO read of {length} bytes cannot take {len(data)}")
        self._run_map[offset : offset + length] = data

    def _get(self, name: str, request: int, struct: ctypes.Structure) -> None:
        ioctl(self.fd, name, request, struct)

    def get_regs(self) -> s.KvmRegs:
        regs = s.KvmRegs()
        self._get("KVM_GET_REGS", n.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: s.KvmRegs) -> None:
        ioctl(self.fd, "KVM_SET_REGS", n.KVM_SET_REGS, regs)

    def get_sregs(self) -> s.KvmSregs:
        sregs = s.KvmSregs()
        self._get("KVM_GET_SREGS", n.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: s.KvmSregs) -> None:
        ioctl(self.fd, "KVM_SET_SREGS", n.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> s.KvmFpu:
        fpu = s.KvmFpu()
        self._get("KVM_GET_FPU", n.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: s.KvmFpu) -> None:
        ioctl(self.fd, "KVM_SET_FPU", n.KVM_SET_FPU, fpu)

    def get_xsave(self) -> s.KvmXsave:
        xsave = s.KvmXsave()
        self._get("KVM_GET_XSAVE", n.KVM_GET_XSAVE, xsave)
        return xsave

    def set_xsave(self, xsave: s.KvmXsave) -> None:
        ioctl(self.fd, "KVM_SET_XSAVE", n.KVM_SET_XSAVE, xsave)

    def get_xcrs(self) -> s.KvmXcrs:
        xcrs = s.KvmXcrs()
        self._get("KVM_GET_XCRS", n.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: s.KvmXcrs) -> None:
        ioctl(self.fd, "KVM_SET_XCRS", n.KVM_SET_XCRS, xcrs)

    def get_lapic(self) -> s.KvmLapicState:
        lapic = s.KvmLapicState()
        self._get("KVM_GET_LAPIC", n.KVM_GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic: s.KvmLapicState) -> None:
        ioctl(self.fd, "KVM_SET_LAPIC", n.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> int:
        state = s.KvmMpState()
        self._get("KVM_GET_MP_STATE", n.KVM_GET_MP_STATE, state)
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        ioctl(self.fd, "KVM_SET_MP_STATE", n.KVM_SET_MP_STATE, s.KvmMpState(mp_state=mp_state))

    def get_vcpu_events(self) -> s.KvmVcpuEvents:
        events = s.KvmVcpuEvents()
        self._get("KVM_GET_VCPU_EVENTS", n.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: s.KvmVcpuEvents) -> None:
        ioctl(self.fd, "KVM_SET_VCPU_EVENTS", n.KVM_SET_VCPU_EVENTS, events)

    def get_debugregs(self) -> s.KvmDebugregs:
        regs = s.KvmDebugregs()
        self._get("KVM_GET_DEBUGREGS", n.KVM_GET_DEBUGREGS, regs)
        return regs

    def set_debugregs(self, regs: s.KvmDebugregs) -> None:
        ioctl(self.fd, "KVM_SET_DEBUGREGS", n.KVM_SET_DEBUGREGS, regs)

    def set_cpuid2(self, cpuid: ctypes.Structure) -> None:
        ioctl(self.fd, "KVM_SET_CPUID2", n.KVM_SET_CPUID2, cpuid)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Read MSRs. KVM stops at the first unreadable index: the result may be shorter."""
        msrs = s.kvm_msrs(len(indices))
        for slot, index in enumerate(indices):
            msrs.entries[slot].index = index
        count = ioctl(self.fd, "KVM_GET_MSRS", n.KVM_GET_MSRS, msrs)
        entries = msrs.entries
        return {int(entries[i].index): int(entries[i].data) for i in range(count)}

    def set_msrs(self, values: list[tuple[int, int]]) -> int:
        """Write MSRs in order; returns how many KVM accepted."""
        msrs = s.kvm_msrs(len(values))
        for slot, (index, data) in enumerate(values):
            msrs.entries[slot].index = index
            msrs.entries[slot].data = data
        return ioctl(self.fd, "KVM_SET_MSRS", n.KVM_SET_MSRS, msrs)

    def kvmclock_ctrl(self) -> None:
        """Tell the guest (via its pvclock page) that it was paused by the host."""
        ioctl(self.fd, "KVM_KVMCLOCK_CTRL", n.KVM_KVMCLOCK_CTRL, 0)

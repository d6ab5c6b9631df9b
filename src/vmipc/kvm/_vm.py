"""``Vm``: a VM fd from KVM_CREATE_VM."""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import TYPE_CHECKING

from vmipc.kvm import _numbers as n
from vmipc.kvm import structs as s
from vmipc.kvm._ioctl import ioctl
from vmipc.kvm._vcpu import Vcpu

if TYPE_CHECKING:
    from vmipc.kvm._kvm import Kvm


class Vm:
    """One virtual machine. Methods are named after the VM-fd ioctls."""

    def __init__(self, fd: int, kvm: Kvm) -> None:
        self.fd = fd
        self.kvm = kvm

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", n.KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        region = s.KvmUserspaceMemoryRegion(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
        )
        ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", n.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, "KVM_SET_TSS_ADDR", n.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        value = ctypes.c_uint64(addr)
        ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", n.KVM_SET_IDENTITY_MAP_ADDR, value)

    def create_irqchip(self) -> None:
        ioctl(self.fd, "KVM_CREATE_IRQCHIP", n.KVM_CREATE_IRQCHIP, 0)

    def create_pit2(self, flags: int = 0) -> None:
        config = s.KvmPitConfig(flags=flags)
        ioctl(self.fd, "KVM_CREATE_PIT2", n.KVM_CREATE_PIT2, config)

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self.fd, "KVM_IRQ_LINE", n.KVM_IRQ_LINE, s.KvmIrqLevel(irq=irq, level=level))

    def get_irqchip(self, chip_id: int) -> s.KvmIrqchip:
        chip = s.KvmIrqchip(chip_id=chip_id)
        ioctl(self.fd, "KVM_GET_IRQCHIP", n.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: s.KvmIrqchip) -> None:
        ioctl(self.fd, "KVM_SET_IRQCHIP", n.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> s.KvmPitState2:
        state = s.KvmPitState2()
        ioctl(self.fd, "KVM_GET_PIT2", n.KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state: s.KvmPitState2) -> None:
        ioctl(self.fd, "KVM_SET_PIT2", n.KVM_SET_PIT2, state)

    def get_clock(self) -> s.KvmClockData:
        data = s.KvmClockData()
        ioctl(self.fd, "KVM_GET_CLOCK", n.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, data: s.KvmClockData) -> None:
        ioctl(self.fd, "KVM_SET_CLOCK", n.KVM_SET_CLOCK, data)

    def enable_cap(self, cap: int, *args: int) -> None:
        request = s.KvmEnableCap(cap=cap)
        for index, value in enumerate(args):
            request.args[index] = value
        ioctl(self.fd, "KVM_ENABLE_CAP", n.KVM_ENABLE_CAP, request)

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array[ctypes.c_uint64]) -> None:
        """Fill ``bitmap`` (a bit a page of the slot) with the pages dirtied since the last call."""
        log = s.KvmDirtyLog(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        ioctl(self.fd, "KVM_GET_DIRTY_LOG", n.KVM_GET_DIRTY_LOG, log)

    def clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, bitmap: ctypes.Array[ctypes.c_uint64]
    ) -> None:
        log = s.KvmClearDirtyLog(
            slot=slot,
            num_pages=num_pages,
            first_page=first_page,
            dirty_bitmap=ctypes.addressof(bitmap),
        )
        ioctl(self.fd, "KVM_CLEAR_DIRTY_LOG", n.KVM_CLEAR_DIRTY_LOG, log)

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = ioctl(self.fd, "KVM_CREATE_VCPU", n.KVM_CREATE_VCPU, vcpu_id)
        os.set_inheritable(fd, False)
        try:
            size = self.kvm.get_vcpu_mmap_size()
            run_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return Vcpu(fd, vcpu_id, run_map)

"""ioctl request numbers and capability numbers (include/uapi/linux/kvm.h)."""

from __future__ import annotations

import ctypes
import enum

from vmipc.kvm import structs as s
from vmipc.kvm._ioctl import io, ior, iow, iowr

KVM_API_VERSION = 12

# /dev/kvm
KVM_GET_API_VERSION = io(0x00)
KVM_CREATE_VM = io(0x01)
KVM_GET_MSR_INDEX_LIST = iowr(0x02, 4)
KVM_CHECK_EXTENSION = io(0x03)
KVM_GET_VCPU_MMAP_SIZE = io(0x04)
KVM_GET_SUPPORTED_CPUID = iowr(0x05, 8)

# VM fd
KVM_CREATE_VCPU = io(0x41)
KVM_GET_DIRTY_LOG = iow(0x42, ctypes.sizeof(s.KvmDirtyLog))
KVM_SET_USER_MEMORY_REGION = iow(0x46, ctypes.sizeof(s.KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = iow(0x48, 8)
KVM_CREATE_IRQCHIP = io(0x60)
KVM_IRQ_LINE = iow(0x61, ctypes.sizeof(s.KvmIrqLevel))
KVM_GET_IRQCHIP = iowr(0x62, ctypes.sizeof(s.KvmIrqchip))
KVM_SET_IRQCHIP = ior(0x63, ctypes.sizeof(s.KvmIrqchip))
KVM_CREATE_PIT2 = iow(0x77, ctypes.sizeof(s.KvmPitConfig))
KVM_SET_CLOCK = iow(0x7B, ctypes.sizeof(s.KvmClockData))
KVM_GET_CLOCK = ior(0x7C, ctypes.sizeof(s.KvmClockData))
KVM_GET_PIT2 = ior(0x9F, ctypes.sizeof(s.KvmPitState2))
KVM_SET_PIT2 = iow(0xA0, ctypes.sizeof(s.KvmPitState2))
KVM_ENABLE_CAP = iow(0xA3, ctypes.sizeof(s.KvmEnableCap))
KVM_CLEAR_DIRTY_LOG = iowr(0xC0, ctypes.sizeof(s.KvmClearDirtyLog))

# vCPU fd
KVM_RUN = io(0x80)
KVM_GET_REGS = ior(0x81, ctypes.sizeof(s.KvmRegs))
KVM_SET_REGS = iow(0x82, ctypes.sizeof(s.KvmRegs))
KVM_GET_SREGS = ior(0x83, ctypes.sizeof(s.KvmSregs))
KVM_SET_SREGS = iow(0x84, ctypes.sizeof(s.KvmSregs))
KVM_GET_MSRS = iowr(0x88, 8)
KVM_SET_MSRS = iow(0x89, 8)
KVM_GET_FPU = ior(0x8C, ctypes.sizeof(s.KvmFpu))
KVM_SET_FPU = iow(0x8D, ctypes.sizeof(s.KvmFpu))
KVM_GET_LAPIC = ior(0x8E, ctypes.sizeof(s.KvmLapicState))
KVM_SET_LAPIC = iow(0x8F, ctypes.sizeof(s.KvmLapicState))
KVM_SET_CPUID2 = iow(0x90, 8)
KVM_GET_CPUID2 = iowr(0x91, 8)
KVM_GET_MP_STATE = ior(0x98, ctypes.sizeof(s.KvmMpState))
KVM_SET_MP_STATE = iow(0x99, ctypes.sizeof(s.KvmMpState))
KVM_GET_VCPU_EVENTS = ior(0x9F, ctypes.sizeof(s.KvmVcpuEvents))
KVM_SET_VCPU_EVENTS = iow(0xA0, ctypes.sizeof(s.KvmVcpuEvents))
KVM_GET_DEBUGREGS = ior(0xA1, ctypes.sizeof(s.KvmDebugregs))
KVM_SET_DEBUGREGS = iow(0xA2, ctypes.sizeof(s.KvmDebugregs))
KVM_GET_XSAVE = ior(0xA4, ctypes.sizeof(s.KvmXsave))
KVM_SET_XSAVE = iow(0xA5, ctypes.sizeof(s.KvmXsave))
KVM_GET_XCRS = ior(0xA6, ctypes.sizeof(s.KvmXcrs))
KVM_SET_XCRS = iow(0xA7, ctypes.sizeof(s.KvmXcrs))
KVM_KVMCLOCK_CTRL = io(0xAD)


class Cap(enum.IntEnum):
    """KVM_CAP_* numbers vmipc asks about."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    MP_STATE = 14
    PIT2 = 33
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    XSAVE = 55
    XCRS = 56
    MAX_VCPUS = 66
    IMMEDIATE_EXIT = 136
    MANUAL_DIRTY_LOG_PROTECT2 = 168


class ExitReason(enum.IntEnum):
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    X86_RDMSR = 29
    X86_WRMSR = 30

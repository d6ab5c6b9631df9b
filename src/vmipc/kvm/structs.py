"""ctypes mirrors of the kernel's KVM structures (x86-64, include/uapi/linux/kvm.h and
arch/x86/include/uapi/asm/kvm.h). Sizes are checked in the tests against the kernel's."""

from __future__ import annotations

import ctypes
from ctypes import (
    Structure,
    Union,
    c_char,
    c_int32,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
)

u8, u16, u32, u64 = c_uint8, c_uint16, c_uint32, c_uint64


class KvmRegs(Structure):
    _fields_ = [
        (name, u64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags"
        ).split()
    ]


class KvmSegment(Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class KvmDtable(Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class KvmSregs(Structure):
    _fields_ = [
        *[(name, KvmSegment) for name in ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"]],
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        *[(name, u64) for name in ["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"]],
        ("interrupt_bitmap", u64 * 4),
    ]


class KvmFpu(Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class KvmLapicState(Structure):
    _fields_ = [("regs", c_char * 1024)]


class KvmVcpuEvents(Structure):
    _fields_ = [
        ("exception_injected", u8),
        ("exception_nr", u8),
        ("exception_has_error_code", u8),
        ("exception_pending", u8),
        ("exception_error_code", u32),
        ("interrupt_injected", u8),
        ("interrupt_nr", u8),
        ("interrupt_soft", u8),
        ("interrupt_shadow", u8),
        ("nmi_injected", u8),
        ("nmi_pending", u8),
        ("nmi_masked", u8),
        ("nmi_pad", u8),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", u8 * 4),
        ("reserved", u8 * 27),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_VCPUEVENT_VALID_SMM = 0x8


class KvmDebugregs(Structure):
    _fields_ = [
        ("db", u64 * 4),
        ("dr6", u64),
        ("dr7", u64),
        ("flags", u64),
        ("reserved", u64 * 9),
    ]


class KvmXsave(Structure):
    _fields_ = [("region", u32 * 1024)]


class KvmXcr(Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class KvmXcrs(Structure):
    _fields_ = [
        ("nr_xcrs", u32),
        ("flags", u32),
        ("xcrs", KvmXcr * 16),
        ("padding", u64 * 16),
    ]


class KvmMpState(Structure):
    _fields_ = [("mp_state", u32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


class KvmMsrEntry(Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


def kvm_msrs(count: int) -> Structure:
    """A ``struct kvm_msrs`` with room for ``count`` entries."""

    class KvmMsrs(Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * count)]

    msrs = KvmMsrs()
    msrs.nmsrs = count
    return msrs


class KvmCpuidEntry2(Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


def kvm_cpuid2(count: int) -> Structure:
    """A ``struct kvm_cpuid2`` with room for ``count`` entries."""

    class KvmCpuid2(Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * count)]

    cpuid = KvmCpuid2()
    cpuid.nent = count
    return cpuid


class KvmUserspaceMemoryRegion(Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class KvmDirtyLog(Structure):
    _fields_ = [("slot", u32), ("padding", u32), ("dirty_bitmap", u64)]


class KvmClearDirtyLog(Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class KvmIrqLevel(Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class KvmPitConfig(Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class KvmClockData(Structure):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


class KvmIrqchip(Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", c_char * 512)]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class KvmPitState2(Structure):
    _fields_ = [("channels", c_char * 72), ("flags", u32), ("reserved", u32 * 9)]


class KvmEnableCap(Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


# --- struct kvm_run (the mmap'd page shared with each vCPU) ---


class KvmRunIo(Structure):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class KvmRunMmio(Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class KvmRunFailEntry(Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class KvmRunInternal(Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class KvmRunSystemEvent(Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class KvmRunExit(Union):
    _fields_ = [
        ("io", KvmRunIo),
        ("mmio", KvmRunMmio),
        ("fail_entry", KvmRunFailEntry),
        ("internal", KvmRunInternal),
        ("system_event", KvmRunSystemEvent),
        ("padding", c_char * 256),
    ]


class KvmRun(Structure):
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", KvmRunExit),
    ]


assert ctypes.sizeof(KvmRegs) == 144
assert ctypes.sizeof(KvmSregs) == 312
assert ctypes.sizeof(KvmFpu) == 416
assert ctypes.sizeof(KvmVcpuEvents) == 64
assert ctypes.sizeof(KvmDebugregs) == 128
assert ctypes.sizeof(KvmXcrs) == 392
assert ctypes.sizeof(KvmIrqchip) == 520
assert ctypes.sizeof(KvmPitState2) == 112
assert ctypes.sizeof(KvmClockData) == 48
assert ctypes.sizeof(KvmEnableCap) == 104
assert KvmRun.exit.offset == 32
_ = c_int32

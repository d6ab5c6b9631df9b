"""The typed KVM layer against the real /dev/kvm."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from vmipc.kvm import REQUIRED_CAPS, Cap, Kvm, KvmError, KvmUnavailableError, structs

pytestmark = pytest.mark.kvm


def test_struct_sizes_match_the_kernel_abi() -> None:
    expected = {
        structs.KvmRegs: 144,
        structs.KvmSregs: 312,
        structs.KvmFpu: 416,
        structs.KvmLapicState: 1024,
        structs.KvmVcpuEvents: 64,
        structs.KvmDebugregs: 128,
        structs.KvmXsave: 4096,
        structs.KvmXcrs: 392,
        structs.KvmIrqchip: 520,
        structs.KvmPitState2: 112,
        structs.KvmClockData: 48,
        structs.KvmEnableCap: 104,
        structs.KvmUserspaceMemoryRegion: 32,
        structs.KvmCpuidEntry2: 40,
    }
    for struct, size in expected.items():
        assert ctypes.sizeof(struct) == size, struct.__name__


def test_required_capabilities_are_present() -> None:
    with Kvm() as kvm:
        kvm.require()
        for cap in REQUIRED_CAPS:
            assert kvm.check_extension(cap) > 0, cap.name


def test_a_failed_ioctl_names_itself_and_carries_errno() -> None:
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            with pytest.raises(KvmError) as info:
                # Slot regions must be page aligned: the kernel answers EINVAL.
                vm.set_user_memory_region(0, 0x123, 4096, 0x1000)
            assert info.value.errno == errno.EINVAL
            assert info.value.ioctl == "KVM_SET_USER_MEMORY_REGION"
            assert "KVM_SET_USER_MEMORY_REGION" in str(info.value)
        finally:
            vm.close()


def test_missing_device_is_reported_clearly(tmp_path: object) -> None:
    with pytest.raises(KvmUnavailableError, match="cannot open /nonexistent/kvm"):
        Kvm("/nonexistent/kvm")


def test_vcpu_register_round_trip() -> None:
    with Kvm() as kvm:
        vm = kvm.create_vm()
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        try:
            regs = vcpu.get_regs()
            regs.rax, regs.r15, regs.rip = 0x1234, 0xDEADBEEF, 0x7C00
            vcpu.set_regs(regs)
            again = vcpu.get_regs()
            assert (again.rax, again.r15, again.rip) == (0x1234, 0xDEADBEEF, 0x7C00)
            sregs = vcpu.get_sregs()
            sregs.cs.base = 0
            vcpu.set_sregs(sregs)
            assert vcpu.get_sregs().cs.base == 0
            assert vcpu.get_mp_state() == structs.KVM_MP_STATE_RUNNABLE
            msrs = vcpu.get_msrs([0x10])  # IA32_TSC
            assert 0x10 in msrs
        finally:
            vcpu.close()
            vm.close()


def test_kvm_fds_are_close_on_exec() -> None:
    import fcntl

    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            for fd in (kvm.fd, vm.fd):
                assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        finally:
            vm.close()
    assert Cap.IRQCHIP == 0
    assert os.path.exists("/dev/kvm")

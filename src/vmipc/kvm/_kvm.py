"""``Kvm``: the /dev/kvm system fd."""

from __future__ import annotations

import ctypes
import errno
import os

from vmipc.kvm import _numbers as n
from vmipc.kvm import structs as s
from vmipc.kvm._errors import KvmError, KvmUnavailableError, MissingCapabilityError
from vmipc.kvm._ioctl import ioctl
from vmipc.kvm._vm import Vm

#: What the VMM cannot work without.
REQUIRED_CAPS = (
    n.Cap.USER_MEMORY,
    n.Cap.IRQCHIP,
    n.Cap.PIT2,
    n.Cap.EXT_CPUID,
    n.Cap.IMMEDIATE_EXIT,
    n.Cap.MP_STATE,
    n.Cap.VCPU_EVENTS,
    n.Cap.XSAVE,
    n.Cap.ADJUST_CLOCK,
)


class Kvm:
    """The KVM subsystem (/dev/kvm). Creates VMs and answers capability questions."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmUnavailableError(f"cannot open {path}: {exc.strerror}") from None
        try:
            version = ioctl(self.fd, "KVM_GET_API_VERSION", n.KVM_GET_API_VERSION)
            if version != n.KVM_API_VERSION:
                raise KvmUnavailableError(f"{path} speaks KVM API {version}, need 12")
        except BaseException:
            os.close(self.fd)
            raise

    def dup(self) -> Kvm:
        """Another ``Kvm`` over the same open /dev/kvm (its own fd, closed separately).

        A sandboxed VMM (see ``vmipc.vmm.sandbox``) cannot open /dev/kvm again, so it
        keeps one ``Kvm`` from start-up and builds later machines from duplicates."""
        other = Kvm.__new__(Kvm)
        other.fd = os.dup(self.fd)
        return other

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", n.KVM_CHECK_EXTENSION, cap)

    def require(self, *caps: n.Cap) -> None:
        """Raise :class:`MissingCapabilityError` for the first absent capability."""
        for cap in caps or REQUIRED_CAPS:
            if self.check_extension(cap) <= 0:
                raise MissingCapabilityError(cap.name, int(cap))

    def get_vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, "KVM_GET_VCPU_MMAP_SIZE", n.KVM_GET_VCPU_MMAP_SIZE)

    def get_supported_cpuid(self) -> ctypes.Structure:
        count = 64
        while True:
            cpuid = s.kvm_cpuid2(count)
            try:
                ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", n.KVM_GET_SUPPORTED_CPUID, cpuid)
                return cpuid
            except KvmError as exc:
                if exc.errno != errno.E2BIG or count > 4096:
                    raise
                count *= 2

    def get_msr_index_list(self) -> list[int]:
        count = 64
        while True:
            buf = (ctypes.c_uint32 * (count + 1))()
            buf[0] = count
            try:
                ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", n.KVM_GET_MSR_INDEX_LIST, buf)
                return list(buf[1 : 1 + buf[0]])
            except KvmError as exc:
                if exc.errno != errno.E2BIG or count > 65536:
                    raise
                count = max(count * 2, int(buf[0]))

    def create_vm(self) -> Vm:
        fd = ioctl(self.fd, "KVM_CREATE_VM", n.KVM_CREATE_VM, 0)
        os.set_inheritable(fd, False)
        return Vm(fd, self)

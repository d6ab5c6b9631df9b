"""Boot loaders: each puts a guest into RAM and returns the boot vCPU's :class:`BootPlan`.

A new boot path (e.g. the Linux x86 boot protocol on hosts with hardware KVM) is one
more module here returning a BootPlan; the machine does not change.
"""

from vmipc.vmm.loaders._common import BootPlan, CpuMode, GuestImageError
from vmipc.vmm.loaders.bootsector import load_bootsector, load_bootsector_file
from vmipc.vmm.loaders.multiboot import load_multiboot, load_multiboot_file, parse_multiboot

__all__ = [
    "BootPlan",
    "CpuMode",
    "GuestImageError",
    "load_bootsector",
    "load_bootsector_file",
    "load_multiboot",
    "load_multiboot_file",
    "parse_multiboot",
]

"""A thin typed layer over the KVM ioctls: one class per fd (``Kvm``, ``Vm``, ``Vcpu``).

Nothing above this package issues ioctls itself. ``Vcpu.run`` returns a typed exit
(``IoIn``, ``IoOut``, ``MmioRead``, ... — the ``VcpuExit`` union), never the raw
``kvm_run`` union.
"""

from vmipc._util import fixup_module_metadata
from vmipc.kvm import structs
from vmipc.kvm._errors import KvmError, KvmUnavailableError, MissingCapabilityError
from vmipc.kvm._exits import (
    HLT,
    INTR,
    SHUTDOWN,
    SYSTEM_EVENT_CRASH,
    SYSTEM_EVENT_RESET,
    SYSTEM_EVENT_SHUTDOWN,
    FailEntry,
    Hlt,
    InternalError,
    Intr,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    Unsupported,
    VcpuExit,
    decode_exit,
)
from vmipc.kvm._kvm import REQUIRED_CAPS, Kvm
from vmipc.kvm._numbers import Cap, ExitReason
from vmipc.kvm._vcpu import Vcpu
from vmipc.kvm._vm import Vm

__all__ = [
    "HLT",
    "INTR",
    "REQUIRED_CAPS",
    "SHUTDOWN",
    "SYSTEM_EVENT_CRASH",
    "SYSTEM_EVENT_RESET",
    "SYSTEM_EVENT_SHUTDOWN",
    "Cap",
    "ExitReason",
    "FailEntry",
    "Hlt",
    "InternalError",
    "Intr",
    "IoIn",
    "IoOut",
    "Kvm",
    "KvmError",
    "KvmUnavailableError",
    "MissingCapabilityError",
    "MmioRead",
    "MmioWrite",
    "Shutdown",
    "SystemEvent",
    "Unsupported",
    "Vcpu",
    "VcpuExit",
    "Vm",
    "decode_exit",
    "structs",
]

fixup_module_metadata(__name__, globals())

"""A thin typed layer over the KVM ioctls: one class per fd (``Kvm``, ``Vm``, ``Vcpu``).

Nothing above this package issues ioctls itself.
"""

from vmipc._util import fixup_module_metadata
from vmipc.kvm import structs
from vmipc.kvm._errors import KvmError, KvmUnavailableError, MissingCapabilityError
from vmipc.kvm._kvm import REQUIRED_CAPS, Kvm
from vmipc.kvm._numbers import Cap, ExitReason
from vmipc.kvm._vcpu import Vcpu
from vmipc.kvm._vm import Vm

__all__ = [
    "REQUIRED_CAPS",
    "Cap",
    "ExitReason",
    "Kvm",
    "KvmError",
    "KvmUnavailableError",
    "MissingCapabilityError",
    "Vcpu",
    "Vm",
    "structs",
]

fixup_module_metadata(__name__, globals())

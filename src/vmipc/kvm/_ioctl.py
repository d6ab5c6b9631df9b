"""ioctl numbers and the single place where vmipc issues ioctls.

Calls go through libc via ctypes rather than ``fcntl.ioctl``: ``fcntl.ioctl`` passes a
C ``int`` (values >= 2**31 overflow) and retries on EINTR, while a KVM_RUN interrupted
by a pause kick must return EINTR to its caller.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

from vmipc.kvm._errors import KvmError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc_ioctl.restype = ctypes.c_int

KVMIO = 0xAE
_NONE, _WRITE, _READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def io(nr: int) -> int:
    return _ioc(_NONE, nr, 0)


def iow(nr: int, size: int) -> int:
    return _ioc(_WRITE, nr, size)


def ior(nr: int, size: int) -> int:
    return _ioc(_READ, nr, size)


def iowr(nr: int, size: int) -> int:
    return _ioc(_READ | _WRITE, nr, size)


def ioctl(fd: int, name: str, request: int, arg: Any = 0) -> int:
    """Issue ``request`` on ``fd``; ``arg`` is an int or a ctypes object passed by pointer.

    Returns the ioctl's non-negative result; raises :class:`KvmError` named ``name``.
    """
    value = arg if isinstance(arg, int) else ctypes.addressof(arg)
    result = _libc_ioctl(fd, request, value)
    if result < 0:
        raise KvmError(name, ctypes.get_errno())
    return int(result)

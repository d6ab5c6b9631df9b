"""Errors raised by the KVM layer."""

from __future__ import annotations

import errno as _errno
import os

from vmipc.errors import VmipcError


class KvmError(OSError, VmipcError):
    """An ioctl on a KVM fd failed. Carries the errno and the ioctl's name."""

    def __init__(self, ioctl: str, err: int, detail: str = "") -> None:
        text = f"{ioctl}: {os.strerror(err)} ({_errno.errorcode.get(err, err)})"
        if detail:
            text += f": {detail}"
        super().__init__(err, text)
        self.ioctl = ioctl


class KvmUnavailableError(VmipcError):
    """/dev/kvm is missing, not accessible, or speaks an unsupported API version."""


class MissingCapabilityError(VmipcError):
    """KVM_CHECK_EXTENSION says a capability the VMM needs is absent."""

    def __init__(self, name: str, number: int) -> None:
        super().__init__(f"KVM lacks a required capability: {name} ({number})")
        self.capability = name

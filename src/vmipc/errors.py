"""The root of vmipc's exceptions, below every layer so that each can derive from it.

Re-exported as ``vmipc.VmipcError`` (and ``vmipc.protocol.VmipcError``); the families
under it live with the layer that raises them (``vmipc.kvm``, ``vmipc.formats``,
``vmipc.protocol``, ``vmipc.sequences``, ...).
"""

from __future__ import annotations

__all__ = ["VmipcError"]


class VmipcError(Exception):
    """Base of every exception class vmipc defines (a test checks each module's).

    Where one refines a builtin that callers already catch, it derives from that too: the
    KVM layer's :class:`~vmipc.kvm.KvmError` and the server's
    :class:`~vmipc.server.SocketPathError` are OSErrors; bad input such as a guest image,
    a machine config or a refused msgpack object is a ValueError.

    Not under it: builtins vmipc raises where Python's conventions call for them (a
    ValueError, TypeError or RuntimeError for a misuse of an API: an argument out of range,
    a call out of order), the OSError of a system call on a path or an fd you gave it,
    which it lets through unchanged, and trio's ``Cancelled`` and timeouts.
    """

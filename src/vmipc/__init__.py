"""vmipc: a small VMM over /dev/kvm whose control server takes building-block commands,
and the client side that composes them into checkpoint, restore and live migration.

The names most programs need are here::

    import vmipc

    async with vmipc.open_client("/run/vm.sock") as client:
        report = await vmipc.checkpoint(client, "vm.snap")

Each layer is a package of its own, with everything it offers: ``vmipc.client``,
``vmipc.sequences``, ``vmipc.protocol`` (sans-I/O), ``vmipc.formats``, ``vmipc.server``,
``vmipc.commands``, ``vmipc.kvm``, and ``vmipc.vmm`` (the machine). The names below load
on first use, so that importing one layer (``vmipc.kvm``, ``vmipc.protocol``) does not
import the client, the sequences and trio.
"""

import importlib as _importlib
import typing as _typing

from vmipc.errors import VmipcError

__version__ = "0.1.0"

if _typing.TYPE_CHECKING:
    from vmipc.client import Client, SyncClient, open_client
    from vmipc.formats import FormatError
    from vmipc.protocol import (
        ClosedByPeer,
        ClosedByUs,
        CommandError,
        ConnectionClosed,
        ErrorCode,
        ProtocolError,
    )
    from vmipc.sequences import (
        LocalDestination,
        MigrationNotConverged,
        SequenceError,
        TcpDestination,
        checkpoint,
        listen,
        migrate,
        migrate_local,
        migrate_tcp,
        receive,
        restore_into,
        suspend,
    )

#: each lazily loaded name, and the public module it comes from
_LAZY: dict[str, str] = {
    **dict.fromkeys(("Client", "SyncClient", "open_client"), "vmipc.client"),
    **dict.fromkeys(
        (
            "ClosedByPeer",
            "ClosedByUs",
            "CommandError",
            "ConnectionClosed",
            "ErrorCode",
            "ProtocolError",
        ),
        "vmipc.protocol",
    ),
    "FormatError": "vmipc.formats",
    **dict.fromkeys(
        (
            "LocalDestination",
            "MigrationNotConverged",
            "SequenceError",
            "TcpDestination",
            "checkpoint",
            "listen",
            "migrate",
            "migrate_local",
            "migrate_tcp",
            "receive",
            "restore_into",
            "suspend",
        ),
        "vmipc.sequences",
    ),
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vmipc' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Client",
    "ClosedByPeer",
    "ClosedByUs",
    "CommandError",
    "ConnectionClosed",
    "ErrorCode",
    "FormatError",
    "LocalDestination",
    "MigrationNotConverged",
    "ProtocolError",
    "SequenceError",
    "SyncClient",
    "TcpDestination",
    "VmipcError",
    "checkpoint",
    "listen",
    "migrate",
    "migrate_local",
    "migrate_tcp",
    "open_client",
    "receive",
    "restore_into",
    "suspend",
]

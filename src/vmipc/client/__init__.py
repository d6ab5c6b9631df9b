"""Clients of the control protocol: async (trio) and blocking.

Both have one method per schema command (``query_status()``, ``pause()``...), generated
from the schema, plus ``call(name, fds={...}, **args)`` for any command by name::

    async with open_client("/run/vm.sock") as client:
        status = await client.query_status()
        await client.pause()

    with SyncClient("/run/vm.sock") as client:
        client.resume()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vmipc._util import fixup_module_metadata
from vmipc.client._common import (
    DEFAULT_CLIENT_NAME,
    Call,
    FdLike,
    ProgressCallback,
    Reply,
    ReplyObserver,
    server_timing,
)
from vmipc.client._generated import AsyncCommands, SyncCommands
from vmipc.client._sync import SyncClient, SyncOrderedCall
from vmipc.protocol import (
    ClosedByPeer,
    ClosedByUs,
    CommandError,
    ConnectionClosed,
    ErrorCode,
    Event,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    ServerTiming,
)

if TYPE_CHECKING:
    from vmipc.client._async import Client, OrderedCall, open_client
    from vmipc.client._results import (
        CancelResult,
        HelloResult,
        ProgressData,
        QueryStatusResult,
        StateChangeData,
        SubscribeResult,
    )

#: names loaded on first use, and their private module: the async client, since the
#: blocking one (`vmipc call`) needs no trio; the result types, which only type checkers
#: need and which cost a short-lived `vmipc call` ~1.5 ms to build
_LAZY = {
    **dict.fromkeys(("Client", "OrderedCall", "open_client"), "_async"),
    **dict.fromkeys(
        (
            "CancelResult",
            "HelloResult",
            "ProgressData",
            "QueryStatusResult",
            "StateChangeData",
            "SubscribeResult",
        ),
        "_results",
    ),
}

__all__ = [
    "DEFAULT_CLIENT_NAME",
    "AsyncCommands",
    "Call",
    "CancelResult",
    "Client",
    "ClosedByPeer",
    "ClosedByUs",
    "CommandError",
    "ConnectionClosed",
    "ErrorCode",
    "Event",
    "FdLike",
    "HelloResult",
    "LocalProtocolError",
    "OrderedCall",
    "ProgressCallback",
    "ProgressData",
    "ProtocolError",
    "QueryStatusResult",
    "RemoteProtocolError",
    "Reply",
    "ReplyObserver",
    "ServerTiming",
    "StateChangeData",
    "SubscribeResult",
    "SyncClient",
    "SyncCommands",
    "SyncOrderedCall",
    "open_client",
    "server_timing",
]

fixup_module_metadata(__name__, {**globals(), "__all__": sorted(set(__all__) - set(_LAZY))})


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        fixup_module_metadata(__name__, {name: value, "__all__": [name]})
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

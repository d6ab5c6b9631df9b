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
from vmipc.client._generated import (
    AsyncCommands,
    CancelResult,
    HelloResult,
    ProgressData,
    QueryStatusResult,
    StateChangeData,
    SubscribeResult,
    SyncCommands,
)
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

#: the async client loads on first use: the blocking one (`vmipc call`) needs no trio
_ASYNC = ("Client", "OrderedCall", "open_client")

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

fixup_module_metadata(__name__, {**globals(), "__all__": sorted(set(__all__) - set(_ASYNC))})


def __getattr__(name: str) -> Any:
    if name in _ASYNC:
        from vmipc.client import _async

        value = getattr(_async, name)
        fixup_module_metadata(__name__, {name: value, "__all__": [name]})
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ASYNC))

"""Command handlers: one per schema command, registered with :func:`handler`.

Adding a command means adding its entry to the schema (``protocol/schema.json``, then
``python tools/gencode.py`` and ``python tools/gendocs.py``) and a module here with its
handler; the server, client, CLI and docs pick it up.
"""

from __future__ import annotations

from vmipc._util import fixup_module_metadata
from vmipc.commands._registry import (
    CommandContext,
    ConnectionControl,
    FdSet,
    Handler,
    HandlerEntry,
    ServerControl,
    ServerInfo,
    handler,
    load_handlers,
)

__all__ = [
    "CommandContext",
    "ConnectionControl",
    "FdSet",
    "Handler",
    "HandlerEntry",
    "ServerControl",
    "ServerInfo",
    "handler",
    "load_handlers",
]

fixup_module_metadata(__name__, globals())

"""The trio control server that runs inside the VMM process.

``vmipc vmm --socket PATH`` runs :func:`serve` inside ``trio.run()``.
"""

from __future__ import annotations

from vmipc._util import fixup_module_metadata
from vmipc.server._config import READ_ONLY_COMMANDS, ServerConfig, SocketConfig
from vmipc.server._lease import PauseLease
from vmipc.server._os import MAX_SOCKET_PATH, PeerCredentials, SocketPathError
from vmipc.server._priority import Priority
from vmipc.server._server import CAPABILITIES, PROGRESS_INTERVAL, Server, serve

__all__ = [
    "CAPABILITIES",
    "MAX_SOCKET_PATH",
    "PROGRESS_INTERVAL",
    "READ_ONLY_COMMANDS",
    "PauseLease",
    "PeerCredentials",
    "Priority",
    "Server",
    "ServerConfig",
    "SocketConfig",
    "SocketPathError",
    "serve",
]

fixup_module_metadata(__name__, globals())

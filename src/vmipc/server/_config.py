"""The server's settings."""

from __future__ import annotations

from dataclasses import dataclass

from vmipc.protocol import DEFAULT_MAX_FDS, DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_REQUEST_SIZE

#: What a read-only (monitoring) socket allows: the handshake, the catalogue, events and
#: queries. Nothing that changes the machine, reads guest memory or state, or stops the VMM.
READ_ONLY_COMMANDS = frozenset(
    {"hello", "query-commands", "subscribe", "cancel", "query-status", "query-dirty"}
)


@dataclass(frozen=True)
class SocketConfig:
    """One more listening socket of the server, with its own connection class.

    ``allowed_commands`` restricts what connections on this socket may run (``hello`` is
    always allowed; None allows every command); another command is refused with
    ``not-permitted``. The access settings default to the server's (see
    :class:`ServerConfig`) when None.

    Each socket has its own connection limit, so that clients of one socket (monitors)
    can never take the room of another's (the control clients). ``idle_timeout``: a
    connection on this socket that has completed ``hello``, has no request in flight and
    is subscribed to no event for this many seconds (None: never) is sent the
    connection-level error ``idle-timeout`` and closed. A monitor subscribed to events is
    not idle: waiting for them is its job.
    """

    path: str
    allowed_commands: frozenset[str] | None = READ_ONLY_COMMANDS
    #: a name for the log, e.g. ``"read-only"``
    name: str = "extra"
    allowed_uids: frozenset[int] | None = None
    allowed_gids: frozenset[int] | None = None
    socket_mode: int | None = None
    socket_group: int | str | None = None
    #: connections at once on this socket; one more gets ``too-many-connections``
    max_connections: int = 32
    #: seconds; None: an idle connection stays open
    idle_timeout: float | None = 60.0
    #: bytes queued for one connection on this socket (see ``ServerConfig``); None: the
    #: server's. Monitors' answers are small, and there may be many monitors.
    max_queued_bytes: int | None = 256 << 10


@dataclass(frozen=True)
class ServerConfig:
    """Limits and access control of a control server. The defaults suit one VMM.

    Access: the socket file is created with mode ``socket_mode`` (0600, or 0660 when
    ``socket_group`` is set) and then every connection's peer credentials (SO_PEERCRED)
    are checked: the peer's uid must be in ``allowed_uids`` (default: the VMM's own
    effective uid and root) or its gid in ``allowed_gids`` (default: ``socket_group``'s
    gid when one is set, else none).

    Connection classes: ``allowed_commands`` restricts the commands of the main socket
    (None: all); ``extra_sockets`` adds listening sockets, each with its own allow-list,
    access settings, connection limit and idle timeout (e.g. a read-only monitoring
    socket, see ``READ_ONLY_COMMANDS``).
    """

    #: connections at once on the main socket (each extra socket has its own limit, so
    #: the server's total is the sum); one more gets ``too-many-connections``
    max_connections: int = 128
    #: seconds an idle connection on the main socket stays open (see
    #: :class:`SocketConfig`); None, the default: for ever (a control client may hold a
    #: pause lease while it works elsewhere)
    idle_timeout: float | None = None
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_fds_per_request: int = DEFAULT_MAX_FDS
    max_in_flight: int = 32
    #: seconds a new connection has to complete ``hello``
    handshake_timeout: float = 10.0
    allowed_uids: frozenset[int] | None = None
    allowed_gids: frozenset[int] | None = None
    #: None: 0o600, or 0o660 with ``socket_group``
    socket_mode: int | None = None
    #: group name or gid to give the socket file
    socket_group: int | str | None = None
    #: frames queued for one connection before events overflow (the client is too slow)
    outbound_queue: int = 256
    #: bytes queued for one connection (replies and events it has not read yet): while
    #: this many wait, the server reads none of its requests and holds its replies back,
    #: and events that do not fit overflow as above
    max_queued_bytes: int = 2 << 20
    #: the largest request frame accepted (replies may be up to ``max_frame_size``)
    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE
    #: seconds a shutdown (or a closing connection) waits for replies to drain
    shutdown_grace: float = 2.0
    #: the ``server.name`` that ``hello`` reports
    server_name: str = "vmipc"
    listen_backlog: int = 64
    #: the commands the main socket allows (``hello`` always); None: every command
    allowed_commands: frozenset[str] | None = None
    #: more sockets, each with its own connection class
    extra_sockets: tuple[SocketConfig, ...] = ()
    #: while a connection goes first (it holds the pause lease, or claim-priority), the
    #: other connections' requests go one at a time at most this many per second (0: they
    #: wait until nobody goes first); see ``vmipc.server._priority``
    held_request_rate: float = 200.0

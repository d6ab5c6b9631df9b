"""Error codes and the exceptions of the control protocol.

Three kinds of failure, kept apart on purpose:

* a **command error** -- the peer answered a request with an error reply carrying a
  stable code (:class:`CommandError`); the connection carries on;
* a **protocol error** -- somebody broke the protocol: :class:`LocalProtocolError` when
  it is us (we were about to send something invalid), :class:`RemoteProtocolError` when
  it is the peer (it sent something we cannot accept);
* a **closed connection** -- :class:`ClosedByUs` after we closed it ourselves,
  :class:`ClosedByPeer` when the peer closed or broke it (possibly after telling us why,
  see :attr:`ClosedByPeer.error`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from vmipc._record import field, record
from vmipc.errors import VmipcError

#: how many characters of a peer's input an error message or detail may repeat; the rest
#: is cut (and the cut says how long the input was), so that an error never grows with
#: what provoked it
ECHO_CHARS = 100
#: how many items of a peer's list (or map) an error repeats
ECHO_ITEMS = 4


def shorten(text: str, limit: int = ECHO_CHARS) -> str:
    """``text``, or its first ``limit`` characters and how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def echo(value: Any, limit: int = ECHO_CHARS) -> str:
    """A repr of a value from the peer that stays short however large the value is.

    Never builds the repr of the whole value: a list of a million items costs as much as
    one of :data:`ECHO_ITEMS`.
    """
    return _echo(value, limit, 3)


def _echo(value: Any, limit: int, depth: int) -> str:
    if isinstance(value, str | bytes | bytearray):
        cut = value[:limit]
        text = repr(bytes(cut) if isinstance(cut, bytearray) else cut)
        return text if len(cut) == len(value) else f"{text}... ({len(value)} long)"
    if isinstance(value, dict):
        opening, closing = "{", "}"
        parts = [
            f"{_echo(k, limit, depth - 1)}: {_echo(v, limit, depth - 1)}"
            for k, v in list(value.items())[:ECHO_ITEMS]
        ]
    elif isinstance(value, list | tuple):
        opening, closing = "[", "]"
        parts = [_echo(v, limit, depth - 1) for v in value[:ECHO_ITEMS]]
    else:
        return shorten(repr(value), limit)
    if depth == 0 and value:
        parts = ["..."]
    elif len(value) > ECHO_ITEMS:
        parts.append(f"... ({len(value)} items)")
    return shorten(opening + ", ".join(parts) + closing, 2 * limit)


class ErrorCode(enum.StrEnum):
    """The stable error codes. Their meaning is in the schema's ``errors`` catalogue."""

    # request scope: an error reply to one request; the connection carries on
    HANDSHAKE_REQUIRED = "handshake-required"
    UNSUPPORTED_VERSION = "unsupported-version"
    INVALID_MESSAGE = "invalid-message"
    UNKNOWN_COMMAND = "unknown-command"
    INVALID_ARGUMENTS = "invalid-arguments"
    INVALID_FDS = "invalid-fds"
    LIMIT_EXCEEDED = "limit-exceeded"
    INVALID_STATE = "invalid-state"
    CANCELLED = "cancelled"
    SHUTTING_DOWN = "shutting-down"
    INTERNAL_ERROR = "internal-error"
    # bulk-data commands (1.1)
    PEER_CLOSED = "peer-closed"
    IO_ERROR = "io-error"
    BAD_STREAM = "bad-stream"
    BAD_SNAPSHOT = "bad-snapshot"
    BAD_STATE = "bad-state"
    DISK_PRESENT = "disk-present"
    NOT_CONFIGURED = "not-configured"
    DIRTY_LOG_OFF = "dirty-log-off"
    # connection classes (1.2)
    NOT_PERMITTED = "not-permitted"
    # pause leases (1.3)
    NO_LEASE = "no-lease"
    # dirty-log epochs (1.5)
    DIRTY_LOG_MOVED = "dirty-log-moved"
    # hostile data (1.7)
    DAMAGED = "damaged"
    # ordered chains (1.8)
    CHAIN_BROKEN = "chain-broken"
    # the block device's image (1.9)
    NO_DISK = "no-disk"
    # connection scope: sent with a null id, then the server closes the connection
    FRAME_TOO_LARGE = "frame-too-large"
    HANDSHAKE_TIMEOUT = "handshake-timeout"
    #: fds beyond the per-request limit arrived for a frame not yet complete (1.7)
    TOO_MANY_FDS = "too-many-fds"
    TOO_MANY_CONNECTIONS = "too-many-connections"
    ACCESS_DENIED = "access-denied"
    # idle monitors (1.7)
    IDLE_TIMEOUT = "idle-timeout"


@record
class ErrorInfo:
    """What travels in an error message: a stable code, one line, and details."""

    code: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class UntrustedServer(VmipcError, ConnectionRefusedError):
    """The process serving the socket runs as a user the client does not trust (the
    caller's effective uid and root, unless told otherwise): nothing was sent to it, no fd
    was passed. ``uid`` and ``pid`` are the server's (SO_PEERCRED)."""

    def __init__(self, path: str, uid: int, pid: int, trusted: frozenset[int]) -> None:
        allowed = " or ".join(str(u) for u in sorted(trusted))
        super().__init__(
            f"refusing the server at {path}: it runs as uid {uid} (pid {pid}), not uid "
            f"{allowed}; nothing was sent to it (pass its uid as trusted if it is expected)"
        )
        self.path = path
        self.uid = uid
        self.pid = pid

    def __str__(self) -> str:
        return str(self.args[0])


class CommandError(VmipcError):
    """The server answered a request with an error (or a local check refused it).

    ``code`` is one of the stable codes (see :class:`ErrorCode`); ``message`` is one line
    meant for a human; ``details`` is a map meant for programs.
    """

    def __init__(
        self,
        code: str,
        message: str,
        details: Mapping[str, Any] | None = None,
        *,
        command: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details: Mapping[str, Any] = dict(details or {})
        self.command = command
        #: what the server says the request took (protocol 1.8: a ``ServerTiming``), or
        #: None (an older server, or a refusal made by the client itself)
        self.server: Any = None

    @property
    def info(self) -> ErrorInfo:
        return ErrorInfo(self.code, self.message, self.details)

    @classmethod
    def from_info(cls, info: ErrorInfo, *, command: str | None = None) -> CommandError:
        return cls(info.code, info.message, info.details, command=command)


class ProtocolError(VmipcError):
    """Somebody broke the protocol; ``code`` says how (same codes as error replies)."""

    def __init__(self, code: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details: Mapping[str, Any] = dict(details or {})

    @property
    def info(self) -> ErrorInfo:
        return ErrorInfo(self.code, self.message, self.details)


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol (e.g. send a frame over the size limit)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (e.g. sent a frame we cannot decode)."""


class ConnectionClosed(VmipcError):
    """The connection is gone; see the two subclasses for who ended it."""


class ClosedByUs(ConnectionClosed):
    """We closed the connection (e.g. ``aclose()`` was called) and then tried to use it."""


class ClosedByPeer(ConnectionClosed):
    """The peer closed or broke the connection.

    ``error`` is the connection-level error the server sent just before closing (for
    example ``frame-too-large`` or ``access-denied``), or None when it just went away.
    """

    def __init__(self, message: str, error: ErrorInfo | None = None) -> None:
        super().__init__(message if error is None else f"{message} ({error})")
        self.error = error

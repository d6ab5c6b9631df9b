"""Typed command methods and result types, generated from the schema (version 1.0).

Do not edit: run ``python -m vmipc.client.gencode``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict, cast

from vmipc.client._common import FdLike, ProgressCallback

SCHEMA_VERSION = "1.0"


class HelloResultServer(TypedDict):
    """Who answered."""

    name: str
    """The server's name."""
    version: str
    """The server software's version."""
    pid: int
    """The VMM's process id."""


class HelloResultLimits(TypedDict):
    """The server's limits for this connection."""

    max_frame_size: int
    """Largest frame payload, in bytes, the server accepts (and sends)."""
    max_fds_per_request: int
    """Most fds one request may carry."""
    max_in_flight: int
    """Most requests one connection may have in flight."""


class HelloResult(TypedDict):
    """The result of ``hello``."""

    protocol: str
    """The negotiated protocol version, `major.minor`."""
    server: HelloResultServer
    """Who answered."""
    commands: list[str]
    """The names of the commands available in the negotiated version."""
    events: list[str]
    """The names of the events available in the negotiated version."""
    capabilities: list[str]
    """Optional protocol features the server supports: `fd-passing`, `events`, `progress`, `cancel`.
    """
    limits: HelloResultLimits
    """The server's limits for this connection."""


class SubscribeResult(TypedDict):
    """The result of ``subscribe``."""

    events: list[str]
    """The events now subscribed, sorted."""


class CancelResult(TypedDict):
    """The result of ``cancel``."""

    cancelled: bool
    """Whether the request will answer `cancelled`: false if it is not in flight, already done, or
    cannot be stopped.
    """


class QueryStatusResult(TypedDict):
    """The result of ``query-status``."""

    state: Literal["created", "running", "paused", "incoming", "shutdown", "crashed", "destroyed"]
    """The run state."""
    vcpu_count: int
    """Number of vCPUs."""
    memory_size: int
    """Guest memory size in bytes."""
    stop_reason: str | None
    """Why the machine stopped (states `shutdown` and `crashed`), else null."""


class PauseResult(TypedDict):
    """The result of ``pause``."""


class ResumeResult(TypedDict):
    """The result of ``resume``."""


class QuitResult(TypedDict):
    """The result of ``quit``."""


class StateChangeData(TypedDict):
    """The data of the ``state-change`` event."""

    old: Literal["created", "running", "paused", "incoming", "shutdown", "crashed", "destroyed"]
    """The state before."""
    new: Literal["created", "running", "paused", "incoming", "shutdown", "crashed", "destroyed"]
    """The state now."""
    reason: str | None
    """Why, for stops (e.g. `triple fault on vcpu 1`), else null."""


class ProgressData(TypedDict):
    """The data of the ``progress`` event."""

    request: int
    """The id of the request."""
    command: str
    """Its command."""
    phase: str
    """What it is doing, in a word or two."""
    done: int
    """Units done (bytes, unless the command says otherwise)."""
    total: int | None
    """Units in all, or null when unknown."""


class AsyncCommands:
    """One coroutine method per schema command; each sends it with ``call``."""

    async def call(
        self,
        command: str,
        /,
        *,
        fds: Mapping[str, FdLike] | None = None,
        on_progress: ProgressCallback | None = None,
        **args: Any,
    ) -> Any:
        raise NotImplementedError

    async def hello(self, *, versions: list[int], client: str = "") -> HelloResult:
        """The handshake: the first request on every connection. Negotiates the protocol version
        (the highest major both sides speak) and returns the server's identity, its catalogue of
        command and event names, its capabilities and its limits. Until it succeeds every other
        request gets ``handshake-required``.

        Allowed in states: any. Since protocol 1.0.
        Errors: unsupported-version, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error).
        """
        return cast(HelloResult, await self.call("hello", versions=versions, client=client))

    async def query_commands(self) -> dict[str, Any]:
        """The server's machine-readable catalogue: this very schema document (commands with their
        arguments, fds, results, states, errors and docs; events; error codes; run states), as
        the server implements it.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error).
        """
        return cast(dict[str, Any], await self.call("query-commands"))

    async def subscribe(self, *, events: list[str]) -> SubscribeResult:
        """Choose the events this connection receives. Replaces the previous choice; an empty list
        unsubscribes from everything. ``progress`` events only ever report this connection's own
        requests.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error).
        """
        return cast(SubscribeResult, await self.call("subscribe", events=events))

    async def cancel(self, *, request: int) -> CancelResult:
        """Cancel one of this connection's requests that is still in flight. A cancellable request,
        or one that has not started yet, stops and answers with error ``cancelled``; a request
        that cannot be stopped once started completes and answers normally. Closing the
        connection cancels its requests the same way.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error).
        """
        return cast(CancelResult, await self.call("cancel", request=request))

    async def query_status(self) -> QueryStatusResult:
        """The machine's run state and shape.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error).
        """
        return cast(QueryStatusResult, await self.call("query-status"))

    async def pause(self) -> PauseResult:
        """Stop the vCPUs: returns once every vCPU is parked outside KVM_RUN with its pending exit
        completed, so the machine's state is complete and consistent. The pause belongs to the
        machine, not to the connection: another connection (or process) may ``resume``.

        Allowed in states: running. Since protocol 1.0.
        Errors: invalid-state, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error).
        """
        return cast(PauseResult, await self.call("pause"))

    async def resume(self) -> ResumeResult:
        """Let the vCPUs of a paused machine run again.

        Allowed in states: paused. Since protocol 1.0.
        Errors: invalid-state, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error).
        """
        return cast(ResumeResult, await self.call("resume"))

    async def quit(self) -> QuitResult:
        """Shut the VMM down: the server answers, stops accepting connections, tells every other
        connection ``shutting-down``, releases the machine and exits.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error).
        """
        return cast(QuitResult, await self.call("quit"))


class SyncCommands:
    """One blocking method per schema command; each sends it with ``call``."""

    def call(
        self,
        command: str,
        /,
        *,
        fds: Mapping[str, FdLike] | None = None,
        on_progress: ProgressCallback | None = None,
        **args: Any,
    ) -> Any:
        raise NotImplementedError

    def hello(self, *, versions: list[int], client: str = "") -> HelloResult:
        """The handshake: the first request on every connection. Negotiates the protocol version
        (the highest major both sides speak) and returns the server's identity, its catalogue of
        command and event names, its capabilities and its limits. Until it succeeds every other
        request gets ``handshake-required``.

        Allowed in states: any. Since protocol 1.0.
        Errors: unsupported-version, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error).
        """
        return cast(HelloResult, self.call("hello", versions=versions, client=client))

    def query_commands(self) -> dict[str, Any]:
        """The server's machine-readable catalogue: this very schema document (commands with their
        arguments, fds, results, states, errors and docs; events; error codes; run states), as
        the server implements it.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error).
        """
        return cast(dict[str, Any], self.call("query-commands"))

    def subscribe(self, *, events: list[str]) -> SubscribeResult:
        """Choose the events this connection receives. Replaces the previous choice; an empty list
        unsubscribes from everything. ``progress`` events only ever report this connection's own
        requests.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error).
        """
        return cast(SubscribeResult, self.call("subscribe", events=events))

    def cancel(self, *, request: int) -> CancelResult:
        """Cancel one of this connection's requests that is still in flight. A cancellable request,
        or one that has not started yet, stops and answers with error ``cancelled``; a request
        that cannot be stopped once started completes and answers normally. Closing the
        connection cancels its requests the same way.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error).
        """
        return cast(CancelResult, self.call("cancel", request=request))

    def query_status(self) -> QueryStatusResult:
        """The machine's run state and shape.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error).
        """
        return cast(QueryStatusResult, self.call("query-status"))

    def pause(self) -> PauseResult:
        """Stop the vCPUs: returns once every vCPU is parked outside KVM_RUN with its pending exit
        completed, so the machine's state is complete and consistent. The pause belongs to the
        machine, not to the connection: another connection (or process) may ``resume``.

        Allowed in states: running. Since protocol 1.0.
        Errors: invalid-state, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error).
        """
        return cast(PauseResult, self.call("pause"))

    def resume(self) -> ResumeResult:
        """Let the vCPUs of a paused machine run again.

        Allowed in states: paused. Since protocol 1.0.
        Errors: invalid-state, and the common errors (handshake-required, invalid-message,
        unknown-command, invalid-arguments, invalid-fds, limit-exceeded, shutting-down,
        internal-error).
        """
        return cast(ResumeResult, self.call("resume"))

    def quit(self) -> QuitResult:
        """Shut the VMM down: the server answers, stops accepting connections, tells every other
        connection ``shutting-down``, releases the machine and exits.

        Allowed in states: any. Since protocol 1.0.
        Errors: the common errors only (handshake-required, invalid-message, unknown-command,
        invalid-arguments, invalid-fds, limit-exceeded, shutting-down, internal-error).
        """
        return cast(QuitResult, self.call("quit"))

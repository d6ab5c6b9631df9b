"""The handler registry and the context a handler runs with.

One handler per schema command, registered with :func:`handler`::

    @handler("dump-state")
    async def dump_state(ctx: CommandContext) -> dict[str, Any]:
        await trio.to_thread.run_sync(...)  # a blocking machine call: a worker thread
        return {...}

Before a handler runs, the server has already checked everything the schema says: the
arguments (``ctx.args``, with defaults filled in), the fds (``ctx.fds``, by name, already
checked for direction and kind) and the machine's run state. A handler returns the
result (checked against the schema's ``result``) or raises :class:`CommandError` with a
code the schema lists for the command. :class:`InvalidStateError` from the machine is
turned into ``invalid-state``.

Fds: ``ctx.fds`` belong to the request. The server closes every one of them when the
handler returns (or fails); a handler that must keep one longer calls ``ctx.fds.take``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from vmipc.protocol import DEFAULT_MAX_REQUEST_SIZE, Schema
from vmipc.vmm.machine_api import MachineApi

#: a handler: takes the context, returns the command's result
Handler = Callable[["CommandContext"], Awaitable[Any]]
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True)
class HandlerEntry:
    name: str
    func: Handler
    #: run with the server's machine lock held (commands that change the run state), so
    #: that, say, a pause and a resume from two connections never interleave
    exclusive: bool


_REGISTRY: dict[str, HandlerEntry] = {}


def handler(name: str, *, exclusive: bool = False) -> Callable[[H], H]:
    """Register the decorated coroutine function as the handler of command ``name``."""

    def register(func: H) -> H:
        if name in _REGISTRY and _REGISTRY[name].func is not func:
            raise ValueError(f"two handlers for command {name!r}")
        _REGISTRY[name] = HandlerEntry(name, func, exclusive)
        return func

    return register


def load_handlers() -> Mapping[str, HandlerEntry]:
    """Import every module of this package (so each registers its handlers); return them."""
    package = importlib.import_module("vmipc.commands")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"vmipc.commands.{info.name}")
    return dict(_REGISTRY)


class FdSet(Mapping[str, int]):
    """A request's fds by name. Read-only, except :meth:`take` to keep one past the handler."""

    def __init__(self, fds: Mapping[str, int]) -> None:
        self._fds = dict(fds)

    def __getitem__(self, name: str) -> int:
        return self._fds[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fds)

    def __len__(self) -> int:
        return len(self._fds)

    def take(self, name: str) -> int:
        """Remove ``name`` and return its fd: the caller now owns it and must close it."""
        return self._fds.pop(name)

    def release(self) -> list[int]:
        """Remove and return every fd still held (the server closes them)."""
        fds = list(self._fds.values())
        self._fds.clear()
        return fds


@dataclass(frozen=True)
class ServerInfo:
    """Who the server is and what it offers; the ``hello`` result is built from it."""

    name: str
    version: str
    pid: int
    capabilities: tuple[str, ...]
    max_frame_size: int
    max_fds_per_request: int
    max_in_flight: int
    #: the largest request frame the server accepts (1.7)
    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE


class ConnectionControl(Protocol):
    """What handlers may do to the connection their request came on."""

    #: the server's number for the connection (as in its log)
    id: int
    #: the commands this connection may run (its socket's allow-list), None for all
    allowed_commands: frozenset[str] | None

    def add_close_hook(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Call ``hook`` (on the trio thread) once the connection has closed; returns a
        function that removes it again."""
        ...

    def subscribe(self, events: frozenset[str]) -> None:
        """Replace the connection's event subscriptions."""

    def cancel(self, request_id: int) -> bool:
        """Cancel one of the connection's requests in flight; True if it will say cancelled."""
        ...

    def negotiated(self, minor: int) -> None:
        """The ``hello`` being answered settled the connection's minor version (1.8)."""


class LeaseControl(Protocol):
    """What handlers do with the machine's pause lease (the server's ``PauseLease``)."""

    def status(self) -> dict[str, Any] | None:
        """For query-status: who holds the lease and when it expires, or None."""

    def taking(self, holder: ConnectionControl) -> AbstractContextManager[None]:
        """Around a ``pause`` with a lease: ``holder`` goes first from now on."""
        ...

    def take(self, holder: ConnectionControl, duration: float) -> None:
        """After a successful pause: tie it to ``holder`` for ``duration`` seconds."""

    def renew(self, holder: ConnectionControl, duration: float | None) -> float:
        """Move the expiry of ``holder``'s lease to now + duration (no-lease if it holds
        none); the lease's length."""
        ...

    def release(self, holder: ConnectionControl) -> None:
        """``holder`` gives its lease up (no-lease if it holds none); the machine stays
        paused."""

    def end(self) -> None:
        """The lease ends without resuming anything."""


class PriorityControl(Protocol):
    """What handlers do with the server's priority claims (the server's ``Priority``)."""

    def status(self) -> list[int]:
        """For query-status: the connections that go first now."""
        ...

    def claim(self, connection: ConnectionControl) -> None:
        """``connection`` goes first until it releases its claim or closes."""

    def release(self, connection: ConnectionControl) -> bool:
        """End ``connection``'s claim; whether it had one."""
        ...


class ServerControl(Protocol):
    @property
    def pause_lease(self) -> LeaseControl:
        """The machine's pause lease (one per server)."""
        ...

    @property
    def priority(self) -> PriorityControl:
        """Who goes first (one per server)."""
        ...

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown once the current request has been answered."""


class ProgressSink(Protocol):
    def __call__(self, phase: str, done: int, total: int | None) -> None: ...


@dataclass
class CommandContext:
    """Everything a handler gets. See the module docstring."""

    machine: MachineApi
    request_id: int
    command: str
    args: dict[str, Any]
    fds: FdSet
    schema: Schema
    server_info: ServerInfo
    connection: ConnectionControl
    server: ServerControl
    _progress: ProgressSink

    def progress(self, phase: str, done: int, total: int | None = None) -> None:
        """Report progress; sent as a ``progress`` event if the client subscribed.

        Cheap to call often: the server sends at most a few events a second per request
        (plus the first one). Never blocks.
        """
        self._progress(phase, done, total)

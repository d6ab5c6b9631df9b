"""The trio control server that lives inside the VMM process.

Tasks: one accept loop; per connection a reader (``recvmsg`` -> :class:`ServerProtocol`),
a writer (draining a bounded queue of frames), a handshake timer, and one task per
request in flight. Nothing a client does can block another client or the vCPUs:

* a connection's outgoing queue is bounded in frames and bytes: while it is full, that
  connection's requests are not read and its replies wait (backpressure), never growing;
* events are queued without waiting; a connection whose queue overflows with state
  changes is closed (progress events are dropped instead);
* a connection decodes one request frame at a time and lets the others run in between;
* whatever goes wrong in a connection's tasks closes that connection, with a log line,
  never the server;
* machine state changes arrive from vCPU threads through ``run_sync_soon`` only;
* blocking machine calls run in worker threads (see the handlers in ``commands/``).

Ordered chains (protocol 1.8): the requests of a connection that name the same ``chain``
run one after the other in the order they arrived, each once the previous one succeeded;
once one fails (or is refused, or cancelled) the chain is broken and its later requests
are answered ``chain-broken`` without running. A waiting request is an ordinary request
in flight: it counts against ``max_in_flight``, holds at most ``max_fds_per_request`` fds,
can be cancelled, and is cancelled when its connection closes or the server shuts down.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

import vmipc
from vmipc.commands import (
    CommandContext,
    FdSet,
    HandlerEntry,
    ServerInfo,
    load_handlers,
)
from vmipc.protocol import (
    CommandError,
    CommandSpec,
    ConnectionBroken,
    Error,
    ErrorCode,
    ErrorInfo,
    Limits,
    LocalProtocolError,
    RequestReceived,
    RequestRejected,
    Schema,
    ServerEvent,
    ServerProtocol,
    ServerState,
    ServerTiming,
    encode_event,
    encode_frame,
    encode_message,
    load_schema,
    shorten,
)
from vmipc.server._config import ServerConfig, SocketConfig
from vmipc.server._lease import PauseLease
from vmipc.server._os import (
    PeerCredentials,
    check_fd,
    close_fds,
    create_listener,
    fds_from_ancdata,
    peer_credentials,
    peer_hung_up,
    remove_socket_file,
    resolve_group,
)
from vmipc.server._priority import Priority
from vmipc.vmm.machine_api import InvalidStateError, MachineApi, StateChange
from vmipc.vmm.persist import PeerClosed, send_nowait

log = logging.getLogger("vmipc.server")

#: optional protocol features this server supports (announced by ``hello``)
CAPABILITIES = ("fd-passing", "events", "progress", "cancel")
_RECV_SIZE = 64 * 1024
#: at most one progress event per request this often (seconds), besides the first and last
PROGRESS_INTERVAL = 0.25
_MISSING: Any = object()
#: what sending on a connection's queue raises once the connection is going away
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)
#: seconds between summaries of refused connections (the first refusal is logged at once)
REFUSAL_LOG_INTERVAL = 10.0
#: broken ordered chains a connection remembers (their later requests are answered
#: ``chain-broken``); past that the oldest is forgotten. Chains with requests in flight are
#: bounded by ``max_in_flight`` already; a client uses a fresh chain id for every chain.
BROKEN_CHAINS_KEPT = 64


def _cancelled(request_id: int) -> ErrorInfo:
    return ErrorInfo(ErrorCode.CANCELLED, f"request {request_id} was cancelled")


_SHUTTING_DOWN = ErrorInfo(ErrorCode.SHUTTING_DOWN, "the server is shutting down")


@dataclass(eq=False)
class _Listener:
    """One bound listening socket and its connection class."""

    name: str
    path: str
    sock: socket.socket
    identity: tuple[int, int]
    allowed_uids: frozenset[int]
    allowed_gids: frozenset[int]
    #: None: every command
    allowed_commands: frozenset[str] | None
    max_connections: int
    idle_timeout: float | None
    max_queued_bytes: int
    #: connections open on this socket now
    connections: int = 0


class _RefusalLog:
    """The log of refused connections: the first refusal in full, then one summary per
    interval counting the others, so that a flood of refusals cannot flood the log."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        #: (why, socket) -> refusals not yet logged
        self._unlogged: collections.Counter[tuple[str, str]] = collections.Counter()
        #: while True, refusals are counted, not logged
        self._quiet = False
        self._since = 0.0
        self._wakeup = trio.Event()

    def refused(self, peer: PeerCredentials, why: str, socket_name: str) -> None:
        if self._quiet:
            self._unlogged[why, socket_name] += 1
            return
        log.warning(
            "refused connection from pid %d uid %d gid %d on the %s socket: %s",
            peer.pid,
            peer.uid,
            peer.gid,
            socket_name,
            why,
        )
        self._quiet = True
        self._wakeup.set()

    async def run(self) -> None:
        """Write the summaries (a task of the server's; at its end, the last one)."""
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                self._since = trio.current_time()
                while self._quiet:
                    await trio.sleep(self.interval)
                    # refusals during the interval keep the log quiet for another one
                    self._quiet = self._summarise()
        finally:
            self._summarise()

    def _summarise(self) -> bool:
        if not self._unlogged:
            return False
        now = trio.current_time()
        what = ", ".join(
            f"{count} {why} on the {name} socket" for (why, name), count in self._unlogged.items()
        )
        log.warning(
            "%d more connections refused in the last %.0fs (%s)",
            sum(self._unlogged.values()),
            now - self._since,
            what,
        )
        self._unlogged.clear()
        self._since = now
        return True


async def serve(
    machine: MachineApi,
    socket_path: str,
    *,
    config: ServerConfig | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control protocol for ``machine`` on an AF_UNIX socket at ``socket_path``.

    Returns after a client's ``quit`` has been answered, every connection closed and the
    machine closed. If cancelled instead, it closes every connection at once and leaves
    the machine to the caller. Either way the socket files are removed (``config`` may
    add sockets, see :class:`~vmipc.server.ServerConfig`).

    ``task_status.started()`` is called, with the socket's absolute path, once clients
    can connect. Raises :class:`~vmipc.server.SocketPathError` (an OSError) when the
    path is taken by a live server, is not a socket, or is too long.
    """
    await Server(machine, config).serve(socket_path, task_status=task_status)


class Server:
    """The control server for one machine. :func:`serve` is the usual way to run it.

    ``schema`` and ``handlers`` default to the package's; tests pass extended ones.

    A caller that must create the sockets before something else happens (the VMM binds
    them before it enters capability mode, see ``vmipc.vmm.sandbox``) calls :meth:`bind`
    first, outside trio, and :meth:`serve` later.
    """

    def __init__(
        self,
        machine: MachineApi,
        config: ServerConfig | None = None,
        *,
        schema: Schema | None = None,
        handlers: dict[str, HandlerEntry] | None = None,
    ) -> None:
        self.machine = machine
        self.config = config = config or ServerConfig()
        self.schema = schema or load_schema()
        self.handlers = dict(handlers) if handlers is not None else dict(load_handlers())
        self.limits = Limits(
            config.max_frame_size,
            config.max_fds_per_request,
            config.max_in_flight,
            config.max_request_size,
        )
        self.info = ServerInfo(
            name=config.server_name,
            version=vmipc.__version__,
            pid=os.getpid(),
            capabilities=CAPABILITIES,
            max_frame_size=config.max_frame_size,
            max_fds_per_request=config.max_fds_per_request,
            max_in_flight=config.max_in_flight,
            max_request_size=min(config.max_request_size, config.max_frame_size),
        )
        #: held by ``exclusive`` handlers (run-state changes), so they never interleave
        self.machine_lock = trio.Lock()
        #: the machine's pause lease (``pause`` with ``lease``), tied to one connection
        self.pause_lease = PauseLease(machine, self.machine_lock, lambda: self.closing)
        #: who goes first: the lease's holder and the priority claimants
        self.priority = Priority(self.pause_lease, config.held_request_rate)
        for extra in config.extra_sockets:
            if extra.max_connections < 0:
                raise ValueError(f"{extra.name} socket: max_connections must be 0 or more")
        for timeout in (config.idle_timeout, *(x.idle_timeout for x in config.extra_sockets)):
            if timeout is not None and not timeout > 0:
                raise ValueError(f"idle_timeout must be positive (or None), not {timeout}")
        classes = (config.allowed_commands, *(x.allowed_commands for x in config.extra_sockets))
        for allowed in classes:
            unknown = sorted((allowed or frozenset()) - set(self.schema.commands))
            if unknown:
                raise ValueError(f"allowed commands: no command named {', '.join(unknown)}")
        self.closing = False
        self._quit = False
        self._connections: set[_Connection] = set()
        self._all_closed = trio.Event()
        self._shutdown = trio.Event()
        self._next_id = 1
        self._listeners: list[_Listener] = []
        self._refusals = _RefusalLog(REFUSAL_LOG_INTERVAL)
        self._trio_thread = 0
        self._token: trio.lowlevel.TrioToken | None = None

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def begin_shutdown(self, *, quit: bool = True) -> None:
        """Stop accepting, tell every connection ``shutting-down``, close them, return."""
        self._quit = self._quit or quit
        self.closing = True
        self._shutdown.set()

    @property
    def socket_paths(self) -> tuple[str, ...]:
        """The absolute paths of the bound sockets, the main one first."""
        return tuple(listener.path for listener in self._listeners)

    def bind(self, socket_path: str) -> tuple[str, ...]:
        """Create the listening sockets: the main one at ``socket_path`` and the config's
        ``extra_sockets``. Synchronous, callable outside trio. Returns their absolute paths.

        Raises :class:`~vmipc.server.SocketPathError` (an OSError) as :func:`serve` does;
        then no socket is left behind.
        """
        if self._listeners:
            raise RuntimeError("the server's sockets are bound already")
        config = self.config
        main = SocketConfig(
            socket_path,
            config.allowed_commands,
            "control",
            config.allowed_uids,
            config.allowed_gids,
            config.socket_mode,
            config.socket_group,
            config.max_connections,
            config.idle_timeout,
            config.max_queued_bytes,
        )
        try:
            for spec in (main, *config.extra_sockets):
                self._listeners.append(self._bind_one(spec))
        except BaseException:
            self.close_sockets()
            raise
        return self.socket_paths

    def _bind_one(self, spec: SocketConfig) -> _Listener:
        gid = resolve_group(spec.socket_group) if spec.socket_group is not None else None
        mode = spec.socket_mode
        if mode is None:
            mode = 0o660 if gid is not None else 0o600
        uids = spec.allowed_uids
        if uids is None:
            uids = frozenset({os.geteuid(), 0})
        gids = spec.allowed_gids
        if gids is None:
            gids = frozenset({gid}) if gid is not None else frozenset()
        allowed = spec.allowed_commands
        if allowed is not None:
            allowed = allowed | {"hello"}
        path = os.path.abspath(spec.path)
        raw, identity = create_listener(
            path, mode=mode, gid=gid, backlog=self.config.listen_backlog
        )
        return _Listener(
            spec.name,
            path,
            raw,
            identity,
            uids,
            gids,
            allowed,
            spec.max_connections,
            spec.idle_timeout,
            self.config.max_queued_bytes
            if spec.max_queued_bytes is None
            else spec.max_queued_bytes,
        )

    def close_sockets(self) -> None:
        """Close the listening sockets and remove their files (after :meth:`bind`, for a
        caller that will not :meth:`serve` after all; :meth:`serve` does it itself)."""
        for listener in self._listeners:
            listener.sock.close()
            remove_socket_file(listener.path, listener.identity)
        self._listeners.clear()

    async def serve(
        self,
        socket_path: str | None = None,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until shut down (see :func:`serve`). ``socket_path``: where to bind, unless
        :meth:`bind` was called already (then None)."""
        config = self.config
        if not self._listeners:
            if socket_path is None:
                raise ValueError("serve() needs a socket path when bind() was not called")
            self.bind(socket_path)
        elif socket_path is not None and os.path.abspath(socket_path) != self._listeners[0].path:
            raise ValueError(f"the server is bound to {self._listeners[0].path}, not {socket_path}")
        listeners = [(spec, trio.socket.from_stdlib_socket(spec.sock)) for spec in self._listeners]
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        unsubscribe = self.machine.add_listener(self._state_changed_threadsafe)
        for spec, _ in listeners:
            log.info("serving %s on %s (%s)", self.info.name, spec.path, spec.name)
        try:
            async with trio.open_nursery() as nursery:
                accept_scopes = [trio.CancelScope() for _ in listeners]
                for (spec, listener), scope in zip(listeners, accept_scopes, strict=True):
                    nursery.start_soon(self._accept_loop, spec, listener, nursery, scope)
                nursery.start_soon(self._refusals.run)
                task_status.started(self._listeners[0].path)
                await self._shutdown.wait()
                log.info("shutting down")
                for scope in accept_scopes:
                    scope.cancel()
                for _, listener in listeners:
                    listener.close()
                for conn in list(self._connections):
                    conn.shutdown()
                with trio.move_on_after(config.shutdown_grace):
                    if self._connections:
                        await self._all_closed.wait()
                nursery.cancel_scope.cancel()
        finally:
            unsubscribe()
            for _, listener in listeners:
                listener.close()
            self.close_sockets()
        if self._quit:
            await trio.to_thread.run_sync(self.machine.close)
            log.info("machine closed")

    # --- connections ------------------------------------------------------------------

    async def _accept_loop(
        self,
        spec: _Listener,
        listener: trio.socket.SocketType,
        nursery: trio.Nursery,
        scope: trio.CancelScope,
    ) -> None:
        with scope:
            while True:
                try:
                    sock, _ = await listener.accept()
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.warning("accept failed: %s; retrying shortly", exc)
                        await trio.sleep(0.1)
                        continue
                    raise
                nursery.start_soon(self._handle_new, sock, spec)

    async def _handle_new(self, sock: trio.socket.SocketType, listener: _Listener) -> None:
        try:
            peer = peer_credentials(sock)
        except OSError:
            sock.close()
            return
        refusal: ErrorInfo | None = None
        if peer.uid not in listener.allowed_uids and peer.gid not in listener.allowed_gids:
            self._refusals.refused(peer, "not allowed", listener.name)
            refusal = ErrorInfo(
                ErrorCode.ACCESS_DENIED,
                f"uid {peer.uid} / gid {peer.gid} may not use this server",
                {"uid": peer.uid, "gid": peer.gid},
            )
        elif self.closing:
            refusal = _SHUTTING_DOWN
        elif listener.connections >= listener.max_connections:
            # per socket: monitors on the read-only socket never take the control
            # clients' room
            limit = listener.max_connections
            self._refusals.refused(peer, f"too many connections ({limit})", listener.name)
            refusal = ErrorInfo(
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"the {listener.name} socket already has {limit} connections",
                {"limit": limit},
            )
        if refusal is not None:
            with sock:
                data = encode_frame(encode_message(Error(None, refusal)))
                with trio.move_on_after(1.0):
                    with contextlib.suppress(OSError):
                        await sock.send(data)
            return
        conn = _Connection(
            self,
            sock,
            peer,
            self._next_id,
            listener.allowed_commands,
            max_queued_bytes=listener.max_queued_bytes,
        )
        self._next_id += 1
        self._connections.add(conn)
        listener.connections += 1
        try:
            if listener.idle_timeout is None:
                await conn.run()
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._close_when_idle, conn, listener.idle_timeout)
                    await conn.run()
                    nursery.cancel_scope.cancel()
        finally:
            listener.connections -= 1
            self._connections.discard(conn)
            if not self._connections and self.closing:
                # only once shutting down: set earlier (a connection came and went), it
                # would cut the shutdown's wait short and cancel the writers before they
                # sent the other connections their ``shutting-down`` notice
                self._all_closed.set()

    async def _close_when_idle(self, conn: _Connection, timeout: float) -> None:
        """Close ``conn`` once it has been idle for ``timeout`` seconds: past ``hello``, no
        request in flight, no event subscribed. A busy connection is looked at again every
        quarter of the timeout (and counted busy until then), so an idle one is closed
        between 1 and 1.25 times the timeout after it was last busy."""
        last_active = trio.current_time()
        deadline = last_active + timeout
        while True:
            await trio.sleep_until(deadline)
            now = trio.current_time()
            busy = (
                conn.proto.state is not ServerState.READY
                or conn.proto.in_flight
                or conn.subscriptions
            )
            if busy:
                last_active = deadline = now + timeout / 4
                continue
            last_active = max(last_active, conn.last_request)
            if last_active + timeout <= now:
                break
            deadline = last_active + timeout
        log.info("%r: idle for %gs; closing", conn, timeout)
        conn.close_with(
            ErrorInfo(
                ErrorCode.IDLE_TIMEOUT,
                f"no request and no subscription for {timeout:g} seconds",
                {"timeout": timeout},
            )
        )

    # --- events -----------------------------------------------------------------------

    def _state_changed_threadsafe(self, change: StateChange) -> None:
        """The machine's listener: may run on any thread, never blocks."""
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._broadcast_state_change, change)

    def _broadcast_state_change(self, change: StateChange) -> None:
        # runs from run_sync_soon: an exception here would end trio.run, and the VMM
        try:
            data = {"old": change.old.value, "new": change.new.value, "reason": change.reason}
            frame: bytes | None = None
            for conn in list(self._connections):
                if "state-change" in conn.subscriptions:
                    if frame is None:
                        frame = encode_event(
                            self.schema,
                            "state-change",
                            data,
                            time.time(),
                            self.limits.max_frame_size,
                        )
                    conn.send_event(frame, droppable=False)
        except Exception:
            log.exception("could not send the state change %s -> %s", change.old, change.new)


@dataclass(eq=False)
class _Chain:
    """One ordered chain of a connection (1.8)."""

    id: int
    #: the last request of the chain received: the next one runs after it
    tail: _RequestEntry | None = None
    #: its requests in flight
    in_flight: int = 0
    #: the position the next request received takes (0, 1, 2... in arrival order)
    next_position: int = 0
    #: the position of the first request that did not succeed: those after it do not
    #: run (those before it, still waiting, do)
    failed_at: int | None = None
    #: that request, as ``chain-broken``'s ``details.failed``
    failed: dict[str, Any] | None = None

    def take_position(self) -> int:
        position, self.next_position = self.next_position, self.next_position + 1
        return position

    def broken_for(self, position: int) -> bool:
        return self.failed_at is not None and self.failed_at < position

    def broken_error(self) -> ErrorInfo:
        assert self.failed is not None
        failed = self.failed
        what = f"request {failed['id']}" if failed["id"] is not None else "a request"
        if failed["command"] is not None:
            what += f" ({failed['command']})"
        return ErrorInfo(
            ErrorCode.CHAIN_BROKEN,
            f"not run: chain {self.id} is broken ({what} answered {failed['code']})",
            {"chain": self.id, "failed": dict(failed)},
        )


@dataclass(eq=False)
class _RequestEntry:
    spec: CommandSpec
    #: when the request arrived, began and ended its handler (trio time), for ``took``
    received: float = 0.0
    began: float | None = None
    ended: float | None = None
    #: its ordered chain, its position there and the request it runs after (1.8)
    chain: _Chain | None = None
    position: int = 0
    after: _RequestEntry | None = None
    #: set once it has been answered (the next request of its chain may go)
    finished: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: the handler has begun (it then finishes unless the command is cancellable)
    started: bool = False
    #: the error to answer with when ``scope`` is cancelled
    cancel_error: ErrorInfo | None = None
    shutdown_requested: bool = False
    last_progress: float = -math.inf
    #: a progress report failed to encode (logged once)
    progress_failed: bool = False

    def took(self) -> ServerTiming:
        """What the request cost the server so far: queued until its handler began, then
        ran (0 if it never began)."""
        now = trio.current_time()
        began = self.began if self.began is not None else now
        ended = self.ended if self.ended is not None else began
        return ServerTiming(max(0.0, began - self.received), max(0.0, ended - began))


class _RequestServerControl:
    def __init__(self, entry: _RequestEntry, pause_lease: PauseLease, priority: Priority) -> None:
        self._entry = entry
        self.pause_lease = pause_lease
        self.priority = priority

    def request_shutdown(self) -> None:
        self._entry.shutdown_requested = True


class _Connection:
    def __init__(
        self,
        server: Server,
        sock: trio.socket.SocketType,
        peer: PeerCredentials,
        conn_id: int,
        allowed_commands: frozenset[str] | None = None,
        *,
        max_queued_bytes: int | None = None,
    ) -> None:
        self.server = server
        self.sock = sock
        #: the bound on bytes queued for this connection, from its socket's class
        self.max_queued_bytes = (
            server.config.max_queued_bytes if max_queued_bytes is None else max_queued_bytes
        )
        self.peer = peer
        self.id = conn_id
        #: the commands this connection may run (None: all), from its socket's class
        self.allowed_commands = allowed_commands
        self.proto = ServerProtocol(server.schema, server.limits)
        self.subscriptions: frozenset[str] = frozenset()
        # unbounded as a channel: what bounds the queue is the accounting below, in frames
        # and bytes, which makes the reader and the replies wait (and events overflow)
        send, recv = trio.open_memory_channel[bytes](math.inf)
        self._send = send
        self._recv = recv
        self._queued_frames = 0
        self._queued_bytes = 0
        #: woken whenever the writer took a frame off the queue, or went away
        self._drained = trio.lowlevel.ParkingLot()
        self._writer_gone = False
        #: the queue was closed: nothing is sent any more, not even straight
        self._send_closed = False
        self._requests: dict[int, _RequestEntry] = {}
        #: ordered chains with requests in flight, or broken (at most BROKEN_CHAINS_KEPT
        #: of those, the oldest forgotten first)
        self._chains: dict[int, _Chain] = {}
        self._broken: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._outer = trio.CancelScope()
        self._reader_scope = trio.CancelScope()
        self._timer_scope = trio.CancelScope()
        self._writer_scope = trio.CancelScope()
        self._stopping = False
        #: the connection-level error to send once every request has been answered
        self._farewell: ErrorInfo | None = None
        self._ancsize = socket.CMSG_SPACE(server.limits.max_fds_per_request * 4)
        self._work: trio.Nursery | None = None
        self._close_hooks: list[Callable[[], None]] = []
        #: when the last request arrived (trio time), for the idle timeout
        self.last_request = trio.current_time()

    def __repr__(self) -> str:
        return f"<connection {self.id} pid={self.peer.pid} uid={self.peer.uid}>"

    async def run(self) -> None:
        """Serve the connection until it closes. Never raises (but Cancelled): whatever
        goes wrong in one of its tasks closes this connection, not the server."""
        log.info("%r opened", self)
        try:
            with self._outer:
                async with trio.open_nursery() as outer:
                    outer.start_soon(self._writer)
                    async with trio.open_nursery() as work:
                        self._work = work
                        work.start_soon(self._handshake_timer)
                        await self._read_loop()
                        self._timer_scope.cancel()
                    # every request has been answered (or dropped): the last word, if any,
                    # comes after the last reply, then flush and close
                    if self._farewell is not None:
                        self._enqueue(self.proto.send_connection_error(self._farewell))
                    self._send_closed = True
                    self._send.close()
                    self._writer_scope.deadline = (
                        trio.current_time() + self.server.config.shutdown_grace
                    )
        except* Exception as failure:
            # a bug, not the peer's doing (hostile input is answered, not raised): the
            # traceback goes to the log, the connection closes, the others carry on
            log.error(
                "%r failed and is closed: %s",
                self,
                "; ".join(f"{type(e).__name__}: {e}" for e in failure.exceptions),
                exc_info=failure,
            )
        finally:
            close_fds(self.proto.release_fds())
            self.sock.close()
            log.info("%r closed", self)
            for hook in list(self._close_hooks):
                try:
                    hook()
                except Exception:
                    log.exception("%r: a close hook failed", self)

    # ConnectionControl, for handlers

    def add_close_hook(self, hook: Callable[[], None]) -> Callable[[], None]:
        self._close_hooks.append(hook)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._close_hooks.remove(hook)

        return remove

    def subscribe(self, events: frozenset[str]) -> None:
        self.subscriptions = events

    def negotiated(self, minor: int) -> None:
        self.proto.negotiated(minor)

    def cancel(self, request_id: int) -> bool:
        entry = self._requests.get(request_id)
        if entry is None or (entry.started and not entry.spec.cancellable):
            return False
        if entry.cancel_error is None:
            entry.cancel_error = _cancelled(request_id)
        entry.scope.cancel()
        return True

    # stopping

    def _stop(self, why: ErrorInfo | None) -> None:
        """Stop reading; cancel the requests that can be cancelled (they answer ``why``)."""
        self._stopping = True
        self._reader_scope.cancel()
        self._timer_scope.cancel()
        for rid, entry in self._requests.items():
            if entry.spec.cancellable or not entry.started:
                entry.cancel_error = entry.cancel_error or why or _cancelled(rid)
                entry.scope.cancel()

    def shutdown(self) -> None:
        """The server is shutting down: stop, let replies drain, then say so."""
        self._farewell = self._farewell or _SHUTTING_DOWN
        self._stop(_SHUTTING_DOWN)

    def close_with(self, error: ErrorInfo) -> None:
        """Stop reading, let replies drain, send the connection-level ``error``, close.
        The error is the connection's last frame: a request still running (one that
        cannot be cancelled, or whose reply waits for room in a slow reader's queue)
        answers before it, never after."""
        self._farewell = self._farewell or error
        self._stop(None)

    def send_event(self, frame: bytes, *, droppable: bool) -> None:
        config = self.server.config
        fits = (
            self._queued_frames < config.outbound_queue
            and self._queued_bytes + len(frame) <= self.max_queued_bytes
        )
        if fits:
            self._enqueue(frame)
        elif not droppable and not self._writer_gone:
            log.warning(
                "%r reads too slowly: %d frames (%d bytes) queued; closing it",
                self,
                self._queued_frames,
                self._queued_bytes,
            )
            self._outer.cancel()

    # the outgoing queue

    def _has_room(self) -> bool:
        config = self.server.config
        return (
            self._queued_frames < config.outbound_queue
            and self._queued_bytes < self.max_queued_bytes
        )

    async def _wait_for_room(self) -> None:
        """Wait while this connection's queue is full (its peer reads too slowly).

        A caller that enqueues right after, with no checkpoint in between, keeps the queue
        under ``max_queued_bytes`` plus one frame.
        """
        while not self._has_room() and not self._writer_gone:
            await self._drained.park()

    def _enqueue(self, frame: bytes) -> None:
        """Send ``frame``, in order after the frames queued before it: straight into the
        socket when nothing is queued and the socket takes it now (the usual case: a reply
        costs no hop to the writer task, a pass of the event loop), else what is left goes
        to the writer's queue (dropped if the peer is gone)."""
        if self._queued_frames == 0 and not self._send_closed and not self._writer_gone:
            try:
                sent = send_nowait(self.sock.fileno(), frame)
            except (OSError, PeerClosed):
                sent = None  # the writer meets the error again, and stops the connection
            if sent == len(frame):
                return
            if sent:
                frame = frame[sent:]
        try:
            self._send.send_nowait(frame)
        except _GONE:
            return
        self._queued_frames += 1
        self._queued_bytes += len(frame)

    # tasks

    async def _writer(self) -> None:
        try:
            with self._writer_scope:
                async with self._recv:
                    async for frame in self._recv:
                        view = memoryview(frame)
                        try:
                            while view:
                                sent = await self.sock.send(view)
                                view = view[sent:]
                        except OSError as exc:
                            log.info("%r: peer gone while sending (%s)", self, exc.strerror)
                            self._stop(None)
                            return
                        finally:
                            self._queued_frames -= 1
                            self._queued_bytes -= len(frame)
                            self._drained.unpark_all()
        finally:
            # nothing will be sent any more: nobody may wait for room
            self._writer_gone = True
            self._drained.unpark_all()

    async def _handshake_timer(self) -> None:
        with self._timer_scope:
            await trio.sleep(self.server.config.handshake_timeout)
            if self.proto.state is ServerState.HANDSHAKE:
                log.info(
                    "%r: no hello within %gs; closing", self, self.server.config.handshake_timeout
                )
                self.close_with(
                    ErrorInfo(
                        ErrorCode.HANDSHAKE_TIMEOUT,
                        f"no hello within {self.server.config.handshake_timeout:g} seconds",
                    )
                )

    async def _read_loop(self) -> None:
        with self._reader_scope:
            while True:
                # every whole frame received, one at a time: wait while the replies of
                # the earlier ones pile up unread (backpressure), and let the other
                # connections run between two frames (decoding one costs up to a
                # millisecond or so: requests are small, see Limits.max_request_size)
                handled = 0
                while True:
                    event = self.proto.next_event()
                    close_fds(self.proto.take_discarded_fds())
                    if event is None:
                        break
                    if handled:  # not after the last one: the receive below waits anyway
                        await trio.lowlevel.checkpoint()
                    await self._wait_for_room()
                    if not self._handle(event):
                        return
                    handled += 1
                try:
                    data, ancdata, flags, _ = await self.sock.recvmsg(
                        _RECV_SIZE, self._ancsize, socket.MSG_CMSG_CLOEXEC
                    )
                except OSError as exc:
                    log.info("%r: receive failed (%s)", self, exc.strerror)
                    self._stop(None)
                    return
                fds = fds_from_ancdata(ancdata)
                if not data and not fds:
                    for event in self.proto.receive_eof():
                        close_fds(self.proto.take_discarded_fds())
                        self._handle(event)
                    return
                truncated = bool(flags & socket.MSG_CTRUNC)
                self.proto.feed(data, fds, fds_truncated=truncated)
                close_fds(self.proto.take_discarded_fds())

    def _handle(self, event: ServerEvent) -> bool:
        """Act on one protocol event; False when reading must stop.

        The caller made room in the queue for the one reply this may send (no
        checkpoint in between)."""
        if isinstance(event, RequestReceived):
            rid = event.request.id
            chain = event.request.chain
            self.last_request = trio.current_time()
            refusal: ErrorInfo | None = None
            allowed = self.allowed_commands
            if self.server.closing or self._stopping:
                refusal = _SHUTTING_DOWN
            elif allowed is not None and event.spec.name not in allowed:
                log.info("%r: %s is not permitted on this socket", self, event.spec.name)
                refusal = ErrorInfo(
                    ErrorCode.NOT_PERMITTED,
                    f"{event.spec.name} is not permitted on this socket",
                    {"command": event.spec.name, "allowed": sorted(allowed)},
                )
            if refusal is not None:
                close_fds(event.fds.values())
                if chain is not None:
                    position = self._chain(chain).take_position()
                    self._break_chain(chain, position, rid, event.spec.name, refusal.code)
                self._enqueue(self.proto.send_error(rid, refusal, ServerTiming(0.0, 0.0)))
                return True
            entry = _RequestEntry(event.spec, received=self.last_request)
            if chain is not None:
                link = self._chain(chain)
                entry.chain, entry.after = link, link.tail
                entry.position = link.take_position()
                link.tail = entry
                link.in_flight += 1
            self._requests[rid] = entry
            assert self._work is not None
            self._work.start_soon(self._run_request, event, entry)
            return True
        if isinstance(event, RequestRejected):
            if event.chain is not None:
                # refused before it could run: the requests after it in its chain must not
                position = self._chain(event.chain).take_position()
                self._break_chain(event.chain, position, event.request_id, None, event.error.code)
            took = None if event.request_id is None else ServerTiming(0.0, 0.0)
            self._enqueue(self.proto.send_error(event.request_id, event.error, took))
            return True
        if isinstance(event, ConnectionBroken):
            if event.error is None:
                self._stop(None)
            else:
                log.info("%r: %s; closing", self, event.error)
                self.close_with(event.error)
            return False
        # InputEnded: a peer that only shut its writing side still gets its replies
        if peer_hung_up(self.sock.fileno()):
            self._stop(None)
        return False

    # ordered chains

    def _chain(self, chain_id: int) -> _Chain:
        """The chain ``chain_id`` (a new one if it has nothing in flight and is not broken)."""
        link = self._chains.get(chain_id)
        if link is None:
            link = self._chains[chain_id] = _Chain(chain_id)
        return link

    def _break_chain(
        self,
        chain_id: int,
        position: int,
        request_id: int | None,
        command: str | None,
        code: str,
    ) -> None:
        """The chain's request ``request_id``, at ``position``, did not succeed: the
        requests after it do not run (the first such request is the one their
        ``chain-broken`` answers name)."""
        link = self._chain(chain_id)
        if link.failed_at is not None and link.failed_at <= position:
            return
        link.failed_at = position
        link.failed = {
            "id": request_id,
            "command": None if command is None else shorten(command),
            "code": shorten(str(code)),
        }
        self._broken[chain_id] = None
        while len(self._broken) > BROKEN_CHAINS_KEPT:
            oldest, _ = self._broken.popitem(last=False)
            forgotten = self._chains.get(oldest)
            if forgotten is not None and forgotten.in_flight == 0:
                del self._chains[oldest]

    def _chain_done(self, entry: _RequestEntry, rid: int, succeeded: bool, code: str) -> None:
        link = entry.chain
        if link is None:
            return
        if not succeeded:
            self._break_chain(link.id, entry.position, rid, entry.spec.name, code)
        link.in_flight -= 1
        if link.tail is entry:
            link.tail = None
        if link.in_flight == 0 and link.failed is None:
            self._chains.pop(link.id, None)
        elif link.in_flight == 0 and link.id not in self._broken:
            self._chains.pop(link.id, None)  # broken, then forgotten while in flight

    # requests

    async def _run_request(self, event: RequestReceived, entry: _RequestEntry) -> None:
        rid = event.request.id
        spec = event.spec
        fds = FdSet(event.fds)
        result: Any = _MISSING
        error: ErrorInfo | None = None
        succeeded = False
        try:
            try:
                with entry.scope:
                    if entry.after is not None:
                        # its chain's previous request first (answered, and the chain
                        # broken if it failed); a cancel or a close cancels this wait
                        await entry.after.finished.wait()
                    link = entry.chain
                    if link is not None and link.broken_for(entry.position):
                        error = link.broken_error()
                    else:
                        await self.server.priority.admit(self, spec.name)
                        error = self._check_fds(spec, fds)
                    handler = self.server.handlers.get(spec.name)
                    if error is None and handler is None:
                        error = ErrorInfo(
                            ErrorCode.INTERNAL_ERROR, f"{spec.name} has no handler in this server"
                        )
                    if error is None and handler is not None:
                        ctx = CommandContext(
                            machine=self.server.machine,
                            request_id=rid,
                            command=spec.name,
                            args=event.args,
                            fds=fds,
                            schema=self.server.schema,
                            server_info=self.server.info,
                            connection=self,
                            server=_RequestServerControl(
                                entry, self.server.pause_lease, self.server.priority
                            ),
                            _progress=self._progress_sink(rid, spec.name, entry),
                        )
                        if handler.exclusive:
                            lock = self.server.machine_lock
                            try:  # free, the usual case: taken with no pass of the loop
                                lock.acquire_nowait()
                            except trio.WouldBlock:
                                await lock.acquire()
                            try:
                                result, error = await self._start(handler, ctx, entry)
                            finally:
                                lock.release()
                        else:
                            result, error = await self._start(handler, ctx, entry)
            except Exception as exc:
                # not the handler (``_start`` answers its failures) but the plumbing
                # around it: a bug; answer it, and the connection carries on
                log.exception("%r: request %d (%s) failed", self, rid, spec.name)
                result = _MISSING
                error = ErrorInfo(
                    ErrorCode.INTERNAL_ERROR, f"{spec.name} failed: {type(exc).__name__}"
                )
            finally:
                close_fds(fds.release())
                self._requests.pop(rid, None)
            if result is _MISSING and error is None:
                error = entry.cancel_error or _cancelled(rid)
            # room first, then the reply's bytes: replies a peer does not read wait here
            # as results, and the queue stays bounded in bytes
            await self._wait_for_room()
            frame: bytes | None = None
            took = entry.took()
            if error is None:
                try:
                    frame = self.proto.send_result(rid, result, took)
                    succeeded = True
                except LocalProtocolError as exc:
                    log.error("%s: %s", spec.name, exc.message)
                    error = ErrorInfo(ErrorCode.INTERNAL_ERROR, exc.message)
                except Exception as exc:
                    log.exception("%s: its result could not be sent", spec.name)
                    error = ErrorInfo(
                        ErrorCode.INTERNAL_ERROR,
                        f"{spec.name}: its result could not be sent ({type(exc).__name__})",
                    )
            if frame is None:
                error = error or _cancelled(rid)
                frame = self.proto.send_error(rid, error, took)
            self._enqueue(frame)
        finally:
            # the chain learns the outcome before its next request may go
            code = error.code if error is not None else ErrorCode.CANCELLED
            self._chain_done(entry, rid, succeeded, code)
            entry.finished.set()
            if entry.shutdown_requested:
                self.server.begin_shutdown()

    async def _start(
        self, handler: HandlerEntry, ctx: CommandContext, entry: _RequestEntry
    ) -> tuple[Any, ErrorInfo | None]:
        spec = entry.spec
        error = self._check_state(spec)
        if error is not None:
            return _MISSING, error
        if entry.chain is not None and entry.scope.cancel_called:
            # a chained request cancelled (or its connection closed) while it waited,
            # with no checkpoint since: it must not begin now (the shield below would let
            # it run). A plain request keeps its old behaviour: received before the
            # close, not yet begun, it may still run (a late ``resume`` does)
            return _MISSING, None
        entry.started = True
        entry.began = trio.current_time()
        with trio.CancelScope(shield=not spec.cancellable):
            try:
                return await handler.func(ctx), None
            except InvalidStateError as exc:
                return _MISSING, _invalid_state(spec, exc.state.value)
            except CommandError as exc:
                if exc.code not in self.server.schema.errors_of(spec.name):
                    log.error(
                        "%s answered with %s, which its schema does not list", spec.name, exc.code
                    )
                return _MISSING, exc.info
            except Exception as exc:
                log.exception("%s failed", spec.name)
                return _MISSING, ErrorInfo(
                    ErrorCode.INTERNAL_ERROR, f"{spec.name} failed: {type(exc).__name__}: {exc}"
                )
            finally:
                entry.ended = trio.current_time()
        return _MISSING, None  # not reached: the shield scope is never cancelled itself

    def _check_state(self, spec: CommandSpec) -> ErrorInfo | None:
        if spec.states is None:
            return None
        state = self.server.machine.state.value
        if state in spec.states:
            return None
        return _invalid_state(spec, state)

    def _check_fds(self, spec: CommandSpec, fds: FdSet) -> ErrorInfo | None:
        for name, fd in fds.items():
            fd_spec = spec.fd(name)
            assert fd_spec is not None  # the protocol matched the names already
            problem = check_fd(fd, fd_spec.direction)
            if problem is not None:
                return ErrorInfo(
                    ErrorCode.INVALID_FDS,
                    f"{spec.name}: fd {name!r} ({fd_spec.direction}) {problem}",
                    {"fd": name, "problem": problem},
                )
        return None

    def _progress_sink(self, rid: int, command: str, entry: _RequestEntry) -> Any:
        server = self.server

        def emit(phase: str, done: int, total: int | None) -> None:  # on the trio thread
            if "progress" not in self.subscriptions or rid not in self._requests:
                return
            data = {
                "request": rid,
                "command": command,
                "phase": phase,
                "done": done,
                "total": total,
            }
            try:
                frame = encode_event(
                    server.schema, "progress", data, time.time(), server.limits.max_frame_size
                )
                self.send_event(frame, droppable=True)
            except Exception as exc:
                # a handler's bad report (a bug): raised from a run_sync_soon callback it
                # would end trio.run, so it is logged (once) and the report dropped
                if not entry.progress_failed:
                    log.error("%s: progress not sent: %s", command, exc)
                entry.progress_failed = True

        def report(phase: str, done: int, total: int | None) -> None:  # on any thread
            # throttle first, so that a worker thread calling this for every page costs
            # next to nothing and never floods the trio loop
            now = time.monotonic()
            final = total is not None and done >= total
            if not final and now - entry.last_progress < PROGRESS_INTERVAL:
                return
            entry.last_progress = now
            if threading.get_ident() == server._trio_thread:
                emit(phase, done, total)
                return
            assert server._token is not None
            with contextlib.suppress(trio.RunFinishedError):
                server._token.run_sync_soon(emit, phase, done, total)

        return report


def _invalid_state(spec: CommandSpec, state: str) -> ErrorInfo:
    allowed = sorted(spec.states) if spec.states is not None else []
    return ErrorInfo(
        ErrorCode.INVALID_STATE,
        f"cannot {spec.name} while {state}",
        {"state": state, "allowed": allowed},
    )

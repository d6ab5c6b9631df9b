"""The async (trio) client."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, cast

import trio

from vmipc.client._common import (
    CLIENT_MAX_FRAME_SIZE,
    DEFAULT_CLIENT_NAME,
    LAST_WORDS_LIMIT,
    LAST_WORDS_TIMEOUT,
    EventBuffer,
    FdLike,
    ProgressCallback,
    adopted_frame_size,
    check_frame_size,
    check_server,
    progress_request,
    requested_events,
    scm_rights,
    split_fds,
    trusted_server_uids,
)
from vmipc.client._generated import AsyncCommands, HelloResult
from vmipc.protocol import (
    SUPPORTED_MAJORS,
    ClientProtocol,
    ClosedByPeer,
    ClosedByUs,
    CommandError,
    ConnectionClosed,
    Error,
    ErrorInfo,
    Event,
    ProtocolError,
    Result,
)

_RECV_SIZE = 64 * 1024
#: seconds a cancelled call may spend telling the server to cancel its request
CANCEL_SEND_TIMEOUT = 1.0


@asynccontextmanager
async def open_client(
    socket_path: str,
    *,
    events: Iterable[str] = (),
    client_name: str = DEFAULT_CLIENT_NAME,
    max_frame_size: int = CLIENT_MAX_FRAME_SIZE,
    trusted_uids: Iterable[int] = (),
) -> AsyncIterator[Client]:
    """Connect to the server at ``socket_path``, do the handshake, and yield a Client.

    ``events`` subscribes to those events right away. ``max_frame_size``: the largest
    frame the client accepts, whatever the server announces (it adopts the server's limit
    only when that is smaller); a larger frame closes the connection (calls raise
    ClosedByUs). Raises OSError when the socket
    cannot be reached, :class:`ClosedByPeer` when the server refuses the connection
    (its ``error`` says why, e.g. ``access-denied``), :class:`CommandError` when the
    handshake fails (``unsupported-version``).

    The server's process must run as the caller's effective uid, as root, or as one of
    ``trusted_uids`` (SO_PEERCRED): else :class:`UntrustedServer` (a
    ConnectionRefusedError) before anything is sent.
    """
    check_frame_size(max_frame_size)
    trusted = trusted_server_uids(trusted_uids)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(socket_path)
        check_server(sock, socket_path, trusted)
    except BaseException:
        sock.close()
        raise
    client = Client(sock, max_frame_size=max_frame_size)
    try:
        # the reader never raises, so whatever comes out of the nursery is the body's
        # exception (or the handshake's): hand it on as itself, not in a group
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._read_loop)
            try:
                await client._handshake(client_name)
                if events:
                    await client.subscribe(events=list(events))
                yield client
            finally:
                client.close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise


@dataclass(eq=False)
class _Pending:
    command: str
    done: trio.Event
    on_progress: ProgressCallback | None = None
    result: Any = None
    error: ErrorInfo | None = None
    closed: ConnectionClosed | None = None


class Client(AsyncCommands):
    """A connection to a control server; one method per schema command (see AsyncCommands).

    Obtain one with :func:`open_client`. Several tasks may call concurrently: each call is
    a request in flight with its own id. Cancelling a call (e.g. with ``trio.fail_after``)
    sends ``cancel`` for its request and does not wait for the answer.

    Errors: :class:`CommandError` (the server refused or failed the command: ``.code``),
    :class:`ClosedByPeer` (the server closed the connection; ``.error`` says why when it
    told us), :class:`ClosedByUs` (used after :meth:`close`), :class:`RemoteProtocolError`
    (the server broke the protocol; the connection is then closed).
    """

    def __init__(
        self, sock: trio.socket.SocketType, *, max_frame_size: int = CLIENT_MAX_FRAME_SIZE
    ) -> None:
        self._sock = sock
        #: the largest frame this client accepts, whatever the server announces
        self._own_frame_limit = check_frame_size(max_frame_size)
        self._proto = ClientProtocol(max_frame_size)
        self._pending: dict[int, _Pending] = {}
        self._send_lock = trio.Lock()
        self._closed: ConnectionClosed | None = None
        self._closed_event = trio.Event()
        #: why a send failed because the server closed; the reader is then hearing its
        #: last words, up to ``_last_words_budget`` more bytes
        self._send_failed: str | None = None
        self._last_words_budget = LAST_WORDS_LIMIT
        self._broken: BaseException | None = None
        self._events = EventBuffer()
        self._event_arrived = trio.Event()
        self._connection_error: ErrorInfo | None = None
        #: the ``hello`` result: protocol version, server identity, catalogue, limits
        self.server_info: HelloResult = cast(HelloResult, {})

    @property
    def protocol_version(self) -> str:
        return self.server_info["protocol"]

    @property
    def is_closed(self) -> bool:
        return self._closed is not None

    async def _handshake(self, client_name: str) -> None:
        self.server_info = await self.hello(versions=list(SUPPORTED_MAJORS), client=client_name)
        try:
            limit = adopted_frame_size(self.server_info, self._own_frame_limit)
        except ProtocolError:
            self.close()
            raise
        self._proto.set_max_frame_size(limit)

    async def call(
        self,
        command: str,
        /,
        *,
        fds: Mapping[str, FdLike] | None = None,
        on_progress: ProgressCallback | None = None,
        **args: Any,
    ) -> Any:
        """Send ``command`` with ``args`` (and ``fds`` by name); return its result.

        Raises CommandError with the server's code when it answers with an error.
        """
        if self._closed is not None:
            raise self._closed
        names, numbers = split_fds(fds)
        rid, frame = self._proto.send_request(command, args, names)
        pending = _Pending(command, trio.Event(), on_progress)
        self._pending[rid] = pending
        subscribed = self._events.subscribed
        if command == "subscribe":
            # the server may send the new events before its answer
            self._events.subscribed = subscribed | requested_events(args)
        try:
            await self._send_frame(frame, numbers)
            await pending.done.wait()
        except trio.Cancelled:
            if not pending.done.is_set() and self._closed is None:
                await self._send_cancel(rid)
            raise
        finally:
            self._pending.pop(rid, None)
        if pending.closed is not None:
            raise pending.closed
        if pending.error is not None:
            if command == "subscribe":
                self._events.subscribed = subscribed
            raise CommandError.from_info(pending.error, command=command)
        if command == "subscribe":
            self._events.subscribed = requested_events(args)
        return pending.result

    async def _send_frame(self, frame: bytes, fds: list[int]) -> None:
        async with self._send_lock:
            view = memoryview(frame)
            try:
                if fds:
                    sent = await self._sock.sendmsg([view], scm_rights(fds))
                    view = view[sent:]
                while view:
                    sent = await self._sock.send(view)
                    view = view[sent:]
            except trio.Cancelled:
                if len(view) not in (0, len(frame)):
                    # half a frame went out: the stream cannot be used any more
                    self._fail(ClosedByUs("a call was cancelled in the middle of sending"))
                raise
            except trio.ClosedResourceError:
                raise self._closed or ClosedByUs("the connection is closed") from None
            except OSError as exc:
                reason = f"sending failed: {exc.strerror}"
                if isinstance(exc, ConnectionError):  # EPIPE, ECONNRESET: the server closed
                    await self._hear_last_words(reason)
                self._fail(ClosedByPeer(reason, self._connection_error))
                raise self._closed or ClosedByPeer(reason) from None

    async def _hear_last_words(self, reason: str) -> None:
        """After a send failed because the server closed: let the reader take in what it
        sent before closing (a connection-level error says why) up to the end of the
        stream, for at most LAST_WORDS_TIMEOUT seconds and about LAST_WORDS_LIMIT bytes;
        then the connection is closed.

        The reader, not this task, must do the reading: it may already hold those bytes,
        received but not yet looked at (trio checkpoints between its ``recv`` and the
        dispatch), and a refusal sent before our ``hello`` would be lost.
        """
        self._send_failed = reason
        try:
            with trio.move_on_after(LAST_WORDS_TIMEOUT):
                await self._closed_event.wait()
        finally:
            self._fail(ClosedByPeer(reason, self._connection_error))

    async def _send_cancel(self, rid: int) -> None:
        """Ask the server to cancel ``rid``; its answer (and rid's) will be dropped."""
        try:
            _, frame = self._proto.send_request("cancel", {"request": rid})
        except ProtocolError:
            return
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(CANCEL_SEND_TIMEOUT),
            suppress(ConnectionClosed),
        ):
            await self._send_frame(frame, [])

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    data = await self._sock.recv(_RECV_SIZE)
                except trio.ClosedResourceError:
                    return  # closed by us
                except OSError as exc:
                    raise ClosedByPeer(
                        f"connection broken: {exc.strerror}", self._connection_error
                    ) from None
                if not data:
                    self._proto.receive_eof()
                    raise ClosedByPeer("the server closed the connection", self._connection_error)
                for message in self._proto.receive_data(data):
                    self._dispatch(message)
                if self._send_failed is not None:
                    self._last_words_budget -= len(data)
                    if self._last_words_budget <= 0:
                        raise ClosedByPeer(self._send_failed, self._connection_error)
        except trio.Cancelled:
            raise
        except ConnectionClosed as exc:
            self._fail(exc)
        except ProtocolError as exc:
            self._fail(ClosedByUs(f"closed after the server broke the protocol: {exc}"))
            self._broken = exc

    def _dispatch(self, message: Result | Error | Event) -> None:
        if isinstance(message, Event):
            rid = progress_request(message)
            pending = self._pending.get(rid) if rid is not None else None
            if pending is not None and pending.on_progress is not None:
                pending.on_progress(message)
                return
            if self._events.add(message):
                self._event_arrived.set()
            return
        if message.id is None:
            assert isinstance(message, Error)
            self._connection_error = message.error  # the server will close after this
            return
        pending = self._pending.get(message.id)
        if pending is None:
            return  # the caller was cancelled and went away
        if isinstance(message, Result):
            pending.result = message.result
        else:
            pending.error = message.error
        pending.done.set()

    def _fail(self, exc: ConnectionClosed) -> None:
        if self._closed is None:
            self._closed = exc
        for pending in self._pending.values():
            if pending.done.is_set():
                continue  # answered before the connection closed (``quit``): keep the answer
            pending.closed = self._closed
            pending.done.set()
        self._event_arrived.set()
        self._closed_event.set()
        self._sock.close()

    def close(self) -> None:
        """Close the connection; calls in flight raise ClosedByUs."""
        self._fail(ClosedByUs("the client closed the connection"))

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    async def next_event(self) -> Event:
        """The next event (subscribe first). Raises ConnectionClosed when none can come."""
        while not self._events:
            if self._closed is not None:
                raise self._closed
            self._event_arrived = trio.Event()
            await self._event_arrived.wait()
        return self._events.popleft()

    async def events(self) -> AsyncIterator[Event]:
        """Iterate over events until the connection closes."""
        while True:
            try:
                yield await self.next_event()
            except ConnectionClosed:
                return

"""The async (trio) client."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import trio

from vmipc.client._common import (
    CLIENT_MAX_FRAME_SIZE,
    CLIENT_MINOR,
    DEFAULT_CLIENT_NAME,
    LAST_WORDS_LIMIT,
    LAST_WORDS_TIMEOUT,
    Call,
    EventBuffer,
    FdLike,
    ProgressCallback,
    ReplyObserver,
    ReplyObservers,
    adopted_frame_size,
    chain_unsupported,
    check_frame_size,
    check_server,
    make_reply,
    minor_of,
    progress_request,
    requested_events,
    scm_rights,
    split_fds,
    trusted_server_uids,
)
from vmipc.client._generated import AsyncCommands
from vmipc.protocol import (
    CHAINS_MINOR,
    MAX_ID,
    SUPPORTED_MAJORS,
    ClientProtocol,
    ClosedByPeer,
    ClosedByUs,
    CommandError,
    ConnectionClosed,
    Error,
    ErrorCode,
    ErrorInfo,
    Event,
    ProtocolError,
    Result,
    ServerTiming,
)

if TYPE_CHECKING:
    from vmipc.client._results import HelloResult

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
    took: ServerTiming | None = None

    def outcome(self) -> Any:
        """The reply as a call returns it, or raise its error."""
        if self.closed is not None:
            raise self.closed
        if self.error is not None:
            exc = CommandError.from_info(self.error, command=self.command)
            exc.server = self.took
            raise exc
        return make_reply(self.result, self.took)


class OrderedCall:
    """A request of an ordered chain, sent (see :meth:`Client.send_ordered`)."""

    def __init__(
        self, client: Client, command: str, request_id: int, pending: _Pending, chain: list[int]
    ) -> None:
        self._client = client
        self.command = command
        #: the request's id on the connection
        self.id = request_id
        self._pending = pending
        self._chain = chain

    @property
    def done(self) -> bool:
        """Whether its reply has arrived (or the connection closed)."""
        return self._pending.done.is_set()

    async def result(self) -> Any:
        """Its result (a :class:`Reply` for a map); raises CommandError (``chain-broken``
        when an earlier request of its chain failed) or ConnectionClosed. Cancelled while
        waiting, it cancels this request and every later one of its chain not answered
        yet, without waiting for their answers."""
        try:
            await self._pending.done.wait()
        except trio.Cancelled:
            await self._client._cancel_chain(self._chain, self.id)
            raise
        self._client._pending.pop(self.id, None)
        return self._pending.outcome()


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
        self._observers = ReplyObservers()
        self._progress_observers: list[Callable[[Event], None]] = []
        self._next_chain = 0
        #: the ``hello`` result: protocol version, server identity, catalogue, limits
        self.server_info: HelloResult = cast("HelloResult", {})

    @property
    def protocol_version(self) -> str:
        return self.server_info["protocol"]

    @property
    def protocol_minor(self) -> int:
        """The minor version of protocol 1 this connection speaks (negotiated by
        ``hello``): arguments added in a minor may be sent from it on."""
        return minor_of(self.server_info)

    @property
    def supports_ordered(self) -> bool:
        """Whether the connection speaks ordered chains and server timings (1.8)."""
        return self.protocol_minor >= CHAINS_MINOR

    def add_reply_observer(self, observer: ReplyObserver) -> Callable[[], None]:
        """Call ``observer(command, timing)`` with the server's timing of every reply to a
        call of this client that carries one (protocol 1.8), as it arrives, on the
        reader's task (keep it short; what it raises is logged and dropped). Returns a
        function that removes it."""
        return self._observers.add(observer)

    def add_progress_observer(self, observer: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``observer(event)`` with every ``progress`` event of this client's calls
        that no call's own ``on_progress`` takes (subscribe to ``progress`` first); those
        events are then not kept for :meth:`next_event`. Called on the reader's task (keep
        it short; what it raises is logged and dropped). Returns a function that removes
        it."""
        self._progress_observers.append(observer)

        def remove() -> None:
            with suppress(ValueError):
                self._progress_observers.remove(observer)

        return remove

    @property
    def subscriptions(self) -> frozenset[str]:
        """The events this connection is subscribed to."""
        return frozenset(self._events.subscribed)

    @property
    def is_closed(self) -> bool:
        return self._closed is not None

    async def _handshake(self, client_name: str) -> None:
        versions = list(SUPPORTED_MAJORS)
        try:
            self.server_info = await self.hello(
                versions=versions, client=client_name, minor=CLIENT_MINOR
            )
        except CommandError as exc:
            if exc.code != ErrorCode.INVALID_ARGUMENTS:
                raise
            # a server before 1.8 knows no ``minor``; it stays in the handshake
            self.server_info = await self.hello(versions=versions, client=client_name)
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
            return pending.outcome()  # raises
        if command == "subscribe":
            self._events.subscribed = requested_events(args)
        return pending.outcome()

    async def send_ordered(self, calls: Sequence[Call]) -> list[OrderedCall]:
        """Send ``calls`` as one ordered chain (protocol 1.8), every frame before any reply
        is awaited, and return a handle per call, in order: the server runs them one
        after the other, each once the previous one succeeded; after a failure the later
        ones answer ``chain-broken`` without running. Await ``handle.result()`` for each.

        Raises LocalProtocolError when the connection speaks an older protocol (see
        :attr:`supports_ordered`). Cancelled while sending, it cancels what it sent.
        """
        if self._closed is not None:
            raise self._closed
        if not self.supports_ordered:
            raise chain_unsupported(self.protocol_version)
        chain = self._next_chain
        self._next_chain = (self._next_chain + 1) % (MAX_ID + 1)
        ids: list[int] = []
        handles: list[OrderedCall] = []
        frames: list[tuple[bytes, list[int]]] = []
        for call in calls:
            names, numbers = split_fds(call.fds)
            rid, frame = self._proto.send_request(call.command, call.args, names, chain)
            pending = _Pending(call.command, trio.Event())
            self._pending[rid] = pending
            ids.append(rid)
            handles.append(OrderedCall(self, call.command, rid, pending, ids))
            frames.append((frame, numbers))
        sent = 0
        try:
            for frame, numbers in frames:
                await self._send_frame(frame, numbers)
                sent += 1
        except BaseException:
            # the part sent would run without the rest: take it back
            if sent and self._closed is None:
                await self._cancel_chain(ids[:sent], ids[0])
            for rid in ids:
                self._pending.pop(rid, None)
            raise
        return handles

    async def call_ordered(self, calls: Sequence[Call]) -> list[Any]:
        """:meth:`send_ordered`, then every result, in order. If a call failed, raises
        its CommandError (the first failure, not the ``chain-broken`` after it) once
        every reply has arrived."""
        handles = await self.send_ordered(calls)
        results: list[Any] = []
        failure: CommandError | None = None
        for handle in handles:
            try:
                results.append(await handle.result())
            except CommandError as exc:
                results.append(exc)
                if failure is None:
                    failure = exc
        if failure is not None:
            raise failure
        return results

    async def _cancel_chain(self, ids: list[int], first: int) -> None:
        """Cancel the requests of a chain from ``first`` on that are not answered yet (a
        request that cannot be stopped any more runs on; the ones after it do not)."""
        for rid in ids[ids.index(first) :]:
            pending = self._pending.pop(rid, None)
            if pending is None or pending.done.is_set():
                continue
            # its answer will be dropped: a handle awaited later says so at once
            pending.error = ErrorInfo(ErrorCode.CANCELLED, f"request {rid} was cancelled")
            pending.done.set()
            if self._closed is None:
                await self._send_cancel(rid)

    async def _send_frame(self, frame: bytes, fds: list[int]) -> None:
        view = memoryview(frame)
        lock = self._send_lock
        try:
            lock.acquire_nowait()
            free = True
        except trio.WouldBlock:
            free = False
        if not free:
            await lock.acquire()
        try:
            if free and not fds:
                # the usual case: the socket takes the whole frame now, with no pass of
                # the event loop (a frame with fds, the rest of one that did not fit, or
                # an error: below, where a full socket is waited for)
                with suppress(OSError):  # full, closed or gone: the send below says which
                    view = view[os.write(self._sock.fileno(), view) :]
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
        finally:
            lock.release()

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
            if rid is not None and self._progress_observers:
                for observer in list(self._progress_observers):
                    try:
                        observer(message)
                    except Exception:
                        import logging  # on an observer's bug only (see ReplyObservers)

                        logging.getLogger("vmipc.client").exception("a progress observer failed")
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
        pending.took = message.took
        pending.done.set()
        self._observers.notify(pending.command, message.took)

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

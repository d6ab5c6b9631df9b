"""The blocking client, for scripts: a plain socket around the same protocol core."""

from __future__ import annotations

import collections
import contextlib
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

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
from vmipc.client._generated import SyncCommands
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
)

if TYPE_CHECKING:
    from vmipc.client._results import HelloResult

_RECV_SIZE = 64 * 1024


class SyncOrderedCall:
    """A request of an ordered chain, sent (see :meth:`SyncClient.send_ordered`)."""

    def __init__(self, client: SyncClient, command: str, request_id: int) -> None:
        self._client = client
        self.command = command
        #: the request's id on the connection
        self.id = request_id

    def result(self) -> Any:
        """Its result (a :class:`Reply` for a map), blocking until it arrives; raises
        CommandError (``chain-broken`` when an earlier request of its chain failed)."""
        return self._client._chained_result(self.id, self.command)


class SyncClient(SyncCommands):
    """A blocking connection to a control server; one method per schema command.

    ``with SyncClient(path) as client: client.pause()``. One call at a time. ``timeout``
    (seconds, or None to wait forever) bounds every socket operation; when it expires
    the call raises TimeoutError and the connection is closed (a reply may be pending).

    ``max_frame_size``: the largest frame this client accepts, whatever the server
    announces (it adopts the server's limit only when that is smaller); a larger frame
    raises RemoteProtocolError (``frame-too-large``) and closes the connection.

    Errors are those of the async :class:`~vmipc.client.Client`.
    """

    def __init__(
        self,
        socket_path: str,
        *,
        timeout: float | None = None,
        events: Iterable[str] = (),
        client_name: str = DEFAULT_CLIENT_NAME,
        max_frame_size: int = CLIENT_MAX_FRAME_SIZE,
        trusted_uids: Iterable[int] = (),
    ) -> None:
        own_limit = check_frame_size(max_frame_size)
        trusted = trusted_server_uids(trusted_uids)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._proto = ClientProtocol(own_limit)
        self._events = EventBuffer()
        self._inbox: collections.deque[Result | Error | Event] = collections.deque()
        self._closed: ConnectionClosed | None = None
        self._connection_error: ErrorInfo | None = None
        self._observers = ReplyObservers()
        self._progress_observers: list[Callable[[Event], None]] = []
        self._next_chain = 0
        #: replies of chained requests not collected yet, and the ids still expected
        self._chained: dict[int, Result | Error] = {}
        self._expected: set[int] = set()
        self.server_info: HelloResult = cast("HelloResult", {})
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(socket_path)
            check_server(self._sock, socket_path, trusted)
            versions = list(SUPPORTED_MAJORS)
            try:
                self.server_info = self.hello(
                    versions=versions, client=client_name, minor=CLIENT_MINOR
                )
            except CommandError as exc:
                if exc.code != ErrorCode.INVALID_ARGUMENTS:
                    raise
                # a server before 1.8 knows no ``minor``; it stays in the handshake
                self.server_info = self.hello(versions=versions, client=client_name)
            self._proto.set_max_frame_size(adopted_frame_size(self.server_info, own_limit))
            if events:
                self.subscribe(events=list(events))
        except BaseException:
            self._sock.close()
            raise

    @property
    def protocol_version(self) -> str:
        return self.server_info["protocol"]

    @property
    def supports_ordered(self) -> bool:
        """Whether the connection speaks ordered chains and server timings (1.8)."""
        return minor_of(self.server_info) >= CHAINS_MINOR

    def add_reply_observer(self, observer: ReplyObserver) -> Callable[[], None]:
        """Call ``observer(command, timing)`` with the server's timing of every reply to a
        call of this client that carries one (protocol 1.8), as it is read. Returns a
        function that removes it."""
        return self._observers.add(observer)

    def add_progress_observer(self, observer: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``observer(event)`` with every ``progress`` event of this client's calls
        that no call's own ``on_progress`` takes (subscribe to ``progress`` first), as it
        is read; those events are then not kept for :meth:`next_event`. What it raises is
        logged and dropped. Returns a function that removes it."""
        self._progress_observers.append(observer)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._progress_observers.remove(observer)

        return remove

    def _keep_event(self, event: Event) -> None:
        """An event no call took: to the progress observers, or kept for next_event."""
        if self._progress_observers and progress_request(event) is not None:
            for observer in list(self._progress_observers):
                try:
                    observer(event)
                except Exception:
                    import logging  # on an observer's bug only

                    logging.getLogger("vmipc.client").exception("a progress observer failed")
            return
        self._events.add(event)

    def send_ordered(self, calls: Sequence[Call]) -> list[SyncOrderedCall]:
        """Send ``calls`` as one ordered chain (protocol 1.8), every frame before any
        reply is read; a handle per call, in order (see the async client's)."""
        if self._closed is not None:
            raise self._closed
        if not self.supports_ordered:
            raise chain_unsupported(self.protocol_version)
        chain = self._next_chain
        self._next_chain = (self._next_chain + 1) % (MAX_ID + 1)
        frames = []
        handles = []
        for call in calls:
            names, numbers = split_fds(call.fds)
            rid, frame = self._proto.send_request(call.command, call.args, names, chain)
            frames.append((frame, numbers))
            handles.append(SyncOrderedCall(self, call.command, rid))
        for (frame, numbers), handle in zip(frames, handles, strict=True):
            self._send(frame, numbers)
            self._expected.add(handle.id)
        return handles

    def call_ordered(self, calls: Sequence[Call]) -> list[Any]:
        """:meth:`send_ordered`, then every result, in order; raises the first failure's
        CommandError once every reply has arrived."""
        results: list[Any] = []
        failure: CommandError | None = None
        for handle in self.send_ordered(calls):
            try:
                results.append(handle.result())
            except CommandError as exc:
                results.append(exc)
                failure = failure or exc
        if failure is not None:
            raise failure
        return results

    def _chained_result(self, rid: int, command: str) -> Any:
        while rid not in self._chained:
            if rid not in self._expected:
                raise ValueError(f"request {rid}'s result was taken already")
            self._fill()
        self._expected.discard(rid)
        return self._outcome(self._chained.pop(rid), command)

    def _outcome(self, message: Result | Error, command: str) -> Any:
        self._observers.notify(command, message.took)
        if isinstance(message, Result):
            return make_reply(message.result, message.took)
        exc = CommandError.from_info(message.error, command=command)
        exc.server = message.took
        raise exc

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed is None:
            self._closed = ClosedByUs("the client closed the connection")
        self._sock.close()

    def _fail(self, exc: ConnectionClosed) -> ConnectionClosed:
        if self._closed is None:
            self._closed = exc
        self._sock.close()
        return self._closed

    def call(
        self,
        command: str,
        /,
        *,
        fds: Mapping[str, FdLike] | None = None,
        on_progress: ProgressCallback | None = None,
        **args: Any,
    ) -> Any:
        """Send ``command`` with ``args`` (and ``fds`` by name); return its result."""
        if self._closed is not None:
            raise self._closed
        names, numbers = split_fds(fds)
        rid, frame = self._proto.send_request(command, args, names)
        subscribed = self._events.subscribed
        if command == "subscribe":
            # the server may send the new events before its answer
            self._events.subscribed = subscribed | requested_events(args)
        self._send(frame, numbers)
        while True:
            message = self._next_message()
            if isinstance(message, Event):
                if on_progress is not None and progress_request(message) == rid:
                    on_progress(message)
                else:
                    self._keep_event(message)
            elif message.id == rid:
                if command == "subscribe":
                    ok = isinstance(message, Result)
                    self._events.subscribed = requested_events(args) if ok else subscribed
                return self._outcome(message, command)

    def next_event(self) -> Event:
        """The next event (subscribe first); blocks up to the client's timeout."""
        while not self._events:
            message = self._next_message()
            if isinstance(message, Event):
                self._keep_event(message)
        return self._events.popleft()

    def _next_message(self) -> Result | Error | Event:
        while not self._inbox:
            self._fill()
        return self._inbox.popleft()

    def _fill(self) -> None:
        """Receive once; sort what came in."""
        for message in self._receive():
            if isinstance(message, Error) and message.id is None:
                self._connection_error = message.error  # the server closes next
            elif not isinstance(message, Event) and message.id in self._expected:
                self._chained[message.id] = message  # for its handle
            else:
                self._inbox.append(message)

    def _send(self, frame: bytes, fds: list[int]) -> None:
        view = memoryview(frame)
        try:
            if fds:
                sent = self._sock.sendmsg([view], scm_rights(fds))
                view = view[sent:]
            if view:
                self._sock.sendall(view)
        except TimeoutError:
            self._fail(ClosedByUs("timed out while sending"))
            raise
        except OSError as exc:
            if isinstance(exc, ConnectionError):  # EPIPE, ECONNRESET: the server closed
                self._read_last_words()
            raise self._fail(
                ClosedByPeer(f"sending failed: {exc.strerror}", self._connection_error)
            ) from None

    def _read_last_words(self) -> None:
        """After a send failed because the server closed: read what it sent before closing
        (a connection-level error says why) up to the end of the stream, for at most
        LAST_WORDS_TIMEOUT seconds and LAST_WORDS_LIMIT bytes. The words may be in the
        receive buffer already or, if the server stopped reading before it spoke, come
        a moment later."""
        deadline = time.monotonic() + LAST_WORDS_TIMEOUT
        budget = LAST_WORDS_LIMIT
        with contextlib.suppress(OSError, ProtocolError):  # TimeoutError is an OSError
            while budget > 0:
                self._sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                data = self._sock.recv(min(_RECV_SIZE, budget))
                if not data:
                    return
                budget -= len(data)
                for message in self._proto.receive_data(data):
                    if isinstance(message, Error) and message.id is None:
                        self._connection_error = message.error

    def _receive(self) -> list[Result | Error | Event]:
        if self._closed is not None:
            raise self._closed
        try:
            data = self._sock.recv(_RECV_SIZE)
        except TimeoutError:
            self._fail(ClosedByUs("timed out waiting for the server"))
            raise
        except OSError as exc:
            raise self._fail(
                ClosedByPeer(f"connection broken: {exc.strerror}", self._connection_error)
            ) from None
        try:
            if not data:
                self._proto.receive_eof()
                raise self._fail(
                    ClosedByPeer("the server closed the connection", self._connection_error)
                )
            return self._proto.receive_data(data)
        except ProtocolError as exc:
            self._fail(ClosedByUs(f"closed after the server broke the protocol: {exc}"))
            raise

"""The blocking client, for scripts: a plain socket around the same protocol core."""

from __future__ import annotations

import collections
import contextlib
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

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
from vmipc.client._generated import HelloResult, SyncCommands
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
        self.server_info: HelloResult = cast(HelloResult, {})
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(socket_path)
            check_server(self._sock, socket_path, trusted)
            self.server_info = self.hello(versions=list(SUPPORTED_MAJORS), client=client_name)
            self._proto.set_max_frame_size(adopted_frame_size(self.server_info, own_limit))
            if events:
                self.subscribe(events=list(events))
        except BaseException:
            self._sock.close()
            raise

    @property
    def protocol_version(self) -> str:
        return self.server_info["protocol"]

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
                    self._events.add(message)
            elif message.id == rid:
                if isinstance(message, Result):
                    if command == "subscribe":
                        self._events.subscribed = requested_events(args)
                    return message.result
                if command == "subscribe":
                    self._events.subscribed = subscribed
                raise CommandError.from_info(message.error, command=command)

    def next_event(self) -> Event:
        """The next event (subscribe first); blocks up to the client's timeout."""
        while not self._events:
            message = self._next_message()
            if isinstance(message, Event):
                self._events.add(message)
        return self._events.popleft()

    def _next_message(self) -> Result | Error | Event:
        while not self._inbox:
            for message in self._receive():
                if isinstance(message, Error) and message.id is None:
                    self._connection_error = message.error  # the server closes next
                else:
                    self._inbox.append(message)
        return self._inbox.popleft()

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

"""The two ends of a control connection as sans-I/O state machines (h11 style).

:class:`ServerProtocol` turns received bytes (and fds) into events -- a request ready to
run, a request refused with an error, a broken connection -- and turns results, errors
and events into bytes to send. :class:`ClientProtocol` does the converse. Neither does
any I/O: the caller moves the bytes and closes the fds the protocol hands back.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

from vmipc._record import record
from vmipc.protocol._errors import (
    ECHO_CHARS,
    ErrorCode,
    ErrorInfo,
    LocalProtocolError,
    RemoteProtocolError,
    echo,
    shorten,
)
from vmipc.protocol._framing import (
    DEFAULT_MAX_FDS,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_REQUEST_SIZE,
    HEADER,
    FrameDecoder,
    encode_frame,
)
from vmipc.protocol._messages import (
    MAX_ID,
    REPLY_DECODE_LIMITS,
    REQUEST_DECODE_LIMITS,
    DecodeLimits,
    Error,
    Event,
    Request,
    Result,
    ServerTiming,
    decode_message,
    encode_message,
)
from vmipc.protocol._schema import (
    CommandSpec,
    FdMismatch,
    Schema,
    ValidationError,
    check_value,
    match_fds,
    validate_args,
)

HELLO = "hello"
#: the minor version a connection speaks until its ``hello`` names a later one: what
#: the envelope of every version before 1.8 looked like (no ``chain``, no ``took``)
LEGACY_MINOR = 7
#: the first minor version with ordered chains (``chain``) and server timings (``took``)
CHAINS_MINOR = 8
#: an error reply's payload is at most this big. A safety net: the messages and details
#: the server builds repeat at most a bounded part of any input (``_errors.echo``), so
#: only a bug reaches it; then the error is cut down rather than not sent
MAX_ERROR_SIZE = 8192


@record
class Limits:
    """Per-connection limits the server enforces (and announces in ``hello``)."""

    #: the largest frame payload the server sends (and accepts, up to max_request_size)
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_fds_per_request: int = DEFAULT_MAX_FDS
    max_in_flight: int = 32
    #: the largest request frame payload the server accepts
    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE
    #: bounds on each object of a request's payload
    request_decode: DecodeLimits = REQUEST_DECODE_LIMITS


# --- server side ---------------------------------------------------------------------


class ServerState(enum.Enum):
    HANDSHAKE = "handshake"  # only hello is accepted
    READY = "ready"
    BROKEN = "broken"  # a framing error: send the connection-level error and close


@record
class RequestReceived:
    """A valid request to run. The receiver owns ``fds`` (name -> fd) from now on."""

    request: Request
    spec: CommandSpec
    args: dict[str, Any]
    fds: dict[str, int]


@record
class RequestRejected:
    """A request refused before it ran; answer with :meth:`ServerProtocol.send_error`.

    ``request_id`` is None when the message had no usable id (or a duplicate one).
    Its fds have already been moved to the discarded list.
    """

    request_id: int | None
    error: ErrorInfo
    #: the ordered chain the refused request named (1.8): the chain is broken
    chain: int | None = None


@record
class ConnectionBroken:
    """The byte stream is unusable (framing error) or ended inside a frame.

    When ``error`` is set, send it with :meth:`ServerProtocol.send_connection_error`
    (best effort) and close the connection.
    """

    error: ErrorInfo | None


@record
class InputEnded:
    """The peer ended its side of the stream cleanly, at a frame boundary (it may still
    read replies). Not ``vmipc.vmm.persist.PeerClosed``, a bulk fd's other end going
    away, nor the ``ConnectionClosed`` errors a client raises."""


ServerEvent = RequestReceived | RequestRejected | ConnectionBroken | InputEnded


@record(frozen=False)
class _InFlight:
    spec: CommandSpec


class ServerProtocol:
    """The server's end of one connection.

    Usage: call :meth:`receive_data` with each chunk from ``recvmsg()`` (and its fds),
    act on the events it returns, then close every fd from :meth:`take_discarded_fds`.
    Answer each :class:`RequestReceived` exactly once with :meth:`send_result` or
    :meth:`send_error`.
    """

    def __init__(self, schema: Schema, limits: Limits | None = None) -> None:
        self.schema = schema
        self.limits = limits or Limits()
        self.state = ServerState.HANDSHAKE
        self._decoder = FrameDecoder(
            min(self.limits.max_frame_size, self.limits.max_request_size),
            self.limits.max_fds_per_request,
        )
        self._in_flight: dict[int, _InFlight] = {}
        self._hello_id: int | None = None
        self._discarded: list[int] = []
        #: the minor version this connection speaks (its ``hello``'s ``minor``, at most
        #: the server's): from 1.8 on, requests may name a ``chain`` and replies say
        #: what they ``took``
        self.minor = LEGACY_MINOR

    @property
    def in_flight(self) -> frozenset[int]:
        return frozenset(self._in_flight)

    @property
    def chains(self) -> bool:
        """Whether this connection speaks ordered chains and server timings (1.8)."""
        return self.minor >= CHAINS_MINOR

    # receiving

    def receive_data(
        self, data: bytes, fds: Sequence[int] = (), *, fds_truncated: bool = False
    ) -> list[ServerEvent]:
        """:meth:`feed`, then the events of every whole frame (:meth:`next_event`)."""
        self.feed(data, fds, fds_truncated=fds_truncated)
        events: list[ServerEvent] = []
        while (event := self.next_event()) is not None:
            events.append(event)
        return events

    def feed(self, data: bytes, fds: Sequence[int] = (), *, fds_truncated: bool = False) -> None:
        """Add the bytes (and fds) of one ``recvmsg()``; decode nothing yet."""
        if self.state is ServerState.BROKEN:
            self._discarded.extend(fds)
            return
        self._decoder.feed(data, fds, fds_truncated=fds_truncated)

    def next_event(self) -> ServerEvent | None:
        """The event of the next whole frame fed, or None until more bytes arrive.

        Decodes at most one frame, so that a caller serving many connections can let the
        others run between frames (and stop taking requests while its replies pile up).
        """
        if self.state is ServerState.BROKEN:
            return None
        try:
            frame = self._decoder.next_frame()
        except RemoteProtocolError as exc:
            self.state = ServerState.BROKEN
            self._discarded.extend(self._decoder.release_fds())
            return ConnectionBroken(exc.info)
        finally:
            self._discarded.extend(self._decoder.take_discarded_fds())
        if frame is None:
            return None
        try:
            return self._handle_frame(frame.payload, frame.fds, frame.fds_truncated)
        except BaseException:
            # a bug in the checks: the frame's fds still come back to be closed
            self._discarded.extend(fd for fd in frame.fds if fd not in self._discarded)
            raise

    def receive_eof(self) -> list[ServerEvent]:
        """The peer shut its side. Returns InputEnded, or ConnectionBroken mid-frame."""
        if self.state is ServerState.BROKEN:
            return []
        try:
            self._decoder.feed_eof()
        except RemoteProtocolError:
            self.state = ServerState.BROKEN
            self._discarded.extend(self._decoder.release_fds())
            return [ConnectionBroken(None)]
        self._discarded.extend(self._decoder.release_fds())
        return [InputEnded()]

    def take_discarded_fds(self) -> list[int]:
        """Fds of refused requests, or that no request owns. Close them now."""
        fds, self._discarded = self._discarded, []
        return fds

    def release_fds(self) -> list[int]:
        """Every fd still held (for teardown). Close them."""
        return self.take_discarded_fds() + self._decoder.release_fds()

    def _reject(
        self,
        request_id: int | None,
        code: str,
        message: str,
        fds: list[int],
        chain: int | None = None,
        **details: Any,
    ) -> RequestRejected:
        self._discarded.extend(fds)
        return RequestRejected(request_id, ErrorInfo(code, message, details), chain)

    def _handle_frame(self, payload: bytes, fds: list[int], truncated: bool) -> ServerEvent:
        try:
            msg = decode_message(
                payload,
                allowed=frozenset({"request"}),
                limits=self.limits.request_decode,
                chains=self.chains,
            )
        except RemoteProtocolError as exc:
            rid = exc.details.get("id")
            chain = exc.details.get("chain")
            return self._reject(
                rid if isinstance(rid, int) else None,
                exc.code,
                exc.message,
                fds,
                chain if isinstance(chain, int) else None,
                problem=exc.message,
            )
        assert isinstance(msg, Request)
        rid = msg.id
        chain = msg.chain
        if rid in self._in_flight:
            # answered with a nil id (the id belongs to another request), yet its chain
            # still breaks: a request the client meant to be in it will not run
            return self._reject(
                None,
                ErrorCode.INVALID_MESSAGE,
                f"request id {rid} is already in flight",
                fds,
                chain,
                id=rid,
                problem="duplicate id",
            )
        if self.state is ServerState.HANDSHAKE:
            if msg.command != HELLO:
                return self._reject(
                    rid,
                    ErrorCode.HANDSHAKE_REQUIRED,
                    "send hello first and wait for its result",
                    fds,
                    chain,
                )
            if self._hello_id is not None:
                return self._reject(
                    rid, ErrorCode.HANDSHAKE_REQUIRED, "a hello is already in flight", fds, chain
                )
        elif msg.command == HELLO:
            return self._reject(
                rid, ErrorCode.HANDSHAKE_REQUIRED, "the handshake is already complete", fds, chain
            )
        if len(self._in_flight) >= self.limits.max_in_flight:
            return self._reject(
                rid,
                ErrorCode.LIMIT_EXCEEDED,
                f"more than {self.limits.max_in_flight} requests in flight",
                fds,
                chain,
                limit="max_in_flight",
                value=self.limits.max_in_flight,
            )
        spec = self.schema.commands.get(msg.command)
        if spec is None:
            return self._reject(
                rid,
                ErrorCode.UNKNOWN_COMMAND,
                f"unknown command {echo(msg.command)}",
                fds,
                chain,
                command=shorten(msg.command),
            )
        if truncated:
            return self._reject(
                rid,
                ErrorCode.LIMIT_EXCEEDED,
                f"more than {self.limits.max_fds_per_request} fds on one request",
                fds,
                chain,
                limit="max_fds_per_request",
                value=self.limits.max_fds_per_request,
            )
        try:
            index = match_fds(spec, msg.fds, len(fds))
        except FdMismatch as exc:
            details: dict[str, Any] = {"problem": exc.problem}
            if exc.fd is not None:
                details["fd"] = exc.fd
            return self._reject(rid, ErrorCode.INVALID_FDS, str(exc), fds, chain, **details)
        try:
            args = validate_args(spec, msg.args)
        except ValidationError as exc:
            return self._reject(
                rid,
                ErrorCode.INVALID_ARGUMENTS,
                str(exc),
                fds,
                chain,
                argument=exc.where,
                problem=exc.problem,
            )
        self._in_flight[rid] = _InFlight(spec)
        if spec.name == HELLO:
            self._hello_id = rid
        return RequestReceived(msg, spec, args, {name: fds[i] for name, i in index.items()})

    # sending

    def negotiated(self, minor: int) -> None:
        """The ``hello`` being answered named ``minor`` (already at most the server's):
        from its reply on, the connection speaks that minor version's envelope."""
        self.minor = max(LEGACY_MINOR, minor)

    def _took(self, took: ServerTiming | None) -> ServerTiming | None:
        # never to a connection that did not negotiate 1.8: its client refuses the key
        return took if self.chains else None

    def send_result(self, request_id: int, result: Any, took: ServerTiming | None = None) -> bytes:
        """Bytes answering ``request_id`` with ``result`` (and, on a 1.8 connection, the
        server's timing ``took``).

        Raises LocalProtocolError (and leaves the request in flight, so it can still be
        answered with an error) when the result does not match the command's schema or
        does not fit in a frame.
        """
        entry = self._in_flight.get(request_id)
        if entry is None:
            raise LocalProtocolError(
                ErrorCode.INTERNAL_ERROR, f"request {request_id} is not in flight"
            )
        try:
            check_value(entry.spec.result, result, "result")
        except ValidationError as exc:
            raise LocalProtocolError(
                ErrorCode.INTERNAL_ERROR,
                f"{entry.spec.name} produced a result that does not match its schema: {exc}",
            ) from None
        data = encode_frame(
            encode_message(Result(request_id, result, self._took(took))),
            self.limits.max_frame_size,
        )
        del self._in_flight[request_id]
        if request_id == self._hello_id:
            self._hello_id = None
            self.state = ServerState.READY
        return data

    def send_error(
        self, request_id: int | None, error: ErrorInfo, took: ServerTiming | None = None
    ) -> bytes:
        """Bytes answering ``request_id`` (or nobody, if None) with ``error`` (and, on a
        1.8 connection, the server's timing ``took``).

        Never raises: an error that does not encode, or not within
        :data:`MAX_ERROR_SIZE`, is sent cut down (its message shortened, only its short
        plain details kept), and if even that fails as a fixed frame that always fits.
        """
        data = _error_frame(
            request_id,
            error,
            min(MAX_ERROR_SIZE, self.limits.max_frame_size),
            self._took(took) if request_id is not None else None,
        )
        if request_id is not None:
            self._in_flight.pop(request_id, None)
            if request_id == self._hello_id:
                self._hello_id = None
        return data

    def send_connection_error(self, error: ErrorInfo) -> bytes:
        """Bytes of a connection-level error (null id); the caller closes afterwards."""
        return self.send_error(None, error)

    def send_event(self, name: str, data: Mapping[str, Any], time: float) -> bytes:
        """Bytes of event ``name``. LocalProtocolError if ``data`` does not match."""
        return encode_event(self.schema, name, data, time, self.limits.max_frame_size)


def _error_frame(
    request_id: int | None, error: ErrorInfo, limit: int, took: ServerTiming | None = None
) -> bytes:
    for info in (error, _cut_down(error)):
        try:
            payload = encode_message(Error(request_id, info, took))
        except Exception:  # anything in details that msgpack cannot take
            continue
        if len(payload) <= limit:
            return HEADER.pack(len(payload)) + payload
    # the last resort: a code, an id and a fixed line always encode, in a few dozen bytes
    code = error.code if isinstance(error.code, str) and len(error.code) <= 64 else "internal-error"
    last = ErrorInfo(code, "the server could not send this error in full")
    try:
        payload = encode_message(Error(request_id, last))
    except LocalProtocolError:  # an id msgpack cannot take (a bug): say it to nobody
        payload = encode_message(Error(None, last))
    return HEADER.pack(len(payload)) + payload


def _cut_down(error: ErrorInfo) -> ErrorInfo:
    """``error`` with a short message and only the details that are short and plain."""

    def plain(value: Any) -> bool:
        if value is None or isinstance(value, bool | int | float):
            return True
        return isinstance(value, str) and len(value) <= 2 * ECHO_CHARS

    details = {
        k: v
        for k, v in list(error.details.items())[:16]
        if isinstance(k, str) and len(k) <= ECHO_CHARS and plain(v)
    }
    return ErrorInfo(
        shorten(str(error.code), 64), shorten(str(error.message), 4 * ECHO_CHARS), details
    )


def encode_event(
    schema: Schema,
    name: str,
    data: Mapping[str, Any],
    time: float,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
) -> bytes:
    """The framed bytes of event ``name`` (the same for every connection).

    Raises LocalProtocolError when ``data`` does not match the event's schema.
    """
    spec = schema.events.get(name)
    if spec is None:
        raise LocalProtocolError(ErrorCode.INTERNAL_ERROR, f"unknown event {name!r}")
    try:
        check_value(spec.data, data, "data")
    except ValidationError as exc:
        raise LocalProtocolError(
            ErrorCode.INTERNAL_ERROR, f"event {name} does not match its schema: {exc}"
        ) from None
    return encode_frame(encode_message(Event(name, time, data)), max_frame_size)


# --- client side ---------------------------------------------------------------------


ClientEvent = Result | Error | Event


class ClientProtocol:
    """The client's end of one connection.

    :meth:`send_request` allocates an id and returns the bytes to send (the caller
    attaches the fds, in the order of ``fd_names``, to the first byte). Feed received
    bytes to :meth:`receive_data`; it returns results, errors and events, and raises
    :class:`RemoteProtocolError` when the server breaks the protocol.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._decoder = FrameDecoder(max_frame_size, 0)
        self._next_id = 0
        self._in_flight: dict[int, str] = {}

    @property
    def in_flight(self) -> Mapping[int, str]:
        """Request id -> command, for requests not answered yet."""
        return dict(self._in_flight)

    def command_of(self, request_id: int) -> str | None:
        return self._in_flight.get(request_id)

    def set_max_frame_size(self, size: int) -> None:
        """Adopt the server's announced frame limit (from ``hello``)."""
        self.max_frame_size = size
        self._decoder.max_frame_size = size

    def send_request(
        self,
        command: str,
        args: Mapping[str, Any] | None = None,
        fd_names: Sequence[str] = (),
        chain: int | None = None,
    ) -> tuple[int, bytes]:
        """A new request's id and bytes; ``chain``: the ordered chain it belongs to (1.8,
        only to a server that negotiated it)."""
        request_id = self._next_id
        self._next_id = (self._next_id + 1) % (MAX_ID + 1)
        data = encode_frame(
            encode_message(Request(request_id, command, dict(args or {}), tuple(fd_names), chain)),
            self.max_frame_size,
        )
        self._in_flight[request_id] = command
        return request_id, data

    def receive_data(self, data: bytes) -> list[ClientEvent]:
        self._decoder.feed(data)
        out: list[ClientEvent] = []
        while (frame := self._decoder.next_frame()) is not None:
            msg = decode_message(
                frame.payload,
                allowed=frozenset({"result", "error", "event"}),
                limits=REPLY_DECODE_LIMITS,
            )
            if isinstance(msg, Result | Error) and msg.id is not None:
                if msg.id not in self._in_flight:
                    raise RemoteProtocolError(
                        ErrorCode.INVALID_MESSAGE,
                        f"reply to request {msg.id}, which is not in flight",
                    )
                del self._in_flight[msg.id]
            assert not isinstance(msg, Request)
            out.append(msg)
        return out

    def receive_eof(self) -> None:
        """The server closed. RemoteProtocolError if it closed inside a frame."""
        self._decoder.feed_eof()

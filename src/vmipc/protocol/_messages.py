"""The four messages of the control protocol and their msgpack encoding.

Every frame's payload is one msgpack map with a ``type`` key:

* ``request`` (client to server): ``id``, ``command``, ``args`` (map, may be omitted),
  ``fds`` (list of fd names in the order of the fds attached to the frame, may be
  omitted), ``chain`` (1.8, the ordered chain the request belongs to, may be omitted);
* ``result`` (server to client): ``id``, ``result``, ``took`` (1.8, optional);
* ``error`` (server to client): ``id`` (null for a connection-level error), ``code``,
  ``message``, ``details`` (map), ``took`` (1.8, optional);
* ``event`` (server to client): ``event``, ``time`` (seconds since the epoch),
  ``data`` (map).

``chain`` and ``took`` exist only on a connection that negotiated 1.8 or later: the
server decodes requests with ``chain`` allowed only then, and sends ``took`` only then
(older clients refuse keys they do not know).

Decoding checks the shape strictly (no unknown keys, right types) and raises
:class:`RemoteProtocolError` with code ``invalid-message``; the error carries the
request id in ``details["id"]`` when one could be read, so the server can answer it.
Its message repeats at most a bounded part of the payload (see ``_errors.echo``).

Decoding takes :class:`DecodeLimits`: msgpack's per-object bounds, checked from each
object's header before the object is built. What a payload can cost to decode is bounded
by its size (every object takes at least a byte) together with these bounds (no single
array or map takes the whole payload). The server decodes requests with
:data:`REQUEST_DECODE_LIMITS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack  # type: ignore[import-untyped]

from vmipc._record import field, record
from vmipc.errors import VmipcError
from vmipc.protocol._errors import (
    ECHO_ITEMS,
    ErrorCode,
    ErrorInfo,
    LocalProtocolError,
    RemoteProtocolError,
    echo,
    shorten,
)

#: request ids are integers in [0, MAX_ID]; the bound keeps them exact in JSON and doubles
MAX_ID = 2**53 - 1


@record
class DecodeLimits:
    """Bounds on each msgpack object of a payload, checked before the object is built:
    characters of a string, bytes of a bin, items of an array, entries of a map, bytes of
    an extension type. None leaves the bound to msgpack (the payload's size)."""

    max_str_len: int | None = None
    max_bin_len: int | None = None
    max_array_len: int | None = None
    max_map_len: int | None = None
    max_ext_len: int | None = None
    #: arrays and maps in the whole payload: per-container bounds do not bound how many
    #: containers there are, and one byte (an empty array or map) decodes into a ~70-byte
    #: object, so a 1 MiB payload could otherwise cost ~70 MiB
    max_containers: int | None = None

    def kwargs(self) -> dict[str, int]:
        """The bounds as ``msgpack.unpackb`` keyword arguments."""
        names = ("max_str_len", "max_bin_len", "max_array_len", "max_map_len", "max_ext_len")
        return {n: v for n in names if (v := getattr(self, n)) is not None}


#: What a request can legitimately hold, from the schema: a map of at most five keys, an
#: ``args`` map of a command's few arguments, lists of protocol versions, event names or
#: fd names, and short strings (names, and ``hello``'s free-form client name). The bounds
#: are generous for that and refuse, from its header, an array or map that is not a
#: request's. Bytes are left to the frame's size (no command takes large ones; the test
#: commands take some); extension types are never part of a request.
REQUEST_DECODE_LIMITS = DecodeLimits(
    max_str_len=1024, max_array_len=64, max_map_len=64, max_ext_len=0
)
#: What a reply or event can legitimately hold: the largest, ``query-commands``, has a few
#: thousand containers. A frame is already bounded in bytes (the client's own limit); this
#: bounds what its bytes may decode into (at most ~4 MiB of containers).
REPLY_DECODE_LIMITS = DecodeLimits(max_containers=1 << 16)


class _ContainerBudget(VmipcError):
    """Raised inside the decoder's hooks to stop it; becomes an ``invalid-message``."""


def _container_hooks(budget: int) -> dict[str, Any]:
    """msgpack hooks that count arrays and maps as they are built, and stop the decoding
    (cheaply: at most ``budget`` of them were built) when there are too many."""
    left = [budget]

    def counted(obj: Any) -> Any:
        left[0] -= 1
        if left[0] < 0:
            raise _ContainerBudget
        return obj

    return {"list_hook": counted, "object_hook": counted}


@record
class ServerTiming:
    """What a 1.8 server says a request cost it (a reply's ``took``), in seconds:
    ``queued`` from its arrival until its handler began (admission, who goes first, the
    machine lock, its ordered chain's earlier requests), ``ran`` its handler's run."""

    queued: float
    ran: float

    def as_wire(self) -> dict[str, float]:
        return {"queued": self.queued, "ran": self.ran}


@record
class Request:
    id: int
    command: str
    args: Mapping[str, Any] = field(default_factory=dict)
    fds: tuple[str, ...] = ()
    #: the ordered chain this request belongs to (1.8), or None
    chain: int | None = None


@record
class Result:
    id: int
    result: Any
    took: ServerTiming | None = None


@record
class Error:
    id: int | None
    error: ErrorInfo
    took: ServerTiming | None = None


@record
class Event:
    event: str
    time: float
    data: Mapping[str, Any] = field(default_factory=dict)


Message = Request | Result | Error | Event


def pack(obj: Any) -> bytes:
    """msgpack-encode ``obj`` (str as str, bytes as bin). LocalProtocolError if it can't."""
    try:
        data: bytes = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(
            ErrorCode.INVALID_MESSAGE, f"cannot encode message: {exc}"
        ) from None
    return data


def unpack(payload: bytes, limits: DecodeLimits | None = None) -> Any:
    """msgpack-decode one whole object. RemoteProtocolError (invalid-message) if it can't,
    or if an object in it is over one of ``limits``."""
    hooks = {}
    if limits is not None and limits.max_containers is not None:
        hooks = _container_hooks(limits.max_containers)
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            **(limits.kwargs() if limits is not None else {}),
            **hooks,
        )
    except _ContainerBudget:
        assert limits is not None
        raise RemoteProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"payload is over a decoding limit: more than {limits.max_containers} arrays and maps",
        ) from None
    except Exception as exc:  # msgpack raises a zoo: ExtraData, FormatError, ValueError...
        text = str(exc)
        if isinstance(exc, ValueError) and " exceeds max_" in text:
            # msgpack's own words, e.g. "1000 exceeds max_array_len(64)": short and exact
            raise RemoteProtocolError(
                ErrorCode.INVALID_MESSAGE, f"payload is over a decoding limit: {shorten(text)}"
            ) from None
        raise RemoteProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"payload is not one valid msgpack object ({type(exc).__name__})",
        ) from None


def encode_message(message: Message) -> bytes:
    """The payload (not yet framed) for ``message``."""
    obj: dict[str, Any]
    if isinstance(message, Request):
        obj = {"type": "request", "id": message.id, "command": message.command}
        if message.args:
            obj["args"] = dict(message.args)
        if message.fds:
            obj["fds"] = list(message.fds)
        if message.chain is not None:
            obj["chain"] = message.chain
    elif isinstance(message, Result):
        obj = {"type": "result", "id": message.id, "result": message.result}
        if message.took is not None:
            obj["took"] = message.took.as_wire()
    elif isinstance(message, Error):
        obj = {
            "type": "error",
            "id": message.id,
            "code": message.error.code,
            "message": message.error.message,
            "details": dict(message.error.details),
        }
        if message.took is not None:
            obj["took"] = message.took.as_wire()
    else:
        obj = {
            "type": "event",
            "event": message.event,
            "time": message.time,
            "data": dict(message.data),
        }
    return pack(obj)


_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # type: (required keys, optional keys)
    "request": (frozenset({"type", "id", "command"}), frozenset({"args", "fds"})),
    "result": (frozenset({"type", "id", "result"}), frozenset({"took"})),
    "error": (frozenset({"type", "id", "code", "message"}), frozenset({"details", "took"})),
    "event": (frozenset({"type", "event", "time"}), frozenset({"data"})),
}


def _bad(
    problem: str, request_id: int | None = None, chain: int | None = None
) -> RemoteProtocolError:
    details: dict[str, Any] = {"problem": problem}
    if request_id is not None:
        details["id"] = request_id
    if chain is not None:
        # a refused request of an ordered chain breaks the chain (the server must know it)
        details["chain"] = chain
    return RemoteProtocolError(ErrorCode.INVALID_MESSAGE, problem, details)


def _took(value: Any) -> ServerTiming:
    """A reply's ``took``: exactly ``queued`` and ``ran``, numbers of seconds >= 0."""
    if not isinstance(value, dict) or set(value) != {"queued", "ran"}:
        raise _bad("took must be a map of queued and ran")
    numbers = []
    for key in ("queued", "ran"):
        number = value[key]
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise _bad(f"took.{key} must be a number")
        if not 0 <= number < float("inf"):
            raise _bad(f"took.{key} must be a finite number of seconds, at least 0")
        numbers.append(float(number))
    return ServerTiming(numbers[0], numbers[1])


def _is_id(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_ID


def decode_message(
    payload: bytes,
    *,
    allowed: frozenset[str] | None = None,
    limits: DecodeLimits | None = None,
    chains: bool = False,
) -> Message:
    """Decode and shape-check one payload. ``allowed`` limits the acceptable types;
    ``limits`` bounds each object of the payload (see :class:`DecodeLimits`); ``chains``
    allows a request's ``chain`` key (a connection of protocol 1.8 or later)."""
    obj = unpack(payload, limits)
    if not isinstance(obj, dict):
        raise _bad(f"a message must be a map, not {type(obj).__name__}")
    rid = obj.get("id")
    request_id = rid if _is_id(rid) else None
    raw_chain = obj.get("chain") if chains else None
    chain = raw_chain if _is_id(raw_chain) else None
    mtype = obj.get("type")
    if not isinstance(mtype, str) or mtype not in _KEYS:
        raise _bad(f"unknown message type {echo(mtype)}", request_id)
    if allowed is not None and mtype not in allowed:
        raise _bad(f"a {mtype!r} message is not expected here", request_id)
    required, optional = _KEYS[mtype]
    if mtype == "request" and chains:
        optional = optional | {"chain"}
    else:
        chain = None
    missing = required - obj.keys()
    if missing:
        raise _bad(f"{mtype} is missing {', '.join(sorted(missing))}", request_id, chain)
    extra = obj.keys() - required - optional
    if extra:
        names = [shorten(str(k)) for k in sorted(extra, key=str)[:ECHO_ITEMS]]
        more = f" and {len(extra) - len(names)} more" if len(extra) > len(names) else ""
        raise _bad(f"{mtype} has unknown keys {', '.join(names)}{more}", request_id, chain)

    if mtype == "request":
        if request_id is None:
            raise _bad(f"request id must be an integer in [0, 2**53), not {echo(rid)}")
        if "chain" in obj and chain is None:
            raise _bad(
                f"request chain must be an integer in [0, 2**53), not {echo(raw_chain)}",
                request_id,
            )
        command = obj["command"]
        if not isinstance(command, str) or not command:
            raise _bad("request command must be a non-empty string", request_id, chain)
        args = obj.get("args", {})
        if not isinstance(args, dict):
            raise _bad("request args must be a map", request_id, chain)
        fds = obj.get("fds", [])
        if not isinstance(fds, list) or not all(isinstance(n, str) for n in fds):
            raise _bad("request fds must be a list of fd names", request_id, chain)
        return Request(request_id, command, args, tuple(fds), chain)
    took = _took(obj["took"]) if "took" in obj else None
    if mtype == "result":
        if request_id is None:
            raise _bad(f"result id must be an integer in [0, 2**53), not {echo(rid)}")
        return Result(request_id, obj["result"], took)
    if mtype == "error":
        if rid is not None and request_id is None:
            raise _bad(f"error id must be null or a request id, not {echo(rid)}")
        code, message = obj["code"], obj["message"]
        details = obj.get("details", {})
        if not isinstance(code, str) or not isinstance(message, str):
            raise _bad("error code and message must be strings")
        if not isinstance(details, dict):
            raise _bad("error details must be a map")
        return Error(request_id, ErrorInfo(code, message, details), took)
    name, time, data = obj["event"], obj["time"], obj.get("data", {})
    if not isinstance(name, str) or not isinstance(time, int | float) or isinstance(time, bool):
        raise _bad("event name must be a string and time a number")
    if not isinstance(data, dict):
        raise _bad("event data must be a map")
    return Event(name, float(time), data)

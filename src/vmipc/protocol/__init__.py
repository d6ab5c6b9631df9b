"""The sans-I/O core of the control protocol: framing, messages, schema, validation.

Nothing here does I/O: no trio, no sockets, no ``os`` calls. Bytes and fd numbers go in,
events come out; events go in, bytes come out. The spec is ``protocol/README.md`` at the
top of the repository.
"""

from __future__ import annotations

from collections.abc import Iterable

from vmipc._util import fixup_module_metadata
from vmipc.errors import VmipcError
from vmipc.protocol._connection import (
    CHAINS_MINOR,
    HELLO,
    LEGACY_MINOR,
    MAX_ERROR_SIZE,
    ClientEvent,
    ClientProtocol,
    ConnectionBroken,
    InputEnded,
    Limits,
    RequestReceived,
    RequestRejected,
    ServerEvent,
    ServerProtocol,
    ServerState,
    encode_event,
)
from vmipc.protocol._errors import (
    ECHO_ITEMS,
    ClosedByPeer,
    ClosedByUs,
    CommandError,
    ConnectionClosed,
    ErrorCode,
    ErrorInfo,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    UntrustedServer,
    echo,
    shorten,
)
from vmipc.protocol._framing import (
    DEFAULT_MAX_FDS,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_REQUEST_SIZE,
    HEADER_SIZE,
    Frame,
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
    Message,
    Request,
    Result,
    ServerTiming,
    decode_message,
    encode_message,
    pack,
    unpack,
)
from vmipc.protocol._schema import (
    CommandSpec,
    ErrorSpec,
    EventSpec,
    FdMismatch,
    FdSpec,
    FieldSpec,
    Schema,
    SchemaError,
    StateSpec,
    TypeSpec,
    ValidationError,
    check_value,
    load_schema,
    match_fds,
    parse_version,
    validate_args,
)

#: the protocol major versions this package speaks
SUPPORTED_MAJORS: tuple[int, ...] = (1,)


def negotiate_version(offered: Iterable[int], schema: Schema) -> str | None:
    """The version to speak: the schema's, if its major is among ``offered``, else None."""
    return schema.version if schema.major in set(offered) else None


def negotiate_minor(server_version: str, client_minor: int | None) -> int:
    """The minor version a connection speaks: the lower of the client's (``hello``'s
    ``minor``, 1.8) and the server's; :data:`LEGACY_MINOR` when the client named none."""
    if client_minor is None:
        return LEGACY_MINOR
    return min(client_minor, parse_version(server_version)[1])


__all__ = [
    "CHAINS_MINOR",
    "DEFAULT_MAX_FDS",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_REQUEST_SIZE",
    "ECHO_ITEMS",
    "HEADER_SIZE",
    "HELLO",
    "LEGACY_MINOR",
    "MAX_ERROR_SIZE",
    "MAX_ID",
    "REPLY_DECODE_LIMITS",
    "REQUEST_DECODE_LIMITS",
    "SUPPORTED_MAJORS",
    "ClientEvent",
    "ClientProtocol",
    "ClosedByPeer",
    "ClosedByUs",
    "CommandError",
    "CommandSpec",
    "ConnectionBroken",
    "ConnectionClosed",
    "DecodeLimits",
    "Error",
    "ErrorCode",
    "ErrorInfo",
    "ErrorSpec",
    "Event",
    "EventSpec",
    "FdMismatch",
    "FdSpec",
    "FieldSpec",
    "Frame",
    "FrameDecoder",
    "InputEnded",
    "Limits",
    "LocalProtocolError",
    "Message",
    "ProtocolError",
    "RemoteProtocolError",
    "Request",
    "RequestReceived",
    "RequestRejected",
    "Result",
    "Schema",
    "SchemaError",
    "ServerEvent",
    "ServerProtocol",
    "ServerState",
    "ServerTiming",
    "StateSpec",
    "TypeSpec",
    "UntrustedServer",
    "ValidationError",
    "VmipcError",
    "check_value",
    "decode_message",
    "echo",
    "encode_event",
    "encode_frame",
    "encode_message",
    "load_schema",
    "match_fds",
    "negotiate_minor",
    "negotiate_version",
    "pack",
    "parse_version",
    "shorten",
    "unpack",
    "validate_args",
]

fixup_module_metadata(__name__, globals())

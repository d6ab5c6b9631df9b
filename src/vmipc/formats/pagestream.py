"""The page stream: self-delimiting records of guest-physical page runs (sans-I/O).

The byte layout is specified in ``protocol/page-stream.md``; in short::

    stream header   magic "VMIPCPGS", major, minor, page size, RAM layout, checksum
    round 0         DATA(gpa, npages) + npages * page_size bytes | ZERO(gpa, npages) ...
                    END_OF_ROUND(0, xxh3_64 of every byte of the round)
    round 1 ...     (later rounds overwrite earlier ones: pre-copy migration)
    END_OF_STREAM(number of rounds)

Encoding side (the VMM): the pure functions :func:`stream_header`, :func:`data_record_header`,
:func:`zero_record`, :func:`end_of_round`, :func:`end_of_stream` give the bytes of each
record; :class:`PageStreamEncoder` wraps them with the layout checks and the running round
checksum. A data record's payload never passes through this module: the caller writes the
header bytes, sends the pages itself (``os.sendfile`` from the memfd) and hands the same
bytes to :meth:`PageStreamEncoder.payload` as memoryviews for the checksum.

Decoding side (the receiver): :class:`PageStreamDecoder`, h11 style -- ``feed(bytes)``, then
``next_event()`` until it returns :data:`NEED_DATA`.

Helpers: :func:`bitmap_to_runs` turns a KVM dirty bitmap into page runs and
:func:`split_zero_runs` splits runs into data and all-zero runs.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, NamedTuple

from vmipc.formats._common import (
    ZERO_CHUNK_SIZE,
    ZEROS,
    BytesLike,
    Checksum,
    checksum,
    is_power_of_two,
    version_problem,
)
from vmipc.formats.errors import PageStreamError

__all__ = [
    "DEFAULT_MAX_CHUNK",
    "FLAG_PAYLOAD_UNHASHED",
    "MAGIC",
    "MAJOR",
    "MAX_HEADER_LENGTH",
    "MAX_RANGES",
    "MINOR",
    "NEED_DATA",
    "PAGE_SIZE",
    "RECORD_SIZE",
    "DataRun",
    "Event",
    "NeedData",
    "PageRun",
    "PageStreamDecoder",
    "PageStreamEncoder",
    "RecordType",
    "RoundEnd",
    "StreamEnd",
    "StreamHeader",
    "ZeroRun",
    "bitmap_to_runs",
    "data_record_header",
    "end_of_round",
    "end_of_stream",
    "runs_to_bitmap",
    "split_zero_runs",
    "stream_header",
    "validate_layout",
    "zero_record",
]

MAGIC: Final = b"VMIPCPGS"
#: the format version this module writes and the newest it reads
MAJOR: Final = 1
MINOR: Final = 1
#: header flag (1.1): the round checksums cover the record headers only, not the data
#: payloads -- for a channel whose both ends the receiver's client made (a local socket
#: pair), where the kernel moves the bytes exactly and a hash would protect nothing. A
#: stream without flags is written as 1.0, so that every reader of 1.0 still reads it
FLAG_PAYLOAD_UNHASHED: Final = 1
#: the header flags each minor defines
_KNOWN_FLAGS = {0: 0, 1: FLAG_PAYLOAD_UNHASHED}
PAGE_SIZE: Final = 4096
MIN_PAGE_SIZE: Final = 4096
MAX_PAGE_SIZE: Final = 1 << 30
#: at most this many RAM ranges in a layout
MAX_RANGES: Final = 64
#: the stream header's length field may not exceed this (any major version)
MAX_HEADER_LENGTH: Final = 65536
#: a data run's payload is delivered in chunks of at most this many bytes by default
DEFAULT_MAX_CHUNK: Final = 1 << 20

# Stream header: frozen prefix (never changes across majors) + the v1 body + checksum.
_PREFIX = struct.Struct("<8sHHI")  # magic, major, minor, header length
_HEADER_V1 = struct.Struct("<8sHHIIII4x")  # ... page size, flags, range count, reserved
_RANGE = struct.Struct("<QQ")  # gpa, size
_U64 = struct.Struct("<Q")
_HEADER_CHECKSUM_SIZE = 8

#: every record starts with a header of this many bytes
RECORD_SIZE: Final = 32
_RECORD_BODY = struct.Struct("<BBHIQQI")  # type, flags, reserved, npages, arg0, arg1, reserved
_RECORD = struct.Struct("<BBHIQQII")  # ... + check
_MAX_U32 = (1 << 32) - 1
_MAX_U64 = (1 << 64) - 1


class RecordType(IntEnum):
    DATA = 1
    ZERO = 2
    END_OF_ROUND = 3
    END_OF_STREAM = 4


Layout = tuple[tuple[int, int], ...]


# -- events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamHeader:
    """The stream's first event: its version, page size and RAM layout ((gpa, size) ranges).

    ``flags``: the header's flags (1.1: :data:`FLAG_PAYLOAD_UNHASHED`)."""

    major: int
    minor: int
    page_size: int
    layout: Layout
    flags: int = 0

    @property
    def payload_hashed(self) -> bool:
        """Whether the round checksums cover the data payloads (not for 1.1's flag)."""
        return not self.flags & FLAG_PAYLOAD_UNHASHED


@dataclass(frozen=True)
class DataRun:
    """Page contents for guest-physical ``gpa`` onwards (``len(data)`` bytes).

    A data record's payload arrives as one or more DataRuns with ascending ``gpa``; a
    chunk need not be a whole number of pages (``gpa`` of a later chunk may be unaligned).
    The bytes are not verified until the round's :class:`RoundEnd` (and in a stream whose
    payloads are not hashed, 1.1, never: only their place and length are).
    """

    gpa: int
    data: bytes


@dataclass(frozen=True)
class ZeroRun:
    """``npages`` pages from guest-physical ``gpa`` are all zeros."""

    gpa: int
    npages: int


@dataclass(frozen=True)
class RoundEnd:
    """Round ``round`` ended; ``ok`` says its checksum matched every byte of the round.

    ``ok`` is False only from a decoder made with ``strict=False``; a strict decoder raises
    :class:`~vmipc.formats.errors.PageStreamError` (a checksum mismatch) instead.
    """

    round: int
    checksum: int
    ok: bool = True


@dataclass(frozen=True)
class StreamEnd:
    """The stream ended cleanly after ``rounds`` rounds, all verified."""

    rounds: int


class NeedData:
    """The type of :data:`NEED_DATA`: feed more bytes (or EOF) before the next event."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()

Event = StreamHeader | DataRun | ZeroRun | RoundEnd | StreamEnd


# -- layout --------------------------------------------------------------------------------


def validate_layout(layout: Iterable[tuple[int, int]], page_size: int) -> Layout | str:
    """The layout as a tuple, or a one-line reason why it is not a valid layout.

    Valid: 1..MAX_RANGES ranges, each page-aligned with a non-zero page-multiple size,
    sorted by address and not overlapping, ending at or below 2**64.
    """
    if not (is_power_of_two(page_size) and MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE):
        return f"page size {page_size} is not a power of two in 4096 .. 1 GiB"
    ranges = tuple((int(gpa), int(size)) for gpa, size in layout)
    if not 1 <= len(ranges) <= MAX_RANGES:
        return f"{len(ranges)} RAM ranges (1 .. {MAX_RANGES} allowed)"
    previous_end = 0
    for gpa, size in ranges:
        if gpa < 0 or size <= 0 or gpa % page_size or size % page_size:
            return f"RAM range {gpa:#x}+{size:#x} is empty or not aligned to {page_size}"
        if gpa < previous_end:
            return f"RAM range {gpa:#x}+{size:#x} overlaps or is out of order"
        if gpa + size > 1 << 64:
            return f"RAM range {gpa:#x}+{size:#x} ends above 2**64"
        previous_end = gpa + size
    return ranges


def _format_layout(layout: Layout) -> str:
    return ", ".join(f"{gpa:#x}+{size:#x}" for gpa, size in layout)


class _RangeIndex:
    """Which RAM range holds a page run (a bisect over the range starts)."""

    def __init__(self, layout: Layout) -> None:
        self._starts = [gpa for gpa, _ in layout]
        self._layout = layout

    def contains(self, gpa: int, length: int) -> bool:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0:
            return False
        start, size = self._layout[i]
        return gpa + length <= start + size


# -- encoding: pure functions --------------------------------------------------------------


def stream_header(
    layout: Iterable[tuple[int, int]],
    page_size: int = PAGE_SIZE,
    *,
    flags: int = 0,
    version: tuple[int, int] | None = None,
) -> bytes:
    """The stream header for RAM ``layout`` ((gpa, size) ranges) with ``flags``.

    The version is the oldest that defines the flags: 1.0 without any, 1.1 with
    :data:`FLAG_PAYLOAD_UNHASHED`. ``version`` overrides it, and then any flags go (tests)."""
    checked = validate_layout(layout, page_size)
    if isinstance(checked, str):
        raise ValueError(checked)
    if version is None:
        if flags & ~_KNOWN_FLAGS[MINOR]:
            raise ValueError(f"unknown page stream flags {flags:#x}")
        version = (MAJOR, 1 if flags else 0)
    length = _HEADER_V1.size + _RANGE.size * len(checked) + _HEADER_CHECKSUM_SIZE
    body = _HEADER_V1.pack(MAGIC, *version, length, page_size, flags, len(checked))
    body += b"".join(_RANGE.pack(gpa, size) for gpa, size in checked)
    return body + _U64.pack(checksum(body))


def _record(kind: RecordType, npages: int, arg0: int, arg1: int) -> bytes:
    body = _RECORD_BODY.pack(kind, 0, 0, npages, arg0, arg1, 0)
    return body + (checksum(body) & _MAX_U32).to_bytes(4, "little")


def _check_run(gpa: int, npages: int) -> None:
    if not 1 <= npages <= _MAX_U32:
        raise ValueError(f"a run has 1 .. {_MAX_U32} pages, not {npages}")
    if not 0 <= gpa <= _MAX_U64:
        raise ValueError(f"guest-physical address {gpa:#x} out of range")


def data_record_header(gpa: int, npages: int) -> bytes:
    """The 32-byte header of a DATA record; ``npages * page_size`` payload bytes follow."""
    _check_run(gpa, npages)
    return _record(RecordType.DATA, npages, gpa, 0)


def zero_record(gpa: int, npages: int) -> bytes:
    """A ZERO record: ``npages`` pages from ``gpa`` are zeros (no payload)."""
    _check_run(gpa, npages)
    return _record(RecordType.ZERO, npages, gpa, 0)


def end_of_round(round: int, round_checksum: int) -> bytes:
    """END_OF_ROUND: ``round_checksum`` is xxh3_64 of every byte since the previous
    END_OF_ROUND (or since the stream header): record headers and payloads (record headers
    only in a stream flagged :data:`FLAG_PAYLOAD_UNHASHED`)."""
    return _record(RecordType.END_OF_ROUND, 0, round, round_checksum)


def end_of_stream(rounds: int) -> bytes:
    """END_OF_STREAM after ``rounds`` rounds; only allowed right after an END_OF_ROUND."""
    return _record(RecordType.END_OF_STREAM, 0, rounds, 0)


# -- encoding: the checked, checksumming encoder -------------------------------------------


class PageStreamEncoder:
    """Produces a page stream's bytes, checking runs against the layout and keeping the
    running round checksum.

    Usage (the VMM side)::

        enc = PageStreamEncoder(memory.ram_ranges())
        out.write(enc.header())
        for gpa, npages, view in runs:            # view: memoryview of those pages
            out.write(enc.data(gpa, npages))      # the record header ...
            os.sendfile(out_fd, memfd, offset, npages * PAGE_SIZE)  # ... payload, zero-copy
            enc.payload(view)                     # ... and the same bytes for the checksum
        out.write(enc.zero(gpa, npages))
        out.write(enc.end_round())
        out.write(enc.end_stream())

    The checksum must cover the bytes actually sent: hash and send pages only while the
    guest is paused, or copy them first (see protocol/page-stream.md, "Sending"). Misuse
    (a run outside RAM, a payload of the wrong size, records out of order) raises
    ValueError.

    ``hash_payload=False`` writes a 1.1 stream flagged :data:`FLAG_PAYLOAD_UNHASHED`: the
    round checksums cover the record headers only, :meth:`payload` only counts the bytes
    (and a running guest's pages need no copy), and only a receiver told to accept such
    a stream takes it.
    """

    def __init__(
        self,
        layout: Iterable[tuple[int, int]],
        *,
        page_size: int = PAGE_SIZE,
        hash_payload: bool = True,
    ) -> None:
        checked = validate_layout(layout, page_size)
        if isinstance(checked, str):
            raise ValueError(checked)
        self.layout: Layout = checked
        self.page_size = page_size
        self.hash_payload = hash_payload
        self._index = _RangeIndex(checked)
        self._hash = Checksum()
        self._started = False
        self._ended = False
        self._records_in_round = 0
        self._pending = 0
        #: the number of the round being encoded (== rounds finished so far)
        self.round = 0

    @property
    def payload_pending(self) -> int:
        """Payload bytes of the current data record not yet handed to :meth:`payload`."""
        return self._pending

    def _next_record(self) -> None:
        if not self._started:
            raise ValueError("header() must come first")
        if self._ended:
            raise ValueError("the stream has ended")
        if self._pending:
            raise ValueError(f"{self._pending} payload bytes of the data record still pending")

    def _run(self, gpa: int, npages: int) -> None:
        self._next_record()
        _check_run(gpa, npages)
        if gpa % self.page_size or not self._index.contains(gpa, npages * self.page_size):
            raise ValueError(f"run {gpa:#x}+{npages} pages is not page-aligned RAM")

    def header(self) -> bytes:
        if self._started:
            raise ValueError("header() was already called")
        self._started = True
        flags = 0 if self.hash_payload else FLAG_PAYLOAD_UNHASHED
        return stream_header(self.layout, self.page_size, flags=flags)

    def data(self, gpa: int, npages: int) -> bytes:
        """The DATA record header; then send ``npages`` pages and call :meth:`payload`."""
        self._run(gpa, npages)
        record = data_record_header(gpa, npages)
        self._hash.update(record)
        self._records_in_round += 1
        self._pending = npages * self.page_size
        return record

    def payload(self, data: BytesLike) -> None:
        """Account for payload bytes of the current data record (any chunking)."""
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if size > self._pending:
            raise ValueError(f"{size} payload bytes given, {self._pending} expected")
        if self.hash_payload:
            self._hash.update(data)
        self._pending -= size

    def skip_payload(self, size: int) -> None:
        """Account for ``size`` payload bytes sent without handing them over: only in a
        stream whose payloads are not hashed (``hash_payload=False``)."""
        if self.hash_payload:
            raise ValueError("a hashed stream's payload must be given to payload()")
        if not 0 <= size <= self._pending:
            raise ValueError(f"{size} payload bytes given, {self._pending} expected")
        self._pending -= size

    def zero(self, gpa: int, npages: int) -> bytes:
        """A ZERO record."""
        self._run(gpa, npages)
        record = zero_record(gpa, npages)
        self._hash.update(record)
        self._records_in_round += 1
        return record

    def end_round(self) -> bytes:
        """END_OF_ROUND with the checksum of the round; starts the next round."""
        self._next_record()
        record = end_of_round(self.round, self._hash.digest())
        self.round += 1
        self._hash = Checksum()
        self._records_in_round = 0
        return record

    def end_stream(self) -> bytes:
        """END_OF_STREAM; the last round must have been ended with :meth:`end_round`."""
        self._next_record()
        if self._records_in_round:
            raise ValueError("end_round() must come before end_stream()")
        self._ended = True
        return end_of_stream(self.round)


# -- decoding ------------------------------------------------------------------------------

_HEADER, _RECORD_STATE, _PAYLOAD, _ENDED = range(4)


class PageStreamDecoder:
    """Turns page-stream bytes into events, verifying everything (h11 style).

    ``feed(data)`` appends bytes (``feed(b"")`` means end of file); ``next_event()`` returns
    the next event or :data:`NEED_DATA`. Errors in the data raise
    :class:`~vmipc.formats.errors.PageStreamError` with a one-line message; after
    one, the decoder is unusable. Memory stays bounded: once ``next_event()`` has returned
    NEED_DATA, fewer than ``MAX_HEADER_LENGTH`` bytes are buffered, and a data run is
    delivered in chunks of at most ``max_chunk`` bytes as its bytes arrive.

    ``expect_page_size`` / ``expect_layout``: refuse a stream for other RAM with
    :class:`~vmipc.formats.errors.PageStreamError`. ``strict=False`` reports a bad round
    checksum as ``RoundEnd(ok=False)`` instead of raising (for inspection tools only: a
    receiver must not resume a guest from such a stream).

    ``accept_unhashed``: take a 1.1 stream flagged :data:`FLAG_PAYLOAD_UNHASHED`, whose
    round checksums cover the record headers only (still: lost, reordered, damaged or
    truncated records; never the pages' bytes). Without it such a stream is refused at
    its header, before any page. Only for a channel the receiver's side trusts to move
    bytes exactly (a socket pair its client made). ``supported`` is the newest version
    read (for tests: ``(1, 0)`` is a 1.0 reader).
    """

    def __init__(
        self,
        *,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        expect_page_size: int | None = None,
        expect_layout: Iterable[tuple[int, int]] | None = None,
        strict: bool = True,
        supported: tuple[int, int] = (MAJOR, MINOR),
        accept_unhashed: bool = False,
    ) -> None:
        if max_chunk < 1:
            raise ValueError("max_chunk must be positive")
        self.max_chunk = max_chunk
        self._expect_page_size = expect_page_size
        self._expect_layout = None if expect_layout is None else tuple(expect_layout)
        self._strict = strict
        self._supported = supported
        self._accept_unhashed = accept_unhashed
        #: whether payload bytes go into the round checksum (not in an unhashed stream)
        self._hash_payload = True
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._state = _HEADER
        self._offset = 0  # stream offset of self._buf[self._pos]
        self._record_offset = 0
        self._hash = Checksum()
        self._records_in_round = 0
        self._index: _RangeIndex | None = None
        self._payload_gpa = 0
        self._payload_left = 0
        #: the stream header, once decoded
        self.header: StreamHeader | None = None
        #: the number of the round being received (== rounds completed so far)
        self.round = 0

    # -- input ----------------------------------------------------------------------------

    def feed(self, data: BytesLike) -> None:
        """Append received bytes; ``b""`` means the sender closed (end of file)."""
        if self._eof:
            raise RuntimeError("feed() after end of file")
        if not data:
            self._eof = True
            return
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events."""
        return len(self._buf) - self._pos

    @property
    def wanted(self) -> int:
        """How many more bytes the decoder needs before it can produce the next event.

        Reading at most this many bytes never reads past the end of the stream, so a
        receiver whose fd carries something after the stream reads ``min(wanted, limit)``
        each time it gets NEED_DATA. It is at least 1 whenever ``next_event()`` returned
        NEED_DATA, and 0 once the stream has ended.
        """
        have = self.buffered
        if self._state == _RECORD_STATE:
            need = RECORD_SIZE
        elif self._state == _PAYLOAD:
            need = self._payload_left
        elif self._state == _HEADER:
            need = _PREFIX.size
            if have >= _PREFIX.size:
                length = _PREFIX.unpack_from(self._buf, self._pos)[3]
                need = max(length, _PREFIX.size)
        else:
            return 0
        return max(0, need - have)

    @property
    def payload_left(self) -> int:
        """Payload bytes of the current data run still to come (0 outside a data run)."""
        return self._payload_left if self._state == _PAYLOAD else 0

    @property
    def payload_gpa(self) -> int:
        """The guest-physical address of the current data run's next payload byte."""
        return self._payload_gpa

    def feed_payload(self, data: BytesLike) -> None:
        """Account for the next ``len(data)`` payload bytes of the current data run, which
        the caller read straight into their place (guest RAM at :attr:`payload_gpa`)
        instead of feeding them, so that they are copied once: the decoder adds them to
        the round checksum and moves on, and no :class:`DataRun` is returned for them.

        Only inside a data run with nothing buffered (``payload_left`` and not
        ``buffered``), at most ``payload_left`` bytes. Like a DataRun's bytes they are not
        verified until the round's :class:`RoundEnd`: a receiver must not run the guest
        on them before that.
        """
        count = len(data) if not isinstance(data, memoryview) else data.nbytes
        if self._state != _PAYLOAD or self._eof or self.buffered:
            raise RuntimeError("feed_payload() outside a data run, or with bytes buffered")
        if not 0 < count <= self._payload_left:
            raise ValueError(f"{count} payload bytes, the run has {self._payload_left} left")
        if self._hash_payload:
            self._hash.update(data)
        self._offset += count
        self._payload_gpa += count
        self._payload_left -= count
        if not self._payload_left:
            self._state = _RECORD_STATE

    @property
    def offset(self) -> int:
        """Stream bytes turned into events so far."""
        return self._offset

    @property
    def ended(self) -> bool:
        """True once :class:`StreamEnd` has been returned."""
        return self._state == _ENDED

    @property
    def trailing_data(self) -> bytes:
        """Bytes fed after the end of the stream (for whatever follows it on the fd)."""
        if self._state != _ENDED:
            raise RuntimeError("the stream has not ended")
        return bytes(self._buf[self._pos :])

    def _take(self, count: int) -> bytes:
        start = self._pos
        with memoryview(self._buf) as view:
            chunk = view[start : start + count].tobytes()
        self._pos = start + count
        self._offset += count
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= 65536 and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]  # amortised: at most as many bytes moved as consumed
            self._pos = 0
        return chunk

    def _where(self) -> str:
        return f"page stream round {self.round}, record at byte {self._record_offset}"

    # -- events ---------------------------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA. Raises PageStreamError on bad data."""
        if self._state == _RECORD_STATE:
            return self._next_record()
        if self._state == _PAYLOAD:
            return self._next_payload()
        if self._state == _HEADER:
            return self._next_header()
        raise RuntimeError("next_event() after the end of the stream")

    def _need(self, count: int, what: str) -> bool:
        """Whether ``count`` bytes are buffered; raises Truncated at EOF if they never will be."""
        have = self.buffered
        if have >= count:
            return True
        if self._eof:
            raise PageStreamError(
                f"page stream at byte {self._offset}",
                f"ends inside {what} ({have} of {count} bytes)" if have else f"ends before {what}",
            )
        return False

    def _next_header(self) -> StreamHeader | NeedData:
        if not self._need(_PREFIX.size, "the stream header"):
            return NEED_DATA
        magic, major, minor, length = _PREFIX.unpack_from(self._buf, self._pos)
        where = "page stream header"
        if magic != MAGIC:
            raise PageStreamError(where, f"bad magic {magic!r} (not a vmipc page stream)")
        if not _PREFIX.size + 8 <= length <= MAX_HEADER_LENGTH or length % 8:
            raise PageStreamError(where, f"impossible header length {length}")
        if not self._need(length, "the stream header"):
            return NEED_DATA
        raw = self._take(length)
        (stored,) = _U64.unpack_from(raw, length - 8)
        computed = checksum(raw[:-8])
        if stored != computed:
            raise PageStreamError(
                where, f"checksum mismatch (stored {stored:#018x}, computed {computed:#018x})"
            )
        problem = version_problem((major, minor), self._supported)
        if problem:
            raise PageStreamError(where, problem)
        if length < _HEADER_V1.size + 8:
            raise PageStreamError(where, f"header length {length} too short")
        _, _, _, _, page_size, flags, count = _HEADER_V1.unpack_from(raw)
        if flags & ~_KNOWN_FLAGS.get(minor, 0) or any(raw[28:32]):
            raise PageStreamError(where, f"unknown flags {flags:#x} or reserved bytes set")
        if flags & FLAG_PAYLOAD_UNHASHED and not self._accept_unhashed:
            # before any page: this receiver wants every byte checked
            raise PageStreamError(
                where,
                "the data payloads are not hashed (format 1.1 flag), and this receiver was "
                "not told to accept such a stream",
            )
        if length != _HEADER_V1.size + _RANGE.size * count + 8:
            raise PageStreamError(where, f"header length {length} does not fit {count} ranges")
        ranges = [_RANGE.unpack_from(raw, _HEADER_V1.size + i * _RANGE.size) for i in range(count)]
        layout = validate_layout(ranges, page_size)
        if isinstance(layout, str):
            raise PageStreamError(where, layout)
        if self._expect_page_size is not None and page_size != self._expect_page_size:
            raise PageStreamError(
                where, f"page size {page_size}, but this receiver uses {self._expect_page_size}"
            )
        if self._expect_layout is not None and layout != self._expect_layout:
            raise PageStreamError(
                where,
                f"RAM layout {_format_layout(layout)} differs from this receiver's "
                f"{_format_layout(self._expect_layout)}",
            )
        self._index = _RangeIndex(layout)
        self._hash_payload = not flags & FLAG_PAYLOAD_UNHASHED
        self.header = StreamHeader(major, minor, page_size, layout, flags)
        self._state = _RECORD_STATE
        return self.header

    def _next_record(self) -> Event | NeedData:
        self._record_offset = self._offset
        if self._eof and not self.buffered:
            raise PageStreamError(
                f"page stream round {self.round}",
                f"ends at byte {self._offset} without an end-of-stream record",
            )
        if not self._need(RECORD_SIZE, "a record header"):
            return NEED_DATA
        raw = self._take(RECORD_SIZE)
        kind, flags, reserved, npages, arg0, arg1, reserved2, check = _RECORD.unpack(raw)
        if check != checksum(raw[:28]) & _MAX_U32:
            raise PageStreamError(self._where(), "record header fails its check (damaged)")
        if flags or reserved or reserved2:
            raise PageStreamError(self._where(), "reserved record bits are set")
        handler = _RECORD_HANDLERS.get(kind)
        if handler is None:
            raise PageStreamError(self._where(), f"unknown record type {kind}")
        return handler(self, raw, npages, arg0, arg1)

    def _run(self, raw: bytes, npages: int, gpa: int) -> int:
        """Validate a DATA/ZERO run; returns its length in bytes."""
        assert self.header is not None and self._index is not None
        page_size = self.header.page_size
        length = npages * page_size
        if npages == 0:
            raise PageStreamError(self._where(), f"empty run at {gpa:#x}")
        if gpa % page_size:
            raise PageStreamError(self._where(), f"run at {gpa:#x} is not aligned to {page_size}")
        if not self._index.contains(gpa, length):
            raise PageStreamError(self._where(), f"run {gpa:#x}+{npages} pages is outside RAM")
        self._hash.update(raw)
        self._records_in_round += 1
        return length

    def _on_data(self, raw: bytes, npages: int, gpa: int, arg1: int) -> Event | NeedData:
        if arg1:
            raise PageStreamError(self._where(), "reserved record field is set")
        self._payload_left = self._run(raw, npages, gpa)
        self._payload_gpa = gpa
        self._state = _PAYLOAD
        return self._next_payload()

    def _next_payload(self) -> DataRun | NeedData:
        count = min(self._payload_left, self.buffered, self.max_chunk)
        if count == 0:
            if self._eof:
                raise PageStreamError(
                    self._where(),
                    f"ends inside a data run ({self._payload_left} payload bytes missing)",
                )
            return NEED_DATA
        chunk = self._take(count)
        if self._hash_payload:
            self._hash.update(chunk)
        event = DataRun(self._payload_gpa, chunk)
        self._payload_gpa += count
        self._payload_left -= count
        if not self._payload_left:
            self._state = _RECORD_STATE
        return event

    def _on_zero(self, raw: bytes, npages: int, gpa: int, arg1: int) -> ZeroRun:
        if arg1:
            raise PageStreamError(self._where(), "reserved record field is set")
        self._run(raw, npages, gpa)
        return ZeroRun(gpa, npages)

    def _on_round_end(self, raw: bytes, npages: int, round: int, stored: int) -> RoundEnd:
        if npages:
            raise PageStreamError(self._where(), "end of round with a page count")
        if round != self.round:
            raise PageStreamError(
                self._where(), f"end of round {round}, expected round {self.round}"
            )
        computed = self._hash.digest()
        ok = stored == computed
        if not ok and self._strict:
            raise PageStreamError(
                f"page stream round {round}",
                f"checksum mismatch (stored {stored:#018x}, computed {computed:#018x})",
            )
        self.round += 1
        self._hash = Checksum()
        self._records_in_round = 0
        return RoundEnd(round, stored, ok)

    def _on_stream_end(self, raw: bytes, npages: int, rounds: int, arg1: int) -> StreamEnd:
        if npages or arg1:
            raise PageStreamError(self._where(), "reserved record field is set")
        if self._records_in_round:
            raise PageStreamError(
                self._where(),
                f"end of stream inside round {self.round} "
                f"({self._records_in_round} records after the last end of round)",
            )
        if rounds != self.round:
            raise PageStreamError(
                self._where(), f"end of stream says {rounds} rounds, {self.round} were received"
            )
        self._state = _ENDED
        return StreamEnd(rounds)


_Handler = Callable[[PageStreamDecoder, bytes, int, int, int], Event | NeedData]
_RECORD_HANDLERS: dict[int, _Handler] = {
    RecordType.DATA: PageStreamDecoder._on_data,
    RecordType.ZERO: PageStreamDecoder._on_zero,
    RecordType.END_OF_ROUND: PageStreamDecoder._on_round_end,
    RecordType.END_OF_STREAM: PageStreamDecoder._on_stream_end,
}


# -- dirty bitmaps and zero pages ----------------------------------------------------------

_FULL_WORD = (1 << 64) - 1
_BLOCK = 512  # bitmap bytes checked at once for "all clear" / "all set"
_ONES = b"\xff" * _BLOCK


def bitmap_to_runs(
    bitmap: BytesLike | Sequence[int], npages: int | None = None
) -> list[tuple[int, int]]:
    """The (first_page, npages) runs of set bits in a dirty bitmap, ascending.

    ``bitmap`` is what ``KVM_GET_DIRTY_LOG`` fills (bit ``i`` = page ``i`` of the slot,
    in little-endian 64-bit words) as bytes, or the words as a sequence of ints. Only the
    first ``npages`` bits count (default: all of them).
    """
    if isinstance(bitmap, bytes | bytearray | memoryview):
        data = memoryview(bitmap).cast("B")
    else:
        try:
            data = memoryview(b"".join(word.to_bytes(8, "little") for word in bitmap))
        except OverflowError:
            raise ValueError("bitmap words must be unsigned 64-bit integers") from None
    nbits = len(data) * 8
    if npages is None:
        npages = nbits
    elif not 0 <= npages <= nbits:
        raise ValueError(f"npages {npages} exceeds the bitmap's {nbits} bits")
    nbytes = (npages + 7) // 8
    runs: list[tuple[int, int]] = []
    append = runs.append
    start = -1  # first page of the run still open, or -1
    for block_start in range(0, nbytes, _BLOCK):
        block = data[block_start : min(block_start + _BLOCK, nbytes)]
        if ZEROS.startswith(block):
            if start >= 0:
                append((start, block_start * 8 - start))
                start = -1
            continue
        if _ONES.startswith(block):
            if start < 0:
                start = block_start * 8
            continue
        padded = bytes(block) + bytes(-len(block) % 8)
        for word_index, (word,) in enumerate(_U64.iter_unpack(padded)):
            base = block_start * 8 + word_index * 64
            if word == 0:
                if start >= 0:
                    append((start, base - start))
                    start = -1
                continue
            if word == _FULL_WORD:
                if start < 0:
                    start = base
                continue
            pos = 0
            while True:
                if start < 0:
                    rest = word >> pos
                    if not rest:
                        break
                    pos += (rest & -rest).bit_length() - 1
                    start = base + pos
                rest = word >> pos
                pos += (rest ^ (rest + 1)).bit_length() - 1  # trailing ones
                if pos >= 64:
                    break
                append((start, base + pos - start))
                start = -1
    if start >= 0:
        append((start, nbytes * 8 - start))
    # bits past npages in the last byte
    while runs and runs[-1][0] >= npages:
        runs.pop()
    if runs and sum(runs[-1]) > npages:
        first, _ = runs[-1]
        runs[-1] = (first, npages - first)
    return runs


def runs_to_bitmap(runs: Iterable[tuple[int, int]], npages: int) -> bytes:
    """The inverse of :func:`bitmap_to_runs`: a bitmap of ``npages`` bits rounded up to
    whole 64-bit words, little-endian, with the pages of ``runs`` set."""
    value = 0
    for first, count in runs:
        if first < 0 or count < 0 or first + count > npages:
            raise ValueError(f"run {first}+{count} outside {npages} pages")
        value |= ((1 << count) - 1) << first
    return value.to_bytes((npages + 63) // 64 * 8, "little")


class PageRun(NamedTuple):
    """``npages`` pages from ``first_page``; ``zero`` when every byte of them is zero."""

    first_page: int
    npages: int
    zero: bool


#: bytes checked at once for "all zero" before looking at single pages
_ZERO_BLOCK_BYTES = 256 << 10


def _all_zero(view: memoryview) -> bool:
    """Whether every byte of ``view`` is zero (memcmp against a zero buffer, no copy)."""
    for start in range(0, view.nbytes, ZERO_CHUNK_SIZE):
        if not ZEROS.startswith(view[start : start + ZERO_CHUNK_SIZE]):
            return False
    return True


def split_zero_runs(
    ram: BytesLike, runs: Iterable[tuple[int, int]], page_size: int = PAGE_SIZE
) -> list[PageRun]:
    """Split page runs into data runs and all-zero runs, in order.

    ``ram`` is the memory the page numbers index (page ``i`` is
    ``ram[i * page_size : (i + 1) * page_size]``), e.g. a memoryview of one memory region;
    ``runs`` are (first_page, npages) pairs. Adjacent pages of the same kind are merged.
    """
    view = memoryview(ram).cast("B")
    total_pages = len(view) // page_size
    block_pages = max(1, _ZERO_BLOCK_BYTES // page_size)
    small = page_size <= ZERO_CHUNK_SIZE
    out: list[PageRun] = []
    for first, count in runs:
        if first < 0 or count < 0 or first + count > total_pages:
            raise ValueError(f"run {first}+{count} outside {total_pages} pages of RAM")
        page = first
        end = first + count
        kind_start = first
        kind: bool | None = None
        while page < end:
            block = min(end - page, block_pages)
            offset = page * page_size
            if _all_zero(view[offset : offset + block * page_size]):
                if kind is False:
                    out.append(PageRun(kind_start, page - kind_start, False))
                    kind_start = page
                kind = True
                page += block
                continue
            # A page whose first word is not zero holds data: one C-level strided read of
            # those words settles most pages of real memory without a per-page compare.
            first_words = (
                view[offset : offset + block * page_size].cast("Q")[:: page_size // 8].tolist()
            )
            if all(first_words):
                if kind is True:
                    out.append(PageRun(kind_start, page - kind_start, True))
                    kind_start = page
                kind = False
                page += block
                continue
            for first_word in first_words:
                if first_word:
                    is_zero = False
                else:
                    offset = page * page_size
                    page_view = view[offset : offset + page_size]
                    is_zero = ZEROS.startswith(page_view) if small else _all_zero(page_view)
                if is_zero is not kind:
                    if kind is not None:
                        out.append(PageRun(kind_start, page - kind_start, kind))
                    kind = is_zero
                    kind_start = page
                page += 1
        if kind is not None:
            out.append(PageRun(kind_start, end - kind_start, kind))
    return out

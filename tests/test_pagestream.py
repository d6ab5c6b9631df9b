"""The page stream codec: round trips, corruption, truncation, versions, bounds, helpers."""

from __future__ import annotations

import io
import random
import re
import struct
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from vmipc.formats import (
    NEED_DATA,
    DataRun,
    PageRun,
    PageStreamDecoder,
    PageStreamEncoder,
    PageStreamError,
    RoundEnd,
    StreamEnd,
    StreamHeader,
    ZeroRun,
    bitmap_to_runs,
    runs_to_bitmap,
    split_zero_runs,
)
from vmipc.formats import pagestream as ps

SPEC = Path(__file__).resolve().parent.parent / "protocol" / "page-stream.md"

PAGE = 4096
LAYOUT = ((0, 16 * PAGE), (1 << 32, 8 * PAGE))


def page(fill: int) -> bytes:
    return bytes([fill]) * PAGE


def sample_stream() -> bytes:
    """Two rounds over LAYOUT: data, zero, data spanning a few pages, then an empty round."""
    enc = PageStreamEncoder(LAYOUT)
    out = [enc.header()]
    payload = page(1) + page(2)
    out += [enc.data(PAGE, 2), payload]
    enc.payload(memoryview(payload)[:100])
    enc.payload(memoryview(payload)[100:])
    out += [enc.zero(1 << 32, 3)]
    payload = page(3)
    out += [enc.data((1 << 32) + 7 * PAGE, 1), payload]
    enc.payload(payload)
    out += [enc.end_round()]
    out += [enc.data(0, 1), page(9)]
    enc.payload(page(9))
    out += [enc.end_round(), enc.end_round(), enc.end_stream()]
    return b"".join(out)


def decode_all(
    data: bytes, *, chunk: int = 1 << 30, **kwargs: object
) -> list[StreamHeader | DataRun | ZeroRun | RoundEnd | StreamEnd]:
    """Decode ``data`` fed in ``chunk``-sized pieces, then EOF; all events."""
    dec = PageStreamDecoder(**kwargs)  # type: ignore[arg-type]
    events: list[StreamHeader | DataRun | ZeroRun | RoundEnd | StreamEnd] = []
    position = 0
    while True:
        event = dec.next_event()
        if event is NEED_DATA:
            piece = data[position : position + chunk]
            position += len(piece)
            dec.feed(piece)
            continue
        assert not isinstance(event, ps.NeedData)
        events.append(event)
        if isinstance(event, StreamEnd):
            return events


def apply(
    events: list[StreamHeader | DataRun | ZeroRun | RoundEnd | StreamEnd],
) -> dict[int, bytes]:
    """Replay events onto a sparse page map {gpa: page bytes} (missing = never sent)."""
    pages: dict[int, bytearray] = {}
    for event in events:
        if isinstance(event, DataRun):
            gpa = event.gpa
            for i, byte in enumerate(event.data):
                addr = gpa + i
                base = addr - addr % PAGE
                pages.setdefault(base, bytearray(PAGE))[addr - base] = byte
        elif isinstance(event, ZeroRun):
            for i in range(event.npages):
                pages[event.gpa + i * PAGE] = bytearray(PAGE)
    return {gpa: bytes(data) for gpa, data in pages.items()}


# -- round trips --------------------------------------------------------------------------


def test_sample_stream_events() -> None:
    events = decode_all(sample_stream())
    assert events[0] == StreamHeader(1, 0, PAGE, LAYOUT)
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "StreamHeader",
        "DataRun",
        "ZeroRun",
        "DataRun",
        "RoundEnd",
        "DataRun",
        "RoundEnd",
        "RoundEnd",
        "StreamEnd",
    ]
    assert events[1] == DataRun(PAGE, page(1) + page(2))
    assert events[2] == ZeroRun(1 << 32, 3)
    assert [e.round for e in events if isinstance(e, RoundEnd)] == [0, 1, 2]
    assert all(e.ok for e in events if isinstance(e, RoundEnd))
    assert events[-1] == StreamEnd(3)


def test_round_checksum_covers_every_byte_of_the_round() -> None:
    data = sample_stream()
    header_length = struct.unpack_from("<I", data, 12)[0]
    events = decode_all(data)
    round0 = next(e for e in events if isinstance(e, RoundEnd))
    # the round's bytes: from the end of the header up to the END_OF_ROUND record
    body_len = 32 + 2 * PAGE + 32 + 32 + PAGE
    body = data[header_length : header_length + body_len]
    assert round0.checksum == xxhash.xxh3_64_intdigest(body)


@st.composite
def stream_plans(
    draw: st.DrawFn,
) -> tuple[tuple[tuple[int, int], ...], list[list[tuple[int, int, int]]]]:
    """A layout and rounds of (kind, page index, npages) runs (kind 0 zero, else fill)."""
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    layout = []
    gpa = 0
    for size in sizes:
        gpa += draw(st.integers(0, 3)) * PAGE
        layout.append((gpa, size * PAGE))
        gpa += size * PAGE
    rounds = []
    for _ in range(draw(st.integers(0, 3))):
        runs = []
        for _ in range(draw(st.integers(0, 4))):
            region = draw(st.integers(0, len(layout) - 1))
            rpages = layout[region][1] // PAGE
            first = draw(st.integers(0, rpages - 1))
            count = draw(st.integers(1, rpages - first))
            fill = draw(st.integers(0, 255))
            runs.append((fill, layout[region][0] + first * PAGE, count))
        rounds.append(runs)
    return tuple(layout), rounds


@settings(max_examples=60, deadline=None)
@given(
    plan=stream_plans(),
    chunk=st.integers(1, 20000),
    max_chunk=st.integers(1, 9000),
    hashed=st.booleans(),
)
def test_round_trip(
    plan: tuple[tuple[tuple[int, int], ...], list[list[tuple[int, int, int]]]],
    chunk: int,
    max_chunk: int,
    hashed: bool,
) -> None:
    layout, rounds = plan
    enc = PageStreamEncoder(layout, hash_payload=hashed)
    out = [enc.header()]
    expected: dict[int, bytes] = {}
    for runs in rounds:
        for fill, gpa, count in runs:
            if fill == 0:
                out.append(enc.zero(gpa, count))
            else:
                payload = b"".join(bytes([fill, i]) * (PAGE // 2) for i in range(count))
                out.append(enc.data(gpa, count))
                out.append(payload)
                enc.payload(memoryview(payload))
            for i in range(count):
                expected[gpa + i * PAGE] = (
                    bytes(PAGE) if fill == 0 else bytes([fill, i]) * (PAGE // 2)
                )
        out.append(enc.end_round())
    out.append(enc.end_stream())
    events = decode_all(b"".join(out), chunk=chunk, max_chunk=max_chunk, accept_unhashed=not hashed)
    flags = 0 if hashed else ps.FLAG_PAYLOAD_UNHASHED
    assert events[0] == StreamHeader(1, 0 if hashed else 1, PAGE, layout, flags)
    assert events[0].payload_hashed is hashed
    assert all(len(e.data) <= max_chunk for e in events if isinstance(e, DataRun))
    assert apply(events) == expected
    assert events[-1] == StreamEnd(len(rounds))


def test_expected_layout_and_page_size() -> None:
    data = sample_stream()
    decode_all(data, expect_layout=LAYOUT, expect_page_size=PAGE)
    with pytest.raises(PageStreamError, match="RAM layout"):
        decode_all(data, expect_layout=((0, 16 * PAGE),))
    with pytest.raises(PageStreamError, match="page size"):
        decode_all(data, expect_page_size=2 * PAGE)


def test_trailing_data_is_kept_for_the_caller() -> None:
    dec = PageStreamDecoder()
    dec.feed(sample_stream() + b"next protocol")
    while not isinstance(dec.next_event(), StreamEnd):
        pass
    assert dec.ended
    assert dec.trailing_data == b"next protocol"
    with pytest.raises(RuntimeError):
        dec.next_event()


@pytest.mark.parametrize("limit", [1, 7, 32, 5000, 1 << 20])
def test_reading_what_is_wanted_never_reads_past_the_end(limit: int) -> None:
    stream = sample_stream()
    source = io.BytesIO(stream + b"the next protocol's bytes")
    dec = PageStreamDecoder()
    events = []
    while True:
        event = dec.next_event()
        if event is NEED_DATA:
            assert dec.wanted >= 1
            dec.feed(source.read(min(dec.wanted, limit)))
            continue
        events.append(event)
        if isinstance(event, StreamEnd):
            break
    assert source.tell() == len(stream)
    assert dec.wanted == 0
    assert dec.trailing_data == b""
    assert apply(events) == apply(decode_all(stream))


def test_feed_after_eof_is_a_bug() -> None:
    dec = PageStreamDecoder()
    dec.feed(b"")
    with pytest.raises(RuntimeError):
        dec.feed(b"x")


# -- corruption and truncation -------------------------------------------------------------


def test_every_single_byte_corruption_is_detected() -> None:
    data = bytearray(sample_stream())
    for position in range(len(data)):
        for mask in (0x01, 0xFF):
            data[position] ^= mask
            with pytest.raises(PageStreamError):
                decode_all(bytes(data), chunk=5000)
            data[position] ^= mask


def test_payload_corruption_is_a_round_checksum_mismatch() -> None:
    data = bytearray(sample_stream())
    header_length = struct.unpack_from("<I", data, 12)[0]
    data[header_length + 32 + 10] ^= 1
    with pytest.raises(PageStreamError, match=r"^page stream round 0: checksum"):
        decode_all(bytes(data))
    events = decode_all(bytes(data), strict=False)
    assert [e.ok for e in events if isinstance(e, RoundEnd)] == [False, True, True]


def test_record_header_corruption_is_caught_before_the_record_is_used() -> None:
    data = bytearray(sample_stream())
    header_length = struct.unpack_from("<I", data, 12)[0]
    data[header_length + 9] ^= 0x10  # the gpa of the first data record
    dec = PageStreamDecoder()
    dec.feed(bytes(data))
    assert isinstance(dec.next_event(), StreamHeader)
    with pytest.raises(PageStreamError, match="record header fails its check"):
        dec.next_event()


def test_truncation_at_every_byte_is_detected() -> None:
    data = sample_stream()
    for cut in range(len(data)):
        with pytest.raises(PageStreamError, match=r": ends (inside|before|at byte) ") as info:
            decode_all(data[:cut], chunk=777)
        assert "\n" not in str(info.value)


def test_truncation_messages() -> None:
    data = sample_stream()
    with pytest.raises(PageStreamError, match="ends before the stream header"):
        decode_all(b"")
    with pytest.raises(PageStreamError, match="payload bytes missing"):
        decode_all(data[: len(data) - 200 - 3 * 32 - PAGE])
    with pytest.raises(PageStreamError, match="without an end-of-stream record"):
        decode_all(data[:-32])


# -- versions ------------------------------------------------------------------------------


def stream_with_version(major: int, minor: int) -> bytes:
    data = sample_stream()
    header = ps.stream_header(LAYOUT, version=(major, minor))
    return header + data[len(header) :]


def test_future_major_is_refused() -> None:
    with pytest.raises(PageStreamError, match=r"2\.0 is not supported"):
        decode_all(stream_with_version(2, 0))


def test_future_major_with_another_header_shape_is_refused_as_a_version() -> None:
    # only the prefix and the trailing checksum are frozen across majors
    body = struct.pack("<8sHHI", b"VMIPCPGS", 7, 3, 48) + b"\xaa" * 24
    header = body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
    with pytest.raises(PageStreamError, match=r"version 7\.3 is not supported"):
        decode_all(header + b"whatever follows")


def test_newer_minor_is_refused_and_older_minor_read() -> None:
    with pytest.raises(PageStreamError, match=r"1\.2 is newer"):
        decode_all(stream_with_version(1, 2))
    with pytest.raises(PageStreamError, match=r"1\.1 is newer than this reader's 1\.0"):
        decode_all(stream_with_version(1, 1), supported=(1, 0))
    events = decode_all(stream_with_version(1, 0), supported=(1, 1))
    assert isinstance(events[-1], StreamEnd)


def test_bad_magic() -> None:
    with pytest.raises(PageStreamError, match="bad magic"):
        decode_all(b"GARBAGE!" + bytes(100))


# -- records that do not fit ---------------------------------------------------------------


def stream_of(*records: bytes, layout: tuple[tuple[int, int], ...] = LAYOUT) -> bytes:
    return ps.stream_header(layout) + b"".join(records)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (ps.zero_record(16 * PAGE, 1), "outside RAM"),
        (ps.zero_record(15 * PAGE, 2), "outside RAM"),  # runs into the hole
        (ps.zero_record((1 << 32) - PAGE, 2), "outside RAM"),  # starts in the hole
        (ps.zero_record(100, 1), "not aligned"),
        (ps.data_record_header(32 * PAGE, 1), "outside RAM"),
        (ps._record(ps.RecordType.ZERO, 0, 0, 0), "empty run"),
        (ps._record(ps.RecordType.DATA, 1, 0, 5), "reserved"),
        (ps._record(9, 0, 0, 0), "unknown record type 9"),  # type: ignore[arg-type]
        (ps.end_of_round(1, 0), "expected round 0"),
        (ps.end_of_stream(4), "says 4 rounds, 0 were received"),
        (ps.zero_record(0, 1) + ps.end_of_stream(0), "end of stream inside round 0"),
    ],
)
def test_bad_records(record: bytes, message: str) -> None:
    with pytest.raises(PageStreamError, match=message) as info:
        decode_all(stream_of(record))
    assert str(info.value).startswith("page stream round 0, record at byte ")


def test_reserved_bits_are_refused() -> None:
    body = struct.pack("<BBHIQQI", 2, 1, 0, 1, 0, 0, 0)
    record = body + (xxhash.xxh3_64_intdigest(body) & 0xFFFFFFFF).to_bytes(4, "little")
    with pytest.raises(PageStreamError, match="reserved"):
        decode_all(stream_of(record))


@pytest.mark.parametrize(
    "layout",
    [
        (),
        ((0, 0),),
        ((0, 100),),
        ((PAGE, PAGE), (0, PAGE)),
        ((0, 2 * PAGE), (PAGE, PAGE)),
        tuple((i * 2 * PAGE, PAGE) for i in range(65)),
    ],
)
def test_bad_layouts_are_refused_by_the_encoder(layout: tuple[tuple[int, int], ...]) -> None:
    with pytest.raises(ValueError):
        PageStreamEncoder(layout)


def test_bad_layout_in_a_stream_is_corrupt() -> None:
    # a header that passes its checksum but has overlapping ranges
    body = struct.pack("<8sHHIIII4x", b"VMIPCPGS", 1, 0, 32 + 32 + 8, PAGE, 0, 2)
    body += struct.pack("<QQQQ", 0, 2 * PAGE, PAGE, PAGE)
    header = body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
    with pytest.raises(PageStreamError, match="overlaps"):
        decode_all(header)


@pytest.mark.parametrize(("offset", "value"), [(20, 1), (28, 1), (31, 0x80)])
def test_header_flags_and_reserved_bytes_are_refused(offset: int, value: int) -> None:
    header = bytearray(ps.stream_header(LAYOUT))
    header[offset] = value
    header[-8:] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(header[:-8])))
    with pytest.raises(PageStreamError, match="reserved"):
        decode_all(bytes(header))


def test_encoder_refuses_misuse() -> None:
    enc = PageStreamEncoder(LAYOUT)
    with pytest.raises(ValueError, match="header"):
        enc.zero(0, 1)
    enc.header()
    with pytest.raises(ValueError, match="not page-aligned RAM"):
        enc.zero(16 * PAGE, 1)
    with pytest.raises(ValueError, match="not page-aligned RAM"):
        enc.data(1, 1)
    enc.data(0, 1)
    assert enc.payload_pending == PAGE
    with pytest.raises(ValueError, match="pending"):
        enc.zero(PAGE, 1)
    with pytest.raises(ValueError, match="expected"):
        enc.payload(bytes(PAGE + 1))
    enc.payload(bytes(PAGE))
    with pytest.raises(ValueError, match="end_round"):
        enc.end_stream()
    enc.end_round()
    enc.end_stream()
    with pytest.raises(ValueError, match="ended"):
        enc.end_round()


# -- fuzz: only documented errors, bounded memory -------------------------------------------


def run_fuzz(data: bytes, chunk: int, max_chunk: int) -> None:
    dec = PageStreamDecoder(max_chunk=max_chunk)
    position = 0
    try:
        while True:
            event = dec.next_event()
            if event is NEED_DATA:
                assert dec.buffered < ps.MAX_HEADER_LENGTH
                assert dec.wanted >= 1
                piece = data[position : position + chunk]
                position += len(piece)
                dec.feed(piece)
            elif isinstance(event, DataRun):
                assert 0 < len(event.data) <= max_chunk
            elif isinstance(event, StreamEnd):
                return
    except PageStreamError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000), chunk=st.integers(1, 4096))
def test_fuzz_random_bytes(data: bytes, chunk: int) -> None:
    run_fuzz(data, chunk, 1000)
    run_fuzz(ps.MAGIC + data, chunk, 1000)


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 1 << 20),
    chunk=st.integers(1, 9000),
)
def test_fuzz_mutated_streams(edits: list[tuple[int, int]], cut: int, chunk: int) -> None:
    data = bytearray(sample_stream())
    for position, value in edits:
        data[position % len(data)] = value
    run_fuzz(bytes(data[: cut % (len(data) + 1)]), chunk, 3000)


def test_memory_stays_bounded_for_a_huge_run() -> None:
    layout = ((0, 1 << 30),)
    header = ps.stream_header(layout)
    dec = PageStreamDecoder(max_chunk=1 << 16)
    dec.feed(header + ps.data_record_header(0, (1 << 30) // PAGE))
    assert isinstance(dec.next_event(), StreamHeader)
    assert dec.next_event() is NEED_DATA
    got = 0
    piece = bytes(300_000)
    for _ in range(20):
        dec.feed(piece)
        while (event := dec.next_event()) is not NEED_DATA:
            assert isinstance(event, DataRun)
            assert len(event.data) <= 1 << 16
            assert event.gpa == got
            got += len(event.data)
        assert dec.buffered == 0
    assert got == 20 * len(piece)


# -- dirty bitmaps -------------------------------------------------------------------------


def bits(*set_bits: int, nbytes: int = 8) -> bytes:
    value = 0
    for bit in set_bits:
        value |= 1 << bit
    return value.to_bytes(nbytes, "little")


@pytest.mark.parametrize(
    ("bitmap", "npages", "runs"),
    [
        (b"", None, []),
        (bytes(8), None, []),
        (bits(0), None, [(0, 1)]),
        (bits(63), None, [(63, 1)]),
        (bits(0, 1, 2, 5), None, [(0, 3), (5, 1)]),
        (b"\xff" * 8, None, [(0, 64)]),
        (b"\xff" * 8, 10, [(0, 10)]),
        (bits(3, 9), 8, [(3, 1)]),
        (bits(62, 63, 64, 65, nbytes=16), None, [(62, 4)]),  # across a word boundary
        (b"\xff" * 16, None, [(0, 128)]),
        (bits(0, 127, nbytes=16), None, [(0, 1), (127, 1)]),
        (b"\x0f\x00\xf0\xff\xff\xff\xff\xff\x01" + bytes(7), None, [(0, 4), (20, 45)]),
        # across the 512-byte (4096-bit) block boundary the fast paths use
        (bits(4095, 4096, nbytes=1024), None, [(4095, 2)]),
        (b"\xff" * 512 + bits(0, 1), None, [(0, 4098)]),
        (b"\xff" * 512 + b"\xff" * 512, None, [(0, 8192)]),
        (bytes(512) + b"\xff" * 512 + bytes(8), None, [(4096, 4096)]),
        (b"\xff" * 1024, 5000, [(0, 5000)]),
        (b"\xaa" * 8, None, [(i, 1) for i in range(1, 64, 2)]),
    ],
)
def test_bitmap_to_runs_table(
    bitmap: bytes, npages: int | None, runs: list[tuple[int, int]]
) -> None:
    assert bitmap_to_runs(bitmap, npages) == runs
    assert bitmap_to_runs(memoryview(bitmap), npages) == runs
    words = [int.from_bytes(bitmap[i : i + 8], "little") for i in range(0, len(bitmap), 8)]
    assert bitmap_to_runs(words, npages) == runs


def test_bitmap_to_runs_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        bitmap_to_runs(bytes(8), 65)
    with pytest.raises(ValueError):
        bitmap_to_runs([1 << 64])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), max_size=9000))
def test_bitmap_round_trip(pages: list[bool]) -> None:
    npages = len(pages)
    expected: list[tuple[int, int]] = []
    for i, dirty in enumerate(pages):
        if not dirty:
            continue
        if expected and sum(expected[-1]) == i:
            expected[-1] = (expected[-1][0], expected[-1][1] + 1)
        else:
            expected.append((i, 1))
    bitmap = runs_to_bitmap(expected, npages)
    assert len(bitmap) % 8 == 0
    assert bitmap_to_runs(bitmap, npages) == expected
    assert bitmap_to_runs(bitmap) == expected


def test_bitmap_random_dense() -> None:
    rng = random.Random(7)
    npages = 200_000
    dirty = [rng.random() < 0.3 for _ in range(npages)]
    value = sum(1 << i for i, d in enumerate(dirty) if d)
    runs = bitmap_to_runs(value.to_bytes(npages // 8 + 8, "little"), npages)
    assert sum(n for _, n in runs) == sum(dirty)
    assert all(dirty[p] for first, n in runs for p in range(first, first + n))


# -- zero pages ------------------------------------------------------------------------------


def ram_of(*fills: int) -> memoryview:
    return memoryview(b"".join(page(f) for f in fills))


@pytest.mark.parametrize(
    ("fills", "runs", "expected"),
    [
        ((0, 0, 0), [(0, 3)], [PageRun(0, 3, True)]),
        ((1, 2, 3), [(0, 3)], [PageRun(0, 3, False)]),
        ((1, 0, 0, 4), [(0, 4)], [PageRun(0, 1, False), PageRun(1, 2, True), PageRun(3, 1, False)]),
        ((1, 0, 0, 4), [(1, 2)], [PageRun(1, 2, True)]),
        ((1, 0, 0, 4), [(0, 1), (3, 1)], [PageRun(0, 1, False), PageRun(3, 1, False)]),
        ((1, 0, 0, 4), [], []),
        (
            (0,) * 70 + (5,) + (0,) * 70,
            [(0, 141)],
            [PageRun(0, 70, True), PageRun(70, 1, False), PageRun(71, 70, True)],
        ),
        ((5,) * 130, [(2, 128)], [PageRun(2, 128, False)]),
    ],
)
def test_split_zero_runs_table(
    fills: tuple[int, ...], runs: list[tuple[int, int]], expected: list[PageRun]
) -> None:
    assert split_zero_runs(ram_of(*fills), runs) == expected


def test_split_zero_runs_sees_a_single_nonzero_byte() -> None:
    ram = bytearray(200 * PAGE)
    for position in (0, PAGE - 1, 64 * PAGE + 5, 199 * PAGE + PAGE - 1):
        ram[position] = 1
        found = [r for r in split_zero_runs(ram, [(0, 200)]) if not r.zero]
        assert found == [PageRun(position // PAGE, 1, False)]
        ram[position] = 0


def test_split_zero_runs_refuses_runs_outside_ram() -> None:
    with pytest.raises(ValueError):
        split_zero_runs(ram_of(0, 0), [(1, 2)])


def hexdump_blocks(text: str) -> dict[int, bytes]:
    """{offset: bytes} of every hexdump line (``00001000  68 65 ...``) in a spec."""
    found = {}
    for match in re.finditer(r"^([0-9a-f]{8})  ([0-9a-f]{2}(?: [0-9a-f]{2})*)", text, re.M):
        found[int(match.group(1), 16)] = bytes.fromhex(match.group(2))
    return found


def test_the_specs_worked_example_is_what_the_code_writes() -> None:
    enc = PageStreamEncoder(((0, 0x4000), (0x100000000, 0x1000)))
    payload = b"\xab" * PAGE
    stream = enc.header() + enc.data(0x1000, 1) + payload
    enc.payload(payload)
    stream += enc.zero(0x100000000, 1) + enc.end_round() + enc.end_stream()
    blocks = hexdump_blocks(SPEC.read_text())
    assert len(blocks) >= 10
    for offset, expected in blocks.items():
        assert stream[offset : offset + len(expected)] == expected, hex(offset)
    assert max(blocks) + len(blocks[max(blocks)]) == len(stream)
    assert "0x297b6bc6a481cd36" in SPEC.read_text()
    assert xxhash.xxh3_64_intdigest(stream[0x48:0x1088]) == 0x297B6BC6A481CD36
    # the same stream with its payload not hashed (1.1), as the spec describes it
    enc = PageStreamEncoder(((0, 0x4000), (0x100000000, 0x1000)), hash_payload=False)
    flagged = enc.header() + enc.data(0x1000, 1) + payload
    enc.skip_payload(len(payload))
    flagged += enc.zero(0x100000000, 1) + enc.end_round() + enc.end_stream()
    differ = [i for i in range(len(stream)) if stream[i] != flagged[i]]
    assert len(flagged) == len(stream)
    assert {10, 20} | set(range(0x40, 0x48)) <= set(differ)
    assert all(i < 0x48 or 0x1088 <= i < 0x10A8 for i in differ)
    assert flagged[10:12] == b"\x01\x00" and flagged[20:24] == b"\x01\x00\x00\x00"
    assert struct.unpack_from("<Q", flagged, 0x40)[0] == 0x11E049CA0E71487F
    round_checksum = struct.unpack_from("<Q", flagged, 0x1098)[0]
    assert round_checksum == 0x2062FF6A9F215015
    assert round_checksum == xxhash.xxh3_64_intdigest(flagged[0x48:0x68] + flagged[0x1068:0x1088])
    for value in ("0x11e049ca0e71487f", "0x2062ff6a9f215015"):
        assert value in SPEC.read_text()


def test_split_zero_runs_with_pages_larger_than_the_zero_buffer() -> None:
    big = 2 << 20
    ram = bytearray(3 * big)
    ram[big + big - 1] = 1
    assert split_zero_runs(ram, [(0, 3)], page_size=big) == [
        PageRun(0, 1, True),
        PageRun(1, 1, False),
        PageRun(2, 1, True),
    ]


# -- 1.1: streams whose data payloads are not hashed ---------------------------------------


def sample_unhashed_stream() -> bytes:
    """sample_stream()'s records, flagged: round checksums over the record headers only."""
    enc = PageStreamEncoder(LAYOUT, hash_payload=False)
    out = [enc.header()]
    out += [enc.data(PAGE, 2), page(1) + page(2)]
    enc.payload(page(1))
    enc.skip_payload(PAGE)
    out += [enc.zero(1 << 32, 3)]
    out += [enc.data((1 << 32) + 7 * PAGE, 1), page(3)]
    enc.skip_payload(PAGE)
    out += [enc.end_round()]
    out += [enc.data(0, 1), page(9)]
    enc.payload(page(9))
    out += [enc.end_round(), enc.end_round(), enc.end_stream()]
    return b"".join(out)


def test_an_unhashed_stream_is_1_1_with_flag_bit_0_and_hashed_streams_stay_1_0() -> None:
    data = sample_unhashed_stream()
    assert struct.unpack_from("<HH", data, 8) == (1, 1)
    assert struct.unpack_from("<I", data, 20)[0] == ps.FLAG_PAYLOAD_UNHASHED == 1
    assert struct.unpack_from("<HHxxxxxxxxI", sample_stream(), 8) == (1, 0, 0)
    events = decode_all(data, accept_unhashed=True)
    assert events[0] == StreamHeader(1, 1, PAGE, LAYOUT, ps.FLAG_PAYLOAD_UNHASHED)
    hashed = decode_all(sample_stream())
    assert [e for e in events[1:] if not isinstance(e, RoundEnd)] == [
        e for e in hashed[1:] if not isinstance(e, RoundEnd)
    ]
    assert apply(events) == apply(decode_all(sample_stream()))
    # the round checksum: xxh3_64 of the round's record headers only
    header_length = struct.unpack_from("<I", data, 12)[0]
    rec = data[header_length : header_length + 32]
    zero = data[header_length + 32 + 2 * PAGE : header_length + 64 + 2 * PAGE]
    rec2 = data[header_length + 64 + 2 * PAGE : header_length + 96 + 2 * PAGE]
    round0 = next(e for e in events if isinstance(e, RoundEnd))
    assert round0.checksum == xxhash.xxh3_64_intdigest(rec + zero + rec2)


def test_an_unhashed_stream_is_refused_at_its_header_unless_accepted() -> None:
    data = sample_unhashed_stream()
    dec = PageStreamDecoder()
    dec.feed(data)
    with pytest.raises(PageStreamError, match="not hashed") as info:
        dec.next_event()
    assert str(info.value).startswith("page stream header: ")
    assert dec.header is None  # nothing past the header: no page was handed out
    # a 1.0 reader refuses it as a newer version, accepted or not
    for accept in (False, True):
        with pytest.raises(PageStreamError, match=r"1\.1 is newer than this reader's 1\.0"):
            decode_all(data, supported=(1, 0), accept_unhashed=accept)


def test_a_1_0_header_with_the_flag_is_refused_as_unknown_flags() -> None:
    header = bytearray(ps.stream_header(LAYOUT, flags=1, version=(1, 0)))
    with pytest.raises(PageStreamError, match="unknown flags 0x1"):
        decode_all(bytes(header), accept_unhashed=True)
    with pytest.raises(PageStreamError, match="unknown flags 0x2"):
        decode_all(ps.stream_header(LAYOUT, flags=2, version=(1, 1)), accept_unhashed=True)
    with pytest.raises(ValueError, match="unknown page stream flags"):
        ps.stream_header(LAYOUT, flags=2)


def test_a_damaged_payload_of_an_unhashed_stream_is_not_detected() -> None:
    """What the flag gives up, stated as a test: the bytes of the pages are not checked."""
    data = bytearray(sample_unhashed_stream())
    header_length = struct.unpack_from("<I", data, 12)[0]
    data[header_length + 32 + 100] ^= 0xFF
    events = decode_all(bytes(data), accept_unhashed=True)
    assert all(e.ok for e in events if isinstance(e, RoundEnd))


@pytest.mark.parametrize("where", ["record header", "lost record", "reordered", "round number"])
def test_damaged_or_lost_records_of_an_unhashed_stream_are_refused(where: str) -> None:
    data = sample_unhashed_stream()
    header_length = struct.unpack_from("<I", data, 12)[0]
    first = header_length
    zero_at = header_length + 32 + 2 * PAGE
    zero = data[zero_at : zero_at + 32]
    third = data[zero_at + 32 : zero_at + 64 + PAGE]
    if where == "record header":
        bad = bytearray(data)
        bad[zero_at + 8] ^= 1  # its check32 no longer matches
        message = "fails its check"
    elif where == "lost record":
        bad = bytearray(data[:zero_at] + data[zero_at + 32 :])
        message = "checksum mismatch"
    elif where == "reordered":
        bad = bytearray(data[:zero_at] + third + zero + data[zero_at + 64 + PAGE :])
        message = "checksum mismatch"
    else:
        # a whole round dropped: the next END_OF_ROUND names another round
        round0_end = zero_at + 64 + PAGE
        bad = bytearray(data[:first] + data[round0_end + 32 :])
        message = "expected round 0|checksum mismatch"
    with pytest.raises(PageStreamError, match=message):
        decode_all(bytes(bad), accept_unhashed=True)


def test_a_truncated_unhashed_stream_is_refused_at_every_cut() -> None:
    data = sample_unhashed_stream()
    for cut in [*range(0, 200, 7), *range(len(data) - 200, len(data))]:
        with pytest.raises(PageStreamError, match=r": ends (inside|before|at byte) "):
            decode_all(data[:cut], chunk=777, accept_unhashed=True)


def test_feed_payload_of_an_unhashed_stream_counts_without_hashing() -> None:
    data = sample_unhashed_stream()
    header_length = struct.unpack_from("<I", data, 12)[0]
    dec = PageStreamDecoder(accept_unhashed=True)
    dec.feed(data[: header_length + 32])
    assert isinstance(dec.next_event(), StreamHeader)
    assert dec.next_event() is NEED_DATA
    assert dec.payload_left == 2 * PAGE
    dec.feed_payload(b"\xee" * (2 * PAGE))  # not what was sent: nobody can tell
    dec.feed(data[header_length + 32 + 2 * PAGE :] + b"")
    events = []
    while not dec.ended:
        event = dec.next_event()
        assert event is not NEED_DATA
        events.append(event)
    assert all(e.ok for e in events if isinstance(e, RoundEnd))


def test_the_encoder_of_a_hashed_stream_refuses_to_skip_payload() -> None:
    enc = PageStreamEncoder(LAYOUT)
    enc.header()
    enc.data(0, 1)
    with pytest.raises(ValueError, match="payload"):
        enc.skip_payload(PAGE)
    enc = PageStreamEncoder(LAYOUT, hash_payload=False)
    enc.header()
    enc.data(0, 1)
    with pytest.raises(ValueError, match="expected"):
        enc.skip_payload(PAGE + 1)

"""The page-stream receiver reads data runs straight into guest RAM (PageStreamDecoder's
``feed_payload``): it must end where the decoder's own verdict on the same bytes ends —
the same RAM for a good stream, ``bad-stream`` for a corrupt, truncated or out-of-layout
one, never another exception — and never read a byte past the stream's end."""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from vmipc.formats import (
    NEED_DATA,
    Checksum,
    DataRun,
    FormatError,
    PageStreamDecoder,
    PageStreamEncoder,
    StreamEnd,
    ZeroRun,
    checksum,
)
from vmipc.formats.pagestream import (
    data_record_header,
    end_of_round,
    end_of_stream,
    stream_header,
    zero_record,
)
from vmipc.memory_layout import MIB, PAGE_SIZE
from vmipc.vmm.kick import install_kick_handler
from vmipc.vmm.memory import GuestMemory
from vmipc.vmm.persist import BulkError, Transfer, receive_page_stream, send_page_stream
from vmipc.vmm.persist.statecodec import _STATE_HEADER, STATE_MAGIC, read_state_blob

SIZE = 16 * MIB
PAGES = SIZE // PAGE_SIZE
TRAILER = b"what follows the stream on the fd"


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    install_kick_handler()
    mem = GuestMemory(SIZE)
    yield mem
    mem.close()


def random_stream(rng: random.Random, layout: list[tuple[int, int]]) -> bytes:
    """A valid stream: 1-3 rounds of random data and zero runs (random page bytes)."""
    encoder = PageStreamEncoder(layout)
    out = bytearray(encoder.header())
    for _ in range(rng.randint(1, 3)):
        for _ in range(rng.randint(0, 6)):
            gpa, size = rng.choice(layout)
            pages = size // PAGE_SIZE
            first = rng.randrange(pages)
            npages = rng.randint(1, min(pages - first, 300))
            at = gpa + first * PAGE_SIZE
            if rng.random() < 0.3:
                out += encoder.zero(at, npages)
                continue
            out += encoder.data(at, npages)
            payload = rng.randbytes(npages * PAGE_SIZE)
            encoder.payload(payload)
            out += payload
        out += encoder.end_round()
    out += encoder.end_stream()
    return bytes(out)


def reference(stream: bytes, before: bytes, layout: list[tuple[int, int]]) -> bytes | None:
    """RAM after the stream as the plain decoder sees it (everything fed at once), or None
    when the decoder refuses the stream."""
    offsets = {}
    offset = 0
    for gpa, size in layout:
        offsets[gpa] = (size, offset)
        offset += size

    def at(gpa: int) -> int:
        for base, (size, start) in offsets.items():
            if base <= gpa < base + size:
                return start + gpa - base
        raise AssertionError(gpa)

    ram = bytearray(before)
    decoder = PageStreamDecoder(expect_layout=layout)
    decoder.feed(stream)
    decoder.feed(b"")
    try:
        while True:
            event = decoder.next_event()
            assert event is not NEED_DATA
            if isinstance(event, DataRun):
                start = at(event.gpa)
                ram[start : start + len(event.data)] = event.data
            elif isinstance(event, ZeroRun):
                start = at(event.gpa)
                ram[start : start + event.npages * PAGE_SIZE] = bytes(event.npages * PAGE_SIZE)
            elif isinstance(event, StreamEnd):
                return bytes(ram)
    except FormatError:
        return None


def receive(
    memory: GuestMemory,
    stream: bytes,
    rng: random.Random,
    *,
    close: bool,
    accept_unhashed: bool = False,
) -> tuple[BulkError | None, bytes]:
    """``receive_page_stream`` over a socket pair fed ``stream`` in random pieces, then
    TRAILER (or, with ``close``, end of input); (its error, what it left unread)."""
    left, right = socket.socketpair()
    pieces = []
    cursor = 0
    while cursor < len(stream):
        step = rng.choice([1, 7, 31, 32, 33, 4096, 5000, 65536, 1 << 20])
        pieces.append(stream[cursor : cursor + step])
        cursor += step
    if not close:
        pieces.append(TRAILER)

    def write() -> None:
        try:
            for piece in pieces:
                left.sendall(piece)
            if close:
                left.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the receiver refused the stream and went away

    writer = threading.Thread(target=write)
    writer.start()
    error: BulkError | None = None
    try:
        receive_page_stream(memory, right.fileno(), Transfer(), accept_unhashed=accept_unhashed)
    except BulkError as exc:
        error = exc
    left_over = b""
    if error is None and not close:
        right.settimeout(10)
        while len(left_over) < len(TRAILER):
            chunk = right.recv(len(TRAILER) - len(left_over))
            if not chunk:
                break
            left_over += chunk
    right.close()
    writer.join(30)
    left.close()
    assert not writer.is_alive()
    return error, left_over


@pytest.mark.parametrize("seed", range(12))
def test_a_good_stream_lands_in_ram_and_the_trailer_stays_on_the_fd(
    memory: GuestMemory, seed: int
) -> None:
    rng = random.Random(seed)
    layout = list(memory.ram_ranges())
    memory.view[:] = rng.randbytes(SIZE)
    before = bytes(memory.view)
    stream = random_stream(rng, layout)
    expected = reference(stream, before, layout)
    error, left_over = receive(memory, stream, rng, close=False)
    assert error is None
    assert left_over == TRAILER
    assert expected is not None and memory.view == expected


def mutate(rng: random.Random, stream: bytes) -> bytes:
    data = bytearray(stream)
    kind = rng.randrange(4)
    if kind == 0:  # flip bits anywhere: headers, records, payloads, checksums
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncated
        del data[rng.randrange(len(data)) :]
    elif kind == 2:  # a payload byte changed (caught only by the round checksum)
        at = rng.randrange(len(data))
        data[at] = (data[at] + 1) % 256
    else:  # a slice repeated or dropped
        at = rng.randrange(len(data))
        length = rng.randint(1, 8192)
        data[at:at] = data[at : at + length] if rng.random() < 0.5 else b""
        if rng.random() < 0.5:
            del data[at : at + length]
    return bytes(data)


@pytest.mark.parametrize("seed", range(60))
def test_a_mutated_stream_is_refused_as_the_decoder_refuses_it(
    memory: GuestMemory, seed: int
) -> None:
    rng = random.Random(1000 + seed)
    layout = list(memory.ram_ranges())
    memory.view[:] = rng.randbytes(SIZE)
    before = bytes(memory.view)
    stream = mutate(rng, random_stream(rng, layout))
    expected = reference(stream, before, layout)
    error, _ = receive(memory, stream, rng, close=True)
    if expected is None:
        assert error is not None and error.code == "bad-stream"
    else:  # a mutation that leaves a valid stream (e.g. cut after its end)
        assert error is None and memory.view == expected


def handmade(layout: list[tuple[int, int]], runs: list[tuple[int, int, bytes]]) -> bytes:
    """A stream of DATA runs (gpa, npages, payload) as given, with a correct round
    checksum: only the receiver's own checks stand in the way."""
    out = bytearray(stream_header(layout, PAGE_SIZE))
    digest = Checksum()
    for gpa, npages, payload in runs:
        record = data_record_header(gpa, npages) if payload else zero_record(gpa, npages)
        digest.update(record)
        digest.update(payload)
        out += record + payload
    out += end_of_round(0, digest.digest()) + end_of_stream(1)
    return bytes(out)


@pytest.mark.parametrize(
    ("gpa", "npages", "why"),
    [
        (SIZE, 1, "outside RAM"),  # just past the end
        (SIZE - PAGE_SIZE, 2, "outside RAM"),  # crossing the end
        (PAGE_SIZE // 2, 1, "not aligned"),
        (1 << 40, 1, "outside RAM"),
        (0, (1 << 32) - 1, "outside RAM"),  # a huge count: nothing read or allocated for it
    ],
)
def test_an_out_of_layout_run_is_refused_before_any_of_it_is_read(
    memory: GuestMemory, gpa: int, npages: int, why: str
) -> None:
    layout = list(memory.ram_ranges())
    memory.view[:] = b"\x5a" * SIZE
    # the run's header claims more than is sent: a receiver that read its payload first
    # would wait for bytes that never come, or write outside RAM
    stream = handmade(layout, [(gpa, npages, b"\xcc" * PAGE_SIZE)])
    error, _ = receive(memory, stream, random.Random(0), close=True)
    assert error is not None and error.code == "bad-stream" and why in str(error)
    assert memory.view == b"\x5a" * SIZE  # nothing landed anywhere


def test_a_payload_that_fails_the_round_checksum_is_refused(memory: GuestMemory) -> None:
    layout = list(memory.ram_ranges())
    good = handmade(layout, [(0, 4, b"\x11" * 4 * PAGE_SIZE)])
    bad = bytearray(good)
    bad[len(stream_header(layout, PAGE_SIZE)) + 32 + 5000] ^= 0xFF  # inside the payload
    error, _ = receive(memory, bytes(bad), random.Random(1), close=True)
    assert error is not None and error.code == "bad-stream" and "checksum mismatch" in str(error)


def test_a_stream_cut_inside_a_payload_is_truncated(memory: GuestMemory) -> None:
    layout = list(memory.ram_ranges())
    stream = handmade(layout, [(0, 8, b"\x22" * 8 * PAGE_SIZE)])
    cut = len(stream_header(layout, PAGE_SIZE)) + 32 + 3 * PAGE_SIZE + 17
    error, _ = receive(memory, stream[:cut], random.Random(2), close=True)
    assert error is not None and error.code == "bad-stream"
    assert "payload bytes missing" in str(error)


def test_two_ranges_a_run_in_the_high_one_lands_there() -> None:
    install_kick_handler()
    memory = GuestMemory(4 * 1024 * MIB)  # sparse: 3 GiB low, 1 GiB above the hole
    try:
        layout = list(memory.ram_ranges())
        assert len(layout) == 2
        high = layout[1][0]
        stream = handmade(layout, [(high + PAGE_SIZE, 2, b"\x33" * 2 * PAGE_SIZE)])
        error, left_over = receive(memory, stream, random.Random(3), close=False)
        assert error is None and left_over == TRAILER
        offset = memory.offset_of(high + PAGE_SIZE, 2 * PAGE_SIZE)
        assert memory.view[offset : offset + 2 * PAGE_SIZE] == b"\x33" * 2 * PAGE_SIZE
        crossing = handmade(layout, [(layout[0][1] - PAGE_SIZE, 2, b"\x44" * 2 * PAGE_SIZE)])
        error, _ = receive(memory, crossing, random.Random(4), close=True)
        assert error is not None and "outside RAM" in str(error)
    finally:
        memory.close()


def test_feed_payload_is_refused_outside_a_data_run_or_with_bytes_buffered() -> None:
    layout = [(0, 16 * PAGE_SIZE)]
    stream = handmade(layout, [(0, 2, b"\x55" * 2 * PAGE_SIZE)])
    decoder = PageStreamDecoder(expect_layout=layout)
    with pytest.raises(RuntimeError):
        decoder.feed_payload(b"x")  # before the header
    header_end = len(stream_header(layout, PAGE_SIZE))
    decoder.feed(stream[: header_end + 32 + 10])  # the record and 10 payload bytes
    decoder.next_event()  # the stream header
    event = decoder.next_event()
    assert isinstance(event, DataRun) and len(event.data) == 10
    assert decoder.payload_left == 2 * PAGE_SIZE - 10 and decoder.payload_gpa == 10
    with pytest.raises(ValueError):
        decoder.feed_payload(b"x" * (2 * PAGE_SIZE))  # more than the run has left
    decoder.feed_payload(stream[header_end + 42 : header_end + 32 + 2 * PAGE_SIZE])
    assert decoder.payload_left == 0
    with pytest.raises(RuntimeError):
        decoder.feed_payload(b"x")  # the run is complete
    decoder.feed(stream[header_end + 32 + 2 * PAGE_SIZE :])
    events = [decoder.next_event() for _ in range(2)]
    assert isinstance(events[1], StreamEnd)  # the round checksum held over both paths


def test_the_state_blob_is_read_in_place_and_not_past_its_end() -> None:
    install_kick_handler()
    payload = os.urandom(200_000)  # past the first 64 KiB read: the buffer grows
    blob = _STATE_HEADER.pack(STATE_MAGIC, len(payload), checksum(payload) ^ 1) + payload
    left, right = socket.socketpair()
    try:
        left.sendall(blob[:100])
        writer = threading.Thread(target=lambda: left.sendall(blob[100:] + TRAILER))
        writer.start()
        with pytest.raises(BulkError, match="checksum mismatch"):
            read_state_blob(right.fileno(), Transfer())
        writer.join(10)
        right.settimeout(10)
        assert right.recv(len(TRAILER), socket.MSG_WAITALL) == TRAILER
    finally:
        left.close()
        right.close()


@pytest.mark.parametrize("consistent", [True, False])
@pytest.mark.parametrize("kind", ["socket", "pipe"])
def test_a_sent_stream_of_many_small_runs_arrives_whole(
    memory: GuestMemory, consistent: bool, kind: str
) -> None:
    """The sender gathers records (zero runs, data headers) into one write, and from a
    running guest copies each run behind them into one reused buffer: thousands of
    separate zero runs (more record bytes than one gathering holds), single data pages and
    long runs all arrive, and the receiver ends with the same RAM."""
    rng = random.Random(7)
    source = GuestMemory(SIZE)
    try:
        data_pages = set(rng.sample(range(PAGES // 2, PAGES), 600))
        for page in range(PAGES // 2, PAGES):
            if page in data_pages:
                source.view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = rng.randbytes(PAGE_SIZE)
        runs = [(page, 1) for page in range(0, PAGES // 2, 2)]  # 2048 zero records
        runs += [(PAGES // 2, PAGES // 2)]  # data and zero pages mixed, then long runs
        memory.view[:] = b"\xee" * SIZE
        if kind == "socket":
            left, right = socket.socketpair()
            out, into = left.fileno(), right.fileno()
        else:
            into, out = os.pipe()
        received: list[Any] = []

        def receive() -> None:
            try:
                received.append(receive_page_stream(memory, into, Transfer()))
            except BaseException as exc:  # reported below
                received.append(exc)

        reader = threading.Thread(target=receive)
        reader.start()
        stats = send_page_stream(source, out, Transfer(), consistent=consistent, runs=[runs])
        reader.join(30)
        assert not isinstance(received[0], BaseException), received[0]
        assert received[0].data_pages == stats.data_pages == len(data_pages)
        assert received[0].zero_pages == stats.zero_pages
        assert stats.zero_pages == PAGES // 4 + PAGES // 2 - len(data_pages)
        for first, count in runs:
            span = slice(first * PAGE_SIZE, (first + count) * PAGE_SIZE)
            assert memory.view[span] == source.view[span]
        for page in range(1, PAGES // 2, 2):  # not in any run: untouched
            assert memory.view[page * PAGE_SIZE] == 0xEE
    finally:
        source.close()
        if kind == "socket":
            left.close()
            right.close()
        else:
            os.close(into)
            os.close(out)


# -- format 1.1: streams whose payloads are not hashed -----------------------------------------


def unhashed(layout: list[tuple[int, int]], runs: list[tuple[int, int, bytes]]) -> bytes:
    """A flagged stream of DATA runs (gpa, npages, payload): round checksum over the record
    headers only."""
    encoder = PageStreamEncoder(layout, hash_payload=False)
    out = bytearray(encoder.header())
    for gpa, npages, payload in runs:
        out += encoder.data(gpa, npages) + payload
        encoder.skip_payload(len(payload))
    return bytes(out + encoder.end_round() + encoder.end_stream())


def test_an_unhashed_stream_is_refused_before_any_page_unless_accepted(
    memory: GuestMemory,
) -> None:
    layout = list(memory.ram_ranges())
    memory.view[:] = b"\x5a" * SIZE
    stream = unhashed(
        layout, [(0, 4, b"\x11" * 4 * PAGE_SIZE), (SIZE // 2, 1, b"\x22" * PAGE_SIZE)]
    )
    error, _ = receive(memory, stream, random.Random(5), close=True)
    assert error is not None and error.code == "bad-stream" and "not hashed" in str(error)
    assert memory.view == b"\x5a" * SIZE  # nothing landed anywhere
    error, left_over = receive(memory, stream, random.Random(6), close=False, accept_unhashed=True)
    assert error is None and left_over == TRAILER
    assert memory.view[: 4 * PAGE_SIZE] == b"\x11" * 4 * PAGE_SIZE
    assert memory.view[SIZE // 2 : SIZE // 2 + PAGE_SIZE] == b"\x22" * PAGE_SIZE
    assert memory.view[4 * PAGE_SIZE : SIZE // 2] == b"\x5a" * (SIZE // 2 - 4 * PAGE_SIZE)


@pytest.mark.parametrize("damage", ["record check", "round lost", "cut in payload", "cut at end"])
def test_an_accepted_unhashed_stream_still_refuses_damaged_records_and_truncation(
    memory: GuestMemory, damage: str
) -> None:
    layout = list(memory.ram_ranges())
    stream = bytearray(
        unhashed(layout, [(0, 2, b"\x11" * 2 * PAGE_SIZE), (0, 1, b"\x33" * PAGE_SIZE)])
    )
    header = len(stream_header(layout, PAGE_SIZE))
    second = header + 32 + 2 * PAGE_SIZE
    if damage == "record check":
        stream[second + 9] ^= 0x01  # the second run's gpa: fails its check32
        why = "fails its check"
    elif damage == "round lost":
        del stream[second : second + 32 + PAGE_SIZE]  # a whole record and its payload
        why = "checksum mismatch"
    elif damage == "cut in payload":
        del stream[second + 32 + 100 :]
        why = "payload bytes missing"
    else:
        del stream[-32:]  # no end of stream
        why = "without an end-of-stream record"
    error, _ = receive(memory, bytes(stream), random.Random(7), close=True, accept_unhashed=True)
    assert error is not None and error.code == "bad-stream" and why in str(error), error


@pytest.mark.parametrize("seed", range(6))
def test_a_mutated_unhashed_stream_is_refused_as_the_decoder_refuses_it(
    memory: GuestMemory, seed: int
) -> None:
    """The receiver's verdict on a flagged stream is the decoder's (told to accept it)."""
    rng = random.Random(1000 + seed)
    layout = list(memory.ram_ranges())
    runs = []
    for _ in range(rng.randint(1, 5)):
        npages = rng.randint(1, 40)
        first = rng.randrange(PAGES - npages)
        runs.append((first * PAGE_SIZE, npages, rng.randbytes(npages * PAGE_SIZE)))
    stream = unhashed(layout, runs)
    cut = rng.randrange(len(stream))
    mutated = bytearray(stream[:cut] if rng.random() < 0.5 else stream)
    if len(mutated) == len(stream):
        mutated[rng.randrange(len(stream))] ^= 1 << rng.randrange(8)
    memory.view[:] = b"\x00" * SIZE
    decoder = PageStreamDecoder(expect_layout=layout, accept_unhashed=True)
    decoder.feed(bytes(mutated))
    decoder.feed(b"")
    try:
        while not isinstance(decoder.next_event(), StreamEnd):
            pass
        refused = False
    except FormatError:
        refused = True
    error, _ = receive(memory, bytes(mutated), rng, close=True, accept_unhashed=True)
    assert (error is not None) == refused, error

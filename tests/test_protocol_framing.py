"""Framing and fd-to-frame assignment, with byte strings and made-up fd numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmipc.protocol import (
    HEADER_SIZE,
    FrameDecoder,
    LocalProtocolError,
    RemoteProtocolError,
    encode_frame,
)


def frames_of(decoder: FrameDecoder) -> list[tuple[bytes, list[int], bool]]:
    out = []
    while (f := decoder.next_frame()) is not None:
        out.append((f.payload, f.fds, f.fds_truncated))
    return out


def test_round_trip_whole_and_split() -> None:
    data = encode_frame(b"hello") + encode_frame(b"") + encode_frame(b"x" * 300)
    whole = FrameDecoder()
    whole.feed(data)
    assert [p for p, _, _ in frames_of(whole)] == [b"hello", b"", b"x" * 300]
    split = FrameDecoder()
    got = []
    for i in range(len(data)):
        split.feed(data[i : i + 1])
        got += [p for p, _, _ in frames_of(split)]
    assert got == [b"hello", b"", b"x" * 300]
    assert split.buffered == 0


@given(st.lists(st.binary(max_size=64), max_size=8), st.data())
def test_any_chunking_gives_the_same_frames(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    got: list[bytes] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        decoder.feed(stream[prev:cut])
        prev = cut
        got += [p for p, _, _ in frames_of(decoder)]
    assert got == payloads
    decoder.feed_eof()


def test_oversized_frame_refused_from_its_header_alone() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    decoder.feed((101).to_bytes(4, "big"))  # no payload at all yet
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == "frame-too-large"
    assert info.value.details == {"size": 101, "limit": 100}
    decoder.feed(b"more", [7])  # a broken decoder takes nothing more
    assert decoder.next_frame() is None
    assert decoder.release_fds() == [7]


def test_encode_refuses_oversized_payload() -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(b"x" * 11, max_frame_size=10)
    assert info.value.code == "frame-too-large"
    assert len(encode_frame(b"x" * 10, max_frame_size=10)) == 10 + HEADER_SIZE


def test_eof_inside_a_frame_is_a_remote_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"abc")[:-1])
    assert decoder.next_frame() is None
    with pytest.raises(RemoteProtocolError):
        decoder.feed_eof()
    clean = FrameDecoder()
    clean.feed(encode_frame(b"abc"))
    frames_of(clean)
    clean.feed_eof()


def test_fds_go_to_the_frame_starting_in_their_chunk() -> None:
    a, b, c = encode_frame(b"A" * 10), encode_frame(b"B" * 10), encode_frame(b"C" * 10)
    decoder = FrameDecoder()
    # as Linux delivers it: A without fds; then the tail-less B with its fds at its start
    decoder.feed(a)
    decoder.feed(b, [10, 11])
    decoder.feed(c)
    assert frames_of(decoder) == [
        (b"A" * 10, [], False),
        (b"B" * 10, [10, 11], False),
        (b"C" * 10, [], False),
    ]
    assert decoder.take_discarded_fds() == []


def test_fds_in_a_chunk_that_also_ends_an_earlier_frame() -> None:
    a, b = encode_frame(b"A" * 10), encode_frame(b"B" * 10)
    decoder = FrameDecoder()
    decoder.feed(a[:5])
    decoder.feed(a[5:] + b[:3], [4])  # tail of A, then the start of B (which carried fd 4)
    assert frames_of(decoder) == [(b"A" * 10, [], False)]
    decoder.feed(b[3:])
    assert frames_of(decoder) == [(b"B" * 10, [4], False)]


def test_fds_with_no_frame_start_are_discarded() -> None:
    a = encode_frame(b"A" * 10)
    decoder = FrameDecoder()
    decoder.feed(a[:6])
    decoder.feed(a[6:9], [5])  # in the middle of A: no frame starts here
    decoder.feed(a[9:])
    assert frames_of(decoder) == [(b"A" * 10, [], False)]
    assert decoder.take_discarded_fds() == [5]


def test_two_frames_in_one_chunk_fds_go_to_the_last() -> None:
    # a sender that broke the rule (several frames in one sendmsg with fds): the
    # fds go to the last frame starting in the chunk, whose names must then match them
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"1") + encode_frame(b"2"), [9])
    assert frames_of(decoder) == [(b"1", [], False), (b"2", [9], False)]


def test_truncation_and_fd_limit_flag_the_frame() -> None:
    decoder = FrameDecoder(max_fds=2)
    decoder.feed(encode_frame(b"x"), [1, 2], fds_truncated=True)
    decoder.feed(encode_frame(b"y"), [3, 4, 5])
    assert frames_of(decoder) == [(b"x", [1, 2], True), (b"y", [3, 4, 5], True)]


def test_fds_without_bytes_are_discarded_and_release_returns_pending() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"", [3])
    assert decoder.take_discarded_fds() == [3]
    decoder.feed(encode_frame(b"abc")[:2], [8])
    assert decoder.next_frame() is None
    assert decoder.release_fds() == [8]

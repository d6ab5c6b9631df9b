"""File descriptors passed with SCM_RIGHTS: used by name, checked for kind, never leaked.

``serving()`` fails the test if the server still holds any fd when its clients are gone.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pytest

from tests.control_support import serving
from vmipc.protocol import Result, encode_frame, pack
from vmipc.server import ServerConfig


@contextmanager
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        yield r, w
    finally:
        for fd in (r, w):
            with suppress(OSError):
                os.close(fd)


def test_an_out_fd_is_written_and_released() -> None:
    with serving() as s, s.connect() as c, pipe() as (r, w):
        rid = c.request("test-write", [w], args={"data": b"hello"}, fds=["out"])
        assert c.result(rid) == {"written": 5}
        os.close(w)
        # the server closed its copy too: the reader sees EOF after the data
        assert os.read(r, 100) == b"hello"
        assert os.read(r, 100) == b""


def test_an_in_fd_is_read() -> None:
    with serving() as s, s.connect() as c, pipe() as (r, w):
        os.write(w, b"payload")
        os.close(w)  # the writer is gone but data is left: still a usable in fd
        rid = c.request("test-read", [r], args={"size": 100}, fds=["in"])
        assert c.result(rid) == {"data": b"payload"}


def test_several_fds_are_matched_by_name_in_attachment_order() -> None:
    with serving() as s, s.connect() as c, pipe() as (r1, w1), pipe() as (r2, w2):
        c.request("test-write", [w2], args={"data": b"two"}, fds=["out"])
        rid = c.request("test-write", [w1], args={"data": b"one"}, fds=["out"])
        c.result(rid)
        assert os.read(r1, 10) == b"one"
        assert os.read(r2, 10) == b"two"


@contextmanager
def bad_fd(kind: str) -> Iterator[int]:
    if kind == "directory":
        fd = os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY)
        yield fd
        os.close(fd)
    elif kind == "read-only file":
        fd = os.open("/proc/self/stat", os.O_RDONLY)
        yield fd
        os.close(fd)
    elif kind == "O_PATH":
        fd = os.open("/proc/self/stat", os.O_PATH)
        yield fd
        os.close(fd)
    elif kind == "pipe with no reader":
        with pipe() as (r, w):
            os.close(r)
            yield w
    elif kind == "closed socket":
        a, b = socket.socketpair()
        b.close()
        yield a.fileno()
        a.close()
    elif kind == "unconnected socket":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        yield sock.fileno()
        sock.close()
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "command", "direction", "problem"),
    [
        ("directory", "test-write", "out", "is a directory"),
        ("directory", "test-read", "in", "is a directory"),
        ("read-only file", "test-write", "out", "is not open for writing"),
        ("O_PATH", "test-read", "in", "is an O_PATH fd, which cannot be read or written"),
        ("pipe with no reader", "test-write", "out", "has its other end closed"),
        ("closed socket", "test-write", "out", "has its other end closed"),
        ("unconnected socket", "test-read", "in", "has its other end closed and nothing left"),
    ],
)
def test_fds_of_the_wrong_kind_are_invalid_fds(
    kind: str, command: str, direction: str, problem: str
) -> None:
    name = "out" if direction == "out" else "in"
    with serving() as s, s.connect() as c, bad_fd(kind) as fd:
        args = {"data": b"x"} if command == "test-write" else {}
        err = c.error(c.request(command, [fd], args=args, fds=[name]))
        assert err.error.code == "invalid-fds"
        assert err.error.details["fd"] == name
        assert err.error.details["problem"].startswith(problem)
        assert err.error.message.startswith(f"{command}: fd {name!r} ({direction}) {problem}")


def test_a_write_only_fd_is_not_an_in_fd() -> None:
    with serving() as s, s.connect() as c, pipe() as (_, w):
        err = c.error(c.request("test-read", [w], fds=["in"]))
        assert (err.error.code, err.error.details["problem"]) == (
            "invalid-fds",
            "is not open for reading",
        )


@pytest.mark.parametrize(
    ("names", "attached", "problem"),
    [
        (["out"], 0, "the request names 1 fds but 0 are attached"),
        (["out"], 2, "the request names 1 fds but 2 are attached"),
        ([], 1, "the request names 0 fds but 1 are attached"),
        (["out", "out"], 2, "named twice"),
        (["elsewhere"], 1, "test-write takes no fd named 'elsewhere'"),
    ],
)
def test_fd_count_and_name_mismatches(names: list[str], attached: int, problem: str) -> None:
    with serving() as s, s.connect() as c, pipe() as (r, w):
        fds = [w, os.dup(w)] if attached == 2 else [w][:attached]
        try:
            err = c.error(c.request("test-write", fds, args={"data": b"x"}, fds=names))
        finally:
            for extra in fds[1:]:
                os.close(extra)
        assert err.error.code == "invalid-fds"
        assert err.error.details["problem"] == problem
        os.close(w)
        assert os.read(r, 10) == b"", "a refused fd was used or kept"


def test_a_missing_required_fd() -> None:
    with serving() as s, s.connect() as c:
        err = c.error(c.request("test-write", args={"data": b"x"}))
        assert err.error.code == "invalid-fds"
        assert err.error.details == {"fd": "out", "problem": "missing required fd"}


def test_fds_on_a_refused_request_are_closed() -> None:
    with serving() as s, s.connect() as c, pipe() as (r, w):
        # unknown command, bad arguments, bad msgpack: every fd goes back to the kernel
        c.error(c.request("no-such-command", [w], fds=["out"]))
        c.error(c.request("test-write", [w], args={"data": 3}, fds=["out"]))
        c.send_raw(encode_frame(b"\xc1"), [w])
        c.error(None)
        os.close(w)
        assert os.read(r, 10) == b""


def test_more_fds_than_the_limit_is_limit_exceeded() -> None:
    with serving(ServerConfig(max_fds_per_request=2)) as s, s.connect() as c, pipe() as (r, w):
        extra = [os.dup(w) for _ in range(5)]
        try:
            err = c.error(c.request("test-write", extra, args={"data": b"x"}, fds=["out"] * 5))
        finally:
            for fd in extra:
                os.close(fd)
        assert err.error.code == "limit-exceeded"
        assert err.error.details == {"limit": "max_fds_per_request", "value": 2}
        os.close(w)
        assert os.read(r, 10) == b""


def test_fds_sent_in_the_middle_of_a_frame_are_closed() -> None:
    with serving() as s, s.connect() as c, pipe() as (r, w):
        frame = encode_frame(pack({"type": "request", "id": 1, "command": "query-status"}))
        c.send_raw(frame[:6])
        time.sleep(0.05)  # let the server read the first part on its own
        c.send_raw(frame[6:], [w])  # no frame starts in these bytes: nobody owns the fd
        reply = c.reply(1)
        # usually the fd is an orphan and closed; if the kernel handed both parts to one
        # recvmsg(), the frame claims it and is refused. Either way it is never used.
        assert isinstance(reply, Result) or reply.error.code == "invalid-fds"
        os.close(w)
        assert os.read(r, 10) == b""


def test_fds_of_a_frame_cut_off_by_disconnect_are_closed() -> None:
    with serving() as s, pipe() as (r, w):
        with s.connect() as c:
            frame = encode_frame(
                pack(
                    {
                        "type": "request",
                        "id": 1,
                        "command": "test-write",
                        "args": {"data": b"x"},
                        "fds": ["out"],
                    }
                )
            )
            c.send_raw(frame[:10], [w])
        s.wait_connections(0)
        os.close(w)
        assert os.read(r, 10) == b""

"""Hostile peers against a real VMM process (``vmipc vmm`` with a read-only socket).

Every attack here comes from an allowed peer, most of them on the read-only socket and
many before ``hello``: one frame must not kill the VMM, a connection must not make it hold
fds or memory without bound, and one connection's decoding must not stall the others. The
VMM's fds and memory are read from /proc; the guest must keep running throughout.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.control_support import RawConnection, short_tmpdir
from tests.seq_support import VCPUS, VmmProcess, wait_for
from vmipc.protocol import Error, Result, decode_message, encode_frame, pack

pytestmark = pytest.mark.kvm

#: what an error reply to a hostile request may take at most (it never echoes much)
SMALL_REPLY = 1024
HEADER = struct.Struct(">I")


@contextlib.contextmanager
def vmm_with_monitor() -> Iterator[tuple[VmmProcess, str]]:
    """A guest VMM with its control socket and a read-only socket; yields (vmm, ro path)."""
    with short_tmpdir() as tmp:
        ro = os.path.join(tmp, "ro.sock")
        args = ["--guest", "builtin", "--vcpus", str(VCPUS), "--memory", "64M"]
        vmm = VmmProcess(tmp, "vm", [*args, "--readonly-socket", ro], [])
        try:
            wait_for(lambda: os.path.exists(ro), what="the read-only socket")
            vmm.wait_for_passes(1)
            yield vmm, ro
        finally:
            vmm.stop()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def settled_memory(pid: int, timeout: float = 15) -> dict[str, int]:
    """VmRSS and VmHWM once VmHWM stopped growing for a second (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    last = memory_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = memory_kib(pid)
        if now["VmHWM"] == last["VmHWM"]:
            return now
        last = now
    return last


def still_running(vmm: VmmProcess) -> None:
    """The VMM is alive, answers, and its guest keeps making progress."""
    assert vmm.alive(), f"the VMM died: {vmm.stderr.read_text()[-2000:]}"
    before = max(vmm.passes().values())
    with vmm.client(10) as client:
        assert client.query_status()["state"] == "running"
    vmm.wait_for_passes(before + 1)


def raw_reply(c: RawConnection, rid: int | None) -> tuple[Result | Error | None, int]:
    """The reply to ``rid`` (or the first error with no id) and the size of the largest
    frame seen; (None, size) when the server closed the connection first."""
    biggest = 0
    while True:
        try:
            data = c.sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        if not data:
            return None, biggest
        c.decoder.feed(data)
        while (frame := c.decoder.next_frame()) is not None:
            biggest = max(biggest, len(frame.payload))
            msg = decode_message(frame.payload, allowed=frozenset({"result", "error", "event"}))
            if isinstance(msg, Result | Error) and msg.id in (rid, None):
                return msg, biggest


# --- 1. one frame must not kill the VMM ------------------------------------------------

BIG = 600_000
#: requests whose error replies echo (part of) the request; before ``hello`` or after it
ECHOING: list[tuple[str, bool, dict[str, Any]]] = [
    ("unknown message type", False, {"type": "t" * BIG, "id": 1}),
    ("unknown key", False, {"type": "request", "id": 1, "command": "hello", "k" * BIG: 1}),
    ("bad id", False, {"type": "request", "id": "i" * BIG, "command": "hello"}),
    ("refused hello", False, {"type": "request", "id": 1, "command": "hello",
                              "args": {"versions": [2] * (BIG // 2)}}),
    ("unknown argument", False, {"type": "request", "id": 1, "command": "hello",
                                 "args": {"versions": [1], "a" * BIG: 1}}),
    ("unknown command", True, {"type": "request", "id": 2, "command": "c" * BIG}),
    ("unknown event", True, {"type": "request", "id": 2, "command": "subscribe",
                             "args": {"events": ["e" * BIG]}}),
    ("unknown fd name", True, {"type": "request", "id": 2, "command": "query-status",
                               "fds": ["f" * BIG]}),
]  # fmt: skip


def _shrunk(message: dict[str, Any], size: int) -> dict[str, Any]:
    """``message`` with every BIG string or list cut to ``size`` (so it fits a request)."""

    def cut(value: Any) -> Any:
        if isinstance(value, str) and len(value) == BIG:
            return value[:size]
        if isinstance(value, list):
            return [cut(v) for v in value[: size // 2]]
        if isinstance(value, dict):
            return {cut(k): cut(v) for k, v in value.items()}
        return value

    return cut(message)  # type: ignore[no-any-return]


def test_no_single_frame_kills_the_vmm() -> None:
    with vmm_with_monitor() as (vmm, ro):
        for name, after_hello, message in ECHOING:
            # over the request limit, and under it (and under the limit of a string)
            for size in (BIG, 1000):
                with RawConnection(ro, timeout=20) as c:
                    if after_hello:
                        c.hello()
                    rid = message.get("id") if isinstance(message.get("id"), int) else None
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        c.send(message if size == BIG else _shrunk(message, size))
                    reply, biggest = raw_reply(c, rid)
                state = vmm.state()
                vmm.proc.poll()
                assert state == "running", (
                    f"{name}: the VMM is {state} (exit status {vmm.proc.returncode}): "
                    f"{vmm.stderr.read_text()[-3000:]}"
                )
                assert biggest <= SMALL_REPLY, f"{name} ({size}): a reply of {biggest} bytes"
                if size == BIG:
                    # refused from its header, larger than any request can be, and the
                    # connection closed (the error may be lost if the kernel resets first)
                    code = reply.error.code if isinstance(reply, Error) else None
                    assert reply is None or code == "frame-too-large", (name, reply)
                else:
                    assert isinstance(reply, Error), (name, reply)
        still_running(vmm)


# --- 2. fds of an unfinished frame ---------------------------------------------------


def test_fds_sent_with_every_byte_of_one_frame_are_not_hoarded() -> None:
    with vmm_with_monitor() as (vmm, ro):
        baseline = fd_count(vmm.pid)
        peak = baseline
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            with RawConnection(ro) as c:  # no hello: anybody allowed on the socket can
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [devnull] * 8))]
                # a frame allowed to be this long; its bytes trickle in, 8 fds with each
                c.sock.sendmsg([HEADER.pack(4000)], anc)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    for sent in range(1, 600):
                        c.sock.sendmsg([b"\x00"], anc)
                        if sent % 50 == 0:
                            time.sleep(0.05)
                            peak = max(peak, fd_count(vmm.pid))
                time.sleep(0.2)
                peak = max(peak, fd_count(vmm.pid))
                print(f"VMM fds: {baseline} before, {peak} at most while fds trickled in")
                assert peak <= baseline + 2 * 8 + 4, f"the VMM went from {baseline} to {peak} fds"
                # the connection was broken with a clear error, not left hanging
                reply, _ = raw_reply(c, None)
                assert isinstance(reply, Error) and reply.error.code == "too-many-fds", reply
        finally:
            os.close(devnull)
        wait_for(lambda: fd_count(vmm.pid) <= baseline, what="the VMM to close the fds")
        still_running(vmm)


# --- 5. replies nobody reads ---------------------------------------------------------


def test_unread_replies_are_bounded_in_bytes() -> None:
    with vmm_with_monitor() as (vmm, ro):
        before = memory_kib(vmm.pid)
        conns: list[RawConnection] = []
        try:
            for _ in range(32):
                c = RawConnection(ro, timeout=0.5)
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                c.hello()
                conns.append(c)
            # ~25 KB answers, never read, in batches under the in-flight limit (so that
            # they are answered, not refused); a client stops when the VMM stops reading it
            blocked: set[int] = set()
            for batch in range(12):
                for n, c in enumerate(conns):
                    if n in blocked:
                        continue
                    frames = [
                        encode_frame(
                            pack(
                                {
                                    "type": "request",
                                    "id": batch * 30 + i,
                                    "command": "query-commands",
                                }
                            )
                        )
                        for i in range(30)
                    ]
                    try:
                        c.sock.sendall(b"".join(frames))
                    except (TimeoutError, BlockingIOError):
                        blocked.add(n)
                time.sleep(0.1)
            after = settled_memory(vmm.pid)
            grown = (after["VmHWM"] - before["VmHWM"]) / 1024
            print(f"VmHWM {before['VmHWM']} -> {after['VmHWM']} KiB (+{grown:.1f} MiB)")
            assert vmm.alive()
            # 32 x (2 MiB queued + one 25 KB reply) ~ 65 MiB at most, plus slack
            assert grown < 100, f"unread replies pinned {grown:.0f} MiB"
        finally:
            for c in conns:
                c.close()
        still_running(vmm)


# --- 6. one connection's decoding must not stall the others --------------------------


def _nested_arrays(size: int, width: int = 64) -> bytes:
    """A msgpack payload of about ``size`` bytes of nested arrays, each within ``width``:
    as many objects as bytes, and no single array over the limit."""
    leaf = bytes([0x90 + 15]) + b"\x90" * 15  # fixarray of 15 empty arrays
    level = b"\xdc" + width.to_bytes(2, "big") + leaf * width
    count = max(1, min(width, (size - 3) // len(level)))
    return b"\xdc" + count.to_bytes(2, "big") + level * count


def test_hostile_decoding_is_refused_by_structure_and_does_not_stall_the_others() -> None:
    million = b"\xdd" + (1_000_000).to_bytes(4, "big") + b"\x90" * 1_000_000
    with vmm_with_monitor() as (vmm, ro):
        with RawConnection(ro, timeout=20) as c:
            limits = c.hello()["limits"]
            request_limit = limits["max_request_size"]
            # a million empty arrays: refused from the frame header, never decoded
            c.send_raw(HEADER.pack(len(million)) + million[:1000])
            reply, _ = raw_reply(c, None)
            assert isinstance(reply, Error) and reply.error.code == "frame-too-large", reply
            assert reply.error.details["limit"] == request_limit
        with RawConnection(ro, timeout=20) as c:
            c.hello()
            # one flat array as long as the request limit allows: refused by its length
            n = request_limit - 5
            c.send_raw(HEADER.pack(n + 5) + b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n)
            reply = c.reply(None)
            assert isinstance(reply, Error) and reply.error.code == "invalid-message", reply
            assert "max_array_len" in reply.error.message
            assert c.result(c.request("query-status"))["state"] == "running"

        # a flood of the worst frames that fit, while another client queries
        hostile = encode_frame(_nested_arrays(request_limit))
        stop = threading.Event()
        refused = [0]

        def flood() -> None:
            with RawConnection(ro, timeout=20) as f:
                f.hello()
                while not stop.is_set():
                    f.send_raw(hostile)
                    reply = f.reply(None)
                    assert isinstance(reply, Error)
                    refused[0] += 1

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        latencies: list[float] = []
        try:
            with vmm.client(20) as client:
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    start = time.monotonic()
                    assert client.query_status()["state"] == "running"
                    latencies.append(time.monotonic() - start)
        finally:
            stop.set()
            flooder.join(20)
        assert not flooder.is_alive()
        assert refused[0] > 0 and latencies
        latencies.sort()
        print(
            f"{refused[0]} hostile frames of {len(hostile)} bytes; query-status meanwhile: "
            f"median {latencies[len(latencies) // 2] * 1000:.2f} ms, "
            f"max {latencies[-1] * 1000:.2f} ms over {len(latencies)}"
        )
        still_running(vmm)

"""The TLS bulk relay (sequences/_relay.py) between two threads' TLS ends on loopback,
with stand-ins for the VMMs (each dups the fd it is given, as SCM_RIGHTS would): what a
"VMM" writes arrives intact; the end of a stream is seen as soon as the writing VMM
closes its fd, before its reply; a dump that fails before writing ends the stream with
ABORT and the receiver fails."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from vmipc.sequences._net import encode_frame, recv_frame, send_frame
from vmipc.sequences._relay import (
    STEP,
    Aborted,
    End,
    in_thread,
    receive_chunks,
    relay,
    send_chunks,
)
from vmipc.sequences._tls import Credentials, client_context, server_context

TOKEN = b"relay-test-token-0123456789"


def tls_pair() -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """(sender's end, receiver's end) of a TLS 1.3 connection on loopback."""
    creds = Credentials(token=TOKEN)
    server, _ = server_context(creds)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        accepted: list[ssl.SSLSocket] = []

        def accept() -> None:
            conn, _ = listener.accept()
            accepted.append(server.wrap_socket(conn, server_side=True))

        thread = threading.Thread(target=accept)
        thread.start()
        raw = socket.create_connection(listener.getsockname())
        sender = client_context(creds).wrap_socket(raw)
        thread.join(10)
    return sender, accepted[0]


def vmm_writes(data: bytes, then: Callable[[], Awaitable[None]] | None = None) -> Any:
    """A dump: writes ``data`` to its own copy of the fd and closes it, then ``then``."""

    async def dump(fd: int) -> dict[str, int]:
        mine = os.dup(fd)

        def write() -> None:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(mine, view) :]
            finally:
                os.close(mine)

        await trio.to_thread.run_sync(write)
        if then is not None:
            await then()
        return {"bytes": len(data)}

    return dump


def vmm_reads(into: bytearray, done: trio.Event | None = None) -> Any:
    """A load: reads its own copy of the fd to its end."""

    async def load(fd: int) -> dict[str, int]:
        mine = os.dup(fd)

        def read() -> None:
            try:
                while chunk := os.read(mine, 1 << 20):
                    into.extend(chunk)
            finally:
                os.close(mine)

        await trio.to_thread.run_sync(read)
        if done is not None:
            done.set()
        return {"bytes": len(into)}

    return load


async def transfer(
    sender: ssl.SSLSocket, receiver: ssl.SSLSocket, dump: Any, load: Any
) -> tuple[Any, Any, Any, Any]:
    """One transfer as TcpDestination.transfer and receive() run it; returns the sender's
    (dump, relayed) and the receiver's (loaded, relayed) Outcomes."""
    failed = threading.Event()
    results: dict[str, Any] = {}

    def relay_and_reply(ours: End, theirs: End) -> dict[str, Any]:
        send_chunks(sender, ours, theirs, failed, encode_frame({"op": "pages"}))
        return recv_frame(sender)

    async def sending() -> None:
        results["sent"] = await relay(
            sender, vmm_call=dump, copy=relay_and_reply, failed=failed, grace=2
        )

    async def receiving() -> None:
        frame = await in_thread(receiver, lambda: recv_frame(receiver))
        assert frame == {"op": "pages"}
        loaded, relayed = await relay(
            receiver,
            vmm_call=load,
            copy=lambda ours, _theirs: receive_chunks(receiver, ours),
            failed=threading.Event(),
            grace=5,
            after=10,
        )
        results["received"] = (loaded, relayed)
        ok = loaded.error is None and relayed.error is None
        await in_thread(receiver, lambda: send_frame(receiver, {"ok": ok}))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sending)
            nursery.start_soon(receiving)
    return (*results["sent"], *results["received"])


def test_what_the_vmm_writes_arrives_intact() -> None:
    data = os.urandom(5 * STEP + 12345)
    got = bytearray()
    sender, receiver = tls_pair()
    try:
        dump, sent, loaded, relayed = trio.run(
            transfer, sender, receiver, vmm_writes(data), vmm_reads(got)
        )
    finally:
        sender.close()
        receiver.close()
    assert dump.error is None and sent.error is None and sent.value == {"ok": True}
    assert loaded.error is None and relayed.error is None
    assert relayed.value == len(data) and bytes(got) == data


def test_the_end_of_a_stream_is_seen_when_the_vmm_closes_its_fd_before_it_replies() -> None:
    """The writing VMM's reply waits until the receiving VMM has read the stream's end:
    with the end of input seen only after the dump's reply (the relay before this one),
    neither would come."""
    data = os.urandom(3 * STEP)
    got = bytearray()
    end_read = trio.Event()

    async def reply_after_the_other_side_read_the_end() -> None:
        with trio.fail_after(10):
            await end_read.wait()

    sender, receiver = tls_pair()
    try:
        dump, sent, loaded, relayed = trio.run(
            transfer,
            sender,
            receiver,
            vmm_writes(data, then=reply_after_the_other_side_read_the_end),
            vmm_reads(got, done=end_read),
        )
    finally:
        sender.close()
        receiver.close()
    assert dump.error is None and sent.value == {"ok": True}
    assert loaded.error is None and relayed.error is None and bytes(got) == data


def test_a_dump_that_fails_before_writing_ends_the_stream_with_abort() -> None:
    async def refused(fd: int) -> dict[str, int]:
        raise RuntimeError("the VMM refused the dump")

    got = bytearray()
    sender, receiver = tls_pair()
    try:
        dump, sent, _loaded, relayed = trio.run(transfer, sender, receiver, refused, vmm_reads(got))
    finally:
        sender.close()
        receiver.close()
    assert isinstance(dump.error, RuntimeError)
    assert isinstance(relayed.error, Aborted)
    assert got == b""  # the receiving VMM saw an empty stream end: it fails, nothing runs
    assert sent.value == {"ok": False}

"""Migration across hosts over one TCP connection.

The sender (``vmipc migrate --to tcp:HOST:PORT``) drives the source VMM; the receiver
(``vmipc receive --listen HOST:PORT``) drives an incoming VMM on its host. Bulk data goes
from the source VMM straight into the TCP socket (the sender passes the socket's fd to
dump-memory / dump-dirty / dump-state) and from the socket straight into the destination
VMM (the receiver passes its socket's fd to apply-pages / load-state): never through
either client process.

Between the bulk transfers, both sides exchange small control frames on the same
connection: a ``u32`` little-endian length, then a msgpack map. Because apply-pages and
load-state read exactly their stream and never past it, a frame can follow one directly.

    sender → receiver                       receiver → sender
    {op: hello, version: 1,                 {ok: true} once an incoming VMM with that RAM
     memory_size, vcpus}                      and vCPUs is ready
    {op: pages} + one page stream           {ok: true, result: apply-pages' result}
    {op: state} + one state blob            {ok: true, result: load-state's result}
    {op: resume}                            {ok: true, state: "running"}
    {op: done}                              {ok: true}: the receiver lets go (VM runs on)
    {op: abort}                             {ok: true}: the destination was discarded
    any failure                             {ok: false, error: "one line"}, then it
                                              discards the destination and closes

The receiver discards the destination (quits its VMM) whenever anything fails before
``resume`` — an error, a bad stream, the connection closing — and keeps it running once
it resumed it, whatever happens to the connection afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]
import trio

from vmipc.client import Client, open_client
from vmipc.errors import VmipcError
from vmipc.protocol import DecodeLimits, RemoteProtocolError, unpack
from vmipc.sequences._common import best_effort, describe, supports
from vmipc.sequences._migrate import (
    RESUME_TIMEOUT,
    DestinationUnknown,
    Kind,
    MigrationReport,
    Send,
    TransferError,
    migrate,
)

VERSION = 1
#: a control frame is a small map (a command's result at most)
_CONTROL_DECODE_LIMITS = DecodeLimits(max_str_len=64 << 10, max_containers=4096)
_LENGTH = struct.Struct("<I")
MAX_FRAME = 1 << 20
#: seconds to wait for a control reply that needs no bulk transfer
REPLY_TIMEOUT = 30.0


class ControlError(VmipcError):
    """The other side broke the control exchange, or refused a step (one line)."""


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6HOST]:PORT`` → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


# --- frames (blocking; run in a thread) ----------------------------------------------------


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes, never more (bulk data may follow on the socket)."""
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ControlError("the connection closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def send_frame(sock: socket.socket, message: Mapping[str, Any]) -> None:
    payload: bytes = msgpack.packb(dict(message), use_bin_type=True)
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    (length,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    if length > MAX_FRAME:
        raise ControlError(f"a control frame of {length} bytes (limit {MAX_FRAME})")
    try:
        # the peer is not trusted: a frame's bytes may not decode into much more than them
        message = unpack(_recv_exact(sock, length), _CONTROL_DECODE_LIMITS)
    except RemoteProtocolError as exc:
        raise ControlError(f"a control frame refused: {exc.message}") from None
    if not isinstance(message, dict):
        raise ControlError("a control frame that is not a map")
    return message


async def _in_thread(sock: socket.socket, work: Callable[[], Any]) -> Any:
    """Blocking socket work in a thread; a cancelled wait shuts the socket down so the
    thread returns (the connection is unusable afterwards anyway)."""
    try:
        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    except trio.Cancelled:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        raise


# --- the sender's side: a Destination over TCP -----------------------------------------------


class TcpDestination:
    """A ``vmipc receive`` at (host, port): the Destination of :func:`migrate` over TCP."""

    def __init__(self, address: tuple[str, int], connect_timeout: float = 10.0) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.sock: socket.socket | None = None
        self.description = f"vmipc receive at {address[0]}:{address[1]}"

    def _sock(self) -> socket.socket:
        if self.sock is None:
            raise ControlError("not connected")
        return self.sock

    async def _request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        sock = self._sock()
        await _in_thread(sock, lambda: send_frame(sock, message))
        return await self._reply()

    async def _reply(self) -> dict[str, Any]:
        sock = self._sock()
        reply: dict[str, Any] = await _in_thread(sock, lambda: recv_frame(sock))
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "refused")))
        return reply

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.sock = None

    async def prepare(self, memory_size: int, vcpus: int) -> None:
        def connect() -> socket.socket:
            sock = socket.create_connection(self.address, timeout=self.connect_timeout)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock

        self.sock = await trio.to_thread.run_sync(connect)
        try:
            with trio.fail_after(REPLY_TIMEOUT):
                await self._request(
                    {"op": "hello", "version": VERSION, "memory_size": memory_size, "vcpus": vcpus}
                )
        except BaseException:
            self.close()
            raise

    async def transfer(self, kind: Kind, send: Send) -> Mapping[str, Any]:
        sock = self._sock()
        try:
            await _in_thread(sock, lambda: send_frame(sock, {"op": kind}))
        except (OSError, ControlError) as exc:
            raise TransferError(kind, None, exc) from exc
        try:
            await send(sock.fileno())
        except Exception as exc:
            # the receiver may have said why it stopped reading
            reason: BaseException | None = None
            with trio.move_on_after(2):
                try:
                    await self._reply()
                except (OSError, ControlError) as told:
                    reason = told
            self.close()  # a broken stream: the receiver discards on end of input
            raise TransferError(kind, exc, reason) from exc
        try:
            reply = await self._reply()
        except (OSError, ControlError) as exc:
            self.close()
            raise TransferError(kind, None, exc) from exc
        result: Mapping[str, Any] = reply.get("result") or {}
        return result

    async def resume(self) -> str:
        try:
            with trio.fail_after(RESUME_TIMEOUT):
                reply = await self._request({"op": "resume"})
        except ControlError as exc:
            if "closed" in str(exc):
                raise DestinationUnknown(f"{exc} after resume was sent") from exc
            raise  # the receiver refused: it did not resume
        except (OSError, trio.TooSlowError) as exc:
            raise DestinationUnknown(describe(exc)) from exc
        return str(reply.get("state"))

    async def discard(self) -> str:
        if self.sock is None:
            return "the destination was discarded (the connection is closed)"
        _, error = await best_effort(lambda: self._request({"op": "abort"}), timeout=10)
        self.close()
        if error is None:
            return "the destination was discarded"
        return "the destination was discarded (the connection is closed)"

    async def finish(self) -> None:
        await best_effort(lambda: self._request({"op": "done"}), timeout=10)
        self.close()


async def migrate_tcp(
    source_socket: str, address: tuple[str, int], **options: Any
) -> MigrationReport:
    """Migrate the VM behind ``source_socket`` to a ``vmipc receive`` at ``address``."""
    dest = TcpDestination(address)
    try:
        async with open_client(source_socket, client_name="vmipc migrate") as src:
            return await migrate(src, dest, **options)
    finally:
        dest.close()


# --- the receiver's side ---------------------------------------------------------------------


@dataclass
class ReceiveReport:
    outcome: str  # running, discarded
    peer: str
    socket: str
    pid: int | None
    transfers: int
    total_s: float
    reason: str | None = None


class _Vmm:
    """The incoming VMM the receiver drives: one it was given, or one it starts."""

    def __init__(self, socket_path: str | None, console: str, log: str | None) -> None:
        self.given = socket_path
        self.socket_path = socket_path or ""
        self.console = console
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: str | None = None

    async def start(self, memory_size: int, vcpus: int) -> None:
        if self.given is not None:
            return
        self._tmp = tempfile.mkdtemp(prefix="vmipc-receive-")
        self.socket_path = os.path.join(self._tmp, "vm.sock")
        argv = [sys.executable, "-m", "vmipc", "vmm", "--incoming", "--memory", str(memory_size)]
        argv += ["--vcpus", str(vcpus), "--socket", self.socket_path, "--console", self.console]
        argv += ["--no-console-input"]
        err = open(self.log or os.devnull, "ab")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
            )
        finally:
            err.close()
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socket_path):
            if self.proc.poll() is not None:
                raise ControlError(f"the incoming VMM exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise ControlError("the incoming VMM did not start")
            await trio.sleep(0.01)

    async def discard(self, client: Client | None) -> None:
        if client is not None:
            await best_effort(client.quit)
        if self.proc is not None:
            proc = self.proc
            try:
                await trio.to_thread.run_sync(lambda: proc.wait(10))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        """Remove the started VMM's socket directory once the VMM is gone."""
        if self._tmp is None or self.proc is None or self.proc.poll() is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)  # left behind only if the VMM was killed
        with contextlib.suppress(OSError):
            os.rmdir(self._tmp)


async def receive(
    listener: socket.socket,
    *,
    vmm_socket: str | None = None,
    console: str = "/dev/null",
    vmm_log: str | None = None,
    accept_timeout: float | None = None,
) -> ReceiveReport:
    """Accept one migration on ``listener`` (a bound, listening TCP socket) into an
    incoming VMM: the one at ``vmm_socket``, or one this function starts (it then outlives
    this process when the migration succeeds). See the module doc for the exchange."""
    started = time.monotonic()

    def accept() -> tuple[socket.socket, Any]:
        listener.settimeout(accept_timeout)
        return listener.accept()

    conn, peer = await trio.to_thread.run_sync(accept, abandon_on_cancel=True)
    listener.close()
    peer_text = f"{peer[0]}:{peer[1]}"
    vmm = _Vmm(vmm_socket, console, vmm_log)
    transfers = 0
    resumed = False
    client: Client | None = None
    #: the destination is ours to discard: we started it, or it proved a fitting incoming
    #: VMM; a VMM we were given that is anything else (running a guest!) is left alone
    ours = vmm_socket is None

    def report(outcome: str, reason: str | None = None) -> ReceiveReport:
        return ReceiveReport(
            outcome=outcome,
            peer=peer_text,
            socket=vmm.socket_path,
            pid=vmm.proc.pid if vmm.proc is not None else None,
            transfers=transfers,
            total_s=time.monotonic() - started,
            reason=reason,
        )

    async def reply(message: Mapping[str, Any]) -> None:
        await _in_thread(conn, lambda: send_frame(conn, message))

    async with contextlib.AsyncExitStack() as stack:
        stack.callback(conn.close)
        try:
            hello = await _in_thread(conn, lambda: recv_frame(conn))
            if hello.get("op") != "hello" or hello.get("version") != VERSION:
                raise ControlError(f"expected hello version {VERSION}, got {hello}")
            memory_size, vcpus = int(hello["memory_size"]), int(hello["vcpus"])
            await vmm.start(memory_size, vcpus)
            client = await stack.enter_async_context(
                open_client(vmm.socket_path, client_name="vmipc receive")
            )
            if supports(client, "claim-priority"):
                await client.claim_priority()  # the loads and the resume go first
            status = await client.query_status()
            if status["state"] != "incoming":
                raise ControlError(f"the destination VMM is {status['state']}, not incoming")
            if (status["memory_size"], status["vcpu_count"]) != (memory_size, vcpus):
                raise ControlError(
                    f"the destination VMM has {status['memory_size']} bytes and "
                    f"{status['vcpu_count']} vCPUs, the source {memory_size} and {vcpus}"
                )
            ours = True
            await reply({"ok": True})
            while True:
                message = await _in_thread(conn, lambda: recv_frame(conn))
                op = message.get("op")
                if op == "pages":
                    applied = await client.apply_pages(in_=conn.fileno())
                    transfers += 1
                    await reply({"ok": True, "result": dict(applied)})
                elif op == "state":
                    loaded = await client.load_state(in_=conn.fileno())
                    transfers += 1
                    await reply({"ok": True, "result": dict(loaded)})
                elif op == "resume":
                    await client.resume()
                    resumed = True
                    state = (await client.query_status())["state"]
                    with contextlib.suppress(OSError, ControlError):
                        await reply({"ok": True, "state": state})
                elif op == "done":
                    with contextlib.suppress(OSError, ControlError):
                        await reply({"ok": True})
                    return report("running")
                elif op == "abort":
                    await vmm.discard(client)
                    with contextlib.suppress(OSError, ControlError):
                        await reply({"ok": True})
                    return report("discarded", "the sender aborted")
                else:
                    raise ControlError(f"unknown control operation {op!r}")
        except (Exception, trio.Cancelled) as exc:
            if resumed:
                if isinstance(exc, Exception):
                    return report("running", f"after the switch-over: {describe(exc)}")
                raise
            with trio.CancelScope(shield=True):
                with contextlib.suppress(OSError, ControlError, trio.TooSlowError):
                    with trio.fail_after(2):
                        await reply({"ok": False, "error": describe(exc)})
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                await vmm.discard(client if ours else None)
            if isinstance(exc, Exception):
                return report("discarded", describe(exc))
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def listen(address: tuple[str, int]) -> socket.socket:
    """A listening TCP socket on ``address`` (port 0: any free port)."""
    return socket.create_server(address, reuse_port=False)


__all__ = [
    "ControlError",
    "ReceiveReport",
    "TcpDestination",
    "listen",
    "migrate_tcp",
    "parse_address",
    "receive",
]

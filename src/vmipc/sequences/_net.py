"""Migration across hosts over one TCP connection (protocol/migration-channel.md, version 2).

The sender (``vmipc migrate --to tcp:HOST:PORT``) drives the source VMM; the receiver
(``vmipc receive --listen HOST:PORT``) drives an incoming VMM on its host. By default the
connection is TLS 1.3 with mutual authentication (certificates, or a shared token: see
``_tls``); then the bulk data goes from the source VMM into a socket pair, through the
sender's relay thread into TLS, and out of the receiver's into a socket pair its VMM
reads (``_relay``).
Only with ``--insecure`` (or on loopback without credentials) does the connection stay
plain TCP, and each VMM then reads or writes the TCP socket itself.

Between the bulk transfers, both sides exchange small control frames on the same
connection: a ``u32`` little-endian length, then a msgpack map.

    sender → receiver                       receiver → sender
    (token mode, after the TLS handshake)   {auth: "token", nonce}
    {op: auth, nonce, proof}                {ok: true, proof}
    {op: hello, version: 2,                 {ok: true, unhashed} once an incoming VMM with
     memory_size, vcpus}                      that RAM and vCPUs is ready (unhashed: page
                                              streams may skip the hash of their pages: TLS)
    {op: pages} + one page stream           {ok: true, result: apply-pages' result}
    {op: state} + one state blob            {ok: true, result: load-state's result}
    {op: resume}                            {ok: true, state: "running"}
    {op: done}                              {ok: true}: the receiver lets go (VM runs on)
    {op: abort}                             {ok: true}: the destination was discarded
    any failure                             {ok: false, error: "one line"}, then it
                                              discards the destination and closes

The receiver discards the destination (quits its VMM) whenever anything fails before
``resume`` — an error, a bad stream, the connection closing — and keeps it running once
it resumed it, whatever happens to the connection afterwards. A peer that does not
authenticate within the hello timeout is dropped before any VMM starts, and the receiver
goes on listening for the real sender.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped]
import trio

from vmipc.client import Client, open_client
from vmipc.protocol import DecodeLimits, RemoteProtocolError, unpack
from vmipc.sequences._common import best_effort, describe, supports
from vmipc.sequences._migrate import (
    RESUME_TIMEOUT,
    UNHASHED_MINOR,
    DestinationUnknown,
    Kind,
    MigrationReport,
    Send,
    TransferError,
    migrate,
)
from vmipc.sequences._relay import End, in_thread, receive_chunks, relay, send_chunks
from vmipc.sequences._restore import attach_disk
from vmipc.sequences._tls import (
    AuthenticationError,
    ControlError,
    Credentials,
    CredentialsError,
    Refused,
    client_context,
    hard_shutdown,
    is_loopback,
    new_nonce,
    read_token,
    receiver_fingerprint,
    receiver_proof,
    same,
    sender_proof,
    server_context,
)

VERSION = 2
#: a control frame is a small map (a command's result at most)
_CONTROL_DECODE_LIMITS = DecodeLimits(max_str_len=64 << 10, max_containers=4096)
_LENGTH = struct.Struct("<I")
MAX_FRAME = 1 << 20
#: seconds to wait for a control reply that needs no bulk transfer
REPLY_TIMEOUT = 30.0
#: receiver: seconds from accepting a connection to its authenticated hello
HELLO_TIMEOUT = 10.0
#: receiver: seconds to wait for the sender's next control frame
IDLE_TIMEOUT = 120.0
#: receiver: with no --memory, the most RAM a peer may ask for; with no --vcpus, the most
#: vCPUs is the host's CPU count
DEFAULT_MAX_MEMORY = 4 << 30
#: the first byte of a TLS handshake record (a ClientHello)
_TLS_HANDSHAKE = 0x16


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6HOST]:PORT`` → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def security_for(
    host: str,
    *,
    cert: str | None = None,
    key: str | None = None,
    ca: str | None = None,
    peer_name: str | None = None,
    token_file: str | None = None,
    insecure: bool = False,
) -> Credentials | None:
    """The credentials the options give, or None for plain TCP: allowed with ``insecure``
    or when ``host`` is loopback. Raises CredentialsError for a bad combination and when
    no credentials are given for a non-loopback host without ``insecure``."""
    certs = (cert, key, ca)
    if token_file is not None and any(certs):
        raise CredentialsError("give either --token-file or --tls-cert/--tls-key/--tls-ca")
    if any(certs) and not all(certs):
        raise CredentialsError("certificates need all of --tls-cert, --tls-key and --tls-ca")
    if (any(certs) or token_file is not None) and insecure:
        raise CredentialsError("--insecure and credentials exclude each other")
    if token_file is not None:
        return Credentials(token=read_token(token_file), peer_name=peer_name)
    if all(certs):
        return Credentials(cert=cert, key=key, ca=ca, peer_name=peer_name)
    if insecure or is_loopback(host):
        return None
    raise CredentialsError(
        f"{host} is not a loopback address: the migration would cross the network "
        "unauthenticated and in clear text; give --token-file or --tls-cert/--tls-key/"
        "--tls-ca (or --insecure to accept that)"
    )


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


def encode_frame(message: Mapping[str, Any]) -> bytes:
    payload: bytes = msgpack.packb(dict(message), use_bin_type=True)
    return _LENGTH.pack(len(payload)) + payload


def send_frame(sock: socket.socket, message: Mapping[str, Any]) -> None:
    sock.sendall(encode_frame(message))


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


def _checked(reply: dict[str, Any]) -> dict[str, Any]:
    """The receiver's reply if it says ``{ok: true}``; Refused for an explicit
    ``{ok: false}``, ControlError for anything else."""
    if reply.get("ok") is False:
        raise Refused(str(reply.get("error", "refused"))[:500])
    if reply.get("ok") is not True:
        raise ControlError("a reply that is neither {ok: true} nor {ok: false}")
    return reply


# --- the sender's side: a Destination over TCP -----------------------------------------------


class TcpDestination:
    """A ``vmipc receive`` at (host, port): the Destination of :func:`migrate` over TCP,
    over TLS with ``credentials`` (None: plain TCP)."""

    def __init__(
        self,
        address: tuple[str, int],
        credentials: Credentials | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.address = address
        self.credentials = credentials
        self.connect_timeout = connect_timeout
        self.sock: socket.socket | None = None
        secured = "" if credentials is None else f" (TLS, {credentials.mode})"
        self.description = f"vmipc receive at {address[0]}:{address[1]}{secured}"
        #: the receiver said it takes page streams whose pages are not hashed
        self.takes_unhashed = False

    def _sock(self) -> socket.socket:
        if self.sock is None:
            raise ControlError("not connected")
        return self.sock

    async def _request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        sock = self._sock()
        await in_thread(sock, lambda: send_frame(sock, message))
        return await self._reply()

    async def _reply(self) -> dict[str, Any]:
        sock = self._sock()
        return _checked(await in_thread(sock, lambda: recv_frame(sock)))

    def close(self) -> None:
        if self.sock is not None:
            hard_shutdown(self.sock)
            self.sock.close()
            self.sock = None

    def _connect(self) -> socket.socket:
        """TCP, then (with credentials) the TLS handshake and the token proofs."""
        sock = socket.create_connection(self.address, timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            creds = self.credentials
            if creds is None:
                sock.settimeout(None)  # the VMMs get this fd: it must block
                return sock
            sock.settimeout(REPLY_TIMEOUT)
            name = creds.peer_name or self.address[0]
            try:
                tls = client_context(creds).wrap_socket(sock, server_hostname=name)
            except ssl.SSLError as exc:
                raise AuthenticationError(f"TLS: {exc.reason or exc}") from None
        except BaseException:
            sock.close()
            raise
        try:
            if creds.token is not None:
                self._token_proofs(tls, creds.token)
            tls.settimeout(None)
            return tls
        except BaseException:
            tls.close()
            raise

    @staticmethod
    def _token_proofs(tls: ssl.SSLSocket, token: bytes) -> None:
        fingerprint = receiver_fingerprint(tls)
        challenge = recv_frame(tls)
        theirs = challenge.get("nonce")
        if challenge.get("auth") != "token" or not isinstance(theirs, bytes) or len(theirs) != 32:
            raise AuthenticationError("the receiver does not ask for a token proof")
        mine = new_nonce()
        send_frame(
            tls,
            {"op": "auth", "nonce": mine, "proof": sender_proof(token, fingerprint, theirs, mine)},
        )
        reply = recv_frame(tls)
        if reply.get("ok") is not True:
            raise AuthenticationError(f"the receiver refused: {str(reply.get('error'))[:200]}")
        if not same(reply.get("proof"), receiver_proof(token, fingerprint, theirs, mine)):
            raise AuthenticationError("the receiver does not know the token")

    async def prepare(self, memory_size: int, vcpus: int) -> None:
        self.sock = await trio.to_thread.run_sync(self._connect)
        try:
            with trio.fail_after(REPLY_TIMEOUT):
                ready = await self._request(
                    {"op": "hello", "version": VERSION, "memory_size": memory_size, "vcpus": vcpus}
                )
        except BaseException:
            self.close()
            raise
        self.takes_unhashed = ready.get("unhashed") is True

    def trust_channel(self, source: Client) -> bool:
        """Whether page streams from ``source`` may go without a hash of their pages:
        only over TLS (its AEAD authenticates every byte between the two relays, whose
        socket pairs to the VMMs are their own), when the receiver offered to take them
        and the source speaks 1.10. Plain TCP keeps full checksums (TCP's own checksum
        is weak)."""
        return (
            self.credentials is not None
            and self.takes_unhashed
            and source.protocol_minor >= UNHASHED_MINOR
        )

    async def transfer(self, kind: Kind, send: Send) -> Mapping[str, Any]:
        if self.credentials is None:
            return await self._plain_transfer(kind, send)
        sock = self._sock()
        failed = threading.Event()

        def relay_and_reply(ours: End, theirs: End) -> dict[str, Any]:
            # one thread: the frame, the chunks and the reply follow each other on the
            # wire, so no hop through trio between them
            try:
                send_chunks(sock, ours, theirs, failed, encode_frame({"op": kind}))
            except (OSError, ControlError) as broken:
                # the receiver may have said why it stopped reading (the dump fails too,
                # so this wait is bounded by the grace below)
                try:
                    told = recv_frame(sock)
                except (OSError, ControlError):
                    raise broken from None
                _checked(told)  # an {ok: false} says why
                raise
            return _checked(recv_frame(sock))

        # after a failed dump, the receiver has 2 s to say how its side ended
        dump, relayed = await relay(
            sock, vmm_call=send, copy=relay_and_reply, failed=failed, grace=2
        )
        if dump.error is not None or relayed.error is not None or relayed.value is None:
            self.close()  # a broken stream: the receiver discards on end of input
            raise TransferError(kind, dump.error, relayed.error) from (dump.error or relayed.error)
        result: Mapping[str, Any] = relayed.value.get("result") or {}
        return result

    async def _plain_transfer(self, kind: Kind, send: Send) -> Mapping[str, Any]:
        """The source VMM writes to the TCP socket itself."""
        sock = self._sock()
        try:
            await in_thread(sock, lambda: send_frame(sock, {"op": kind}))
        except (OSError, ControlError) as exc:
            raise TransferError(kind, None, exc) from exc
        try:
            await send(sock.fileno())
        except Exception as dump_error:
            # the receiver may have said why it stopped reading
            reason: BaseException | None = None
            with trio.move_on_after(2):
                try:
                    await self._reply()
                except (OSError, ControlError) as told:
                    reason = told
            self.close()  # a broken stream: the receiver discards on end of input
            raise TransferError(kind, dump_error, reason) from dump_error
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
        except Refused:
            raise  # an explicit {ok: false}: the receiver did not resume (it discards)
        except Exception as exc:
            # a closed connection, a timeout, a malformed reply: the resume may have run
            raise DestinationUnknown(f"{describe(exc)} after resume was sent") from exc
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
    source_socket: str,
    address: tuple[str, int],
    credentials: Credentials | None = None,
    **options: Any,
) -> MigrationReport:
    """Migrate the VM behind ``source_socket`` to a ``vmipc receive`` at ``address``, over
    TLS with ``credentials`` (None: plain TCP)."""
    dest = TcpDestination(address, credentials)
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
    #: peers dropped before they authenticated: "HOST:PORT: why"
    refused: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Shape:
    """What the receiver accepts: exactly ``memory``/``vcpus`` when pinned, else at most
    the ceilings."""

    memory: int | None = None
    vcpus: int | None = None
    max_memory: int = DEFAULT_MAX_MEMORY
    max_vcpus: int = 0  # 0: the host's CPU count

    def check(self, memory_size: object, vcpus: object) -> tuple[int, int]:
        if type(memory_size) is not int or type(vcpus) is not int:
            raise ControlError("hello: memory_size and vcpus must be integers")
        if self.memory is not None and memory_size != self.memory:
            raise ControlError(
                f"this receiver takes {self.memory} bytes of RAM (--memory), not {memory_size}"
            )
        if self.vcpus is not None and vcpus != self.vcpus:
            raise ControlError(f"this receiver takes {self.vcpus} vCPUs (--vcpus), not {vcpus}")
        max_vcpus = self.max_vcpus or os.cpu_count() or 1
        if self.memory is None and not 0 < memory_size <= self.max_memory:
            raise ControlError(
                f"{memory_size} bytes of RAM is over this receiver's limit of "
                f"{self.max_memory} (pin the size with --memory)"
            )
        if self.vcpus is None and not 0 < vcpus <= max_vcpus:
            raise ControlError(
                f"{vcpus} vCPUs is over this receiver's limit of {max_vcpus} "
                "(pin the count with --vcpus)"
            )
        return memory_size, vcpus


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


class _Admission:
    """The receiver's side of authentication: a TLS context (and, in token mode, the
    fingerprint of its own ephemeral certificate) made once per listen."""

    def __init__(self, credentials: Credentials | None) -> None:
        self.credentials = credentials
        self.context: ssl.SSLContext | None = None
        self.fingerprint: bytes | None = None
        if credentials is not None:
            self.context, self.fingerprint = server_context(credentials)

    def admit(self, conn: socket.socket, timeout: float) -> socket.socket:
        """Blocking: the connection once its peer authenticated (TLS) or, in plain mode,
        as it is. Raises AuthenticationError (or OSError) for a peer to drop."""
        conn.settimeout(timeout)
        # replies are small frames: never held back waiting for an acknowledgement
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        first = conn.recv(1, socket.MSG_PEEK)
        if not first:
            raise AuthenticationError("it closed without a word")
        if self.context is None:
            if first[0] == _TLS_HANDSHAKE:
                raise AuthenticationError("it speaks TLS; this receiver runs without TLS")
            return conn
        if first[0] != _TLS_HANDSHAKE:
            # a plain (version 1) sender: say why in a frame it can read, then drop it
            with contextlib.suppress(OSError):
                send_frame(
                    conn,
                    {
                        "ok": False,
                        "error": f"this receiver speaks migration channel version {VERSION} "
                        "over TLS only: give the sender credentials",
                    },
                )
            raise AuthenticationError("it does not speak TLS (a version 1 sender?)")
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except ssl.SSLError as exc:
            raise AuthenticationError(f"TLS: {exc.reason or exc}") from None
        creds = self.credentials
        assert creds is not None
        from vmipc.sequences._tls import check_peer_name

        try:
            check_peer_name(tls, creds.peer_name)
            if creds.token is not None:
                assert self.fingerprint is not None
                self._token_proofs(tls, creds.token, self.fingerprint)
        except BaseException:
            # wrap_socket took the fd from ``conn``: closing ``conn`` no longer closes the
            # connection, so a peer dropped after the handshake waited for its reply
            # timeout (30 s) on a connection nobody would answer
            hard_shutdown(tls)
            tls.close()
            raise
        return tls

    @staticmethod
    def _token_proofs(tls: socket.socket, token: bytes, fingerprint: bytes) -> None:
        mine = new_nonce()
        send_frame(tls, {"auth": "token", "nonce": mine})
        answer = recv_frame(tls)
        theirs = answer.get("nonce")
        if answer.get("op") != "auth" or not isinstance(theirs, bytes) or len(theirs) != 32:
            raise AuthenticationError("no token proof")
        if not same(answer.get("proof"), sender_proof(token, fingerprint, mine, theirs)):
            with contextlib.suppress(OSError):
                send_frame(tls, {"ok": False, "error": "wrong token"})
            raise AuthenticationError("wrong token proof")
        send_frame(tls, {"ok": True, "proof": receiver_proof(token, fingerprint, mine, theirs)})


async def receive(
    listener: socket.socket,
    *,
    vmm_socket: str | None = None,
    console: str = "/dev/null",
    vmm_log: str | None = None,
    accept_timeout: float | None = None,
    credentials: Credentials | None = None,
    hello_timeout: float = HELLO_TIMEOUT,
    shape: Shape | None = None,
    on_refused: Callable[[str], None] | None = None,
    disk: str | None = None,
    disk_readonly: bool = False,
) -> ReceiveReport:
    """Accept one migration on ``listener`` (a bound, listening TCP socket) into an
    incoming VMM: the one at ``vmm_socket``, or one this function starts (it then outlives
    this process when the migration succeeds). See the module doc for the exchange.

    Over TLS with ``credentials`` (None: plain TCP). A peer that does not authenticate
    within ``hello_timeout`` seconds is dropped (``on_refused`` is told, one line) and the
    receiver goes on listening, until ``accept_timeout`` after the start. ``disk``: the
    disk image (shared storage) this side opens and passes to the incoming VMM
    (``attach-disk``, read-only with ``disk_readonly``) once it proved a fitting one."""
    started = time.monotonic()
    shape = shape or Shape()
    admission = _Admission(credentials)
    refused: list[str] = []

    def accept() -> tuple[socket.socket, Any]:
        left = None if accept_timeout is None else accept_timeout - (time.monotonic() - started)
        if left is not None and left <= 0:
            raise TimeoutError("nobody connected in time")
        listener.settimeout(left)
        return listener.accept()

    while True:
        raw, peer = await trio.to_thread.run_sync(accept, abandon_on_cancel=True)
        peer_text = f"{peer[0]}:{peer[1]}"
        accepted = time.monotonic()
        try:
            with trio.fail_after(hello_timeout + 1):
                conn = await in_thread(raw, functools.partial(admission.admit, raw, hello_timeout))
            break
        except (AuthenticationError, ControlError, OSError, trio.TooSlowError) as exc:
            silent = isinstance(exc, (TimeoutError, trio.TooSlowError))
            why = f"no authentication within {hello_timeout:g} s" if silent else describe(exc)
            line = f"{peer_text}: {why}"[:300]
            refused.append(line)
            if on_refused is not None:
                on_refused(line)
            hard_shutdown(raw)
            raw.close()
    listener.close()
    vmm = _Vmm(vmm_socket, console, vmm_log)
    transfers = 0
    resumed = False
    client: Client | None = None
    #: the destination is ours to discard: we started it, or it proved a fitting incoming
    #: VMM; a VMM we were given that is anything else (running a guest!) is left alone
    ours = vmm_socket is None
    secure = credentials is not None

    def report(outcome: str, reason: str | None = None) -> ReceiveReport:
        return ReceiveReport(
            outcome=outcome,
            peer=peer_text,
            socket=vmm.socket_path,
            pid=vmm.proc.pid if vmm.proc is not None else None,
            transfers=transfers,
            total_s=time.monotonic() - started,
            reason=reason,
            refused=refused,
        )

    async def reply(message: Mapping[str, Any]) -> None:
        await in_thread(conn, lambda: send_frame(conn, message))

    async def next_frame(timeout: float) -> dict[str, Any]:
        with trio.fail_after(timeout):
            frame: dict[str, Any] = await in_thread(conn, lambda: recv_frame(conn))
        return frame

    async def bulk(load: Callable[[int], Awaitable[Any]]) -> Any:
        if not secure:
            return await load(conn.fileno())
        # once the VMM stopped reading, the relay's writes fail at once; unless the sender
        # stops sending: then the connection is given up after 5 s. After a good load,
        # the end mark must follow within REPLY_TIMEOUT.
        loaded, relayed = await relay(
            conn,
            vmm_call=load,
            copy=lambda ours, _theirs: receive_chunks(conn, ours),
            failed=threading.Event(),
            grace=5,
            after=REPLY_TIMEOUT,
        )
        if loaded.error is not None:
            raise loaded.error
        if relayed.error is not None:
            raise relayed.error
        if relayed.value is None:
            raise ControlError(f"no end of the stream within {REPLY_TIMEOUT:g} s of its load")
        return loaded.value

    async with contextlib.AsyncExitStack() as stack:
        stack.callback(conn.close)
        try:
            conn.settimeout(None)  # bounds come from trio (plain: the VMM reads this fd)
            left = max(0.1, hello_timeout - (time.monotonic() - accepted))
            try:
                hello = await next_frame(left)
            except trio.TooSlowError:
                raise ControlError(f"no hello within {hello_timeout:g} s") from None
            if hello.get("op") != "hello" or hello.get("version") != VERSION:
                shown = {k: hello.get(k) for k in ("op", "version")}
                raise ControlError(f"expected hello version {VERSION}, got {shown}")
            memory_size, vcpus = shape.check(hello.get("memory_size"), hello.get("vcpus"))
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
            if disk is not None:
                await attach_disk(client, disk, readonly=disk_readonly)
            # over TLS (which authenticates every byte) page streams need no hash of their
            # pages: offered here, taken only if the sender sends them so
            unhashed = secure and client.protocol_minor >= UNHASHED_MINOR
            await reply({"ok": True, "unhashed": unhashed})

            async def apply(fd: int) -> Any:
                if unhashed:
                    return await client.apply_pages(in_=fd, accept_unhashed=True)
                return await client.apply_pages(in_=fd)

            while True:
                message = await next_frame(IDLE_TIMEOUT)
                op = message.get("op")
                if op == "pages":
                    applied = await bulk(apply)
                    transfers += 1
                    await reply({"ok": True, "result": dict(applied)})
                elif op == "state":
                    loaded = await bulk(lambda fd: client.load_state(in_=fd))
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
                    raise ControlError(f"unknown control operation {str(op)[:40]!r}")
        except (Exception, trio.Cancelled) as exc:
            if resumed:
                if isinstance(exc, Exception):
                    return report("running", f"after the switch-over: {describe(exc)}")
                raise
            with trio.CancelScope(shield=True):
                with contextlib.suppress(OSError, ControlError, trio.TooSlowError):
                    with trio.fail_after(2):
                        await reply({"ok": False, "error": describe(exc)})
                hard_shutdown(conn)
                await vmm.discard(client if ours else None)
            if isinstance(exc, Exception):
                return report("discarded", describe(exc))
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def listen(address: tuple[str, int]) -> socket.socket:
    """A listening TCP socket on ``address`` (port 0: any free port)."""
    return socket.create_server(address, reuse_port=False)


__all__ = [
    "AuthenticationError",
    "ControlError",
    "Credentials",
    "CredentialsError",
    "ReceiveReport",
    "Refused",
    "Shape",
    "TcpDestination",
    "listen",
    "migrate_tcp",
    "parse_address",
    "receive",
    "security_for",
]

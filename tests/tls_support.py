"""Helpers for the TLS migration tests: a CA and certificates made on the spot, a token
file, a ``vmipc receive`` subprocess whose stderr lines are collected, a small TCP
proxy that records or flips bytes (in this process, or as a process of its own, e.g. in a
network namespace: ``python -m tests.tls_support proxy ...``), and the checks the tests
share (the guest moved and continues exactly; the source runs and nothing was received)."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.seq_support import VMIPC, VmmProcess, check_continuation
from vmipc.client import SyncClient

ROOT = Path(__file__).resolve().parent.parent


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


class Ca:
    """A CA in ``directory``; :meth:`issue` makes a certificate and key it signed."""

    def __init__(self, directory: str, name: str) -> None:
        self.dir = Path(directory)
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = self.dir / f"{name}-ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, addresses: Sequence[str] = ()) -> tuple[str, str]:
        """(certificate path, key path) for ``name``, with ``name`` and ``addresses`` as
        subject alternative names."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        alt: list[x509.GeneralName] = [x509.DNSName(name)]
        alt += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path = self.dir / f"{self.name}-{name}.pem"
        key_path = self.dir / f"{self.name}-{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return str(cert_path), str(key_path)


def token_file(directory: str, name: str = "token") -> str:
    path = Path(directory) / name
    path.write_text(secrets.token_urlsafe(32) + "\n")
    path.chmod(0o600)
    return str(path)


class Receiver:
    """``vmipc receive`` in a subprocess; its stderr lines are collected as they come."""

    def __init__(
        self,
        tmp: str,
        args: Sequence[str],
        addr: str = "127.0.0.1",
        prefix: Sequence[str] = (),
        name: str = "received",
    ) -> None:
        self.console = Path(tmp) / f"{name}.console"
        argv = [*prefix, *VMIPC, "receive", "--listen", f"{addr}:0", "--json"]
        argv += ["--console", str(self.console), "--accept-timeout", "120", *args]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), line + self.proc.stderr.read()
        self.port = int(line.rsplit(":", 1)[1])
        self.errors: list[str] = []
        stderr = self.proc.stderr
        self._reader = threading.Thread(
            target=lambda: self.errors.extend(iter(stderr.readline, "")), daemon=True
        )
        self._reader.start()

    def wait_for_line(self, text: str, count: int = 1, timeout: float = 60) -> None:
        """Until ``count`` stderr lines contain ``text`` (a generous bound: hangs only)."""
        deadline = time.monotonic() + timeout
        while sum(text in line for line in self.errors) < count:
            assert time.monotonic() < deadline, f"no {text!r} on stderr: {self.errors}"
            assert self.proc.poll() is None, f"receive ended: {self.errors}"
            time.sleep(0.02)

    def result(self) -> tuple[int, dict]:
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        code = self.proc.wait(timeout=60)
        return code, json.loads(out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Proxy:
    """A TCP proxy on ``listen`` (loopback by default) to ``target``, for one connection.
    It keeps what the client sent (``sent``); ``flip_at``: inverts one byte at that offset
    of what the client sends."""

    def __init__(
        self, target: tuple[str, int], flip_at: int | None = None, listen: str = "127.0.0.1"
    ) -> None:
        self.target = target
        self.flip_at = flip_at
        self.sent = bytearray()
        self.listener = socket.create_server((listen, 0))
        self.port = self.listener.getsockname()[1]
        self.flipped = False
        self._threads: list[threading.Thread] = []
        thread = threading.Thread(target=self._serve, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _serve(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection(self.target)
        self._pipe(server, client, None)
        self._pipe(client, server, self._client_bytes)

    def _client_bytes(self, data: bytes) -> bytes:
        offset = len(self.sent)
        self.sent += data
        at = self.flip_at
        if at is not None and offset <= at < offset + len(data):
            changed = bytearray(data)
            changed[at - offset] ^= 0xFF
            self.flipped = True
            return bytes(changed)
        return data

    def _pipe(
        self, src: socket.socket, dst: socket.socket, edit: Callable[[bytes], bytes] | None
    ) -> None:
        def run() -> None:
            try:
                while data := src.recv(1 << 16):
                    dst.sendall(edit(data) if edit else data)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        self.listener.close()

    def wait(self, timeout: float) -> None:
        """Until the connection was served and both directions ended (bounded)."""
        deadline = time.monotonic() + timeout
        self._threads[0].join(timeout)  # accepts, then starts the two pipes
        for thread in self._threads[1:]:
            thread.join(max(0.0, deadline - time.monotonic()))


class ProxyProcess:
    """:class:`Proxy` in a process of its own, started with ``prefix`` (e.g. ``ip netns exec
    NS``), so that it listens and connects in that network namespace. :meth:`finish` waits
    for its connection to end and returns (whether it flipped its byte, what the client
    sent); :meth:`stop` kills it by pid (call it on every path)."""

    def __init__(
        self,
        prefix: Sequence[str],
        listen: str,
        target: tuple[str, int],
        recording: Path,
        flip_at: int | None = None,
    ) -> None:
        self.recording = recording
        argv = [*prefix, sys.executable, "-m", "tests.tls_support", "proxy", listen]
        argv += [target[0], str(target[1]), str(recording), str(-1 if flip_at is None else flip_at)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("proxy on "), line
        self.port = int(line.rsplit(":", 1)[1])

    def finish(self, timeout: float = 60) -> tuple[bool, bytes]:
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        assert self.proc.wait(timeout) == 0, out
        return "flipped" in out, self.recording.read_bytes()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _proxy_main(listen: str, host: str, port: str, recording: str, flip_at: str) -> None:
    proxy = Proxy((host, int(port)), None if int(flip_at) < 0 else int(flip_at), listen)
    print(f"proxy on {listen}:{proxy.port}", flush=True)
    proxy.wait(120)
    proxy.close()
    Path(recording).write_bytes(bytes(proxy.sent))
    print("flipped" if proxy.flipped else "passed", flush=True)


def replay(port: int, data: bytes, host: str = "127.0.0.1") -> bytes:
    """Send ``data`` to ``host``:``port`` as one client would; return what came back."""
    got = bytearray()
    with socket.create_connection((host, port), timeout=30) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        try:
            while chunk := sock.recv(1 << 16):
                got += chunk
        except OSError:
            pass
    return bytes(got)


def vmm_children_of(pid: int) -> list[int]:
    """Processes started by ``pid`` (the receiver's incoming VMM, if it started one)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def wait_gone(path: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} is still there"
        time.sleep(0.02)


def check_moved(src: VmmProcess, receiver: Receiver) -> None:
    """The guest runs at the receiver's VMM and continues the source's run exactly; the
    receiver's VMM is quit afterwards."""
    code, received = receiver.result()
    assert code == 0 and received["outcome"] == "running", received
    assert src.wait_exit() == 0
    try:
        with SyncClient(received["socket"], timeout=10) as client:
            assert client.query_status()["state"] == "running"
            reached = max(src.passes().values())
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                text = receiver.console.read_text()
                if text.count("\n") > 6 and f"pass={reached + 2} " in text:
                    break
                time.sleep(0.05)
            client.pause()
        check_continuation(src.text(), receiver.console.read_text())
    finally:
        try:
            with SyncClient(received["socket"], timeout=5) as client:
                client.quit()
        except Exception:
            os.kill(received["pid"], 9)
        wait_gone(received["socket"])
        os.rmdir(os.path.dirname(received["socket"]))


def check_source_runs_and_nothing_received(src: VmmProcess, receiver: Receiver) -> None:
    assert src.state() == "running"
    src.wait_for_passes(max(src.passes().values()) + 1)
    assert not receiver.console.exists(), "an incoming VMM was started for the peer"
    assert receiver.proc.poll() is None, "the receiver stopped listening"


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "proxy":
        _proxy_main(*sys.argv[2:])
    else:
        sys.exit("usage: python -m tests.tls_support proxy LISTEN HOST PORT RECORDING FLIP_AT")

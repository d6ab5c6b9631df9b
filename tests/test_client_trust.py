"""Clients check who serves the socket before they send anything.

Whoever gets a listening socket at a path first (a shared sticky directory, the path of a
VMM that is not running or is restarting) would receive what a client sends there — and
the fds it passes: a readable fd to a root-only file for ``load-memory``, a writable one
for ``dump-memory``, a checkpoint's temporary file, a migration's guest memory. Here a fake
server runs as another uid (a forked child that drops to uid 4242 before it listens, so
SO_PEERCRED names that uid) and records every byte and fd it receives."""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.control_support import short_tmpdir
from vmipc.client import SyncClient
from vmipc.protocol import ConnectionClosed, UntrustedServer

VMIPC = [sys.executable, "-m", "vmipc"]
STRANGER = 4242

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another uid")


def _serve_as_stranger(path: str, record: str, seconds: float) -> None:
    """The child: listen as uid STRANGER, accept and read everything, write what came."""
    os.setgid(STRANGER)
    os.setuid(STRANGER)
    got = {"bytes": 0, "fds": 0}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.settimeout(0.1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(0.5)
        with conn, contextlib.suppress(OSError):
            while True:
                data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
                for level, kind, blob in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds = array.array("i")
                        fds.frombytes(blob[: len(blob) - len(blob) % 4])
                        got["fds"] += len(fds)
                        for fd in fds:
                            os.close(fd)
                if not data:
                    break
                got["bytes"] += len(data)
        with open(record + ".new", "w") as out:
            json.dump(got, out)
        os.rename(record + ".new", record)


@contextlib.contextmanager
def stranger_server(seconds: float = 20) -> Iterator[tuple[str, Path]]:
    with short_tmpdir() as tmp:
        os.chmod(tmp, 0o777)  # a shared directory the stranger may create its socket in
        path = os.path.join(tmp, "vm.sock")
        record = Path(tmp) / "record.json"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                _serve_as_stranger(path, str(record), seconds)
            except BaseException:
                code = 1
            os._exit(code)
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(path):
                assert time.monotonic() < deadline, "the stranger's server did not start"
                time.sleep(0.01)
            yield path, record
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            os.waitpid(pid, 0)


def received(record: Path) -> dict[str, int]:
    if not record.exists():
        return {"bytes": 0, "fds": 0}
    return json.loads(record.read_text())  # type: ignore[no-any-return]


def test_the_blocking_client_refuses_a_stranger_and_names_its_uid() -> None:
    with stranger_server() as (path, record):
        with pytest.raises(UntrustedServer) as info:
            SyncClient(path, timeout=5)
        assert info.value.uid == STRANGER
        assert f"uid {STRANGER}" in str(info.value)
        time.sleep(0.3)
        assert received(record) == {"bytes": 0, "fds": 0}
        # told to trust that uid, it speaks (the fake server never answers hello, and
        # gives up on the connection after a while: either side may end it first)
        with pytest.raises((TimeoutError, OSError, ConnectionClosed)):
            SyncClient(path, timeout=0.5, trusted_uids=[STRANGER])
        deadline = time.monotonic() + 5
        while received(record)["bytes"] == 0:
            assert time.monotonic() < deadline, "the trusted client sent nothing"
            time.sleep(0.05)


async def test_the_async_client_refuses_a_stranger() -> None:
    from vmipc.client import open_client

    with stranger_server() as (path, record):
        with pytest.raises(UntrustedServer):
            async with open_client(path):
                pass
        time.sleep(0.3)
        assert received(record) == {"bytes": 0, "fds": 0}


@pytest.mark.parametrize(
    "argv",
    [
        ["call", "--socket", "{sock}", "load-memory", "--fd", "in={secret}"],
        ["call", "--socket", "{sock}", "dump-memory", "--fd", "out={tmp}/ram"],
        ["checkpoint", "--socket", "{sock}", "{tmp}/cp.vmipc"],
        ["migrate", "--socket", "{sock}", "--to", "{tmp}/nowhere.sock"],
    ],
    ids=["call-load-memory", "call-dump-memory", "checkpoint", "migrate"],
)
def test_the_command_line_gives_a_stranger_nothing(argv: list[str], tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"root only\n")
    secret.chmod(0o600)
    with stranger_server() as (path, record):
        args = [a.format(sock=path, secret=secret, tmp=tmp_path) for a in argv]
        done = subprocess.run(
            [*VMIPC, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
        time.sleep(0.3)
        got = received(record)
    assert done.returncode != 0
    assert f"uid {STRANGER}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert got == {"bytes": 0, "fds": 0}

"""The socket's permissions, peer-credential checks, and socket-path handling."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Callable

import pytest
import trio

from tests.control_support import RawConnection, RecordingMachine, serving, short_tmpdir
from vmipc.protocol import Error, load_schema
from vmipc.server import ServerConfig, SocketPathError, serve

NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uid")


def in_child_as(uid: int, gid: int, fn: Callable[[], object]) -> object:
    """Run ``fn`` in a forked child with the given uid and gid; return what it returned."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no trio, just syscalls
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.write(w, json.dumps(fn()).encode())
        except BaseException as exc:
            os.write(w, json.dumps({"exception": repr(exc)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


def talk(path: str) -> Callable[[], object]:
    def attempt() -> object:
        with RawConnection(path) as c:
            try:
                return {"hello": c.hello()["protocol"]}
            except (AssertionError, ConnectionResetError, BrokenPipeError):
                pass  # refused: the error frame was kept aside (or is still to come)
            got = c.wait_closed()
            return {"errors": [m.error.code for m in got if isinstance(m, Error)]}

    return attempt


def test_socket_is_created_0600_and_owned_by_the_vmm() -> None:
    with serving() as s:
        st = os.stat(s.path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
        # nothing left over from the private directory it was bound in
        assert os.listdir(os.path.dirname(s.path)) == ["vm.sock"]


@needs_root
def test_socket_group_makes_it_0660_for_that_group() -> None:
    with serving(ServerConfig(socket_group=NOBODY)) as s:
        st = os.stat(s.path)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == NOBODY


@needs_root
def test_a_peer_with_another_uid_is_refused() -> None:
    # the file mode lets the stranger reach the socket; the peer check must stop it
    with serving(ServerConfig(socket_mode=0o666)) as s:
        os.chmod(os.path.dirname(s.path), 0o755)
        outcome = in_child_as(NOBODY, NOBODY, talk(s.path))
        assert outcome == {"errors": ["access-denied"]}
        with s.connect() as c:  # the server and its own uid carry on
            c.result(c.request("query-status"))
        assert s.machine.calls == []


@needs_root
def test_allowed_uids_and_gids_admit_a_peer() -> None:
    for config in (
        ServerConfig(socket_mode=0o666, allowed_uids=frozenset({NOBODY})),
        ServerConfig(socket_mode=0o666, allowed_gids=frozenset({NOBODY})),
    ):
        with serving(config) as s:
            os.chmod(os.path.dirname(s.path), 0o755)
            assert in_child_as(NOBODY, NOBODY, talk(s.path)) == {"hello": load_schema().version}


@needs_root
def test_socket_group_admits_that_group_by_default() -> None:
    with serving(ServerConfig(socket_group=NOBODY)) as s:
        os.chmod(os.path.dirname(s.path), 0o755)
        assert in_child_as(NOBODY, NOBODY, talk(s.path)) == {"hello": load_schema().version}
        # but not a uid/gid outside the group, even when the file mode would let it in
        os.chmod(s.path, 0o666)
        assert in_child_as(NOBODY - 1, NOBODY - 1, talk(s.path)) == {"errors": ["access-denied"]}


@needs_root
def test_the_default_mode_keeps_other_users_out_at_the_file_system() -> None:
    with serving() as s:
        os.chmod(os.path.dirname(s.path), 0o755)

        def attempt() -> object:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(s.path)
            except PermissionError:
                return "EACCES"
            finally:
                sock.close()
            return "connected"

        assert in_child_as(NOBODY, NOBODY, attempt) == "EACCES"


async def test_a_stale_socket_is_replaced_and_removed_on_exit() -> None:
    with short_tmpdir() as tmp:
        path = os.path.join(tmp, "vm.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()  # a server that died: the file stays, nobody listens
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, RecordingMachine(), path)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            nursery.cancel_scope.cancel()
        assert not os.path.exists(path)


async def test_a_live_socket_is_not_taken_over() -> None:
    with short_tmpdir() as tmp:
        path = os.path.join(tmp, "vm.sock")
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, RecordingMachine(), path)
            with pytest.raises(SocketPathError, match="another server is listening"):
                await serve(RecordingMachine(), path)
            nursery.cancel_scope.cancel()


async def test_a_path_that_is_not_a_socket_or_too_long_is_refused() -> None:
    with short_tmpdir() as tmp:
        path = os.path.join(tmp, "file")
        with open(path, "w") as f:
            f.write("precious")
        with pytest.raises(SocketPathError, match="exists and is not a socket"):
            await serve(RecordingMachine(), path)
        with open(path) as f:
            assert f.read() == "precious"
        with pytest.raises(SocketPathError, match="over 107 bytes"):
            await serve(RecordingMachine(), os.path.join(tmp, "x" * 120))

"""``vmipc call``: typed arguments from the server's catalogue, fds, output, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.control_support import Served, serving, short_tmpdir
from vmipc.cli import main as vmipc_main
from vmipc.cli.call import main
from vmipc.server import ServerConfig
from vmipc.vmm.runstate import RunState


@pytest.fixture
def served() -> Iterator[Served]:
    with serving() as s:
        yield s


def call(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_human_and_json_output(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = call(capsys, "--socket", served.path, "query-status")
    assert (code, err) == (0, "")
    assert out == (
        "state: running\nvcpu_count: 2\nmemory_size: 67108864\nstop_reason: null\n"
        "lease: null\nfirst: (none)\n"
    )
    code, out, _ = call(capsys, "--socket", served.path, "query-status", "--json")
    assert json.loads(out) == {
        "state": "running",
        "vcpu_count": 2,
        "memory_size": 64 << 20,
        "stop_reason": None,
        "lease": None,
        "first": [],
    }


def test_pause_and_resume_and_a_refusal_in_one_line(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    assert call(capsys, "--socket", served.path, "pause") == (0, "", "")
    assert served.machine.state is RunState.PAUSED
    code, out, err = call(capsys, "--socket", served.path, "pause")
    assert (code, out) == (1, "")
    assert err == "vmipc call: pause: invalid-state: cannot pause while paused\n"
    code, out, err = call(capsys, "--socket", served.path, "--json", "pause")
    assert code == 1
    assert json.loads(out) == {
        "error": {
            "code": "invalid-state",
            "message": "cannot pause while paused",
            "details": {"state": "paused", "allowed": ["running"]},
        }
    }
    assert call(capsys, "--socket", served.path, "resume")[0] == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["self-destruct"], "unknown command 'self-destruct' (vmipc call --list shows them)"),
        (["cancel"], "cancel: argument 'request': missing required argument"),
        (["cancel", "request=soon"], "argument 'request': cannot read 'soon' as int [0..]"),
        (["cancel", "request=-1"], "cancel: argument 'request': must be >= 0, got -1"),
        (["query-status", "x=1"], "query-status has no argument 'x' (it takes none)"),
        (["cancel", "request=1", "request=2"], "argument 'request' given twice"),
        (["cancel", "1"], "expected key=value, not '1'"),
        (["test-write", "data=x"], "test-write needs --fd out=PATH|-"),
        (["test-write", "data=x", "--fd", "log=-"], "test-write takes no fd 'log' (it takes out)"),
        (["test-write", "data=x", "--fd", "out"], "--fd wants NAME=PATH or NAME=-"),
        (["query-status", "--bogus"], "unknown option --bogus"),
    ],
)
def test_bad_usage_is_exit_2_before_anything_is_sent(
    served: Served, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = call(capsys, "--socket", served.path, *argv)
    assert (code, out) == (2, "")
    assert err.startswith(f"vmipc call: {message}"), err
    assert err.count("\n") == 1
    assert served.machine.calls == []


def test_typed_values_and_raw_json(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = call(
        capsys, "--socket", served.path, "subscribe", "events=state-change,progress", "--json"
    )
    assert (code, json.loads(out)) == (0, {"events": ["progress", "state-change"]})
    code, out, _ = call(capsys, "--socket", served.path, "subscribe", 'events:=["progress"]')
    assert (code, out) == (0, "events: progress\n")
    code, out, _ = call(capsys, "--socket", served.path, "cancel", "request=0x10", "--json")
    assert (code, json.loads(out)) == (0, {"cancelled": False})
    code, out, _ = call(capsys, "--socket", served.path, "test-sleep", "seconds=0.01", "--json")
    assert (code, json.loads(out)) == (0, {"slept": 0.01})


def test_fd_to_a_file(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    with short_tmpdir() as tmp:
        target = os.path.join(tmp, "out.bin")
        code, out, _ = call(
            capsys, "--socket", served.path, "test-write", "data=hello", "--fd", f"out={target}"
        )
        assert (code, out) == (0, "written: 5\n")
        with open(target, "rb") as f:
            assert f.read() == b"hello"
        code, out, err = call(
            capsys, "--socket", served.path, "test-read", "--fd", f"in={tmp}/missing"
        )
        assert code == 2
        assert err == f"vmipc call: --fd in: cannot open {tmp}/missing: No such file or directory\n"


def test_fd_of_the_wrong_kind_is_refused_by_the_server(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    with short_tmpdir() as tmp:
        code, _, err = call(capsys, "--socket", served.path, "test-read", "--fd", f"in={tmp}")
        assert code in (1, 2)  # the open itself may fail (EISDIR); else the server refuses
        assert "directory" in err.lower()


def test_stdout_passed_as_an_fd_carries_data_and_the_result_goes_to_stderr(
    served: Served,
) -> None:
    pipeline = (
        f"{sys.executable} -m vmipc.cli.call --socket {served.path} "
        "test-write data=piped --fd out=- | cat"
    )
    proc = subprocess.run(pipeline, shell=True, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "piped"
    assert proc.stderr == "written: 5\n"


def test_stdin_passed_as_an_in_fd(served: Served) -> None:
    argv = ["--socket", served.path, "--json", "test-read", "size=100", "--fd", "in=-"]
    proc = subprocess.run(
        [sys.executable, "-m", "vmipc.cli.call", *argv],
        input=b"from stdin",
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"data": {"base64": "ZnJvbSBzdGRpbg=="}}


def test_list_and_command_help_come_from_the_server(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = call(capsys, "--socket", served.path, "--list")
    assert code == 0
    assert "  test-write  " in out  # a command only this server's catalogue has
    code, out, _ = call(capsys, "--socket", served.path, "test-write", "--help")
    assert code == 0
    assert out.startswith("usage: vmipc call test-write data=VALUE --fd out=PATH|-\n")
    assert "out (out: written by the server, required)" in out


def test_help_and_list_without_a_server_use_the_local_schema(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VMIPC_SOCKET", raising=False)
    code, out, err = call(capsys, "pause", "--help")
    assert code == 0
    assert out.startswith("usage: vmipc call pause [lease=VALUE]\n")
    assert "showing this client's own schema" in err
    code, out, _ = call(capsys, "--help")
    assert code == 0 and "exit codes:" in out


def test_connection_problems_are_exit_3(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VMIPC_SOCKET", raising=False)
    assert call(capsys, "query-status") == (
        2,
        "",
        "vmipc call: no socket: pass --socket PATH or set $VMIPC_SOCKET\n",
    )
    with short_tmpdir() as tmp:
        path = os.path.join(tmp, "none.sock")
        code, _, err = call(capsys, "--socket", path, "query-status")
        assert code == 3
        assert err == f"vmipc call: cannot connect to {path}: No such file or directory\n"
    with serving(ServerConfig(max_connections=0)) as s:
        code, _, err = call(capsys, "--socket", s.path, "query-status")
        assert code == 3
        assert "the server closed the connection: too-many-connections" in err


def test_socket_from_the_environment(
    served: Served, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMIPC_SOCKET", served.path)
    assert call(capsys, "query-status", "--json")[0] == 0


def test_through_the_vmipc_command(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert vmipc_main(["call", "--socket", served.path, "pause", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {}
    assert vmipc_main(["call", "--socket", served.path, "resume"]) == 0
    assert served.machine.calls == ["pause", "resume"]

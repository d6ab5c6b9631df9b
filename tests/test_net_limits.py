"""The receiver's bounds and the channel's credentials, without a VMM: the shape a peer
may ask for (pinned, or the default ceiling), which addresses need credentials, and what
a token file must be."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmipc.sequences import ControlError, CredentialsError, Shape, security_for
from vmipc.sequences._net import DEFAULT_MAX_MEMORY


def test_without_pins_a_peer_may_ask_at_most_the_default_ceiling() -> None:
    shape = Shape()
    cpus = os.cpu_count() or 1
    assert shape.check(64 << 20, 1) == (64 << 20, 1)
    assert shape.check(DEFAULT_MAX_MEMORY, cpus) == (DEFAULT_MAX_MEMORY, cpus)
    with pytest.raises(ControlError, match="--memory"):
        shape.check(64 << 30, 1)  # what the peer asked for
    with pytest.raises(ControlError, match="--vcpus"):
        shape.check(64 << 20, 64)
    for memory, vcpus in ((0, 1), (64 << 20, 0), (-1, 1), ("64M", 1), (64 << 20, True), (1.5, 2)):
        with pytest.raises(ControlError):
            shape.check(memory, vcpus)


def test_pins_accept_exactly_that_shape() -> None:
    shape = Shape(memory=8 << 30, vcpus=4)  # pins may exceed the default ceiling
    assert shape.check(8 << 30, 4) == (8 << 30, 4)
    with pytest.raises(ControlError, match="--memory"):
        shape.check(64 << 20, 4)
    with pytest.raises(ControlError, match="--vcpus"):
        shape.check(8 << 30, 2)


def _token(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_credentials_are_needed_off_loopback_unless_insecure(tmp_path: Path) -> None:
    assert security_for("127.0.0.1") is None
    assert security_for("::1") is None
    assert security_for("localhost") is None
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        with pytest.raises(CredentialsError, match="--insecure"):
            security_for(host)
        assert security_for(host, insecure=True) is None
    token = _token(tmp_path, "x" * 32)
    creds = security_for("10.1.2.3", token_file=token)
    assert creds is not None and creds.mode == "token" and creds.token == b"x" * 32
    with pytest.raises(CredentialsError):
        security_for("10.1.2.3", token_file=token, insecure=True)
    with pytest.raises(CredentialsError, match="all of"):
        security_for("10.1.2.3", cert="c.pem")
    with pytest.raises(CredentialsError, match="either"):
        security_for("10.1.2.3", cert="c", key="k", ca="ca", token_file=token)


def test_a_token_file_must_be_private_and_long_enough(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="readable by others"):
        security_for("10.1.2.3", token_file=_token(tmp_path, "x" * 32, 0o644))
    with pytest.raises(CredentialsError, match="shorter"):
        security_for("10.1.2.3", token_file=_token(tmp_path, "short\n"))
    with pytest.raises(CredentialsError, match="cannot open"):
        security_for("10.1.2.3", token_file=str(tmp_path / "missing"))

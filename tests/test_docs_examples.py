"""The shell examples in docs/ run as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.builtin_guest import check_against_model

ROOT = Path(__file__).resolve().parent.parent


def test_the_formats_page_shows_the_script_that_is_tested() -> None:
    script = (ROOT / "docs/examples/snapshot-by-hand.sh").read_text()
    body = "".join(script.splitlines(keepends=True)[3:])
    assert body in (ROOT / "docs/formats.md").read_text()


@pytest.mark.kvm
def test_snapshot_by_hand(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(ROOT / "docs/examples/snapshot-by-hand.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert "snap.vmipc: ok (4 sections" in result.stdout
    before = (tmp_path / "before.log").read_text()
    after = (tmp_path / "after.log").read_text()
    assert after, "the restored guest printed nothing"
    lines = (before + after).split("\n")[:-1]
    assert min(check_against_model(lines, 2, 256 * 1024).values()) > 1

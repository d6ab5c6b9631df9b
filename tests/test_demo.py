"""The main job (`make demo`, `vmipc demo`) runs and says what it checked."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.kvm


def test_demo_boots_checkpoints_restores_and_migrates() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vmipc", "demo", "--memory", "64M", "--ws", "1M"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in ("== 1. boot", "== 2. checkpoint", "== 3. restore", "== 4. live-migrate"):
        assert step in out
    assert "lines after the restore match the guest's model" in out
    assert "lines across source and target match the guest's model" in out
    assert out.rstrip().endswith("the guest ran on exactly after checkpoint, restore and migration")

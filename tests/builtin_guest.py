"""Helpers for tests that run the built-in guest and check its console."""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections import defaultdict

from vmipc.guest import beat_line, pass_sums

LINE = re.compile(r"vcpu=(\d+) (?:pass=(\d+) sum=([0-9a-f]{16})|done|beat=(\d+)|ERROR .*)")


class Console:
    """A thread-safe console sink that keeps everything the guest printed."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self._lock:
            self._chunks.append(data)

    @property
    def text(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode(errors="replace")

    def lines(self) -> list[str]:
        """Complete lines only (a pause may cut the last one)."""
        return self.text.split("\n")[:-1]

    def passes(self) -> dict[int, int]:
        """The highest pass number each vCPU has reported so far."""
        done: dict[int, int] = {}
        for line in self.lines():
            match = LINE.fullmatch(line)
            if match and match.group(2):
                done[int(match.group(1))] = int(match.group(2))
        return done

    def wait_for_passes(self, vcpus: int, passes: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.passes()
            if len(done) == vcpus and min(done.values()) >= passes:
                return
            time.sleep(0.01)
        raise AssertionError(f"guest did not reach pass {passes} on {vcpus} vcpus: {done}")


def check_beats(lines: list[str]) -> int:
    """The heartbeat lines (``beat=N``) are vCPU 0's, numbered 1, 2, 3, ... with none lost or
    repeated. Returns how many there are."""
    beats = 0
    for line in lines:
        match = LINE.fullmatch(line)
        if match and match.group(4):
            assert line == beat_line(beats + 1), f"{line!r} after beat {beats}"
            beats += 1
    return beats


def check_against_model(lines: list[str], vcpus: int, ws: int, seed: int = 0) -> dict[int, int]:
    """Every pass line is exactly what the guest model says, in order, for every vCPU; the
    heartbeat lines, if any, count 1, 2, 3, ...; no ERROR lines. Returns the number of pass
    lines per vCPU."""
    per_vcpu: dict[int, list[tuple[int, str]]] = defaultdict(list)
    check_beats(lines)
    for line in lines:
        if line.startswith("vmipc-guest "):
            continue
        match = LINE.fullmatch(line)
        assert match, f"unexpected console line {line!r}"
        assert "ERROR" not in line, line
        if match.group(2):
            per_vcpu[int(match.group(1))].append((int(match.group(2)), match.group(3)))
    assert sorted(per_vcpu) == list(range(vcpus)), f"vcpus that printed: {sorted(per_vcpu)}"
    counts = {}
    for vcpu, got in per_vcpu.items():
        model = itertools.islice(pass_sums(vcpu, ws, seed), len(got))
        expected = [(n, f"{value:016x}") for n, value in enumerate(model, start=1)]
        assert got == expected, f"vcpu {vcpu} diverged from the model"
        counts[vcpu] = len(got)
    return counts

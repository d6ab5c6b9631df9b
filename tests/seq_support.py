"""Helpers for the sequence tests: VMM subprocesses with console files, and checks of the
built-in guest's console against its model across a move from one VMM to another."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.builtin_guest import LINE, check_against_model
from tests.control_support import short_tmpdir
from vmipc.client import SyncClient

VMIPC = [sys.executable, "-m", "vmipc"]
VCPUS = 2
WS = 256 * 1024


class VmmProcess:
    """``vmipc vmm`` in a subprocess with a control socket and a console file."""

    def __init__(self, tmp: str, name: str, args: list[str], prefix: list[str]) -> None:
        self.socket = os.path.join(tmp, f"{name}.sock")
        self.console = Path(tmp) / f"{name}.console"
        self.stderr = Path(tmp) / f"{name}.stderr"
        argv = [*prefix, *VMIPC, "vmm", *args, "--socket", self.socket]
        argv += ["--console", str(self.console), "--no-console-input"]
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(argv, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None:
                raise AssertionError(f"VMM {name} died: {self.stderr.read_text()}")
            assert time.monotonic() < deadline, f"VMM {name} did not create its socket"
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def client(self, timeout: float = 20) -> SyncClient:
        return SyncClient(self.socket, timeout=timeout)

    def state(self) -> str | None:
        """The run state, or None when the VMM is gone."""
        if not self.alive():
            return None
        try:
            with self.client(5) as client:
                return str(client.query_status()["state"])
        except OSError:
            return None
        except Exception:
            return None

    def text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def passes(self) -> dict[int, int]:
        done: dict[int, int] = {}
        for line in self.text().split("\n")[:-1]:
            match = LINE.fullmatch(line)
            if match and match.group(2):
                done[int(match.group(1))] = int(match.group(2))
        return done

    def wait_for_passes(self, passes: int, vcpus: int = VCPUS, timeout: float = 15) -> int:
        """Wait until every vCPU printed pass ``passes``; returns the highest pass now."""
        deadline = time.monotonic() + timeout
        done: dict[int, int] = {}
        while time.monotonic() < deadline:
            done = self.passes()
            if len(done) == vcpus and min(done.values()) >= passes:
                return max(done.values())
            assert self.alive(), f"VMM died: {self.stderr.read_text()}"
            time.sleep(0.01)
        raise AssertionError(f"guest did not reach pass {passes}: {done}")

    def wait_exit(self, timeout: float = 15) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=15)

    def stop(self) -> None:
        """Quit politely, else kill; never leaves the process behind."""
        if self.alive():
            with contextlib.suppress(Exception), self.client(5) as client:
                client.quit()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc.wait(timeout=15)


class Vmms:
    """Start VMM processes; every one is stopped at the end of the ``vmm_processes`` block."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.made: list[VmmProcess] = []

    def guest(
        self,
        name: str = "src",
        *,
        ws: int = WS,
        rate: int | None = None,
        memory: str = "64M",
        prefix: tuple[str, ...] = (),
    ) -> VmmProcess:
        args = ["--guest", "builtin", "--vcpus", str(VCPUS), "--memory", memory]
        args += ["--guest-opt", f"ws={ws}"]
        if rate is not None:
            args += ["--guest-opt", f"rate={rate}"]
        return self._start(name, args, list(prefix))

    def incoming(
        self, name: str = "dst", *, memory: str | None = "64M", prefix: tuple[str, ...] = ()
    ) -> VmmProcess:
        args = ["--incoming"]
        if memory is not None:
            args += ["--memory", memory, "--vcpus", str(VCPUS)]
        return self._start(name, args, list(prefix))

    def _start(self, name: str, args: list[str], prefix: list[str]) -> VmmProcess:
        vmm = VmmProcess(self.tmp, name, args, prefix)
        self.made.append(vmm)
        return vmm


@contextlib.contextmanager
def vmm_processes() -> Iterator[Vmms]:
    with short_tmpdir() as tmp:
        vmms = Vmms(tmp)
        try:
            yield vmms
        finally:
            for vmm in vmms.made:
                vmm.stop()


def vmipc(
    *argv: str, timeout: float = 60, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, *VMIPC, *argv], capture_output=True, text=True, timeout=timeout)


def check_continuation(before: str, after: str, ws: int = WS) -> dict[int, int]:
    """The console of one VMM up to the moment it stopped (``before``) followed by the
    console of the VMM the guest moved to (``after``) is exactly an uninterrupted run: every
    vCPU's lines are the model's, in order, none lost or repeated (a line cut by the move
    is completed by the other side). Returns the pass lines per vCPU."""
    return check_against_model((before + after).split("\n")[:-1], VCPUS, ws)


def running_count(*vmms: VmmProcess) -> int:
    return sum(1 for vmm in vmms if vmm.state() == "running")


def wait_for(predicate: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def check_structure(text: str, vcpus: int = VCPUS) -> dict[int, int]:
    """A cheaper check than the model's, for guests too fast to model in a test: every line
    is a pass line (or the banner), no ERROR, and each vCPU's pass numbers go 1, 2, 3, ...
    with none lost or repeated. Returns the last pass per vCPU."""
    last: dict[int, int] = {}
    for line in text.split("\n")[:-1]:
        if line.startswith("vmipc-guest "):
            continue
        match = LINE.fullmatch(line)
        assert match and match.group(2), f"unexpected console line {line!r}"
        vcpu, number = int(match.group(1)), int(match.group(2))
        assert number == last.get(vcpu, 0) + 1, f"vcpu {vcpu}: pass {number} after {last.get(vcpu)}"
        last[vcpu] = number
    assert sorted(last) == list(range(vcpus))
    return last

"""Helpers shared by the ``bench_*.py`` scripts: statistics, Markdown output, finding QEMU
and a QMP connection over a UNIX socket.

The scripts run as ``python benchmarks/bench_x.py``, so this directory is ``sys.path[0]``
and ``import _common`` works from any working directory.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
QEMU = "qemu-system-x86_64"


# --- statistics and output ----------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Linearly interpolated percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.1f} ms"


def us(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e6:.0f} µs"


def ratio(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None or baseline <= 0:
        return "—"
    return f"{value / baseline:.2f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def gbps(size: int, seconds: float) -> float:
    return size / seconds / 1e9


def wait_for(check: Callable[[], bool], what: str, timeout: float, poll: float = 0.05) -> None:
    """Poll ``check`` until it is true; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


#: lines of QEMU's output that say nothing about why it failed
QEMU_NOISE = ("host doesn't support requested feature", "hotpluggable cpus")


def tail(path: Path, lines: int = 2) -> str:
    """The last ``lines`` non-empty lines of a child's output file, for an error message
    (QEMU's routine warnings left out)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "no output"
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    kept = [line for line in kept if not any(noise in line for noise in QEMU_NOISE)]
    return " / ".join(kept[-lines:]) or "no output"


def say(text: str = "") -> None:
    print(text, flush=True)


def progress(text: str) -> None:
    print(f"... {text}", file=sys.stderr, flush=True)


def say_banner(title: str, quick: bool, *about: str) -> None:
    """The run's title and one line on the machine it ran on (CPUs, load, Python, kernel)
    and ``about`` it (what was measured: the tree, QEMU's version...)."""
    say(f"# {title} ({'quick' if quick else 'full'} run)")
    say()
    machine = (
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start, "
        f"Python {sys.version.split()[0]}, {os.uname().release}"
    )
    say("; ".join((machine, *about)))
    say()


def say_notes(notes: Sequence[str]) -> None:
    """A "Notes:" list (each note once, in order), nothing when there are none."""
    if notes:
        say("Notes:")
        say()
        for note in dict.fromkeys(notes):
            say(f"- {note}")
        say()


# --- QEMU ---------------------------------------------------------------------------------


def find_qemu(
    progress: Callable[[str], None] = progress, still_missing: str = "the installer"
) -> tuple[str | None, str]:
    """The QEMU binary, installed with the project's installer if missing, or why not."""
    path = shutil.which(QEMU)
    if path is not None:
        return path, ""
    progress(f"{QEMU} is missing: running tools/install-system-deps")
    try:
        subprocess.run([str(REPO / "tools" / "install-system-deps")], check=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{QEMU} is not installed and tools/install-system-deps failed ({exc})"
    path = shutil.which(QEMU)
    return (path, "") if path else (None, f"{QEMU} is still missing after {still_missing}")


def qemu_or_note(
    skip: bool, notes: list[str], what: str = "QEMU columns", **find: Any
) -> str | None:
    """The QEMU to measure beside vmipc, or None with a note saying why not: ``skip``
    (``--no-qemu``), or :func:`find_qemu` (given ``find``) found none."""
    if skip:
        notes.append(f"{what} skipped: --no-qemu")
        return None
    qemu, why = find_qemu(**find)
    if qemu is None:
        notes.append(f"{what} skipped: {why}")
    return qemu


def note_repeated(failures: Sequence[str], notes: list[str], what: str = "boot(s)") -> None:
    """A note that QEMU runs failed and were repeated, and why, if any did."""
    if failures:
        notes.append(
            f"{len(failures)} QEMU {what} failed and were repeated: "
            f"{'; '.join(sorted(set(failures)))}"
        )


def write_json(path: str | None, results: Any) -> None:
    """Every sample of a run as JSON in ``path`` (``--json``), if asked."""
    if path:
        Path(path).write_text(json.dumps(results, indent=1, default=str) + "\n")


class QemuFailed(Exception):
    pass


class QmpConnection:
    """A QMP connection on a connected socket: commands (an fd passed by SCM_RIGHTS where
    asked); events go to :meth:`_event`, which drops them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")
        self._message()  # the greeting
        self.execute("qmp_capabilities")

    def _message(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise QemuFailed("QEMU closed its QMP socket")
        message: dict[str, Any] = json.loads(line)
        return message

    def _event(self, message: dict[str, Any]) -> None:
        pass

    def execute(self, command: str, arguments: dict[str, Any] | None = None, fd: int = -1) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        data = json.dumps(request).encode() + b"\n"
        if fd >= 0:
            rights = array.array("i", [fd]).tobytes()
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        else:
            self.sock.sendall(data)
        while True:
            message = self._message()
            if "event" in message:
                self._event(message)
                continue
            if "error" in message:
                raise QemuFailed(f"QMP {command}: {message['error'].get('desc', message)}")
            return message.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
            self.sock.close()

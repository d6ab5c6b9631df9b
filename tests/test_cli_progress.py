"""Progress a person can watch: ``--progress`` of checkpoint, restore and migrate (a bar on
a terminal, JSON lines for scripts, quiet when output is not a terminal), fed by the VMM's
``progress`` events, on real VMMs."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import termios
from pathlib import Path
from typing import Any

import pytest

from tests.seq_support import VMIPC, vmipc, vmm_processes

pytestmark = pytest.mark.kvm

MEMORY = 256 << 20


def progress_lines(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_checkpoint_reports_its_steps_and_the_dump_in_bytes_of_ram(tmp_path: Path) -> None:
    with vmm_processes() as vmms:
        src = vmms.guest(memory="256M", ws=8 << 20)
        src.wait_for_passes(1)
        done = vmipc(
            "checkpoint", "--socket", src.socket, "--progress", "json", str(tmp_path / "s")
        )
        assert done.returncode == 0, done.stderr
    lines = progress_lines(done.stderr)
    steps = [line["step"] for line in lines if "command" not in line]
    assert steps.index("pause") < steps.index("dump-memory") < steps.index("resume")
    dump = [line for line in lines if line.get("command") == "dump-memory"]
    assert dump, done.stderr
    assert all(line["total"] == MEMORY and line["phase"] == "memory" for line in dump)
    assert [line["done"] for line in dump] == sorted(line["done"] for line in dump)
    assert dump[-1]["done"] == MEMORY  # the last report says all of RAM, holes included


def test_without_a_terminal_the_default_shows_nothing(tmp_path: Path) -> None:
    with vmm_processes() as vmms:
        src = vmms.guest()
        src.wait_for_passes(1)
        done = vmipc("checkpoint", "--socket", src.socket, str(tmp_path / "s"))
        assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_on_a_terminal_a_bar_is_drawn(tmp_path: Path) -> None:
    """stdout and stderr a pseudo-terminal, as a person runs it: tqdm's bar on stderr."""
    with vmm_processes() as vmms:
        src = vmms.guest(memory="256M", ws=8 << 20)
        src.wait_for_passes(1)
        primary, secondary = pty.openpty()
        fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        try:
            proc = subprocess.run(
                [*VMIPC, "checkpoint", "--socket", src.socket, str(tmp_path / "s")],
                stdin=subprocess.DEVNULL,
                stdout=secondary,
                stderr=secondary,
                timeout=60,
            )
            os.close(secondary)
            secondary = -1
            shown = b""
            while True:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: the terminal's other side is closed
                    break
                if not chunk:
                    break
                shown += chunk
        finally:
            os.close(primary)
            if secondary >= 0:
                os.close(secondary)
    assert proc.returncode == 0, shown
    text = shown.decode(errors="replace")
    assert "dump-memory memory" in text and "B/s" in text, text
    assert "snapshot" in text  # the report follows


def test_migrate_reports_the_rounds_and_the_source_dumps() -> None:
    with vmm_processes() as vmms:
        src = vmms.guest()
        dst = vmms.incoming()
        src.wait_for_passes(1)
        done = vmipc("migrate", "--socket", src.socket, "--to", dst.socket, "--progress", "json")
        assert done.returncode == 0, done.stderr
    lines = progress_lines(done.stderr)
    steps = [line["step"] for line in lines if "command" not in line]
    assert steps[:4] == ["query-status", "prepare", "dirty-log-start", "full pass"]
    assert "pause" in steps and steps[-1] == "quit the source"
    commands = {line["command"] for line in lines if "command" in line}
    assert "dump-memory" in commands
    # where the pre-copy stands: rounds, bytes sent, dirty bytes, the predicted downtime
    precopy = [line for line in lines if line.get("command") == "migrate"]
    assert precopy and all(line["predicted_downtime_s"] > 0 for line in precopy)
    assert precopy[-1]["sent_bytes"] >= precopy[0]["sent_bytes"] > 0


def test_vmipc_call_shows_the_progress_of_a_bulk_command(tmp_path: Path) -> None:
    with vmm_processes() as vmms:
        src = vmms.guest(memory="256M", ws=8 << 20)
        src.wait_for_passes(1)
        out = f"out={tmp_path / 'ram'}"
        done = vmipc(
            "call", "--socket", src.socket, "--progress", "json", "dump-memory", "--fd", out
        )
        assert done.returncode == 0, done.stderr
        quiet = vmipc("call", "--socket", src.socket, "dump-memory", "--fd", out)
        assert quiet.returncode == 0 and quiet.stderr == ""
    dump = progress_lines(done.stderr)
    assert dump and all(line["command"] == "dump-memory" for line in dump)
    assert dump[-1]["done"] == dump[-1]["total"] == MEMORY


def test_a_sequences_progress_leaves_the_callers_subscriptions_and_events(tmp_path: Path) -> None:
    """``checkpoint(on_progress=...)`` on a client of the caller's: its progress comes to
    the callback, while the caller's own subscription (state-change) and its events stay
    (before: the watcher replaced the subscription and swallowed every other event)."""
    import trio

    from vmipc.client import open_client
    from vmipc.sequences import checkpoint

    seen: list[Any] = []

    async def main(socket_path: str) -> tuple[frozenset[str], list[str]]:
        async with open_client(socket_path, events=["state-change"]) as client:
            await checkpoint(client, str(tmp_path / "s"), on_progress=seen.append)
            changes = []
            with trio.move_on_after(5):
                while len(changes) < 2:
                    event = await client.next_event()
                    changes.append(f"{event.data['old']}->{event.data['new']}")
            return client.subscriptions, changes

    with vmm_processes() as vmms:
        src = vmms.guest()
        src.wait_for_passes(1)
        subscriptions, changes = trio.run(main, src.socket)
    assert subscriptions == {"state-change"}
    assert changes == ["running->paused", "paused->running"]
    assert any(data.get("command") == "dump-memory" for data in seen)

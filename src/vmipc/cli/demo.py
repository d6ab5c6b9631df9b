"""``vmipc demo``: the project's main job, live — boot the built-in guest, checkpoint it,
restore the checkpoint, live-migrate the guest between two VMMs, and report.

Every step is an ordinary command a user could type; the demo only chains them and checks
each guest's console against the guest's model (the lines are a pure function of the
guest's progress, so a lost page or register would show).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmipc.cli import EXIT_FAILED, EXIT_OK

_LINE = re.compile(r"vcpu=(\d+) pass=(\d+) sum=([0-9a-f]{16})")


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="boot, checkpoint, restore and live-migrate the built-in guest, with a report",
        description=(
            "Boot the built-in guest, checkpoint it to a snapshot file, restore the "
            "snapshot in a second VMM, live-migrate the original guest to a third VMM, and "
            "check every console against the guest's model."
        ),
    )
    parser.add_argument("--memory", default="256M", help="guest RAM (default 256M)")
    parser.add_argument("--vcpus", type=int, default=2, help="vCPUs (default 2)")
    parser.add_argument("--ws", default="8M", help="working set per vCPU (default 8M)")
    parser.add_argument("--rate", default="8192", help="pages per second per vCPU")
    parser.add_argument("--workdir", help="keep the files here (default: a temporary dir)")
    parser.set_defaults(run=run)


class Vmm:
    """A `vmipc vmm` process with a control socket and a console file."""

    def __init__(self, workdir: Path, name: str, *args: str) -> None:
        self.name = name
        self.socket = str(workdir / f"{name}.sock")
        self.console = workdir / f"{name}.console"
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "vmipc", "vmm", *args,
                "--socket", self.socket, "--console", str(self.console), "--no-console-input",
            ],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {name} VMM did not start")
            time.sleep(0.05)

    def text(self) -> str:
        try:
            return self.console.read_text()
        except FileNotFoundError:
            return ""

    def lines(self) -> list[str]:
        """Complete lines (a pause for migration may cut the last one)."""
        return self.text().split("\n")[:-1]

    def passes(self) -> dict[int, int]:
        done: dict[int, int] = {}
        for line in self.lines():
            match = _LINE.fullmatch(line)
            if match:
                done[int(match.group(1))] = int(match.group(2))
        return done

    def wait_for(self, vcpus: int, passes: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.passes()
            if len(done) == vcpus and min(done.values()) >= passes:
                return
            time.sleep(0.05)
        raise RuntimeError(f"the {self.name} guest did not reach pass {passes}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def check_lines(lines: list[str], vcpus: int, ws: int) -> int:
    """Every pass line is what the guest's model says for its vCPU, and each vCPU's passes
    follow each other with no gap or repeat (they may start anywhere: a restored guest goes
    on from its checkpoint); returns how many lines were checked."""
    from vmipc.guest import pass_sums

    per_vcpu: dict[int, list[tuple[int, str]]] = {}
    for line in lines:
        if "ERROR" in line:
            raise RuntimeError(f"the guest reported: {line}")
        match = _LINE.fullmatch(line)
        if match:
            per_vcpu.setdefault(int(match.group(1)), []).append(
                (int(match.group(2)), match.group(3))
            )
    for vcpu, got in per_vcpu.items():
        first = got[0][0]
        model = itertools.islice(pass_sums(vcpu, ws), first - 1, first - 1 + len(got))
        expected = [(n, f"{value:016x}") for n, value in enumerate(model, start=first)]
        if got != expected:
            raise RuntimeError(f"vcpu {vcpu}'s console differs from the guest's model")
    return sum(len(got) for got in per_vcpu.values())


def _say(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def _workdir(path: str | None) -> Iterator[Path]:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    # AF_UNIX socket paths are short: keep the directory name short too
    temp = tempfile.mkdtemp(prefix="vmipc-demo-")
    try:
        yield Path(temp)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    from vmipc.client import SyncClient
    from vmipc.guest import working_set_bytes
    from vmipc.sequences import SequenceError, checkpoint_blocking, migrate_blocking
    from vmipc.vmm.memory import parse_size

    ws = working_set_bytes(parse_size(args.ws))
    shape = ["--memory", args.memory, "--vcpus", str(args.vcpus)]
    vmms: list[Vmm] = []
    try:
        with _workdir(args.workdir) as workdir:
            _say(f"== 1. boot the built-in guest ({args.vcpus} vCPUs, {args.memory}, ws={args.ws})")
            source = Vmm(
                workdir, "source", *shape,
                "--guest-opt", f"ws={ws}", "--guest-opt", f"rate={args.rate}",
            )  # fmt: skip
            vmms.append(source)
            source.wait_for(args.vcpus, 2)
            with SyncClient(source.socket) as client:
                _say(f"   running: {client.query_status()}")
            _say("   " + "\n   ".join(source.lines()[-args.vcpus :]))

            snapshot = workdir / "checkpoint.vmipc"
            _say(
                f"\n== 2. checkpoint it to {snapshot.name} (pause, dump-state, dump-memory, resume)"
            )
            report = checkpoint_blocking(source.socket, str(snapshot))
            _say(
                f"   {report.size} bytes of file, {snapshot.stat().st_blocks * 512} on disk "
                f"(holes for zero pages); guest paused {report.downtime_s * 1000:.1f} ms"
            )
            at_checkpoint = source.passes()

            _say("\n== 3. restore the checkpoint in a second VMM (RAM mapped lazily)")
            started = time.monotonic()
            restored = Vmm(workdir, "restored", "--restore", str(snapshot))
            vmms.append(restored)
            restored.wait_for(args.vcpus, max(at_checkpoint.values()) + 2)
            _say(
                f"   two passes done {time.monotonic() - started:.2f} s after the VMM started; "
                "it went on from the checkpoint:"
            )
            _say("   " + "\n   ".join(restored.lines()[: args.vcpus]))
            checked = check_lines(restored.lines(), args.vcpus, ws)
            _say(f"   {checked} lines after the restore match the guest's model")
            with SyncClient(restored.socket) as client:
                client.quit()
            restored.process.wait(20)

            _say("\n== 4. live-migrate the original guest to a third VMM")
            target = Vmm(workdir, "target", "--incoming", *shape)
            vmms.append(target)
            migration = migrate_blocking(source.socket, target.socket)
            source.process.wait(20)
            downtime = migration.downtime_s or 0.0
            _say(
                f"   total {migration.total_s * 1000:.0f} ms, downtime {downtime * 1000:.1f} ms, "
                f"{migration.rounds} rounds, {migration.bytes / 2**20:.1f} MiB sent VMM to VMM"
            )
            reached = max(source.passes().values())
            target.wait_for(args.vcpus, reached + 2)
            # the source's last line may have been cut by the pause: the target finishes it
            combined = (source.text() + target.text()).split("\n")[:-1]
            checked = check_lines(combined, args.vcpus, ws)
            _say(f"   {checked} lines across source and target match the guest's model")
            _say("   " + "\n   ".join(target.lines()[-args.vcpus :]))
            with SyncClient(target.socket) as client:
                client.quit()
            target.process.wait(20)
            _say("\ndone: the guest ran on exactly after checkpoint, restore and migration")
            return EXIT_OK
    except (SequenceError, RuntimeError, OSError) as exc:
        print(f"vmipc demo: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        for vmm in vmms:
            vmm.stop()

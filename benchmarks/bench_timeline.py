#!/usr/bin/env python3
"""Where the downtime of a migration goes: the stop-and-copy, step by step.

Migrates an idle built-in guest (256 MiB, 1 vCPU; ``ws=1M rate=1``) from one ``vmipc
vmm`` to a new incoming one, ``--count`` times after a warm-up, each destination the next
source, and prints the median of each step of the report's timeline from the pause to
the destination running: pause, state, last dirty round, release-lease, resume the
destination (its ``resume`` and ``query-status``), beside the downtime the report gives.
"VMM ms" is the median of what the VMM reported running the step's requests (protocol
1.8; "-" for a VMM that reports none). The downtime starts at the pause's reply, so the
pause is not part of it; "between the steps" is the downtime less the steps after the
pause: the client's own time from one step to the next.

Run: ``.venv/bin/python benchmarks/bench_timeline.py [--count N] [--memory 256M] [--vcpus 1]
[--json FILE]``. Needs a usable /dev/kvm (as root).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_sequences import BANNER, Children, VmipcVmm

from vmipc.sequences import MigrationPolicy, StepTiming, migrate_blocking

#: the steps of the downtime, in order, and how the table names them
STOP_AND_COPY = (
    ("pause", "pause"),
    ("state", "state"),
    ("last dirty round", "last dirty round"),
    ("release-lease", "release"),
    ("resume the destination", "resume at the destination"),
)


def paused_steps(timeline: Sequence[StepTiming]) -> dict[str, StepTiming]:
    """The stop-and-copy's steps (not the sides of its transfers), by name."""
    return {
        t.name: t for t in timeline if t.within is None and t.phase in ("paused", "switch-over")
    }


def run(count: int, warmup: int, memory: str, vcpus: int) -> list[dict[str, Any]]:
    kids = Children()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-timeline-") as tmp_dir:
        tmp = Path(tmp_dir)
        shape = ["--memory", memory, "--vcpus", str(vcpus)]
        guest = ["--guest", "builtin", "--guest-opt", "ws=1M", "--guest-opt", "rate=1"]
        src = VmipcVmm(kids, tmp, "src", [*guest, *shape])
        try:
            src.wait_output(lambda out: BANNER in out, "the guest's banner", 30)
            time.sleep(0.5)
            for index in range(warmup + count):
                dst = VmipcVmm(kids, tmp, f"dst{index}", ["--incoming", *shape])
                with dst.client(30):
                    pass  # it listens
                report = migrate_blocking(
                    src.socket, dst.socket, policy=MigrationPolicy(force=True)
                )
                with contextlib.suppress(subprocess.TimeoutExpired):
                    src.proc.wait(10)
                kids.kill(src.proc)
                kids.reap()
                src = dst
                if index >= warmup:
                    runs.append(
                        {
                            "downtime_s": report.downtime_s,
                            "total_s": report.total_s,
                            "steps": {
                                name: {"duration_s": t.duration_s, "server_s": t.server_s}
                                for name, t in paused_steps(report.timeline).items()
                            },
                        }
                    )
                time.sleep(0.3)
        finally:
            src.quit()
            kids.kill_all()
    return runs


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f} ms"


def median_of(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5, help="migrations measured (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="migrations first (default 1)")
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    args = parser.parse_args()
    runs = run(args.count, args.warmup, args.memory, args.vcpus)
    downtime = median_of([r["downtime_s"] for r in runs])
    print(
        f"Idle guest, {args.memory}, {args.vcpus} vCPU, one host; median of {len(runs)} "
        "migrations\n"
    )
    print("| step | client | VMM | share of the downtime |")
    print("|---|---|---|---|")
    for name, label in STOP_AND_COPY:
        client = median_of([r["steps"].get(name, {}).get("duration_s") for r in runs])
        server = median_of([r["steps"].get(name, {}).get("server_s") for r in runs])
        share = "-" if client is None or not downtime else f"{client / downtime:.0%}"
        print(f"| {label} | {ms(client)} | {ms(server)} | {share} |")
    # the downtime starts at the pause's reply: what the steps after it leave unexplained
    # is the client's own time between them (task switches, time-limit scopes, lease task)
    gaps = [
        r["downtime_s"]
        - sum(step["duration_s"] for name, step in r["steps"].items() if name != "pause")
        for r in runs
    ]
    gap = median_of(gaps)
    share = "-" if gap is None or not downtime else f"{gap / downtime:.0%}"
    print(f"| between the steps (client) | {ms(gap)} | | {share} |")
    print(f"| **downtime (report)** | {ms(downtime)} | | 100% |")
    print(f"\ntotal (median): {ms(median_of([r['total_s'] for r in runs]))}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

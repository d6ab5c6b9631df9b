"""The per-step timeline of the sequences' reports: on its own (no VMM), the steps in
order, the concurrent sides of a transfer within their step, the VMM's reported times on
the step that ran when the reply came; on real KVM, the timeline of a migration, a
checkpoint and a restore names their steps in order, and the CLI prints it. No timing is
asserted: only orderings that hold whatever the machine's speed."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.seq_support import vmipc, vmm_processes
from vmipc.sequences import ServerTime, StepTiming, as_dict, run_transfer
from vmipc.sequences._steps import Steps, observe_replies

# --- on its own ------------------------------------------------------------------------------


class Timing:
    def __init__(self, queued: float, ran: float) -> None:
        self.queued = queued
        self.ran = ran


class FakeClient:
    """A client of protocol 1.8 as far as the observer goes: each ``call`` reports its
    VMM time to the observers, as the reply arrives."""

    def __init__(self) -> None:
        self.observers: list[Callable[[str, Any], None]] = []

    def add_reply_observer(self, fn: Callable[[str, Any], None]) -> None:
        self.observers.append(fn)

    def remove_reply_observer(self, fn: Callable[[str, Any], None]) -> None:
        self.observers.remove(fn)

    async def call(self, command: str, queued: float, ran: float) -> None:
        await trio.sleep(0.001)
        for fn in self.observers:
            fn(command, Timing(queued, ran))


def run_mock(main: Callable[[], Any]) -> Any:
    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_server_times_go_to_the_step_that_ran_per_command() -> None:
    source, dest = FakeClient(), FakeClient()

    async def main() -> tuple[StepTiming, ...]:
        steps = Steps(phase="before", clock=trio.current_time)
        async with observe_replies(steps, source, dest, None, object()):
            async with steps.step("pause"):
                await source.call("pause", 0.25, 0.5)
            with steps.during("paused"):
                async with steps.step("last dirty round"):
                    await source.call("query-dirty", 0.0, 1.0)
                    await source.call("dump-dirty", 0.5, 2.0)
                    await dest.call("apply-pages", 0.0, 3.0)
                    await source.call("dump-dirty", 0.25, 4.0)
                await source.call("renew-lease", 0.0, 8.0)  # between steps: no step's
                async with steps.step("state"):
                    await dest.call("load-state", 0.0, 16.0)
        assert source.observers == [] and dest.observers == []  # taken off again
        await source.call("quit", 0.0, 32.0)  # after the sequence: nobody listens
        assert steps.outside == {"renew-lease": [1, 0.0, 8.0]}
        return steps.timeline()

    timeline = run_mock(main)
    assert [(t.name, t.phase) for t in timeline] == [
        ("pause", "before"),
        ("last dirty round", "paused"),
        ("state", "paused"),
    ]
    assert timeline[0].server == (ServerTime("pause", 1, 0.25, 0.5),)
    assert timeline[1].server == (
        ServerTime("query-dirty", 1, 0.0, 1.0),
        ServerTime("dump-dirty", 2, 0.75, 6.0),
        ServerTime("apply-pages", 1, 0.0, 3.0),
    )
    assert timeline[1].server_s == 10.0
    assert timeline[2].server == (ServerTime("load-state", 1, 0.0, 16.0),)
    for t in timeline:
        assert t.within is None and t.duration_s >= 0
    for before, after in itertools.pairwise(timeline):
        assert before.start_s + before.duration_s <= after.start_s


def test_a_vmm_without_reply_timings_leaves_the_server_part_empty() -> None:
    class OldClient:
        pass

    async def main() -> tuple[StepTiming, ...]:
        steps = Steps(clock=trio.current_time)
        async with observe_replies(steps, OldClient()), steps.step("pause"):
            steps.observe_reply("pause", None)  # a reply without timing
            # a hostile VMM's nonsense is dropped, not summed
            for queued, ran in ((-1.0, 1.0), (0.0, float("nan")), (0.0, float("inf"))):
                steps.server_time("pause", queued, ran)
        return steps.timeline()

    (step,) = run_mock(main)
    assert step.server == () and step.server_s is None


def test_the_sides_of_a_transfer_overlap_within_their_step() -> None:
    async def main() -> tuple[StepTiming, ...]:
        steps = Steps(phase="precopy", clock=trio.current_time)

        async def send(fd: int) -> dict[str, Any]:
            await trio.sleep(2)
            return {}

        async def receive(fd: int) -> dict[str, Any]:
            await trio.sleep(3)
            return {"bytes": 0}

        async with steps.step("full pass"):
            await run_transfer("pages", send, receive)
        async with steps.step("query-dirty"):
            await trio.sleep(1)
        return steps.timeline()

    timeline = run_mock(main)
    step, *sides, query = timeline
    assert (step.name, step.within, query.name, query.within) == (
        "full pass",
        None,
        "query-dirty",
        None,
    )
    # the two sides, in the order trio started them
    source, dest = sorted(sides, key=lambda t: t.name != "source")
    assert [(t.name, t.within) for t in (source, dest)] == [
        ("source", "full pass"),
        ("destination", "full pass"),
    ]
    assert all(t.phase == "precopy" for t in timeline)
    # both sides ran at once, inside their step (the mock clock makes these exact)
    assert source.start_s == dest.start_s == step.start_s
    assert (source.duration_s, dest.duration_s, step.duration_s) == (2, 3, 3)
    assert query.start_s == 3 and query.duration_s == 1
    assert as_dict(step)["within"] is None and as_dict(source)["within"] == "full pass"


def test_a_failing_step_is_timed_without_its_rollback() -> None:
    async def rollback(exc: BaseException) -> str:
        await trio.sleep(5)
        return "undone"

    async def main() -> tuple[StepTiming, ...]:
        steps = Steps(clock=trio.current_time)
        with pytest.raises(Exception, match="broke"):
            async with steps.phase(rollback), steps.step("dump-state"):
                await trio.sleep(1)
                raise RuntimeError("broke")
        return steps.timeline()

    (step,) = run_mock(main)
    assert (step.name, step.duration_s) == ("dump-state", 1)


# --- on real KVM -----------------------------------------------------------------------------


def top_level(timeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in timeline if t["within"] is None]


def check_shape(timeline: list[dict[str, Any]]) -> None:
    """Durations are not negative; steps run one after another; each side of a transfer
    lies within its step."""
    steps = top_level(timeline)
    for t in timeline:
        assert t["start_s"] >= 0 and t["duration_s"] >= 0, t
    for before, after in itertools.pairwise(steps):
        assert before["start_s"] + before["duration_s"] <= after["start_s"], (before, after)
    by_name = {t["name"]: t for t in steps}
    for t in timeline:
        if t["within"] is not None:
            outer = by_name[t["within"]]
            assert outer["start_s"] <= t["start_s"]
            assert t["start_s"] + t["duration_s"] <= outer["start_s"] + outer["duration_s"]


def phases_in_order(timeline: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for t in top_level(timeline):
        if not seen or seen[-1] != t["phase"]:
            seen.append(t["phase"])
    return seen


@pytest.mark.kvm
def test_a_migration_timeline_names_its_steps_in_order() -> None:
    with vmm_processes() as vmms:
        src = vmms.guest()
        dst = vmms.incoming()
        src.wait_for_passes(2)
        done = vmipc("migrate", "--socket", src.socket, "--to", dst.socket, "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert src.wait_exit() == 0
    timeline = report["timeline"]
    check_shape(timeline)
    names = [t["name"] for t in top_level(timeline)]
    assert names[:5] == ["query-status", "prepare", "dirty-log-start", "full pass", "query-dirty"]
    rounds = len(report["round_details"]) - 2  # dirty rounds while the guest ran
    assert names[5 : 5 + 2 * rounds : 2] == [f"dirty round {n}" for n in range(1, rounds + 1)]
    assert names[5 + 2 * rounds :] == [
        "pause",
        "state",
        "last dirty round",
        "flush-devices",
        "release-lease",
        "resume the destination",
        "quit the source",
    ]
    assert phases_in_order(timeline) == ["prepare", "precopy", "paused", "switch-over", "finish"]
    # every transfer shows its two sides
    sides = [(t["within"], t["name"]) for t in timeline if t["within"] is not None]
    for step in ("full pass", "last dirty round", "state"):
        assert (step, "source") in sides and (step, "destination") in sides
    # the downtime runs from the pause's reply to the destination running: the steps in
    # between (one after another) fit in it
    steps = top_level(timeline)
    after_pause = names.index("pause") + 1
    within_downtime = steps[after_pause : names.index("resume the destination") + 1]
    assert sum(t["duration_s"] for t in within_downtime) <= report["downtime_s"]


@pytest.mark.kvm
def test_checkpoint_and_restore_timelines_and_the_cli_table(tmp_path: Path) -> None:
    snap = tmp_path / "vm.snap"
    with vmm_processes() as vmms:
        src = vmms.guest()
        src.wait_for_passes(2)
        done = vmipc("checkpoint", "--socket", src.socket, str(snap), "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        table = vmipc("checkpoint", "--socket", src.socket, str(snap), "--timeline")
        assert table.returncode == 0, table.stderr
        dst = vmms.incoming(memory=None)
        restored = vmipc("restore", "--socket", dst.socket, str(snap), "--json")
        assert restored.returncode == 0, restored.stderr
        restore_report = json.loads(restored.stdout)

    timeline = report["timeline"]
    check_shape(timeline)
    assert [t["name"] for t in timeline] == [
        "query-status",
        "query-dirty",
        "create the file",
        "pause",
        "dump-state",
        "dump-memory",
        "flush-devices",
        "seal",
        "renew-lease",
        "resume",
        "verify",
        "publish",
    ]
    assert phases_in_order(timeline) == ["prepare", "before pause", "paused", "after resume"]
    # the downtime runs from the pause's reply to the resume's
    names = [t["name"] for t in timeline]
    paused = timeline[names.index("pause") + 1 : names.index("resume") + 1]
    assert sum(t["duration_s"] for t in paused) <= report["downtime_s"]

    # the table: a header, then one line per step, in order
    lines = table.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("timeline"))
    header, *rows = lines[start + 1 :]
    assert header.split() == ["PHASE", "STEP", "START", "MS", "VMM", "MS"]
    assert len(rows) == len(names)
    for row, name in zip(rows, names, strict=True):
        assert name in row

    restore_timeline = restore_report["timeline"]
    check_shape(restore_timeline)
    assert [t["name"] for t in restore_timeline] == [
        "query-status",
        "chain",
        "load-memory",
        "load-state",
        "resume",
    ]
    assert {t["phase"] for t in restore_timeline} == {"restore"}

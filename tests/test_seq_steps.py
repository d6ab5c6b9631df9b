"""The steps of a sequence on their own (no VMM): a failure names its step, runs the
phase's rollback once and carries its outcome; the test hook sees every step."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from vmipc.sequences import SequenceError
from vmipc.sequences._steps import Steps


class Recorder:
    def __init__(self) -> None:
        self.hooked: list[str] = []
        self.rolled_back: list[BaseException] = []

    def hook(self, step: str) -> None:
        self.hooked.append(step)

    async def rollback(self, exc: BaseException) -> str:
        await trio.sleep(0)  # may wait, even when cancelled (shielded)
        self.rolled_back.append(exc)
        return "undone"


def test_a_failing_step_is_named_and_rolled_back_once() -> None:
    seen = Recorder()

    async def main() -> None:
        steps = Steps(seen.hook)
        async with steps.phase(seen.rollback):
            async with steps.step("first"):
                pass
            async with steps.step("dirty round 3", hook="dirty round"):
                raise RuntimeError("broke")

    with pytest.raises(SequenceError) as info:
        trio.run(main)
    error = info.value
    assert (error.step, error.reason, error.outcome) == ("dirty round 3", "broke", "undone")
    assert isinstance(error.cause, RuntimeError)
    assert seen.hooked == ["first", "dirty round"]
    assert len(seen.rolled_back) == 1


def test_a_sequence_error_passes_through_untouched() -> None:
    seen = Recorder()
    raised = SequenceError("parent", "no such file", "nothing was done")

    async def main() -> None:
        steps = Steps()
        async with steps.phase(seen.rollback), steps.step("parent"):
            raise raised

    with pytest.raises(SequenceError) as info:
        trio.run(main)
    assert info.value is raised and seen.rolled_back == []


def test_a_time_limit_around_steps_rolls_back_once_and_names_the_last_step() -> None:
    seen = Recorder()

    async def main() -> None:
        steps = Steps()
        async with steps.phase(seen.rollback):
            with trio.fail_after(5):
                async with steps.step("full pass"):
                    pass
                async with steps.step("query-dirty"):
                    await trio.sleep_forever()

    with pytest.raises(SequenceError) as info:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert (info.value.step, info.value.reason) == ("query-dirty", "timed out")
    assert info.value.outcome == "undone"
    assert len(seen.rolled_back) == 1  # on the cancellation, not again on TooSlowError


def test_a_cancelled_sequence_rolls_back_and_stays_cancelled() -> None:
    seen = Recorder()

    async def main() -> None:
        steps = Steps()
        with trio.move_on_after(1) as scope:
            async with steps.phase(seen.rollback), steps.step("dump-state"):
                await trio.sleep_forever()
        assert scope.cancelled_caught

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(seen.rolled_back) == 1 and isinstance(seen.rolled_back[0], trio.Cancelled)


def test_outside_a_phase_a_failure_is_left_as_it_is() -> None:
    async def main() -> None:
        async with Steps().step("quit the source"):
            raise KeyError("x")

    with pytest.raises(KeyError):
        trio.run(main)

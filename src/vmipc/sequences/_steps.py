"""A sequence's steps: which one runs (a failure names it), the test hook, and what a
failure leaves behind.

A sequence is a few *phases* (before the pause, while paused, after the switch-over...),
each with one *rollback*: an async function that undoes what can be undone and says in
one line what was left (``"no snapshot was written; the VM runs again"``). Within a phase,
every building-block call runs in a *step*::

    steps = Steps(on_step)
    async with steps.phase(resume_the_vm):
        async with steps.step("dump-state"):
            await client.dump_state(...)

The first failure inside a phase runs its rollback (once, shielded from cancellation,
whatever the failure: a cancelled sequence cleans up too) and becomes
``SequenceError(step, cause, outcome)``; a :class:`SequenceError` raised inside has said
its outcome already and passes through untouched. A failure that only shows outside a
step (``trio.fail_after`` around several steps raises TooSlowError at its end) is caught
by the phase and named after the last step that began.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from vmipc.sequences._common import SequenceError

#: a hook the tests use to inject faults: called with the name of the step about to run
StepHook = Callable[[str], Awaitable[None] | None]
#: what a phase undoes on failure; given the failure, it says what was left behind
Rollback = Callable[[BaseException], Awaitable[str]]


async def nothing_done(exc: BaseException) -> str:
    """The rollback of a phase that changed nothing yet."""
    return "nothing was done"


class Steps:
    """The steps of one run of a sequence (see the module doc)."""

    def __init__(self, on_step: StepHook | None = None) -> None:
        #: the step that runs, or ran last
        self.name = ""
        self._on_step = on_step
        self._rollback: Rollback | None = None
        #: what the rollback said, once it ran
        self._outcome: str | None = None

    @contextlib.asynccontextmanager
    async def phase(self, rollback: Rollback) -> AsyncIterator[None]:
        """Steps inside undo with ``rollback`` when they fail."""
        outer = self._rollback
        self._rollback = rollback
        try:
            async with self._failing():
                yield
        finally:
            self._rollback = outer

    @contextlib.asynccontextmanager
    async def step(self, name: str, *, hook: str | None = None) -> AsyncIterator[None]:
        """Run one step: record ``name``, call the test hook with ``hook`` (``name`` by
        default), and on failure roll the phase back and raise SequenceError."""
        self.name = name
        async with self._failing():
            if self._on_step is not None:
                called = self._on_step(hook or name)
                if called is not None:
                    await called
            yield

    @contextlib.asynccontextmanager
    async def _failing(self) -> AsyncIterator[None]:
        try:
            yield
        except SequenceError:
            raise
        except BaseException as exc:
            rollback = self._rollback
            if rollback is None:
                raise
            outcome = await self._roll_back_once(rollback, exc)
            if isinstance(exc, Exception):
                raise SequenceError(self.name, exc, outcome) from exc
            raise

    async def _roll_back_once(self, rollback: Rollback, exc: BaseException) -> str:
        """A sequence fails once: a failure seen again on its way out (a cancellation that
        a time limit turns into TooSlowError) gets the outcome the rollback gave."""
        if self._outcome is not None:
            return self._outcome
        with trio.CancelScope(shield=True):
            outcome = await rollback(exc)
        self._outcome = outcome
        return outcome

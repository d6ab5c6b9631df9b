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

Every step is timed as it runs: :meth:`Steps.timeline` is the run's :class:`StepTiming`
list, in the order the steps began, each with the *stage* it ran in (:meth:`Steps.during`:
``"precopy"``, ``"paused"``...), its start (seconds since the sequence began) and length,
and the time the VMM reported for the requests answered while it ran
(:meth:`Steps.server_time`, fed by :func:`observe_replies`). Steps run one after another;
the two sides of a transfer (:meth:`Steps.side`: the source's dump and the destination's
load) run concurrently, inside the step that made it, and are recorded as entries
``within`` that step.

The first failure inside a phase runs its rollback (once, shielded from cancellation,
whatever the failure: a cancelled sequence cleans up too) and becomes
``SequenceError(step, cause, outcome)``; a :class:`SequenceError` raised inside has said
its outcome already and passes through untouched. A failure that only shows outside a
step (``trio.fail_after`` around several steps raises TooSlowError at its end) is caught
by the phase and named after the last step that began.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from vmipc.sequences._common import SequenceError

#: a hook the tests use to inject faults: called with the name of the step about to run
StepHook = Callable[[str], Awaitable[None] | None]
#: what a phase undoes on failure; given the failure, it says what was left behind
Rollback = Callable[[BaseException], Awaitable[str]]


async def nothing_done(exc: BaseException) -> str:
    """The rollback of a phase that changed nothing yet."""
    return "nothing was done"


@dataclass(frozen=True)
class ServerTime:
    """What the VMM reported for the replies to one command during one step (protocol
    1.8): how many replies, and the seconds their requests waited in the VMM before
    running (``queued_s``) and ran (``ran_s``), summed."""

    command: str
    replies: int
    queued_s: float
    ran_s: float


@dataclass(frozen=True)
class StepTiming:
    """One step of a sequence as it ran (the client's clock): ``start_s`` seconds after the
    sequence began, for ``duration_s``, in ``phase`` (the sequence's stage: ``precopy``,
    ``paused``, ``switch-over``...). ``server`` is what the VMM reported, per command, for
    the requests answered while the step ran (empty for a VMM older than protocol 1.8).

    ``within`` names the step this entry ran inside, concurrently with its other entries:
    the two sides of a transfer (``source``: the dump, ``destination``: the load). Entries
    with ``within=None`` ran one after another."""

    name: str
    phase: str
    start_s: float
    duration_s: float
    server: tuple[ServerTime, ...] = ()
    within: str | None = None

    @property
    def server_s(self) -> float | None:
        """Seconds the VMM reported running this step's requests; None if it reported none."""
        if not self.server:
            return None
        return sum(t.ran_s for t in self.server)


@dataclass
class _Record:
    """A step while it runs (or once it ran): what becomes its StepTiming."""

    name: str
    phase: str
    start: float
    end: float | None = None
    within: str | None = None
    #: command -> [replies, queued seconds, ran seconds]
    server: dict[str, list[Any]] = field(default_factory=dict)

    def timing(self, origin: float, now: float) -> StepTiming:
        end = now if self.end is None else self.end
        return StepTiming(
            name=self.name,
            phase=self.phase,
            start_s=self.start - origin,
            duration_s=max(0.0, end - self.start),
            server=tuple(
                ServerTime(command, int(n), float(queued), float(ran))
                for command, (n, queued, ran) in self.server.items()
            ),
            within=self.within,
        )


#: the step the current task runs (trio copies it into the tasks a step starts, such as
#: the two sides of a transfer)
_CURRENT: contextvars.ContextVar[tuple[Steps, _Record] | None] = contextvars.ContextVar(
    "vmipc_step", default=None
)


class Steps:
    """The steps of one run of a sequence (see the module doc)."""

    def __init__(
        self,
        on_step: StepHook | None = None,
        *,
        phase: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: the step that runs, or ran last
        self.name = ""
        self._on_step = on_step
        self._rollback: Rollback | None = None
        #: what the rollback said, once it ran
        self._outcome: str | None = None
        self._clock = clock
        #: the moment the sequence began: the timeline's zero
        self.began = clock()
        #: the stage steps started now are part of (:meth:`during`)
        self._phase = phase
        self._records: list[_Record] = []
        #: the steps (not sides) that run now, innermost last
        self._open: list[_Record] = []
        #: server time reported while no step ran: command -> [replies, queued, ran]
        self.outside: dict[str, list[Any]] = {}

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        """Steps started inside are recorded as part of the sequence's stage ``phase``."""
        outer = self._phase
        self._phase = phase
        try:
            yield
        finally:
            self._phase = outer

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
        default), and on failure roll the phase back and raise SequenceError. The step's
        time runs from after the hook to its end, before any rollback."""
        self.name = name
        async with self._failing():
            if self._on_step is not None:
                called = self._on_step(hook or name)
                if called is not None:
                    await called
            record = _Record(name, self._phase, self._clock())
            self._records.append(record)
            self._open.append(record)
            token = _CURRENT.set((self, record))
            try:
                yield
            finally:
                _CURRENT.reset(token)
                record.end = self._clock()
                self._open.remove(record)

    @contextlib.contextmanager
    def _side(self, name: str, within: _Record) -> Iterator[None]:
        record = _Record(name, within.phase, self._clock(), within=within.name)
        self._records.append(record)
        try:
            yield
        finally:
            record.end = self._clock()

    def server_time(self, command: str, queued: float, ran: float) -> None:
        """The VMM says its request ``command`` waited ``queued`` seconds and ran ``ran``
        seconds: add it to the step that runs now (the innermost one), per command. Values
        that are not finite non-negative numbers are a VMM's nonsense and are dropped."""
        if not all(
            isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in (queued, ran)
        ):
            return
        sums = self._open[-1].server if self._open else self.outside
        entry = sums.setdefault(command, [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += float(queued)
        entry[2] += float(ran)

    def observe_reply(self, command: str, timing: Any) -> None:
        """A reply observer (``client.add_reply_observer``, protocol 1.8): ``timing`` has
        ``.queued`` and ``.ran`` seconds, or is None when the VMM reported none."""
        queued = getattr(timing, "queued", None)
        ran = getattr(timing, "ran", None)
        if queued is None or ran is None:
            return
        self.server_time(str(command), queued, ran)

    def timeline(self) -> tuple[StepTiming, ...]:
        """The steps so far, in the order they began (a step still running: up to now)."""
        now = self._clock()
        return tuple(record.timing(self.began, now) for record in self._records)

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


@contextlib.contextmanager
def side(name: str) -> Iterator[None]:
    """Record the block as ``name``, one of the concurrent sides of the step that runs in
    this task (nothing when no step of a sequence runs: a transfer called on its own)."""
    current = _CURRENT.get()
    if current is None:
        yield
        return
    steps, within = current
    with steps._side(name, within):
        yield


@contextlib.asynccontextmanager
async def observe_replies(steps: Steps, *clients: object) -> AsyncIterator[None]:
    """While the block runs, feed the time the VMM reports for each reply on ``clients``
    to ``steps`` (:meth:`Steps.server_time`). A client offers that through
    ``add_reply_observer(fn)`` (protocol 1.8; ``fn(command, timing)``); one without it,
    or None, is left alone. The observer is taken off again afterwards
    (``remove_reply_observer(fn)``, or the callable ``add_reply_observer`` returned)."""
    undo: list[Callable[[], object]] = []
    observer = steps.observe_reply
    for client in clients:
        add = getattr(client, "add_reply_observer", None)
        if add is None:
            continue
        added = add(observer)
        remove = getattr(client, "remove_reply_observer", None)
        if callable(added):
            undo.append(added)
        elif remove is not None:
            undo.append(functools.partial(remove, observer))
    try:
        yield
    finally:
        for call in undo:
            with contextlib.suppress(Exception):
                call()

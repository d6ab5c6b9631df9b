"""Live migration, pre-copy: the source keeps running while its memory is copied, then
stops for the last dirty pages and its state.

The sequence, as building-block calls (``src`` the source VMM, ``dst`` the destination;
each ``a → b`` is one transfer: the source's dump writes into an fd whose other end the
destination's load reads, concurrently, VMM to VMM, never through this client)::

    src query-status                  running
    dst (prepare)                     an incoming VMM with the source's RAM and vCPUs
    src dirty-log-start
    src dump-memory format=stream  →  dst apply-pages          full pass, guest running
    repeat:
      src query-dirty                 predicted downtime = dirty bytes / measured rate
                                      + 4 control round trips (as long as query-dirty's)
      stop if predicted ≤ max-downtime (converged) and another round would not at
      least halve the dirty pages (settle), or rounds/timeout/no progress (not converged)
      src dump-dirty               →  dst apply-pages          a dirty round, guest running
    not converged and not force:      give up: src dirty-log-stop, dst quit; src never paused
    src pause lease=L                                          downtime starts
    src dump-dirty                 →  dst apply-pages          the last pages
    src dump-state                 →  dst load-state           vCPUs and devices
                                      (src renew-lease every L/3 meanwhile)
    src release-lease                 the source stayed paused; it stays so from here
    dst resume                                                 the switch-over point

When both VMMs speak protocol 1.8, the stop-and-copy is two ordered chains sent at once
(no round trip between its steps): ``src [pause, dump-state, dump-dirty]`` and
``dst [load-state, apply-pages]``, each VMM running its chain in order and stopping at the
first failure (the state first: the destination sets it while the source sends the
pages). ``src release-lease`` is sent once both chains answered, not chained: a lease
released before the destination holds the state would leave no VM running if this client
died then (the window stays one request wide); ``dst resume`` once it answered.
    dst query-status                  running                  downtime ends
    src quit

The guarantee of every step is in docs/sequences.md. In one line: before ``dst resume``
succeeds, any failure resumes the source (if this sequence paused it) and discards the
destination; after it, the destination runs and the source stays paused until it is told
to quit. The pause lease covers this client dying or hanging while the source is paused:
until ``release-lease`` the source VMM resumes the guest by itself; after it, nothing
does, so a client that dies at the switch-over never leaves two VMs running.

In the code (``_Migration.run``) each block above is one phase with one rollback:
``_prepare`` (nothing done), ``_precopy`` (the source runs on, the destination is
discarded), ``_stop_and_copy`` and ``_switch_over`` (the source is resumed and the
destination discarded, unless the destination's state is unknown), ``_finish`` (nothing
to undo). When to stop pre-copy is :class:`MigrationPolicy`'s, a frozen value with pure
methods. Post-copy would plug in between ``_stop_and_copy`` (then: state only) and a new
phase after ``_switch_over`` that serves the pages left; pipelined requests inside
``_stop_and_copy``.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import trio

from vmipc.client import (
    Call,
    Client,
    CommandError,
    ConnectionClosed,
    OrderedCall,
    open_client,
    server_timing,
)
from vmipc.errors import VmipcError
from vmipc.protocol import ProtocolError, UntrustedServer
from vmipc.sequences._common import (
    DEFAULT_LEASE,
    PauseLease,
    ProgressCallback,
    SequenceError,
    best_effort,
    describe,
    going_first,
    resume_if_paused,
    state_of,
    supports,
    watch_progress,
)
from vmipc.sequences._restore import attach_disk
from vmipc.sequences._steps import StepHook, Steps, StepTiming, observe_replies
from vmipc.sequences._steps import side as timed_side

#: the protocol minor of ``checksum: headers`` and ``accept_unhashed`` (page stream 1.1)
UNHASHED_MINOR = 10

#: a building-block call that writes into the fd it is given and returns its result
Send = Callable[[int], Awaitable[Mapping[str, Any]]]
Kind = Literal["pages", "state"]

DEFAULT_MAX_DOWNTIME = 0.050
DEFAULT_MAX_ROUNDS = 30
DEFAULT_TIMEOUT = 60.0
#: seconds the stop-and-copy phase may take before the source is resumed
DEFAULT_SWITCH_TIMEOUT = 15.0
#: seconds the destination's resume may take before its state is asked again
RESUME_TIMEOUT = 10.0
#: rounds in a row without a new low of dirty bytes that count as "no progress"
STALL_ROUNDS = 3
#: settling (see :meth:`MigrationPolicy.settled_reason`): no more rounds once the last
#: pages would take at most this many seconds to send
DEFAULT_SETTLE_FLOOR = 0.001
#: a settling round must be expected to leave at most this fraction of what is dirty
SETTLE_SHRINK = 0.5
#: no settling round for at most this many dirty bytes, whatever the rate says: the full
#: pass's rate understates the channel when memory is mostly zero pages (its time goes
#: into scanning them), which would send an idle guest's few dirty pages once more
SETTLE_MIN_BYTES = 256 << 10


#: control round trips between pausing the source and the destination running, counted
#: into the predicted downtime (pause, last dirty pages, state, resume)
STOP_AND_COPY_ROUND_TRIPS = 4


class TransferError(VmipcError):
    """One transfer failed; says which side (source dump, destination load) and why."""

    def __init__(self, kind: str, source: BaseException | None, dest: BaseException | None):
        parts = []
        if source is not None:
            parts.append(f"source: {describe(source)}")
        if dest is not None:
            parts.append(f"destination: {describe(dest)}")
        super().__init__(f"{kind} transfer failed ({'; '.join(parts)})")
        self.source = source
        self.dest = dest


class Destination(Protocol):
    """Where a migration goes: an incoming VMM, reached locally or over the network."""

    description: str

    async def prepare(self, memory_size: int, vcpus: int) -> None:
        """Make sure an incoming VMM with this RAM and vCPU count is ready."""

    def trust_channel(self, source: Client) -> bool:
        """After :meth:`prepare`: whether page streams from ``source`` may go without a
        hash of their pages (``checksum: headers``), which the destination then takes."""

    async def transfer(self, kind: Kind, send: Send) -> Mapping[str, Any]:
        """Run ``send`` (a source dump) into an fd whose data the destination loads
        (apply-pages for pages, load-state for state); return the destination's result.
        Raises TransferError."""

    async def resume(self) -> str:
        """Resume the destination; return its run state afterwards ("running"), or raise.
        Raises DestinationUnknown when it cannot tell whether the guest runs there."""

    async def discard(self) -> str:
        """Quit the destination (best effort); say in words what became of it."""

    async def finish(self) -> None:
        """The migration succeeded: let go of the destination (it keeps running)."""


class DestinationUnknown(VmipcError):
    """The destination's resume was sent but its outcome cannot be known."""


@dataclass
class Round:
    """One transfer of pages: the full pass (0), a dirty round, or the final one."""

    number: int
    kind: str  # full, dirty, final
    data_pages: int
    zero_pages: int
    bytes: int
    seconds: float
    #: dirty pages the source reported just before this round (None for the full pass)
    dirty_pages: int | None = None


@dataclass
class MigrationReport:
    outcome: str  # migrated, gave-up
    converged: bool
    forced: bool
    source: str
    destination: str
    total_s: float
    downtime_s: float | None
    predicted_downtime_s: float | None
    rounds: int
    bytes: int
    state_bytes: int
    round_details: list[Round] = field(default_factory=list)
    reason: str | None = None
    #: every step as it ran, in order (docs/sequences.md#timelines)
    timeline: tuple[StepTiming, ...] = ()
    #: dirty rounds run after pre-copy converged, to shrink the last one (``settle``)
    settle_rounds: int = 0
    #: why pre-copy stopped once converged (None: it did not converge)
    settled: str | None = None
    #: what the page streams' checksums covered: "full" (every byte), or "headers" (the
    #: records only: on a channel the destination trusts, see Destination.trust_channel)
    page_checksum: str = "full"


class MigrationNotConverged(SequenceError):
    """The policy gave up: the source runs on, the destination was discarded."""

    def __init__(self, reason: str, report: MigrationReport) -> None:
        super().__init__("pre-copy", reason, f"gave up: {report.source}; {report.destination}")
        self.report = report


# --- the local destination: another VMM on this host -------------------------------------

ChannelFactory = Callable[[], tuple[int, int, Callable[[], None]]]


def socketpair_channel() -> tuple[int, int, Callable[[], None]]:
    """A connected socket pair: (the source's end, the destination's end, close both)."""
    left, right = socket.socketpair()

    def close() -> None:
        left.close()
        right.close()

    return left.fileno(), right.fileno(), close


async def run_transfer(
    kind: Kind,
    send: Send,
    receive: Callable[[int], Awaitable[Mapping[str, Any]]],
    channel: ChannelFactory = socketpair_channel,
) -> Mapping[str, Any]:
    """``send`` writes into one end of a fresh channel while ``receive`` reads the other,
    concurrently. When either side fails the other is cancelled (its request too)."""
    out_fd, in_fd, close = channel()
    results: dict[str, Mapping[str, Any]] = {}
    errors: dict[str, BaseException] = {}

    async def side(
        name: str,
        call: Callable[[int], Awaitable[Mapping[str, Any]]],
        fd: int,
        cancel: trio.CancelScope,
    ) -> None:
        try:
            with timed_side("source" if name == "source" else "destination"):
                results[name] = await call(fd)
        except Exception as exc:
            errors[name] = exc
            cancel.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, "source", send, out_fd, nursery.cancel_scope)
            nursery.start_soon(side, "dest", receive, in_fd, nursery.cancel_scope)
    finally:
        close()
    if errors or "dest" not in results:
        raise TransferError(kind, errors.get("source"), errors.get("dest"))
    return results["dest"]


async def _both(kind: Kind, dump: OrderedCall, load: OrderedCall) -> tuple[Any, Any]:
    """The replies of a transfer's two sides, each a request of an ordered chain already
    sent: when either fails, waiting for the other stops, which cancels it and the rest
    of its chain (a side must not wait forever on a peer that went away)."""
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}

    async def side(name: str, call: OrderedCall, cancel: trio.CancelScope) -> None:
        try:
            # the requests were sent with the pause: a side's time here is until its reply
            with timed_side("source" if name == "source" else "destination"):
                results[name] = await call.result()
        except Exception as exc:
            errors[name] = exc
            cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, "source", dump, nursery.cancel_scope)
        nursery.start_soon(side, "dest", load, nursery.cancel_scope)
    if errors or len(results) < 2:
        raise TransferError(kind, errors.get("source"), errors.get("dest"))
    return results["source"], results["dest"]


class LocalDestination:
    """An incoming VMM on this host (``vmipc vmm --incoming --memory M --vcpus N``),
    reached through its control socket; data flows through a socket pair."""

    def __init__(
        self,
        client: Client,
        socket_path: str,
        channel: ChannelFactory = socketpair_channel,
        *,
        disk: str | None = None,
        disk_readonly: bool = False,
    ) -> None:
        self.client = client
        self.socket_path = socket_path
        #: the disk image to pass (attach-disk) to a destination started without --disk:
        #: shared storage, the source's own image
        self.disk = disk
        self.disk_readonly = disk_readonly
        self._disk_attached = False
        #: makes the data channel of one transfer (the source's end, ours, close both)
        self.channel = channel
        self.description = f"the destination VMM at {socket_path}"
        #: apply-pages takes streams whose pages are not hashed (:meth:`trust_channel`)
        self.accept_unhashed = False

    def trust_channel(self, source: Client) -> bool:
        """Whether page streams from ``source`` may go without a hash of their pages
        (``checksum: headers``, page stream 1.1), and if so, take them from now on.

        Only on the socket pairs this client makes itself (:func:`socketpair_channel`):
        nobody else holds either end, the kernel copies the bytes exactly, and the VMM
        at the other end could forge any checksum anyway, so a hash of every page would
        protect nothing and costs as much CPU as the copy, on each side. Any other
        channel (one given by the caller: a relay, another transport) keeps full
        checksums, and so does a VMM on either side older than 1.10."""
        self.accept_unhashed = (
            self.channel is socketpair_channel
            and source.protocol_minor >= UNHASHED_MINOR
            and self.client.protocol_minor >= UNHASHED_MINOR
        )
        return self.accept_unhashed

    @property
    def apply_args(self) -> dict[str, Any]:
        """apply-pages' arguments (for an ordered chain's Call)."""
        return {"accept_unhashed": True} if self.accept_unhashed else {}

    async def prepare(self, memory_size: int, vcpus: int) -> None:
        status = await self.client.query_status()
        if status["state"] != "incoming":
            raise ValueError(f"the destination is {status['state']}, not incoming")
        if self.disk is not None and not self._disk_attached:
            # before configure: the machine is then built with it
            await attach_disk(self.client, self.disk, readonly=self.disk_readonly)
            self._disk_attached = True
        if status["memory_size"] == 0:
            if not supports(self.client, "configure"):
                raise ValueError(
                    "the destination has no machine yet and is too old to be sent one: "
                    f"start it with --incoming --memory {memory_size // (1 << 20)}M "
                    f"--vcpus {vcpus}"
                )
            # the source's shape, as Cloud Hypervisor's receive-migration takes its config
            await self.client.configure(memory_size=memory_size, vcpus=vcpus)
            return await self.prepare(memory_size, vcpus)
        if (status["memory_size"], status["vcpu_count"]) != (memory_size, vcpus):
            raise ValueError(
                f"the destination has {status['memory_size']} bytes and "
                f"{status['vcpu_count']} vCPUs, the source {memory_size} and {vcpus}"
            )
        # its loads and its resume are part of the migration too: they go first
        if supports(self.client, "claim-priority"):
            await self.client.claim_priority()

    async def transfer(self, kind: Kind, send: Send) -> Mapping[str, Any]:
        async def receive(fd: int) -> Mapping[str, Any]:
            if kind == "pages":
                if self.accept_unhashed:
                    return await self.client.apply_pages(in_=fd, accept_unhashed=True)
                return await self.client.apply_pages(in_=fd)
            return await self.client.load_state(in_=fd)

        return await run_transfer(kind, send, receive, self.channel)

    async def resume(self) -> str:
        try:
            with trio.fail_after(RESUME_TIMEOUT):
                # its reply means running (its VMM lets the vCPUs go right after sending
                # it; a refusal raises): asking query-status after it would only lengthen
                # the downtime by a round trip
                await self.client.resume()
            return "running"
        except (ConnectionClosed, OSError, trio.TooSlowError) as exc:
            # The reply was lost or is late. The resume may have run, or may still run:
            # only positive evidence may let the source run again (never two VMs).
            state = await _state_at(self.socket_path)
            if state == "running":
                return "running"
            if state == _GONE:
                raise exc from None  # nobody serves the socket any more: it cannot run
            if state is not None and await _quit_at(self.socket_path):
                # it answered quit: a late resume can no longer start there, but its vCPUs
                # may run until the VMM has closed its machine; only then is it gone
                with trio.move_on_after(5):
                    while await _state_at(self.socket_path) != _GONE:
                        await trio.sleep(0.05)
                    raise exc from None
            raise DestinationUnknown(describe(exc)) from exc

    async def discard(self) -> str:
        _, error = await best_effort(self.client.quit)
        if error is None:
            return "the destination was discarded"
        if await _state_at(self.socket_path) == _GONE:
            return "the destination was discarded (its VMM is gone)"
        return f"the destination could not be told to quit ({describe(error)})"

    async def finish(self) -> None:
        if supports(self.client, "claim-priority"):
            await best_effort(self.client.release_priority)

    @property
    def ordered(self) -> bool:
        """Whether the destination takes its loads as one ordered chain (1.8)."""
        return self.client.supports_ordered


#: what :func:`_state_at` says when nobody serves the socket
_GONE = "gone"


async def _state_at(socket_path: str) -> str | None:
    """The run state of the VMM at ``socket_path``, asked on a fresh connection; ``_GONE``
    only on positive evidence that no VMM serves it (the socket file is gone, or the
    kernel refuses the connection because nothing listens on it); None when it cannot
    tell (a time-out, a refused or broken conversation: the VMM may be alive and busy)."""
    try:
        with trio.fail_after(5):
            async with open_client(socket_path) as client:
                return str((await client.query_status())["state"])
    except (UntrustedServer, ConnectionClosed):  # somebody serves it (a refusal is an answer)
        return None
    except (FileNotFoundError, ConnectionRefusedError):
        # the kernel's word that nobody listens: a VMM removes its socket file only once
        # its machine is closed (who deletes a live VMM's socket by hand owns the result)
        return _GONE
    except (OSError, CommandError, ProtocolError, trio.TooSlowError):
        return None


async def _quit_at(socket_path: str) -> bool:
    """Tell the VMM at ``socket_path`` to quit, on a fresh connection: True once it
    answered (it then runs nothing any more)."""
    try:
        with trio.fail_after(5):
            async with open_client(socket_path) as client:
                await client.quit()
    except (OSError, ConnectionClosed, CommandError, ProtocolError, trio.TooSlowError):
        return False
    return True


# --- the policy ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationPolicy:
    """When pre-copy stops, and how long each phase may take: one value, checked once
    when it is made (ValueError), so that a migration never starts with a policy that
    makes no sense."""

    #: stop the source once the predicted downtime is at most this many seconds
    max_downtime: float = DEFAULT_MAX_DOWNTIME
    #: dirty rounds after the full pass before giving up
    max_rounds: int = DEFAULT_MAX_ROUNDS
    #: seconds preparing the destination and pre-copy may take; pre-copy gives up at 80 %
    #: of it, leaving time to undo
    timeout: float = DEFAULT_TIMEOUT
    #: seconds the stop-and-copy may take before the source is resumed
    switch_timeout: float = DEFAULT_SWITCH_TIMEOUT
    #: when pre-copy does not converge, stop the source anyway instead of giving up
    force: bool = False
    #: once converged, go on with dirty rounds while each is expected to pay, so that
    #: the last round, paused, is the smallest pre-copy can reach (:meth:`settled_reason`)
    settle: bool = True
    #: seconds: no settling round once the last pages would take at most this long
    settle_floor: float = DEFAULT_SETTLE_FLOOR

    def __post_init__(self) -> None:
        if self.max_downtime < 0 or self.max_rounds < 0 or self.settle_floor < 0:
            raise ValueError("max_downtime, max_rounds and settle_floor must be 0 or more")
        if self.timeout <= 0 or self.switch_timeout <= 0:
            raise ValueError("timeout and switch_timeout must be more than 0")

    @staticmethod
    def predicted_downtime(dirty_bytes: int, bandwidth: float, round_trip: float) -> float:
        """The pause if the source stopped now: the dirty pages at the rate measured in the
        previous transfer, plus the stop-and-copy's control round trips (pause, last
        pages, state, resume), each as long as the query that counted the pages; so even
        with no page dirty the downtime is not zero."""
        return dirty_bytes / bandwidth + STOP_AND_COPY_ROUND_TRIPS * round_trip

    def settled_reason(
        self,
        *,
        dirty_bytes: int,
        last_bytes: int,
        last_seconds: float,
        round_trip: float,
        dirty_rounds: int,
        elapsed: float,
    ) -> str | None:
        """Why pre-copy, converged, should stop now (None: one more dirty round is expected
        to pay): ``dirty_bytes`` dirty after a round that sent ``last_bytes`` in
        ``last_seconds``, ``round_trip`` the query's, ``dirty_rounds`` and ``elapsed`` as
        for :meth:`give_up_reason`.

        Converging only says the downtime will be short enough; how short depends on
        where the rounds happened to stand, up to ``max_downtime``'s worth of pages. So
        while the guest dirties slower than a round sends, another round sends what is
        dirty now (for ``dirty_bytes ÷ bandwidth`` seconds), during which the guest
        dirties at the rate it showed over the last round (``dirty_bytes ÷ (last_seconds
        + round_trip)``): what that round leaves, as a fraction of what is dirty now, is
        ``(pages + round_trip) ÷ (last_seconds + round_trip)`` — ``dirty_bytes ÷
        last_bytes`` when round trips are negligible. One more round while that is at
        most :data:`SETTLE_SHRINK` (the set at least halves: the rounds shrink
        geometrically, the time they take adds up to less than twice the first), the
        pages would take more than ``settle_floor`` (another round saves at least half of
        it) and more than :data:`SETTLE_MIN_BYTES` are dirty, and the rounds and the
        time stay within the policy's limits. A guest that dirties little stops at once
        (the floors); one rewriting its working set faster
        than a round sends stops at the first round that did not shrink it (right after
        the full pass, which sends all of memory, that takes one round to see)."""
        bandwidth = last_bytes / max(last_seconds, 1e-6)
        pages = dirty_bytes / bandwidth if bandwidth > 0 else 0.0
        if not self.settle:
            return "settling is off"
        if dirty_bytes <= SETTLE_MIN_BYTES:
            return (
                f"{dirty_bytes / 1024:.0f} KiB dirty, at most the floor of "
                f"{SETTLE_MIN_BYTES >> 10} KiB"
            )
        if pages <= self.settle_floor:
            return (
                f"the last pages take {pages * 1000:.2f} ms, at most the floor of "
                f"{self.settle_floor * 1000:.2f} ms"
            )
        if dirty_rounds >= self.max_rounds:
            return f"no dirty round left after {dirty_rounds} rounds"
        if elapsed > self.timeout * 0.8:
            return "too near the timeout for another round"
        left = (pages + round_trip) / (last_seconds + round_trip)
        if left > SETTLE_SHRINK:
            return (
                f"another round would leave {left:.0%} of the dirty bytes "
                f"(more than {SETTLE_SHRINK:.0%})"
            )
        return None

    def give_up_reason(
        self, *, predicted: float, dirty_rounds: int, stalled: int, elapsed: float
    ) -> str | None:
        """Why pre-copy, not converged, should stop now (None: go on with another round):
        after ``dirty_rounds`` rounds, the last ``stalled`` of them without a new low of
        dirty bytes, ``elapsed`` seconds after the migration began."""
        if dirty_rounds >= self.max_rounds:
            reason = f"not converged after {dirty_rounds} rounds"
        elif stalled >= STALL_ROUNDS:
            reason = f"no progress for {stalled} rounds"
        elif elapsed > self.timeout * 0.8:
            reason = "not converged before the timeout"
        else:
            return None
        return (
            f"{reason} (predicted downtime {predicted * 1000:.1f} ms > "
            f"{self.max_downtime * 1000:.1f} ms)"
        )


DEFAULT_POLICY = MigrationPolicy()


# --- the sequence ------------------------------------------------------------------------


async def migrate(
    source: Client,
    dest: Destination,
    *,
    policy: MigrationPolicy = DEFAULT_POLICY,
    on_step: StepHook | None = None,
    lease: float | None = DEFAULT_LEASE,
    on_progress: ProgressCallback | None = None,
) -> MigrationReport:
    """Move the running VM behind ``source`` to ``dest`` (pre-copy; see the module doc),
    pre-copy stopping and giving up as ``policy`` says.

    Returns the report when the guest runs at the destination and the source was told to
    quit. Raises :class:`MigrationNotConverged` when the policy gave up (the source runs
    on, the destination was discarded) and :class:`SequenceError` when a step failed (its
    ``outcome`` says which VM runs). ``lease``: the source is paused with a pause lease of
    that many seconds (renewed during the stop-and-copy, released just before the
    destination resumes); None for a plain pause. ``on_step``: called with the name of
    each step before it runs (a display, or a test's fault). ``on_progress``: called with
    the data of each ``progress`` event of the source's dumps (bytes of RAM gone through).

    Throughout, the source's requests go before other clients' (``claim-priority``), so
    that a VMM busy answering monitors neither slows the pre-copy nor lengthens the
    downtime.
    """
    steps = Steps(on_step)
    # the destination's VMM too, when this client talks to it (a local destination)
    observing = observe_replies(steps, source, getattr(dest, "client", None))
    run = _Migration(source, dest, policy, lease, steps)
    run.on_progress = on_progress
    async with observing, going_first(source), watch_progress(on_progress, source):
        return await run.run()


class _Migration:
    """One migration as it goes: its phases in order (:meth:`run`), what they measured,
    and what a failure in each undoes."""

    def __init__(
        self,
        source: Client,
        dest: Destination,
        policy: MigrationPolicy,
        lease: float | None,
        steps: Steps,
    ) -> None:
        self.source = source
        self.dest = dest
        self.policy = policy
        self.lease = lease
        self.steps = steps
        self.started = time.monotonic()
        self.rounds: list[Round] = []
        self.predicted: float | None = None
        self.converged = False
        #: dirty rounds after pre-copy converged (MigrationPolicy.settle)
        self.settle_rounds = 0
        #: why pre-copy stopped once converged (MigrationPolicy.settled_reason)
        self.settled: str | None = None
        self.state_bytes = 0
        self.paused_at = self.started
        #: dump-memory's and dump-dirty's page stream arguments: ``checksum: headers``
        #: where the destination trusts the channel (LocalDestination.trust_channel)
        self.stream_args: dict[str, Any] = {}
        #: told where the pre-copy stands after every look at the dirty log
        self.on_progress: ProgressCallback | None = None

    async def run(self) -> MigrationReport:
        during = self.steps.during
        with during("prepare"):
            memory_size, vcpus = await self._check_source()
            await self._prepare(memory_size, vcpus)
        # the guest runs at the source
        with during("precopy"):
            reason = await self._precopy()
        if reason is not None and not self.policy.force:
            raise await self._give_up(reason)
        # the guest is paused. Post-copy plugs in here: the destination would resume
        # right after the state, before the last pages, and fetch them on demand in a
        # phase of its own after the switch-over
        with during("paused"):
            await self._stop_and_copy()
        with during("switch-over"):
            await self._switch_over()
        # the guest runs at the destination
        with during("finish"):
            return await self._finish()

    # --- the phases, in order ----------------------------------------------------------

    async def _check_source(self) -> tuple[int, int]:
        async with self.steps.step("query-status"):
            status = await self.source.query_status()
        if status["state"] != "running":
            raise SequenceError(
                "query-status", f"the source is {status['state']}, not running", "nothing was done"
            )
        return status["memory_size"], status["vcpu_count"]

    async def _prepare(self, memory_size: int, vcpus: int) -> None:
        # a destination that is not ready is left alone: it may be someone else's VM
        async with self.steps.phase(_source_runs_on), self.steps.step("prepare"):
            with trio.fail_after(self.policy.timeout):
                await self.dest.prepare(memory_size, vcpus)
        if self.dest.trust_channel(self.source):
            self.stream_args = {"checksum": "headers"}

    async def _precopy(self) -> str | None:
        """The full pass, then dirty rounds while the guest runs, until the predicted
        downtime is short enough and another round would not shrink it much (returns
        None), or the policy says why it gives up.

        Once converged, it stays so: the settling rounds (``policy.settle``) run while
        each is expected to halve what is dirty and stop at the first that is not, so a
        migration that converged never gives up, and the pause comes at most one round
        later than without them (with what that round left: less, unless the guest
        began to dirty faster)."""
        steps, source = self.steps, self.source
        async with steps.phase(self._undo_running):
            with trio.fail_after(self.policy.timeout):
                async with steps.step("dirty-log-start"):
                    await source.dirty_log_start()
                async with steps.step("full pass"):
                    await self._pages(
                        "full",
                        lambda fd: source.dump_memory(format="stream", out=fd, **self.stream_args),
                    )
                best = math.inf
                stalled = 0
                while True:
                    last = self.rounds[-1]
                    bandwidth = last.bytes / max(last.seconds, 1e-6)
                    async with steps.step("query-dirty"):
                        asked = time.monotonic()
                        dirty = await source.query_dirty()
                        round_trip = time.monotonic() - asked
                    self.predicted = self.policy.predicted_downtime(
                        dirty["dirty_bytes"], bandwidth, round_trip
                    )
                    self._tell_precopy(dirty["dirty_bytes"])
                    if self.converged or self.predicted <= self.policy.max_downtime:
                        self.converged = True
                        self.settled = self.policy.settled_reason(
                            dirty_bytes=dirty["dirty_bytes"],
                            last_bytes=last.bytes,
                            last_seconds=last.seconds,
                            round_trip=round_trip,
                            dirty_rounds=len(self.rounds) - 1,
                            elapsed=time.monotonic() - self.started,
                        )
                        if self.settled is not None:
                            return None
                        self.settle_rounds += 1
                    else:
                        if dirty["dirty_bytes"] < best:
                            best, stalled = dirty["dirty_bytes"], 0
                        else:
                            stalled += 1
                        reason = self.policy.give_up_reason(
                            predicted=self.predicted,
                            dirty_rounds=len(self.rounds) - 1,
                            stalled=stalled,
                            elapsed=time.monotonic() - self.started,
                        )
                        if reason is not None:
                            return reason
                    async with steps.step(f"dirty round {len(self.rounds)}", hook="dirty round"):
                        await self._pages(
                            "dirty",
                            lambda fd: source.dump_dirty(out=fd, **self.stream_args),
                            dirty["dirty_pages"],
                        )

    async def _stop_and_copy(self) -> None:
        """Pause the source, send the last dirty pages and the state while the pause lease
        is renewed, then release the lease: from here on nothing resumes the source by
        itself, so that the destination may run. As two ordered chains when both VMMs
        speak 1.8 (:meth:`_stop_and_copy_ordered`), else one request after the other."""
        dest = self.dest
        if isinstance(dest, LocalDestination) and dest.ordered and self.source.supports_ordered:
            await self._stop_and_copy_ordered(dest)
            return
        steps, source = self.steps, self.source
        async with steps.phase(self._undo_paused):
            with trio.fail_after(self.policy.switch_timeout):
                async with steps.step("pause"):
                    lease = await PauseLease.pause(source, self.lease)
                self.paused_at = time.monotonic()

                async def last_pages_and_state() -> None:
                    async with steps.step("last dirty round"):
                        dirty = await source.query_dirty()
                        await self._pages(
                            "final",
                            lambda fd: source.dump_dirty(out=fd, **self.stream_args),
                            dirty["dirty_pages"],
                        )
                    async with steps.step("state"):
                        await self.dest.transfer("state", self._dump_state)
                    if supports(source, "flush-devices"):
                        # a disk on shared storage: durable before the other side runs
                        async with steps.step("flush-devices"):
                            await source.flush_devices()

                await lease.keep_while(last_pages_and_state)
                if lease.held:
                    async with steps.step("release-lease"):
                        await lease.prove(release=True, lost=SOURCE_LEASE_LOST)

    async def _stop_and_copy_ordered(self, dest: LocalDestination) -> None:
        """The stop-and-copy as two ordered chains, sent at once: the source's pause,
        state and last dirty pages, the destination's load-state and apply-pages. Each
        VMM runs its chain in order and stops at the first failure (the rest answer
        ``chain-broken`` without running), so what a failure leaves is what the
        sequential steps leave: the source paused under its lease (resumed by the
        rollback, or by its VMM if this client dies), the destination not running. The
        steps wait for the replies in turn, under the same names.

        ``release-lease`` is not in the chain: the source would give its lease up as soon
        as its state was written, before the destination is known to hold it, and a
        client dying then would leave no VM running (nothing resumes the source). Sent
        once both chains answered, it costs one round trip and keeps that window one
        request wide."""
        steps, source = self.steps, self.source
        leased = self.lease is not None and supports(source, "renew-lease")
        async with steps.phase(self._undo_paused):
            with trio.fail_after(self.policy.switch_timeout):
                closers: list[Callable[[], None]] = []
                try:
                    async with steps.step("pause"):
                        pages_out, pages_in, close = dest.channel()
                        closers.append(close)
                        state_out, state_in, close = dest.channel()
                        closers.append(close)
                        # the loads first: they wait on their fds, the dumps write into them.
                        # The state before the last pages: the destination decodes and
                        # sets it while the source takes and sends the pages (two cores
                        # at work, not one after the other)
                        loads = await dest.client.send_ordered(
                            [
                                Call("load-state", fds={"in": state_in}),
                                Call("apply-pages", fds={"in": pages_in}, **dest.apply_args),
                            ]
                        )
                        sent = time.monotonic()
                        flush = supports(source, "flush-devices")
                        dumps = await source.send_ordered(
                            [
                                Call("pause", lease=self.lease) if leased else Call("pause"),
                                Call("dump-state", fds={"out": state_out}),
                                Call("dump-dirty", fds={"out": pages_out}, **self.stream_args),
                                # a disk on shared storage: durable before the other side runs
                                *([Call("flush-devices")] if flush else []),
                            ]
                        )
                        paused = await dumps[0].result()
                    # the downtime starts when the guest stopped, not when we heard of it:
                    # the source went on with the dumps meanwhile and its reply may come
                    # late (its worker threads compete with its event loop). The server's
                    # timing says when, counted from the send (an upper bound)
                    self.paused_at = time.monotonic()
                    took = server_timing(paused)
                    if took is not None:
                        self.paused_at = min(self.paused_at, sent + took.queued + took.ran)
                    lease = PauseLease(source, self.lease if leased else None)

                    async def last_pages_and_state() -> None:
                        async with steps.step("state"):
                            dumped, _ = await _both("state", dumps[1], loads[0])
                            self.state_bytes = dumped["bytes"]
                        async with steps.step("last dirty round"):
                            began = time.monotonic()
                            dumped, applied = await _both("pages", dumps[2], loads[1])
                            self.rounds.append(
                                Round(
                                    number=len(self.rounds),
                                    kind="final",
                                    data_pages=int(applied.get("data_pages", 0)),
                                    zero_pages=int(applied.get("zero_pages", 0)),
                                    bytes=int(applied.get("bytes", 0)),
                                    seconds=time.monotonic() - began,
                                    dirty_pages=dumped["data_pages"] + dumped["zero_pages"],
                                )
                            )
                        if flush:
                            async with steps.step("flush-devices"):
                                await dumps[3].result()

                    await lease.keep_while(last_pages_and_state)
                    if lease.held:
                        async with steps.step("release-lease"):
                            await lease.prove(release=True, lost=SOURCE_LEASE_LOST)
                finally:
                    for close in closers:
                        close()

    async def _switch_over(self) -> None:
        # no time limit of ours may interrupt it half-way
        async with self.steps.phase(self._undo_paused), self.steps.step("resume the destination"):
            with trio.CancelScope(shield=True):
                state = await self.dest.resume()
            if state != "running":
                raise RuntimeError(f"the destination is {state} after resume")

    async def _finish(self) -> MigrationReport:
        running_at = time.monotonic()
        async with self.steps.step("quit the source"):
            _, quit_error = await best_effort(self.source.quit)
        await self.dest.finish()
        return self._report(
            outcome="migrated",
            source="quit"
            if quit_error is None
            else f"paused (quit failed: {describe(quit_error)})",
            destination="running",
            downtime_s=running_at - self.paused_at,
        )

    def _tell_precopy(self, dirty_bytes: int) -> None:
        """Where the pre-copy stands, for a progress display: rounds so far, bytes sent,
        what is dirty now and the downtime it predicts."""
        if self.on_progress is not None:
            self.on_progress(
                {
                    "command": "migrate",
                    "phase": "precopy",
                    "rounds": len(self.rounds),
                    "sent_bytes": sum(r.bytes for r in self.rounds),
                    "dirty_bytes": dirty_bytes,
                    "predicted_downtime_s": self.predicted,
                }
            )

    # --- the work of the steps ---------------------------------------------------------

    async def _pages(self, kind: str, send: Send, dirty: int | None = None) -> None:
        """One transfer of pages, timed and recorded as the next round."""
        began = time.monotonic()
        result = await self.dest.transfer("pages", send)
        seconds = time.monotonic() - began
        self.rounds.append(
            Round(
                number=len(self.rounds),
                kind=kind,
                data_pages=int(result.get("data_pages", 0)),
                zero_pages=int(result.get("zero_pages", 0)),
                bytes=int(result.get("bytes", 0)),
                seconds=seconds,
                dirty_pages=dirty,
            )
        )

    async def _dump_state(self, fd: int) -> Mapping[str, Any]:
        reply = await self.source.dump_state(out=fd)
        self.state_bytes = reply["bytes"]
        return reply

    # --- what a failure leaves behind ----------------------------------------------------

    async def _undo(self, *, paused: bool) -> tuple[str, str]:
        """Before the switch-over: the source runs (again), the destination goes. Returns
        what became of each, in words."""
        if paused:
            source = await resume_if_paused(self.source)
        else:
            state = await state_of(self.source)
            source = (
                "the source VM runs on"
                if state == "running"
                else f"the source VM is {state or 'gone'}"
            )
        await best_effort(self.source.dirty_log_stop)
        return source, await self.dest.discard()

    async def _undo_running(self, exc: BaseException) -> str:
        return "; ".join(await self._undo(paused=False))

    async def _undo_paused(self, exc: BaseException) -> str:
        if isinstance(exc, DestinationUnknown):
            return (
                "the destination's state is unknown: the source stays paused (resume "
                "it only if the destination is gone)"
            )
        return "; ".join(await self._undo(paused=True))

    async def _give_up(self, reason: str) -> MigrationNotConverged:
        with trio.CancelScope(shield=True):
            _, destination = await self._undo(paused=False)
        report = self._report(
            outcome="gave-up",
            source="the source VM runs on",
            destination=destination,
            downtime_s=None,
            reason=reason,
        )
        return MigrationNotConverged(reason, report)

    def _report(
        self,
        *,
        outcome: str,
        source: str,
        destination: str,
        downtime_s: float | None,
        reason: str | None = None,
    ) -> MigrationReport:
        return MigrationReport(
            outcome=outcome,
            converged=self.converged,
            forced=outcome == "migrated" and not self.converged,
            source=source,
            destination=destination,
            total_s=time.monotonic() - self.started,
            downtime_s=downtime_s,
            predicted_downtime_s=self.predicted,
            rounds=len(self.rounds) - 1,
            bytes=sum(r.bytes for r in self.rounds),
            state_bytes=self.state_bytes,
            round_details=self.rounds,
            reason=reason,
            timeline=self.steps.timeline(),
            settle_rounds=self.settle_rounds,
            settled=self.settled,
            page_checksum=self.stream_args.get("checksum", "full"),
        )


SOURCE_LEASE_LOST = (
    "the source's pause lease ended during the stop-and-copy (its VMM resumed the guest)"
)


async def _source_runs_on(exc: BaseException) -> str:
    return "nothing was done; the source VM runs on"


async def migrate_local(
    source_socket: str,
    dest_socket: str,
    *,
    disk: str | None = None,
    disk_readonly: bool = False,
    **options: Any,
) -> MigrationReport:
    """Migrate between two VMMs on this host, by their control sockets (``options``: those
    of :func:`migrate`). ``disk``: the image (shared storage) to pass to a destination
    started without ``--disk`` (``attach-disk``), read-only with ``disk_readonly``."""
    async with AsyncExitStack() as stack:
        src = await _connect(stack, source_socket, "source")
        dst = await _connect(stack, dest_socket, "destination")
        dest = LocalDestination(dst, dest_socket, disk=disk, disk_readonly=disk_readonly)
        return await migrate(src, dest, **options)


async def _connect(stack: AsyncExitStack, socket_path: str, side: str) -> Client:
    """A client of the ``side`` VMM; a failure to reach it names the side and the path."""
    try:
        return await stack.enter_async_context(
            open_client(socket_path, client_name="vmipc migrate")
        )
    except UntrustedServer:
        raise
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot reach the {side} VMM at {socket_path}: {exc.strerror}"
        ) from None


def migrate_blocking(source_socket: str, dest_socket: str, **options: Any) -> MigrationReport:
    return trio.run(lambda: migrate_local(source_socket, dest_socket, **options))

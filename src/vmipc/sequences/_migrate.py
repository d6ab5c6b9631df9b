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
      stop if predicted ≤ max-downtime (converged), or rounds/timeout/no progress (not)
      src dump-dirty               →  dst apply-pages          a dirty round, guest running
    not converged and not force:      give up: src dirty-log-stop, dst quit; src never paused
    src pause lease=L                                          downtime starts
    src dump-dirty                 →  dst apply-pages          the last pages
    src dump-state                 →  dst load-state           vCPUs and devices
                                      (src renew-lease every L/3 meanwhile)
    src release-lease                 the source stayed paused; it stays so from here
    dst resume                                                 the switch-over point
    dst query-status                  running                  downtime ends
    src quit

The guarantee of every step is in docs/sequences.md. In one line: before ``dst resume``
succeeds, any failure resumes the source (if this sequence paused it) and discards the
destination; after it, the destination runs and the source stays paused until it is told
to quit. The pause lease covers this client dying or hanging while the source is paused:
until ``release-lease`` the source VMM resumes the guest by itself; after it, nothing
does, so a client that dies at the switch-over never leaves two VMs running.
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

from vmipc.client import Client, CommandError, ConnectionClosed, open_client
from vmipc.errors import VmipcError
from vmipc.sequences._common import (
    DEFAULT_LEASE,
    SequenceError,
    best_effort,
    describe,
    going_first,
    pause_leased,
    resume_if_paused,
    state_of,
    supports,
    while_renewing,
)

#: a building-block call that writes into the fd it is given and returns its result
Send = Callable[[int], Awaitable[Mapping[str, Any]]]
Kind = Literal["pages", "state"]
#: a hook the tests use to inject faults: called with the name of the step about to run
StepHook = Callable[[str], Awaitable[None] | None]

DEFAULT_MAX_DOWNTIME = 0.050
DEFAULT_MAX_ROUNDS = 30
DEFAULT_TIMEOUT = 60.0
#: seconds the stop-and-copy phase may take before the source is resumed
DEFAULT_SWITCH_TIMEOUT = 15.0
#: seconds the destination's resume may take before its state is asked again
RESUME_TIMEOUT = 10.0
#: rounds in a row without a new low of dirty bytes that count as "no progress"
STALL_ROUNDS = 3


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


class LocalDestination:
    """An incoming VMM on this host (``vmipc vmm --incoming --memory M --vcpus N``),
    reached through its control socket; data flows through a socket pair."""

    def __init__(
        self, client: Client, socket_path: str, channel: ChannelFactory = socketpair_channel
    ) -> None:
        self.client = client
        self.socket_path = socket_path
        self.channel = channel
        self.description = f"the destination VMM at {socket_path}"

    async def prepare(self, memory_size: int, vcpus: int) -> None:
        status = await self.client.query_status()
        if status["state"] != "incoming":
            raise ValueError(f"the destination is {status['state']}, not incoming")
        if status["memory_size"] == 0:
            raise ValueError(
                "the destination has no machine yet: start it with --incoming --memory "
                f"{memory_size // (1 << 20)}M --vcpus {vcpus}"
            )
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
                return await self.client.apply_pages(in_=fd)
            return await self.client.load_state(in_=fd)

        return await run_transfer(kind, send, receive, self.channel)

    async def resume(self) -> str:
        try:
            with trio.fail_after(RESUME_TIMEOUT):
                await self.client.resume()
                status = await self.client.query_status()
            return str(status["state"])
        except CommandError:
            raise
        except (ConnectionClosed, OSError, trio.TooSlowError) as exc:
            # the reply was lost: ask again on a fresh connection
            try:
                with trio.fail_after(5):
                    async with open_client(self.socket_path) as fresh:
                        state = (await fresh.query_status())["state"]
            except (OSError, ConnectionClosed, trio.TooSlowError):
                raise exc from None  # the VMM is gone: the guest does not run there
            except Exception:
                raise DestinationUnknown(describe(exc)) from exc
            if state == "running":
                return "running"
            raise

    async def discard(self) -> str:
        _, error = await best_effort(self.client.quit)
        if error is None:
            return "the destination was discarded"
        if not await _reachable(self.socket_path):
            return "the destination was discarded (its VMM is gone)"
        return f"the destination could not be told to quit ({describe(error)})"

    async def finish(self) -> None:
        if supports(self.client, "claim-priority"):
            await best_effort(self.client.release_priority)


async def _reachable(socket_path: str) -> bool:
    """Whether a VMM still answers at ``socket_path``."""
    try:
        with trio.fail_after(5):
            async with open_client(socket_path) as client:
                await client.query_status()
    except (OSError, ConnectionClosed, CommandError, trio.TooSlowError):
        return False
    return True


# --- the sequence ------------------------------------------------------------------------


async def _hook(on_step: StepHook | None, step: str) -> None:
    if on_step is not None:
        result = on_step(step)
        if result is not None:
            await result


def _round(
    number: int, kind: str, result: Mapping[str, Any], seconds: float, dirty: int | None
) -> Round:
    return Round(
        number=number,
        kind=kind,
        data_pages=int(result.get("data_pages", 0)),
        zero_pages=int(result.get("zero_pages", 0)),
        bytes=int(result.get("bytes", 0)),
        seconds=seconds,
        dirty_pages=dirty,
    )


async def migrate(
    source: Client,
    dest: Destination,
    *,
    max_downtime: float = DEFAULT_MAX_DOWNTIME,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    timeout: float = DEFAULT_TIMEOUT,
    switch_timeout: float = DEFAULT_SWITCH_TIMEOUT,
    force: bool = False,
    on_step: StepHook | None = None,
    lease: float | None = DEFAULT_LEASE,
) -> MigrationReport:
    """Move the running VM behind ``source`` to ``dest`` (pre-copy; see the module doc).

    Returns the report when the guest runs at the destination and the source was told to
    quit. Raises :class:`MigrationNotConverged` when the policy gave up (the source runs
    on, the destination was discarded) and :class:`SequenceError` when a step failed (its
    ``outcome`` says which VM runs). ``lease``: the source is paused with a pause lease of
    that many seconds (renewed during the stop-and-copy, released just before the
    destination resumes); None for a plain pause.

    Throughout, the source's requests go before other clients' (``claim-priority``), so
    that a VMM busy answering monitors neither slows the pre-copy nor lengthens the
    downtime.
    """
    async with going_first(source):
        return await _migrate(
            source,
            dest,
            max_downtime=max_downtime,
            max_rounds=max_rounds,
            timeout=timeout,
            switch_timeout=switch_timeout,
            force=force,
            on_step=on_step,
            lease=lease,
        )


async def _migrate(
    source: Client,
    dest: Destination,
    *,
    max_downtime: float,
    max_rounds: int,
    timeout: float,
    switch_timeout: float,
    force: bool,
    on_step: StepHook | None,
    lease: float | None,
) -> MigrationReport:
    started = time.monotonic()
    rounds: list[Round] = []
    step = "query-status"
    status = await source.query_status()
    if status["state"] != "running":
        raise SequenceError(
            step, f"the source is {status['state']}, not running", "nothing was done"
        )
    memory_size, vcpus = status["memory_size"], status["vcpu_count"]

    step = "prepare"
    await _hook(on_step, step)
    try:
        with trio.fail_after(timeout):
            await dest.prepare(memory_size, vcpus)
    except Exception as exc:
        # a destination that is not ready is left alone: it may be someone else's VM
        raise SequenceError(step, exc, "nothing was done; the source VM runs on") from exc

    async def give_up(step: str, cause: BaseException | str, *, paused: bool) -> SequenceError:
        """Before the switch-over: the source runs (again), the destination goes."""
        with trio.CancelScope(shield=True):
            parts = []
            if paused:
                parts.append(await resume_if_paused(source))
            else:
                parts.append(
                    "the source VM runs on"
                    if await state_of(source) == "running"
                    else f"the source VM is {await state_of(source) or 'gone'}"
                )
            await best_effort(source.dirty_log_stop)
            parts.append(await dest.discard())
        return SequenceError(step, cause, "; ".join(parts))

    # --- pre-copy: the guest runs ---------------------------------------------------------
    bandwidth = 0.0
    predicted: float | None = None
    converged = False
    reason: str | None = None
    try:
        with trio.fail_after(timeout):
            step = "dirty-log-start"
            await _hook(on_step, step)
            await source.dirty_log_start()
            step = "full pass"
            await _hook(on_step, step)
            began = time.monotonic()
            result = await dest.transfer(
                "pages", lambda fd: source.dump_memory(format="stream", out=fd)
            )
            rounds.append(_round(0, "full", result, time.monotonic() - began, None))
            best = math.inf
            stalled = 0
            while True:
                last = rounds[-1]
                bandwidth = last.bytes / max(last.seconds, 1e-6)
                step = "query-dirty"
                asked = time.monotonic()
                dirty = await source.query_dirty()
                round_trip = time.monotonic() - asked
                # the stop-and-copy also costs control round trips (pause, dump, load,
                # resume): even with no page dirty, downtime is not zero
                predicted = (
                    dirty["dirty_bytes"] / bandwidth + STOP_AND_COPY_ROUND_TRIPS * round_trip
                )
                if predicted <= max_downtime:
                    converged = True
                    break
                if dirty["dirty_bytes"] < best:
                    best, stalled = dirty["dirty_bytes"], 0
                else:
                    stalled += 1
                dirty_rounds = len(rounds) - 1
                if dirty_rounds >= max_rounds:
                    reason = f"not converged after {dirty_rounds} rounds"
                elif stalled >= STALL_ROUNDS:
                    reason = f"no progress for {stalled} rounds"
                elif time.monotonic() - started > timeout * 0.8:
                    reason = "not converged before the timeout"
                if reason is not None:
                    reason += (
                        f" (predicted downtime {predicted * 1000:.1f} ms > "
                        f"{max_downtime * 1000:.1f} ms)"
                    )
                    break
                step = f"dirty round {len(rounds)}"
                await _hook(on_step, "dirty round")
                began = time.monotonic()
                result = await dest.transfer("pages", lambda fd: source.dump_dirty(out=fd))
                rounds.append(
                    _round(
                        len(rounds), "dirty", result, time.monotonic() - began, dirty["dirty_pages"]
                    )
                )
    except trio.TooSlowError:
        raise await give_up(step, "timed out", paused=False) from None
    except BaseException as exc:
        error = await give_up(step, exc, paused=False)
        if isinstance(exc, Exception):
            raise error from exc
        raise

    if not converged and not force:
        assert reason is not None
        error = await give_up("pre-copy", reason, paused=False)
        report = MigrationReport(
            outcome="gave-up",
            converged=False,
            forced=False,
            source="the source VM runs on",
            destination=error.outcome.rsplit("; ", 1)[-1],
            total_s=time.monotonic() - started,
            downtime_s=None,
            predicted_downtime_s=predicted,
            rounds=len(rounds) - 1,
            bytes=sum(r.bytes for r in rounds),
            state_bytes=0,
            round_details=rounds,
            reason=reason,
        )
        raise MigrationNotConverged(reason, report)

    # --- stop and copy: the guest is paused -----------------------------------------------
    state_bytes = 0
    paused_at = time.monotonic()
    try:
        with trio.fail_after(switch_timeout):
            step = "pause"
            await _hook(on_step, step)
            leased = await pause_leased(source, lease)
            paused_at = time.monotonic()
            sent: dict[str, int] = {}

            async def stop_and_copy() -> None:
                nonlocal step
                step = "last dirty round"
                await _hook(on_step, step)
                dirty = await source.query_dirty()
                began = time.monotonic()
                result = await dest.transfer("pages", lambda fd: source.dump_dirty(out=fd))
                rounds.append(
                    _round(
                        len(rounds), "final", result, time.monotonic() - began, dirty["dirty_pages"]
                    )
                )
                step = "state"
                await _hook(on_step, step)

                async def dump_state(fd: int) -> Mapping[str, Any]:
                    reply = await source.dump_state(out=fd)
                    sent["bytes"] = reply["bytes"]
                    return reply

                await dest.transfer("state", dump_state)

            await while_renewing(source, lease if leased else None, stop_and_copy)
            state_bytes = sent.get("bytes", 0)
            if leased:
                # from here on nothing resumes the source by itself: the destination may
                step = "release-lease"
                await _hook(on_step, step)
                try:
                    await source.release_lease()
                except CommandError as exc:
                    if exc.code != "no-lease":
                        raise
                    raise RuntimeError(
                        "the source's pause lease ended during the stop-and-copy (its VMM "
                        "resumed the guest)"
                    ) from exc
        # the switch-over: no time limit of ours may interrupt it half-way
        step = "resume the destination"
        await _hook(on_step, step)
        with trio.CancelScope(shield=True):
            dest_state = await dest.resume()
        if dest_state != "running":
            raise RuntimeError(f"the destination is {dest_state} after resume")
    except DestinationUnknown as exc:
        raise SequenceError(
            step,
            exc,
            "the destination's state is unknown: the source stays paused (resume "
            "it only if the destination is gone)",
        ) from exc
    except trio.TooSlowError:
        raise await give_up(step, "timed out", paused=True) from None
    except BaseException as exc:
        error = await give_up(step, exc, paused=True)
        if isinstance(exc, Exception):
            raise error from exc
        raise
    running_at = time.monotonic()

    # --- after the switch-over: the destination runs ----------------------------------------
    step = "quit the source"
    await _hook(on_step, step)
    _, quit_error = await best_effort(source.quit)
    await dest.finish()
    return MigrationReport(
        outcome="migrated",
        converged=converged,
        forced=not converged,
        source="quit" if quit_error is None else f"paused (quit failed: {describe(quit_error)})",
        destination="running",
        total_s=time.monotonic() - started,
        downtime_s=running_at - paused_at,
        predicted_downtime_s=predicted,
        rounds=len(rounds) - 1,
        bytes=sum(r.bytes for r in rounds),
        state_bytes=state_bytes,
        round_details=rounds,
    )


async def migrate_local(source_socket: str, dest_socket: str, **options: Any) -> MigrationReport:
    """Migrate between two VMMs on this host, by their control sockets."""
    async with AsyncExitStack() as stack:
        src = await stack.enter_async_context(
            open_client(source_socket, client_name="vmipc migrate")
        )
        dst = await stack.enter_async_context(open_client(dest_socket, client_name="vmipc migrate"))
        return await migrate(src, LocalDestination(dst, dest_socket), **options)


def migrate_blocking(source_socket: str, dest_socket: str, **options: Any) -> MigrationReport:
    return trio.run(lambda: migrate_local(source_socket, dest_socket, **options))

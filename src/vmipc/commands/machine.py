"""Run-state commands: query-status, pause (with an optional lease), resume, quit, the
lease's renew-lease and release-lease, and claim-priority and release-priority (the lease
and the priority claims themselves are the server's: ``vmipc.server._lease`` and
``vmipc.server._priority``)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import trio

from vmipc.commands._registry import CommandContext, handler
from vmipc.protocol import CommandError, ErrorCode
from vmipc.vmm.host import MachineDamaged
from vmipc.vmm.machine_api import MachineApi

#: the longest lease (seconds) a client may ask for
MAX_LEASE = 3600.0
#: how long (seconds) ``pause`` may hold the event loop for the vCPUs to park, before it
#: waits for them like any other task (see Machine.begin_pause): a vCPU in guest mode
#: parks within some tens of microseconds, and any request's decoding costs about as much
PAUSE_HANDOVER = 0.0005


def check_duration(value: Any) -> float:
    """A lease length from a request, or invalid-arguments."""
    seconds = float(value)
    if not (0 < seconds <= MAX_LEASE) or math.isnan(seconds):
        raise CommandError(
            ErrorCode.INVALID_ARGUMENTS,
            f"lease must be more than 0 and at most {MAX_LEASE:g} seconds, not {value}",
            {"argument": "lease", "problem": f"out of range (0, {MAX_LEASE:g}]"},
        )
    return seconds


@handler("query-status")
async def query_status(ctx: CommandContext) -> dict[str, Any]:
    machine = ctx.machine
    return {
        "state": machine.state.value,
        "vcpu_count": machine.vcpu_count,
        "memory_size": machine.memory_size,
        "stop_reason": machine.stop_reason,
        "lease": ctx.server.pause_lease.status(),
        "first": ctx.server.priority.status(),
    }


async def pause_machine(machine: MachineApi) -> None:
    """Pause ``machine`` without blocking the event loop and without a worker thread: the
    gate is closed and the vCPUs kicked right here, and the last vCPU to park wakes this
    task through the loop's own wakeup (one cross-thread hop, not a thread pool's two).

    Shielded: once begun, a pause finishes (or fails because the guest stopped) before
    anything else touches the run state; a waiting vCPU never blocks the loop meanwhile.
    """
    token = trio.lowlevel.current_trio_token()
    parked = trio.Event()

    def wake() -> None:  # on a vCPU thread, with the machine's lock held: must not block
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(parked.set)

    with trio.CancelScope(shield=True):
        done = machine.begin_pause(wake, within=PAUSE_HANDOVER)
        while not done:
            await parked.wait()
            parked = trio.Event()
            done = machine.finish_pause(wake)


@handler("pause", exclusive=True)
async def pause(ctx: CommandContext) -> dict[str, Any]:
    lease = ctx.args["lease"]
    duration = None if lease is None else check_duration(lease)
    if duration is None:
        await pause_machine(ctx.machine)
        return {}
    with ctx.server.pause_lease.taking(ctx.connection):
        await pause_machine(ctx.machine)
        ctx.server.pause_lease.take(ctx.connection, duration)
    return {}


@handler("resume", exclusive=True)
async def resume(ctx: CommandContext) -> dict[str, Any]:
    """RUNNING before the reply; the vCPU threads are let go just after it is sent (the
    server sends it straight from this task, with no pass of the loop in between): a woken
    vCPU busy in the guest could otherwise take the loop's core before the reply is out,
    and a migration's downtime is counted until that reply. A request after this one
    (a pause) runs after the wake-up or finds the vCPUs still parked: either way right."""
    machine = ctx.machine
    try:
        machine.resume(wake=False)  # flips the gate only
    except MachineDamaged as exc:
        raise CommandError(
            ErrorCode.DAMAGED,
            f"resume: the incoming memory failed a load, and no load has replaced all of it "
            f"since: {exc.reason}",
            {"reason": exc.reason},
        ) from None
    try:
        trio.lowlevel.current_trio_token().run_sync_soon(machine.wake_vcpus)
    except trio.RunFinishedError:  # pragma: no cover - the loop is ending: no reply either
        machine.wake_vcpus()
    ctx.server.pause_lease.end()
    return {}


@handler("renew-lease")
async def renew_lease(ctx: CommandContext) -> dict[str, Any]:
    lease = ctx.args["lease"]
    duration = None if lease is None else check_duration(lease)
    return {"expires_in": ctx.server.pause_lease.renew(ctx.connection, duration)}


@handler("release-lease")
async def release_lease(ctx: CommandContext) -> dict[str, Any]:
    ctx.server.pause_lease.release(ctx.connection)
    return {}


@handler("claim-priority")
async def claim_priority(ctx: CommandContext) -> dict[str, Any]:
    ctx.server.priority.claim(ctx.connection)
    return {}


@handler("release-priority")
async def release_priority(ctx: CommandContext) -> dict[str, Any]:
    return {"released": ctx.server.priority.release(ctx.connection)}


@handler("quit", exclusive=True)
async def quit_(ctx: CommandContext) -> dict[str, Any]:
    ctx.server.request_shutdown()
    return {}

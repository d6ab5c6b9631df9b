"""Run-state commands: query-status, pause, resume, quit."""

from __future__ import annotations

from typing import Any

import trio

from vmipc.commands._registry import CommandContext, handler


@handler("query-status")
async def query_status(ctx: CommandContext) -> dict[str, Any]:
    machine = ctx.machine
    return {
        "state": machine.state.value,
        "vcpu_count": machine.vcpu_count,
        "memory_size": machine.memory_size,
        "stop_reason": machine.stop_reason,
    }


@handler("pause", exclusive=True)
async def pause(ctx: CommandContext) -> dict[str, Any]:
    # blocks until every vCPU is parked: a worker thread keeps the server responsive
    await trio.to_thread.run_sync(ctx.machine.pause)
    return {}


@handler("resume", exclusive=True)
async def resume(ctx: CommandContext) -> dict[str, Any]:
    ctx.machine.resume()  # only flips the gate and wakes the vCPU threads
    return {}


@handler("quit", exclusive=True)
async def quit_(ctx: CommandContext) -> dict[str, Any]:
    ctx.server.request_shutdown()
    return {}

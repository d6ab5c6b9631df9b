"""Bulk-data building blocks: dumps and loads of memory and state through passed fds,
and dirty-page tracking. The VMM never opens a path: it reads and writes the fds."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from vmipc.commands._bulk import (
    BulkError,
    Stats,
    encode_state_blob,
    memory_section_at,
    read_raw_image,
    read_snapshot_memory,
    read_state_blob,
    read_state_sections,
    receive_page_stream,
    send_page_stream,
    update_memory_section,
    write_memory_section,
    write_raw_image,
    write_state_sections,
)
from vmipc.commands._registry import CommandContext, handler
from vmipc.commands._restorable import check_config
from vmipc.formats import bitmap_to_runs
from vmipc.memory_layout import PAGE_SIZE
from vmipc.protocol import CommandError, ErrorCode
from vmipc.vmm.host import MachineHost
from vmipc.vmm.machine import DirtyLogMoved, DirtyLogOff, Machine, MachineState
from vmipc.vmm.machine_api import InvalidStateError
from vmipc.vmm.memory import GuestMemory
from vmipc.vmm.runstate import RunState
from vmipc.vmm.transfer import PeerClosed, Transfer, TransferCancelled, fd_kind

T = TypeVar("T")


def _host(ctx: CommandContext) -> MachineHost:
    host = ctx.machine
    if not isinstance(host, MachineHost):
        raise CommandError("internal-error", "this server has no machine host")
    return host


def _machine(ctx: CommandContext) -> Machine:
    return _host(ctx).require_machine(ctx.command)


async def _run_bulk(
    ctx: CommandContext, phase: str, total: int | None, work: Callable[[Transfer], T]
) -> T:
    """Run ``work`` in a worker thread; a cancelled request kicks it out of any blocked
    system call and waits for it, so the fd is released before the reply."""

    def report(done: int) -> None:
        ctx.progress(phase, done, total)

    transfer = Transfer.unbound(report)

    def worker() -> T:
        transfer.bind()
        try:
            return work(transfer)
        finally:
            transfer.finish()

    try:
        return await trio.to_thread.run_sync(worker, abandon_on_cancel=True)
    except trio.Cancelled:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(transfer.cancel)
        raise
    except TransferCancelled:
        raise CommandError("cancelled", f"{ctx.command} was cancelled") from None
    except PeerClosed as exc:
        raise CommandError("peer-closed", f"{ctx.command}: {exc}") from None
    except (BulkError, OSError) as exc:
        raise _command_error(ctx, exc) from None


def _command_error(ctx: CommandContext, exc: BulkError | OSError) -> CommandError:
    """What the client hears of a bulk failure: its own code, or io-error."""
    if isinstance(exc, BulkError):
        return CommandError(exc.code, f"{ctx.command}: {exc}")
    return CommandError("io-error", f"{ctx.command}: {exc.strerror or exc}")


def _require_file(ctx: CommandContext, name: str, what: str) -> int:
    fd = ctx.fds[name]
    if fd_kind(fd) != "file":
        raise CommandError(
            "invalid-fds",
            f"{ctx.command}: format {what} needs a regular file for fd {name!r}",
            {"fd": name, "problem": "not a regular file"},
        )
    return fd


def _require_positional(ctx: CommandContext, name: str, what: str, *, read: bool = False) -> int:
    """The fd of a format written at file offsets (raw into a file, snapshot sections):
    refused before anything is written when it cannot be written that way."""
    fd = ctx.fds[name]
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_APPEND:
        # Linux's pwrite ignores the offset on an O_APPEND file and appends: pages and
        # sections would land at the wrong offsets, and the reply would say it went well
        raise CommandError(
            "invalid-fds",
            f"{ctx.command}: format {what} writes at file offsets, which fd {name!r} opened "
            "with O_APPEND turns into appends (open the file without O_APPEND, e.g. "
            "--fd out=+FILE rather than >> FILE)",
            {"fd": name, "problem": "opened with O_APPEND"},
        )
    if read and flags & os.O_ACCMODE != os.O_RDWR:
        raise CommandError(
            "invalid-fds",
            f"{ctx.command}: format {what} reads the file as well as writing it: fd {name!r} "
            "must be open for reading and writing (e.g. --fd out=+FILE)",
            {"fd": name, "problem": "not open for reading"},
        )
    return fd


def _with_stats(stats: Stats, **extra: Any) -> dict[str, Any]:
    return {**stats.result(), **extra}


# --- memory --------------------------------------------------------------------------------


@handler("dump-memory")
async def dump_memory(ctx: CommandContext) -> dict[str, Any]:
    machine = _machine(ctx)
    fmt = ctx.args["format"]
    consistent = machine.state is not RunState.RUNNING
    if fmt == "snapshot":
        fd = _require_file(ctx, "out", "snapshot")
        _require_positional(ctx, "out", "snapshot")
        entry, stats = await _run_bulk(
            ctx,
            "memory",
            machine.memory_size,
            lambda t: write_memory_section(machine, fd, t, consistent=consistent),
        )
        return _with_stats(stats, consistent=consistent, section=entry.to_dict())
    if fmt == "raw":
        if fd_kind(ctx.fds["out"]) == "file":
            _require_positional(ctx, "out", "raw")
        stats = await _run_bulk(
            ctx,
            "memory",
            machine.memory_size,
            lambda t: write_raw_image(machine, ctx.fds["out"], t),
        )
        return _with_stats(stats, consistent=consistent, section=None)
    stats = await _run_bulk(
        ctx,
        "memory",
        None,
        lambda t: send_page_stream(machine, ctx.fds["out"], t, consistent=consistent),
    )
    return _with_stats(stats, consistent=consistent, section=None)


@handler("load-memory", exclusive=True)
async def load_memory(ctx: CommandContext) -> dict[str, Any]:
    host = _host(ctx)
    fmt = ctx.args["format"]
    fd = ctx.fds["in"]
    if fmt == "snapshot":
        _require_file(ctx, "in", "snapshot")
        if host.machine is None:
            state = await _run_bulk(ctx, "config", None, lambda t: read_state_sections(fd))
            try:
                check_config(state.config)  # a file's config that builds no machine
            except BulkError as exc:
                raise _command_error(ctx, exc) from None
            await trio.to_thread.run_sync(host.configure, state.config)
    machine = _incoming_machine(ctx, host)
    memory = machine.memory
    assert memory is not None
    readers: dict[str, Callable[[GuestMemory, int, Transfer], Stats]] = {
        "snapshot": read_snapshot_memory,
        "raw": read_raw_image,
        "stream": receive_page_stream,
    }
    read = readers[fmt]
    stats = await _load(ctx, host, memory.size, lambda t: read(memory, fd, t))
    return _with_stats(stats, rounds=stats.extra.get("rounds"))


async def _load(
    ctx: CommandContext, host: MachineHost, total: int | None, work: Callable[[Transfer], Stats]
) -> Stats:
    """Run a memory load; if it fails half-way the guest must not run from that memory
    until a load replaces all of it (one of some pages only, such as an empty stream, would
    leave the pages that failed their checks)."""
    try:
        stats = await _run_bulk(ctx, "memory", total, work)
    except CommandError as exc:
        host.mark_damaged(exc.message)  # "<command>: <what went wrong>"
        raise
    except BaseException as exc:
        host.mark_damaged(f"{ctx.command} did not finish ({type(exc).__name__})")
        raise
    if stats.complete:
        host.mark_complete()
    return stats


@handler("apply-pages", exclusive=True)
async def apply_pages(ctx: CommandContext) -> dict[str, Any]:
    host = _host(ctx)
    machine = _incoming_machine(ctx, host)
    memory = machine.memory
    assert memory is not None
    fd = ctx.fds["in"]
    stats = await _load(ctx, host, None, lambda t: receive_page_stream(memory, fd, t))
    return _with_stats(stats)


def _incoming_machine(ctx: CommandContext, host: MachineHost) -> Machine:
    if not host.receiving:
        raise InvalidStateError(ctx.command, host.state)
    machine = host.machine
    if machine is None:
        raise CommandError(
            "not-configured",
            f"{ctx.command}: this incoming VMM has no machine yet: start it with "
            "--memory/--vcpus, or send load-state first",
        )
    return machine


# --- state -----------------------------------------------------------------------------------


@handler("dump-state")
async def dump_state(ctx: CommandContext) -> dict[str, Any]:
    machine = _machine(ctx)
    state = await trio.to_thread.run_sync(machine.save_state)
    if ctx.args["format"] == "snapshot":
        fd = _require_file(ctx, "out", "snapshot")
        _require_positional(ctx, "out", "snapshot")
        entries = await _run_bulk(ctx, "state", None, lambda t: write_state_sections(state, fd, t))
        return {
            "bytes": sum(entry.length for entry in entries),
            "sections": [entry.to_dict() for entry in entries],
        }
    blob = encode_state_blob(state)
    await _run_bulk(ctx, "state", len(blob), lambda t: t.write(ctx.fds["out"], blob))
    return {"bytes": len(blob), "sections": []}


@handler("load-state", exclusive=True)
async def load_state(ctx: CommandContext) -> dict[str, Any]:
    host = _host(ctx)
    if not host.incoming:
        raise InvalidStateError(ctx.command, host.state)
    fd = ctx.fds["in"]
    if ctx.args["format"] == "snapshot":
        _require_file(ctx, "in", "snapshot")
        state: MachineState = await _run_bulk(ctx, "state", None, lambda t: read_state_sections(fd))
    else:
        state = await _run_bulk(ctx, "state", None, lambda t: read_state_blob(fd, t))
    try:
        await trio.to_thread.run_sync(host.load_state, state)
    except ValueError as exc:
        raise CommandError("bad-state", f"load-state: {exc}") from None
    return {"vcpus": state.config.vcpus, "memory_size": state.config.memory_size}


# --- dirty pages -------------------------------------------------------------------------------


@handler("dirty-log-start", exclusive=True)
async def dirty_log_start(ctx: CommandContext) -> dict[str, Any]:
    machine = _machine(ctx)
    return {"epoch": await trio.to_thread.run_sync(machine.dirty_log_start)}


@handler("dirty-log-stop", exclusive=True)
async def dirty_log_stop(ctx: CommandContext) -> dict[str, Any]:
    machine = _machine(ctx)
    await trio.to_thread.run_sync(machine.dirty_log_stop)
    return {}


def _dirty_log_off(ctx: CommandContext) -> CommandError:
    return CommandError(
        ErrorCode.DIRTY_LOG_OFF, f"{ctx.command}: dirty logging is off (send dirty-log-start)"
    )


@handler("query-dirty")
async def query_dirty(ctx: CommandContext) -> dict[str, Any]:
    machine = _machine(ctx)
    try:
        count = await trio.to_thread.run_sync(machine.query_dirty)
    except DirtyLogOff:
        raise _dirty_log_off(ctx) from None
    return {
        "dirty_pages": count.pages,
        "dirty_bytes": count.pages * PAGE_SIZE,
        "epoch": count.epoch,
    }


@handler("dump-dirty")
async def dump_dirty(ctx: CommandContext) -> dict[str, Any]:
    machine = _machine(ctx)
    consistent = machine.state is not RunState.RUNNING
    expected = ctx.args["epoch"]
    section = ctx.args["section"]
    snapshot = ctx.args["format"] == "snapshot"
    if snapshot:
        fd = _require_file(ctx, "out", "snapshot")
        _require_positional(ctx, "out", "snapshot", read=True)
        if section is None:
            raise CommandError(
                ErrorCode.INVALID_ARGUMENTS,
                "dump-dirty: format snapshot needs section (the memory section's offset)",
                {"argument": "section", "problem": "required with format snapshot"},
            )
        # before any page is taken: a wrong file or offset must not lose the dirty pages
        try:
            writer = memory_section_at(machine, fd, section)
        except (BulkError, OSError) as exc:
            raise _command_error(ctx, exc) from None
    try:
        bitmaps, epoch = await trio.to_thread.run_sync(machine.take_dirty, expected)
    except DirtyLogOff:
        raise _dirty_log_off(ctx) from None
    except DirtyLogMoved as exc:
        raise CommandError(
            ErrorCode.DIRTY_LOG_MOVED,
            f"dump-dirty: {exc}; nothing was taken",
            {"expected": exc.expected, "epoch": exc.current},
        ) from None
    assert machine.memory is not None
    runs = [
        bitmap_to_runs(bitmap, region.size // PAGE_SIZE)
        for bitmap, region in zip(bitmaps, machine.memory.regions, strict=True)
    ]
    if snapshot:
        stats = await _run_bulk(
            ctx,
            "pages",
            None,
            lambda t: update_memory_section(machine, fd, t, writer, runs, consistent=consistent),
        )
    else:
        stats = await _run_bulk(
            ctx,
            "pages",
            None,
            lambda t: send_page_stream(
                machine, ctx.fds["out"], t, consistent=consistent, runs=runs
            ),
        )
    return {**_with_stats(stats, consistent=consistent), "epoch": epoch}
